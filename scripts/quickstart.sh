#!/usr/bin/env bash
# Command 1 of the README: set up (CPU) and run the main job on the embedded tiny default --
# a generated ERNIE 4.5 MoE checkpoint with an ERNIE-style tokenizer, served by the plugin
# through vllm.LLM over scripts/example_prompts.jsonl. Writes out/completions.jsonl.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/cpu_env.sh
. scripts/cpu_env.sh
bash scripts/setup_cpu.sh
# shellcheck disable=SC1091
. "$VENV/bin/activate"
MODEL=${MODEL:-out/tiny-ernie}
[ -f "$MODEL/config.json" ] || python scripts/make_tiny_checkpoint.py --out "$MODEL"
# A fresh job each time (the runner would resume into an existing output file).
rm -f out/completions.jsonl out/completions.jsonl.errors.jsonl
python scripts/batch_generate.py --model "$MODEL" --input scripts/example_prompts.jsonl \
  --output out/completions.jsonl "$@"
head -c 600 out/completions.jsonl; echo
