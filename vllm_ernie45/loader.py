"""Load a -PT safetensors checkpoint into the plugin's model, strictly.

Every tensor is checked against :func:`vllm_ernie45.checkpoint.checkpoint_schema`: an
unexpected name, a duplicate, a wrong shape (both shapes named) or a tensor the config
requires but the checkpoint lacks is a :class:`CheckpointError`; nothing is left randomly
initialised. Tensors of the MTP head (``mtp_*``) are set aside with an INFO line.

Loading is local: under pipeline parallelism a rank skips layers it does not hold, and
under expert parallelism the fused-MoE weight loader keeps only this rank's experts (each
logical expert is written into every physical slot EPLB gives it).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn
from vllm.logger import init_logger
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.utils import PPMissingLayer

from vllm_ernie45 import compat
from vllm_ernie45.checkpoint import (
    MTP_PREFIX,
    OPTIONAL_WHEN_TIED,
    CheckpointError,
    TensorSpec,
    checkpoint_schema,
    is_mtp_tensor,
    mtp_schema,
)
from vllm_ernie45.config import ErnieArch

logger = init_logger("vllm.ernie45.loader")

_MAX_LISTED = 8


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _local_module(model: nn.Module, path: str) -> nn.Module | None:
    """The module at ``path``, or None where a pipeline stage does not hold it."""
    module = model
    for part in path.split("."):
        if isinstance(module, PPMissingLayer):
            return None
        module = module[int(part)] if part.isdigit() else getattr(module, part)
    return None if isinstance(module, PPMissingLayer) else module


def _find_param(module: nn.Module, module_path: str, name: str) -> tuple[str, nn.Parameter]:
    """``name`` inside ``module``: directly, or one level down (the fused-MoE runner keeps
    its weights in a child module; a LoRA wrapper in ``base_layer``)."""
    params = dict(module.named_parameters())
    if name in params:
        return name, params[name]
    nested = [n for n in params if n.endswith(f".{name}") and "lora" not in n]
    if len(nested) != 1:
        raise RuntimeError(
            f"vllm-ernie45 internal error: {module_path} has {len(nested)} parameters "
            f"named {name!r} ({sorted(params)})"
        )
    return nested[0], params[nested[0]]


def _physical_slots(model: nn.Module, arch: ErnieArch) -> dict[int, list[int]]:
    """Logical expert id -> the physical expert ids that hold it (EPLB redundancy). Fused
    shared experts (ids >= E; never with EPLB) live in the slot of their own id."""
    redundant = getattr(model, "num_redundant_experts", 0) or 0
    slots: dict[int, list[int]] = defaultdict(list)
    if arch.num_experts:
        for physical, logical in enumerate(
            compat.initial_physical_to_logical(arch.num_experts, redundant)
        ):
            slots[logical].append(physical)
        for shared in range(arch.num_shared_experts):
            slots[arch.num_experts + shared] = [arch.num_experts + shared]
    return slots


def _expert_pieces(tensor: torch.Tensor, spec: TensorSpec) -> list[tuple[int, torch.Tensor]]:
    """(logical expert id, weight) pairs of a per-expert or fused-shared-expert tensor."""
    target = spec.target
    if not target.split:
        return [(target.expert, tensor)]
    dim = 1 if target.shard == "w2" else 0  # the intermediate dimension
    return [
        (target.expert + j, piece.contiguous())
        for j, piece in enumerate(tensor.chunk(target.split, dim=dim))
    ]


def _load_tensor(
    param: nn.Parameter,
    param_path: str,
    tensor: torch.Tensor,
    spec: TensorSpec,
    slots: dict[int, list[int]],
) -> bool:
    target = spec.target
    if target.expert is not None:
        loaded = False
        for expert, weight in _expert_pieces(tensor, spec):
            for physical in slots[expert]:
                loaded |= bool(
                    param.weight_loader(
                        param,
                        weight,
                        weight_name=param_path,
                        shard_id=target.shard,
                        expert_id=physical,
                        return_success=True,
                    )
                )
        return loaded  # False: none of this expert's slots live on this rank
    if target.param == "e_score_correction_bias":
        tensor = tensor.reshape(-1)  # stored as [1, E]
    if target.shard is not None:
        param.weight_loader(param, tensor, target.shard)
    else:
        getattr(param, "weight_loader", default_weight_loader)(param, tensor)
    return True


def _unreadable_files(model_dir: str) -> list[str]:
    """The *.safetensors files in ``model_dir`` whose header or data do not read back."""
    from safetensors import safe_open

    broken = []
    for path in sorted(Path(model_dir).glob("*.safetensors")) if Path(model_dir).is_dir() else []:
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    f.get_slice(key)
        except Exception as err:  # noqa: BLE001 - any failure means the file is unusable
            broken.append(f"{path} ({err})")
    return broken


def _readable(weights: Iterable[tuple[str, torch.Tensor]], model_dir: str):
    """``weights``, with a truncated / corrupt safetensors file reported by its path."""
    iterator = iter(weights)
    while True:
        try:
            item = next(iterator)
        except StopIteration:
            return
        except Exception as err:
            if type(err).__name__ != "SafetensorError":
                raise
            broken = _unreadable_files(model_dir) or [f"a file of {model_dir or 'the checkpoint'}"]
            raise CheckpointError(
                f"unreadable checkpoint file: {'; '.join(broken)}: truncated or corrupt "
                f"(safetensors: {err}); download or copy it again"
            ) from err
        yield item


def _listed_missing(schema: dict[str, TensorSpec], seen: set[str]) -> str:
    """``"3 tensor(s): 'a', 'b', 'c'"`` (at most _MAX_LISTED named), or "" if none is missing."""
    missing = [name for name in schema if name not in seen]
    if not missing:
        return ""
    listed = ", ".join(repr(n) for n in missing[:_MAX_LISTED])
    more = f" and {len(missing) - _MAX_LISTED} more" if len(missing) > _MAX_LISTED else ""
    return f"{len(missing)} tensor(s): {listed}{more}"


def _check_shape(
    name: str, tensor: torch.Tensor, expected: tuple[int, ...], transposed_ok: bool = False
) -> torch.Tensor:
    """``tensor`` if it has the ``expected`` shape; transposed where the spec allows a 2-D
    tensor stored the other way round; otherwise a CheckpointError naming both shapes."""
    if transposed_ok and len(expected) == 2 and _shape(tensor) == expected[::-1] != expected:
        logger.info_once("Checkpoint tensor %s is stored transposed %s; transposing it.", name, str(list(tensor.shape)))
        return tensor.t().contiguous()
    if _shape(tensor) != expected:
        raise CheckpointError(
            f"checkpoint tensor {name!r} has shape {list(tensor.shape)}, but the model "
            f"config implies {list(expected)}"
        )
    return tensor


def load_checkpoint(
    model: nn.Module,
    arch: ErnieArch,
    weights: Iterable[tuple[str, torch.Tensor]],
    fused_shared: bool = False,
) -> set[str]:
    """Load ``weights`` into ``model``; return the names of the parameters filled."""
    schema = checkpoint_schema(arch, fused_shared)
    slots = _physical_slots(model, arch)
    seen: set[str] = set()
    loaded: set[str] = set()
    mtp: list[str] = []

    model_dir = str(getattr(getattr(model, "config", None), "_name_or_path", "") or "")
    for name, tensor in _readable(weights, model_dir):
        if is_mtp_tensor(name):
            mtp.append(name)
            continue
        spec = schema.get(name)
        if spec is None:
            if name == OPTIONAL_WHEN_TIED and arch.tie_word_embeddings:
                # A tied checkpoint may carry the head too; the embedding fills it.
                _check_shape(name, tensor, (arch.vocab_size, arch.hidden_size))
                continue
            raise CheckpointError(
                f"unexpected checkpoint tensor {name!r} (shape {list(tensor.shape)}): it is "
                f"not part of an ERNIE 4.5 checkpoint with this config "
                f"({arch.num_layers} layers, MoE layers {arch.moe_layer_indices or 'none'}, "
                f"use_bias={arch.use_bias}, tie_word_embeddings={arch.tie_word_embeddings})"
            )
        if name in seen:
            raise CheckpointError(f"checkpoint tensor {name!r} appears more than once")
        seen.add(name)
        tensor = _check_shape(name, tensor, spec.shape, spec.transposed_ok)

        module = _local_module(model, spec.target.module)
        if module is None:
            continue  # another pipeline stage holds it
        param_name, param = _find_param(module, spec.target.module, spec.target.param)
        param_path = f"{spec.target.module}.{param_name}"
        if _load_tensor(param, param_path, tensor, spec, slots):
            loaded.add(param_path)

    missing = _listed_missing(schema, seen)
    if missing:
        raise CheckpointError(f"checkpoint is missing {missing} the model config requires")
    if mtp:
        logger.info(
            "Set aside %d multi-token-prediction tensors (%s, ...; num_nextn_predict_layers=%d): "
            "the target model does not use them.",
            len(mtp),
            mtp[0],
            arch.num_mtp_layers,
        )
    model.mtp_tensor_names = tuple(mtp)
    return loaded


def load_mtp_checkpoint(
    model: nn.Module, arch: ErnieArch, weights: Iterable[tuple[str, torch.Tensor]]
) -> set[str]:
    """Load the MTP head (:func:`vllm_ernie45.checkpoint.mtp_schema`) into the draft
    ``model`` from the whole -PT checkpoint (vLLM hands a draft every tensor of the target's
    checkpoint); the main model's tensors are skipped. A checkpoint without the MTP tensors,
    or with an unknown, duplicated or mis-shaped one, is one CheckpointError naming them."""
    schema = mtp_schema(arch)
    seen: set[str] = set()
    loaded: set[str] = set()
    model_dir = str(getattr(getattr(model, "config", None), "_name_or_path", "") or "")
    for name, tensor in _readable(weights, model_dir):
        spec = schema.get(name)
        if spec is None:
            if name.startswith(MTP_PREFIX):
                raise CheckpointError(
                    f"unexpected MTP tensor {name!r} (shape {list(tensor.shape)}): not part of "
                    f"ERNIE 4.5's MTP head with this config (use_bias={arch.use_bias}; only "
                    "index 0 of num_nextn_predict_layers is used)"
                )
            continue  # a tensor of the main model: the target loads it
        if name in seen:
            raise CheckpointError(f"checkpoint tensor {name!r} appears more than once")
        seen.add(name)
        tensor = _check_shape(name, tensor, spec.shape, spec.transposed_ok)
        module = _local_module(model, spec.target.module)
        param_name, param = _find_param(module, spec.target.module, spec.target.param)
        param_path = f"{spec.target.module}.{param_name}"
        _load_tensor(param, param_path, tensor, spec, {})
        loaded.add(param_path)
    missing = _listed_missing(schema, seen)
    if missing:
        raise CheckpointError(
            f"speculative decoding with method 'mtp' needs ERNIE 4.5's MTP head, but the "
            f"checkpoint lacks {missing}. Use a -PT checkpoint that ships the MTP block "
            "(num_nextn_predict_layers: 1), or serve without --speculative-config."
        )
    return loaded
