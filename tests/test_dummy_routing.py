"""vLLM's dummy weights route every token to the same experts; ``spread_routing`` spreads them
(``vllm_ernie45.testing.dummy_routing``, issue 29: the throughput benchmarks run on dummy
weights). Real vLLM on CPU, the plugin's model and vLLM's in-tree one, each in its own process."""

from __future__ import annotations

import json

import pytest

from conftest import run_python

# Full-size router shapes are not needed: ~1e-3 weights give logits far below the bias's spread
# at any width. 3 layers: a dense one, two MoE ones; 16 experts, top-4.
CONFIG = {
    "architectures": ["Ernie4_5_MoeForCausalLM"], "model_type": "ernie4_5_moe", "hidden_size": 512,
    "intermediate_size": 1024, "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
    "head_dim": 128, "vocab_size": 2048, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
    "rope_theta": 500000, "use_bias": False, "tie_word_embeddings": True, "moe_num_experts": 16,
    "moe_num_shared_experts": 2, "moe_layer_start_index": 1, "moe_layer_interval": 1,
    "moe_intermediate_size": 256, "moe_k": 4, "moe_use_aux_free": True, "torch_dtype": "bfloat16",
    "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
}

CHILD = r"""
import functools, json, random, sys
from vllm import LLM, SamplingParams
from vllm_ernie45.testing.dummy_routing import install_recorder, read_recorder, spread_routing
llm = LLM(model=sys.argv[1], load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16",
          enforce_eager=True, max_model_len=512, seed=0)
rng = random.Random(0)
params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, detokenize=False)
def batch():
    return [{"prompt_token_ids": [rng.randrange(3, 2000) for _ in range(32)]} for _ in range(8)]
out = {"hooked": llm.apply_model(functools.partial(install_recorder, top_k=4))[0]}
llm.generate(batch(), params, use_tqdm=False)
out["dummy"] = llm.apply_model(read_recorder)[0]
out["spread"] = llm.apply_model(spread_routing)[0]
llm.apply_model(functools.partial(install_recorder, top_k=4))
llm.generate(batch(), params, use_tqdm=False)
out["after"] = llm.apply_model(read_recorder)[0]
print("@@ROUTING " + json.dumps(out))
"""


@pytest.mark.parametrize("impl", ["plugin", "intree"])
def test_dummy_weights_route_every_token_alike_and_spread_routing_spreads_them(impl, tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(CONFIG))
    env = {"VLLM_ALLOW_INSECURE_SERIALIZATION": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    if impl == "intree":
        env["VLLM_PLUGINS"] = ""
    proc = run_python(["-c", CHILD, str(model)], timeout=600, env=env)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("@@ROUTING ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = json.loads(lines[-1][len("@@ROUTING "):])
    assert out["hooked"] == 2
    assert out["spread"] == {"routing": "spread", "biases_zeroed": 2, "gates_redrawn": 2}
    for layer in ("model.layers.1.mlp", "model.layers.2.mlp"):
        dummy, after = out["dummy"][layer], out["after"][layer]
        assert dummy["tokens"] >= 8 * 32
        # Dummy weights: one top-4 set for every token of every step, 4 of 16 experts used.
        assert dummy["distinct_sets"] == 1 and dummy["experts_used"] == 4
        # Spread: every expert used, nearly every token its own set, no expert far above the mean.
        assert after["experts_used"] == 16
        assert after["distinct_sets"] > after["tokens"] // 4
        assert after["max_load_over_mean"] < 2.0
