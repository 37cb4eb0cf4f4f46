#!/usr/bin/env python3
"""Throughput anatomy: GPU kernel time by kind over whole batches, implementation against implementation.

``decode_anatomy.py`` splits one batch-1 decode step; this script answers the throughput
question of issue 29 -- where do the plugin and in-tree differ in a prefill-heavy batch or a
large decode batch? ``collect`` runs on the GPU: for each implementation, in its own process
with its own compile caches (``benchmark.impl_env``), the benchmark's engine (full-size config,
dummy weights, max_num_seqs 256, torch.compile + CUDA graphs), then for each shape
``NAMExREQUESTSxINxOUT``: one unprofiled run to pay first-use costs, ``--repeats`` timed runs
(wall seconds), then all shapes once more under vLLM's torch profiler (CUPTI kernel records,
graph replays included), 3 s apart, so the kernels split into one group per shape at the
pauses. ``report`` runs anywhere: per shape, the summed kernel time of each kind (the
classification of ``decode_anatomy``), the GPU-busy time (union of kernel intervals) against
the group's span (the rest is the GPU waiting on the host), and the kernels whose time differs
most between the implementations.

    python scripts/gpu/step_anatomy.py collect --config scripts/configs/ernie-4.5-21b-a3b-pt.config.json \\
        --impls intree,plugin --out out/steps
    python scripts/gpu/step_anatomy.py report out/steps/*.json
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark import MAX_NUM_SEQS, _reference_prompts, impl_env, run_child  # noqa: E402
from decode_anatomy import _load_trace, _read_json, classify, kernel_profiler_config  # noqa: E402

from vllm_ernie45.child_run import close_llm, write_result  # noqa: E402

DEFAULT_SHAPES = "prefill=200x2048x32,decode256=256x512x64"
PAUSE_S = 3.0


def parse_shapes(text: str) -> list[tuple[str, int, int, int]]:
    """``NAME=NxINxOUT,...`` -> ``[(name, n, in, out), ...]``."""
    shapes = []
    for item in text.split(","):
        name, _, dims = item.partition("=")
        parts = dims.split("x")
        if not name or len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise SystemExit(f"bad shape {item!r}: want NAME=REQUESTSxINxOUT, e.g. prefill=200x2048x32")
        shapes.append((name, *map(int, parts)))
    return shapes


def shape_groups(events: list[dict], count: int, min_gap_us: float) -> list[list[tuple[str, float, float]]] | None:
    """GPU kernels ``(name, start µs, duration µs)`` in time order, cut into ``count`` groups at
    the ``count - 1`` longest stretches of GPU idle (the pauses between shapes). A stray kernel
    inside a pause halves that stretch, still far longer than any idle inside a shape, so the
    cut lands in the pause. None if fewer than ``count - 1`` stretches reach ``min_gap_us``."""
    kernels = sorted(
        ((ev["name"], float(ev["ts"]), float(ev["dur"])) for ev in events
         if ev.get("ph") == "X" and ev.get("cat") == "kernel"),
        key=lambda k: k[1],
    )
    if not kernels:
        return None
    gaps = []  # (idle µs before kernel i, i)
    end = kernels[0][1] + kernels[0][2]
    for i in range(1, len(kernels)):
        gaps.append((kernels[i][1] - end, i))
        end = max(end, kernels[i][1] + kernels[i][2])
    cuts = sorted(gaps, reverse=True)[: count - 1]
    if len(cuts) < count - 1 or any(gap < min_gap_us for gap, _ in cuts):
        return None
    bounds = [0] + sorted(i for _, i in cuts) + [len(kernels)]
    return [kernels[bounds[j]:bounds[j + 1]] for j in range(count)]


def group_facts(group: list[tuple[str, float, float]]) -> dict:
    """Summed time per kernel name, GPU-busy time (union of intervals) and the span."""
    by_name: dict[str, list] = {}
    busy, cur_start, cur_end = 0.0, None, None
    for name, t, d in group:
        entry = by_name.setdefault(name, [0, 0.0])
        entry[0] += 1
        entry[1] += d
        if cur_end is None or t > cur_end:
            if cur_end is not None:
                busy += cur_end - cur_start
            cur_start, cur_end = t, t + d
        else:
            cur_end = max(cur_end, t + d)
    if cur_end is not None:
        busy += cur_end - cur_start
    span = (max(t + d for _, t, d in group) - group[0][1]) if group else 0.0
    kernels = sorted(([n, c, round(s, 1)] for n, (c, s) in by_name.items()), key=lambda x: -x[2])
    return {"span_us": round(span, 1), "busy_us": round(busy, 1), "kernel_count": len(group), "kernels": kernels}


def child(args: argparse.Namespace) -> int:
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
    from vllm import LLM, SamplingParams

    shapes = parse_shapes(args.shapes)
    model_dir = Path(tempfile.mkdtemp(prefix="ernie-steps-"))
    shutil.copy(args.config, model_dir / "config.json")
    trace_dir = Path(tempfile.mkdtemp(prefix="ernie-steps-trace-"))
    t0 = time.perf_counter()
    llm = LLM(
        model=str(model_dir), load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16",
        max_model_len=4096, gpu_memory_utilization=args.gpu_memory_utilization, seed=0,
        max_num_seqs=MAX_NUM_SEQS,
        profiler_config=kernel_profiler_config(trace_dir),
    )
    result: dict = {"impl": args.child, "startup_s": round(time.perf_counter() - t0, 1), "shapes": {},
                    "routing": "dummy"}
    if args.routing == "spread":
        from vllm_ernie45.testing.dummy_routing import spread_routing

        result.update(llm.apply_model(spread_routing)[0])
    rng = random.Random(0)

    def run(n: int, prompt_len: int, out_len: int) -> float:
        params = SamplingParams(temperature=0.0, max_tokens=out_len, ignore_eos=True, detokenize=False)
        prompts = _reference_prompts(rng, n, prompt_len)
        t = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        assert sum(len(o.outputs[0].token_ids) for o in outs) == n * out_len
        return time.perf_counter() - t

    for name, n, prompt_len, out_len in shapes:
        run(n, prompt_len, out_len)  # first use: compiles, allocations
        walls = [round(run(n, prompt_len, out_len), 3) for _ in range(args.repeats)]
        result["shapes"][name] = {"requests": n, "in": prompt_len, "out": out_len, "wall_s": walls}
        print(f"[{args.child}] {name}: wall {walls} s", flush=True)
    llm.start_profile()
    for name, n, prompt_len, out_len in shapes:
        time.sleep(PAUSE_S)
        result["shapes"][name]["profiled_wall_s"] = round(run(n, prompt_len, out_len), 3)
    time.sleep(PAUSE_S)
    llm.stop_profile()
    shutdown = close_llm(llm)  # the worker writes its trace on stop; closing waits for it
    traces = sorted(trace_dir.rglob("*.pt.trace.json*"), key=lambda p: p.stat().st_mtime)
    if not traces:
        raise SystemExit(f"no profiler trace under {trace_dir}")
    events = _load_trace(traces[-1])
    groups = shape_groups(events, len(shapes), min_gap_us=PAUSE_S * 1e6 / 4)
    if groups is None:  # keep what the GPU time bought: the whole profile, unsplit
        result["note"] = f"the kernels did not split into {len(shapes)} shapes at the pauses"
        result["whole_profile"] = group_facts(shape_groups(events, 1, 0.0) or [])
        print(f"[{args.child}] {result['note']}: whole profile kept", flush=True)
    else:
        for (name, *_), group in zip(shapes, groups):
            result["shapes"][name].update(group_facts(group))
    write_result(args.out, result, shutdown)
    return 0


def collect(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    parse_shapes(args.shapes)
    impls = args.impls.split(",")
    results: dict[str, dict] = {}
    for impl in impls:
        part = out / f"{impl}.json"
        cmd = [sys.executable, __file__, "collect", "--child", impl, "--config", args.config,
               "--out", str(part), "--shapes", args.shapes, "--repeats", str(args.repeats),
               "--gpu-memory-utilization", str(args.gpu_memory_utilization), "--routing", args.routing]
        run_child(impl, cmd, impl_env(impl), part, results)
    if results:  # in --impls order: the first is what the others are compared with
        print(render(list(results.values())), flush=True)
    return 0 if len(results) == len(impls) else 1


# --------------------------------------------------------------------------------------
# report (anywhere)


def by_kind(shape: dict) -> dict[str, float]:
    kinds: dict[str, float] = {}
    for name, _count, total in shape["kernels"]:
        kind = classify(name)
        kinds[kind] = kinds.get(kind, 0.0) + total
    return kinds


def render(results: list[dict], top: int = 12) -> str:
    """Per shape: a column per implementation of kernel ms by kind, busy, span, wall; then the
    kernels whose summed time differs most from the first implementation's."""
    lines = []
    base = results[0]
    for shape in base["shapes"]:
        rows = [r for r in results if shape in r["shapes"] and "kernels" in r["shapes"][shape]]
        if not rows:
            continue
        s0 = base["shapes"][shape]
        kinds = [by_kind(r["shapes"][shape]) for r in rows]
        names = sorted({k for d in kinds for k in d}, key=lambda k: -kinds[0].get(k, 0.0))
        head = f"### {shape}: {s0['requests']} x {s0['in']}/{s0['out']}, routing {base.get('routing', 'dummy')}"
        lines += [head, "", "| ms | " + " | ".join(r["impl"] for r in rows) + " |",
                  "|---|" + "---|" * len(rows)]
        for k in names:
            lines.append(f"| {k} | " + " | ".join(f"{d.get(k, 0.0) / 1e3:.1f}" for d in kinds) + " |")
        for label, key in (("**GPU busy**", "busy_us"), ("span (first to last kernel)", "span_us")):
            lines.append(f"| {label} | " + " | ".join(f"{r['shapes'][shape][key] / 1e3:.1f}" for r in rows) + " |")
        lines.append("| wall, unprofiled runs (s) | " + " | ".join(
            "/".join(f"{w:.3f}" for w in r["shapes"][shape]["wall_s"]) for r in rows) + " |")
        lines.append("| kernels launched | " + " | ".join(str(r["shapes"][shape]["kernel_count"]) for r in rows) + " |")
        if len(rows) > 1:
            totals = [{n: t for n, _c, t in r["shapes"][shape]["kernels"]} for r in rows]
            every = set().union(*totals)
            diff = sorted(every, key=lambda n: -max(abs(t.get(n, 0.0) - totals[0].get(n, 0.0)) for t in totals[1:]))
            lines += ["", f"kernels differing most from {rows[0]['impl']} (ms):", ""]
            for n in diff[:top]:
                lines.append("  " + " / ".join(f"{t.get(n, 0.0) / 1e3:8.1f}" for t in totals) + f"  {n[:110]}")
        lines.append("")
    return "\n".join(lines)


def report(args: argparse.Namespace) -> int:
    print(render([_read_json(Path(path)) for path in args.results], args.top))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("collect")
    c.add_argument("--config", required=True)
    c.add_argument("--impls", default="intree,plugin", help="names of benchmark.py's implementations")
    c.add_argument("--shapes", default=DEFAULT_SHAPES, help="NAME=REQUESTSxINxOUT, comma-separated (default %(default)s)")
    c.add_argument("--repeats", type=int, default=2, help="unprofiled timed runs per shape after the first")
    c.add_argument("--out", default="out/steps")
    c.add_argument("--routing", choices=("dummy", "spread"), default="dummy",
                   help="as benchmark.py's --routing (spread: tokens over all experts)")
    c.add_argument("--gpu-memory-utilization", type=float, default=0.88)
    c.add_argument("--child", help=argparse.SUPPRESS)
    r = sub.add_parser("report")
    r.add_argument("results", nargs="+")
    r.add_argument("--top", type=int, default=12, help="kernels listed by difference")
    args = parser.parse_args(argv)
    if args.cmd == "collect":
        return child(args) if args.child else collect(args)
    return report(args)


if __name__ == "__main__":
    sys.exit(main())
