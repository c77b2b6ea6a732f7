#!/usr/bin/env bash
# The RL step's speed on one lent GPU in one command (issue 25), the benches in order of value, each under its own
# timeout, all within GPU_RL_SPEED_TOTAL_S (540 s) of wall clock including the wheel install and every compile:
#   1. bench/rl_throughput.py: one RL step at 1.5B, 64 prompts x 16 beams, sid against the TRL-style baseline
#   2. bench/rl_packing.py --arch 1.5b: the reference pass and the update, packed rows against one prompt per row
#   3. bench/rl_rollout_chunks.py --arch 1.5b: the rollout of 64 preset prompts in 4 length-sorted chunks against 1
# It needs .whl/ and .gpudata/ (minionerec_industrial/ with train_partial.csv, qwen2_tokenizer/), as
# bench/gpu_quality.sh does, and writes each bench's JSON and output (NAME.json, NAME.txt) to $OUT.
# CPU smoke of the same steps (each bench's --tiny): GPU_RL_SPEED_SMOKE=1 OUT=/tmp/out bash bench/gpu_rl_speed.sh
set -uo pipefail
cd "$(dirname "$0")/.."
T0=$SECONDS
OUT=${OUT:-runs/bench/gpu_rl_speed}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
TOTAL_S=${GPU_RL_SPEED_TOTAL_S:-540}

# shellcheck source=bench/gpu_env.sh
source bench/gpu_env.sh # PY, the wheels, PYTHONPATH, SID_DATA_ROOT
for d in minionerec_industrial qwen2_tokenizer; do
  if [ ! -d "$SID_DATA_ROOT/$d" ]; then
    echo "$SID_DATA_ROOT/$d not found: copy it into .gpudata/ (or set SID_DATA_ROOT)"
    exit 1
  fi
done
nvidia-smi -L 2>/dev/null || echo "nvidia-smi: no GPU listed"

# NAME, its time limit in seconds, its flags (none of these GPU times is measured yet: the limits are guesses).
if [ "${GPU_RL_SPEED_SMOKE:-0}" = 1 ]; then
  BENCHES=("rl_throughput 300 --tiny" "rl_packing 120 --tiny" "rl_rollout_chunks 120 --tiny")
else
  BENCHES=("rl_throughput 330"
    "rl_packing 120 --arch 1.5b --dtype bfloat16 --remat dots --steps 2"
    "rl_rollout_chunks 90 --arch 1.5b --dtype bfloat16 --prompts 64 --steps 2")
fi
for spec in "${BENCHES[@]}"; do
  read -r name limit flags <<<"$spec"
  left=$((TOTAL_S - (SECONDS - T0) - 10))
  if [ "$left" -lt 30 ]; then
    echo "== $name: skipped, ${left} s left of GPU_RL_SPEED_TOTAL_S=$TOTAL_S"
    continue
  fi
  limit=$((limit < left ? limit : left))
  echo "== $name ($limit s at most)"
  # shellcheck disable=SC2086 # flags is a word list
  timeout -k 10 "$limit" "$PY" "bench/$name.py" $flags --out "$OUT/$name.json" 2>&1 | tee "$OUT/$name.txt"
  echo "== $name: exit ${PIPESTATUS[0]} after $((SECONDS - T0)) s (124 or 137: stopped by its time limit)"
done
echo "total $((SECONDS - T0)) s; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
