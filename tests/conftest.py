"""Shared fixtures: tiny checkpoints (built once per session) and engine runs in subprocesses.

vLLM runs in a child process for every test that starts an engine: it spawns its own
engine and worker processes, and keeping it out of pytest's process keeps tests independent.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """``tiny_checkpoint(variant)`` -> path of a tiny random checkpoint (cached per session)."""
    from vllm_ernie45.tiny.checkpoint import make_tiny_checkpoint

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


def run_vllm_greedy(model: Path, out: Path, **kw) -> dict:
    """Greedy decode through vllm.LLM in a child process; return the parity JSON."""
    args = ["-m", "vllm_ernie45.parity", "--engine", "vllm", "--model", str(model), "--out", str(out)]
    vllm_args = kw.pop("vllm_args", {"enforce_eager": True})
    env = kw.pop("env", None)
    args += ["--vllm-args", json.dumps(vllm_args)]
    for key, value in kw.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    proc = run_python(args, env=env)
    from vllm_ernie45.child_run import judge_child

    return judge_child(proc.returncode, out, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
