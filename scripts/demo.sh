#!/usr/bin/env bash
# The local demo: builds what it needs, starts a real control plane (etcd + kube-apiserver) on
# loopback, the operator, two agents with 4 simulated GPUs each (mTLS between them), applies the
# CRDs and a sample TrainingJob of real `flotilla-worker` processes, serves its checkpoint with a
# sample InferenceService, and prints a walkthrough.
# Ctrl-C stops everything it started.
#
#   scripts/demo.sh            interactive: runs until Ctrl-C
#   scripts/demo.sh --check    non-interactive (CI): waits for the sample job to succeed, exits
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
check=false
[[ "${1:-}" == "--check" ]] && check=true

bash scripts/setup.sh
echo "demo: building flotilla (cargo build --bins; dependencies are optimised in this profile too)"
cargo build --bins --quiet
target="${CARGO_TARGET_DIR:-$PWD/target}/debug"
bin="$(bash tests/controlplane/build.sh)"
state="$PWD/.flotilla/demo"
rm -rf "$state"
mkdir -p "$state"
kubeconfig="$state/kubeconfig"
kubectl=("$bin/kubectl" --kubeconfig "$kubeconfig")
# kubectl finds plugins on PATH: keep the demo's kubectl and `kubectl-flotilla` side by side.
mkdir -p "$state/bin"
ln -sf "$bin/kubectl" "$state/bin/kubectl"
ln -sf "$target/kubectl-flotilla" "$state/bin/kubectl-flotilla"

pids=()
cleanup() {
  trap - EXIT INT TERM
  # Agents first (they stop their workers), then the operator, then the control plane.
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do kill -TERM "${pids[i]}" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  # A stopped agent leaves its workers running (serving replicas never end on their own); every
  # worker the demo started names the demo's state directory in its arguments.
  pkill -TERM -f -- "$state/" 2>/dev/null || true
  echo "demo: stopped everything it started"
}
trap cleanup EXIT INT TERM

script=demo
source scripts/lib/wait.sh

"$bin/controlplane" --dir "$state/cp" --kubeconfig "$kubeconfig" >"$state/controlplane.out" \
  2>"$state/controlplane.log" &
pids+=($!)
echo "demo: starting the control plane"
wait_for "the control plane" 240 grep -q "controlplane ready" "$state/controlplane.out"
"${kubectl[@]}" apply -f deploy/crds/ >/dev/null
wait_for "the CRDs" 60 "${kubectl[@]}" get trainingjobs -A

"$target/flotilla-agent" certs --out "$state/certs" --node demo-node-a --node demo-node-b >/dev/null
FLOTILLA_ADMIN_ADDR=127.0.0.1:9090 \
FLOTILLA_LEASE_DURATION_SECONDS=6 FLOTILLA_LEASE_RENEW_SECONDS=2 \
FLOTILLA_AGENT_LISTEN=127.0.0.1:7443 \
FLOTILLA_AGENT_TLS_CA="$state/certs/ca.pem" \
FLOTILLA_AGENT_TLS_CERT="$state/certs/operator.pem" \
FLOTILLA_AGENT_TLS_KEY="$state/certs/operator-key.pem" \
FLOTILLA_WORKER_BINARY="$target/flotilla-worker" \
FLOTILLA_CHECKPOINT_ROOT="$state/checkpoints" \
FLOTILLA_WORKER_MASTER_ADDR=127.0.0.1 \
KUBECONFIG="$kubeconfig" \
  "$target/flotilla-operator" run >"$state/operator.log" 2>&1 &
pids+=($!)
wait_for "the operator" 60 curl -sf http://127.0.0.1:9090/ready

port=9401
for node in demo-node-a demo-node-b; do
  FLOTILLA_NODE_NAME=$node FLOTILLA_OPERATOR_URL=https://127.0.0.1:7443 \
  FLOTILLA_SIM_GPUS=4 FLOTILLA_SIM_SEED=$port FLOTILLA_AGENT_ADMIN_ADDR=127.0.0.1:$port \
  FLOTILLA_TLS_CA="$state/certs/ca.pem" FLOTILLA_TLS_CERT="$state/certs/$node.pem" \
  FLOTILLA_TLS_KEY="$state/certs/$node-key.pem" \
  FLOTILLA_WORKER_LOG_DIR="$state/workers/$node" FLOTILLA_WORKER_SOCKET_DIR="$state/s/$node" \
  KUBECONFIG="$kubeconfig" \
    "$target/flotilla-agent" run >"$state/agent-$node.log" 2>&1 &
  pids+=($!)
  port=$((port + 1))
done
two_gpunodes() { [[ $("${kubectl[@]}" get gpunodes -o name | wc -l) -ge 2 ]]; }
wait_for "two GpuNodes" 60 two_gpunodes

# The sample job, with its checkpoints under the demo's state directory.
sed "s|path: /shared/checkpoints/moe-tiny|path: $state/checkpoints/moe-tiny|" \
  deploy/examples/trainingjob-engine.yaml | "${kubectl[@]}" apply -f - >/dev/null

cat <<MSG

Flotilla demo is up: control plane, operator, 2 agents × 4 simulated GPUs, a sample TrainingJob.
  export KUBECONFIG=$kubeconfig
  export PATH=$bin:$target:\$PATH      # kubectl v1.37.2 and the flotilla binaries
  kubectl get gpunodes                 # healthy/total GPUs, temperature, last fault
  kubectl get tj -w                    # phase, workers×GPUs, progress, restarts
  kubectl describe tj moe-tiny         # conditions, placement, events
  flotilla-agent inject --agent 127.0.0.1:9401 --gpu 0 --xid 79   # fail a GPU on demo-node-a
  flotilla-agent clear  --agent 127.0.0.1:9401 --gpu 0            # an admin clears it
  kubectl flotilla logs moe-tiny --rank 1 -f          # a worker's log, streamed from its agent
  kubectl flotilla logs moe-tiny --rank 0 --previous  # the attempt before a restart
  kubectl flotilla inject demo-node-a --gpu 0 --xid 79  # the same fault, via the GpuNode's adminUrl
  kubectl flotilla inject demo-node-a --gpu 0 --clear
  (kubectl and the kubectl-flotilla plugin are also linked side by side in $state/bin)
  curl -s http://127.0.0.1:9090/metrics   # operator metrics; agents: 127.0.0.1:9401, :9402
Logs: $state/*.log, worker logs under $state/workers/

MSG
"${kubectl[@]}" get gpunodes

# Once the job has a checkpoint, serve it: the sample InferenceService (2 replicas).
succeeded() { [[ $("${kubectl[@]}" get tj moe-tiny -o jsonpath='{.status.phase}') == Succeeded ]]; }
echo "demo: waiting for moe-tiny to finish, then serving its checkpoint"
wait_for "moe-tiny to succeed" 300 succeeded || {
  "${kubectl[@]}" describe tj moe-tiny; tail -30 "$state/operator.log"; exit 1; }
"${kubectl[@]}" get tj moe-tiny
sed "s|checkpointPath: /shared/checkpoints/moe-tiny|checkpointPath: $state/checkpoints/moe-tiny|" \
  deploy/examples/inferenceservice.yaml | "${kubectl[@]}" apply -f - >/dev/null
served() {
  [[ $("${kubectl[@]}" get infsvc moe-tiny-chat -o jsonpath='{.status.readyReplicas}') == 2 ]]
}
wait_for "moe-tiny-chat to have 2 ready replicas" 180 served || {
  "${kubectl[@]}" describe infsvc moe-tiny-chat; tail -30 "$state/operator.log"; exit 1; }
"${kubectl[@]}" get infsvc moe-tiny-chat
endpoint=$("${kubectl[@]}" get infsvc moe-tiny-chat -o jsonpath='{.status.endpoints[0]}')
cat <<MSG
  kubectl get infsvc,endpointslices    # ready replicas and their addresses
  curl -s $endpoint/v1/completions -H 'content-type: application/json' \\
    -d '{"model":"moe-tiny","prompt":"The ","max_tokens":16}'
MSG
echo "demo: a completion from $endpoint:"
curl -sf "$endpoint/v1/completions" -H 'content-type: application/json' \
  -d '{"model":"moe-tiny","prompt":"The ","max_tokens":16}' || {
  echo "demo: the completion request failed" >&2; exit 1; }
echo

if $check; then
  echo "demo: --check passed: moe-tiny Succeeded and moe-tiny-chat serves 2 ready replicas"
  exit 0
fi
echo "demo: press Ctrl-C to stop"
wait "${pids[0]}"
