"""The ``ernie45`` tool-call and reasoning parsers for vLLM's OpenAI-compatible server.

``vllm_ernie45.register()`` registers them lazily by name, so nothing here is imported
until vLLM asks for a parser: ``reasoning_parser.Ernie45ReasoningParser``
(``--reasoning-parser ernie45``) and ``tool_parser.Ernie45ToolParser``
(``--tool-call-parser ernie45``); ``thinking.thinking_disabled`` is the one rule for
``enable_thinking``; ``framing`` holds the markers and the text framing both parsers share,
``call_json`` the JSON of one tool call. Both parsers are incremental state machines whose
non-streaming result is the streaming machine fed the whole text. Behaviour: docs/parsers.md.
"""
