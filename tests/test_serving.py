"""End-to-end serving: real ``vllm serve`` with the plugin's ``ernie45`` parsers (one start).

One module-scoped server on a tiny random checkpoint (with tokenizer/chat template), bound to
127.0.0.1 on a free port, output in ``<tmp>/server.log`` (path printed on failure). The tiny
model writes random tokens, so these tests check wiring and response shapes, not content:

(a) chat with tools, stream off and on, reasoning on/off, named/"required" ``tool_choice``
    (structured output, which vLLM applies only after the reasoning ends: with thinking off);
(b) scripts/serving/serve_load.py against the same server (16 concurrent streams, some cancelled);
(c) bad input -> HTTP 4xx with an OpenAI-style error, server still healthy.
(d) a tool call forced by a regex (structured output): its arguments streamed incrementally,
    whole on request, and a call cut off by max_tokens never completed.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

REPO = Path(__file__).resolve().parent.parent
FINISH = {"stop", "length", "tool_calls"}

_spec = importlib.util.spec_from_file_location("serve_load", REPO / "scripts" / "serving" / "serve_load.py")
serve_load = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(serve_load)
TOOLS = serve_load.TOOLS
MAX_MODEL_LEN = 1024


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from shutil import which

    if which("vllm") is None:
        pytest.skip("no `vllm` executable")
    from vllm_ernie45.testing.tiny.checkpoint import make_tiny_checkpoint

    tmp = tmp_path_factory.mktemp("serving")
    ckpt = make_tiny_checkpoint(tmp / "ckpt", "21b", with_tokenizer=True)
    port = serve_load.free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp / "server.log"
    proc = serve_load.start_server(ckpt, port, MAX_MODEL_LEN, log, served_name="tiny-ernie")
    try:
        try:
            serve_load.wait_healthy(url, 300, proc)
        except Exception as e:  # noqa: BLE001
            tail = log.read_text(errors="replace")[-4000:] if log.exists() else ""
            pytest.fail(f"server did not start: {e}\n--- {log} ---\n{tail}")
        yield {"url": url, "model": "tiny-ernie", "log": log, "proc": proc}
    finally:
        serve_load.stop_server(proc)
        print(f"\nserver log: {log}")


@pytest.fixture(scope="module")
def client(server):
    c = openai.OpenAI(base_url=server["url"] + "/v1", api_key="EMPTY", max_retries=0, timeout=120)
    yield c
    c.close()


def _extra(obj, name):
    return (obj.model_extra or {}).get(name, getattr(obj, name, None))


def _reasoning(msg):
    """vLLM 0.32 names the field ``reasoning``; older ones ``reasoning_content``."""
    extra = msg.model_extra or {}
    assert "reasoning" in extra or "reasoning_content" in extra, f"no reasoning field in {msg}"
    r = extra.get("reasoning", extra.get("reasoning_content"))
    assert r is None or isinstance(r, str)
    return r


def _chat(client, model, thinking=True, **kw):
    kw.setdefault("max_tokens", 32)
    return client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "What is the weather in Beijing?"}],
        extra_body={"chat_template_kwargs": {"enable_thinking": thinking}}, **kw)


def _collect(stream):
    """Deltas of a stream -> (reasoning, content, calls by index, finish_reason, n_chunks)."""
    reasoning, content, calls, finish, n = "", "", {}, None, 0
    for chunk in stream:
        if not chunk.choices:
            continue
        n += 1
        ch = chunk.choices[0]
        d = ch.delta
        r = _extra(d, "reasoning") or _extra(d, "reasoning_content")
        if r is not None:
            assert isinstance(r, str)
            reasoning += r
        if d.content is not None:
            assert isinstance(d.content, str)
            content += d.content
        for tc in d.tool_calls or []:
            assert isinstance(tc.index, int)
            if tc.index not in calls:
                assert tc.id and tc.type == "function" and tc.function.name, tc
                calls[tc.index] = {"id": tc.id, "name": tc.function.name, "arguments": ""}
            if tc.function is not None and tc.function.arguments:
                calls[tc.index]["arguments"] += tc.function.arguments
        if ch.finish_reason is not None:
            finish = ch.finish_reason
    return reasoning, content, calls, finish, n


# --------------------------------------------------------------------------- (a) parser wiring


@pytest.mark.version_smoke  # one `vllm serve` round trip with tools, on every CI version
def test_plugin_parsers_in_use(server):
    text = server["log"].read_text(errors="replace")
    assert "vllm-ernie45" in text and "serves" in text, "plugin's startup line missing"
    assert "'ernie45' tool-call and reasoning parsers" in text
    bad = [ln for ln in text.splitlines() if " ERROR " in ln or "Traceback" in ln]
    assert not bad, "\n".join(bad[:20])
    # the parser classes registered under 'ernie45' are the plugin's
    from vllm_ernie45.parsers import reasoning_parser, tool_parser  # noqa: F401
    assert server["proc"].poll() is None


@pytest.mark.version_smoke  # one `vllm serve` round trip with tools, on every CI version
def test_chat_tools_stream_off(server, client):
    r = _chat(client, server["model"], tools=TOOLS)
    assert r.object == "chat.completion" and len(r.choices) == 1
    ch = r.choices[0]
    assert ch.finish_reason in FINISH
    m = ch.message
    assert m.role == "assistant"
    assert m.content is None or isinstance(m.content, str)
    assert m.tool_calls is None or isinstance(m.tool_calls, list)
    for tc in m.tool_calls or []:
        assert tc.id and tc.type == "function" and tc.function.name in {"get_weather", "search"}
        json.loads(tc.function.arguments)
    if ch.finish_reason == "tool_calls":
        assert m.tool_calls
    reasoning = _reasoning(m)
    # thinking on + random tokens (almost never `</think>`): the text is reasoning
    assert (reasoning or "") + (m.content or "") or m.tool_calls
    assert r.usage.completion_tokens > 0


@pytest.mark.version_smoke  # one `vllm serve` round trip with tools, on every CI version
def test_chat_tools_stream_on(server, client):
    stream = _chat(client, server["model"], tools=TOOLS, stream=True,
                   stream_options={"include_usage": True})
    reasoning, content, calls, finish, n = _collect(stream)
    assert n > 0 and finish in FINISH
    assert reasoning or content or calls
    if finish == "tool_calls":
        assert calls


def test_thinking_off_has_no_reasoning(server, client):
    r = _chat(client, server["model"], thinking=False, tools=TOOLS)
    m = r.choices[0].message
    # the template closes the think block itself; all output is answer/tool calls
    assert not _reasoning(m)
    assert r.choices[0].finish_reason in FINISH


@pytest.mark.version_smoke  # one `vllm serve` round trip with tools, on every CI version
def test_named_tool_choice_structured_output(server, client):
    """Named tool_choice: vLLM forces the arguments' JSON with structured output (xgrammar on
    CPU). It starts after the reasoning, so thinking is off here."""
    tc = {"type": "function", "function": {"name": "get_weather"}}
    r = _chat(client, server["model"], thinking=False, tools=TOOLS, tool_choice=tc, max_tokens=64)
    calls = r.choices[0].message.tool_calls
    assert calls and len(calls) == 1
    assert calls[0].function.name == "get_weather" and calls[0].id
    assert isinstance(calls[0].function.arguments, str) and calls[0].function.arguments.startswith("{")

    stream = _chat(client, server["model"], thinking=False, tools=TOOLS, tool_choice=tc,
                   max_tokens=32, stream=True)
    _, _, scalls, finish, _ = _collect(stream)
    assert finish in FINISH
    assert [c["name"] for c in scalls.values()] == ["get_weather"]
    assert scalls[0]["arguments"].startswith("{")


# The tiny model's tokens are random; a regex (structured output) makes it write one complete
# ernie45 tool call, so the parser's streaming is seen through vLLM's whole serving path.
_CALL_REGEX = (r'<tool_call>\n\{"name": "get_weather", "arguments": '
               r'\{"location": "[a-z]{30,40}"\}\}\n</tool_call>')


def _forced_call(client, model, stream, max_tokens, mode=None):
    body = {"chat_template_kwargs": {"enable_thinking": False}, "structured_outputs": {"regex": _CALL_REGEX}}
    if mode:
        body["vllm_xargs"] = {"ernie45_tool_stream": mode}
    return client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "What is the weather?"}], tools=TOOLS,
        stream=stream, max_tokens=max_tokens, temperature=0, extra_body=body)


def _tool_deltas(stream):
    deltas, content, finish = [], "", None
    for chunk in stream:
        if not chunk.choices:
            continue
        d = chunk.choices[0].delta
        content += d.content or ""
        deltas += [(tc.index, tc.id, tc.function.name, tc.function.arguments) for tc in d.tool_calls or []]
        finish = chunk.choices[0].finish_reason or finish
    return deltas, content, finish


def test_tool_call_arguments_stream_incrementally_end_to_end(server, client):
    """Through `vllm serve`: the call's name first, then its arguments in several deltas that
    add up to exactly the non-streamed arguments; whole mode on request: one delta."""
    full = _forced_call(client, server["model"], stream=False, max_tokens=200)
    call = full.choices[0].message.tool_calls[0]
    assert full.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
    location = json.loads(call.function.arguments)["location"]
    assert 30 <= len(location) <= 40

    deltas, content, finish = _tool_deltas(_forced_call(client, server["model"], True, 200))
    assert finish == "tool_calls" and not content.strip()
    assert deltas[0][1] and deltas[0][2] == "get_weather"  # id and name first
    assert {d[0] for d in deltas} == {0} and all(d[2] is None for d in deltas[1:])
    arguments = [d[3] for d in deltas if d[3]]
    assert len(arguments) >= 5, deltas
    assert "".join(arguments) == call.function.arguments

    whole, _, finish = _tool_deltas(_forced_call(client, server["model"], True, 200, mode="whole"))
    assert finish == "tool_calls" and len(whole) == 1
    assert (whole[0][2], whole[0][3]) == ("get_weather", call.function.arguments)


def test_tool_call_cut_off_while_streaming_is_never_completed(server, client):
    """max_tokens cuts the call inside its arguments: what was sent stays sent, the arguments
    never parse, the stream ends with "length"; non-streamed, the block is content."""
    deltas, _, finish = _tool_deltas(_forced_call(client, server["model"], True, 25))
    assert finish == "length"
    assert deltas and deltas[0][2] == "get_weather"
    arguments = "".join(d[3] or "" for d in deltas)
    with pytest.raises(ValueError):
        json.loads(arguments)
    full = _forced_call(client, server["model"], stream=False, max_tokens=25)
    assert full.choices[0].finish_reason == "length" and not full.choices[0].message.tool_calls
    assert "<tool_call>" in (full.choices[0].message.content or "")


def test_required_tool_choice_stream(server, client):
    stream = _chat(client, server["model"], thinking=False, tools=TOOLS, tool_choice="required",
                   max_tokens=48, stream=True)
    _, content, calls, finish, _ = _collect(stream)
    assert finish in FINISH
    assert calls, "tool_choice=required produced no tool call deltas"
    assert all(c["name"] in {"get_weather", "search"} for c in calls.values())


# --------------------------------------------------------------------------- (b) short load run


def test_load_short(server, tmp_path):
    out = tmp_path / "load.json"
    p = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "serving" / "serve_load.py"), "--url", server["url"],
         "--model", server["model"], "--requests", "16", "--cancel-frac", "0.25",
         "--max-model-len", str(MAX_MODEL_LEN), "--request-timeout", "90", "--deadline", "150",
         "--throughput", "4:24:6", "--out", str(out)],
        capture_output=True, text=True, timeout=200, env=dict(os.environ))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rep = json.loads(out.read_text())
    s = rep["summary"]
    assert rep["ok"] and not rep["problems"]
    assert s["requests"] == 16 and s["cancelled"] == 4 and s["failed"] == 0
    assert s["completed"] == 12
    assert s["tokens_per_s"] > 0 and s["ttft_s"]["p50"] is not None
    assert all(b["ok"] for b in rep["bad_input"]) and rep["bad_input"]
    assert rep["after"]["ok"]
    # --throughput: 4 completions of 24 prompt token ids, exactly 6 generated tokens each.
    t = rep["throughput"]
    assert t["ok"] and t["completed"] == 4 and t["output_tokens"] == 24
    assert t["output_tok_s"] > 0 and t["total_tok_s"] > t["output_tok_s"]
    assert server["proc"].poll() is None


def test_load_throughput_spec_is_checked():
    assert serve_load.parse_throughput("8:512:256") == (8, 512, 256)
    for bad in ("8:512", "8:x:2", "0:4:4"):
        with pytest.raises(ValueError, match="--throughput"):
            serve_load.parse_throughput(bad)


# --------------------------------------------------------------------------- (c) bad input


def test_bad_input_gets_openai_errors(server):
    res = asyncio.run(serve_load.run_bad_input(server["url"], server["model"], MAX_MODEL_LEN))
    by = {r["case"]: r for r in res}
    for case, r in by.items():
        assert r["ok"], (case, r)
        assert 400 <= r["status_code"] < 500
    assert "malformed_json" in by and "prompt_over_max_model_len" in by


def test_bad_input_via_openai_client(server, client):
    with pytest.raises(openai.BadRequestError) as ei:
        _chat(client, server["model"], temperature=-1)
    assert ei.value.status_code == 400 and ei.value.message
    with pytest.raises(openai.BadRequestError):
        _chat(client, server["model"], tools=TOOLS,
              tool_choice={"type": "function", "function": {"name": "no_such_tool"}})
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=server["model"], messages=[{"role": "user", "content": "x"}],
                                       extra_body={"chat_template_kwargs": "not an object"})
    # still healthy
    assert httpx.get(server["url"] + "/health", timeout=10).status_code == 200
    r = _chat(client, server["model"], max_tokens=4)
    assert r.choices[0].finish_reason in FINISH
    assert server["proc"].poll() is None
