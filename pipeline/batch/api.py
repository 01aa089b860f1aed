"""OpenAI's Files and Batches APIs over httpx, with the chat client's safety rules.

Every call is bounded in time (``timeout`` per wait, ``deadline`` in all) and in size
(a JSON answer up to ``MAX_JSON_BYTES``; a downloaded output file is streamed to disk
against ``max_download_bytes``, never held in memory). Every byte from the server
passes the key scrubber before it is parsed or stored, and error texts are scrubbed
again. 429, 5xx and transport trouble are retried with backoff (tenacity, the run's
retry policy); 401/403/402 stop the run (``BatchFatal``: exit 3); a 3xx is never
followed (the key would go to a host nobody named).

Creating a batch is the one call that must not simply be sent again: if an answer
is lost, the batch may exist all the same, and a second create would bill every row
twice. So a failed create is followed by a look at the provider's batches for this
chunk's metadata before it is tried again (``create_batch``).
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import anyio
import httpx

from pipeline.batch.ledger import safe_id
from pipeline.client import normalize_base_url, scrub_error
from pipeline.errors import ApiError, ConfigurationError, Kind, RequestError, StopError
from pipeline.errors import TransportError as WireError
from pipeline.manifest import fsync_dir
from pipeline.redact import Redactor
from pipeline.retry import retrying
from pipeline.wire import parse_error, scrub_strings

MAX_JSON_BYTES = 8 * 2**20  # a batch or file object, or a page of them
DEFAULT_MAX_DOWNLOAD_BYTES = 10 * 2**30  # one output or error file (50,000 long answers)
LIST_PAGE = 100  # batches per page when looking for this OUT's batches
MAX_LIST_PAGES = 200  # stop looking after this many (20,000 batches)


class BatchFatal(StopError):
    """The provider refuses this key (401/403), the balance is gone (402), or the base
    URL is wrong: no call will succeed, so the run stops (exit 3) with its results kept."""


def _fatal(error: RequestError) -> BatchFatal:
    advice = (
        "check the key and that it may use the Batch API"
        if error.http_status in (401, 403)
        else "check the base URL and the account"
    )
    return BatchFatal(f"{error}; {advice}")


class BatchApi:
    """The Files/Batches endpoints of one base URL."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        timeout: float = 600.0,
        max_download_bytes: int = DEFAULT_MAX_DOWNLOAD_BYTES,
        max_attempts: int = 6,
        max_retry_time: float = 900.0,
        sleep: Callable[[float], Awaitable[None]] | None = None,
    ) -> None:
        self.base = normalize_base_url(base_url)
        self.list_cut_short = False  # the last listing stopped at MAX_LIST_PAGES
        self.redactor = Redactor(api_key)
        self.max_download_bytes = max_download_bytes
        self._attempts = max_attempts
        self._retry_time = max_retry_time
        self._sleep = sleep or anyio.sleep
        headers = {"accept": "application/json"}
        if api_key:
            headers["authorization"] = f"Bearer {api_key}"
        self._http = httpx.AsyncClient(
            headers=headers,
            timeout=httpx.Timeout(timeout, connect=min(timeout, 30.0)),
            transport=transport,
            follow_redirects=False,
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    # -- the endpoints ----------------------------------------------------------------

    async def upload(self, path: Path) -> str:
        """``POST /files`` (purpose batch): the file's id."""

        async def once() -> Any:
            with open(path, "rb") as fh:  # noqa: ASYNC230 - streamed by httpx in chunks
                files = {"file": (path.name, fh, "application/jsonl")}
                return await self._json("POST", "/files", files=files, data={"purpose": "batch"})

        data = await self._retried(once)
        file_id = safe_id(data.get("id") if isinstance(data, Mapping) else None)
        if file_id is None or self.redactor.text(file_id) != file_id:
            raise WireError("malformed_response", "the file upload answered no usable file id")
        return file_id

    async def create_batch(
        self, file_id: str, metadata: dict[str, str], find: Callable[[], Awaitable[Any]]
    ) -> dict[str, Any]:
        """``POST /batches``. After a failure that may have created it anyway, ``find``
        (a look for this chunk's metadata) runs before the create is tried again."""
        body = {
            "input_file_id": file_id,
            "endpoint": "/v1/chat/completions",
            "completion_window": "24h",
            "metadata": metadata,
        }
        failures = 0
        while True:
            try:
                return _batch(await self._json("POST", "/batches", json=body), self.redactor)
            except RequestError as exc:
                if exc.kind is Kind.FATAL:
                    raise _fatal(exc) from None
                if exc.kind is not Kind.RETRY:
                    raise
                failures += 1
                if failures >= self._attempts:
                    raise
                await self._sleep(min(60.0, exc.retry_after or 2.0 ** min(failures, 6)))
            found = await find()
            if found is not None:
                return _batch(found, self.redactor)

    async def retrieve(self, batch_id: str) -> dict[str, Any]:
        path = f"/batches/{batch_id}"
        return _batch(await self._retried(lambda: self._json("GET", path)), self.redactor)

    async def gone(self, path: str) -> bool:
        """Whether ``GET path`` answers the provider's own "not found": a 404 whose
        body is a JSON error object (a proxy's page or an empty 404 is not one). False
        when it answers 200; anything else raises, as any call does."""

        async def once() -> bool:
            status, raw, headers = await self._exchange("GET", path)
            if status == 404:
                try:
                    body = json.loads(raw)
                except (ValueError, RecursionError):
                    body = None
                if isinstance(body, dict) and isinstance(body.get("error"), dict):
                    return True
            self._raise_for_status(status, raw, headers)
            return False

        result: bool = await self._retried(once)
        return result

    async def cancel(self, batch_id: str) -> dict[str, Any]:
        path = f"/batches/{batch_id}/cancel"
        return _batch(await self._retried(lambda: self._json("POST", path)), self.redactor)

    async def batches(self) -> AsyncIterator[dict[str, Any]]:
        """Every batch of the account, newest first, a page at a time; at most
        ``MAX_LIST_PAGES`` pages (``list_cut_short`` says when there were more)."""
        after: str | None = None
        self.list_cut_short = False
        for _ in range(MAX_LIST_PAGES):
            params = {"limit": str(LIST_PAGE)}
            if after:
                params["after"] = after
            call = functools.partial(self._json, "GET", "/batches", params=params)
            page = await self._retried(call)
            data = page.get("data") if isinstance(page, Mapping) else None
            if not isinstance(data, list):
                raise WireError("malformed_response", "the batch list has no data")
            for item in data:
                try:
                    batch = _batch(item, self.redactor)
                except WireError:
                    continue  # one odd entry is skipped, not fatal
                yield batch
            last = safe_id(page.get("last_id"))
            if not page.get("has_more") or last is None or last == after:
                return
            after = last
        self.list_cut_short = True

    async def download(self, file_id: str, target: Path) -> int:
        """``GET /files/{id}/content`` streamed to ``target`` (temp name, fsync, rename),
        scrubbed of the key line by line; bytes written. Over the cap is an error."""
        return int(await self._retried(lambda: self._download_once(file_id, target)))

    # -- plumbing ---------------------------------------------------------------------

    async def _retried(self, call: Callable[[], Awaitable[Any]]) -> Any:
        """``call`` under the run's retry policy; fatal answers become ``BatchFatal``."""
        try:
            async for attempt in retrying(self._attempts, self._retry_time, sleep=self._sleep):
                with attempt:
                    return await call()
        except RequestError as exc:
            if exc.kind is Kind.FATAL:
                raise _fatal(exc) from None
            raise
        raise AssertionError("unreachable")  # pragma: no cover

    async def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        status, raw, headers = await self._exchange(method, path, **kwargs)
        self._raise_for_status(status, raw, headers)  # (a 404: the others raised already)
        try:
            return json.loads(raw)
        except (ValueError, RecursionError):
            raise WireError("malformed_response", f"{method} {path}: answer is not JSON") from None

    async def _exchange(
        self, method: str, path: str, **kwargs: Any
    ) -> tuple[int, bytes, httpx.Headers]:
        """One call: its status and its body (redacted, bounded). An error status
        raises (``_read``), except a 404, whose body the caller reads (``gone``)."""
        try:
            async with self._http.stream(method, f"{self.base}{path}", **kwargs) as response:
                status, headers = response.status_code, response.headers
                raw = await self._read(response, MAX_JSON_BYTES, keep_404=True)
        except RequestError:
            raise
        except httpx.TimeoutException as exc:
            what = f"{method} {path} timed out ({type(exc).__name__})"
            raise WireError("timeout", what) from None
        except (httpx.HTTPError, OSError) as exc:
            text = self.redactor.text(f"{type(exc).__name__}: {exc}")[:300]
            raise WireError("connection_error", f"{method} {path}: {text}") from None
        return status, raw, headers

    async def _read(self, response: httpx.Response, cap: int, *, keep_404: bool = False) -> bytes:
        self._check_status_line(response)
        chunks: list[bytes] = []
        size = 0
        async for chunk in response.aiter_bytes():
            size += len(chunk)
            if size > cap:
                raise WireError("response_too_large", f"answer passed {cap:,} bytes")
            chunks.append(chunk)
        raw = self.redactor.data(b"".join(chunks))
        if response.status_code == 404 and keep_404:
            return raw
        self._raise_for_status(response.status_code, raw, response.headers)
        return raw

    def _raise_for_status(self, status: int, raw: bytes, headers: Mapping[str, str]) -> None:
        if status >= 400:
            error = parse_error(status, raw, headers, self.redactor.text)
            scrub_error(error, self.redactor)
            raise error

    def _check_status_line(self, response: httpx.Response) -> None:
        status = response.status_code
        if 300 <= status < 400:
            target = self.redactor.text(response.headers.get("location", "")[:300])
            raise ConfigurationError(
                "redirect", f"HTTP {status}: the server redirects to {target or 'nowhere'}"
            )

    async def _download_once(self, file_id: str, target: Path) -> int:
        tmp = target.with_name(f".{target.name}.tmp")
        url = f"{self.base}/files/{file_id}/content"
        written = 0
        try:
            async with self._http.stream("GET", url) as response:
                self._check_status_line(response)
                if response.status_code >= 400:
                    await self._read(response, MAX_JSON_BYTES)  # raises the error
                fd = os.open(
                    tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644
                )
                with os.fdopen(fd, "wb") as fh:
                    pending = b""
                    async for chunk in response.aiter_bytes():
                        written += len(chunk)
                        if written > self.max_download_bytes:
                            raise WireError(
                                "response_too_large",
                                f"file {file_id} passed {self.max_download_bytes:,} bytes",
                            )
                        # Whole lines through the scrubber: a key split across two
                        # chunks would slip past a per-chunk replace.
                        pending += chunk
                        cut = pending.rfind(b"\n") + 1
                        if cut:
                            fh.write(self.redactor.data(pending[:cut]))
                            pending = pending[cut:]
                    fh.write(self.redactor.data(pending))
                    fh.flush()
                    os.fsync(fh.fileno())
            os.replace(tmp, target)
            fsync_dir(target.parent)
        except RequestError:
            tmp.unlink(missing_ok=True)
            raise
        except httpx.TimeoutException as exc:
            tmp.unlink(missing_ok=True)
            raise WireError("timeout", f"download timed out ({type(exc).__name__})") from None
        except httpx.HTTPError as exc:
            tmp.unlink(missing_ok=True)
            text = self.redactor.text(f"{type(exc).__name__}: {exc}")[:300]
            raise WireError("connection_error", f"download of {file_id}: {text}") from None
        return written


STATUSES = frozenset(
    {
        "validating",
        "in_progress",
        "finalizing",
        "completed",
        "failed",
        "expired",
        "cancelling",
        "cancelled",
    }
)


def _batch(data: Any, redactor: Redactor | None = None) -> dict[str, Any]:
    """A batch object, checked before it is used: a plain id that carries no key, a
    known status (else ``unknown``), file ids that are plain too (else dropped), and
    ``request_counts`` holding only non-negative integer counts: whatever shape the
    server sends, neither collecting nor ``pipeline batches`` may trip over it."""
    if not isinstance(data, Mapping) or safe_id(data.get("id")) is None:
        raise WireError("malformed_response", "the answer is not a batch object")
    batch = dict(data)
    if redactor is not None and redactor.text(batch["id"]) != batch["id"]:
        raise WireError("malformed_response", "the batch id carries the key")
    if redactor is not None and redactor:
        # The raw bytes were scrubbed, but a ``\\u`` escape rebuilds the key on
        # parsing; an error code or a metadata value reaches stderr, the ledger and
        # the manifest, so every string of the object is scrubbed once more.
        batch = scrub_strings(batch, redactor.text)
    status = batch.get("status")
    if not isinstance(status, str) or status not in STATUSES:  # a dict is unhashable
        batch["status"] = "unknown"
    counts = batch.get("request_counts")
    batch["request_counts"] = {
        k: v
        for k, v in (counts.items() if isinstance(counts, Mapping) else ())
        if k in ("total", "completed", "failed")
        and isinstance(v, int)
        and not isinstance(v, bool)
        and 0 <= v < 2**53
    }
    for key in ("output_file_id", "error_file_id", "input_file_id"):
        if batch.get(key) is not None and safe_id(batch[key]) is None:
            batch[key] = None
    return batch


def is_api_error(exc: BaseException, *statuses: int) -> bool:
    return isinstance(exc, ApiError) and exc.http_status in statuses
