"""Compile, at engine start, the fused-MoE Triton kernels that eager steps will run (issue 29).

vLLM compiles a Triton kernel the first time it is launched with a new set of compile-time
constants (a tile config from the fused-MoE table) and a new integer specialisation (Triton
specialises integer arguments that are multiples of 16). CUDA-graph capture compiles what
decode-sized steps run (up to ``max_cudagraph_capture_size`` tokens) and the profile run
compiles the ``max_num_batched_tokens`` step; every other token count -- the prefill and mixed
steps of a large batch -- picks the table entry nearest to it and, on its first use in the
process, pays a JIT compile inside a request: 0.5-1.6 s per gate/up + down pair on an H100
(vLLM's kernel JIT monitor logs it: ``Triton kernel JIT compilation during inference:
fused_moe_kernel``). The plugin's tuned H200 table gives the sizes 513-16,384 ten distinct
(config, specialisation) pairs, where the in-tree model on vLLM's default config has four.

:func:`warm_up_fused_moe` runs, once per process and expert shape, one step for each distinct
(config, integer specialisation) of the eager token range through the layer's own router and
fused-MoE kernel object (vLLM 0.26's ``MoERunner``: ``router.select_experts`` +
``routed_experts.forward_modular``), so that every argument the model's launches specialise
on -- integers, pointers from vLLM's workspace manager, the router's outputs -- is the model's;
the plugin's router kernel is compiled for those sizes on the way. Where the layer lacks those
parts (another vLLM), it launches the gate/up and down kernels itself, as ``TritonExperts``
does. :class:`KernelWarmup` is the hook: a module registered after the fused-MoE layer whose
``quant_method.process_weights_after_loading`` -- which vLLM's loaders call for every module
after the weights are in place, a dummy load included -- runs the warm-up.
``VLLM_ERNIE45_MOE_WARMUP=0`` switches it off.

Measured (H100, vLLM 0.26, issue 29; docs/performance.md): with the direct launches no gate/up
launch was compiled inside a request any more, but down-projection launches (``MUL_ROUTED_WEIGHT``,
``top_k=1``) still were -- the model's down launch differs from the direct one in a
specialisation the JIT monitor's truncated key did not show; hence the layer path. With it
(H100, same call, 3 repeats of every scenario): no Triton compile inside any plugin request
(in-tree: 8), 6 token counts warmed in 6.7 s on a cold cache.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from vllm_ernie45 import compat

_DONE: set[tuple] = set()
# Under vLLM's logger namespace, so vLLM's logging configuration prints it (a logger named
# after this module, outside "vllm.", printed nothing on the GPU run of issue 29).
_LOGGER_NAME = "vllm.ernie45.moe_warmup"


def _int_spec(value: int) -> tuple[bool, bool]:
    """Triton's specialisation of an integer argument: == 1, divisible by 16."""
    return value == 1, value % 16 == 0


def launch_key(tokens: int, top_k: int, num_experts: int, config: dict) -> tuple:
    """What decides which compiled ``fused_moe_kernel`` a call with ``tokens`` tokens runs:
    its config and the specialisation of the token-dependent integer arguments (``EM``, the
    padded length of the sorted token ids, and ``num_valid_tokens``), as vLLM 0.26's
    ``invoke_fused_moe_triton_kernel`` / ``moe_align_block_size`` compute them."""
    block_m = config["BLOCK_SIZE_M"]
    pairs = tokens * top_k
    naive = pairs * 4 <= num_experts  # vLLM's small-batch path without token sorting
    if naive:
        em_w13 = em_w2 = pairs * block_m
    else:
        padded = pairs + num_experts * (block_m - 1)
        if pairs < num_experts:
            padded = min(pairs * block_m, padded)
        # The gate/up launch sees `tokens` rows (top_k each), the down launch `pairs` rows.
        em_w13 = min(padded, pairs * block_m) if tokens < block_m else padded
        em_w2 = min(padded, pairs * block_m) if pairs < block_m else padded
    cfg = json.dumps({k: v for k, v in config.items() if k != "SPLIT_K"}, sort_keys=True)
    return cfg, naive, _int_spec(em_w13), _int_spec(em_w2), _int_spec(pairs)


TopK = int | Callable[[int], int]


def top_k_of(top_k: TopK, tokens: int) -> int:
    """The slots per token a step of ``tokens`` tokens launches: fixed, or chosen per step
    (fused shared experts beside the call in large steps: ``vllm_ernie45.shared_beside``)."""
    return top_k(tokens) if callable(top_k) else top_k


def plan(
    token_counts: Iterable[int], top_k: TopK, num_experts: int, config_for: Callable[[int], dict]
) -> list[int]:
    """One representative token count per distinct launch key, smallest first."""
    seen: dict[tuple, int] = {}
    for tokens in token_counts:
        key = (top_k_of(top_k, tokens),) + launch_key(tokens, top_k_of(top_k, tokens), num_experts, config_for(tokens))
        seen.setdefault(key, tokens)
    return sorted(seen.values())


def eager_token_range(vllm_config: Any) -> tuple[int, int]:
    """(exclusive low, inclusive high) token counts the model runs outside CUDA graphs:
    above the largest captured size, up to ``max_num_batched_tokens``."""
    compilation = vllm_config.compilation_config
    captured = 0
    if not vllm_config.model_config.enforce_eager:
        captured = int(getattr(compilation, "max_cudagraph_capture_size", 0) or 0)
    return captured, int(vllm_config.scheduler_config.max_num_batched_tokens)


def _expert_weights(experts: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    owner = compat.fused_moe_weights_owner(experts)
    return None if owner is None else (owner.w13_weight, owner.w2_weight)


def _logger():
    from vllm.logger import init_logger

    return init_logger(_LOGGER_NAME)


def layer_step(experts: nn.Module) -> Callable[[torch.Tensor, torch.Tensor], None] | None:
    """A function running one step of ``(hidden_states, router_logits)`` through the layer's own
    router and fused-MoE kernel object, as a model step does (vLLM 0.26's ``MoERunner``:
    ``router.select_experts`` then ``routed_experts.forward_modular``, without the shared
    experts); None where the layer has no such parts."""
    router = getattr(experts, "router", None)
    routed = getattr(experts, "routed_experts", None)
    methods = compat.fused_moe_quant_methods(experts)
    method = methods[0] if methods else None
    if router is None or not hasattr(router, "select_experts") or not hasattr(routed, "forward_modular"):
        return None

    def step(x: torch.Tensor, logits: torch.Tensor) -> None:
        weights, ids = router.select_experts(
            hidden_states=x, router_logits=logits, topk_indices_dtype=getattr(method, "topk_indices_dtype", None)
        )
        routed.forward_modular(x=x, topk_weights=weights, topk_ids=ids)

    return step


def _launch_step(
    w13: torch.Tensor, w2: torch.Tensor, top_k: int, config: dict, x: torch.Tensor, gen: torch.Generator
) -> None:
    """Launch the gate/up and down kernels of one step of ``x`` the way vLLM 0.26's
    ``TritonExperts`` does, on buffers of its own (the fallback where the layer has no
    ``layer_step``; issue 29 measured that the down launch made here misses a specialisation
    of the model's)."""
    import triton.language as tl
    from vllm.model_executor.layers.fused_moe.fused_moe import invoke_fused_moe_triton_kernel
    from vllm.model_executor.layers.fused_moe.moe_align_block_size import moe_align_block_size

    num_experts, n2, _ = w13.shape
    compute_type = tl.bfloat16 if w13.dtype == torch.bfloat16 else tl.float16
    tokens, device = x.shape[0], x.device
    ids = torch.randint(0, num_experts, (tokens, top_k), device=device, dtype=torch.int32, generator=gen)
    topk_weights = torch.rand(tokens, top_k, device=device, generator=gen)
    if tokens * top_k * 4 <= num_experts:
        sorted_ids, expert_ids = None, ids.view(-1)
        padded = torch.full((1,), ids.numel() * config["BLOCK_SIZE_M"], dtype=torch.int32, device=device)
    else:
        sorted_ids, expert_ids, padded = moe_align_block_size(ids, config["BLOCK_SIZE_M"], num_experts)
    cache1 = torch.empty(tokens, top_k, n2, device=device, dtype=w13.dtype)
    cache2 = torch.randn(tokens * top_k, n2 // 2, device=device, dtype=w13.dtype, generator=gen)
    cache3 = torch.empty(tokens, top_k, w2.shape[1], device=device, dtype=w13.dtype)
    common = dict(compute_type=compute_type, use_fp8_w8a8=False, use_int8_w8a8=False,
                  use_int8_w8a16=False, use_int4_w4a16=False, per_channel_quant=False,
                  block_shape=None, B_bias=None)
    invoke_fused_moe_triton_kernel(x, w13, cache1, None, None, None, sorted_ids, expert_ids, padded,
                                   False, top_k, config, **common)
    invoke_fused_moe_triton_kernel(cache2, w2, cache3, None, None, topk_weights, sorted_ids, expert_ids,
                                   padded, True, 1, config, **common)


def run_steps(
    experts: nn.Module, sizes: list[int], top_k: TopK, num_router_logits: int | None,
    config_for: Callable[[int], dict],
) -> str:
    """One step of each token count in ``sizes`` through ``experts``: through the layer's own
    router and kernel object where it has them and ``num_router_logits`` is given ("layer"),
    else by launching the kernels directly ("launch"). Returns which."""
    w13, w2 = _expert_weights(experts)
    hidden = w13.shape[2]
    run_layer = layer_step(experts) if num_router_logits else None
    gen = torch.Generator(device=w13.device).manual_seed(0)
    with torch.no_grad():
        for tokens in sizes:
            x = torch.randn(tokens, hidden, device=w13.device, dtype=w13.dtype, generator=gen) * 0.01
            if run_layer is not None:
                logits = torch.randn(tokens, num_router_logits, device=w13.device, generator=gen)
                run_layer(x, logits)
            else:
                _launch_step(w13, w2, top_k_of(top_k, tokens), config_for(tokens), x, gen)
    return "layer" if run_layer is not None else "launch"


def warm_up_fused_moe(
    experts: nn.Module, top_k: TopK, low: int, high: int, logger=None, num_router_logits: int | None = None
) -> dict:
    """Compile what the eager steps of ``experts`` (vLLM's fused-MoE layer, unquantized,
    Triton backend) will launch for token counts in (``low``, ``high``]; once per process and
    weight shape. Each planned token count runs one step through the layer's own router and
    kernel object (``num_router_logits`` wide logits), so every argument the model's launches
    specialise on is the model's; where the layer lacks those parts, the kernels are launched
    directly. Returns what it did (``skipped`` says why it did nothing)."""
    weights = _expert_weights(experts)
    if weights is None:
        return {"skipped": "no w13_weight / w2_weight"}
    w13, w2 = weights
    if not w13.is_cuda or w13.dtype not in (torch.bfloat16, torch.float16) or w2.dtype != w13.dtype:
        return {"skipped": f"weights {w13.dtype} on {w13.device}: only unquantized CUDA experts"}
    if high <= low:
        return {"skipped": "no eager token range"}
    from vllm.model_executor.layers.fused_moe.fused_moe import try_get_optimal_moe_config

    num_experts = w13.shape[0]
    top_ks = tuple(top_k_of(top_k, tokens) for tokens in (low + 1, high))  # per-step choice: both ends
    done_key = (tuple(w13.shape), tuple(w2.shape), w13.dtype, top_ks, low, high, w13.device.index)
    if done_key in _DONE:
        return {"skipped": "done for this shape"}
    _DONE.add(done_key)

    def config_for(tokens: int) -> dict:
        return dict(try_get_optimal_moe_config(w13.size(), w2.size(), top_k_of(top_k, tokens), None, tokens))

    sizes = plan(range(low + 1, high + 1), top_k, num_experts, config_for)
    started = time.perf_counter()
    path = run_steps(experts, sizes, top_k, num_router_logits, config_for)
    torch.cuda.synchronize(w13.device)
    torch.cuda.empty_cache()
    report = {"token_counts": sizes, "seconds": round(time.perf_counter() - started, 1), "range": [low, high],
              "experts": num_experts, "top_k": sorted({top_k_of(top_k, t) for t in sizes}), "path": path}
    (logger or _logger()).info(
            "vllm-ernie45: compiled the fused-MoE kernels of %d (config, specialisation) pairs for "
            "eager steps of %d-%d tokens (E=%d, top-%s, through the %s) in %.1f s.",
            len(sizes), low + 1, high, num_experts, "/".join(map(str, report["top_k"])),
            "layer's router and kernel" if path == "layer" else "kernels directly", report["seconds"],
    )
    return report


class KernelWarmup(nn.Module):
    """Registered after a fused-MoE layer: vLLM's loader calls its ``quant_method``'s
    ``process_weights_after_loading`` once the weights are in place, which runs
    :func:`warm_up_fused_moe` on that layer."""

    def __init__(
        self, experts: nn.Module, top_k: TopK, low: int, high: int, logger=None, num_router_logits: int | None = None
    ) -> None:
        super().__init__()
        from vllm.model_executor.layers.quantization.base_config import QuantizeMethodBase

        # Not an attribute nn.Module registers: the experts stay where the model put them.
        target = {"experts": experts}

        class _AfterLoading(QuantizeMethodBase):
            def create_weights(self, layer, *args, **kwargs):  # no weights of its own
                return None

            def apply(self, layer, *args, **kwargs):
                raise RuntimeError("KernelWarmup has no forward")

            def process_weights_after_loading(self, layer) -> None:
                try:
                    layer.report = warm_up_fused_moe(target["experts"], top_k, low, high, logger, num_router_logits)
                except Exception as err:  # a vLLM whose kernel API moved: serve anyway, JIT later
                    layer.report = {"skipped": f"failed: {err!r}"}
                    (logger or _logger()).warning("vllm-ernie45: fused-MoE kernel warm-up skipped: %r", err)

        self.quant_method = _AfterLoading()
        self.report: dict | None = None
