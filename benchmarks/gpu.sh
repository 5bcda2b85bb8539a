#!/usr/bin/env bash
# The GPU rows of benchmarks/run.py in one command, on a machine with an NVIDIA GPU.
#
#   bash benchmarks/gpu.sh                      # results in $OUT (default: gpu_out/)
#   bash benchmarks/gpu.sh --dry-run            # print the steps, run nothing
#   bash benchmarks/gpu.sh --fetch-wheels DIR   # where PyPI is reachable: the wheels that
#                                               # a machine without network needs
#
# It runs with the Python that already has JAX for the GPU ($PYTHON, default python3: a
# CUDA image's, often itself a virtualenv, used as it is). Where that Python lacks JAX for
# the GPU, it makes a virtualenv and installs JAX for CUDA and the project's dependencies
# from PyPI. The project's small pure-Python dependencies that are missing are installed
# into a private folder put on PYTHONPATH, from $WHEELS (a folder made by --fetch-wheels
# and carried to a machine without network) or PyPI; nothing else is changed.
# Then it runs the cases in $CASES, most wanted first, with $RUN_ARGS (e.g. "--repeats
# 10"), each killed after $CASE_TIMEOUT seconds (default 240) and all of them after
# $TIME_LIMIT (default 540: a machine lent for 10-minute commands keeps what was measured),
# and leaves in $OUT: gpu.json (the report, rewritten after each case), profile.tgz (a
# jax.profiler trace of one timed call of each case: open it with TensorBoard's profile
# plugin or xprof; without the xplane files if it would pass 15 MB), machine.txt
# (nvidia-smi, cores, memory, /dev/shm, which the loader's batches need) and log.txt.
# $BACKEND (default gpu) is the JAX backend required; `BACKEND=cpu` checks the script
# itself on a machine without a GPU.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
out=${OUT:-$repo/gpu_out}
cases=${CASES:-train_step_b64_128_bf16,train_step_b64_128_bf16_xla,main_b64_128_bf16,input_pipeline_128,inference_x4_128_to_512,inference_x4_128_to_512_sub2048,train_step_b64_128,eval_mixed_sizes}
time_limit=${TIME_LIMIT:-540}
case_timeout=${CASE_TIMEOUT:-240}
backend=${BACKEND:-gpu}
py=${PYTHON:-python3}
# What the benchmarks import beyond a CUDA image's scientific stack (package = module name).
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

has_backend() {  # says why not
  "$py" -c "import jax; b = jax.default_backend(); assert b == '$backend', 'JAX backend ' + b" 2>&1 \
    | tail -1 | sed "s|^|# $py: |"
  return "${PIPESTATUS[0]}"
}

if [[ -n $dry ]]; then work='$WORK'; else work=$(mktemp -d); fi
run mkdir -p "$out"
if ! has_backend; then  # checked in a dry run too: it only imports jax
  echo "# $py has no JAX for $backend: a virtualenv with jax[cuda12] from PyPI"
  run python3 -m venv "$work/venv"
  py=$work/venv/bin/python
  # [train]: scikit-image, for the demo photographs of input_pipeline_128 and main_*.
  run "$py" -m pip install -q -U "jax[cuda12]" -e "$repo[train]"
fi
missing=()
for m in "${extras[@]}"; do
  if ! "$py" -c "import $m" 2>/dev/null; then missing+=("$m"); fi
done
if ((${#missing[@]})); then
  if [[ -n ${WHEELS:-} ]]; then
    src=(--no-index --find-links "$WHEELS")
  else
    src=()
  fi
  # --no-deps: their own needs (absl-py, PyYAML, protobuf, numpy) come with such images,
  # and pip must not replace the image's packages.
  run "$py" -m pip install -q --no-deps --target "$work/site" "${src[@]}" "${missing[@]}"
  export PYTHONPATH=$work/site${PYTHONPATH:+:$PYTHONPATH}
fi
run "$py" -c "import jax; print(jax.__version__, jax.devices()); assert jax.default_backend() == '$backend'"
if [[ -z $dry ]]; then
  # The loader's batches and decoded images live in /dev/shm, of which a container may
  # have 64 MB: enlarge it where this runs as root, else say so.
  if (($(df -k --output=avail /dev/shm | tail -1) < 4194304)); then
    if [[ $(id -u) == 0 ]] && mount -o remount,size=8g /dev/shm; then
      echo "# /dev/shm enlarged to 8 GB"
    else
      echo "# /dev/shm has under 4 GB free: main_b64_128_bf16 and input_pipeline_128 may fail"
    fi
  fi
  { nvidia-smi; echo "cores: $(nproc)"; free -g; df -h /dev/shm "$work"; } > "$out/machine.txt" 2>&1 || true
fi
args=(--only "$cases" --json "$out/gpu.json" --profile "$work/profile" --case_timeout "$case_timeout")
# shellcheck disable=SC2086  # RUN_ARGS is a list of words
echo "+ $py benchmarks/run.py ${args[*]} ${RUN_ARGS:-}"
if [[ -z $dry ]]; then
  cd "$repo"
  status=0
  # shellcheck disable=SC2086
  PYTHONUNBUFFERED=1 timeout -k 20 "$time_limit" "$py" benchmarks/run.py "${args[@]}" \
    ${RUN_ARGS:-} 2>&1 | tee "$out/log.txt" || status=$?
  if [[ -d $work/profile ]]; then
    tar czf "$out/profile.tgz" -C "$work" profile
    if (($(stat -c %s "$out/profile.tgz") > 15000000)); then
      tar czf "$out/profile.tgz" -C "$work" --exclude='*.xplane.pb' profile
    fi
  fi
  ((status == 0)) || echo "gpu.sh: run.py ended with status $status (124: past TIME_LIMIT)" | tee -a "$out/log.txt"
  exit "$status"
fi
