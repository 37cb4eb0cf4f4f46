"""Tiny random ERNIE 4.5 checkpoints, written by the reference implementation itself.

``make_tiny_checkpoint(out_dir, variant)`` builds HF transformers' ``Ernie4_5_MoeForCausalLM``
(or ``Ernie4_5ForCausalLM``) with a small config, gives every tensor a random value with a
useful scale (including ``e_score_correction_bias``, which HF initialises to zeros but real
checkpoints do not), and writes it with ``save_pretrained`` (the same ``-PT`` tensor names as
the hub checkpoints) plus an ERNIE-style tokenizer.

Variants mirror the real family:

===============  ==========================================================================
``21b``          ERNIE-4.5-21B-A3B-like: 2 shared experts, dense layer 0, tied embeddings
``300b``         ERNIE-4.5-300B-A47B-like: no shared experts, 3 dense layers, untied LM head
``interval``     ``moe_layer_interval=2`` with an explicit ``moe_layer_end_index``
``bias``         ``use_bias=true`` (q/k/v/o and dense/shared FFN biases)
``legacy``       hub-style ``config.json`` (top-level ``rope_theta``, ``moe_capacity``,
                 ``moe_gate``, ``moe_use_aux_free``, ``num_nextn_predict_layers``, no
                 ``moe_layer_end_index``) and ERNIE's MTP head (``mtp_*`` tensors, one block)
``dense``        ERNIE-4.5-0.3B-like dense model (``Ernie4_5ForCausalLM``)
===============  ==========================================================================

Published checkpoints take further forms (keys left out of config.json, the correction bias
stored ``[E]``, the dense model's first architecture name, ...): :mod:`vllm_ernie45.testing.tiny.forms`
derives them from these.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

VARIANTS = ("21b", "300b", "interval", "bias", "legacy", "dense")

_BASE: dict[str, Any] = dict(
    vocab_size=1024,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,  # != hidden/heads on purpose; vLLM's CPU attention needs head_dim >= 32
    max_position_embeddings=2048,
    rms_norm_eps=1e-5,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    use_bias=False,
    tie_word_embeddings=True,
    rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
)
_MOE: dict[str, Any] = dict(
    moe_num_experts=8,
    moe_k=2,
    moe_intermediate_size=32,
    moe_num_shared_experts=2,
    moe_layer_start_index=1,
    moe_layer_end_index=-1,
    moe_layer_interval=1,
    moe_norm_min=1e-12,
)
_VARIANT_OVERRIDES: dict[str, dict[str, Any]] = {
    "21b": {},
    "300b": dict(
        num_hidden_layers=5,
        moe_num_shared_experts=0,
        moe_layer_start_index=3,
        tie_word_embeddings=False,
    ),
    "interval": dict(
        num_hidden_layers=6, moe_layer_interval=2, moe_layer_start_index=1, moe_layer_end_index=4
    ),
    "bias": dict(use_bias=True),
    "legacy": {},
    # head_dim left out: hidden_size / num_attention_heads = 32
    "dense": dict(hidden_size=128, head_dim=None),
}

def variant_config(variant: str) -> dict[str, Any]:
    """The HF config kwargs of a variant (MoE keys omitted for ``dense``)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown tiny ERNIE variant {variant!r}; choose from {VARIANTS}")
    kwargs = dict(_BASE)
    if variant != "dense":
        kwargs.update(_MOE)
    kwargs.update(_VARIANT_OVERRIDES[variant])
    return kwargs


def _randomise(model: Any, seed: int) -> None:
    """Random values at a scale that keeps activations O(1) and routing decisive, so greedy
    decoding is not a coin toss between near-equal logits."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("e_score_correction_bias"):
                # Comparable to the routing probabilities (~1/E): it changes selections.
                value = torch.randn(param.shape, generator=gen) * 0.05
            elif "norm" in name:
                value = 1.0 + 0.1 * torch.randn(param.shape, generator=gen)
            elif name.endswith(".bias"):
                value = 0.1 * torch.randn(param.shape, generator=gen)
            elif "embed_tokens" in name or "lm_head" in name:
                # Small enough that the residual stream does not just echo the input token
                # through a tied head (greedy output would repeat one token forever).
                value = 0.3 * torch.randn(param.shape, generator=gen)
            elif name.endswith("mlp.gate.weight"):
                value = 2.0 * torch.randn(param.shape, generator=gen) / math.sqrt(param.shape[-1])
            else:  # [out, in] projections
                value = torch.randn(param.shape, generator=gen) / math.sqrt(param.shape[-1])
            param.copy_(value.to(param.dtype))


def _to_dtype_router_fp32(model: Any, dtype: Any) -> None:
    """``model`` in ``dtype``, but for the router's tensors (``mlp.gate.weight``,
    ``moe_statics``), which keep their fp32 values as in the published checkpoints (and
    transformers' ``_keep_in_fp32_modules_strict``)."""
    router = {
        name: param.detach().clone()
        for name, param in model.named_parameters()
        if name.endswith("mlp.gate.weight") or "moe_statics" in name
    }
    model.to(dtype)
    for name, param in model.named_parameters():
        if name in router:
            param.data = router[name]


def _legacy_config(path: Path) -> None:
    """Rewrite a transformers-5 config.json in the hub's legacy key style."""
    cfg = json.loads(path.read_text())
    cfg["rope_theta"] = cfg.pop("rope_parameters")["rope_theta"]
    cfg.pop("moe_layer_end_index", None)
    cfg["moe_capacity"] = [cfg["moe_num_experts"]] * 3
    cfg["moe_gate"] = "topk"
    cfg["moe_use_aux_free"] = True
    cfg["num_nextn_predict_layers"] = 1
    cfg["torch_dtype"] = cfg.pop("dtype", "float32")
    path.write_text(json.dumps(cfg, indent=2) + "\n")


def _add_mtp_tensors(
    out_dir: Path, config: Any, seed: int, transposed: bool, agree: bool, cycle_seed: int | None = None,
    wrong_fraction: float | None = None,
) -> None:
    """Add ERNIE's MTP head (every tensor of ``vllm_ernie45.checkpoint.mtp_schema``) with random
    values at the scales of ``_randomise``; ``transposed``: ``mtp_linear_proj`` stored ``[2H, H]``
    as some 300B-A47B -PT checkpoints do; ``agree``: the whole checkpoint made to agree with
    its MTP head by construction (``vllm_ernie45.testing.tiny.mtp_agree``); ``cycle_seed``: and
    its untied head rewritten so the model walks a cycle through the vocabulary (``make_cycle``;
    ``wrong_fraction``: the head of a set acceptance, the final norm on half A)."""
    import torch
    from safetensors.torch import load_file, save_file

    from vllm_ernie45.checkpoint import mtp_schema
    from vllm_ernie45.config import arch_from_config
    from vllm_ernie45.testing.tiny.mtp_agree import cycle_permutation, make_agree, make_cycle, with_wrong_drafts

    gen = torch.Generator().manual_seed(seed + 1)
    file = out_dir / "model.safetensors"
    tensors = load_file(str(file))
    for name, spec in mtp_schema(arch_from_config(config)).tensors.items():
        if name in tensors:
            continue  # model.norm.weight: the main model's
        if "norm" in name:
            value = 1.0 + 0.1 * torch.randn(spec.shape, generator=gen)
        elif name.endswith(".bias"):
            value = 0.1 * torch.randn(spec.shape, generator=gen)
        else:
            value = torch.randn(spec.shape, generator=gen) / math.sqrt(spec.shape[-1])
            if transposed and name.startswith("model.mtp_linear_proj"):
                value = value.t().contiguous()
        tensors[name] = value.to(tensors["model.norm.weight"].dtype)
    if agree:
        make_agree(tensors.items())
    if cycle_seed is not None:
        if not agree:
            raise ValueError("mtp_cycle_seed rewrites an agreeing checkpoint's head: pass mtp_agree=True")
        sigma = cycle_permutation(config.vocab_size, cycle_seed)
        tau = None if wrong_fraction is None else with_wrong_drafts(sigma, wrong_fraction, cycle_seed)
        make_cycle(tensors.items(), sigma, tau)
    save_file(tensors, str(file), metadata={"format": "pt"})


def make_tiny_checkpoint(
    out_dir: str | Path,
    variant: str = "21b",
    seed: int = 0,
    dtype: str = "float32",
    with_tokenizer: bool = True,
    mtp_transposed: bool = False,
    mtp_agree: bool = False,
    mtp_cycle_seed: int | None = None,
    mtp_wrong_fraction: float | None = None,
    max_shard_size: str | None = None,
    **overrides: Any,
) -> Path:
    """Write a tiny random checkpoint of ``variant`` to ``out_dir`` and return the path.

    ``dtype``: of every tensor but the router's (gate weight and correction bias), which stay
    fp32 as in the published bf16 checkpoints. ``max_shard_size`` (e.g. ``"100KB"``): several
    safetensors files and ``model.safetensors.index.json``, as every published checkpoint.
    ``legacy`` carries ERNIE's MTP head (single-file checkpoints only); ``mtp_transposed``
    stores its ``mtp_linear_proj`` as ``[2H, H]``, ``mtp_agree`` makes main model and head
    agree by construction, ``mtp_cycle_seed`` (with ``mtp_agree`` and
    ``tie_word_embeddings=False``) makes the model's tokens walk a cycle through the vocabulary
    (``vllm_ernie45.testing.tiny.mtp_agree.make_cycle``); ``mtp_wrong_fraction`` builds the head
    of a set acceptance, which takes effect once the loaded draft's norm is switched
    (``make_loaded_models_cycle(..., head=False)``)."""
    import torch
    from transformers import (
        Ernie4_5Config,
        Ernie4_5ForCausalLM,
        Ernie4_5_MoeConfig,
        Ernie4_5_MoeForCausalLM,
    )

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    kwargs = variant_config(variant)
    kwargs.update(overrides)
    if variant == "dense":
        config, model_cls = Ernie4_5Config(**kwargs), Ernie4_5ForCausalLM
    else:
        config, model_cls = Ernie4_5_MoeConfig(**kwargs), Ernie4_5_MoeForCausalLM
    torch.manual_seed(seed)
    model = model_cls(config)
    _randomise(model, seed)
    _to_dtype_router_fp32(model, getattr(torch, dtype))
    model.save_pretrained(out, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    if variant == "legacy":
        _legacy_config(out / "config.json")
        config.num_nextn_predict_layers = 1
        _add_mtp_tensors(out, config, seed, mtp_transposed, mtp_agree, mtp_cycle_seed, mtp_wrong_fraction)
    if with_tokenizer:
        from vllm_ernie45.testing.tiny.tokenizer import build_ernie_tokenizer

        build_ernie_tokenizer(out)
    return out
