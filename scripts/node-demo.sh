#!/usr/bin/env bash
# The installed system on this machine, for a person to look at: a real control plane and a real
# Kubernetes node (containerd, runc, the CNI bridge, kubelet, kube-proxy, cluster DNS; see
# tests/controlplane/node), Flotilla's images built here without a registry, then the README's
# "Install on a cluster" steps — `kubectl apply -k tests/install` (deploy/ with simulated GPUs),
# deploy/certs.sh, the rollout restart — and the sample TrainingJob. What install_e2e tests.
#
# Runs as root: the node makes a bridge, iptables rules and cgroups, and undoes them when it stops.
# Ctrl-C stops everything.
#
#   scripts/node-demo.sh            interactive: runs until Ctrl-C
#   scripts/node-demo.sh --check    non-interactive: waits for the sample job to succeed, exits
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
check=false
[[ "${1:-}" == "--check" ]] && check=true
if [[ $EUID -ne 0 ]]; then
  echo "node-demo: run as root (the node makes a bridge, iptables rules and cgroups)" >&2
  exit 1
fi

bash scripts/setup.sh
bin="$(bash tests/controlplane/build.sh)"
echo "node-demo: building the images (cargo build, then scripts/images.sh)"
mapfile -t images < <(bash scripts/images.sh)
archives=$(printf '%s\n' "${images[@]}" | awk '{print $2}' | paste -sd, -)
target="${CARGO_TARGET_DIR:-$PWD/target}/debug"
state="$PWD/.flotilla/node-demo"
rm -rf "$state"
mkdir -p "$state/bin"
kubeconfig="$state/kubeconfig"
kubectl=("$bin/kubectl" --kubeconfig "$kubeconfig")
ln -sf "$bin/kubectl" "$state/bin/kubectl"
ln -sf "$target/kubectl-flotilla" "$state/bin/kubectl-flotilla"
node=gpu-node-1
shared=/var/tmp/flotilla-install-shared # tests/install/shared-pv.yaml

pids=()
cleanup() {
  trap - EXIT INT TERM
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
    kill -TERM "${pids[i]}" 2>/dev/null || true
    wait "${pids[i]}" 2>/dev/null || true
  done
  echo "node-demo: stopped everything it started (the node undid its changes to the machine)"
}
trap cleanup EXIT INT TERM

script=node-demo
source scripts/lib/wait.sh
on_timeout() { "${kubectl[@]}" -n flotilla-system get pods -o wide >&2 || true; }

"$bin/controlplane" --dir "$state/cp" --kubeconfig "$kubeconfig" --pods \
  >"$state/controlplane.out" 2>"$state/controlplane.log" &
pids+=($!)
echo "node-demo: starting the control plane"
wait_for "the control plane" 240 grep -q "controlplane ready" "$state/controlplane.out"

"$bin/flotilla-node" --dir "$state/node" --kubeconfig "$kubeconfig" --name "$node" \
  --bin-dir "$bin" --images "$archives" >"$state/node.out" 2>"$state/node.log" &
pids+=($!)
echo "node-demo: starting node $node (containerd, kubelet, kube-proxy, cluster DNS)"
wait_for "node $node" 420 grep -q "node ready" "$state/node.out"

# The shared volume an administrator exports, owned by the agent's user.
rm -rf "$shared"
install -d -o 65532 -g 65532 "$shared"

echo "node-demo: kubectl apply -k tests/install; deploy/certs.sh $node; rollout restart"
"${kubectl[@]}" apply -k tests/install >/dev/null
KUBECONFIG="$kubeconfig" PATH="$bin:$PATH" FLOTILLA_AGENT="$target/flotilla-agent" \
  bash deploy/certs.sh "$node" >/dev/null
"${kubectl[@]}" -n flotilla-system rollout restart deploy/flotilla-operator ds/flotilla-agent \
  >/dev/null
gpunode_ready() {
  [[ $("${kubectl[@]}" get gpunode "$node" \
    -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}') == True ]]
}
wait_for "the agent's GpuNode" 300 gpunode_ready
"${kubectl[@]}" -n flotilla-system get pods -o wide
"${kubectl[@]}" get gpunodes
"${kubectl[@]}" apply -f deploy/examples/trainingjob-engine.yaml >/dev/null

cat <<MSG

Flotilla is installed on a real node: the operator Deployment (2 replicas) and the agent
DaemonSet from deploy/, images built here, simulated GPUs, the sample TrainingJob applied.
  export KUBECONFIG=$kubeconfig
  export PATH=$state/bin:\$PATH        # kubectl v1.37.2 and the kubectl-flotilla plugin
  kubectl -n flotilla-system get pods,svc,pvc -o wide
  kubectl get gpunodes
  kubectl get tj -w
  kubectl flotilla logs moe-tiny --rank 1 -f
  kubectl flotilla inject $node --gpu 0 --xid 79
  kubectl -n flotilla-system delete pod -l app.kubernetes.io/name=flotilla-agent   # and watch
  kubectl apply -f deploy/examples/inferenceservice.yaml   # after moe-tiny Succeeded
  kubectl delete -k tests/install
Checkpoints: $shared. Logs: $state (node components under $state/node).
MSG

if $check; then
  succeeded() { [[ $("${kubectl[@]}" get tj moe-tiny -o jsonpath='{.status.phase}') == Succeeded ]]; }
  wait_for "moe-tiny to succeed" 600 succeeded
  "${kubectl[@]}" get tj moe-tiny
  echo "node-demo: --check passed: the installed system ran moe-tiny to Succeeded"
  exit 0
fi
echo "node-demo: press Ctrl-C to stop"
wait "${pids[0]}"
