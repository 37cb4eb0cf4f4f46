"""The -PT checkpoint layout of ERNIE 4.5: every tensor name, its shape, and the parameter it fills.

One function, :func:`checkpoint_schema`, knows the names. The loader checks a checkpoint
against it (missing, unexpected, mis-shaped tensors are errors that name the tensor) and uses
each entry's :class:`Target` to find the vLLM parameter and shard to load it into.
"""

from __future__ import annotations

from dataclasses import dataclass

from vllm_ernie45.config import ErnieArch


class CheckpointError(ValueError):
    """A checkpoint that does not match the model config; the message names the tensor."""


@dataclass(frozen=True)
class Target:
    """Where a checkpoint tensor goes.

    module: dotted path of the vLLM module inside the CausalLM (``model.layers.3.self_attn.qkv_proj``)
    param:  the parameter's name inside that module (``weight``, ``w13_weight``, ...)
    shard:  the shard id the parameter's weight_loader takes (``"q"``, ``0``, ``"w1"``), or None
    expert: the logical expert id, for per-expert tensors
    split:  > 0 for a shared-expert tensor run inside the fused MoE: cut it into ``split``
            slices along the intermediate dimension, slice j filling expert ``expert + j``
    """

    module: str
    param: str
    shard: str | int | None = None
    expert: int | None = None
    split: int = 0


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    target: Target
    layer: int | None = None  # decoder layer index, for pipeline-parallel locality
    # A 2-D tensor stored transposed (shape reversed) is accepted and transposed on load.
    transposed_ok: bool = False


# Tensors of the multi-token-prediction head (``model.mtp_block.0.*``, ``mtp_emb_norm`` ...);
# the target model does not use them.
MTP_MARKER = "mtp_"


def is_mtp_tensor(name: str) -> bool:
    return any(part.startswith(MTP_MARKER) for part in name.split("."))


def _linear(
    schema: dict[str, TensorSpec],
    ckpt: str,
    out_features: int,
    in_features: int,
    bias: bool,
    target_module: str,
    shard: str | int | None,
    layer: int | None,
) -> None:
    schema[f"{ckpt}.weight"] = TensorSpec(
        (out_features, in_features), Target(target_module, "weight", shard), layer
    )
    if bias:
        schema[f"{ckpt}.bias"] = TensorSpec((out_features,), Target(target_module, "bias", shard), layer)


def _mlp(
    schema: dict[str, TensorSpec], ckpt: str, hidden: int, inter: int, bias: bool, layer: int
) -> None:
    _linear(schema, f"{ckpt}.gate_proj", inter, hidden, bias, f"{ckpt}.gate_up_proj", 0, layer)
    _linear(schema, f"{ckpt}.up_proj", inter, hidden, bias, f"{ckpt}.gate_up_proj", 1, layer)
    _linear(schema, f"{ckpt}.down_proj", hidden, inter, bias, f"{ckpt}.down_proj", None, layer)


def _expert_targets(
    schema: dict[str, TensorSpec],
    ckpt: str,
    experts_module: str,
    shapes: tuple[tuple[int, int], tuple[int, int]],
    expert: int,
    split: int,
    layer: int,
) -> None:
    up_shape, down_shape = shapes
    for proj, shard, shape in (
        ("gate_proj", "w1", up_shape),
        ("up_proj", "w3", up_shape),
        ("down_proj", "w2", down_shape),
    ):
        param = "w2_weight" if shard == "w2" else "w13_weight"
        schema[f"{ckpt}.{proj}.weight"] = TensorSpec(
            shape, Target(experts_module, param, shard, expert=expert, split=split), layer
        )


def checkpoint_schema(arch: ErnieArch, fused_shared: bool = False) -> dict[str, TensorSpec]:
    """All tensors a -PT checkpoint of this architecture holds (MTP tensors aside).

    ``lm_head.weight`` is listed only for untied models; a tied checkpoint may still carry
    it (see :data:`OPTIONAL_WHEN_TIED`). ``fused_shared``: the shared experts' tensors go
    into the fused-MoE weights as experts ``E ..`` instead of a separate MLP.
    """
    H, bias = arch.hidden_size, arch.use_bias
    schema: dict[str, TensorSpec] = {
        "model.embed_tokens.weight": TensorSpec(
            (arch.vocab_size, H), Target("model.embed_tokens", "weight")
        ),
        "model.norm.weight": TensorSpec((H,), Target("model.norm", "weight")),
    }
    if not arch.tie_word_embeddings:
        schema["lm_head.weight"] = TensorSpec((arch.vocab_size, H), Target("lm_head", "weight"))
    if arch.lm_head_bias:
        schema["lm_head.bias"] = TensorSpec((arch.vocab_size,), Target("lm_head", "bias"))

    for i in range(arch.num_layers):
        layer = f"model.layers.{i}"
        for norm in ("input_layernorm", "post_attention_layernorm"):
            schema[f"{layer}.{norm}.weight"] = TensorSpec((H,), Target(f"{layer}.{norm}", "weight"), i)
        attn = f"{layer}.self_attn"
        for proj, size in (("q", arch.q_size), ("k", arch.kv_size), ("v", arch.kv_size)):
            _linear(schema, f"{attn}.{proj}_proj", size, H, bias, f"{attn}.qkv_proj", proj, i)
        _linear(schema, f"{attn}.o_proj", H, arch.q_size, bias, f"{attn}.o_proj", None, i)

        mlp = f"{layer}.mlp"
        if not arch.is_moe_layer(i):
            _mlp(schema, mlp, H, arch.intermediate_size, bias, i)
            continue
        E, inter = arch.num_experts, arch.moe_intermediate_size
        schema[f"{mlp}.gate.weight"] = TensorSpec((E, H), Target(f"{mlp}.gate", "weight"), i)
        schema[f"{mlp}.moe_statics.e_score_correction_bias"] = TensorSpec(
            (1, E), Target(mlp, "e_score_correction_bias"), i
        )
        experts = f"{mlp}.experts"
        if arch.num_shared_experts and fused_shared:
            S, wide = arch.num_shared_experts, arch.shared_intermediate_size
            _expert_targets(schema, f"{mlp}.shared_experts", experts, ((wide, H), (H, wide)), E, S, i)
        elif arch.num_shared_experts:
            _mlp(schema, f"{mlp}.shared_experts", H, arch.shared_intermediate_size, bias, i)
        for e in range(E):
            _expert_targets(schema, f"{experts}.{e}", experts, ((inter, H), (H, inter)), e, 0, i)
    return schema


OPTIONAL_WHEN_TIED = "lm_head.weight"

# The MTP block's tensors in a -PT checkpoint, index 0 of ``num_nextn_predict_layers``.
MTP_PREFIX = "model.mtp_"


def mtp_schema(arch: ErnieArch) -> dict[str, TensorSpec]:
    """The tensors of ERNIE 4.5's multi-token-prediction head (one block), and where they go
    in :class:`vllm_ernie45.mtp.ErnieMTPDraft`.

    ``mtp_emb_norm`` / ``mtp_hidden_norm`` (RMSNorm of the next token's embedding and of the
    trunk's hidden state), ``mtp_linear_proj`` (``[H, 2H]``; some 300B-A47B -PT checkpoints
    store it ``[2H, H]``, accepted and transposed), ``mtp_block`` (a decoder layer with a dense
    SwiGLU FFN of ``intermediate_size``), and the model's final ``norm``, which the draft
    applies before the shared LM head as the reference does.
    """
    H, bias = arch.hidden_size, arch.use_bias
    schema: dict[str, TensorSpec] = {
        "model.norm.weight": TensorSpec((H,), Target("norm", "weight")),
        "model.mtp_emb_norm.0.weight": TensorSpec((H,), Target("model.mtp_emb_norm", "weight")),
        "model.mtp_hidden_norm.0.weight": TensorSpec((H,), Target("model.mtp_hidden_norm", "weight")),
        "model.mtp_linear_proj.0.weight": TensorSpec(
            (H, 2 * H), Target("model.mtp_linear_proj", "weight"), transposed_ok=True
        ),
    }
    if bias:
        schema["model.mtp_linear_proj.0.bias"] = TensorSpec((H,), Target("model.mtp_linear_proj", "bias"))
    block, target = "model.mtp_block.0", "model.mtp_block"
    for norm in ("input_layernorm", "post_attention_layernorm"):
        schema[f"{block}.{norm}.weight"] = TensorSpec((H,), Target(f"{target}.{norm}", "weight"))
    for proj, size in (("q", arch.q_size), ("k", arch.kv_size), ("v", arch.kv_size)):
        _linear(schema, f"{block}.self_attn.{proj}_proj", size, H, bias, f"{target}.self_attn.qkv_proj", proj, None)
    _linear(schema, f"{block}.self_attn.o_proj", H, arch.q_size, bias, f"{target}.self_attn.o_proj", None, None)
    inter = arch.intermediate_size
    _linear(schema, f"{block}.mlp.gate_proj", inter, H, bias, f"{target}.mlp.gate_up_proj", 0, None)
    _linear(schema, f"{block}.mlp.up_proj", inter, H, bias, f"{target}.mlp.gate_up_proj", 1, None)
    _linear(schema, f"{block}.mlp.down_proj", H, inter, bias, f"{target}.mlp.down_proj", None, None)
    return schema

