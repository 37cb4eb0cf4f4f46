"""The JSON of one ``ernie45`` tool call: its object text read a character at a time
(:class:`CallObject`: where it ends, whether it is still JSON, its name as soon as that is
complete, its arguments' text as it is written), then judged whole (:func:`parse_call`).
Behaviour (lax control characters, arguments always JSON text, what streams when):
docs/parsers.md.
"""

from __future__ import annotations

import json
import re
from typing import Any

JSON_WS = " \t\r\n"
_ARGUMENT_KEYS = ("arguments", "parameters")
_CONTROL_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\b": "\\b", "\f": "\\f"}
_SURROGATE = re.compile("[\ud800-\udfff]")
_HEX = frozenset("0123456789abcdefABCDEF")
_DIGITS = frozenset("0123456789")
_LITERALS = {"t": "rue", "f": "alse", "n": "ull"}

# CallObject's JSON states: where the next character is
(_KEY_OR_END, _KEY, _COLON, _VALUE, _VALUE_OR_END, _AFTER, _STR, _NUM, _LIT, _DONE) = range(10)
# number states: after "-", "0", more int digits, ".", fraction digits, "e", exponent sign, digits
(_N_MINUS, _N_ZERO, _N_INT, _N_DOT, _N_FRAC, _N_E, _N_ESIGN, _N_EXP) = range(8)
_NUMBER_ENDS = frozenset((_N_ZERO, _N_INT, _N_FRAC, _N_EXP))


def _escape_control(c: str) -> str:
    return _CONTROL_ESCAPES.get(c) or f"\\u{ord(c):04x}"


class CallObject:
    """One JSON call object, fed a character at a time from its opening ``{``.

    Two readings run side by side. Its *extent* (``depth``, ``in_str``: brackets and quotes
    only, whatever is between them) says where the object's text ends -- :meth:`add` returns
    ``"close"`` -- and whether a marker is inside a string. Its *JSON* reading checks the
    grammar as it goes (``valid`` turns False at the first character that no JSON object can
    continue with; strings may hold raw control characters, as :data:`_LAX` accepts) and
    follows the object's top-level members: :meth:`add` returns ``"name"`` on the quote that
    closes the first ``"name"`` member's string value (then :attr:`name` holds it), and
    :attr:`args_text` grows with the first ``"arguments"`` / ``"parameters"`` member's value
    while it is an object or a list, character by character, raw control characters in its
    strings escaped -- always a prefix of the arguments :func:`parse_call` returns once the
    object is complete, without the value's closing bracket (so it is never valid JSON on
    its own before then).
    """

    __slots__ = (
        "chars", "depth", "in_str", "esc",  # extent
        "valid", "stack", "state", "is_key", "jesc", "uhex", "num", "lit",  # JSON
        "key_start", "key", "value_start", "field", "seen_name", "seen_args",  # top level
        "name", "args_open", "args_parts",
    )

    def __init__(self) -> None:
        self.chars = ["{"]
        self.depth = 1
        self.in_str = False
        self.esc = False
        self.valid = True
        self.stack = ["{"]
        self.state = _KEY_OR_END
        self.is_key = False
        self.jesc = False
        self.uhex = 0
        self.num = 0
        self.lit = ""
        self.key_start = -1
        self.key: str | None = None  # the top-level key whose value comes next
        self.value_start = -1
        self.field = ""  # "name" / "args" while that top-level value is read
        self.seen_name = False
        self.seen_args = False
        self.name: str | None = None
        self.args_open = False
        self.args_parts: list[str] = []

    @property
    def text(self) -> str:
        return "".join(self.chars)

    @property
    def args_text(self) -> str:
        return "".join(self.args_parts)

    def add(self, c: str) -> str:
        """Append ``c``: ``"close"`` when it closed the object, ``"name"`` when it completed
        the call's name, else ``""``."""
        self.chars.append(c)
        event = ""
        if self.valid:
            event = self._json(c)
            if self.args_open and self.valid:
                self.args_parts.append(_escape_control(c) if c < " " and self.state == _STR else c)
        if self.in_str:
            if self.esc:
                self.esc = False
            elif c == "\\":
                self.esc = True
            elif c == '"':
                self.in_str = False
        elif c == '"':
            self.in_str = True
        elif c in "{[":
            self.depth += 1
        elif c in "}]":
            self.depth -= 1
            if self.depth == 0:
                return "close"
        return event

    # -- the JSON reading -------------------------------------------------------------------

    def _fail(self) -> str:
        self.valid = False
        self.args_open = False
        return ""

    def _json(self, c: str) -> str:
        state = self.state
        if state == _STR:
            if self.uhex:
                if c not in _HEX:
                    return self._fail()
                self.uhex -= 1
            elif self.jesc:
                self.jesc = False
                if c == "u":
                    self.uhex = 4
                elif c not in '"\\/bfnrt':
                    return self._fail()
            elif c == "\\":
                self.jesc = True
            elif c == '"':
                if self.is_key:
                    self.state = _COLON
                    if len(self.stack) == 1:
                        self.key = _decode(self._since(self.key_start))
                    return ""
                return self._value_end()
            return ""
        if state == _NUM:
            if self._number(c):
                return ""
            if self.num not in _NUMBER_ENDS:
                return self._fail()
            event = self._value_end(exclusive=True)
            return self._json(c) or event
        if state == _LIT:
            if c != self.lit[0]:
                return self._fail()
            self.lit = self.lit[1:]
            return "" if self.lit else self._value_end()
        if c in JSON_WS:
            return ""
        if state == _VALUE or state == _VALUE_OR_END:
            if c == "]" and state == _VALUE_OR_END:
                return self._close()
            return self._value_start(c)
        if state == _KEY_OR_END or state == _KEY:
            if c == '"':
                self.state, self.is_key = _STR, True
                self.key_start = len(self.chars) - 1
                return ""
            if c == "}" and state == _KEY_OR_END:
                return self._close()
            return self._fail()
        if state == _COLON:
            if c != ":":
                return self._fail()
            self.state = _VALUE
            return ""
        if state == _AFTER:
            top = self.stack[-1]
            if c == ",":
                self.state = _KEY if top == "{" else _VALUE
                return ""
            if (c == "}" and top == "{") or (c == "]" and top == "["):
                return self._close()
        return self._fail()

    def _value_start(self, c: str) -> str:
        if len(self.stack) == 1:  # a member of the call object itself
            key, self.key = self.key, None
            self.value_start = len(self.chars) - 1
            self.field = ""
            if key == "name" and not self.seen_name:
                self.seen_name = True
                self.field = "name"
            elif key in _ARGUMENT_KEYS and not self.seen_args:
                self.seen_args = True
                self.field = "args"
                self.args_open = c in "{["
        if c in "{[":
            self.stack.append(c)
            self.state = _KEY_OR_END if c == "{" else _VALUE_OR_END
        elif c == '"':
            self.state, self.is_key = _STR, False
        elif c == "-" or c in _DIGITS:
            self.state = _NUM
            self.num = _N_MINUS if c == "-" else _N_ZERO if c == "0" else _N_INT
        elif c in _LITERALS:
            self.state, self.lit = _LIT, _LITERALS[c]
        else:
            return self._fail()
        return ""

    def _number(self, c: str) -> bool:
        """Whether ``c`` continues the number."""
        num = self.num
        if c in _DIGITS:
            if num == _N_MINUS:
                self.num = _N_ZERO if c == "0" else _N_INT
            elif num in (_N_INT, _N_FRAC, _N_EXP):
                pass
            elif num == _N_DOT:
                self.num = _N_FRAC
            elif num in (_N_E, _N_ESIGN):
                self.num = _N_EXP
            else:  # a digit after a leading 0
                return False
            return True
        if c == "." and num in (_N_ZERO, _N_INT):
            self.num = _N_DOT
            return True
        if c in "eE" and num in (_N_ZERO, _N_INT, _N_FRAC):
            self.num = _N_E
            return True
        if c in "+-" and num == _N_E:
            self.num = _N_ESIGN
            return True
        return False

    def _close(self) -> str:
        self.stack.pop()
        if not self.stack:
            self.state = _DONE
            return ""
        return self._value_end()

    def _value_end(self, exclusive: bool = False) -> str:
        """A value ended: with the character just added, or (a number) before it."""
        self.state = _AFTER
        if len(self.stack) != 1:
            return ""
        field, self.field = self.field, ""
        if field == "args":
            self.args_open = False
        elif field == "name":
            raw = self._since(self.value_start, exclusive)
            name = _decode(raw) if raw.startswith('"') else None
            if isinstance(name, str) and name:
                self.name = _no_lone_surrogates(name)
                return "name"
        return ""

    def _since(self, start: int, exclusive: bool = False) -> str:
        return "".join(self.chars[start : len(self.chars) - 1 if exclusive else None])


def _decode(text: str) -> Any:
    try:
        return _LAX.decode(text)
    except (ValueError, RecursionError):
        return None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


_STRICT = json.JSONDecoder(parse_constant=_reject_constant)
# Accepts raw control characters (a newline, a tab) inside strings, which models write.
_LAX = json.JSONDecoder(strict=False, parse_constant=_reject_constant)


def _escape_controls(text: str) -> str:
    """JSON text read by :data:`_LAX` -> strict JSON: escape control characters in strings."""
    out: list[str] = []
    in_str = esc = False
    for c in text:
        if in_str:
            if esc:
                esc = False
            elif c == "\\":
                esc = True
            elif c == '"':
                in_str = False
            elif c < " ":
                c = _escape_control(c)
        elif c == '"':
            in_str = True
        out.append(c)
    return "".join(out)


def _no_lone_surrogates(text: str) -> str:
    # A "\ud83d" escape without its pair decodes to a lone surrogate, which UTF-8 cannot hold.
    return _SURROGATE.sub("\ufffd", text)


def _object_fields(text: str, decoder: json.JSONDecoder) -> dict[str, tuple[Any, int, int]] | None:
    """The members of the JSON object ``text`` -- key: (value, start, end of its text) --
    or None when ``text`` is not exactly one JSON object. A repeated key keeps its first value."""
    n = len(text)

    def skip(i: int) -> int:
        while i < n and text[i] in JSON_WS:
            i += 1
        return i

    fields: dict[str, tuple[Any, int, int]] = {}
    i = skip(1) if text.startswith("{") else n
    if i < n and text[i] == "}":
        return fields if skip(i + 1) == n else None
    try:
        while i < n and text[i] == '"':
            key, i = decoder.raw_decode(text, i)
            i = skip(i)
            if i >= n or text[i] != ":":
                return None
            i = skip(i + 1)
            value, end = decoder.raw_decode(text, i)
            fields.setdefault(key, (value, i, end))
            i = skip(end)
            if i < n and text[i] == ",":
                i = skip(i + 1)
            elif i < n and text[i] == "}":
                return fields if skip(i + 1) == n else None
            else:
                return None
    except (ValueError, RecursionError):
        return None
    return None


def _string_arguments(value: str) -> str:
    """``"arguments"`` given as a JSON string: its text when it holds a JSON object, else the
    string itself encoded as JSON (``""`` -> ``'""'``, ``"hello"`` -> ``'"hello"'``)."""
    value = _no_lone_surrogates(value)
    text = value.strip()
    for decoder in (_STRICT, _LAX):
        try:
            obj = decoder.decode(text)
        except (ValueError, RecursionError):
            continue
        if isinstance(obj, dict):
            return text if decoder is _STRICT else _escape_controls(text)
        break
    return json.dumps(value, ensure_ascii=False)


def parse_call(text: str, names: set[str]) -> tuple[str, str] | None:
    """``(name, arguments)`` for one complete JSON call object, or None when it is not a
    call: not a JSON object, no non-empty string ``name``, or a name not in ``names`` (when
    given). ``arguments`` is always JSON text: an object (or other non-string value) as the
    model wrote it, a string decoded when it holds an object and encoded otherwise, ``{}``
    when missing or null. ``"parameters"`` is accepted for ``"arguments"`` (the first of the
    two in the text counts)."""
    for decoder in (_STRICT, _LAX):
        fields = _object_fields(text, decoder)
        if fields is not None:
            break
    else:
        return None
    name = fields.get("name", (None,))[0]
    if not isinstance(name, str) or not name or (names and name not in names):
        return None
    # the first of "arguments" / "parameters" in the text (the one that streams)
    found = min((fields[key] for key in _ARGUMENT_KEYS if key in fields), key=lambda f: f[1], default=None)
    if found is None or found[0] is None:
        arguments = "{}"
    elif isinstance(found[0], str):
        arguments = _string_arguments(found[0])
    else:
        arguments = text[found[1] : found[2]]
        if decoder is _LAX:
            arguments = _escape_controls(arguments)
    return _no_lone_surrogates(name), arguments
