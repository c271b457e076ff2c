#!/bin/sh
# A CI step in plain POSIX shell: run COMMAND in IMAGE as a gpubox job, print its log, and
# exit with a code CI can act on (docs/ci/README.md). Two ways, the same behaviour:
#
#   docs/ci/shell.sh cli IMAGE COMMAND...    with the gpubox command
#   docs/ci/shell.sh http IMAGE COMMAND...   with curl and jq alone, over the HTTP API
#
# Both read GPUBOX_URL and GPUBOX_TOKEN, and CI_PIPELINE_ID and CI_JOB_ID where CI sets them.
# Stopping the step (SIGTERM, or SIGINT as GitHub Actions sends it) cancels the job.
set -eu

pipeline=${CI_PIPELINE_ID:-local}
id=      # the job, once queued
cancel=  # the function that cancels it: cli_cancel or http_cancel
waiter=  # the background command until_stopped waits for

# --- with the gpubox command ----------------------------------------------------------

# Queue the job; print its id.
cli_submit() {
  image=$1
  shift
  gpubox submit --gpus 1 --queue-timeout 3600 \
    --metadata "{\"pipeline\": \"$pipeline\"}" "$image" -- "$@"
}

run_with_cli() {
  cancel=cli_cancel
  id=$(cli_submit "$@") || verdict $?
  code=0
  until_stopped gpubox wait "$id" || code=$?
  gpubox logs "$id" || true
  verdict "$code"
}

cli_cancel() { gpubox cancel "$1"; }

# --- with curl and jq -------------------------------------------------------------------

# Print the API's answer to METHOD PATH [CURL OPTIONS...]. curl asks again while the
# coordinator cannot be reached or answers 5xx; after that, exit as gpubox would: 69 no
# answer (or still 5xx), 77 token refused, 66 no such job, 65 any other refusal.
api() {
  method=$1 path=$2
  shift 2
  answer=$(curl -sS --retry 4 --retry-connrefused --max-time 60 -w '\n%{http_code}' \
    -X "$method" -H "Authorization: Bearer $GPUBOX_TOKEN" "$@" "$GPUBOX_URL/api/v1$path") ||
    exit 69
  status=$(printf '%s\n' "$answer" | tail -n 1)
  body=$(printf '%s\n' "$answer" | sed '$d')
  case $status in
    2??) printf '%s\n' "$body" && return ;;
    5??) refusal=69 ;;
    401 | 403) refusal=77 ;;
    404) refusal=66 ;;
    *) refusal=65 ;;
  esac
  echo "gpubox: $method $path: HTTP $status: $body" >&2
  exit "$refusal"
}

# Queue the job; print its id. Any failure is retried, even a lost answer: the job's
# Idempotency-Key (one per CI job) makes one job however often the request is sent.
http_submit() {
  image=$1
  shift
  # `--` ends jq's options: the command's own (sh -c …) are not jq's.
  body=$(jq -n --arg image "$image" --arg pipeline "$pipeline" '{
    name: ($ARGS.positional | join(" "))[:200], gpus: 1, queue_timeout: 3600,
    metadata: {pipeline: $pipeline}, docker: {image: $image, command: $ARGS.positional}
  }' --args -- "$@")
  job=$(api POST /jobs --retry-all-errors -H "Idempotency-Key: ci-${CI_JOB_ID:-$$}" \
    -H "Content-Type: application/json" -d "$body") || exit
  printf '%s\n' "$job" | jq -r .id
}

# Return once job $1 has ended, asking with long polls (each answers when the job ends,
# or after 25 s).
http_wait() {
  while :; do
    asked=$(date +%s)
    job=$(api GET "/jobs/$1?wait=25") || exit
    case $(printf '%s\n' "$job" | jq -r .status) in FINISHED | ERROR | CANCELLED) return ;; esac
    # A busy coordinator answers at once and asks for 5 s (Retry-After): give it them.
    [ $(($(date +%s) - asked)) -ge 5 ] || sleep 5
  done
}

# The code gpubox's own commands exit with for an ended job (gpubox/exits.py).
exit_code_of() {
  printf '%s\n' "$1" | jq -r '
    if .status == "FINISHED" then 0
    elif .status == "CANCELLED" then 130
    elif .result.error == "timeout" then 124
    elif (.result.error // "" | startswith("worker lost")) then 70
    else .result.exit_code // 125 end'
}

run_with_http() {
  cancel=http_cancel
  id=$(http_submit "$@") || verdict $?
  until_stopped http_wait "$id" || verdict $?
  (api GET "/jobs/$id/logs") || true
  job=$(api GET "/jobs/$id") || verdict $?
  verdict "$(exit_code_of "$job")"
}

http_cancel() { (api POST "/jobs/$1/cancel" >/dev/null); }

# --- both -------------------------------------------------------------------------------

# Run "$@" in the background and wait for it. A signal that stops the step cancels job $id
# meanwhile, and exits as gpubox would (128 + the signal's number). In the background
# because sh runs a trap during `wait`, not while a command runs in the foreground.
until_stopped() {
  trap 'stopped 129' HUP
  trap 'stopped 130' INT
  trap 'stopped 143' TERM
  "$@" &
  waiter=$!
  echo "waiting for job $id to end" >&2
  wait "$waiter"
}

stopped() {
  kill "$waiter" 2>/dev/null || true
  echo "step stopped: cancelling job $id" >&2
  "$cancel" "$id" || true
  exit "$1"
}

# Say what CODE means for CI, and exit with it.
verdict() {
  case $1 in
    0) echo "the job succeeded" >&2 ;;
    69 | 70 | 75)
      echo "gpubox could not see the job through (exit $1): infrastructure, retry" >&2
      # The job may still run: cancel it, so that a retry does not run it twice.
      [ -z "$id" ] || "$cancel" "$id" >&2 || true
      ;;
    *) echo "the job failed (exit $1)" >&2 ;;
  esac
  exit "$1"
}

case ${1:-} in
  cli | http)
    how=$1
    shift
    "run_with_$how" "$@"
    ;;
  *)
    echo "usage: $0 cli|http IMAGE COMMAND..." >&2
    exit 2
    ;;
esac
