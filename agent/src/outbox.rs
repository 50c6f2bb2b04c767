//! Critical events waiting for the operator's acknowledgement.
//!
//! Each event gets the next sequence number of this agent instance. Events stay until the operator
//! acknowledges them (cumulatively), so a broken stream loses nothing: after reconnecting the link
//! sends again everything above the operator's acknowledged number.

use crate::health::{Fault, HealthStatus};
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;

/// What a critical event reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CriticalKind {
    /// A fault.
    Fault(Fault),
    /// The GPU is healthy again (validated, cleared or cooled down).
    Recovered,
}

/// One sequenced critical event.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CriticalRecord {
    /// Sequence number, from 1.
    pub seq: u64,
    /// GPU UUID.
    pub gpu_uuid: String,
    /// What happened.
    pub kind: CriticalKind,
    /// The GPU's health after it.
    pub health: HealthStatus,
    /// When it was observed, Unix nanoseconds.
    pub observed_at_unix_nanos: i64,
}

/// Most unacknowledged events kept; beyond it the oldest go (and a warning is logged), so a
/// long partition under an event storm cannot exhaust memory. Health is also resent whole in the
/// registration, so what is dropped is history, not state.
pub const OUTBOX_CAPACITY: usize = 100_000;

/// Unacknowledged critical events in sequence order.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Outbox {
    last_seq: u64,
    acked: u64,
    pending: VecDeque<CriticalRecord>,
}

impl Outbox {
    /// Appends an event and returns its sequence number.
    pub fn push(
        &mut self,
        gpu_uuid: &str,
        kind: CriticalKind,
        health: HealthStatus,
        observed_at_unix_nanos: i64,
    ) -> u64 {
        self.last_seq += 1;
        if self.pending.len() >= OUTBOX_CAPACITY
            && let Some(dropped) = self.pending.pop_front()
        {
            tracing::warn!(
                seq = dropped.seq,
                "outbox full; dropping the oldest unacknowledged event"
            );
        }
        self.pending.push_back(CriticalRecord {
            seq: self.last_seq,
            gpu_uuid: gpu_uuid.to_owned(),
            kind,
            health,
            observed_at_unix_nanos,
        });
        self.last_seq
    }

    /// Drops every event with `seq <= upto`. Acknowledgements above anything raised are ignored.
    pub fn ack(&mut self, upto: u64) {
        let upto = upto.min(self.last_seq);
        self.acked = self.acked.max(upto);
        while self.pending.front().is_some_and(|e| e.seq <= self.acked) {
            self.pending.pop_front();
        }
    }

    /// Events with `seq > after`, in order.
    pub fn after(&self, after: u64) -> impl Iterator<Item = &CriticalRecord> {
        self.pending.iter().filter(move |e| e.seq > after)
    }

    /// Highest sequence number raised.
    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    /// Highest sequence number acknowledged.
    pub fn acked(&self) -> u64 {
        self.acked
    }

    /// Number of unacknowledged events.
    pub fn len(&self) -> usize {
        self.pending.len()
    }

    /// Whether everything was acknowledged.
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn push(o: &mut Outbox, xid: u32) -> u64 {
        o.push("GPU-1", CriticalKind::Fault(Fault::Xid(xid)), HealthStatus::healthy(), 0)
    }

    #[test]
    fn sequence_numbers_start_at_one_and_increase() {
        let mut o = Outbox::default();
        assert_eq!(push(&mut o, 79), 1);
        assert_eq!(push(&mut o, 13), 2);
        assert_eq!(o.last_seq(), 2);
    }

    #[test]
    fn cumulative_ack_keeps_the_rest_for_resend() {
        let mut o = Outbox::default();
        for xid in [1, 2, 3, 4] {
            push(&mut o, xid);
        }
        o.ack(2);
        let left: Vec<u64> = o.after(0).map(|e| e.seq).collect();
        assert_eq!(left, vec![3, 4]);
        // A stale (lower) ack changes nothing; an ack beyond what was raised is clamped.
        o.ack(1);
        assert_eq!(o.len(), 2);
        o.ack(99);
        assert!(o.is_empty());
        assert_eq!(o.acked(), 4);
        assert_eq!(push(&mut o, 5), 5);
        assert_eq!(o.after(o.acked()).count(), 1);
    }

    #[test]
    fn after_skips_what_this_stream_already_sent() {
        let mut o = Outbox::default();
        for xid in [1, 2, 3] {
            push(&mut o, xid);
        }
        let unsent: Vec<u64> = o.after(2).map(|e| e.seq).collect();
        assert_eq!(unsent, vec![3]);
    }
}
