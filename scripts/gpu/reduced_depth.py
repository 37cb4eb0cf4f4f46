#!/usr/bin/env python3
"""A model folder for ``load_format=dummy`` runs: a full ERNIE 4.5 config cut to fewer layers,
plus the tiny ERNIE-style tokenizer, so ``vllm serve`` and the OpenAI API can run at a big
model's width on fewer GPUs than the whole model needs.

    python scripts/gpu/reduced_depth.py --config scripts/configs/ernie-4.5-300b-a47b-pt.config.json \
        --layers 16 --out /tmp/ernie-300b-16l
    vllm serve /tmp/ernie-300b-16l --load-format dummy --tensor-parallel-size 2 ...

Every width stays (hidden size, heads, experts, expert and dense MLP sizes); the first
``moe_layer_start_index`` layers stay dense, the rest up to ``--layers`` are MoE layers.
The tokenizer's ids are < 1024, so prompts must use ordinary ids below that
(``scripts/serving/serve_load.py --throughput`` does).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from vllm_ernie45.config import arch_from_config


def reduced_config(config: dict, layers: int) -> dict:
    """``config`` with ``layers`` decoder layers: the same dense first layers, then MoE layers
    up to the new last one. Raises ValueError if that leaves no MoE layer."""
    start = int(config.get("moe_layer_start_index", 0) or 0)
    if config.get("moe_num_experts") and layers <= start:
        raise ValueError(f"--layers {layers} keeps no MoE layer (moe_layer_start_index={start})")
    if layers < 1:
        raise ValueError(f"--layers must be >= 1, got {layers}")
    out = dict(config, num_hidden_layers=layers)
    if "moe_layer_end_index" in out:
        out["moe_layer_end_index"] = layers - 1
    arch_from_config(out)  # the plugin must accept it (clear error otherwise)
    return out


def write_model_dir(config_path: Path, layers: int, out: Path, tokenizer: bool = True) -> Path:
    config = reduced_config(json.loads(config_path.read_text()), layers)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if tokenizer:
        from vllm_ernie45.testing.tiny.tokenizer import build_ernie_tokenizer

        build_ernie_tokenizer(out)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True, type=Path, help="full model config.json")
    ap.add_argument("--layers", required=True, type=int, help="decoder layers to keep")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--no-tokenizer", action="store_true")
    args = ap.parse_args(argv)
    try:
        out = write_model_dir(args.config, args.layers, args.out, tokenizer=not args.no_tokenizer)
    except ValueError as e:
        ap.error(str(e))
    arch = arch_from_config(json.loads((out / "config.json").read_text()))
    print(f"{out}: {arch.num_layers} layers, MoE layers {arch.moe_layer_indices}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
