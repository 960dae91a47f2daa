#!/usr/bin/env bash
# Stream the training log of one worker (or of all of them).
set -euo pipefail
tpu_dir=${BASH_SOURCE[0]%/*}
[[ $tpu_dir == "${BASH_SOURCE[0]}" ]] && tpu_dir=.
# shellcheck source=SCRIPTDIR/common.sh
source "$tpu_dir/common.sh"

VALUE_FLAGS=(worker lines)

usage() {
  cat <<EOF2
Usage: tpu/logs.sh --name NAME --zone ZONE [--worker N|all] [--lines N]

Follows ~/$REMOTE_DIR/$REMOTE_LOG (written by tpu/launch.sh) with 'tail -F' until Ctrl-C.
Only process 0 writes metrics; the other workers' logs show their own errors.

  --worker N|all   which worker (default: 0); all interleaves every worker's log
  --lines N        lines of history to show first (default: 100)

$(common_help)
EOF2
}

parse_flags "$@"
no_args
read_target
worker=$(flag worker 0)
lines=$(flag lines 100)
[[ $worker =~ ^([0-9]+|all)$ ]] || die "--worker '$worker' is not a worker number or all"
[[ $lines =~ ^[0-9]+$ ]] || die "--lines '$lines' is not a number"
on_workers "$worker" "tail -n $lines -F $REMOTE_DIR/$REMOTE_LOG"
