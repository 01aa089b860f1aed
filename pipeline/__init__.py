"""pipeline: bulk chat-completion jobs through OpenAI-compatible gateways, into Parquet."""

from __future__ import annotations

__version__ = "0.1.0"
