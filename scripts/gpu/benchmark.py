#!/usr/bin/env python3
"""Same-run benchmark: vLLM's in-tree ERNIE model vs the plugin's, on one GPU.

Each implementation runs in its own process (the in-tree one with ``VLLM_PLUGINS=`` so the
plugin is not loaded; plugin variants with their ``VLLM_ERNIE45_*`` switches), one after
the other, on the full-size config with ``load_format=dummy``, greedy, ``ignore_eos``,
random prompt token ids. Scenarios (``--scenarios``):

    startup   seconds from LLM() to ready (torch.compile + CUDA graphs)
    bs1       1 x (128 in / 256 out): ms per output token
    bs32      32 x (512 / 256): output tok/s
    bs1000    1000 x (512 / 256): output and total tok/s
    prefill   200 x (2048 / 32): total tok/s

    python scripts/gpu/benchmark.py --config ../shared/gpu/ernie-4.5-21b-a3b-pt.config.json \
        --impls intree,plugin --out out/bench.json

Prints a table with plugin / in-tree ratios and writes JSON; ``scripts/gpu/plot_benchmark.py``
draws the PNG.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vllm_ernie45.child_run import ChildFailed, close_llm, judge_child, write_result

# name -> environment of the implementation's process
IMPLS = {
    "intree": {"VLLM_PLUGINS": ""},
    "plugin": {},
    "plugin-torchrouter": {"VLLM_ERNIE45_ROUTER": "torch"},
    "plugin-unfused": {"VLLM_ERNIE45_FUSE_SHARED_EXPERTS": "0"},
    # Under --enable-expert-parallel: shared experts fused, one slice per rank (EP=2).
    "plugin-fused": {"VLLM_ERNIE45_FUSE_SHARED_EXPERTS": "1"},
    "plugin-baseline": {"VLLM_ERNIE45_ROUTER": "torch", "VLLM_ERNIE45_FUSE_SHARED_EXPERTS": "0"},
    # With --quantization fp8: weight-only FP8 (Marlin kernels, bf16 activations) instead of
    # FP8 x FP8 -- vLLM's switch for it on GPUs that have FP8 units.
    "plugin-marlin": {"VLLM_TEST_FORCE_FP8_MARLIN": "1"},
    "plugin-marlin-experts": {"VLLM_TEST_FORCE_FP8_MARLIN": "1", "VLLM_ERNIE45_QUANT_SCOPE": "experts"},
    "plugin-experts": {"VLLM_ERNIE45_QUANT_SCOPE": "experts"},
    "intree-marlin": {"VLLM_PLUGINS": "", "VLLM_TEST_FORCE_FP8_MARLIN": "1"},
}


def impl_env(name: str) -> dict[str, str]:
    """The environment of implementation NAME's process: its switches, and a compile cache of
    its own -- vLLM's cache key leaves out the plugin's switches, so two implementations that
    share a cache could run each other's compiled graph."""
    root = os.environ.get("VLLM_CACHE_ROOT") or os.path.expanduser("~/.cache/vllm")
    return {**os.environ, "VLLM_WORKER_MULTIPROC_METHOD": "spawn",
            "VLLM_CACHE_ROOT": os.path.join(root, f"impl-{name}"), **IMPLS[name]}


SCENARIOS = ("startup", "bs1", "bs32", "bs1000", "prefill")
# name -> (requests, input tokens, output tokens)
SHAPES = {"bs1": (1, 128, 256), "bs32": (32, 512, 256), "bs1000": (1000, 512, 256), "prefill": (200, 2048, 32)}


def _prompts(n: int, length: int, vocab: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt_token_ids": [rng.randrange(10, vocab) for _ in range(length)]} for _ in range(n)]


def child(args: argparse.Namespace) -> int:
    # Before the engine starts: its process must accept the pickled apply_model function.
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
    from vllm import LLM, SamplingParams

    model_dir = Path(tempfile.mkdtemp(prefix="ernie-bench-"))
    shutil.copy(args.config, model_dir / "config.json")
    vocab = json.loads(Path(args.config).read_text())["vocab_size"]
    engine_args = dict(
        model=str(model_dir),
        load_format="dummy",
        skip_tokenizer_init=True,
        dtype=args.dtype,
        max_model_len=4096,
        gpu_memory_utilization=args.gpu_memory_utilization,
        seed=0,
        enable_prefix_caching=False,
    )
    if args.quantization:
        engine_args["quantization"] = args.quantization
    if args.tensor_parallel_size > 1:
        engine_args["tensor_parallel_size"] = args.tensor_parallel_size
    if args.enable_expert_parallel:
        engine_args["enable_expert_parallel"] = True
    t0 = time.perf_counter()
    llm = LLM(**engine_args)
    startup = time.perf_counter() - t0
    facts = {}
    try:
        from vllm_ernie45.testing.parity import model_facts

        facts = llm.apply_model(model_facts)[0]
    except Exception as err:  # the in-tree run has no plugin loaded; facts are optional
        facts = {"note": f"apply_model failed: {err}"}
    result: dict = {"impl": args.child, "startup_s": round(startup, 1), **facts}

    for scenario in args.scenarios:
        if scenario == "startup":
            continue
        n, prompt_len, out_len = SHAPES[scenario]
        prompts = _prompts(n, prompt_len, vocab, seed=1)
        params = SamplingParams(temperature=0.0, max_tokens=out_len, ignore_eos=True, detokenize=False)
        llm.generate(_prompts(min(n, 8), prompt_len, vocab, seed=2), params, use_tqdm=False)  # warm-up
        times = []
        for _ in range(args.repeats if scenario != "bs1000" else 1):
            t0 = time.perf_counter()
            outs = llm.generate(prompts, params, use_tqdm=False)
            times.append(time.perf_counter() - t0)
        elapsed = min(times)
        generated = sum(len(o.outputs[0].token_ids) for o in outs)
        assert generated == n * out_len, (generated, n * out_len)
        entry = {"elapsed_s": round(elapsed, 3), "output_tok_s": round(generated / elapsed, 1),
                 "total_tok_s": round((generated + n * prompt_len) / elapsed, 1)}
        if scenario == "bs1":
            entry["ms_per_token"] = round(1000 * elapsed / out_len, 3)
        result[scenario] = entry
        print(f"[{args.child}] {scenario}: {entry}", flush=True)
    write_result(args.out, result, close_llm(llm))
    return 0


def headline(result: dict, scenario: str) -> float | None:
    if scenario == "startup":
        return result.get("startup_s")
    entry = result.get(scenario)
    if not entry:
        return None
    key = {"bs1": "ms_per_token", "bs32": "output_tok_s", "bs1000": "output_tok_s",
           "prefill": "total_tok_s"}[scenario]
    return entry[key]


UNITS = {"startup": "s (lower is better)", "bs1": "ms/token (lower)", "bs32": "out tok/s",
         "bs1000": "out tok/s", "prefill": "total tok/s"}


def table(results: dict[str, dict], scenarios: list[str], base: str = "intree") -> str:
    impls = list(results)
    lines = ["| scenario | unit | " + " | ".join(impls) + " | " +
             " | ".join(f"{i} ÷ {base}" for i in impls if i != base) + " |"]
    lines.append("|" + "---|" * (2 + len(impls) + len([i for i in impls if i != base])))
    for sc in scenarios:
        vals = {i: headline(results[i], sc) for i in impls}
        row = [sc, UNITS[sc]] + [("" if vals[i] is None else f"{vals[i]:,}") for i in impls]
        for i in impls:
            if i == base:
                continue
            b, v = vals.get(base), vals[i]
            if not b or not v:
                row.append("")
            else:  # speed-up: >1 means the implementation is faster
                row.append(f"{(b / v if sc in ('startup', 'bs1') else v / b):.3f}×")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def gpu_facts() -> dict:
    """The GPU's name and vLLM's version, where there is a GPU."""
    try:
        import torch
        import vllm

        return {"gpu": torch.cuda.get_device_name(0), "vllm": vllm.__version__}
    except Exception:  # no CUDA device: the report says nothing about one
        return {}


def bench_parser(description: str, scenarios: str, out: str) -> argparse.ArgumentParser:
    """The arguments every same-call benchmark here takes (this one, mtp_benchmark.py)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", required=True)
    parser.add_argument("--scenarios", default=scenarios)
    parser.add_argument("--out", default=out)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.88)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    return parser


def parse_bench_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """``bench_parser``'s args with ``scenarios`` as a list and ``--out``'s folder made."""
    args = parser.parse_args(argv)
    args.scenarios = [s for s in args.scenarios.split(",") if s]
    if not args.child:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    return args


def child_command(script: str, child: str, args: argparse.Namespace, part: Path) -> list[str]:
    """The command line of one measured engine (a child process), from ``bench_parser``'s args."""
    return [sys.executable, script, "--child", child, "--config", args.config, "--out", str(part),
            "--scenarios", ",".join(args.scenarios), "--dtype", args.dtype,
            "--gpu-memory-utilization", str(args.gpu_memory_utilization), "--repeats", str(args.repeats)]


def run_child(name: str, cmd: list[str], env: dict, part: Path, results: dict) -> None:
    """Run one measured engine; its judged result goes to ``results[name]`` (a failure is printed)."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env)
    print(f"[{name}] process finished rc={proc.returncode} in {time.perf_counter() - t0:.0f} s", flush=True)
    try:
        results[name] = judge_child(proc.returncode, part)
    except ChildFailed as err:
        print(f"[{name}] FAILED: {err}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser(__doc__.splitlines()[0], ",".join(SCENARIOS), "out/bench.json")
    parser.add_argument("--impls", default="intree,plugin")
    parser.add_argument("--quantization", default=None)
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--enable-expert-parallel", action="store_true")
    args = parse_bench_args(parser, argv)
    if args.child:
        return child(args)
    out = Path(args.out)
    results: dict[str, dict] = {}
    for impl in args.impls.split(","):
        part = out.with_name(f"{out.stem}.{impl}.json")
        cmd = child_command(__file__, impl, args, part)
        if args.quantization:
            cmd += ["--quantization", args.quantization]
        cmd += ["--tensor-parallel-size", str(args.tensor_parallel_size)]
        if args.enable_expert_parallel:
            cmd.append("--enable-expert-parallel")
        run_child(impl, cmd, impl_env(impl.split("@")[0]), part, results)
    base = "intree" if "intree" in results else next(iter(results), "intree")
    report = {"config": args.config, "dtype": args.dtype, "quantization": args.quantization,
              "tensor_parallel_size": args.tensor_parallel_size,
              "enable_expert_parallel": args.enable_expert_parallel,
              "results": results, "table": table(results, args.scenarios, base)}
    report.update(gpu_facts())
    out.write_text(json.dumps(report, indent=1))
    print(report["table"])
    return 0 if len(results) == len(args.impls.split(",")) else 1


if __name__ == "__main__":
    sys.exit(main())
