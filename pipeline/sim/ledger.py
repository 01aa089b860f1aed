"""What the simulated server billed: one ``BilledAnswer`` per answer it would charge for.

Tests and benchmarks prove with it that the pipeline never pays twice for one row and
stores the usage billed, so it lives in its own small module: the core appends to it,
the Batch API bills each line it answers into it, and the state directory persists the
batch part of it across processes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any


@dataclass
class BilledAnswer:
    """An answer the server produced and would bill, whether or not the client got it whole."""

    response_id: str
    model: str
    usage: dict[str, Any]
    truncated: bool
    streamed: bool
    request_key: str
    # The tier the answer reported (None when the request named none); "batch" for a line
    # a batch answered, which also carries its batch and custom ids.
    service_tier: str | None = None
    batch_id: str | None = None
    custom_id: str | None = None

    def to_json(self) -> dict[str, Any]:
        """A plain dict, for the state directory."""
        return asdict(self)

    @classmethod
    def from_json(cls, row: Any) -> BilledAnswer:
        """Back from ``to_json``; a row of another shape is a ValueError naming the problem."""
        names = {f.name for f in fields(cls)}
        if not isinstance(row, dict) or not set(row) <= names:
            raise ValueError("simulator state: a ledger entry has an unexpected shape")
        try:
            return cls(**row)
        except TypeError as exc:
            raise ValueError(f"simulator state: a ledger entry is incomplete ({exc})") from None
