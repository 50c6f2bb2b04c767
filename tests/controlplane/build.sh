#!/usr/bin/env bash
# Builds the test control plane (etcd + kube-apiserver, and kubectl, kube-scheduler,
# kube-controller-manager and kubelet of the same version) from the Kubernetes Go modules, once,
# `flotilla-node` (the test node: containerd, kubelet and their controllers; see node/main.go), and
# `pause`, the static sandbox program of the test node's pod image.
#
# The result is cached outside the repository, keyed on the hash of go.mod, go.sum, the Go
# sources and this script, so a second run is instant. Prints the binary directory as the last
# line of stdout: it holds `controlplane`, `flotilla-node`, `pause` and the symlinks `kubectl`, `kube-scheduler`,
# `kube-controller-manager`, `kubelet`.
#
# Environment: FLOTILLA_CACHE_DIR (default ${XDG_CACHE_HOME:-$HOME/.cache}/flotilla).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
k8s_version="v1.37.2"
cache_root="${FLOTILLA_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/flotilla}"
key="$(cd "$here" && cat go.mod go.sum ./*.go ./pause/*.go ./node/*.go build.sh | sha256sum | cut -c1-16)"
bin_dir="$cache_root/controlplane/$key"

if [[ ! -x "$bin_dir/controlplane" ]]; then
  command -v go >/dev/null || { echo "build.sh: Go is required to build the control plane" >&2; exit 1; }
  echo "build.sh: building the control plane ($k8s_version) into $bin_dir; a cold build takes minutes" >&2
  mkdir -p "$bin_dir"
  tmp="$(mktemp "$bin_dir/.controlplane.XXXXXX")"
  trap 'rm -f "$tmp"' EXIT
  minor="${k8s_version#v1.}"; minor="${minor%%.*}"
  ldflags=""
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldflags+=" -X $pkg.gitVersion=$k8s_version -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
    ldflags+=" -X $pkg.gitTreeState=clean"
  done
  start=$SECONDS
  (cd "$here" && go build -trimpath -ldflags "-s -w $ldflags" -o "$tmp" .)
  # The pause program runs inside a container image with nothing else in it: static, no cgo.
  (cd "$here" && CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$bin_dir/pause" ./pause)
  (cd "$here" && go build -trimpath -ldflags "-s -w" -o "$bin_dir/flotilla-node" ./node)
  mv -f "$tmp" "$bin_dir/controlplane"
  trap - EXIT
  echo "build.sh: built in $((SECONDS - start))s" >&2
fi
for name in kubectl kube-scheduler kube-controller-manager kubelet kube-proxy; do
  ln -sfn controlplane "$bin_dir/$name"
done
echo "$bin_dir"
