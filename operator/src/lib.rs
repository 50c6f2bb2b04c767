//! The Flotilla operator: the `flotilla.dev` API, the job state machine and the controllers.

pub mod admin;
pub mod agent_fleet;
pub mod agents;
pub mod cli;
pub mod controller;
pub mod crd;
pub mod endpoints;
pub mod error;
pub mod fleet;
pub mod leader;
pub mod lifecycle;
pub mod metrics;
pub mod metrics_collect;
pub mod plugin;
pub mod scheduling;
pub mod validate;
