#!/usr/bin/env bash
# Installs what Flotilla's build, tests and demo need on a fresh Debian machine, then builds the
# test control plane (cached). Safe to run again: each step is skipped when already done.
#
# Needs: Go and rustup (preinstalled here). Brings: the Rust toolchain named in
# rust-toolchain.toml, the Debian packages below, the Go modules of tests/controlplane, and the
# Python packages of scripts/python-requirements.txt (a cached venv: scripts/python-env.sh).
# protoc comes from the protoc-bin-vendored crate at build time; nothing to install for it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# The test node (tests/src/node.rs): containerd (and ctr), runc, the CNI plugins, ip, iptables;
# python3 and tar build its images (scripts/images.sh); python3-venv holds the tests' Python
# packages (scripts/python-env.sh).
apt_packages=(prometheus containerd runc containernetworking-plugins iproute2 iptables python3 python3-venv tar)

missing=()
for pkg in "${apt_packages[@]}"; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if ((${#missing[@]})); then
  echo "setup: installing Debian packages: ${missing[*]}" >&2
  sudo_cmd=""
  [[ $(id -u) -eq 0 ]] || sudo_cmd="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $sudo_cmd apt-get update -qq
  $sudo_cmd apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# The Debian prometheus package starts a system service; Flotilla's tests start their own.
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet prometheus 2>/dev/null; then
  systemctl stop prometheus || true
fi

command -v go >/dev/null || { echo "setup: Go is required (go.dev toolchain, >= 1.26)" >&2; exit 1; }
command -v cargo >/dev/null || { echo "setup: Rust (rustup) is required" >&2; exit 1; }
# rustup reads rust-toolchain.toml and installs the pinned toolchain on first use.
cargo --version >/dev/null

bash tests/controlplane/build.sh >/dev/null
bash scripts/python-env.sh >/dev/null
