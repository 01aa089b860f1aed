"""How a job is carried out: one seam, several engines.

``execute`` does what every run needs whatever carries it out (pre-flight checks,
the OUT lock, the manifest, the final summary) and hands the job to an engine:

- ``local`` (``pipeline.local.LocalEngine``): every row, or one ``--shard`` of them,
  in this process;
- ``ray`` (``pipeline.cluster.engine.RayEngine``): splits of the inputs on a Ray cluster;
- ``batch`` (``pipeline.batch.engine.BatchEngine``, ``--mode batch``): the pending rows
  as request files submitted to the provider's Batch API, collected by a later run.

A new way to run a job is one more class with these
four steps, registered in ``ENGINES``; ``execute`` does not change. Every engine
writes the same result rows into OUT, so resume, reports and export never need to
know which one ran.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

from pipeline.config import RunOptions
from pipeline.errors import UsageError
from pipeline.progress import Progress
from pipeline.runner import RunResult


@dataclass(frozen=True, slots=True)
class JobContext:
    """What ``execute`` settled before the engine runs: the same for every engine."""

    opts: RunOptions
    run_id: str
    locations: list[str]  # the inputs, as expanded by the engine's ``inputs``
    provider_name: str
    base_urls: list[str]
    api_key: str | None
    progress: Progress


class Engine(Protocol):
    """The steps ``execute`` takes with an engine, in this order."""

    def inputs(self, opts: RunOptions) -> tuple[RunOptions, list[str]]:
        """Pre-flight, before the lock: check that this engine can run the job and
        expand its inputs (UsageError: exit 2, nothing written)."""

    def connect(self, opts: RunOptions) -> AbstractContextManager[None]:
        """Entered after the lock, before the manifest: resources the run holds
        (a cluster connection). An unreachable one is exit 2 with nothing written."""

    def prepare(self, job: JobContext) -> None:
        """Build what the run needs before the manifest is written; may raise
        UsageError (a bad price table) with nothing sent."""

    def run(self) -> tuple[RunResult, dict[str, Any] | None]:
        """Carry the job out: the result, and what the manifest should record about
        the engine itself (or None)."""

    def so_far(self) -> RunResult | None:
        """After ``run`` raised: what the run got to (its counts, for the manifest), with
        everything already journaled kept; None when the engine keeps no such record."""


EngineFactory = Callable[..., Engine]

# Engine name -> "module:class", imported on use: a local run never imports Ray.
ENGINES = {
    "local": "pipeline.local:LocalEngine",
    "ray": "pipeline.cluster.engine:RayEngine",
    "batch": "pipeline.batch.engine:BatchEngine",
}


def engine_for(opts: RunOptions, **hooks: Any) -> Engine:
    """The engine ``--engine`` names, or the batch engine for ``--mode batch`` (the
    rows go to the provider's Batch API, from this process). ``hooks`` (a transport,
    a fake clock and sleep) are for tests and benchmarks; an engine that cannot use
    one refuses it."""
    name = "batch" if opts.mode == "batch" else opts.engine
    try:
        target = ENGINES[name]
    except KeyError:
        raise UsageError(f"--engine {opts.engine}: expected one of local, ray") from None
    module, _, attr = target.partition(":")
    factory: EngineFactory = getattr(importlib.import_module(module), attr)
    return factory(**hooks)
