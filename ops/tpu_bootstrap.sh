#!/usr/bin/env bash
# Install this repo on every worker of a TPU VM: a Python venv, the repo at a git ref, and jax[tpu].
#
# Usage: ops/tpu_bootstrap.sh --name NAME [options]
#   --name NAME       TPU VM name
#   --ref REF         commit, branch or tag to check out (default: this checkout's HEAD commit; it must be pushed)
#   --repo URL        repository to clone (default: git remote get-url origin)
#   --dir DIR         checkout directory on the workers, relative to the home directory (default: sid)
#   --python VER      Python version of the venv (default: 3.12)
#   --zone Z          zone (default: the one ops/tpu_create.sh recorded)
#   --project P       GCP project (default: recorded, else gcloud config get-value project)
#   --dry-run         print the gcloud command and run nothing
#   -h, --help        this help
#
# Idempotent: re-running fetches REF into the existing checkout and upgrades the venv in place. The venv is
# made by uv with its own CPython, so the result does not depend on the image's python3 (3.10 on
# tpu-ubuntu2204-base, which this package does not support). Installs `pip install -e .` (wandb included) plus
# jax[tpu] in the jax range of pyproject.toml, in one resolve so both agree.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

REF="" REPO="" DIR=sid PY_VERSION=3.12
while (($#)); do
  [[ $1 == --*=* ]] && set -- "${1%%=*}" "${1#*=}" "${@:2}"
  case $1 in
    --name) need_value "$@"; NAME=$2; shift 2 ;;
    --ref) need_value "$@"; REF=$2; shift 2 ;;
    --repo) need_value "$@"; REPO=$2; shift 2 ;;
    --dir) need_value "$@"; DIR=$2; shift 2 ;;
    --python) need_value "$@"; PY_VERSION=$2; shift 2 ;;
    --zone) need_value "$@"; ZONE=$2; shift 2 ;;
    --project) need_value "$@"; PROJECT=$2; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done

resolve_tpu
if [[ -z $REPO ]]; then
  REPO=$(git -C "$SID_ROOT" remote get-url origin 2>/dev/null) ||
    die "no --repo given and this checkout has no 'origin' remote: pass --repo URL (make: REPO=URL)"
fi
if [[ -z $REF ]]; then
  REF=$(git -C "$SID_ROOT" rev-parse --verify HEAD 2>/dev/null) ||
    die "no --ref given and this checkout has no commit: pass --ref REF (make: REF=...)"
fi
jax_range=$(sed -n 's/^[[:space:]]*"jax\([<>=!~][^"]*\)".*/\1/p' "$SID_ROOT/pyproject.toml")
[[ -n $jax_range ]] || die "no \"jax<range>\" dependency found in $SID_ROOT/pyproject.toml"

q_dir=$(shell_quote "$DIR")
q_repo=$(shell_quote "$REPO")
q_ref=$(shell_quote "$REF")
# shellcheck disable=SC2016 # single-quoted parts expand on the worker, not here
steps=(
  'set -euo pipefail'
  'export PATH="$HOME/.local/bin:$PATH"'
  'command -v uv >/dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh'
  "if [ -d $q_dir/.git ]; then git -C $q_dir remote set-url origin $q_repo; else git clone --quiet $q_repo $q_dir; fi"
  "git -C $q_dir fetch --quiet origin $q_ref"
  "git -C $q_dir checkout --quiet --detach FETCH_HEAD"
  "cd $q_dir"
  "uv venv --allow-existing --python $(shell_quote "$PY_VERSION") .venv"
  "uv pip install --python .venv/bin/python -e . $(shell_quote "jax[tpu]$jax_range")"
  "echo \"\$(hostname): \$(git rev-parse --short HEAD), jax \$(.venv/bin/python -c 'import jax; print(jax.__version__)')\""
)
remote=$(printf '%s; ' "${steps[@]}")
tpu_ssh_cmd all "${remote%; }"
((DRY_RUN)) || echo "Bootstrapped $NAME at $REF: ~/$DIR/.venv on every worker."
