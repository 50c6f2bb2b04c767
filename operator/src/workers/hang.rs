//! The progress lease: is an attempt hung, and which rank stopped first (pure).
//!
//! Every rank's progress reports are a lease. A rank must complete a step within the step
//! bound of its last one — `max(stepTimeoutSeconds, stepTimeFactor × p99 step time)` — except
//! while it starts (until its first step of the attempt: loading, resuming, meeting its peers;
//! `startupSeconds`) and while it writes a checkpoint (`checkpointSeconds`). A rank waiting for
//! a peer in a collective is not making progress: its lease runs on.
//!
//! The lease is armed by the attempt's first progress report: a worker program that never
//! reports is never judged. When a lease runs out, the rank to blame is found by following who
//! waits for whom: a rank that says it waits for rank p points at p, and the first rank that
//! waits for nobody — computing, stuck, stopped or silent — is the one that stopped first.
//! A rank whose collective gave up on its peer (it exits next) points the same way, so the
//! peers that noticed a hang are never the ones blamed for it.

use super::fold::{AttemptSeen, PaceSeen, RankState};
use crate::agents::Activity;
use crate::crd::training_job::HangDetection;
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

/// The budgets of one job (`spec.hangDetection`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct HangPolicy {
    /// The least time allowed between two steps.
    pub step_timeout: Duration,
    /// The step bound is at least this many times the p99 step time.
    pub step_time_factor: f64,
    /// From a worker's start to its first step.
    pub startup: Duration,
    /// For one checkpoint write.
    pub checkpoint: Duration,
}

impl HangPolicy {
    /// The job's policy, or `None` when detection is off.
    pub fn of(spec: &HangDetection) -> Option<Self> {
        let secs = |s: i32| Duration::from_secs(u64::try_from(s.max(1)).unwrap_or(1));
        spec.enabled.then(|| HangPolicy {
            step_timeout: secs(spec.step_timeout_seconds),
            step_time_factor: spec.step_time_factor.clamp(1.0, 1000.0),
            startup: secs(spec.startup_seconds),
            checkpoint: secs(spec.checkpoint_seconds),
        })
    }
}

/// A hung attempt: who stopped first and the evidence.
#[derive(Clone, Debug, PartialEq)]
pub struct Hang {
    /// The rank that stopped first.
    pub rank: u32,
    /// Its node.
    pub node: String,
    /// Ranks that wait for it (directly or through others), or gave up on it.
    pub waiting: Vec<u32>,
    /// What happened, for the restart record, the condition and the Event.
    pub message: String,
}

/// The verdict on an attempt.
#[derive(Clone, Debug, PartialEq)]
pub enum HangCheck {
    /// Not judged: detection is off, or no rank has reported progress.
    Off,
    /// Every lease holds; the first runs out after this long.
    Holds {
        /// Time until the earliest lease runs out.
        next_look: Duration,
    },
    /// Hung.
    Hung(Hang),
}

/// Judges the attempt `seen` at `now`.
pub fn check(seen: &AttemptSeen, policy: Option<&HangPolicy>, now: Instant) -> HangCheck {
    let Some(policy) = policy else { return HangCheck::Off };
    let armed = seen.ranks.values().any(|r| r.pace.is_some());
    let Some(watched_since) = seen.watched_since.filter(|_| armed) else {
        return HangCheck::Off;
    };
    // A peer that gave up on a rank still alive: that rank hung (its own exit, if it crashed,
    // is an exit the lifecycle charges to it).
    let gave_up: Vec<(u32, u32)> = seen
        .ranks
        .iter()
        .filter_map(|(&rank, r)| {
            let p = r.pace.filter(|p| p.activity == Activity::PeerLost)?;
            Some((rank, p.waiting_on_rank?))
        })
        .collect();
    for &(_, lost) in &gave_up {
        let blamed = follow(seen, lost);
        if let Some(r) = seen.ranks.get(&blamed)
            && r.state == RankState::Running
        {
            let waiting = waiting_for(seen, blamed);
            let by: Vec<String> = gave_up.iter().map(|(r, _)| r.to_string()).collect();
            let message = format!(
                "rank {blamed} on {} stopped making progress: rank {} gave up waiting for it in the all-reduce{}",
                r.node,
                by.join(", "),
                describe_last(r.pace.as_ref(), now),
            );
            return HangCheck::Hung(Hang { rank: blamed, node: r.node.clone(), waiting, message });
        }
    }
    let step_bound = step_bound(seen, policy);
    // (waited, budget, what) of every running rank's lease.
    let leases: BTreeMap<u32, (Duration, Duration, &'static str)> = seen
        .ranks
        .iter()
        .filter(|(_, r)| r.state == RankState::Running)
        .map(|(&rank, r)| {
            let (from, budget, what) = lease(r.pace.as_ref(), watched_since, policy, step_bound);
            (rank, (now.saturating_duration_since(from), budget, what))
        })
        .collect();
    let mut next_look = Duration::MAX;
    // The longest overdue rank first: where the search for the culprit starts.
    let mut order: Vec<(&u32, &(Duration, Duration, &str))> = leases.iter().collect();
    order.sort_by_key(|(rank, (waited, budget, _))| {
        (std::cmp::Reverse(waited.saturating_sub(*budget)), **rank)
    });
    for (&rank, &(waited, budget, _)) in order {
        if waited < budget {
            next_look = next_look.min(budget - waited);
            continue;
        }
        let blamed = follow(seen, rank);
        let Some(&(waited, budget, what)) = leases.get(&blamed) else {
            // It waits for a rank that exited: that exit is the story, not a hang.
            continue;
        };
        if waited < budget {
            // It waits for a rank still within its own budget (a peer writing a checkpoint).
            next_look = next_look.min(budget - waited);
            continue;
        }
        let Some(r) = seen.ranks.get(&blamed) else { continue };
        let waiting = waiting_for(seen, blamed);
        let mut message = format!(
            "rank {blamed} on {} stopped making progress: no {what} for {}s (bound {}s{})",
            r.node,
            waited.as_secs(),
            budget.as_secs(),
            if what == "step" { bound_basis(seen, policy) } else { String::new() },
        );
        if !waiting.is_empty() {
            let w: Vec<String> = waiting.iter().map(u32::to_string).collect();
            message.push_str(&format!("; rank {} waited for it in the all-reduce", w.join(", ")));
        }
        message.push_str(&describe_last(r.pace.as_ref(), now));
        return HangCheck::Hung(Hang { rank: blamed, node: r.node.clone(), waiting, message });
    }
    if next_look == Duration::MAX { HangCheck::Off } else { HangCheck::Holds { next_look } }
}

/// When a rank's lease started, how long it is, and what it waits for.
fn lease(
    pace: Option<&PaceSeen>,
    watched_since: Instant,
    policy: &HangPolicy,
    step_bound: Duration,
) -> (Instant, Duration, &'static str) {
    match pace {
        Some(p) if p.activity == Activity::Checkpointing => {
            (p.activity_since, policy.checkpoint, "checkpoint completed")
        }
        Some(PaceSeen { stepped_at: Some(at), .. }) => (*at, step_bound, "step"),
        _ => (watched_since, policy.startup, "first step after start"),
    }
}

fn step_bound(seen: &AttemptSeen, policy: &HangPolicy) -> Duration {
    let scaled = seen
        .p99_step_seconds()
        .map_or(Duration::ZERO, |p99| Duration::from_secs_f64(p99 * policy.step_time_factor));
    policy.step_timeout.max(scaled)
}

fn bound_basis(seen: &AttemptSeen, policy: &HangPolicy) -> String {
    match seen.p99_step_seconds() {
        Some(p99) => format!(
            ": the larger of stepTimeoutSeconds {}s and {} × p99 step time {:.2}s",
            policy.step_timeout.as_secs(),
            policy.step_time_factor,
            p99
        ),
        None => ": stepTimeoutSeconds".into(),
    }
}

/// From `rank`, follows "waits for" to the rank that waits for nobody; on a cycle (everyone
/// waits: a network fault, not one rank) the rank heard from longest ago.
fn follow(seen: &AttemptSeen, rank: u32) -> u32 {
    let mut at = rank;
    let mut visited = BTreeSet::new();
    while visited.insert(at) {
        let next = seen
            .ranks
            .get(&at)
            .and_then(|r| r.pace)
            .filter(|p| matches!(p.activity, Activity::Waiting | Activity::PeerLost))
            .and_then(|p| p.waiting_on_rank)
            .filter(|p| seen.ranks.contains_key(p));
        match next {
            Some(p) => at = p,
            None => return at,
        }
    }
    visited
        .iter()
        .copied()
        .min_by_key(|r| seen.ranks.get(r).and_then(|s| s.pace).map(|p| p.heard_at))
        .unwrap_or(rank)
}

/// The ranks whose chain of waits ends at `blamed`.
fn waiting_for(seen: &AttemptSeen, blamed: u32) -> Vec<u32> {
    seen.ranks
        .iter()
        .filter(|(rank, r)| {
            **rank != blamed
                && r.pace.is_some_and(|p| {
                    matches!(p.activity, Activity::Waiting | Activity::PeerLost)
                        && p.waiting_on_rank.is_some()
                })
                && follow(seen, **rank) == blamed
        })
        .map(|(rank, _)| *rank)
        .collect()
}

fn describe_last(pace: Option<&PaceSeen>, now: Instant) -> String {
    match pace {
        None => "; it never reported".into(),
        Some(p) => format!(
            "; its last report, {}s ago, said {} after step {}",
            now.saturating_duration_since(p.heard_at).as_secs(),
            match p.activity {
                Activity::Training => "training",
                Activity::Starting => "starting",
                Activity::Checkpointing => "checkpointing",
                Activity::Waiting => "waiting for a peer",
                Activity::PeerLost => "it lost a peer",
            },
            p.step
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workers::fold::RankSeen;

    const POLICY: HangPolicy = HangPolicy {
        step_timeout: Duration::from_secs(10),
        step_time_factor: 10.0,
        startup: Duration::from_secs(60),
        checkpoint: Duration::from_secs(30),
    };

    fn rank(node: &str, pace: Option<PaceSeen>) -> RankSeen {
        RankSeen {
            node: node.into(),
            gpu_uuids: vec![],
            state: RankState::Running,
            process: String::new(),
            pace,
        }
    }

    fn pace(t0: Instant, step: i64, stepped: u64, activity: Activity, on: Option<u32>) -> PaceSeen {
        let at = t0 + Duration::from_secs(stepped);
        PaceSeen {
            step,
            stepped_at: Some(at),
            heard_at: at,
            activity,
            activity_since: at,
            waiting_on_rank: on,
        }
    }

    fn attempt(t0: Instant, ranks: Vec<RankSeen>) -> AttemptSeen {
        AttemptSeen {
            ranks: ranks.into_iter().enumerate().map(|(i, r)| (i as u32, r)).collect(),
            watched_since: Some(t0),
            ..AttemptSeen::default()
        }
    }

    #[test]
    fn a_program_that_never_reports_is_never_judged() {
        let t0 = Instant::now();
        let seen = attempt(t0, vec![rank("a", None), rank("b", None)]);
        let late = t0 + Duration::from_secs(100_000);
        assert_eq!(check(&seen, Some(&POLICY), late), HangCheck::Off);
        assert_eq!(check(&seen, None, late), HangCheck::Off);
    }

    #[test]
    fn the_lease_follows_start_up_step_and_checkpoint_budgets() {
        let t0 = Instant::now();
        let starting = PaceSeen { stepped_at: None, ..pace(t0, 0, 0, Activity::Starting, None) };
        let mut seen = attempt(t0, vec![rank("a", Some(starting))]);
        let s = |n| t0 + Duration::from_secs(n);
        assert_eq!(
            check(&seen, Some(&POLICY), s(59)),
            HangCheck::Holds { next_look: Duration::from_secs(1) }
        );
        let HangCheck::Hung(h) = check(&seen, Some(&POLICY), s(60)) else { panic!("start-up") };
        assert!(
            h.message.contains("no first step after start for 60s (bound 60s"),
            "{}",
            h.message
        );
        // Stepping at t=70 with 0.1 s steps: bound max(10 s, 10 × 0.1 s) = 10 s.
        seen.ranks.get_mut(&0).unwrap().pace = Some(pace(t0, 5, 70, Activity::Training, None));
        seen.step_times.extend([0.1; 50]);
        assert!(matches!(check(&seen, Some(&POLICY), s(79)), HangCheck::Holds { .. }));
        assert!(matches!(check(&seen, Some(&POLICY), s(80)), HangCheck::Hung(_)));
        // Slow steps widen the bound: p99 3 s → 30 s.
        seen.step_times.extend([3.0; 10]);
        assert!(matches!(check(&seen, Some(&POLICY), s(99)), HangCheck::Holds { .. }));
        // A checkpoint has its own budget from when it began.
        seen.ranks.get_mut(&0).unwrap().pace = Some(pace(t0, 5, 95, Activity::Checkpointing, None));
        assert!(matches!(check(&seen, Some(&POLICY), s(124)), HangCheck::Holds { .. }));
        assert!(matches!(check(&seen, Some(&POLICY), s(125)), HangCheck::Hung(_)));
    }

    #[test]
    fn the_rank_others_wait_for_is_blamed_not_the_ones_that_noticed() {
        let t0 = Instant::now();
        // Ring of 3: rank 2 stopped after step 7 (silent since t=10); rank 0 waits on rank 2,
        // rank 1 waits on rank 0 (which cannot forward rank 2's data).
        let seen = attempt(
            t0,
            vec![
                rank(
                    "a",
                    Some(PaceSeen {
                        heard_at: t0 + Duration::from_secs(25),
                        ..pace(t0, 7, 10, Activity::Waiting, Some(2))
                    }),
                ),
                rank(
                    "a",
                    Some(PaceSeen {
                        heard_at: t0 + Duration::from_secs(25),
                        ..pace(t0, 7, 10, Activity::Waiting, Some(0))
                    }),
                ),
                rank("b", Some(pace(t0, 7, 10, Activity::Training, None))),
            ],
        );
        let HangCheck::Hung(h) = check(&seen, Some(&POLICY), t0 + Duration::from_secs(21)) else {
            panic!("hung")
        };
        assert_eq!((h.rank, h.node.as_str(), h.waiting.clone()), (2, "b", vec![0, 1]));
        assert!(
            h.message
                .starts_with("rank 2 on b stopped making progress: no step for 11s (bound 10s"),
            "{}",
            h.message
        );
        assert!(h.message.contains("rank 0, 1 waited for it"), "{}", h.message);
    }

    #[test]
    fn waiting_for_a_peer_that_writes_a_checkpoint_is_no_hang() {
        let t0 = Instant::now();
        let seen = attempt(
            t0,
            vec![
                rank("a", Some(pace(t0, 20, 10, Activity::Checkpointing, None))),
                rank(
                    "b",
                    Some(PaceSeen {
                        heard_at: t0 + Duration::from_secs(25),
                        ..pace(t0, 20, 10, Activity::Waiting, Some(0))
                    }),
                ),
            ],
        );
        // Rank 1's step lease (10 s) ran out, but it waits for rank 0, whose checkpoint budget
        // (30 s from t=10) holds until t=40.
        let at = t0 + Duration::from_secs(25);
        assert_eq!(
            check(&seen, Some(&POLICY), at),
            HangCheck::Holds { next_look: Duration::from_secs(15) }
        );
        let HangCheck::Hung(h) = check(&seen, Some(&POLICY), t0 + Duration::from_secs(40)) else {
            panic!("a checkpoint past its budget is a hang")
        };
        assert_eq!((h.rank, h.waiting.clone()), (0, vec![1]));
        assert!(h.message.contains("no checkpoint completed for 30s (bound 30s)"), "{}", h.message);
    }

    #[test]
    fn a_peer_that_gave_up_points_at_the_hung_rank_at_once() {
        let t0 = Instant::now();
        let mut gave_up = rank("a", Some(pace(t0, 7, 10, Activity::PeerLost, Some(1))));
        gave_up.state = RankState::Exited { code: Some(1), signal: None };
        let seen =
            attempt(t0, vec![gave_up, rank("b", Some(pace(t0, 7, 10, Activity::Training, None)))]);
        let HangCheck::Hung(h) = check(&seen, Some(&POLICY), t0 + Duration::from_secs(11)) else {
            panic!("hung")
        };
        assert_eq!((h.rank, h.waiting.clone()), (1, vec![0]));
        assert!(h.message.contains("rank 0 gave up waiting for it"), "{}", h.message);
        // If the rank it gave up on exited itself, that exit is the story, not a hang.
        let mut crashed = seen.clone();
        crashed.ranks.get_mut(&1).unwrap().state =
            RankState::Exited { code: Some(1), signal: None };
        assert_eq!(check(&crashed, Some(&POLICY), t0 + Duration::from_secs(11)), HangCheck::Off);
    }

    #[test]
    fn everyone_waiting_blames_the_rank_heard_from_longest_ago() {
        let t0 = Instant::now();
        let seen = attempt(
            t0,
            vec![
                rank("a", Some(pace(t0, 7, 10, Activity::Waiting, Some(1)))),
                rank(
                    "b",
                    Some(PaceSeen {
                        heard_at: t0 + Duration::from_secs(5),
                        ..pace(t0, 7, 10, Activity::Waiting, Some(0))
                    }),
                ),
            ],
        );
        let HangCheck::Hung(h) = check(&seen, Some(&POLICY), t0 + Duration::from_secs(30)) else {
            panic!("hung")
        };
        assert_eq!(h.rank, 1);
    }
}
