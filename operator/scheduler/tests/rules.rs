//! One small hand-made fleet per scheduling rule.

mod common;

use common::{NOW, decide, decide_with, placed, preempted, rack, reason, running, workers_of};
use flotilla_scheduler::{
    Fleet, GpuState, JobRequest, Locality, Node, Policy, ScheduleError, Scheduler, Spread,
    WaitReason, schedule,
};

#[test]
fn gang_is_all_or_nothing() {
    let fleet = Fleet::new(rack("z", "r", "n", 2, 4));
    let decision = decide(&fleet, &[], &[JobRequest::new("big", 3, 4)]);
    assert!(decision.placements.is_empty());
    assert_eq!(
        reason(&decision, "big"),
        "can never fit this fleet: needs 12 GPUs (3 workers × 4); largest free block is 8"
    );
}

#[test]
fn worker_stays_inside_one_nvlink_domain() {
    let fleet = Fleet::new(vec![Node::new("n", 8).nvlink_domains(2)]);
    // Three GPUs busy in each domain: one free in each, so no worker of two or four fits.
    let busy = running("busy", &[("n", &[0, 1, 2, 4, 5, 6])]);
    let decision = decide(&fleet, std::slice::from_ref(&busy), &[JobRequest::new("four", 1, 4)]);
    assert!(decision.placements.is_empty());
    let decision = decide(&fleet, &[busy], &[JobRequest::new("two", 1, 2)]);
    assert!(decision.placements.is_empty(), "two free GPUs sit in different domains");
    let fresh = decide(&fleet, &[], &[JobRequest::new("four", 1, 4)]);
    let gpus = &workers_of(&fresh, "four")[0].gpus;
    assert!(gpus == &[0, 1, 2, 3] || gpus == &[4, 5, 6, 7], "crossed domains: {gpus:?}");
}

#[test]
fn gang_goes_to_one_rack_when_it_fits() {
    let mut nodes = rack("z", "r1", "a", 2, 4);
    nodes.extend(rack("z", "r2", "b", 3, 4));
    let fleet = Fleet::new(nodes);
    // r1 has 4 free, r2 has 12: the 8-GPU gang must not straddle racks.
    let decision =
        decide(&fleet, &[running("x", &[("a0", &[0, 1, 2, 3])])], &[JobRequest::new("g", 2, 4)]);
    let workers = workers_of(&decision, "g");
    assert!(workers.iter().all(|w| w.node.starts_with('b')), "{workers:?}");
}

#[test]
fn gang_uses_fewest_nodes() {
    let fleet = Fleet::new(rack("z", "r", "n", 3, 8));
    let decision = decide(&fleet, &[], &[JobRequest::new("g", 4, 2)]);
    assert_eq!(decision.placements[0].node_count(), 1);
}

#[test]
fn best_fit_keeps_whole_nodes_free() {
    let fleet = Fleet::new(rack("z", "r", "n", 3, 8));
    let partly = running("partly", &[("n1", &[0, 1, 2, 3, 4])]);
    let decision = decide(&fleet, &[partly], &[JobRequest::new("small", 1, 2)]);
    assert_eq!(workers_of(&decision, "small")[0].node, "n1");
}

#[test]
fn required_zone_explains_the_largest_block() {
    let mut nodes = rack("z1", "r", "a", 8, 8);
    nodes.extend(rack("z2", "r", "b", 8, 8));
    let fleet = Fleet::new(nodes);
    let mut busy = Vec::new();
    for (zone, used) in [("a", 3), ("b", 4)] {
        for i in 0..used {
            busy.push(running(
                &format!("{zone}{i}"),
                &[(&format!("{zone}{i}"), &[0, 1, 2, 3, 4, 5, 6, 7])],
            ));
        }
    }
    let job = JobRequest::new("wide", 8, 8).locality(Locality::Zone).priority(-1);
    let decision = decide(&fleet, &busy, &[job]);
    assert!(decision.placements.is_empty());
    let why = reason(&decision, "wide");
    assert!(why.starts_with("first in line"), "{why}");
    // `first` can only use z2 (by label) and holds all of it; `wide` is left with z1.
    let fleet = Fleet::new(
        fleet
            .nodes
            .into_iter()
            .map(|n| if n.zone == "z2" { n.label("pool", "two") } else { n })
            .collect(),
    );
    let queue = [
        JobRequest::new("first", 5, 8).select("pool", "two"),
        JobRequest::new("wide", 8, 8).locality(Locality::Zone).arrival(1),
    ];
    let decision = decide(&fleet, &busy, &queue);
    assert_eq!(
        reason(&decision, "wide"),
        "needs 64 GPUs in one zone (8 workers × 8); largest free block is 40; \
         40 more are held for first, first in line"
    );
}

#[test]
fn higher_priority_goes_first() {
    let fleet = Fleet::new(vec![Node::new("n", 4)]);
    let queue = [
        JobRequest::new("low", 1, 4).arrival(0),
        JobRequest::new("high", 1, 4).priority(1).arrival(9),
    ];
    let decision = decide(&fleet, &[], &queue);
    assert_eq!(placed(&decision), ["high"]);
}

#[test]
fn fifo_within_a_level() {
    let fleet = Fleet::new(vec![Node::new("n", 4)]);
    let queue =
        [JobRequest::new("second", 1, 4).arrival(5), JobRequest::new("first", 1, 4).arrival(1)];
    assert_eq!(placed(&decide(&fleet, &[], &queue)), ["first"]);
}

#[test]
fn backfill_cannot_delay_the_reserved_start() {
    let fleet = Fleet::new(rack("z", "r", "n", 2, 4));
    let soon = running("soon", &[("n0", &[0, 1])]).expected_end(NOW + 200);
    let late = running("late", &[("n1", &[0, 1, 2, 3])]).expected_end(NOW + 5_000);
    let queue = [
        JobRequest::new("head", 1, 4).arrival(0),
        JobRequest::new("long", 1, 2).arrival(1).expected_duration(1_000),
        JobRequest::new("unknown", 1, 2).arrival(2),
        JobRequest::new("short", 1, 2).arrival(3).expected_duration(100),
    ];
    let decision = decide(&fleet, &[soon, late], &queue);
    assert_eq!(placed(&decision), ["short"]);
    assert_eq!(
        reason(&decision, "head"),
        format!("first in line; GPUs reserved, expected to start at {}", NOW + 200)
    );
    let reservation = decision.reservation.as_ref().expect("a reservation");
    assert_eq!(reservation.workers[0].node, "n0");
    assert!(reason(&decision, "long").contains("held for head"));
}

#[test]
fn unknown_ends_still_reserve() {
    let fleet = Fleet::new(vec![Node::new("n", 4)]);
    let queue = [JobRequest::new("head", 1, 4), JobRequest::new("small", 1, 1).arrival(1)];
    let no_loans = Policy { lending: false, ..Policy::default() };
    let decision = decide_with(&fleet, &[running("r", &[("n", &[0, 1])])], &queue, &no_loans);
    assert!(decision.placements.is_empty(), "small would sit on the head's GPUs");
    assert_eq!(decision.reservation.unwrap().start, None);
}

#[test]
fn reserved_gpus_are_lent_and_taken_back_when_the_holder_can_start() {
    // `big` needs both nodes; n0 is busy for an unknown time, so n1's GPUs are reserved and
    // would idle. `small`, behind `big`, borrows them.
    let fleet = Fleet::new(rack("z", "r", "n", 2, 4));
    let busy = running("busy", &[("n0", &[0, 1, 2, 3])]);
    let queue = [JobRequest::new("big", 2, 4), JobRequest::new("small", 1, 4).arrival(5)];
    let lent = decide(&fleet, std::slice::from_ref(&busy), &queue);
    assert_eq!(placed(&lent), ["small"]);
    assert!(lent.placements[0].on_loan && lent.placements[0].backfill);
    assert_eq!(workers_of(&lent, "small")[0].node, "n1");
    assert_eq!(
        reason(&lent, "big"),
        "first in line; GPUs reserved, starts when jobs of unknown length end; \
         4 of them lent to jobs behind it until then"
    );
    // While n0 stays busy the loan stands: taking it back would not let `big` start.
    let small = running("small", &[("n1", &[0, 1, 2, 3])]).on_loan(5);
    let waiting = [JobRequest::new("big", 2, 4)];
    let decision = decide(&fleet, &[busy, small.clone()], &waiting);
    assert!(decision.preemptions.is_empty());
    // Once `busy` ends, `big` starts at once and the loan is taken back, though equal priority.
    let decision = decide(&fleet, &[small], &waiting);
    assert_eq!(placed(&decision), ["big"]);
    assert_eq!(preempted(&decision), ["small"]);
    assert!(decision.preemptions[0].reclaim);
}

#[test]
fn a_loan_is_only_taken_back_by_a_job_ahead_of_it() {
    let fleet = Fleet::new(vec![Node::new("n", 4)]);
    let lent = running("lent", &[("n", &[0, 1, 2, 3])]).on_loan(5);
    for (job, stops) in [
        (JobRequest::new("ahead", 1, 4).arrival(4), true),
        (JobRequest::new("behind", 1, 4).arrival(6), false),
        (JobRequest::new("lower", 1, 4).priority(-1), false),
    ] {
        let decision = decide(&fleet, std::slice::from_ref(&lent), std::slice::from_ref(&job));
        assert_eq!(!decision.preemptions.is_empty(), stops, "{}: {decision:?}", job.id);
    }
    // A job that was not lent is never stopped for equal priority.
    let plain = running("plain", &[("n", &[0, 1, 2, 3])]);
    let decision = decide(&fleet, &[plain], &[JobRequest::new("ahead", 1, 4).arrival(4)]);
    assert!(decision.preemptions.is_empty());
}

#[test]
fn no_loan_when_the_start_is_near_or_the_job_may_not_borrow() {
    let fleet = Fleet::new(rack("z", "r", "n", 2, 4));
    let soon = running("soon", &[("n0", &[0, 1, 2, 3])]).expected_end(NOW + 600);
    let queue = [
        JobRequest::new("big", 2, 4),
        JobRequest::new("small", 1, 4).arrival(5),
        JobRequest::new("replica", 1, 4).arrival(6).may_borrow(false),
    ];
    // The reserved start is 10 minutes away, under the 15-minute minimum: nobody borrows.
    let decision = decide(&fleet, std::slice::from_ref(&soon), &queue);
    assert!(decision.placements.is_empty(), "{decision:?}");
    // Without a minimum `small` borrows; `replica` never does.
    let eager = Policy { min_loan: 0, ..Policy::default() };
    let decision = decide_with(&fleet, &[soon], &queue[..2], &eager);
    assert_eq!(placed(&decision), ["small"]);
    let fleet = Fleet::new(rack("z", "r", "n", 2, 4));
    let busy = running("busy", &[("n0", &[0, 1, 2, 3])]);
    let decision = decide(&fleet, &[busy], &[queue[0].clone(), queue[2].clone()]);
    assert!(decision.placements.is_empty(), "{decision:?}");
}

#[test]
fn a_job_ahead_of_the_holder_does_not_borrow_from_it() {
    // Fair share puts namespace `b` (no usage) before `a`, so `b/late` holds the reservation
    // though `a/early` arrived first. A loan to `a/early` could not be taken back by `b/late`
    // (it is not ahead of it in line), so `a/early` does not borrow.
    let fleet = Fleet::new(rack("z", "r", "n", 2, 4));
    let busy = running("busy", &[("n0", &[0, 1, 2, 3])]).namespace("a");
    let queue = [
        JobRequest::new("late", 2, 4).namespace("b").arrival(9),
        JobRequest::new("early", 1, 4).namespace("a").arrival(1),
    ];
    let decision = decide(&fleet, &[busy], &queue);
    assert_eq!(decision.reservation.as_ref().map(|r| r.job.as_str()), Some("late"));
    assert!(decision.placements.is_empty(), "{decision:?}");
}

#[test]
fn empty_requests_are_refused_with_a_reason() {
    let fleet = Fleet::new(vec![Node::new("n", 4)]);
    let decision = decide(&fleet, &[], &[JobRequest::new("none", 2, 0)]);
    assert!(decision.placements.is_empty());
    assert_eq!(decision.waiting[0].reason, WaitReason::EmptyRequest);
}

#[test]
fn job_that_never_fits_does_not_block_others() {
    let fleet = Fleet::new(vec![Node::new("n", 4)]);
    let queue = [JobRequest::new("huge", 2, 4), JobRequest::new("small", 1, 1).arrival(1)];
    let decision = decide(&fleet, &[], &queue);
    assert_eq!(placed(&decision), ["small"]);
    assert!(matches!(decision.waiting[0].reason, WaitReason::NeverFits(_)));
}

#[test]
fn preemption_takes_the_freshest_checkpoint() {
    let fleet = Fleet::new(vec![Node::new("n", 4)]);
    let stale = running("stale", &[("n", &[0, 1])]).last_checkpoint(NOW - 900);
    let fresh = running("fresh", &[("n", &[2, 3])]).last_checkpoint(NOW - 10);
    let decision = decide(&fleet, &[stale, fresh], &[JobRequest::new("urgent", 1, 2).priority(5)]);
    assert_eq!(preempted(&decision), ["fresh"]);
    assert_eq!(decision.preemptions[0].lost_gpu_seconds, 20);
    assert_eq!(workers_of(&decision, "urgent")[0].gpus, [2, 3]);
}

#[test]
fn preemption_never_gains_nothing() {
    let fleet = Fleet::new(vec![Node::new("a", 4), Node::new("b", 4)]);
    // Cheap victim on a, but a keeps a higher-priority job; only b can be cleared.
    let cheap = running("cheap", &[("a", &[0, 1])]).last_checkpoint(NOW);
    let keep = running("keep", &[("a", &[2, 3])]).priority(9);
    let costly = running("costly", &[("b", &[0, 1, 2, 3])]);
    let decision =
        decide(&fleet, &[cheap, keep, costly], &[JobRequest::new("u", 1, 4).priority(5)]);
    assert_eq!(preempted(&decision), ["costly"]);
    let too_big = decide(
        &fleet,
        &[running("low", &[("a", &[0])])],
        &[JobRequest::new("x", 1, 8).priority(5)],
    );
    assert!(too_big.preemptions.is_empty() && too_big.placements.is_empty());
}

#[test]
fn preemption_spares_equal_priority() {
    let fleet = Fleet::new(vec![Node::new("n", 2)]);
    let peer = running("peer", &[("n", &[0, 1])]).priority(3);
    let decision = decide(&fleet, &[peer], &[JobRequest::new("j", 1, 2).priority(3)]);
    assert!(decision.preemptions.is_empty());
}

#[test]
fn weighted_fair_share_splits_scarce_gpus() {
    let fleet = Fleet::new(vec![Node::new("n", 8)]);
    let mut queue = Vec::new();
    for i in 0..8 {
        queue.push(JobRequest::new(format!("a{i}"), 1, 1).namespace("a").arrival(i));
        queue.push(JobRequest::new(format!("b{i}"), 1, 1).namespace("b").arrival(i + 100));
    }
    let policy = Policy::default().weight("b", 3.0);
    let decision = decide_with(&fleet, &[], &queue, &policy);
    let from_b = placed(&decision).iter().filter(|id| id.starts_with('b')).count();
    assert_eq!((decision.placements.len(), from_b), (8, 6));
}

#[test]
fn unhealthy_and_cordoned_gpus_are_never_chosen() {
    let fleet = Fleet::new(vec![
        Node::new("sick", 4)
            .gpu_state(0, GpuState::Failed)
            .gpu_state(1, GpuState::Degraded)
            .cordon_gpu(2),
        Node::new("closed", 4).cordon(),
    ]);
    let decision = decide(
        &fleet,
        &[],
        &[JobRequest::new("one", 1, 1), JobRequest::new("two", 1, 2).arrival(1)],
    );
    assert_eq!(workers_of(&decision, "one")[0].gpus, [3]);
    assert!(reason(&decision, "two").starts_with("can never fit"));
}

#[test]
fn selector_and_spread_are_honoured() {
    let fleet = Fleet::new(vec![
        Node::new("a", 8).label("gpu", "h100"),
        Node::new("b", 8),
        Node::new("c", 8).label("gpu", "h100"),
    ]);
    let job = JobRequest::new("s", 2, 2).select("gpu", "h100").spread(Spread::Spread);
    let decision = decide(&fleet, &[], &[job]);
    let mut nodes: Vec<_> = workers_of(&decision, "s").iter().map(|w| w.node.as_str()).collect();
    nodes.sort();
    assert_eq!(nodes, ["a", "c"]);
    let none = decide(&fleet, &[], &[JobRequest::new("x", 1, 1).select("gpu", "b200")]);
    assert!(reason(&none, "x").contains("no schedulable node matches"));
}

#[test]
fn refuses_a_gpu_held_twice() {
    let fleet = Fleet::new(vec![Node::new("n", 2)]);
    let jobs = [running("a", &[("n", &[0])]), running("b", &[("n", &[0])])];
    let err = schedule(&fleet, &jobs, &[], &Policy::default(), NOW).unwrap_err();
    assert_eq!(err, ScheduleError::GpuHeldTwice { job: "b".into(), node: "n".into(), index: 0 });
}

#[test]
fn finished_jobs_free_their_gpus() {
    let fleet = Fleet::new(vec![Node::new("n", 4)]);
    let mut scheduler =
        Scheduler::new(&fleet, &[running("r", &[("n", &[0, 1, 2, 3])])], Policy::default())
            .unwrap();
    let queue = [JobRequest::new("j", 1, 4)];
    assert!(scheduler.schedule(&queue, NOW).placements.is_empty());
    assert!(scheduler.finish(&"r".into()));
    assert_eq!(placed(&scheduler.schedule(&queue, NOW)), ["j"]);
    assert_eq!(scheduler.stats().allocation(), 1.0);
}

#[test]
fn health_changes_apply_to_a_live_scheduler() {
    let fleet = Fleet::new(vec![Node::new("n", 2)]);
    let held = running("held", &[("n", &[1])]);
    let mut scheduler = Scheduler::new(&fleet, &[held], Policy::default()).unwrap();
    scheduler.update_gpu("n", 0, GpuState::Failed, false).unwrap();
    scheduler.update_gpu("n", 1, GpuState::Degraded, false).unwrap();
    let one = [JobRequest::new("one", 1, 1)];
    assert!(scheduler.schedule(&one, NOW).placements.is_empty());
    assert!(scheduler.finish(&"held".into()));
    assert!(scheduler.schedule(&one, NOW).placements.is_empty(), "a drained GPU stays out");
    assert_eq!(scheduler.stats().schedulable, 0);
    scheduler.update_gpu("n", 0, GpuState::Healthy, false).unwrap();
    assert_eq!(workers_of(&scheduler.schedule(&one, NOW), "one")[0].gpus, [0]);
    scheduler.cordon_node("n", true).unwrap();
    scheduler.update_gpu("n", 1, GpuState::Healthy, false).unwrap();
    let two = [JobRequest::new("two", 1, 1)];
    assert!(scheduler.schedule(&two, NOW).placements.is_empty(), "the node is cordoned");
    assert!(scheduler.update_gpu("n", 7, GpuState::Healthy, false).is_err());
}
