"""Build llama.cpp's ``llama-server`` and a tiny random model for the real-server tests.

Every other test runs against simulators written in this repository, which agree with
our own reading of the protocol. These tests use a server written by someone else:
llama.cpp's C++ ``llama-server``, the one people deploy (parallel slots, grammars for
``json_schema``, usage in streams). Its sources come from the ``llama-cpp-python``
sdist on PyPI, which vendors llama.cpp (``vendor/llama.cpp``), because this project's
machines reach package registries only. The model is written here with the ``gguf``
package: a llama-architecture network with random weights (seeded, so every machine
writes the same bytes) and the tokenizer of a vocab-only GGUF file from the same
sdist. It writes nonsense, quickly, and counts tokens like a real model.

Everything lands in a cache directory outside the repository
(``$PIPELINE_TEST_CACHE`` or ``~/.cache/pipeline-tests``, then ``llama-<version>/``),
so the download and the compile happen once per machine. Each step is skipped when
its output is already there, each output appears atomically (written aside, then
renamed), and a file lock keeps two test sessions from building at once.

Run it directly (CI does, before the tests) to build or to see where things are::

    python -m tests.real_server.build_llama
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The newest llama-cpp-python at the time of writing. Its CHANGELOG names the vendored
# llama.cpp commit; the sha256 is that of the sdist PyPI serves, checked after download.
VERSION = "0.3.36"
LLAMA_CPP_COMMIT = "0c1e57098"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"

# CPU only, static, no network at build or run time: no curl/openssl (no model
# downloads, no https), no web UI (its assets would come from a Hugging Face bucket).
# GGML_NATIVE=OFF keeps the binary runnable on any x86-64 with AVX2 that shares the cache.
CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DGGML_NATIVE=OFF",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_APP=OFF",
    # The sources are an sdist, not a git checkout: say which commit they are rather
    # than let CMake ask git (which would find whatever repository encloses the cache).
    "-DLLAMA_BUILD_NUMBER=0",
    f"-DLLAMA_BUILD_COMMIT={LLAMA_CPP_COMMIT}",
)
JOBS = 2

# The model. Small enough to write and run in a blink; a 512-token context makes an
# over-context prompt cheap to write.
MODEL = {
    # Qwen2's tokenizer and its own ChatML template: <|im_start|> and <|im_end|> are
    # control tokens there, as in every real ChatML model. (Tried first: a SentencePiece
    # vocab where they are plain text. This llama-server then refused every json_schema
    # and json_object request with a 400 "Failed to initialize samplers: std::exception";
    # its grammar for them starts with the template's generation prompt, which that
    # vocab does not reproduce. A model with markers as plain text is rare; the error
    # text, which names neither response_format nor json_schema, is worth knowing.)
    "vocab_from": "ggml-vocab-qwen2.gguf",  # byte-level BPE, 151936 tokens
    "context_length": 512,
    "embedding_length": 64,
    "block_count": 2,
    "feed_forward_length": 128,
    "head_count": 4,
    "head_count_kv": 2,
    "seed": 20260429,
}
MODEL_NAME = "pipeline-test-tiny"


@dataclass(frozen=True)
class Built:
    """What the fixture needs: the server binary, the model, and what they are."""

    server: Path
    model: Path
    version: str
    commit: str


def cache_root() -> Path:
    base = os.environ.get("PIPELINE_TEST_CACHE") or str(Path.home() / ".cache" / "pipeline-tests")
    return Path(base).expanduser().resolve() / f"llama-{VERSION}"


def ensure(root: Path | None = None, log: Any = None) -> Built:
    """Build whatever is missing (idempotent) and return where everything is."""
    root = root or cache_root()
    say = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / ".lock"):
        sdist = _step(say, "download", root / f"llama_cpp_python-{VERSION}.tar.gz", _download)
        src = _step(say, "extract", root / "llama.cpp", lambda out: _extract(sdist, out))
        server = _step(
            say, "build", root / "bin" / "llama-server", lambda out: _build(src, out), CMAKE_FLAGS
        )
        model = _step(
            say,
            "model",
            root / f"{MODEL_NAME}.gguf",
            lambda out: write_model(src / "models" / str(MODEL["vocab_from"]), out),
            MODEL,
        )
    return Built(server=server, model=model, version=VERSION, commit=LLAMA_CPP_COMMIT)


def _step(say: Any, name: str, out: Path, make: Any, recipe: Any = None) -> Path:
    """Make ``out`` unless it exists and was made from the same recipe (its stamp)."""
    stamp = out.with_name(out.name + ".stamp")
    recipe = json.dumps({"version": VERSION, "recipe": recipe}, sort_keys=True)
    if out.exists() and stamp.exists() and stamp.read_text(encoding="utf-8") == recipe:
        say(f"[build_llama] {name}: cached {out}")
        return out
    started = time.monotonic()
    say(f"[build_llama] {name}: making {out}")
    if out.is_dir():
        shutil.rmtree(out)
    elif out.exists():
        out.unlink()
    make(out)
    stamp.write_text(recipe, encoding="utf-8")
    say(f"[build_llama] {name}: done in {time.monotonic() - started:.1f}s")
    return out


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a+b") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _download(out: Path) -> None:
    """The sdist from PyPI, through pip (the registry's own client), checked by hash."""
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        subprocess.run(
            [
                sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                "--no-binary", ":all:", f"llama-cpp-python=={VERSION}", "--dest", tmp,
            ],
            check=True,
        )  # fmt: skip
        got = Path(tmp) / out.name
        digest = hashlib.sha256(got.read_bytes()).hexdigest()
        if digest != SDIST_SHA256:
            raise RuntimeError(f"{got.name}: sha256 {digest}, expected {SDIST_SHA256}")
        got.rename(out)


def _extract(sdist: Path, out: Path) -> None:
    """Only ``vendor/llama.cpp``, through tarfile's ``data`` filter (no links out, no
    absolute paths, no device files)."""
    prefix = f"llama_cpp_python-{VERSION}/vendor/llama.cpp/"
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp, tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
        tar.extractall(tmp, members=members, filter="data")
        (Path(tmp) / prefix).rename(out)


def _build(src: Path, out: Path) -> None:
    cmake = shutil.which("cmake")
    if cmake is None:
        raise RuntimeError("cmake not found on PATH: install cmake (and a C++17 compiler)")
    build = out.parent.parent / "build"
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    subprocess.run([cmake, "-S", str(src), "-B", str(build), *generator, *CMAKE_FLAGS], check=True)
    subprocess.run(
        [cmake, "--build", str(build), "--target", "llama-server", f"-j{JOBS}"], check=True
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    shutil.copy2(build / "bin" / "llama-server", tmp)
    tmp.rename(out)


def write_model(vocab: Path, out: Path) -> None:
    """A llama-architecture model with seeded random weights and ``vocab``'s tokenizer
    and chat template (every ``tokenizer.*`` field, copied as it is)."""
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(vocab)
    n_vocab = len(reader.fields["tokenizer.ggml.tokens"].contents())
    n_embd, n_ff = int(MODEL["embedding_length"]), int(MODEL["feed_forward_length"])
    n_head, n_head_kv = int(MODEL["head_count"]), int(MODEL["head_count_kv"])
    head_dim = n_embd // n_head
    tmp = out.with_name(out.name + ".tmp")
    writer = gguf.GGUFWriter(tmp, "llama")
    writer.add_name(MODEL_NAME)
    writer.add_context_length(int(MODEL["context_length"]))
    writer.add_embedding_length(n_embd)
    writer.add_block_count(int(MODEL["block_count"]))
    writer.add_feed_forward_length(n_ff)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head_kv)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(n_vocab)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    for key, field in reader.fields.items():
        if key.startswith("tokenizer."):
            vtype = field.types[0]
            sub = field.types[1] if vtype == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(key, field.contents(), vtype, sub)

    rng = np.random.default_rng(int(MODEL["seed"]))

    def weight(rows: int, cols: int) -> Any:
        return (rng.standard_normal((rows, cols), dtype=np.float32) * 0.02).astype(np.float16)

    ones = np.ones(n_embd, dtype=np.float32)
    writer.add_tensor("token_embd.weight", weight(n_vocab, n_embd))
    for i in range(int(MODEL["block_count"])):
        blk = f"blk.{i}"
        writer.add_tensor(f"{blk}.attn_norm.weight", ones)
        writer.add_tensor(f"{blk}.attn_q.weight", weight(n_embd, n_embd))
        writer.add_tensor(f"{blk}.attn_k.weight", weight(n_head_kv * head_dim, n_embd))
        writer.add_tensor(f"{blk}.attn_v.weight", weight(n_head_kv * head_dim, n_embd))
        writer.add_tensor(f"{blk}.attn_output.weight", weight(n_embd, n_embd))
        writer.add_tensor(f"{blk}.ffn_norm.weight", ones)
        writer.add_tensor(f"{blk}.ffn_gate.weight", weight(n_ff, n_embd))
        writer.add_tensor(f"{blk}.ffn_up.weight", weight(n_ff, n_embd))
        writer.add_tensor(f"{blk}.ffn_down.weight", weight(n_embd, n_ff))
    writer.add_tensor("output_norm.weight", ones)
    writer.add_tensor("output.weight", weight(n_vocab, n_embd))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.rename(out)


def main() -> None:
    started = time.monotonic()
    built = ensure()
    print(
        json.dumps(
            {
                "server": str(built.server),
                "model": str(built.model),
                "llama_cpp_python": built.version,
                "llama_cpp_commit": built.commit,
                "seconds": round(time.monotonic() - started, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
