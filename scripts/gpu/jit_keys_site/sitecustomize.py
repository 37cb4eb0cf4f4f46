"""Record every Triton kernel compile of this process, with its full specialisation key.

Put this folder first on ``PYTHONPATH`` and set ``VLLM_ERNIE45_JIT_KEYS`` to a file: each
Triton JIT compile of every process that inherits the environment (the benchmark's child, its
engine core) appends one JSON line: pid, time, kernel name, Triton's full cache key (per
argument: type and specialisation, e.g. ``('i32', 'D')`` for an integer divisible by 16), the
compile-time constants and the Python frames that launched it. vLLM's own JIT monitor
(``--jit-monitor-verbose``) logs only the first 120 characters of the key, which hid the
difference between the plugin's start-up compile of the fused-MoE down projection and the
model's launch (issue 29). ``scripts/gpu/benchmark.py --jit-keys`` sets both.

A hook installed here runs before vLLM's monitor, which chains to it.
"""

import json
import os
import time
import traceback

_PATH = os.environ.get("VLLM_ERNIE45_JIT_KEYS")


def _frames() -> list[str]:
    return [f"{os.path.basename(f.filename)}:{f.lineno}:{f.name}" for f in traceback.extract_stack()[:-2]
            if "/triton/" not in f.filename][-12:]


def _install(path: str) -> None:
    from triton import knobs

    previous = knobs.runtime.jit_post_compile_hook

    def record(**kwargs):
        try:
            info = kwargs.get("compile") or {}
            entry = {"pid": os.getpid(), "t": round(time.time(), 3),
                     "fn": getattr(kwargs.get("fn"), "name", "?"), "key": repr(kwargs.get("key")),
                     "constants": repr(info.get("constants")), "configs": repr(info.get("configs")),
                     "frames": _frames()}
            with open(path, "a") as fh:
                fh.write(json.dumps(entry) + "\n")
        except Exception as err:  # a recorder must never break the run
            with open(path, "a") as fh:
                fh.write(json.dumps({"pid": os.getpid(), "error": repr(err)}) + "\n")
        if previous is not None:
            return previous(**kwargs)
        return None

    knobs.runtime.jit_post_compile_hook = record


if _PATH:
    try:
        _install(_PATH)
    except Exception:  # no Triton here: nothing to record
        pass
