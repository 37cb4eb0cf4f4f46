"""A broken checkpoint stops vLLM at load time with one error naming the tensor; nothing is
left randomly initialised. Each case starts a real vllm.LLM on a damaged copy of a tiny
checkpoint."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from vllm_ernie45.checkpoint import CheckpointError, pt_schema
from vllm_ernie45.config import arch_from_config

from conftest import start_vllm_must_fail

EXPERT = "model.layers.2.mlp.experts.3.up_proj.weight"


def _damaged_copy(src, dst, edit):
    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


CASES = {
    "missing": (lambda t: t.pop(EXPERT), [f"missing 1 tensor(s)", repr(EXPERT)]),
    "unexpected": (
        lambda t: t.__setitem__("model.layers.1.mlp.experts.8.up_proj.weight", torch.zeros(32, 64)),
        ["unexpected checkpoint tensor 'model.layers.1.mlp.experts.8.up_proj.weight'"],
    ),
    "wrong-shape": (
        lambda t: t.__setitem__(EXPERT, torch.zeros(33, 64)),
        [f"checkpoint tensor {EXPERT!r} has shape [33, 64], but the model config implies [32, 64]"],
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_vllm_refuses_broken_checkpoint(case, tiny_checkpoint, tmp_path):
    edit, messages = CASES[case]
    model = _damaged_copy(tiny_checkpoint("21b"), tmp_path / case, edit)
    output = start_vllm_must_fail(model)
    assert "CheckpointError" in output, output[-3000:]
    for message in messages:
        assert message in output, output[-3000:]


def _edit_config(model, edit):
    path = model / "config.json"
    cfg = json.loads(path.read_text())
    edit(cfg)
    path.write_text(json.dumps(cfg))
    return model


def _truncate(model):
    file = model / "model.safetensors"
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    return model


STARTUP_CASES = {
    # case: (damage, extra LLM kwargs, fragments the output must contain)
    "config-missing-key": (
        lambda m: _edit_config(m, lambda c: c.pop("moe_intermediate_size")),
        {},
        ["ErnieConfigError", "missing required ERNIE 4.5 key(s) 'moe_intermediate_size'"],
    ),
    "truncated-safetensors": (
        _truncate, {}, ["CheckpointError: unreadable checkpoint file:", "model.safetensors (", "truncated or corrupt"]
    ),
    "max-model-len-beyond-positions": (
        lambda m: _edit_config(m, lambda c: c.__setitem__("max_position_embeddings", 128)),
        {"max_model_len": 256},
        ["max_model_len", "128"],
    ),
}


@pytest.mark.parametrize("case", sorted(STARTUP_CASES))
def test_bad_startup_input_gets_one_clear_message(case, tiny_checkpoint, tmp_path):
    damage, kwargs, fragments = STARTUP_CASES[case]
    model = damage(Path(shutil.copytree(tiny_checkpoint("21b"), tmp_path / case)))
    output = start_vllm_must_fail(model, **kwargs)
    for fragment in fragments:
        assert fragment in output, output[-3000:]


def test_loader_rejects_duplicate_and_reports_many_missing(tiny_checkpoint):
    """The same checks, on the loader directly (no engine): a duplicate tensor, and a
    checkpoint missing a whole layer lists the first names and counts the rest."""
    from vllm_ernie45.loader import load_checkpoint

    path = tiny_checkpoint("21b")
    arch = arch_from_config(json.loads((path / "config.json").read_text()))
    tensors = load_file(str(path / "model.safetensors"))
    name = "model.norm.weight"
    root = torch.nn.Module()  # just the one module the tensor fills
    root.model = torch.nn.Module()
    root.model.norm = torch.nn.Module()
    root.model.norm.weight = torch.nn.Parameter(torch.empty(arch.hidden_size), requires_grad=False)
    with pytest.raises(CheckpointError, match="appears more than once"):
        load_checkpoint(root, arch, [(name, tensors[name])] * 2)
    assert torch.equal(root.model.norm.weight, tensors[name])
    with pytest.raises(CheckpointError, match=r"missing \d+ tensor\(s\).* and \d+ more"):
        load_checkpoint(torch.nn.Module(), arch, [])
    assert len(pt_schema(arch).tensors) > 8
