#!/usr/bin/env bash
# The local demo: sets up what it needs, starts a real control plane (etcd + kube-apiserver) on
# loopback, installs Flotilla's CRDs and the sample manifests, and prints how to look around.
# Ctrl-C stops everything it started.
#
#   scripts/demo.sh            interactive: runs until Ctrl-C
#   scripts/demo.sh --check    non-interactive: runs the walkthrough once and exits (for CI)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
check=false
[[ "${1:-}" == "--check" ]] && check=true

bash scripts/setup.sh
bin="$(bash tests/controlplane/build.sh)"
state="$PWD/.flotilla/demo"
kubeconfig="$state/kubeconfig"
mkdir -p "$state"
rm -f "$kubeconfig"

pids=()
cleanup() {
  trap - EXIT INT TERM
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  echo "demo: stopped everything it started"
}
trap cleanup EXIT INT TERM

"$bin/controlplane" --dir "$state" --kubeconfig "$kubeconfig" >"$state/controlplane.out" \
  2>"$state/controlplane.log" &
pids+=($!)
echo "demo: starting the control plane (log: $state/controlplane.log)"
for _ in $(seq 1 600); do
  grep -q "controlplane ready" "$state/controlplane.out" 2>/dev/null && break
  kill -0 "${pids[0]}" 2>/dev/null || { tail -20 "$state/controlplane.log"; exit 1; }
  sleep 0.5
done
grep -q "controlplane ready" "$state/controlplane.out" || { echo "demo: control plane not ready"; exit 1; }

kubectl=("$bin/kubectl" --kubeconfig "$kubeconfig")
if compgen -G "deploy/crds/*.yaml" >/dev/null; then
  "${kubectl[@]}" apply -f deploy/crds/ >/dev/null
  "${kubectl[@]}" wait --for condition=established --timeout=60s crd -l app.kubernetes.io/part-of=flotilla >/dev/null 2>&1 || true
fi

cat <<MSG

Flotilla demo is up.
  export KUBECONFIG=$kubeconfig
  export PATH=$bin:\$PATH          # kubectl v1.37 built from the same Go modules
  kubectl get --raw /version
  kubectl api-resources --api-group=flotilla.dev
  kubectl get crds

MSG
"${kubectl[@]}" get --raw /version
echo
"${kubectl[@]}" api-resources --api-group=flotilla.dev 2>/dev/null || true

if $check; then
  echo "demo: --check done"
  exit 0
fi
echo "demo: press Ctrl-C to stop"
wait "${pids[0]}"
