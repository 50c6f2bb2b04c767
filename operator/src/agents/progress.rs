//! A worker's progress message: the training progress shown in the job's status, and the
//! rank's pace that hang and straggler detection read.

use flotilla_proto::v1 as pb;

pub use flotilla_contract::progress::Activity;

/// One rank's pace, from its newest progress line: what hang and straggler detection read.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RankPace {
    /// Steps it completed.
    pub step: i64,
    /// The longest step among the lines this report stands for, seconds.
    pub step_seconds: Option<f64>,
    /// Compute time of its newest step, without waits in collectives, seconds.
    pub compute_seconds: Option<f64>,
    /// What it does now.
    pub activity: Activity,
    /// The peer it waits for, when waiting or when it gave up.
    pub waiting_on_rank: Option<u32>,
}

fn activity(a: i32) -> Activity {
    match pb::WorkerActivity::try_from(a).unwrap_or(pb::WorkerActivity::Unspecified) {
        pb::WorkerActivity::Unspecified | pb::WorkerActivity::Training => Activity::Training,
        pb::WorkerActivity::Starting => Activity::Starting,
        pb::WorkerActivity::Checkpointing => Activity::Checkpointing,
        pb::WorkerActivity::Waiting => Activity::Waiting,
        pb::WorkerActivity::PeerLost => Activity::PeerLost,
    }
}

/// The status progress and the pace a worker's progress message carries.
pub(super) fn progress_of(p: &pb::WorkerProgress) -> (Option<crate::crd::Progress>, RankPace) {
    let positive = |s: f64| (s.is_finite() && s > 0.0).then_some(s);
    let pace = RankPace {
        step: p.step as i64,
        step_seconds: positive(p.step_seconds),
        compute_seconds: positive(p.compute_seconds),
        activity: activity(p.activity),
        waiting_on_rank: p.waiting_on_rank,
    };
    let progress = (pace.activity == Activity::Training).then(|| crate::crd::Progress {
        step: p.step as i64,
        total_steps: (p.total_steps > 0).then_some(p.total_steps as i64),
        loss: p.loss.is_finite().then_some(p.loss),
        tokens_per_second: Some(p.tokens_per_second),
        last_checkpoint_step: (p.last_checkpoint_step > 0).then_some(p.last_checkpoint_step as i64),
        ..Default::default()
    });
    (progress, pace)
}
