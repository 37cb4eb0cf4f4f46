"""The batch runner (vllm_ernie45.batch, docs/batch.md) on real vLLM, tiny checkpoints, CPU.

Four engine starts in all, one child process each: (1) a reference simple-format job and an
OpenAI-format job on one engine (the module's API); (2) the same simple job through the
command line, SIGKILLed mid-way (the whole process group: the job and vLLM's engine); (3) its
rerun, which must complete it to exactly the reference's results; (4) a /v1/completions job
on a Base-style checkpoint (no chat template). The resume logic itself (torn last line,
corrupt output, --sort) is also checked without an engine.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vllm_ernie45 import batch

REPO = Path(__file__).resolve().parent.parent
ENGINE = ["--dtype", "float32", "--enforce-eager", "--max-model-len", "256", "--max-num-seqs", "4",
          "--engine-arg", "gpu_memory_utilization=0.3"]  # fmt: skip
N_GOOD = 120  # simple-format prompts; enough decode steps at max_num_seqs 4 to kill the job mid-way
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
          "parameters": {"type": "object", "properties": {"location": {"type": "string"}}}}}]  # fmt: skip
CALL_REGEX = r'<tool_call>\n\{"name": "get_weather", "arguments": \{"location": "[a-z]{30,40}"\}\}\n</tool_call>'
THINK_REGEX = r"abc[a-z]{5}\n</think>\n\n<response>\nhello[a-z]{3}\n</response>"


def _env() -> dict:
    env = dict(os.environ)
    env.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}"
    return env


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


# ----------------------------------------------------------------------------- inputs


def simple_input(path: Path) -> dict[int, str]:
    """N_GOOD prompts (and one chat line) with bad lines among them; returns {line: why bad}."""
    lines, bad = [], {}
    for i in range(N_GOOD):
        lines.append({"id": f"p{i}", "prompt": f"Story {i}: the river crossed an old bridge",
                      "max_tokens": 24, "ignore_eos": True})  # fmt: skip
        if i == 5:
            lines.append("this is {not json")
            bad[len(lines)] = "not valid JSON"
        if i == 10:
            lines.append({"id": "no-prompt", "max_tokens": 4})
            bad[len(lines)] = "exactly one of 'prompt' or 'messages'"
        if i == 15:
            lines.append({"id": "too-long", "prompt": "river bridge " * 400})
            bad[len(lines)] = "max_model_len is 256"
        if i == 20:
            lines.append({"id": "p3", "prompt": "a second p3"})
            bad[len(lines)] = "duplicate id"
        if i == 25:
            lines.append({"id": "chat", "messages": [{"role": "user", "content": "Hi"}], "enable_thinking": False,
                          "max_tokens": 8})  # fmt: skip
        if i == 30:
            lines.append([1, 2, 3])
            bad[len(lines)] = "must be a JSON object"
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return bad


def openai_input(path: Path) -> dict[int, str]:
    def chat(cid, body):
        return {"custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
                "body": {"model": "m", "messages": [{"role": "user", "content": "What is the weather?"}], **body}}  # fmt: skip

    rows = [
        chat("tool", {"tools": TOOLS, "max_tokens": 200, "temperature": 0,
                      "chat_template_kwargs": {"enable_thinking": False},
                      "structured_outputs": {"regex": CALL_REGEX}}),  # fmt: skip
        chat("think", {"max_tokens": 60, "temperature": 0, "structured_outputs": {"regex": THINK_REGEX}}),
        chat("plain", {"max_completion_tokens": 6, "chat_template_kwargs": {"enable_thinking": False},
                       "logprobs": True, "top_logprobs": 3}),
        {"custom_id": "cmpl", "method": "POST", "url": "/v1/completions",
         "body": {"model": "m", "prompt": "Once upon a time", "max_tokens": 5, "n": 2, "temperature": 0.7, "seed": 3,
                  "logprobs": 2}},
        {"custom_id": "emb", "method": "POST", "url": "/v1/embeddings", "body": {"model": "m", "input": "x"}},
        chat("bad-body", {"messages": "not a list"}),
        {"method": "POST", "url": "/v1/completions", "body": {"prompt": "no custom_id"}},
        {"custom_id": "long", "method": "POST", "url": "/v1/completions",
         "body": {"model": "m", "prompt": "river bridge " * 400, "max_tokens": 4}},
        "{torn json",
    ]  # fmt: skip
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in rows))
    return {5: "url '/v1/embeddings'", 6: "invalid body", 7: "'custom_id'", 8: "max_model_len is 256", 9: "not valid JSON"}


REFERENCE_DRIVER = """
import json, sys
from vllm_ernie45.batch import build_parser, make_llm, run_batch
from vllm_ernie45.child_run import close_llm
if __name__ == "__main__":
    model, simple, ref, oai, oai_out, summary, *engine = sys.argv[1:]
    common = ["--model", model, "--no-progress", *engine]
    a = build_parser().parse_args(common + ["-i", simple, "-o", ref, "--sort"])
    llm = make_llm(a)
    s1 = run_batch(llm, simple, ref, a)
    b = build_parser().parse_args(common + ["-i", oai, "-o", oai_out, "--reasoning-parser", "ernie45"])
    s2 = run_batch(llm, oai, oai_out, b)
    close_llm(llm)
    json.dump([s1.as_dict(), s2.as_dict()], open(summary, "w"))
"""


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    from vllm_ernie45.testing.tiny.checkpoint import make_tiny_checkpoint

    tmp = tmp_path_factory.mktemp("batch")
    model = make_tiny_checkpoint(tmp / "ernie", "21b", with_tokenizer=True)
    simple_bad = simple_input(tmp / "simple.jsonl")
    openai_bad = openai_input(tmp / "openai.jsonl")
    return {"tmp": tmp, "model": model, "simple_bad": simple_bad, "openai_bad": openai_bad}


@pytest.fixture(scope="module")
def reference(work):
    tmp = work["tmp"]
    args = [str(work["model"]), str(tmp / "simple.jsonl"), str(tmp / "ref.jsonl"), str(tmp / "openai.jsonl"),
            str(tmp / "openai-out.jsonl"), str(tmp / "ref-summary.json"), *ENGINE]  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", REFERENCE_DRIVER, *args], capture_output=True, text=True,
                          timeout=600, env=_env())  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    simple_summary, openai_summary = json.loads((tmp / "ref-summary.json").read_text())
    return {"simple": simple_summary, "openai": openai_summary}


# ----------------------------------------------------------------------------- simple format, resume


def test_reference_job_and_bad_lines(work, reference):
    tmp = work["tmp"]
    records = _lines(tmp / "ref.jsonl")
    ids = [r["id"] for r in records]
    expected = [f"p{i}" for i in range(N_GOOD)]
    expected.insert(26, "chat")  # --sort: input order
    assert ids == expected
    assert all(r["num_completion_tokens"] == 24 for r in records if r["id"] != "chat")
    chat = records[26]
    assert chat["prompt"].endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n") and chat["num_completion_tokens"] <= 8
    errors = _lines(tmp / "ref.jsonl.errors.jsonl")
    assert {e["line"]: e["reason"] for e in errors}.keys() == work["simple_bad"].keys()
    for e in errors:
        assert work["simple_bad"][e["line"]] in e["reason"], e
    s = reference["simple"]
    assert (s["done"], s["skipped"], s["failed"]) == (N_GOOD + 1, 0, len(work["simple_bad"]))
    assert s["generated_tokens"] == sum(r["num_completion_tokens"] for r in records)


def _cli(work, out: Path, *extra: str, **popen) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "vllm_ernie45.batch", "--model", str(work["model"]), "-i",
           str(work["tmp"] / "simple.jsonl"), "-o", str(out), *ENGINE, *extra]  # fmt: skip
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), **popen)


def test_sigkilled_job_resumes_to_the_uninterrupted_result(work, reference):
    tmp = work["tmp"]
    out = tmp / "killed.jsonl"
    job = _cli(work, out, "--window", "4", start_new_session=True)
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and job.poll() is None:
            if out.exists() and out.read_bytes().count(b"\n") >= 30:
                break
            time.sleep(0.02)
        assert job.poll() is None, "the job ended before it could be killed:\n" + job.stderr.read()[-3000:]
        os.killpg(job.pid, signal.SIGKILL)  # the job and vLLM's engine processes, no clean-up
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
        job.communicate(timeout=60)
    assert job.returncode == -signal.SIGKILL
    written = _lines(out)
    assert 30 <= len(written) < N_GOOD + 1
    with out.open("a") as fh:  # a result torn mid-write, as a kill inside write() leaves it
        fh.write('{"id": "p119", "prompt": "Story 119: the ri')

    rerun = _cli(work, out, "--sort")
    stdout, stderr = rerun.communicate(timeout=600)
    assert rerun.returncode == 1, stdout + stderr[-4000:]  # the bad lines failed again
    assert "dropped a torn last line" in stderr
    final = re.search(r"done (\d+), skipped (\d+) \(already in the output\), failed (\d+).*"
                      r" ([\d.]+) generated tok/s", stdout)  # fmt: skip
    assert final, stdout
    done, skipped, failed = map(int, final.groups()[:3])
    assert (done + skipped, skipped, failed) == (N_GOOD + 1, len(written), len(work["simple_bad"]))
    assert re.search(r"batch: .*req/s", stderr), stderr[-2000:]  # the progress bar

    resumed = _lines(out)
    ids = [r["id"] for r in resumed]
    assert len(ids) == len(set(ids)), "duplicate ids after resume"
    ref = _lines(tmp / "ref.jsonl")
    assert resumed == ref  # same results, same (input) order after --sort


# ----------------------------------------------------------------------------- OpenAI format


def test_openai_batch_format_and_parsers(work, reference):
    tmp = work["tmp"]
    by_id = {r["custom_id"]: r for r in _lines(tmp / "openai-out.jsonl")}
    assert set(by_id) == {"tool", "think", "plain", "cmpl"}
    for record in by_id.values():
        assert record["id"].startswith("batch_req_") and record["error"] is None
        assert record["response"]["status_code"] == 200 and record["response"]["request_id"]
        usage = record["response"]["body"]["usage"]
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] > 0

    tool = by_id["tool"]["response"]["body"]
    assert tool["object"] == "chat.completion"
    choice = tool["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and not (choice["message"]["content"] or "").strip()
    (call,) = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["id"] and call["function"]["name"] == "get_weather"
    assert 30 <= len(json.loads(call["function"]["arguments"])["location"]) <= 40

    think = by_id["think"]["response"]["body"]["choices"][0]["message"]
    assert think["reasoning"].startswith("abc") and "</think>" not in think["reasoning"]
    assert think["content"].startswith("hello") and "<response>" not in think["content"]

    plain = by_id["plain"]["response"]["body"]
    assert plain["usage"]["completion_tokens"] <= 6 and "tool_calls" not in plain["choices"][0]["message"]
    # logprobs as the OpenAI API gives them: one entry per generated token, its top 3 ranked
    content = plain["choices"][0]["logprobs"]["content"]
    assert len(content) == plain["usage"]["completion_tokens"]
    for entry in content:
        assert entry["bytes"] == list(entry["token"].encode()) and entry["logprob"] <= 0
        top = [t["logprob"] for t in entry["top_logprobs"]]
        assert len(top) == 3 and top == sorted(top, reverse=True) and entry["logprob"] <= top[0]

    cmpl = by_id["cmpl"]["response"]["body"]
    assert cmpl["object"] == "text_completion" and [c["index"] for c in cmpl["choices"]] == [0, 1]
    assert cmpl["usage"]["completion_tokens"] == 10
    for choice in cmpl["choices"]:  # the legacy completions layout
        lp = choice["logprobs"]
        assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 5
        assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(5)]
        # (two tokens may read as one text: a dict of at most 2)
        assert all(1 <= len(top) <= 2 and max(top.values()) <= 0 for top in lp["top_logprobs"])

    errors = _lines(tmp / "openai-out.jsonl.errors.jsonl")
    assert sorted(e["line"] for e in errors) == sorted(work["openai_bad"])
    for e in errors:
        assert work["openai_bad"][e["line"]] in e["reason"], e
        assert e["response"]["status_code"] in (400, 404) and e["response"]["body"]["error"]["message"] == e["reason"]
    assert next(e for e in errors if e["line"] == 5)["custom_id"] == "emb"
    s = reference["openai"]
    assert (s["done"], s["skipped"], s["failed"]) == (4, 0, 5)


def test_completions_on_a_base_checkpoint(work, tmp_path):
    """A Base-style checkpoint: its tokenizer has no chat template. /v1/completions runs on
    the raw prompt (no template); a chat request fails alone, in the errors file."""
    from transformers import AutoTokenizer

    from vllm_ernie45.testing.tiny.checkpoint import make_tiny_checkpoint

    model = make_tiny_checkpoint(tmp_path / "base", "300b", with_tokenizer=True)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    for extra in model.glob("chat_template*"):
        extra.unlink()
    prompts = ["The capital of France is", "北京是中国的首都，", "def fib(n):"]
    rows = [{"custom_id": f"k{i}", "method": "POST", "url": "/v1/completions",
             "body": {"model": "base", "prompt": p, "max_tokens": 6, "temperature": 0, "echo": i == 0}}
            for i, p in enumerate(prompts)]  # fmt: skip
    rows.insert(1, {"custom_id": "chat", "method": "POST", "url": "/v1/chat/completions",
                    "body": {"model": "base", "messages": [{"role": "user", "content": "Hi"}]}})  # fmt: skip
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out.jsonl"
    proc = subprocess.run(
        [sys.executable, "-m", "vllm_ernie45.batch", "--model", str(model), "-i", str(src), "-o", str(out),
         "--served-model-name", "base", "--no-progress", *ENGINE],
        capture_output=True, text=True, timeout=600, env=_env(),
    )  # fmt: skip
    assert proc.returncode == 1, proc.stdout + proc.stderr[-4000:]
    tok = AutoTokenizer.from_pretrained(model)
    by_id = {r["custom_id"]: r["response"]["body"] for r in _lines(out)}
    assert sorted(by_id) == ["k0", "k1", "k2"]
    for i, prompt in enumerate(prompts):
        body = by_id[f"k{i}"]
        assert body["model"] == "base" and body["object"] == "text_completion"
        assert body["usage"]["prompt_tokens"] == len(tok(prompt).input_ids)  # the raw prompt, no template
        assert body["usage"]["completion_tokens"] <= 6
    assert by_id["k0"]["choices"][0]["text"].startswith(prompts[0])  # echo
    (error,) = _lines(Path(str(out) + ".errors.jsonl"))
    assert error["custom_id"] == "chat" and error["line"] == 2 and "chat template" in error["reason"]


# ----------------------------------------------------------------------------- without an engine


def test_scan_output_drops_only_a_torn_last_line(tmp_path):
    out = tmp_path / "o.jsonl"
    out.write_text('{"id": "a"}\n{"id": 2}\n{"id": "c", "compl')
    done, torn = batch.scan_output(out, batch.SIMPLE)
    assert (done, torn) == ({'"a"', "2"}, True) and out.read_text() == '{"id": "a"}\n{"id": 2}\n'
    assert batch.scan_output(out, batch.SIMPLE) == ({'"a"', "2"}, False)
    out.write_text('{"id": "1"}\n{"id": 1}\n')  # ids compare as written
    assert batch.scan_output(out, batch.SIMPLE) == ({'"1"', "1"}, False)
    out.write_text('{"custom_id": "x", "response": {}}\n')
    assert batch.scan_output(out, batch.OPENAI) == ({"x"}, False)
    out.write_text('{"id": "a"}\nnot json\n{"id": "c"}\n')
    with pytest.raises(batch.Fatal):
        batch.scan_output(out, batch.SIMPLE)
    assert out.read_text() == '{"id": "a"}\nnot json\n{"id": "c"}\n'  # never repaired by guess


def test_sort_output_and_main_refuses_a_corrupt_output(tmp_path):
    out = tmp_path / "o.jsonl"
    out.write_text('{"id": "b", "x": 1}\n{"id": "z"}\n{"id": "a"}\n')
    batch.sort_output(out, {'"a"': 1, '"b"': 2}, batch.SIMPLE)
    assert [json.loads(x)["id"] for x in out.read_text().splitlines()] == ["a", "b", "z"]
    src = tmp_path / "in.jsonl"
    src.write_text('{"id": "a", "prompt": "x"}\n')
    out.write_text('garbage\n{"id": "a"}\n')
    assert batch.main(["--model", "unused", "-i", str(src), "-o", str(out)]) == batch.EXIT_FATAL
    assert batch.main(["--model", "unused", "-i", str(tmp_path / "missing"), "-o", str(out)]) == batch.EXIT_FATAL


def test_the_plugin_entry_point_never_imports_the_runner():
    init = (REPO / "vllm_ernie45" / "__init__.py").read_text()
    assert "batch" not in init
    proc = subprocess.run([sys.executable, "-c", "import sys, vllm_ernie45; print(sorted(m for m in sys.modules if "
                           "m.startswith('vllm_ernie45')))"], capture_output=True, text=True, env=_env())  # fmt: skip
    assert "vllm_ernie45.batch" not in proc.stdout
