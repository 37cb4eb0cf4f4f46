#!/usr/bin/env python3
"""Parity on a GPU: the plugin (GPU defaults, the reference-router variant, FP8) and vLLM's
in-tree model vs HF transformers on the same GPU, on a tiny fp32 and a mid-size bf16 random
checkpoint (random non-zero ``e_score_correction_bias``); every other engine also against
the plugin's defaults.

Every engine runs in its own process (``python -m vllm_ernie45.testing.parity``); HF scores the
exact token ids vLLM produced, so logprob differences compare like with like.

    python scripts/gpu/gpu_parity.py --out out/gpu_parity.json            # plugin, reference router, in-tree
    python scripts/gpu/gpu_parity.py --runs mid-bf16:plugin,mid-bf16:plugin-fp8 --out out/fp8.json
    python scripts/gpu/gpu_parity.py --runs mid-bf16:plugin,mid-bf16:plugin-tp2,mid-bf16:plugin-tp2-ep,mid-bf16:plugin-pp2,mid-bf16:plugin-tp2-ep-eplb,mid-bf16:plugin-dp2-ep --out out/layouts.json   # 2 GPUs
    python scripts/gpu/gpu_parity.py --runs mid-bf16:plugin,mid-bf16:plugin-tp2-ep-fused,mid-bf16:plugin-dp2-ep-fused --out out/ep_fused.json   # 2 GPUs

``plugin-dp2-ep`` is vLLM's offline data-parallel launch: two engine processes (one GPU each)
with the prompts split between them, merged back in order before the comparison.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from vllm_ernie45.testing.parity import APPLY_MODEL_ENV, compare, run_data_parallel_in_children, run_in_child
from vllm_ernie45.testing.tiny.checkpoint import make_tiny_checkpoint

CHECKPOINTS = {
    # name: (variant, dtype, overrides)
    "tiny-fp32": ("21b", "float32", {}),
    "mid-bf16": (
        "21b",
        "bfloat16",
        dict(hidden_size=1024, num_attention_heads=8, num_key_value_heads=2, head_dim=128,
             num_hidden_layers=8, intermediate_size=2048, moe_num_experts=64, moe_k=6,
             moe_intermediate_size=256, moe_num_shared_experts=2),
    ),
}
EAGER = {"enforce_eager": True}
# name: (environment, vllm.LLM kwargs). Eager mode: parity is about the math, and eager
# saves a compile per engine.
ENGINES = {
    "plugin": ({}, EAGER),
    "plugin-reference-router": (
        {"VLLM_ERNIE45_ROUTER": "torch", "VLLM_ERNIE45_FUSE_SHARED_EXPERTS": "0"},
        EAGER,
    ),
    "plugin-fp8": ({}, {**EAGER, "quantization": "fp8"}),
    # Issue 29's per-step choice, compiled with CUDA graphs (the ops inside vLLM's graph):
    # steps above 8 tokens (the prefill) run the shared slices beside the routed call, the
    # decode steps inside it; beside0: every step beside (captured decode graphs too).
    "plugin-compiled": ({}, {}),
    "plugin-beside8": ({"VLLM_ERNIE45_SHARED_BESIDE_ABOVE": "8"}, {}),
    "plugin-beside0": ({"VLLM_ERNIE45_SHARED_BESIDE_ABOVE": "0"}, {}),
    "intree": ({"VLLM_PLUGINS": ""}, EAGER),
    # Parallel layouts (2 GPUs): each also compared with the one-GPU plugin run.
    "plugin-tp2": ({}, {**EAGER, "tensor_parallel_size": 2}),
    "plugin-tp2-ep": ({}, {**EAGER, "tensor_parallel_size": 2, "enable_expert_parallel": True}),
    # Shared experts fused under EP: one shared slice per rank (vllm_ernie45.expert_layout).
    "plugin-tp2-ep-fused": ({"VLLM_ERNIE45_FUSE_SHARED_EXPERTS": "1"},
                            {**EAGER, "tensor_parallel_size": 2, "enable_expert_parallel": True}),
    "plugin-pp2": ({}, {**EAGER, "pipeline_parallel_size": 2}),
    # EPLB with 2 redundant experts, rebalancing every 4 steps within the 16 generated tokens.
    "plugin-tp2-ep-eplb": ({}, {**EAGER, "tensor_parallel_size": 2, "enable_expert_parallel": True,
                                "enable_eplb": True,
                                "eplb_config": {"num_redundant_experts": 2, "window_size": 4, "step_interval": 4}}),
    # DP=2 + EP: run by run_data_parallel_in_children with DATA_PARALLEL's size.
    "plugin-dp2-ep": ({}, {**EAGER, "enable_expert_parallel": True}),
    "plugin-dp2-ep-fused": ({"VLLM_ERNIE45_FUSE_SHARED_EXPERTS": "1"}, {**EAGER, "enable_expert_parallel": True}),
}
DATA_PARALLEL = {"plugin-dp2-ep": 2, "plugin-dp2-ep-fused": 2}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="out/gpu_parity.json")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--runs", default=",".join(f"{c}:{e}" for c in CHECKPOINTS for e in ("plugin", "plugin-reference-router", "intree")),
                        help="checkpoint:engine pairs, comma-separated")
    args = parser.parse_args(argv)
    wanted = [tuple(r.split(":")) for r in args.runs.split(",") if r]
    work = Path(tempfile.mkdtemp(prefix="ernie-gpu-parity-"))
    report: dict = {}
    for ck, (variant, dtype, overrides) in CHECKPOINTS.items():
        engines = [e for c, e in wanted if c == ck]
        if not engines:
            continue
        model = make_tiny_checkpoint(work / ck, variant, dtype=dtype, with_tokenizer=False, **overrides)
        runs = {}
        for engine in engines:
            env, vllm_args = ENGINES[engine]
            out = work / f"{ck}.{engine}.json"
            if engine in DATA_PARALLEL:
                runs[engine] = run_data_parallel_in_children(
                    model, out, DATA_PARALLEL[engine], {**APPLY_MODEL_ENV, **env}, dtype=dtype,
                    max_tokens=args.max_tokens, vllm_args=vllm_args)
            else:
                runs[engine] = run_in_child("vllm", model, out, {**APPLY_MODEL_ENV, **env}, dtype=dtype,
                                            max_tokens=args.max_tokens, vllm_args=vllm_args)
            ref = work / f"{ck}.{engine}.hf.json"
            reference = run_in_child("hf", model, ref, dtype=dtype, device="cuda", max_tokens=args.max_tokens,
                                     track=out)
            cmp = compare(runs[engine], reference)
            report[f"{ck} {engine} vs hf"] = {**cmp.__dict__, "model_class": runs[engine].get("model_class"),
                                             "fused_shared": runs[engine].get("fused_shared"),
                                             "shared_beside": runs[engine].get("shared_beside")}
            print(f"{ck:10s} {engine:24s} vs HF      : {cmp.summary()}", flush=True)
        for other in [e for e in runs if e != "plugin"]:
            if "plugin" in runs:
                cmp = compare(runs[other], runs["plugin"])
                report[f"{ck} {other} vs plugin"] = cmp.__dict__
                print(f"{ck:10s} {other} vs plugin (tokens; logprobs where both report): {cmp.summary()}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
