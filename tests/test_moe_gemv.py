"""The small-batch GEMV expert kernels (``vllm_ernie45.moe_gemv``) against an fp32 torch
reference: on the CPU through Triton's interpreter (a child process, since
``TRITON_INTERPRET`` is read when the kernels are defined), on the GPU natively; plus the
per-GPU table format of ``vllm_ernie45.moe_small_batch``."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch

from conftest import run_python

# (tokens, hidden, inter, experts, slots, block sizes): uneven sizes hit every mask; slots
# repeat an expert across tokens (shared experts fused as always-selected slots).
CASES = [
    (1, 64, 48, 10, 4, dict(block_n=16, block_k=32, block_h=8, block_n2=32)),
    (3, 96, 64, 7, 3, dict(block_n=32, block_k=64, block_h=16, block_n2=64)),
    (2, 256, 128, 6, 2, dict(block_n=32, block_k=128, block_h=4, block_n2=64)),
    (4, 80, 40, 5, 5, dict(block_n=64, block_k=64, block_h=32, block_n2=16)),
]

_CHECK = textwrap.dedent(
    """
    import json, sys, torch
    from vllm_ernie45.moe_gemv import GemvConfig, gemv_experts, reference_experts
    errors = []
    for i, (T, H, N, E, k, blocks) in enumerate(json.loads(sys.argv[1])):
        gen = torch.Generator().manual_seed(i)
        x = torch.randn(T, H, generator=gen)
        w13 = torch.randn(E, 2 * N, H, generator=gen) / H ** 0.5
        w2 = torch.randn(E, H, N, generator=gen) / N ** 0.5
        ids = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(T)]).int()
        weights = torch.rand(T, k, generator=gen)
        out = gemv_experts(x, w13, w2, weights, ids, GemvConfig(**blocks))
        ref = reference_experts(x, w13, w2, weights, ids)
        errors.append(float((out - ref).norm() / ref.norm()))
    print(json.dumps(errors))
    """
)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU runs the kernels natively (below)")
def test_gemv_kernels_match_reference_in_triton_interpreter():
    proc = run_python(["-c", _CHECK, json.dumps(CASES)], env={"TRITON_INTERPRET": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    errors = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(errors) == len(CASES)
    assert max(errors) < 1e-5, errors


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("tokens", [1, 2, 4, 8])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gemv_kernels_match_reference_on_gpu(tokens, dtype):
    from vllm_ernie45.moe_gemv import GemvConfig, gemv_experts, reference_experts

    gen = torch.Generator(device="cuda").manual_seed(tokens)
    E, H, N, k = 66, 2560, 1536, 8
    x = torch.randn(tokens, H, device="cuda", generator=gen).to(dtype)
    w13 = (torch.randn(E, 2 * N, H, device="cuda", generator=gen) / H**0.5).to(dtype)
    w2 = (torch.randn(E, H, N, device="cuda", generator=gen) / N**0.5).to(dtype)
    ids = torch.stack([torch.randperm(E, device="cuda", generator=gen)[:k] for _ in range(tokens)])
    weights = torch.rand(tokens, k, device="cuda", generator=gen)
    for config in (GemvConfig(), GemvConfig(block_n=16, block_k=128, block_h=16, block_n2=128)):
        out = gemv_experts(x, w13, w2, weights, ids.int(), config)
        ref = reference_experts(x, w13, w2, weights, ids)
        assert torch.isfinite(out).all()
        assert float((out.float() - ref.float()).norm() / ref.float().norm()) < 1e-2


def test_table_parsing_and_size_lookup():
    from vllm_ernie45.moe_small_batch import parse_table, table_file_name

    plan = parse_table(
        {"max_tokens": 3, "1": {"block_n": 16, "block_h": 4}, "4": {"block_n": 64}}, "t.json"
    )
    assert plan.max_tokens == 3
    assert plan.config_for(1).block_n == 16 and plan.config_for(1).block_h == 4
    assert plan.config_for(2).block_n == 64 and plan.config_for(3).block_n == 64
    assert plan.config_for(9).block_n == 64  # beyond the table: its largest entry
    with pytest.raises(ValueError, match="t.json"):
        parse_table({"max_tokens": 2}, "t.json")
    assert table_file_name(66, 1536, 2560, "NVIDIA_H100_80GB_HBM3") == (
        "gemv,E=66,N=1536,H=2560,device_name=NVIDIA_H100_80GB_HBM3.json"
    )


def test_shipped_tables_parse():
    from vllm_ernie45.moe_small_batch import PACKAGE_CONFIG_DIR, parse_table

    for path in PACKAGE_CONFIG_DIR.glob("gemv,*.json"):
        plan = parse_table(json.loads(path.read_text()), str(path))
        assert plan.max_tokens >= 0
        for tokens in range(1, plan.max_tokens + 1):
            plan.config_for(tokens)
