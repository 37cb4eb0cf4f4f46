"""vllm-ernie45: serve Baidu's ERNIE 4.5 text models (MoE and dense) with vLLM.

vLLM calls :func:`register` through the ``vllm.general_plugins`` entry point in every
process it starts. Registration is by lazy ``"module:Class"`` strings, so importing this
package imports neither torch nor the model code.
"""

from __future__ import annotations

__version__ = "0.1.0"

# Architecture name in config.json -> "module:Class" of this plugin's implementation.
MODEL_CLASSES = {
    "Ernie4_5_MoeForCausalLM": "vllm_ernie45.model:ErnieMoeForCausalLM",
    "Ernie4_5ForCausalLM": "vllm_ernie45.model:ErnieDenseForCausalLM",  # ERNIE-4.5-0.3B
    # The 0.3B-PT snapshots published before the hub renamed the architecture.
    "Ernie4_5_ForCausalLM": "vllm_ernie45.model:ErnieDenseForCausalLM",
}
# The draft vLLM builds for speculative_config method "mtp" on an ERNIE 4.5 MoE target.
MTP_DRAFT_CLASS = ("ErnieMTPModel", "vllm_ernie45.mtp:ErnieMTPDraft")
TOOL_PARSER = ("ernie45", "vllm_ernie45.parsers.tool_parser", "Ernie45ToolParser")
REASONING_PARSER = ("ernie45", "vllm_ernie45.parsers.reasoning_parser", "Ernie45ReasoningParser")

_registered = False


def register() -> None:
    """Register the ERNIE 4.5 models and the ``ernie45`` parsers with vLLM (idempotent)."""
    global _registered
    if _registered:
        return

    from vllm_ernie45 import compat

    version = compat.check_supported_vllm()

    from vllm_ernie45 import envs

    # Fused-MoE Triton tables for ERNIE's expert shapes, found before vLLM's own.
    envs.use_tuned_moe_configs()

    from vllm import ModelRegistry

    for arch, target in MODEL_CLASSES.items():
        ModelRegistry.register_model(arch, target)
    if envs.mtp_draft() == "plugin":
        ModelRegistry.register_model(*MTP_DRAFT_CLASS)
    compat.register_tool_parser(*TOOL_PARSER)
    compat.register_reasoning_parser(*REASONING_PARSER)
    _registered = True

    # vLLM >= 0.23 logs model overrides only at debug level; say it once, visibly.
    from vllm.logger import init_logger

    # A child of the "vllm" logger, so vLLM's handler and level apply to it.
    init_logger("vllm.ernie45").info(
        "vllm-ernie45 %s (vLLM %s) serves %s, %s and the 'ernie45' tool-call and reasoning parsers",
        __version__,
        version,
        ", ".join(MODEL_CLASSES),
        "the MTP draft (ErnieMTPModel)" if envs.mtp_draft() == "plugin" else "not the MTP draft (in-tree)",
    )
