//! Small builders for the custom resources the tests create, so that a test names only what it
//! cares about.
//!
//! ```
//! let job = flotilla_tests::training_job("train").workers(2).gpus_per_worker(4).priority(10).build();
//! assert_eq!(job.spec.workers, 2);
//! ```

use flotilla_operator::crd::engine::EngineConfig;
use flotilla_operator::crd::inference_service::{
    InferenceServiceSpec, ModelSource, RolloutSpec, ServingOptions,
};
use flotilla_operator::crd::training_job::{
    CheckpointSpec, HangDetection, PlacementStrategy, RestartPolicy, SchedulingSpec,
    StragglerPolicy, TrainingJobSpec, WorkerCommand,
};
use flotilla_operator::crd::{InferenceService, TrainingJob};

/// A TrainingJob `name` under construction: 1 worker × 1 GPU running `/bin/true`, no restarts,
/// priority 0, the default placement.
pub fn training_job(name: &str) -> TrainingJobBuilder {
    TrainingJobBuilder {
        name: name.to_owned(),
        spec: TrainingJobSpec {
            workers: 1,
            gpus_per_worker: 1,
            engine: None,
            command: Some(WorkerCommand {
                command: vec!["/bin/true".into()],
                ..WorkerCommand::default()
            }),
            checkpoint: None,
            restart_policy: RestartPolicy { max_restarts: 0, ..RestartPolicy::default() },
            hang_detection: HangDetection::default(),
            stragglers: Default::default(),
            priority: 0,
            scheduling: SchedulingSpec::default(),
            suspend: false,
            active_deadline_seconds: None,
            ttl_seconds_after_finished: None,
        },
    }
}

/// The job of the end-to-end tests: 2 workers × 2 GPUs spread one per agent (so that rendezvous
/// crosses agents), training the tiny preset for `steps`, checkpointing every `checkpoint_every`
/// steps, no restarts.
pub fn tiny_engine_job(name: &str, steps: u64, checkpoint_every: u64) -> TrainingJob {
    training_job(name)
        .workers(2)
        .gpus_per_worker(2)
        .tiny_engine(steps, checkpoint_every)
        .placement(PlacementStrategy::Spread)
        .build()
}

/// A [`TrainingJob`] being built; see [`training_job`].
#[derive(Clone, Debug)]
pub struct TrainingJobBuilder {
    name: String,
    spec: TrainingJobSpec,
}

impl TrainingJobBuilder {
    /// Workers in the gang.
    pub fn workers(mut self, workers: i32) -> Self {
        self.spec.workers = workers;
        self
    }

    /// GPUs of each worker.
    pub fn gpus_per_worker(mut self, gpus: i32) -> Self {
        self.spec.gpus_per_worker = gpus;
        self
    }

    /// The built-in engine with the tiny preset, `steps` steps, a checkpoint every
    /// `checkpoint_every`; replaces the command.
    pub fn tiny_engine(mut self, steps: u64, checkpoint_every: u64) -> Self {
        let mut engine = EngineConfig::preset("tiny").expect("tiny preset");
        engine.training.steps = steps;
        engine.training.checkpoint_interval = checkpoint_every;
        self.spec.engine = Some(engine);
        self.spec.command = None;
        self
    }

    /// A custom worker command instead of the engine.
    pub fn command(mut self, command: &[&str]) -> Self {
        self.spec.command = Some(WorkerCommand {
            command: command.iter().map(|c| (*c).to_owned()).collect(),
            ..WorkerCommand::default()
        });
        self.spec.engine = None;
        self
    }

    /// The whole restart policy.
    pub fn restart_policy(mut self, policy: RestartPolicy) -> Self {
        self.spec.restart_policy = policy;
        self
    }

    /// Where checkpoints go and how often.
    pub fn checkpoint(mut self, checkpoint: CheckpointSpec) -> Self {
        self.spec.checkpoint = Some(checkpoint);
        self
    }

    /// How hangs are detected.
    pub fn hang_detection(mut self, hang: HangDetection) -> Self {
        self.spec.hang_detection = hang;
        self
    }

    /// What to do about stragglers.
    pub fn stragglers(mut self, policy: StragglerPolicy) -> Self {
        self.spec.stragglers = policy;
        self
    }

    /// The job's priority.
    pub fn priority(mut self, priority: i32) -> Self {
        self.spec.priority = priority;
        self
    }

    /// How workers spread over nodes.
    pub fn placement(mut self, strategy: PlacementStrategy) -> Self {
        self.spec.scheduling = SchedulingSpec { strategy, ..self.spec.scheduling };
        self
    }

    /// The job.
    pub fn build(self) -> TrainingJob {
        TrainingJob::new(&self.name, self.spec)
    }
}

/// An InferenceService `name` under construction: 1 replica of 1 worker × 1 GPU serving
/// `checkpoint` on `port` (batches of up to 8, 8 new tokens), priority 0, the default placement
/// and rollout.
pub fn inference_service(name: &str, checkpoint: &str, port: u16) -> InferenceServiceBuilder {
    InferenceServiceBuilder {
        name: name.to_owned(),
        spec: InferenceServiceSpec {
            replicas: 1,
            workers_per_replica: 1,
            gpus_per_worker: 1,
            model: ModelSource { checkpoint_path: checkpoint.into(), ..Default::default() },
            serving: ServingOptions { port: i32::from(port), max_batch_size: 8, max_new_tokens: 8 },
            priority: 0,
            scheduling: Default::default(),
            rollout: RolloutSpec::default(),
        },
    }
}

/// An [`InferenceService`] being built; see [`inference_service`].
#[derive(Clone, Debug)]
pub struct InferenceServiceBuilder {
    name: String,
    spec: InferenceServiceSpec,
}

impl InferenceServiceBuilder {
    /// Replicas to serve.
    pub fn replicas(mut self, replicas: i32) -> Self {
        self.spec.replicas = replicas;
        self
    }

    /// Requests batched together at most.
    pub fn max_batch_size(mut self, size: i32) -> Self {
        self.spec.serving.max_batch_size = size;
        self
    }

    /// The service's priority.
    pub fn priority(mut self, priority: i32) -> Self {
        self.spec.priority = priority;
        self
    }

    /// Seconds a replica being replaced keeps serving after it leaves the EndpointSlices.
    pub fn drain_seconds(mut self, seconds: i32) -> Self {
        self.spec.rollout.drain_seconds = seconds;
        self
    }

    /// The service.
    pub fn build(self) -> InferenceService {
        InferenceService::new(&self.name, self.spec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The builder's defaults are what the API server's defaulting gives a minimal manifest.
    #[test]
    fn a_default_job_equals_the_minimal_manifest() {
        let parsed: TrainingJob = serde_json::from_value(json!({
            "apiVersion": "flotilla.dev/v1alpha1", "kind": "TrainingJob",
            "metadata": {"name": "j"},
            "spec": {"workers": 1, "gpusPerWorker": 1, "command": {"command": ["/bin/true"]},
                     "restartPolicy": {"maxRestarts": 0}}
        }))
        .expect("job");
        assert_eq!(training_job("j").build(), parsed);
    }
}
