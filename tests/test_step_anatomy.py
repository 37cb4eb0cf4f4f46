"""The throughput-anatomy script (``scripts/gpu/step_anatomy.py``) on a synthetic trace: kernels
split into one group per shape at the pauses, busy time as the union of overlapping kernels,
and the side-by-side report naming the kernel whose time differs."""

from __future__ import annotations

import pytest

from conftest import load_gpu_script


@pytest.fixture(scope="module")
def steps():
    return load_gpu_script("step_anatomy")


def _kernel(name, ts, dur):
    return {"ph": "X", "cat": "kernel", "name": name, "ts": ts, "dur": dur}


def test_groups_split_at_pauses_and_busy_is_the_union(steps):
    events = [
        _kernel("fused_moe_kernel", 0.0, 100.0),
        _kernel("nvjet_tst_128x256", 50.0, 100.0),   # overlaps the first: busy 150, not 200
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": 10.0, "dur": 5.0},
        _kernel("rms_norm_kernel", 400.0, 10.0),
        _kernel("stray_kernel", 1_600_000.0, 1.0),       # inside the first 3 s pause
        _kernel("fused_moe_kernel", 3_000_000.0, 80.0),  # the second shape
        _kernel("fused_moe_kernel", 6_000_000.0, 70.0),  # after the second pause: the third
    ]
    groups = steps.shape_groups(events, 3, min_gap_us=0.75e6)
    assert [[k[0] for k in g] for g in groups] == [
        ["fused_moe_kernel", "nvjet_tst_128x256", "rms_norm_kernel"],
        ["stray_kernel", "fused_moe_kernel"],  # the cut lands in the pause; the stray joins a side
        ["fused_moe_kernel"],
    ]
    facts = steps.group_facts(groups[0])
    assert facts["busy_us"] == 160.0 and facts["span_us"] == 410.0 and facts["kernel_count"] == 3
    assert facts["kernels"][0] == ["fused_moe_kernel", 1, 100.0]
    # One pause too few: no split is invented.
    assert steps.shape_groups(events[:4], 2, min_gap_us=0.75e6) is None
    assert len(steps.shape_groups(events[:4], 1, min_gap_us=0.75e6)[0]) == 3


def test_report_compares_kinds_and_names_the_difference(steps):
    def result(impl, moe_us):
        kernels = [["fused_moe_kernel", 28, moe_us], ["nvjet_tst_128x256", 56, 500.0]]
        shape = {"requests": 2, "in": 8, "out": 1, "wall_s": [1.0, 1.1], "span_us": 2000.0,
                 "busy_us": moe_us + 500.0, "kernel_count": 84, "kernels": kernels}
        return {"impl": impl, "shapes": {"prefill": shape}}

    text = steps.render([result("intree", 1000.0), result("plugin", 1300.0)])
    assert "### prefill: 2 x 8/1" in text
    assert "| moe experts GEMM | 1.0 | 1.3 |" in text
    assert "| **GPU busy** | 1.5 | 1.8 |" in text
    listed = text.split("kernels differing most")[1].splitlines()
    assert "fused_moe_kernel" in [line for line in listed if line.strip()][1]


def test_bad_shapes_are_refused(steps):
    assert steps.parse_shapes("p=2x8x1,d=4x16x2") == [("p", 2, 8, 1), ("d", 4, 16, 2)]
    for bad in ("p=2x8", "=2x8x1", "p=2x0x1", "p=axbxc"):
        with pytest.raises(SystemExit, match="bad shape"):
            steps.parse_shapes(bad)
