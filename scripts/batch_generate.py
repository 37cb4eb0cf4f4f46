#!/usr/bin/env python3
"""Offline batch generation with vLLM over a JSONL file of prompts (the plugin serves ERNIE).

A thin wrapper over ``vllm_ernie45.batch`` (also ``vllm-ernie45-batch`` / ``python -m
vllm_ernie45.batch``; docs/batch.md): streaming, resumable (run it again with the same
``--output`` to finish an interrupted job), bad lines go to ``<output>.errors.jsonl``; the
output is sorted in input order at the end (``--sort``), as this script always wrote it.

Input lines:  {"id": "q1", "prompt": "raw text"}   or   {"id": "q2", "messages": [{"role": ...}]}
              optional per line: "max_tokens", "temperature", "enable_thinking", ...
              (OpenAI batch lines -- custom_id / url / body -- work too)
Output lines: {"id", "prompt", "completion", "num_prompt_tokens", "num_completion_tokens",
               "finish_reason"}

    python scripts/batch_generate.py --model out/tiny-ernie --input scripts/example_prompts.jsonl \\
        --output out/completions.jsonl
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # a checkout without the package installed

from vllm_ernie45.batch import main  # noqa: E402

if __name__ == "__main__":
    # As this script always wrote it: --max-model-len 2048 unless given, output in input order.
    argv = sys.argv[1:]
    if not any(a == "--max-model-len" or a.startswith("--max-model-len=") for a in argv):
        argv += ["--max-model-len", "2048"]
    if "--sort" not in argv:
        argv.append("--sort")
    sys.exit(main(argv))
