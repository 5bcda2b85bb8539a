#!/usr/bin/env bash
# The GPU rows of benchmarks/run.py in one command, on a machine with an NVIDIA GPU.
#
#   bash benchmarks/gpu.sh                      # results in $OUT (default: gpu_out/)
#   bash benchmarks/gpu.sh --dry-run            # print the steps, run nothing
#   bash benchmarks/gpu.sh --fetch-wheels DIR   # where PyPI is reachable: the wheels a
#                                               # machine without network needs
#
# It makes a fresh virtualenv that sees the system's packages (a CUDA image's JAX is
# used as it is) and installs there what is missing: JAX for CUDA from PyPI when JAX
# cannot see a GPU, and the project's small pure-Python dependencies, from $WHEELS
# (a folder made by --fetch-wheels, carried to a machine without network) or PyPI.
# Then it runs the cases in $CASES and leaves in $OUT: gpu.json (the report),
# profile.tgz (a jax.profiler trace of one timed call of each case: open it with
# TensorBoard's profile plugin or xprof), nvidia-smi.txt and log.txt.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
out=${OUT:-$repo/gpu_out}
cases=${CASES:-train_step_b64_128_bf16,train_step_b64_128,inference_x4_128_to_512,eval_mixed_sizes,input_pipeline_128}
# What the benchmarks import beyond a CUDA image's scientific stack.
extras=(ml_collections tensorboardX)
dry=""

run() {  # prints each step; runs it unless --dry-run
  echo "+ $*"
  [[ -n $dry ]] || "$@"
}

case "${1:-}" in
  --dry-run) dry=1 ;;
  --fetch-wheels)
    [[ -n ${2:-} ]] || { echo "gpu.sh: --fetch-wheels needs a folder" >&2; exit 2; }
    python3 -m pip download --no-deps --only-binary=:all: --dest "$2" "${extras[@]}"
    exit 0 ;;
  "") ;;
  *) echo "gpu.sh: unknown argument $1 (use --dry-run or --fetch-wheels DIR)" >&2; exit 2 ;;
esac

if [[ -n $dry ]]; then work='$WORK'; else work=$(mktemp -d); fi
venv=$work/venv
py=$venv/bin/python
run mkdir -p "$out"
run python3 -m venv --system-site-packages "$venv"
if [[ -n $dry ]] || ! "$py" -c 'import jax; assert jax.default_backend() == "gpu"' 2>/dev/null; then
  run "$py" -m pip install -q -U "jax[cuda12]"
fi
if [[ -n ${WHEELS:-} ]]; then
  run "$py" -m pip install -q --no-index --find-links "$WHEELS" "${extras[@]}"
else
  run "$py" -m pip install -q "${extras[@]}"
fi
run "$py" -c 'import jax; print(jax.__version__, jax.devices()); assert jax.default_backend() == "gpu"'
if [[ -z $dry ]]; then
  nvidia-smi > "$out/nvidia-smi.txt" 2>&1 || true
fi
echo "+ $py benchmarks/run.py --only $cases --json $out/gpu.json --profile $work/profile"
if [[ -z $dry ]]; then
  cd "$repo"
  PYTHONUNBUFFERED=1 "$py" benchmarks/run.py --only "$cases" --json "$out/gpu.json" \
    --profile "$work/profile" 2>&1 | tee "$out/log.txt"
  tar czf "$out/profile.tgz" -C "$work" profile
fi
