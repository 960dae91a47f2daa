# shellcheck shell=bash
# Shared by the tpu/*.sh scripts (sourced, never run): flag parsing with TPU_* environment
# fallbacks, --dry-run printing, shell quoting, and the gcloud calls every script makes.
#
# A script declares the flags it takes (names without the leading --) in VALUE_FLAGS,
# BOOL_FLAGS and LIST_FLAGS (repeatable), defines usage(), then calls parse_flags "$@".
# Flags take "--flag value" or "--flag=value"; anything that is not a flag, and everything
# after "--", lands in ARGS. Each flag --some-flag falls back to the environment variable
# TPU_SOME_FLAG (for booleans: 1, true or yes), so a shell can export TPU_NAME and TPU_ZONE once.

if ((BASH_VERSINFO[0] < 4 || (BASH_VERSINFO[0] == 4 && BASH_VERSINFO[1] < 4))); then
  echo "tpu scripts need bash >= 4.4 (this is $BASH_VERSION; on macOS: brew install bash)" >&2
  exit 2
fi

# The scripts that source this file use these; shellcheck sees this file alone too.
# shellcheck disable=SC2034
{
  SCRIPT=${0##*/}
  # Repository root: the folder above tpu/.
  ROOT=$(cd "${BASH_SOURCE[0]%/*}/.." && pwd)
  # Where the repository lives on every worker, relative to the login directory (ssh starts there).
  REMOTE_DIR=reczero-jax
  # Training log and pid file, relative to REMOTE_DIR.
  REMOTE_LOG=logs/train.log
  REMOTE_PID=logs/train.pid
}

COMMON_VALUE_FLAGS=(name zone project)
COMMON_BOOL_FLAGS=(dry-run)
VALUE_FLAGS=()
BOOL_FLAGS=()
LIST_FLAGS=()
declare -A FLAG=()
ARGS=()

common_help() {
  cat <<'EOF'
Common flags (each also read from the environment variable named in brackets):
  --name NAME        TPU VM name; with --queued also the queued resource's id   [TPU_NAME]
  --zone ZONE        zone of the TPU, e.g. us-east5-a                            [TPU_ZONE]
  --project PROJECT  Google Cloud project (default: gcloud's core/project)      [TPU_PROJECT]
  --dry-run          print every command, one per line and shell-quoted,
                     instead of running it                                      [TPU_DRY_RUN]
  -h, --help         this help
EOF
}

die() {
  printf '%s: %s\n' "$SCRIPT" "$*" >&2
  exit 2
}

note() {
  printf '%s: %s\n' "$SCRIPT" "$*" >&2
}

contains() {  # contains WORD LIST...: is WORD one of LIST?
  local word=$1 item
  shift
  for item in "$@"; do
    [[ $item == "$word" ]] && return 0
  done
  return 1
}

parse_flags() {
  local value_flags=("${COMMON_VALUE_FLAGS[@]}" "${VALUE_FLAGS[@]}")
  local bool_flags=("${COMMON_BOOL_FLAGS[@]}" "${BOOL_FLAGS[@]}")
  local list_flags=("${LIST_FLAGS[@]}")
  local arg name value has_value
  while (($#)); do
    arg=$1
    shift
    case $arg in
      --) ARGS+=("$@"); return 0 ;;
      -h | --help) usage; exit 0 ;;
      --*=*) name=${arg%%=*} value=${arg#*=} has_value=1 ;;
      --*) name=$arg value='' has_value=0 ;;
      *) ARGS+=("$arg"); continue ;;
    esac
    name=${name#--}
    if contains "$name" "${bool_flags[@]}"; then
      ((has_value)) && die "--$name takes no value (got '$arg')"
      FLAG[$name]=1
    elif contains "$name" "${value_flags[@]}" "${list_flags[@]}"; then
      if ((!has_value)); then
        if (($# == 0)) || [[ $1 == --* ]]; then die "--$name needs a value"; fi
        value=$1
        shift
      fi
      if contains "$name" "${list_flags[@]}"; then
        FLAG[$name]+=$value$'\n'
      else
        FLAG[$name]=$value
      fi
    else
      die "unknown flag '$arg' (see $SCRIPT --help)"
    fi
  done
}

env_name() {  # env_name zone -> TPU_ZONE
  local upper=${1^^}
  printf 'TPU_%s' "${upper//-/_}"
}

flag() {  # flag NAME [DEFAULT]: value of --NAME, else of its TPU_* variable, else DEFAULT
  local env
  env=$(env_name "$1")
  if [[ -n ${FLAG[$1]+set} ]]; then
    printf '%s' "${FLAG[$1]}"
  else
    printf '%s' "${!env:-${2:-}}"
  fi
}

required() {  # required NAME: like flag, but fails naming the flag and the variable when unset
  local value
  value=$(flag "$1")
  [[ -n $value ]] || die "--$1 is required (or set $(env_name "$1"))"
  printf '%s' "$value"
}

is_on() {  # is_on NAME: was boolean --NAME given, or is its TPU_* variable 1/true/yes?
  [[ -n ${FLAG[$1]+set} ]] && return 0
  local env
  env=$(env_name "$1")
  [[ ${!env:-} =~ ^(1|true|yes)$ ]]
}

no_args() {
  ((${#ARGS[@]} == 0)) || die "unexpected argument '${ARGS[0]}' (see $SCRIPT --help)"
}

read_target() {  # sets NAME, ZONE (required) and PROJECT (optional) from flags or environment
  NAME=$(required name)
  ZONE=$(required zone)
  PROJECT=$(flag project)
}

SAFE_WORD='^[-A-Za-z0-9_@%+=:,./]+$'
FLAG_WITH_VALUE='^(--[-A-Za-z0-9]+=)(.*)$'
DOUBLE_QUOTE_SPECIAL='["$`\\!]'

quote() {  # quote WORD: WORD as one shell word, quoted only where it needs to be
  if [[ $1 =~ $SAFE_WORD ]]; then
    printf '%s' "$1"
  elif [[ $1 =~ $FLAG_WITH_VALUE ]]; then
    # --flag=value keeps --flag= outside the quotes, for readability.
    printf '%s' "${BASH_REMATCH[1]}"
    quote "${BASH_REMATCH[2]}"
  elif [[ ! $1 =~ $DOUBLE_QUOTE_SPECIAL ]]; then
    # Double quotes read better nested inside a single-quoted remote --command.
    printf '"%s"' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

command_line() {  # command_line WORD...: the words quoted and joined by spaces
  local line='' word
  for word in "$@"; do
    line+="${line:+ }$(quote "$word")"
  done
  printf '%s' "$line"
}

run() {  # run COMMAND...: print it (--dry-run) or echo it to stderr and run it
  if is_on dry-run; then
    printf '%s\n' "$(command_line "$@")"
    return 0
  fi
  command -v "$1" >/dev/null || die "$1: command not found (gcloud is the Google Cloud CLI); --dry-run shows the commands without running them"
  printf '+ %s\n' "$(command_line "$@")" >&2
  "$@"
}

gcloud_run() {  # gcloud_run ARGS...: gcloud ARGS, with --project when one was given
  run gcloud "$@" ${PROJECT:+"--project=$PROJECT"}
}

on_workers() {  # on_workers WORKER SCRIPT: run the shell SCRIPT over ssh on WORKER (a number or all)
  gcloud_run compute tpus tpu-vm ssh "$NAME" "--zone=$ZONE" "--worker=$1" "--command=$2"
}

join_steps() {  # join_steps STEP...: one shell line running the steps in turn
  local joined
  joined=$(printf '%s; ' "$@")
  printf '%s' "${joined%; }"
}

first_match() {  # first_match FILE REGEX: group 1 of REGEX on the first line of FILE matching it
  local line
  [[ -f $1 ]] || return 1
  while IFS= read -r line; do
    if [[ $line =~ $2 ]]; then
      printf '%s' "${BASH_REMATCH[1]}"
      return 0
    fi
  done <"$1"
  return 1
}
