"""lm-eval through the plugin: the offline tasks of eval/tasks score the same with
``--model vllm`` (vLLM with this plugin serving a tiny random ERNIE 4.5 MoE checkpoint) as with
``--model hf`` (HF transformers), sample by sample, fp32 on both sides, on CPU.

eval/backend_parity.py runs both backends (each in its own process, real lm-eval, real vLLM)
over every offline task -- MMLU- and C-Eval-format multiple choice, multi-token cloze, GSM8K-
format generation with 3-shot context, rolling perplexity -- once without and once with the
chat template (``--apply_chat_template --fewshot_as_multiturn``), and writes a JSON report.

A second run serves the model with ``tensor_parallel_size=2`` (two CPU workers).

Tolerance: measured max |delta loglikelihood| is ~1e-5 (choices of 1-4 tokens) and ~4e-5
(rolling sums over ~40 tokens); 1e-3 leaves a margin of >20x, while serving the vLLM side in
bf16 against the fp32 reference (a control) already moves loglikelihoods by ~1.
Runtime: about 2.5 minutes on 2 cores (two vLLM startups dominate).
"""

from __future__ import annotations

import json
import os
import time

import pytest

from conftest import REPO, run_python

pytest.importorskip("lm_eval", reason="lm-eval is the 'eval' extra: pip install -e '.[eval]'")

TOLERANCE = 1e-3
TASKS = ("ernie_offline_mmlu", "ernie_offline_ceval", "ernie_offline_cloze",
         "ernie_offline_gsm", "ernie_offline_ppl")  # fmt: skip


def run_parity(work, *args: str, env: dict | None = None) -> dict:
    out = work / "report.json"
    start = time.time()
    proc = run_python(
        [str(REPO / "eval" / "backend_parity.py"), "--tolerance", str(TOLERANCE),
         "--workdir", str(work), "--out", str(out), *args],
        timeout=900,
        env=env,
    )  # fmt: skip
    elapsed = time.time() - start
    assert out.exists(), f"parity run failed ({elapsed:.0f} s):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    print(proc.stdout)  # the summary, shown with pytest -s
    report = json.loads(out.read_text())
    report["_stdout"] = proc.stdout
    report["_returncode"] = proc.returncode
    return report


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A tiny random ERNIE-4.5-21B-A3B-like checkpoint with its ERNIE-style tokenizer."""
    from vllm_ernie45.testing.tiny.checkpoint import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("eval-tiny") / "tiny-21b", "21b")


@pytest.fixture(scope="module")
def parity_report(tiny_model, tmp_path_factory):
    """Every offline task, 8 docs each, with and without the chat template."""
    return run_parity(
        tmp_path_factory.mktemp("eval-parity"),
        "--model", str(tiny_model), "--modes", "plain,chat", "--limit", "8", "--max-gen-toks", "16",
    )  # fmt: skip


def test_plugin_served_the_vllm_backend(parity_report):
    plugin = parity_report["plugin"]
    assert plugin["vllm_model_class"] == "vllm_ernie45.model.ErnieMoeForCausalLM"
    assert plugin["hf_model_class"].endswith("Ernie4_5_MoeForCausalLM")
    assert plugin["log_lines"], "no 'vllm-ernie45 ... serves ...' log line in the vLLM run"
    assert "serves Ernie4_5_MoeForCausalLM" in plugin["log_lines"][0]


@pytest.mark.parametrize("mode", ["plain", "chat"])
def test_every_task_ran_with_identical_requests(parity_report, mode):
    tasks = parity_report["modes"][mode]["tasks"]
    assert set(TASKS) <= set(tasks)
    for task in TASKS:
        assert tasks[task]["docs"] >= 6, task
        assert tasks[task]["arguments_differ"] == 0, f"{task}: backends built different prompts"


@pytest.mark.parametrize("mode", ["plain", "chat"])
def test_loglikelihoods_agree(parity_report, mode):
    tasks = parity_report["modes"][mode]["tasks"]
    for task in ("ernie_offline_mmlu", "ernie_offline_ceval", "ernie_offline_cloze", "ernie_offline_ppl"):
        info = tasks[task]
        assert info["loglikelihoods"] > 0
        assert info["max_abs_dll"] <= TOLERANCE, f"{task}: max |dll| {info['max_abs_dll']}"
        assert info.get("is_greedy_differ", 0) == 0, task
    assert parity_report["max_abs_dll"] <= TOLERANCE


@pytest.mark.parametrize("mode", ["plain", "chat"])
def test_metrics_and_generations_agree(parity_report, mode):
    tasks = parity_report["modes"][mode]["tasks"]
    for task in TASKS:
        info = tasks[task]
        assert info["metrics"], task
        unequal = {k: v for k, v in info["metrics"].items() if not v["equal"]}
        assert not unequal, f"{task}: {unequal}"
        assert not info["per_sample_metric_differ"], f"{task}: {info['per_sample_metric_differ']}"
    gsm = tasks["ernie_offline_gsm"]
    assert gsm["texts"] >= 6
    assert gsm["texts_equal"] == gsm["texts"], gsm["text_mismatches"]
    assert gsm["filtered_differ"] == 0


def test_report_is_ok(parity_report):
    assert parity_report["ok"], parity_report["failures"]
    assert parity_report["_returncode"] == 0, parity_report["_stdout"][-3000:]


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="tensor_parallel_size=2 on CPU needs 2 cores")
def test_tensor_parallel_2_is_served_by_the_plugin_with_parity(tiny_model, tmp_path):
    """``--model_args ...,tensor_parallel_size=2``: the plugin serves the model in both
    workers, and the scores still match the HF reference."""
    report = run_parity(
        tmp_path,
        "--model", str(tiny_model), "--tasks", "ernie_offline_mmlu,ernie_offline_gsm",
        "--limit", "4", "--max-gen-toks", "16", "--vllm-args", json.dumps({"tensor_parallel_size": 2}),
        # vLLM's CPU workers bind their OpenMP threads per NUMA node; one node here, so bind
        # each worker to a core by hand.
        env={"VLLM_CPU_OMP_THREADS_BIND": "0|1"},
    )  # fmt: skip
    plugin = report["plugin"]
    assert plugin["vllm_workers"] == 2
    assert plugin["vllm_model_class"] == "vllm_ernie45.model.ErnieMoeForCausalLM"
    assert sum("serves Ernie4_5_MoeForCausalLM" in line for line in plugin["log_lines"]) >= 2
    assert report["max_abs_dll"] <= TOLERANCE
    assert report["metrics_equal"] and report["texts_equal"]
    assert report["ok"], report["failures"]
