#!/usr/bin/env python3
"""Same-call benchmark: vLLM's in-tree ERNIE model vs the plugin's, on one GPU.

RULE: a change to a hot path (vllm_ernie45/layers.py, routing*.py, model.py's forward, the
fused-MoE tables in vllm_ernie45/moe_configs/, anything a forward step runs) lands only with
all four scenarios (bs1, bs32, bs1000, prefill) measured against in-tree in ONE call of this
script on the GPU it targets, with --repeats 3 or more, first run and steady state both
reported (docs/performance.md, "Benchmark discipline"). Issue 29: after hot-path changes
measured at batch 1 alone, single runs on an H200 read 0.74x at 1000 x 512/256 and nobody could
tell code, first-use compiles and machine apart.

Each implementation runs in its own process (the in-tree one with ``VLLM_PLUGINS=`` so the
plugin is not loaded; plugin variants with their ``VLLM_ERNIE45_*`` switches), one after
the other, each with its own vLLM compile cache and Triton cache (so neither reuses the
other's compiled kernels or graphs, and each pays its own first-use costs), on the full-size
config with ``load_format=dummy``. The engine and the prompts are those of the reference
script (``../shared/bench/reference_bench.py``): max_num_seqs 256, max_model_len 4096,
gpu_memory_utilization 0.88, greedy, ``ignore_eos``, random prompt ids in [3, 100000) from one
``random.Random(0)`` stream, fresh prompts for every run, an 8 x 64/16 warm-up, then the
scenarios in this order (``--scenarios`` picks a subset, order kept):

    startup   seconds from LLM() to ready (torch.compile + CUDA graphs)
    bs1       1 x (128 in / 256 out): ms per output token
    bs32      32 x (512 / 256): output tok/s
    bs1000    1000 x (512 / 256): output tok/s
    prefill   200 x (2048 / 32): total tok/s

Every scenario runs ``--repeats`` times in a row on the same engine (1000 x 512/256 too). Run 1
is the first use of that shape in the process (it pays any Triton JIT compile the warm-up did
not); the report gives it apart from the steady state, the median of runs 2.. with their
min-max spread. vLLM's kernel JIT monitor runs verbose, and the compiles each run paid are
counted from the engine's log (``jit``).

    python scripts/gpu/benchmark.py --config ../shared/gpu/ernie-4.5-21b-a3b-pt.config.json \
        --impls intree,plugin --repeats 3 --out out/bench.json

Prints a table with plugin / in-tree ratios (first run and steady state) and writes JSON;
``scripts/gpu/plot_benchmark.py`` draws the PNG (steady state).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
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
    # Issue 29: the plugin without its start-up compile of the eager fused-MoE kernels (d1095ec's behaviour).
    "plugin-nowarmup": {"VLLM_ERNIE45_MOE_WARMUP": "0"},
    # The plugin on vLLM's own fused-MoE tables / default configs instead of its tuned ones.
    "plugin-notables": {"VLLM_TUNED_CONFIG_FOLDER": "/nonexistent-vllm-ernie45-tables"},
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
    """The environment of implementation NAME's process: its switches, and compile caches of
    its own -- vLLM's (its cache key leaves out the plugin's switches, so two implementations
    that share a cache could run each other's compiled graph) and Triton's (so neither finds
    the other's kernels compiled, and each pays its own first-use compiles, as on a fresh
    machine; the reference script shares both, so a second process there starts warmer)."""
    root = os.path.join(os.environ.get("VLLM_CACHE_ROOT") or os.path.expanduser("~/.cache/vllm"), f"impl-{name}")
    return {**os.environ, "VLLM_WORKER_MULTIPROC_METHOD": "spawn", "VLLM_CACHE_ROOT": root,
            "TRITON_CACHE_DIR": os.path.join(root, "triton"), **impl_switches(name)}


def impl_switches(name: str) -> dict[str, str]:
    """IMPLS[name]; ``plugin-beside<N>``: the plugin with VLLM_ERNIE45_SHARED_BESIDE_ABOVE=N (fused
    shared experts beside the routed call in steps of more than N tokens; issue 29)."""
    if name.startswith("plugin-beside") and name[len("plugin-beside"):].isdigit():
        return {"VLLM_ERNIE45_SHARED_BESIDE_ABOVE": name[len("plugin-beside"):]}
    if name not in IMPLS:
        raise SystemExit(f"unknown implementation {name!r}: {sorted(IMPLS)} or plugin-beside<N>")
    return IMPLS[name]


def write_quantized_config(config: str, scheme: str, path: Path) -> Path:
    """``config`` with the ``quantization_config`` of compressed-tensors ``scheme`` (every linear
    layer but the router and the head, experts included, as published quantized ERNIE
    checkpoints), written to ``path``."""
    from vllm_ernie45.testing.tiny.quantize import ROUTER_IGNORE, _scheme, quantization_config

    data = json.loads(Path(config).read_text())
    data["quantization_config"] = quantization_config([_scheme(scheme)], ["lm_head", ROUTER_IGNORE])
    path.write_text(json.dumps(data, indent=1))
    return path


def jit_keys_env(path: Path) -> dict[str, str]:
    """The environment entries that make every process record its Triton compiles into PATH."""
    site = Path(__file__).resolve().parent / "jit_keys_site"
    pythonpath = os.environ.get("PYTHONPATH", "")
    return {"PYTHONPATH": str(site) + (os.pathsep + pythonpath if pythonpath else ""),
            "VLLM_ERNIE45_JIT_KEYS": str(path.resolve())}


SCENARIOS = ("startup", "bs1", "bs32", "bs1000", "prefill")
# name -> (requests, input tokens, output tokens), in the reference script's order.
SHAPES = {"bs1": (1, 128, 256), "bs32": (32, 512, 256), "bs1000": (1000, 512, 256), "prefill": (200, 2048, 32)}
WARMUP = (8, 64, 16)
MAX_NUM_SEQS = 256  # the reference script's engine
JIT_MARK = "JIT compilation during inference"
RUN_MARK = "@@bench-run "


def _prompts(n: int, length: int, vocab: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt_token_ids": [rng.randrange(10, vocab) for _ in range(length)]} for _ in range(n)]


def _reference_prompts(rng: random.Random, n: int, length: int) -> list[dict]:
    """The reference script's prompts: ids in [3, 100000) drawn from one shared stream."""
    return [{"prompt_token_ids": [rng.randrange(3, 100000) for _ in range(length)]} for _ in range(n)]


def summarize(runs: list[dict], key: str) -> dict:
    """``runs`` of one scenario -> the first run and the steady state (median of runs 2..,
    with min and max), for the entry ``key``; one run only: the steady state is that run."""
    first = runs[0][key]
    rest = [r[key] for r in runs[1:]] or [first]
    return {"first": first, "median": statistics.median(rest), "min": min(rest), "max": max(rest),
            "n_steady": len(runs) - 1}


def child(args: argparse.Namespace) -> int:
    # Before the engine starts: its process must accept the pickled apply_model function.
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
    from vllm import LLM, SamplingParams

    model_dir = Path(tempfile.mkdtemp(prefix="ernie-bench-"))
    shutil.copy(args.config, model_dir / "config.json")
    engine_args = dict(
        model=str(model_dir),
        load_format="dummy",
        skip_tokenizer_init=True,
        dtype=args.dtype,
        max_model_len=4096,
        gpu_memory_utilization=args.gpu_memory_utilization,
        seed=0,
        max_num_seqs=args.max_num_seqs,
    )
    if args.jit_monitor_verbose:
        engine_args["jit_monitor_verbose"] = True
    if args.quantization:
        engine_args["quantization"] = args.quantization
    if args.tensor_parallel_size > 1:
        engine_args["tensor_parallel_size"] = args.tensor_parallel_size
    if args.enable_expert_parallel:
        engine_args["enable_expert_parallel"] = True
    t0 = time.perf_counter()
    llm = LLM(**engine_args)
    startup = time.perf_counter() - t0
    routing = {"routing": "dummy"}
    if args.routing == "spread":  # after start-up: CUDA graphs read the changed values in place
        from vllm_ernie45.testing.dummy_routing import spread_routing

        routing = llm.apply_model(spread_routing)[0]
    facts = {}
    try:
        from vllm_ernie45.testing.parity import model_facts

        facts = llm.apply_model(model_facts)[0]
    except Exception as err:  # the in-tree run has no plugin loaded; facts are optional
        facts = {"note": f"apply_model failed: {err}"}
    result: dict = {"impl": args.child, "startup_s": round(startup, 1), "max_num_seqs": args.max_num_seqs,
                    "repeats": args.repeats, **routing, **facts}
    rng = random.Random(0)

    def timed(name: str, n: int, prompt_len: int, out_len: int, rep: int) -> dict:
        prompts = _reference_prompts(rng, n, prompt_len)
        params = SamplingParams(temperature=0.0, max_tokens=out_len, ignore_eos=True, detokenize=False)
        print(f"{RUN_MARK}start {name} {rep}", flush=True)
        t = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - t
        print(f"{RUN_MARK}end {name} {rep}", flush=True)
        generated = sum(len(o.outputs[0].token_ids) for o in outs)
        assert generated == n * out_len, (generated, n * out_len)
        run = {"run": rep, "elapsed_s": round(elapsed, 3), "output_tok_s": round(generated / elapsed, 1),
               "total_tok_s": round((generated + n * prompt_len) / elapsed, 1),
               "ms_per_token": round(1000 * elapsed / out_len, 3)}
        print(f"[{args.child}] {name} run {rep}: {run}", flush=True)
        return run

    timed("warmup", *WARMUP, 1)
    for scenario in args.scenarios:
        if scenario == "startup":
            continue
        n, prompt_len, out_len = SHAPES[scenario]
        runs = [timed(scenario, n, prompt_len, out_len, rep) for rep in range(1, args.repeats + 1)]
        key = HEADLINE_KEY[scenario]
        # Top-level keys: the steady state (median of runs 2..), as headline() reads them.
        entry = {k: statistics.median([r[k] for r in (runs[1:] or runs)])
                 for k in ("elapsed_s", "output_tok_s", "total_tok_s", "ms_per_token")}
        entry.update({"runs": runs, "first": runs[0], "summary": summarize(runs, key)})
        result[scenario] = entry
    write_result(args.out, result, close_llm(llm))
    return 0


HEADLINE_KEY = {"bs1": "ms_per_token", "bs32": "output_tok_s", "bs1000": "output_tok_s", "prefill": "total_tok_s"}


def headline(result: dict, scenario: str, which: str = "steady") -> float | None:
    """A scenario's number: ``steady`` (median of runs 2..; the only run in older JSON),
    ``first`` (run 1), ``min`` / ``max`` (of runs 2..)."""
    if scenario == "startup":
        return result.get("startup_s")
    entry = result.get(scenario)
    if not entry:
        return None
    key = HEADLINE_KEY[scenario]
    if which == "steady" or "summary" not in entry:
        return entry[key]
    return entry["summary"][which]


UNITS = {"startup": "s (lower is better)", "bs1": "ms/token (lower)", "bs32": "out tok/s",
         "bs1000": "out tok/s", "prefill": "total tok/s"}


def _ratio(scenario: str, base: float | None, value: float | None) -> str:
    if not base or not value:
        return ""
    # speed-up: >1 means the implementation is faster
    return f"{(base / value if scenario in ('startup', 'bs1') else value / base):.3f}×"


def _fmt(v: float | None) -> str:
    return "" if v is None else f"{v:,.3f}" if v < 100 else f"{v:,.1f}"


def table(results: dict[str, dict], scenarios: list[str], base: str = "intree") -> str:
    """One row per scenario and phase (run 1; steady state = median of runs 2.. [min-max]),
    one column per implementation, then each one's ratio to ``base``."""
    impls = list(results)
    others = [i for i in impls if i != base]
    lines = ["| scenario | unit | phase | " + " | ".join(impls) + " | " +
             " | ".join(f"{i} ÷ {base}" for i in others) + " |"]
    lines.append("|" + "---|" * (3 + len(impls) + len(others)))
    for sc in scenarios:
        phases = [("", "steady")] if sc == "startup" else [("run 1", "first"), ("steady", "steady")]
        for label, which in phases:
            cells = []
            for i in impls:
                v = headline(results[i], sc, which)
                cell = _fmt(v)
                entry = results[i].get(sc)
                if which == "steady" and isinstance(entry, dict) and "summary" in entry:
                    s = entry["summary"]
                    cell += f" [{_fmt(s['min'])}–{_fmt(s['max'])}]"
                    jit = [r.get("jit", 0) for r in entry["runs"][1:]]
                    if any(jit):
                        cell += f" jit {sum(jit)}"
                elif which == "first" and isinstance(entry, dict) and entry.get("first", {}).get("jit"):
                    cell += f" jit {entry['first']['jit']}"
                cells.append(cell)
            ratios = [_ratio(sc, headline(results[base], sc, which) if base in results else None,
                             headline(results[i], sc, which)) for i in others]
            lines.append("| " + " | ".join([sc, UNITS[sc], label] + cells + ratios) + " |")
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


def run_child_counting_jit(name: str, cmd: list[str], env: dict, part: Path, results: dict) -> None:
    """``run_child``, with the child's output (and its engine's) read line by line: echoed, and
    the kernel JIT compiles vLLM logs counted per timed run (between the child's run markers)
    into the result's ``runs[*]["jit"]``."""
    t0 = time.perf_counter()
    counts: dict[tuple[str, int], int] = {}
    current: tuple[str, int] | None = None
    outside = 0
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1, errors="replace")
    assert proc.stdout is not None
    for line in proc.stdout:
        sys.stdout.write(line)
        if line.startswith(RUN_MARK):
            what, scenario, rep = line[len(RUN_MARK):].split()
            current = (scenario, int(rep)) if what == "start" else None
        elif JIT_MARK in line:
            if current is None:
                outside += 1
            else:
                counts[current] = counts.get(current, 0) + 1
    returncode = proc.wait()
    sys.stdout.flush()
    print(f"[{name}] process finished rc={returncode} in {time.perf_counter() - t0:.0f} s; "
          f"JIT compiles logged outside timed runs: {outside}", flush=True)
    try:
        result = judge_child(returncode, part)
    except ChildFailed as err:
        print(f"[{name}] FAILED: {err}", flush=True)
        return
    result["jit_outside_runs"] = outside
    for scenario, entry in result.items():
        if isinstance(entry, dict) and "runs" in entry:
            for run in entry["runs"]:
                run["jit"] = counts.get((scenario, run["run"]), 0)
    results[name] = result


def main(argv: list[str] | None = None) -> int:
    rule = __doc__.split("\n\n")[1]
    parser = bench_parser(__doc__.splitlines()[0] + " " + rule, ",".join(SCENARIOS), "out/bench.json")
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--impls", default="intree,plugin",
                        help="comma-separated, run in this order: " + ", ".join(IMPLS))
    parser.add_argument("--quantization", default=None)
    parser.add_argument("--quant-scheme", default=None,
                        help="benchmark a pre-quantized checkpoint of this compressed-tensors scheme "
                             "(vllm_ernie45/testing/tiny/quantize.py SCHEMES, e.g. w4a16-g32, fp8-dynamic; "
                             "router and head unquantized) with dummy weights: --config plus its "
                             "quantization_config, written next to --out")
    parser.add_argument("--routing", choices=("dummy", "spread"), default="dummy",
                        help="dummy: vLLM's dummy weights as they are, which send every token to the same "
                             "top-k experts in every layer (the reference script's workload); spread: "
                             "correction biases zeroed and router gates redrawn after start-up, so tokens "
                             "spread over all experts as in real serving (vllm_ernie45/testing/dummy_routing.py)")
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--enable-expert-parallel", action="store_true")
    parser.add_argument("--max-num-seqs", type=int, default=MAX_NUM_SEQS,
                        help="engine max_num_seqs (default %(default)s, the reference script's)")
    parser.add_argument("--no-jit-monitor-verbose", dest="jit_monitor_verbose", action="store_false",
                        help="do not ask vLLM to log every kernel JIT compile (then only the first is logged)")
    parser.add_argument("--jit-keys", action="store_true",
                        help="record every Triton compile of each implementation's processes with its full "
                             "specialisation key into OUT.IMPL.jit.jsonl (scripts/gpu/jit_keys_site)")
    parser.add_argument("--warm-caches", action="store_true",
                        help="keep each implementation's compile caches from earlier calls on this machine "
                             "(default: emptied at its first run in this call, so every call starts cold; "
                             "2026-12-07 a second call's in-tree found the first call's and started in 56 s, not 95)")
    args = parse_bench_args(parser, argv)
    if args.child:
        return child(args)
    out = Path(args.out)
    if args.quant_scheme:
        args.config = str(write_quantized_config(args.config, args.quant_scheme, out.with_name(f"{out.stem}.config.json")))
    results: dict[str, dict] = {}
    emptied: set[str] = set()  # cache folders emptied in this call
    for impl in args.impls.split(","):
        part = out.with_name(f"{out.stem}.{impl}.json")
        cmd = child_command(__file__, impl, args, part)
        if args.quantization:
            cmd += ["--quantization", args.quantization]
        cmd += ["--tensor-parallel-size", str(args.tensor_parallel_size), "--max-num-seqs", str(args.max_num_seqs),
                "--routing", args.routing]
        if args.enable_expert_parallel:
            cmd.append("--enable-expert-parallel")
        if not args.jit_monitor_verbose:
            cmd.append("--no-jit-monitor-verbose")
        env = impl_env(impl.split("@")[0])
        if not args.warm_caches and env["VLLM_CACHE_ROOT"] not in emptied:
            shutil.rmtree(env["VLLM_CACHE_ROOT"], ignore_errors=True)
            emptied.add(env["VLLM_CACHE_ROOT"])
        if args.jit_keys:
            env.update(jit_keys_env(out.with_name(f"{out.stem}.{impl}.jit.jsonl")))
        run_child_counting_jit(impl, cmd, env, part, results)
    base = "intree" if "intree" in results else next(iter(results), "intree")
    report = {"config": args.config, "dtype": args.dtype, "quantization": args.quantization, "routing": args.routing,
              "tensor_parallel_size": args.tensor_parallel_size,
              "enable_expert_parallel": args.enable_expert_parallel, "max_num_seqs": args.max_num_seqs,
              "repeats": args.repeats, "results": results, "table": table(results, args.scenarios, base)}
    report.update(gpu_facts())
    out.write_text(json.dumps(report, indent=1))
    print(report["table"])
    return 0 if len(results) == len(args.impls.split(",")) else 1


if __name__ == "__main__":
    sys.exit(main())
