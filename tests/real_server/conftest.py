"""The ``llama_server`` fixture: llama.cpp's own ``llama-server`` on a loopback port.

Built once per machine by ``tests.real_server.build_llama`` (the first session that
needs it pays for the compile; later ones find it in the cache). The server is started
once per test session, with an API key so the run's key handling is exercised too,
and killed when the session ends. Its log goes to a file: the tests count the tasks it
launched there, a ledger kept by the server, not by us.

If the build or the start fails, every test here errors with the reason: these tests
never skip, because a CI run that silently skipped them would prove nothing.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.real_server.build_llama import Built, ensure

KEY = "sk-llama-test-7d1f0c93a2"
KEY_ENV = "LLAMA_TEST_KEY"
MODEL = "tiny"
SLOTS = 4
SLOT_CONTEXT = 512  # the model's training context; llama-server caps a slot to it
START_TIMEOUT = 60.0


@dataclass
class LlamaServer:
    """A running ``llama-server`` and the server-side facts the tests check runs by."""

    url: str  # ending in /v1, as users pass it to --base-url
    root: str
    process: subprocess.Popen[bytes]
    log: Path
    built: Built
    args: list[str]

    def _get(self, path: str) -> httpx.Response:
        response = httpx.get(self.root + path, headers=_auth(), timeout=30)
        response.raise_for_status()
        return response

    def _post(self, path: str, body: dict[str, Any]) -> Any:
        response = httpx.post(self.root + path, json=body, headers=_auth(), timeout=60)
        response.raise_for_status()
        return response.json()

    def props(self) -> dict[str, Any]:
        data: dict[str, Any] = self._get("/props").json()
        return data

    def tasks(self) -> int:
        """Completion tasks the server has started so far (its own log line per task),
        whether they ended in an answer or an error such as an over-long prompt.

        The server writes its log from a thread of its own, a moment after the fact:
        the count is read until it holds still for a quarter of a second."""
        last, since = -1, time.monotonic()
        deadline = since + 10
        while time.monotonic() < deadline:
            now = len(re.findall(r"processing task", self.log_text()))
            if now != last:
                last, since = now, time.monotonic()
            elif time.monotonic() - since >= 0.25:
                return now
            time.sleep(0.05)
        raise AssertionError("the server's task count did not settle")

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def metrics(self) -> dict[str, float]:
        """The Prometheus counters of ``/metrics``, by name."""
        found: dict[str, float] = {}
        for line in self._get("/metrics").text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                found[name] = float(value)
        return found

    def predicted(self) -> int:
        """Tokens the server has generated so far, over every request (its counter)."""
        return int(self.metrics()["llamacpp:tokens_predicted_total"])

    def prompt_tokens(self, messages: list[dict[str, Any]]) -> int:
        """What the server counts for these messages: its chat template applied (by its
        ``/apply-template``), then tokenized with the BOS token (``/tokenize``): the
        path a chat request takes, asked of the server step by step."""
        prompt = self._post("/apply-template", {"messages": messages})["prompt"]
        tokens = self._post("/tokenize", {"content": prompt, "add_special": True})["tokens"]
        return len(tokens)

    def chat(self, body: dict[str, Any]) -> dict[str, Any]:
        """One chat completion sent straight to the server, bypassing the pipeline."""
        data: dict[str, Any] = self._post("/v1/chat/completions", body)
        return data


def _auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {KEY}"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env() -> dict[str, str]:
    """Loopback only: no proxies, no real keys, and no Hugging Face cache lookups."""
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env["NO_PROXY"] = "127.0.0.1"
    env["HF_HUB_OFFLINE"] = "1"
    return env


@pytest.fixture(scope="session")
def llama_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlamaServer]:
    built = ensure()
    port = _free_port()
    log = tmp_path_factory.mktemp("llama") / "server.log"
    args = [
        str(built.server),
        "--model", str(built.model),
        "--alias", MODEL,
        "--host", "127.0.0.1",
        "--port", str(port),
        "--api-key", KEY,
        "--parallel", str(SLOTS),
        "--ctx-size", str(SLOTS * SLOT_CONTEXT),
        "--threads", "2",
        "--metrics",
        "--seed", "1",
    ]  # fmt: skip
    with open(log, "wb") as sink:
        process = subprocess.Popen(args, stdout=sink, stderr=subprocess.STDOUT, env=_env())
    server = LlamaServer(
        f"http://127.0.0.1:{port}/v1", f"http://127.0.0.1:{port}", process, log, built, args
    )
    try:
        _wait_healthy(server)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def _wait_healthy(server: LlamaServer) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise AssertionError(
                f"llama-server exited with {server.process.returncode} at start-up:\n"
                + server.log_text()[-4000:]
            )
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(server.root + "/health", timeout=1).status_code == 200:
                return
        time.sleep(0.1)
    raise AssertionError(
        f"llama-server not healthy after {START_TIMEOUT:.0f}s:\n" + server.log_text()[-4000:]
    )
