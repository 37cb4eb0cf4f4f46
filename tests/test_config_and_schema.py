"""Config resolution (hub legacy keys and transformers >= 5 style) and the checkpoint schema,
checked against what transformers itself writes."""

from __future__ import annotations

import json

import pytest

from vllm_ernie45.checkpoint import OPTIONAL, Reshape, Stack, Target, is_mtp_tensor, mtp_schema, pt_schema
from vllm_ernie45.config import ErnieConfigError, arch_from_config
from vllm_ernie45.testing.tiny.checkpoint import variant_config

HUB_21B = {  # the public ERNIE-4.5-21B-A3B-PT config.json, legacy key style
    "architectures": ["Ernie4_5_MoeForCausalLM"],
    "hidden_size": 2560, "intermediate_size": 12288, "max_position_embeddings": 131072,
    "model_type": "ernie4_5_moe", "num_attention_heads": 20, "num_key_value_heads": 4,
    "head_dim": 128, "num_hidden_layers": 28, "rms_norm_eps": 1e-05, "rope_theta": 500000,
    "use_bias": False, "vocab_size": 103424, "moe_num_experts": 64, "moe_num_shared_experts": 2,
    "moe_layer_start_index": 1, "moe_layer_interval": 1, "moe_intermediate_size": 1536,
    "moe_capacity": [64, 64, 64], "moe_gate": "topk", "moe_k": 6, "moe_use_aux_free": True,
    "num_nextn_predict_layers": 1, "tie_word_embeddings": True, "hidden_act": "silu",
}


def test_hub_legacy_config_resolves():
    arch = arch_from_config(HUB_21B)
    assert arch.rope_theta == 500000.0
    assert arch.moe_layer_end == 27  # absent -> last layer
    assert arch.moe_layer_indices == list(range(1, 28))
    assert arch.shared_intermediate_size == 3072
    assert (arch.q_size, arch.kv_size) == (2560, 512)
    assert arch.num_mtp_layers == 1


def test_transformers5_config_object_resolves():
    from transformers import Ernie4_5_MoeConfig

    cfg = Ernie4_5_MoeConfig(**variant_config("interval"))
    arch = arch_from_config(cfg)
    assert arch.rope_theta == 500000.0
    assert arch.moe_layer_indices == [1, 3]  # interval 2, end index 4 excludes layer 5
    assert arch.head_dim == 32


def test_dense_config_has_no_moe_layers():
    from transformers import Ernie4_5Config

    arch = arch_from_config(Ernie4_5Config(**variant_config("dense")))
    assert arch.num_experts == 0 and arch.moe_layer_indices == []
    assert arch.head_dim == 128 // 4


def test_rope_parameters_win_over_legacy_key():
    cfg = dict(HUB_21B, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    assert arch_from_config(cfg).rope_theta == 10000.0


@pytest.mark.parametrize(
    "change, message",
    [
        ({"hidden_size": None}, "'hidden_size'"),
        ({"moe_k": None}, "'moe_k'"),
        ({"moe_k": 65}, "moe_k=65 exceeds moe_num_experts=64"),
        ({"num_key_value_heads": 3}, "not a multiple of num_key_value_heads=3"),
        ({"hidden_act": "gelu"}, "'hidden_act'"),
        ({"moe_layer_interval": 0}, "'moe_layer_interval' must be a positive integer"),
        ({"moe_layer_start_index": []}, "'moe_layer_start_index' is an empty list"),
    ],
)
def test_bad_config_names_the_key(change, message):
    with pytest.raises(ErnieConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        arch_from_config({**HUB_21B, **change})


@pytest.mark.parametrize("variant", ["21b", "300b", "interval", "bias", "legacy", "dense"])
def test_schema_matches_what_transformers_saves(variant, tiny_checkpoint):
    """Every tensor HF's save_pretrained writes is in the schema in a stored form it accepts,
    and every tensor the schema requires is there (MTP tensors of the legacy variant aside)."""
    from safetensors import safe_open

    path = tiny_checkpoint(variant)
    config = json.loads((path / "config.json").read_text())
    schema = pt_schema(arch_from_config(config))
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        saved = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    mtp = {k for k in saved if is_mtp_tensor(k)}
    if variant == "legacy":  # ERNIE's MTP head: the MTP schema, less the shared final norm
        arch = arch_from_config(config)
        mtp_expected = {k: s for k, s in mtp_schema(arch).shapes.items() if is_mtp_tensor(k)}
        assert {k: saved[k] for k in mtp} == mtp_expected
    else:
        assert not mtp
    main = {k: v for k, v in saved.items() if k not in mtp}
    assert all(schema.tensors[k].accepts(shape) for k, shape in main.items())
    assert set(schema.required()) <= set(main) <= set(schema.tensors)


@pytest.mark.version_smoke  # the loader's copy of a vLLM rule, checked on every CI version
@pytest.mark.parametrize("logical, redundant", [(8, 0), (8, 3), (64, 16)])
def test_eplb_initial_placement_matches_vllm(logical, redundant):
    from vllm.distributed.eplb.eplb_state import EplbState

    from vllm_ernie45.loader import initial_physical_to_logical

    expected = EplbState.build_initial_global_physical_to_logical_map(logical, redundant)
    assert initial_physical_to_logical(logical, redundant) == list(expected)


def test_schema_targets_cover_each_param_family():
    arch = arch_from_config(HUB_21B)
    tensors = pt_schema(arch).tensors
    spec = tensors["model.layers.5.mlp.experts.63.down_proj.weight"]
    assert spec.shape == (2560, 1536) and spec.target == Target("model.layers.5.mlp.experts", "w2_weight")
    assert spec.place == Stack("w2", expert=63)
    assert tensors["model.layers.0.mlp.up_proj.weight"].place == Stack(1)
    assert tensors["model.layers.3.self_attn.k_proj.weight"].target.module.endswith("qkv_proj")
    bias = tensors["model.layers.3.mlp.moe_statics.e_score_correction_bias"]
    assert bias.shape == (64,) and bias.stored_as == (Reshape((1, 64)),)  # published [1, E]
    assert tensors["lm_head.weight"].if_absent == OPTIONAL and tensors["lm_head.weight"].target is None  # tied
    assert "model.layers.0.mlp.gate.weight" not in tensors  # layer 0 is dense
    assert len(tensors) == 3 + 27 * (2 + 4 + 2 + 3 + 64 * 3) + (2 + 4 + 3)


def _load_reduced_depth():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "gpu" / "reduced_depth.py"
    spec = importlib.util.spec_from_file_location("reduced_depth", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, path.parents[1] / "configs"


def test_shipped_300b_config_has_the_published_widths():
    """scripts/configs' 300B-A47B config gives the tensor shapes of the published checkpoint:
    qkv 8192 x (8192 + 2 x 1024), experts 3584 wide, 3 dense layers then 51 MoE layers."""
    _, configs = _load_reduced_depth()
    arch = arch_from_config(json.loads((configs / "ernie-4.5-300b-a47b-pt.config.json").read_text()))
    assert (arch.hidden_size, arch.q_size, arch.kv_size, arch.head_dim) == (8192, 8192, 1024, 128)
    assert (arch.num_experts, arch.top_k, arch.moe_intermediate_size, arch.num_shared_experts) == (64, 8, 3584, 0)
    assert arch.moe_layer_indices == list(range(3, 54)) and arch.intermediate_size == 28672


def test_reduced_depth_keeps_widths_and_dense_first_layers(tmp_path):
    reduced_depth, configs = _load_reduced_depth()
    full = json.loads((configs / "ernie-4.5-300b-a47b-pt.config.json").read_text())
    out = reduced_depth.write_model_dir(configs / "ernie-4.5-300b-a47b-pt.config.json", 8, tmp_path / "m")
    cut = json.loads((out / "config.json").read_text())
    assert {k: v for k, v in cut.items() if k not in ("num_hidden_layers", "moe_layer_end_index")} == {
        k: v for k, v in full.items() if k not in ("num_hidden_layers", "moe_layer_end_index")}
    arch = arch_from_config(cut)
    assert arch.num_layers == 8 and arch.moe_layer_indices == [3, 4, 5, 6, 7]
    assert (out / "tokenizer.json").exists() and (out / "tokenizer_config.json").exists()
    # The 21B config has no moe_layer_end_index: none is added.
    hub = reduced_depth.reduced_config(HUB_21B, 2)
    assert "moe_layer_end_index" not in hub and arch_from_config(hub).moe_layer_indices == [1]
    with pytest.raises(ValueError, match="keeps no MoE layer"):
        reduced_depth.reduced_config(full, 3)
