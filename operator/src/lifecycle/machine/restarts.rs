//! How an attempt ends and the job restarts: one method per cause (a worker's exit, a hardware
//! fault or lost node, a hang, a straggler, a preemption), each writing its restart record,
//! condition and Event.

use super::{POLL, Step};
use crate::crd::common::{condition_types as ct, push_restart};
use crate::crd::{JobPhase, RestartCause, RestartRecord};
use crate::lifecycle::{Effect, HardwareFault, HungRank, PhaseEvent, SlowRank, backoff};

// === impl Step ===

impl Step<'_, '_> {
    pub(super) fn steps_lost(&self) -> Option<i64> {
        let p = self.t.status.progress.as_ref()?;
        Some(p.step - p.last_checkpoint_step.unwrap_or(0)).map(|s| s.max(0))
    }

    pub(super) fn record(
        &mut self,
        cause: RestartCause,
        reason: String,
        exit_code: Option<i32>,
        rank: Option<i32>,
        fault: Option<&HardwareFault>,
    ) {
        let record = RestartRecord {
            time: self.now(),
            attempt: self.attempt_number().unwrap_or_default(),
            cause,
            reason,
            exit_code,
            rank,
            node: fault.map(|h| h.node.clone()),
            gpu: fault.and_then(|h| h.gpu),
            xid: fault.and_then(|h| h.xid),
            steps_lost: self.steps_lost(),
        };
        push_restart(&mut self.t.status.restart_history, record);
    }

    pub(super) fn restart_for_exit(&mut self, exit: crate::lifecycle::WorkerExit) {
        let policy = &self.f.spec.restart_policy;
        let what = format!("worker {} {}", exit.rank, describe_exit(&exit));
        self.stop_live_attempt(&what);
        if self.t.status.restarts >= policy.max_restarts {
            let max = policy.max_restarts;
            return self.fail(
                "RestartBudgetSpent",
                format!("{what}; all {max} restarts of spec.restartPolicy.maxRestarts are spent"),
            );
        }
        self.t.status.restarts += 1;
        self.record(RestartCause::WorkerExit, what.clone(), exit.code, Some(exit.rank), None);
        let (n, max) = (self.t.status.restarts, policy.max_restarts);
        self.condition(ct::READY, false, "Restarting", &what);
        self.goto(
            JobPhase::Restarting,
            true,
            "Restarting",
            format!("{what}; restart {n} of {max}"),
        );
        self.requeue_within(backoff(policy, n));
    }

    pub(super) fn restart_for_hardware(&mut self, cause: RestartCause, fault: HardwareFault) {
        self.stop_live_attempt(&fault.message);
        self.t.status.hardware_restarts += 1;
        self.record(cause, fault.message.clone(), None, None, Some(&fault));
        let note =
            format!("{}; restarting elsewhere without spending the restart budget", fault.message);
        let reason = match cause {
            RestartCause::NodeLost => "NodeLost",
            _ => "HardwareFault",
        };
        self.condition(ct::READY, false, reason, &fault.message);
        self.goto(JobPhase::Restarting, true, reason, note);
        self.requeue_within(POLL);
    }

    /// A rank made no progress within its lease. Charged to the user's budget, like an exit
    /// (the program, its data or its collective are the usual causes), unless a GPU of the
    /// blamed rank is Degraded: then it counts as a hardware restart.
    pub(super) fn restart_for_hang(&mut self, hang: HungRank) {
        self.stop_live_attempt(&hang.message);
        let fault = HardwareFault {
            node: hang.node.clone(),
            gpu: hang.gpu,
            xid: None,
            message: hang.message.clone(),
        };
        let policy = &self.f.spec.restart_policy;
        let note = if hang.gpu_degraded {
            self.t.status.hardware_restarts += 1;
            format!(
                "{}; its GPU is Degraded, so the restart does not spend the restart budget",
                hang.message
            )
        } else if self.t.status.restarts >= policy.max_restarts {
            let max = policy.max_restarts;
            self.record(
                RestartCause::Hang,
                hang.message.clone(),
                None,
                Some(hang.rank),
                Some(&fault),
            );
            return self.fail(
                "RestartBudgetSpent",
                format!(
                    "{}; all {max} restarts of spec.restartPolicy.maxRestarts are spent",
                    hang.message
                ),
            );
        } else {
            self.t.status.restarts += 1;
            let (n, max) = (self.t.status.restarts, policy.max_restarts);
            format!("{}; restart {n} of {max}", hang.message)
        };
        self.record(RestartCause::Hang, hang.message.clone(), None, Some(hang.rank), Some(&fault));
        self.condition(ct::READY, false, "Hang", &hang.message);
        self.goto(JobPhase::Restarting, true, "Hang", note);
        self.requeue_within(backoff(&self.f.spec.restart_policy, self.t.status.restarts));
    }

    /// A straggler: its GPU is marked suspect (once its agent shows it, not again), and when
    /// `spec.stragglers.moveOff` allows and the move is worth it, the job restarts off it as a
    /// hardware restart. True when it restarted.
    pub(super) fn straggler(&mut self, slow: &SlowRank) -> bool {
        if !slow.suspected {
            if let Some((_, uuid)) = &slow.gpu {
                self.t.effects.push(Effect::SuspectGpu {
                    node: slow.node.clone(),
                    gpu_uuid: uuid.clone(),
                    evidence: slow.evidence.clone(),
                });
            }
            let mut note = format!("{}; its GPU is marked Degraded for validation", slow.evidence);
            if self.f.spec.stragglers.move_off {
                note.push_str(&format!("; moving the job off it: {}", slow.move_rule));
            }
            self.t.event = Some(PhaseEvent { warning: true, reason: "Straggler", note });
            return false;
        }
        let moving = self.f.spec.stragglers.move_off && slow.worth_moving;
        if !moving || self.phase() != JobPhase::Running {
            return false;
        }
        let message = format!("{}; {}", slow.evidence, slow.move_rule);
        self.stop_live_attempt(&message);
        self.t.status.hardware_restarts += 1;
        let fault = HardwareFault {
            node: slow.node.clone(),
            gpu: slow.gpu.as_ref().map(|(i, _)| *i),
            xid: None,
            message: message.clone(),
        };
        self.record(RestartCause::Straggler, message.clone(), None, Some(slow.rank), Some(&fault));
        self.condition(ct::READY, false, "Straggler", &message);
        let note = format!(
            "{message}; restarting off its GPU from the last checkpoint without spending the restart budget"
        );
        self.goto(JobPhase::Restarting, true, "Straggler", note);
        self.requeue_within(POLL);
        true
    }

    pub(super) fn restart_for_preemption(&mut self, by: &str) {
        let on_loan = self.t.status.attempt.as_ref().is_some_and(|a| a.on_loan);
        let what = if on_loan {
            format!("the GPUs it borrowed were held for {by}, first in line, which can start now")
        } else {
            format!("preempted by {by}, which has a higher priority and needs these GPUs")
        };
        self.stop_live_attempt(&what);
        self.t.status.hardware_restarts += 1;
        self.record(RestartCause::Preempted, what.clone(), None, None, None);
        self.condition(ct::READY, false, "Preempted", &what);
        let note = format!(
            "{what}; requeued without spending the restart budget, to resume from its last checkpoint"
        );
        self.goto(JobPhase::Restarting, true, "Preempted", note);
        self.requeue_within(POLL);
    }
}

pub(super) fn describe_exit(exit: &crate::lifecycle::WorkerExit) -> String {
    match (exit.code, exit.signal) {
        (Some(code), _) => format!("exited with code {code}"),
        (None, Some(sig)) => format!("was killed by signal {sig}"),
        (None, None) => "ended without an exit status".into(),
    }
}
