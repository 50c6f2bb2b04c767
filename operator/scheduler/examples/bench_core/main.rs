//! Core benchmark: the scheduler against a naive first-fit on the same job stream.
//!
//! `cargo run --release -p flotilla-scheduler --example bench_core [-- SEED]`
//!
//! A discrete-event simulation: jobs arrive, run for their true duration and end; after every
//! event each engine makes one pass over its queue, and that pass is timed (the decision
//! latency an operator sees after an event). Running jobs checkpoint every [`CHECKPOINT`] of
//! useful work; a stopped job (preempted, or a loan taken back) loses the work since its last
//! checkpoint (no checkpoint on SIGTERM is assumed, though Flotilla's engine writes one), goes
//! back to the queue at its old place, and pays [`RESTART`] when it starts again. Figures over
//! "saturation" are time-weighted over the spans when jobs were waiting in that engine's own
//! queue; the "same window" rows weigh every engine over the same spans (all queues waiting),
//! whole and split at the last arrival, so none is measured over a window another lacks.
//! "Useful" allocation subtracts the GPU time stops threw away (lost work and restarts).
//!
//! Each pass is also replayed twice on copies of the engine and the fastest of the three
//! timings is kept: on a shared machine a pass that loses the CPU for a time slice would
//! otherwise measure the neighbours, not the scheduler. Decisions come from the real pass.

mod first_fit;
mod workload;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::time::{Duration, Instant};

use first_fit::FirstFit;
use flotilla_scheduler::{Fleet, JobId, JobRequest, Policy, Scheduler};
use workload::{Arrival, NAMESPACES, Rng};

/// Useful work between a running job's checkpoints (seconds).
const CHECKPOINT: u64 = 900;
/// What a job pays on each restart before it makes progress again: launch, rendezvous, loading
/// the checkpoint (seconds).
const RESTART: u64 = 120;

/// What one pass decided: jobs started (and whether on loan), jobs stopped (and whether a loan
/// was taken back), reserved GPUs left idle.
#[derive(Debug, Default)]
struct Outcome {
    started: Vec<(JobId, bool)>,
    stopped: Vec<(JobId, bool)>,
    reserved_idle: u64,
}

/// What the simulation needs from a scheduler.
trait Engine {
    /// One pass over the queue.
    fn pass(&mut self, queue: &[JobRequest], now: u64) -> Outcome;
    /// A job ended.
    fn finish(&mut self, job: &JobId);
    /// A running job wrote a checkpoint.
    fn checkpoint(&mut self, _job: &JobId, _at: u64) {}
    /// Allocated share and fragmentation now.
    fn fill(&self) -> (f64, f64);
}

impl Engine for Scheduler {
    fn pass(&mut self, queue: &[JobRequest], now: u64) -> Outcome {
        let decision = self.schedule(queue, now);
        Outcome {
            started: decision.placements.into_iter().map(|p| (p.job, p.on_loan)).collect(),
            stopped: decision.preemptions.into_iter().map(|p| (p.victim, p.reclaim)).collect(),
            reserved_idle: decision.reservation.map_or(0, |r| r.idle),
        }
    }

    fn finish(&mut self, job: &JobId) {
        Scheduler::finish(self, job);
    }

    fn checkpoint(&mut self, job: &JobId, at: u64) {
        self.record_checkpoint(job, at);
    }

    fn fill(&self) -> (f64, f64) {
        let stats = self.stats();
        (stats.allocation(), stats.fragmentation())
    }
}

impl Engine for FirstFit {
    fn pass(&mut self, queue: &[JobRequest], _now: u64) -> Outcome {
        Outcome {
            started: self.schedule(queue).into_iter().map(|job| (job, false)).collect(),
            stopped: Vec::new(),
            reserved_idle: 0,
        }
    }

    fn finish(&mut self, job: &JobId) {
        FirstFit::finish(self, job);
    }

    fn fill(&self) -> (f64, f64) {
        FirstFit::fill(self)
    }
}

/// Figures from one simulated run.
#[derive(Debug, Default)]
struct Report {
    placements: u64,
    loans: u64,
    preemptions: u64,
    reclaims: u64,
    /// Seconds from start to reclaim, summed over the loans taken back.
    loan_seconds: u64,
    lost_gpu_seconds: u64,
    examined: u64,
    busy: Duration,
    latencies: Vec<Duration>,
    saturated_s: u64,
    allocation_s: f64,
    reserved_idle_s: f64,
    fragmentation_s: f64,
    waits: Vec<(u64, u64)>,
    makespan: u64,
    /// After each event: (time, allocated share, jobs waiting, GPU-seconds thrown away so far),
    /// for windows shared by engines.
    timeline: Vec<(u64, f64, bool, u64)>,
    last_arrival: u64,
}

/// One pass, timed as the fastest of itself and two replays on copies.
fn timed_pass<E: Engine + Clone>(
    engine: &mut E,
    queue: &[JobRequest],
    now: u64,
) -> (Outcome, Duration) {
    let mut fastest = Duration::MAX;
    for _ in 0..2 {
        let mut copy = engine.clone();
        let started_at = Instant::now();
        let outcome = copy.pass(queue, now);
        fastest = fastest.min(started_at.elapsed());
        drop(outcome);
    }
    let started_at = Instant::now();
    let outcome = engine.pass(queue, now);
    (outcome, fastest.min(started_at.elapsed()))
}

/// Where one job of the stream stands.
#[derive(Debug, Clone, Copy, Default)]
struct Progress {
    /// Useful seconds saved in checkpoints.
    saved: u64,
    /// The current run: when it started and what it pays before useful work begins.
    run: Option<(u64, u64)>,
    /// Stops so far (each ends a run; a restart pays [`RESTART`]).
    stops: u32,
}

impl Progress {
    /// Useful seconds the current run has saved in checkpoints by `now`.
    fn saved_in_run(&self, now: u64) -> u64 {
        self.run.map_or(0, |(start, overhead)| {
            let useful = now.saturating_sub(start + overhead);
            useful / CHECKPOINT * CHECKPOINT
        })
    }
}

/// Runs the job stream through one engine.
fn simulate<E: Engine + Clone>(engine: &mut E, arrivals: &[Arrival]) -> Report {
    let index: HashMap<&JobId, usize> =
        arrivals.iter().enumerate().map(|(i, a)| (&a.request.id, i)).collect();
    let mut generation = vec![0u32; arrivals.len()];
    let mut first_start: Vec<Option<u64>> = vec![None; arrivals.len()];
    let mut progress = vec![Progress::default(); arrivals.len()];
    let mut running: HashSet<usize> = HashSet::new();
    let mut ends: BinaryHeap<Reverse<(u64, usize, u32)>> = BinaryHeap::new();
    let mut queue: Vec<JobRequest> = Vec::new();
    let (mut report, mut next, mut now, mut fill) = (Report::default(), 0, 0u64, (0.0, 0.0));
    let mut reserved_idle = 0u64;
    loop {
        let arrival = arrivals.get(next).map(|a| a.request.arrival);
        let end = ends.peek().map(|Reverse((at, _, _))| *at);
        let Some(at) = [arrival, end].into_iter().flatten().min() else { break };
        if !queue.is_empty() {
            let span = at - now;
            report.saturated_s += span;
            report.allocation_s += fill.0 * span as f64;
            report.reserved_idle_s += (reserved_idle * span) as f64;
            report.fragmentation_s += fill.1 * span as f64;
        }
        now = at;
        while arrivals.get(next).is_some_and(|a| a.request.arrival == now) {
            queue.push(arrivals[next].request.clone());
            next += 1;
        }
        while let Some(&Reverse((at, job, generation_then))) = ends.peek() {
            if at != now {
                break;
            }
            ends.pop();
            if generation[job] == generation_then {
                engine.finish(&arrivals[job].request.id);
                running.remove(&job);
                progress[job].run = None;
            }
        }
        // Checkpoints written since the last event (what preemption's "least work lost" reads).
        for &job in &running {
            let p = progress[job];
            if let Some((start, overhead)) = p.run {
                let saved = p.saved_in_run(now);
                if saved > 0 {
                    engine.checkpoint(&arrivals[job].request.id, start + overhead + saved);
                }
            }
        }
        let (outcome, took) = timed_pass(engine, &queue, now);
        report.busy += took;
        reserved_idle = outcome.reserved_idle;
        report.latencies.push(took);
        report.examined += queue.len() as u64;
        report.placements += outcome.started.len() as u64;
        report.loans += outcome.started.iter().filter(|s| s.1).count() as u64;
        report.preemptions += outcome.stopped.iter().filter(|s| !s.1).count() as u64;
        report.reclaims += outcome.stopped.iter().filter(|s| s.1).count() as u64;
        for (victim, reclaim) in &outcome.stopped {
            let job = index[victim];
            let p = &mut progress[job];
            let saved = p.saved_in_run(now);
            let (start, _) = p.run.take().expect("a stopped job was running");
            if *reclaim {
                report.loan_seconds += now - start;
            }
            p.saved += saved;
            p.stops += 1;
            let gpus = arrivals[job].request.total_gpus();
            report.lost_gpu_seconds += gpus * (now - start - saved);
            generation[job] += 1;
            running.remove(&job);
            let mut again = arrivals[job].request.clone();
            // The estimate shrinks by the work saved (an operator reads it from progress).
            again.expected_duration =
                again.expected_duration.map(|e| e.saturating_sub(p.saved).max(60));
            queue.push(again);
        }
        let started: HashSet<&JobId> = outcome.started.iter().map(|s| &s.0).collect();
        for id in &started {
            let job = index[*id];
            let p = &mut progress[job];
            let overhead = if p.stops == 0 { 0 } else { RESTART };
            p.run = Some((now, overhead));
            let left = arrivals[job].duration - p.saved;
            ends.push(Reverse((now + overhead + left, job, generation[job])));
            running.insert(job);
            first_start[job].get_or_insert(now);
        }
        queue.retain(|job| !started.contains(&job.id));
        fill = engine.fill();
        report.timeline.push((now, fill.0, !queue.is_empty(), report.lost_gpu_seconds));
    }
    report.makespan = now;
    report.last_arrival = arrivals.last().map_or(0, |a| a.request.arrival);
    report.waits = arrivals
        .iter()
        .zip(&first_start)
        .filter_map(|(a, s)| s.map(|s| (a.request.total_gpus(), s - a.request.arrival)))
        .collect();
    report
}

/// One pass placing the whole stream into an empty fleet: (placed, decisions, time).
fn burst(engine: &mut dyn Engine, arrivals: &[Arrival]) -> (usize, usize, Duration) {
    let queue: Vec<JobRequest> = arrivals.iter().map(|a| a.request.clone()).collect();
    let started_at = Instant::now();
    let started = engine.pass(&queue, 0).started;
    (started.len(), queue.len(), started_at.elapsed())
}

fn print_burst(name: &str, (placed, decisions, took): (usize, usize, Duration)) {
    println!(
        "burst (best of 5), {name:<9}: one pass over {decisions} queued jobs into an empty fleet placed {placed} \
         in {:.2} ms: {:.0} placements/s, {:.0} decisions/s",
        took.as_secs_f64() * 1e3,
        placed as f64 / took.as_secs_f64(),
        decisions as f64 / took.as_secs_f64()
    );
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let at = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(at).map_or(0.0, |d| d.as_secs_f64() * 1e3)
}

fn mean_wait(report: &Report, sizes: std::ops::RangeInclusive<u64>) -> (f64, u64) {
    let waits: Vec<u64> =
        report.waits.iter().filter(|(g, _)| sizes.contains(g)).map(|w| w.1).collect();
    let mean = waits.iter().sum::<u64>() as f64 / waits.len().max(1) as f64;
    (mean / 60.0, waits.iter().max().copied().unwrap_or(0) / 60)
}

/// Time-weighted allocation of every engine over the spans where `keep(time, all_wait)` holds
/// (`all_wait`: every engine's queue has jobs waiting): the same window for all, unlike "at
/// saturation", where each engine's own queue decides. Returns per engine the allocated share
/// and the useful share (less the GPU time its stops threw away in the window), and the
/// window's length.
fn shared_window(
    reports: &[&Report],
    gpus: u64,
    keep: impl Fn(u64, bool) -> bool,
) -> (Vec<(f64, f64)>, u64) {
    let mut times: Vec<u64> = reports.iter().flat_map(|r| r.timeline.iter().map(|e| e.0)).collect();
    times.sort_unstable();
    times.dedup();
    // The state of a timeline during [t, next): its last entry at or before t.
    let at = |r: &Report, t: u64| {
        let i = r.timeline.partition_point(|e| e.0 <= t);
        if i == 0 {
            (0.0, false, 0)
        } else {
            (r.timeline[i - 1].1, r.timeline[i - 1].2, r.timeline[i - 1].3)
        }
    };
    let mut sums = vec![(0.0, 0u64); reports.len()];
    let mut window = 0u64;
    let mut lost_before: Vec<u64> = vec![0; reports.len()];
    for pair in times.windows(2) {
        let (t, span) = (pair[0], pair[1] - pair[0]);
        let states: Vec<(f64, bool, u64)> = reports.iter().map(|r| at(r, t)).collect();
        let all_wait = states.iter().all(|s| s.1);
        let kept = keep(t, all_wait);
        for (i, state) in states.iter().enumerate() {
            // What was thrown away at the events up to t counts where it happened.
            if kept {
                sums[i].0 += state.0 * span as f64;
                sums[i].1 += state.2 - lost_before[i];
            }
            lost_before[i] = state.2;
        }
        if kept {
            window += span;
        }
    }
    let shares = sums
        .iter()
        .map(|&(sum, lost)| {
            let window = window.max(1) as f64;
            (sum / window, (sum - lost as f64 / gpus as f64) / window)
        })
        .collect();
    (shares, window)
}

fn print(names: &[&str], reports: &mut [Report], gpus: u64) {
    let row = |name: &str, cells: Vec<String>| {
        let cells: String = cells.iter().map(|c| format!(" {c:>16}")).collect();
        println!("{name:<48}{cells}");
    };
    row("", names.iter().map(|n| n.to_string()).collect());
    type Pick = fn(&Report) -> String;
    let picks: [(&str, Pick); 14] = [
        ("placements", |r| r.placements.to_string()),
        ("  of which on loan", |r| r.loans.to_string()),
        ("stops: preempted by priority", |r| r.preemptions.to_string()),
        ("stops: loans taken back", |r| r.reclaims.to_string()),
        ("  mean time on loan before (min)", |r| {
            format!("{:.0}", r.loan_seconds as f64 / 60.0 / r.reclaims.max(1) as f64)
        }),
        ("GPU-hours thrown away by stops", |r| {
            format!("{:.0}", r.lost_gpu_seconds as f64 / 3600.0)
        }),
        ("passes (one per event)", |r| r.latencies.len().to_string()),
        ("placements/s (scheduling time only)", |r| {
            format!("{:.0}", r.placements as f64 / r.busy.as_secs_f64())
        }),
        ("queued jobs examined/s", |r| format!("{:.0}", r.examined as f64 / r.busy.as_secs_f64())),
        ("allocation at saturation (own window)", |r| {
            format!("{:.2}%", 100.0 * r.allocation_s / r.saturated_s.max(1) as f64)
        }),
        ("reserved GPUs idle at saturation (mean)", |r| {
            format!("{:.1}", r.reserved_idle_s / r.saturated_s.max(1) as f64)
        }),
        ("fragmentation at saturation", |r| {
            format!("{:.1}%", 100.0 * r.fragmentation_s / r.saturated_s.max(1) as f64)
        }),
        ("makespan (h)", |r| format!("{:.1}", r.makespan as f64 / 3600.0)),
        ("last arrival (h)", |r| format!("{:.1}", r.last_arrival as f64 / 3600.0)),
    ];
    for (name, pick) in picks {
        row(name, reports.iter().map(pick).collect());
    }
    let last_arrival = reports[0].last_arrival;
    type Keep = Box<dyn Fn(u64, bool) -> bool>;
    let windows: [(&str, Keep); 3] = [
        ("all queues wait", Box::new(|_, all| all)),
        ("while jobs arrive", Box::new(move |t, all| all && t < last_arrival)),
        ("after the last arrival", Box::new(move |t, all| all && t >= last_arrival)),
    ];
    let refs: Vec<&Report> = reports.iter().collect();
    for (name, keep) in windows {
        let (shares, window) = shared_window(&refs, gpus, keep);
        let hours = window as f64 / 3600.0;
        row(
            &format!("allocation, same window: {name} ({hours:.1} h)"),
            shares.iter().map(|s| format!("{:.2}%", 100.0 * s.0)).collect(),
        );
        row(
            "  useful (less GPU time thrown away)",
            shares.iter().map(|s| format!("{:.2}%", 100.0 * s.1)).collect(),
        );
    }
    for report in reports.iter_mut() {
        report.latencies.sort_unstable();
    }
    for (name, p) in [
        ("pass latency p50 (ms)", 0.5),
        ("pass latency p99 (ms)", 0.99),
        ("pass latency max (ms)", 1.0),
    ] {
        row(name, reports.iter().map(|r| format!("{:.3}", percentile(&r.latencies, p))).collect());
    }
    for (name, sizes) in [
        ("wait 1-8 GPUs, mean / max (min)", 1..=8),
        ("wait 16-64 GPUs, mean / max (min)", 16..=64),
        ("wait 128-512 GPUs, mean / max (min)", 128..=512),
    ] {
        row(
            name,
            reports
                .iter()
                .map(|r| {
                    let (mean, max) = mean_wait(r, sizes.clone());
                    format!("{mean:.0} / {max}")
                })
                .collect(),
        );
    }
}

fn main() {
    let seed = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(7);
    let fleet: Fleet = workload::fleet();
    let gpus = fleet.nodes.iter().map(|n| n.gpus.len() as u64).sum();
    let arrivals = workload::jobs(&mut Rng::new(seed));
    let demand: u64 = arrivals.iter().map(|a| a.request.total_gpus()).sum();
    println!(
        "fleet: {gpus} GPUs ({} nodes × 8, racks of 16 nodes, zones of 8 racks); {} jobs asking {} GPUs in all; seed {seed}",
        fleet.nodes.len(),
        arrivals.len(),
        demand
    );
    let policy = NAMESPACES.iter().fold(Policy::default(), |p, (ns, w)| p.weight(*ns, *w));
    // Best of five: on a shared machine the slowest runs measure the neighbours.
    let best = |run: &mut dyn FnMut() -> (usize, usize, Duration)| {
        (0..5).map(|_| run()).min_by_key(|r| r.2).expect("five runs")
    };
    print_burst(
        "flotilla",
        best(&mut || {
            let mut fresh = Scheduler::new(&fleet, &[], policy.clone()).expect("valid fleet");
            burst(&mut fresh, &arrivals)
        }),
    );
    print_burst("first-fit", best(&mut || burst(&mut FirstFit::new(&fleet), &arrivals)));
    // What the pure `schedule` pays on every call: indexing the fleet and its running jobs.
    let mut full = Scheduler::new(&fleet, &[], policy.clone()).expect("valid fleet");
    full.schedule(&arrivals.iter().map(|a| a.request.clone()).collect::<Vec<_>>(), 0);
    let snapshot = full.running();
    let (runs, started_at) = (20, Instant::now());
    for _ in 0..runs {
        drop(Scheduler::new(&fleet, &snapshot, policy.clone()).expect("valid state"));
    }
    println!(
        "indexing the fleet with {} running jobs (the pure `schedule` does this per call): {:.2} ms",
        snapshot.len(),
        started_at.elapsed().as_secs_f64() * 1e3 / f64::from(runs)
    );
    println!(
        "\nchurn: jobs arrive, run and end; one pass after every event; checkpoints every {} min, \
         {} s per restart",
        CHECKPOINT / 60,
        RESTART
    );
    let mut lending = Scheduler::new(&fleet, &[], policy.clone()).expect("valid fleet");
    let no_loans = Policy { lending: false, ..policy };
    let mut holding = Scheduler::new(&fleet, &[], no_loans).expect("valid fleet");
    let mut reports = [
        simulate(&mut lending, &arrivals),
        simulate(&mut holding, &arrivals),
        simulate(&mut FirstFit::new(&fleet), &arrivals),
    ];
    print(&["flotilla", "flotilla, no loans", "first-fit"], &mut reports, gpus);
}
