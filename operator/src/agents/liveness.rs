//! When a node's workers may be taken for gone: what the operator has seen of each node's Lease
//! (renewed by its agent on the API server, [`flotilla_contract::node_lease`]) beside what it
//! hears on the agent's stream.
//!
//! The agent kills its workers once it has reached neither the operator nor the API server for
//! the fence timeout `F`, counting from when it *sent* its last acknowledged heartbeat or
//! successful renewal. The operator saw that heartbeat, or that renewal's change of the Lease, no
//! earlier than it was sent. So once the operator has neither heard the agent nor seen its Lease
//! change for `F` plus a [`margin`] (the agent's watchdog tick, the kill itself and clock-rate
//! drift), the agent has fenced itself, whatever became of it. The other proof is the agent's
//! own word: it acknowledged the operator's verdict on the Lease after killing its workers.
//!
//! Times are this process's own monotonic instants (the client-go rule: a Lease's `renewTime`
//! is another machine's clock, so only *that it changed* is used, and when this process saw it).

use std::collections::HashMap;
use std::sync::RwLock;
use std::time::{Duration, Instant};

/// Added to the fence timeout before the operator relies on an agent having fenced itself:
/// a tenth of the fence, at least two seconds.
pub fn margin(fence: Duration) -> Duration {
    (fence / 10).max(Duration::from_secs(2))
}

/// The fence timeout plus the margin: how long a node must be quiet on both channels.
pub fn quiet_period(fence: Duration) -> Duration {
    fence + margin(fence)
}

/// One observation of a node's Lease, as the watch delivers it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LeaseObservation {
    /// `spec.holderIdentity`: the agent process renewing it.
    pub holder: String,
    /// `spec.renewTime` as written (compared, never interpreted).
    pub renew_time: String,
    /// The operator's verdict id on it, if any.
    pub verdict: Option<String>,
    /// The verdict id the agent acknowledged, if any.
    pub fenced: Option<String>,
}

#[derive(Debug)]
struct Seen {
    last: LeaseObservation,
    /// When this process saw holder or renew time change.
    changed: Instant,
}

/// The node Leases this process has seen.
#[derive(Debug, Default)]
pub struct Leases {
    seen: RwLock<HashMap<String, Seen>>,
    /// When the watch delivered its first full list (None before: nothing may be concluded).
    synced: RwLock<Option<Instant>>,
    /// Added to the quiet period for agents this process has never heard: after taking the
    /// leader lease over from a replica that did not release it (which may still be acking its
    /// agents, cut off from the API server, for its outage tolerance), that tolerance.
    grace: RwLock<Duration>,
}

impl Leases {
    /// Records an observation; returns whether the agent's acknowledgement changed (callers wake
    /// the controllers then).
    pub fn observe(&self, node: &str, lease: LeaseObservation) -> bool {
        let mut seen = self.seen.write().unwrap_or_else(|e| e.into_inner());
        match seen.get_mut(node) {
            Some(s) => {
                let renewed =
                    s.last.holder != lease.holder || s.last.renew_time != lease.renew_time;
                if renewed {
                    s.changed = Instant::now();
                }
                let acked_changed =
                    s.last.fenced != lease.fenced || s.last.verdict != lease.verdict;
                s.last = lease;
                acked_changed
            }
            None => {
                let acked = lease.fenced.is_some();
                seen.insert(node.to_owned(), Seen { last: lease, changed: Instant::now() });
                acked
            }
        }
    }

    /// The Lease of `node` was deleted.
    pub fn forget(&self, node: &str) {
        self.seen.write().unwrap_or_else(|e| e.into_inner()).remove(node);
    }

    /// The watch has delivered every Lease once (the first time counts).
    pub fn synced(&self) {
        self.synced.write().unwrap_or_else(|e| e.into_inner()).get_or_insert_with(Instant::now);
    }

    /// Moves the first full list `by` into the past (for tests of what follows it).
    #[cfg(test)]
    pub fn backdate_sync(&self, by: Duration) {
        let mut synced = self.synced.write().unwrap_or_else(|e| e.into_inner());
        *synced = Some(Instant::now().checked_sub(by).expect("uptime"));
    }

    /// Sets the grace for agents never heard ([`Leases`]'s `grace`).
    pub fn set_grace(&self, grace: Duration) {
        *self.grace.write().unwrap_or_else(|e| e.into_inner()) = grace;
    }

    /// Whether the Leases have been watched for longer than `quiet` plus the grace: by then an
    /// agent that never reached this process has fenced itself.
    pub fn watched_past(&self, quiet: Duration) -> bool {
        let grace = *self.grace.read().unwrap_or_else(|e| e.into_inner());
        self.watched_for().is_some_and(|w| w > quiet + grace)
    }

    /// How long the Leases have been watched; `None` before the first full list.
    pub fn watched_for(&self) -> Option<Duration> {
        self.synced.read().unwrap_or_else(|e| e.into_inner()).map(|t| t.elapsed())
    }

    /// The last observation of `node`'s Lease.
    pub fn get(&self, node: &str) -> Option<LeaseObservation> {
        self.seen.read().unwrap_or_else(|e| e.into_inner()).get(node).map(|s| s.last.clone())
    }

    /// Nodes with a Lease, sorted.
    pub fn nodes(&self) -> Vec<String> {
        let mut nodes: Vec<String> =
            self.seen.read().unwrap_or_else(|e| e.into_inner()).keys().cloned().collect();
        nodes.sort();
        nodes
    }

    /// Whether `node`'s Lease has not changed for `quiet` (a node without a Lease: whether the
    /// Leases have been watched that long).
    pub fn lease_quiet(&self, node: &str, quiet: Duration) -> bool {
        match self.seen.read().unwrap_or_else(|e| e.into_inner()).get(node) {
            Some(s) => s.changed.elapsed() > quiet,
            None => self.watched_for().is_some_and(|w| w > quiet),
        }
    }

    /// Whether the agent of `node` acknowledged the verdict now on its Lease.
    pub fn acknowledged(&self, node: &str) -> bool {
        self.seen
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(node)
            .is_some_and(|s| acknowledged(&s.last))
    }
}

fn acknowledged(lease: &LeaseObservation) -> bool {
    lease.verdict.is_some() && lease.verdict == lease.fenced
}

/// Whether the workers of a node are certainly gone: the agent acknowledged a verdict, or it has
/// been quiet on both channels for `quiet` (`last_heard`: when its stream last delivered
/// anything, `None` if it never registered with this process).
pub fn fenced(leases: &Leases, node: &str, last_heard: Option<Instant>, quiet: Duration) -> bool {
    if leases.acknowledged(node) {
        return true;
    }
    let link_quiet = match last_heard {
        Some(t) => t.elapsed() > quiet,
        None => leases.watched_past(quiet),
    };
    link_quiet && leases.lease_quiet(node, quiet)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(renew: &str) -> LeaseObservation {
        LeaseObservation { holder: "i1".into(), renew_time: renew.into(), ..Default::default() }
    }

    #[test]
    fn the_margin_is_a_tenth_of_the_fence_and_at_least_two_seconds() {
        assert_eq!(quiet_period(Duration::from_secs(30)), Duration::from_secs(33));
        assert_eq!(quiet_period(Duration::from_secs(5)), Duration::from_secs(7));
    }

    #[test]
    fn nothing_is_concluded_before_the_leases_are_listed() {
        let leases = Leases::default();
        assert!(!fenced(&leases, "n", None, Duration::ZERO));
        leases.synced();
        std::thread::sleep(Duration::from_millis(5));
        // A node without a Lease and never heard: quiet once watched for longer than `quiet`.
        assert!(fenced(&leases, "n", None, Duration::from_millis(1)));
        assert!(!fenced(&leases, "n", None, Duration::from_secs(60)));
        // After an unreleased takeover, the old leader's outage tolerance on top.
        leases.set_grace(Duration::from_secs(300));
        assert!(!fenced(&leases, "n", None, Duration::from_millis(1)));
        // An agent this process heard left the old leader: no grace for it.
        let heard = Instant::now().checked_sub(Duration::from_secs(1));
        assert!(fenced(&leases, "n", heard, Duration::from_millis(1)));
    }

    #[test]
    fn a_renewed_lease_keeps_a_silent_node_alive() {
        let leases = Leases::default();
        leases.synced();
        leases.observe("n", lease("t1"));
        let long_ago = Instant::now().checked_sub(Duration::from_secs(120));
        std::thread::sleep(Duration::from_millis(20));
        leases.observe("n", lease("t2"));
        // The stream is silent for long, but the Lease changed 0 ms ago.
        assert!(!fenced(&leases, "n", long_ago, Duration::from_millis(10)));
        // The same observation again is no renewal.
        std::thread::sleep(Duration::from_millis(20));
        leases.observe("n", lease("t2"));
        assert!(fenced(&leases, "n", long_ago, Duration::from_millis(10)));
    }

    #[test]
    fn only_the_acknowledged_current_verdict_fences() {
        let leases = Leases::default();
        leases.synced();
        let heard = Some(Instant::now());
        let quiet = Duration::from_secs(60);
        let mut l = lease("t1");
        l.verdict = Some("v2".into());
        l.fenced = Some("v1".into());
        leases.observe("n", l.clone());
        assert!(!fenced(&leases, "n", heard, quiet), "an older verdict's acknowledgement");
        l.fenced = Some("v2".into());
        assert!(leases.observe("n", l), "an acknowledgement wakes the controllers");
        assert!(fenced(&leases, "n", heard, quiet));
    }
}
