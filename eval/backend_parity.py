"""lm-eval score parity, sample by sample: ``--model vllm`` (this plugin) vs ``--model hf``.

lm-eval's ``vllm`` backend (this plugin serving the model) is compared with its ``hf`` backend
(the transformers reference).

Each backend runs in its own child process (``--backend vllm|hf``): lm-eval builds its model
(``--model vllm`` -> ``vllm.LLM``, which loads the ``vllm.general_plugins`` entry point, so
``vllm_ernie45`` serves the model; ``--model hf`` -> ``AutoModelForCausalLM``) and runs
``lm_eval.simple_evaluate(..., log_samples=True)`` on the offline tasks of ``eval/tasks``
(or any task list). The parent process then compares, per task and per sample:

* the request arguments (prompts and continuations) -- must be identical, else nothing
  below would be comparable;
* every loglikelihood (``multiple_choice``, ``loglikelihood``, ``loglikelihood_rolling``):
  max |delta loglikelihood|, and the ``is_greedy`` flags;
* every generated text (``generate_until``): the token ids vLLM generated, decoded and cut
  at the stop sequences exactly as lm-eval's ``hf`` backend does, must equal the ``hf``
  backend's text (see below); the filtered responses must agree;
* every per-sample metric value and every aggregated metric of the results table: discrete
  metrics (acc, acc_norm, exact_match, ...) must be equal, perplexity-like ones within the
  relative tolerance;
* which model class served the vLLM run: ``LLM.apply_model`` inside vLLM's worker must
  return ``vllm_ernie45.*``, and the plugin's log line ("vllm-ernie45 ... serves
  Ernie4_5_MoeForCausalLM ...") must be in the vLLM run's output.

Why generated texts are compared through vLLM's token ids: lm-eval 0.4.13's two backends
turn the same tokens into different strings. Its ``vllm`` backend keeps special tokens
(``skip_special_tokens=False``) and takes vLLM's incremental detokenization, which withholds
bytes that never form valid UTF-8; its ``hf`` backend skips special tokens and decodes the
whole continuation at once (invalid bytes become U+FFFD). A random tiny model emits both
special tokens and byte soup, so lm-eval's own vllm text is compared too (raw, and with the
special-token strings removed) and reported, but not required to be equal.

Modes: ``plain`` (no chat template) and ``chat`` (``--apply_chat_template
--fewshot_as_multiturn``, the tokenizer's ERNIE chat template rendered by each backend) run
against one model load per backend. Both backends get ``enable_thinking=false`` by default:
left unset, lm-eval 0.4.13's vllm backend renders the template with ``enable_thinking=None``
and its hf backend without the variable, which differ for a template that defaults to
thinking (the prompts then differ, and this script reports that).

Usage (CPU, a tiny random checkpoint made on the fly, fp32 on both sides)::

    python eval/backend_parity.py --modes plain,chat --out parity.json

or with a checkpoint directory: ``--model DIR`` (``--dtype bfloat16 --tolerance ...`` for real
weights on a GPU). Exit status 0 when every check passes, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
TASKS_DIR = REPO / "eval" / "tasks"
OFFLINE_PREFIX = "ernie_offline"
DEFAULT_TASKS = [OFFLINE_PREFIX]
# Logged by vllm_ernie45.register() in every vLLM process that loads the plugin.
PLUGIN_LOG_MARK = "vllm-ernie45"
PLUGIN_CLASS_PREFIX = "vllm_ernie45."
# Aggregated metrics that are continuous functions of loglikelihoods (compared with a
# relative tolerance); every other metric must be equal.
CONTINUOUS_METRICS = {"word_perplexity", "byte_perplexity", "bits_per_byte", "perplexity"}
LOGLIKELIHOOD_TYPES = {"multiple_choice", "loglikelihood"}


# --------------------------------------------------------------------------- child side


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _backend_model_args(args: argparse.Namespace) -> dict[str, Any]:
    """lm-eval ``model_args`` of one backend (what ``--model_args`` would say)."""
    if args.backend == "vllm":
        model_args: dict[str, Any] = {
            "pretrained": args.model,
            "dtype": args.dtype,
            "max_model_len": args.max_len,
            "enforce_eager": True,
            "seed": 0,
        }
        from vllm_ernie45.testing.memory import default_memory_utilization

        if default_memory_utilization() is not None:
            model_args["gpu_memory_utilization"] = default_memory_utilization()
    else:
        model_args = {
            "pretrained": args.model,
            "dtype": args.dtype,
            "max_length": args.max_len,
            "batch_size": args.hf_batch_size,
            "device": args.hf_device,
        }
    # Both backends take enable_thinking (passed to the chat template) and think_end_token.
    # Left unset, lm-eval 0.4.13's vllm backend renders the template with
    # enable_thinking=None while its hf backend leaves the variable undefined, which a
    # template defaulting to thinking-on renders differently; so the default here is false.
    if args.enable_thinking != "unset":
        model_args["enable_thinking"] = args.enable_thinking == "true"
        if args.enable_thinking == "true":
            model_args["think_end_token"] = "</think>"
    model_args.update(json.loads(args.vllm_args if args.backend == "vllm" else args.hf_args))
    return model_args


def _record_generations(lm: Any) -> dict[tuple[int, ...], list[int]]:
    """Record the token ids vLLM generates for each prompt (lm-eval keeps only the text).

    vLLM's incremental detokenizer (tokenizers' ``DecodeStream``) withholds bytes that do not
    form valid UTF-8 yet and never emits them if they never do, while lm-eval's hf backend
    decodes the whole continuation at once (invalid bytes become U+FFFD). A random tiny model
    produces such byte soup, so the texts can differ although the tokens agree; with the
    token ids the vLLM continuation can also be decoded exactly the way the hf backend does.
    """
    recorded: dict[tuple[int, ...], list[int]] = {}
    generate = lm.model.generate

    def recording_generate(prompts, sampling_params=None, *args, **kwargs):
        outputs = generate(prompts, sampling_params, *args, **kwargs)
        for output in outputs:
            if output.prompt_logprobs is None:  # generation, not a loglikelihood request
                recorded[tuple(output.prompt_token_ids)] = list(output.outputs[0].token_ids)
        return outputs

    lm.model.generate = recording_generate
    return recorded


def _decode_like_hf(lm: Any, recorded: dict, context: str, gen_kwargs: dict) -> str | None:
    """The vLLM continuation of ``context``, decoded and post-processed as lm-eval's hf
    backend does (``skip_special_tokens=True``, cut at the first stop sequence)."""
    from lm_eval.models.utils import postprocess_generated_text

    tokens = recorded.get(tuple(lm.tok_encode(context)))
    if tokens is None:
        return None
    eos = lm.tokenizer.decode(lm.eot_token_id)
    _, until, _ = lm.modify_gen_kwargs(dict(gen_kwargs), eos=eos, default_max_gen_toks=lm.max_gen_toks)
    text = lm.tokenizer.decode(tokens, skip_special_tokens=True)
    return postprocess_generated_text(text, until, lm.think_end_token)


MODES = {
    # mode -> simple_evaluate arguments
    "plain": {"apply_chat_template": False, "fewshot_as_multiturn": False},
    "chat": {"apply_chat_template": True, "fewshot_as_multiturn": True},
}


def run_backend(args: argparse.Namespace) -> int:
    """Child: evaluate ``args.tasks`` with one lm-eval backend (once per mode, one model
    load) and write the samples and results as JSON."""
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # for apply_model
    import lm_eval
    from lm_eval.api.registry import get_model
    from lm_eval.tasks import TaskManager

    tasks = args.tasks.split(",")
    model_args = _backend_model_args(args)
    start = time.time()
    lm = get_model(args.backend)(**model_args)
    from vllm_ernie45.testing.parity import model_facts

    if args.backend == "vllm":
        # Runs inside vLLM's worker process (one per TP/PP rank): the class that actually
        # serves the model.
        classes = [facts["model_class"] for facts in lm.model.apply_model(model_facts)]
        model_class = classes[0] if len(set(classes)) == 1 else ",".join(classes)
        recorded = _record_generations(lm)
    else:
        classes = [model_facts(lm.model)["model_class"]]
        model_class = classes[0]
        recorded = None
    load_s = time.time() - start

    include_defaults = not all(t.startswith(OFFLINE_PREFIX) for t in tasks)
    task_manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=include_defaults)
    gen_kwargs = {"max_gen_toks": args.max_gen_toks} if args.max_gen_toks else None
    keep = ("doc_id", "filter", "arguments", "resps", "filtered_resps", "target", "metrics")
    modes: dict[str, Any] = {}
    for mode in args.modes.split(","):
        results = lm_eval.simple_evaluate(
            model=lm,
            tasks=tasks,
            limit=args.limit,
            num_fewshot=args.num_fewshot,
            log_samples=True,
            gen_kwargs=gen_kwargs,
            task_manager=task_manager,
            bootstrap_iters=0,
            **MODES[mode],
        )
        output_types = {t: c.get("output_type") for t, c in results["configs"].items()}
        samples = {
            task: [
                {**{k: s[k] for k in keep}, "metric_values": {m: s.get(m) for m in s["metrics"]}}
                for s in task_samples
            ]
            for task, task_samples in results["samples"].items()
        }
        if recorded is not None:
            for task, task_samples in samples.items():
                if output_types.get(task) == "generate_until":
                    for sample in task_samples:
                        sample["resps_from_tokens"] = [
                            _decode_like_hf(lm, recorded, *arg) for arg in sample["arguments"]
                        ]
        modes[mode] = {"output_types": output_types, "results": results["results"], "samples": samples}
    from importlib.metadata import PackageNotFoundError, version

    def version_of(dist: str) -> str | None:
        try:
            return version(dist)
        except PackageNotFoundError:
            return None

    out = {
        "backend": args.backend,
        "model_args": model_args,
        "model_class": model_class,
        "workers": len(classes),
        "versions": {
            dist: version_of(dist) for dist in ("lm_eval", "transformers", "torch", "vllm", "vllm-ernie45")
        },
        "modes": modes,
        "load_s": round(load_s, 1),
        "total_s": round(time.time() - start, 1),
    }
    from vllm_ernie45.child_run import close_llm, write_result

    # vLLM's engine processes end here, while the interpreter is whole, not in vLLM's atexit
    # teardown (the child once died there with SIGABRT after its work: vllm_ernie45.child_run).
    shutdown = close_llm(lm.model) if args.backend == "vllm" else None
    write_result(args.out, _jsonable(out), shutdown)
    return 0


# -------------------------------------------------------------------------- comparison


def special_token_strings(model: str) -> list[str]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    strings = set(tok.all_special_tokens)
    strings.update(t.content for t in tok.added_tokens_decoder.values() if t.special)
    return sorted((s for s in strings if s), key=len, reverse=True)


def _strip(text: str, specials: list[str]) -> str:
    for s in specials:
        text = text.replace(s, "")
    return text


def _num(x: Any) -> float:
    return float(x)


def _values_equal(a: Any, b: Any, rel_tol: float, continuous: bool) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_values_equal(x, y, rel_tol, continuous) for x, y in zip(a, b))
    if continuous:
        try:
            fa, fb = _num(a), _num(b)
        except (TypeError, ValueError):
            return a == b
        return math.isclose(fa, fb, rel_tol=rel_tol, abs_tol=rel_tol)
    return a == b


def compare(test: dict, ref: dict, specials: list[str], tolerance: float) -> dict[str, Any]:
    """Compare one mode of the vLLM run (``test``) with the HF run (``ref``).

    Returns ``{"tasks": {task: {...}}, "max_abs_dll", "metrics_equal", "texts_equal",
    "failures": [...]}``."""
    tasks_report: dict[str, Any] = {}
    failures: list[str] = []
    if set(test["samples"]) != set(ref["samples"]):
        failures.append(f"task sets differ: {sorted(test['samples'])} vs {sorted(ref['samples'])}")
    for task in sorted(set(test["samples"]) & set(ref["samples"])):
        otype = test["output_types"].get(task)
        t_idx = {(s["doc_id"], s["filter"]): s for s in test["samples"][task]}
        r_idx = {(s["doc_id"], s["filter"]): s for s in ref["samples"][task]}
        docs = {doc for doc, _ in t_idx}
        info: dict[str, Any] = {"output_type": otype, "docs": len(docs)}
        if set(t_idx) != set(r_idx):
            failures.append(f"{task}: sample sets differ")
        args_diff = n_ll = greedy_diff = filtered_diff = 0
        texts = raw_equal = lm_eval_equal = tokens_equal = 0
        max_dll = 0.0
        text_mismatches: list[dict[str, Any]] = []
        metric_diff: list[str] = []
        continuous = otype == "loglikelihood_rolling"
        seen_docs: set[Any] = set()
        for key in sorted(set(t_idx) & set(r_idx), key=str):
            t, r = t_idx[key], r_idx[key]
            if t["arguments"] != r["arguments"]:
                args_diff += 1
                continue
            first = key[0] not in seen_docs  # responses repeat once per filter
            seen_docs.add(key[0])
            if first and otype in LOGLIKELIHOOD_TYPES:
                for t_resp, r_resp in zip(t["resps"], r["resps"]):
                    (t_ll, t_greedy), (r_ll, r_greedy) = t_resp[0], r_resp[0]
                    max_dll = max(max_dll, abs(float(t_ll) - float(r_ll)))
                    n_ll += 1
                    greedy_diff += bool(t_greedy) != bool(r_greedy)
            elif first and otype == "loglikelihood_rolling":
                for t_resp, r_resp in zip(t["resps"], r["resps"]):
                    max_dll = max(max_dll, abs(float(t_resp[0]) - float(r_resp[0])))
                    n_ll += 1
            elif first and otype == "generate_until":
                decoded = t.get("resps_from_tokens") or [None] * len(t["resps"])
                for t_resp, r_resp, t_tok in zip(t["resps"], r["resps"], decoded):
                    t_out, r_out = t_resp[0], r_resp[0]
                    texts += 1
                    raw_equal += t_out == r_out
                    lm_eval_equal += _strip(t_out, specials) == _strip(r_out, specials)
                    same = t_tok == r_out
                    tokens_equal += same
                    if not same and len(text_mismatches) < 5:
                        text_mismatches.append(
                            {"doc_id": key[0], "vllm_tokens_decoded": t_tok, "vllm": t_out, "hf": r_out}
                        )
            if otype == "generate_until" and _strip_all(t["filtered_resps"], specials) != _strip_all(
                r["filtered_resps"], specials
            ):
                filtered_diff += 1
            for metric, value in t["metric_values"].items():
                if not _values_equal(value, r["metric_values"].get(metric), tolerance, continuous):
                    metric_diff.append(f"doc {key[0]} {key[1]} {metric}")
        info["arguments_differ"] = args_diff
        if args_diff:
            failures.append(f"{task}: {args_diff} samples with different prompts/arguments")
        if n_ll:
            info.update(loglikelihoods=n_ll, max_abs_dll=max_dll)
            if max_dll > tolerance:
                failures.append(f"{task}: max |dll| {max_dll:.3g} > {tolerance:g}")
        if otype in LOGLIKELIHOOD_TYPES:
            info["is_greedy_differ"] = greedy_diff
            if greedy_diff:
                failures.append(f"{task}: {greedy_diff} is_greedy flags differ")
        if otype == "generate_until":
            info.update(
                texts=texts,
                # vLLM's generated token ids, decoded as the hf backend decodes, == hf's text
                texts_equal=tokens_equal,
                # lm-eval's own vllm text == hf's text, special-token strings removed
                texts_equal_lm_eval=lm_eval_equal,
                # ... and without removing them
                texts_equal_raw=raw_equal,
                filtered_differ=filtered_diff,
                text_mismatches=text_mismatches,
            )
            if tokens_equal != texts:
                failures.append(f"{task}: {texts - tokens_equal}/{texts} generated texts differ")
            if filtered_diff:
                failures.append(f"{task}: {filtered_diff} filtered responses differ")
        info["per_sample_metric_differ"] = metric_diff[:10]
        if metric_diff:
            failures.append(f"{task}: {len(metric_diff)} per-sample metric values differ")
        # the aggregated metrics of the results table
        t_res, r_res = test["results"].get(task, {}), ref["results"].get(task, {})
        table: dict[str, Any] = {}
        for name, value in t_res.items():
            if name in ("alias", "sample_len") or "_stderr" in name or not isinstance(value, (int, float)):
                continue
            metric = name.split(",")[0]
            ok = _values_equal(value, r_res.get(name), tolerance, metric in CONTINUOUS_METRICS)
            table[name] = {"vllm": value, "hf": r_res.get(name), "equal": ok}
            if not ok:
                failures.append(f"{task}: metric {name} differs: {value} vs {r_res.get(name)}")
        info["metrics"] = table
        tasks_report[task] = info
    return {
        "tasks": tasks_report,
        "max_abs_dll": max((t.get("max_abs_dll", 0.0) for t in tasks_report.values()), default=0.0),
        "metrics_equal": all(m["equal"] for t in tasks_report.values() for m in t["metrics"].values()),
        "texts_equal": all(t.get("texts_equal") == t.get("texts") for t in tasks_report.values()),
        "failures": failures,
    }


def _strip_all(value: Any, specials: list[str]) -> Any:
    if isinstance(value, str):
        return _strip(value, specials)
    if isinstance(value, list):
        return [_strip_all(v, specials) for v in value]
    return value


# ---------------------------------------------------------------------------- parent side


def _child_cmd(args: argparse.Namespace, backend: str, out: Path) -> list[str]:
    cmd = [
        sys.executable, str(Path(__file__).resolve()), "--backend", backend,
        "--model", str(args.model), "--tasks", args.tasks, "--modes", args.modes,
        "--out", str(out), "--dtype", args.dtype, "--max-len", str(args.max_len),
        "--max-gen-toks", str(args.max_gen_toks), "--enable-thinking", args.enable_thinking,
        "--vllm-args", args.vllm_args, "--hf-args", args.hf_args,
        "--hf-batch-size", str(args.hf_batch_size), "--hf-device", args.hf_device,
    ]  # fmt: skip
    if args.limit is not None:
        cmd += ["--limit", str(args.limit)]
    if args.num_fewshot is not None:
        cmd += ["--num-fewshot", str(args.num_fewshot)]
    return cmd


def equivalent_cli(args: argparse.Namespace, result: dict, mode: str) -> str:
    """The ``lm_eval`` command line doing what one child did in one mode."""
    model_args = ",".join(f"{k}={v}" for k, v in result["model_args"].items())
    cmd = (
        f"lm_eval --model {result['backend']} --model_args {model_args} "
        f"--include_path {TASKS_DIR.relative_to(REPO)} --tasks {args.tasks} --log_samples "
        f"--output_path eval-out/{result['backend']}-{mode}"
    )
    if args.limit is not None:
        cmd += f" --limit {args.limit}"
    if args.num_fewshot is not None:
        cmd += f" --num_fewshot {args.num_fewshot}"
    if args.max_gen_toks:
        cmd += f" --gen_kwargs max_gen_toks={args.max_gen_toks}"
    if MODES[mode]["apply_chat_template"]:
        cmd += " --apply_chat_template --fewshot_as_multiturn"
    return cmd


def run_parity(args: argparse.Namespace) -> int:
    from vllm_ernie45.child_run import CHILD_ENV, ChildFailed, judge_child

    work = Path(args.workdir or tempfile.mkdtemp(prefix="ernie-eval-parity-"))
    work.mkdir(parents=True, exist_ok=True)
    if not args.model:
        from vllm_ernie45.testing.tiny.checkpoint import make_tiny_checkpoint

        args.model = str(make_tiny_checkpoint(work / "tiny-21b", "21b", dtype="float32"))
        print(f"parity: tiny checkpoint {args.model}", flush=True)
    env = {**os.environ, **CHILD_ENV}  # stacks of an engine hung at shutdown (child_run)
    env.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if Path(args.model).is_dir() and all(t.startswith(OFFLINE_PREFIX) for t in args.tasks.split(",")):
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("HF_DATASETS_OFFLINE", "1")

    runs: dict[str, dict] = {}
    timings: dict[str, float] = {}
    plugin_lines: list[str] = []
    for backend in ("vllm", "hf"):
        out, log = work / f"{backend}.json", work / f"{backend}.log"
        start = time.time()
        with log.open("w") as fh:
            proc = subprocess.run(
                _child_cmd(args, backend, out), stdout=fh, stderr=subprocess.STDOUT,
                env=env, timeout=args.timeout,
            )  # fmt: skip
        timings[backend] = round(time.time() - start, 1)
        text = log.read_text(errors="replace")
        try:
            runs[backend] = judge_child(proc.returncode, out, f"log {log}:\n{text[-6000:]}")
        except ChildFailed as err:
            print(f"parity: {backend} run failed: {err}")
            return 2
        print(f"parity: {backend} run done in {timings[backend]} s ({runs[backend]['model_class']})", flush=True)
        if backend == "vllm":
            plugin_lines = [ln.strip() for ln in text.splitlines() if PLUGIN_LOG_MARK in ln and " serves " in ln]

    specials = special_token_strings(args.model)
    modes = {
        mode: compare(runs["vllm"]["modes"][mode], runs["hf"]["modes"][mode], specials, args.tolerance)
        for mode in args.modes.split(",")
    }
    failures = [f"[{mode}] {f}" for mode, m in modes.items() for f in m["failures"]]
    vllm_class = runs["vllm"]["model_class"]
    plugin = {
        "vllm_model_class": vllm_class,
        "vllm_workers": runs["vllm"]["workers"],
        "hf_model_class": runs["hf"]["model_class"],
        "served_by_plugin": all(c.startswith(PLUGIN_CLASS_PREFIX) for c in vllm_class.split(",")),
        "log_lines": plugin_lines[:4],
    }
    if not plugin["served_by_plugin"]:
        failures.append(f"vLLM served {vllm_class}, not a {PLUGIN_CLASS_PREFIX}* class")
    if not plugin_lines:
        failures.append(f"no '{PLUGIN_LOG_MARK} ... serves' line in the vLLM run's output")
    report = {
        "ok": not failures,
        "failures": failures,
        "tolerance": args.tolerance,
        "max_abs_dll": max(m["max_abs_dll"] for m in modes.values()),
        "metrics_equal": all(m["metrics_equal"] for m in modes.values()),
        "texts_equal": all(m["texts_equal"] for m in modes.values()),
        "plugin": plugin,
        "modes": modes,
        "model": args.model,
        "dtype": args.dtype,
        "task_list": args.tasks,
        "limit": args.limit,
        "max_gen_toks": args.max_gen_toks,
        "enable_thinking": args.enable_thinking,
        "versions": runs["vllm"]["versions"],
        "timings_s": timings,
        "commands": {
            f"{b}-{mode}": equivalent_cli(args, runs[b], mode) for b in runs for mode in modes
        },
        "workdir": str(work),
    }
    if args.out:
        Path(args.out).write_text(json.dumps(report, ensure_ascii=False, indent=1))
    print_summary(report)
    return 0 if report["ok"] else 1


def print_summary(report: dict) -> None:
    plugin = report["plugin"]
    print(f"parity: vLLM ({plugin['vllm_model_class']}, {plugin['vllm_workers']} worker(s)) vs "
          f"HF ({plugin['hf_model_class']}), dtype {report['dtype']}")  # fmt: skip
    for mode, m in report["modes"].items():
        for task, info in m["tasks"].items():
            parts = [info["output_type"], f"{info['docs']} docs"]
            if "max_abs_dll" in info:
                parts.append(f"max|dll| {info['max_abs_dll']:.3g} over {info['loglikelihoods']}")
            if "texts" in info:
                parts.append(
                    f"texts equal {info['texts_equal']}/{info['texts']} (lm-eval's vllm text: "
                    f"{info['texts_equal_lm_eval']} without special tokens, {info['texts_equal_raw']} raw)"
                )
            metrics = " ".join(
                f"{k}={v['vllm']:.4g}" + ("" if v["equal"] else f"!={v['hf']:.4g}")
                for k, v in info["metrics"].items()
            )
            print(f"  [{mode}] {task}: {', '.join(parts)}; {metrics}")
    print(f"parity: max |dloglikelihood| {report['max_abs_dll']:.3g} (tolerance {report['tolerance']:g}), "
          f"metrics equal {report['metrics_equal']}, texts equal {report['texts_equal']}, "
          f"served by plugin {plugin['served_by_plugin']}")  # fmt: skip
    for line in plugin["log_lines"][:1]:
        print(f"parity: plugin log: {line}")
    print("parity: " + ("OK" if report["ok"] else "FAILED: " + "; ".join(report["failures"])))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="checkpoint dir or hub id (default: a tiny random one)")
    parser.add_argument("--tasks", default=",".join(DEFAULT_TASKS), help="comma-separated")
    parser.add_argument("--limit", type=float, default=None, help="samples per task")
    parser.add_argument("--num-fewshot", type=int, default=None)
    parser.add_argument("--max-gen-toks", type=int, default=16, help="0: the task's own")
    parser.add_argument("--max-len", type=int, default=512, help="max_model_len / max_length")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--tolerance", type=float, default=1e-3,
                        help="max |dloglikelihood| per sample; relative for perplexities")  # fmt: skip
    parser.add_argument("--modes", default="plain",
                        help="comma-separated: plain, chat (--apply_chat_template --fewshot_as_multiturn)")
    parser.add_argument("--enable-thinking", choices=("unset", "false", "true"), default="false",
                        help="enable_thinking model arg of both backends (true adds think_end_token)")
    parser.add_argument("--vllm-args", default="{}", help="extra vLLM model_args as JSON")
    parser.add_argument("--hf-args", default="{}", help="extra HF model_args as JSON")
    parser.add_argument("--hf-batch-size", default="4")
    parser.add_argument("--hf-device", default="cpu")
    parser.add_argument("--workdir", help="keep checkpoints, logs and per-backend JSON here")
    parser.add_argument("--out", help="write the report JSON here")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per backend run")
    parser.add_argument("--backend", choices=("vllm", "hf"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    unknown = set(args.modes.split(",")) - set(MODES)
    if unknown:
        parser.error(f"unknown --modes {sorted(unknown)}; choose from {sorted(MODES)}")
    if args.limit is not None and args.limit >= 1:
        args.limit = int(args.limit)
    if args.backend:
        if not args.model or not args.out:
            parser.error("--backend needs --model and --out")
        return run_backend(args)
    return run_parity(args)


if __name__ == "__main__":
    sys.exit(main())
