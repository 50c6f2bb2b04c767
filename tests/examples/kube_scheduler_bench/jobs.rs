//! The workloads: the jobs both schedulers are given, in order.

use crate::GPUS;
use crate::args::{Args, Variant};
use crate::workload;
use anyhow::{Context as _, bail};
use flotilla_operator::crd::training_job::{RestartPolicy, WorkerCommand};
use flotilla_operator::crd::{GpuNode, TrainingJob, TrainingJobSpec};
use flotilla_proto::v1 as pb;
use flotilla_proto::v1::agent_service_client::AgentServiceClient;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Container, Node, Pod, PodSpec, ResourceRequirements};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::api::{Api, DeleteParams, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use pb::agent_message::Body as Up;
use pb::operator_message::Body as Down;
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;

/// One job: `workers` × `gpus` GPUs.
#[derive(Clone, Debug)]
pub(crate) struct Job {
    name: String,
    workers: u32,
    gpus: u32,
}

/// The jobs of `variant`, the same for both schedulers.
pub(crate) fn workload(args: &Args, variant: Variant) -> Vec<Job> {
    let budget = (args.nodes as f64 * f64::from(GPUS) * args.fill).floor() as u64;
    let most = args.jobs.unwrap_or(usize::MAX);
    match variant {
        Variant::Single => (0..budget.min(most as u64))
            .map(|i| Job { name: format!("job-{i:05}"), workers: 1, gpus: 1 })
            .collect(),
        Variant::Mixed => {
            let mut rng = workload::Rng::new(args.seed);
            let mut used = 0u64;
            let mut jobs = Vec::new();
            for arrival in workload::jobs(&mut rng) {
                let (workers, gpus) = (arrival.request.workers, arrival.request.gpus_per_worker);
                let need = u64::from(workers * gpus);
                if used + need > budget {
                    continue;
                }
                used += need;
                jobs.push(Job { name: format!("job-{:05}", jobs.len()), workers, gpus });
                if jobs.len() == most || used == budget {
                    break;
                }
            }
            jobs
        }
    }
}

/// The check workload: one 8-GPU worker per node.
pub(crate) fn check_workload(nodes: usize) -> Vec<Job> {
    (0..nodes).map(|i| Job { name: format!("check-{i:05}"), workers: 1, gpus: GPUS }).collect()
}

pub(crate) fn node_name(i: usize) -> String {
    format!("node-{i:04}")
}
