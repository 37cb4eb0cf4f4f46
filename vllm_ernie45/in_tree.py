"""Engines whose ERNIE 4.5 models the plugin hands to vLLM's in-tree classes: bitsandbytes.

vLLM (0.26 has it; 0.32 has removed it) serves ``quantization="bitsandbytes"`` -- in-flight
4-bit of a bf16 checkpoint, or a pre-quantized checkpoint whose config.json says
``quantization_config.quant_method: bitsandbytes`` (``ModelConfig._verify_quantization`` sets
``quantization`` from it; ``EngineArgs`` then sets ``load_format`` to ``bitsandbytes`` too) --
through its ``BitsAndBytesModelLoader``. That loader quantizes or reads each checkpoint tensor
itself and calls the model's ``load_weights`` with the packed result, then fuses per-expert
quant states into the fused-MoE parameters by the model's expert mapping
(``_fuse_moe_quant_states``). This plugin's strict loader and its CUDA layout (shared experts
as extra slots of the fused-MoE call, ``vllm_ernie45.expert_layout``) have not been run with
it, so for such an engine the plugin's classes build vLLM's in-tree ones instead and log
one warning per process saying why and how to silence it.

Mechanism: vLLM decides the model class before it has a config to decide with (the registry
maps an architecture name to one class), so the decision is made at construction, as vLLM's
own ``MiniCPMV.__new__`` dispatches to a version class: :class:`InTreeWhereNeeded.__new__`
returns an instance of vLLM's in-tree class for the architecture (``compat.build_in_tree_model``:
vLLM's own registry table, adapters and ``configure_quant_config``), and Python then skips the
plugin's ``__init__`` (the object is not an instance of the plugin's class).

What vLLM reads from the *class* before construction, checked in vLLM 0.26.0's sources
(``model_executor/model_loader/utils.py``, ``models/registry.py``, ``v1/worker``,
``v1/spec_decode``) and 0.32.0's:

* the registry's ``_ModelInfo`` (text generation, pooling, ``supports_pp``, hybrid, no-ops,
  multimodal, ...), inspected from the plugin's class: the same answers as for the in-tree
  classes (both are ``SupportsPP`` text-generation models, neither multimodal nor hybrid);
* ``initialize_model``: ``inspect.signature(cls.__init__)`` (``vllm_config``, ``prefix`` on
  both) and ``configure_quant_config(quant_config, cls)``, which gives the quantization config
  the class's ``packed_modules_mapping`` -- redone here with the in-tree class (the mappings
  are the same: ``qkv_proj`` and ``gate_up_proj``);
* a pooling runner's conversion (``as_embedding_model`` / ``as_seq_cls_model`` wrap the
  plugin's class): the in-tree class gets the same adapter;
* everything else -- ``SupportsLoRA``, ``MixtureOfExperts`` / EPLB, ``SupportsEagle3``,
  ``get_mtp_target_hidden_states``, ``is_unused_checkpoint_weight``, the bitsandbytes
  loader's ``packed_modules_mapping`` / ``load_weights`` / expert mapping -- is read from the
  model *instance*, i.e. from the in-tree class. (vLLM 0.32's V2 speculator reads
  ``get_mtp_target_hidden_states`` on the class, but 0.32 has no bitsandbytes.)

The MTP draft steps aside with its target: the in-tree target hands its drafter the state
after the final norm, which the in-tree draft is built for and the plugin's draft is not, and
the draft is loaded by the same bitsandbytes loader. One decision for the whole engine
(:func:`in_tree_reason`, the same answer for the target's and the draft's config) keeps the
pair matched.
"""

from __future__ import annotations

from typing import Any, ClassVar

BITSANDBYTES = "bitsandbytes"

_warned: set[str] = set()


def _name(value: Any) -> Any:
    return getattr(value, "value", value)  # an enum member -> its string


def in_tree_reason(vllm_config: Any) -> str | None:
    """Why this engine's ERNIE models must be vLLM's in-tree classes (the setting that asks
    for bitsandbytes), or None where the plugin serves them. Reads the target's quantization
    and load format and, under speculative decoding, the draft's: the target's and the
    draft's config give the same answer."""
    settings = [
        ("quantization", getattr(vllm_config.model_config, "quantization", None)),
        ("load_format", getattr(vllm_config.load_config, "load_format", None)),
    ]
    spec = getattr(vllm_config, "speculative_config", None)
    if spec is not None:
        draft_model = getattr(spec, "draft_model_config", None)
        draft_load = getattr(spec, "draft_load_config", None)
        settings += [
            ("speculative draft's quantization", getattr(draft_model, "quantization", None)),
            ("speculative draft's load_format", getattr(draft_load, "load_format", None)),
        ]
    for setting, value in settings:
        if _name(value) == BITSANDBYTES:
            return f"{setting} {BITSANDBYTES!r}"
    return None


def _logger():
    from vllm.logger import init_logger

    return init_logger("vllm.ernie45")  # the plugin's logger, a child of vLLM's


def warn_once(reason: str) -> None:
    """The one warning per process (the target and its draft give the same reason)."""
    if reason in _warned:
        return
    _warned.add(reason)
    _logger().warning(
        "vllm-ernie45 steps aside for this engine (%s): bitsandbytes is served by vLLM's "
        "in-tree ERNIE 4.5 classes, the model and any MTP draft (the plugin's loader and its "
        "fused shared-expert layout are not verified with vLLM's bitsandbytes loader). To "
        "silence this, serve a format the plugin runs (FP8, GPTQ, AWQ, compressed-tensors: "
        "docs/quantization.md), or leave the plugin out of this run: VLLM_PLUGINS= (or the "
        "plugins you use, without 'ernie45').",
        reason,
    )


class InTreeWhereNeeded:
    """Mixin of the plugin's registered model classes: where :func:`in_tree_reason` says so,
    constructing the class returns vLLM's in-tree class for ``in_tree_architecture``
    (built with the same ``vllm_config`` and ``prefix``) instead of the plugin's model."""

    # vLLM's registry name of the in-tree class that serves in this class's place.
    in_tree_architecture: ClassVar[str]

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        # vLLM builds models as cls(vllm_config=..., prefix=...); copy / pickle call
        # cls.__new__(cls) with no arguments and get the plugin's object.
        vllm_config = kwargs.get("vllm_config")
        reason = in_tree_reason(vllm_config) if vllm_config is not None else None
        if reason is None:
            return super().__new__(cls)
        warn_once(reason)
        from vllm_ernie45 import compat

        return compat.build_in_tree_model(
            cls.in_tree_architecture, vllm_config, kwargs.get("prefix", "")
        )
