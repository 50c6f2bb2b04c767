//! Unit tests of the state machine: every phase against every kind of fact.

use super::*;
use crate::crd::training_job::{CheckpointSpec, WorkerCommand};
use crate::crd::{Attempt, RestartCause, RestartRecord, WorkerPlacement};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

const T0: i64 = 1_800_000_000;

fn at(secs: i64) -> Timestamp {
    Timestamp::from_second(T0 + secs).unwrap()
}

fn spec(workers: i32) -> TrainingJobSpec {
    TrainingJobSpec {
        workers,
        gpus_per_worker: 2,
        engine: None,
        command: Some(WorkerCommand { command: vec!["/bin/train".into()], ..Default::default() }),
        checkpoint: Some(CheckpointSpec {
            path: "/ckpt/a".into(),
            interval_seconds: Some(60),
            keep: 3,
        }),
        restart_policy: RestartPolicy::default(),
        hang_detection: Default::default(),
        stragglers: Default::default(),
        priority: 0,
        scheduling: Default::default(),
        suspend: false,
        active_deadline_seconds: None,
        ttl_seconds_after_finished: None,
    }
}

fn placement(workers: i32) -> Placement {
    Placement {
        workers: (0..workers)
            .map(|rank| WorkerPlacement {
                rank,
                node: format!("node-{}", rank / 2),
                gpus: vec![0, 1],
            })
            .collect(),
    }
}

fn status(phase: JobPhase, attempt: Option<i32>) -> TrainingJobStatus {
    TrainingJobStatus {
        phase,
        phase_transition_time: Some(Time(at(0))),
        start_time: attempt.map(|_| Time(at(0))),
        attempt: attempt.map(|number| Attempt {
            number,
            placement: placement(2),
            ..Default::default()
        }),
        ..Default::default()
    }
}

struct Case {
    spec: TrainingJobSpec,
    status: TrainingJobStatus,
    now: Timestamp,
    validity: Result<(), InvalidSpec>,
    candidate: Option<Result<Placement, Unschedulable>>,
    report: AttemptReport,
    preempted_by: Option<String>,
    on_loan: bool,
}

impl Case {
    fn new(phase: JobPhase, attempt: Option<i32>) -> Self {
        Case {
            spec: spec(2),
            status: status(phase, attempt),
            now: at(1),
            validity: Ok(()),
            candidate: None,
            report: AttemptReport { all_stopped: attempt.is_none(), ..Default::default() },
            preempted_by: None,
            on_loan: false,
        }
    }

    fn decide(&self) -> Transition {
        decide(&JobFacts {
            now: self.now,
            generation: 7,
            spec: &self.spec,
            status: &self.status,
            validity: self.validity.clone(),
            candidate: self.candidate.clone(),
            report: self.report.clone(),
            preempted_by: self.preempted_by.clone(),
            on_loan: self.on_loan,
        })
    }
}

fn exit(rank: i32, code: i32) -> WorkerExit {
    WorkerExit { rank, code: Some(code), signal: None }
}

fn condition<'a>(t: &'a Transition, type_: &str) -> Option<&'a str> {
    t.status.conditions.iter().find(|c| c.type_ == type_).map(|c| c.status.as_str())
}

fn reason<'a>(t: &'a Transition, type_: &str) -> Option<&'a str> {
    t.status.conditions.iter().find(|c| c.type_ == type_).map(|c| c.reason.as_str())
}

#[test]
fn pending_valid_job_is_queued_with_an_event() {
    let t = Case::new(JobPhase::Pending, None).decide();
    assert_eq!(t.status.phase, JobPhase::Queued);
    assert_eq!(t.status.observed_generation, Some(7));
    assert_eq!(condition(&t, "Valid"), Some("True"));
    assert_eq!(t.event.as_ref().map(|e| e.reason), Some("Queued"));
    assert!(t.effects.is_empty());
}

#[test]
fn a_pending_job_that_fits_now_is_scheduled_in_the_same_step() {
    let mut c = Case::new(JobPhase::Pending, None);
    c.candidate = Some(Ok(placement(2)));
    let t = c.decide();
    assert_eq!(t.status.phase, JobPhase::Scheduled, "one write: Pending to Scheduled");
    assert_eq!(t.effects, vec![Effect::Launch { attempt: 1 }]);
    assert_eq!(t.event.as_ref().map(|e| e.reason), Some("Scheduled"));
    assert_eq!(t.entered, vec![JobPhase::Queued, JobPhase::Scheduled], "both counted");
    // One that does not fit is queued with the reason it waits.
    c.candidate = Some(Err(Unschedulable { message: "needs 64 GPUs in one zone".into() }));
    let t = c.decide();
    assert_eq!(t.status.phase, JobPhase::Queued);
    assert_eq!(reason(&t, "Scheduled"), Some("Unschedulable"));
    assert!(t.status.message.as_deref().unwrap().contains("needs 64 GPUs"));
    assert!(t.effects.is_empty());
}

#[test]
fn invalid_job_stays_pending_with_valid_false_naming_the_field() {
    let mut c = Case::new(JobPhase::Pending, None);
    c.validity =
        Err(InvalidSpec { field: "spec.scheduling.nodeSelector".into(), message: "bad".into() });
    let t = c.decide();
    assert_eq!(t.status.phase, JobPhase::Pending);
    let valid = t.status.conditions.iter().find(|c| c.type_ == "Valid").unwrap();
    assert_eq!(valid.status, "False");
    assert!(valid.message.contains("spec.scheduling.nodeSelector"));
    assert!(t.effects.is_empty());
}

#[test]
fn invalid_running_job_keeps_running_but_reports_valid_false() {
    let mut c = Case::new(JobPhase::Running, Some(1));
    c.validity = Err(InvalidSpec { field: "spec.x".into(), message: "bad".into() });
    let t = c.decide();
    assert_eq!(t.status.phase, JobPhase::Running);
    assert_eq!(condition(&t, "Valid"), Some("False"));
    assert!(t.effects.is_empty());
}

#[test]
fn queued_with_placement_writes_attempt_one_then_launches() {
    let mut c = Case::new(JobPhase::Queued, None);
    c.candidate = Some(Ok(placement(2)));
    let t = c.decide();
    assert_eq!(t.status.phase, JobPhase::Scheduled);
    let attempt = t.status.attempt.as_ref().unwrap();
    assert_eq!(attempt.number, 1);
    assert_eq!(attempt.placement, placement(2));
    assert_eq!(t.effects, vec![Effect::Launch { attempt: 1 }]);
    assert_eq!(t.status.start_time, Some(Time(at(1))));
}

#[test]
fn queued_without_placement_stays_queued_unschedulable() {
    let mut c = Case::new(JobPhase::Queued, None);
    c.candidate = Some(Err(Unschedulable { message: "needs 2 nodes".into() }));
    let t = c.decide();
    assert_eq!(t.status.phase, JobPhase::Queued);
    assert_eq!(condition(&t, "Scheduled"), Some("False"));
    assert!(t.effects.is_empty());
    assert!(t.requeue_after.is_some());
}

#[test]
fn next_attempt_waits_until_the_previous_is_confirmed_stopped() {
    let mut c = Case::new(JobPhase::Queued, Some(3));
    c.candidate = Some(Ok(placement(2)));
    c.report.all_stopped = false;
    let t = c.decide();
    assert_eq!(t.status.phase, JobPhase::Queued);
    assert_eq!(
        t.effects,
        vec![Effect::Stop {
            attempt: 3,
            reason: "the job is Queued; attempt 3 must not run".into()
        }],
        "no launch while attempt 3 may still run, only its stop"
    );
    c.report.all_stopped = true;
    let t = c.decide();
    assert_eq!(t.status.attempt.as_ref().unwrap().number, 4);
    assert_eq!(t.effects, vec![Effect::Launch { attempt: 4 }]);
}

#[test]
fn scheduled_becomes_running_when_every_worker_runs() {
    let mut c = Case::new(JobPhase::Scheduled, Some(1));
    c.report.running = 1;
    assert_eq!(c.decide().status.phase, JobPhase::Scheduled);
    c.report.running = 2;
    let t = c.decide();
    assert_eq!(t.status.phase, JobPhase::Running);
    assert_eq!(condition(&t, "Ready"), Some("True"));
    assert!(t.status.attempt.unwrap().start_time.is_some());
}

#[test]
fn all_workers_exiting_zero_succeeds() {
    let mut c = Case::new(JobPhase::Running, Some(1));
    c.report.exits = vec![exit(0, 0)];
    c.report.running = 1;
    assert_eq!(c.decide().status.phase, JobPhase::Running);
    c.report.exits = vec![exit(0, 0), exit(1, 0)];
    c.report.running = 0;
    let t = c.decide();
    assert_eq!(t.status.phase, JobPhase::Succeeded);
    assert_eq!(condition(&t, "Complete"), Some("True"));
    assert!(t.status.completion_time.is_some());
}

#[test]
fn retryable_exit_restarts_and_spends_the_budget() {
    let mut c = Case::new(JobPhase::Running, Some(1));
    c.report.exits = vec![exit(1, 1)];
    let t = c.decide();
    assert_eq!(t.status.phase, JobPhase::Restarting);
    assert_eq!(t.status.restarts, 1);
    assert_eq!(t.status.hardware_restarts, 0);
    assert_eq!(
        t.effects,
        vec![Effect::Stop { attempt: 1, reason: "worker 1 exited with code 1".into() }]
    );
    let record = t.status.restart_history.last().unwrap();
    assert_eq!(
        (record.cause, record.exit_code, record.attempt),
        (RestartCause::WorkerExit, Some(1), 1)
    );
    assert!(t.event.unwrap().warning);
}

#[test]
fn spent_budget_fails_the_job() {
    let mut c = Case::new(JobPhase::Running, Some(4));
    c.status.restarts = 3;
    c.report.exits = vec![exit(0, 2)];
    let t = c.decide();
    assert_eq!(t.status.phase, JobPhase::Failed);
    assert_eq!(t.event.unwrap().reason, "RestartBudgetSpent");
    assert!(
        t.effects
            .contains(&Effect::Stop { attempt: 4, reason: "worker 0 exited with code 2".into() })
    );
}

#[test]
fn zero_budget_fails_on_first_failure() {
    let mut c = Case::new(JobPhase::Running, Some(1));
    c.spec.restart_policy.max_restarts = 0;
    c.report.exits = vec![exit(0, 1)];
    assert_eq!(c.decide().status.phase, JobPhase::Failed);
}

#[test]
fn hardware_faults_restart_without_spending_the_budget() {
    let mut c = Case::new(JobPhase::Running, Some(2));
    c.status.restarts = 3; // budget already spent: a hardware fault still restarts
    c.report.fault = Some(HardwareFault {
        node: "node-1".into(),
        gpu: Some(3),
        xid: Some(79),
        message: "XID 79".into(),
    });
    let t = c.decide();
    assert_eq!(t.status.phase, JobPhase::Restarting);
    assert_eq!((t.status.restarts, t.status.hardware_restarts), (3, 1));
    let r = t.status.restart_history.last().unwrap();
    assert_eq!(
        (r.cause, r.xid, r.gpu, r.node.as_deref()),
        (RestartCause::HardwareFault, Some(79), Some(3), Some("node-1"))
    );
}

#[test]
fn a_loan_is_recorded_on_the_attempt_and_taking_it_back_says_so() {
    let mut c = Case::new(JobPhase::Queued, None);
    c.candidate = Some(Ok(placement(2)));
    c.on_loan = true;
    let t = c.decide();
    let attempt = t.status.attempt.clone().expect("placed");
    assert!(attempt.on_loan);
    assert!(t.event.as_ref().is_some_and(|e| e.note.contains("on loan")), "{:?}", t.event);
    let mut c = Case::new(JobPhase::Running, Some(1));
    c.status.attempt.as_mut().unwrap().on_loan = true;
    c.preempted_by = Some("ns/big".into());
    let t = c.decide();
    assert_eq!(t.status.phase, JobPhase::Restarting);
    assert_eq!((t.status.restarts, t.status.hardware_restarts), (0, 1), "budget unspent");
    let r = t.status.restart_history.last().unwrap();
    assert_eq!(r.cause, RestartCause::Preempted);
    assert!(r.reason.contains("borrowed were held for ns/big"), "{}", r.reason);
}

#[test]
fn preemption_stops_the_attempt_and_requeues_it_without_spending_the_budget() {
    let mut c = Case::new(JobPhase::Running, Some(2));
    c.status.restarts = 3; // budget spent: preemption still only requeues
    c.preempted_by = Some("ns/urgent".into());
    let t = c.decide();
    assert_eq!(t.status.phase, JobPhase::Restarting);
    assert_eq!((t.status.restarts, t.status.hardware_restarts), (3, 1));
    assert_eq!(t.effects.len(), 1);
    assert!(
        matches!(&t.effects[0], Effect::Stop { attempt: 2, reason } if reason.contains("ns/urgent"))
    );
    let r = t.status.restart_history.last().unwrap();
    assert_eq!((r.cause, r.attempt), (RestartCause::Preempted, 2));
    assert_eq!(t.event.as_ref().map(|e| (e.warning, e.reason)), Some((true, "Preempted")));
    // Once every worker stopped it goes back to the queue at once (no backoff).
    let mut c = Case::new(JobPhase::Restarting, Some(2));
    c.status.restart_history = t.status.restart_history.clone();
    c.report.all_stopped = true;
    assert_eq!(c.decide().status.phase, JobPhase::Queued);
}

#[test]
fn a_finished_attempt_is_not_preempted() {
    let mut c = Case::new(JobPhase::Running, Some(1));
    c.preempted_by = Some("ns/urgent".into());
    c.report.exits = vec![exit(0, 0), exit(1, 0)];
    assert_eq!(c.decide().status.phase, JobPhase::Succeeded);
}

#[test]
fn a_preemption_request_names_the_attempt_it_targets() {
    use crate::lifecycle::preempted_by;
    assert_eq!(preempted_by("3/ns/urgent", 3), Some("ns/urgent"));
    assert_eq!(preempted_by("3/ns/urgent", 4), None, "a request for an earlier attempt");
    assert_eq!(preempted_by("x/ns/urgent", 3), None);
    assert_eq!(preempted_by("3/", 3), None);
    assert_eq!(preempted_by("garbage", 3), None);
}

#[test]
fn lost_node_restarts_as_hardware() {
    let mut c = Case::new(JobPhase::Scheduled, Some(1));
    c.report.node_lost = Some(HardwareFault {
        node: "node-0".into(),
        gpu: None,
        xid: None,
        message: "node node-0 stopped reporting".into(),
    });
    let t = c.decide();
    assert_eq!(t.status.phase, JobPhase::Restarting);
    let last = t.status.restart_history.last().unwrap();
    assert_eq!((last.cause, last.node.as_deref()), (RestartCause::NodeLost, Some("node-0")));
    assert_eq!((t.status.restarts, t.status.hardware_restarts), (0, 1));
    assert_eq!(reason(&t, "Ready"), Some("NodeLost"));
}

#[test]
fn exits_while_a_node_is_unreachable_wait_for_the_node_instead_of_spending_the_budget() {
    let mut c = Case::new(JobPhase::Running, Some(1));
    c.report.running = 1;
    c.report.exits = vec![exit(1, 1)];
    c.report.node_unreachable = Some("node-0".into());
    let t = c.decide();
    assert_eq!(t.status.phase, JobPhase::Running, "no restart while node-0 is in doubt");
    assert_eq!((t.status.restarts, t.status.hardware_restarts), (0, 0));
    assert_eq!(reason(&t, "Ready"), Some("NodeUnreachable"));
    assert!(t.effects.is_empty(), "nothing stopped or launched: {:?}", t.effects);

    // The node comes back: its worker's own report decides (here: rank 1's exit is charged).
    c.status = t.status.clone();
    c.report.node_unreachable = None;
    let t = c.decide();
    assert_eq!(t.status.phase, JobPhase::Restarting);
    assert_eq!(t.status.restarts, 1);
}

#[test]
fn a_node_back_before_any_exit_makes_the_job_ready_again() {
    let mut c = Case::new(JobPhase::Running, Some(1));
    c.report.running = 2;
    c.report.node_unreachable = Some("node-0".into());
    let t = c.decide();
    assert_eq!(reason(&t, "Ready"), Some("NodeUnreachable"));
    c.status = t.status.clone();
    c.report.node_unreachable = None;
    let t = c.decide();
    assert_eq!(t.status.phase, JobPhase::Running);
    assert_eq!(reason(&t, "Ready"), Some("Running"));
}

#[test]
fn workers_of_an_attempt_that_is_over_are_asked_to_stop_on_every_look() {
    // A new operator finds the job Restarting (the old one died before sending the stop).
    let mut c = Case::new(JobPhase::Restarting, Some(1));
    c.report.running = 2;
    c.report.all_stopped = false;
    let t = c.decide();
    assert_eq!(t.status.phase, JobPhase::Restarting);
    assert!(
        matches!(t.effects[..], [Effect::Stop { attempt: 1, .. }]),
        "stop sent again: {:?}",
        t.effects
    );
    // Nor may workers run under a finished job.
    c.status = status(JobPhase::Failed, Some(1));
    let t = c.decide();
    assert!(matches!(t.effects[..], [Effect::Stop { attempt: 1, .. }]), "{:?}", t.effects);
    // Once they have stopped, nothing more is sent; a live attempt is never stopped this way.
    c.report.all_stopped = true;
    assert!(c.decide().effects.is_empty());
    c.status = status(JobPhase::Running, Some(1));
    c.report.all_stopped = false;
    assert!(!c.decide().effects.iter().any(|e| matches!(e, Effect::Stop { .. })));
}

#[test]
fn exit_code_classes_follow_the_policy() {
    let mut p = RestartPolicy::default();
    let e = |code| WorkerExit { rank: 0, code: Some(code), signal: None };
    assert_eq!(classify_exit(&p, &e(0)), ExitClass::Success);
    assert_eq!(classify_exit(&p, &e(1)), ExitClass::Retryable);
    p.fatal_exit_codes = vec![42];
    assert_eq!(classify_exit(&p, &e(42)), ExitClass::Fatal);
    p.retryable_exit_codes = vec![137, 1];
    assert_eq!(classify_exit(&p, &e(1)), ExitClass::Retryable);
    assert_eq!(classify_exit(&p, &e(2)), ExitClass::Fatal);
    let killed = WorkerExit { rank: 0, code: None, signal: Some(9) };
    assert_eq!(classify_exit(&p, &killed), ExitClass::Retryable);
}

#[test]
fn fatal_exit_fails_without_restart() {
    let mut c = Case::new(JobPhase::Running, Some(1));
    c.spec.restart_policy.fatal_exit_codes = vec![3];
    c.report.exits = vec![exit(1, 3)];
    let t = c.decide();
    assert_eq!(t.status.phase, JobPhase::Failed);
    assert_eq!(t.status.restarts, 0);
    assert_eq!(t.event.unwrap().reason, "FatalExitCode");
}

#[test]
fn backoff_doubles_and_is_capped() {
    let p = RestartPolicy { backoff_seconds: 10, max_backoff_seconds: 35, ..Default::default() };
    let secs: Vec<i64> = (1..=4).map(|n| backoff(&p, n).as_secs()).collect();
    assert_eq!(secs, vec![10, 20, 35, 35]);
}

#[test]
fn restarting_waits_for_stop_and_backoff_then_requeues() {
    let mut c = Case::new(JobPhase::Restarting, Some(1));
    c.status.restarts = 2; // backoff 20 s
    c.status.restart_history = vec![RestartRecord {
        time: Time(at(0)),
        attempt: 1,
        cause: RestartCause::WorkerExit,
        reason: String::new(),
        exit_code: Some(1),
        rank: None,
        node: None,
        gpu: None,
        xid: None,
        steps_lost: None,
    }];
    c.report.all_stopped = false;
    c.now = at(100);
    assert_eq!(c.decide().status.phase, JobPhase::Restarting, "workers not confirmed dead");
    c.report.all_stopped = true;
    c.now = at(5);
    let t = c.decide();
    assert_eq!(t.status.phase, JobPhase::Restarting);
    assert_eq!(t.requeue_after, Some(SignedDuration::from_secs(15)));
    c.now = at(20);
    assert_eq!(c.decide().status.phase, JobPhase::Queued);
}

#[test]
fn suspend_stops_a_live_attempt_and_resume_requeues() {
    for phase in [JobPhase::Scheduled, JobPhase::Running] {
        let mut c = Case::new(phase, Some(2));
        c.spec.suspend = true;
        let t = c.decide();
        assert_eq!(t.status.phase, JobPhase::Suspended);
        assert!(matches!(t.effects.as_slice(), [Effect::Stop { attempt: 2, .. }]));
    }
    let mut c = Case::new(JobPhase::Queued, None);
    c.spec.suspend = true;
    let t = c.decide();
    assert_eq!(t.status.phase, JobPhase::Suspended);
    assert!(t.effects.is_empty());
    let c = Case::new(JobPhase::Suspended, Some(2));
    assert_eq!(c.decide().status.phase, JobPhase::Queued);
}

#[test]
fn deadline_fails_a_live_job_and_stops_it() {
    let mut c = Case::new(JobPhase::Running, Some(1));
    c.spec.active_deadline_seconds = Some(60);
    c.now = at(30);
    let t = c.decide();
    assert_eq!(t.status.phase, JobPhase::Running);
    assert_eq!(t.requeue_after, Some(SignedDuration::from_secs(30)));
    c.now = at(60);
    let t = c.decide();
    assert_eq!(t.status.phase, JobPhase::Failed);
    assert_eq!(t.event.as_ref().unwrap().reason, "DeadlineExceeded");
    assert!(matches!(t.effects.as_slice(), [Effect::Stop { attempt: 1, .. }]));
}

#[test]
fn ttl_deletes_a_finished_job_only_after_it_passes() {
    for phase in [JobPhase::Succeeded, JobPhase::Failed] {
        let mut c = Case::new(phase, Some(1));
        c.spec.ttl_seconds_after_finished = Some(100);
        c.status.completion_time = Some(Time(at(0)));
        c.report.all_stopped = true;
        c.now = at(40);
        let t = c.decide();
        assert!(t.effects.is_empty());
        assert_eq!(t.requeue_after, Some(SignedDuration::from_secs(60)));
        c.now = at(100);
        assert_eq!(c.decide().effects, vec![Effect::Delete]);
    }
}

#[test]
fn terminal_phases_never_change_or_launch() {
    for phase in [JobPhase::Succeeded, JobPhase::Failed] {
        let mut c = Case::new(phase, Some(1));
        c.candidate = Some(Ok(placement(2)));
        c.report.exits = vec![exit(0, 1)];
        c.spec.suspend = true;
        let t = c.decide();
        assert_eq!(t.status.phase, phase);
        assert!(!t.effects.iter().any(|e| matches!(e, Effect::Launch { .. })), "{:?}", t.effects);
        assert!(t.event.is_none());
    }
}

#[test]
fn every_phase_change_emits_exactly_one_event_and_idle_steps_emit_none() {
    let c = Case::new(JobPhase::Running, Some(1));
    let t = c.decide();
    assert_eq!(t.status.phase, JobPhase::Running);
    assert!(t.event.is_none(), "nothing changed, nothing to announce");
}

#[test]
fn progress_is_summarised_and_steps_lost_recorded() {
    let mut c = Case::new(JobPhase::Running, Some(1));
    c.report.progress = Some(Progress {
        step: 250,
        total_steps: Some(1000),
        last_checkpoint_step: Some(200),
        ..Default::default()
    });
    c.report.exits = vec![exit(0, 1)];
    let t = c.decide();
    let p = t.status.progress.as_ref().unwrap();
    assert_eq!((p.percent, p.summary.as_deref()), (Some(25), Some("250/1000 (25%)")));
    assert_eq!(t.status.restart_history.last().unwrap().steps_lost, Some(50));
}

#[test]
fn resumed_attempt_records_its_checkpoint_step() {
    let mut c = Case::new(JobPhase::Queued, Some(1));
    c.report.all_stopped = true;
    c.status.progress =
        Some(Progress { step: 130, last_checkpoint_step: Some(100), ..Default::default() });
    c.candidate = Some(Ok(placement(2)));
    let t = c.decide();
    assert_eq!(t.status.attempt.unwrap().resumed_from_step, Some(100));
}

fn hung(gpu_degraded: bool) -> HungRank {
    HungRank {
        rank: 1,
        node: "node-0".into(),
        gpu: Some(1),
        message: "rank 1 on node-0 stopped making progress: no step for 130s".into(),
        gpu_degraded,
    }
}

#[test]
fn a_hung_rank_restarts_the_job_blaming_it_and_spends_the_budget() {
    let mut c = Case::new(JobPhase::Running, Some(1));
    c.report.running = 1;
    c.report.hang = Some(hung(false));
    // A peer whose collective gave up already exited: the hang, not its exit, is recorded.
    c.report.exits = vec![exit(0, 1)];
    let t = c.decide();
    assert_eq!(t.status.phase, JobPhase::Restarting);
    assert_eq!((t.status.restarts, t.status.hardware_restarts), (1, 0));
    let r = t.status.restart_history.last().expect("record");
    assert_eq!(
        (r.cause, r.rank, r.node.as_deref(), r.gpu),
        (RestartCause::Hang, Some(1), Some("node-0"), Some(1))
    );
    assert_eq!(reason(&t, "Ready"), Some("Hang"));
    assert_eq!(t.event.as_ref().map(|e| (e.reason, e.warning)), Some(("Hang", true)));
    assert!(t.effects.iter().any(|e| matches!(e, Effect::Stop { attempt: 1, .. })));
}

#[test]
fn a_hang_on_a_degraded_gpu_is_a_hardware_restart_and_a_spent_budget_fails_the_job() {
    let mut c = Case::new(JobPhase::Running, Some(1));
    c.report.running = 2;
    c.report.hang = Some(hung(true));
    let t = c.decide();
    assert_eq!(
        (t.status.phase, t.status.restarts, t.status.hardware_restarts),
        (JobPhase::Restarting, 0, 1)
    );
    c.report.hang = Some(hung(false));
    c.spec.restart_policy.max_restarts = 0;
    let t = c.decide();
    assert_eq!(t.status.phase, JobPhase::Failed);
    assert_eq!(reason(&t, "Complete"), Some("RestartBudgetSpent"));
    assert_eq!(t.status.restart_history.last().map(|r| r.cause), Some(RestartCause::Hang));
}

#[test]
fn a_running_job_is_looked_at_again_when_its_lease_runs_out() {
    let mut c = Case::new(JobPhase::Running, Some(1));
    c.report.running = 2;
    c.report.lease_ends_in = Some(std::time::Duration::from_secs(7));
    let t = c.decide();
    assert_eq!(t.status.phase, JobPhase::Running);
    assert_eq!(t.requeue_after, Some(SignedDuration::from_secs(8)));
}

fn slow(suspected: bool, worth_moving: bool) -> SlowRank {
    SlowRank {
        rank: 1,
        node: "node-0".into(),
        gpu: Some((1, "GPU-1".into())),
        evidence: "rank 1 on node-0 computes each step in 0.400s".into(),
        suspected,
        move_rule: "moving would save about 300s … worth it".into(),
        worth_moving,
    }
}

#[test]
fn a_straggler_s_gpu_is_suspected_then_the_job_moves_off_it_only_when_allowed_and_worth_it() {
    let mut c = Case::new(JobPhase::Running, Some(1));
    c.report.running = 2;
    c.report.straggler = Some(slow(false, true));
    let t = c.decide();
    assert_eq!(t.status.phase, JobPhase::Running, "first the GPU is marked");
    assert!(
        t.effects
            .iter()
            .any(|e| matches!(e, Effect::SuspectGpu { gpu_uuid, .. } if gpu_uuid == "GPU-1"))
    );
    assert_eq!(t.event.as_ref().map(|e| e.reason), Some("Straggler"));
    // Marked; moveOff is false by default: the job stays.
    c.report.straggler = Some(slow(true, true));
    let t = c.decide();
    assert_eq!(t.status.phase, JobPhase::Running);
    assert!(t.effects.is_empty(), "{:?}", t.effects);
    c.spec.stragglers.move_off = true;
    c.report.straggler = Some(slow(true, false));
    assert_eq!(c.decide().status.phase, JobPhase::Running, "not worth it");
    c.report.straggler = Some(slow(true, true));
    let t = c.decide();
    assert_eq!(
        (t.status.phase, t.status.restarts, t.status.hardware_restarts),
        (JobPhase::Restarting, 0, 1)
    );
    let r = t.status.restart_history.last().expect("record");
    assert_eq!((r.cause, r.rank, r.gpu), (RestartCause::Straggler, Some(1), Some(1)));
}
