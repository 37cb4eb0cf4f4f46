"""ERNIE 4.5 architecture facts read from a HF config, whatever style it was written in.

Real hub checkpoints write legacy keys (``rope_theta`` at top level, ``moe_capacity``,
``moe_gate``, ``moe_use_aux_free``, ``num_nextn_predict_layers``, no ``moe_layer_end_index``);
transformers >= 5 writes ``rope_parameters`` and fills ``moe_layer_end_index``. Everything the
model and the loader need is resolved here once, into :class:`ErnieArch`, with a clear error
naming the key when a required one is missing or has an impossible value.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

DEFAULT_ROPE_THETA = 500000.0
DEFAULT_MOE_NORM_MIN = 1e-12

_REQUIRED_KEYS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "vocab_size",
    "intermediate_size",
    "rms_norm_eps",
)
_REQUIRED_MOE_KEYS = ("moe_k", "moe_intermediate_size")


class ErnieConfigError(ValueError):
    """A config that cannot describe an ERNIE 4.5 model; the message names the key."""


def _get(config: Any, key: str, default: Any = None) -> Any:
    if isinstance(config, dict):
        return config.get(key, default)
    return getattr(config, key, default)


def _scalar(value: Any, key: str) -> Any:
    # ERNIE-VL writes per-modality lists (e.g. moe_num_experts: [64, 64]); the text
    # models are the first entry. A text checkpoint always has a scalar here.
    if isinstance(value, (list, tuple)):
        if not value:
            raise ErnieConfigError(f"config key {key!r} is an empty list")
        return value[0]
    return value


def rope_theta_of(config: Any) -> float:
    """``rope_parameters['rope_theta']`` (transformers >= 5) or top-level ``rope_theta``."""
    params = _get(config, "rope_parameters")
    if isinstance(params, dict) and params.get("rope_theta") is not None:
        return float(params["rope_theta"])
    theta = _get(config, "rope_theta")
    return float(theta) if theta is not None else DEFAULT_ROPE_THETA


def rope_scaling_of(config: Any) -> dict[str, Any] | None:
    """A non-default rope type (e.g. yarn), or None for ERNIE's plain RoPE."""
    params = _get(config, "rope_parameters") or _get(config, "rope_scaling")
    if not isinstance(params, dict):
        return None
    rope_type = params.get("rope_type", params.get("type", "default"))
    return None if rope_type in (None, "default") else dict(params)


def rope_parameters_for(arch: ErnieArch, hf_config: Any) -> dict[str, Any]:
    """vLLM's ``rope_parameters`` for ``get_rope``: the config's rope type (default: plain
    RoPE) with the resolved ``rope_theta``."""
    params = rope_scaling_of(hf_config) or {"rope_type": "default"}
    params["rope_theta"] = arch.rope_theta
    return params


@dataclass(frozen=True)
class ErnieArch:
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    intermediate_size: int
    rms_norm_eps: float
    use_bias: bool
    tie_word_embeddings: bool
    max_position_embeddings: int
    rope_theta: float
    hidden_act: str
    # MoE (num_experts == 0 means a dense model such as ERNIE-4.5-0.3B)
    num_experts: int = 0
    top_k: int = 0
    moe_intermediate_size: int = 0
    num_shared_experts: int = 0
    moe_layer_start: int = 0
    moe_layer_end: int = -1
    moe_layer_interval: int = 1
    moe_norm_min: float = DEFAULT_MOE_NORM_MIN
    # False (legacy key ``moe_use_aux_free``): trained without the expert-selection
    # correction bias; a checkpoint without it has a zero bias.
    moe_use_aux_free: bool = True
    num_mtp_layers: int = 0
    # HF's Ernie4_5_MoeForCausalLM gives the LM head a bias when use_bias is set (the dense
    # Ernie4_5ForCausalLM never does); it applies to tied heads too.
    lm_head_bias: bool = False

    def is_moe_layer(self, layer_idx: int) -> bool:
        return (
            self.num_experts > 0
            and self.moe_layer_start <= layer_idx <= self.moe_layer_end
            and (layer_idx + 1) % self.moe_layer_interval == 0
        )

    @property
    def moe_layer_indices(self) -> list[int]:
        return [i for i in range(self.num_layers) if self.is_moe_layer(i)]

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def shared_intermediate_size(self) -> int:
        return self.moe_intermediate_size * self.num_shared_experts


def _positive_int(config: Any, key: str, default: Any = None) -> int:
    value = _scalar(_get(config, key, default), key)
    if value is None:
        raise ErnieConfigError(f"ERNIE 4.5 config is missing required key {key!r}")
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ErnieConfigError(f"config key {key!r} must be a positive integer, got {value!r}")
    return value


def is_moe_config(raw: dict[str, Any]) -> bool:
    return bool(raw.get("moe_num_experts")) or raw.get("model_type") == "ernie4_5_moe"


def check_raw_config(raw: dict[str, Any], path: str) -> None:
    """Check a checkpoint's own config.json (``raw``, read from ``path``) for the keys ERNIE
    needs and no tensor can tell: transformers would fill a missing one with the 21B-A3B
    default, which would surface later as a confusing tensor-shape mismatch."""
    required = _REQUIRED_KEYS + (("moe_num_experts",) + _REQUIRED_MOE_KEYS if is_moe_config(raw) else ())
    missing = [key for key in required if key not in raw]
    if missing:
        raise ErnieConfigError(
            f"{path} is missing required ERNIE 4.5 key(s) {', '.join(map(repr, missing))}"
        )


def arch_from_config(config: Any) -> ErnieArch:
    """Resolve an HF config object (or plain dict) into :class:`ErnieArch`."""
    for key in _REQUIRED_KEYS:
        if _get(config, key) is None:
            raise ErnieConfigError(f"ERNIE 4.5 config is missing required key {key!r}")

    hidden = _positive_int(config, "hidden_size")
    num_layers = _positive_int(config, "num_hidden_layers")
    num_heads = _positive_int(config, "num_attention_heads")
    num_kv_heads = _positive_int(config, "num_key_value_heads", num_heads)
    head_dim = _get(config, "head_dim") or hidden // num_heads
    if num_heads % num_kv_heads:
        raise ErnieConfigError(
            f"num_attention_heads={num_heads} is not a multiple of "
            f"num_key_value_heads={num_kv_heads}"
        )
    hidden_act = _get(config, "hidden_act", "silu")
    if hidden_act != "silu":
        raise ErnieConfigError(f"config key 'hidden_act' must be 'silu', got {hidden_act!r}")

    num_experts = _scalar(_get(config, "moe_num_experts", 0) or 0, "moe_num_experts")
    moe: dict[str, Any] = {}
    if num_experts:
        for key in _REQUIRED_MOE_KEYS:
            if _get(config, key) is None:
                raise ErnieConfigError(
                    f"ERNIE 4.5 MoE config (moe_num_experts={num_experts}) is missing "
                    f"required key {key!r}"
                )
        top_k = _positive_int(config, "moe_k")
        if top_k > num_experts:
            raise ErnieConfigError(f"moe_k={top_k} exceeds moe_num_experts={num_experts}")
        end = _get(config, "moe_layer_end_index")
        end = num_layers - 1 if end is None or _scalar(end, "moe_layer_end_index") < 0 else end
        interval = _positive_int(config, "moe_layer_interval", 1)
        norm_min = _get(config, "moe_norm_min")
        moe = dict(
            num_experts=int(num_experts),
            top_k=top_k,
            moe_intermediate_size=_positive_int(config, "moe_intermediate_size"),
            num_shared_experts=int(_get(config, "moe_num_shared_experts", 0) or 0),
            moe_layer_start=int(
                _scalar(_get(config, "moe_layer_start_index", 0), "moe_layer_start_index") or 0
            ),
            moe_layer_end=int(_scalar(end, "moe_layer_end_index")),
            moe_layer_interval=interval,
            moe_norm_min=float(norm_min) if norm_min is not None else DEFAULT_MOE_NORM_MIN,
            moe_use_aux_free=bool(_get(config, "moe_use_aux_free", True)),
        )

    return ErnieArch(
        hidden_size=hidden,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=int(head_dim),
        vocab_size=_positive_int(config, "vocab_size"),
        intermediate_size=_positive_int(config, "intermediate_size"),
        rms_norm_eps=float(_get(config, "rms_norm_eps")),
        use_bias=bool(_get(config, "use_bias", False)),
        tie_word_embeddings=bool(_get(config, "tie_word_embeddings", True)),
        max_position_embeddings=int(_get(config, "max_position_embeddings", 131072)),
        rope_theta=rope_theta_of(config),
        hidden_act=hidden_act,
        num_mtp_layers=int(_get(config, "num_nextn_predict_layers", 0) or 0),
        lm_head_bias=bool(_get(config, "use_bias", False))
        and (bool(num_experts) or _get(config, "model_type") == "ernie4_5_moe"),
        **moe,
    )
