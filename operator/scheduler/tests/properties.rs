//! Property tests over random small fleets, running jobs and queues.
//!
//! Each case runs one pass and checks the decision against the input with a deliberately simple
//! reference: per node, whole workers that fit in each NVLink domain's free GPUs.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};

use common::NOW;
use flotilla_scheduler::{
    Decision, Fleet, GpuState, JobRequest, Locality, Node, Policy, RunningJob, Scheduler, Spread,
    WaitReason, WorkerPlacement, schedule,
};
use proptest::prelude::*;

/// A GPU named by node and index.
type GpuKey = (String, u32);

fn gpu_state() -> impl Strategy<Value = (GpuState, bool)> {
    prop_oneof![
        8 => Just((GpuState::Healthy, false)),
        1 => Just((GpuState::Degraded, false)),
        1 => Just((GpuState::Failed, false)),
        1 => Just((GpuState::Healthy, true)),
    ]
}

fn node(index: usize) -> impl Strategy<Value = Node> {
    let shape = (prop_oneof![Just(2u32), Just(4), Just(8)], 1u32..=2, 0u32..2, 0u32..2);
    (
        shape,
        prop::bool::weighted(0.5),
        prop::bool::weighted(0.1),
        prop::collection::vec(gpu_state(), 8),
    )
        .prop_map(move |((gpus, domains, zone, rack), labelled, cordoned, states)| {
            let mut node = Node::new(format!("n{index}"), gpus)
                .in_rack(format!("z{zone}"), format!("r{rack}"))
                .nvlink_domains(domains);
            if labelled {
                node = node.label("pool", "a");
            }
            if cordoned {
                node = node.cordon();
            }
            for (gpu, (state, cordon)) in node.gpus.iter_mut().zip(states) {
                gpu.state = state;
                gpu.cordoned = cordon;
            }
            node
        })
}

fn fleet() -> impl Strategy<Value = Fleet> {
    (1usize..7).prop_flat_map(|count| (0..count).map(node).collect::<Vec<_>>().prop_map(Fleet::new))
}

/// Running jobs: each GPU of the fleet is held by one of five jobs or by nobody.
fn running(fleet: &Fleet) -> impl Strategy<Value = Vec<RunningJob>> + use<> {
    let gpu_count: usize = fleet.nodes.iter().map(|n| n.gpus.len()).sum();
    let layout: Vec<(String, u32)> =
        fleet.nodes.iter().flat_map(|n| n.gpus.iter().map(|g| (n.name.clone(), g.index))).collect();
    let attrs = prop::collection::vec(
        (
            0i32..4,
            0u64..NOW,
            prop::option::of(0u64..2 * NOW),
            prop::option::weighted(0.25, 0u64..10),
        ),
        5,
    );
    (prop::collection::vec(prop::option::weighted(0.6, 0usize..5), gpu_count), attrs).prop_map(
        move |(holders, attrs)| {
            let mut by_job: BTreeMap<usize, BTreeMap<String, Vec<u32>>> = BTreeMap::new();
            for ((node, index), holder) in layout.iter().zip(holders) {
                if let Some(job) = holder {
                    by_job.entry(job).or_default().entry(node.clone()).or_default().push(*index);
                }
            }
            by_job
                .into_iter()
                .map(|(job, nodes)| {
                    let workers =
                        nodes.into_iter().map(|(node, gpus)| WorkerPlacement { node, gpus });
                    let (priority, checkpoint, end, loan) = attrs[job];
                    let mut running = RunningJob::new(format!("run{job}"), workers.collect())
                        .priority(priority)
                        .last_checkpoint(checkpoint);
                    running.expected_end = end;
                    if let Some(arrival) = loan {
                        running = running.on_loan(arrival);
                    }
                    running
                })
                .collect()
        },
    )
}

fn request(index: usize) -> impl Strategy<Value = JobRequest> {
    let shape = (1u32..=4, prop_oneof![Just(1u32), Just(2), Just(4), Just(8)]);
    let order = (0i32..4, 0u64..10, prop_oneof![Just("a"), Just("b")]);
    let locality = prop_oneof![
        4 => Just(Locality::Preferred),
        1 => Just(Locality::Zone),
        1 => Just(Locality::Rack)
    ];
    let extra = (
        prop::bool::weighted(0.2),
        prop::bool::weighted(0.2),
        prop::option::of(1u64..NOW),
        prop::bool::weighted(0.8),
    );
    (shape, order, locality, extra).prop_map(
        move |(
            (workers, per),
            (priority, arrival, namespace),
            locality,
            (spread, select, dur, borrow),
        )| {
            let mut job = JobRequest::new(format!("job{index}"), workers, per)
                .priority(priority)
                .arrival(arrival)
                .namespace(namespace)
                .locality(locality);
            if spread {
                job = job.spread(Spread::Spread);
            }
            if select {
                job = job.select("pool", "a");
            }
            job.expected_duration = dur;
            job.may_borrow(borrow)
        },
    )
}

fn queue() -> impl Strategy<Value = Vec<JobRequest>> {
    (1usize..8).prop_flat_map(|count| (0..count).map(request).collect::<Vec<_>>())
}

/// A random policy: preemption and lending each on or off, loans with or without a minimum.
fn policy() -> impl Strategy<Value = Policy> {
    (prop::bool::weighted(0.8), prop::bool::weighted(0.7), prop_oneof![Just(0u64), Just(300)])
        .prop_map(|(preemption, lending, min_loan)| Policy {
            preemption,
            lending,
            min_loan,
            ..Policy::default()
        })
}

fn case() -> impl Strategy<Value = (Fleet, Vec<RunningJob>, Vec<JobRequest>, Policy)> {
    fleet().prop_flat_map(|fleet| {
        let running = running(&fleet);
        (Just(fleet), running, queue(), policy())
    })
}

/// Whether `job` may start on loan on the GPUs reserved for `holder` (which starts at `start`)
/// under `policy`: only a job behind the holder in line, so that the holder can take it back.
fn may_borrow(policy: &Policy, job: &JobRequest, holder: &JobRequest, start: Option<u64>) -> bool {
    let behind = job.priority < holder.priority
        || (job.priority == holder.priority && job.arrival > holder.arrival);
    policy.lending && job.may_borrow && behind && start.is_none_or(|s| s >= NOW + policy.min_loan)
}

/// Whether `ahead` is ahead of a loan `lent` in line (so may take its GPUs back).
fn ahead_of(ahead: &JobRequest, lent: &RunningJob) -> bool {
    lent.priority < ahead.priority
        || (lent.priority == ahead.priority && lent.arrival > ahead.arrival)
}

/// Schedulable GPUs: healthy, not cordoned, on a node that is not cordoned.
fn schedulable(fleet: &Fleet) -> BTreeSet<GpuKey> {
    fleet
        .nodes
        .iter()
        .filter(|n| !n.cordoned)
        .flat_map(|n| {
            n.gpus.iter().filter(|g| g.is_schedulable()).map(|g| (n.name.clone(), g.index))
        })
        .collect()
}

fn keys(workers: &[WorkerPlacement]) -> impl Iterator<Item = GpuKey> + '_ {
    workers.iter().flat_map(|w| w.gpus.iter().map(|&i| (w.node.clone(), i)))
}

/// The reference: whether the job's workers fit in the given free GPUs.
fn fits(fleet: &Fleet, free: &BTreeSet<GpuKey>, job: &JobRequest) -> bool {
    let mut groups: HashMap<(String, String), u32> = HashMap::new();
    for node in &fleet.nodes {
        if !job.node_selector.iter().all(|(k, v)| node.labels.get(k) == Some(v)) {
            continue;
        }
        let mut per_domain: BTreeMap<u32, u32> = BTreeMap::new();
        for gpu in &node.gpus {
            if free.contains(&(node.name.clone(), gpu.index)) {
                *per_domain.entry(gpu.nvlink_domain).or_default() += 1;
            }
        }
        let mut cap: u32 = per_domain.values().map(|f| f / job.gpus_per_worker).sum();
        if job.spread == Spread::Spread {
            cap = cap.min(1);
        }
        let group = match job.locality {
            Locality::Preferred => (String::new(), String::new()),
            Locality::Zone => (node.zone.clone(), String::new()),
            Locality::Rack => (node.zone.clone(), node.rack.clone()),
        };
        *groups.entry(group).or_default() += cap;
    }
    groups.values().any(|&cap| cap >= job.workers)
}

/// Placements have the requested shape on schedulable GPUs, and nothing is held twice.
fn check_shapes(fleet: &Fleet, running: &[RunningJob], queue: &[JobRequest], d: &Decision) {
    let usable = schedulable(fleet);
    let nodes: HashMap<&str, &Node> = fleet.nodes.iter().map(|n| (n.name.as_str(), n)).collect();
    let victims: BTreeSet<&str> = d.preemptions.iter().map(|p| p.victim.as_str()).collect();
    let mut held = BTreeSet::new();
    for job in running.iter().filter(|r| !victims.contains(r.id.as_str())) {
        for key in keys(&job.workers) {
            assert!(held.insert(key), "input held a GPU twice");
        }
    }
    for placement in &d.placements {
        let job = queue.iter().find(|j| j.id == placement.job).expect("placed job is queued");
        assert_eq!(placement.workers.len() as u32, job.workers, "gang is whole: {placement:?}");
        for worker in &placement.workers {
            let node = nodes[worker.node.as_str()];
            assert_eq!(worker.gpus.len() as u32, job.gpus_per_worker);
            let domains: BTreeSet<u32> = worker
                .gpus
                .iter()
                .map(|&i| node.gpus.iter().find(|g| g.index == i).unwrap().nvlink_domain)
                .collect();
            assert_eq!(domains.len(), 1, "worker crosses NVLink domains: {worker:?}");
            assert!(job.node_selector.iter().all(|(k, v)| node.labels.get(k) == Some(v)));
        }
        for key in keys(&placement.workers) {
            assert!(usable.contains(&key), "unschedulable GPU {key:?} chosen");
            assert!(held.insert(key.clone()), "GPU {key:?} allocated twice");
        }
        let spots: BTreeSet<(&str, &str)> = placement
            .workers
            .iter()
            .map(|w| (nodes[w.node.as_str()].zone.as_str(), nodes[w.node.as_str()].rack.as_str()))
            .collect();
        let zones: BTreeSet<&str> = spots.iter().map(|s| s.0).collect();
        match job.locality {
            Locality::Rack => assert_eq!(spots.len(), 1, "gang left its rack"),
            Locality::Zone => assert_eq!(zones.len(), 1, "gang left its zone"),
            Locality::Preferred => {}
        }
        if job.spread == Spread::Spread {
            assert_eq!(placement.node_count(), placement.workers.len(), "spread shares a node");
        }
    }
    let decided: BTreeSet<&str> = d
        .placements
        .iter()
        .map(|p| p.job.as_str())
        .chain(d.waiting.iter().map(|w| w.job.as_str()))
        .collect();
    assert_eq!(decided.len(), d.placements.len() + d.waiting.len(), "a job decided twice");
    assert_eq!(decided.len(), queue.len(), "every queued job is placed or waits");
}

/// Free GPUs after the decision.
fn free_after(fleet: &Fleet, running: &[RunningJob], d: &Decision) -> BTreeSet<GpuKey> {
    let victims: BTreeSet<&str> = d.preemptions.iter().map(|p| p.victim.as_str()).collect();
    let mut free = schedulable(fleet);
    for job in running.iter().filter(|r| !victims.contains(r.id.as_str())) {
        keys(&job.workers).for_each(|k| {
            free.remove(&k);
        });
    }
    for placement in &d.placements {
        keys(&placement.workers).for_each(|k| {
            free.remove(&k);
        });
    }
    free
}

/// No waiting job would fit if a lower-priority job placed in this pass stepped aside.
fn check_priority(
    fleet: &Fleet,
    running: &[RunningJob],
    queue: &[JobRequest],
    policy: &Policy,
    d: &Decision,
) {
    let free = free_after(fleet, running, d);
    let reserved: BTreeSet<GpuKey> =
        d.reservation.iter().flat_map(|r| keys(&r.workers).collect::<Vec<_>>()).collect();
    let by_id: HashMap<&str, &JobRequest> = queue.iter().map(|j| (j.id.as_str(), j)).collect();
    let victims_left: BTreeSet<GpuKey> = running
        .iter()
        .filter(|r| d.preemptions.iter().any(|p| p.victim == r.id))
        .flat_map(|r| keys(&r.workers).collect::<Vec<_>>())
        .filter(|k| free.contains(k))
        .collect();
    for waiting in &d.waiting {
        let job = by_id[waiting.job.as_str()];
        let holds = d.reservation.as_ref().is_some_and(|r| r.job == waiting.job);
        for placement in &d.placements {
            let lower = by_id[placement.job.as_str()];
            if lower.priority >= job.priority {
                continue;
            }
            let mut offered = free.clone();
            offered.extend(keys(&placement.workers));
            if !holds {
                offered.retain(|k| !reserved.contains(k));
            }
            assert!(!fits(fleet, &offered, job), "{} blocked by lower {}", job.id, lower.id);
        }
        // Work-conserving: what is left free (outside the reservation, unless the job holds it,
        // ends before it starts or may borrow it) does not fit the job either.
        let ends_in_time = d.reservation.as_ref().is_some_and(
            |r| matches!((job.expected_duration, r.start), (Some(dur), Some(s)) if NOW + dur <= s),
        );
        let borrows = d
            .reservation
            .as_ref()
            .is_some_and(|r| may_borrow(policy, job, by_id[r.job.as_str()], r.start));
        // GPUs a later job's preemption freed but did not use come free after this job was
        // considered; the next pass offers them.
        let mut left: BTreeSet<GpuKey> =
            free.iter().filter(|k| !victims_left.contains(*k)).cloned().collect();
        if !holds && !ends_in_time && !borrows {
            left.retain(|k| !reserved.contains(k));
        }
        assert!(!fits(fleet, &left, job), "{} waits though free GPUs fit it", job.id);
        let never = !fits(fleet, &schedulable(fleet), job);
        assert_eq!(matches!(waiting.reason, WaitReason::NeverFits(_)), never, "{waiting:?}");
    }
}

/// Preemptions target lower priorities (or loans behind the preemptor) and each victim's GPUs
/// are used by its preemptor; backfill onto reserved GPUs only by jobs that end before the
/// reserved start, or on loan by jobs that may borrow.
fn check_preemption_and_reservation(
    running: &[RunningJob],
    queue: &[JobRequest],
    policy: &Policy,
    d: &Decision,
) {
    for preemption in &d.preemptions {
        let victim = running.iter().find(|r| r.id == preemption.victim).expect("victim runs");
        let job = queue.iter().find(|j| j.id == preemption.for_job).expect("preemptor queued");
        assert_eq!(preemption.reclaim, victim.on_loan, "{preemption:?}");
        let outranked = policy.preemption && victim.priority < job.priority;
        let taken_back = victim.on_loan && ahead_of(job, victim);
        assert!(outranked || taken_back, "{} stopped {} unfairly", job.id, victim.id);
        let placement = d.placements.iter().find(|p| p.job == job.id).expect("preemptor placed");
        let used: BTreeSet<GpuKey> = keys(&placement.workers).collect();
        assert!(keys(&victim.workers).any(|k| used.contains(&k)), "preempted for nothing");
    }
    let Some(reservation) = &d.reservation else { return };
    assert!(d.waiting.iter().any(|w| w.job == reservation.job));
    let reserved: BTreeSet<GpuKey> = keys(&reservation.workers).collect();
    for placement in &d.placements {
        let job = queue.iter().find(|j| j.id == placement.job).unwrap();
        if placement.on_loan {
            assert!(placement.backfill, "a loan without a reservation: {placement:?}");
            let holder = queue.iter().find(|j| j.id == reservation.job).expect("holder queued");
            assert!(
                may_borrow(policy, job, holder, reservation.start),
                "{} may not borrow",
                job.id
            );
        }
        if placement.backfill && keys(&placement.workers).any(|k| reserved.contains(&k)) {
            let ends = job.expected_duration.map(|dur| NOW + dur);
            assert!(
                placement.on_loan
                    || matches!((ends, reservation.start), (Some(e), Some(s)) if e <= s),
                "{} took reserved GPUs and may delay {}",
                job.id,
                reservation.job
            );
        }
    }
    let lent = d
        .placements
        .iter()
        .filter(|p| p.on_loan)
        .flat_map(|p| keys(&p.workers).collect::<Vec<_>>())
        .chain(
            running.iter().filter(|r| r.on_loan).flat_map(|r| keys(&r.workers).collect::<Vec<_>>()),
        )
        .filter(|k| reserved.contains(k))
        .count() as u64;
    assert!(reservation.lent <= lent, "{reservation:?}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn decisions_hold_every_invariant((fleet, running, queue, policy) in case()) {
        let decision = schedule(&fleet, &running, &queue, &policy, NOW).expect("valid input");
        check_shapes(&fleet, &running, &queue, &decision);
        check_priority(&fleet, &running, &queue, &policy, &decision);
        check_preemption_and_reservation(&running, &queue, &policy, &decision);
    }

    #[test]
    fn loans_never_delay_the_job_they_were_lent_from((fleet, running, queue, _) in case()) {
        // Pass 1 lends; pass 2 (same queue, later) must treat the loans as if they had never
        // been made: the holder starts as soon as without them, or is expected no later.
        let lending = Policy { preemption: false, lending: true, min_loan: 0, ..Policy::default() };
        let mut with_loans = Scheduler::new(&fleet, &running, lending.clone()).expect("valid");
        let first = with_loans.schedule(&queue, NOW);
        let Some(reservation) = first.reservation.clone() else { return Ok(()) };
        let lent: BTreeSet<&str> =
            first.placements.iter().filter(|p| p.on_loan).map(|p| p.job.as_str()).collect();
        if lent.is_empty() {
            return Ok(());
        }
        let kept: Vec<RunningJob> =
            with_loans.running().into_iter().filter(|r| !lent.contains(r.id.as_str())).collect();
        let mut without = Scheduler::new(&fleet, &kept, lending).expect("valid");
        let holder: Vec<JobRequest> =
            queue.iter().filter(|j| j.id == reservation.job).cloned().collect();
        let (a, b) = (with_loans.schedule(&holder, NOW + 1), without.schedule(&holder, NOW + 1));
        let placed = |d: &Decision| d.placements.iter().any(|p| p.job == reservation.job);
        if placed(&b) {
            prop_assert!(placed(&a), "the loans kept {} waiting: {a:?}", reservation.job);
            prop_assert!(a.preemptions.iter().all(|p| p.reclaim && lent.contains(p.victim.as_str())));
        } else if let (Some(ra), Some(rb)) = (&a.reservation, &b.reservation) {
            let later = |x: Option<u64>, y: Option<u64>| x.unwrap_or(u64::MAX) > y.unwrap_or(u64::MAX);
            prop_assert!(!later(ra.start, rb.start), "loans delayed {}: {ra:?} vs {rb:?}", reservation.job);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn state_stays_consistent_across_passes(
        (fleet, running, queue, _) in case(),
        finishing in prop::collection::vec(any::<bool>(), 16),
    ) {
        let mut scheduler = Scheduler::new(&fleet, &running, Policy::default()).expect("valid");
        let first = scheduler.schedule(&queue, NOW);
        for (job, finish) in scheduler.running().into_iter().zip(finishing) {
            if finish {
                prop_assert!(scheduler.finish(&job.id));
            }
        }
        let before = scheduler.running();
        let waiting: Vec<JobRequest> =
            queue.iter().filter(|j| first.waiting.iter().any(|w| w.job == j.id)).cloned().collect();
        let second = scheduler.schedule(&waiting, NOW + 10);
        check_shapes(&fleet, &before, &waiting, &second);
        let rebuilt = Scheduler::new(&fleet, &scheduler.running(), Policy::default())
            .expect("the scheduler's own state is valid input");
        prop_assert_eq!(rebuilt.stats(), scheduler.stats());
    }
}
