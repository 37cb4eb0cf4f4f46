"""The ERNIE router as one Triton kernel (CUDA): the math of ``routing.ernie_select_experts``.

One program per token row: softmax over the fp32 gate logits, top-k by repeated arg-max on
``p + bias``, weights = the unbiased ``p`` of the chosen experts over
``clamp(sum, min=norm_min)``; when shared experts run inside the fused-MoE call, routed
experts are returned as their slots and the ``S`` shared slots follow with weight 1 (slot
arithmetic of ``vllm_ernie45.expert_layout``: ``E .. E+S-1`` without expert parallelism).
Replaces about eight small torch kernels per MoE layer, which dominate batch-1 decode.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_ernie45.expert_layout import FusedExpertLayout


@triton.jit
def _ernie_router_kernel(
    logits_ptr,
    bias_ptr,
    weights_ptr,
    ids_ptr,
    num_experts,
    stride_row,
    norm_min,
    routed_per_rank,
    shared_per_rank,
    TOP_K: tl.constexpr,
    NUM_SHARED: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK_E)
    valid = offs < num_experts
    logits = tl.load(logits_ptr + row * stride_row + offs, mask=valid, other=-float("inf"))
    logits = logits.to(tl.float32)
    probs = tl.exp(logits - tl.max(logits, axis=0))
    probs = tl.where(valid, probs, 0.0)
    probs = probs / tl.sum(probs, axis=0)
    bias = tl.load(bias_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    scores = tl.where(valid, probs + bias, -float("inf"))

    koffs = tl.arange(0, BLOCK_K)
    top_ids = tl.zeros([BLOCK_K], dtype=tl.int32)
    top_w = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k in tl.static_range(TOP_K):
        best = tl.argmax(scores, axis=0).to(tl.int32)
        p = tl.sum(tl.where(offs == best, probs, 0.0), axis=0)
        top_ids = tl.where(koffs == k, best, top_ids)
        top_w = tl.where(koffs == k, p, top_w)
        scores = tl.where(offs == best, -float("inf"), scores)
    top_w = top_w / tl.maximum(tl.sum(top_w, axis=0), norm_min)
    if NUM_SHARED > 0:
        # Routed expert e -> slot e + (e // Er) * Sr; shared slice j -> slot
        # (j // Sr) * (Er + Sr) + Er + j % Sr, weight 1 (expert_layout.FusedExpertLayout).
        top_ids = top_ids + (top_ids // routed_per_rank) * shared_per_rank
        is_shared = (koffs >= TOP_K) & (koffs < TOP_K + NUM_SHARED)
        j = tl.where(is_shared, koffs - TOP_K, 0)
        shared_slot = (j // shared_per_rank) * (routed_per_rank + shared_per_rank) + routed_per_rank + j % shared_per_rank
        top_ids = tl.where(is_shared, shared_slot, top_ids)
        top_w = tl.where(is_shared, 1.0, top_w)
    out = row * (TOP_K + NUM_SHARED) + koffs
    keep = koffs < TOP_K + NUM_SHARED
    tl.store(weights_ptr + out, top_w, mask=keep)
    tl.store(ids_ptr + out, top_ids, mask=keep)


def ernie_select_experts_triton(
    gating_output: torch.Tensor,
    e_score_correction_bias: torch.Tensor,
    top_k: int,
    norm_min: float,
    layout: FusedExpertLayout | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weights fp32 [T, k+S], ids int32 [T, k+S])``."""
    tokens, num_experts = gating_output.shape
    num_shared = layout.num_shared if layout else 0
    weights = torch.empty(tokens, top_k + num_shared, dtype=torch.float32, device=gating_output.device)
    ids = torch.empty(tokens, top_k + num_shared, dtype=torch.int32, device=gating_output.device)
    if tokens:
        _ernie_router_kernel[(tokens,)](
            gating_output,
            e_score_correction_bias,
            weights,
            ids,
            num_experts,
            gating_output.stride(0),
            norm_min,
            layout.routed_per_rank if layout else num_experts,
            layout.shared_per_rank if layout else 1,
            TOP_K=top_k,
            NUM_SHARED=num_shared,
            BLOCK_E=triton.next_power_of_2(num_experts),
            BLOCK_K=triton.next_power_of_2(top_k + num_shared),
        )
    return weights, ids
