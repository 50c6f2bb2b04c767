//! The verdicts on an attempt's pace, from what `AgentWorkers` saw of it and the agents'
//! view of its GPUs: a hung rank ([`super::hang`]), a straggler ([`super::straggler`]) and
//! whether moving off it is worth it; and which GPUs marked for slow steps are idle enough to
//! validate.

use super::ProgressPolicy;
use super::agent_workers::COMMAND_TIMEOUT;
use super::fold::AttemptSeen;
use super::hang::{self, HangCheck};
use super::straggler;
use crate::agents::{AgentServer, GpuAction, GpuHealth, NodeRecord, NodeRegistry};
use crate::lifecycle::{AttemptReport, HungRank, SlowRank};
use std::collections::HashSet;
use std::time::{Duration, Instant};

/// The health reason of a GPU its agent marked Degraded because it slowed its gang.
pub const SLOW_STEPS: &str = "SlowSteps";

/// A job's start-up time when this process did not see it start (it took over).
const DEFAULT_STARTUP_SECONDS: f64 = 60.0;

/// What a restart costs besides the job's start-up: stopping the gang (workers checkpoint on
/// SIGTERM), writing the status, placing the next attempt.
const RESTART_OVERHEAD_SECONDS: f64 = 10.0;

/// A GPU marked for slow steps is validated again (once no worker uses it) this often.
const SUSPECT_VALIDATE_INTERVAL: Duration = Duration::from_secs(15);

/// Fills `report.hang`, `report.lease_ends_in` and `report.straggler` for the attempt `seen`
/// under `policy`, with GPU health from `registry`.
pub fn judge(
    seen: &AttemptSeen,
    registry: &NodeRegistry,
    policy: &ProgressPolicy,
    report: &mut AttemptReport,
) {
    // The first of `uuids` as its node's agent knows it, and whether any is Degraded.
    let gpu_of = |node: &str, uuids: &[String]| {
        let rec = registry.node(node);
        let gpus: Vec<_> = rec
            .map(|n| n.gpus.into_iter().filter(|g| uuids.contains(&g.uuid)).collect())
            .unwrap_or_default();
        let first = gpus.first().map(|g| (g.index as i32, g.uuid.clone()));
        let degraded = gpus.iter().any(|g| g.health == GpuHealth::Degraded);
        (first, degraded)
    };
    match hang::check(seen, policy.hang.as_ref(), Instant::now()) {
        HangCheck::Off => {}
        HangCheck::Holds { next_look } => report.lease_ends_in = Some(next_look),
        HangCheck::Hung(h) => {
            let uuids = seen.ranks.get(&h.rank).map(|r| r.gpu_uuids.clone()).unwrap_or_default();
            let (gpu, gpu_degraded) = gpu_of(&h.node, &uuids);
            report.hang = Some(HungRank {
                rank: h.rank as i32,
                node: h.node,
                gpu: gpu.map(|(i, _)| i),
                message: h.message,
                gpu_degraded,
            });
        }
    }
    let Some(threshold) = policy.straggler_threshold else { return };
    let Some(slow) = straggler::find(seen, threshold) else { return };
    let (gpu, suspected) = gpu_of(&slow.node, &slow.gpu_uuids);
    let progress = seen.progress.clone().unwrap_or_default();
    let remaining = progress.total_steps.map_or(0, |t| t - progress.step);
    let since_checkpoint = progress.step - progress.last_checkpoint_step.unwrap_or(0);
    let step_seconds = straggler::median(&seen.step_times).unwrap_or(slow.median);
    // This attempt's own start-up (from its launch to its first progress report), plus
    // stopping and placing.
    let startup = match (seen.watched_since, seen.progress_origin) {
        (Some(from), Some((to, _))) if seen.launched_here => {
            to.saturating_duration_since(from).as_secs_f64()
        }
        _ => DEFAULT_STARTUP_SECONDS,
    };
    let restart_seconds = startup + RESTART_OVERHEAD_SECONDS;
    let rule =
        straggler::move_rule(&slow, remaining, step_seconds, since_checkpoint, restart_seconds);
    let move_rule = format!(
        "moving would save about {:.0}s over the {remaining} steps left and cost about {:.0}s \
         (start-up {:.0}s, stop and placement {RESTART_OVERHEAD_SECONDS:.0}s, \
         {since_checkpoint} steps since the last checkpoint): {}",
        rule.saving,
        rule.cost,
        startup,
        if rule.worth_it { "worth it" } else { "not worth it" }
    );
    report.straggler = Some(SlowRank {
        rank: slow.rank as i32,
        node: slow.node.clone(),
        gpu,
        evidence: slow.evidence(),
        suspected,
        move_rule,
        worth_moving: rule.worth_it,
    });
}

/// GPUs marked for slow steps that no worker uses (none of `busy`), as `(node, uuid)`: ready
/// to validate.
fn idle_suspects(nodes: &[NodeRecord], busy: &HashSet<String>) -> Vec<(String, String)> {
    nodes
        .iter()
        .filter(|n| n.connected)
        .flat_map(|n| {
            n.gpus
                .iter()
                .filter(|g| g.health == GpuHealth::Degraded && g.reason == SLOW_STEPS)
                .filter(|g| !busy.contains(&g.uuid))
                .map(|g| (n.node.clone(), g.uuid.clone()))
        })
        .collect()
}

/// Every [`SUSPECT_VALIDATE_INTERVAL`], asks the agents to validate the GPUs marked for slow
/// steps that no worker uses (`busy` names the GPUs in use; `None` once the workers are gone,
/// which ends the loop).
pub(super) async fn validate_idle_suspects(
    server: AgentServer,
    busy: impl Fn() -> Option<HashSet<String>>,
) {
    let mut tick = tokio::time::interval(SUSPECT_VALIDATE_INTERVAL);
    loop {
        tick.tick().await;
        let Some(busy) = busy() else { return };
        for (node, uuid) in idle_suspects(&server.registry().nodes(), &busy) {
            let validate = GpuAction::Validate;
            match server.gpu_command(&node, &uuid, validate, COMMAND_TIMEOUT).await {
                Ok(_) => tracing::info!(%node, gpu = %uuid, "suspected GPU validated"),
                Err(e) => {
                    tracing::info!(%node, gpu = %uuid, error = %e, "suspected GPU still fails validation")
                }
            }
        }
    }
}
