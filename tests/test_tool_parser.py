"""ernie45 tool-call parser through vLLM's own Parser, detokenizer and manager."""

from __future__ import annotations

import json

import pytest

from parser_cases import (
    TOOL_CASES,
    Parsed,
    check_case,
    ernie_tokenizer,  # noqa: F401 - fixture
    make_request,
    parser_class,
    registered,  # noqa: F401 - fixture
    run_full,
    run_stream,
)

# The whole file is in the version smoke set: the parsers through vLLM's own Parser.
pytestmark = [pytest.mark.usefixtures("registered"), pytest.mark.version_smoke]


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
    )


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
    )


def test_a_call_streams_whole_once_its_object_is_complete(ernie_tokenizer):
    """A call is never streamed before it is complete (a cut-off call must not reach the
    client as a call): id, name and all arguments arrive in one delta, with the token that
    closes the call's JSON object -- before ``</tool_call>``."""
    arguments = {"location": "Beijing", "unit": "c", "note": "a fairly long value " * 6}
    first = 'Checking.\n<tool_call>\n{"name": "get_weather", "arguments": ' + json.dumps(arguments) + "}"
    output = first + '\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"tz": "UTC"}}\n</tool_call>'
    (streamed,) = check_case(
        ernie_tokenizer,
        tool=True,
        reasoning=False,
        output=output,
        expected=Parsed(
            None, "Checking.", [("get_weather", json.dumps(arguments)), ("get_time", '{"tz": "UTC"}')]
        ),
        chunks=(1,),
    )
    assert streamed.name_at_token[0] == len(ernie_tokenizer.encode(first, add_special_tokens=False))
    assert streamed.arg_deltas == {0: [json.dumps(arguments)], 1: ['{"tz": "UTC"}']}


def test_serving_bookkeeping_matches_what_was_streamed(ernie_tokenizer):
    """vLLM's end-of-stream logic reads prev_tool_call_arr / streamed_args_for_tool."""
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
    assert parser.prev_tool_call_arr == [{"name": "get_weather", "arguments": '{"location": "北京"}'}]
    assert parser.current_tool_id == 0
    # The unfinished second call was never streamed; the end-of-stream flush returns its text.
    final = parser.finish_streaming()
    assert final.content == cut and final.tool_calls == []
    assert len(parser.prev_tool_call_arr) == 1


def test_cut_off_by_max_tokens_without_eos(ernie_tokenizer):
    """finish_reason=length: no EOS token; vLLM still flushes the parser at the end."""
    check_case(
        ernie_tokenizer,
        tool=True,
        reasoning=False,
        output='Let me see.\n<tool_call>\n{"name": "get_ti',
        expected=Parsed(None, 'Let me see.\n<tool_call>\n{"name": "get_ti', []),
        eos=False,
    )


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
        content = "".join(e[1] for e in events if e[0] == "content") or None
        calls = [(e[3], e[4]) for e in events if e[0] == "call"]
        assert (content, calls) == (case.content, case.calls), case.id
        assert calls == [(c.name, c.arguments) for c in machine.calls]


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
    strings hold markers, braces and quotes -- in every parser setup: the client's assembled
    stream equals the non-streaming result, every call's arguments are strict JSON, and with
    only the tool parser and no call found, the content is the model's text unchanged."""
    import random

    rng = random.Random(20250630)
    names = {"get_weather", "get_time", "send_message"}
    for _ in range(150):
        output = _random_output(rng)
        tool, reasoning = rng.choice([(True, False), (False, True), (True, True), (True, True)])
        kwargs = rng.choice([None, {"enable_thinking": False}])
        if reasoning and kwargs is None and rng.random() < 0.7:
            output = "Thinking about it.\n</think>\n\n" + output
        cls = parser_class(tool, reasoning)
        request = make_request(tool_choice=rng.choice(["auto", "auto", "none"]))
        request = cls(ernie_tokenizer, request.tools, chat_template_kwargs=kwargs, model_config=None).adjust_request(
            request
        )
        streamed, text = run_stream(
            cls, ernie_tokenizer, request, output, chat_template_kwargs=kwargs,
            chunk=rng.choice([1, 2, 3, 5]), eos=rng.choice([True, False]),
        )
        full = run_full(cls, ernie_tokenizer, request, text, chat_template_kwargs=kwargs)
        case = (output, tool, reasoning, kwargs, request.tool_choice)
        assert (streamed.reasoning, streamed.content, streamed.calls) == (
            full.reasoning, full.content, full.calls
        ), case
        assert streamed.remaining_args == "", case
        for name, arguments in full.calls:
            assert name in names, case
            json.loads(arguments)  # strict: what an OpenAI client does
        if tool and not reasoning and not full.calls:
            assert full.content == (output or None), case
