"""Offline batch jobs that survive: streaming, resumable, bad input never stops them.

    vllm-ernie45-batch --model baidu/ERNIE-4.5-21B-A3B-PT -i requests.jsonl -o results.jsonl
    python -m vllm_ernie45.batch ...            (the same)

Input, one JSON object a line (``--format auto`` tells them apart per file by the first line):

* simple: ``{"id": ..., "prompt": "..."}`` or ``{"id": ..., "messages": [...]}`` (optional
  ``max_tokens``, ``temperature``, ``top_p``, ``top_k``, ``seed``, ``stop``,
  ``enable_thinking``, ``chat_template_kwargs``); answered with ``{"id", "prompt",
  "completion", "num_prompt_tokens", "num_completion_tokens", "finish_reason"}``.
* OpenAI batch: ``{"custom_id", "method": "POST", "url": "/v1/chat/completions" |
  "/v1/completions", "body": {...}}``; answered in the OpenAI batch output format
  (``id``, ``custom_id``, ``response: {status_code, request_id, body}``, ``error``). The body
  is validated by vLLM's own request classes and turned into sampling parameters by them, as
  ``vllm serve`` does; chat results go through the tool-call parser (default ``ernie45``,
  for requests with ``tools``) and the reasoning parser (``--reasoning-parser ernie45``),
  applied as ``vllm serve`` applies them.

How it runs: the input is read lazily; at most ``--window`` requests are prepared and inside
vLLM's engine at a time (``LLM.llm_engine.add_request`` / ``step()``, the loop
``LLM.generate`` runs itself), topped up after every engine step, so the engine batches
continuously and memory does not grow with the file. Each result is one JSON line, written
and flushed when its request finishes.

Resume: run the same command again. Ids already in the output file are skipped; a torn last
line (the job was killed while writing it) is cut off and its request done again; the rest is
appended. ``--sort`` rewrites the output in input order at the end.

Bad input (not JSON, no prompt, a prompt that leaves no room under ``max_model_len``, a body
vLLM refuses, a duplicate id) goes to the errors file (``<output>.errors.jsonl`` by default,
rewritten every run) with its line number and reason; the job goes on. Exit status: 0 all
done, 1 some lines failed, 2 the job could not run (unreadable input, a corrupt output file).

Nothing here is imported by vLLM's plugin entry point (``vllm_ernie45.register``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

SIMPLE, OPENAI = "simple", "openai"
CHAT_URL, COMPLETIONS_URL = "/v1/chat/completions", "/v1/completions"
EXIT_OK, EXIT_FAILED_LINES, EXIT_FATAL = 0, 1, 2
# Keys of the simple format passed to SamplingParams as they are.
SIMPLE_SAMPLING_KEYS = (
    "temperature", "top_p", "top_k", "min_p", "seed", "stop", "repetition_penalty",
    "presence_penalty", "frequency_penalty", "min_tokens", "ignore_eos",
)  # fmt: skip


class BadLine(Exception):
    """An input line the job cannot run; goes to the errors file, the job goes on."""

    def __init__(self, reason: str, key: str | None = None, status: int = 400) -> None:
        super().__init__(reason)
        self.reason, self.key, self.status = reason, key, status


class Fatal(Exception):
    """The job cannot run at all (exit status 2)."""


@dataclass
class Item:
    """One prepared request."""

    line: int
    key: str  # the id / custom_id, as written in the output
    fmt: str
    url: str | None
    prompt_text: str
    prompt_ids: list[int]
    params: Any  # vllm.SamplingParams
    request: Any = None  # vLLM's ChatCompletionRequest / CompletionRequest (OpenAI format)
    parsers: tuple[Any, Any] = (None, None)  # (reasoning, tool) parser instances for this request


@dataclass
class Summary:
    done: int = 0
    skipped: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    seconds: float = 0.0
    dropped_torn_line: bool = False
    errors_file: str = ""
    output_file: str = ""

    def line(self) -> str:
        s = max(self.seconds, 1e-9)
        return (
            f"vllm-ernie45-batch: done {self.done}, skipped {self.skipped} (already in the output), "
            f"failed {self.failed}" + (f" (see {self.errors_file})" if self.failed else "")
            + f"; {self.prompt_tokens} prompt + {self.generated_tokens} generated tokens in {self.seconds:.1f} s: "
            f"{self.generated_tokens / s:.1f} generated tok/s, "
            f"{(self.prompt_tokens + self.generated_tokens) / s:.1f} tok/s in+out"
        )

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


# ----------------------------------------------------------------------------- files


def output_key(record: dict, fmt: str) -> str | None:
    """The resume key of an output line: ``custom_id`` (OpenAI), or the JSON text of ``id``."""
    if fmt == OPENAI:
        value = record.get("custom_id")
        return value if isinstance(value, str) else None
    return simple_key(record["id"]) if "id" in record else None


def simple_key(value: Any) -> str:
    """Simple-format ids are any JSON value, compared as written: 1 and "1" are two ids."""
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


def scan_output(path: Path, fmt: str, repair: bool = True) -> tuple[set[str], bool]:
    """The ids already in ``path`` and whether it ends in a torn line (cut off if ``repair``).

    Results are written as whole lines, so only the last line can be incomplete (the job was
    killed while writing it): it is cut off here and its request runs again. An unreadable line
    before the last is not ours to repair: :class:`Fatal`.
    """
    done: set[str] = set()
    if not path.exists():
        return done, False
    torn_at = None
    with path.open("rb") as fh:
        offset = 0
        for raw in fh:
            key = None
            if raw.endswith(b"\n"):
                try:
                    record = json.loads(raw)
                    key = output_key(record, fmt) if isinstance(record, dict) else None
                except ValueError:
                    key = None
            if key is None:
                if fh.read(1):
                    raise Fatal(f"{path}: line at byte {offset} is not a result line of the "
                                f"{fmt} format and is not the last line; not resuming into it")
                torn_at = offset
                break
            done.add(key)
            offset += len(raw)
    if torn_at is not None and repair:
        with path.open("r+b") as fh:
            fh.truncate(torn_at)
    return done, torn_at is not None


def sort_output(path: Path, order: dict[str, int], fmt: str) -> None:
    """Rewrite ``path`` in input order (ids not in this input last), holding offsets only."""
    index: list[tuple[int, int, int]] = []
    with path.open("rb") as fh:
        offset = 0
        for raw in fh:
            key = output_key(json.loads(raw), fmt)
            index.append((order.get(key, sys.maxsize), offset, len(raw)))
            offset += len(raw)
    index.sort()
    tmp = path.with_name(path.name + ".sorting")
    with path.open("rb") as src, tmp.open("wb") as dst:
        for _, offset, length in index:
            src.seek(offset)
            dst.write(src.read(length))
        dst.flush()
        os.fsync(dst.fileno())
    tmp.replace(path)


def iter_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    with path.open("rb") as fh:
        for number, raw in enumerate(fh, 1):
            yield number, raw


def count_lines(path: Path) -> int:
    count = 0
    with path.open("rb") as fh:
        for raw in fh:
            count += bool(raw.strip())
    return count


def detect_format(path: Path) -> str:
    for _, raw in iter_lines(path):
        if not raw.strip():
            continue
        try:
            first = json.loads(raw)
        except ValueError:
            continue
        if isinstance(first, dict):
            return OPENAI if "custom_id" in first or "body" in first else SIMPLE
    return SIMPLE


# ----------------------------------------------------------------------------- requests


def _vllm_request_classes() -> tuple[Any, Any]:
    """vLLM's ChatCompletionRequest (through compat) and CompletionRequest
    (``vllm.entrypoints.openai.completion.protocol`` in 0.26, 0.32 and 0.34 alike)."""
    from vllm_ernie45 import compat

    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    return compat.chat_completion_request_cls(), CompletionRequest


def _text_content(content: Any, where: str) -> Any:
    """A message's content as the chat template takes it: text parts joined with newlines
    (as vLLM does for string-format templates); other parts are not supported here."""
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            else:
                raise BadLine(f"{where}: only text content parts are supported")
        return "\n".join(texts)
    raise BadLine(f"{where}: content must be a string or a list of text parts")


def _template_messages(messages: Any) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise BadLine("'messages' must be a non-empty list")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise BadLine(f"messages[{i}] must be an object with a 'role'")
        message = dict(message)
        message["content"] = _text_content(message.get("content"), f"messages[{i}]")
        calls = message.get("tool_calls")
        if isinstance(calls, list):  # templates take the arguments as an object, as vLLM hands them
            fixed = []
            for call in calls:
                call = json.loads(json.dumps(call))
                fn = call.get("function") if isinstance(call, dict) else None
                if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
                    try:
                        fn["arguments"] = json.loads(fn["arguments"])
                    except ValueError:
                        pass
                fixed.append(call)
            message["tool_calls"] = fixed
        out.append(message)
    return out


class Preparer:
    """Turns input lines into engine requests: validation, chat rendering, tokenization,
    sampling parameters -- everything that can refuse a line, before the engine sees it."""

    def __init__(self, llm: Any, args: argparse.Namespace, fmt: str) -> None:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        self.SamplingParams, self.final_only = SamplingParams, RequestOutputKind.FINAL_ONLY
        self.fmt = fmt
        self.tokenizer = llm.get_tokenizer()
        model_config = llm.llm_engine.model_config
        self.max_model_len = model_config.max_model_len
        self.defaults = model_config.get_diff_sampling_param() or {}  # generation_config.json
        self.args = args
        self.chat_cls = self.completion_cls = None
        self.tool_parser_cls = self.reasoning_parser_cls = None
        if fmt == OPENAI:
            self.chat_cls, self.completion_cls = _vllm_request_classes()
            self._load_parsers(args)

    def _load_parsers(self, args: argparse.Namespace) -> None:
        from vllm_ernie45 import compat

        if args.tool_call_parser and args.tool_call_parser != "none":
            _, manager = compat.tool_parser_base()
            self.tool_parser_cls = manager.get_tool_parser(args.tool_call_parser)
        if args.reasoning_parser and args.reasoning_parser != "none":
            _, manager = compat.reasoning_parser_base()
            self.reasoning_parser_cls = manager.get_reasoning_parser(args.reasoning_parser)

    # -- shared ---------------------------------------------------------------------------

    def _tokens(self, text: str, add_special_tokens: bool) -> list[int]:
        ids = self.tokenizer.encode(text, add_special_tokens=add_special_tokens)
        self._check_length(len(ids))
        return ids

    def _check_length(self, n: int) -> None:
        if n == 0:
            raise BadLine("the prompt is empty")
        if n >= self.max_model_len:
            raise BadLine(
                f"the prompt has {n} tokens; max_model_len is {self.max_model_len} "
                "(no room for a completion)"
            )

    def _render_chat(self, messages: Any, tools: list | None, kwargs: dict, *,
                     add_generation_prompt: bool = True, continue_final_message: bool = False) -> str:  # fmt: skip
        template_kwargs = dict(kwargs)
        for key in ("tools", "tokenize", "add_generation_prompt", "continue_final_message", "conversation"):
            template_kwargs.pop(key, None)
        try:
            return self.tokenizer.apply_chat_template(
                _template_messages(messages), tools=tools, tokenize=False,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message, **template_kwargs,
            )  # fmt: skip
        except BadLine:
            raise
        except Exception as err:  # a template that raises on this conversation
            raise BadLine(f"the chat template failed on these messages: {type(err).__name__}: {err}") from err

    def _max_tokens(self, requested: int | None, prompt_len: int) -> int:
        """As vLLM's server: the request's, else generation_config's, never past max_model_len."""
        room = self.max_model_len - prompt_len
        candidates = [room, requested, self.defaults.get("max_tokens")]
        return min(c for c in candidates if c is not None)

    # -- formats ----------------------------------------------------------------------------

    def prepare(self, line: int, raw: bytes) -> Item:
        try:
            obj = json.loads(raw)
        except UnicodeDecodeError:
            raise BadLine("not UTF-8 text") from None
        except ValueError as err:
            raise BadLine(f"not valid JSON ({getattr(err, 'msg', err)})") from None
        if not isinstance(obj, dict):
            raise BadLine(f"a line must be a JSON object, not {type(obj).__name__}")
        return self._openai(line, obj) if self.fmt == OPENAI else self._simple(line, obj)

    def _simple(self, line: int, obj: dict) -> Item:
        key = simple_key(obj.get("id", f"line-{line}"))
        try:
            has_prompt, has_messages = obj.get("prompt") is not None, obj.get("messages") is not None
            if has_prompt == has_messages:
                raise BadLine("each line needs exactly one of 'prompt' or 'messages'")
            if has_messages:
                kwargs = dict(obj.get("chat_template_kwargs") or {})
                if "enable_thinking" in obj:
                    kwargs["enable_thinking"] = obj["enable_thinking"]
                text = self._render_chat(obj["messages"], obj.get("tools"), kwargs)
                ids = self._tokens(text, add_special_tokens=False)
            else:
                text = obj["prompt"]
                if not isinstance(text, str):
                    raise BadLine("'prompt' must be a string")
                ids = self._tokens(text, add_special_tokens=True)
            sampling = {"temperature": self.args.temperature, "seed": 0}
            sampling.update({k: obj[k] for k in SIMPLE_SAMPLING_KEYS if k in obj})
            max_tokens = self._max_tokens(obj.get("max_tokens", self.args.max_tokens), len(ids))
            try:
                params = self.SamplingParams(max_tokens=max_tokens, **sampling)
            except (TypeError, ValueError) as err:
                raise BadLine(f"sampling parameters refused: {err}") from None
        except BadLine as err:
            err.key = key
            raise
        params.output_kind = self.final_only
        return Item(line, key, SIMPLE, None, text, ids, params)

    def _openai(self, line: int, obj: dict) -> Item:
        key = obj.get("custom_id")
        if not isinstance(key, str) or not key:
            raise BadLine("'custom_id' (a non-empty string) is required")
        try:
            if obj.get("method", "POST") != "POST":
                raise BadLine(f"method {obj.get('method')!r}: only POST is supported")
            url = obj.get("url")
            if url not in (CHAT_URL, COMPLETIONS_URL):
                raise BadLine(f"url {url!r}: supported are {CHAT_URL} and {COMPLETIONS_URL}", status=404)
            body = obj.get("body")
            if not isinstance(body, dict):
                raise BadLine("'body' must be an object")
            if body.get("stream"):
                raise BadLine("'stream' is not supported in a batch")
            cls = self.chat_cls if url == CHAT_URL else self.completion_cls
            try:
                request = cls.model_validate(body)
            except Exception as err:  # pydantic's ValidationError, as the server answers 400
                raise BadLine(f"invalid body: {_one_line(err)}") from None
            if getattr(request, "use_beam_search", False):
                raise BadLine("use_beam_search is not supported in a batch")
            if getattr(request, "prompt_logprobs", None):
                raise BadLine("prompt_logprobs are not supported in a batch")
            if url == COMPLETIONS_URL and request.logprobs is not None and getattr(request, "echo", False):
                raise BadLine("logprobs with echo (the prompt's logprobs) are not supported in a batch")
            return (self._chat if url == CHAT_URL else self._completion)(line, key, url, request)
        except BadLine as err:
            err.key = key
            raise

    def _chat(self, line: int, key: str, url: str, request: Any) -> Item:
        choice = request.tool_choice
        if choice is not None and choice not in ("auto", "none"):
            raise BadLine(f"tool_choice {_one_line(choice)}: only 'auto' and 'none' are supported in a batch")
        if request.chat_template:
            raise BadLine("a per-request chat_template is not accepted (vllm serve refuses it by default)")
        kwargs = dict(request.chat_template_kwargs or {})
        tools = [tool.model_dump() for tool in request.tools] if request.tools else None
        reasoning = tool = None
        if self.reasoning_parser_cls is not None:
            reasoning = _make(self.reasoning_parser_cls, self.tokenizer, chat_template_kwargs=kwargs)
        if self.tool_parser_cls is not None:
            tool = _make(self.tool_parser_cls, self.tokenizer, tools=request.tools)
        # As vLLM's renderer: the parsers adjust the request (ernie45: keep its special tokens in
        # the text) when a reasoning parser is on or tool_choice is not "none" (the request class
        # makes it "auto" when tools are given, "none" without).
        if reasoning is not None or (choice or "none") != "none":
            for parser in (reasoning, tool):
                if parser is not None:
                    request = parser.adjust_request(request)
        if not request.tools or choice == "none":
            tool = None  # tool calls are parsed for tools with tool_choice auto only
        raw_messages = [m if isinstance(m, dict) else dict(m) for m in request.messages]
        text = self._render_chat(
            raw_messages, tools, kwargs,
            add_generation_prompt=request.add_generation_prompt,
            continue_final_message=request.continue_final_message,
        )  # fmt: skip
        ids = self._tokens(text, add_special_tokens=bool(request.add_special_tokens))
        requested = request.max_completion_tokens
        if requested is None:
            with warnings.catch_warnings():  # chat's max_tokens is deprecated in favour of the above
                warnings.simplefilter("ignore")
                requested = request.max_tokens
        params = self._request_params(request, requested, len(ids))
        return Item(line, key, OPENAI, url, text, ids, params, request, (reasoning, tool))

    def _completion(self, line: int, key: str, url: str, request: Any) -> Item:
        if request.suffix:
            raise BadLine("'suffix' is not supported")
        prompt = request.prompt
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        if isinstance(prompt, str):
            text = prompt
            ids = self._tokens(text, add_special_tokens=bool(request.add_special_tokens))
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            ids = list(prompt)
            self._check_length(len(ids))
            text = self.tokenizer.decode(ids)
        else:
            raise BadLine("'prompt' must be one string or one list of token ids (one prompt per request)")
        params = self._request_params(request, request.max_tokens, len(ids))
        return Item(line, key, OPENAI, url, text, ids, params, request)

    def _request_params(self, request: Any, requested: int | None, prompt_len: int) -> Any:
        try:
            params = request.to_sampling_params(self._max_tokens(requested, prompt_len), self.defaults)
        except Exception as err:
            raise BadLine(f"sampling parameters refused: {_one_line(err)}") from None
        params.output_kind = self.final_only
        return params


def _make(cls: Any, tokenizer: Any, **kwargs: Any) -> Any:
    """A parser instance; older parser signatures take the tokenizer only."""
    try:
        return cls(tokenizer, **kwargs)
    except TypeError:
        return cls(tokenizer)


def _one_line(obj: Any) -> str:
    return " ".join(str(obj).split())[:500]


# ----------------------------------------------------------------------------- results


def _usage(result: Any) -> tuple[int, int]:
    return len(result.prompt_token_ids or []), sum(len(o.token_ids) for o in result.outputs)


def simple_record(item: Item, result: Any) -> dict:
    completion = result.outputs[0]
    prompt_tokens, generated = _usage(result)
    return {
        "id": json.loads(item.key),
        "prompt": item.prompt_text,
        "completion": completion.text,
        "num_prompt_tokens": prompt_tokens,
        "num_completion_tokens": generated,
        "finish_reason": completion.finish_reason,
    }


def chat_choice(item: Item, output: Any) -> dict:
    """One choice as ``vllm serve`` answers a non-streamed chat completion: the reasoning
    parser splits reasoning from content, then (tools given, tool_choice auto) the tool parser
    takes the calls out of the content; finish_reason ``tool_calls`` when it found any."""
    request = item.request
    reasoning_parser, tool_parser = item.parsers
    if output.index > 0:  # parsers are stateful: a fresh pair for each further choice
        kwargs = dict(request.chat_template_kwargs or {})
        if reasoning_parser is not None:
            reasoning_parser = _make(type(reasoning_parser), item_tokenizer(reasoning_parser), chat_template_kwargs=kwargs)
        if tool_parser is not None:
            tool_parser = _make(type(tool_parser), item_tokenizer(tool_parser), tools=request.tools)
    text = output.text
    if reasoning_parser is not None:
        reasoning, content = reasoning_parser.extract_reasoning(text, request)
    else:
        reasoning, content = None, text
    if not request.include_reasoning:
        reasoning = None
    tool_calls: list[dict] = []
    if tool_parser is not None:
        info = tool_parser.extract_tool_calls(content if content is not None else "", request)
        if info is not None and info.tools_called:
            tool_calls = [call.model_dump() for call in info.tool_calls]
            content = info.content or None
    message: dict[str, Any] = {"role": "assistant", "content": content, "reasoning": reasoning}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return {
        "index": output.index,
        "message": message,
        "logprobs": chat_logprobs(output, request.top_logprobs or 0) if request.logprobs else None,
        "finish_reason": "tool_calls" if tool_calls else (output.finish_reason or "stop"),
        "stop_reason": output.stop_reason,
    }


# vLLM's server writes -inf logprobs as this (JSON has no infinity).
_FLOOR = -9999.0


def _ranked(position: dict, top: int) -> list[tuple[str, float]]:
    """The ``top`` most likely (token text, logprob) of one position's vLLM logprobs."""
    entries = sorted(position.items(), key=lambda kv: (kv[1].rank if kv[1].rank is not None else 1 << 30, -kv[1].logprob))
    return [(_token_text(token_id, lp), max(lp.logprob, _FLOOR)) for token_id, lp in entries[:top]]


def _token_text(token_id: int, logprob: Any) -> str:
    text = getattr(logprob, "decoded_token", None)
    return text if text is not None else f"token_id:{token_id}"


def _generated_logprobs(output: Any, top: int) -> Iterator[tuple[str, float, list[tuple[str, float]]]]:
    """Per generated token: its text, its logprob (-inf as the floor) and the ``top`` most likely."""
    for token_id, position in zip(output.token_ids, output.logprobs or []):
        chosen = position[token_id]
        yield _token_text(token_id, chosen), max(chosen.logprob, _FLOOR), _ranked(position, top)


def chat_logprobs(output: Any, top: int) -> dict:
    """A chat choice's ``logprobs`` as the OpenAI API (and ``vllm serve``) give it: per
    generated token its text, logprob and UTF-8 bytes, and the ``top`` most likely."""
    content = [
        {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8")),
         "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(t.encode("utf-8"))} for t, lp in ranked]}
        for text, logprob, ranked in _generated_logprobs(output, top)
    ]  # fmt: skip
    return {"content": content}


def completion_logprobs(output: Any, top: int, offset: int = 0) -> dict:
    """A completion choice's ``logprobs`` in the legacy completions format: tokens, their
    logprobs, the ``top`` most likely per position (token text -> logprob) and each token's
    character offset in the returned text (``offset``: where the completion starts)."""
    tokens, token_logprobs, tops, offsets = [], [], [], []
    for text, logprob, ranked in _generated_logprobs(output, top):
        offsets.append(offset)
        offset += len(text)
        tokens.append(text)
        token_logprobs.append(logprob)
        tops.append(dict(ranked))
    return {"text_offset": offsets, "token_logprobs": token_logprobs, "tokens": tokens, "top_logprobs": tops}


def item_tokenizer(parser: Any) -> Any:
    return getattr(parser, "model_tokenizer", None)


def openai_record(item: Item, result: Any, model_name: str) -> dict:
    prompt_tokens, generated = _usage(result)
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": generated,
             "total_tokens": prompt_tokens + generated}  # fmt: skip
    if item.url == CHAT_URL:
        body = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model_name,
            "choices": [chat_choice(item, o) for o in sorted(result.outputs, key=lambda o: o.index)],
            "usage": usage,
        }
    else:
        echo = item.prompt_text if getattr(item.request, "echo", False) else ""
        body = {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": model_name,
            "choices": [
                {"index": o.index, "text": echo + o.text,
                 "logprobs": None if item.request.logprobs is None else completion_logprobs(o, item.request.logprobs, len(echo)),
                 "finish_reason": o.finish_reason or "stop", "stop_reason": o.stop_reason}  # fmt: skip
                for o in sorted(result.outputs, key=lambda o: o.index)
            ],
            "usage": usage,
        }
    return {
        "id": f"batch_req_{uuid.uuid4().hex}",
        "custom_id": item.key,
        "response": {"status_code": 200, "request_id": f"vllm-batch-{uuid.uuid4().hex}", "body": body},
        "error": None,
    }


def error_record(fmt: str, line: int, err: BadLine) -> dict:
    record: dict[str, Any] = {"line": line, "reason": err.reason}
    if fmt == OPENAI:
        record.update(
            id=f"batch_req_{uuid.uuid4().hex}",
            custom_id=err.key,
            response={
                "status_code": err.status,
                "request_id": f"vllm-batch-{uuid.uuid4().hex}",
                "body": {"error": {"message": err.reason, "type": "invalid_request_error", "code": err.status}},
            },
            error=None,
        )
    else:
        record["id"] = json.loads(err.key) if err.key else None
    return record


# ----------------------------------------------------------------------------- runner


def default_window(llm: Any) -> int:
    """4 x the scheduler's max_num_seqs: the engine always has the next requests queued."""
    scheduler = getattr(getattr(llm.llm_engine, "vllm_config", None), "scheduler_config", None)
    return max(4 * int(getattr(scheduler, "max_num_seqs", 256) or 256), 64)


def run_batch(
    llm: Any,
    input_path: str | Path,
    output_path: str | Path,
    args: argparse.Namespace | None = None,
    **overrides: Any,
) -> Summary:
    """Run (or resume) one batch job on ``llm`` (a ``vllm.LLM``); returns its summary.
    ``args``: the parsed command line (defaults of :func:`build_parser` otherwise), with
    ``overrides`` on top. The engine stays up (the caller closes it)."""
    if args is None:
        args = build_parser().parse_args(["--model", "-", "-i", str(input_path), "-o", str(output_path)])
    for name, value in overrides.items():
        setattr(args, name, value)
    input_path, output_path = Path(input_path), Path(output_path)
    if not input_path.is_file():
        raise Fatal(f"{input_path}: no such input file")
    fmt = args.format if args.format != "auto" else detect_format(input_path)
    errors_path = Path(args.errors) if args.errors else output_path.with_name(output_path.name + ".errors.jsonl")
    output_path.parent.mkdir(parents=True, exist_ok=True)

    done_before, torn = scan_output(output_path, fmt)
    summary = Summary(dropped_torn_line=torn, errors_file=str(errors_path), output_file=str(output_path))
    if torn:
        print(f"vllm-ernie45-batch: {output_path}: dropped a torn last line; its request runs again",
              file=sys.stderr)  # fmt: skip
    prep = Preparer(llm, args, fmt)
    engine = llm.llm_engine
    window = args.window or default_window(llm)
    model_name = args.served_model_name or args.model

    total = max(count_lines(input_path) - len(done_before), 0)
    pbar = _progress(total, args.progress)
    order: dict[str, int] = {}  # id -> input line: duplicates, and the order of --sort
    pending: dict[str, Item] = {}
    lines = iter_lines(input_path)
    exhausted = False
    next_id = 0
    start = time.monotonic()

    with output_path.open("a", encoding="utf-8") as out, errors_path.open("w", encoding="utf-8") as errs:

        def fail(line: int, err: BadLine) -> None:
            summary.failed += 1
            errs.write(json.dumps(error_record(fmt, line, err), ensure_ascii=False) + "\n")
            errs.flush()
            pbar.update(1)

        try:
            while True:
                while not exhausted and len(pending) < window:
                    try:
                        line, raw = next(lines)
                    except StopIteration:
                        exhausted = True
                        break
                    if not raw.strip():
                        continue
                    try:
                        item = prep.prepare(line, raw)
                    except BadLine as err:
                        if err.key is not None and err.key in done_before:
                            summary.skipped += 1  # done in an earlier run, whatever it says now
                            order.setdefault(err.key, line)
                            continue
                        fail(line, err)
                        continue
                    if item.key in order:
                        fail(line, BadLine(f"duplicate id {item.key} (first on line {order[item.key]})", item.key))
                        continue
                    order[item.key] = line
                    if item.key in done_before:
                        summary.skipped += 1
                        continue
                    request_id = f"batch-{next_id}"
                    next_id += 1
                    try:
                        engine.add_request(request_id, {"prompt_token_ids": item.prompt_ids}, item.params)
                    except (ValueError, TypeError) as err:  # vLLM's own input checks
                        fail(line, BadLine(f"vLLM refused the request: {_one_line(err)}", item.key))
                        continue
                    pending[request_id] = item
                if not pending:
                    if exhausted:
                        break
                    continue
                for result in engine.step():
                    if not result.finished:
                        continue
                    item = pending.pop(result.request_id, None)
                    if item is None:  # an engine that suffixes ids in its outputs
                        item = pending.pop(result.request_id.rsplit("-", 1)[0])
                    try:
                        record = (simple_record(item, result) if fmt == SIMPLE
                                  else openai_record(item, result, model_name))  # fmt: skip
                    except Exception as err:  # a parser that raises on this output
                        fail(item.line, BadLine(f"answering failed: {type(err).__name__}: {_one_line(err)}",
                                                item.key, status=500))  # fmt: skip
                        continue
                    out.write(json.dumps(record, ensure_ascii=False) + "\n")
                    out.flush()
                    p, g = _usage(result)
                    summary.done += 1
                    summary.prompt_tokens += p
                    summary.generated_tokens += g
                    pbar.update(1)
                    elapsed = time.monotonic() - start
                    pbar.set_postfix_str(f"{summary.generated_tokens / max(elapsed, 1e-9):.1f} gen tok/s", refresh=False)
            out.flush()
            os.fsync(out.fileno())
        finally:
            summary.seconds = time.monotonic() - start
            pbar.close()
    if args.sort:
        sort_output(output_path, order, fmt)
    return summary


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, *a: Any, **k: Any) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, enabled: bool) -> Any:
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc="batch", unit="req", dynamic_ncols=True, file=sys.stderr)


# ----------------------------------------------------------------------------- command line


def _engine_arg(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"--engine-arg {text!r}: expected KEY=VALUE")
    try:
        return key.replace("-", "_"), json.loads(value)
    except ValueError:
        return key.replace("-", "_"), value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vllm-ernie45-batch",
        description="Streaming, resumable offline batch generation with vLLM (OpenAI batch or simple JSONL).",
    )
    p.add_argument("--model", required=True, help="checkpoint directory or hub id")
    p.add_argument("-i", "--input", required=True, help="input JSONL")
    p.add_argument("-o", "--output", required=True, help="output JSONL (appended to: resume)")
    p.add_argument("--errors", help="errors JSONL (default: <output>.errors.jsonl; rewritten each run)")
    p.add_argument("--format", choices=("auto", SIMPLE, OPENAI), default="auto")
    p.add_argument("--sort", action="store_true", help="rewrite the output in input order at the end")
    p.add_argument("--window", type=int, default=0,
                   help="requests prepared and in the engine at once (default 4 x max_num_seqs)")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--summary-json", help="also write the summary as JSON here")
    p.add_argument("--served-model-name", help="'model' in OpenAI answers (default: --model)")
    # simple format defaults
    p.add_argument("--max-tokens", type=int, default=64, help="simple format: default max_tokens")
    p.add_argument("--temperature", type=float, default=0.0, help="simple format: default temperature")
    # parsers (OpenAI chat requests)
    p.add_argument("--tool-call-parser", default="ernie45",
                   help="for chat requests with tools and tool_choice auto ('none': off)")
    p.add_argument("--reasoning-parser", default="none",
                   help="e.g. ernie45 for the Thinking model ('none': off, as vllm serve without it)")
    # engine
    p.add_argument("--dtype", default="auto")
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=None)
    p.add_argument("--gpu-memory-utilization", type=float, default=None,
                   help="default: vLLM's on GPU, 0.3 on CPU (where it sizes host memory)")
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--engine-arg", action="append", type=_engine_arg, default=[], metavar="KEY=VALUE",
                   help="any other vllm.LLM argument (value parsed as JSON when it is JSON); repeatable")
    return p


def make_llm(args: argparse.Namespace) -> Any:
    from vllm import LLM
    from vllm.platforms import current_platform

    kwargs: dict[str, Any] = dict(model=args.model, dtype=args.dtype, tensor_parallel_size=args.tensor_parallel_size,
                                  enforce_eager=args.enforce_eager)  # fmt: skip
    for name in ("max_model_len", "max_num_seqs", "seed", "gpu_memory_utilization"):
        if getattr(args, name) is not None:
            kwargs[name] = getattr(args, name)
    if "gpu_memory_utilization" not in kwargs and current_platform.is_cpu():
        kwargs["gpu_memory_utilization"] = 0.3
    kwargs.update(dict(args.engine_arg))
    return LLM(**kwargs)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not Path(args.input).is_file():
        print(f"vllm-ernie45-batch: {args.input}: no such input file", file=sys.stderr)
        return EXIT_FATAL
    fmt = args.format if args.format != "auto" else detect_format(Path(args.input))
    try:  # a corrupt output file stops the job before the engine starts
        scan_output(Path(args.output), fmt, repair=False)
    except Fatal as err:
        print(f"vllm-ernie45-batch: {err}", file=sys.stderr)
        return EXIT_FATAL

    from vllm_ernie45.child_run import close_llm

    llm = make_llm(args)
    try:
        summary = run_batch(llm, args.input, args.output, args, format=fmt)
    except Fatal as err:
        print(f"vllm-ernie45-batch: {err}", file=sys.stderr)
        return EXIT_FATAL
    except KeyboardInterrupt:
        print(f"vllm-ernie45-batch: interrupted; {args.output} holds every result finished so far: "
              "run the same command again to resume", file=sys.stderr)  # fmt: skip
        return 130
    finally:
        # The engine's processes end here, not in vLLM's atexit teardown (vllm_ernie45.child_run).
        close_llm(llm)
    print(summary.line(), flush=True)
    if args.summary_json:
        Path(args.summary_json).write_text(json.dumps(summary.as_dict(), indent=1))
    return EXIT_FAILED_LINES if summary.failed else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
