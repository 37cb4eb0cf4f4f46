"""Config keys a checkpoint's config.json leaves out, decided from its tensors.

transformers fills an absent key with its config class's default, the 21B-A3B's values: an
absent ``moe_num_shared_experts`` becomes 2, so a 300B-A47B checkpoint (no shared experts)
whose config.json omits the key -- the published 300B-A47B configs do -- would be built with
shared experts it has no weights for (vLLM #21713, transformers #39719). Where config.json
lacks a key whose default could change the model, the checkpoint's tensors decide it:

=============================  ==============================================================
``moe_num_shared_experts``     output features of a shared expert's ``gate_proj`` /
                               ``moe_intermediate_size`` (0 where there are no shared-expert
                               tensors)
``moe_layer_start_index``,     the layers that have a router (``mlp.gate.weight``): the first,
``moe_layer_end_index``,       the last, and the smallest interval that gives exactly those
``moe_layer_interval``         layers
``use_bias``                   whether ``q_proj`` has a bias
``tie_word_embeddings``        False where the checkpoint has an ``lm_head.weight`` of its own
``head_dim``                   output features of ``q_proj`` / ``num_attention_heads``
``num_key_value_heads``        output features of ``k_proj`` / ``head_dim``
=============================  ==============================================================

A layer's output features are read from its weight as stored, plain or quantized
(:func:`linear_rows`: ``weight``, compressed-tensors ``weight_packed``, GPTQ / AWQ ``scales``).

:func:`resolve_hf_config` runs where vLLM builds the model: it checks the raw config.json
(required keys) and the shards the safetensors index names, decides the absent keys from the
safetensors headers (no tensor data is read), sets them on the HF config vLLM loaded, so every
reader agrees, and logs the decisions once.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from vllm_ernie45.checkpoint import LM_HEAD, attention_tensor, router_tensor, shared_experts_tensor
from vllm_ernie45.config import ErnieConfigError, check_raw_config, is_moe_config

# Keys :func:`decide_absent_keys` decides when config.json lacks them.
DECIDED_KEYS = (
    "head_dim",
    "num_key_value_heads",
    "use_bias",
    "tie_word_embeddings",
    "moe_num_shared_experts",
    "moe_layer_start_index",
    "moe_layer_end_index",
    "moe_layer_interval",
)
_MOE_LAYER_KEYS = ("moe_layer_start_index", "moe_layer_end_index", "moe_layer_interval")


@dataclass(frozen=True)
class Decision:
    key: str
    value: Any
    evidence: str  # what in the checkpoint's tensors says so


# How a linear layer's weight is stored: plain (bf16, int8, fp8 ``[out, in]``), packed by
# compressed-tensors (``[out, in / pack]``), or as GPTQ / AWQ ``qweight`` (whose ``scales``,
# ``[in / group, out]``, give the output size).
_WEIGHT_FORMS = ("weight", "weight_packed", "qweight")


def _has_linear(shapes: Mapping[str, tuple[int, ...]], name: str) -> bool:
    """Whether the checkpoint stores the weight ``name`` (``X.weight``) in any of its forms."""
    stem = name.removesuffix(".weight")
    return any(f"{stem}.{form}" in shapes for form in _WEIGHT_FORMS)


def linear_rows(shapes: Mapping[str, tuple[int, ...]], name: str) -> tuple[str, int] | None:
    """(the tensor that tells, output features) of the linear layer whose weight is ``name``
    (``X.weight``), stored plain or quantized (:data:`_WEIGHT_FORMS`); None where the
    checkpoint has no weight of it."""
    stem = name.removesuffix(".weight")
    for form in ("weight", "weight_packed"):
        shape = shapes.get(f"{stem}.{form}")
        if shape is not None:
            return f"{stem}.{form}", shape[0]
    scales = shapes.get(f"{stem}.scales")
    if f"{stem}.qweight" in shapes:
        if scales is None or len(scales) != 2:
            raise ErnieConfigError(
                f"the checkpoint has {stem}.qweight but no 2-D {stem}.scales (GPTQ / AWQ), so "
                "its output size is unknown; set the config.json keys decided from it "
                "(vllm_ernie45.config_from_tensors) explicitly"
            )
        return f"{stem}.scales", scales[1]
    return None


def _rows_per(shapes: Mapping[str, tuple[int, ...]], name: str, per: int, key: str, unit: str) -> int | None:
    """Output features of the linear layer whose weight is ``name`` (plain or quantized,
    :func:`linear_rows`) divided by ``per`` (None where the layer is absent)."""
    found = linear_rows(shapes, name)
    if found is None:
        return None
    tensor, rows = found
    if rows % per:
        raise ErnieConfigError(
            f"config.json has no {key!r}, and the checkpoint cannot decide it: {tensor} gives "
            f"{rows} output features, not a multiple of {unit}={per}"
        )
    return rows // per


def _moe_layers(raw: dict[str, Any], layers: list[int], num_layers: int) -> list[Decision]:
    """The absent ones of start / end / interval that make the MoE layers exactly ``layers``
    (the reference's rule: ``start <= i <= end and (i + 1) % interval == 0``)."""
    start = raw.get("moe_layer_start_index", layers[0])
    end = raw.get("moe_layer_end_index", layers[-1])
    end = num_layers - 1 if end is None or end < 0 else end

    def implied(interval: int) -> list[int]:
        return [i for i in range(num_layers) if start <= i <= end and (i + 1) % interval == 0]

    candidates = [raw["moe_layer_interval"]] if "moe_layer_interval" in raw else range(1, num_layers + 1)
    interval = next((k for k in candidates if implied(k) == layers), None)
    if interval is None:
        given = {k: raw[k] for k in _MOE_LAYER_KEYS if k in raw}
        raise ErnieConfigError(
            f"the checkpoint's MoE layers (those with a router: {layers}) fit no "
            f"moe_layer_start_index / moe_layer_end_index / moe_layer_interval with config.json's "
            f"{given or 'none of them'}"
        )
    evidence = f"routers in layers {layers[0]}..{layers[-1]} ({len(layers)} layers)"
    values = {"moe_layer_start_index": start, "moe_layer_end_index": end, "moe_layer_interval": interval}
    return [Decision(k, values[k], evidence) for k in _MOE_LAYER_KEYS if k not in raw]


def decide_absent_keys(raw: dict[str, Any], shapes: Mapping[str, tuple[int, ...]]) -> list[Decision]:
    """Decisions for the :data:`DECIDED_KEYS` that ``raw`` (a config.json) lacks, from the
    checkpoint's tensor ``shapes``; a key whose tensors are absent is left undecided."""
    decisions: list[Decision] = []
    heads = raw["num_attention_heads"]
    head_dim = raw.get("head_dim")
    if head_dim is None:
        head_dim = _rows_per(shapes, attention_tensor(0, "q"), heads, "head_dim", "num_attention_heads")
        if head_dim is not None:
            decisions.append(Decision("head_dim", head_dim, f"q_proj has {head_dim * heads} rows"))
    head_dim = head_dim or raw["hidden_size"] // heads
    if "num_key_value_heads" not in raw:
        kv = _rows_per(shapes, attention_tensor(0, "k"), head_dim, "num_key_value_heads", "head_dim")
        if kv is not None:
            decisions.append(Decision("num_key_value_heads", kv, f"k_proj has {kv * head_dim} rows"))
    if "use_bias" not in raw and _has_linear(shapes, attention_tensor(0, "q")):
        has_bias = attention_tensor(0, "q", "bias") in shapes
        decisions.append(Decision("use_bias", has_bias, f"q_proj {'has' if has_bias else 'has no'} bias"))
    if "tie_word_embeddings" not in raw and shapes:
        own_head = _has_linear(shapes, LM_HEAD)
        decisions.append(
            Decision("tie_word_embeddings", not own_head, f"{LM_HEAD} {'present' if own_head else 'absent'}")
        )
    if not is_moe_config(raw):
        return decisions

    num_layers = raw["num_hidden_layers"]
    layers = [i for i in range(num_layers) if router_tensor(i) in shapes]
    if not layers:
        return decisions
    if "moe_num_shared_experts" not in raw:
        inter = raw["moe_intermediate_size"]
        shared = [shared_experts_tensor(i) for i in layers if _has_linear(shapes, shared_experts_tensor(i))]
        count = _rows_per(shapes, shared[0], inter, "moe_num_shared_experts", "moe_intermediate_size") if shared else 0
        evidence = (
            f"{linear_rows(shapes, shared[0])[0]} gives {count * inter} output features"
            if shared
            else "no shared-expert tensors"
        )
        decisions.append(Decision("moe_num_shared_experts", count, evidence))
    if any(k not in raw for k in _MOE_LAYER_KEYS):
        decisions += _moe_layers(raw, layers, num_layers)
    return decisions


def describe(decisions: list[Decision], filled: Any) -> str:
    """One line: each decision, its evidence, and what transformers had filled in."""
    parts = []
    for d in decisions:
        default = getattr(filled, d.key, None) if filled is not None else None
        was = f"; transformers' default: {default}" if default is not None and default != d.value else ""
        parts.append(f"{d.key}={d.value} ({d.evidence}{was})")
    keys = ", ".join(d.key for d in decisions)
    return f"config.json has no {keys}: decided from the checkpoint's tensors: " + ", ".join(parts)


def _hf_overrides(model_config: Any) -> dict[str, Any]:
    overrides = getattr(model_config, "hf_overrides", None)
    return overrides if isinstance(overrides, dict) else {}


def resolve_hf_config(model_config: Any, load_format: Any = None) -> Any:
    """vLLM's HF config of ``model_config`` after the checks and decisions this module
    describes (the same object, with decided keys set on it).

    Nothing is decided for a dummy load (no weights: the config is all there is) or where the
    checkpoint has no readable tensors (a warning; the strict loader then names whatever does
    not fit); a key given through vLLM's ``hf_overrides`` is not decided either."""
    from vllm.logger import init_logger

    from vllm_ernie45.checkpoint_files import CheckpointLocation, read_raw_config, shard_files, tensor_shapes

    logger = init_logger("vllm.ernie45.config")
    config = model_config.hf_config
    location = CheckpointLocation(str(model_config.model), getattr(model_config, "revision", None))
    found = read_raw_config(location)
    if found is None:
        return config
    raw, path = found
    check_raw_config(raw, path)
    if location.local_dir is not None:
        shard_files(location.local_dir)  # a shard the index names but the folder lacks: one error
    absent = [k for k in DECIDED_KEYS if k not in raw and k not in _hf_overrides(model_config)]
    if not absent or str(getattr(load_format, "value", load_format)) == "dummy":
        return config
    shapes = tensor_shapes(location)
    if not shapes:
        logger.warning_once(
            "config.json has no %s and %s has no safetensors files to decide them from: "
            "transformers' defaults apply.", ", ".join(absent), location.model,
        )
        return config
    decisions = [d for d in decide_absent_keys(raw, shapes) if d.key in absent]
    if decisions:
        logger.info_once(describe(decisions, config))
        for d in decisions:
            setattr(config, d.key, d.value)
    return config
