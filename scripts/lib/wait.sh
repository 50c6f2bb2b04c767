# Sourced by scripts/demo.sh and scripts/node-demo.sh.
#
# wait_for DESCRIPTION SECONDS COMMAND...: runs COMMAND twice a second until it succeeds; after
# SECONDS, says what it waited for (prefixed with $script, pointing at the logs in $state), runs
# the caller's on_timeout function if it defines one, and fails.
wait_for() {
  local what="$1" secs="$2"; shift 2
  for ((n = 0; n < secs * 2; n++)); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.5
  done
  echo "$script: timed out waiting for $what; logs are in $state" >&2
  if declare -F on_timeout >/dev/null; then on_timeout; fi
  return 1
}
