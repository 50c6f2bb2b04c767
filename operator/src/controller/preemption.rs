//! Preemption requests: a waiting job or service replica asks lower-priority running jobs to
//! stop (they checkpoint and requeue) through an annotation on each, naming the attempt.

use super::Context;
use crate::crd::TrainingJob;
use crate::error::{Error, Result};
use crate::ids::object_key;
use crate::lifecycle;
use kube::api::{Api, Patch, PatchParams};
use kube::{Resource, ResourceExt};

/// The job that asked to preempt `job`'s current attempt, if one did.
pub(super) fn preemption_request(job: &TrainingJob) -> Option<String> {
    let attempt = job.status.as_ref()?.attempt.as_ref()?.number;
    let value = job.annotations().get(lifecycle::PREEMPTED_BY)?;
    lifecycle::preempted_by(value, attempt).map(str::to_string)
}

/// The `victims` to ask now on behalf of preemptor `me`: none while a job it already asked is
/// still stopping (its GPUs come free soon; asking more would stop work for nothing).
pub(super) fn victims_to_ask(me: &str, victims: &[String], jobs: &[&TrainingJob]) -> Vec<String> {
    let stopping = jobs.iter().any(|o| {
        preemption_request(o).is_some_and(|by| by == me)
            && o.status.as_ref().is_some_and(|s| s.phase.holds_gpus())
    });
    if stopping { Vec::new() } else { victims.to_vec() }
}

/// Ask each job of `victims` (UIDs among `others`) to stop its current attempt for `preemptor`,
/// named `me` in the request.
pub(super) async fn request_preemption<K: Resource<DynamicType = ()>>(
    preemptor: &K,
    me: &str,
    victims: &[String],
    others: &[&TrainingJob],
    ctx: &Context,
) -> Result<()> {
    for uid in victims {
        let Some(victim) = others.iter().find(|o| o.uid().as_deref() == Some(uid.as_str())) else {
            continue;
        };
        let Some(attempt) = victim.status.as_ref().and_then(|s| s.attempt.as_ref()) else {
            continue;
        };
        let ns = victim.namespace().ok_or(Error::MissingField("metadata.namespace"))?;
        let api: Api<TrainingJob> = Api::namespaced(ctx.client.clone(), &ns);
        let value = format!("{}/{me}", attempt.number);
        let patch = serde_json::json!({
            "metadata": {"annotations": {lifecycle::PREEMPTED_BY: value}}
        });
        api.patch(&victim.name_any(), &PatchParams::default(), &Patch::Merge(&patch)).await?;
        let note = if attempt.on_loan {
            format!(
                "taking back the GPUs lent to {} (attempt {}); it checkpoints and requeues",
                object_key(*victim),
                attempt.number
            )
        } else {
            format!(
                "preempting {} (priority {}, attempt {}) to make room; it checkpoints and requeues",
                object_key(*victim),
                victim.spec.priority,
                attempt.number
            )
        };
        tracing::info!(preemptor = %me, victim = %object_key(*victim), "preemption requested");
        ctx.publish(preemptor, false, "Preempting", note).await;
    }
    Ok(())
}
