"""Run manifests: ``OUT/runs/<run_id>.json``, one per run, for ``pipeline runs`` and audits."""

from __future__ import annotations

import json
import os
import secrets
from datetime import UTC, datetime
from pathlib import Path
from typing import Any


def new_run_id(now: datetime | None = None) -> str:
    """Sortable by start time, unique across hosts: ``20261122T220100Z-3f9a1c``."""
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%SZ")
    return f"{stamp}-{secrets.token_hex(3)}"


def write_manifest(out: Path, run_id: str, data: dict[str, Any]) -> Path:
    """Write (or rewrite) the manifest atomically."""
    runs = out / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    path = runs / f"{run_id}.json"
    tmp = runs / f".{run_id}.json.tmp"
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def list_runs(out: Path) -> list[dict[str, Any]]:
    runs = out / "runs"
    if not runs.is_dir():
        return []
    found = []
    for path in sorted(runs.glob("*.json")):
        try:
            found.append(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError):
            continue
    return found
