#!/usr/bin/env bash
# The GPU check on a lent device, in one run: the card, then gpu_check.py's real DeepSpeed
# pretraining steps at the paper's per-GPU batch for Base (bf16, and fp16 with loss scaling:
# what a V100 runs), Large and Huge (bf16). Each model's results go to OUTDIR/gpu_check_<model>.json.
# When DeepSpeed's FusedAdam cannot be built there (no nvcc, a CUDA it does not know), that
# model is checked again with torch's Adam, and the results say which optimizer ran.
#
#   benchmarks/gpu_check.sh [OUTDIR] [gpu_check.py options...]
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-gpu_check_out}
shift $(( $# > 0 ? 1 : 0 ))
mkdir -p "$out"
python=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
echo "TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST-unset}; $(nproc) CPUs"

failed=0
check() {  # MODEL PRECISION...
  local model=$1; shift
  echo "== $model: $*"
  "$python" benchmarks/gpu_check.py --model "$model" --precisions "$@" --json "$out/gpu_check_$model.json" "${extra[@]}" && return
  echo "== $model: again with torch's Adam"
  "$python" benchmarks/gpu_check.py --model "$model" --precisions "$@" --json "$out/gpu_check_$model.json" --torch-adam "${extra[@]}" \
    || failed=1
}
extra=("$@")
check base bf16 fp16
check large bf16
check huge bf16
exit $failed
