//! [`decide`]: one step of the `TrainingJob` state machine.

use super::{
    AttemptReport, Effect, ExitClass, JobFacts, PhaseEvent, Transition, backoff, classify_exit,
    next_attempt_number,
};
use crate::crd::common::{condition_types as ct, set_condition};
use crate::crd::{Attempt, JobPhase, Progress, RestartCause};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::SignedDuration;
use restarts::describe_exit;

mod restarts;

/// How soon to look again while waiting for something the watch may not announce.
const POLL: SignedDuration = SignedDuration::from_secs(10);

/// One step of the state machine. Deterministic in its inputs.
pub fn decide(facts: &JobFacts<'_>) -> Transition {
    let mut step = Step::new(facts);
    step.run();
    step.stop_leftovers();
    step.finish()
}

struct Step<'f, 'a> {
    f: &'f JobFacts<'a>,
    t: Transition,
}

// === impl Step ===

impl<'f, 'a> Step<'f, 'a> {
    fn new(f: &'f JobFacts<'a>) -> Self {
        let mut status = f.status.clone();
        status.observed_generation = Some(f.generation);
        if let Some(p) = &f.report.progress {
            status.progress = Some(with_summary(p.clone()));
        }
        let t = Transition {
            status,
            effects: Vec::new(),
            event: None,
            requeue_after: None,
            preempt: Vec::new(),
            entered: Vec::new(),
        };
        Step { f, t }
    }

    fn phase(&self) -> JobPhase {
        self.t.status.phase
    }

    fn run(&mut self) {
        let f = self.f;
        if self.phase().is_terminal() {
            return self.ttl();
        }
        if let Some(at) = self.deadline()
            && f.now >= at
        {
            let limit = f.spec.active_deadline_seconds.unwrap_or_default();
            self.stop_live_attempt("active deadline exceeded");
            return self.fail(
                "DeadlineExceeded",
                format!("the job was active longer than spec.activeDeadlineSeconds ({limit}s)"),
            );
        }
        match &f.validity {
            Err(invalid) => {
                let msg = format!("{}: {}", invalid.field, invalid.message);
                self.condition(ct::VALID, false, "InvalidSpec", &msg);
                if matches!(self.phase(), JobPhase::Pending | JobPhase::Queued) {
                    self.goto(JobPhase::Pending, true, "InvalidSpec", msg);
                }
                return;
            }
            Ok(()) => self.condition(
                ct::VALID,
                true,
                "SpecValid",
                "the spec passed the operator's checks",
            ),
        }
        if f.spec.suspend {
            if self.phase() != JobPhase::Suspended {
                self.stop_live_attempt("suspended by spec.suspend");
                self.condition(ct::READY, false, "Suspended", "spec.suspend is true");
                self.goto(
                    JobPhase::Suspended,
                    false,
                    "Suspended",
                    "spec.suspend is true; workers are stopped".into(),
                );
            }
            return;
        }
        match self.phase() {
            JobPhase::Pending => {
                let (w, g) = (f.spec.workers, f.spec.gpus_per_worker);
                self.goto(
                    JobPhase::Queued,
                    false,
                    "Queued",
                    format!("waiting for a placement of {w} workers × {g} GPUs"),
                );
                // Placed in the same step when it fits now: one status write, Pending to
                // Scheduled, instead of one per phase (the API server is the bottleneck when
                // thousands of jobs arrive at once).
                self.schedule();
            }
            JobPhase::Suspended => {
                self.goto(
                    JobPhase::Queued,
                    false,
                    "Resumed",
                    "spec.suspend is false; queued again".into(),
                );
                self.t.requeue_after = Some(SignedDuration::ZERO);
            }
            JobPhase::Queued => self.schedule(),
            JobPhase::Scheduled | JobPhase::Running => self.watch_attempt(),
            JobPhase::Restarting => self.leave_restarting(),
            JobPhase::Succeeded | JobPhase::Failed => {}
        }
        if let Some(at) = self.deadline() {
            self.requeue_within(at.duration_since(f.now));
        }
    }

    fn finish(self) -> Transition {
        self.t
    }

    /// Workers run only in Scheduled and Running. In any other phase, an attempt whose workers
    /// are not all confirmed stopped is asked to stop (again): the stop that goes with a
    /// transition is lost if the operator dies between writing the status and sending it, and a
    /// new operator must not wait forever for workers nobody told to stop. Repeats are cheap:
    /// the fleet sends them at most every few seconds and agents ignore them for workers
    /// already stopping.
    fn stop_leftovers(&mut self) {
        if self.phase().has_live_attempt() || self.f.report.all_stopped {
            return;
        }
        let Some(attempt) = self.attempt_number() else { return };
        if self.t.effects.iter().any(|e| matches!(e, Effect::Stop { .. })) {
            return;
        }
        let phase = self.phase();
        let reason = format!("the job is {phase:?}; attempt {attempt} must not run");
        self.t.effects.push(Effect::Stop { attempt, reason });
    }

    // --- helpers ---

    fn now(&self) -> Time {
        Time(self.f.now)
    }

    fn deadline(&self) -> Option<k8s_openapi::jiff::Timestamp> {
        let secs = self.f.spec.active_deadline_seconds?;
        let start = self.t.status.start_time.as_ref()?;
        start.0.checked_add(SignedDuration::from_secs(secs)).ok()
    }

    fn requeue_within(&mut self, d: SignedDuration) {
        let d = d.max(SignedDuration::ZERO);
        self.t.requeue_after = Some(self.t.requeue_after.map_or(d, |r| r.min(d)));
    }

    fn goto(&mut self, phase: JobPhase, warning: bool, reason: &'static str, note: String) {
        let changed = self.t.status.phase != phase;
        let s = &mut self.t.status;
        if changed {
            s.phase = phase;
            s.phase_transition_time = Some(Time(self.f.now));
            self.t.entered.push(phase);
        }
        if changed || s.message.as_deref() != Some(note.as_str()) {
            self.t.event = Some(PhaseEvent { warning, reason, note: note.clone() });
        }
        s.message = Some(note);
    }

    fn condition(&mut self, type_: &str, ok: bool, reason: &str, message: &str) {
        let now = self.now();
        set_condition(
            &mut self.t.status.conditions,
            Condition {
                type_: type_.into(),
                status: if ok { "True" } else { "False" }.into(),
                reason: reason.into(),
                message: message.into(),
                observed_generation: Some(self.f.generation),
                last_transition_time: now,
            },
        );
    }

    fn attempt_number(&self) -> Option<i32> {
        self.t.status.attempt.as_ref().map(|a| a.number)
    }

    fn stop_live_attempt(&mut self, reason: &str) {
        if self.phase().has_live_attempt()
            && let Some(attempt) = self.attempt_number()
        {
            self.t.effects.push(Effect::Stop { attempt, reason: reason.into() });
        }
    }

    fn fail(&mut self, reason: &'static str, note: String) {
        self.t.status.completion_time = Some(self.now());
        self.condition(ct::READY, false, reason, &note);
        self.condition(ct::COMPLETE, true, reason, &note);
        self.goto(JobPhase::Failed, true, reason, note);
        self.ttl();
    }

    fn ttl(&mut self) {
        let Some(ttl) = self.f.spec.ttl_seconds_after_finished else { return };
        let Some(done) = self.t.status.completion_time.as_ref() else { return };
        let Ok(at) = done.0.checked_add(SignedDuration::from_secs(i64::from(ttl))) else { return };
        if self.f.now >= at {
            self.t.effects.push(Effect::Delete);
        } else {
            self.requeue_within(at.duration_since(self.f.now));
        }
    }

    // --- phases ---

    fn schedule(&mut self) {
        let f = self.f;
        if self.t.status.attempt.is_some() && !f.report.all_stopped {
            let n = self.attempt_number().unwrap_or_default();
            let note =
                format!("waiting for every worker of attempt {n} to stop before placing the next");
            self.goto(JobPhase::Queued, false, "WaitingForStop", note);
            return self.requeue_within(POLL);
        }
        match &f.candidate {
            None => self.requeue_within(SignedDuration::ZERO),
            Some(Err(u)) => {
                self.condition(ct::SCHEDULED, false, "Unschedulable", &u.message);
                self.goto(JobPhase::Queued, false, "Unschedulable", u.message.clone());
                self.requeue_within(POLL);
            }
            Some(Ok(placement)) => {
                let number = next_attempt_number(&self.t.status);
                let nodes = placement.nodes().join(", ");
                let mut note = format!("attempt {number} placed on {nodes}");
                if f.on_loan {
                    note.push_str(
                        ", on loan: GPUs held for a job ahead in line, taken back (checkpoint, \
                         requeue) when it can start",
                    );
                }
                self.t.status.attempt = Some(Attempt {
                    number,
                    placement: placement.clone(),
                    scheduled_time: Some(self.now()),
                    start_time: None,
                    resumed_from_step: self
                        .t
                        .status
                        .progress
                        .as_ref()
                        .and_then(|p| p.last_checkpoint_step),
                    on_loan: f.on_loan,
                });
                self.t.status.start_time.get_or_insert(Time(f.now));
                self.condition(ct::SCHEDULED, true, "Placed", &note);
                self.goto(JobPhase::Scheduled, false, "Scheduled", note);
                self.t.effects.push(Effect::Launch { attempt: number });
            }
        }
    }

    fn watch_attempt(&mut self) {
        let f = self.f;
        let report: &AttemptReport = &f.report;
        if let Some(fault) = &report.fault {
            return self.restart_for_hardware(RestartCause::HardwareFault, fault.clone());
        }
        if let Some(lost) = &report.node_lost {
            return self.restart_for_hardware(RestartCause::NodeLost, lost.clone());
        }
        if let Some(node) = &report.node_unreachable {
            // Peers of a worker on a vanished node exit on their own within seconds; charging
            // those exits to the job would fail it for a hardware loss. Wait for the node to come
            // back (its reports then tell) or for the fence timeout (then it is NodeLost).
            let n = self.attempt_number().unwrap_or_default();
            let note = format!(
                "the agent on {node} is unreachable; attempt {n} waits for it to reconnect or for the fence timeout before restarting"
            );
            self.condition(ct::READY, false, "NodeUnreachable", &note);
            // Look again soon: the fence timeout ends the wait, and nothing else announces it.
            return self.requeue_within(SignedDuration::from_secs(1));
        }
        let policy = &f.spec.restart_policy;
        let classified: Vec<_> =
            report.exits.iter().map(|e| (e, classify_exit(policy, e))).collect();
        if let Some((exit, _)) = classified.iter().find(|(_, c)| *c == ExitClass::Fatal) {
            let note = format!(
                "worker {} {}, which spec.restartPolicy makes fatal",
                exit.rank,
                describe_exit(exit)
            );
            self.stop_live_attempt("a worker failed fatally");
            return self.fail("FatalExitCode", note);
        }
        // Before the exits of its peers: a peer whose collective gave up on a hung rank exits,
        // but the hung rank is the one to blame.
        if let Some(hang) = &report.hang {
            return self.restart_for_hang(hang.clone());
        }
        if let Some((exit, _)) = classified.iter().find(|(_, c)| *c == ExitClass::Retryable) {
            return self.restart_for_exit(**exit);
        }
        let succeeded = classified.iter().filter(|(_, c)| *c == ExitClass::Success).count() as i32;
        if succeeded >= f.spec.workers {
            self.t.status.completion_time = Some(self.now());
            let n = self.attempt_number().unwrap_or_default();
            let note = format!("all {} workers of attempt {n} exited 0", f.spec.workers);
            self.condition(ct::READY, false, "Succeeded", &note);
            self.condition(ct::COMPLETE, true, "Succeeded", &note);
            self.goto(JobPhase::Succeeded, false, "Succeeded", note);
            return self.ttl();
        }
        if let Some(by) = &f.preempted_by {
            return self.restart_for_preemption(by);
        }
        if let Some(slow) = &report.straggler
            && self.straggler(slow)
        {
            return;
        }
        let was_unreachable =
            self.t.status.conditions.iter().any(|c| {
                c.type_ == ct::READY && c.status == "False" && c.reason == "NodeUnreachable"
            });
        if self.phase() == JobPhase::Running && was_unreachable {
            let n = self.attempt_number().unwrap_or_default();
            let note = format!("every node of attempt {n} is reachable again");
            self.condition(ct::READY, true, "Running", &note);
        }
        if let Some(d) = report.lease_ends_in {
            // Nothing announces a lease running out; the extra second keeps it from being
            // looked at a moment too early.
            let d = SignedDuration::try_from(d).unwrap_or(POLL);
            self.requeue_within(d.saturating_add(SignedDuration::from_secs(1)));
        }
        if self.phase() == JobPhase::Scheduled && report.running + succeeded >= f.spec.workers {
            let n = self.attempt_number().unwrap_or_default();
            if let Some(a) = self.t.status.attempt.as_mut() {
                a.start_time = Some(Time(f.now));
            }
            let note = format!("all {} workers of attempt {n} are running", f.spec.workers);
            self.condition(ct::READY, true, "Running", &note);
            self.goto(JobPhase::Running, false, "Running", note);
        }
    }

    fn leave_restarting(&mut self) {
        let f = self.f;
        if !f.report.all_stopped {
            return self.requeue_within(POLL);
        }
        let last_cause = self.t.status.restart_history.last().map(|r| r.cause);
        let wait = match last_cause {
            // A hang backs off like an exit: restarting a job that hangs at once can loop.
            Some(RestartCause::WorkerExit | RestartCause::Hang) => {
                backoff(&f.spec.restart_policy, self.t.status.restarts)
            }
            _ => SignedDuration::ZERO,
        };
        let since = self.t.status.phase_transition_time.as_ref().map_or(f.now, |t| t.0);
        let ready_at = since.checked_add(wait).unwrap_or(since);
        if f.now < ready_at {
            return self.requeue_within(ready_at.duration_since(f.now));
        }
        let n = self.attempt_number().unwrap_or_default();
        self.goto(
            JobPhase::Queued,
            false,
            "Requeued",
            format!("attempt {n} stopped; waiting for a new placement"),
        );
        self.requeue_within(SignedDuration::ZERO);
    }
}

/// Fill `percent` and `summary` from `step` and `totalSteps`.
pub(crate) fn with_summary(mut p: Progress) -> Progress {
    if let Some(total) = p.total_steps.filter(|t| *t > 0) {
        let pct = (p.step.clamp(0, total) * 100 / total) as i32;
        p.percent = Some(pct);
        p.summary = Some(format!("{}/{} ({}%)", p.step, total, pct));
    } else {
        p.summary = Some(format!("step {}", p.step));
    }
    p
}
