#!/usr/bin/env bash
# Delete a TPU slice (or the queued resource holding it).
set -euo pipefail
tpu_dir=${BASH_SOURCE[0]%/*}
[[ $tpu_dir == "${BASH_SOURCE[0]}" ]] && tpu_dir=.
# shellcheck source=SCRIPTDIR/common.sh
source "$tpu_dir/common.sh"

BOOL_FLAGS=(queued yes)

usage() {
  cat <<EOF2
Usage: tpu/delete.sh --name NAME --zone ZONE [--queued] [--yes]

Deletes the TPU VM slice NAME, or with --queued the queued resource NAME together with its
node (--force). Asks first unless --yes. Everything on the workers' disks is lost: runs and
checkpoints written to gs:// stay.

  --queued   the slice was made with tpu/create.sh --queued   [TPU_QUEUED]
  --yes      do not ask for confirmation

$(common_help)
EOF2
}

parse_flags "$@"
no_args
read_target
if is_on queued; then
  what="queued resource $NAME and its TPU node"
  delete=(compute tpus queued-resources delete "$NAME" "--zone=$ZONE" --force --quiet)
else
  what="TPU VM $NAME"
  delete=(compute tpus tpu-vm delete "$NAME" "--zone=$ZONE" --quiet)
fi
if ! is_on dry-run && ! is_on yes; then
  read -r -p "Delete $what in $ZONE? [y/N] " answer || die "no answer on standard input: pass --yes to delete without asking"
  [[ $answer =~ ^[Yy]([Ee][Ss])?$ ]] || die "not deleted"
fi
gcloud_run "${delete[@]}"
