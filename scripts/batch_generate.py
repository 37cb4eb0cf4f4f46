#!/usr/bin/env python3
"""Offline batch generation with vLLM over a JSONL file of prompts (the plugin serves ERNIE).

Input lines:  {"id": "q1", "prompt": "raw text"}   or   {"id": "q2", "messages": [{"role": ...}]}
              optional per line: "max_tokens", "temperature", "enable_thinking"
Output lines: {"id", "prompt", "completion", "num_prompt_tokens", "num_completion_tokens",
               "finish_reason"}

Chat lines are rendered with the model's chat template (ERNIE 4.5 format); every request
goes through one ``LLM.generate`` call, so vLLM batches them, with a progress bar.

    python scripts/batch_generate.py --model out/tiny-ernie --input scripts/example_prompts.jsonl \
        --output out/completions.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def read_requests(path: Path) -> list[dict]:
    requests = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as err:
            raise SystemExit(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
        if not isinstance(item, dict) or ("prompt" in item) == ("messages" in item):
            raise SystemExit(f"{path}:{lineno}: each line needs exactly one of 'prompt' or 'messages'")
        item.setdefault("id", f"line-{lineno}")
        requests.append(item)
    if not requests:
        raise SystemExit(f"{path}: no requests")
    return requests


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="checkpoint directory or hub id")
    parser.add_argument("--input", required=True, type=Path)
    parser.add_argument("--output", required=True, type=Path)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--gpu-memory-utilization", type=float, default=None,
                        help="default: 0.9 on GPU, 0.3 on CPU (where it sizes host memory)")
    parser.add_argument("--enforce-eager", action="store_true")
    args = parser.parse_args(argv)

    requests = read_requests(args.input)

    from vllm import LLM, SamplingParams

    from vllm_ernie45.child_run import close_llm
    from vllm_ernie45.testing.memory import default_memory_utilization

    memory = args.gpu_memory_utilization or default_memory_utilization() or 0.9
    llm = LLM(
        model=args.model,
        dtype=args.dtype,
        tensor_parallel_size=args.tensor_parallel_size,
        max_model_len=args.max_model_len,
        gpu_memory_utilization=memory,
        enforce_eager=args.enforce_eager,
    )
    tokenizer = llm.get_tokenizer()
    prompts, params = [], []
    for item in requests:
        if "messages" in item:
            text = tokenizer.apply_chat_template(
                item["messages"],
                tokenize=False,
                add_generation_prompt=True,
                enable_thinking=item.get("enable_thinking", True),
            )
        else:
            text = item["prompt"]
        prompts.append(text)
        params.append(
            SamplingParams(
                max_tokens=item.get("max_tokens", args.max_tokens),
                temperature=item.get("temperature", args.temperature),
                seed=0,
            )
        )
    results = llm.generate(prompts, params, use_tqdm=True)
    # The engine's processes end here, not in vLLM's atexit teardown (vllm_ernie45.child_run).
    close_llm(llm)

    args.output.parent.mkdir(parents=True, exist_ok=True)
    with args.output.open("w", encoding="utf-8") as out:
        for item, prompt, result in zip(requests, prompts, results):
            completion = result.outputs[0]
            record = {
                "id": item["id"],
                "prompt": prompt,
                "completion": completion.text,
                "num_prompt_tokens": len(result.prompt_token_ids),
                "num_completion_tokens": len(completion.token_ids),
                "finish_reason": completion.finish_reason,
            }
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
    print(f"wrote {len(results)} completions to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
