"""The tiny ERNIE-style tokenizer: ids, determinism, exact round trips, chat template."""

from __future__ import annotations

import json
import random

import pytest

from vllm_ernie45.testing.tiny.tokenizer import (
    ERNIE_SPECIAL_TOKENS,
    TINY_VOCAB_SIZE,
    build_ernie_tokenizer,
)

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "天气",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    build_ernie_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def hf_tok(tok_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tok_dir))


def test_files_and_determinism(tok_dir, tmp_path):
    names = sorted(p.name for p in tok_dir.iterdir())
    assert names == ["special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
    build_ernie_tokenizer(tmp_path / "again")
    for name in names:
        assert (tmp_path / "again" / name).read_bytes() == (tok_dir / name).read_bytes(), name


def test_ids_match_ernie_configs(hf_tok):
    assert TINY_VOCAB_SIZE == 1024
    assert (hf_tok.unk_token, hf_tok.unk_token_id) == ("<unk>", 0)
    assert (hf_tok.pad_token, hf_tok.pad_token_id) == ("<unk>", 0)
    assert (hf_tok.bos_token, hf_tok.bos_token_id) == ("<s>", 1)
    assert (hf_tok.eos_token, hf_tok.eos_token_id) == ("</s>", 2)
    vocab = hf_tok.get_vocab()
    assert len(hf_tok) == len(vocab) <= TINY_VOCAB_SIZE
    assert max(vocab.values()) < TINY_VOCAB_SIZE
    assert sorted(vocab.values()) == list(range(len(vocab)))


@pytest.mark.parametrize("marker", ERNIE_SPECIAL_TOKENS)
def test_ernie_markers_are_single_special_tokens(hf_tok, marker):
    ids = hf_tok.encode(marker, add_special_tokens=False)
    assert len(ids) == 1 and ids[0] < 3 + len(ERNIE_SPECIAL_TOKENS)
    assert marker in hf_tok.all_special_tokens
    # inside text, too
    ids = hf_tok.encode(f"x{marker}y", add_special_tokens=False)
    assert hf_tok.convert_tokens_to_ids(marker) in ids
    assert hf_tok.decode(ids, skip_special_tokens=True) == "xy"


TEXTS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "北京今天天气怎么样？北京今天晴，气温二十三度。",
    '{"name": "get_weather", "arguments": {"location": "北京", "unit": "c", "x": [1, 2.5, null]}}',
    "emoji 😀🎉👩‍👩‍👧, accents café naïve, Ελληνικά, русский, العربية, हिन्दी, 日本語のテキスト",
    "  leading and trailing spaces  \n\n\ttabs\r\nCRLF\x00nul\x1bescape\u200bzero-width  ",
    "<think>\nreasoning\n</think>\n\n<response>\nanswer\n</response>\n<tool_call>\n{}\n</tool_call>",
    "",
]


@pytest.mark.parametrize("text", TEXTS)
def test_exact_round_trip(hf_tok, text):
    ids = hf_tok.encode(text, add_special_tokens=False)
    assert all(0 <= i < TINY_VOCAB_SIZE for i in ids)
    assert hf_tok.decode(ids) == text


def test_round_trip_random_unicode(hf_tok):
    rng = random.Random(1234)
    pools = [(0x20, 0x7E), (0x4E00, 0x9FFF), (0x0400, 0x04FF), (0x1F300, 0x1F5FF), (0x00, 0x1F)]
    for _ in range(200):
        text = "".join(chr(rng.randint(*rng.choice(pools))) for _ in range(rng.randint(1, 40)))
        assert hf_tok.decode(hf_tok.encode(text, add_special_tokens=False)) == text


def test_common_text_is_compact(hf_tok):
    # Learnt merges: ordinary words and frequent Chinese characters are few tokens.
    assert len(hf_tok.tokenize(" the weather")) == 2
    assert len(hf_tok.encode("北京", add_special_tokens=False)) == 1


def test_vllm_loads_it(tok_dir, tmp_path):
    import shutil

    from vllm.tokenizers import get_tokenizer

    from parser_cases import _detokenizer

    shutil.copytree(tok_dir, tmp_path / "tok")
    (tmp_path / "tok" / "config.json").write_text(json.dumps({"model_type": "ernie4_5"}))
    tok = get_tokenizer(str(tmp_path / "tok"))
    assert tok.eos_token_id == 2
    # The engine detokenizes it with the tokenizers-library DecodeStream (the fast path).
    text = "北京 😀 <think>x</think>"
    detok = _detokenizer(tok, tok.encode("Hi", add_special_tokens=False), skip_special_tokens=False)
    assert type(detok).__name__ == "FastIncrementalDetokenizer"
    for token_id in tok.encode(text, add_special_tokens=False):
        detok.update([token_id], stop_terminated=False)
    assert detok.get_next_output_text(True, False) == text
    assert tok.chat_template and "think_mode=" in tok.chat_template
    # vLLM keeps only the chat-template kwargs the template reads.
    from vllm.renderers.hf import resolve_chat_template_kwargs

    kept = resolve_chat_template_kwargs(tok, tok.chat_template, {"enable_thinking": False, "bogus": 1})
    assert kept == {"enable_thinking": False}


def test_chat_template_system_user_tools(hf_tok):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "北京天气？"},
    ]
    text = hf_tok.apply_chat_template(messages, tools=TOOLS, tokenize=False, add_generation_prompt=True)
    tool_json = json.dumps(TOOLS[0], ensure_ascii=False)
    assert text == (
        "<s><|im_start|>system\n<system_setting>\nBe brief.\n</system_setting>\n\n"
        "<global_setting>\nthink_mode=True\n</global_setting>\n\n"
        f"<tool_list>\n[{tool_json}]\n</tool_list><|im_end|>\n\n"
        "<|im_start|>user\n北京天气？<|im_end|>\n\n"
        "<|im_start|>assistant\n<think>\n"
    )


def test_chat_template_tool_round_trip_and_history(hf_tok):
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "Weather in Paris and Rome?"}]},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "a", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
                {"id": "b", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}},
            ],
        },
        {"role": "tool", "tool_call_id": "a", "content": "sunny"},
        {"role": "tool", "tool_call_id": "b", "content": "rain"},
        {"role": "assistant", "content": "Paris: sunny. Rome: rain."},
        {"role": "user", "content": "Thanks"},
    ]
    text = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<s><|im_start|>system\n<global_setting>\nthink_mode=True\n</global_setting><|im_end|>\n\n"
        "<|im_start|>user\nWeather in Paris and Rome?<|im_end|>\n\n"
        "<|im_start|>assistant\n"
        '\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>\n'
        "<|im_end|>\n\n"
        "<|im_start|>user\n<tool_response>\nsunny\n</tool_response><|im_end|>\n\n"
        "<|im_start|>user\n<tool_response>\nrain\n</tool_response><|im_end|>\n\n"
        "<|im_start|>assistant\n<response>\nParis: sunny. Rome: rain.\n</response>\n<|im_end|>\n\n"
        "<|im_start|>user\nThanks<|im_end|>\n\n"
        "<|im_start|>assistant\n<think>\n"
    )


def test_chat_template_thinking_switch_and_generation_prompt(hf_tok):
    messages = [{"role": "user", "content": "Hi"}]
    off = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert off == (
        "<s><|im_start|>system\n<global_setting>\nthink_mode=False\n</global_setting><|im_end|>\n\n"
        "<|im_start|>user\nHi<|im_end|>\n\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )
    on = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=True)
    assert on.endswith("think_mode=True\n</global_setting><|im_end|>\n\n<|im_start|>user\nHi<|im_end|>\n\n"
                       "<|im_start|>assistant\n<think>\n")
    no_prompt = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    assert no_prompt.endswith("<|im_start|>user\nHi<|im_end|>\n\n")
    ids = hf_tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    assert ids[0] == hf_tok.bos_token_id and ids[-1] == hf_tok.convert_tokens_to_ids("\u010a")


def test_openai_content_parts_render_like_strings(hf_tok):
    """vLLM detects this template as taking OpenAI-style content parts and passes lists."""
    from vllm.renderers.hf import _detect_content_format

    from vllm_ernie45.testing.tiny.tokenizer import CHAT_TEMPLATE

    assert _detect_content_format(CHAT_TEMPLATE, default="string") == "openai"
    strings = [
        {"role": "system", "content": "Sys."},
        {"role": "user", "content": "Q?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "a", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}
        ]},
        {"role": "tool", "tool_call_id": "a", "content": "cold"},
    ]
    parts = [
        {**m, "content": [{"type": "text", "text": m["content"]}]} if isinstance(m["content"], str) else m
        for m in strings
    ]
    render = lambda msgs: hf_tok.apply_chat_template(msgs, tools=TOOLS, tokenize=False, add_generation_prompt=True)  # noqa: E731
    assert render(parts) == render(strings)
    assert "<system_setting>\nSys.\n</system_setting>" in render(parts)
    assert "<tool_response>\ncold\n</tool_response>" in render(parts)


THINKING_VALUES = [
    False, 0, 0.0, "false", "FALSE", " off ", "no", "0",  # off
    True, 1, -1, 0.5, "true", "yes", "on", "", "garbage", None, [], {}, "absent",  # on
]


@pytest.mark.parametrize("value", THINKING_VALUES, ids=[repr(v) for v in THINKING_VALUES])
def test_chat_template_follows_thinking_disabled(hf_tok, value):
    """The template closes the think block exactly when the parsers' one rule says thinking
    is off, for every JSON value a client can send (issue 17.2)."""
    from vllm_ernie45.parsers.thinking import thinking_disabled

    kwargs = {} if value == "absent" else {"enable_thinking": value}
    off = thinking_disabled(kwargs)
    text = hf_tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                      add_generation_prompt=True, **kwargs)
    assert text.endswith("<|im_start|>assistant\n<think>\n" + ("\n</think>\n\n" if off else ""))
    assert f"think_mode={not off}" in text
