"""ernie45 reasoning parser through vLLM's own Parser and detokenizer (and with the tool parser)."""

from __future__ import annotations

import pytest

from parser_cases import (
    REASONING_CASES,
    Parsed,
    check_case,
    ernie_tokenizer,  # noqa: F401 - fixture
    make_request,
    parser_class,
    registered,  # noqa: F401 - fixture
    render_prompt_ids,
    run_full,
    run_stream,
)

# The whole file is in the version smoke set: the parsers through vLLM's own Parser.
pytestmark = [pytest.mark.usefixtures("registered"), pytest.mark.version_smoke]

THINKING_OFF = {"enable_thinking": False}


def _parser(tokenizer, **kwargs):
    from vllm_ernie45.parsers.reasoning_parser import Ernie45ReasoningParser

    return Ernie45ReasoningParser(tokenizer, **kwargs)


@pytest.mark.parametrize("with_tools", [False, True], ids=["reasoning_only", "with_tool_parser"])
@pytest.mark.parametrize("case", REASONING_CASES, ids=[c[0] for c in REASONING_CASES])
def test_reasoning_and_answer(ernie_tokenizer, case, with_tools):
    _, output, reasoning, content, calls = case
    check_case(
        ernie_tokenizer,
        tool=with_tools,
        reasoning=True,
        output=output,
        expected=Parsed(reasoning, content, calls),
        chunks=(1, 2, 5),
    )


REASONING_WITH_CALLS = [
    (
        "calls_after_think",
        "I need to call two tools to handle these two issues separately.\n</think>\n\n\n"
        '<tool_call>\n{"name": "get_weather", "arguments": {"location": "Beijing"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_time", "arguments": {"tz": "Asia/Shanghai"}}\n</tool_call>\n',
        "I need to call two tools to handle these two issues separately.",
        None,
        [("get_weather", '{"location": "Beijing"}'), ("get_time", '{"tz": "Asia/Shanghai"}')],
    ),
    (
        "answer_then_call",
        "用户想知道北京的天气。\n</think>\n\n<response>\n我来查一下北京的天气。\n</response>\n"
        '<tool_call>\n{"name": "get_weather", "arguments": {"location": "北京", "unit": "c"}}\n</tool_call>\n',
        "用户想知道北京的天气。",
        "我来查一下北京的天气。",
        [("get_weather", '{"location": "北京", "unit": "c"}')],
    ),
    (
        "call_inside_open_response",
        "Check first.\n</think>\n\n<response>\nOne moment.\n"
        '<tool_call>\n{"name": "get_time", "arguments": {"tz": "UTC"}}\n</tool_call>\n</response>\n',
        "Check first.",
        "One moment.",
        [("get_time", '{"tz": "UTC"}')],
    ),
    (
        "tool_call_text_inside_reasoning_is_reasoning",
        'Maybe <tool_call>{"name": "get_time"}</tool_call> later.\n</think>\n\nNo call needed.',
        'Maybe <tool_call>{"name": "get_time"}</tool_call> later.',
        "No call needed.",
        [],
    ),
]


@pytest.mark.parametrize("case", REASONING_WITH_CALLS, ids=[c[0] for c in REASONING_WITH_CALLS])
def test_reasoning_and_tool_calls_together(ernie_tokenizer, case):
    _, output, reasoning, content, calls = case
    check_case(
        ernie_tokenizer,
        tool=True,
        reasoning=True,
        output=output,
        expected=Parsed(reasoning, content, calls),
        chunks=(1, 4),
    )


@pytest.mark.parametrize("with_tools", [False, True], ids=["reasoning_only", "with_tool_parser"])
def test_json_answer_is_left_verbatim(ernie_tokenizer, with_tools):
    """response_format / guided JSON right after </think>: handed over untouched."""
    check_case(
        ernie_tokenizer,
        tool=with_tools,
        reasoning=True,
        output='Format it.\n</think>\n\n{"city": "北京", "list": [1, 2]}\n',
        expected=Parsed("Format it.", '{"city": "北京", "list": [1, 2]}\n', []),
    )


def test_wrapped_answer_starting_with_bracket_is_still_unwrapped(ernie_tokenizer):
    check_case(
        ernie_tokenizer,
        tool=False,
        reasoning=True,
        output="Cite.\n</think>\n\n<response>\n[1] Source one.\n</response>\n",
        expected=Parsed("Cite.", "[1] Source one.", []),
    )


def test_reasoning_only_passes_tool_blocks_through_as_content(ernie_tokenizer):
    """Without a tool parser, text from the first <tool_call> on is plain content."""
    block = '<tool_call>\n{"name": "get_time", "arguments": {"tz": "UTC"}}\n</tool_call>\n'
    check_case(
        ernie_tokenizer,
        tool=False,
        reasoning=True,
        output="Think.\n</think>\n\nOne moment.\n" + block,
        expected=Parsed("Think.", "One moment.\n" + block, []),
        tools=False,
    )


def test_tool_choice_none_keeps_the_whitespace_before_a_block(ernie_tokenizer):
    """Issue 17.5: ``hi\n<tool_call>`` must not come back as ``hi<tool_call>``."""
    block = '<tool_call>\n{"name": "get_time", "arguments": {"tz": "UTC"}}\n</tool_call>'
    check_case(
        ernie_tokenizer,
        tool=True,
        reasoning=True,
        output="Think.\n</think>\n\nhi\n" + block,
        expected=Parsed("Think.", "hi\n" + block, []),
        request_kwargs={"tool_choice": "none"},
        chunks=(1, 2, 5),
    )


DISABLED_CASES = [
    ("plain", "Hello! No thinking today.", "Hello! No thinking today.", []),
    (
        "verbatim_response_wrapper",
        "<response>\nHi\n</response>\n",
        "<response>\nHi\n</response>\n",
        [],
    ),
    (
        "think_tags_are_just_text",
        "Here is a </think> tag.",
        "Here is a </think> tag.",
        [],
    ),
]


@pytest.mark.parametrize("with_tools", [False, True], ids=["reasoning_only", "with_tool_parser"])
@pytest.mark.parametrize("case", DISABLED_CASES, ids=[c[0] for c in DISABLED_CASES])
def test_thinking_disabled_everything_is_content(ernie_tokenizer, case, with_tools):
    _, output, content, calls = case
    check_case(
        ernie_tokenizer,
        tool=with_tools,
        reasoning=True,
        output=output,
        expected=Parsed(None, content, calls),
        chat_template_kwargs=THINKING_OFF,
    )


# Every JSON value a client can send as enable_thinking (None: the key is absent).
ENABLE_THINKING_VALUES = [
    (False, True), (0, True), (0.0, True), ("false", True), ("False", True), (" off ", True), ("no", True),
    ("0", True), (True, False), (1, False), (2, False), ("true", False), ("yes", False), ("", False),
    (None, False), ("absent", False), ([], False), ({}, False),
]


@pytest.mark.parametrize(
    ("value", "off"), ENABLE_THINKING_VALUES, ids=[repr(v) for v, _ in ENABLE_THINKING_VALUES]
)
def test_one_meaning_of_thinking_off(ernie_tokenizer, value, off):
    """Issue 17.2: the chat template, the non-streaming and the streaming parser all follow
    ``thinking_disabled`` for every value of ``enable_thinking``."""
    from vllm_ernie45.parsers.reasoning_parser import thinking_disabled

    kwargs = {} if value == "absent" else {"enable_thinking": value}
    assert thinking_disabled(kwargs) is off
    prompt = ernie_tokenizer.decode(render_prompt_ids(ernie_tokenizer, make_request(), kwargs))
    assert prompt.endswith("<think>\n\n</think>\n\n") is off
    assert ("think_mode=False" in prompt) is off
    output = "Plain words.\n</think>\n\nThe answer."
    expected = Parsed(None, output, []) if off else Parsed("Plain words.", "The answer.", [])
    check_case(ernie_tokenizer, tool=True, reasoning=True, output=output, expected=expected,
               chat_template_kwargs=kwargs)


def test_thinking_disabled_with_tool_call(ernie_tokenizer):
    check_case(
        ernie_tokenizer,
        tool=True,
        reasoning=True,
        output='Sure.\n<tool_call>\n{"name": "get_time", "arguments": {"tz": "UTC"}}\n</tool_call>\n',
        expected=Parsed(None, "Sure.", [("get_time", '{"tz": "UTC"}')]),
        chat_template_kwargs=THINKING_OFF,
    )


def test_one_delta_on_both_sides_of_think_end(ernie_tokenizer):
    # Directly: the delta holds reasoning, </think>, framing and the answer.
    parser = _parser(ernie_tokenizer)
    first = parser.extract_reasoning_streaming("", "", "Let me", [], [], [])
    assert (first.reasoning, first.content) == ("Let me", None)
    delta = " see.\n</think>\n\n<response>\nThe answer"
    ids = ernie_tokenizer.encode(delta, add_special_tokens=False)
    msg = parser.extract_reasoning_streaming("Let me", "Let me" + delta, delta, [], ids, ids)
    assert (msg.reasoning, msg.content) == (" see.", "The answer")
    msg = parser.extract_reasoning_streaming("", "", " is 4.\n</response>\n", [], [], [])
    assert (msg.reasoning, msg.content) == (None, " is 4.")
    assert parser.finish_streaming() is None
    # Through vLLM: the whole output arrives in one step (e.g. several tokens per step).
    output = "Quick.\n</think>\n\n<response>\nFour.\n</response>\n"
    (streamed,) = check_case(
        ernie_tokenizer,
        tool=True,
        reasoning=True,
        output=output,
        expected=Parsed("Quick.", "Four.", []),
        chunks=(len(ernie_tokenizer.encode(output, add_special_tokens=False)) + 1,),
    )
    assert streamed.content == "Four."


def test_include_reasoning_false(ernie_tokenizer):
    cls = parser_class(tool=True, reasoning=True)
    request = make_request(include_reasoning=False, skip_special_tokens=False)
    streamed, text = run_stream(cls, ernie_tokenizer, request, "Hidden.\n</think>\n\nShown.")
    assert (streamed.reasoning, streamed.content) == (None, "Shown.")
    full = run_full(cls, ernie_tokenizer, request, text)
    assert full.content == "Shown."


def test_is_reasoning_end_on_rendered_prompts(ernie_tokenizer):
    request = make_request()
    on = render_prompt_ids(ernie_tokenizer, request, None)
    off = render_prompt_ids(ernie_tokenizer, request, THINKING_OFF)
    think = ernie_tokenizer.convert_tokens_to_ids("<think>")
    end = ernie_tokenizer.convert_tokens_to_ids("</think>")
    assert ernie_tokenizer.decode(on).endswith("<|im_start|>assistant\n<think>\n")
    assert ernie_tokenizer.decode(off).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    parser = _parser(ernie_tokenizer)
    assert parser.is_reasoning_end(on) is False
    assert parser.is_reasoning_end(off) is True
    # the kwargs alone are enough (a template that ignores enable_thinking)
    assert _parser(ernie_tokenizer, chat_template_kwargs=THINKING_OFF).is_reasoning_end(on) is True
    assert _parser(ernie_tokenizer, chat_template_kwargs={"enable_thinking": True}).is_reasoning_end(on) is False
    # generated ids: reasoning ends at </think>; a later <think> reopens it
    assert parser.is_reasoning_end([5, 6, end, 9]) is True
    assert parser.is_reasoning_end([end, 9, think, 7]) is False
    assert parser.is_reasoning_end([]) is False


def test_token_level_views_for_structured_output(ernie_tokenizer):
    end = ernie_tokenizer.convert_tokens_to_ids("</think>")
    think = ernie_tokenizer.convert_tokens_to_ids("<think>")
    parser = _parser(ernie_tokenizer)
    ids = ernie_tokenizer.encode("Reason here.\n</think>\n\n{\"a\": 1}", add_special_tokens=False)
    split = ids.index(end)
    assert parser.extract_content_ids(ids) == ids[split + 1 :]
    assert parser.extract_content_ids(ids[:split]) == []
    assert parser.is_reasoning_end_streaming(ids[: split + 1], [end]) is True
    assert parser.is_reasoning_end_streaming(ids[:split], ids[split - 1 : split]) is False
    assert parser.count_reasoning_tokens([think] + ids) == split
    off = _parser(ernie_tokenizer, chat_template_kwargs=THINKING_OFF)
    assert off.extract_content_ids(ids) == ids
    assert off.is_reasoning_end_streaming(ids[:1], ids[:1]) is True
    assert off.count_reasoning_tokens(ids) == 0
    # The engine builds its own instance with keyword arguments (structured outputs).
    from vllm_ernie45.parsers.reasoning_parser import Ernie45ReasoningParser

    engine_side = Ernie45ReasoningParser(tokenizer=ernie_tokenizer, chat_template_kwargs=THINKING_OFF)
    assert engine_side.is_reasoning_end([]) is True


def test_request_kwargs_are_the_fallback_for_non_streaming(ernie_tokenizer):
    parser = _parser(ernie_tokenizer)  # constructed without chat_template_kwargs
    off = make_request(chat_template_kwargs={"enable_thinking": False})
    on = make_request()
    assert parser.extract_reasoning("Just text.", off) == (None, "Just text.")
    assert parser.extract_reasoning("Just text.", on) == ("Just text.", None)
    # constructor kwargs (vLLM passes the effective ones) win over the request's
    assert _parser(ernie_tokenizer, chat_template_kwargs={}).extract_reasoning("x", off) == ("x", None)


def test_adjust_request_keeps_special_tokens(ernie_tokenizer):
    request = make_request(tools=False)
    assert request.skip_special_tokens in (True, None)  # None: vLLM >= 0.33's default (skips them)
    assert _parser(ernie_tokenizer).adjust_request(request).skip_special_tokens is False


def test_markers_split_across_deltas():
    """A tokenizer that spells the markers in pieces: the splitter holds partial markers."""
    from vllm_ernie45.parsers.reasoning_parser import ThinkSplitter

    output = "Plan a < b.\n</think>\n\n<response>\nAnswer <b> ok\n</response>\n<tool_call>\n{}"
    for size in (1, 2, 3, 7):
        splitter = ThinkSplitter()
        reasoning = content = ""
        for i in range(0, len(output), size):
            r, c = splitter.feed(output[i : i + size])
            reasoning, content = reasoning + r, content + c
        r, c = splitter.finish()
        assert (reasoning + r, content + c) == ("Plan a < b.", "Answer <b> ok\n\n<tool_call>\n{}"), size


def test_tokenizer_without_think_tokens_is_rejected(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.WordLevel({"<unk>": 0, "hello": 1}, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>")
    with pytest.raises(ValueError, match="</think>"):
        _parser(tokenizer)
