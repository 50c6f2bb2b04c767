//! Support for Flotilla's integration and end-to-end tests (the `e2e` test binary) and for the
//! examples that measure a real fleet: a real Kubernetes control plane per scope, fresh
//! namespaces, the workspace's binaries as child processes (operator, agents with simulated
//! GPUs, workers), and builders for the custom resources.
//!
//! ```no_run
//! # async fn example() -> anyhow::Result<()> {
//! let cp = flotilla_tests::control_plane_for(module_path!()).await;
//! flotilla_tests::install_crds(&cp)?;
//! let client = cp.client().await?;
//! let ns = flotilla_tests::namespace(&client, "smoke").await?;
//! # Ok(()) }
//! ```

pub mod backend;
pub mod binaries;
pub mod builders;
pub mod control_plane;
pub mod fleet;
pub mod kubectl;
pub mod ledger;
pub mod namespace;
pub mod node;
pub mod operator;
pub mod ports;
pub mod process;
pub mod proxy;
pub mod rig;
pub mod serving;
pub mod wait;

pub use backend::{AgentGpus, Backend, Fault, clear_at};
pub use binaries::{binary, operator_binary, workspace};
pub use builders::{inference_service, tiny_engine_job, training_job};
pub use control_plane::{
    ControlPlane, control_plane, control_plane_for, control_plane_with_pods_for,
    controlplane_bin_dir,
};
pub use fleet::Fleet;
pub use kubectl::{install_crds, kubectl, kubectl_flotilla};
pub use ledger::{LedgerLine, assert_no_overlap, parse_ledger_line, read_ledger};
pub use namespace::namespace;
pub use node::{Image, Node, build_images, pod_report};
pub use operator::Operator;
pub use ports::{free_port, master_port_base, serving_port_base};
pub use process::{LeaseAccess, Process, inject_xid_at, start_agent, start_agent_on, walk};
pub use proxy::Proxy;
pub use rig::Rig;
pub(crate) use rig::RigTurn;
pub use serving::ServingRig;
pub use wait::{WAIT, eventually};
