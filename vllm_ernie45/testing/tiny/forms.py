"""Published forms of an ERNIE 4.5 checkpoint, derived from a tiny one.

Real checkpoints differ from what transformers' ``save_pretrained`` writes: config.json
leaves keys out (the 300B-A47B configs have no ``moe_num_shared_experts``), the correction bias
is stored ``[E]`` instead of ``[1, E]``, the dense 0.3B was first published under the
architecture ``Ernie4_5_ForCausalLM``, an aux-free-less model has no correction bias at all.
Each function here edits a checkpoint directory in place (single-file or sharded with
``model.safetensors.index.json``); :func:`copy_checkpoint` first.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

CORRECTION_BIAS = "moe_statics.e_score_correction_bias"


def copy_checkpoint(src: str | Path, dst: str | Path) -> Path:
    return Path(shutil.copytree(src, dst))


def edit_config(model_dir: Path, drop: tuple[str, ...] = (), **keys: Any) -> Path:
    """config.json without the keys ``drop`` and with ``keys`` set."""
    path = model_dir / "config.json"
    cfg = json.loads(path.read_text())
    for key in drop:
        cfg.pop(key, None)
    cfg.update(keys)
    path.write_text(json.dumps(cfg, indent=2) + "\n")
    return model_dir


def edit_tensors(model_dir: Path, edit: Callable[[str, Any], Any]) -> Path:
    """Every tensor through ``edit(name, tensor)``: the tensor to store, or None to drop it
    (the index, where there is one, follows)."""
    from safetensors.torch import load_file, save_file

    from vllm_ernie45.checkpoint_files import SAFETENSORS_INDEX, shard_files

    dropped: set[str] = set()
    for file in shard_files(model_dir):
        tensors = {}
        for name, tensor in load_file(str(file)).items():
            new = edit(name, tensor)
            if new is None:
                dropped.add(name)
            else:
                tensors[name] = new
        save_file(tensors, str(file), metadata={"format": "pt"})
    index = model_dir / SAFETENSORS_INDEX
    if dropped and index.is_file():
        data = json.loads(index.read_text())
        data["weight_map"] = {n: f for n, f in data["weight_map"].items() if n not in dropped}
        index.write_text(json.dumps(data, indent=2) + "\n")
    return model_dir


def correction_bias_as_vector(model_dir: Path) -> Path:
    """The correction bias stored ``[E]`` instead of ``[1, E]``."""
    return edit_tensors(model_dir, lambda n, t: t.reshape(-1) if n.endswith(CORRECTION_BIAS) else t)


def zero_correction_bias(model_dir: Path) -> Path:
    """The correction bias all zeros (routing by the gate alone, as vLLM 0.32's CPU router
    routes whatever the bias says)."""
    import torch

    return edit_tensors(model_dir, lambda n, t: torch.zeros_like(t) if n.endswith(CORRECTION_BIAS) else t)


def without_correction_bias(model_dir: Path) -> Path:
    """No correction bias, and config.json says ``moe_use_aux_free: false`` (a model trained
    without it)."""
    edit_tensors(model_dir, lambda n, t: None if n.endswith(CORRECTION_BIAS) else t)
    return edit_config(model_dir, moe_use_aux_free=False)


def first_dense_architecture_name(model_dir: Path) -> Path:
    """The dense model's config.json as the 0.3B-PT was first published."""
    return edit_config(model_dir, architectures=["Ernie4_5_ForCausalLM"])
