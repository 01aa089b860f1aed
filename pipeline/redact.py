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
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

REDACTED = "[REDACTED]"


class Redactor:
    """Replace each of ``secrets`` with ``[REDACTED]`` in bytes and text.

    Empty secrets are ignored (no key, nothing to hide). Longer secrets are replaced
    first so a key that contains another one is never half-replaced.
    """

    __slots__ = ("_texts", "_bytes")

    def __init__(self, *secrets: str | None) -> None:
        texts = sorted({s for s in secrets if s}, key=len, reverse=True)
        self._texts = tuple(texts)
        self._bytes = tuple(s.encode("utf-8") for s in texts)

    def __bool__(self) -> bool:
        return bool(self._texts)

    def data(self, raw: bytes) -> bytes:
        """``raw`` without any secret."""
        for secret in self._bytes:
            if secret in raw:
                raw = raw.replace(secret, REDACTED.encode())
        return raw

    def text(self, text: str) -> str:
        """``text`` without any secret."""
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
