"""Shared experts fused into the routed call, with and without expert parallelism
(vllm_ernie45.expert_layout): the slot layout against vLLM's own expert placement, and one
MoE layer computed rank by rank the way vLLM's EP layer runs it -- each rank only its own
slots, the all-reduce summing them -- against HF's ``Ernie4_5_MoeSparseMoeBlock``.

What vLLM's GPU kernels do with the slots is the fused-MoE call the TP tests already run; the
2-GPU engine run is ``scripts/gpu/gpu_parity.py --runs mid-bf16:plugin-tp2-ep-fused``."""

from __future__ import annotations

import pytest
import torch

from vllm_ernie45.checkpoint import Split, Stack, pt_schema
from vllm_ernie45.config import arch_from_config
from vllm_ernie45.expert_layout import FusedExpertLayout, unfusable_reason
from vllm_ernie45.loader import _physical_slots, _place
from vllm_ernie45.routing import make_routing_function

# vLLM's placement is the other half of the contract: checked on every locked version.
pytestmark = pytest.mark.version_smoke


def _vllm_expert_map(ep: int, rank: int, slots: int) -> torch.Tensor:
    from vllm.model_executor.layers.fused_moe.expert_map_manager import determine_expert_map

    _, expert_map, _ = determine_expert_map(ep, rank, slots, "linear")
    return expert_map


@pytest.mark.parametrize("routed, shared, ep", [(64, 2, 1), (64, 2, 2), (8, 2, 2), (8, 4, 2), (8, 4, 4), (6, 3, 3)])
def test_layout_is_vllms_linear_placement_with_equal_shared_shares(routed, shared, ep):
    layout = FusedExpertLayout(routed, shared, ep)
    slots = [layout.routed_slot(e) for e in range(routed)] + layout.shared_slots
    assert sorted(slots) == list(range(routed + shared))  # a bijection onto the slots
    for rank in range(ep):
        held = set(layout.rank_slots(rank))
        if ep > 1:  # what vLLM's EP layer holds on that rank
            expert_map = _vllm_expert_map(ep, rank, routed + shared)
            assert held == {int(i) for i in torch.nonzero(expert_map >= 0)}
        assert len(held & set(layout.shared_slots)) == shared // ep
        assert len(held & {layout.routed_slot(e) for e in range(routed)}) == routed // ep
    if ep == 1:  # without EP: slots e and E + j, as before
        assert slots == list(range(routed + shared))


def test_unfusable_layouts_say_why():
    assert unfusable_reason(64, 2, 2) is None
    reason = unfusable_reason(64, 2, 4)  # 21B-A3B under EP=4: two slices, four ranks
    assert "4" in reason and "2 shared" in reason
    with pytest.raises(ValueError, match="does not divide"):
        FusedExpertLayout(64, 2, 8)


def _moe_config(shared: int, **extra):
    from transformers import Ernie4_5_MoeConfig

    return Ernie4_5_MoeConfig(
        hidden_size=32, intermediate_size=48, moe_intermediate_size=16, moe_num_experts=8, moe_k=3,
        moe_num_shared_experts=shared, num_hidden_layers=2, moe_layer_start_index=1,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=64, **extra,
    )


def _hf_block(config, seed: int):
    from transformers.models.ernie4_5_moe.modeling_ernie4_5_moe import Ernie4_5_MoeSparseMoeBlock

    block = Ernie4_5_MoeSparseMoeBlock(config).float()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
        block.gate.moe_statics.e_score_correction_bias.copy_(
            0.05 * torch.randn(block.gate.moe_statics.e_score_correction_bias.shape, generator=gen)
        )
    return block


def _pt_tensors(block, mlp: str, inter: int) -> dict[str, torch.Tensor]:
    """The layer's routed and shared expert tensors under their -PT checkpoint names."""
    out = {}
    for e in range(block.experts.num_experts):
        gate_up = block.experts.gate_up_proj[e]
        out[f"{mlp}.experts.{e}.gate_proj.weight"] = gate_up[:inter]
        out[f"{mlp}.experts.{e}.up_proj.weight"] = gate_up[inter:]
        out[f"{mlp}.experts.{e}.down_proj.weight"] = block.experts.down_proj[e]
    for proj in ("gate_proj", "up_proj", "down_proj"):
        out[f"{mlp}.shared_experts.{proj}.weight"] = getattr(block.shared_experts, proj).weight
    return {k: v.detach().clone() for k, v in out.items()}


class _RankExperts:
    """One EP rank's fused-expert weights, filled through vLLM's expert weight-loader
    contract: a global slot id, -1 in the rank's expert map = another rank's (not loaded)."""

    def __init__(self, expert_map: torch.Tensor | None, local: int, hidden: int, inter: int):
        self.expert_map = expert_map
        self.w13 = torch.zeros(local, 2 * inter, hidden)
        self.w2 = torch.zeros(local, hidden, inter)
        self.inter = inter

    def local(self, slot: int) -> int:
        return slot if self.expert_map is None else int(self.expert_map[slot])

    def param(self, name: str):
        rank = self

        class _Param:
            def weight_loader(self, param, weight, weight_name, shard_id, expert_id, return_success):
                local = rank.local(expert_id)
                if local < 0:
                    return False
                if shard_id == "w2":
                    rank.w2[local].copy_(weight)
                else:
                    rows = slice(0, rank.inter) if shard_id == "w1" else slice(rank.inter, 2 * rank.inter)
                    rank.w13[local, rows].copy_(weight)
                return True

        return _Param()

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        for t in range(x.shape[0]):
            for w, slot in zip(weights[t].tolist(), ids[t].tolist()):
                local = self.local(slot)
                if local < 0:
                    continue
                gate, up = (self.w13[local] @ x[t]).chunk(2)
                out[t] += w * (self.w2[local] @ (torch.nn.functional.silu(gate) * up))
        return out


@pytest.mark.parametrize("shared, ep", [(2, 1), (2, 2), (4, 2), (4, 4)])
def test_ep_ranks_sum_to_hf_moe_block(shared, ep):
    config = _moe_config(shared)
    arch = arch_from_config(config.to_dict())
    block = _hf_block(config, seed=10 * shared + ep)
    layout = FusedExpertLayout(arch.num_experts, arch.num_shared_experts, ep)
    mlp = "model.layers.1.mlp"
    schema = pt_schema(arch, fused_shared=True)
    slots = _physical_slots(torch.nn.Module(), arch, layout)
    x = torch.randn(21, arch.hidden_size, generator=torch.Generator().manual_seed(7))
    logits = torch.nn.functional.linear(x, block.gate.weight)
    bias = block.gate.moe_statics.e_score_correction_bias[0]
    route = make_routing_function(bias, config.moe_norm_min, "torch", layout)
    weights, ids = route(x, logits, arch.top_k + shared, True)
    assert ids.shape == (21, arch.top_k + shared)

    total = torch.zeros_like(x)
    for rank in range(ep):
        expert_map = _vllm_expert_map(ep, rank, layout.num_routed + shared) if ep > 1 else None
        experts = _RankExperts(expert_map, layout.slots_per_rank, arch.hidden_size, arch.moe_intermediate_size)
        loaded = 0
        for name, tensor in _pt_tensors(block, mlp, arch.moe_intermediate_size).items():
            spec = schema.tensors[name]
            assert isinstance(spec.place, (Stack, Split)), name
            loaded += _place(experts.param(spec.target.param), name, tensor, spec.place, slots)
        assert loaded > 0
        # Every token reaches S / ep shared slices on every rank.
        local = torch.tensor([[experts.local(s) >= 0 for s in row] for row in ids.tolist()])
        assert (local[:, arch.top_k:].sum(-1) == shared // ep).all()
        total += experts.forward(x, weights, ids)
    with torch.no_grad():
        expected = block(x[None])[0]
    torch.testing.assert_close(total, expected, rtol=1e-5, atol=1e-5)


def test_fusion_policy(monkeypatch):
    """Fused where asked and possible: on CUDA by default without EP; under EP only with
    VLLM_ERNIE45_FUSE_SHARED_EXPERTS=1 and an EP size that divides the shared slices; never
    with EPLB or biased experts."""
    from vllm_ernie45 import envs
    from vllm_ernie45.layers import fused_shared_layout

    monkeypatch.delenv("VLLM_ERNIE45_FUSE_SHARED_EXPERTS", raising=False)
    assert envs.fuse_shared_experts(True) and not envs.fuse_shared_experts(False)
    assert not envs.fuse_shared_experts(True, expert_parallel=True)
    monkeypatch.setenv("VLLM_ERNIE45_FUSE_SHARED_EXPERTS", "1")
    assert envs.fuse_shared_experts(False, expert_parallel=True)

    arch = arch_from_config(_moe_config(2).to_dict())
    assert fused_shared_layout(arch, 2, False, True) == FusedExpertLayout(8, 2, 2)
    assert fused_shared_layout(arch, 1, False, True) == FusedExpertLayout(8, 2, 1)
    assert fused_shared_layout(arch, 4, False, True) is None  # 2 slices over 4 ranks
    assert fused_shared_layout(arch, 2, True, True) is None  # EPLB
    assert fused_shared_layout(arch, 2, False, False) is None  # not asked
    assert fused_shared_layout(arch_from_config(_moe_config(0).to_dict()), 1, False, True) is None
    biased = arch_from_config(_moe_config(2, use_bias=True).to_dict())
    assert fused_shared_layout(biased, 1, False, True) is None


def test_shared_fusion_refused_for_prequantized_checkpoints_and_lora():
    """Whatever VLLM_ERNIE45_FUSE_SHARED_EXPERTS says, shared experts stay their own MLP for a
    pre-quantized checkpoint and under LoRA (vLLM's LoRA wraps them as their own layers and
    packs expert adapters per routed expert: fused, a shared-expert adapter would be dropped
    silently -- issue 34)."""
    from types import SimpleNamespace

    from vllm_ernie45.layers import shared_fusion_refused

    def engine(quantization_config=None, lora_config=None):
        hf_config = SimpleNamespace(quantization_config=quantization_config)
        return SimpleNamespace(model_config=SimpleNamespace(hf_config=hf_config), lora_config=lora_config)

    assert shared_fusion_refused(engine()) is None
    assert "pre-quantized" in shared_fusion_refused(engine(quantization_config={"quant_method": "gptq"}))
    assert "LoRA" in shared_fusion_refused(engine(lora_config=SimpleNamespace(max_lora_rank=8)))
