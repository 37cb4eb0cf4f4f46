"""The decode-anatomy report (``scripts/gpu/decode_anatomy.py``) on traces recorded on an H100
(``docs/results/anatomy/``): decode steps found, every kernel given the kind the docs' table
counts it under, and the kinds adding up to the step."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from conftest import load_gpu_script

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results" / "anatomy"
CONFIG = ROOT / "scripts" / "configs" / "ernie-4.5-21b-a3b-pt.config.json"
LAYERS, MOE_LAYERS = 28, 27


@pytest.fixture(scope="module")
def anatomy():
    return load_gpu_script("decode_anatomy")


def _step(anatomy, name):
    result = anatomy._read_json(RESULTS / "h100-a" / name)
    steps = anatomy.decode_steps_of(result)
    assert len(steps) >= 10
    return result, steps[len(steps) // 2]


def test_plugin_step_kernels_are_labelled_by_layer(anatomy):
    result, step = _step(anatomy, "plugin-fp32gate.json.gz")  # the shipped plugin (fp32 gate)
    names = result["kernel_names"]
    assert len(step["graph"]) == 473
    kinds = anatomy.label_step(names, step["graph"])
    count = Counter(kinds)
    assert count["qkv GEMM"] == LAYERS and count["o_proj GEMM"] == LAYERS
    # Two fused-MoE calls (w13, w2) per MoE layer, shared experts inside them.
    assert count["moe experts GEMM"] == 2 * MOE_LAYERS and count["shared experts GEMMs"] == 0
    # Router: fp32 GEMV + its reduction + the Triton router kernel, per MoE layer.
    assert count["router (gate GEMM + top-k)"] == 3 * MOE_LAYERS
    for (nid, _t, _d), kind in zip(step["graph"], kinds):
        if "fused_moe_kernel" in names[nid]:
            assert kind == "moe experts GEMM"
        if "_ernie_router_kernel" in names[nid]:
            assert kind == "router (gate GEMM + top-k)"
    # One stream: the kinds of the graph plus the gaps between them make up its span.
    parts = anatomy.step_breakdown(names, step)
    eager = ("lm_head GEMM", "sampling + input prep (eager)", "idle between steps")
    in_graph = sum(v for k, v in parts.items() if k in anatomy.KINDS and k not in eager)
    assert in_graph == pytest.approx(parts["graph_span_us"], rel=1e-3)  # ≈ 1 µs of kernel overlap


def test_intree_shared_experts_overlap_the_routed_call(anatomy):
    result, step = _step(anatomy, "intree.json.gz")
    names = result["kernel_names"]
    count = Counter(anatomy.label_step(names, step["graph"]))
    assert count["moe experts GEMM"] == 2 * MOE_LAYERS
    assert count["shared experts GEMMs"] >= 2 * MOE_LAYERS
    parts = anatomy.step_breakdown(names, step)
    eager = ("lm_head GEMM", "sampling + input prep (eager)", "idle between steps")
    in_graph = sum(v for k, v in parts.items() if k in anatomy.KINDS and k not in eager)
    assert in_graph > 1.2 * parts["graph_span_us"]  # a second stream: the kinds add up to more


def test_side_by_side_table(anatomy):
    loaded = anatomy._loaded([str(RESULTS / "h100-a" / "plugin-fp32gate.json.gz"),
                              str(RESULTS / "h200" / "plugin.json.gz")], str(CONFIG))
    table = anatomy.render_columns(loaded, ["H100", "H200"])
    rows = table.splitlines()
    assert len(rows) == 2 + len(anatomy.KINDS) + 3
    assert "bound µs (H100)" in rows[0] and "bound µs (H200)" in rows[0]
    moe = next(r for r in rows if r.startswith("| moe experts GEMM"))
    assert moe.split("|")[4].strip() == "5096"  # MB: 27 layers × 8 slots × 3 × 2560 × 1536 × 2 B
