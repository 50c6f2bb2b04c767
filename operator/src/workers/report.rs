//! An attempt's summary for the job lifecycle, from what is known of its workers and the health
//! of their nodes and GPUs (pure).

use super::fold::{RankSeen, RankState};
use crate::agents::{GpuHealth, NodeRecord};
use crate::lifecycle::{AttemptReport, HardwareFault, WorkerExit};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

/// Attempts of the job `uid` other than `current` whose workers agents listed as running.
pub fn stale_attempts(uid: &str, current: i32, nodes: &HashMap<String, NodeRecord>) -> Vec<u64> {
    let mut stale: Vec<u64> = nodes
        .values()
        .flat_map(|n| &n.workers)
        .filter(|w| w.job_uid == uid && w.attempt != current as u64)
        .map(|w| w.attempt)
        .collect();
    stale.sort_unstable();
    stale.dedup();
    stale
}

/// `complete`: the known workers are all the attempt has. `fenced`: the nodes whose workers are
/// certainly gone although nobody heard them exit (their agents fenced themselves or confirmed a
/// verdict, [`crate::agents::liveness`]).
pub fn attempt_report(
    ranks: &BTreeMap<u32, RankSeen>,
    complete: bool,
    nodes: &HashMap<String, NodeRecord>,
    fenced: &HashSet<String>,
    fence_timeout: Duration,
) -> AttemptReport {
    let mut report = AttemptReport::default();
    let silent = |node: &str| fenced.contains(node);
    let mut stopped = true;
    for (&rank, seen) in ranks {
        match seen.state {
            RankState::Exited { code, signal } => {
                report.exits.push(WorkerExit { rank: rank as i32, code, signal });
                continue;
            }
            RankState::Running => report.running += 1,
            RankState::Launching => {}
        }
        if silent(&seen.node) {
            report.node_lost.get_or_insert_with(|| HardwareFault {
                node: seen.node.clone(),
                gpu: None,
                xid: None,
                message: format!(
                    "node {} stopped reporting and its workers are fenced (fence timeout {}s)",
                    seen.node,
                    fence_timeout.as_secs()
                ),
            });
            continue;
        }
        if let Some(rec) = nodes.get(&seen.node) {
            if agent_restarted_without(rec, seen, rank) {
                report.node_lost.get_or_insert_with(|| HardwareFault {
                    node: seen.node.clone(),
                    gpu: None,
                    xid: None,
                    message: format!(
                        "the agent on {} restarted and no longer runs worker {rank}: workers die with their agent",
                        seen.node
                    ),
                });
                continue;
            }
            if !rec.connected || rec.lost {
                report.node_unreachable.get_or_insert_with(|| seen.node.clone());
            }
        }
        stopped = false;
        if report.fault.is_none()
            && let Some(rec) = nodes.get(&seen.node)
            && let Some(gpu) = rec
                .gpus
                .iter()
                .find(|g| g.health == GpuHealth::Failed && seen.gpu_uuids.contains(&g.uuid))
        {
            report.fault = Some(HardwareFault {
                node: seen.node.clone(),
                gpu: Some(gpu.index as i32),
                xid: (gpu.last_xid != 0).then_some(gpu.last_xid as i32),
                message: if gpu.message.is_empty() {
                    format!("GPU {} on {} failed ({})", gpu.index, seen.node, gpu.reason)
                } else {
                    format!("GPU {} on {}: {}", gpu.index, seen.node, gpu.message)
                },
            });
        }
    }
    report.all_stopped = complete && stopped;
    // A worker whose collective gave up on a peer exits because of that peer: the exits of
    // the others come first, so the lifecycle charges the worker that failed, not those that
    // noticed (a peer still alive is a hang: [`super::hang`]).
    let gave_up = |rank: i32| {
        ranks
            .get(&(rank as u32))
            .and_then(|r| r.pace)
            .is_some_and(|p| p.activity == crate::agents::Activity::PeerLost)
    };
    report.exits.sort_by_key(|e| gave_up(e.rank));
    report
}

/// True when the worker `rank` was started by an earlier agent process on its node than the
/// one registered now, and the new one does not list it: it died with the old agent (workers
/// get SIGKILL when their agent dies), so it is confirmed gone.
fn agent_restarted_without(rec: &NodeRecord, seen: &RankSeen, rank: u32) -> bool {
    !seen.process.is_empty()
        && rec.process_id != seen.process
        && !rec.workers.iter().any(|w| w.rank == rank && seen.gpu_uuids == w.gpu_uuids)
}
