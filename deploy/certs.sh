#!/usr/bin/env bash
# Fill the mTLS Secrets of deploy/secrets.yaml with a fresh development CA, the operator's
# certificate and one client certificate per GPU node:
#
#   kubectl apply -k deploy/
#   deploy/certs.sh gpu-node-1 gpu-node-2 ...     # the Kubernetes node names of the GPU nodes
#
# Uses `flotilla-agent certs` (from $FLOTILLA_AGENT, else PATH, else `cargo run`), writes the files
# into a temporary directory that is removed afterwards, and swaps the data of both Secrets (a
# later `kubectl apply -k deploy/` leaves it alone). Re-run it, with every node, to add nodes or
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

# Swap the whole data map of the placeholder Secret (a JSON patch: labels, annotations and the
# last-applied annotation stay as `kubectl apply -k deploy/` wrote them, so a later apply keeps the
# data). Creates the Secret when deploy/ has not been applied yet.
replace_secret() {
    local name=$1
    shift
    local data
    data=$(kubectl -n "$namespace" create secret generic "$name" "$@" --dry-run=client \
        -o 'jsonpath={.data}')
    printf '[{"op": "add", "path": "/data", "value": %s}]\n' "$data" >"$dir/$name.patch.json"
    if kubectl -n "$namespace" get secret "$name" >/dev/null 2>&1; then
        kubectl -n "$namespace" patch secret "$name" --type=json --patch-file "$dir/$name.patch.json"
    else
        kubectl -n "$namespace" create secret generic "$name" "$@"
    fi
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
