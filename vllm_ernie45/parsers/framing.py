"""The text framing both ``ernie45`` parsers share: ERNIE 4.5's markers, splitting a stream
at them (:func:`split_markers`), and dropping the whitespace around a segment (:class:`Framer`).
Behaviour: docs/parsers.md.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

THINK_START = "<think>"
THINK_END = "</think>"
RESPONSE_START = "<response>"
RESPONSE_END = "</response>"
TOOL_CALL_START = "<tool_call>"
TOOL_CALL_END = "</tool_call>"

_WS_RUNS = re.compile(r"(\s+)")


def split_markers(text: str, markers: Sequence[str]) -> tuple[list[tuple[str, bool]], str]:
    """Split ``text`` into ``(piece, is_marker)`` pieces.

    Returns the pieces and a held-back tail: the longest suffix of ``text`` that is a proper
    prefix of a marker (a marker whose pieces arrive in separate deltas is recognised once
    it is complete). Feed the tail back in front of the next text; at the end of the
    stream it is plain text.
    """
    pieces: list[tuple[str, bool]] = []
    pos = 0
    while True:
        best = -1
        best_marker = ""
        for marker in markers:
            i = text.find(marker, pos)
            if i != -1 and (best == -1 or i < best):
                best, best_marker = i, marker
        if best == -1:
            break
        if best > pos:
            pieces.append((text[pos:best], False))
        pieces.append((best_marker, True))
        pos = best + len(best_marker)
    rest = text[pos:]
    hold = 0
    longest = max(len(m) for m in markers) - 1
    for start in range(max(0, len(rest) - longest), len(rest)):
        tail = rest[start:]
        if any(m.startswith(tail) for m in markers):
            hold = len(tail)
            break
    if hold:
        rest, held = rest[:-hold], rest[-hold:]
    else:
        held = ""
    if rest:
        pieces.append((rest, False))
    return pieces, held


class Framer:
    """Emits a text stream without its leading and trailing whitespace.

    Leading whitespace is dropped; a later whitespace run is held until more text follows
    (then emitted) or the segment ends (:meth:`end`, then dropped).
    """

    __slots__ = ("started", "held")

    def __init__(self) -> None:
        self.started = False
        self.held = ""

    def text(self, text: str) -> str:
        out: list[str] = []
        for run in _WS_RUNS.split(text):
            if not run:
                continue
            if run.isspace():
                if self.started:
                    self.held += run
            else:
                out.append(self.held)
                out.append(run)
                self.held = ""
                self.started = True
        return "".join(out)

    def end(self) -> None:
        self.held = ""


def marker_at(text: str, i: int, markers: Sequence[str], final: bool) -> str | None:
    """The marker starting at ``text[i]``; "" when none does; None when ``text[i:]`` may be
    the start of one still arriving (not at the end of the stream)."""
    for marker in markers:
        if text.startswith(marker, i):
            return marker
    longest = max(len(m) for m in markers)
    if not final and len(text) - i < longest and any(m.startswith(text[i:]) for m in markers):
        return None
    return ""
