"""The entry point, register() and what it registers, on the installed vLLM."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys

import pytest

import vllm_ernie45
from vllm_ernie45 import compat

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


@pytest.mark.parametrize("version", ["0.25.2", "0.34.0", "1.0.0"])
def test_unsupported_vllm_is_named(version):
    with pytest.raises(compat.UnsupportedVllmVersion) as err:
        compat.check_supported_vllm(version)
    assert version in str(err.value) and "0.26 through 0.33" in str(err.value)
