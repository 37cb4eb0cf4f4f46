"""Small-batch expert computation as two GEMV kernels (Triton, CUDA).

At a handful of tokens a fused-MoE layer only streams expert weights: the grouped-GEMM
path (vLLM's ``fused_experts``) pads every (token, expert) pair to a 16-row tile and runs
four to five launches (GEMM 1, activation, GEMM 2, sum). Here the same computation is

1. ``gate_up_act``: one program per (token, expert slot) pair and block of ``BLOCK_N``
   intermediate columns; reads the expert's gate and up rows once, applies SiLU(gate) * up
   in fp32, writes the activation.
2. ``down_sum``: one program per token and block of ``BLOCK_H`` hidden rows; loops over the
   token's expert slots, reads each expert's down-projection rows, and sums them weighted
   by the router weights in fp32 -- no separate weighting or reduction kernel.

Weights in vLLM's fused-MoE layout: ``w13 [E, 2N, H]`` (gate rows, then up rows),
``w2 [E, H, N]``. ``ids`` / ``weights`` are the router's ``[T, k]`` outputs (shared experts
fused as always-selected slots included). Under tensor parallelism ``N`` is this rank's
shard and the result is a partial sum the caller all-reduces.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@dataclass(frozen=True)
class GemvConfig:
    """Block sizes for the two kernels (tuned per GPU by ``scripts/tune_moe.py``)."""

    block_n: int = 32  # gate_up_act: intermediate columns per program
    block_k: int = 256  # gate_up_act: hidden elements per step
    warps_1: int = 4
    stages_1: int = 3
    block_h: int = 8  # down_sum: hidden rows per program
    block_n2: int = 256  # down_sum: intermediate elements per step
    warps_2: int = 4
    stages_2: int = 3

    @classmethod
    def from_dict(cls, values: dict) -> GemvConfig:
        known = {f: values[f] for f in cls.__dataclass_fields__ if f in values}
        return cls(**{k: int(v) for k, v in known.items()})


@triton.jit
def _gate_up_act_kernel(
    x_ptr,
    w13_ptr,
    ids_ptr,
    out_ptr,
    N,
    K,
    stride_xm,
    stride_we,
    stride_wn,
    stride_om,
    TOP_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    pair = tl.program_id(0)
    token = pair // TOP_K
    expert = tl.load(ids_ptr + pair).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    gate_ptrs = w13_ptr + expert * stride_we + offs_n[:, None] * stride_wn + offs_k[None, :]
    up_ptrs = gate_ptrs + N * stride_wn
    x_ptrs = x_ptr + token * stride_xm + offs_k
    acc_gate = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        if EVEN_K:
            x = tl.load(x_ptrs).to(tl.float32)
            wg = tl.load(gate_ptrs, mask=mask_n[:, None], other=0.0)
            wu = tl.load(up_ptrs, mask=mask_n[:, None], other=0.0)
        else:
            mask_k = offs_k + k < K
            x = tl.load(x_ptrs, mask=mask_k, other=0.0).to(tl.float32)
            m = mask_n[:, None] & mask_k[None, :]
            wg = tl.load(gate_ptrs, mask=m, other=0.0)
            wu = tl.load(up_ptrs, mask=m, other=0.0)
        acc_gate += wg.to(tl.float32) * x[None, :]
        acc_up += wu.to(tl.float32) * x[None, :]
        gate_ptrs += BLOCK_K
        up_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
    gate = tl.sum(acc_gate, axis=1)
    up = tl.sum(acc_up, axis=1)
    act = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(out_ptr + pair * stride_om + offs_n, act.to(out_ptr.dtype.element_ty), mask=mask_n)


@triton.jit
def _down_sum_kernel(
    act_ptr,
    w2_ptr,
    ids_ptr,
    weights_ptr,
    out_ptr,
    H,
    N,
    stride_am,
    stride_we,
    stride_wh,
    stride_om,
    TOP_K: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    EVEN_N: tl.constexpr,
):
    token = tl.program_id(0)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask_h = offs_h < H
    offs_n = tl.arange(0, BLOCK_N)
    total = tl.zeros([BLOCK_H], dtype=tl.float32)
    for slot in range(TOP_K):
        pair = token * TOP_K + slot
        expert = tl.load(ids_ptr + pair).to(tl.int64)
        weight = tl.load(weights_ptr + pair).to(tl.float32)
        w_ptrs = w2_ptr + expert * stride_we + offs_h[:, None] * stride_wh + offs_n[None, :]
        a_ptrs = act_ptr + pair * stride_am + offs_n
        acc = tl.zeros([BLOCK_H, BLOCK_N], dtype=tl.float32)
        for n in range(0, N, BLOCK_N):
            if EVEN_N:
                a = tl.load(a_ptrs).to(tl.float32)
                w = tl.load(w_ptrs, mask=mask_h[:, None], other=0.0)
            else:
                mask_n = offs_n + n < N
                a = tl.load(a_ptrs, mask=mask_n, other=0.0).to(tl.float32)
                w = tl.load(w_ptrs, mask=mask_h[:, None] & mask_n[None, :], other=0.0)
            acc += w.to(tl.float32) * a[None, :]
            w_ptrs += BLOCK_N
            a_ptrs += BLOCK_N
        total += weight * tl.sum(acc, axis=1)
    tl.store(out_ptr + token * stride_om + offs_h, total.to(out_ptr.dtype.element_ty), mask=mask_h)


def gemv_experts(
    hidden_states: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
    config: GemvConfig = GemvConfig(),
) -> torch.Tensor:
    """``sum_k weights[t, k] * down(silu(gate(x_t)) * up(x_t))`` over the experts ``ids[t, k]``.

    ``hidden_states [T, H]``, ``w13 [E, 2N, H]``, ``w2 [E, H, N]``; returns ``[T, H]`` in
    ``hidden_states``' dtype.
    """
    tokens, hidden = hidden_states.shape
    num_experts, two_n, k_dim = w13.shape
    inter = two_n // 2
    if k_dim != hidden or w2.shape != (num_experts, hidden, inter):
        raise ValueError(
            f"gemv_experts: w13 {tuple(w13.shape)} / w2 {tuple(w2.shape)} do not fit "
            f"hidden size {hidden}"
        )
    top_k = ids.shape[1]
    hidden_states = hidden_states.contiguous()
    ids = ids.contiguous()
    weights = weights.contiguous()
    if w13.stride(2) != 1 or w2.stride(2) != 1:
        raise ValueError("gemv_experts needs expert weights contiguous in their last dimension")
    out = torch.empty_like(hidden_states)
    if tokens == 0:
        return out
    act = torch.empty(tokens * top_k, inter, dtype=hidden_states.dtype, device=hidden_states.device)
    launch_gate_up_act(hidden_states, w13, ids, act, config)
    launch_down_sum(act, w2, ids, weights, out, config)
    return out


def launch_gate_up_act(
    hidden_states: torch.Tensor, w13: torch.Tensor, ids: torch.Tensor, act: torch.Tensor, c: GemvConfig
) -> None:
    """Kernel 1 alone (the tuner times it on its own): ``act [T*k, N]``."""
    inter, hidden, top_k = act.shape[1], hidden_states.shape[1], ids.shape[1]
    _gate_up_act_kernel[(act.shape[0], triton.cdiv(inter, c.block_n))](
        hidden_states,
        w13,
        ids,
        act,
        inter,
        hidden,
        hidden_states.stride(0),
        w13.stride(0),
        w13.stride(1),
        act.stride(0),
        TOP_K=top_k,
        BLOCK_N=c.block_n,
        BLOCK_K=c.block_k,
        EVEN_K=hidden % c.block_k == 0,
        num_warps=c.warps_1,
        num_stages=c.stages_1,
    )


def launch_down_sum(
    act: torch.Tensor,
    w2: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    out: torch.Tensor,
    c: GemvConfig,
) -> None:
    """Kernel 2 alone: ``out [T, H]`` from ``act [T*k, N]``."""
    tokens, hidden = out.shape
    inter, top_k = act.shape[1], ids.shape[1]
    _down_sum_kernel[(tokens, triton.cdiv(hidden, c.block_h))](
        act,
        w2,
        ids,
        weights,
        out,
        hidden,
        inter,
        act.stride(0),
        w2.stride(0),
        w2.stride(1),
        out.stride(0),
        TOP_K=top_k,
        BLOCK_H=c.block_h,
        BLOCK_N=c.block_n2,
        EVEN_N=inter % c.block_n2 == 0,
        num_warps=c.warps_2,
        num_stages=c.stages_2,
    )


def reference_experts(
    hidden_states: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
) -> torch.Tensor:
    """The same computation in fp32 torch ops (tests and the tuner's check)."""
    inter = w13.shape[1] // 2
    x = hidden_states.float()
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for slot in range(ids.shape[1]):
            e = int(ids[t, slot])
            gate_up = w13[e].float() @ x[t]
            act = torch.nn.functional.silu(gate_up[:inter]) * gate_up[inter:]
            out[t] += float(weights[t, slot]) * (w2[e].float() @ act)
    return out.to(hidden_states.dtype)
