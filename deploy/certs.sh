#!/usr/bin/env bash
# Fill the mTLS Secrets of deploy/secrets.yaml with a fresh development CA, the operator's
# certificate and one client certificate per GPU node:
#
#   kubectl apply -k deploy/
#   deploy/certs.sh gpu-node-1 gpu-node-2 ...     # the Kubernetes node names of the GPU nodes
#
# Uses `flotilla-agent certs` (from $FLOTILLA_AGENT, else PATH, else `cargo run`), writes the files
# into a temporary directory that is removed afterwards, and `kubectl replace`s both Secrets (so a
# later `kubectl apply -k deploy/` leaves them alone). Re-run it, with every node, to add nodes or
# rotate. The CA key is not kept: this is for development and evaluation; in production issue the
# certificates from your own CA (for example cert-manager) under the same Secret keys:
#   flotilla-operator-tls: ca.pem, operator.pem, operator-key.pem
#   flotilla-agent-tls:    ca.pem, <node>.pem and <node>-key.pem for every node
set -euo pipefail

if [[ $# -eq 0 ]]; then
    echo "usage: $0 NODE_NAME..." >&2
    exit 2
fi
namespace=${FLOTILLA_NAMESPACE:-flotilla-system}
service=flotilla-operator-agents.$namespace.svc

if [[ -n ${FLOTILLA_AGENT:-} ]]; then
    agent=("$FLOTILLA_AGENT")
elif command -v flotilla-agent >/dev/null; then
    agent=(flotilla-agent)
else
    agent=(cargo run --quiet --release -p flotilla-agent --)
fi

dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
nodes=$(IFS=,; echo "$*")
"${agent[@]}" certs --out "$dir" --node "$nodes" \
    --operator-name "$service,$service.cluster.local"

replace_secret() {
    local name=$1
    shift
    kubectl -n "$namespace" create secret generic "$name" "$@" --dry-run=client -o yaml \
        >"$dir/$name.yaml"
    kubectl -n "$namespace" replace -f "$dir/$name.yaml" 2>/dev/null ||
        kubectl -n "$namespace" create -f "$dir/$name.yaml"
}

replace_secret flotilla-operator-tls \
    --from-file="$dir/ca.pem" --from-file="$dir/operator.pem" --from-file="$dir/operator-key.pem"
agent_files=(--from-file="$dir/ca.pem")
for node in "$@"; do
    agent_files+=(--from-file="$dir/$node.pem" --from-file="$dir/$node-key.pem")
done
replace_secret flotilla-agent-tls "${agent_files[@]}"
echo "filled flotilla-operator-tls and flotilla-agent-tls in $namespace for: $*"
echo "restart the pods to load them: kubectl -n $namespace rollout restart deploy/flotilla-operator ds/flotilla-agent"
