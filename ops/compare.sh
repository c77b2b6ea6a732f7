#!/usr/bin/env bash
# A/B comparison of two git refs: train then evaluate each with the same configs, and report side by side.
#
# Usage: ops/compare.sh --a REF --b REF --train-config YAML --eval-config YAML [options]
#   --a REF, --b REF         commits, branches or tags (the same ref twice measures run-to-run noise)
#   --train-config YAML      train preset for both runs (a path in this checkout)
#   --eval-config YAML       eval preset for both runs
#   --train-config-b YAML    a different train preset for B, to compare two configs (default: the same)
#   --eval-config-b YAML     a different eval preset for B (default: the same)
#   --where local|tpu        run here (default) or on a TPU VM over ops/tpu_ssh.sh
#   --out DIR                results directory (default: workdir/compare/<timestamp>)
#   --keep-worktrees         leave the two worktrees in place
#   --name NAME              (tpu) TPU VM name; --zone Z and --project P as for ops/tpu_ssh.sh
#   --no-bootstrap           (tpu) skip ops/tpu_bootstrap.sh, which otherwise runs first (idempotent) at ref B
#   --dry-run                check the arguments as a run does (refs, config files; TPU name, zone, project),
#                            print the commands a run would execute, one a line, shell-quoted, in order (with
#                            --where tpu, the ops/tpu_*.sh print their gcloud commands), and create nothing: no
#                            worktree, no OUT. Not shown here: each side's check that it imports its worktree's
#                            sid, the .env link into it, and its log OUT/logs/SIDE.log
#   -h, --help               this help
#
# Each ref is checked out as a detached git worktree, OUT/a and OUT/b. Both runs use ONE Python environment
# ($SID_PYTHON, default .venv/bin/python of this checkout; on a TPU the bootstrap venv ~/sid/.venv) with
# PYTHONPATH=<worktree> and PYTHONSAFEPATH=1, so each worktree's own `sid` code runs (checked before training)
# without building a venv per ref; the packages are this checkout's, so refs needing other package versions
# are not comparable this way. Both runs start in this checkout (on a TPU: ~/sid), so relative paths in the
# configs (./workdir/models/...) mean the same files, and share $SID_DATA_ROOT and .env. The runs are
# sequential, A then B. Train runs with --eval.no-enabled; the eval preset then evaluates the last checkpoint.
# W&B runs (when the presets enable W&B) are named <OUT name>-<a|b>-<sha7>[-eval].
#
# Results: OUT/configs/ (the presets as used), OUT/runs/{a,b}-<sha7>/ (run dirs; on a TPU the checkpoints stay
# on the workers), OUT/logs/{a,b}.log, OUT/report.md and OUT/loss.png (python -m sid.compare).
# Exit status 0 when both runs trained and evaluated; 1 otherwise, after reporting whatever exists.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

A="" B="" WHERE=local OUT="" KEEP=0 BOOTSTRAP=1
declare -A CFG=()
while (($#)); do
  [[ $1 == --*=* ]] && set -- "${1%%=*}" "${1#*=}" "${@:2}"
  case $1 in
    --a) need_value "$@"; A=$2; shift 2 ;;
    --b) need_value "$@"; B=$2; shift 2 ;;
    --train-config) need_value "$@"; CFG[train_a]=$2; shift 2 ;;
    --eval-config) need_value "$@"; CFG[eval_a]=$2; shift 2 ;;
    --train-config-b) need_value "$@"; CFG[train_b]=$2; shift 2 ;;
    --eval-config-b) need_value "$@"; CFG[eval_b]=$2; shift 2 ;;
    --where) need_value "$@"; WHERE=$2; shift 2 ;;
    --out) need_value "$@"; OUT=$2; shift 2 ;;
    --keep-worktrees) KEEP=1; shift ;;
    --name) need_value "$@"; NAME=$2; shift 2 ;;
    --zone) need_value "$@"; ZONE=$2; shift 2 ;;
    --project) need_value "$@"; PROJECT=$2; shift 2 ;;
    --no-bootstrap) BOOTSTRAP=0; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done

[[ -n $A && -n $B ]] || die "pass the two refs: --a REF --b REF (make: A=... B=...)"
[[ -n ${CFG[train_a]-} && -n ${CFG[eval_a]-} ]] ||
  die "pass --train-config YAML and --eval-config YAML (make: TRAIN_CONFIG=... EVAL_CONFIG=...)"
CFG[train_b]=${CFG[train_b]:-${CFG[train_a]}}
CFG[eval_b]=${CFG[eval_b]:-${CFG[eval_a]}}
for key in train_a train_b eval_a eval_b; do
  [[ -f ${CFG[$key]} ]] || die "config file not found: ${CFG[$key]}"
done
[[ $WHERE == local || $WHERE == tpu ]] || die "--where must be local or tpu, not '$WHERE'"

PY=${SID_PYTHON:-$SID_ROOT/.venv/bin/python}
[[ $PY != */* || $PY == /* ]] || PY=$PWD/$PY
command -v "$PY" >/dev/null || die "no Python at $PY: run 'make install' or set SID_PYTHON"

declare -A SHA=()
SHA[a]=$(git -C "$SID_ROOT" rev-parse --verify --quiet "$A^{commit}") || die "unknown ref '$A' in $SID_ROOT"
SHA[b]=$(git -C "$SID_ROOT" rev-parse --verify --quiet "$B^{commit}") || die "unknown ref '$B' in $SID_ROOT"
declare -A REFNAME=([a]=$A [b]=$B)

# $1 as an absolute path, creating nothing (so that --dry-run prints the paths a run uses).
abs_path() {
  local dir
  if [[ -d $1 ]]; then
    (cd "$1" && pwd)
  elif [[ -d $(dirname "$1") ]]; then
    dir=$(cd "$(dirname "$1")" && pwd)
    printf '%s/%s\n' "${dir%/}" "$(basename "$1")"
  elif [[ $1 == /* ]]; then
    printf '%s\n' "$1"
  else
    printf '%s/%s\n' "$PWD" "$1"
  fi
}

OUT=$(abs_path "${OUT:-$SID_ROOT/workdir/compare/$(date +%Y%m%d-%H%M%S)}")
[[ ! -e $OUT/a && ! -e $OUT/b ]] || die "$OUT already has a/ or b/: pass another --out"

if [[ $WHERE == local ]]; then
  export SID_DATA_ROOT=${SID_DATA_ROOT:-$SID_ROOT/../shared/data}
  [[ ! -d $SID_DATA_ROOT ]] || SID_DATA_ROOT=$(cd "$SID_DATA_ROOT" && pwd)
  BASE=$OUT
else
  resolve_tpu
  TPU_ARGS=(--name "$NAME" --zone "$ZONE" --project "$PROJECT")
  ((!DRY_RUN)) || TPU_ARGS+=(--dry-run)
  [[ $(basename "$OUT") =~ ^[A-Za-z0-9._-]+$ ]] || die "--where tpu needs an --out whose name is [A-Za-z0-9._-]+"
  BASE=workdir/compare/$(basename "$OUT") # on the workers, relative to ~/sid
fi

run mkdir -p "$OUT/configs" "$OUT/logs" "$OUT/runs"
for side in a b; do
  run cp "${CFG[train_$side]}" "$OUT/configs/train_$side.yaml"
  run cp "${CFG[eval_$side]}" "$OUT/configs/eval_$side.yaml"
done

# One side's train and eval commands, a line of shell text each. The python ($2), base directory ($3) and run
# directory ($4) are shell text too: quoted paths (--dry-run), or "$variables" set by side_script.
side_commands() {
  local side=$1 py=$2 base=$3 run=$4 wandb
  wandb=$(basename "$OUT")-$side-${SHA[$side]:0:7}
  echo "$py -m sid.train --config $base/configs/train_$side.yaml --train.output-dir $run --eval.no-enabled" \
    "--wandb.name $(shell_quote "$wandb")"
  echo "$py -m sid.eval --config $base/configs/eval_$side.yaml --eval.checkpoint $run --output-dir $run/eval" \
    "--wandb.name $(shell_quote "$wandb-eval")"
}

# One side's job, as one line of bash run from the checkout (here, or ~/sid on every TPU worker): check that
# `sid` imports from the side's worktree, train, evaluate. Exit 3/4/5: wrong code / training / eval failed.
side_script() {
  local side=$1 py=$2 cmds
  # shellcheck disable=SC2016 # expanded by the script, not here
  mapfile -t cmds < <(side_commands "$side" '"$py"' '"$base"' '"$run"')
  printf 'side=%s sha=%s base=%s py=%s; ' "$side" "${SHA[$side]:0:7}" "$(shell_quote "$BASE")" "$(shell_quote "$py")"
  tr '\n' ' ' <<'EOF' | sed -e 's/  */ /g'
set -euo pipefail;
case $py in */*) py=$(cd "${py%/*}" && pwd)/${py##*/};; esac;
base=$(cd "$base" && pwd); wt=$base/$side; run=$base/runs/$side-$sha;
if [ -f .env ] && [ ! -e "$wt/.env" ]; then ln -s "$PWD/.env" "$wt/.env"; fi;
export PYTHONPATH="$wt${PYTHONPATH:+:$PYTHONPATH}" PYTHONSAFEPATH=1;
src=$("$py" -c 'import os, sid; print(os.path.realpath(sid.__file__))');
case $src in "$(cd "$wt" && pwd -P)"/*) ;; *) echo "compare: $side imports sid from $src, not from $wt" >&2; exit 3;; esac;
echo "compare: $side at $sha: sid from $src; data root ${SID_DATA_ROOT:-../shared/data (default)}";
EOF
  # shellcheck disable=SC2016
  printf '%s || { echo "compare: $side: training failed" >&2; exit 4; }; ' "${cmds[0]}"
  # shellcheck disable=SC2016
  printf '%s || { echo "compare: $side: evaluation failed" >&2; exit 5; };' "${cmds[1]}"
}

# --dry-run, here: one side's train and eval commands with the environment side_script gives them.
print_local_side() {
  local side=$1 env line
  env=$(quote_cmd env "SID_DATA_ROOT=$SID_DATA_ROOT" "PYTHONPATH=$OUT/$side${PYTHONPATH:+:$PYTHONPATH}" \
    PYTHONSAFEPATH=1)
  while IFS= read -r line; do
    printf '%s %s\n' "$env" "$line"
  done < <(side_commands "$side" "$(shell_quote "$PY")" "$(shell_quote "$OUT")" \
    "$(shell_quote "$OUT/runs/$side-${SHA[$side]:0:7}")")
}

cleanup() {
  ((KEEP)) && return 0
  for side in a b; do
    if [[ $WHERE == local ]] && { ((DRY_RUN)) || [[ -e $OUT/$side ]]; }; then
      run git -C "$SID_ROOT" worktree remove --force "$OUT/$side" || true
    fi
  done
  run git -C "$SID_ROOT" worktree prune || true
  if [[ $WHERE == tpu && ${REMOTE_READY-0} == 1 ]]; then
    "$SID_ROOT/ops/tpu_ssh.sh" "${TPU_ARGS[@]}" --worker all -- \
      "git worktree remove --force $BASE/a; git worktree remove --force $BASE/b; git worktree prune" || true
  fi
}
trap cleanup EXIT

if [[ $WHERE == tpu ]]; then
  ((!BOOTSTRAP)) || "$SID_ROOT/ops/tpu_bootstrap.sh" "${TPU_ARGS[@]}" --ref "${SHA[b]}"
  ENV_ARGS=()
  if [[ -f $SID_ROOT/.env ]]; then
    "$SID_ROOT/ops/tpu_sync_env.sh" "${TPU_ARGS[@]}"
    ENV_ARGS=(--env-file .env)
  fi
  REMOTE_READY=1
  setup="set -e; mkdir -p $BASE/runs $BASE/configs; for c in ${SHA[a]} ${SHA[b]}; do"
  setup+=" git cat-file -e \$c^{commit} 2>/dev/null || git fetch --quiet origin \$c; done;"
  setup+=" git worktree add --detach --quiet $BASE/a ${SHA[a]}; git worktree add --detach --quiet $BASE/b ${SHA[b]}"
  "$SID_ROOT/ops/tpu_ssh.sh" "${TPU_ARGS[@]}" --worker all -- "$setup" ||
    die "could not check out ${SHA[a]} and ${SHA[b]} on $NAME: are both pushed to origin?"
  run gcloud compute tpus tpu-vm scp "$OUT"/configs/{eval,train}_{a,b}.yaml "$NAME:sid/$BASE/configs/" \
    --zone="$ZONE" --project="$PROJECT" --worker=all
else
  for side in a b; do
    run git -C "$SID_ROOT" worktree add --detach --quiet "$OUT/$side" "${SHA[$side]}"
  done
fi

declare -A WHY=([3]="its worktree's sid was not the one imported" [4]="training failed" [5]="evaluation failed")
failed=()
run cd "$SID_ROOT"
for side in a b; do
  if [[ $WHERE == local ]]; then
    ((!DRY_RUN)) || { print_local_side "$side"; continue; }
    job=(bash -c "$(side_script "$side" "$PY")")
  else
    job=("$SID_ROOT/ops/tpu_ssh.sh" "${TPU_ARGS[@]}" --worker all ${ENV_ARGS[@]+"${ENV_ARGS[@]}"} --
      "$(side_script "$side" .venv/bin/python)")
    ((!DRY_RUN)) || { "${job[@]}"; continue; }
  fi
  echo "=== $side: ${REFNAME[$side]} (${SHA[$side]:0:7}), log $OUT/logs/$side.log" >&2
  if "${job[@]}" 2>&1 | tee "$OUT/logs/$side.log"; then
    continue
  else
    rc=$?
  fi
  failed+=("$side (${REFNAME[$side]}): ${WHY[$rc]:-exit status $rc}; see $OUT/logs/$side.log")
done

if [[ $WHERE == tpu ]]; then
  "$SID_ROOT/ops/tpu_ssh.sh" "${TPU_ARGS[@]}" --worker 0 -- \
    "tar -czf $BASE/results.tgz -C $BASE --exclude=checkpoints runs" &&
    run gcloud compute tpus tpu-vm scp "$NAME:sid/$BASE/results.tgz" "$OUT/" --zone="$ZONE" \
      --project="$PROJECT" --worker=0 &&
    run tar -xzf "$OUT/results.tgz" -C "$OUT" && run rm -f "$OUT/results.tgz" ||
    failed+=("copying the results back from $NAME (worker 0: ~/sid/$BASE/runs)")
fi

labels=()
for side in a b; do
  label=${REFNAME[$side]}
  [[ ${SHA[$side]} == "$label"* ]] || label+=" @ ${SHA[$side]:0:7}"
  labels+=("$label")
done
compare_args=(--out "$OUT" --label-a "${labels[0]}" --label-b "${labels[1]}"
  --train-config "${CFG[train_a]}" --eval-config "${CFG[eval_a]}")
[[ ${CFG[train_b]} == "${CFG[train_a]}" ]] || compare_args+=(--train-config-b "${CFG[train_b]}")
[[ ${CFG[eval_b]} == "${CFG[eval_a]}" ]] || compare_args+=(--eval-config-b "${CFG[eval_b]}")
run env "PYTHONPATH=$SID_ROOT" PYTHONSAFEPATH=1 "$PY" -m sid.compare "$OUT/runs/a-${SHA[a]:0:7}" \
  "$OUT/runs/b-${SHA[b]:0:7}" "${compare_args[@]}" || failed+=("the report (python -m sid.compare)")

((!DRY_RUN)) || exit 0 # the EXIT trap prints the clean-up
echo "Report: $OUT/report.md"
if ((${#failed[@]})); then
  printf 'FAILED: %s\n' "${failed[@]}" >&2
  exit 1
fi
