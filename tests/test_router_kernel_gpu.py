"""The Triton router kernel against the torch reference router (CUDA only; skipped on CPU).
Fresh random logits and biases each case, E and k as in the real models."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("tokens", [1, 7, 256, 4099])
@pytest.mark.parametrize(
    "experts, k, shared, ep",
    [(64, 6, 2, 1), (64, 6, 2, 2), (64, 6, 0, 1), (64, 8, 0, 1), (8, 2, 2, 1), (8, 2, 2, 2)],
)
def test_triton_router_equals_reference(tokens, experts, k, shared, ep):
    from vllm_ernie45.expert_layout import FusedExpertLayout
    from vllm_ernie45.routing import _select_torch
    from vllm_ernie45.routing_triton import ernie_select_experts_triton

    layout = FusedExpertLayout(experts, shared, ep) if shared else None
    gen = torch.Generator(device="cuda").manual_seed(tokens * 131 + experts + k)
    logits = torch.randn(tokens, experts, device="cuda", generator=gen) * 3
    bias = torch.randn(experts, device="cuda", generator=gen) * 0.05
    ref_w, ref_ids = _select_torch(logits, bias, k, 1e-12, layout)
    w, ids = ernie_select_experts_triton(logits, bias, k, 1e-12, layout)
    order_ref, order = ref_ids.argsort(-1), ids.argsort(-1)
    assert torch.equal(ids.gather(-1, order), ref_ids.gather(-1, order_ref))
    torch.testing.assert_close(w.gather(-1, order), ref_w.gather(-1, order_ref), rtol=1e-6, atol=1e-7)
