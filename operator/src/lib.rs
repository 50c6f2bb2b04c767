//! The Flotilla operator: the `flotilla.dev` API, the job state machine and the controllers.

pub mod admin;
pub mod agents;
pub mod cli;
pub mod controller;
pub mod crd;
pub mod endpoints;
pub mod error;
pub mod http;
pub mod ids;
pub mod leader;
pub mod lifecycle;
pub mod metrics;
pub mod metrics_collect;
pub mod placement;
pub mod plugin;
pub mod validate;
pub mod workers;
