"""``ernie45`` tool-call parser (``--tool-call-parser ernie45``): :class:`ToolCallStream`, one
incremental state machine over ``<tool_call>`` blocks, which non-streaming feeds the whole text;
a streamed call's name as soon as it is complete, then its arguments as they are written.
Rules: docs/parsers.md.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Sequence
from typing import Any

from vllm_ernie45 import compat
from vllm_ernie45.parsers.call_json import JSON_WS, CallObject, parse_call
from vllm_ernie45.parsers.framing import (
    RESPONSE_END,
    RESPONSE_START,
    TOOL_CALL_END,
    TOOL_CALL_START,
    marker_at,
)

_ToolParser, _ = compat.tool_parser_base()
_protocol = compat.protocol_module()
DeltaFunctionCall = _protocol.DeltaFunctionCall
DeltaMessage = _protocol.DeltaMessage
DeltaToolCall = _protocol.DeltaToolCall
ExtractedToolCallInformation = _protocol.ExtractedToolCallInformation
FunctionCall = _protocol.FunctionCall
ToolCall = _protocol.ToolCall

_MARKERS = (TOOL_CALL_START, TOOL_CALL_END, RESPONSE_START, RESPONSE_END)

logger = logging.getLogger(__name__)

# How a streamed call is delivered (docs/parsers.md): per request, ``"vllm_xargs":
# {"ernie45_tool_stream": "whole"}``; server-wide default, this environment variable.
TOOL_STREAM_ENV = "VLLM_ERNIE45_TOOL_STREAM"
TOOL_STREAM_XARG = "ernie45_tool_stream"
INCREMENTAL, WHOLE = "incremental", "whole"


def tool_stream_mode(request: Any = None) -> str:
    """``"incremental"`` (default: name first, then the arguments as written) or ``"whole"``
    (each call in one delta once complete): the request's ``vllm_xargs["ernie45_tool_stream"]``,
    else ``$VLLM_ERNIE45_TOOL_STREAM``. Other values are ignored with a warning (a parser
    never fails a request)."""
    xargs = getattr(request, "vllm_xargs", None)
    for where, value in (
        (f"vllm_xargs.{TOOL_STREAM_XARG}", xargs.get(TOOL_STREAM_XARG) if isinstance(xargs, dict) else None),
        (TOOL_STREAM_ENV, os.environ.get(TOOL_STREAM_ENV)),
    ):
        if value is None or (isinstance(value, str) and not value.strip()):
            continue
        mode = str(value).strip().lower()
        if mode in (INCREMENTAL, WHOLE):
            return mode
        logger.warning("%s=%r is not %r or %r; ignored", where, value, INCREMENTAL, WHOLE)
    return INCREMENTAL


def new_tool_call_id() -> str:
    return f"chatcmpl-tool-{uuid.uuid4().hex}"


def tool_names(tools: Any) -> set[str]:
    """Function names of a request's tools (chat ``{"function": {...}}`` or flat)."""
    names: set[str] = set()
    for tool in tools or ():
        function = tool.get("function") if isinstance(tool, dict) else getattr(tool, "function", None)
        holder = function if function is not None else tool
        name = holder.get("name") if isinstance(holder, dict) else getattr(holder, "name", None)
        if isinstance(name, str) and name:
            names.add(name)
    return names


# ----------------------------------------------------------------------------- state machine


class _Call:
    """A call that has started streaming (``index``: its place in the stream; ``sent``: its
    arguments streamed so far); ``done`` once complete, with ``arguments``."""

    __slots__ = ("index", "id", "name", "arguments", "sent_parts", "sent_len", "done")

    def __init__(self, index: int, name: str) -> None:
        self.index = index
        self.id = new_tool_call_id()
        self.name = name
        self.arguments = ""
        self.sent_parts: list[str] = []  # the object's args_parts sent so far
        self.sent_len = 0  # their total length
        self.done = False

    @property
    def sent(self) -> str:
        return "".join(self.sent_parts)


# modes: outside blocks; inside a block (JSON); inside a block after junk that followed a call
_TEXT, _BLOCK, _TAIL = range(3)


class ToolCallStream:
    """Incremental ``<tool_call>`` parser.

    ``feed(text)`` / ``finish()`` return events: ``("content", text)``; ``("start", index, id,
    name)`` when a call's name is complete, ``("args", index, text)`` as its arguments are
    written, ``("end", index)`` once the call is complete. The ``args`` texts of a call
    concatenate to its final ``arguments``; they become valid JSON only with the last one,
    sent with ``end``. A call that started but never ends (cut off, or its JSON broke) gets
    no further event; content is the same as if it had never started. ``calls``: the
    complete calls (what non-streaming returns).
    """

    def __init__(self, names: set[str] | None = None) -> None:
        self.names = names or set()
        self.calls: list[_Call] = []  # complete
        self.started: list[_Call] = []  # every call that started streaming, by index
        self.mode = _TEXT
        self.pending = ""  # the start of a marker at the end of the last text, held back
        self.held = ""  # whitespace after the last content (or leading), not yet emitted
        self.sep: str | None = None  # after calls: the whitespace that preceded them
        self._events: list[tuple] = []
        self._start_block()  # (sets the block fields)
        self.mode = _TEXT

    # -- public ---------------------------------------------------------------------------

    def feed(self, text: str) -> list[tuple]:
        buf, self.pending = self.pending + text, ""
        self._scan(buf, final=False)
        return self._take()

    def finish(self) -> list[tuple]:
        buf, self.pending = self.pending, ""
        self._scan(buf, final=True)
        if self.mode == _BLOCK:
            self._end_block("", explicit=False)
        self.mode = _TEXT
        if not self.calls:  # text is returned as written while nothing is a call
            self._content(self.held)
        self.held = ""
        return self._take()

    def _take(self) -> list[tuple]:
        self._send_args()
        events, self._events = self._events, []
        return events

    def _scan(self, buf: str, final: bool) -> None:
        pos, n = 0, len(buf)
        while pos < n:
            if self.mode == _BLOCK:
                c = buf[pos]
                # markers count outside JSON strings only
                if c == "<" and not (self.item and self.item.in_str):
                    marker = marker_at(buf, pos, _MARKERS, final)
                    if marker is None:
                        self.pending = buf[pos:]
                        return
                    if marker:
                        self._marker(marker)
                        pos += len(marker)
                        continue
                self._block_char(c)
                pos += 1
                continue
            i = buf.find("<", pos)
            if i == -1:
                self._text(buf[pos:])
                return
            self._text(buf[pos:i])
            marker = marker_at(buf, i, _MARKERS, final)
            if marker is None:
                self.pending = buf[i:]
                return
            if marker:
                self._marker(marker)
                pos = i + len(marker)
            else:
                self._text("<")
                pos = i + 1

    # -- content and its whitespace framing --------------------------------------------------

    def _content(self, text: str) -> None:
        if text:
            self._events.append(("content", text))

    def _text(self, text: str) -> None:
        """Text that is content. Whitespace next to calls is framing; where text follows
        calls, the whitespace that preceded the calls is kept as the one separator."""
        if not text:
            return
        body = text.strip()
        if not body:
            self.held += text
            return
        if self.sep is not None:
            prefix, self.sep = self.sep, None
        else:
            prefix = self.held + text[: len(text) - len(text.lstrip())]
        self.held = text[len(text.rstrip()) :]
        self._content(prefix + body)

    def _marker(self, marker: str) -> None:
        if self.mode == _BLOCK:
            if marker == TOOL_CALL_END:
                self._end_block(marker, explicit=True)
            elif marker == TOOL_CALL_START:  # a new block closes the open one
                self._end_block("", explicit=True)
                self._start_block()
            elif self.item is not None:  # <response> / </response> in an object: not JSON
                for c in marker:
                    self._block_char(c)
            elif self.block_calls:  # ... after a call: junk, where markers are framing
                self.mode = _TAIL
            else:
                self.raw.append(marker)
                self._not_a_call()
            return
        if self.mode == _TAIL and marker == TOOL_CALL_END:
            self.mode = _TEXT
        elif marker == TOOL_CALL_START:
            self._start_block()
        elif marker != TOOL_CALL_END and self.calls:
            pass  # <response> / </response> around or after calls: framing
        else:  # a stray </tool_call>, or <response> before any call: text as written
            self._text(marker)

    # -- blocks ---------------------------------------------------------------------------

    def _start_block(self) -> None:
        self.mode = _BLOCK
        self.raw: list[str] = [TOOL_CALL_START]  # the block's text (for when it is no call)
        self.block_calls = 0
        self.held_items: list[str] = []  # objects that are no call, before the block's first call
        self.list_state = 0  # 0: no list, 1: inside "[...]", 2: after it
        self.seen_item = False
        self.item_ws = ""  # whitespace between objects
        self.item: CallObject | None = None  # the JSON object being read
        self.item_call: _Call | None = None  # the call that object started streaming

    def _block_char(self, c: str) -> None:
        self.raw.append(c)
        item = self.item
        if item is not None:
            event = item.add(c)
            if event == "close":
                self._send_args()
                self.item = None
                text = item.text
                self._end_item(text, self._judge(item, text))
            elif event == "name" and item.valid and (not self.names or item.name in self.names):
                # The name is complete: the call starts streaming (it cannot be taken back).
                call = _Call(len(self.started), item.name)  # type: ignore[arg-type]
                self.started.append(call)
                self.item_call = call
                self._events.append(("start", call.index, call.id, call.name))
            return
        if c in JSON_WS:
            if self.seen_item:
                self.item_ws += c
        elif c == "{":
            self.item = CallObject()
            self.item_call = None
        elif c == "[" and self.list_state == 0 and not self.seen_item:
            self.list_state = 1
        elif c == "]" and self.list_state == 1:
            self.list_state = 2
        elif c == "," and self.seen_item:
            pass
        elif self.block_calls:  # junk after a call: content, up to </tool_call>
            self.mode = _TAIL
            self._text(c)
        else:
            self._not_a_call()

    def _not_a_call(self) -> None:
        """Junk before any call: the block is content as written, and what follows is text."""
        self.mode = _TEXT
        self._text("".join(self.raw))

    def _send_args(self) -> None:
        """Stream what the open object's arguments have grown by."""
        call = self.item_call
        if call is not None and self.item is not None:
            parts = self.item.args_parts
            if len(parts) > len(call.sent_parts):
                new = "".join(parts[len(call.sent_parts) :])
                call.sent_parts.extend(parts[len(call.sent_parts) :])
                call.sent_len += len(new)
                self._events.append(("args", call.index, new))

    def _judge(self, item: CallObject, text: str) -> tuple[str, str] | None:
        """The complete object ``text`` as a call; one that started streaming only with the
        name it was streamed under and arguments that go on from what was sent."""
        call = parse_call(text, self.names)
        started = self.item_call
        if started is not None and call is not None:
            if call[0] != started.name or not call[1].startswith(started.sent):
                return None  # not expected to happen: the stream and the text disagree
        return call

    def _end_item(self, text: str, call: tuple[str, str] | None) -> None:
        ws, self.item_ws = self.item_ws, ""
        started, self.item_call = self.item_call, None
        self.seen_item = True
        if call is None:  # judged like a block of its own: its text is content
            if self.block_calls:
                self._text(ws + text)
            else:
                self.held_items.append(ws + text)
            return
        if not self.block_calls:
            for held in self.held_items:
                self._text(held)
            self.held_items = []
        self._text(ws)  # whitespace before a call: framing, or the separator after it
        self.block_calls += 1
        if self.sep is None:
            self.sep = self.held
        self.held = ""
        new = started
        if new is None:  # complete before its name could stream: it starts and ends here
            new = _Call(len(self.started), call[0])
            self.started.append(new)
            self._events.append(("start", new.index, new.id, new.name))
        rest = call[1][new.sent_len :]
        if rest:
            self._events.append(("args", new.index, rest))
        new.arguments = call[1]
        new.done = True
        self.calls.append(new)
        self._events.append(("end", new.index))

    def _end_block(self, marker: str, explicit: bool) -> None:
        """``</tool_call>`` or a new ``<tool_call>`` (explicit), or the end of the text."""
        if self.item is not None:
            self._send_args()
            item, self.item = self.item, None
            text = item.text
            # The model closed the block without the object's last "}": supply it. Not at
            # the end of the text: the output was cut off, the call is unfinished.
            call = None
            if explicit and item.depth == 1:
                call = self._judge(item, text + "}")
            if call is not None or self.block_calls:
                self._end_item(text, call)
        self.item_call = None
        self.mode = _TEXT
        if not self.block_calls:  # never a call: the block is content, as written
            self._text("".join(self.raw) + marker)


# ----------------------------------------------------------------------------- vLLM parser


class Ernie45ToolParser(_ToolParser):
    """Tool-call parser for ERNIE 4.5 (``--tool-call-parser ernie45``)."""

    # False while vLLM's Parser is built: it then keeps accumulating previous/current text,
    # which its own tool_choice "required" / named-function streaming needs. Set on the
    # instance once streaming starts, so that vLLM (which reads it again at the end of the
    # stream) calls finish_streaming() for what is still held (docs/parsers.md).
    engine_based_streaming = False

    def __init__(self, tokenizer: Any, tools: list | None = None) -> None:
        super().__init__(tokenizer, tools)
        self._stream: ToolCallStream | None = None
        self._whole = False
        self._pending: dict[int, list[str]] = {}  # whole mode: [id, name, arguments] per call
        self._out_index: dict[int, int] = {}  # the machine's call index -> the client's

    def adjust_request(self, request: Any) -> Any:
        request = super().adjust_request(request)
        # <tool_call> / </tool_call> are special tokens: keep them in the text.
        if hasattr(request, "skip_special_tokens"):
            request.skip_special_tokens = False
        return request

    def _names(self, request: Any) -> set[str]:
        names = tool_names(getattr(request, "tools", None))
        return names or tool_names(self.tools)

    # -- non-streaming ------------------------------------------------------------------------

    def extract_tool_calls(self, model_output: str, request: Any) -> Any:
        machine = ToolCallStream(self._names(request))
        events = machine.feed(model_output) + machine.finish()
        content = "".join(e[1] for e in events if e[0] == "content")
        calls = [
            ToolCall(id=call.id, type="function", function=FunctionCall(name=call.name, arguments=call.arguments))
            for call in machine.calls
        ]
        return ExtractedToolCallInformation(
            tools_called=bool(calls), tool_calls=calls, content=content or None
        )

    # -- streaming ------------------------------------------------------------------------------

    def extract_tool_calls_streaming(
        self,
        previous_text: str,
        current_text: str,
        delta_text: str,
        previous_token_ids: Sequence[int],
        current_token_ids: Sequence[int],
        delta_token_ids: Sequence[int],
        request: Any,
    ) -> Any:
        if self._stream is None:
            self._stream = ToolCallStream(self._names(request))
            self._whole = tool_stream_mode(request) == WHOLE
            self.engine_based_streaming = True  # ask vLLM for the end-of-stream flush
        return self._delta(self._stream.feed(delta_text))

    def finish_streaming(self) -> Any:
        if self._stream is None:
            return None
        return self._delta(self._stream.finish())

    def _delta(self, events: list[tuple]) -> Any:
        content = "".join(e[1] for e in events if e[0] == "content")
        # per client index, in order: [id, name, arguments] (id and name only on a call's first)
        parts: dict[int, list[Any]] = {}
        for event in events:
            kind = event[0]
            if kind == "start":
                _, index, call_id, name = event
                if self._whole:
                    self._pending[index] = [call_id, name, ""]
                else:
                    self._open(index, call_id, name, parts)
            elif kind == "args":
                _, index, text = event
                if self._whole:
                    self._pending[index][2] += text
                else:
                    self._add_args(index, text, parts)
            elif kind == "end" and self._whole:
                call_id, name, arguments = self._pending.pop(event[1])
                self._open(event[1], call_id, name, parts)
                self._add_args(event[1], arguments, parts)
        tool_calls = [
            DeltaToolCall(
                index=index,
                id=call_id,
                type="function",
                function=DeltaFunctionCall(name=name, arguments=arguments),
            )
            if call_id is not None
            else DeltaToolCall(index=index, function=DeltaFunctionCall(arguments=arguments))
            for index, (call_id, name, arguments) in parts.items()
        ]
        if not content and not tool_calls:
            return None
        return DeltaMessage(content=content or None, tool_calls=tool_calls)

    def _open(self, index: int, call_id: str, name: str, parts: dict[int, list[Any]]) -> None:
        """A call's first delta: its index, id and name (arguments "" so far, as OpenAI sends)."""
        out = self._out_index[index] = len(self.prev_tool_call_arr)
        # vLLM's end-of-stream check (get_remaining_unstreamed_args) compares these two;
        # both always hold what the client has received.
        self.prev_tool_call_arr.append({"name": name, "arguments": ""})
        self.streamed_args_for_tool.append("")
        self.current_tool_id = out
        self.current_tool_name_sent = True
        parts[out] = [call_id, name, ""]

    def _add_args(self, index: int, text: str, parts: dict[int, list[Any]]) -> None:
        out = self._out_index[index]
        self.streamed_args_for_tool[out] += text
        self.prev_tool_call_arr[out]["arguments"] = self.streamed_args_for_tool[out]
        parts.setdefault(out, [None, None, ""])[2] += text


__all__ = ["Ernie45ToolParser", "ToolCallStream"]
