#!/usr/bin/env python3
"""Write a tiny random ERNIE 4.5 checkpoint (HF -PT layout) with an ERNIE-style tokenizer.

    python scripts/make_tiny_checkpoint.py --out out/tiny-ernie [--variant 21b] [--seed 0]

Variants: 21b (default: shared experts, dense layer 0, tied), 300b, interval, bias, legacy,
dense -- see vllm_ernie45/testing/tiny/checkpoint.py.
"""

from __future__ import annotations

import argparse
import sys

from vllm_ernie45.testing.tiny.checkpoint import VARIANTS, make_tiny_checkpoint


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--variant", default="21b", choices=VARIANTS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    args = parser.parse_args(argv)
    path = make_tiny_checkpoint(args.out, args.variant, seed=args.seed, dtype=args.dtype)
    print(f"tiny ERNIE 4.5 ({args.variant}) checkpoint with tokenizer written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
