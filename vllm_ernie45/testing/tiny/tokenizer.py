"""A tiny, deterministic, ERNIE-4.5-style Hugging Face fast tokenizer (vocabulary < 1024).

:func:`build_ernie_tokenizer` writes ``tokenizer.json``, ``tokenizer_config.json`` (which
carries the chat template) and ``special_tokens_map.json`` into a directory; both
``transformers.AutoTokenizer.from_pretrained`` and vLLM's tokenizer loading read it.

Vocabulary (every id < :data:`TINY_VOCAB_SIZE`, the ``vocab_size`` of the tiny models)::

    0 <unk> (also the pad token)   1 <s> (bos)   2 </s> (eos)     -- as in ERNIE 4.5 configs
    3 ... ERNIE 4.5's chat / reasoning / tool-call markers, each ONE added special token:
          <|begin_of_sentence|> <|end_of_sentence|> <|im_start|> <|im_end|> <think> </think>
          <response> </response> <tool_call> </tool_call> <tool_response> </tool_response>
    then the 256 byte symbols of a byte-level BPE, then merges learnt from a small embedded
    English / Chinese / JSON corpus by a deterministic trainer (ties broken by the pair's
    text), so any Unicode text round-trips exactly through encode/decode and two builds
    produce byte-identical files.

Chat template: the format of ``baidu/ERNIE-4.5-21B-A3B-Thinking`` (the text model with
reasoning and tool calls), reconstructed from public sources, since the model repository
itself is not reachable from here:

* system turn ``<|im_start|>system\\n<system_setting>\\n{system}\\n</system_setting>\\n\\n``
  ``<global_setting>\\nthink_mode=True\\n</global_setting>`` (+ tool list) ``<|im_end|>\\n\\n``,
  user turn ``<|im_start|>user\\n{content}<|im_end|>\\n\\n``, generation prompt
  ``<|im_start|>assistant\\n<think>\\n`` -- ms-swift's ``ERNIEThinkingTemplateMeta``
  (swift/llm/template/template/baidu.py), chatllm.cpp's ERNIE thinking encoder (which keys on
  ``think_mode=True`` in the HF chat template and starts with the bos token), and the
  excerpt of the HF template's tail quoted in Unsloth's tests;
* assistant turns ``<response>\\n{content}\\n</response>\\n``, each tool call
  ``\\n<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>\\n``, tool results
  ``<|im_start|>user\\n<tool_response>\\n{result}\\n</tool_response><|im_end|>\\n\\n`` and the
  tool list ``\\n\\n<tool_list>\\n[{tool}, {tool}]\\n</tool_list>`` appended to the system
  turn -- PaddlePaddle's ERNIE fine-tuning toolkit (its "ernie" template and
  ``ERNIEToolUtils``, adapted from LLaMA-Factory), which matches vLLM's and FastDeploy's
  ERNIE 4.5 parsers (``</think>``, optional ``<response>`` wrapper, ``<tool_call>`` JSON
  blocks).

One deliberate extension: the released Thinking template always thinks (FastDeploy
documents that it cannot be switched off) and appends the generation prompt whether or not
``add_generation_prompt`` is set. This template honours ``add_generation_prompt`` and the
``enable_thinking`` chat-template kwarg: thinking off (``False``, ``0``, ``"false"``, ... -- the
rule of :func:`vllm_ernie45.parsers.thinking.thinking_off_value`, spelled in Jinja) renders
``think_mode=False`` and closes the reasoning block in the prompt
(``<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n``), so the prompt itself says that
reasoning has ended -- which is what vLLM checks (``is_reasoning_end(prompt_ids)``) before it
streams, and what the ``ernie45`` reasoning parser relies on.
"""

from __future__ import annotations

import heapq
import json
from collections import Counter
from pathlib import Path

TINY_VOCAB_SIZE = 1024

UNK, BOS, EOS = "<unk>", "<s>", "</s>"
# ERNIE 4.5's markers, in id order after <unk>/<s>/</s>; each is one added special token.
ERNIE_SPECIAL_TOKENS = (
    "<|begin_of_sentence|>",
    "<|end_of_sentence|>",
    "<|im_start|>",
    "<|im_end|>",
    "<think>",
    "</think>",
    "<response>",
    "</response>",
    "<tool_call>",
    "</tool_call>",
    "<tool_response>",
    "</tool_response>",
)
SPECIAL_TOKENS = (UNK, BOS, EOS, *ERNIE_SPECIAL_TOKENS)

CHAT_TEMPLATE = """\
{#- ERNIE 4.5 Thinking chat format; sources in vllm_ernie45/testing/tiny/tokenizer.py. -#}
{#- Thinking is off for enable_thinking false, a number equal to 0, or the strings
    false/0/no/off (any case, spaces ignored); anything else, absent or null: on. This is
    vllm_ernie45.parsers.thinking.thinking_off_value, which the parsers use. -#}
{%- set thinking_value = enable_thinking if enable_thinking is defined else none -%}
{%- set enable_thinking = not (thinking_value is sameas false
        or (thinking_value is number and thinking_value == 0)
        or (thinking_value is string and (thinking_value | trim | lower) in ['false', '0', 'no', 'off'])) -%}
{%- macro text_of(content) -%}
    {%- if content is string -%}
        {{- content -}}
    {%- elif content is iterable and content is not mapping -%}
        {%- for part in content -%}
            {%- if part is string -%}
                {{- part -}}
            {%- elif part is mapping and part.get('type') == 'text' -%}
                {{- part.get('text') or '' -}}
            {%- endif -%}
        {%- endfor -%}
    {%- endif -%}
{%- endmacro -%}
{%- if messages and messages[0]['role'] == 'system' -%}
    {%- set system_message = text_of(messages[0]['content']) -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set system_message = '' -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{{- bos_token -}}
{{- '<|im_start|>system\\n' -}}
{%- if system_message -%}
    {{- '<system_setting>\\n' + system_message + '\\n</system_setting>\\n\\n' -}}
{%- endif -%}
{{- '<global_setting>\\nthink_mode=' + ('True' if enable_thinking else 'False') + '\\n</global_setting>' -}}
{%- if tools -%}
    {{- '\\n\\n<tool_list>\\n[' -}}
    {%- for tool in tools -%}
        {%- if not loop.first -%}
            {{- ', ' -}}
        {%- endif -%}
        {%- if tool is mapping and tool.get('type') == 'function' -%}
            {{- tool | tojson -}}
        {%- else -%}
            {{- {'type': 'function', 'function': tool} | tojson -}}
        {%- endif -%}
    {%- endfor -%}
    {{- ']\\n</tool_list>' -}}
{%- endif -%}
{{- '<|im_end|>\\n\\n' -}}
{%- for message in loop_messages -%}
    {%- if message['role'] == 'user' -%}
        {{- '<|im_start|>user\\n' + text_of(message['content']) + '<|im_end|>\\n\\n' -}}
    {%- elif message['role'] == 'assistant' -%}
        {{- '<|im_start|>assistant\\n' -}}
        {%- set content = text_of(message['content']) -%}
        {%- if content -%}
            {{- '<response>\\n' + content + '\\n</response>\\n' -}}
        {%- endif -%}
        {%- for tool_call in message.get('tool_calls') or [] -%}
            {%- set call = tool_call['function'] if tool_call['function'] is defined else tool_call -%}
            {{- '\\n<tool_call>\\n{"name": ' + (call['name'] | tojson) + ', "arguments": ' -}}
            {%- if call['arguments'] is string -%}
                {{- call['arguments'] -}}
            {%- else -%}
                {{- call['arguments'] | tojson -}}
            {%- endif -%}
            {{- '}\\n</tool_call>\\n' -}}
        {%- endfor -%}
        {{- '<|im_end|>\\n\\n' -}}
    {%- elif message['role'] == 'tool' -%}
        {{- '<|im_start|>user\\n<tool_response>\\n' + text_of(message['content']) + '\\n</tool_response><|im_end|>\\n\\n' -}}
    {%- elif message['role'] == 'system' -%}
        {{- '<|im_start|>system\\n' + text_of(message['content']) + '<|im_end|>\\n\\n' -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|im_start|>assistant\\n<think>\\n' -}}
    {%- if not enable_thinking -%}
        {{- '\\n</think>\\n\\n' -}}
    {%- endif -%}
{%- endif -%}
"""

# Training text: English, Chinese, JSON tool traffic and the chat framing, so common
# pieces get their own tokens. Any text still encodes (byte-level), just in more pieces.
_CORPUS = (
    """<|im_start|>system
<system_setting>
You are a helpful assistant.
</system_setting>

<global_setting>
think_mode=True
</global_setting>

<tool_list>
[{"type": "function", "function": {"name": "get_weather", "description": "Get the \
current weather in a given location", "parameters": {"type": "object", "properties": \
{"location": {"type": "string", "description": "City name, for example: Beijing"}, \
"unit": {"type": "string", "enum": ["c", "f"]}}, "required": ["location"]}}}]
</tool_list><|im_end|>

<|im_start|>user
What is the weather like in Beijing today?<|im_end|>

<|im_start|>assistant
<think>
The user asks about the weather in Beijing. I should call the get_weather tool with the
location set to Beijing and the unit set to Celsius.
</think>

<tool_call>
{"name": "get_weather", "arguments": {"location": "Beijing", "unit": "c"}}
</tool_call>
<|im_end|>

<|im_start|>user
<tool_response>
{"temperature": 23, "condition": "sunny", "humidity": 0.41}
</tool_response><|im_end|>

<|im_start|>assistant
<think>
The tool returned the current temperature. Now I can answer the question directly.
</think>

<response>
It is sunny in Beijing today, with a temperature of 23 degrees Celsius.
</response>
<|im_end|>
""",
    """The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins
with a single step. The model thinks first, then it answers, and sometimes it calls a
tool. Tool calls are written as JSON objects with a name and arguments. The arguments
are an object whose keys are the parameter names. When the answer is ready, the
assistant writes a response. Please search the web for the latest news about the
weather, the stock market, the time in Tokyo, and the population of Shanghai.
Let me check the calendar. I need to call two tools to handle these two questions
separately. First, I will look up the temperature; second, I will convert the unit.
This is a test. Hello, world! How are you doing today? I am fine, thank you.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 12 16 20 23 32 42 64 100 128 256 512 1024 2025 3.14
""",
    """你好！我是一个乐于助人的助手。今天北京的天气怎么样？北京今天晴，气温二十三度。
用户询问北京的天气，我需要调用天气工具来获取天气信息，参数城市为北京。
上海明天会下雨吗？请帮我查询一下上海和广州的天气，然后告诉我应该穿什么衣服。
我需要分别调用两个工具来处理这两个问题。首先查询温度，然后转换单位。
思考过程：先理解问题，再选择工具，最后给出回答。这是一个测试。谢谢你的帮助！
中国的首都是北京。人工智能模型可以思考、回答问题，也可以调用工具。
""",
    """{"name": "get_current_temperature", "arguments": {"location": "Guangzhou", "unit": "c"}}
{"name": "search", "arguments": {"query": "latest news", "top_k": 5, "safe": true}}
{"name": "send_email", "arguments": {"to": "alice@example.com", "subject": "Hello", \
"body": "Line one\\nLine two with a \\"quote\\" and a {brace}."}}
{"name": "calculator", "arguments": {"expression": "(2 + 3) * 4", "precision": 2}}
{"name": "get_weather", "arguments": {"city": "北京", "date": "2025-06-30"}}
{"name": "translate", "arguments": {"text": "你好，世界", "target": "en", "source": null}}
{"name": "lookup", "arguments": "{\\"id\\": 42, \\"tags\\": [\\"a\\", \\"b\\"]}"}
[{"type": "function", "function": {"name": "search", "parameters": {"type": "object", \
"properties": {"query": {"type": "string"}, "top_k": {"type": "integer"}}}}}]
{"temperature": 18.5, "condition": "cloudy", "wind": {"speed": 12, "direction": "NE"}}
{"results": [{"title": "ERNIE 4.5", "url": "https://example.com/ernie"}], "count": 1}
""",
)


def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins of byte-level BPE (GPT-2's table), in byte order."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    table: dict[int, str] = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


def _pre_tokenizer():
    from tokenizers import pre_tokenizers

    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _train_merges(num_merges: int) -> list[tuple[str, str]]:
    """Deterministic BPE: repeatedly merge the most frequent adjacent pair (ties: the
    smallest pair as text), counting pairs incrementally over the corpus's words. Pairs
    seen once are merged too (after all the frequent ones): the corpus is small."""
    pre = _pre_tokenizer()
    word_counts: Counter[str] = Counter()
    for text in _CORPUS:
        for piece, _ in pre.pre_tokenize_str(text):
            word_counts[piece] += 1
    words = sorted(word_counts)
    freqs = [word_counts[w] for w in words]
    seqs = [list(w) for w in words]

    pair_counts: Counter[tuple[str, str]] = Counter()
    where: dict[tuple[str, str], set[int]] = {}
    for i, seq in enumerate(seqs):
        for pair in zip(seq, seq[1:]):
            pair_counts[pair] += freqs[i]
            where.setdefault(pair, set()).add(i)
    heap = [(-count, pair) for pair, count in pair_counts.items()]
    heapq.heapify(heap)

    merges: list[tuple[str, str]] = []
    while len(merges) < num_merges and heap:
        neg, pair = heapq.heappop(heap)
        if pair_counts.get(pair, 0) != -neg:
            continue  # stale heap entry
        merges.append(pair)
        merged = pair[0] + pair[1]
        touched: Counter[tuple[str, str]] = Counter()
        for i in sorted(where.get(pair, ())):
            seq, freq = seqs[i], freqs[i]
            for p in zip(seq, seq[1:]):
                pair_counts[p] -= freq
                touched[p] += 0
            out: list[str] = []
            j = 0
            while j < len(seq):
                if j + 1 < len(seq) and seq[j] == pair[0] and seq[j + 1] == pair[1]:
                    out.append(merged)
                    j += 2
                else:
                    out.append(seq[j])
                    j += 1
            seqs[i] = out
            for p in zip(out, out[1:]):
                pair_counts[p] += freq
                where.setdefault(p, set()).add(i)
                touched[p] += 0
        for p in touched:
            if pair_counts[p] > 0:
                heapq.heappush(heap, (-pair_counts[p], p))
            else:
                pair_counts.pop(p, None)
    return merges


def _build_tokenizer_object():
    from tokenizers import AddedToken, Tokenizer, decoders, models

    vocab: dict[str, int] = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for sym in _byte_symbols():
        vocab.setdefault(sym, len(vocab))
    budget = TINY_VOCAB_SIZE - len(vocab)
    merges: list[tuple[str, str]] = []
    # Several merge sequences can spell the same token; train until the budget is used.
    for candidate in _train_merges(budget * 2):
        merged = candidate[0] + candidate[1]
        if merged not in vocab:
            if len(vocab) >= TINY_VOCAB_SIZE:
                break
            vocab[merged] = len(vocab)
        merges.append(candidate)

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = _pre_tokenizer()
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False, lstrip=False, rstrip=False) for t in SPECIAL_TOKENS]
    )
    return tok


def build_ernie_tokenizer(out_dir: str | Path) -> None:
    """Write the tiny ERNIE-style tokenizer files into ``out_dir`` (created if missing)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = _build_tokenizer_object()
    assert tok.get_vocab_size(with_added_tokens=True) <= TINY_VOCAB_SIZE
    (out / "tokenizer.json").write_text(tok.to_str(pretty=True) + "\n", encoding="utf-8")

    special_map = {
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": UNK,
        "pad_token": UNK,
        "cls_token": "<|begin_of_sentence|>",
        "sep_token": "<|end_of_sentence|>",
        "additional_special_tokens": list(ERNIE_SPECIAL_TOKENS),
    }
    added = {
        str(i): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for i, t in enumerate(SPECIAL_TOKENS)
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": added,
        **special_map,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 131072,
        "padding_side": "left",
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(
        json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    (out / "special_tokens_map.json").write_text(
        json.dumps(special_map, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
