"""Pre-quantized checkpoints: the -PT schema specialised to the parameters vLLM's quantization
methods registered on the model.

A quantized checkpoint stores a linear layer ``X`` not as ``X.weight`` but as the tensors of
its format -- ``X.weight_packed`` / ``X.weight_scale`` / ``X.weight_zero_point`` /
``X.weight_shape`` (compressed-tensors pack-quantized), ``X.weight`` int8 or fp8 +
``X.weight_scale`` (+ ``X.input_scale``), ``X.qweight`` / ``X.qzeros`` / ``X.scales`` /
``X.g_idx`` (GPTQ, AWQ) ... The names are not listed here: the quantization method vLLM chose
for the layer registered one parameter per stored tensor, so :func:`specialise` takes each
linear weight of the schema (:attr:`vllm_ernie45.checkpoint.TensorSpec.linear`) and, where its
target layer registered more than ``weight``, replaces it by one spec per registered parameter:

* a linear layer's parameter ``p`` is checkpoint tensor ``X.p``, placed as ``X.weight`` was
  (the same q/k/v or gate/up shard): vLLM's own ``weight_loader`` of ``p`` puts it there;
* a fused-MoE parameter ``w13_p`` is ``experts.{e}.gate_proj.p`` and ``experts.{e}.up_proj.p``
  (shards w1 / w3), ``w2_p`` is ``experts.{e}.down_proj.p``, each placed by the fused-MoE
  weight loader with its expert id, as vLLM's ``make_expert_params_mapping`` maps them;
* a registered parameter is required where the checkpoint stores the same tensor
  (``weight_zero_point``, ``input_scale``, ``g_idx`` ... of the same projection) for another
  layer or expert, and otherwise left
  to vLLM, which fills what a format does not store (``g_idx_sort_indices``; ``g_idx`` without
  activation ordering, as vLLM 0.26's GPTQ-Marlin / compressed-tensors MoE methods register
  them): a layer lacking a tensor the others have is an error, as vLLM's loader is lenient
  about quantized parameters altogether;
* names vLLM's quantization config maps away (its ``get_checkpoint_weight_mapper``: e.g. an
  unused ``g_idx``) are not expected; names it renames (its ``get_cache_scale_mapper``:
  ``self_attn.k_proj.k_scale`` -> ``self_attn.attn.k_scale``) are renamed before the schema
  sees them. The attention layer's kv-cache scales are optional (vLLM defaults them to 1).

The expected shape of a quantized tensor follows from its parameter's own metadata (vLLM's
``output_dim`` / ``input_dim``): the parameter holds ``n`` entries per output row (per input
column) of this rank's share of the layer, so the checkpoint's shard holds ``n`` per row of
its logical ``[out, in]`` weight. Dimensions without such metadata, and the fused-MoE
parameters, are left to vLLM's weight loader, whose failures are reported as a
:class:`CheckpointError` naming the tensor.

A router (``mlp.gate``) stored quantized is refused: vLLM, as the reference, runs ERNIE's
router in fp32 and builds it without a quantization method.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from fractions import Fraction
from typing import Any

import torch
from torch import nn

from vllm_ernie45.checkpoint import (
    IF_FORMAT_HAS,
    OPTIONAL,
    CheckpointError,
    CheckpointSchema,
    Reshape,
    Stack,
    Target,
    TensorSpec,
)

# The fused-MoE parameter prefix of each expert shard (vLLM's make_expert_params_mapping).
_EXPERT_PARAM_PREFIX = {"w1": "w13_", "w3": "w13_", "w2": "w2_"}


def checkpoint_is_quantized(hf_config: Any) -> bool:
    """Whether the checkpoint itself is quantized (its config.json has a
    ``quantization_config``), as opposed to online quantization of a bf16 checkpoint."""
    return bool(getattr(hf_config, "quantization_config", None))


def _mapper(quant_config: Any):
    """vLLM's checkpoint-name mapper for ``quant_config`` (kv-cache scale names, metadata its
    kernels do not use), as ``AutoWeightsLoader`` applies it; None where this vLLM has none."""
    mappers = [
        getter()
        for getter in (
            getattr(quant_config, "get_cache_scale_mapper", None),
            getattr(quant_config, "get_checkpoint_weight_mapper", None),
        )
        if getter is not None
    ]
    if not mappers:
        return None
    mapper = mappers[0]
    for other in mappers[1:]:
        mapper = mapper | other
    return mapper


def map_names(weights: Iterable[tuple[str, torch.Tensor]], quant_config: Any, dropped: list[str]):
    """``weights`` with vLLM's quantization-config name mapping applied; the names it maps
    away are appended to ``dropped``."""
    mapper = _mapper(quant_config)
    # vLLM without the mappers (older than the 0.32 this was written on): its per-name
    # kv-cache scale hook, where it has one. (Not run on those versions yet.)
    cache_scale = getattr(quant_config, "get_cache_scale", None) if mapper is None else None
    for name, tensor in weights:
        if mapper is not None:
            new = mapper._map_name(name)
        else:
            new = (cache_scale(name) if cache_scale is not None else None) or name
        if new is None:
            dropped.append(name)
            continue
        yield new, tensor


def _dropped_by_mapper(quant_config: Any, name: str) -> bool:
    mapper = _mapper(quant_config)
    return mapper is not None and mapper._map_name(name) is None


def _module(model: nn.Module, path: str) -> nn.Module | None:
    from vllm_ernie45.loader import _local_module

    return _local_module(model, path)


def _params(module: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters of ``module`` by local name (a fused-MoE runner's child, a LoRA
    wrapper's ``base_layer`` included)."""
    found: dict[str, nn.Parameter] = {}
    for name, param in module.named_parameters():
        if "lora" in name:
            continue
        found.setdefault(name.rsplit(".", 1)[-1], param)
    return found


def _is_per_tensor(param: nn.Parameter) -> bool:
    return type(param).__name__ == "PerTensorScaleParameter"


def _linear_shape(param: nn.Parameter, layer: nn.Module, logical: tuple[int, int]):
    """The checkpoint shape of one shard of ``param`` (a vLLM parameter of linear ``layer``),
    whose logical weight is ``logical`` = (out, in): ``None`` in a dimension vLLM's loader
    checks itself."""
    if _is_per_tensor(param):
        return (1,)
    out_dim, in_dim = getattr(param, "output_dim", None), getattr(param, "input_dim", None)
    local_out = getattr(layer, "output_size_per_partition", None)
    local_in = getattr(layer, "input_size_per_partition", None)
    if out_dim is None and in_dim is None:
        return tuple(param.shape)
    shape: list[int | None] = [None] * param.dim()
    for dim, full, local in ((out_dim, logical[0], local_out), (in_dim, logical[1], local_in)):
        if dim is None or not local:
            continue
        per = Fraction(param.shape[dim], local)
        size = full * per
        shape[dim] = int(size) if size.denominator == 1 else None
    return tuple(shape)


def shape_matches(stored: tuple[int, ...], shape: tuple[int | None, ...]) -> bool:
    return len(stored) == len(shape) and all(s is None or s == t for t, s in zip(stored, shape))


def _router_prefixes(schema: CheckpointSchema) -> list[str]:
    return [n.removesuffix("weight") for n in schema.tensors if n.endswith(".mlp.gate.weight")]


def refuse_quantized_router(name: str, routers: list[str]) -> None:
    for prefix in routers:
        if name.startswith(prefix) and name != prefix + "weight":
            raise CheckpointError(
                f"checkpoint tensor {name!r}: the MoE router ({prefix}weight) is stored "
                "quantized. vLLM runs ERNIE 4.5's router in fp32 without a quantization "
                "method (as the reference does); quantize the checkpoint again with the "
                "router ignored (llm-compressor: ignore=['lm_head', 're:.*mlp.gate$'])"
            )


def specialise(schema: CheckpointSchema, model: nn.Module, quant_config: Any) -> CheckpointSchema:
    """``schema`` with every linear weight whose layer vLLM quantized replaced by the
    tensors of that layer's registered parameters, and the attention layers' kv-cache
    scales (optional) added."""
    tensors: dict[str, TensorSpec] = {}
    for name, spec in schema.tensors.items():
        if spec.linear is None or spec.target is None:
            tensors[name] = spec
            continue
        module = _module(model, spec.target.module)
        if module is None:  # another pipeline stage's
            tensors[name] = spec
            continue
        params = _params(module)
        stem = name.removesuffix(".weight")
        place = spec.place
        if isinstance(place, Stack) and place.expert is not None:
            prefix = _EXPERT_PARAM_PREFIX[str(place.shard)]
            own = {p.removeprefix(prefix): p for p in params if p.startswith(prefix)}
            if set(own) == {"weight"}:
                tensors[name] = spec
                continue
            for suffix, param_name in own.items():
                ckpt = f"{stem}.{suffix}"
                if _dropped_by_mapper(quant_config, ckpt):
                    continue
                tensors[ckpt] = TensorSpec(
                    None, Target(spec.target.module, param_name), place, if_absent=IF_FORMAT_HAS
                )
            continue
        if getattr(place, "pieces", None) is not None:  # Split: fused shared experts
            own = [p for p in params if p.startswith(_EXPERT_PARAM_PREFIX[place.shard])]
            if any(not p.endswith("_weight") for p in own):
                raise RuntimeError(
                    "vllm-ernie45 internal error: shared experts fused into quantized experts "
                    f"({spec.target.module}); they run beside the fused call for a quantized checkpoint"
                )
            tensors[name] = spec
            continue
        own = {p: param for p, param in params.items() if p != "bias"}
        if set(own) == {"weight"}:
            tensors[name] = spec
            continue
        for suffix, param in own.items():
            ckpt = f"{stem}.{suffix}"
            if _dropped_by_mapper(quant_config, ckpt):
                continue
            shape = _linear_shape(param, module, spec.linear)
            stored_as = (Reshape(()),) if shape == (1,) else ()
            tensors[ckpt] = TensorSpec(
                shape, Target(spec.target.module, suffix), place, stored_as, if_absent=IF_FORMAT_HAS
            )
    # kv-cache (and attention) scales: optional, vLLM defaults them.
    for name, spec in schema.tensors.items():
        if spec.target is None or not name.endswith(".self_attn.q_proj.weight"):
            continue
        attn_path = name.removesuffix(".q_proj.weight") + ".attn"
        attn = _module(model, attn_path)
        if attn is None:
            continue
        for pname, param in attn.named_parameters(recurse=False):
            tensors[f"{attn_path}.{pname}"] = TensorSpec(
                None, Target(attn_path, pname), None, if_absent=OPTIONAL
            )
    routers = _router_prefixes(schema)
    skips = schema.skips
    # Attention scales vLLM does not register for this format: it ignores them too.
    ignorable = tuple(getattr(quant_config, "_ignore_unexpected_suffixes", ()))

    def skip(name: str) -> bool:
        refuse_quantized_router(name, routers)
        return skips(name) or (bool(ignorable) and ".self_attn." in name and name.endswith(ignorable))

    return dataclasses.replace(schema, tensors=tensors, skips=skip)


__all__ = [
    "checkpoint_is_quantized",
    "map_names",
    "refuse_quantized_router",
    "shape_matches",
    "specialise",
]
