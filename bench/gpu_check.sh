#!/usr/bin/env bash
# One GPU check for issue 13, from the repository root on a GPU host with no package index (docs/benchmarks.md).
#
#   bash bench/gpu_check.sh                                   # 1B (configs/1b.yaml), <= 6 min on one H200
#   bash bench/gpu_check.sh --config configs/125m.yaml --budget-s 150
#
# Installs the carried wheels in .whl/ (deepspeed, megatron-core, ... : what the GPU host lacks) into /tmp/site,
# points DeepSpeed at CUDA, then runs bench/bench_gpu.py under a hard timeout. Results: $OUT (the device tool's
# folder) or bench/out/, as bench_gpu_<config>.json and .log.
set -euo pipefail
out_dir=${OUT:-bench/out}
mkdir -p "$out_dir"
if [ -d .whl ] && ! python3 -c "import deepspeed, megatron.core" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
export DS_ACCELERATOR=cuda PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
name=1b
for ((i = 1; i <= $#; i++)); do
  if [ "${!i}" = "--config" ]; then j=$((i + 1)); name=$(basename "${!j}" .yaml); fi
  if [ "${!i}" = "--tiny" ]; then name=tiny; fi
done
# 400 s: the bench's own budget (330 s) stops starting loops; the last loop must still finish.
timeout 400 python3 bench/bench_gpu.py --out "$out_dir/bench_gpu_$name.json" "$@" 2>&1 | tee "$out_dir/bench_gpu_$name.log"
