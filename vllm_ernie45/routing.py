"""ERNIE 4.5's MoE router, exactly as the reference (HF ``Ernie4_5_MoeTopKRouter``) computes it.

    p        = softmax(fp32 gate logits)
    experts  = top-k of (p + e_score_correction_bias)      # the bias steers selection only
    weights  = p[experts] / clamp(sum(p[experts]), min=moe_norm_min)

vLLM's generic routers do not all implement this: 0.32's CPU router ignores the correction
bias for plain softmax routing, which moves logprobs by up to 0.18 on a checkpoint with a
non-zero bias. The plugin hands this function to the fused-MoE layer as its custom routing
function, so every platform routes the same way.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from vllm_ernie45.expert_layout import FusedExpertLayout


def ernie_select_experts(
    gating_output: torch.Tensor,
    e_score_correction_bias: torch.Tensor,
    top_k: int,
    norm_min: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(weights float32 [T, k], expert ids int32 [T, k])``."""
    probs = torch.softmax(gating_output.float(), dim=-1)
    _, expert_ids = torch.topk(probs + e_score_correction_bias.float(), top_k, dim=-1)
    weights = probs.gather(-1, expert_ids)
    weights = weights / torch.clamp(weights.sum(dim=-1, keepdim=True), min=norm_min)
    return weights, expert_ids.to(torch.int32)


def _custom_routing(
    hidden_states: torch.Tensor,
    gating_output: torch.Tensor,
    topk: int,
    renormalize: bool,
    *,
    e_score_correction_bias: torch.Tensor,
    norm_min: float,
    layout: FusedExpertLayout | None,
    select: Callable,
    beside=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    # ERNIE always renormalises (with its own floor); vLLM's flag is not consulted. With
    # fused shared experts vLLM's top-k counts the shared slots too.
    num_shared = layout.num_shared if layout else 0
    if beside is not None and beside.takes(gating_output.shape[0]):
        # This step runs the shared slices beside the call (vllm_ernie45.shared_beside; one
        # GPU, so routed slot = expert id): the routed slots only.
        return select(gating_output, e_score_correction_bias, topk - num_shared, norm_min, None)
    return select(gating_output, e_score_correction_bias, topk - num_shared, norm_min, layout)


def _select_torch(
    gating_output: torch.Tensor,
    e_score_correction_bias: torch.Tensor,
    top_k: int,
    norm_min: float,
    layout: FusedExpertLayout | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    weights, ids = ernie_select_experts(gating_output, e_score_correction_bias, top_k, norm_min)
    if layout is None:
        return weights, ids
    if layout.ep_size > 1:  # routed expert e -> its slot (the identity without EP)
        ids = layout.routed_slot(ids)
    # The shared slots, built on the device (no host copy: this runs inside CUDA-graph
    # capture with VLLM_ERNIE45_ROUTER=torch).
    shared_ids = layout.shared_slot(torch.arange(layout.num_shared, dtype=ids.dtype, device=ids.device))
    tokens = gating_output.shape[0]
    weights = torch.cat([weights, weights.new_ones(tokens, layout.num_shared)], dim=-1)
    ids = torch.cat([ids, shared_ids.expand(tokens, layout.num_shared)], dim=-1)
    return weights, ids


def make_routing_function(
    e_score_correction_bias: torch.Tensor,
    norm_min: float,
    backend: str = "torch",
    layout: FusedExpertLayout | None = None,
    beside=None,
) -> Callable:
    """A ``custom_routing_function`` for vLLM's fused MoE bound to one layer's bias tensor
    (the Parameter itself, so weights loaded into it later are seen).

    ``layout``: the layer's shared experts run inside the fused-MoE call, in the slots
    ``layout`` gives them (``vllm_ernie45.expert_layout``), selected for every token with
    weight 1 (vLLM's top-k is then k + S); routed experts are returned as their slots.
    ``backend``: ``torch`` (any device) or ``triton`` (one CUDA kernel).
    ``beside``: the layer's ``vllm_ernie45.shared_beside.SharedBeside`` (or None): in a step
    it ``takes``, the shared slots are left out (it computes them beside the call).
    """
    if backend == "triton":
        from vllm_ernie45.routing_triton import ernie_select_experts_triton as select
    elif backend == "torch":
        select = _select_torch
    else:
        raise ValueError(f"unknown router backend {backend!r}")
    return functools.partial(
        _custom_routing,
        e_score_correction_bias=e_score_correction_bias,
        norm_min=norm_min,
        layout=layout,
        select=select,
        beside=beside,
    )
