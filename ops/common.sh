# shellcheck shell=bash
# Shared by ops/*.sh (sourced, never run): messages, --dry-run printing, and how a TPU VM is named, located
# (zone, project) and reached. tpu_create.sh records each TPU's zone and project in $SID_TPU_STATE_DIR/NAME so
# the other scripts need only --name.

SID_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SID_TPU_STATE_DIR=${SID_TPU_STATE_DIR:-$SID_ROOT/workdir/tpu}
DRY_RUN=0
NAME=""
ZONE=""
PROJECT=""

die() {
  echo "error: $*" >&2
  exit 1
}

# Print the usage block at the top of the calling script (the comment lines after the shebang).
usage() {
  sed -n '2,/^[^#]/{/^#/s/^# \{0,1\}//p}' "$0"
}

# One argument as shell text that reads back as the same word (what Python's shlex.quote does).
shell_quote() {
  local s=$1
  if [[ -z $s ]]; then
    printf "''"
  elif [[ $s =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
    printf '%s' "$s"
  else
    printf "'%s'" "${s//\'/\'\\\'\'}"
  fi
}

# A command as one line of shell text.
quote_cmd() {
  local out="" a
  for a in "$@"; do
    out+="${out:+ }$(shell_quote "$a")"
  done
  printf '%s\n' "$out"
}

# Run a command, or with --dry-run only print it (stdout, one line). Running, it is echoed to stderr first.
run() {
  if ((DRY_RUN)); then
    quote_cmd "$@"
    return 0
  fi
  echo "+ $(quote_cmd "$@")" >&2
  "$@"
}

require_gcloud() {
  command -v gcloud >/dev/null 2>&1 ||
    die "gcloud not found on PATH: install the Google Cloud SDK (https://cloud.google.com/sdk/docs/install), then run 'gcloud auth login'"
}

require_name() {
  [[ -n $NAME ]] || die "no TPU name: pass --name NAME (make: TPU_NAME=NAME)"
  [[ $NAME =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] ||
    die "bad TPU name '$NAME': lowercase letters, digits and '-', starting with a letter"
}

# A value tpu_create.sh recorded for $NAME (zone or project), or nothing. A dry run reads first what a dry-run
# create recorded (NAME.dry-run: its first zone), so `make tpu-create compare DRY_RUN=1` prints the commands a
# real run would, without a real record ever coming from a dry run.
state_get() {
  local file=$SID_TPU_STATE_DIR/$NAME
  if ((DRY_RUN)) && [[ -f $file.dry-run ]]; then file+=.dry-run; fi
  [[ -f $file ]] && sed -n "s/^$1=//p" "$file"
  return 0
}

state_put() {
  local file=$SID_TPU_STATE_DIR/$NAME
  if ((DRY_RUN)); then file+=.dry-run; fi
  mkdir -p "$SID_TPU_STATE_DIR"
  printf 'zone=%s\nproject=%s\n' "$ZONE" "$PROJECT" >"$file"
}

# PROJECT from --project, else (for an existing TPU) what tpu_create.sh recorded, else gcloud's default.
resolve_project() {
  [[ -n $PROJECT ]] || PROJECT=$(state_get project)
  if [[ -z $PROJECT ]]; then
    require_gcloud
    PROJECT=$(gcloud config get-value project 2>/dev/null || true)
    [[ $PROJECT != "(unset)" ]] || PROJECT=""
  fi
  [[ -n $PROJECT ]] || die "no GCP project: pass --project PROJECT (make: PROJECT=...) or run 'gcloud config set project PROJECT'"
}

# ZONE from --zone, else the zone tpu_create.sh recorded for this TPU.
resolve_zone() {
  [[ -n $ZONE ]] || ZONE=$(state_get zone)
  [[ -n $ZONE ]] ||
    die "no zone for TPU '$NAME': pass --zone ZONE (make: ZONE=...); ops/tpu_create.sh records it in $SID_TPU_STATE_DIR/$NAME"
}

# The name, zone and project of an existing TPU, checked; gcloud must be installed unless only printing.
resolve_tpu() {
  require_name
  ((DRY_RUN)) || require_gcloud
  resolve_zone
  resolve_project
}

# `gcloud compute tpus tpu-vm ssh` to one worker, a list, or all, running a shell command there.
tpu_ssh_cmd() {
  local worker=$1 command=$2
  run gcloud compute tpus tpu-vm ssh "$NAME" --zone="$ZONE" --project="$PROJECT" --worker="$worker" \
    --command="$command"
}

# The value of option $1, which must be given ($2); exits with a message if missing.
need_value() {
  [[ $# -ge 2 && -n $2 && $2 != --* ]] || die "$1 needs a value (see --help)"
}
