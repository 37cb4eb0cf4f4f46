#!/usr/bin/env python3
"""Batch-1 decode anatomy: every kernel of captured decode steps, summed per kind.

Two steps. ``collect`` runs on the GPU: for each implementation (in its own process, as in
``benchmark.py``) it starts vLLM on the full-size config with dummy weights (torch.compile +
CUDA graphs, vLLM's defaults), times batch-1 decode without the profiler, then profiles one
request of ``--profile-tokens`` decode steps with vLLM's torch profiler (CUPTI kernel
activity) and keeps, for every decode step, each kernel's name, start and duration: the
kernels of the step's CUDA-graph replay (found by the correlation id of its
``cudaGraphLaunch``) and the eager kernels up to the next replay (logits, sampling, input
preparation). ``report`` runs anywhere: it classifies the kernels, takes the median step,
and prints a table per kind with time, share of the step, bytes a kind must read (from the
config) and its distance to the measured copy bandwidth.

    python scripts/gpu/decode_anatomy.py collect --config scripts/configs/ernie-4.5-21b-a3b-pt.config.json \
        --impls intree,plugin --out out/anatomy
    python scripts/gpu/decode_anatomy.py report out/anatomy/*.json

An implementation is ``NAME[:QUANTIZATION][@TAG]``: NAME from ``benchmark.IMPLS`` (process
environment), QUANTIZATION an engine ``quantization`` (``fp8``, ``experts_int8``), TAG to
run the same twice.

Why the numbers can be trusted under CUDA graphs: CUPTI records each kernel of a graph replay
with device timestamps (the replay is not serialised or split by the profiler); the step
time from those timestamps is compared with the unprofiled ms/token of the same engine
(``profiled_step_ms`` vs ``ms_per_token``), and gaps between kernels are reported, not hidden.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import shutil
import statistics
from collections import Counter
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark import IMPLS, _prompts, impl_env  # noqa: E402

from vllm_ernie45.child_run import ChildFailed, close_llm, judge_child, write_result  # noqa: E402


def parse_impl(spec: str) -> tuple[str, str | None]:
    name = spec.split("@")[0]
    base, _, quant = name.partition(":")
    if base not in IMPLS:
        raise SystemExit(f"unknown implementation {base!r}; choose from {sorted(IMPLS)}")
    return base, quant or None


# --------------------------------------------------------------------------------------
# collect (GPU)


def _load_trace(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as fh:
        return json.load(fh)["traceEvents"]


def decode_steps(events: list[dict]) -> tuple[list[str], list[dict]]:
    """Kernel records of every graph replay, and the eager GPU work after it.

    Returns ``(names, steps)``; a step is ``{"graph": [[name_id, t_us, dur_us], ...],
    "after": [...], "next_t": t_us}`` with times relative to the step's first kernel.
    """
    graph_corr = {
        ev["args"]["correlation"]
        for ev in events
        if ev.get("cat") == "cuda_runtime" and ev.get("name", "").startswith("cudaGraphLaunch")
    }
    gpu = [
        ev for ev in events
        if ev.get("ph") == "X" and ev.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")
    ]
    gpu.sort(key=lambda ev: ev["ts"])
    names: list[str] = []
    index: dict[str, int] = {}

    def nid(name: str) -> int:
        if name not in index:
            index[name] = len(names)
            names.append(name)
        return index[name]

    # Group graph kernels by the replay (correlation id) they belong to.
    replays: dict[int, list[dict]] = {}
    for ev in gpu:
        corr = ev.get("args", {}).get("correlation")
        if corr in graph_corr:
            replays.setdefault(corr, []).append(ev)
    ordered = sorted(replays.values(), key=lambda evs: evs[0]["ts"])
    steps = []
    for i, kernels in enumerate(ordered):
        t0 = kernels[0]["ts"]
        end = max(k["ts"] + k["dur"] for k in kernels)
        nxt = ordered[i + 1][0]["ts"] if i + 1 < len(ordered) else None
        after = [
            ev for ev in gpu
            if ev.get("args", {}).get("correlation") not in graph_corr
            and ev["ts"] >= end and (nxt is None or ev["ts"] < nxt)
        ]
        steps.append({
            "graph": [[nid(k["name"]), round(k["ts"] - t0, 3), round(k["dur"], 3)] for k in kernels],
            "after": [[nid(k["name"]), round(k["ts"] - t0, 3), round(k["dur"], 3)] for k in after],
            "next_t": None if nxt is None else round(nxt - t0, 3),
        })
    return names, steps


def top_kernels(events: list[dict], n: int = 80) -> list[list]:
    """``[name, count, total µs]`` of the kernels with the most time in the whole trace."""
    total: dict[str, list] = {}
    for ev in events:
        if ev.get("ph") == "X" and ev.get("cat") == "kernel":
            entry = total.setdefault(ev["name"], [0, 0.0])
            entry[0] += 1
            entry[1] += ev["dur"]
    ranked = sorted(total.items(), key=lambda kv: -kv[1][1])[:n]
    return [[name, c, round(t, 1)] for name, (c, t) in ranked]


def kernel_profiler_config(trace_dir: Path) -> dict:
    """vLLM's torch profiler for kernel records only (no stacks, shapes or frontend), traces
    written to ``trace_dir`` when the profile stops."""
    return {"profiler": "torch", "torch_profiler_dir": str(trace_dir), "torch_profiler_with_stack": False,
            "torch_profiler_record_shapes": False, "ignore_frontend": True}


def child(args: argparse.Namespace) -> int:
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
    from vllm import LLM, SamplingParams

    _, quant = parse_impl(args.child)
    model_dir = Path(tempfile.mkdtemp(prefix="ernie-anatomy-"))
    shutil.copy(args.config, model_dir / "config.json")
    vocab = json.loads(Path(args.config).read_text())["vocab_size"]
    trace_dir = Path(tempfile.mkdtemp(prefix="ernie-trace-"))
    engine_args = dict(
        model=str(model_dir), load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16",
        max_model_len=4096, gpu_memory_utilization=args.gpu_memory_utilization, seed=0,
        enable_prefix_caching=False,
        profiler_config=kernel_profiler_config(trace_dir),
    )
    if quant:
        engine_args["quantization"] = quant
    t0 = time.perf_counter()
    llm = LLM(**engine_args)
    result: dict = {"impl": args.child, "quantization": quant, "startup_s": round(time.perf_counter() - t0, 1),
                    "env": IMPLS[parse_impl(args.child)[0]]}
    params = SamplingParams(temperature=0.0, max_tokens=256, ignore_eos=True, detokenize=False)
    prompt = _prompts(1, 128, vocab, seed=1)
    llm.generate(_prompts(2, 128, vocab, seed=2), params, use_tqdm=False)  # warm-up
    times = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        llm.generate(prompt, params, use_tqdm=False)
        times.append(1000 * (time.perf_counter() - t) / 256)
    result["ms_per_token_runs"] = [round(x, 4) for x in times]
    result["ms_per_token"] = round(min(times), 4)
    print(f"[{args.child}] bs1 ms/token {result['ms_per_token_runs']}", flush=True)

    prof_params = SamplingParams(temperature=0.0, max_tokens=args.profile_tokens, ignore_eos=True,
                                 detokenize=False)
    llm.start_profile()
    t = time.perf_counter()
    llm.generate(prompt, prof_params, use_tqdm=False)
    result["profiled_wall_ms_per_token"] = round(1000 * (time.perf_counter() - t) / args.profile_tokens, 4)
    llm.stop_profile()
    shutdown = close_llm(llm)  # the worker writes its trace on stop; closing waits for it
    traces = sorted(trace_dir.rglob("*.pt.trace.json*"), key=lambda p: p.stat().st_mtime)
    if not traces:
        raise SystemExit(f"no profiler trace under {trace_dir}")
    events = _load_trace(traces[-1])
    names, steps = decode_steps(events)
    result["top_kernels"] = top_kernels(events)
    result.update({"trace_file": traces[-1].name, "trace_bytes": traces[-1].stat().st_size,
                   "kernel_names": names, "steps": steps})
    if args.keep_trace:
        shutil.copy(traces[-1], Path(args.out).with_suffix(".trace.json.gz"))
    write_result(args.out, result, shutdown)
    return 0


def copy_bandwidth_gbs() -> float | None:
    """Device-to-device copy of 1 GiB (bytes read + written over time), median of 20."""
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        src = torch.empty(1 << 29, dtype=torch.bfloat16, device="cuda").normal_()
        dst = torch.empty_like(src)
        times = []
        for _ in range(25):
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            stop.record()
            stop.synchronize()
            times.append(start.elapsed_time(stop) / 1000)
        return round(2 * src.numel() * 2 / statistics.median(times[5:]) / 1e9, 1)
    except Exception:  # the report then uses no bandwidth bound
        return None


def collect(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ok = True
    for spec in args.impls.split(","):
        base, _ = parse_impl(spec)
        part = out / f"{spec.replace(':', '-').replace('@', '-')}.json"
        cmd = [sys.executable, __file__, "collect", "--child", spec, "--config", args.config,
               "--out", str(part), "--repeats", str(args.repeats),
               "--profile-tokens", str(args.profile_tokens),
               "--gpu-memory-utilization", str(args.gpu_memory_utilization)]
        if args.keep_trace:
            cmd.append("--keep-trace")
        env = impl_env(base)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env)
        print(f"[{spec}] finished rc={proc.returncode} in {time.perf_counter() - t0:.0f} s", flush=True)
        try:
            judge_child(proc.returncode, part)
        except ChildFailed as err:
            print(f"[{spec}] FAILED: {err}", flush=True)
            ok = False
    facts = {"copy_bandwidth_gbs": copy_bandwidth_gbs(), "config": args.config}
    try:
        import torch
        import vllm

        facts.update(gpu=torch.cuda.get_device_name(0), vllm=vllm.__version__, torch=torch.__version__)
    except Exception:
        pass
    (out / "machine.json").write_text(json.dumps(facts, indent=1))
    print(json.dumps(facts), flush=True)
    for part in sorted(out.glob("*.json")):
        if part.name != "machine.json":
            print(render(json.loads(part.read_text()), facts), flush=True)
    return 0 if ok else 1


# --------------------------------------------------------------------------------------
# report (anywhere)

KINDS = (
    "moe experts GEMM", "shared experts GEMMs", "moe bookkeeping", "router (gate GEMM + top-k)",
    "qkv GEMM", "o_proj GEMM", "dense MLP GEMMs", "attention", "rope + kv-cache write", "norms (+ residual add)",
    "activation", "other elementwise", "gaps inside the graph",
    "lm_head GEMM", "sampling + input prep (eager)", "idle between steps",
)

_RULES = (  # first match wins; GEMMs are labelled by position afterwards
    ("moe experts GEMM", r"fused_moe_kernel|marlin_moe|moe_wna16|fused_moe"),
    ("moe bookkeeping", r"moe_align|count_and_sort|moe_sum|sort_tokens|moe_.*sum|topk_weight"),
    ("router (gate GEMM + top-k)", r"_ernie_router|topk_softmax|topkGating|grouped_topk|fused_topk"),
    ("rope + kv-cache write", r"rotary|rope|reshape_and_cache|cache_kernel"),
    ("attention", r"flash|FlashAttn|fmha|attn|combine"),
    ("activation", r"act_and_mul|silu"),
    ("norms (+ residual add)", r"rms_norm|rmsnorm|layernorm|rsqrt|mean_mul_pow"),
    ("gemm", r"gemm|gemv|nvjet|cutlass|xmma|Kernel2|splitK|marlin|cublas|sm90_"),
)


def classify(name: str) -> str:
    for kind, pattern in _RULES:
        if re.search(pattern, name, re.IGNORECASE):
            return kind
    return "other elementwise"


def label_step(names: list[str], graph: list[list]) -> list[str]:
    """Kind of every graph kernel; GEMMs by their place in a layer: the first after an
    attention kernel is o_proj, the last before the next attention is the next layer's
    qkv; in an MoE layer the next one is the router gate and any others are shared experts
    run beside the fused-MoE call (vLLM's in-tree model); in a dense layer they are the MLP."""
    kinds = [classify(names[k[0]]) for k in graph]
    # A split-K (or cuBLAS GEMV) reduction finishes the GEMM before it: label it with that GEMM.
    tails = [i for i, k in enumerate(graph) if kinds[i] == "gemm" and re.search(r"splitKreduce|reduce_1Block_kernel", names[k[0]])]
    for i in tails:
        kinds[i] = "gemm tail"
    attn = [i for i, k in enumerate(kinds) if k == "attention"]
    # Attention may be more than one kernel per layer (split-KV + combine): take runs.
    starts = [i for i in attn if i - 1 not in attn]
    bounds = [0] + starts + [len(kinds)]
    for seg in range(len(bounds) - 1):
        lo, hi = bounds[seg], bounds[seg + 1]
        gemms = [i for i in range(lo, hi) if kinds[i] == "gemm"]
        if not gemms:
            continue
        is_first = seg == 0  # before the first attention: embedding + layer 0's qkv
        has_next_attn = seg + 1 < len(bounds) - 1
        has_moe = any(kinds[i] == "moe experts GEMM" for i in range(lo, hi))
        for j, i in enumerate(gemms):
            if is_first:
                kinds[i] = "qkv GEMM"
            elif j == 0:
                kinds[i] = "o_proj GEMM"
            elif j == len(gemms) - 1 and has_next_attn:
                kinds[i] = "qkv GEMM"
            elif not has_moe:
                kinds[i] = "dense MLP GEMMs"
            else:
                kinds[i] = "router (gate GEMM + top-k)" if j == 1 else "shared experts GEMMs"
    for i in tails:
        kinds[i] = kinds[i - 1] if i > 0 else "other elementwise"
    return kinds


def step_breakdown(names: list[str], step: dict) -> dict[str, float]:
    graph = step["graph"]
    kinds = label_step(names, graph)
    out = dict.fromkeys(KINDS, 0.0)
    end = 0.0
    for (nid_, t, d), kind in zip(graph, kinds):
        out[kind] += d
        if t > end:
            out["gaps inside the graph"] += t - end
        end = max(end, t + d)
    out["graph_span_us"] = end
    busy_after = 0.0
    lm_head_seen = False
    for nid_, t, d in step["after"]:
        # The first GEMM after the replay computes the logits; the rest prepares the next step.
        if not lm_head_seen and classify(names[nid_]) == "gemm":
            out["lm_head GEMM"] += d
            lm_head_seen = True
        else:
            out["sampling + input prep (eager)"] += d
        busy_after += d
    if step["next_t"] is not None:
        out["idle between steps"] = max(0.0, step["next_t"] - end - busy_after)
        out["step_us"] = step["next_t"]
    out["kernels_in_graph"] = len(graph)
    out["kernels_after"] = len(step["after"])
    return out


def weight_bytes(config: dict) -> dict[str, float]:
    """Bytes of weights (bf16, router fp32) a batch-1 decode step must read, per kind."""
    h, layers = config["hidden_size"], config["num_hidden_layers"]
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    hd = config.get("head_dim") or h // heads
    start = config.get("moe_layer_start_index", 0)
    n_moe = layers - start if config.get("moe_num_experts") else 0
    n_dense = layers - n_moe
    e, k = config["moe_num_experts"], config["moe_k"]
    n = config["moe_intermediate_size"]
    slots = k + config.get("moe_num_shared_experts", 0)
    return {
        "qkv GEMM": layers * h * (heads + 2 * kv) * hd * 2,
        "o_proj GEMM": layers * heads * hd * h * 2,
        "router (gate GEMM + top-k)": n_moe * h * e * 4,
        "moe experts GEMM": n_moe * slots * 3 * h * n * 2,
        "dense MLP GEMMs": n_dense * 3 * h * config["intermediate_size"] * 2,
        "lm_head GEMM": config["vocab_size"] * h * 2,
    }


def decode_steps_of(result: dict) -> list[dict]:
    """The decode steps: the full-graph replays -- the kernel count holding the most kernels
    over the trace (the prefill runs as many small piecewise replays) -- each followed by
    another replay (so their step time is known)."""
    steps = result["steps"]
    freq = Counter(len(s["graph"]) for s in steps)
    counts = max(freq, key=lambda n: n * freq[n])
    return [s for s in steps if len(s["graph"]) == counts and s["next_t"] is not None]


def summarise(result: dict) -> dict:
    names = result["kernel_names"]
    decode = decode_steps_of(result)
    per = [step_breakdown(names, s) for s in decode]
    keys = list(KINDS) + ["graph_span_us", "step_us", "kernels_in_graph", "kernels_after"]
    med = {key: statistics.median(p.get(key, 0.0) for p in per) for key in keys}
    return {"steps_used": len(decode), "median": med}


def render(result: dict, machine: dict) -> str:
    if not any(s["next_t"] is not None for s in result["steps"]):
        top = "\n".join(f"  {t:10.1f} µs {c:6d}×  {name[:100]}" for name, c, t in result.get("top_kernels", []))
        return f"### {result['impl']}: no CUDA-graph replays in the trace; kernels by time:\n{top}"
    summary = summarise(result)
    med = summary["median"]
    config = json.loads(Path(machine["config"]).read_text()) if machine.get("config") and Path(machine["config"]).exists() else None
    wbytes = weight_bytes(config) if config else {}
    bw = machine.get("copy_bandwidth_gbs")
    step = med["step_us"]
    lines = [
        f"### {result['impl']} on {machine.get('gpu', '?')} (vLLM {machine.get('vllm', '?')})",
        "",
        f"unprofiled batch-1 decode: {result['ms_per_token']} ms/token (runs {result['ms_per_token_runs']}); "
        f"profiled run wall {result['profiled_wall_ms_per_token']} ms/token; median profiled step "
        f"{step / 1000:.3f} ms over {summary['steps_used']} decode steps; "
        f"{med['kernels_in_graph']:.0f} kernels in the graph + {med['kernels_after']:.0f} eager",
        "",
        "| kind | µs / step | share | weight MB | bound µs | time ÷ bound |",
        "|---|---|---|---|---|---|",
    ]
    for kind in KINDS:
        t = med[kind]
        mb = wbytes.get(kind)
        bound = mb / (bw * 1e3) if mb and bw else None
        lines.append(
            f"| {kind} | {t:.1f} | {100 * t / step:.1f} % | "
            + (f"{mb / 1e6:.0f}" if mb else "") + " | "
            + (f"{bound:.1f}" if bound else "") + " | "
            + (f"{t / bound:.2f}" if bound else "") + " |"
        )
    total_mb = sum(wbytes.values())
    if bw:
        lines.append(f"| **step** | {step:.1f} | 100 % | {total_mb / 1e6:.0f} | {total_mb / (bw * 1e3):.1f} | "
                     f"{step / (total_mb / (bw * 1e3)):.2f} |")
    return "\n".join(lines)


def _read_json(path: Path) -> dict:
    if path.suffix == ".gz":
        with gzip.open(path, "rt") as f:
            return json.load(f)
    return json.loads(path.read_text())


def _loaded(paths: list[str], config: str | None) -> list[tuple[dict, dict]]:
    """(result, machine) per result file; machine.json beside it (GPU, copy bandwidth)."""
    out = []
    for path in map(Path, paths):
        if path.name == "machine.json":
            continue
        machine_path = path.with_name("machine.json")
        machine = json.loads(machine_path.read_text()) if machine_path.exists() else {}
        if config:
            machine["config"] = config
        out.append((_read_json(path), machine))
    return out


def render_columns(loaded: list[tuple[dict, dict]], labels: list[str]) -> str:
    """One table, a column of µs per step for every result; bounds from each GPU's bandwidth."""
    summaries = [summarise(r)["median"] for r, _ in loaded]
    config = json.loads(Path(loaded[0][1]["config"]).read_text()) if loaded[0][1].get("config") else None
    wbytes = weight_bytes(config) if config else {}
    gpus = []
    for _, m in loaded:
        if m.get("copy_bandwidth_gbs") and m.get("gpu") not in [g for g, _ in gpus]:
            gpus.append((m["gpu"], m["copy_bandwidth_gbs"]))
    head = "| kind | " + " | ".join(labels) + " | weight MB | " + " | ".join(f"bound µs ({g.split()[1]})" for g, _ in gpus) + " |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for kind in KINDS:
        mb = wbytes.get(kind)
        bounds = [f"{mb / (bw * 1e3):.0f}" if mb else "" for _, bw in gpus]
        lines.append(f"| {kind} | " + " | ".join(f"{s[kind]:.0f}" for s in summaries) + " | "
                     + (f"{mb / 1e6:.0f}" if mb else "") + " | " + " | ".join(bounds) + " |")
    total = sum(wbytes.values())
    lines.append("| **step (median profiled)** | " + " | ".join(f"**{s['step_us']:.0f}**" for s in summaries)
                 + f" | {total / 1e6:.0f} | " + " | ".join(f"{total / (bw * 1e3):.0f}" for _, bw in gpus) + " |")
    lines.append("| unprofiled ms/token (best of runs) | " + " | ".join(f"{r['ms_per_token']:.3f}" for r, _ in loaded)
                 + " | |" + " |" * len(gpus))
    lines.append("| kernels in the graph | " + " | ".join(f"{s['kernels_in_graph']:.0f}" for s in summaries)
                 + " | |" + " |" * len(gpus))
    return "\n".join(lines)


def report(args: argparse.Namespace) -> int:
    loaded = _loaded(args.results, args.config)
    if args.columns:
        labels = args.columns.split(",")
        if len(labels) != len(loaded):
            raise SystemExit(f"--columns names {len(labels)} columns for {len(loaded)} results")
        print(render_columns(loaded, labels))
        return 0
    for result, machine in loaded:
        print(render(result, machine))
        print()
        if args.kernels:
            names = result["kernel_names"]
            decode = decode_steps_of(result)
            step = decode[len(decode) // 2]
            kinds = label_step(names, step["graph"])
            for (nid_, t, d), kind in zip(step["graph"], kinds):
                print(f"{t:9.1f} {d:7.2f}  {kind:28s} {names[nid_][:110]}")
            for nid_, t, d in step["after"]:
                print(f"{t:9.1f} {d:7.2f}  {'(eager)':28s} {names[nid_][:110]}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("collect")
    c.add_argument("--config", required=True)
    c.add_argument("--impls", default="intree,plugin")
    c.add_argument("--out", default="out/anatomy")
    c.add_argument("--repeats", type=int, default=3)
    c.add_argument("--profile-tokens", type=int, default=24)
    c.add_argument("--gpu-memory-utilization", type=float, default=0.88)
    c.add_argument("--keep-trace", action="store_true")
    c.add_argument("--child", help=argparse.SUPPRESS)
    r = sub.add_parser("report")
    r.add_argument("results", nargs="+")
    r.add_argument("--config", default=None)
    r.add_argument("--kernels", action="store_true", help="list the kernels of one decode step")
    r.add_argument("--columns", help="one table, a column per result: their labels, comma-separated")
    args = parser.parse_args(argv)
    if args.cmd == "collect":
        return child(args) if args.child else collect(args)
    return report(args)


if __name__ == "__main__":
    sys.exit(main())
