//! The node's Lease: the `coordination.k8s.io/v1` Lease each agent renews on the API server, and
//! the annotations through which the operator declares the node lost and the agent confirms that
//! it has stopped its workers. The agent writes [`FENCED`], the operator [`VERDICT`]; each reads
//! the other's.

/// Prefix of the Lease's name; the node name follows.
pub const NAME_PREFIX: &str = "flotilla-agent-";

/// Annotation the operator sets when it declares the node lost: an id, new for each verdict.
pub const VERDICT: &str = "flotilla.dev/lost-verdict";

/// Annotation the agent sets once it has killed its workers for the verdict with this id.
pub const FENCED: &str = "flotilla.dev/fenced-verdict";

/// Label every node Lease carries (key, value), for the operator's watch.
pub const LABEL: (&str, &str) = ("app.kubernetes.io/component", "agent-lease");

/// The agent's longest wait between two attempts to reach the operator, seconds. A new leader
/// gives an agent twice that (for the jitter), beyond the heartbeat timeout, to register before
/// it declares a node it has not heard lost.
pub const RECONNECT_MAX_DELAY_S: u64 = 10;

/// The Lease's name for `node`.
pub fn lease_name(node: &str) -> String {
    format!("{NAME_PREFIX}{node}")
}

/// The node a Lease named `name` belongs to, if it is a node Lease.
pub fn node_of(name: &str) -> Option<&str> {
    name.strip_prefix(NAME_PREFIX).filter(|n| !n.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        assert_eq!(node_of(&lease_name("gpu-7")), Some("gpu-7"));
        assert_eq!(node_of("flotilla-operator"), None);
        assert_eq!(node_of(NAME_PREFIX), None);
    }
}
