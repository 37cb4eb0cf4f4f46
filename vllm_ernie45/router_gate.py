"""The MoE router's gate projection: fp32 logits, by the cheapest GEMM that gives them exactly.

ERNIE routes on fp32 logits (HF: an fp32 gate weight applied to ``hidden.float()``), so the
gate holds its weight in fp32. On CUDA with a bf16 model whose gate weight holds only bf16
values -- a bf16 checkpoint, or dummy weights (rounded: their values mean nothing) -- a
``bf16 × bf16 → fp32`` GEMM (``torch.mm(..., out_dtype=float32)``, cuBLAS) computes the same
logits: the product of two bf16 numbers is exact in fp32 and the sum is accumulated in fp32
either way, so only the summation order differs, as between any two fp32 GEMM algorithms. It
reads half the bytes and drops the fp32 cast of the input and the SIMT sgemm + split-K
reduction cuBLAS runs for a 1 × hidden × experts fp32 product (≈ 9.5 µs a layer at batch 1 on
an H100). A checkpoint whose fp32 gate values bf16 cannot hold keeps the fp32 GEMM; so does
the CPU, and ``VLLM_ERNIE45_ROUTER_GEMM=fp32``.

The choice is made after loading (vLLM calls the gate's ``quant_method`` then, for real and
for dummy weights alike) and again after every reload.
"""

from __future__ import annotations

from typing import Any

import torch
from vllm.model_executor.layers.linear import UnquantizedLinearMethod
from vllm.platforms import current_platform

from vllm_ernie45 import compat, envs


def holds_bf16_values(weight: torch.Tensor) -> bool:
    """True where every value of ``weight`` is a bf16 number (rounding to bf16 is exact)."""
    if weight.dtype == torch.bfloat16:
        return True
    return bool(torch.equal(weight.to(torch.bfloat16).to(weight.dtype), weight))


def use_bf16_gemm(weight: torch.Tensor, model_dtype: torch.dtype, loaded: bool, on_cuda: bool) -> bool:
    """Whether the gate may run as ``bf16 × bf16 → fp32`` (see the module docstring)."""
    if not on_cuda or model_dtype != torch.bfloat16 or envs.router_gemm() == "fp32":
        return False
    return not loaded or holds_bf16_values(weight)


class _ChooseGemmAfterLoading(UnquantizedLinearMethod):
    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        super().process_weights_after_loading(layer)
        layer.choose_gemm()


_CLASSES: dict[Any, Any] = {}


def router_gate_cls() -> Any:
    """The gate class: vLLM's ``GateLinear`` (as :func:`compat.gate_linear_cls` gives it) that
    records whether a checkpoint filled it and picks its GEMM after loading."""
    base = compat.gate_linear_cls()
    if base in _CLASSES:
        return _CLASSES[base]

    class ErnieRouterGate(base):
        def __init__(self, hidden_size: int, num_experts: int, model_dtype: torch.dtype, prefix: str) -> None:
            super().__init__(
                hidden_size, num_experts, bias=False, out_dtype=torch.float32,
                params_dtype=torch.float32, prefix=prefix,
            )
            self.model_dtype = model_dtype
            self.loaded_from_checkpoint = False
            # The weight as bf16 where the bf16 GEMM is chosen (not saved; derived from it).
            self.register_buffer("weight_bf16", None, persistent=False)
            if current_platform.is_cuda() and type(self.quant_method) is UnquantizedLinearMethod:
                self.quant_method = _ChooseGemmAfterLoading()

        def weight_loader(self, param: torch.nn.Parameter, loaded_weight: torch.Tensor) -> None:
            self.loaded_from_checkpoint = True
            super().weight_loader(param, loaded_weight)

        def choose_gemm(self) -> None:
            weight = self.weight.data
            if use_bf16_gemm(weight, self.model_dtype, self.loaded_from_checkpoint, current_platform.is_cuda()):
                self.weight_bf16 = weight.to(torch.bfloat16)
                weight.copy_(self.weight_bf16)  # dummy weights: both forms hold the same values
            else:
                self.weight_bf16 = None

        def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
            """fp32 router logits of ``hidden_states`` (the model's dtype)."""
            if self.weight_bf16 is not None and hidden_states.dtype == torch.bfloat16:
                return torch.mm(hidden_states, self.weight_bf16.t(), out_dtype=torch.float32)
            logits, _ = super().forward(hidden_states.float())
            return logits

    _CLASSES[base] = ErnieRouterGate
    return ErnieRouterGate
