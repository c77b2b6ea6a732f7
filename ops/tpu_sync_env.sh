#!/usr/bin/env bash
# Copy the local .env (W&B key and other secrets) to every worker of a TPU VM, cleaned, private and verified.
#
# Usage: ops/tpu_sync_env.sh --name NAME [options]
#   --name NAME        TPU VM name
#   --env-file FILE    local file to copy (default: .env at the repo root)
#   --dir DIR          checkout on the workers, relative to the home directory (default: sid); the file lands
#                      in DIR/.env, where sid's .env loader and `ops/tpu_ssh.sh --env-file .env` find it
#   --zone Z           zone (default: the one ops/tpu_create.sh recorded)
#   --project P        GCP project (default: recorded, else gcloud config get-value project)
#   --dry-run          print the gcloud commands and run nothing
#   -h, --help         this help
#
# The copy has a UTF-8 byte-order mark, CR line endings and trailing whitespace removed (a key pasted with a
# Windows line ending is otherwise sent with a '\r' and rejected as invalid), is chmod 600, and is checked on
# each worker against the SHA-256 of the cleaned file. Only variable names are printed, never values.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

ENV_FILE=$SID_ROOT/.env DIR=sid
while (($#)); do
  [[ $1 == --*=* ]] && set -- "${1%%=*}" "${1#*=}" "${@:2}"
  case $1 in
    --name) need_value "$@"; NAME=$2; shift 2 ;;
    --env-file) need_value "$@"; ENV_FILE=$2; shift 2 ;;
    --dir) need_value "$@"; DIR=$2; shift 2 ;;
    --zone) need_value "$@"; ZONE=$2; shift 2 ;;
    --project) need_value "$@"; PROJECT=$2; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done

resolve_tpu
[[ -f $ENV_FILE ]] || die "no $ENV_FILE: create it with lines like WANDB_API_KEY=... (see docs/sops/tpu_lifecycle.md)"

clean_dir=$(mktemp -d)
trap 'rm -rf "$clean_dir"' EXIT
clean=$clean_dir/.env
(
  umask 077
  sed -e '1s/^\xEF\xBB\xBF//' -e 's/\r$//' -e 's/[[:space:]]*$//' "$ENV_FILE" >"$clean"
  # A last line without a newline would be dropped by some readers.
  [[ ! -s $clean || $(tail -c1 "$clean") == "" ]] || echo >>"$clean"
)
crlf=$(grep -c $'\r$' "$ENV_FILE" || true)
names=$(sed -n 's/^[[:space:]]*\(export[[:space:]]\{1,\}\)\{0,1\}\([A-Za-z_][A-Za-z0-9_]*\)=.*/\2/p' "$clean" | paste -sd, -)
sha=$(sha256sum "$clean" | cut -d' ' -f1)
echo "tpu_sync_env: $ENV_FILE -> ~/$DIR/.env on every worker of $NAME; variables: ${names:-none}" \
  "(CRLF removed from $crlf lines); sha256 $sha" >&2

remote=$(shell_quote "$DIR/.env")
run gcloud compute tpus tpu-vm scp "$clean" "$NAME:$DIR/.env" --zone="$ZONE" --project="$PROJECT" --worker=all ||
  die "copying to $NAME failed: is ~/$DIR there (ops/tpu_bootstrap.sh creates it)?"
verify="chmod 600 $remote && [ \"\$(stat -c %a $remote)\" = 600 ] && echo $(shell_quote "$sha  $DIR/.env") | sha256sum --check --quiet -"
verify+=" && echo \"\$(hostname): $DIR/.env verified (sha256 and mode 600)\""
tpu_ssh_cmd all "$verify" || die "verification of ~/$DIR/.env failed on at least one worker of $NAME (see above)"
