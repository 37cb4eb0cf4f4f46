"""The entry point, register() and what it registers, on the installed vLLM."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys

import pytest

import vllm_ernie45
from vllm_ernie45 import compat
from vllm_ernie45.testing.pretend_version import out_of_range_version, pretend_vllm_version_env

pytestmark = pytest.mark.version_smoke


def test_entry_point_is_installed():
    eps = importlib.metadata.entry_points(group="vllm.general_plugins")
    assert [ep.value for ep in eps if ep.name == "ernie45"] == ["vllm_ernie45:register"]


def test_importing_the_package_is_cheap():
    code = "import sys, vllm_ernie45; print('torch' in sys.modules, 'vllm' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_register_replaces_in_tree_models_and_is_idempotent():
    from vllm import ModelRegistry

    vllm_ernie45.register()
    vllm_ernie45.register()
    for arch, target in vllm_ernie45.MODEL_CLASSES.items():
        module, cls = target.split(":")
        resolved = ModelRegistry._try_load_model_cls(arch)
        assert (resolved.__module__, resolved.__name__) == (module, cls)
    assert "Ernie4_5_MoeForCausalLM" in ModelRegistry.get_supported_archs()


def test_register_logs_once_at_info():
    # vLLM >= 0.30 configures its log handlers when an engine starts, so give the bare
    # process a handler of its own.
    code = (
        "import logging; logging.basicConfig(level=logging.INFO)\n"
        "import vllm_ernie45\n"
        "vllm_ernie45.register(); vllm_ernie45.register()\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    lines = [l for l in (out.stdout + out.stderr).splitlines() if "vllm-ernie45" in l]
    assert len(lines) == 1 and "INFO" in lines[0] and "Ernie4_5_MoeForCausalLM" in lines[0]


def test_vllm_loads_the_plugin_in_a_fresh_process():
    """vLLM's own plugin loader finds the entry point and registers the plugin's class."""
    code = (
        "from vllm.plugins import load_general_plugins\n"
        "from vllm import ModelRegistry\n"
        "load_general_plugins()\n"
        "print(ModelRegistry._try_load_model_cls('Ernie4_5ForCausalLM').__module__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "vllm_ernie45.model"


@pytest.mark.parametrize("version", ["0.25.2", out_of_range_version(), "1.0.0"])
def test_unsupported_vllm_is_named(version):
    with pytest.raises(compat.UnsupportedVllmVersion) as err:
        compat.check_supported_vllm(version)
    assert version in str(err.value) and compat.SUPPORTED_RANGE_TEXT in str(err.value)


# ----------------------------------------------------------------------------- stepping aside
# vLLM runs register() in every process and does not catch what it raises: where the plugin
# cannot serve the installed vLLM it must leave vLLM exactly as if it were not installed.

_STATE_CHILD = """
import json, logging, os, sys
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
{patch}
from vllm.plugins import load_general_plugins
from vllm import ModelRegistry
import vllm_ernie45
from vllm_ernie45 import compat
load_general_plugins()
_, tools = compat.tool_parser_base()
_, reasoning = compat.reasoning_parser_base()
archs = [*vllm_ernie45.MODEL_CLASSES, vllm_ernie45.MTP_DRAFT_CLASS[0]]
state = {{
    "models": {{a: repr(ModelRegistry.models.get(a)) for a in archs}},
    "tool_parser": [repr(tools.tool_parsers.get("ernie45")), repr(tools.lazy_parsers.get("ernie45"))],
    "reasoning_parser": [repr(reasoning.reasoning_parsers.get("ernie45")),
                         repr(reasoning.lazy_parsers.get("ernie45"))],
    "tuned_config_folder": os.environ.get("VLLM_TUNED_CONFIG_FOLDER"),
}}
print("STATE " + json.dumps(state, sort_keys=True))
"""


def _vllm_state(env: dict[str, str], patch: str = "") -> tuple[subprocess.CompletedProcess, dict | None]:
    """vLLM's registries after its own plugin loader ran in a fresh process with ``env``."""
    full_env = {k: v for k, v in os.environ.items() if k not in ("VLLM_PLUGINS", "VLLM_TUNED_CONFIG_FOLDER")}
    full_env.update(env)
    proc = subprocess.run([sys.executable, "-c", _STATE_CHILD.format(patch=patch)],
                          capture_output=True, text=True, env=full_env, timeout=300)
    states = [l for l in proc.stdout.splitlines() if l.startswith("STATE ")]
    return proc, (json.loads(states[-1][len("STATE "):]) if states else None)


def _warnings(proc: subprocess.CompletedProcess) -> list[str]:
    return [l for l in (proc.stdout + proc.stderr).splitlines() if "vllm-ernie45" in l and "WARNING" in l]


@pytest.fixture(scope="module")
def without_plugin():
    """vLLM's registries with the plugin not loaded at all (VLLM_PLUGINS= allows none)."""
    proc, state = _vllm_state({"VLLM_PLUGINS": ""})
    assert state is not None, proc.stderr[-3000:]
    assert "vllm_ernie45" not in json.dumps(state)
    return state


def test_out_of_range_vllm_steps_aside_with_one_warning(tmp_path, without_plugin):
    version = out_of_range_version()
    proc, state = _vllm_state(pretend_vllm_version_env(tmp_path / "site", version))
    assert proc.returncode == 0 and state is not None, proc.stderr[-3000:]
    assert state == without_plugin  # as if the plugin were not installed
    warnings = _warnings(proc)
    assert len(warnings) == 1, proc.stderr[-3000:]
    for part in (f"installed vLLM is {version}", compat.SUPPORTED_RANGE_TEXT, "in-tree",
                 "VLLM_ERNIE45_STRICT=1"):
        assert part in warnings[0], (part, warnings[0])


def test_out_of_range_vllm_in_strict_mode_raises(tmp_path):
    env = {**pretend_vllm_version_env(tmp_path / "site", out_of_range_version()), "VLLM_ERNIE45_STRICT": "1"}
    proc, state = _vllm_state(env)
    assert proc.returncode != 0 and state is None
    assert "UnsupportedVllmVersion" in proc.stderr and compat.SUPPORTED_RANGE_TEXT in proc.stderr


_MOVED_API = (
    "import vllm_ernie45.compat as c\n"
    "def moved(*args, **kwargs):\n"
    "    raise ImportError('ReasoningParserManager moved')\n"
    "c.register_reasoning_parser = moved\n"
)


def test_a_failure_inside_registration_undoes_what_was_registered(without_plugin):
    """The reasoning parser is registered last: by then the models, the MTP draft and the
    tool parser were registered, and all of it must be undone."""
    proc, state = _vllm_state({"VLLM_ERNIE45_STRICT": "0"}, patch=_MOVED_API)
    assert proc.returncode == 0 and state is not None, proc.stderr[-3000:]
    assert state == without_plugin
    warnings = _warnings(proc)
    assert len(warnings) == 1, proc.stderr[-3000:]
    assert "ImportError: ReasoningParserManager moved" in warnings[0]
    assert f"vLLM {compat.installed_vllm_version()}" in warnings[0]


def test_a_failure_inside_registration_in_strict_mode_raises():
    proc, state = _vllm_state({"VLLM_ERNIE45_STRICT": "1"}, patch=_MOVED_API)
    assert proc.returncode != 0 and state is None
    assert "ReasoningParserManager moved" in proc.stderr


def test_in_range_vllm_gets_the_plugin(without_plugin):
    proc, state = _vllm_state({"VLLM_ERNIE45_STRICT": "1"})
    assert proc.returncode == 0 and state is not None, proc.stderr[-3000:]
    assert not _warnings(proc)
    for arch, target in vllm_ernie45.MODEL_CLASSES.items():
        assert target.split(":")[0] in state["models"][arch]
    assert "vllm_ernie45.parsers.tool_parser" in state["tool_parser"][1]
    assert "vllm_ernie45.parsers.reasoning_parser" in state["reasoning_parser"][1]
    # The MoE tables are set where an ERNIE MoE model is built, not for every model
    # (tests/test_parity.py, tests/test_no_harm.py).
    assert state["tuned_config_folder"] is None
