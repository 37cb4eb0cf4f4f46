"""The one rule for "thinking off" (``enable_thinking`` in the chat-template kwargs).

The reasoning parser (streaming and not) calls :func:`thinking_disabled`; the chat template
in ``vllm_ernie45/testing/tiny/tokenizer.py`` spells the same rule in Jinja (a test renders it for
every value). No vLLM import here: the tokenizer tests use it without an engine.
"""

from __future__ import annotations

from typing import Any

# Strings that mean "off", compared after stripping surrounding whitespace, case-insensitive.
OFF_STRINGS = ("false", "0", "no", "off")


def thinking_off_value(value: Any) -> bool:
    """``False``, a number equal to 0, or one of :data:`OFF_STRINGS`. Anything else --
    ``True``, other numbers and strings (``""`` too), ``null``, lists, objects -- is "on"."""
    if isinstance(value, bool):
        return value is False
    if isinstance(value, (int, float)):
        return value == 0
    if isinstance(value, str):
        return value.strip().lower() in OFF_STRINGS
    return False


def thinking_disabled(chat_template_kwargs: Any) -> bool:
    """Thinking is off for these chat-template kwargs (absent key or no kwargs: on)."""
    if not isinstance(chat_template_kwargs, dict) or "enable_thinking" not in chat_template_kwargs:
        return False
    return thinking_off_value(chat_template_kwargs["enable_thinking"])
