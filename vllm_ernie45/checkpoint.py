"""The tensor layouts of ERNIE 4.5 checkpoints, as data.

A :class:`CheckpointSchema` names every tensor of one checkpoint format and says, for each:

* the shape the model takes it in, and the other stored forms it is accepted in, each with
  its transform (:class:`Reshape`: the correction bias stored ``[1, E]`` or ``[E]``;
  :class:`Transpose`: a 2-D tensor stored the other way round);
* where it goes (:class:`Target`: module and parameter of the vLLM model) and how
  (:class:`Stack`: one shard of a merged parameter -- q/k/v of ``qkv_proj``, gate/up of
  ``gate_up_proj``, one expert of the fused experts; :class:`Split`: cut into several
  experts of the fused MoE);
* what its absence means (:data:`REQUIRED`, :data:`OPTIONAL`, :data:`ZEROS`: the
  parameter is zero, as the reference initialises it, or :data:`IF_FORMAT_HAS`: required
  where the checkpoint has that kind of tensor elsewhere -- quantized checkpoints).

:mod:`vllm_ernie45.loader` reads every schema the same way, so a new checkpoint format is a
new schema function here. Two exist: :func:`pt_schema` (the -PT main model) and
:func:`mtp_schema` (its multi-token-prediction block).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from vllm_ernie45.config import ErnieArch

REQUIRED, OPTIONAL, ZEROS = "required", "optional", "zeros"
# Required where the checkpoint stores the same tensor for another layer or expert (its name
# with layer and expert numbers wildcarded, ``vllm_ernie45.loader.tensor_kind``): a parameter a
# quantization method registers that the format may not store at all (vLLM fills it:
# ``g_idx_sort_indices``, ``g_idx`` without activation ordering), but that a checkpoint
# storing it must store for every layer.
IF_FORMAT_HAS = "if_format_has"


class CheckpointError(ValueError):
    """A checkpoint that does not match the model config; the message names the tensor or file."""


@dataclass(frozen=True)
class Target:
    """The vLLM parameter a tensor fills: ``param`` of the module at dotted path ``module``."""

    module: str
    param: str


@dataclass(frozen=True)
class Reshape:
    """Stored as ``stored`` (the same elements, another shape); reshaped to the model's shape."""

    stored: tuple[int, ...]

    def stored_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return self.stored

    def apply(self, tensor, shape: tuple[int, ...]):
        return tensor.reshape(shape)


@dataclass(frozen=True)
class Transpose:
    """A 2-D tensor stored the other way round; transposed."""

    def stored_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return shape[::-1]

    def apply(self, tensor, shape: tuple[int, ...]):
        return tensor.t().contiguous()


@dataclass(frozen=True)
class Stack:
    """One shard of a merged parameter: ``"q"``/``"k"``/``"v"`` of ``qkv_proj``, ``0``/``1``
    of ``gate_up_proj``, or ``"w1"``/``"w3"``/``"w2"`` of logical expert ``expert`` of the
    fused experts."""

    shard: str | int
    expert: int | None = None


@dataclass(frozen=True)
class Split:
    """Cut into ``pieces`` along ``dim``; piece j is shard ``shard`` of fused expert
    ``first_expert + j`` (the shared experts run inside the fused MoE)."""

    shard: str
    first_expert: int
    pieces: int
    dim: int


@dataclass(frozen=True)
class TensorSpec:
    """One checkpoint tensor. ``target`` None: read and shape-checked, not loaded (the head
    a tied checkpoint may carry; the embedding fills it). ``linear``: (out, in) where the
    tensor is the weight of a linear layer (or of one expert projection), which a
    pre-quantized checkpoint stores in its format's tensors instead
    (:func:`vllm_ernie45.quantized.specialise`). ``shape`` None, or None in a dimension: left
    to the parameter's vLLM weight loader (quantized tensors only)."""

    shape: tuple[int | None, ...] | None
    target: Target | None
    place: Stack | Split | None = None  # None: the whole parameter
    stored_as: tuple[Reshape | Transpose, ...] = ()
    if_absent: str = REQUIRED
    linear: tuple[int, int] | None = None

    def transform_for(self, stored: tuple[int, ...]) -> Reshape | Transpose | None:
        """The transform that takes a tensor stored as ``stored`` to ``shape`` (None: it has it)."""
        for form in self.stored_as:
            if form.stored_shape(self.shape) == stored != self.shape:
                return form
        return None

    def accepts(self, stored: tuple[int, ...]) -> bool:
        return stored == self.shape or self.transform_for(stored) is not None


@dataclass(frozen=True)
class CheckpointSchema:
    """Every tensor of one checkpoint format, and how the loader speaks of the others.

    ``skips``: names the schema does not list but leaves to another reader (skipped; with
    ``skip_note`` logged, formatted with ``count`` and ``first``); any other unlisted name is
    an error (``unexpected``, formatted with ``name`` and ``shape``). ``missing`` is the
    error for absent REQUIRED tensors (formatted with ``missing``), ``zeros_note`` the INFO
    line for absent ZEROS tensors (``count``, ``first``)."""

    tensors: dict[str, TensorSpec]
    skips: Callable[[str], bool]
    unexpected: str
    missing: str
    skip_note: str = ""
    zeros_note: str = ""
    shapes: dict[str, tuple[int, ...]] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "shapes", {n: s.shape for n, s in self.tensors.items()})

    def required(self) -> list[str]:
        return [n for n, s in self.tensors.items() if s.if_absent == REQUIRED]


# Tensors of the multi-token-prediction head (``model.mtp_block.0.*``, ``mtp_emb_norm`` ...).
MTP_MARKER = "mtp_"
# The MTP block's tensors in a -PT checkpoint, index 0 of ``num_nextn_predict_layers``.
MTP_PREFIX = "model.mtp_"


def is_mtp_tensor(name: str) -> bool:
    return any(part.startswith(MTP_MARKER) for part in name.split("."))


# Tensor names the config decisions (``vllm_ernie45.config_from_tensors``) look for.
def router_tensor(layer: int) -> str:
    return f"model.layers.{layer}.mlp.gate.weight"


def shared_experts_tensor(layer: int) -> str:
    return f"model.layers.{layer}.mlp.shared_experts.gate_proj.weight"


def attention_tensor(layer: int, proj: str, kind: str = "weight") -> str:
    return f"model.layers.{layer}.self_attn.{proj}_proj.{kind}"


LM_HEAD = "lm_head.weight"


def _linear(
    tensors: dict[str, TensorSpec],
    ckpt: str,
    out_features: int,
    in_features: int,
    bias: bool,
    target_module: str,
    shard: str | int | None,
) -> None:
    place = Stack(shard) if shard is not None else None
    tensors[f"{ckpt}.weight"] = TensorSpec(
        (out_features, in_features), Target(target_module, "weight"), place, linear=(out_features, in_features)
    )
    if bias:
        tensors[f"{ckpt}.bias"] = TensorSpec((out_features,), Target(target_module, "bias"), place)


def _mlp(tensors: dict[str, TensorSpec], ckpt: str, target: str, hidden: int, inter: int, bias: bool) -> None:
    """A SwiGLU FFN: gate and up stacked into ``gate_up_proj``."""
    _linear(tensors, f"{ckpt}.gate_proj", inter, hidden, bias, f"{target}.gate_up_proj", 0)
    _linear(tensors, f"{ckpt}.up_proj", inter, hidden, bias, f"{target}.gate_up_proj", 1)
    _linear(tensors, f"{ckpt}.down_proj", hidden, inter, bias, f"{target}.down_proj", None)


def _attention(tensors: dict[str, TensorSpec], ckpt: str, target: str, arch: ErnieArch) -> None:
    """q/k/v stacked into ``qkv_proj``, and ``o_proj``."""
    H, bias = arch.hidden_size, arch.use_bias
    for proj, size in (("q", arch.q_size), ("k", arch.kv_size), ("v", arch.kv_size)):
        _linear(tensors, f"{ckpt}.{proj}_proj", size, H, bias, f"{target}.qkv_proj", proj)
    _linear(tensors, f"{ckpt}.o_proj", H, arch.q_size, bias, f"{target}.o_proj", None)


def _norms(tensors: dict[str, TensorSpec], ckpt: str, target: str, hidden: int) -> None:
    for norm in ("input_layernorm", "post_attention_layernorm"):
        tensors[f"{ckpt}.{norm}.weight"] = TensorSpec((hidden,), Target(f"{target}.{norm}", "weight"))


_EXPERT_PROJS = (("gate_proj", "w1", "w13_weight"), ("up_proj", "w3", "w13_weight"), ("down_proj", "w2", "w2_weight"))


def _experts(tensors: dict[str, TensorSpec], mlp: str, arch: ErnieArch, fused_shared: bool) -> None:
    """Routed experts stacked into the fused experts; shared experts as their own MLP, or --
    ``fused_shared`` -- split into ``S`` always-selected experts ``E .. E+S-1`` (SwiGLU is
    separable along the intermediate dimension)."""
    H, E, inter = arch.hidden_size, arch.num_experts, arch.moe_intermediate_size
    experts = f"{mlp}.experts"
    for e in range(E):
        for proj, shard, param in _EXPERT_PROJS:
            shape = (H, inter) if shard == "w2" else (inter, H)
            tensors[f"{experts}.{e}.{proj}.weight"] = TensorSpec(
                shape, Target(experts, param), Stack(shard, e), linear=shape
            )
    S = arch.num_shared_experts
    if S and fused_shared:
        wide = arch.shared_intermediate_size
        for proj, shard, param in _EXPERT_PROJS:
            shape, dim = ((H, wide), 1) if shard == "w2" else ((wide, H), 0)
            tensors[f"{mlp}.shared_experts.{proj}.weight"] = TensorSpec(
                shape, Target(experts, param), Split(shard, E, S, dim), linear=shape
            )
    elif S:
        _mlp(tensors, f"{mlp}.shared_experts", f"{mlp}.shared_experts", H, arch.shared_intermediate_size, arch.use_bias)


def pt_schema(arch: ErnieArch, fused_shared: bool = False) -> CheckpointSchema:
    """The -PT checkpoint of the main model (the MTP block's tensors are skipped).

    The correction bias is published ``[1, E]`` and accepted as ``[E]``; absent, it is zero
    where the config says ``moe_use_aux_free: false`` (the reference initialises it so), an
    error otherwise. A tied checkpoint may carry ``lm_head.weight`` too (checked, not loaded).
    ``fused_shared``: the shared experts go into the fused-MoE weights.
    """
    H, V = arch.hidden_size, arch.vocab_size
    tensors: dict[str, TensorSpec] = {
        "model.embed_tokens.weight": TensorSpec((V, H), Target("model.embed_tokens", "weight")),
        "model.norm.weight": TensorSpec((H,), Target("model.norm", "weight")),
    }
    if arch.tie_word_embeddings:
        tensors[LM_HEAD] = TensorSpec((V, H), None, if_absent=OPTIONAL)
    else:
        tensors[LM_HEAD] = TensorSpec((V, H), Target("lm_head", "weight"), linear=(V, H))
    if arch.lm_head_bias:
        tensors["lm_head.bias"] = TensorSpec((V,), Target("lm_head", "bias"))

    E = arch.num_experts
    for i in range(arch.num_layers):
        layer = f"model.layers.{i}"
        _norms(tensors, layer, layer, H)
        _attention(tensors, f"{layer}.self_attn", f"{layer}.self_attn", arch)
        mlp = f"{layer}.mlp"
        if not arch.is_moe_layer(i):
            _mlp(tensors, mlp, mlp, H, arch.intermediate_size, arch.use_bias)
            continue
        tensors[router_tensor(i)] = TensorSpec((E, H), Target(f"{mlp}.gate", "weight"))
        tensors[f"{mlp}.moe_statics.e_score_correction_bias"] = TensorSpec(
            (E,),
            Target(mlp, "e_score_correction_bias"),
            stored_as=(Reshape((1, E)),),
            if_absent=REQUIRED if arch.moe_use_aux_free else ZEROS,
        )
        _experts(tensors, mlp, arch, fused_shared)

    layout = (
        f"{arch.num_layers} layers, MoE layers {arch.moe_layer_indices or 'none'}, "
        f"{arch.num_shared_experts} shared experts, use_bias={arch.use_bias}, "
        f"tie_word_embeddings={arch.tie_word_embeddings}"
    )
    return CheckpointSchema(
        tensors,
        skips=is_mtp_tensor,
        unexpected="unexpected checkpoint tensor {name!r} (shape {shape}): it is not part of an "
        f"ERNIE 4.5 checkpoint with this config ({layout})",
        missing="checkpoint is missing {missing} the model config requires (" + layout + ")",
        skip_note="Set aside {count} multi-token-prediction tensors ({first}, ...; "
        f"num_nextn_predict_layers={arch.num_mtp_layers}): the target model does not use them.",
        zeros_note="The checkpoint has no expert-selection correction bias ({first}, {count} "
        "MoE layer(s)) and its config says moe_use_aux_free: false: the bias is zero, as in "
        "the reference.",
    )


def mtp_schema(arch: ErnieArch) -> CheckpointSchema:
    """ERNIE 4.5's multi-token-prediction head (one block) and where it goes in
    :class:`vllm_ernie45.mtp.ErnieMTPDraft`; every other tensor of the checkpoint (the main
    model's) is skipped.

    ``mtp_emb_norm`` / ``mtp_hidden_norm`` (RMSNorm of the next token's embedding and of the
    trunk's hidden state), ``mtp_linear_proj`` (``[H, 2H]``; some 300B-A47B -PT checkpoints
    store it ``[2H, H]``, accepted and transposed), ``mtp_block`` (a decoder layer with a dense
    SwiGLU FFN of ``intermediate_size``), and the model's final ``norm``, which the draft
    applies before the shared LM head as the reference does.
    """
    H, bias = arch.hidden_size, arch.use_bias
    proj = "model.mtp_linear_proj"
    tensors: dict[str, TensorSpec] = {
        "model.norm.weight": TensorSpec((H,), Target("norm", "weight")),
        "model.mtp_emb_norm.0.weight": TensorSpec((H,), Target("model.mtp_emb_norm", "weight")),
        "model.mtp_hidden_norm.0.weight": TensorSpec((H,), Target("model.mtp_hidden_norm", "weight")),
        f"{proj}.0.weight": TensorSpec((H, 2 * H), Target(proj, "weight"), stored_as=(Transpose(),)),
    }
    if bias:
        tensors[f"{proj}.0.bias"] = TensorSpec((H,), Target(proj, "bias"))
    block, target = "model.mtp_block.0", "model.mtp_block"
    _norms(tensors, block, target, H)
    _attention(tensors, f"{block}.self_attn", f"{target}.self_attn", arch)
    _mlp(tensors, f"{block}.mlp", f"{target}.mlp", H, arch.intermediate_size, bias)
    return CheckpointSchema(
        tensors,
        skips=lambda name: not name.startswith(MTP_PREFIX),
        unexpected="unexpected MTP tensor {name!r} (shape {shape}): not part of ERNIE 4.5's MTP "
        f"head with this config (use_bias={bias}; only index 0 of num_nextn_predict_layers is used)",
        missing="speculative decoding with method 'mtp' needs ERNIE 4.5's MTP head, but the "
        "checkpoint lacks {missing}. Use a -PT checkpoint that ships the MTP block "
        "(num_nextn_predict_layers: 1), or serve without --speculative-config.",
    )
