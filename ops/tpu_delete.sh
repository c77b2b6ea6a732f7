#!/usr/bin/env bash
# Delete a TPU VM (and everything on its disks: copy results off first).
#
# Usage: ops/tpu_delete.sh --name NAME [options]
#   --name NAME      TPU VM name
#   --quiet          do not ask for confirmation
#   --async          return once the deletion is requested
#   --zone Z         zone (default: the one ops/tpu_create.sh recorded)
#   --project P      GCP project (default: recorded, else gcloud config get-value project)
#   --dry-run        print the gcloud command and run nothing
#   -h, --help       this help
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

flags=()
while (($#)); do
  [[ $1 == --*=* ]] && set -- "${1%%=*}" "${1#*=}" "${@:2}"
  case $1 in
    --name) need_value "$@"; NAME=$2; shift 2 ;;
    --zone) need_value "$@"; ZONE=$2; shift 2 ;;
    --project) need_value "$@"; PROJECT=$2; shift 2 ;;
    --quiet | --async) flags+=("$1"); shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done

resolve_tpu
run gcloud compute tpus tpu-vm delete "$NAME" --zone="$ZONE" --project="$PROJECT" ${flags[@]+"${flags[@]}"}
if ((!DRY_RUN)); then
  rm -f "$SID_TPU_STATE_DIR/$NAME" "$SID_TPU_STATE_DIR/$NAME.dry-run"
  [[ " ${flags[*]-} " == *" --async "* ]] && echo "Deletion of TPU $NAME in $ZONE requested." || echo "Deleted TPU $NAME in $ZONE."
fi
