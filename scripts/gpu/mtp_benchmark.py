#!/usr/bin/env python3
"""MTP speculative decoding on one GPU: step cost, ms/token and acceptance, plugin draft vs
vLLM's in-tree draft, at acceptance ~0 and ~1, in one invocation.

Each run is its own process, one after the other, on the full-size config with
``load_format=dummy`` (plugin target; greedy, ``ignore_eos``, random prompt ids):

    plain        no speculation
    plugin:K     speculative_config {"method": "mtp", "num_speculative_tokens": K}, the plugin's
                 draft (vllm_ernie45.mtp)
    intree:K     the same with vLLM's in-tree ErnieMTP draft (VLLM_ERNIE45_MTP_DRAFT=intree)

Every run measures each scenario twice on the same engine: first with the dummy (random)
weights -- the draft never agrees, acceptance ~0 -- then after
``vllm_ernie45.testing.tiny.mtp_agree.make_loaded_models_agree`` has rewritten the loaded weights in
place so that the MTP head agrees with the model by construction (acceptance ~1); the plain run
gets the same rewrite, so its timing is on the same weights. ``--phases random,agree,cycle,cycle70``
adds two states after those (issue 33; ``mtp_agree.make_loaded_models_cycle``, untied head):
``cycle``, every draft right while the generated token -- and the experts a verification step
reads -- changes every step, as on real text (the ``agree`` state repeats one token), and
``cycle70``, 30 % of the vocabulary drafted wrong (acceptance ~0.7). Scenarios: ``bs1`` (1 x
128 in / 256 out), ``bs4`` (4 x 128 / 256), ``bs32`` (32 x 512 / 256), ``bs256`` (256 x 512 / 256).

Reported per run, scenario and phase: ms per output token, output tok/s, target steps per
request (vLLM's draft counter / requests), ms per step, draft acceptance (accepted / drafted
tokens) and mean tokens per step. The projection at acceptance a (each drafted position
accepted with probability a given the previous one was) for k drafted tokens:
``tokens/step = (1 - a**(k+1)) / (1 - a)``; ``ms/token = step_ms(k) / tokens/step``, with
step_ms(k) measured at acceptance ~1 (the step that verifies k drafts).

    python scripts/gpu/mtp_benchmark.py --config ../shared/gpu/ernie-4.5-21b-a3b-pt.config.json \
        --runs plain,plugin:1,intree:1 --out out/mtp.json
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from benchmark import _prompts, bench_parser, child_command, gpu_facts, parse_bench_args, run_child  # this folder is on sys.path (run as a script)

from vllm_ernie45.child_run import close_llm, write_result

SHAPES = {"bs1": (1, 128, 256), "bs4": (4, 128, 256), "bs32": (32, 512, 256), "bs256": (256, 512, 256)}
# Weight states measured in turn on one engine: "random" (dummy weights: drafts rejected),
# "agree" (mtp_agree.make_loaded_models_agree: every draft right, one token repeated),
# "cycle" (mtp_agree.make_loaded_models_cycle on top: every draft right, a new token -- and
# new experts -- every step), "cycle70" (the same with 30 % of the vocabulary drafted wrong:
# acceptance ~0.7). The cycle phases need an untied head: the config is copied with
# tie_word_embeddings false (the head is read once a step either way).
PHASES = ("random", "agree", "cycle", "cycle70")
WRONG_FRACTION = {"cycle": None, "cycle70": 0.3}


def parse_run(run: str) -> tuple[str, int]:
    """``plain`` -> ("plain", 0); ``plugin:2`` -> ("plugin", 2)."""
    draft, _, k = run.partition(":")
    if draft == "plain":
        return draft, 0
    if draft not in ("plugin", "intree") or not k.isdigit() or int(k) < 1:
        raise ValueError(f"run {run!r}: use plain, plugin:K or intree:K")
    return draft, int(k)


def _spec_counts(llm) -> dict[str, float]:
    counts = {}
    for metric in llm.get_metrics():
        if metric.name in ("vllm:spec_decode_num_drafts", "vllm:spec_decode_num_draft_tokens",
                           "vllm:spec_decode_num_accepted_tokens"):
            counts[metric.name.removeprefix("vllm:spec_decode_num_")] = metric.value
    return counts


def projection(step_ms: float, k: int, acceptance: float) -> float:
    tokens = k + 1 if acceptance >= 1 else (1 - acceptance ** (k + 1)) / (1 - acceptance)
    return step_ms / tokens


def child(args) -> int:
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # collective_rpc with a function
    from vllm import LLM, SamplingParams

    from vllm_ernie45.testing.tiny.mtp_agree import make_loaded_models_agree, make_loaded_models_cycle

    draft, k = parse_run(args.child)
    model_dir = Path(tempfile.mkdtemp(prefix="ernie-mtp-bench-"))
    config = json.loads(Path(args.config).read_text())
    if any(phase.startswith("cycle") for phase in args.phases):
        config["tie_word_embeddings"] = False
    (model_dir / "config.json").write_text(json.dumps(config, indent=2))
    vocab = config["vocab_size"]
    engine_args = dict(model=str(model_dir), load_format="dummy", skip_tokenizer_init=True,
                       dtype=args.dtype, max_model_len=4096, seed=0, enable_prefix_caching=False,
                       gpu_memory_utilization=args.gpu_memory_utilization, disable_log_stats=False)
    if k:
        engine_args["speculative_config"] = {"method": "mtp", "num_speculative_tokens": k}
    t0 = time.perf_counter()
    llm = LLM(**engine_args)
    result: dict = {"run": args.child, "draft": draft, "k": k, "startup_s": round(time.perf_counter() - t0, 1)}
    for phase in args.phases:
        if phase == "cycle70" and draft == "intree":
            result["cycle70_skipped"] = "vLLM's in-tree draft has no final norm of its own to set acceptance with"
            continue
        if phase == "agree":
            result["agree_rewrite"] = llm.collective_rpc(make_loaded_models_agree)[0]
        elif phase.startswith("cycle"):
            result[f"{phase}_rewrite"] = llm.collective_rpc(
                make_loaded_models_cycle, kwargs={"seed": 0, "wrong_fraction": WRONG_FRACTION[phase]}
            )[0]
        for scenario in args.scenarios:
            n, prompt_len, out_len = SHAPES[scenario]
            prompts = _prompts(n, prompt_len, vocab, seed=1)
            params = SamplingParams(temperature=0.0, max_tokens=out_len, ignore_eos=True, detokenize=False)
            llm.generate(_prompts(min(n, 4), prompt_len, vocab, seed=2), params, use_tqdm=False)  # warm-up
            times, deltas = [], []
            for _ in range(args.repeats):
                before = _spec_counts(llm) if k else {}
                t0 = time.perf_counter()
                outs = llm.generate(prompts, params, use_tqdm=False)
                times.append(time.perf_counter() - t0)
                after = _spec_counts(llm) if k else {}
                deltas.append({key: after[key] - before.get(key, 0) for key in after})
                assert sum(len(o.outputs[0].token_ids) for o in outs) == n * out_len
            best = min(range(len(times)), key=times.__getitem__)
            elapsed, delta = times[best], deltas[best]
            steps = delta["drafts"] / n if k else out_len  # target forward passes per request
            entry = {
                "elapsed_s": round(elapsed, 4),
                "all_elapsed_s": [round(t, 4) for t in times],
                "ms_per_token": round(1000 * elapsed / out_len, 3),
                "output_tok_s": round(n * out_len / elapsed, 1),
                "steps_per_request": round(steps, 1),
                "ms_per_step": round(1000 * elapsed / steps, 3),
            }
            if k:
                entry["acceptance"] = round(delta["accepted_tokens"] / max(delta["draft_tokens"], 1), 4)
                entry["tokens_per_step"] = round(1 + delta["accepted_tokens"] / max(delta["drafts"], 1), 3)
            result[f"{scenario}/{phase}"] = entry
            print(f"[{args.child}] {scenario}/{phase}: {entry}", flush=True)
    write_result(args.out, result, close_llm(llm))
    return 0


def summary(results: dict[str, dict], scenarios: list[str]) -> str:
    plain = results.get("plain", {})
    lines = ["| run | scenario | phase | ms/token | out tok/s | ms/step | step ÷ plain step | acceptance | tokens/step |",
             "|---|---|---|---|---|---|---|---|---|"]
    for run, res in results.items():
        for sc in scenarios:
            for phase in PHASES:
                e = res.get(f"{sc}/{phase}")
                if not e:
                    continue
                base = plain.get(f"{sc}/{phase}", {}).get("ms_per_step")
                ratio = f"{e['ms_per_step'] / base:.3f}" if base else ""
                lines.append(f"| {run} | {sc} | {phase} | {e['ms_per_token']} | {e['output_tok_s']:,} | "
                             f"{e['ms_per_step']} | {ratio} | {e.get('acceptance', '')} | {e.get('tokens_per_step', '')} |")
    lines += ["", "Projected ms/token from the measured step at acceptance ~1 (bs1; the cycle phase where run):", "",
              "| run | step ms | a=0.5 | a=0.7 | a=0.9 | a=1 |", "|---|---|---|---|---|---|"]
    for run, res in results.items():
        _, k = parse_run(run)
        e = res.get("bs1/cycle") or res.get("bs1/agree")  # tokens that change, where measured
        if not e or not k:
            continue
        proj = [f"{projection(e['ms_per_step'], k, a):.3f}" for a in (0.5, 0.7, 0.9, 1.0)]
        lines.append(f"| {run} | {e['ms_per_step']} | " + " | ".join(proj) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser(__doc__.splitlines()[0], "bs1,bs32", "out/mtp.json")
    parser.add_argument("--runs", default="plain,plugin:1,intree:1")
    parser.add_argument("--phases", default="random,agree",
                        help=f"weight states, in order, of {', '.join(PHASES)} (cycle ones after agree)")
    args = parse_bench_args(parser, argv)
    phases = args.phases.split(",") if isinstance(args.phases, str) else args.phases
    if any(p not in PHASES for p in phases) or (
        any(p.startswith("cycle") for p in phases) and "agree" not in phases[: min(i for i, p in enumerate(phases) if p.startswith("cycle"))]
    ):
        parser.error(f"--phases {args.phases}: names from {PHASES}, with agree before any cycle phase")
    args.phases = phases
    if args.child:
        return child(args)
    out = Path(args.out)
    results: dict[str, dict] = {}
    runs = [r for r in args.runs.split(",") if r]
    for run in runs:
        draft, _ = parse_run(run)
        part = out.with_name(f"{out.stem}.{run.replace(':', '-k')}.json")
        cmd = child_command(__file__, run, args, part) + ["--phases", ",".join(args.phases)]
        env = {**os.environ, "VLLM_WORKER_MULTIPROC_METHOD": "spawn",
               "VLLM_ERNIE45_MTP_DRAFT": "intree" if draft == "intree" else "plugin"}
        run_child(run, cmd, env, part, results)
        out.write_text(json.dumps({"config": args.config, "dtype": args.dtype, "results": results}, indent=1))
    report = {"config": args.config, "dtype": args.dtype, "results": results,
              "summary": summary(results, args.scenarios)}
    report.update(gpu_facts())
    out.write_text(json.dumps(report, indent=1))
    print(report["summary"])
    return 0 if len(results) == len(runs) else 1


if __name__ == "__main__":
    sys.exit(main())
