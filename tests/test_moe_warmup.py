"""The start-up compile of the eager steps' fused-MoE kernels (issue 29; vllm_ernie45.moe_warmup):
which token counts it runs -- one per distinct (table entry, integer specialisation) that vLLM
0.26's ``invoke_fused_moe_triton_kernel`` would compile -- computed on the CPU from the shipped
tables. The compile itself runs on the GPU only (``scripts/gpu/benchmark.py`` counts the JIT
compiles vLLM logs during requests: none with the warm-up)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vllm_ernie45.moe_warmup import launch_key, plan

TABLES = Path(__file__).resolve().parents[1] / "vllm_ernie45" / "moe_configs"


def table_lookup(name: str):
    table = {int(k): v for k, v in json.loads((TABLES / name).read_text()).items() if k.isdigit()}
    return lambda tokens: table[min(table, key=lambda k: abs(k - tokens))]  # vLLM's nearest entry


def vllm_default(tokens: int, experts: int = 64) -> dict:
    """vLLM 0.26's get_default_config for bf16 (fused_moe.py), the in-tree model's on an H200."""
    block_m = 16 if tokens <= 32 else 32 if tokens <= 96 else 64 if tokens <= 512 else 128
    return dict(BLOCK_SIZE_M=block_m, BLOCK_SIZE_N=64 if tokens <= 64 else 128,
                BLOCK_SIZE_K=128 if tokens <= 64 else 64, GROUP_SIZE_M=16 if tokens // experts > 128 else 1,
                SPLIT_K=1, num_warps=4 if tokens <= 128 else 8, num_stages=4 if tokens <= 32 else 3)


def test_plugin_h200_table_eager_range():
    """E=66 top-8 on the H200 table, eager steps of 513..16384 tokens: five table entries, each
    with an even and an odd token count (num_valid_tokens = 8 M is a multiple of 16 or not)."""
    sizes = plan(range(513, 16385), 8, 66, table_lookup("E=66,N=1536,device_name=NVIDIA_H200.json"))
    assert sizes == [513, 514, 769, 770, 1537, 1538, 3073, 3074, 6145, 6146]


def test_intree_default_config_has_fewer():
    """The in-tree model (E=64 top-6 on vLLM's default config) meets 4 over the same range --
    why the plugin's first large batch paid more JIT than in-tree's."""
    assert plan(range(513, 16385), 6, 64, vllm_default) == [513, 520, 8256, 8257]


@pytest.mark.parametrize("tokens", [513, 514, 1000, 4097, 16384])
def test_key_changes_only_with_specialisation(tokens):
    cfg = table_lookup("E=66,N=1536,device_name=NVIDIA_H200.json")(tokens)
    assert launch_key(tokens, 8, 66, cfg) == launch_key(tokens + 2, 8, 66, cfg)
    assert launch_key(tokens, 8, 66, cfg) != launch_key(tokens + 1, 8, 66, cfg)


def test_small_batches_take_the_unsorted_path():
    cfg = vllm_default(1)
    assert launch_key(1, 8, 66, cfg)[1] is True  # 8 pairs * 4 <= 66 experts: no sorting
    assert launch_key(16, 8, 66, cfg)[1] is False
