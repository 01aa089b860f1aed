"""OpenAI's Batch API: request-file validation, the lifecycle by the clock, output and error files.

A batch is decided when it is created and revealed as time passes, so every answer is a
pure function of the record and the clock, and a later process reading the same state
sees the same batch. With ``S = batch_seconds`` after ``created_at``:

- ``validating`` for the first 10% of ``S``; a file that breaks OpenAI's rules (a line
  that is not JSON, a wrong method or url, a second model, a repeated custom_id, too many
  lines or bytes), or one that would pass the enqueued-token limit, then ends ``failed``
  with ``errors.data`` naming the line and code, and nothing is billed;
- ``in_progress`` until 90%, the lines finishing one by one in file order
  (``request_counts`` grows); ``finalizing`` for the last 10%; then ``completed``;
- lines drawn by ``batch_expire_share`` (from the seed and the custom_id, so the same
  lines every time) never finish: the batch ends ``expired`` at ``S``. A custom_id
  expires at most once, so a resubmitted row finishes the second time;
- ``cancel`` makes it ``cancelling``, and ``cancelled`` 10% of ``S`` later; the lines
  finished before the cancel are kept.

When a batch ends, each finished line is answered by the same answer logic as a
synchronous call (so usage is the same kind) and billed once; its output file holds the
answers, its error file the lines that got an error status and those that never ran
(``batch_expired`` / ``batch_cancelled``). At that point every line of the input is in
exactly one of the two files. ``S = 0`` ends a batch at its first retrieve.
"""

from __future__ import annotations

import hashlib
import json
import math
import urllib.parse
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from pipeline.sim.config import SimConfig
from pipeline.sim.files import FileStore
from pipeline.sim.ledger import BilledAnswer
from pipeline.sim.parse import Parsed, parse_body
from pipeline.sim.protocol import Reject, openai_error

ENDPOINT = "/v1/chat/completions"
WINDOW = "24h"
WINDOW_SECONDS = 24 * 3600
TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})
MAX_ERRORS = 100  # errors.data lists at most this many problems; validation stops there
MAX_METADATA_KEYS, MAX_METADATA_KEY, MAX_METADATA_VALUE = 16, 64, 512
LIST_DEFAULT, LIST_MAX = 20, 100

# Answers a line, bills nothing yet: (the chat.completion body, the ledger entry).
LineAnswerer = Callable[[Parsed, str, str, float], tuple[dict[str, Any], BilledAnswer]]


@dataclass
class Line:
    """One request of a batch input file."""

    number: int  # 1-based line number in the file, as errors.data counts
    custom_id: str
    body: dict[str, Any]


@dataclass
class Checked:
    """A request file after validation."""

    lines: list[Line] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    model: str | None = None
    tokens: int = 0  # the prompt tokens it would enqueue
    bad: list[int] = field(default_factory=list)  # indexes of lines a chat call refuses


def _error(code: str, message: str, line: int | None = None, param: str | None = None) -> Any:
    return {"code": code, "message": message, "line": line, "param": param}


def check_file(
    data: bytes,
    *,
    endpoint: str = ENDPOINT,
    max_lines: int | None = None,
    max_bytes: int | None = None,
    models: frozenset[str] = frozenset(),
    count: bool = True,
) -> Checked:
    """Validate a request file the way OpenAI does before running a batch.

    ``count=False`` skips the prompt estimate (and so ``tokens`` and ``bad``): for
    re-reading a file already validated, whose lines are about to be parsed anyway.

    Structural problems fail the whole batch (``errors``); a line that is well formed but
    whose body a chat call would refuse is listed in ``bad`` and gets that refusal in the
    error file instead. Never raises on any bytes.
    """
    out = Checked()
    if max_bytes is not None and len(data) > max_bytes:
        out.errors.append(
            _error("file_too_large", f"The input file has {len(data)} bytes; at most {max_bytes}.")
        )
        return out
    seen: set[str] = set()
    for number, raw in enumerate(data.split(b"\n"), start=1):
        if len(out.errors) >= MAX_ERRORS:
            break
        if not raw.strip():
            continue
        if max_lines is not None and len(out.lines) >= max_lines:
            message = f"The input file has more than {max_lines} requests; a batch takes at most "
            out.errors.append(_error("too_many_requests", message + f"{max_lines}.", number))
            break
        line = _check_line(raw, number, endpoint, out.errors)
        if line is None:
            continue
        if line.custom_id in seen:
            message = f"The custom_id {line.custom_id!r} is used more than once in this file."
            out.errors.append(_error("duplicate_custom_id", message, number, "custom_id"))
            continue
        seen.add(line.custom_id)
        model = line.body["model"]
        if out.model is None:
            out.model = model
        elif model != out.model:
            message = f"The model {model!r} differs from {out.model!r}: one model per file."
            out.errors.append(_error("mismatched_model", message, number, "body.model"))
            continue
        if models and model not in models:
            message = f"The model {model!r} does not exist or you do not have access to it."
            out.errors.append(_error("model_not_found", message, number, "body.model"))
            continue
        if count:
            try:
                out.tokens += parse_body(line.body).prompt_tokens
            except Reject:
                out.bad.append(len(out.lines))
        out.lines.append(line)
    if not out.lines and not out.errors:
        out.errors.append(_error("empty_file", "The input file has no requests."))
    return out


def _check_line(raw: bytes, number: int, endpoint: str, errors: list[Any]) -> Line | None:
    """One line's shape (JSON object, custom_id, method, url, body.model), or None and an error."""
    try:
        request = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        errors.append(
            _error("invalid_json_line", "This line is not parseable as valid JSON.", number)
        )
        return None
    if not isinstance(request, dict):
        errors.append(_error("invalid_request", "Each line must be a JSON object.", number))
        return None
    for name, kind, what in (
        ("custom_id", str, "a string"),
        ("method", str, "a string"),
        ("url", str, "a string"),
        ("body", dict, "an object"),
    ):
        if name not in request:
            message = f"Missing required parameter: '{name}'."
            errors.append(_error("missing_required_parameter", message, number, name))
            return None
        if not isinstance(request[name], kind):
            errors.append(_error("invalid_request", f"'{name}' must be {what}.", number, name))
            return None
    if not request["custom_id"]:
        errors.append(_error("invalid_request", "'custom_id' is empty.", number, "custom_id"))
        return None
    if request["method"] != "POST":
        errors.append(_error("invalid_request", "'method' must be POST.", number, "method"))
        return None
    if request["url"] != endpoint:
        message = f"The url {request['url']!r} does not match the batch endpoint {endpoint}."
        errors.append(_error("invalid_url", message, number, "url"))
        return None
    model = request["body"].get("model")
    if not isinstance(model, str) or not model:
        message = "'body.model' is required and must be a string."
        errors.append(_error("invalid_request", message, number, "body.model"))
        return None
    return Line(number, request["custom_id"], request["body"])


def expires(seed: int, custom_id: str, share: float) -> bool:
    """Whether the line with ``custom_id`` never finishes, at ``share``: the same answer for
    the same seed and id, in any process."""
    if share <= 0:
        return False
    digest = hashlib.sha256(f"{seed}:{custom_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < share


@dataclass
class BatchRecord:
    """Everything decided about a batch when it was created, and how it ended."""

    id: str
    seq: int
    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: dict[str, str] | None
    created_at: float
    seconds: float
    total: int
    tokens: int
    model: str | None
    errors: list[dict[str, Any]] | None  # a failed validation (or the token limit)
    expire: list[int]  # indexes of lines that never finish
    bad: list[int]  # indexes of lines a chat call refuses
    cancel_at: float | None = None
    final: dict[str, Any] | None = None  # status, at, output/error file ids, counts

    @property
    def validated_at(self) -> float:
        return self.created_at + 0.1 * self.seconds

    @property
    def ran_until(self) -> float:
        return self.created_at + 0.9 * self.seconds

    @property
    def done_at(self) -> float:
        return self.created_at + self.seconds

    def finished(self, at: float) -> int:
        """How many lines (in file order, expiring ones included) have had their turn by ``at``."""
        if at < self.validated_at or self.errors is not None:
            return 0
        span = self.ran_until - self.validated_at
        if span <= 0:
            return self.total
        return min(self.total, math.floor((at - self.validated_at) / span * self.total + 1e-9))

    def counts(self, at: float) -> dict[str, int]:
        """``request_counts`` while running: the lines finished by ``at``."""
        if self.errors is not None or at < self.validated_at:
            return {"total": 0, "completed": 0, "failed": 0}
        turn = self.finished(at)
        expire, bad = set(self.expire), set(self.bad)
        done = [i for i in range(turn) if i not in expire]
        failed = sum(1 for i in done if i in bad)
        return {"total": self.total, "completed": len(done) - failed, "failed": failed}

    def status(self, now: float) -> str:
        """The status at ``now`` (for a batch that has ended, how it ended)."""
        if self.final is not None:
            return str(self.final["status"])
        if self.cancel_at is not None:
            return "cancelling"
        if self.errors is not None or now < self.validated_at:
            return "validating"
        if now < self.ran_until or self.expire:
            return "in_progress"
        return "finalizing"

    def public(self, now: float, *, created: bool = False) -> dict[str, Any]:
        """The API's batch object as of ``now`` (``created``: as the create call answers it,
        always ``validating``, even when ``batch_seconds`` is 0)."""
        status = "validating" if created else self.status(now)
        final = self.final or {}
        cut = self.cancel_at if self.cancel_at is not None else math.inf
        started = (
            status not in ("validating", "failed")
            and self.errors is None
            and cut >= self.validated_at
        )
        finalizing = status in ("finalizing", "completed")
        at = final.get("at")

        def stamp(value: float | None) -> int | None:
            return None if value is None else int(value)

        return {
            "id": self.id,
            "object": "batch",
            "endpoint": self.endpoint,
            "errors": None if not self.errors else {"object": "list", "data": self.errors},
            "input_file_id": self.input_file_id,
            "completion_window": self.completion_window,
            "status": status,
            "output_file_id": final.get("output_file_id"),
            "error_file_id": final.get("error_file_id"),
            "created_at": int(self.created_at),
            "in_progress_at": stamp(self.validated_at if started else None),
            "expires_at": int(self.created_at + WINDOW_SECONDS),
            "finalizing_at": stamp(self.ran_until if finalizing else None),
            "completed_at": stamp(at if status == "completed" else None),
            "failed_at": stamp(at if status == "failed" else None),
            "expired_at": stamp(at if status == "expired" else None),
            "cancelling_at": stamp(self.cancel_at),
            "cancelled_at": stamp(at if status == "cancelled" else None),
            "request_counts": final.get("counts")
            or (self.counts(now) if status != "validating" else self.counts(-math.inf)),
            "metadata": self.metadata,
        }


class Batches:
    """The batches of one simulator; ``persist`` is called after every change with the
    ended batch and its ledger entries (or None), so a state directory can save them."""

    def __init__(
        self,
        config: SimConfig,
        files: FileStore,
        answer: LineAnswerer,
        persist: Callable[[BatchRecord | None, list[BilledAnswer]], None],
    ) -> None:
        self.config = config
        self.records: dict[str, BatchRecord] = {}
        self.seq = 0
        # A line expires at most once per custom_id, so a row the pipeline resubmits
        # after an expiry finishes the second time.
        self.expired_ids: set[str] = set()
        self._files, self._answer, self._persist = files, answer, persist

    # --- the API ---------------------------------------------------------------------------

    def create(self, raw: bytes, now: float) -> dict[str, Any]:
        """``POST /v1/batches``: the new batch, ``validating`` (decided now, shown over time)."""
        request = _json_object(raw)
        file_id = request.get("input_file_id")
        if not isinstance(file_id, str):
            raise openai_error(
                400, "Missing required parameter: 'input_file_id'.", param="input_file_id"
            )
        endpoint = request.get("endpoint")
        if endpoint != ENDPOINT:
            message = f"Invalid 'endpoint': this server runs batches for {ENDPOINT} only."
            raise openai_error(400, message, param="endpoint")
        window = request.get("completion_window")
        if window != WINDOW:
            message = f"Invalid 'completion_window': only '{WINDOW}' is supported."
            raise openai_error(400, message, param="completion_window")
        metadata = _metadata(request.get("metadata"))
        meta = self._files.get(file_id)
        if meta.purpose != "batch":
            message = f"The file {file_id} has purpose '{meta.purpose}'; a batch needs 'batch'."
            raise openai_error(400, message, param="input_file_id")
        cfg = self.config
        checked = check_file(
            self._files.read(file_id),
            max_lines=cfg.batch_max_lines,
            max_bytes=cfg.batch_max_file_bytes,
            models=frozenset(cfg.models),
        )
        errors = checked.errors or None
        limit = cfg.batch_enqueued_token_limit
        if errors is None and limit is not None:
            self.refresh_all(now)
            enqueued = sum(
                r.tokens for r in self.records.values() if r.final is None and r.errors is None
            )
            if enqueued + checked.tokens > limit:
                message = (
                    f"Enqueued token limit reached for {checked.model} in organization "
                    f"org-sim. Limit: {limit:,} enqueued tokens. Please try again once some "
                    "in_progress batches have been completed."
                )
                errors = [_error("token_limit_exceeded", message)]
        self.seq += 1
        record = BatchRecord(
            id=f"batch_{uuid.uuid4().hex[:24]}",
            seq=self.seq,
            input_file_id=file_id,
            endpoint=ENDPOINT,
            completion_window=WINDOW,
            metadata=metadata,
            created_at=now,
            seconds=cfg.batch_seconds,
            total=len(checked.lines),
            tokens=checked.tokens if errors is None else 0,
            model=checked.model,
            errors=errors,
            expire=[
                i
                for i, line in enumerate(checked.lines)
                if line.custom_id not in self.expired_ids
                and expires(cfg.seed, line.custom_id, cfg.batch_expire_share)
            ],
            bad=checked.bad,
        )
        self.records[record.id] = record
        self._persist(None, [])
        return record.public(now, created=True)

    def retrieve(self, batch_id: str, now: float) -> dict[str, Any]:
        """``GET /v1/batches/{id}``, after letting the clock move it on."""
        record = self._get(batch_id)
        self.refresh(record, now)
        return record.public(now)

    def cancel(self, batch_id: str, now: float) -> dict[str, Any]:
        """``POST /v1/batches/{id}/cancel``: ``cancelling`` now, ``cancelled`` a little later."""
        record = self._get(batch_id)
        self.refresh(record, now)
        status = record.status(now)
        if status in ("cancelling", "cancelled"):
            return record.public(now)
        if status in TERMINAL:
            raise openai_error(400, f"Cannot cancel a batch with status '{status}'.")
        record.cancel_at = now
        self._persist(None, [])
        return record.public(now)

    def listing(self, query: str, now: float) -> dict[str, Any]:
        """``GET /v1/batches?limit=&after=``: newest first, one page."""
        params = urllib.parse.parse_qs(query, keep_blank_values=True)
        limit = LIST_DEFAULT
        if "limit" in params:
            text = params["limit"][-1]
            if not text.isdigit() or not 1 <= int(text) <= LIST_MAX:
                message = f"Invalid 'limit': must be an integer from 1 to {LIST_MAX}."
                raise openai_error(400, message, param="limit")
            limit = int(text)
        self.refresh_all(now)
        ordered = sorted(self.records.values(), key=lambda r: (r.created_at, r.seq), reverse=True)
        if "after" in params:
            after = params["after"][-1]
            ids = [r.id for r in ordered]
            if after not in ids:
                raise openai_error(400, f"Invalid 'after': no batch {after!r}.", param="after")
            ordered = ordered[ids.index(after) + 1 :]
        page = ordered[:limit]
        return {
            "object": "list",
            "data": [r.public(now) for r in page],
            "first_id": page[0].id if page else None,
            "last_id": page[-1].id if page else None,
            "has_more": len(ordered) > limit,
        }

    def reads(self, file_id: str) -> bool:
        """Whether an open batch still needs this input file's bytes."""
        return any(r.input_file_id == file_id and r.final is None for r in self.records.values())

    # --- the lifecycle -----------------------------------------------------------------------

    def refresh_all(self, now: float) -> None:
        """Move every open batch on to ``now``."""
        for record in list(self.records.values()):
            self.refresh(record, now)

    def refresh(self, record: BatchRecord, now: float) -> None:
        """End the batch if its time has come: failed, cancelled, expired or completed."""
        if record.final is not None:
            return
        if record.errors is not None:
            if record.cancel_at is not None and now >= record.cancel_at + 0.1 * record.seconds:
                self._end(record, "cancelled", record.cancel_at + 0.1 * record.seconds, None)
            elif record.cancel_at is None and now >= record.validated_at:
                self._end(record, "failed", record.validated_at, None)
        elif record.cancel_at is not None:
            if now >= record.cancel_at + 0.1 * record.seconds:
                self._end(
                    record, "cancelled", record.cancel_at + 0.1 * record.seconds, record.cancel_at
                )
        elif now >= record.done_at:
            status = "expired" if record.expire else "completed"
            self._end(record, status, record.done_at, record.done_at)

    def _end(self, record: BatchRecord, status: str, at: float, cutoff: float | None) -> None:
        """Answer and bill the finished lines, write the output and error files, and record
        how the batch ended; ``cutoff`` None = no line ran (a failed validation)."""
        final: dict[str, Any] = {"status": status, "at": at, "counts": None}
        billed: list[BilledAnswer] = []
        if cutoff is None:
            final["counts"] = {"total": 0, "completed": 0, "failed": 0}
        else:
            billed = self._run_lines(record, status, at, cutoff, final)
        record.final = final
        if not self.reads(record.input_file_id):  # a deleted input no open batch still reads
            self._files.release(record.input_file_id)
        self._persist(record, billed)

    def _run_lines(
        self, record: BatchRecord, status: str, at: float, cutoff: float, final: dict[str, Any]
    ) -> list[BilledAnswer]:
        try:
            data = self._files.read(record.input_file_id)
        except Reject:
            data = b""
        lines = check_file(data, count=False).lines
        if len(lines) != record.total:  # the input's bytes are gone: nothing can run
            final.update(status="failed", counts={"total": 0, "completed": 0, "failed": 0})
            message = "The input file could not be read."
            record.errors = [_error("input_file_missing", message)]
            return []
        turn = record.finished(cutoff)
        expire = set(record.expire)
        unrun = "batch_cancelled" if status == "cancelled" else "batch_expired"
        unrun_message = (
            "This request was not executed because the batch was cancelled."
            if status == "cancelled"
            else "This request could not be executed before the completion window expired."
        )
        output: list[bytes] = []
        errors: list[bytes] = []
        billed: list[BilledAnswer] = []
        tag = uuid.uuid4().hex[:16]  # one random draw per batch, a counter per line
        for index, line in enumerate(lines):
            entry: dict[str, Any] = {"id": f"batch_req_{tag}{index:08x}"}
            entry["custom_id"] = line.custom_id
            if index in expire and status == "expired":
                self.expired_ids.add(line.custom_id)
            if index in expire or index >= turn:
                entry["response"] = None
                entry["error"] = {"code": unrun, "message": unrun_message}
                errors.append(json.dumps(entry).encode())
                continue
            request_id = f"req_{tag}{index:08x}"
            try:
                parsed = parse_body(line.body)
            except Reject as refused:
                body = json.loads(refused.body)
                entry["response"] = {"status_code": refused.status, "request_id": request_id}
                entry["response"]["body"] = body
                entry["error"] = None
                errors.append(json.dumps(entry).encode())
                continue
            answer, bill = self._answer(parsed, record.id, line.custom_id, at)
            billed.append(bill)
            entry["response"] = {"status_code": 200, "request_id": request_id, "body": answer}
            entry["error"] = None
            output.append(json.dumps(entry).encode())
        final["counts"] = {"total": len(lines), "completed": len(output), "failed": len(errors)}
        for kind, rows in (("output", output), ("error", errors)):
            if rows:
                data = b"\n".join(rows) + b"\n"
                name = f"{record.id}_{kind}.jsonl"
                final[f"{kind}_file_id"] = self._files.put(data, name, "batch_output", at).id
        return billed

    def _get(self, batch_id: str) -> BatchRecord:
        record = self.records.get(batch_id)
        if record is None:
            raise openai_error(404, f"No batch found with id '{batch_id}'.", param="batch_id")
        return record

    # --- the state directory -------------------------------------------------------------------

    def dump(self) -> dict[str, Any]:
        """The records, the sequence and the ids that expired once, for the state file."""
        return {
            "batches": [asdict(r) for r in self.records.values()],
            "seq": self.seq,
            "expired_ids": sorted(self.expired_ids),
        }

    def load(self, saved: dict[str, Any]) -> None:
        """What ``dump`` gave, from the state file (ours, but a bad one is a clear ValueError)."""
        rows, seq = saved.get("batches"), saved.get("seq")
        expired = saved.get("expired_ids", [])
        if not isinstance(rows, list) or not isinstance(seq, int) or not isinstance(expired, list):
            raise ValueError("simulator state: batches must be a list and seq a number")
        self.expired_ids = {str(i) for i in expired}
        for row in rows:
            try:
                record = BatchRecord(**row)
            except TypeError as exc:
                raise ValueError(f"simulator state: a batch record is unreadable ({exc})") from None
            self.records[record.id] = record
        self.seq = seq


def _json_object(raw: bytes) -> dict[str, Any]:
    try:
        request = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise openai_error(400, "The request body is not valid JSON.") from None
    if not isinstance(request, dict):
        raise openai_error(400, "The request body must be a JSON object.")
    return request


def _metadata(value: Any) -> dict[str, str] | None:
    """Metadata as OpenAI takes it: at most 16 string keys (64 chars) to strings (512)."""
    if value is None:
        return None
    if not isinstance(value, dict) or len(value) > MAX_METADATA_KEYS:
        message = f"Invalid 'metadata': an object with at most {MAX_METADATA_KEYS} keys."
        raise openai_error(400, message, param="metadata")
    for key, item in value.items():
        if (
            len(key) > MAX_METADATA_KEY
            or not isinstance(item, str)
            or len(item) > MAX_METADATA_VALUE
        ):
            message = (
                f"Invalid 'metadata': keys are strings of at most {MAX_METADATA_KEY} characters "
                f"and values strings of at most {MAX_METADATA_VALUE}."
            )
            raise openai_error(400, message, param="metadata")
    return dict(value)
