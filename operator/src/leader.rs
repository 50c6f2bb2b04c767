//! Leader election on a `coordination.k8s.io/v1` Lease.
//!
//! Written here rather than taken from `kube-leader-election`/`kube-lease-manager` because those
//! pin older kube releases (kube 0.9x–2.x; this workspace is on kube 5). No fencing is needed
//! from the lease: attempt numbers fence agents.
//!
//! Expiry follows client-go's rule, which is robust to clock skew between replicas: a standby
//! never compares the holder's `renewTime` with its own clock. It remembers when *it* last saw
//! the lease record change, on its own monotonic clock, and takes the lease only once the record
//! has stayed the same for a whole lease duration. A holder whose clock runs hours behind keeps
//! its lease as long as it renews; a holder that stopped renewing loses it one lease duration
//! after the standby first saw its last renewal, whatever the timestamps say.

use crate::error::Result;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::Client;
use kube::api::{Api, ObjectMeta, PostParams};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Where the lease lives and how it is held.
#[derive(Clone, Debug)]
pub struct LeaseSettings {
    /// Namespace of the Lease.
    pub namespace: String,
    /// Name of the Lease.
    pub name: String,
    /// This replica's identity, unique among replicas.
    pub identity: String,
    /// How long a lease stays valid without renewal.
    pub duration: SignedDuration,
}

/// May `me` take or keep a lease whose spec is `spec`, which this replica has seen unchanged
/// for `unchanged_for` on its own clock? Yes when nobody holds it, when `me` holds it, or when
/// the record has not changed for a whole lease duration (its holder stopped renewing).
pub fn may_hold(spec: Option<&LeaseSpec>, me: &str, unchanged_for: Duration) -> bool {
    let Some(spec) = spec else { return true };
    let holder = spec.holder_identity.as_deref().unwrap_or_default();
    if holder.is_empty() || holder == me {
        return true;
    }
    let duration =
        Duration::from_secs(u64::try_from(spec.lease_duration_seconds.unwrap_or(0)).unwrap_or(0));
    unchanged_for >= duration
}

/// What identifies one version of a lease record: any renewal or change of holder changes it.
#[derive(Clone, Debug, PartialEq)]
struct Record {
    holder: Option<String>,
    acquired: Option<MicroTime>,
    renewed: Option<MicroTime>,
    transitions: Option<i32>,
    duration: Option<i32>,
}

impl Record {
    fn of(spec: Option<&LeaseSpec>) -> Option<Record> {
        spec.map(|s| Record {
            holder: s.holder_identity.clone(),
            acquired: s.acquire_time.clone(),
            renewed: s.renew_time.clone(),
            transitions: s.lease_transitions,
            duration: s.lease_duration_seconds,
        })
    }
}

/// The last lease record this replica saw and when (on its monotonic clock) it first saw it.
#[derive(Debug, Default)]
struct Observation(Mutex<Option<(Option<Record>, Instant)>>);

impl Observation {
    /// Note the record read at `now`; how long it has been unchanged.
    fn unchanged_for(&self, record: Option<Record>, now: Instant) -> Duration {
        let mut seen = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match seen.as_ref() {
            Some((last, since)) if *last == record => now.saturating_duration_since(*since),
            _ => {
                *seen = Some((record, now));
                Duration::ZERO
            }
        }
    }
}

/// The spec `me` writes to take or renew the lease.
pub fn claimed(
    old: Option<&LeaseSpec>,
    me: &str,
    duration: SignedDuration,
    now: Timestamp,
) -> LeaseSpec {
    let held_by_me = old.and_then(|s| s.holder_identity.as_deref()) == Some(me);
    let transitions = old.and_then(|s| s.lease_transitions).unwrap_or(0);
    LeaseSpec {
        holder_identity: Some(me.to_string()),
        lease_duration_seconds: Some(duration.as_secs() as i32),
        acquire_time: if held_by_me {
            old.and_then(|s| s.acquire_time.clone())
        } else {
            Some(MicroTime(now))
        },
        renew_time: Some(MicroTime(now)),
        lease_transitions: Some(if held_by_me || old.is_none() {
            transitions
        } else {
            transitions + 1
        }),
        ..Default::default()
    }
}

/// Takes, renews and releases the lease.
pub struct LeaderElector {
    api: Api<Lease>,
    settings: LeaseSettings,
    observed: Observation,
    /// The holder this replica took the lease from without it being released, if it did.
    taken_from: std::sync::Mutex<Option<String>>,
}

impl LeaderElector {
    /// An elector for `settings`.
    pub fn new(client: Client, settings: LeaseSettings) -> Self {
        LeaderElector {
            api: Api::namespaced(client, &settings.namespace),
            settings,
            observed: Observation::default(),
            taken_from: std::sync::Mutex::new(None),
        }
    }

    /// The other replica this one took the lease from when it expired unreleased (that replica
    /// may still be running, cut off from the API server), if it did.
    pub fn took_over_from(&self) -> Option<String> {
        self.taken_from.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// This replica's identity.
    pub fn identity(&self) -> &str {
        &self.settings.identity
    }

    /// Take the lease if free or expired, or renew it if held. `Ok(true)` when this replica
    /// holds it now. A write that loses a race (409 Conflict) is `Ok(false)`.
    pub async fn try_acquire_or_renew(&self) -> Result<bool> {
        let s = &self.settings;
        let now = Timestamp::now();
        let current = self.api.get_opt(&s.name).await?;
        let lease = match current {
            None => Lease {
                metadata: ObjectMeta { name: Some(s.name.clone()), ..Default::default() },
                spec: Some(claimed(None, &s.identity, s.duration, now)),
            },
            Some(mut lease) => {
                let record = Record::of(lease.spec.as_ref());
                let unchanged_for = self.observed.unchanged_for(record, Instant::now());
                if !may_hold(lease.spec.as_ref(), &s.identity, unchanged_for) {
                    return Ok(false);
                }
                let holder = lease.spec.as_ref().and_then(|l| l.holder_identity.clone());
                if let Some(other) = holder.filter(|h| !h.is_empty() && *h != s.identity) {
                    *self.taken_from.lock().unwrap_or_else(|e| e.into_inner()) = Some(other);
                }
                lease.spec = Some(claimed(lease.spec.as_ref(), &s.identity, s.duration, now));
                lease
            }
        };
        let result = if lease.metadata.resource_version.is_none() {
            self.api.create(&PostParams::default(), &lease).await
        } else {
            self.api.replace(&s.name, &PostParams::default(), &lease).await
        };
        match result {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Give the lease up at shutdown so a standby need not wait for it to expire.
    pub async fn release(&self) -> Result<()> {
        let s = &self.settings;
        if let Some(mut lease) = self.api.get_opt(&s.name).await?
            && let Some(spec) = lease.spec.as_mut()
            && spec.holder_identity.as_deref() == Some(s.identity.as_str())
        {
            spec.holder_identity = None;
            spec.renew_time = None;
            spec.acquire_time = None;
            match self.api.replace(&s.name, &PostParams::default(), &lease).await {
                Ok(_) | Err(kube::Error::Api(_)) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: i64) -> Timestamp {
        Timestamp::from_second(1_000_000 + s).unwrap()
    }

    fn held(by: &str, renewed: i64) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(by.into()),
            lease_duration_seconds: Some(15),
            renew_time: Some(MicroTime(at(renewed))),
            lease_transitions: Some(2),
            ..Default::default()
        }
    }

    #[test]
    fn a_lease_is_taken_only_when_free_own_or_unchanged_for_its_duration() {
        let secs = Duration::from_secs;
        assert!(may_hold(None, "b", secs(0)));
        assert!(may_hold(Some(&LeaseSpec::default()), "b", secs(0)));
        assert!(may_hold(Some(&held("b", 0)), "b", secs(0)));
        assert!(!may_hold(Some(&held("a", 0)), "b", secs(14)));
        assert!(may_hold(Some(&held("a", 0)), "b", secs(15)));
    }

    #[test]
    fn expiry_is_measured_on_the_standbys_clock_whatever_the_holders_timestamps_say() {
        let seen = Observation::default();
        let t0 = Instant::now();
        let secs = Duration::from_secs;
        // The holder's clock runs an hour behind: its renewTime looks long expired to anyone
        // comparing timestamps. The standby has only just seen the record, so it waits.
        let skewed = held("a", -3600);
        let unchanged = seen.unchanged_for(Record::of(Some(&skewed)), t0);
        assert!(!may_hold(Some(&skewed), "b", unchanged), "a renewing holder keeps its lease");
        // The holder renews (the record changes, still with an old timestamp): the wait restarts.
        let renewed = held("a", -3590);
        let unchanged = seen.unchanged_for(Record::of(Some(&renewed)), t0 + secs(10));
        assert_eq!(unchanged, secs(0));
        assert!(!may_hold(
            Some(&renewed),
            "b",
            seen.unchanged_for(Record::of(Some(&renewed)), t0 + secs(24))
        ));
        // No renewal for a whole lease duration on the standby's clock: it may take over.
        let unchanged = seen.unchanged_for(Record::of(Some(&renewed)), t0 + secs(25));
        assert!(may_hold(Some(&renewed), "b", unchanged));
        // The holder's clock runs ahead instead: a renewTime in the future does not keep the
        // lease forever once the holder is gone.
        let ahead = held("a", 7200);
        let seen = Observation::default();
        seen.unchanged_for(Record::of(Some(&ahead)), t0);
        assert!(may_hold(
            Some(&ahead),
            "b",
            seen.unchanged_for(Record::of(Some(&ahead)), t0 + secs(15))
        ));
    }

    #[test]
    fn taking_over_counts_a_transition_and_renewing_does_not() {
        let d = SignedDuration::from_secs(15);
        let over = claimed(Some(&held("a", 0)), "b", d, at(20));
        assert_eq!((over.holder_identity.as_deref(), over.lease_transitions), (Some("b"), Some(3)));
        assert_eq!(over.acquire_time, Some(MicroTime(at(20))));
        let renewed = claimed(Some(&held("b", 0)), "b", d, at(5));
        assert_eq!(renewed.lease_transitions, Some(2));
        assert_eq!(renewed.renew_time, Some(MicroTime(at(5))));
    }
}
