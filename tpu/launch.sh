#!/usr/bin/env bash
# Start (or stop) the same `reczero train` command on every worker of a TPU slice.
set -euo pipefail
tpu_dir=${BASH_SOURCE[0]%/*}
[[ $tpu_dir == "${BASH_SOURCE[0]}" ]] && tpu_dir=.
# shellcheck source=SCRIPTDIR/common.sh
source "$tpu_dir/common.sh"

BOOL_FLAGS=(stop)
LIST_FLAGS=(env)

usage() {
  cat <<EOF
Usage: tpu/launch.sh --name NAME --zone ZONE [--env KEY=VALUE]... CONFIG [KEY=VALUE...] [-- TRAIN_FLAGS...]
       tpu/launch.sh --name NAME --zone ZONE --stop

Runs '.venv/bin/reczero train CONFIG KEY=VALUE...' in ~/$REMOTE_DIR on every worker
(--worker=all), in the background under nohup, logging to ~/$REMOTE_DIR/$REMOTE_LOG (follow it
with tpu/logs.sh). Every worker runs the same command: on a TPU slice the program calls
jax.distributed.initialize() itself, which finds the other workers from the TPU metadata.
Arguments after CONFIG, and everything after '--', reach 'reczero train' unchanged.
A worker already running a training job (its pid in $REMOTE_PID) refuses to start another.

  --env KEY=VALUE   extra environment for the job, repeatable (e.g. LIBTPU_INIT_ARGS=...);
                    PYTHONUNBUFFERED=1 is always set so the log follows the program
  --stop            send SIGTERM to the job on every worker (it checkpoints on preemption signals)

$(common_help)
EOF
}

parse_flags "$@"
read_target
pid_alive="[ -f $REMOTE_PID ] && kill -0 \"\$(cat $REMOTE_PID)\" 2>/dev/null"

if is_on stop; then
  no_args
  [[ -z $(flag env) ]] || die "--env has no effect with --stop"
  on_workers all "cd $REMOTE_DIR && if $pid_alive; then kill \"\$(cat $REMOTE_PID)\" && echo \"stopped reczero train on \$(hostname)\"; else echo \"no reczero train running on \$(hostname)\"; fi"
  exit 0
fi

((${#ARGS[@]})) || die "give the training CONFIG (e.g. configs/paper/reczero_amazon_music_qwen2.5-7b_v5p-8.yaml)"
mapfile -t extra_env < <(printf '%s' "$(flag env)")
for entry in "${extra_env[@]}"; do
  [[ $entry =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env '$entry' is not KEY=VALUE"
done
train=(nohup env PYTHONUNBUFFERED=1 "${extra_env[@]}" .venv/bin/reczero train "${ARGS[@]}")
# `nohup env ... reczero` execs down to Python, so $! is the training process itself.
steps=(
  "set -e"
  "cd $REMOTE_DIR"
  "mkdir -p ${REMOTE_LOG%/*}"
  "if $pid_alive; then echo \"reczero train already runs on \$(hostname) (pid \$(cat $REMOTE_PID)): tpu/launch.sh --stop ends it\" >&2; exit 1; fi"
  "$(command_line "${train[@]}") >$REMOTE_LOG 2>&1 </dev/null & echo \$! >$REMOTE_PID"
  "echo \"reczero train started on \$(hostname), pid \$!, log ~/$REMOTE_DIR/$REMOTE_LOG\""
)
on_workers all "$(join_steps "${steps[@]}")"
