"""Take the API key out of everything a server sends before the process keeps it.

Servers and proxies echo the Authorization header into error messages
(``Token Bearer sk-... is invalid``), some even into answers. The client knows the
key, so it hands every byte it receives (answer bodies, SSE lines, error bodies,
header values, exception texts) through one ``Redactor`` before anything parses,
stores, prints or logs it. The check is a substring search (memchr-fast); text
without the key is returned as is, so the common case costs one scan.

Decoding can rebuild a key that the raw bytes did not show (a JSON ``\\u`` escape),
so the few strings that leave the client (answer text, error text) are checked once
more after parsing; the same one-scan rule applies.

A key is also looked for in the other forms servers and proxies echo it in:
base64 (``secret_forms``), as proxies that forward or log credentials write them,
wherever the key sits inside the encoded text; and percent-encoded, as a URL or a
form carries a key with ``+``, ``/`` or ``=`` in it, in any mix of encoded and plain
characters and either case of hex digits (``percent_pattern``, run only on text that
holds a ``%``). One scan more per form.
"""

from __future__ import annotations

import base64
import ipaddress
import re
from urllib.parse import urlsplit

REDACTED = "[REDACTED]"
MIN_ENCODED_SECRET = 8


def secret_forms(secret: str) -> set[str]:
    """``secret`` and its base64 forms: the characters of the base64 text of any
    bytes that hold the secret which depend on the secret's bytes alone, for each of
    the three places it can start at within a 3-byte group, in the standard and the
    URL-safe alphabet. (A character that also carries bits of a byte before or after
    the secret changes with that byte, so it is left out: what is left of an echo
    around ``[REDACTED]`` is at most two characters of the neighbours' bits.)

    A secret under ``MIN_ENCODED_SECRET`` characters (a placeholder key for a local
    server) is looked for only as sent: its encodings would be short enough to turn
    up in ordinary text, which would then be hidden for nothing.
    """
    if len(secret) < MIN_ENCODED_SECRET:
        return {secret}
    raw = secret.encode("utf-8")
    forms = {secret}
    for offset, first_clean in ((0, 0), (1, 2), (2, 3)):
        bits = 8 * (offset + len(raw))
        last_clean = bits // 6  # characters past this one carry the next byte's bits
        encoded = base64.b64encode(bytes(offset) + raw)[first_clean:last_clean]
        forms.add(encoded.decode("ascii"))
        forms.add(encoded.translate(_URL_SAFE).decode("ascii"))
    return forms


_URL_SAFE = bytes.maketrans(b"+/", b"-_")


def percent_pattern(secret: str) -> str | None:
    """A regular expression for ``secret`` percent-encoded in any way: each character
    that is not a letter or digit as itself or as its ``%XX`` bytes (either case of
    hex; encoders differ on which to encode, ``~`` and ``-`` included), a space also
    as ``+``. The encoded spelling is tried first, so an echo is taken out whole. None
    when the secret is letters and digits only (every encoding of it is itself) or is
    under ``MIN_ENCODED_SECRET`` characters."""
    if len(secret) < MIN_ENCODED_SECRET or secret.isascii() and secret.isalnum():
        return None
    parts = []
    for ch in secret:
        if ch.isascii() and ch.isalnum():
            parts.append(re.escape(ch))
            continue
        encoded = "".join(
            "%" + "".join(f"[{d}{d.lower()}]" if d.isalpha() else d for d in f"{b:02X}")
            for b in ch.encode("utf-8")
        )
        spellings = [encoded, re.escape(ch)] + ([r"\+"] if ch == " " else [])
        parts.append("(?:" + "|".join(spellings) + ")")
    return "".join(parts)


class Redactor:
    """Replace each of ``secrets`` with ``[REDACTED]`` in bytes and text.

    Each secret is looked for in every form ``secret_forms`` names. Empty secrets are
    ignored (no key, nothing to hide). Longer forms are replaced first so a key that
    contains another one is never half-replaced.
    """

    __slots__ = ("_texts", "_bytes", "_percent_text", "_percent_bytes", "_plus")

    def __init__(self, *secrets: str | None) -> None:
        forms = {form for s in secrets if s for form in secret_forms(s)}
        texts = sorted(forms, key=len, reverse=True)
        self._texts = tuple(texts)
        self._bytes = tuple(s.encode("utf-8") for s in texts)
        patterns = sorted(
            {p for s in secrets if s and (p := percent_pattern(s))}, key=len, reverse=True
        )
        self._percent_text = re.compile("|".join(patterns)) if patterns else None
        self._percent_bytes = re.compile("|".join(patterns).encode("utf-8")) if patterns else None
        # A key with a space may come back form-encoded with no "%" at all ("a+b").
        self._plus = any(s and " " in s for s in secrets)

    def __bool__(self) -> bool:
        return bool(self._texts)

    def data(self, raw: bytes) -> bytes:
        """``raw`` without any secret."""
        # Encoded forms first: a key ending in "%" echoed as "...%25" is then taken
        # out whole, not as the key followed by "25".
        if self._percent_bytes is not None and (b"%" in raw or self._plus and b"+" in raw):
            raw = self._percent_bytes.sub(REDACTED.encode(), raw)
        for secret in self._bytes:
            if secret in raw:
                raw = raw.replace(secret, REDACTED.encode())
        return raw

    def text(self, text: str) -> str:
        """``text`` without any secret."""
        if self._percent_text is not None and ("%" in text or self._plus and "+" in text):
            text = self._percent_text.sub(REDACTED, text)
        for secret in self._texts:
            if secret in text:
                text = text.replace(secret, REDACTED)
        return text

    def optional(self, text: str | None) -> str | None:
        return None if text is None else self.text(text)


def refuse_url_secrets(url: str) -> None:
    """Raise ValueError for a base URL that carries credentials (``user:pass@``, a query).

    A base URL is recorded in the run manifest and in every result row; a password in
    it would end up there. The message names the host only, never the secret.
    """
    parts = urlsplit(url.strip())
    host = parts.netloc.rpartition("@")[2]
    shown = f"{parts.scheme}://{host}{parts.path}"
    if "@" in parts.netloc:
        raise ValueError(
            f"{parts.scheme}://***@{host}{parts.path}: a base URL must not carry credentials "
            "(they would be stored with the results); put the key in an environment "
            "variable and name it with --api-key-env"
        )
    if parts.query or parts.fragment or "?" in url or "#" in url:
        raise ValueError(
            f"{shown}?...: a base URL must not carry a query or fragment (it can hold a "
            "token, and would be stored with the results); put the key in an environment "
            "variable and name it with --api-key-env"
        )


def plain_http_warnings(urls: list[str], api_key: str | None) -> list[str]:
    """One warning per base URL that would send the key unencrypted off this machine.

    Loopback (a local simulator or proxy) is exempt: the key never crosses a network.
    """
    if not api_key:
        return []
    warnings = []
    for url in urls:
        parts = urlsplit(url)
        if parts.scheme == "http" and not is_loopback(parts.hostname or ""):
            warnings.append(
                f"{parts.scheme}://{parts.netloc}: the API key is sent over plain http:// "
                "to a host that is not this machine; anyone on the way can read it "
                "(use https://)"
            )
    return warnings


def is_loopback(host: str) -> bool:
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
