"""``pipeline batches OUT``: the batches of one OUT, open and past, and ``--cancel``.

The list comes from the OUT's ledger; each open batch's status and request counts are
fetched from the provider (the last status the ledger saw is shown when it cannot be
reached). Where to ask is taken from the last ``--mode batch`` run recorded in
``OUT/runs/`` (its provider, base URL and key variable; the key itself from the
environment), and ``--provider`` / ``--base-url`` / ``--api-key-env`` override it.

Nothing here writes results: a cancelled batch is collected by the next run, which
writes the rows it did answer and sends the rest back to pending. ``--forget`` writes
one ledger line: a batch the provider no longer knows (it answers 404 for it) is
abandoned, and its rows are pending again.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx

from pipeline.batch.api import BatchApi, BatchFatal
from pipeline.batch.ledger import COLLECTED, COLLECTING, CREATING, OPEN, Chunk, Ledger
from pipeline.config import RunOptions
from pipeline.errors import PipelineError, RequestError, UsageError
from pipeline.manifest import list_runs

FIELDS = ("provider", "base_url", "api_key_env", "providers_file", "sim", "timeout")


def batch_options(
    out: Path,
    *,
    provider: str | None = None,
    base_url: list[str] | None = None,
    api_key_env: str | None = None,
    providers_file: Path | None = None,
) -> RunOptions:
    """Where to reach the provider: the last batch run's settings, then the overrides."""
    values: dict[str, Any] = {}
    for run in reversed(list_runs(out)):
        options = run.get("options") if isinstance(run, dict) else None
        if isinstance(options, dict) and options.get("mode") == "batch":
            values = {k: options[k] for k in FIELDS if options.get(k) is not None}
            break
    if isinstance(values.get("providers_file"), str):
        values["providers_file"] = Path(values["providers_file"])
    if isinstance(values.get("sim"), dict) and values["sim"].get("api_key") == "***":
        values["sim"] = {k: v for k, v in values["sim"].items() if k != "api_key"}
    given = {
        "provider": provider,
        "base_url": base_url or None,
        "api_key_env": api_key_env,
        "providers_file": providers_file,
    }
    values.update({k: v for k, v in given.items() if v is not None})
    if given["base_url"] and provider is None and "provider" in values:
        del values["provider"]  # a base URL given now names the server itself
    known = {f.name for f in dataclasses.fields(RunOptions)}
    values = {k: v for k, v in values.items() if k in known}
    return RunOptions(out=out, mode="batch", **values)


@dataclass
class Listed:
    chunk: Chunk
    live: dict[str, Any] | None = None  # the provider's batch object, when fetched


async def _fetch(
    ledger: Ledger, api: BatchApi | None, cancel: bool
) -> tuple[list[Listed], list[str]]:
    listed = [Listed(c) for c in ledger.chunks().values()]
    notes: list[str] = []
    if api is None:
        return listed, notes
    try:
        for item in listed:
            chunk = item.chunk
            if chunk.state not in (OPEN, "collecting") or chunk.batch_id is None:
                continue
            try:
                item.live = await api.retrieve(chunk.batch_id)
                ended = item.live.get("status") in ("completed", "expired", "cancelled", "failed")
                if cancel and not ended:
                    item.live = await api.cancel(chunk.batch_id)
                    notes.append(f"cancelling {chunk.batch_id}")
            except BatchFatal:
                raise
            except RequestError as exc:
                notes.append(f"{chunk.batch_id}: cannot reach the provider ({exc})")
    finally:
        await api.aclose()
    return listed, notes


def _api(opts: RunOptions, transport: httpx.AsyncBaseTransport | None) -> BatchApi:
    """The provider's Batch API as ``opts`` reach it (the in-process simulator for
    ``sim``), each call bounded to a minute: this command only asks and answers."""
    provider = opts.resolved_provider()
    if transport is None and provider.name == "sim":
        from pipeline.local import sim_transport_for

        transport = sim_transport_for(opts)
    return BatchApi(
        opts.base_urls(provider)[0],
        opts.api_key(provider),
        transport=transport,
        timeout=min(opts.timeout, 60.0),
    )


def forget_batches(
    opts: RunOptions,
    batch_ids: list[str],
    *,
    force: bool = False,
    transport: httpx.AsyncBaseTransport | None = None,
    pause: float = 2.0,
) -> list[str]:
    """Abandon open batches the provider has lost, so their rows are sent again.

    A lost batch (purged by a gateway, gone with the account's data) would otherwise
    hold its rows for good: every run finds it open, cannot retrieve it, and skips its
    rows. But a batch that is not lost may still be billed and collected, and
    forgetting it then bills its rows twice; so a batch is forgotten only when:

    - OUT's ledger has it open (not being collected: its answers may be on disk);
    - the provider answers its own "not found" for it (a 404 with a JSON error object,
      not a proxy's page), twice, ``pause`` seconds apart;
    - the provider does not list it either;
    - the key and base URL asked are shown to see the account that made it (its
      request file is still there, or another batch of the run that made it is
      listed), since a 404 also comes from another key or base URL; ``force`` skips
      this last proof.

    Raises UsageError, naming why, for any batch that cannot be forgotten; nothing
    is forgotten then.
    """
    ledger = Ledger(Path(opts.out))
    chunks = _open_by_batch(ledger, batch_ids, str(opts.out))
    api = _api(opts, transport)
    token = ledger.token()
    refused = anyio.run(_why_not_lost, api, token, chunks, force, pause)
    if refused:
        raise UsageError("; ".join(refused) + ". Nothing was forgotten")
    notes = []
    with ledger.locked():
        chunks = _open_by_batch(ledger, batch_ids, str(opts.out))  # again, under the lock
        for batch_id, chunk in chunks.items():
            ledger.append(
                "abandoned", chunk.chunk, reason=f"forgotten: the provider lost {batch_id}"
            )
            ledger.remove_files(chunk.chunk)
            notes.append(
                f"forgot {batch_id}: its {chunk.rows:,} rows are pending again (the next run "
                "sends them)"
            )
    return notes


def _open_by_batch(ledger: Ledger, batch_ids: list[str], out: str) -> dict[str, Chunk]:
    """The open chunk of each batch id, or UsageError naming those that have none."""
    found = {
        c.batch_id: c
        for c in (ledger.chunks().values() if ledger.exists else [])
        if c.batch_id is not None and c.state in (OPEN, COLLECTING)
    }
    collecting = [b for b in batch_ids if b in found and found[b].state == COLLECTING]
    if collecting:
        raise UsageError(
            f"{', '.join(collecting)}: being collected (its answers may be on disk): the "
            "next run finishes it"
        )
    unknown = [b for b in batch_ids if b not in found]
    if unknown:
        raise UsageError(
            f"{', '.join(unknown)}: no open batch of {out} has that id "
            "(`pipeline batches OUT` lists them)"
        )
    return {b: found[b] for b in batch_ids}


async def _why_not_lost(
    api: BatchApi, token: str, chunks: dict[str, Chunk], force: bool, pause: float
) -> list[str]:
    """Why each batch cannot be forgotten (none: every one is shown to be lost)."""
    refused: dict[str, str] = {}
    try:
        try:
            for batch_id in chunks:
                why = await _why_not_gone(api, batch_id, pause)
                if why is not None:
                    refused[batch_id] = why
            left = {b: c for b, c in chunks.items() if b not in refused}
            if left:
                refused.update(await _why_not_proven(api, token, left, force))
        except BatchFatal:
            raise
        except RequestError as exc:
            return [f"the provider cannot be asked about {', '.join(chunks)} ({exc})"]
    finally:
        await api.aclose()
    return [f"{batch_id}: {why}" for batch_id, why in refused.items()]


async def _why_not_gone(api: BatchApi, batch_id: str, pause: float) -> str | None:
    for asked in range(2):  # twice, a pause apart: one 404 may be a hiccup
        if asked:
            await anyio.sleep(pause)
        if not await api.gone(f"/batches/{batch_id}"):
            return (
                "the provider still has it; the next run collects it when it ends, or "
                "cancel it with --cancel"
            )
    return None


async def _why_not_proven(
    api: BatchApi, token: str, chunks: dict[str, Chunk], force: bool
) -> dict[str, str]:
    """For batches the provider answers 404 for: refused if the provider still lists
    one (whatever else is known), and, without ``force``, if the listing cannot be
    read whole, or unless this key and base URL are shown to see the account the
    batch was made in: its request file is still there, or the listing holds another
    batch of the run that made it (one run uses one key and one base URL; another run
    of this OUT may have used another)."""
    by_chunk = {c.chunk: b for b, c in chunks.items()}
    listed: set[str] = set()
    runs_seen: set[str] = set()
    unread = ""  # why the listing says nothing (``force`` goes on without it)
    try:
        async for batch in api.batches():  # the whole listing: order says nothing
            metadata = batch.get("metadata")
            if not isinstance(metadata, dict) or metadata.get("pipeline_out") != token:
                continue
            name = metadata.get("pipeline_chunk")
            if isinstance(name, str) and name in by_chunk:
                listed.add(by_chunk[name])
            run = metadata.get("pipeline_run")
            if isinstance(run, str):
                runs_seen.add(run)
    except BatchFatal:
        raise
    except RequestError as exc:
        unread = f"the provider's batch list cannot be read ({exc})"
    if api.list_cut_short:
        unread = "the provider lists more batches than are read (20,000)"
    why: dict[str, str] = {}
    for batch_id, chunk in chunks.items():
        if batch_id in listed:
            why[batch_id] = "the provider still lists it"
            continue
        if unread and not force:
            why[batch_id] = (
                f"{unread}, so it is not shown that the provider has let it go; sure it is "
                "lost, add --force"
            )
            continue
        if force or chunk.run in runs_seen:
            continue
        if chunk.file_id is not None and not await api.gone(f"/files/{chunk.file_id}"):
            continue  # this key sees the request file the batch was made from
        why[batch_id] = (
            "it may have been made with another key or base URL (a 404 comes from those "
            "too): neither its request file nor another batch of the run that made it is "
            "visible to this one. Run with the key and base URL that made it, or, sure it "
            "is lost, add --force (its rows are sent again: billed twice if it was not lost)"
        )
    return why


def list_batches(
    opts: RunOptions,
    *,
    cancel: bool = False,
    transport: httpx.AsyncBaseTransport | None = None,
    fmt: str = "table",
    now: float | None = None,
) -> tuple[str, list[str]]:
    """The listing (text or JSON) and notes for stderr; cancels open batches if asked."""
    ledger = Ledger(Path(opts.out))
    if not ledger.exists:
        return f"no batches recorded in {opts.out}", []
    chunks = ledger.chunks()
    api = None
    if any(c.state in (OPEN, "collecting") for c in chunks.values()):
        api = _api(opts, transport)
    listed, notes = anyio.run(_fetch, ledger, api, cancel)
    costs = _costs(Path(opts.out), opts.pricing)
    rows = [_row(item, now or time.time(), costs) for item in listed]
    if fmt == "json":
        return json.dumps(rows, indent=2), notes
    return _table(rows), notes


def _costs(out: Path, pricing: Path | None) -> dict[str, float | None]:
    """What each collected batch's rows cost at batch prices (the ``costs`` view);
    nothing when the results cannot be priced (the listing goes on without it)."""
    from pipeline import query

    text = "SELECT batch_id, sum(cost_usd) AS usd FROM costs WHERE batch_id IS NOT NULL GROUP BY 1"
    try:
        found = json.loads(query.sql(out, text, "json", pricing_file=pricing) or "[]")
    except (PipelineError, ValueError, OSError):
        return {}
    return {r["batch_id"]: r["usd"] for r in found if isinstance(r, dict)}


def _row(item: Listed, now: float, costs: dict[str, float | None]) -> dict[str, Any]:
    chunk, live = item.chunk, item.live or {}
    counts = live.get("request_counts") if isinstance(live.get("request_counts"), dict) else None
    counts = counts or chunk.counts
    status = live.get("status") if isinstance(live.get("status"), str) else chunk.status
    if chunk.state == CREATING:
        status = "unconfirmed (the next run looks for it)"
    elif chunk.state == COLLECTED:
        status = f"collected ({chunk.status})"
    elif chunk.closed:
        status = chunk.state
    started = chunk.created_at or chunk.written_at
    return {
        "batch_id": chunk.batch_id,
        "chunk": chunk.chunk,
        "model": chunk.model,
        "rows": chunk.rows,
        "status": status,
        "completed": counts.get("completed") if counts else None,
        "failed": counts.get("failed") if counts else None,
        "age_seconds": round(now - started) if started else None,
        "cost_usd": costs.get(chunk.batch_id or ""),
        "open": not chunk.closed,
        "result": chunk.result or None,
    }


def _age(seconds: Any) -> str:
    if not isinstance(seconds, int):
        return "?"
    if seconds >= 86400:
        return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


def _table(rows: list[dict[str, Any]]) -> str:
    lines = [
        f"{'batch_id':<32} {'model':<16} {'rows':>7} {'done':>7} {'failed':>7} {'age':>7} "
        f"{'cost':>10}  status"
    ]
    for r in rows:
        done = "-" if r["completed"] is None else f"{r['completed']:,}"
        failed = "-" if r["failed"] is None else f"{r['failed']:,}"
        usd = r["cost_usd"]
        cost = f"${usd:,.4f}" if isinstance(usd, int | float) else "-"
        lines.append(
            f"{str(r['batch_id'] or '-')[:32]:<32} {str(r['model'])[:16]:<16} {r['rows']:>7,} "
            f"{done:>7} {failed:>7} {_age(r['age_seconds']):>7} {cost:>10}  {r['status']}"
        )
    open_rows = sum(r["rows"] for r in rows if r["open"])
    open_batches = sum(1 for r in rows if r["open"])
    lines.append(
        f"{open_batches} not yet collected, holding {open_rows:,} rows "
        f"(the next pipeline run collects those that have ended); {len(rows)} in all"
    )
    return "\n".join(lines)
