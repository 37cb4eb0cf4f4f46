"""What checks the plugin, apart from what serves a model: tiny ERNIE 4.5 checkpoints and
tokenizer (``tiny``), greedy + logprob parity of vLLM against HF transformers (``parity``),
and the default device-memory fraction of those runs (``memory``).

vLLM never imports this subpackage: the plugin's entry point, models, loader and parsers do
not depend on it. The quick start (``scripts/make_tiny_checkpoint.py``), the tests,
``eval/`` and the GPU scripts do.
"""
