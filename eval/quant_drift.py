#!/usr/bin/env python3
"""Drift of weight-only low-bit experts against bf16, layer by layer (CPU, HF reference).

The batch-1 decode paths measured on the GPU (docs/performance.md) quantize weights only:
``--quantization experts_int8`` (int8 MoE experts, one scale per output channel, bf16
activations) and ``--quantization fp8`` with ``VLLM_TEST_FORCE_FP8_MARLIN=1`` (FP8 E4M3
weights, one scale per expert tensor -- ``w13`` and ``w2`` of each expert --, bf16
activations), on the experts only (``VLLM_ERNIE45_QUANT_SCOPE=experts``) or on every linear
layer. This emulates exactly those weight roundings in HF's ``Ernie4_5_MoeForCausalLM`` on the
mid-size random checkpoint of ``scripts/gpu/gpu_parity.py`` (bf16 weights, fp32 router, random
non-zero correction bias), computes in fp32 so that only the weights differ, and reports per
decoder layer the relative error ``‖h_q − h‖ / ‖h‖`` of its output, and at the top the
logits' relative error, the share of positions whose arg-max changes and the largest
``|Δ logprob|`` of the reference's arg-max token. The drift of computing in bf16 instead of
fp32 (no quantization) is reported beside them, as the scale a bf16 engine already lives with.

The plugin fuses the shared experts into the routed call on CUDA, as experts ``E..E+S-1``
(one per ``moe_intermediate_size`` slice), so they are quantized too, slice by slice.

    python eval/quant_drift.py --out out/quant_drift.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

# The mid-size checkpoint of scripts/gpu/gpu_parity.py.
MID = dict(hidden_size=1024, num_attention_heads=8, num_key_value_heads=2, head_dim=128,
           num_hidden_layers=8, intermediate_size=2048, moe_num_experts=64, moe_k=6,
           moe_intermediate_size=256, moe_num_shared_experts=2)


def int8_per_channel(w: torch.Tensor) -> torch.Tensor:
    """vLLM's experts_int8: symmetric int8, one scale per output channel (row)."""
    scale = w.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / 127.0
    return (w / scale).round().clamp(-127, 127) * scale


def fp8_per_tensor(w: torch.Tensor) -> torch.Tensor:
    """vLLM's online FP8: E4M3 with one scale per tensor (per expert for MoE weights)."""
    scale = w.abs().amax().clamp_min(1e-12) / torch.finfo(torch.float8_e4m3fn).max
    return (w / scale).to(torch.float8_e4m3fn).to(w.dtype) * scale


def quantize_model(model: torch.nn.Module, scheme: str, inter: int) -> None:
    """Round the weights the scheme quantizes, in place. ``scheme``: ``experts_int8``,
    ``fp8_experts`` or ``fp8_all``."""
    per_tensor = scheme.startswith("fp8")
    q = fp8_per_tensor if per_tensor else int8_per_channel
    with torch.no_grad():
        for layer in model.model.layers:
            mlp = layer.mlp
            experts = getattr(mlp, "experts", None)
            if experts is not None:
                for e in range(experts.gate_up_proj.shape[0]):  # [E, 2I, H] and [E, H, I]
                    experts.gate_up_proj[e] = q(experts.gate_up_proj[e])
                    experts.down_proj[e] = q(experts.down_proj[e])
                shared = getattr(mlp, "shared_experts", None)
                if shared is not None:  # fused as experts of one moe_intermediate_size slice each
                    for s in range(shared.gate_proj.weight.shape[0] // inter):
                        rows = slice(s * inter, (s + 1) * inter)
                        gate_up = torch.cat([shared.gate_proj.weight[rows], shared.up_proj.weight[rows]])
                        gate_up = q(gate_up)
                        shared.gate_proj.weight[rows] = gate_up[:inter]
                        shared.up_proj.weight[rows] = gate_up[inter:]
                        shared.down_proj.weight[:, rows] = q(shared.down_proj.weight[:, rows])
            elif scheme == "fp8_all":  # a dense layer's MLP
                for proj in (mlp.gate_proj, mlp.up_proj, mlp.down_proj):
                    proj.weight.copy_(q(proj.weight))
            if scheme == "fp8_all":
                attn = layer.self_attn
                for proj in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj):
                    proj.weight.copy_(q(proj.weight))


def run(model: torch.nn.Module, ids: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    outs: list[torch.Tensor] = []
    hooks = [layer.register_forward_hook(lambda _m, _i, o: outs.append((o[0] if isinstance(o, tuple) else o).float()))
             for layer in model.model.layers]
    with torch.no_grad():
        logits = model(ids).logits.float()
    for h in hooks:
        h.remove()
    return outs, logits


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def compare(ref: tuple, other: tuple) -> dict:
    (h_ref, l_ref), (h, l) = ref, other
    top = l_ref.argmax(-1, keepdim=True)
    dlp = (l.log_softmax(-1).gather(-1, top) - l_ref.log_softmax(-1).gather(-1, top)).abs()
    return {
        "layer_output_rel_err": [round(rel(a, b), 6) for a, b in zip(h, h_ref)],
        "logits_rel_err": round(rel(l, l_ref), 6),
        "argmax_changed_share": round(float((l.argmax(-1) != l_ref.argmax(-1)).float().mean()), 6),
        "max_abs_dlogprob_of_ref_argmax": round(float(dlp.max()), 6),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="out/quant_drift.json")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from transformers import AutoModelForCausalLM

    from vllm_ernie45.testing.tiny.checkpoint import make_tiny_checkpoint

    torch.manual_seed(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        path = make_tiny_checkpoint(Path(tmp) / "mid", "21b", seed=args.seed, dtype="bfloat16",
                                    with_tokenizer=False, **MID)

        def load(dtype: torch.dtype) -> torch.nn.Module:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
            for layer in model.model.layers:  # the router stays fp32, as in vLLM
                gate = getattr(layer.mlp, "gate", None)
                if gate is not None:
                    gate.float()
            return model

        ids = torch.randint(0, load(torch.float32).config.vocab_size, (args.prompts, args.tokens))
        ref = run(load(torch.float32), ids)
        report = {"checkpoint": {"dtype": "bfloat16", **MID}, "prompts": args.prompts,
                  "tokens": args.tokens, "reference": "bf16 weights, fp32 compute"}
        bf16_model = load(torch.bfloat16)
        report["bf16 compute (no quantization)"] = compare(ref, run(bf16_model, ids))
        for scheme in ("experts_int8", "fp8_experts", "fp8_all"):
            model = load(torch.float32)
            quantize_model(model, scheme, MID["moe_intermediate_size"])
            report[scheme] = compare(ref, run(model, ids))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    for name, r in report.items():
        if isinstance(r, dict) and "logits_rel_err" in r:
            layers = ", ".join(f"{x:.4f}" for x in r["layer_output_rel_err"])
            print(f"{name:32s} logits rel err {r['logits_rel_err']:.4f}  argmax changed "
                  f"{100 * r['argmax_changed_share']:.1f} %  max|Δlogprob| {r['max_abs_dlogprob_of_ref_argmax']:.4f}"
                  f"\n{'':32s} layers: {layers}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
