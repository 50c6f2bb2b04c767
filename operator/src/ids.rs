//! Identifiers of what the operator runs, as types: which kind of workload, which object, which
//! launch of which replica. Each has one text form, written in one place, for the agents (the
//! `job_uid` of a worker) and for the scheduler (the id of a request or a running job); nothing
//! takes those texts apart again.

use kube::{Resource, ResourceExt};
use std::fmt;

/// The kinds of workload whose workers run on the agents.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum WorkloadKind {
    /// A `TrainingJob`: one gang per attempt.
    TrainingJob,
    /// An `InferenceService`: one gang per launch of each replica.
    InferenceService,
}

impl WorkloadKind {
    /// The Kubernetes kind, as in `kind:` and in metric labels.
    pub const fn as_str(self) -> &'static str {
        match self {
            WorkloadKind::TrainingJob => "TrainingJob",
            WorkloadKind::InferenceService => "InferenceService",
        }
    }
}

impl fmt::Display for WorkloadKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One launch of one replica of an `InferenceService`: slot `index`, launch number `attempt`
/// (unique within the service). Each launch is its own workload on the agents, so a new launch
/// of a slot can start beside the old one (surge) and the old one still be stopped.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ReplicaId {
    /// The service's UID.
    pub service: String,
    /// The replica slot.
    pub index: i32,
    /// The launch number.
    pub attempt: i32,
}

impl ReplicaId {
    /// The id of this launch on the agents and of its readiness verdict:
    /// `<uid>/replica-<index>.<attempt>` (every launch of a service shares the `<uid>/` prefix,
    /// see [`ReplicaId::service_prefix`]).
    pub fn on_agents(&self) -> String {
        format!("{}replica-{}.{}", Self::service_prefix(&self.service), self.index, self.attempt)
    }

    /// The prefix every [`ReplicaId::on_agents`] of the service `uid` starts with.
    pub fn service_prefix(uid: &str) -> String {
        format!("{uid}/")
    }

    /// The scheduler's id of the slot while it waits for a placement.
    pub fn slot_request_id(service: &str, index: i32) -> String {
        format!("{service}#{index}")
    }
}

/// Who holds (or has booked) GPUs: a training job, or one launch of a service replica.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum HolderId {
    /// A `TrainingJob`, by UID (every attempt of a job holds under the same id).
    Job(String),
    /// One launch of a service replica.
    Replica(ReplicaId),
}

impl HolderId {
    /// The UID of the object that owns the GPUs: the job, or the replica's service.
    pub fn owner(&self) -> &str {
        match self {
            HolderId::Job(uid) => uid,
            HolderId::Replica(r) => &r.service,
        }
    }

    /// The id the scheduler knows the holder by: a job's UID (preemption victims are named by
    /// it), `<uid>#<index>.<attempt>` for a replica launch.
    pub fn scheduler_id(&self) -> String {
        match self {
            HolderId::Job(uid) => uid.clone(),
            HolderId::Replica(r) => format!("{}#{}.{}", r.service, r.index, r.attempt),
        }
    }
}

/// Identifies one workload's workers on the agents, with the object it belongs to.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct WorkloadKey {
    /// Namespace of the object.
    pub namespace: String,
    /// Name of the object.
    pub name: String,
    /// The job, or the replica launch.
    pub holder: HolderId,
}

impl WorkloadKey {
    /// The key of a training job.
    pub fn job(
        namespace: impl Into<String>,
        name: impl Into<String>,
        uid: impl Into<String>,
    ) -> Self {
        WorkloadKey {
            namespace: namespace.into(),
            name: name.into(),
            holder: HolderId::Job(uid.into()),
        }
    }

    /// The key of one launch of a service replica.
    pub fn replica(namespace: impl Into<String>, name: impl Into<String>, id: ReplicaId) -> Self {
        WorkloadKey {
            namespace: namespace.into(),
            name: name.into(),
            holder: HolderId::Replica(id),
        }
    }

    /// Which kind of object runs these workers.
    pub fn kind(&self) -> WorkloadKind {
        match self.holder {
            HolderId::Job(_) => WorkloadKind::TrainingJob,
            HolderId::Replica(_) => WorkloadKind::InferenceService,
        }
    }

    /// The id its workers carry on the agents (`job_uid` in the agent API).
    pub fn on_agents(&self) -> String {
        match &self.holder {
            HolderId::Job(uid) => uid.clone(),
            HolderId::Replica(r) => r.on_agents(),
        }
    }
}

/// `namespace/name` of an object, for logs, reasons and backoff bookkeeping.
pub fn object_key<K: Resource>(obj: &K) -> String {
    match obj.namespace() {
        Some(ns) => format!("{ns}/{}", obj.name_any()),
        None => obj.name_any(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_id_has_one_text_form_per_audience() {
        let r = ReplicaId { service: "u1".into(), index: 2, attempt: 7 };
        assert_eq!(r.on_agents(), "u1/replica-2.7");
        assert!(r.on_agents().starts_with(&ReplicaId::service_prefix("u1")));
        assert_eq!(HolderId::Replica(r.clone()).scheduler_id(), "u1#2.7");
        assert_eq!(HolderId::Job("u1".into()).scheduler_id(), "u1");
        assert_eq!(HolderId::Replica(r.clone()).owner(), "u1");
        let key = WorkloadKey::replica("ns", "svc", r);
        assert_eq!(key.kind(), WorkloadKind::InferenceService);
        assert_eq!(WorkloadKey::job("ns", "j", "u2").kind(), WorkloadKind::TrainingJob);
    }
}
