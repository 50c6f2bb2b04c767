#!/usr/bin/env bash
# Creates the Python environment the tests use (scripts/python-requirements.txt: the official
# `openai` client) once, as a venv cached outside the repository and keyed on the hash of the
# requirements and this script, so a second run is instant. Prints the interpreter's path as the
# last line of stdout; the tests read it from FLOTILLA_PYTHON (scripts/test.sh sets it).
#
# Environment: FLOTILLA_CACHE_DIR (default ${XDG_CACHE_HOME:-$HOME/.cache}/flotilla).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cache_root="${FLOTILLA_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/flotilla}"
key="$(cat "$here/python-requirements.txt" "$here/python-env.sh" | sha256sum | cut -c1-16)"
venv="$cache_root/python/$key"

# The marker is written last: a venv whose install was interrupted is built again.
if [[ ! -f "$venv/.complete" ]]; then
  command -v python3 >/dev/null || { echo "python-env.sh: python3 is required" >&2; exit 1; }
  echo "python-env.sh: installing $(grep -v '^#' "$here/python-requirements.txt" | xargs) into $venv" >&2
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
    -r "$here/python-requirements.txt" >&2
  touch "$venv/.complete"
fi
echo "$venv/bin/python"
