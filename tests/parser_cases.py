"""Shared harness and cases for the ernie45 parser tests.

Everything runs through real vLLM: the parsers are looked up by name after
``vllm_ernie45.register()``, composed by vLLM's ``ParserManager`` into the same ``Parser``
the OpenAI server uses, fed token by token through vLLM's incremental detokenizer (the
engine's ``IncrementalDetokenizer``, primed with the rendered prompt), and compared with
the non-streaming ``Parser.parse`` of the same text. The tokenizer is the tiny ERNIE-style
one from ``vllm_ernie45.testing.tiny.tokenizer``, loaded with vLLM's ``get_tokenizer``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"location": {"type": "string"}, "unit": {"type": "string"}},
                "required": ["location"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}},
        },
    },
    {
        "type": "function",
        "function": {
            "name": "send_message",
            "parameters": {"type": "object", "properties": {"text": {"type": "string"}}},
        },
    },
]
MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What's the weather in Beijing? 北京天气怎么样？"},
]


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def ernie_tokenizer(tmp_path_factory):
    """vLLM's tokenizer for the tiny ERNIE-style tokenizer directory."""
    from vllm_ernie45.testing.tiny.tokenizer import build_ernie_tokenizer

    path: Path = tmp_path_factory.mktemp("ernie-tokenizer")
    build_ernie_tokenizer(path)
    # A config.json saves vLLM's tokenizer loader a retry (and a sleep) looking for one.
    (path / "config.json").write_text(json.dumps({"model_type": "ernie4_5", "vocab_size": 1024}))
    from vllm.tokenizers import get_tokenizer

    return get_tokenizer(str(path))


@pytest.fixture(scope="session")
def registered():
    import vllm_ernie45

    vllm_ernie45.register()
    return True


# ----------------------------------------------------------------------------- harness


@dataclass
class Parsed:
    reasoning: str | None
    content: str | None
    calls: list[tuple[str, str]]  # (name, arguments)
    ids: list[str] = field(default_factory=list)


@dataclass
class Streamed(Parsed):
    # ``calls``: the streamed calls whose arguments are JSON (complete); ``broken``: those
    # whose arguments never became JSON (cut off, or their JSON broke after the name was sent)
    broken: list[tuple[str, str]] = field(default_factory=list)
    arg_deltas: dict[int, list[str]] = field(default_factory=dict)
    # number of output tokens consumed when each call's name was first streamed / completed
    name_at_token: dict[int, int] = field(default_factory=dict)
    done_at_token: dict[int, int] = field(default_factory=dict)
    remaining_args: str = ""


def is_json(text: str) -> bool:
    try:
        json.loads(text)  # strict: what an OpenAI client does
    except ValueError:
        return False
    return True


def parser_class(tool: bool, reasoning: bool):
    from vllm.parser import ParserManager

    return ParserManager.get_parser(
        tool_parser_name="ernie45" if tool else None,
        reasoning_parser_name="ernie45" if reasoning else None,
        enable_auto_tools=tool,
    )


def make_request(tools: bool = True, **extra: Any):
    from vllm_ernie45 import compat

    cls = compat.chat_completion_request_cls()
    data: dict[str, Any] = {"model": "tiny-ernie", "messages": MESSAGES, **extra}
    if tools:
        data["tools"] = TOOLS
        data.setdefault("tool_choice", "auto")
    return cls(**data)


def render_prompt_ids(tokenizer, request, chat_template_kwargs: dict | None) -> list[int]:
    tools = [t.model_dump() for t in request.tools] if request.tools else None
    prompt = tokenizer.apply_chat_template(
        MESSAGES, tools=tools, add_generation_prompt=True, tokenize=False, **(chat_template_kwargs or {})
    )
    return tokenizer.encode(prompt, add_special_tokens=False)


def _detokenizer(tokenizer, prompt_ids: list[int], skip_special_tokens: bool):
    from vllm import SamplingParams
    from vllm.v1.engine import EngineCoreRequest
    from vllm.v1.engine.detokenizer import IncrementalDetokenizer

    known = {
        "request_id": "test",
        "prompt_token_ids": prompt_ids,
        "sampling_params": SamplingParams(max_tokens=4096, skip_special_tokens=skip_special_tokens),
        "arrival_time": 0.0,
    }
    fields = EngineCoreRequest.__struct_fields__
    required = fields[: len(fields) - len(EngineCoreRequest.__struct_defaults__)]
    kwargs = {name: known.get(name) for name in required}
    kwargs.update({k: v for k, v in known.items() if k in fields})
    return IncrementalDetokenizer.from_new_request(tokenizer, EngineCoreRequest(**kwargs))


def _new_parser(cls, tokenizer, request, chat_template_kwargs):
    return cls(tokenizer, request.tools, chat_template_kwargs=chat_template_kwargs, model_config=None)


def run_stream(
    cls,
    tokenizer,
    request,
    output: str,
    *,
    chat_template_kwargs: dict | None = None,
    chunk: int = 1,
    eos: bool = True,
) -> tuple[Streamed, str]:
    """Stream ``output`` like the OpenAI server does; return what a client assembles and the
    full text the engine produced (for the non-streaming comparison)."""
    prompt_ids = render_prompt_ids(tokenizer, request, chat_template_kwargs)
    parser = _new_parser(cls, tokenizer, request, chat_template_kwargs)
    detok = _detokenizer(tokenizer, prompt_ids, request.skip_special_tokens)
    ids = tokenizer.encode(output, add_special_tokens=False)
    if eos:
        ids.append(tokenizer.eos_token_id)
    reasoning, content = [], []
    calls: dict[int, dict[str, Any]] = {}
    own_calls = request.tool_choice in (None, "auto", "none")  # not vLLM's "required" / named
    result = Streamed(None, None, [])
    full = []
    for start in range(0, len(ids), chunk):
        step = ids[start : start + chunk]
        last = start + chunk >= len(ids)
        detok.update(step, stop_terminated=last and eos)
        delta_text = detok.get_next_output_text(last, True)
        full.append(delta_text)
        msg = parser.parse_delta(delta_text, step, request, prompt_ids, finished=last)
        if msg is None:
            continue
        if msg.reasoning:
            reasoning.append(msg.reasoning)
        if msg.content:
            content.append(msg.content)
        for tc in msg.tool_calls:
            if tc.id is not None:
                assert tc.index not in calls, "a second id for the same tool call index"
                assert tc.index == len(calls), "tool call indices must be 0, 1, ..."
                assert tc.type == "function" and tc.function and tc.function.name
                calls[tc.index] = {"id": tc.id, "name": tc.function.name, "args": ""}
                result.name_at_token[tc.index] = min(start + chunk, len(ids))
            else:
                assert tc.index in calls, "arguments streamed before the call's name"
                assert tc.function is not None and tc.function.name is None
            if tc.function and tc.function.arguments:
                if own_calls:
                    assert not is_json(calls[tc.index]["args"]), "arguments streamed after they were complete JSON"
                calls[tc.index]["args"] += tc.function.arguments
                result.arg_deltas.setdefault(tc.index, []).append(tc.function.arguments)
                if is_json(calls[tc.index]["args"]):
                    result.done_at_token[tc.index] = min(start + chunk, len(ids))
    tool_parser = parser.tool_parser
    if tool_parser is not None:
        result.remaining_args = tool_parser.get_remaining_unstreamed_args()
        stream = getattr(tool_parser, "_stream", None)
        if stream is not None and not tool_parser._whole:
            # The client's view (arguments that parse) is the parser's (calls it completed).
            done = [call.done for call in stream.started]
            assert done == [is_json(calls[i]["args"]) for i in sorted(calls)], (done, calls)
    result.reasoning = "".join(reasoning) or None
    result.content = "".join(content) or None
    ordered = [calls[i] for i in sorted(calls)]
    result.calls = [(c["name"], c["args"]) for c in ordered if is_json(c["args"])]
    result.broken = [(c["name"], c["args"]) for c in ordered if not is_json(c["args"])]
    result.ids = [c["id"] for c in ordered]
    return result, "".join(full)


def run_full(cls, tokenizer, request, text: str, *, chat_template_kwargs: dict | None = None) -> Parsed:
    parser = _new_parser(cls, tokenizer, request, chat_template_kwargs)
    reasoning, content, calls = parser.parse(text, request, enable_auto_tools=True)
    calls = calls or []
    # vLLM passes an empty answer through as "" where a stream has no content: same thing.
    return Parsed(reasoning, content or None, [(c.name, c.arguments) for c in calls], [c.id for c in calls])


def check_case(
    tokenizer,
    *,
    tool: bool,
    reasoning: bool,
    output: str,
    expected: Parsed,
    chat_template_kwargs: dict | None = None,
    chunks: tuple[int, ...] = (1, 3),
    eos: bool = True,
    tools: bool = True,
    request_kwargs: dict | None = None,
    broken: list[tuple[str, str]] | None = None,
) -> list[Streamed]:
    """Non-streaming and streaming (token by token and in chunks) both give ``expected``;
    streaming also gives the ``broken`` calls (started, never complete: their arguments are
    not JSON), unless asked for whole calls (``vllm_xargs``), which never sends them."""
    cls = parser_class(tool, reasoning)
    request = make_request(tools=tools, **(request_kwargs or {}))
    # The server lets the parsers adjust the request before generation.
    request = _new_parser(cls, tokenizer, request, chat_template_kwargs).adjust_request(request)
    assert request.skip_special_tokens is False
    results = []
    for chunk in chunks:
        streamed, text = run_stream(
            cls, tokenizer, request, output, chat_template_kwargs=chat_template_kwargs, chunk=chunk, eos=eos
        )
        assert text == output, "the detokenizer must reproduce the model output"
        full = run_full(cls, tokenizer, request, text, chat_template_kwargs=chat_template_kwargs)
        assert (full.reasoning, full.content, full.calls) == (
            expected.reasoning,
            expected.content,
            expected.calls,
        ), "non-streaming"
        assert (streamed.reasoning, streamed.content, streamed.calls) == (
            expected.reasoning,
            expected.content,
            expected.calls,
        ), f"streaming, {chunk} token(s) per step"
        whole = ((request_kwargs or {}).get("vllm_xargs") or {}).get("ernie45_tool_stream") == "whole"
        assert streamed.broken == ([] if whole else broken or []), f"broken calls, {chunk} token(s) per step"
        assert len(set(streamed.ids)) == len(streamed.ids) and all(streamed.ids)
        if not (request_kwargs or {}).get("tool_choice"):
            # the parser's own calls; vLLM ids required/named calls later
            assert len(set(full.ids)) == len(full.ids) and all(full.ids)
        assert streamed.remaining_args == "", "vLLM would append these at the end of the stream"
        results.append(streamed)
    return results


# ----------------------------------------------------------------------------- cases


@dataclass
class Case:
    id: str
    output: str
    content: str | None
    calls: list[tuple[str, str]] = field(default_factory=list)
    # streaming only: calls whose name was sent but which never complete (their arguments
    # as sent, never JSON); non-streaming returns their text as content
    broken: list[tuple[str, str]] = field(default_factory=list)


def args(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False)


# Output after reasoning (or of a model without reasoning): the tool parser's domain.
TOOL_CASES = [
    Case("no_call", "It is sunny in Beijing.", "It is sunny in Beijing."),
    Case(
        "single_call",
        '<tool_call>\n{"name": "get_weather", "arguments": {"location": "Beijing"}}\n</tool_call>\n',
        None,
        [("get_weather", '{"location": "Beijing"}')],
    ),
    Case(
        "two_calls",
        '<tool_call>\n{"name": "get_weather", "arguments": {"location": "Beijing"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_time", "arguments": {"tz": "Asia/Shanghai"}}\n</tool_call>\n',
        None,
        [("get_weather", '{"location": "Beijing"}'), ("get_time", '{"tz": "Asia/Shanghai"}')],
    ),
    Case(
        "content_then_call",
        'Let me check the weather.\n\n<tool_call>\n{"name": "get_weather", "arguments": '
        '{"location": "Beijing", "unit": "c"}}\n</tool_call>\n',
        "Let me check the weather.",
        [("get_weather", '{"location": "Beijing", "unit": "c"}')],
    ),
    Case(
        "text_after_calls",
        '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>\nDone, waiting for results.',
        "Done, waiting for results.",
        [("get_time", "{}")],
    ),
    Case(
        "chinese_arguments",
        '我来查询一下。\n<tool_call>\n{"name": "get_weather", "arguments": {"location": "北京", '
        '"unit": "摄氏度"}}\n</tool_call>\n',
        "我来查询一下。",
        [("get_weather", '{"location": "北京", "unit": "摄氏度"}')],
    ),
    Case(
        "braces_and_escaped_quotes_in_strings",
        '<tool_call>\n{"name": "send_message", "arguments": {"text": "a } b { c \\"quoted\\" '
        '\\\\ and ]["}}\n</tool_call>',
        None,
        [("send_message", '{"text": "a } b { c \\"quoted\\" \\\\ and ]["}')],
    ),
    Case(
        "nested_arguments",
        '<tool_call>\n{"name": "send_message", "arguments": {"text": "hi", "meta": {"to": ["a", "b"], '
        '"n": 2, "ok": true, "x": null}}}\n</tool_call>',
        None,
        [("send_message", '{"text": "hi", "meta": {"to": ["a", "b"], "n": 2, "ok": true, "x": null}}')],
    ),
    Case(
        "arguments_as_json_string",
        '<tool_call>\n{"name": "get_weather", "arguments": "{\\"location\\": \\"北京\\", '
        '\\"unit\\": \\"c\\"}"}\n</tool_call>',
        None,
        [("get_weather", '{"location": "北京", "unit": "c"}')],
    ),
    Case(  # both keys: the first in the text counts (it is the one that streams)
        "parameters_before_arguments",
        '<tool_call>\n{"name": "get_time", "parameters": {"tz": "A"}, "arguments": {"tz": "B"}}\n</tool_call>',
        None,
        [("get_time", '{"tz": "A"}')],
    ),
    Case(
        "arguments_before_name",
        '<tool_call>\n{"arguments": {"location": "Paris"}, "name": "get_weather"}\n</tool_call>',
        None,
        [("get_weather", '{"location": "Paris"}')],
    ),
    Case(
        "parameters_key_and_no_arguments",
        '<tool_call>\n{"name": "get_weather", "parameters": {"location": "Oslo"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_time"}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_time", "arguments": null}\n</tool_call>',
        None,
        [("get_weather", '{"location": "Oslo"}'), ("get_time", "{}"), ("get_time", "{}")],
    ),
    Case(
        "two_objects_in_one_block",
        '<tool_call>\n{"name": "get_time", "arguments": {"tz": "UTC"}}\n'
        '{"name": "get_weather", "arguments": {"location": "Rome"}}\n</tool_call>',
        None,
        [("get_time", '{"tz": "UTC"}'), ("get_weather", '{"location": "Rome"}')],
    ),
    Case(
        "malformed_json_is_content",
        'Trying.\n<tool_call>\nget_weather(location="Beijing")\n</tool_call>\n',
        'Trying.\n<tool_call>\nget_weather(location="Beijing")\n</tool_call>\n',
    ),
    Case(
        "unknown_tool_is_content",
        '<tool_call>\n{"name": "launch_rocket", "arguments": {"target": "moon"}}\n</tool_call>',
        '<tool_call>\n{"name": "launch_rocket", "arguments": {"target": "moon"}}\n</tool_call>',
    ),
    Case(
        "bad_block_then_good_block",
        '<tool_call>\n{"oops": 1}\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": '
        '{"tz": "UTC"}}\n</tool_call>',
        '<tool_call>\n{"oops": 1}\n</tool_call>',
        [("get_time", '{"tz": "UTC"}')],
    ),
    Case(
        "unclosed_block_complete_json",
        '<tool_call>\n{"name": "get_weather", "arguments": {"location": "Beijing"}}',
        None,
        [("get_weather", '{"location": "Beijing"}')],
    ),
    Case(  # issue 14: an unfinished call is not a call; its text is kept, as content
        "unclosed_block_cut_in_arguments",
        'Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"location": "Bei',
        'Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"location": "Bei',
        broken=[("get_weather", '{"location": "Bei')],
    ),
    Case(
        "unclosed_block_cut_before_name",
        'Checking.\n<tool_call>\n{"name": "get_wea',
        'Checking.\n<tool_call>\n{"name": "get_wea',
    ),
    Case(
        "missing_outer_brace",
        '<tool_call>\n{"name": "get_weather", "arguments": {"location": "Beijing"}\n</tool_call>\n',
        None,
        [("get_weather", '{"location": "Beijing"}')],
    ),
    Case(
        "junk_after_object_in_block",
        '<tool_call>\n{"name": "get_time", "arguments": {"tz": "UTC"}}} oops\n</tool_call>',
        "} oops",
        [("get_time", '{"tz": "UTC"}')],
    ),
    Case(
        "stray_close_tag_is_content",
        "Nothing to call here </tool_call> really.",
        "Nothing to call here </tool_call> really.",
    ),
    Case(
        "list_of_calls",
        '<tool_call>\n[{"name": "get_time", "arguments": {"tz": "UTC"}}, '
        '{"name": "get_weather", "arguments": {"location": "Lima"}}]\n</tool_call>',
        None,
        [("get_time", '{"tz": "UTC"}'), ("get_weather", '{"location": "Lima"}')],
    ),
    Case(
        "unicode_escapes_in_string_arguments",
        '<tool_call>\n{"name": "send_message", "arguments": "{\\"text\\": \\"\\\\u4f60\\\\u597d '
        '\\ud83d\\ude00\\"}"}\n</tool_call>',
        None,
        [("send_message", '{"text": "\\u4f60\\u597d 😀"}')],
    ),
    Case("empty_output", "", None),
]

# Hostile but valid output (issue 17) and calls cut off by max_tokens (issue 14).
HOSTILE_ARGS = {"text": '} </think> <response> { [ " </response> ] \\ ', "meta": {"<tool_call>": ["</tool_call>", "{"]}}
TOOL_CASES += [
    # markers inside JSON strings are text
    Case(
        "close_and_open_markers_inside_argument_string",
        '<tool_call>\n{"name": "send_message", "arguments": {"text": "a </tool_call> b <tool_call> c"}}\n</tool_call>',
        None,
        [("send_message", '{"text": "a </tool_call> b <tool_call> c"}')],
    ),
    Case(
        "markers_inside_arguments_given_as_json_string",
        '<tool_call>\n{"name": "send_message", "arguments": "{\\"text\\": \\"x <tool_call> y </tool_call> z\\"}"}'
        "\n</tool_call>",
        None,
        [("send_message", '{"text": "x <tool_call> y </tool_call> z"}')],
    ),
    Case(
        "every_marker_brace_and_quote_inside_strings",
        'Sending.\n<tool_call>\n{"name": "send_message", "arguments": ' + args(HOSTILE_ARGS) + "}\n</tool_call>\n"
        '<tool_call>\n{"name": "get_time", "arguments": {"tz": "</tool_call>"}}\n</tool_call>',
        "Sending.",
        [("send_message", args(HOSTILE_ARGS)), ("get_time", '{"tz": "</tool_call>"}')],
    ),
    # arguments are always JSON text: a string is decoded only when it holds an object
    Case(
        "empty_string_arguments",
        '<tool_call>\n{"name": "get_time", "arguments": ""}\n</tool_call>',
        None,
        [("get_time", '""')],
    ),
    Case(
        "plain_string_arguments",
        '<tool_call>\n{"name": "send_message", "arguments": "hello"}\n</tool_call>',
        None,
        [("send_message", '"hello"')],
    ),
    Case(
        "string_arguments_holding_a_list",
        '<tool_call>\n{"name": "send_message", "arguments": "[1, 2]"}\n</tool_call>',
        None,
        [("send_message", '"[1, 2]"')],
    ),
    Case(
        "string_arguments_decoding_to_a_raw_newline",
        '<tool_call>\n{"name": "send_message", "arguments": "{\\"text\\": \\"a\\nb\\"}"}\n</tool_call>',
        None,
        [("send_message", '{"text": "a\\nb"}')],
    ),
    Case(
        "raw_newline_inside_object_arguments",
        '<tool_call>\n{"name": "send_message", "arguments": {"text": "line 1\nline 2\tend"}}\n</tool_call>',
        None,
        [("send_message", '{"text": "line 1\\nline 2\\tend"}')],
    ),
    # a JSON list of calls: each object is judged like a block of its own
    Case(
        "list_with_unknown_name_first",
        '<tool_call>\n[{"name": "nope", "arguments": {"a": 1}}, {"name": "get_time", "arguments": {}}]\n</tool_call>'
        "\nDone.",
        '{"name": "nope", "arguments": {"a": 1}} Done.',
        [("get_time", "{}")],
    ),
    Case(
        "list_with_unknown_name_last",
        '<tool_call>\n[{"name": "get_time", "arguments": {}}, {"name": "nope", "arguments": {}}]\n</tool_call>',
        '{"name": "nope", "arguments": {}}',
        [("get_time", "{}")],
    ),
    # one separator where text stands on both sides of calls
    Case(
        "text_between_calls",
        'A\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>\nB middle\n'
        '<tool_call>\n{"name": "get_time", "arguments": {"tz": "UTC"}}\n</tool_call>\nC end',
        "A\nB middle\nC end",
        [("get_time", "{}"), ("get_time", '{"tz": "UTC"}')],
    ),
    # output cut off by max_tokens inside a call: no call, the text is content
    Case(
        "truncated_after_arguments_key",
        'Let me look.\n<tool_call>\n{"name": "get_weather", "argu',
        'Let me look.\n<tool_call>\n{"name": "get_weather", "argu',
        broken=[("get_weather", "")],
    ),
    Case(
        "truncated_after_name",
        '<tool_call>\n{"name": "get_time"',
        '<tool_call>\n{"name": "get_time"',
        broken=[("get_time", "")],
    ),
    Case(  # arguments given as a JSON string are sent when the call is complete
        "truncated_inside_string_arguments",
        '<tool_call>\n{"name": "get_time", "arguments": "{\\"tz\\": \\"UT',
        '<tool_call>\n{"name": "get_time", "arguments": "{\\"tz\\": \\"UT',
        broken=[("get_time", "")],
    ),
    Case(
        "truncated_second_call",
        '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {"loc',
        '<tool_call>\n{"name": "get_weather", "arguments": {"loc',
        [("get_time", "{}")],
        broken=[("get_weather", '{"loc')],
    ),
    Case(  # the whole arguments value, bar its closing brace, was sent: still not JSON
        "truncated_after_arguments_value",
        '<tool_call>\n{"name": "send_message", "arguments": {"text": "hi"}',
        '<tool_call>\n{"name": "send_message", "arguments": {"text": "hi"}',
        broken=[("send_message", '{"text": "hi"')],
    ),
    # JSON that breaks after the name was sent: the call never completes (streaming) and
    # the block is content (both)
    Case(
        "json_breaks_in_arguments",
        '<tool_call>\n{"name": "send_message", "arguments": {"text": "hi",}}\n</tool_call>',
        '<tool_call>\n{"name": "send_message", "arguments": {"text": "hi",}}\n</tool_call>',
        broken=[("send_message", '{"text": "hi",')],
    ),
    Case(
        "json_breaks_after_arguments",
        'A\n<tool_call>\n{"name": "get_time", "arguments": {"tz": "UTC"} "extra"}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>',
        'A\n<tool_call>\n{"name": "get_time", "arguments": {"tz": "UTC"} "extra"}\n</tool_call>',
        [("get_time", "{}")],
        broken=[("get_time", '{"tz": "UTC"')],
    ),
]


# (id, model output, expected reasoning, expected content, expected calls)
REASONING_CASES = [
    (
        "response_wrapper",
        "The user greets me.\nI should greet back.\n</think>\n\n<response>\nHello! 你好！\n</response>\n",
        "The user greets me.\nI should greet back.",
        "Hello! 你好！",
        [],
    ),
    (
        "no_response_wrapper",
        "Simple arithmetic: 2 + 2 = 4.\n</think>\n\nThe answer is 4.",
        "Simple arithmetic: 2 + 2 = 4.",
        "The answer is 4.",
        [],
    ),
    (
        "model_writes_think_tag",
        "<think>\nLet me think.\n</think>\n\n<response>\nDone.\n</response>",
        "Let me think.",
        "Done.",
        [],
    ),
    (
        "multiline_answer",
        "Plan the list.\n</think>\n\n<response>\nFirst line.\n\nSecond line:\n- a\n- b\n</response>\n",
        "Plan the list.",
        "First line.\n\nSecond line:\n- a\n- b",
        [],
    ),
    (
        "truncated_reasoning",
        "I am still thinking about the weather in 北京 and",
        "I am still thinking about the weather in 北京 and",
        None,
        [],
    ),
    (
        "empty_reasoning",
        "</think>\n\n<response>\nQuick answer.\n</response>\n",
        None,
        "Quick answer.",
        [],
    ),
    (
        "reasoning_then_empty_answer",
        "Nothing to say.\n</think>\n\n",
        "Nothing to say.",
        None,
        [],
    ),
]
