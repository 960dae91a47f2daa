#!/usr/bin/env bash
# Move datasets and checkpoints between this machine, Cloud Storage and the TPU workers.
set -euo pipefail
tpu_dir=${BASH_SOURCE[0]%/*}
[[ $tpu_dir == "${BASH_SOURCE[0]}" ]] && tpu_dir=.
# shellcheck source=SCRIPTDIR/common.sh
source "$tpu_dir/common.sh"

VALUE_FLAGS=(src dest mount mount-point)

usage() {
  cat <<EOF
Usage: tpu/data.sh --src DIR --dest gs://BUCKET/PATH               (upload from here)
       tpu/data.sh --name NAME --zone ZONE --src gs://... --dest DIR  (download on every worker)
       tpu/data.sh --name NAME --zone ZONE --mount gs://BUCKET [--mount-point DIR]

Copies go through 'gcloud storage rsync --recursive': DEST ends up holding SRC's contents, and
a rerun copies only what changed. A relative DIR on the workers is under the login directory,
so --dest $REMOTE_DIR/data/NAME is data/NAME for the training command, which runs in ~/$REMOTE_DIR.
Runs and checkpoints need no copying: give the training command gs:// paths (Orbax and
etils.epath write there directly).

  --src PATH          a local directory or a gs:// prefix
  --dest PATH         gs:// when --src is local; a directory on every worker when --src is gs://
  --mount gs://BUCKET mount BUCKET with gcsfuse on every worker (installed there when missing),
                      for data too large for the workers' disks
  --mount-point DIR   where to mount it (default: /mnt/BUCKET)

$(common_help)
EOF
}

parse_flags "$@"
no_args
src=$(flag src)
dest=$(flag dest)
bucket=$(flag mount)
[[ -z $(flag mount-point) || -n $bucket ]] || die "--mount-point needs --mount"
[[ -n $src || -n $dest || -n $bucket ]] || die "nothing to do: give --src and --dest, or --mount (see --help)"

if [[ -n $src || -n $dest ]]; then
  [[ -n $src && -n $dest ]] || die "--src and --dest go together"
  if [[ $src == gs://* && $dest == gs://* ]]; then
    die "--src and --dest are both gs://: copy between buckets with 'gcloud storage rsync' directly"
  elif [[ $dest == gs://* ]]; then
    [[ -d $src ]] || die "--src '$src' is not a local directory"
    PROJECT=$(flag project)
    gcloud_run storage rsync --recursive "$src" "$dest"
  elif [[ $src == gs://* ]]; then
    read_target
    on_workers all "set -e; mkdir -p $(quote "$dest"); gcloud storage rsync --recursive $(quote "$src") $(quote "$dest")"
  else
    die "one of --src and --dest must be gs://BUCKET/PATH (local copies need no script)"
  fi
fi

if [[ -n $bucket ]]; then
  bucket=${bucket#gs://}
  bucket=${bucket%/}
  [[ $bucket =~ ^[a-z0-9][-a-z0-9_.]*$ ]] ||
    die "--mount '$(flag mount)' is not a bucket: give gs://BUCKET (gcsfuse mounts whole buckets)"
  read_target
  mount_point=$(quote "$(flag mount-point "/mnt/$bucket")")
  # Google's apt repository for gcsfuse, keyed by the Ubuntu release of the TPU VM image.
  # shellcheck disable=SC2016
  install_gcsfuse=(
    'echo "deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt gcsfuse-$(lsb_release -cs) main" | sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null'
    'curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null'
    'sudo apt-get update -qq'
    'sudo apt-get install -y -qq gcsfuse'
  )
  steps=(
    "set -e"
    "if ! command -v gcsfuse >/dev/null; then $(join_steps "${install_gcsfuse[@]}"); fi"
    "sudo mkdir -p $mount_point"
    "sudo chown \"\$USER\" $mount_point"
    "mountpoint -q $mount_point || gcsfuse --implicit-dirs $bucket $mount_point"
  )
  on_workers all "$(join_steps "${steps[@]}")"
fi
