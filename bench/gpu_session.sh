#!/usr/bin/env bash
# Every GPU check the open issues need, as stages of one script, on a GPU host with no package index
# (../shared/notes/gpu-h200.md). One device call per stage (a call runs at most 10 minutes), in this order:
#
#   bash bench/gpu_session.sh bench   # ~6.5 min: bench/bench_gpu.py on configs/1b.yaml (issue 13 throughput, the fused
#                                     #   loss if the budget allows; issue 16 memory estimate vs
#                                     #   max_memory_allocated in 3 settings, plan's step time vs measured)
#                                     #                                                                 timeout_s 450
#   bash bench/gpu_session.sh profile # ~4.5 min: where the step time goes (issue 13's next lever): trainer without AC,
#                                     #   with the config's AC, HF compiled, each profiled over 2 steps (--profile:
#                                     #   device time by category, GPU busy %, Perfetto traces and memory
#                                     #   snapshots in $OUT)                                              timeout_s 330
#   bash bench/gpu_session.sh tier    # <= 4 min: python -m pytest -m gpu (issue 12 item 4)           timeout_s 330
#   bash bench/gpu_session.sh suite   # python -m pytest, the README's test command, GPU visible (issue 12 item 3)
#   bash bench/gpu_session.sh small   # bench on configs/125m.yaml (issue 13: the small shape; then, budget allowing,
#                                     #   the fused loss and the document mask: its step time vs causal,
#                                     #   FlexAttention (auto on CUDA) vs SDPA's dense mask)             timeout_s 240
#   bash bench/gpu_session.sh fp8     # 1B trainer no AC: bf16 vs precision.fp8 tensorwise / rowwise
#                                     #   (issue 13's FP8 lever: does it pay at 1B?)                      timeout_s 330
#
# Carry the wheels: device `run` with carry [".whl"] (bench/gpu_wheels.sh fills .whl/ on the CPU machine). Logs and
# JSON land in $OUT (or bench/out/): <stage>.log, bench_gpu_*.json, junit XML for the test stages.
set -uo pipefail
cd "$(dirname "$0")/.."
stages="bench|profile|tier|suite|small|fp8"
stage=${1:?"usage: bash bench/gpu_session.sh $stages"}
out_dir=${OUT:-bench/out}
mkdir -p "$out_dir"

# What the host lacks goes to /tmp/site; the package itself runs from the tree (no install): a `pretrain` shim on PATH
# for the tests that call the console script.
if [ -d .whl ] && ! python3 -c "import deepspeed, megatron.core, pydantic" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
mkdir -p /tmp/shim && printf '#!/bin/sh\nexec python3 -m launch "$@"\n' > /tmp/shim/pretrain && chmod +x /tmp/shim/pretrain
export PATH=/tmp/shim:$PATH
{ date -u +%FT%TZ; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader;
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
  git log --oneline -1 2>/dev/null; } 2>&1 | tee "$out_dir/$stage.log"

run_timed() {  # label, timeout seconds, command...
  local label=$1 limit_s=$2; shift 2
  local start_s=$(date +%s)
  # SIGINT first: pytest then ends as on Ctrl-C and still writes its junit XML and durations for the tests that ran
  # (a plain SIGTERM loses them); bench_gpu.py has written its JSON after every loop anyway. SIGKILL 20 s later.
  timeout -s INT -k 20 "$limit_s" "$@" 2>&1 | tee -a "$out_dir/$stage.log"
  local rc=${PIPESTATUS[0]}
  echo "== $label: exit $rc in $(( $(date +%s) - start_s )) s (limit $limit_s s)" | tee -a "$out_dir/$stage.log"
}

case $stage in
  bench)  # trainer no AC, trainer with the config's AC (ZeRO-2), HF eager, HF compiled, then ZeRO-1 + core_attention
    DS_ACCELERATOR=cuda run_timed bench 410 python3 bench/bench_gpu.py --out "$out_dir/bench_gpu_1b.json" \
      --then-variant "zero1_core_attn=zero.stage=1,parallel.activation_checkpointing=core_attention" \
      --then-variant "fused_loss=parallel.activation_checkpointing=none,parallel.lm_loss=fused_linear" ;;
  profile)  # steps 3-4 of the warm-up call are profiled (past the compile of steps 1-2); the timed numbers cross-check bench
    DS_ACCELERATOR=cuda run_timed profile 300 python3 bench/bench_gpu.py --profile --memory-snapshot \
      --skip hf_eager --steps 4 --warmup-steps 4 --budget-s 230 --out "$out_dir/bench_gpu_1b_profile.json" ;;
  small)    # small models are where launch overhead shows: --profile's GPU busy % says how much
    DS_ACCELERATOR=cuda run_timed small 210 python3 bench/bench_gpu.py --config configs/125m.yaml --budget-s 150 \
      --profile \
      --then-variant "fused_loss=parallel.activation_checkpointing=none,parallel.lm_loss=fused_linear" \
      --then-variant "documents=parallel.activation_checkpointing=none,model.attention_mask=document,model.reset_position_ids=true" \
      --then-variant "documents_sdpa=parallel.activation_checkpointing=none,model.attention_mask=document,model.reset_position_ids=true,parallel.attention_kernel=sdpa" \
      --out "$out_dir/bench_gpu_125m.json" ;;
  fp8)    # the trainer alone (compiled, as on CUDA by default): FP8's matmuls against bf16's on the same shape
    DS_ACCELERATOR=cuda run_timed fp8 300 python3 bench/bench_gpu.py --skip hf_eager hf_compile --budget-s 240 --profile \
      --variant "no_ac=parallel.activation_checkpointing=none" \
      --variant "fp8_tensorwise=parallel.activation_checkpointing=none,precision.fp8=tensorwise" \
      --variant "fp8_rowwise=parallel.activation_checkpointing=none,precision.fp8=rowwise" \
      --out "$out_dir/bench_gpu_1b_fp8.json" ;;
  tier)   # conftest sets DS_ACCELERATOR=cpu for the CPU tests; the CUDA runs must switch DeepSpeed themselves
    run_timed tier 300 python3 -m pytest -m gpu -q -p no:cacheprovider --durations=0 --junitxml="$out_dir/tier.xml" ;;
  suite)
    run_timed suite 560 python3 -m pytest -q -p no:cacheprovider --durations=20 --junitxml="$out_dir/suite.xml" ;;
  *) echo "unknown stage $stage: $stages" >&2; exit 2 ;;
esac
