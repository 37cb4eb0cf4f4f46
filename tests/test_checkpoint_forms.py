"""Checkpoints as they are published, not as transformers' save_pretrained writes them.

* config.json without keys whose transformers default would change the model (the
  300B-A47B configs have no ``moe_num_shared_experts``; transformers fills 2): decided from
  the checkpoint's tensors, on the published configs (``fixtures/published_configs``, each
  with its source) and on tiny checkpoints with every decided key left out;
* the correction bias stored ``[E]`` or ``[1, E]``, or absent where config.json says
  ``moe_use_aux_free: false`` (zero, as the reference);
* bf16 checkpoints whose router (gate, correction bias) is fp32;
* sharded checkpoints (several safetensors files and ``model.safetensors.index.json``), and
  one that lacks a shard its index names (one error naming the file);
* the dense model under both architecture names.

The engine tests (last three) start a real vllm.LLM: one parity run on a sharded bf16
300B-like checkpoint that combines the MoE forms, one on the dense model's first name, and
one that must fail on a missing shard.
"""

from __future__ import annotations

import dataclasses
import json
import types
from pathlib import Path

import pytest
import torch

import vllm_ernie45
from vllm_ernie45.checkpoint import OPTIONAL, CheckpointError, Reshape, pt_schema
from vllm_ernie45.checkpoint_files import CheckpointLocation, shard_files, tensor_shapes
from vllm_ernie45.config import arch_from_config, check_raw_config
from vllm_ernie45.config_from_tensors import DECIDED_KEYS, decide_absent_keys, resolve_hf_config
from vllm_ernie45.testing.parity import compare, default_prompts, run_hf
from vllm_ernie45.testing.tiny import forms
from vllm_ernie45.testing.tiny.checkpoint import make_tiny_checkpoint

from conftest import run_vllm_greedy, start_vllm_must_fail

PUBLISHED = Path(__file__).parent / "fixtures" / "published_configs"
# What each published model really has (its tensors say so): shared experts per MoE layer.
SHARED_EXPERTS = {"21b": 2, "300b": 0}
LOGPROB_TOL = 5e-4


def _same_model(a, b) -> bool:
    """Equal architectures; MoE placement compared by the layers it gives (start / end /
    interval can say the same thing in several ways)."""
    def placement_free(arch):
        return dataclasses.replace(arch, moe_layer_start=0, moe_layer_end=0, moe_layer_interval=1)

    return a.moe_layer_indices == b.moe_layer_indices and placement_free(a) == placement_free(b)


def _published(name: str) -> dict:
    return {k: v for k, v in json.loads((PUBLISHED / name).read_text()).items() if not k.startswith("_")}


def _published_tensor_shapes(arch) -> dict[str, tuple[int, ...]]:
    """The tensor names and shapes of a published checkpoint of ``arch``, as stored (the
    correction bias ``[1, E]``; no head for a tied model)."""
    shapes = {}
    for name, spec in pt_schema(arch).tensors.items():
        if spec.if_absent == OPTIONAL:
            continue
        reshape = next((f for f in spec.stored_as if isinstance(f, Reshape)), None)
        shapes[name] = reshape.stored if reshape else spec.shape
    return shapes


@pytest.mark.parametrize("fixture", sorted(p.name for p in PUBLISHED.glob("*.json")))
def test_published_config_resolves_to_the_model_its_tensors_hold(fixture):
    raw = _published(fixture)
    check_raw_config(raw, fixture)
    assert json.loads((PUBLISHED / fixture).read_text())["_source"]
    if raw["model_type"] == "ernie4_5":  # the dense 0.3B, under either name
        assert vllm_ernie45.MODEL_CLASSES[raw["architectures"][0]] == "vllm_ernie45.model:ErnieDenseForCausalLM"
        truth = arch_from_config(raw)
    else:
        size = "300b" if raw["hidden_size"] == 8192 else "21b"
        truth = arch_from_config({**raw, "moe_num_shared_experts": SHARED_EXPERTS[size]})
    decisions = decide_absent_keys(raw, _published_tensor_shapes(truth))
    assert {d.key for d in decisions} <= {k for k in DECIDED_KEYS if k not in raw}
    resolved = arch_from_config({**raw, **{d.key: d.value for d in decisions}})
    assert _same_model(resolved, truth)
    if "300b" in fixture:
        from transformers import Ernie4_5_MoeConfig

        # What went wrong: the published config has no such key, and transformers fills 2.
        assert "moe_num_shared_experts" not in raw
        assert Ernie4_5_MoeConfig(**raw).moe_num_shared_experts == 2
        assert resolved.num_shared_experts == 0


@pytest.mark.parametrize("variant", ["21b", "300b", "interval", "bias", "dense"])
def test_every_decided_key_left_out_is_decided_back(variant, tiny_checkpoint):
    """Drop every key the tensors can decide from a tiny checkpoint's config.json: the
    decisions give back the model the full config describes."""
    path = tiny_checkpoint(variant)
    full = json.loads((path / "config.json").read_text())
    raw = {k: v for k, v in full.items() if k not in DECIDED_KEYS}
    decisions = decide_absent_keys(raw, tensor_shapes(CheckpointLocation(str(path))))
    assert {d.key for d in decisions} == {k for k in DECIDED_KEYS if k in full}
    assert _same_model(arch_from_config({**raw, **{d.key: d.value for d in decisions}}), arch_from_config(full))


def _model_config(path: Path, **hf_overrides):
    from transformers import AutoConfig

    return types.SimpleNamespace(
        model=str(path), revision=None, hf_overrides=hf_overrides, hf_config=AutoConfig.from_pretrained(path)
    )


def test_resolve_sets_the_decision_on_vllms_config(tiny_checkpoint, tmp_path):
    model = forms.edit_config(forms.copy_checkpoint(tiny_checkpoint("300b"), tmp_path / "m"), drop=("moe_num_shared_experts",))
    model_config = _model_config(model)
    assert model_config.hf_config.moe_num_shared_experts == 2  # transformers' default
    assert resolve_hf_config(model_config).moe_num_shared_experts == 0
    # A key given through vLLM's hf_overrides is the user's; a dummy load decides nothing.
    assert resolve_hf_config(_model_config(model, moe_num_shared_experts=2)).moe_num_shared_experts == 2
    assert resolve_hf_config(_model_config(model), load_format="dummy").moe_num_shared_experts == 2


def _bias_root(num_experts: int) -> tuple[torch.nn.Module, torch.nn.Parameter]:
    """A module tree holding only layer 1's correction bias, where the model keeps it."""
    root = torch.nn.Module()
    root.model = torch.nn.Module()
    root.model.layers = torch.nn.ModuleList([torch.nn.Module(), torch.nn.Module()])
    root.model.layers[1].mlp = torch.nn.Module()
    param = torch.nn.Parameter(torch.full((num_experts,), float("nan")), requires_grad=False)
    root.model.layers[1].mlp.e_score_correction_bias = param
    return root, param


BIAS = "model.layers.1.mlp.moe_statics.e_score_correction_bias"


def _bias_schema(arch):
    full = pt_schema(arch)
    return dataclasses.replace(full, tensors={BIAS: full.tensors[BIAS]})


@pytest.mark.parametrize("stored", [(1, 8), (8,)])
def test_correction_bias_loads_as_1_by_e_or_e(stored, tiny_checkpoint):
    from vllm_ernie45.loader import load_with_schema

    arch = arch_from_config(json.loads((tiny_checkpoint("21b") / "config.json").read_text()))
    root, param = _bias_root(arch.num_experts)
    value = torch.randn(8)
    loaded = load_with_schema(root, _bias_schema(arch), [(BIAS, value.reshape(stored))])
    assert torch.equal(param, value) and loaded == {"model.layers.1.mlp.e_score_correction_bias"}
    with pytest.raises(CheckpointError, match=r"has shape \[2, 8\], but the model config implies \[8\]"):
        load_with_schema(_bias_root(8)[0], _bias_schema(arch), [(BIAS, torch.zeros(2, 8))])


@pytest.mark.parametrize("aux_free", [True, False])
def test_absent_correction_bias_is_zero_only_without_aux_free(aux_free, tiny_checkpoint):
    from vllm_ernie45.loader import load_with_schema

    config = json.loads((tiny_checkpoint("21b") / "config.json").read_text())
    arch = arch_from_config({**config, "moe_use_aux_free": aux_free})
    root, param = _bias_root(arch.num_experts)
    if aux_free:
        with pytest.raises(CheckpointError, match=f"missing 1 tensor.*{BIAS}"):
            load_with_schema(root, _bias_schema(arch), [])
    else:
        assert load_with_schema(root, _bias_schema(arch), []) == {"model.layers.1.mlp.e_score_correction_bias"}
        assert torch.equal(param, torch.zeros(8))


def test_aux_free_form_loads_through_the_whole_schema(tiny_checkpoint, tmp_path):
    """The published form end to end through the -PT schema: no correction bias tensor,
    ``moe_use_aux_free: false``; every tensor accepted, the biases the only absences."""
    model = forms.without_correction_bias(forms.copy_checkpoint(tiny_checkpoint("21b"), tmp_path / "m"))
    arch = arch_from_config(json.loads((model / "config.json").read_text()))
    schema = pt_schema(arch)
    shapes = tensor_shapes(CheckpointLocation(str(model)))
    assert all(schema.tensors[n].accepts(s) for n, s in shapes.items())
    assert set(schema.required()) <= set(shapes)
    assert {n for n in schema.tensors if n not in shapes} == {
        f"model.layers.{i}.mlp.moe_statics.e_score_correction_bias" for i in arch.moe_layer_indices
    } | {"lm_head.weight"}


def test_missing_shard_is_named(tmp_path):
    model = make_tiny_checkpoint(tmp_path / "m", "300b", with_tokenizer=False, max_shard_size="100KB")
    shards = shard_files(model)
    assert len(shards) > 2
    shards[1].unlink()
    with pytest.raises(CheckpointError, match=f"lacks: '{shards[1].name}' \\(\\d+ tensor"):
        shard_files(model)


# --- engine tests -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sharded_bf16_300b(tmp_path_factory):
    """The tiny 300B-like checkpoint as published: bf16 with an fp32 router, sharded."""
    return make_tiny_checkpoint(
        tmp_path_factory.mktemp("ernie-300b-bf16"), "300b", dtype="bfloat16", with_tokenizer=False, max_shard_size="100KB"
    )


def test_published_300b_form_matches_hf(sharded_bf16_300b, tmp_path):
    """Sharded, bf16 with an fp32 router, no ``moe_num_shared_experts`` in config.json, the
    correction bias stored ``[E]``: vLLM (fp32) gives the reference's tokens and logprobs on
    the same weights (the reference reads the checkpoint before those two edits)."""
    original = sharded_bf16_300b
    assert len(shard_files(original)) > 2
    published = forms.copy_checkpoint(original, tmp_path / "published")
    forms.edit_config(published, drop=("moe_num_shared_experts",))
    forms.correction_bias_as_vector(published)

    got = run_vllm_greedy(published, tmp_path / "vllm.json", max_tokens=8, top_k=5)
    assert got["model_class"] == "vllm_ernie45.model.ErnieMoeForCausalLM"
    assert got["num_shared_experts"] == 0  # decided from the tensors, not transformers' 2
    ref = run_hf(str(original), default_prompts(1024), 8, 5, "float32", track=got)
    result = compare(got, ref)
    assert result.tokens_equal, result.summary()
    assert result.max_logprob_diff < LOGPROB_TOL, result.summary()
    assert result.max_prompt_logprob_diff < LOGPROB_TOL, result.summary()


def test_dense_model_under_its_first_name_matches_hf(tiny_checkpoint, tmp_path):
    model = forms.first_dense_architecture_name(forms.copy_checkpoint(tiny_checkpoint("dense"), tmp_path / "m"))
    got = run_vllm_greedy(model, tmp_path / "vllm.json", max_tokens=8, top_k=5)
    assert got["model_class"] == "vllm_ernie45.model.ErnieDenseForCausalLM"
    ref = run_hf(str(model), default_prompts(1024), 8, 5, "float32", track=got)
    result = compare(got, ref)
    assert result.tokens_equal, result.summary()
    assert result.max_logprob_diff < LOGPROB_TOL, result.summary()


def test_missing_shard_stops_vllm_with_the_file_named(sharded_bf16_300b, tmp_path):
    model = forms.copy_checkpoint(sharded_bf16_300b, tmp_path / "m")
    lost = shard_files(model)[-1]
    lost.unlink()
    output = start_vllm_must_fail(model)
    assert "CheckpointError" in output, output[-3000:]
    assert f"lacks: '{lost.name}'" in output and "model.safetensors.index.json" in output, output[-3000:]
