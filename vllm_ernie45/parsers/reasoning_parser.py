"""``ernie45`` reasoning parser (``--reasoning-parser ernie45``): :class:`ThinkSplitter`, one
incremental ``reasoning</think>answer`` state machine, which non-streaming feeds the whole text.
Rules, and how it fits vLLM's ``Parser``: docs/parsers.md.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from vllm_ernie45 import compat
from vllm_ernie45.parsers.framing import (
    RESPONSE_END,
    RESPONSE_START,
    THINK_END,
    THINK_START,
    TOOL_CALL_START,
    Framer,
    split_markers,
)
from vllm_ernie45.parsers.thinking import thinking_disabled

_ReasoningParser, _ = compat.reasoning_parser_base()
_protocol = compat.protocol_module()
DeltaMessage = _protocol.DeltaMessage


# ----------------------------------------------------------------------------- state machine

_REASONING, _CONTENT, _HANDED_OVER = 0, 1, 2
_MARKERS = (THINK_START, THINK_END, RESPONSE_START, RESPONSE_END, TOOL_CALL_START)


class ThinkSplitter:
    """Incremental ``reasoning</think>content<tool_call>...`` splitter.

    ``feed(text)`` and ``finish()`` return ``(reasoning, content)`` increments; ``content``
    includes the verbatim text handed over from the first ``<tool_call>`` after ``</think>``
    (preceded by the whitespace that separated it from answer text).
    """

    def __init__(self, thinking: bool = True) -> None:
        self.state = _REASONING if thinking else _HANDED_OVER
        self.pending = ""
        self._reasoning = Framer()
        self._content = Framer()
        self._answer_marked = False  # a <response> marker was seen

    def _json_answer(self, piece: str) -> bool:
        """The answer starts with ``{`` or ``[`` right after ``</think>``: a JSON answer
        (tool_choice required / named, response_format), which vLLM parses itself."""
        if self._content.started or self._answer_marked:
            return False
        stripped = piece.lstrip()
        return bool(stripped) and stripped[0] in "{["

    @property
    def handed_over(self) -> bool:
        return self.state == _HANDED_OVER

    def feed(self, text: str) -> tuple[str, str]:
        buf = self.pending + text
        self.pending = ""
        if self.state == _HANDED_OVER:
            return "", buf
        pieces, self.pending = split_markers(buf, _MARKERS)
        reasoning: list[str] = []
        content: list[str] = []
        for piece, is_marker in pieces:
            if self.state == _HANDED_OVER:
                content.append(piece)
            elif self.state == _REASONING:
                if not is_marker or piece not in (THINK_START, THINK_END):
                    reasoning.append(self._reasoning.text(piece))
                elif piece == THINK_END:
                    self._reasoning.end()
                    self.state = _CONTENT
            elif not is_marker and self._json_answer(piece):
                self.state = _HANDED_OVER
                content.append(piece.lstrip())
            elif not is_marker or piece in (THINK_START, THINK_END):
                content.append(self._content.text(piece))
            elif piece == TOOL_CALL_START:
                # hand over with the whitespace between answer text and the block: the tool
                # parser keeps it where the block is no call, or text follows the calls
                content.append(self._content.held + piece)
                self._content.end()
                self.state = _HANDED_OVER
            else:  # <response> / </response>: dropped
                self._answer_marked = True
        if self.state == _HANDED_OVER and self.pending:
            content.append(self.pending)
            self.pending = ""
        return "".join(reasoning), "".join(content)

    def finish(self) -> tuple[str, str]:
        tail, self.pending = self.pending, ""
        if self.state == _HANDED_OVER:
            return "", tail
        if self.state == _REASONING:
            reasoning = self._reasoning.text(tail)
            self._reasoning.end()
            return reasoning, ""
        content = self._content.text(tail)
        self._content.end()
        return "", content


# ----------------------------------------------------------------------------- vLLM parser


class Ernie45ReasoningParser(_ReasoningParser):
    """Reasoning parser for ERNIE 4.5 Thinking models (``--reasoning-parser ernie45``)."""

    # Lets this parser decide when vLLM switches from the reasoning phase to the tool phase
    # (docs/parsers.md); vLLM then also calls finish_streaming() at stream end.
    engine_based_streaming = True

    def __init__(self, tokenizer: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(tokenizer, *args, **kwargs)
        if not self.model_tokenizer:
            raise ValueError("The ernie45 reasoning parser needs the model tokenizer.")
        start_id = self.vocab.get(THINK_START)
        end_id = self.vocab.get(THINK_END)
        if start_id is None or end_id is None:
            raise ValueError(
                f"the tokenizer has no {THINK_START} / {THINK_END} tokens; "
                "the ernie45 reasoning parser is for ERNIE 4.5 Thinking models"
            )
        self.think_start_token_id: int = start_id
        self.think_end_token_id: int = end_id
        chat_template_kwargs = kwargs.get("chat_template_kwargs")
        self._kwargs_known = chat_template_kwargs is not None
        self.thinking_disabled = thinking_disabled(chat_template_kwargs)
        self._stream: ThinkSplitter | None = None

    # -- markers --------------------------------------------------------------------------

    @property
    def reasoning_start_str(self) -> str:
        return THINK_START

    @property
    def reasoning_end_str(self) -> str:
        return THINK_END

    def _disabled_for(self, request: Any) -> bool:
        if self._kwargs_known:
            return self.thinking_disabled
        return thinking_disabled(getattr(request, "chat_template_kwargs", None))

    # -- token-level view (prompt check, structured output) -------------------------------

    def is_reasoning_end(self, input_ids: Sequence[int]) -> bool:
        if self.thinking_disabled:
            return True
        for token_id in reversed(input_ids):
            if token_id == self.think_end_token_id:
                return True
            if token_id == self.think_start_token_id:
                return False
        return False

    def is_reasoning_end_streaming(self, input_ids: Sequence[int], delta_ids: Iterable[int]) -> bool:
        if self.thinking_disabled:
            return True
        return self.think_end_token_id in delta_ids

    def extract_content_ids(self, input_ids: list[int]) -> list[int]:
        ids = list(input_ids)
        if self.thinking_disabled:
            return ids
        if self.think_end_token_id not in ids:
            return []
        return ids[ids.index(self.think_end_token_id) + 1 :]

    def count_reasoning_tokens(self, token_ids: Sequence[int]) -> int:
        if self.thinking_disabled:
            return 0
        count = 0
        for token_id in token_ids:
            if token_id == self.think_end_token_id:
                break
            if token_id != self.think_start_token_id:
                count += 1
        return count

    # -- request ------------------------------------------------------------------------------

    def adjust_request(self, request: Any) -> Any:
        # <think>, </think>, <response> are special tokens: keep them in the detokenized
        # text, which is what this parser reads.
        if hasattr(request, "skip_special_tokens"):
            request.skip_special_tokens = False
        return request

    # -- non-streaming ------------------------------------------------------------------------

    def extract_reasoning(self, model_output: str, request: Any) -> tuple[str | None, str | None]:
        splitter = ThinkSplitter(thinking=not self._disabled_for(request))
        reasoning, content = splitter.feed(model_output)
        more_reasoning, more_content = splitter.finish()
        return (reasoning + more_reasoning) or None, (content + more_content) or None

    # -- streaming ------------------------------------------------------------------------------

    def _splitter(self) -> ThinkSplitter:
        if self._stream is None:
            self._stream = ThinkSplitter(thinking=not self.thinking_disabled)
        return self._stream

    def extract_reasoning_streaming(
        self,
        previous_text: str,
        current_text: str,
        delta_text: str,
        previous_token_ids: Sequence[int],
        current_token_ids: Sequence[int],
        delta_token_ids: Sequence[int],
    ) -> Any:
        reasoning, content = self._splitter().feed(delta_text)
        if not reasoning and not content:
            return None
        return DeltaMessage(reasoning=reasoning or None, content=content or None)

    def has_engine_confirmed_reasoning_end(self) -> bool:
        return self.thinking_disabled or self._splitter().handed_over

    def finish_streaming(self) -> Any:
        """End of stream: whatever the splitter still holds (never after the hand-over)."""
        splitter = self._splitter()
        if splitter.handed_over:
            return None
        reasoning, content = splitter.finish()
        if not reasoning and not content:
            return None
        return DeltaMessage(reasoning=reasoning or None, content=content or None)
