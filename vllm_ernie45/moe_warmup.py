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

:func:`warm_up_fused_moe` runs, once per process and expert shape, each distinct
(config, integer specialisation) of the eager token range through the same kernel launches
vLLM's ``TritonExperts`` makes (gate/up GEMM without router weights, down GEMM with them), to keep
those compiles out of requests. :class:`KernelWarmup` is the hook: a module registered after the fused-MoE
layer whose ``quant_method.process_weights_after_loading`` -- which vLLM's loaders call for
every module after the weights are in place, a dummy load included -- runs the warm-up.
``VLLM_ERNIE45_MOE_WARMUP=0`` switches it off.

Measured (H100, vLLM 0.26, issue 29; docs/performance.md): with the warm-up no gate/up launch
was compiled inside a request any more, but down-projection launches (``MUL_ROUTED_WEIGHT``,
``top_k=1``) of some token counts still were -- the model's down launch differs from the one
made here in an integer or pointer specialisation not identified yet (the JIT monitor's log
truncates the key). Compiling for 6 token counts took 8.5 s on a cold Triton cache.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

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


def plan(
    token_counts: Iterable[int], top_k: int, num_experts: int, config_for: Callable[[int], dict]
) -> list[int]:
    """One representative token count per distinct launch key, smallest first."""
    seen: dict[tuple, int] = {}
    for tokens in token_counts:
        key = launch_key(tokens, top_k, num_experts, config_for(tokens))
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
    for module in experts.modules():
        w13, w2 = getattr(module, "w13_weight", None), getattr(module, "w2_weight", None)
        if isinstance(w13, torch.Tensor) and isinstance(w2, torch.Tensor):
            return w13, w2
    return None


def _logger():
    from vllm.logger import init_logger

    return init_logger(_LOGGER_NAME)


def warm_up_fused_moe(experts: nn.Module, top_k: int, low: int, high: int, logger=None) -> dict:
    """Compile what the eager steps of ``experts`` (vLLM's fused-MoE layer, unquantized,
    Triton backend) will launch for token counts in (``low``, ``high``]; once per process and
    weight shape. Returns what it did (``skipped`` says why it did nothing)."""
    weights = _expert_weights(experts)
    if weights is None:
        return {"skipped": "no w13_weight / w2_weight"}
    w13, w2 = weights
    if not w13.is_cuda or w13.dtype not in (torch.bfloat16, torch.float16) or w2.dtype != w13.dtype:
        return {"skipped": f"weights {w13.dtype} on {w13.device}: only unquantized CUDA experts"}
    if high <= low:
        return {"skipped": "no eager token range"}
    import triton.language as tl
    from vllm.model_executor.layers.fused_moe.fused_moe import (
        invoke_fused_moe_triton_kernel,
        try_get_optimal_moe_config,
    )
    from vllm.model_executor.layers.fused_moe.moe_align_block_size import moe_align_block_size

    num_experts, n2, hidden = w13.shape
    done_key = (tuple(w13.shape), tuple(w2.shape), w13.dtype, top_k, low, high, w13.device.index)
    if done_key in _DONE:
        return {"skipped": "done for this shape"}
    _DONE.add(done_key)

    def config_for(tokens: int) -> dict:
        return dict(try_get_optimal_moe_config(w13.size(), w2.size(), top_k, None, tokens))

    sizes = plan(range(low + 1, high + 1), top_k, num_experts, config_for)
    compute_type = tl.bfloat16 if w13.dtype == torch.bfloat16 else tl.float16
    started = time.perf_counter()
    gen = torch.Generator(device=w13.device).manual_seed(0)
    for tokens in sizes:
        config = config_for(tokens)
        x = torch.randn(tokens, hidden, device=w13.device, dtype=w13.dtype, generator=gen) * 0.01
        ids = torch.randint(0, num_experts, (tokens, top_k), device=w13.device, dtype=torch.int32, generator=gen)
        topk_weights = torch.rand(tokens, top_k, device=w13.device, generator=gen)
        if tokens * top_k * 4 <= num_experts:
            sorted_ids, expert_ids = None, ids.view(-1)
            padded = torch.full((1,), ids.numel() * config["BLOCK_SIZE_M"], dtype=torch.int32, device=w13.device)
        else:
            sorted_ids, expert_ids, padded = moe_align_block_size(ids, config["BLOCK_SIZE_M"], num_experts)
        cache1 = torch.empty(tokens, top_k, n2, device=w13.device, dtype=w13.dtype)
        cache2 = torch.empty(tokens * top_k, n2 // 2, device=w13.device, dtype=w13.dtype)
        cache3 = torch.empty(tokens, top_k, w2.shape[1], device=w13.device, dtype=w13.dtype)
        common = dict(compute_type=compute_type, use_fp8_w8a8=False, use_int8_w8a8=False,
                      use_int8_w8a16=False, use_int4_w4a16=False, per_channel_quant=False,
                      block_shape=None, B_bias=None)
        # As TritonExperts.apply: gate/up without router weights, down with them (top_k 1).
        invoke_fused_moe_triton_kernel(x, w13, cache1, None, None, None, sorted_ids, expert_ids, padded,
                                       False, top_k, config, **common)
        cache2.normal_()
        invoke_fused_moe_triton_kernel(cache2, w2, cache3, None, None, topk_weights, sorted_ids, expert_ids,
                                       padded, True, 1, config, **common)
        del x, ids, topk_weights, sorted_ids, expert_ids, padded, cache1, cache2, cache3
    torch.cuda.synchronize(w13.device)
    torch.cuda.empty_cache()
    report = {"token_counts": sizes, "seconds": round(time.perf_counter() - started, 1),
              "range": [low, high], "experts": num_experts, "top_k": top_k}
    (logger or _logger()).info(
            "vllm-ernie45: compiled the fused-MoE kernels of %d (config, specialisation) pairs for "
            "eager steps of %d-%d tokens (E=%d, top-%d) in %.1f s.",
            len(sizes), low + 1, high, num_experts, top_k, report["seconds"],
    )
    return report


class KernelWarmup(nn.Module):
    """Registered after a fused-MoE layer: vLLM's loader calls its ``quant_method``'s
    ``process_weights_after_loading`` once the weights are in place, which runs
    :func:`warm_up_fused_moe` on that layer."""

    def __init__(self, experts: nn.Module, top_k: int, low: int, high: int, logger=None) -> None:
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
                    layer.report = warm_up_fused_moe(target["experts"], top_k, low, high, logger)
                except Exception as err:  # a vLLM whose kernel API moved: serve anyway, JIT later
                    layer.report = {"skipped": f"failed: {err!r}"}
                    (logger or _logger()).warning("vllm-ernie45: fused-MoE kernel warm-up skipped: %r", err)

        self.quant_method = _AfterLoading()
        self.report: dict | None = None
