"""Load a safetensors checkpoint into the plugin's models, strictly, as a schema says.

One loader, :func:`load_with_schema`, reads any :class:`vllm_ernie45.checkpoint.CheckpointSchema`
(the -PT main model, the MTP block): each tensor is checked against its spec (an unexpected
name, a duplicate, a shape none of its stored forms has, or a required tensor the checkpoint
lacks is a :class:`CheckpointError` naming it), brought to the model's shape by the transform of
its stored form (reshape, transpose), and placed as the spec says (whole, stacked as one shard
of a merged parameter, split into fused experts). Nothing is left randomly initialised.

A pre-quantized checkpoint (config.json's ``quantization_config``) is read through the same
schema, specialised to the parameters vLLM's quantization methods registered on the model
(:mod:`vllm_ernie45.quantized`), after vLLM's name mapping for its format; vLLM's own weight
loader of each parameter places the tensor (shard, expert), and what it refuses is a
CheckpointError naming the tensor.

Loading is local: under pipeline parallelism a rank skips layers it does not hold, and
under expert parallelism the fused-MoE weight loader keeps only this rank's experts (each
logical expert is written into every physical slot EPLB gives it).
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn
from vllm.logger import init_logger
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.utils import PPMissingLayer

from vllm_ernie45.checkpoint import (
    IF_FORMAT_HAS,
    REQUIRED,
    ZEROS,
    CheckpointError,
    CheckpointSchema,
    Split,
    Stack,
    Target,
    TensorSpec,
    mtp_schema,
    pt_schema,
)
from vllm_ernie45.config import ErnieArch
from vllm_ernie45.expert_layout import FusedExpertLayout
from vllm_ernie45.quantized import checkpoint_is_quantized, map_names, shape_matches, specialise

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


def initial_physical_to_logical(num_logical: int, num_redundant: int) -> list[int]:
    """EPLB's initial placement: physical expert p holds logical expert p for p < E, then
    the redundant copies wrap around (p % E). Same rule as vLLM's EplbState in 0.26-0.34
    (tests/test_config_and_schema.py compares the two)."""
    return [p % num_logical for p in range(num_logical + num_redundant)]


def _physical_slots(
    model: nn.Module, arch: ErnieArch, layout: FusedExpertLayout | None = None
) -> dict[int, list[int]]:
    """Logical expert id -> the fused-MoE slots that hold it. With shared experts fused in,
    ``layout`` places routed expert ``e`` and shared slice ``E + j`` (their slots interleave
    under expert parallelism, vllm_ernie45.expert_layout); otherwise EPLB's placement
    (redundant copies; never together with fused shared experts)."""
    slots: dict[int, list[int]] = defaultdict(list)
    if layout is not None:
        for expert in range(arch.num_experts):
            slots[expert] = [layout.routed_slot(expert)]
        for shared in range(arch.num_shared_experts):
            slots[arch.num_experts + shared] = [layout.shared_slot(shared)]
        return slots
    redundant = getattr(model, "num_redundant_experts", 0) or 0
    if arch.num_experts:
        for physical, logical in enumerate(
            initial_physical_to_logical(arch.num_experts, redundant)
        ):
            slots[logical].append(physical)
    return slots


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


def tensor_kind(name: str) -> str:
    """``name`` with its layer and expert numbers wildcarded: the same tensor of every layer
    (``model.layers.*.mlp.experts.*.up_proj.weight_scale``)."""
    return re.sub(r"\.\d+(?=\.)", ".*", name)


def _listed(names: list[str]) -> str:
    """``"3 tensor(s): 'a', 'b', 'c'"`` (at most _MAX_LISTED named)."""
    listed = ", ".join(repr(n) for n in names[:_MAX_LISTED])
    more = f" and {len(names) - _MAX_LISTED} more" if len(names) > _MAX_LISTED else ""
    return f"{len(names)} tensor(s): {listed}{more}"


def _to_model_shape(name: str, tensor: torch.Tensor, spec: TensorSpec) -> torch.Tensor:
    """``tensor`` in the shape the model takes: as stored, or through the transform of the
    stored form it has; otherwise a CheckpointError naming both shapes."""
    stored = _shape(tensor)
    if spec.shape is None or stored == spec.shape:
        return tensor
    if None in spec.shape and shape_matches(stored, spec.shape):
        return tensor
    transform = spec.transform_for(stored)
    if transform is None:
        if None in spec.shape:
            implied = [s if s is not None else "*" for s in spec.shape]
            raise CheckpointError(
                f"checkpoint tensor {name!r} has shape {list(stored)}, but the model config "
                f"and the checkpoint's quantization imply [{', '.join(map(str, implied))}]"
            )
        raise CheckpointError(
            f"checkpoint tensor {name!r} has shape {list(stored)}, but the model config "
            f"implies {list(spec.shape)}"
        )
    logger.info_once(
        "Checkpoint tensor %s is stored as %s; %s to %s.",
        name, str(list(stored)), type(transform).__name__.lower(), str(list(spec.shape)),
    )
    return transform.apply(tensor, spec.shape)


def _place(
    param: nn.Parameter,
    param_path: str,
    tensor: torch.Tensor,
    place: Stack | Split | None,
    slots: dict[int, list[int]],
) -> bool:
    """Load ``tensor`` into ``param`` as ``place`` says; False where it belongs to experts that
    live on other expert-parallel ranks."""
    if place is None:
        getattr(param, "weight_loader", default_weight_loader)(param, tensor)
        return True
    if isinstance(place, Stack) and place.expert is None:
        param.weight_loader(param, tensor, place.shard)
        return True
    if isinstance(place, Split):
        pieces = [
            (place.first_expert + j, piece.contiguous())
            for j, piece in enumerate(tensor.chunk(place.pieces, dim=place.dim))
        ]
    else:
        pieces = [(place.expert, tensor)]
    loaded = False
    for expert, weight in pieces:
        for physical in slots[expert]:  # every slot EPLB gives this logical expert
            loaded |= bool(
                param.weight_loader(
                    param,
                    weight,
                    weight_name=param_path,
                    shard_id=place.shard,
                    expert_id=physical,
                    return_success=True,
                )
            )
    return loaded


def _place_checked(
    name: str,
    tensor: torch.Tensor,
    found: tuple[str, nn.Parameter],
    place: Stack | Split | None,
    slots: dict[int, list[int]],
) -> bool:
    """:func:`_place`, with what vLLM's weight loader refuses (a tensor that does not fit the
    parameter's slice) reported as a CheckpointError naming the tensor."""
    path, param = found
    try:
        return _place(param, path, tensor, place, slots)
    except (AssertionError, RuntimeError, ValueError, IndexError) as err:
        raise CheckpointError(
            f"checkpoint tensor {name!r} (shape {list(tensor.shape)}, {tensor.dtype}) does not "
            f"fit parameter {path} (shape {list(param.shape)}, {param.dtype}): "
            f"{type(err).__name__}: {err}"
        ) from err


def _param_of(model: nn.Module, target: Target) -> tuple[str, nn.Parameter] | None:
    """(dotted path, parameter) of ``target``, or None where another pipeline stage holds it."""
    module = _local_module(model, target.module)
    if module is None:
        return None
    param_name, param = _find_param(module, target.module, target.param)
    return f"{target.module}.{param_name}", param


def load_with_schema(
    model: nn.Module,
    schema: CheckpointSchema,
    weights: Iterable[tuple[str, torch.Tensor]],
    slots: dict[int, list[int]] | None = None,
) -> set[str]:
    """Load ``weights`` into ``model`` as ``schema`` says; return the parameters filled.

    An unlisted tensor the schema does not skip, a duplicate, a shape no stored form of the
    tensor has, or a REQUIRED tensor the checkpoint lacks is a CheckpointError naming it."""
    seen: set[str] = set()
    loaded: set[str] = set()
    skipped: list[str] = []
    model_dir = str(getattr(getattr(model, "config", None), "_name_or_path", "") or "")
    for name, tensor in _readable(weights, model_dir):
        spec = schema.tensors.get(name)
        if spec is None:
            if schema.skips(name):
                skipped.append(name)
                continue
            raise CheckpointError(schema.unexpected.format(name=name, shape=list(tensor.shape)))
        if name in seen:
            raise CheckpointError(f"checkpoint tensor {name!r} appears more than once")
        seen.add(name)
        tensor = _to_model_shape(name, tensor, spec)
        found = _param_of(model, spec.target) if spec.target is not None else None
        if found is not None and _place_checked(name, tensor, found, spec.place, slots or {}):
            loaded.add(found[0])

    absent = [n for n in schema.tensors if n not in seen]
    kinds = {tensor_kind(n) for n in seen}
    missing = [
        n
        for n in absent
        if schema.tensors[n].if_absent == REQUIRED
        or (schema.tensors[n].if_absent == IF_FORMAT_HAS and tensor_kind(n) in kinds)
    ]
    if missing:
        raise CheckpointError(schema.missing.format(missing=_listed(missing)))
    zeroed = [n for n in absent if schema.tensors[n].if_absent == ZEROS]
    for name in zeroed:
        found = _param_of(model, schema.tensors[name].target)
        if found is not None:
            found[1].data.zero_()
            loaded.add(found[0])
    if zeroed and schema.zeros_note:
        logger.info(schema.zeros_note.format(count=len(zeroed), first=zeroed[0]))
    if skipped and schema.skip_note:
        logger.info(schema.skip_note.format(count=len(skipped), first=skipped[0]))
    return loaded


def load_checkpoint(
    model: nn.Module,
    arch: ErnieArch,
    weights: Iterable[tuple[str, torch.Tensor]],
    fused_layout: FusedExpertLayout | None = None,
) -> set[str]:
    """Load a -PT checkpoint (:func:`vllm_ernie45.checkpoint.pt_schema`) into the main model;
    ``fused_layout``: the MoE layers run their shared experts inside the fused call."""
    schema = pt_schema(arch, fused_shared=fused_layout is not None)
    quant_config = getattr(model, "quant_config", None)
    dropped: list[str] = []
    if quant_config is not None and checkpoint_is_quantized(getattr(model, "config", None)):
        # A pre-quantized checkpoint: its tensors are those of the parameters vLLM's
        # quantization methods registered, under vLLM's name mapping for the format.
        schema = specialise(schema, model, quant_config)
        weights = map_names(weights, quant_config, dropped)
    loaded = load_with_schema(model, schema, weights, _physical_slots(model, arch, fused_layout))
    if dropped:
        logger.info(
            "Set aside %d checkpoint tensor(s) the %s quantization does not use (%s, ...).",
            len(dropped), quant_config.get_name(), dropped[0],
        )
    return loaded


def load_mtp_checkpoint(
    model: nn.Module, arch: ErnieArch, weights: Iterable[tuple[str, torch.Tensor]]
) -> set[str]:
    """Load the MTP head (:func:`vllm_ernie45.checkpoint.mtp_schema`) into the draft ``model``
    from the whole -PT checkpoint (vLLM hands a draft every tensor of the target's checkpoint)."""
    return load_with_schema(model, mtp_schema(arch), weights)
