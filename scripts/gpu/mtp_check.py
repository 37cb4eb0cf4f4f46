#!/usr/bin/env python3
"""MTP speculative decoding is lossless, on any device: greedy tokens with
``speculative_config={"method": "mtp", "num_speculative_tokens": k}`` equal those without, on
tiny ERNIE checkpoints with the MTP head -- random (the draft rarely agrees: the rejection path)
and agreeing by construction (``vllm_ernie45.testing.tiny.mtp_agree``: the acceptance path) -- and the
draft's acceptance on each, from vLLM's counters. Each engine runs in its own process
(``python -m vllm_ernie45.testing.parity``).

    python scripts/gpu/mtp_check.py --ks 1,2,3 --out out/mtp_check.json          # CPU, eager
    python scripts/gpu/mtp_check.py --ks 1,3 --compiled --dtype bfloat16         # GPU: compiled, CUDA graphs
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from vllm_ernie45.testing.parity import APPLY_MODEL_ENV, default_prompts, run_in_child
from vllm_ernie45.testing.tiny.checkpoint import make_tiny_checkpoint


def run_engine(model: Path, out: Path, prompts: Path, vllm_args: dict, max_tokens: int, dtype: str,
               env: dict | None = None) -> dict:
    return run_in_child("vllm", model, out, {**APPLY_MODEL_ENV, **(env or {})}, prompts=prompts,
                        max_tokens=max_tokens, top_k=1, dtype=dtype, vllm_args=vllm_args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ks", default="1,2,3", help="num_speculative_tokens values")
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--prompts", type=int, default=4, help="a batch of this many prompts")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--compiled", action="store_true", help="torch.compile + CUDA graphs (not eager)")
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--draft", default="plugin", choices=("plugin", "intree"))
    parser.add_argument("--only", default="random,agree", help="which checkpoints: random, agree")
    parser.add_argument("--out", default="out/mtp_check.json")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="ernie-mtp-check-"))
    prompts = work / "prompts.json"
    prompts.write_text(json.dumps(default_prompts(1024, n=args.prompts)))
    base = {"enforce_eager": not args.compiled, "tensor_parallel_size": args.tensor_parallel_size}
    env = {"VLLM_ERNIE45_MTP_DRAFT": args.draft}
    report: dict = {"args": vars(args), "checkpoints": {}}
    ok = True
    for name, agree in (("random", False), ("agree", True)):
        if name not in args.only.split(","):
            continue
        model = make_tiny_checkpoint(work / name, "legacy", dtype=args.dtype, with_tokenizer=False, mtp_agree=agree)
        plain = run_engine(model, work / f"{name}.plain.json", prompts, base, args.max_tokens, args.dtype, env)
        expected = [o["tokens"] for o in plain["outputs"]]
        runs = {}
        for k in (int(x) for x in args.ks.split(",")):
            spec = {**base, "speculative_config": {"method": "mtp", "num_speculative_tokens": k}}
            res = run_engine(model, work / f"{name}.k{k}.json", prompts, spec, args.max_tokens, args.dtype, env)
            tokens = [o["tokens"] for o in res["outputs"]]
            counts = res["spec_decode"]
            acceptance = counts["accepted_tokens"] / max(counts["draft_tokens"], 1)
            mismatch = [(i, next(j for j, (a, b) in enumerate(zip(t, e)) if a != b))
                        for i, (t, e) in enumerate(zip(tokens, expected)) if t != e]
            runs[f"k={k}"] = {"tokens_equal": tokens == expected, "first_mismatch": mismatch,
                              "acceptance": round(acceptance, 4), "tokens": tokens, **counts}
            ok &= tokens == expected
            print(f"{name:6s} k={k}: tokens equal {tokens == expected} {mismatch}, acceptance {acceptance:.3f} "
                  f"({counts['accepted_tokens']}/{counts['draft_tokens']} drafted, {counts['drafts']} steps)",
                  flush=True)
        report["checkpoints"][name] = {"plain_tokens": expected, "runs": runs}
    report["ok"] = ok
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print("mtp_check: " + ("OK" if ok else "FAILED: tokens differ"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
