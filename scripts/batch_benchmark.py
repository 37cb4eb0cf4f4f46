#!/usr/bin/env python3
"""Throughput of the batch runner (vllm_ernie45.batch) against one plain ``LLM.generate``
over the same prompts, on the same engine, alternating (generate, runner) ``--repeats``
times; prints each time and the ratio of the medians (runner throughput / generate's;
target >= 0.95). Not a test: a measurement (docs/batch.md has the figures).

    python scripts/batch_benchmark.py                      # tiny random checkpoint, CPU
    python scripts/batch_benchmark.py --model baidu/ERNIE-4.5-21B-A3B-PT --prompts 2000 \\
        --max-tokens 256 --engine-arg max_num_seqs=256     # GPU

Every request generates exactly ``--max-tokens`` tokens (``ignore_eos``), greedy, so both sides
do the same work. The runner writes its JSONL output as a real job does (to a temp dir).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

WORDS = ("the river crossed an old stone bridge while merchants argued about the price of salt "
         "and children ran between the carts shouting names of distant cities").split()  # fmt: skip


def prompts(n: int, words: int) -> list[str]:
    out = []
    for i in range(n):
        k = words + (i % 7) * 3  # some spread of lengths, as a real job has
        out.append(f"Story {i}: " + " ".join(WORDS[(i + j) % len(WORDS)] for j in range(k)))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="default: a tiny random ERNIE 4.5 MoE made in a temp dir")
    p.add_argument("--prompts", type=int, default=400)
    p.add_argument("--prompt-words", type=int, default=20)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--vary", action="store_true",
                   help="request i generates max_tokens * (1 + i %% 4) / 4 tokens (lengths differ, as in real jobs)")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--window", type=int, default=0, help="runner window (default: its own)")
    p.add_argument("--engine-arg", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--windowed", action="store_true",
                   help="also time LLM.generate over consecutive windows (the design not chosen)")
    p.add_argument("--out", help="write the figures as JSON here")
    args = p.parse_args()

    from vllm import LLM, SamplingParams

    from vllm_ernie45.batch import _engine_arg, build_parser, default_window, run_batch
    from vllm_ernie45.child_run import close_llm

    tmp = Path(tempfile.mkdtemp(prefix="batch-bench-"))
    model = args.model
    if model is None:
        from vllm_ernie45.testing.tiny.checkpoint import make_tiny_checkpoint

        model = str(make_tiny_checkpoint(tmp / "tiny", "21b"))
    kwargs = dict(model=model, dtype=args.dtype, seed=0)
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        kwargs.update(gpu_memory_utilization=0.3, dtype="float32" if args.dtype == "auto" else args.dtype)
    kwargs.update(dict(_engine_arg(a) for a in args.engine_arg))
    llm = LLM(**kwargs)

    texts = prompts(args.prompts, args.prompt_words)
    lengths = [args.max_tokens * (1 + i % 4) // 4 if args.vary else args.max_tokens for i in range(len(texts))]
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, seed=0) for n in lengths]
    jobs = tmp / "input.jsonl"
    with jobs.open("w") as fh:
        for i, (text, n) in enumerate(zip(texts, lengths)):
            fh.write(json.dumps({"id": i, "prompt": text, "max_tokens": n, "ignore_eos": True}) + "\n")
    runner_args = build_parser().parse_args(["--model", model, "-i", str(jobs), "-o", "-", "--no-progress"])
    runner_args.window = args.window

    llm.generate(texts[:16], params[:16], use_tqdm=False)  # warm-up: first-use work on neither side
    gen_s, run_s, win_s = [], [], []
    window = args.window or default_window(llm)
    for r in range(args.repeats):
        t = time.perf_counter()
        outs = llm.generate(texts, params, use_tqdm=False)
        gen_s.append(time.perf_counter() - t)
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        out = tmp / f"out{r}.jsonl"
        t = time.perf_counter()
        summary = run_batch(llm, jobs, out, runner_args)
        run_s.append(time.perf_counter() - t)
        assert summary.done == len(texts) and summary.generated_tokens == tokens, (summary, tokens)
        if args.windowed:
            t = time.perf_counter()
            for i in range(0, len(texts), window):
                llm.generate(texts[i : i + window], params[i : i + window], use_tqdm=False)
            win_s.append(time.perf_counter() - t)
            print(f"repeat {r + 1}: LLM.generate over windows of {window}: {win_s[-1]:.2f} s", flush=True)
        print(f"repeat {r + 1}: LLM.generate {gen_s[-1]:.2f} s, runner {run_s[-1]:.2f} s "
              f"({tokens} generated tokens each)", flush=True)  # fmt: skip
    close_llm(llm)
    g, b = statistics.median(gen_s), statistics.median(run_s)
    result = {
        "model": model, "prompts": len(texts), "max_tokens": args.max_tokens, "vary": args.vary, "repeats": args.repeats,
        "generate_s": gen_s, "runner_s": run_s, "generate_tok_s": tokens / g, "runner_tok_s": tokens / b,
        "ratio_runner_over_generate": g / b, "window": window,
    }  # fmt: skip
    if win_s:
        result.update(windowed_s=win_s, ratio_windowed_over_generate=g / statistics.median(win_s))
        print(f"LLM.generate over windows: {g / statistics.median(win_s):.3f} x one LLM.generate")
    print(f"LLM.generate {tokens / g:.1f} gen tok/s, runner {tokens / b:.1f} gen tok/s: "
          f"runner / generate = {g / b:.3f} (median of {args.repeats})")  # fmt: skip
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
