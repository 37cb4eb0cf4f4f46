"""Make every Python process of a test see another installed vLLM version, as the plugin
decides on it -- without installing one.

vLLM calls ``vllm_ernie45.register()`` in every process it starts (the front end, the engine
core, each worker, the API server), so the version has to be pretended in all of them: a
``sitecustomize`` module on ``PYTHONPATH`` replaces ``compat.installed_vllm_version`` at the
start of every interpreter that inherits the environment (spawned engine processes do).
vLLM itself is untouched: only the plugin's view of the version changes, which is what
decides whether it registers.
"""

from __future__ import annotations

import os
from pathlib import Path

from vllm_ernie45 import compat


def out_of_range_version() -> str:
    """The first vLLM minor release past the supported range, e.g. ``0.35.0``."""
    major, minor = compat.MAX_SUPPORTED
    return f"{major}.{minor + 1}.0"


def pretend_vllm_version_env(folder: str | Path, version: str) -> dict[str, str]:
    """Write ``folder/sitecustomize.py`` and return the environment entries that make child
    processes use it (``PYTHONPATH`` first, strict registration off)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(
        "# Written by vllm_ernie45.testing.pretend_version for a test.\n"
        "import vllm_ernie45.compat as _compat\n"
        f"_compat.installed_vllm_version = lambda: {version!r}\n"
    )
    path = os.environ.get("PYTHONPATH", "")
    return {
        "PYTHONPATH": str(folder) + (os.pathsep + path if path else ""),
        "VLLM_ERNIE45_STRICT": "0",
    }
