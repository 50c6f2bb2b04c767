//! Flotilla's integration and end-to-end tests, one binary with one module per area:
//!
//! ```text
//! cargo build --workspace --bins                        # the binaries the rigs start
//! cargo test -p flotilla-tests --test e2e               # everything (about 15 minutes)
//! cargo test -p flotilla-tests --test e2e gpu_fault::   # one module
//! ```
//!
//! Each module gets a control plane of its own (`control_plane_for(module_path!())`), started on its
//! first test and stopped after its last: the operators the tests start watch every namespace
//! and the agents' `GpuNode`s are cluster-scoped, so two modules on one API server would act on
//! each other's objects. Tests of one module share it, each in a namespace of its own. Rigs that
//! run real workers take turns (see `flotilla_tests::rig`), so two of them never share the
//! machine; the rest runs beside them on libtest's threads.

mod agent_kill;
mod api_validation;
mod controlplane;
mod deploy_manifests;
mod gpu_fault;
mod hang;
mod images;
mod inference;
mod inference_preemption;
mod install;
mod kubectl_plugin;
mod leader_failover;
mod loan;
mod malformed_objects;
mod node;
mod nvml_backend;
mod operator_core;
mod operator_kill;
mod operator_kill_restart;
mod outage;
mod preemption;
mod prometheus;
mod rbac;
mod restart;
mod scale;
mod scheduling;
mod straggler;
mod worker_kill;
