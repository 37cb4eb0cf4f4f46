"""The router gate's GEMM choice (vllm_ernie45.router_gate): bf16 × bf16 → fp32 only where it
gives the fp32 GEMM's logits, i.e. where the weight holds bf16 values."""

from __future__ import annotations

import pytest
import torch

from vllm_ernie45 import envs
from vllm_ernie45.router_gate import holds_bf16_values, use_bf16_gemm


def test_holds_bf16_values():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(64, 256, generator=gen)
    assert not holds_bf16_values(w)
    assert holds_bf16_values(w.to(torch.bfloat16).float())
    assert holds_bf16_values(w.to(torch.bfloat16))
    almost = w.to(torch.bfloat16).float()
    almost[3, 7] += 2.0**-20  # one value off the bf16 grid
    assert not holds_bf16_values(almost)


@pytest.mark.parametrize(
    "exact, model_dtype, loaded, on_cuda, env, expected",
    [
        (True, torch.bfloat16, True, True, "auto", True),  # a bf16 checkpoint
        (False, torch.bfloat16, True, True, "auto", False),  # fp32 values bf16 cannot hold
        (False, torch.bfloat16, False, True, "auto", True),  # dummy weights: rounded
        (True, torch.float32, True, True, "auto", False),  # fp32 model: fp32 activations
        (True, torch.float16, True, True, "auto", False),
        (True, torch.bfloat16, True, False, "auto", False),  # CPU: no mm out_dtype kernel
        (True, torch.bfloat16, True, True, "fp32", False),  # forced off
    ],
)
def test_use_bf16_gemm(monkeypatch, exact, model_dtype, loaded, on_cuda, env, expected):
    monkeypatch.setenv("VLLM_ERNIE45_ROUTER_GEMM", env)
    w = torch.randn(8, 64)
    if exact:
        w = w.to(torch.bfloat16).float()
    assert use_bf16_gemm(w, model_dtype, loaded, on_cuda) is expected


def test_env_values(monkeypatch):
    monkeypatch.delenv("VLLM_ERNIE45_ROUTER_GEMM", raising=False)
    assert envs.router_gemm() == "auto"
    monkeypatch.setenv("VLLM_ERNIE45_ROUTER_GEMM", "bf16")
    with pytest.raises(ValueError, match="VLLM_ERNIE45_ROUTER_GEMM"):
        envs.router_gemm()


def test_quant_scope_values(monkeypatch):
    monkeypatch.delenv("VLLM_ERNIE45_QUANT_SCOPE", raising=False)
    assert envs.quant_scope() == "all"
    monkeypatch.setenv("VLLM_ERNIE45_QUANT_SCOPE", "Experts")
    assert envs.quant_scope() == "experts"
    monkeypatch.setenv("VLLM_ERNIE45_QUANT_SCOPE", "attention")
    with pytest.raises(ValueError, match="VLLM_ERNIE45_QUANT_SCOPE"):
        envs.quant_scope()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch.mm out_dtype runs on CUDA only")
@pytest.mark.parametrize("tokens", [1, 7, 256])
def test_bf16_gemm_gives_fp32_logits_on_cuda(tokens):
    """The claim the choice rests on: for bf16 inputs and weights, bf16 × bf16 → fp32 equals
    the fp32 GEMM of the same values up to summation order."""
    gen = torch.Generator().manual_seed(tokens)
    w = torch.randn(64, 2560, generator=gen).to(torch.bfloat16).cuda()
    x = torch.randn(tokens, 2560, generator=gen).to(torch.bfloat16).cuda()
    fast = torch.mm(x, w.t(), out_dtype=torch.float32)
    ref = (x.double() @ w.double().t())
    fp32 = x.float() @ w.float().t()
    assert fast.dtype == torch.float32
    # Both within fp32 summation error of the exact (float64) products' sum.
    tol = 1e-6 * (x.double().abs() @ w.double().abs().t())
    assert ((fast.double() - ref).abs() <= tol).all()
    assert ((fp32.double() - ref).abs() <= tol).all()
