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
_stepped_aside = False


def register() -> None:
    """Register the ERNIE 4.5 models and the ``ernie45`` parsers with vLLM (idempotent).

    vLLM calls this in every process it starts and does not catch what it raises, so it
    never raises by default: where the plugin cannot serve the installed vLLM (a version
    outside the supported range, or anything in registration failing, e.g. a vLLM API that
    moved) it undoes what it had registered, logs one warning and steps aside -- vLLM's
    in-tree ERNIE classes and parsers serve, every other model is untouched.
    ``VLLM_ERNIE45_STRICT=1`` raises instead.
    """
    global _registered, _stepped_aside
    if _registered or _stepped_aside:
        return

    from vllm_ernie45 import compat, envs

    version = compat.installed_vllm_version()
    try:
        compat.check_supported_vllm(version)
        _register_with_vllm()
    except Exception as exc:
        if envs.strict_registration():
            raise
        _stepped_aside = True
        _warn_stepping_aside(version, exc)
        return
    _registered = True
    _log_registered(version)


def _register_with_vllm() -> None:
    """Every change to vLLM's state, each with its undo: on any failure the ones made so far
    are undone (in-tree classes and parsers back in place) and the error propagates."""
    from vllm_ernie45 import compat, envs

    undo = []
    try:
        for arch, target in MODEL_CLASSES.items():
            undo.append(compat.register_model(arch, target))
        if envs.mtp_draft() == "plugin":
            undo.append(compat.register_model(*MTP_DRAFT_CLASS))
        undo.append(compat.register_tool_parser(*TOOL_PARSER))
        undo.append(compat.register_reasoning_parser(*REASONING_PARSER))
    except BaseException:
        for step in reversed(undo):
            step()
        raise


def _logger():
    try:
        from vllm.logger import init_logger

        # A child of the "vllm" logger, so vLLM's handler and level apply to it.
        return init_logger("vllm.ernie45")
    except Exception:  # a vLLM whose logger moved: the plain logger of the same name
        import logging

        return logging.getLogger("vllm.ernie45")


def _warn_stepping_aside(version: str | None, exc: BaseException) -> None:
    from vllm_ernie45 import compat

    if version is None:
        why = "vLLM is not installed"
    elif isinstance(exc, compat.UnsupportedVllmVersion) and not compat.is_supported(version):
        why = (
            f"it supports vLLM {compat.SUPPORTED_RANGE_TEXT} and the installed vLLM is {version} "
            "(install a supported vLLM, or a vllm-ernie45 release made for this one)"
        )
    else:
        why = f"registering with vLLM {version} failed: {type(exc).__name__}: {exc}"
    _logger().warning(
        "vllm-ernie45 %s is not active: %s. vLLM's in-tree ERNIE 4.5 classes and its own "
        "'ernie45' tool-call and reasoning parsers serve instead; other models are not "
        "affected. Set VLLM_ERNIE45_STRICT=1 to make this an error.",
        __version__,
        why,
    )


def _log_registered(version: str) -> None:
    from vllm_ernie45 import envs

    # vLLM >= 0.23 logs model overrides only at debug level; say it once, visibly.
    _logger().info(
        "vllm-ernie45 %s (vLLM %s) serves %s, %s and the 'ernie45' tool-call and reasoning parsers",
        __version__,
        version,
        ", ".join(MODEL_CLASSES),
        "the MTP draft (ErnieMTPModel)" if envs.mtp_draft() == "plugin" else "not the MTP draft (in-tree)",
    )
