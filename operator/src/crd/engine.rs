//! The engine configuration embedded in `TrainingJob.spec.engine`.
//!
//! One source of truth: the engine crate's own type, so `kubectl apply` and `flotilla-worker`
//! validate the same thing. The API server checks its schema; the operator runs
//! [`EngineConfig::validate`] for the rules a schema cannot express and reports them as
//! `Valid=False`.

pub use flotilla_engine::config::EngineConfig;
