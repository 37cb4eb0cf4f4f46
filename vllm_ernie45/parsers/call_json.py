"""The JSON of one ``ernie45`` tool call: its object text read a character at a time
(:class:`ObjectText`), then parsed into ``(name, arguments)`` (:func:`parse_call`). Behaviour
(lax control characters, arguments always JSON text): docs/parsers.md.
"""

from __future__ import annotations

import json
import re
from typing import Any

JSON_WS = " \t\r\n"
_ARGUMENT_KEYS = ("arguments", "parameters")
_CONTROL_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\b": "\\b", "\f": "\\f"}
_SURROGATE = re.compile("[\ud800-\udfff]")


class ObjectText:
    """The text of one JSON object, fed a character at a time from its opening ``{``: knows
    whether the next character is inside a string and when the object closes."""

    __slots__ = ("chars", "depth", "in_str", "esc")

    def __init__(self) -> None:
        self.chars = ["{"]
        self.depth = 1
        self.in_str = False
        self.esc = False

    def add(self, c: str) -> bool:
        """Append ``c``; True when it closed the object."""
        self.chars.append(c)
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
            return self.depth == 0
        return False

    @property
    def text(self) -> str:
        return "".join(self.chars)


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
                c = _CONTROL_ESCAPES.get(c) or f"\\u{ord(c):04x}"
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
    when missing or null. ``"parameters"`` is accepted for ``"arguments"``."""
    for decoder in (_STRICT, _LAX):
        fields = _object_fields(text, decoder)
        if fields is not None:
            break
    else:
        return None
    name = fields.get("name", (None,))[0]
    if not isinstance(name, str) or not name or (names and name not in names):
        return None
    found = next((fields[key] for key in _ARGUMENT_KEYS if key in fields), None)
    if found is None or found[0] is None:
        arguments = "{}"
    elif isinstance(found[0], str):
        arguments = _string_arguments(found[0])
    else:
        arguments = text[found[1] : found[2]]
        if decoder is _LAX:
            arguments = _escape_controls(arguments)
    return _no_lone_surrogates(name), arguments
