"""ernie45 tool-call parser through vLLM's own Parser, detokenizer and manager."""

from __future__ import annotations

import json

import pytest

from parser_cases import (
    TOOL_CASES,
    Parsed,
    check_case,
    ernie_tokenizer,  # noqa: F401 - fixture
    is_json,
    make_request,
    parser_class,
    registered,  # noqa: F401 - fixture
    run_full,
    run_stream,
)

# The whole file is in the version smoke set: the parsers through vLLM's own Parser.
pytestmark = [pytest.mark.usefixtures("registered"), pytest.mark.version_smoke]

# Whole calls (one delta each, once complete), asked for per request.
WHOLE = {"vllm_xargs": {"ernie45_tool_stream": "whole"}}


def test_registered_parsers_are_the_plugins():
    from vllm_ernie45 import compat
    from vllm_ernie45.parsers.reasoning_parser import Ernie45ReasoningParser
    from vllm_ernie45.parsers.tool_parser import Ernie45ToolParser

    _, tool_manager = compat.tool_parser_base()
    _, reasoning_manager = compat.reasoning_parser_base()
    assert tool_manager.get_tool_parser("ernie45") is Ernie45ToolParser
    assert reasoning_manager.get_reasoning_parser("ernie45") is Ernie45ReasoningParser
    assert Ernie45ToolParser.__module__ == "vllm_ernie45.parsers.tool_parser"
    assert Ernie45ReasoningParser.__module__ == "vllm_ernie45.parsers.reasoning_parser"
    composed = parser_class(tool=True, reasoning=True)
    assert composed.tool_parser_cls is Ernie45ToolParser
    assert composed.reasoning_parser_cls is Ernie45ReasoningParser


@pytest.mark.parametrize("case", TOOL_CASES, ids=[c.id for c in TOOL_CASES])
def test_tool_parser_alone(ernie_tokenizer, case):
    """``--tool-call-parser ernie45`` without a reasoning parser."""
    check_case(
        ernie_tokenizer,
        tool=True,
        reasoning=False,
        output=case.output,
        expected=Parsed(None, case.content, case.calls),
        broken=case.broken,
    )


@pytest.mark.parametrize("case", TOOL_CASES, ids=[c.id for c in TOOL_CASES])
def test_whole_calls_on_request(ernie_tokenizer, case):
    """``vllm_xargs: {"ernie45_tool_stream": "whole"}``: each call in one delta once complete
    (the delivery before issue 30), nothing for a call that never completes."""
    (streamed,) = check_case(
        ernie_tokenizer,
        tool=True,
        reasoning=False,
        output=case.output,
        expected=Parsed(None, case.content, case.calls),
        chunks=(1,),
        request_kwargs=WHOLE,
    )
    assert all(len(deltas) == 1 for deltas in streamed.arg_deltas.values() if deltas)
    assert streamed.name_at_token == streamed.done_at_token or not case.calls


@pytest.mark.parametrize("case", TOOL_CASES, ids=[c.id for c in TOOL_CASES])
def test_tool_calls_after_reasoning(ernie_tokenizer, case):
    """Both parsers (the documented setup): reasoning, ``</think>``, then the same output."""
    reasoning = "I should look this up.\n用户问天气。"
    output = f"{reasoning}\n</think>\n\n{case.output}"
    content = case.content
    if content is not None and not case.calls:
        # Without a recognised call the reasoning parser owns the text up to the first
        # <tool_call>: it drops the whitespace framing around </think> and around the
        # answer, but keeps the whitespace between answer text and a <tool_call> block.
        head, sep, tail = content.partition("<tool_call>")
        if sep:
            content = (head.lstrip() if head.strip() else "") + sep + tail
        else:
            content = content.strip() or None
    check_case(
        ernie_tokenizer,
        tool=True,
        reasoning=True,
        output=output,
        expected=Parsed(reasoning, content, case.calls),
        broken=case.broken,
    )


def _tokens_until(tokenizer, output: str, prefix: str) -> int:
    """How many of ``output``'s tokens it takes until the text holds ``prefix``."""
    ids = tokenizer.encode(output, add_special_tokens=False)
    return next(n for n in range(len(ids) + 1) if tokenizer.decode(ids[:n]).startswith(prefix))


def test_a_call_streams_its_name_then_its_arguments(ernie_tokenizer):
    """The first delta of a call carries index, id and name, with the token that completes
    the name; then the arguments arrive as they are written; the delta that makes them JSON
    comes with the token that closes the call's object (before ``</tool_call>``)."""
    arguments = {"location": "Beijing", "unit": "c", "note": "a fairly long value " * 6}
    name_part = 'Checking.\n<tool_call>\n{"name": "get_weather"'
    first = name_part + ', "arguments": ' + json.dumps(arguments) + "}"
    output = first + '\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"tz": "UTC"}}\n</tool_call>'
    expected = Parsed(None, "Checking.", [("get_weather", json.dumps(arguments)), ("get_time", '{"tz": "UTC"}')])
    streamed, chunked = check_case(
        ernie_tokenizer, tool=True, reasoning=False, output=output, expected=expected, chunks=(1, 4)
    )
    assert streamed.name_at_token[0] == _tokens_until(ernie_tokenizer, output, name_part)
    assert streamed.done_at_token[0] == _tokens_until(ernie_tokenizer, output, first)
    deltas = streamed.arg_deltas[0]
    assert len(deltas) > 20 and "".join(deltas) == json.dumps(arguments)
    assert all(not is_json("".join(deltas[:k])) for k in range(1, len(deltas)))
    assert len(chunked.arg_deltas[0]) < len(deltas)  # 4 tokens a step: fewer, larger deltas
    # Whole calls on request: one delta per call, once complete.
    (whole,) = check_case(
        ernie_tokenizer, tool=True, reasoning=False, output=output, expected=expected, chunks=(1,),
        request_kwargs=WHOLE,
    )
    assert whole.arg_deltas == {0: [json.dumps(arguments)], 1: ['{"tz": "UTC"}']}
    assert whole.name_at_token[0] == whole.done_at_token[0] == _tokens_until(ernie_tokenizer, output, first)


LONG_CONTENT = "".join(
    f"line {i}: 北京 weather report, {{\"temp\": {i % 40}}} <tool_call> not a marker here </tool_call>\n\t"
    for i in range(40)
)


def test_long_arguments_stream_in_many_deltas(ernie_tokenizer):
    """A write_file-style call whose arguments span hundreds of tokens: many small deltas,
    each sent with the token that wrote it, concatenating to exactly the non-streamed
    arguments; markers, braces, escapes and raw control characters in the strings stay
    inside the call."""
    final = json.dumps({"path": "/tmp/report.txt", "content": LONG_CONTENT, "mode": "w"}, ensure_ascii=False)
    raw_args = final.replace("\\n", "\n").replace("\\t", "\t")  # the model writes raw newlines, tabs
    output = 'Writing it.\n<tool_call>\n{"name": "send_message", "arguments": ' + raw_args + "}\n</tool_call>"
    n_tokens = len(ernie_tokenizer.encode(output, add_special_tokens=False))
    assert n_tokens > 300
    streamed, chunked = check_case(
        ernie_tokenizer, tool=True, reasoning=False, output=output,
        expected=Parsed(None, "Writing it.", [("send_message", final)]), chunks=(1, 3),
    )
    assert "".join(streamed.arg_deltas[0]) == final
    assert len(streamed.arg_deltas[0]) > 250  # about one delta per token
    assert max(len(d) for d in streamed.arg_deltas[0]) < 20
    assert len(chunked.arg_deltas[0]) > 80
    # Nothing lags: after each character, all the arguments written so far have been sent
    # (escaped), but for the closing brace, which comes with the call's own.
    from vllm_ernie45.parsers.call_json import _escape_controls
    from vllm_ernie45.parsers.tool_parser import ToolCallStream

    machine = ToolCallStream({"send_message"})
    head = output.index(raw_args)
    sent = ""
    for k, c in enumerate(output):
        sent += "".join(e[2] for e in machine.feed(c) if e[0] == "args")
        if head <= k < head + len(raw_args) - 1:
            assert sent == _escape_controls(raw_args[: k + 1 - head]), k
        elif k == head + len(raw_args) - 1:
            assert sent == final[:-1]
    assert sent == final


def test_cut_off_by_max_tokens_while_streaming(ernie_tokenizer):
    """finish_reason=length inside a call's arguments (no EOS; vLLM flushes the parser at
    the end): the name and the arguments written so far were sent and stay sent; the parser
    never closes or completes the call (its arguments are not JSON, vLLM appends nothing);
    the content is the cut block, as non-streaming returns it. Whole calls: nothing sent."""
    sent = '{"text": ' + json.dumps(LONG_CONTENT, ensure_ascii=False)[:300]  # as the model wrote it
    cut = 'Let me write.\n<tool_call>\n{"name": "send_message", "arguments": ' + sent
    streamed = check_case(
        ernie_tokenizer, tool=True, reasoning=False, output=cut,
        expected=Parsed(None, cut, []), eos=False, broken=[("send_message", sent)],
    )
    assert all(len(s.arg_deltas[0]) > 1 for s in streamed)
    check_case(
        ernie_tokenizer, tool=True, reasoning=True, output="I will write.\n</think>\n\n" + cut,
        expected=Parsed("I will write.", cut, []), eos=False, broken=[("send_message", sent)],
    )
    check_case(
        ernie_tokenizer, tool=True, reasoning=False, output=cut, expected=Parsed(None, cut, []), eos=False,
        request_kwargs=WHOLE,
    )
    # cut before the name is complete: nothing was sent
    check_case(
        ernie_tokenizer, tool=True, reasoning=False, output='Let me see.\n<tool_call>\n{"name": "get_ti',
        expected=Parsed(None, 'Let me see.\n<tool_call>\n{"name": "get_ti', []), eos=False,
    )


def test_serving_bookkeeping_matches_what_was_streamed(ernie_tokenizer):
    """vLLM's end-of-stream logic reads prev_tool_call_arr / streamed_args_for_tool: they
    always hold what the client has received, so vLLM appends nothing, to a complete call or
    to a cut one."""
    from vllm_ernie45.parsers.tool_parser import Ernie45ToolParser

    request = make_request()
    parser = Ernie45ToolParser(ernie_tokenizer, request.tools)
    cut = '<tool_call>\n{"name": "get_time", "arguments": {"tz": "U'
    output = '<tool_call>\n{"name": "get_weather", "arguments": {"location": "北京"}}\n</tool_call>\n' + cut
    ids = ernie_tokenizer.encode(output, add_special_tokens=False)
    streamed_args: dict[int, str] = {}
    for i in range(len(ids)):
        delta = ernie_tokenizer.decode(ids[i : i + 1])
        msg = parser.extract_tool_calls_streaming("", "", delta, [], [], ids[i : i + 1], request)
        for tc in msg.tool_calls if msg else []:
            streamed_args[tc.index] = streamed_args.get(tc.index, "") + (tc.function.arguments or "")
        # At every step the parser's view equals what the client has received.
        for index, text in streamed_args.items():
            assert parser.streamed_args_for_tool[index] == text
            assert parser.prev_tool_call_arr[index]["arguments"] == text
        assert parser.get_remaining_unstreamed_args() == ""
    assert parser.prev_tool_call_arr == [
        {"name": "get_weather", "arguments": '{"location": "北京"}'},
        {"name": "get_time", "arguments": '{"tz": "U'},
    ]
    assert parser.current_tool_id == 1
    # The end-of-stream flush returns the unfinished block's text and adds nothing to the call.
    final = parser.finish_streaming()
    assert final.content == cut and final.tool_calls == []
    assert parser.prev_tool_call_arr[1]["arguments"] == parser.streamed_args_for_tool[1] == '{"tz": "U'
    assert parser.get_remaining_unstreamed_args() == ""


def test_tool_stream_mode_switch(monkeypatch):
    from vllm_ernie45.parsers.tool_parser import TOOL_STREAM_ENV, tool_stream_mode

    monkeypatch.delenv(TOOL_STREAM_ENV, raising=False)
    assert tool_stream_mode(make_request()) == "incremental"
    assert tool_stream_mode(make_request(vllm_xargs={"ernie45_tool_stream": "Whole"})) == "whole"
    assert tool_stream_mode(make_request(vllm_xargs={"ernie45_tool_stream": "bogus"})) == "incremental"
    monkeypatch.setenv(TOOL_STREAM_ENV, "whole")
    assert tool_stream_mode(make_request()) == "whole"
    assert tool_stream_mode(make_request(vllm_xargs={"other": 1})) == "whole"
    assert tool_stream_mode(make_request(vllm_xargs={"ernie45_tool_stream": "incremental"})) == "incremental"
    monkeypatch.setenv(TOOL_STREAM_ENV, "nonsense")
    assert tool_stream_mode(None) == "incremental"


def test_whole_calls_server_wide(ernie_tokenizer, monkeypatch):
    """VLLM_ERNIE45_TOOL_STREAM=whole: every request gets whole calls (one delta each)."""
    monkeypatch.setenv("VLLM_ERNIE45_TOOL_STREAM", "whole")
    output = '<tool_call>\n{"name": "get_time", "arguments": {"tz": "Europe/Rome"}}\n</tool_call>'
    (streamed,) = check_case(
        ernie_tokenizer, tool=True, reasoning=False, output=output,
        expected=Parsed(None, None, [("get_time", '{"tz": "Europe/Rome"}')]), chunks=(1,),
    )
    assert streamed.arg_deltas == {0: ['{"tz": "Europe/Rome"}']}


def test_names_are_not_checked_when_the_request_has_no_tools(ernie_tokenizer):
    from vllm_ernie45.parsers.tool_parser import Ernie45ToolParser

    request = make_request(tools=False)
    parser = Ernie45ToolParser(ernie_tokenizer)
    info = parser.extract_tool_calls(
        '<tool_call>\n{"name": "anything", "arguments": {"a": 1}}\n</tool_call>', request
    )
    assert info.tools_called
    assert [(c.function.name, c.function.arguments) for c in info.tool_calls] == [("anything", '{"a": 1}')]
    assert info.content is None


def test_no_call_returns_the_text_unchanged(ernie_tokenizer):
    """vLLM 0.26 returns its own copy of the text when no call was found; ours is equal."""
    from vllm_ernie45.parsers.tool_parser import Ernie45ToolParser

    parser = Ernie45ToolParser(ernie_tokenizer, make_request().tools)
    for case in TOOL_CASES:
        info = parser.extract_tool_calls(case.output, make_request())
        if not case.calls:
            assert not info.tools_called
            assert info.content == (case.output or None), case.id


def test_tool_choice_none_streams_plain_text(ernie_tokenizer):
    cls = parser_class(tool=True, reasoning=False)
    request = make_request(tool_choice="none")
    output = "Sure.\nNo tools needed."
    streamed, text = run_stream(cls, ernie_tokenizer, request, output)
    assert streamed.content == output and streamed.calls == []
    full = run_full(cls, ernie_tokenizer, request, text)
    assert full.content == output and full.calls == []


def test_adjust_request_keeps_special_tokens(ernie_tokenizer):
    from vllm_ernie45.parsers.tool_parser import Ernie45ToolParser

    request = make_request()
    assert request.skip_special_tokens in (True, None)  # None: vLLM >= 0.33's default (skips them)
    request = Ernie45ToolParser(ernie_tokenizer, request.tools).adjust_request(request)
    assert request.skip_special_tokens is False


def assemble(events: list[tuple]) -> tuple[str | None, list[tuple[str, str]], list[tuple[str, str]]]:
    """A client's view of ToolCallStream events: content, complete calls, broken calls --
    checking the event order (start, args..., end) on the way."""
    content = "".join(e[1] for e in events if e[0] == "content") or None
    calls: dict[int, list] = {}
    for event in events:
        if event[0] == "start":
            assert event[1] == len(calls)
            calls[event[1]] = [event[3], "", False]
        elif event[0] == "args":
            assert not calls[event[1]][2] and event[2]
            calls[event[1]][1] += event[2]
        elif event[0] == "end":
            assert not calls[event[1]][2]
            calls[event[1]][2] = True
    for name, arguments, done in calls.values():
        assert is_json(arguments) == done, (name, arguments, done)
    return (
        content,
        [(name, arguments) for name, arguments, done in calls.values() if done],
        [(name, arguments) for name, arguments, done in calls.values() if not done],
    )


@pytest.mark.parametrize("size", [1, 2, 5, 13])
def test_state_machine_is_chunking_invariant(size):
    """Markers split across deltas (a tokenizer without them as single tokens)."""
    from vllm_ernie45.parsers.tool_parser import ToolCallStream

    names = {"get_weather", "get_time", "send_message"}
    for case in TOOL_CASES:
        machine = ToolCallStream(names)
        events = []
        for i in range(0, len(case.output), size):
            events += machine.feed(case.output[i : i + size])
        events += machine.finish()
        assert assemble(events) == (case.content, case.calls, case.broken), case.id
        assert case.calls == [(c.name, c.arguments) for c in machine.calls]


def _random_json_text(rng, depth: int = 0) -> str:
    roll = rng.random()
    if depth < 3 and roll < 0.3:
        members = [f"{_random_json_text(rng, 9)}: {_random_json_text(rng, depth + 1)}" for _ in range(rng.randint(0, 3))]
        return "{" + ", ".join(m if m.startswith('"') else '"k": 1' for m in members) + "}"
    if depth < 3 and roll < 0.45:
        return "[" + ", ".join(_random_json_text(rng, depth + 1) for _ in range(rng.randint(0, 3))) + "]"
    return rng.choice(
        ['"x"', '"a\\"b"', '"\\u00e9\\n"', '"raw\ttab"', "0", "-12.5e+3", "1E9", "true", "false", "null", '""']
    )


NAME_VALUES = ['"get_time"', '""', "5", '"get_\\u0074ime"', "null"]


def test_call_object_reads_json_like_the_json_module():
    """CallObject's incremental reading against json.loads (lax) on seeded random objects
    and mutations of them: it stays valid exactly while the text can still become JSON,
    its name is the object's "name", and its arguments text is always a prefix of what
    parse_call returns (escaped control characters) that is not JSON before the end."""
    import random

    from vllm_ernie45.parsers.call_json import CallObject, parse_call

    rng = random.Random(30)
    lax = json.JSONDecoder(strict=False, parse_constant=lambda name: 1 / 0)  # NaN, Infinity: not JSON
    for _ in range(3000):
        args = _random_json_text(rng)
        members = ['"name": ' + rng.choice(NAME_VALUES), '"arguments": ' + args]
        if rng.random() < 0.3:
            members.append(f'"parameters": {_random_json_text(rng)}')
        rng.shuffle(members)
        text = "{" + rng.choice(["", " ", "\n"]) + ", ".join(members) + "}"
        for _ in range(rng.choice([0, 0, 1, 2])):  # mutate: drop, insert or change a character
            k = rng.randrange(1, len(text))
            text = rng.choice([text[:k] + text[k + 1 :], text[:k] + rng.choice(',:"{}[]0e.-x ') + text[k:]])
        item = CallObject()
        closed = False
        name_seen = None
        for c in text[1:]:
            event = item.add(c)
            if event == "name":
                name_seen = item.name
            assert not is_json(item.args_text), text
            if event == "close":
                closed = True
                break
        prefix = text[: len(item.chars)]  # the object's text
        try:
            value = lax.decode(prefix)
            ok = isinstance(value, dict)
        except (ValueError, ZeroDivisionError):
            ok = False
        if closed:
            assert item.valid == ok, text
            call = parse_call(prefix, set())
            if ok and isinstance(value.get("name"), str) and value["name"]:
                assert name_seen == value["name"] and call is not None and call[0] == name_seen, text
                assert call[1].startswith(item.args_text), text
            else:
                assert call is None, text


REQUIRED_OUTPUT = (
    '[{"name": "get_weather", "parameters": {"location": "北京"}}, '
    '{"name": "get_time", "parameters": {"tz": "UTC"}}]'
)
NAMED = {"type": "function", "function": {"name": "get_weather"}}


def _vllm_streams_required_calls_by_delimiter() -> bool:
    """vLLM <= 0.31 streams tool_choice="required" itself (tool_parsers/streaming.py,
    filter_delta_text) and, when one delta closes a call and opens the next (here '"}}, {"'
    with 3 tokens per step after the reasoning), sends the first call's closing '"}' under
    the second call's index, before that call's name. 0.32 rewrote that code. The plugin's
    parsers take no part in it (vLLM parses "required" output without the tool parser)."""
    from vllm_ernie45 import compat

    return compat.parse_minor(compat.installed_vllm_version()) < (0, 32)


@pytest.mark.parametrize("thinking", [True, False], ids=["thinking", "no_thinking"])
def test_tool_choice_required_json_is_parsed_by_vllm(ernie_tokenizer, thinking):
    """Guided decoding makes the answer a JSON array; vLLM parses it, streaming or not."""
    output = ("Two calls.\n</think>\n\n" if thinking else "") + REQUIRED_OUTPUT
    run = lambda: check_case(  # noqa: E731
        ernie_tokenizer,
        tool=True,
        reasoning=True,
        output=output,
        expected=Parsed(
            "Two calls." if thinking else None,
            None,
            [("get_weather", '{"location": "北京"}'), ("get_time", '{"tz": "UTC"}')],
        ),
        chat_template_kwargs=None if thinking else {"enable_thinking": False},
        request_kwargs={"tool_choice": "required"},
    )
    if thinking and _vllm_streams_required_calls_by_delimiter():
        with pytest.raises(AssertionError, match="arguments streamed before the call's name"):
            run()
        return
    run()


@pytest.mark.parametrize("thinking", [True, False], ids=["thinking", "no_thinking"])
def test_named_tool_choice_json_is_parsed_by_vllm(ernie_tokenizer, thinking):
    output = ("One call.\n</think>\n\n" if thinking else "") + '{"location": "Beijing"}'
    check_case(
        ernie_tokenizer,
        tool=True,
        reasoning=True,
        output=output,
        expected=Parsed("One call." if thinking else None, None, [("get_weather", '{"location": "Beijing"}')]),
        chat_template_kwargs=None if thinking else {"enable_thinking": False},
        request_kwargs={"tool_choice": NAMED},
    )


def test_tool_choice_none_keeps_a_tool_block_as_text(ernie_tokenizer):
    block = '<tool_call>\n{"name": "get_time", "arguments": {"tz": "UTC"}}\n</tool_call>\n'
    check_case(
        ernie_tokenizer,
        tool=True,
        reasoning=False,
        output="No tools allowed.\n" + block,
        expected=Parsed(None, "No tools allowed.\n" + block, []),
        request_kwargs={"tool_choice": "none"},
    )


FRAGMENTS = [
    "Hello", " world", "\n", "\n\n", " ", "北京", "<think>", "</think>", "<response>", "</response>",
    "<tool_call>", "</tool_call>", '{"name": "get_weather", "arguments": {"location": "Bei', 'jing"}}',
    '{"name": "get_time"}', '{"name": "nope", "arguments": {}}', '"', "{", "}", "[", "]", ",", ":",
    '{"arguments": {"a": "}{"}, "name": "send_message"}', '\\"', "\\u4f60", "x", "<", '{"a": 1}',
]
# Pieces of JSON string values: every marker, braces, brackets, quotes, escapes, newlines.
STRING_PIECES = [
    "<tool_call>", "</tool_call>", "<think>", "</think>", "<response>", "</response>", "{", "}", "[", "]",
    '"', "\\", "\n", "\t", " ", "x", "北京", ":", ",", "😀", "<",
]
NAMES = ["get_weather", "get_time", "send_message", "nope", ""]


def _hostile_string(rng) -> str:
    return "".join(rng.choice(STRING_PIECES) for _ in range(rng.randint(0, 6)))


def _call_object(rng) -> str:
    """A JSON call object whose string values hold markers, braces and quotes; arguments
    as an object, as a JSON string (of an object or of anything), null or missing."""
    value = {"text": _hostile_string(rng), _hostile_string(rng): [_hostile_string(rng), {"k": _hostile_string(rng)}]}
    form = rng.randrange(5)
    obj: dict = {"name": rng.choice(NAMES)}
    if form == 0:
        obj["arguments"] = value
    elif form == 1:
        obj["arguments"] = json.dumps(value, ensure_ascii=rng.random() < 0.5)
    elif form == 2:
        obj["arguments"] = _hostile_string(rng)
    elif form == 3:
        obj["arguments"] = None
    if rng.random() < 0.3:
        obj = dict(reversed(list(obj.items())))
    text = json.dumps(obj, ensure_ascii=rng.random() < 0.5)
    if rng.random() < 0.15:  # the model writes a raw newline inside a string
        text = text.replace("\\n", "\n")
    if rng.random() < 0.15:  # cut off (max_tokens, or a sloppy model)
        text = text[: rng.randint(0, len(text))]
    return text


def _tool_block(rng) -> str:
    objects = [_call_object(rng) for _ in range(rng.choice([1, 1, 1, 2, 3]))]
    if len(objects) > 1 and rng.random() < 0.6:
        body = "[" + ", ".join(objects) + "]"
    else:
        body = "\n".join(objects)
    block = "<tool_call>\n" + body
    return block + rng.choice(["\n</tool_call>\n", "\n</tool_call>", "</tool_call>", ""])


def _random_output(rng) -> str:
    parts = []
    for _ in range(rng.randint(0, 12)):
        roll = rng.random()
        if roll < 0.25:
            parts.append(_tool_block(rng))
        elif roll < 0.35:
            parts.append(_call_object(rng))
        else:
            parts.append(rng.choice(FRAGMENTS))
    return "".join(parts)


def test_random_outputs_stream_like_they_parse(ernie_tokenizer):
    """Property check on seeded random outputs -- fragment soups and call blocks whose JSON
    strings hold markers, braces and quotes, some cut off -- in every parser setup, each
    streamed 1, 2, 3 and 7 tokens a step and all at once: the argument deltas of every
    complete call concatenate to its non-streamed arguments, and content, reasoning and
    complete calls equal the non-streaming result whatever the chunking; every call's
    arguments are strict JSON once complete and never before (a call whose name was sent
    but that never completes -- cut off, or its JSON broke -- is the only difference, and
    only incremental streaming has it); with only the tool parser and no call found, the
    content is the model's text unchanged."""
    import random

    rng = random.Random(20250630)
    names = {"get_weather", "get_time", "send_message"}
    seen_broken = seen_calls = 0
    for _ in range(200):
        output = _random_output(rng)
        tool, reasoning = rng.choice([(True, False), (False, True), (True, True), (True, True)])
        kwargs = rng.choice([None, {"enable_thinking": False}])
        if reasoning and kwargs is None and rng.random() < 0.7:
            output = "Thinking about it.\n</think>\n\n" + output
        cls = parser_class(tool, reasoning)
        extra = WHOLE if rng.random() < 0.25 else {}
        request = make_request(tool_choice=rng.choice(["auto", "auto", "none"]), **extra)
        request = cls(ernie_tokenizer, request.tools, chat_template_kwargs=kwargs, model_config=None).adjust_request(
            request
        )
        eos = rng.choice([True, False])
        if not eos and rng.random() < 0.5:  # max_tokens: cut anywhere
            output = output[: rng.randint(0, len(output))]
        case = (output, tool, reasoning, kwargs, request.tool_choice, extra, eos)
        results = []
        for chunk in (1, 2, 3, 7, 10**6):
            streamed, text = run_stream(
                cls, ernie_tokenizer, request, output, chat_template_kwargs=kwargs, chunk=chunk, eos=eos
            )
            assert streamed.remaining_args == "", case
            results.append((streamed, text))
        full = run_full(cls, ernie_tokenizer, request, results[0][1], chat_template_kwargs=kwargs)
        for streamed, text in results:
            assert text == results[0][1], case
            assert (streamed.reasoning, streamed.content, streamed.calls) == (
                full.reasoning, full.content, full.calls
            ), case
            assert streamed.broken == results[0][0].broken, case
            for index, deltas in streamed.arg_deltas.items():  # each delta adds text
                assert all(deltas), case
        broken = results[0][0].broken
        if extra or not tool or request.tool_choice == "none":
            assert broken == [], case
        for name, arguments in broken:
            assert name in names and not is_json(arguments), case
        for name, arguments in full.calls:
            assert name in names, case
            json.loads(arguments)  # strict: what an OpenAI client does
        if tool and not reasoning and not full.calls:
            assert full.content == (output or None), case
        seen_broken += bool(broken)
        seen_calls += bool(full.calls)
    assert seen_broken >= 8 and seen_calls >= 30, (seen_broken, seen_calls)  # the seeds exercise both
