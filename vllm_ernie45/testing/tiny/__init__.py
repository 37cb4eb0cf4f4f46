"""Tiny, deterministic ERNIE 4.5 stand-ins (checkpoints and tokenizer) for tests and demos."""
