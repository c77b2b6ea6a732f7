#!/usr/bin/env bash
# Create a Cloud TPU VM, trying a list of zones in order until one has capacity and quota.
#
# Usage: ops/tpu_create.sh --name NAME --zones ZONE[,ZONE...] [options]
#   --name NAME         TPU VM name (lowercase letters, digits, '-')
#   --zones Z1,Z2,...   zones tried in order; the next is tried only when gcloud reports no capacity or quota
#   --type TYPE         accelerator type (default v6e-8); v6e-*, v4-*, v5litepod-* (alias v5e-*)
#   --version V         runtime version (default from the type: v6e -> v6e-ubuntu-2404,
#                       v4 -> tpu-ubuntu2204-base, v5e -> v2-alpha-tpuv5-lite)
#   --on-demand         on-demand capacity (default: spot, preemptible at any time, much cheaper)
#   --project P         GCP project (default: gcloud config get-value project)
#   --async             return once the request is accepted (capacity errors may then surface later,
#                       so zone fallback only covers errors gcloud reports at once)
#   --dry-run           print the gcloud command for each zone, one per line, and run nothing; records the
#                       first zone for other dry runs only (workdir/tpu/NAME.dry-run)
#   -h, --help          this help
#
# On success prints the zone and records it (and the project) in workdir/tpu/NAME, so the other ops/tpu_*.sh
# scripts need only --name.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

# gcloud messages that mean "this zone cannot host it now", as opposed to a mistake in the request.
NO_CAPACITY='no more capacity|RESOURCE_EXHAUSTED|ZONE_RESOURCE_POOL_EXHAUSTED|[Qq]uota limit|[Qq]uota exceeded|[Ii]nsufficient capacity|does not have enough resources'

ZONES="" TYPE=v6e-8 VERSION="" SPOT=1 ASYNC=0
while (($#)); do
  [[ $1 == --*=* ]] && set -- "${1%%=*}" "${1#*=}" "${@:2}"
  case $1 in
    --name) need_value "$@"; NAME=$2; shift 2 ;;
    --zones | --zone) need_value "$@"; ZONES=$2; shift 2 ;;
    --type) need_value "$@"; TYPE=$2; shift 2 ;;
    --version) need_value "$@"; VERSION=$2; shift 2 ;;
    --project) need_value "$@"; PROJECT=$2; shift 2 ;;
    --on-demand) SPOT=0; shift ;;
    --spot) SPOT=1; shift ;;
    --async) ASYNC=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done

require_name
if [[ $TYPE =~ ^v5e-([0-9]+)$ ]]; then
  TYPE=v5litepod-${BASH_REMATCH[1]} # the API's name for v5e slices
fi
if [[ -z $VERSION ]]; then
  case $TYPE in
    v6e-[0-9]*) VERSION=v6e-ubuntu-2404 ;;
    v4-[0-9]*) VERSION=tpu-ubuntu2204-base ;;
    v5litepod-[0-9]*) VERSION=v2-alpha-tpuv5-lite ;;
    *) die "no default runtime version for accelerator type '$TYPE' (known: v6e-N, v4-N, v5litepod-N): pass --version" ;;
  esac
fi
IFS=, read -r -a zone_list <<<"${ZONES// /}"
((${#zone_list[@]})) || die "no zones: pass --zones ZONE[,ZONE...] (make: ZONES=...); list where $TYPE exists with 'gcloud compute tpus tpu-vm accelerator-types list --zone=ZONE'"
((DRY_RUN)) || require_gcloud
resolve_project

capacity=spot
((SPOT)) || capacity=on-demand

# The create command for zone $1, into the array `cmd`.
create_argv() {
  cmd=(gcloud compute tpus tpu-vm create "$NAME" --zone="$1" --accelerator-type="$TYPE" --version="$VERSION"
    --project="$PROJECT")
  if ((SPOT)); then cmd+=(--spot); fi
  if ((ASYNC)); then cmd+=(--async); fi
}

if ((DRY_RUN)); then
  echo "# zones are tried in this order; the next only after a capacity or quota error" >&2
  for ZONE in "${zone_list[@]}"; do
    create_argv "$ZONE"
    run "${cmd[@]}"
  done
  ZONE=${zone_list[0]}
  state_put # NAME.dry-run: later dry runs (make tpu-create compare DRY_RUN=1) use the first zone
  exit 0
fi

errors=$(mktemp)
trap 'rm -f "$errors"' EXIT
rc=1
for ZONE in "${zone_list[@]}"; do
  create_argv "$ZONE"
  echo "+ $(quote_cmd "${cmd[@]}")" >&2
  # gcloud's stderr still reaches the terminal; a copy is kept to tell capacity errors from real ones.
  if { "${cmd[@]}" 2>&1 1>&3 3>&- | tee "$errors" >&2; } 3>&1; then
    rc=0
    break
  else
    rc=$?
  fi
  if ! grep -Eq "$NO_CAPACITY" "$errors"; then
    die "creating $NAME in $ZONE failed (exit $rc) for a reason other than capacity or quota; see gcloud's message above"
  fi
  echo "tpu_create: no $capacity capacity or quota for $TYPE in $ZONE" >&2
done
if ((rc != 0)); then
  echo "error: no $capacity capacity or quota for $TYPE in any of: ${zone_list[*]}." >&2
  echo "Try other zones, $([[ $capacity == spot ]] && echo '--on-demand, ')or later; quotas: https://console.cloud.google.com/iam-admin/quotas" >&2
  exit "$rc"
fi

state_put
rm -f "$SID_TPU_STATE_DIR/$NAME.dry-run"
if ((ASYNC)); then
  echo "Requested TPU $NAME ($TYPE, $capacity) in zone $ZONE (project $PROJECT); it is being created."
  echo "Wait for READY: gcloud compute tpus tpu-vm describe $NAME --zone=$ZONE --project=$PROJECT --format='value(state)'"
else
  echo "Created TPU $NAME ($TYPE, $capacity) in zone $ZONE (project $PROJECT)."
fi
echo "zone: $ZONE"
cat <<EOF
Next:
  make tpu-bootstrap TPU_NAME=$NAME          # venv + this repo at HEAD + jax[tpu] on every worker
  make tpu-sync-env TPU_NAME=$NAME           # copy .env (W&B key) to every worker
  make tpu-ssh TPU_NAME=$NAME ENV_FILE=.env CMD='.venv/bin/python -c "import jax; print(jax.devices())"'
  make tpu-delete TPU_NAME=$NAME             # stop paying
EOF
