//! Leader election on a `coordination.k8s.io/v1` Lease.
//!
//! Written here rather than taken from `kube-leader-election`/`kube-lease-manager` because those
//! pin older kube releases. No fencing is needed from the lease: attempt numbers fence agents.

use crate::error::Result;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::Client;
use kube::api::{Api, ObjectMeta, PostParams};

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

/// May `me` take or keep a lease whose spec is `spec`, at `now`? Yes when nobody holds it, when
/// `me` holds it, or when the holder's renewal is older than the lease duration.
pub fn may_hold(spec: Option<&LeaseSpec>, me: &str, now: Timestamp) -> bool {
    let Some(spec) = spec else { return true };
    let holder = spec.holder_identity.as_deref().unwrap_or_default();
    if holder.is_empty() || holder == me {
        return true;
    }
    let duration = SignedDuration::from_secs(i64::from(spec.lease_duration_seconds.unwrap_or(0)));
    match spec.renew_time.as_ref().or(spec.acquire_time.as_ref()) {
        Some(renewed) => renewed.0.checked_add(duration).is_ok_and(|expiry| now >= expiry),
        None => true,
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
}

impl LeaderElector {
    /// An elector for `settings`.
    pub fn new(client: Client, settings: LeaseSettings) -> Self {
        LeaderElector { api: Api::namespaced(client, &settings.namespace), settings }
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
                if !may_hold(lease.spec.as_ref(), &s.identity, now) {
                    return Ok(false);
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
    fn a_lease_is_taken_only_when_free_own_or_expired() {
        assert!(may_hold(None, "b", at(0)));
        assert!(may_hold(Some(&LeaseSpec::default()), "b", at(0)));
        assert!(may_hold(Some(&held("b", 0)), "b", at(5)));
        assert!(!may_hold(Some(&held("a", 0)), "b", at(14)));
        assert!(may_hold(Some(&held("a", 0)), "b", at(15)));
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
