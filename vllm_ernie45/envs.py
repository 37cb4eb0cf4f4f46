"""Tuning switches of the plugin, read from the environment when a model is built.

``VLLM_ERNIE45_ROUTER``
    ``auto`` (default): ``triton`` on CUDA, ``torch`` elsewhere.
    ``torch``: the reference routing as torch ops (``vllm_ernie45.routing``).
    ``triton``: the same math as one Triton kernel per layer (softmax, bias-corrected
    top-k, renormalisation, shared-expert slots); CUDA only.
``VLLM_ERNIE45_FUSE_SHARED_EXPERTS``
    ``auto`` (default): on CUDA without expert parallelism, run shared experts inside the
    routed fused-MoE call as always-selected experts of weight 1. ``1``: also under expert
    parallelism, one shared slice per rank (``vllm_ernie45.expert_layout``; EP size must
    divide the shared slices, e.g. EP=2 for the 21B-A3B): per-rank MoE kernels 2-11 % faster
    at <= 64 tokens, 5-9 % slower from 256 (docs/parallelism.md). ``0``: never. Never with
    EPLB or ``use_bias``.
``VLLM_ERNIE45_SHARED_BESIDE_ABOVE``
    Where shared experts are fused (above), a per-step choice: a step of more tokens than
    this number runs them *beside* the routed call instead -- the routed call on top-k
    routed slots only, the shared slices as dense GEMMs on the same fused weights (no extra
    memory on CUDA), added to its output (``vllm_ernie45.shared_beside``); steps of at most
    this many tokens (decode) keep them inside the call. ``off`` (default): always inside.
    One GPU only (no tensor, data or expert parallelism) and unquantized experts; elsewhere
    it is ignored. On CPU it applies only where fusion is asked for (tests).
``VLLM_ERNIE45_QUANT_SCOPE``
    ``all`` (default): an engine ``quantization`` applies to every linear layer vLLM
    quantizes. ``experts``: only to the MoE experts -- attention projections and dense MLPs
    stay in the checkpoint's dtype. For online quantization of a bf16 checkpoint (e.g.
    ``--quantization fp8`` with ``VLLM_TEST_FORCE_FP8_MARLIN=1``, weight-only FP8 experts for
    batch-1 decode); a pre-quantized checkpoint needs ``all``.
``VLLM_ERNIE45_MOE_WARMUP``
    ``1`` (default): on CUDA (one GPU or tensor parallelism; not under expert parallelism or
    EPLB), compile at engine start the fused-MoE Triton kernels that prefill and mixed steps
    (token counts above the CUDA-graph sizes) will launch -- each distinct table entry and
    integer specialisation once -- to keep JIT compiles out of requests (issue 29;
    ``vllm_ernie45.moe_warmup``; on an H100 the gate/up launches no longer compiled inside
    requests, some down-projection launches still did). Costs start-up time on a cold Triton
    cache (8.5 s for the H100 table). ``0``: off.
``VLLM_ERNIE45_MTP_DRAFT``
    ``plugin`` (default): MTP speculative decoding (``speculative_config`` method ``mtp``)
    drafts with this plugin's compiled MTP head (``vllm_ernie45.mtp``); ``intree``: with
    vLLM's own ``ErnieMTP`` (for comparison).
``VLLM_ERNIE45_MTP_HIDDEN``
    ``pre_norm`` (default): the plugin's MTP draft gets the target's last hidden state before
    the final norm, as ERNIE's training code feeds it; ``post_norm``: after it (FastDeploy's
    choice). vLLM's in-tree draft always gets the post-norm state it is built for.
``VLLM_ERNIE45_TOOL_STREAM``
    How the ``ernie45`` tool parser streams a call: ``incremental`` (default) -- the call's
    index, id and name first, then its arguments as the model writes them; ``whole`` -- each
    call in one delta once complete. Per request: ``"vllm_xargs": {"ernie45_tool_stream":
    "whole"}``. Read by ``vllm_ernie45.parsers.tool_parser`` (docs/parsers.md).
``VLLM_ERNIE45_STRICT``
    ``0`` (default): where the plugin cannot serve the installed vLLM (a version outside the
    supported range, or a vLLM API that moved so that ``register()`` fails), it logs one
    warning and registers nothing: vLLM's in-tree ERNIE classes and parsers serve, and every
    other model is untouched. ``1``: ``register()`` raises instead (CI, and users who want a
    hard failure). Read in ``register()`` only; any value other than ``1`` means ``0``, since
    a typo here must not stop vLLM either.

``VLLM_TUNED_CONFIG_FOLDER`` (vLLM's own switch)
    Where vLLM looks first for fused-MoE Triton tables. Building an ERNIE MoE model points
    it at the plugin's tables for ERNIE's expert shapes (``vllm_ernie45/moe_configs``: e.g. 64
    routed + 2 fused shared experts), which vLLM does not ship, unless it is already set --
    in that process only: ``register()``, which runs in every vLLM process, does not, so no
    other model meets these tables (some shapes are another model's too, e.g. E=8,N=3584 is
    Mixtral-8x7B under TP=4) and vLLM's LoRA and SSM ops, which read the same variable, are
    untouched. vLLM falls back to its own tables after these.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

MOE_CONFIG_FOLDER = Path(__file__).parent / "moe_configs"

_ROUTERS = ("auto", "torch", "triton")


def router_backend(is_cuda: bool) -> str:
    value = os.environ.get("VLLM_ERNIE45_ROUTER", "auto").strip().lower() or "auto"
    if value not in _ROUTERS:
        raise ValueError(f"VLLM_ERNIE45_ROUTER={value!r}; choose one of {_ROUTERS}")
    if value == "auto":
        return "triton" if is_cuda else "torch"
    if value == "triton" and not is_cuda:
        raise ValueError("VLLM_ERNIE45_ROUTER=triton needs a CUDA GPU")
    return value


def fuse_shared_experts(is_cuda: bool, expert_parallel: bool = False) -> bool:
    """Whether to run shared experts inside the fused-MoE call (where the layout allows it).
    ``auto``: on CUDA without expert parallelism; under EP only when asked (=1) -- the EP
    layout has not been run end to end on two GPUs yet (docs/parallelism.md)."""
    value = os.environ.get("VLLM_ERNIE45_FUSE_SHARED_EXPERTS", "auto").strip().lower() or "auto"
    if value not in ("auto", "0", "1"):
        raise ValueError(f"VLLM_ERNIE45_FUSE_SHARED_EXPERTS={value!r}; choose auto, 0 or 1")
    if value == "auto":
        return is_cuda and not expert_parallel
    return value == "1"


def shared_beside_above() -> int | None:
    """``VLLM_ERNIE45_SHARED_BESIDE_ABOVE``: the token count above which a step runs fused
    shared experts beside the routed call, or None (``off``)."""
    value = os.environ.get("VLLM_ERNIE45_SHARED_BESIDE_ABOVE", "off").strip().lower() or "off"
    if value == "off":
        return None
    if not value.isdigit():
        raise ValueError(
            f"VLLM_ERNIE45_SHARED_BESIDE_ABOVE={value!r}; give a token count (>= 0) or off"
        )
    return int(value)


def _choice(name: str, default: str, choices: tuple[str, ...]) -> str:
    value = os.environ.get(name, default).strip().lower() or default
    if value not in choices:
        raise ValueError(f"{name}={value!r}; choose one of {choices}")
    return value


def quant_scope() -> str:
    return _choice("VLLM_ERNIE45_QUANT_SCOPE", "all", ("all", "experts"))


def moe_warmup() -> bool:
    return _choice("VLLM_ERNIE45_MOE_WARMUP", "1", ("0", "1")) == "1"


def mtp_draft() -> str:
    return _choice("VLLM_ERNIE45_MTP_DRAFT", "plugin", ("plugin", "intree"))


def mtp_hidden_state() -> str:
    return _choice("VLLM_ERNIE45_MTP_HIDDEN", "pre_norm", ("pre_norm", "post_norm"))


def strict_registration() -> bool:
    return os.environ.get("VLLM_ERNIE45_STRICT", "0").strip() == "1"


def use_tuned_moe_configs() -> Callable[[], None]:
    """``VLLM_TUNED_CONFIG_FOLDER`` -> the plugin's tables, unless already set (by the user).
    Returns what undoes it."""
    if "VLLM_TUNED_CONFIG_FOLDER" in os.environ:
        return lambda: None
    os.environ["VLLM_TUNED_CONFIG_FOLDER"] = str(MOE_CONFIG_FOLDER)
    return lambda: os.environ.pop("VLLM_TUNED_CONFIG_FOLDER", None)
