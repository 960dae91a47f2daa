#!/usr/bin/env bash
# Create a Cloud TPU VM slice, directly or through a queued resource.
set -euo pipefail
tpu_dir=${BASH_SOURCE[0]%/*}
[[ $tpu_dir == "${BASH_SOURCE[0]}" ]] && tpu_dir=.
# shellcheck source=SCRIPTDIR/common.sh
source "$tpu_dir/common.sh"

VALUE_FLAGS=(accelerator-type runtime-version)
BOOL_FLAGS=(queued spot)

usage() {
  cat <<EOF
Usage: tpu/create.sh --name NAME --zone ZONE --accelerator-type TYPE [options]

Create a TPU VM slice: 'gcloud compute tpus tpu-vm create', or with --queued a queued
resource ('gcloud compute tpus queued-resources create', GA) whose single node is named NAME.
A queued request waits for capacity: watch it with
  gcloud compute tpus queued-resources describe NAME --zone ZONE
until its state is ACTIVE, then run tpu/setup.sh.

  --accelerator-type TYPE   slice type: v5p-8, v6e-8, v5litepod-16, v4-32, ...   [TPU_ACCELERATOR_TYPE]
  --runtime-version VER     TPU software version (default from the generation:  [TPU_RUNTIME_VERSION]
                            v6e: v2-alpha-tpuv6e, v5p: v2-alpha-tpuv5,
                            v5e (v5litepod-*): v2-alpha-tpuv5-lite, v4 and older: tpu-ubuntu2204-base)
  --queued                  request the slice as a queued resource (id NAME)    [TPU_QUEUED]
  --spot                    Spot capacity: cheaper, may be preempted at any time [TPU_SPOT]

$(common_help)

Example:
  tpu/create.sh --name reczero-v5p --zone us-east5-a --accelerator-type v5p-8 --queued --dry-run
EOF
}

default_runtime_version() {  # default_runtime_version TYPE: the JAX software version for TYPE
  case $1 in
    v6e-*) printf v2-alpha-tpuv6e ;;
    v5p-*) printf v2-alpha-tpuv5 ;;
    v5litepod-* | v5e-*) printf v2-alpha-tpuv5-lite ;;
    v2-* | v3-* | v4-*) printf tpu-ubuntu2204-base ;;
    *) return 1 ;;
  esac
}

parse_flags "$@"
no_args
read_target
accelerator_type=$(required accelerator-type)
[[ $accelerator_type =~ ^v[0-9][a-z0-9]*-[0-9]+$ ]] ||
  die "--accelerator-type '$accelerator_type' is not a TPU type such as v5p-8, v6e-8 or v5litepod-16"
runtime_version=$(flag runtime-version)
if [[ -z $runtime_version ]]; then
  runtime_version=$(default_runtime_version "$accelerator_type") ||
    die "no default runtime version for '$accelerator_type': pass --runtime-version (see 'gcloud compute tpus tpu-vm versions list')"
fi
spot=()
is_on spot && spot=(--spot)

if is_on queued; then
  gcloud_run compute tpus queued-resources create "$NAME" "--node-id=$NAME" "--zone=$ZONE" \
    "--accelerator-type=$accelerator_type" "--runtime-version=$runtime_version" "${spot[@]}"
  note "queued: the slice exists once 'gcloud compute tpus queued-resources describe $NAME --zone $ZONE' says ACTIVE"
else
  gcloud_run compute tpus tpu-vm create "$NAME" "--zone=$ZONE" \
    "--accelerator-type=$accelerator_type" "--version=$runtime_version" "${spot[@]}"
fi
