#!/usr/bin/env bash
# Run a command on one, several or all workers of a TPU VM (or open a shell on one), inside the checkout.
#
# Usage: ops/tpu_ssh.sh --name NAME [options] [--] COMMAND...
#   --name NAME        TPU VM name
#   --worker W         0-based worker index, a list/range (1,3 or 0-2), or all (default: 0)
#   --env-file FILE    file on the workers (relative to --dir) sourced, with its variables exported, before
#                      COMMAND; it must exist there (ops/tpu_sync_env.sh puts .env in place)
#   --dir DIR          directory on the workers to run in, relative to the home directory (default: sid, the
#                      checkout of ops/tpu_bootstrap.sh; '.' for the home directory)
#   --root             run as root (sudo -n -H): the home directory is root's (/root), so the default --dir is
#                      /root/sid, as in SOPs whose checkout and venv live under /root; a shell is a root login
#   --zone Z           zone (default: the one ops/tpu_create.sh recorded)
#   --project P        GCP project (default: recorded, else gcloud config get-value project)
#   --dry-run          print the gcloud command and run nothing
#   -h, --help         this help
#
# COMMAND is shell text run by bash on each worker. Before it, /tmp/libtpu_lockfile is removed when no
# process holds it (a crashed JAX process leaves it behind and the next one then fails with "TPU in use").
# The exit status is COMMAND's (with several workers, non-zero when any failed). Without COMMAND, opens an
# interactive shell on the one worker given.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

WORKER=0 ENV_FILE="" DIR=sid AS_ROOT=0
while (($#)); do
  [[ $1 == --*=* ]] && set -- "${1%%=*}" "${1#*=}" "${@:2}"
  case $1 in
    --name) need_value "$@"; NAME=$2; shift 2 ;;
    --worker) need_value "$@"; WORKER=$2; shift 2 ;;
    --env-file) need_value "$@"; ENV_FILE=$2; shift 2 ;;
    --dir) need_value "$@"; DIR=$2; shift 2 ;;
    --root) AS_ROOT=1; shift ;;
    --zone) need_value "$@"; ZONE=$2; shift 2 ;;
    --project) need_value "$@"; PROJECT=$2; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) usage; exit 0 ;;
    --) shift; break ;;
    -*) die "unknown option '$1' (see --help; put the command after --)" ;;
    *) break ;;
  esac
done
COMMAND="$*"

resolve_tpu
[[ $WORKER =~ ^(all|[0-9]+([-,][0-9]+)*)$ ]] || die "bad --worker '$WORKER': an index, a list (1,3), a range (0-2) or all"

if [[ -z $COMMAND ]]; then
  [[ $WORKER =~ ^[0-9]+$ ]] || die "an interactive shell needs a single --worker index; pass a COMMAND to run on '$WORKER'"
  [[ -z $ENV_FILE ]] || die "--env-file needs a COMMAND (in a shell, run: set -a; . $ENV_FILE; set +a)"
  login=(gcloud compute tpus tpu-vm ssh "$NAME" --zone="$ZONE" --project="$PROJECT" --worker="$WORKER")
  if ((AS_ROOT)); then login+=(--command="sudo -i" -- -t); fi # -t: sudo's shell needs a terminal
  run "${login[@]}"
  exit 0
fi

# Written across lines for reading; sent as one line (every statement ends in ';').
oneline() { tr '\n' ' ' | sed -e 's/  */ /g' -e 's/ $//'; }

remote=""
if [[ $DIR != . ]]; then
  q=$(shell_quote "$DIR")
  remote+="cd $q || { echo \"tpu_ssh: no ~/$q on \$(hostname): run ops/tpu_bootstrap.sh first\" >&2; exit 2; }; "
fi
remote+=$(oneline <<'EOF'
lock=/tmp/libtpu_lockfile;
if [ -e $lock ]; then
  if command -v lsof >/dev/null; then holders=$(sudo -n lsof -t $lock 2>/dev/null || lsof -t $lock 2>/dev/null);
  else holders=$(find /proc/[0-9]*/fd -lname $lock 2>/dev/null | cut -d/ -f3 | sort -u); fi;
  if [ -n "$holders" ]; then echo "tpu_ssh: $lock is held by pid(s) $(echo $holders) on $(hostname); leaving it" >&2;
  elif rm -f $lock 2>/dev/null || sudo -n rm -f $lock; then echo "tpu_ssh: removed stale $lock on $(hostname)" >&2;
  else echo "tpu_ssh: could not remove $lock on $(hostname)" >&2; fi;
fi;
EOF
)
if [[ -n $ENV_FILE ]]; then
  q=$(shell_quote "$ENV_FILE")
  [[ $ENV_FILE == /* ]] || q=./$q # `.` looks a bare name up on PATH first
  remote+=" if [ -f $q ]; then set -a; . $q; set +a;"
  remote+=" else echo \"tpu_ssh: env file $q not found on \$(hostname): run ops/tpu_sync_env.sh\" >&2; exit 2; fi;"
fi
remote+=" $COMMAND"
# As root: the whole script runs in root's shell, from root's home (`cd` alone), so --dir is relative to /root.
if ((AS_ROOT)); then remote="sudo -n -H bash -c $(shell_quote "cd; $remote")"; fi

status=0
tpu_ssh_cmd "$WORKER" "$remote" || status=$?
exit "$status"
