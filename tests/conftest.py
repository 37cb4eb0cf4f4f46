"""Shared fixtures: tiny checkpoints (built once per session) and engine runs in subprocesses.

vLLM runs in a child process for every test that starts an engine: it spawns its own
engine and worker processes, and keeping it out of pytest's process keeps tests independent.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# The tests check the plugin: where it could not register (a vLLM API that moved) it must fail
# them, not step aside and let vLLM's in-tree classes pass in its place. Children inherit it;
# the tests of stepping aside set VLLM_ERNIE45_STRICT=0 themselves.
os.environ.setdefault("VLLM_ERNIE45_STRICT", "1")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """``tiny_checkpoint(variant)`` -> path of a tiny random checkpoint (cached per session)."""
    from vllm_ernie45.testing.tiny.checkpoint import make_tiny_checkpoint

    cache: dict[str, Path] = {}

    def make(variant: str) -> Path:
        if variant not in cache:
            cache[variant] = make_tiny_checkpoint(
                tmp_path_factory.mktemp(f"ernie-{variant}"), variant, with_tokenizer=False
            )
        return cache[variant]

    return make


def run_python(args: list[str], timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = dict(os.environ)
    full_env.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=full_env
    )


def start_vllm_must_fail(model: Path, max_model_len: int = 256, **llm_kwargs) -> str:
    """Start ``vllm.LLM`` on ``model`` (fp32, eager, CPU memory fraction); it must fail.
    Returns its combined output, for the test to find the error message in."""
    code = (
        "import vllm\n"
        "if __name__ == '__main__':\n"
        f"    vllm.LLM(model={str(model)!r}, dtype='float32', enforce_eager=True,\n"
        f"             skip_tokenizer_init=True, max_model_len={max_model_len},\n"
        f"             gpu_memory_utilization=0.3, **{llm_kwargs!r})\n"
    )
    proc = run_python(["-c", code], timeout=300)
    assert proc.returncode != 0, f"vLLM started on {model}, which it must refuse"
    return proc.stdout + proc.stderr


def run_vllm_greedy(model: Path, out: Path, **kw) -> dict:
    """Greedy decode through vllm.LLM in a child process; return the parity JSON."""
    from vllm_ernie45.testing.parity import APPLY_MODEL_ENV, run_in_child

    kw.setdefault("vllm_args", {"enforce_eager": True})
    env = {**APPLY_MODEL_ENV, **(kw.pop("env", None) or {})}
    return run_in_child("vllm", model, out, env=env, timeout=600, **kw)
