#!/usr/bin/env bash
# Runs every test: unit and property tests, and the integration and end-to-end tests against a
# real kube-apiserver + etcd that the tests start and stop themselves. Does the set-up first.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
FLOTILLA_CONTROLPLANE_BIN_DIR="$(bash tests/controlplane/build.sh)"
export FLOTILLA_CONTROLPLANE_BIN_DIR
FLOTILLA_PYTHON="$(bash scripts/python-env.sh)"
export FLOTILLA_PYTHON
# The end-to-end tests run the real binaries (operator, agent, flotilla-worker): build them first.
cargo build --workspace --bins
cargo test --workspace --all-targets --no-fail-fast "$@"
