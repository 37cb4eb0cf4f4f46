"""Per-call choice between the small-batch GEMV expert path and vLLM's fused-MoE runner.

Which path is faster depends on the token count of the call, and torch.compile must not
freeze that into the graph; so a plugin MoE layer enters through one opaque custom op,
``torch.ops.vllm_ernie45.moe_forward(hidden_states, router_logits, layer_name)``, which
finds the layer by name and branches at run time (inside a CUDA graph: once per captured
batch size). Up to ``max_tokens`` tokens it routes with the plugin's router and runs
``moe_gemv.gemv_experts``; above, it calls vLLM's fused-MoE runner as usual.

``max_tokens`` and the kernels' block sizes come from a per-GPU table measured by
``scripts/tune_moe.py`` (``moe_configs/gemv,E=..,N=..,H=..,device_name=...json``), looked up
in ``VLLM_TUNED_CONFIG_FOLDER`` first, then in the package. ``VLLM_ERNIE45_SMALL_BATCH_MOE``:
``auto`` (use a table where one exists), ``0`` (never), ``1`` (a table's sizes where it
enables the path, else up to 8 tokens with default block sizes: for tests and tuning).
"""

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vllm_ernie45 import compat, envs

logger = logging.getLogger("vllm.ernie45")

PACKAGE_CONFIG_DIR = Path(__file__).parent / "moe_configs"
# Backends that keep vLLM's [E, 2N, H] / [E, H, N] weight layout after loading.
_LAYOUT_KEEPING_BACKENDS = ("TRITON",)


@dataclass(frozen=True)
class SmallBatchPlan:
    max_tokens: int
    configs: dict[int, Any] = field(default_factory=dict)  # tokens -> moe_gemv.GemvConfig
    source: str = "defaults"

    def config_for(self, tokens: int) -> Any:
        keys = sorted(self.configs)
        key = next((k for k in keys if k >= tokens), keys[-1])
        return self.configs[key]


def table_file_name(num_experts: int, inter: int, hidden: int, device: str) -> str:
    return f"gemv,E={num_experts},N={inter},H={hidden},device_name={device}.json"


def parse_table(values: dict, source: str) -> SmallBatchPlan:
    from vllm_ernie45.moe_gemv import GemvConfig

    configs = {int(k): GemvConfig.from_dict(v) for k, v in values.items() if k.isdigit()}
    max_tokens = int(values.get("max_tokens", 0))
    if max_tokens and not configs:
        raise ValueError(f"{source}: max_tokens={max_tokens} but no per-size block configs")
    return SmallBatchPlan(max_tokens=max_tokens, configs=configs, source=source)


def load_plan(num_experts: int, inter: int, hidden: int) -> SmallBatchPlan | None:
    """The plan for one layer shape on this GPU, or None when the GEMV path is off."""
    mode = envs.small_batch_moe()
    if mode == "0":
        return None
    folders = [os.environ.get("VLLM_TUNED_CONFIG_FOLDER"), str(PACKAGE_CONFIG_DIR)]
    name = table_file_name(num_experts, inter, hidden, compat.device_name_for_configs())
    for folder in filter(None, folders):
        path = Path(folder) / name
        if path.is_file():
            plan = parse_table(json.loads(path.read_text()), str(path))
            if plan.max_tokens > 0:
                return plan
            break
    if mode == "1":
        from vllm_ernie45.moe_gemv import GemvConfig

        return SmallBatchPlan(max_tokens=8, configs={1: GemvConfig()})
    return None


# ----------------------------------------------------------------------------- custom op

_LAYERS: dict[str, Any] = {}
_LIBRARY = torch.library.Library("vllm_ernie45", "FRAGMENT")
_LAYER_NAME_TYPE, _encode_layer_name = compat.layer_name_op_arg()


def register_layer(name: str, layer: Any) -> None:
    """Make ``layer`` (an ``ErnieMoE``) reachable from the custom op under ``name``; a later
    engine in the same process replaces an earlier one of the same name."""
    _LAYERS[name] = layer


def _moe_forward(hidden_states: torch.Tensor, router_logits: torch.Tensor, layer_name: Any) -> torch.Tensor:
    return _LAYERS[compat.layer_name_value(layer_name)].forward_impl(hidden_states, router_logits)


def _moe_forward_fake(hidden_states: torch.Tensor, router_logits: torch.Tensor, layer_name: Any) -> torch.Tensor:
    return torch.empty_like(hidden_states)


_moe_forward.__annotations__["layer_name"] = _LAYER_NAME_TYPE
_moe_forward_fake.__annotations__["layer_name"] = _LAYER_NAME_TYPE
compat.register_custom_op("moe_forward", _moe_forward, _moe_forward_fake, _LIBRARY)


def moe_forward(hidden_states: torch.Tensor, router_logits: torch.Tensor, layer_name: str) -> torch.Tensor:
    return torch.ops.vllm_ernie45.moe_forward(hidden_states, router_logits, _encode_layer_name(layer_name))


# ----------------------------------------------------------------------------- GEMV path


def expert_weights_for_gemv(experts: Any, num_experts: int, inter: int, hidden: int) -> tuple | None:
    """``(w13, w2)`` when the fused-MoE layer's weights are in the layout the GEMV kernels
    read, else None (with the reason logged once)."""
    backend = compat.fused_moe_unquantized_backend(experts)
    w13, w2 = compat.fused_moe_expert_weights(experts)
    reason = None
    if backend not in _LAYOUT_KEEPING_BACKENDS:
        reason = f"fused-MoE backend {backend!r} (needs one of {_LAYOUT_KEEPING_BACKENDS})"
    elif w13 is None or w2 is None:
        reason = "expert weights not found"
    elif tuple(w13.shape) != (num_experts, 2 * inter, hidden) or tuple(w2.shape) != (
        num_experts,
        hidden,
        inter,
    ):
        reason = f"expert weights of shapes {tuple(w13.shape)} / {tuple(w2.shape)}"
    elif w13.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        reason = f"expert weights of dtype {w13.dtype}"
    if reason:
        logger.info("ERNIE small-batch MoE path off: %s; using vLLM's fused MoE", reason)
        return None
    return w13, w2
