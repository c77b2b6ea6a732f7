#!/usr/bin/env bash
# The LETTER Instruments quality sweep on one lent GPU, in one command, at most GPU_QUALITY_TOTAL_S (540 s) of wall
# clock including the wheel install and every compile. It needs, in the repository root:
#   .whl/      wheels of what the machine lacks (grain, tyro, array-record, portpicker, docstring-parser, typeguard:
#              ../shared/device/pack-wheels.sh), installed into /tmp/site; without .whl/ nothing is installed
#   .gpudata/  letter_instruments/ and qwen2_tokenizer/ (and built_sids/letter_instruments/ for that variant); with
#              GPU_QUALITY_MODE=industrial, minionerec_industrial/ (and built_sids/minionerec_industrial/)
# It writes to $OUT: results.json (rewritten after each run), quality.txt (the whole output), runs.tar.gz (each
# run's run_summary.json, config, metrics.jsonl and the tail of its log), then prints a compact table.
# CPU smoke of the same logic: GPU_QUALITY_SMOKE=1 OUT=/tmp/out bash bench/gpu_quality.sh
# Knobs: GPU_QUALITY_MODE (gpu: LETTER Instruments, the default; industrial: MiniOneRec Industrial from scratch),
# GPU_QUALITY_VARIANTS ("NAME:SEEDS ..."), GPU_QUALITY_PARALLEL, GPU_QUALITY_TOTAL_S, GPU_QUALITY_EXTRA
# (sid.train flags for every run); GPU_QUALITY_RL (an sid.rl preset, e.g. configs/rl/gpu/letter_instruments.yaml;
# off by default) runs GRPO on top of each SFT run that succeeds and reports the test metrics before and after,
# GPU_QUALITY_RL_EXTRA (sid.rl flags for every RL run, e.g. "--train.max-steps 300"). How long the RL preset takes
# on a GPU is not measured: the default SFT sweep alone is sized to the 9 minutes, so with RL sweep fewer runs, e.g.
#   GPU_QUALITY_RL=configs/rl/gpu/letter_instruments.yaml GPU_QUALITY_VARIANTS="base:0-2" GPU_QUALITY_PARALLEL=3
set -uo pipefail
cd "$(dirname "$0")/.."
T0=$SECONDS
OUT=${OUT:-runs/quality/gpu_out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
SMOKE=${GPU_QUALITY_SMOKE:-0}
TOTAL_S=${GPU_QUALITY_TOTAL_S:-540}
COPY_S=30 # left at the end to collect files and print the table

# shellcheck source=bench/gpu_env.sh
source bench/gpu_env.sh # PY, the wheels, PYTHONPATH, SID_DATA_ROOT

if [ "$SMOKE" = 1 ]; then
  # The same steps on a CPU: the tiny preset, two variants, a small budget.
  MODE=tiny
  VARIANTS=${GPU_QUALITY_VARIANTS:-"base:0-1 drop0:0"}
  PARALLEL=${GPU_QUALITY_PARALLEL:-3}
else
  MODE=${GPU_QUALITY_MODE:-gpu}
  case $MODE in
  gpu) DATA=letter_instruments ;;
  industrial) DATA=minionerec_industrial ;;
  *)
    echo "GPU_QUALITY_MODE=$MODE: expected gpu (LETTER Instruments) or industrial"
    exit 1
    ;;
  esac
  # Seeds 0-2 of the preset, then one seed of each variant, all at once: 7 small runs share the GPU (alone, one
  # such run trained and ranked the test split in 1.5-4 minutes; issue 24). `wide` (384 x 1536) costs about 2x.
  VARIANTS=${GPU_QUALITY_VARIANTS:-"base:0-2 drop0:0 drop0.2:0 ep10:0 ls0.1:0"}
  PARALLEL=${GPU_QUALITY_PARALLEL:-7}
  if [ -d "$SID_DATA_ROOT/built_sids/$DATA" ] && [ -z "${GPU_QUALITY_VARIANTS:-}" ]; then
    # Not in the default: 3 more runs at once might not fit the 9 minutes (unmeasured).
    echo "built_sids found; to sweep it: GPU_QUALITY_VARIANTS=\"base:0-2 built_sids:0-2 drop0:0 ep10:0\""
  fi
fi

for d in "${DATA:-letter_instruments}" qwen2_tokenizer; do
  if [ ! -d "$SID_DATA_ROOT/$d" ]; then
    echo "$SID_DATA_ROOT/$d not found: copy it into .gpudata/ (or set SID_DATA_ROOT)"
    exit 1
  fi
done
nvidia-smi -L 2>/dev/null || echo "nvidia-smi: no GPU listed"
"$PY" -c 'import jax; print("jax", jax.__version__, jax.devices())' || exit 1
"$PY" -c 'import sid.train' || exit 1 # an import error here costs seconds, not the sweep
RL_ARGS=()
if [ -n "${GPU_QUALITY_RL:-}" ]; then
  "$PY" -c 'import sid.rl.__main__' || exit 1
  RL_ARGS=(--rl "$GPU_QUALITY_RL" "--rl-extra=${GPU_QUALITY_RL_EXTRA:-}")
fi

SWEEP=runs/quality/$MODE-sweep
rm -rf "$SWEEP"
LEFT=$((TOTAL_S - (SECONDS - T0) - COPY_S))
if [ "$LEFT" -lt 60 ]; then
  echo "only ${LEFT} s left of GPU_QUALITY_TOTAL_S=$TOTAL_S after start-up: no sweep"
  exit 1
fi
echo "sweep: mode $MODE, variants $VARIANTS, $PARALLEL at a time, RL ${GPU_QUALITY_RL:-off}, ${LEFT} s left for it"
# Each run gets the time left; `timeout` bounds the whole sweep too (quality.py stops its runs on SIGTERM and
# keeps what finished in results.json). An RL run starts when its SFT run ends, in the same queue and budget.
# shellcheck disable=SC2086 # VARIANTS and GPU_QUALITY_EXTRA are word lists
timeout -k 20 "$LEFT" "$PY" bench/quality.py --mode "$MODE" --variants $VARIANTS --parallel "$PARALLEL" \
  --time-limit "$((LEFT - 10))" --sweep-dir "$SWEEP" --out "$OUT/results.json" ${RL_ARGS[@]+"${RL_ARGS[@]}"} \
  -- ${GPU_QUALITY_EXTRA:-} 2>&1 | tee "$OUT/quality.txt"
STATUS=${PIPESTATUS[0]}
echo "sweep exit status $STATUS after $((SECONDS - T0)) s (0: every run finished; 1: some failed or were stopped)"

# One archive: every run's summary, resolved config, metrics.jsonl (its valid curve; for RL runs also the rollout
# rewards) and the last 200 lines of its log (flat names; RL runs are NAME-rl).
STAGE=$(mktemp -d)
for log in "$SWEEP"/*.log; do
  [ -f "$log" ] || continue
  name=$(basename "$log" .log)
  tail -n 200 "$log" >"$STAGE/$name.log.tail"
  cp "$SWEEP/$name/run_summary.json" "$STAGE/$name.run_summary.json" 2>/dev/null
  cp "$SWEEP/$name/config_resolved.yaml" "$STAGE/$name.config_resolved.yaml" 2>/dev/null
  cp "$SWEEP/$name/metrics.jsonl" "$STAGE/$name.metrics.jsonl" 2>/dev/null
done
tar -czf "$OUT/runs.tar.gz" -C "$STAGE" . && rm -rf "$STAGE"

# quality.py printed the tables itself unless it was killed (timeout's 124 or 137): then print them from the JSON.
if [ ! -f "$OUT/results.json" ]; then
  echo "no run finished: see $OUT/quality.txt and the logs in $OUT/runs.tar.gz"
elif [ "$STATUS" -gt 1 ]; then
  "$PY" bench/quality.py --report "$OUT/results.json" | tee -a "$OUT/quality.txt"
fi
echo "total $((SECONDS - T0)) s; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
