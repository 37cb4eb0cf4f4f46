"""Fused shared experts run beside the routed call in large steps: a per-step choice (issue 29).

With ``fused_layout`` set, ERNIE's shared FFN sits inside the fused-MoE call as ``S``
pseudo-experts that every token selects with weight 1 (``vllm_ernie45.expert_layout``): one
launch for all experts, what wins at decode sizes (5 % at batch 1 on the H100). In large
prefill and mixed steps the same shared slices cost more as grouped-GEMM tiles (a gathered
``A``, a top-(k+S) sum) than as dense GEMMs (issue 29: unfused was 2-4 % ahead at 1000 x 512/256
and 200 x 2048/32 on the H100). With ``VLLM_ERNIE45_SHARED_BESIDE_ABOVE=N`` a step of more than
``N`` tokens routes to the ``k`` routed slots only (the router asks :meth:`SharedBeside.takes`)
and computes the shared slices here as dense GEMMs on the *same* weights -- views of the fused
layer's shared slots on CUDA, no second copy -- then adds them to the routed output; smaller
steps keep them inside the call. Decode steps run no kernel of this module.

The choice is made on the step's token count inside custom ops that torch.compile keeps
opaque, never in Python it traces (which would fix one branch in the compiled graph): the
router's inside vLLM's fused-MoE op (opaque on CUDA; vLLM traces its fused-MoE call on CPU
and TPU, where ``ErnieMoE`` switches this off unless the engine runs eagerly,
``compat.fused_moe_call_is_opaque``), the shared FFN's in two ops of this module:

    shared = torch.ops.vllm.ernie45_shared_beside(x, w13, w2, first_slot, num_shared, above)
    out    = <vLLM's fused-MoE call>
    torch.ops.vllm.ernie45_add_shared_beside(out, shared, above)       # in place

The first runs before the fused call (its input may be reused by it). Their arguments are
tensors and ints only, the same for every layer, so vLLM's compiled pieces stay identical
across layers. One GPU only: with tensor, data or expert parallelism the fused output is
reduced inside vLLM's layer, before this addition (``ErnieMoE`` does not build it there).

Weights: vLLM's Triton backend keeps ``w13_weight`` ``[E+S, 2I, H]`` and ``w2_weight``
``[E+S, H, I]`` as loaded, so the shared slots are read in place. Any other backend repacks
them (CPU's grouped-GEMM layout, other GPU kernels' shuffles): :class:`SharedBeside` then keeps
a dense copy of the shared slots taken before vLLM processes the weights (its
``quant_method.process_weights_after_loading`` runs first: it is registered before the
fused-MoE layer).
"""

import torch
from torch import nn
from torch.nn import functional as F

from vllm_ernie45 import compat
from vllm_ernie45.expert_layout import FusedExpertLayout

_LOGGER_NAME = "vllm.ernie45.shared_beside"


def shared_ffn(
    hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, first_slot: int, num_shared: int
) -> torch.Tensor:
    """The shared FFN from the fused layer's shared slots ``[first_slot, first_slot + S)``:
    ``sum_j down_j(silu(gate_j x) * up_j x)`` -- one GEMM for every slice's gate and up, one
    accumulating GEMM per slice's down projection."""
    w13 = w13[first_slot : first_slot + num_shared]
    w2 = w2[first_slot : first_slot + num_shared]
    slices, two_i, hidden_size = w13.shape
    inter = two_i // 2
    tokens = hidden.shape[0]
    gate_up = torch.mm(hidden, w13.reshape(slices * two_i, hidden_size).t())  # [T, S * 2I]
    gate_up = gate_up.view(tokens * slices, two_i)
    silu_and_mul = getattr(torch.ops._C, "silu_and_mul", None) if hidden.is_cuda else None
    if silu_and_mul is not None:
        act = gate_up.new_empty(tokens * slices, inter)
        silu_and_mul(act, gate_up)
    else:
        act = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]
    act = act.view(tokens, slices * inter)
    out = torch.mm(act[:, :inter], w2[0].t())
    for j in range(1, slices):
        out.addmm_(act[:, j * inter : (j + 1) * inter], w2[j].t())
    return out


def _shared_beside(
    hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, first_slot: int, num_shared: int, above: int
) -> torch.Tensor:
    if hidden.shape[0] <= above:
        return torch.empty_like(hidden)  # the step keeps them inside the fused call
    return shared_ffn(hidden, w13, w2, first_slot, num_shared)


def _shared_beside_fake(
    hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, first_slot: int, num_shared: int, above: int
) -> torch.Tensor:
    return torch.empty_like(hidden)


def _add_shared_beside(out: torch.Tensor, shared: torch.Tensor, above: int) -> None:
    if out.shape[0] > above:
        out.add_(shared)


def _add_shared_beside_fake(out: torch.Tensor, shared: torch.Tensor, above: int) -> None:
    return None


compat.register_custom_op("ernie45_shared_beside", _shared_beside, [], _shared_beside_fake)
compat.register_custom_op("ernie45_add_shared_beside", _add_shared_beside, ["out"], _add_shared_beside_fake)


def _weights_stay_as_loaded(experts: nn.Module) -> bool:
    """Whether vLLM runs these experts on its Triton backend, which keeps the loaded layout."""
    for method in compat.fused_moe_quant_methods(experts):
        backend = getattr(method, "unquantized_backend", None)
        if backend is not None:
            return getattr(backend, "name", str(backend)).upper().endswith("TRITON")
    return False


class SharedBeside(nn.Module):
    """One MoE layer's switch and weights for running its fused shared experts beside the
    routed call in steps of more than ``above`` tokens. Build it before the fused-MoE layer,
    then :meth:`attach` that layer."""

    def __init__(self, layout: FusedExpertLayout, intermediate_size: int, above: int) -> None:
        super().__init__()
        if layout.ep_size != 1:
            raise ValueError("shared experts beside the routed call: one GPU only (no expert parallelism)")
        self.above: int | None = above
        self.first_slot = layout.shared_slot(0)
        self.num_shared = layout.num_shared
        self.intermediate_size = intermediate_size
        self._target: dict[str, nn.Module] = {}  # not a submodule: the experts stay the model's
        # Dense copies of the shared slots where the backend repacks the fused weights.
        self.register_buffer("w13_copy", torch.empty(0), persistent=False)
        self.register_buffer("w2_copy", torch.empty(0), persistent=False)
        self.quant_method = _BeforeExpertsProcessing()

    def attach(self, experts: nn.Module) -> None:
        self._target["experts"] = experts

    def takes(self, tokens: int) -> bool:
        """Whether a step of ``tokens`` tokens runs the shared experts here (the router then
        selects routed slots only)."""
        return self.above is not None and tokens > self.above

    def shared_output(self, hidden: torch.Tensor) -> torch.Tensor:
        """Before the fused call: the shared FFN of ``hidden`` in a step this module takes
        (uninitialised otherwise)."""
        if self.w13_copy.numel():
            w13, w2, first = self.w13_copy, self.w2_copy, 0
        else:  # read at each step: vLLM may re-register the parameters while processing them
            owner = self._target["weights_owner"]
            w13, w2, first = owner.w13_weight, owner.w2_weight, self.first_slot
        return torch.ops.vllm.ernie45_shared_beside(hidden, w13, w2, first, self.num_shared, self.above)

    def add_to(self, out: torch.Tensor, shared: torch.Tensor) -> None:
        """After the fused call: ``out += shared`` in a step this module takes."""
        torch.ops.vllm.ernie45_add_shared_beside(out, shared, self.above)

    def check_weights(self) -> str | None:
        """Read the fused layer's weights (before vLLM processes them); keep a dense copy of
        the shared slots if its backend will repack them. Returns why the layer cannot run
        them beside the call (None: it can)."""
        if self.above is None:
            return None  # switched off when built
        owner = compat.fused_moe_weights_owner(self._target["experts"])
        if owner is None:
            return "the fused-MoE layer has no w13_weight / w2_weight"
        self._target["weights_owner"] = owner
        w13, w2 = owner.w13_weight, owner.w2_weight
        if not (w13.is_floating_point() and w13.dtype.itemsize >= 2 and w2.dtype == w13.dtype):
            return f"its expert weights are {w13.dtype} / {w2.dtype} (quantized)"
        end = self.first_slot + self.num_shared
        inter = self.intermediate_size
        if w13.dim() != 3 or w13.shape[0] < end or w13.shape[1] != 2 * inter or tuple(w2.shape[1:]) != (
            w13.shape[2], inter
        ):
            return f"its expert weights have shapes {tuple(w13.shape)} / {tuple(w2.shape)}"
        if not (w13.is_cuda and _weights_stay_as_loaded(self._target["experts"])):
            self.w13_copy = w13[self.first_slot : end].detach().clone()
            self.w2_copy = w2[self.first_slot : end].detach().clone()
        return None


def _logger():
    from vllm.logger import init_logger

    return init_logger(_LOGGER_NAME)


def _quantize_method_base():
    from vllm.model_executor.layers.quantization.base_config import QuantizeMethodBase

    return QuantizeMethodBase


class _BeforeExpertsProcessing(_quantize_method_base()):
    """vLLM's loader calls ``process_weights_after_loading`` for every module with a quant
    method, in registration order: this one runs before the fused-MoE layer's."""

    def create_weights(self, layer, *args, **kwargs):  # no weights of its own
        return None

    def apply(self, layer, *args, **kwargs):
        raise RuntimeError("SharedBeside has no forward")

    def process_weights_after_loading(self, layer: "SharedBeside") -> None:
        reason = layer.check_weights()
        if reason is not None:
            layer.above = None  # the router reads it too: the shared slots stay in every step
            _logger().warning_once(
                "vllm-ernie45: VLLM_ERNIE45_SHARED_BESIDE_ABOVE ignored, shared experts stay inside "
                "the fused-MoE call: %s.", reason
            )
