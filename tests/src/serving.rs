//! Helpers of the serving end-to-end test: the operator and three agents with simulated GPUs as
//! real processes, and a client that streams completion requests through the endpoints the
//! operator publishes in EndpointSlices.

use crate::binaries::{binary, operator_binary};
use crate::operator::Operator;
use crate::ports::{free_port, master_port_base};
use crate::process::{LeaseAccess, Process, append_worker_logs, inject_xid_at, start_agent};
use crate::wait::{WAIT, eventually};
use crate::{ControlPlane, RigTurn};
use flotilla_operator::crd::GpuNode;
use flotilla_operator::endpoints;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ListParams};
use std::collections::BTreeMap;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The operator and `n` agents (4 simulated GPUs each, admin servers on known ports).
pub struct ServingRig {
    /// The operator.
    pub operator: Operator,
    /// Agents and their admin ports.
    pub agents: Vec<(Process, u16)>,
    /// Logs, checkpoints, sockets.
    pub dir: tempfile::TempDir,
    /// Last, so that it is released after every process above is gone.
    _turn: RigTurn,
}

impl ServingRig {
    /// Start everything and wait until every agent's GpuNode shows 4 healthy GPUs.
    pub async fn start(
        cp: &ControlPlane,
        ns: &str,
        client: &kube::Client,
        agents: usize,
    ) -> ServingRig {
        let turn = RigTurn::take().await;
        let dir = tempfile::tempdir().expect("tempdir");
        let worker = binary("flotilla-worker", "flotilla-engine");
        let agent_port = free_port();
        let log = dir.path().join("operator.log");
        let file = std::fs::File::create(&log).expect("operator log");
        let child = Command::new(operator_binary())
            .arg("run")
            .env("KUBECONFIG", cp.kubeconfig())
            .env("FLOTILLA_ADMIN_ADDR", "127.0.0.1:0")
            .env("FLOTILLA_IDENTITY", format!("op-{ns}"))
            .env("FLOTILLA_LEASE_NAMESPACE", ns)
            .env("FLOTILLA_LEASE_DURATION_SECONDS", "4")
            .env("FLOTILLA_LEASE_RENEW_SECONDS", "1")
            .env("FLOTILLA_LOG", "info,flotilla_operator=debug,kube=warn")
            .env("FLOTILLA_AGENT_LISTEN", format!("127.0.0.1:{agent_port}"))
            .env("FLOTILLA_AGENT_INSECURE", "true")
            .env("FLOTILLA_WORKER_BINARY", &worker)
            .env("FLOTILLA_CHECKPOINT_ROOT", dir.path().join("checkpoints"))
            // Every agent runs on this host, whose nodes report no address; EndpointSlices
            // refuse loopback addresses, so replicas are reached at the host's own address.
            .env("FLOTILLA_WORKER_MASTER_ADDR", host_address())
            .env("FLOTILLA_WORKER_STOP_GRACE_SECONDS", "10")
            .env("FLOTILLA_MASTER_PORT_BASE", master_port_base())
            .stdout(file.try_clone().expect("log"))
            .stderr(file)
            .spawn()
            .expect("starting flotilla-operator");
        let operator = Operator { child, identity: format!("op-{ns}"), log };
        let agents = (0..agents)
            .map(|i| {
                let admin = free_port();
                let name = format!("{ns}-{}", (b'a' + i as u8) as char);
                let lease =
                    LeaseAccess { kubeconfig: cp.kubeconfig().into(), namespace: ns.to_owned() };
                (start_agent(&name, agent_port, admin, dir.path(), &lease), admin)
            })
            .collect();
        let rig = ServingRig { operator, agents, dir, _turn: turn };
        let nodes: Api<GpuNode> = Api::all(client.clone());
        for (agent, _) in &rig.agents {
            let name = agent.node.clone();
            eventually(WAIT, &format!("GpuNode {name} with 4 healthy GPUs"), || async {
                let n = nodes.get_opt(&name).await.ok()??;
                (n.status?.healthy_gpus == 4).then_some(())
            })
            .await
            .unwrap_or_else(|e| panic!("{e}\n{}", rig.logs()));
        }
        rig
    }

    /// The admin port of `node`'s agent.
    pub fn admin_port(&self, node: &str) -> u16 {
        self.agents.iter().find(|(p, _)| p.node == node).expect("agent of the node").1
    }

    /// Injects XID `xid` into GPU `gpu` of `node` through its agent's admin server.
    pub fn inject_xid(&self, node: &str, gpu: i32, xid: u32) {
        inject_xid_at(self.admin_port(node), gpu, xid);
    }

    /// Every log: operator, agents, workers.
    pub fn logs(&self) -> String {
        let mut all = format!("operator:\n{}", self.operator.log());
        for (a, _) in &self.agents {
            all.push_str(&format!("\n{}:\n{}", a.log.display(), a.log()));
        }
        append_worker_logs(&mut all, self.dir.path());
        all
    }
}

/// This host's first IPv4 address outside loopback (from `hostname -I`).
pub fn host_address() -> String {
    let out = Command::new("hostname").arg("-I").output().expect("hostname -I");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|a| a.parse::<std::net::Ipv4Addr>().ok())
        .find(|a| !a.is_loopback() && !a.is_link_local())
        .map(|a| a.to_string())
        .expect("a non-loopback IPv4 address on this host (EndpointSlices refuse loopback)")
}

/// `host:port` of every endpoint the service's EndpointSlices list as ready.
pub async fn ready_endpoints(slices: &Api<EndpointSlice>, service: &str) -> Option<Vec<String>> {
    let selector = format!("{}={service}", endpoints::SERVICE_NAME_LABEL);
    let list = slices.list(&ListParams::default().labels(&selector)).await.ok()?;
    let mut out = Vec::new();
    for slice in list {
        let Some(port) = slice.ports.as_ref().and_then(|p| p.first()?.port) else { continue };
        for e in slice.endpoints.iter().flatten() {
            if e.conditions.as_ref().and_then(|c| c.ready) == Some(true) {
                for a in &e.addresses {
                    out.push(format!("{a}:{port}"));
                }
            }
        }
    }
    out.sort();
    Some(out)
}

/// Which part of the test a request was sent in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Window {
    /// Before the fault.
    Steady = 0,
    /// From the fault's injection until 3 replicas serve again.
    Fault = 1,
    /// Between the fault's repair and the rollout.
    Between = 2,
    /// From the spec change until the rollout completes.
    Rollout = 3,
    /// While a spec with a checkpoint that does not exist is tried and refused.
    BadModel = 4,
    /// While the rollout stays refused, from an XID 79 on a serving replica until it is
    /// replaced with the last good revision.
    BadModelFault = 5,
    /// While the service scales down and up.
    Scale = 6,
    /// At the end.
    After = 7,
}

impl Window {
    fn from_u8(v: u8) -> Window {
        match v {
            0 => Window::Steady,
            1 => Window::Fault,
            2 => Window::Between,
            3 => Window::Rollout,
            4 => Window::BadModel,
            5 => Window::BadModelFault,
            6 => Window::Scale,
            _ => Window::After,
        }
    }
}

/// What the client saw in one window.
#[derive(Clone, Debug, Default)]
pub struct Counts {
    /// Requests sent.
    pub sent: u64,
    /// Requests answered with a completion.
    pub succeeded: u64,
    /// Requests retried once on another endpoint after a connection failure.
    pub retried: u64,
    /// Failed requests, with why.
    pub failures: Vec<String>,
}

/// A client sending a steady stream of completion requests through the endpoints listed in
/// the EndpointSlices, re-read every 100 ms; on a connection failure it retries once on
/// another endpoint.
pub struct Client {
    /// The current window, set by the test.
    pub window: Arc<AtomicU8>,
    /// The endpoints the client uses now.
    pub endpoints: Arc<Mutex<Vec<String>>>,
    counts: Arc<Mutex<BTreeMap<Window, Counts>>>,
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// Tokens asked for per request.
const MAX_TOKENS: u32 = 4;
/// How long one request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

impl Client {
    /// Start `streams` concurrent request loops against `service`'s endpoints, once the slices
    /// list a ready one.
    pub async fn start(slices: Api<EndpointSlice>, service: &str, streams: usize) -> Client {
        let window = Arc::new(AtomicU8::new(Window::Steady as u8));
        let first = eventually(WAIT, "a ready endpoint in the slices", || async {
            ready_endpoints(&slices, service).await.filter(|e| !e.is_empty())
        })
        .await
        .expect("the slices list a ready endpoint");
        let endpoints = Arc::new(Mutex::new(first));
        let counts: Arc<Mutex<BTreeMap<Window, Counts>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        let (list, halt, name) = (endpoints.clone(), stop.clone(), service.to_string());
        tasks.push(tokio::spawn(async move {
            while !halt.load(Ordering::Relaxed) {
                if let Some(eps) = ready_endpoints(&slices, &name).await {
                    *list.lock().unwrap() = eps;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }));
        for stream in 0..streams {
            let (list, halt) = (endpoints.clone(), stop.clone());
            let (window, counts) = (window.clone(), counts.clone());
            tasks.push(tokio::spawn(async move {
                let mut turn = stream;
                while !halt.load(Ordering::Relaxed) {
                    let eps = list.lock().unwrap().clone();
                    let w = Window::from_u8(window.load(Ordering::Relaxed));
                    turn += 1;
                    let outcome = if eps.is_empty() {
                        Err("no ready endpoint listed".to_string())
                    } else {
                        one_request(&eps, turn, &counts, w).await
                    };
                    {
                        let mut c = counts.lock().unwrap();
                        let entry = c.entry(w).or_default();
                        entry.sent += 1;
                        match outcome {
                            Ok(()) => entry.succeeded += 1,
                            Err(why) => entry.failures.push(why),
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }));
        }
        Client { window, endpoints, counts, stop, tasks }
    }

    /// Enter `w`.
    pub fn enter(&self, w: Window) {
        self.window.store(w as u8, Ordering::Relaxed);
    }

    /// Stop and return what each window saw.
    pub async fn finish(self) -> BTreeMap<Window, Counts> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            let _ = t.await;
        }
        self.counts.lock().unwrap().clone()
    }

    /// What each window saw so far.
    pub fn snapshot(&self) -> BTreeMap<Window, Counts> {
        self.counts.lock().unwrap().clone()
    }
}

async fn one_request(
    eps: &[String],
    turn: usize,
    counts: &Mutex<BTreeMap<Window, Counts>>,
    w: Window,
) -> Result<(), String> {
    let first = &eps[turn % eps.len()];
    let started = Instant::now();
    match endpoints::complete(first, "The fleet", MAX_TOKENS, REQUEST_TIMEOUT).await {
        Ok(_) => Ok(()),
        Err(e) if e.starts_with("connecting to") && eps.len() > 1 => {
            counts.lock().unwrap().entry(w).or_default().retried += 1;
            let second = &eps[(turn + 1) % eps.len()];
            endpoints::complete(second, "The fleet", MAX_TOKENS, REQUEST_TIMEOUT)
                .await
                .map(drop)
                .map_err(|e2| format!("{e}; retry on {second}: {e2}"))
        }
        Err(e) => Err(format!("{e} (after {:?})", started.elapsed())),
    }
}
