//! The gRPC server agents dial: one stream per agent, mTLS, node name bound to the certificate.
//!
//! A stream that sends something malformed or oversized is closed with an error naming the
//! problem; other streams are untouched (each stream is its own task, and per-node state has its
//! own lock).

use super::convert;
use super::identity::cert_names_node;
use super::state::{NodeRegistry, lock};
use flotilla_proto::v1 as pb;
use flotilla_proto::v1::agent_service_server::{AgentService, AgentServiceServer};
use pb::agent_message::Body as Up;
use pb::operator_message::Body as Down;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

/// Timing and limits of the agent server.
#[derive(Clone, Debug)]
pub struct AgentServerConfig {
    /// How often agents send heartbeats.
    pub heartbeat_interval: Duration,
    /// Silent this long → the agent is lost.
    pub heartbeat_timeout: Duration,
    /// Agents kill their workers after this long without the operator.
    pub fence_timeout: Duration,
    /// Largest accepted message.
    pub max_message_bytes: usize,
    /// How long a new stream may take to send its registration.
    pub register_timeout: Duration,
    /// Whether a client certificate must name the registering node (off only for plaintext
    /// benchmarks).
    pub require_client_identity: bool,
}

impl Default for AgentServerConfig {
    fn default() -> Self {
        Self {
            heartbeat_interval: Duration::from_secs(5),
            heartbeat_timeout: Duration::from_secs(20),
            fence_timeout: Duration::from_secs(60),
            max_message_bytes: flotilla_proto::MAX_MESSAGE_BYTES,
            register_timeout: Duration::from_secs(10),
            require_client_identity: true,
        }
    }
}

/// Whether this operator serves agents: only the lease holder does. Wire it to leader election;
/// turning it off closes open streams with UNAVAILABLE so agents reconnect to the new leader.
#[derive(Clone, Debug)]
pub struct ServingGate(Arc<watch::Sender<bool>>);

impl ServingGate {
    /// A gate that starts open or closed.
    pub fn new(serving: bool) -> Self {
        Self(Arc::new(watch::channel(serving).0))
    }
    /// Opens or closes the gate.
    pub fn set(&self, serving: bool) {
        self.0.send_replace(serving);
    }
    /// Whether it is open.
    pub fn is_serving(&self) -> bool {
        *self.0.borrow()
    }
}

/// What to do with a GPU.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GpuAction {
    /// Take it out of use.
    Cordon,
    /// Put it back.
    Uncordon,
    /// Run validation; a Failed GPU that passes turns Healthy.
    Validate,
    /// Mark it Degraded (`SlowSteps`) with this evidence, until validation passes.
    Suspect(String),
}

/// What a worker event says happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WorkerPhase {
    /// Spawned and running.
    Started,
    /// Running, with progress attached.
    Progress,
    /// Exited; see the exit code or signal.
    Exited,
    /// The agent refused or failed to start it.
    FailedToStart,
    /// A phase this operator does not know (a newer agent); changes nothing.
    Unspecified,
}

impl From<pb::WorkerPhase> for WorkerPhase {
    fn from(p: pb::WorkerPhase) -> Self {
        match p {
            pb::WorkerPhase::Started => WorkerPhase::Started,
            pb::WorkerPhase::Progress => WorkerPhase::Progress,
            pb::WorkerPhase::Exited => WorkerPhase::Exited,
            pb::WorkerPhase::FailedToStart => WorkerPhase::FailedToStart,
            pb::WorkerPhase::Unspecified => WorkerPhase::Unspecified,
        }
    }
}

/// A worker event an agent reported (the operator's workers module folds these into job status).
#[derive(Clone, Debug, PartialEq)]
pub struct WorkerReport {
    /// Node.
    pub node: String,
    /// Job UID.
    pub job_uid: String,
    /// Attempt.
    pub attempt: u64,
    /// Rank.
    pub rank: u32,
    /// What happened.
    pub phase: WorkerPhase,
    /// Exit code.
    pub exit_code: Option<i32>,
    /// Signal.
    pub signal: Option<i32>,
    /// Detail.
    pub message: String,
    /// Training progress, with [`WorkerPhase::Progress`] when the worker is training (a line
    /// that only says what it does instead carries none).
    pub progress: Option<crate::crd::Progress>,
    /// What the rank does and how long its steps take, with [`WorkerPhase::Progress`].
    pub pace: Option<super::RankPace>,
}

type Outbound = mpsc::Sender<Result<pb::OperatorMessage, Status>>;

struct Inner {
    registry: Arc<NodeRegistry>,
    config: AgentServerConfig,
    gate: ServingGate,
    links: Mutex<HashMap<String, (u64, Outbound)>>,
    pending: Mutex<HashMap<u64, oneshot::Sender<pb::CommandResult>>>,
    next_command: AtomicU64,
    worker_reports: tokio::sync::broadcast::Sender<WorkerReport>,
}

/// The agent-facing service. Cheap to clone.
#[derive(Clone)]
pub struct AgentServer(Arc<Inner>);

impl std::fmt::Debug for AgentServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentServer").field("config", &self.0.config).finish()
    }
}

impl AgentServer {
    /// A server feeding `registry`; `gate` says whether it serves.
    pub fn new(registry: Arc<NodeRegistry>, config: AgentServerConfig, gate: ServingGate) -> Self {
        Self(Arc::new(Inner {
            registry,
            config,
            gate,
            links: Mutex::default(),
            pending: Mutex::default(),
            next_command: AtomicU64::new(1),
            worker_reports: tokio::sync::broadcast::channel(1024).0,
        }))
    }

    /// The gate this server obeys.
    pub fn gate(&self) -> &ServingGate {
        &self.0.gate
    }

    /// The node registry this server feeds.
    pub fn registry(&self) -> &Arc<NodeRegistry> {
        &self.0.registry
    }

    /// The tonic service with message-size limits applied.
    pub fn service(&self) -> AgentServiceServer<AgentServer> {
        AgentServiceServer::new(self.clone())
            .max_decoding_message_size(self.0.config.max_message_bytes)
            .max_encoding_message_size(self.0.config.max_message_bytes)
    }

    /// Worker events from every agent.
    pub fn worker_reports(&self) -> tokio::sync::broadcast::Receiver<WorkerReport> {
        self.0.worker_reports.subscribe()
    }

    /// A fresh command id.
    pub(super) fn next_command_id(&self) -> u64 {
        self.0.next_command.fetch_add(1, Ordering::Relaxed)
    }

    /// Sends a GPU command to the node's agent and waits for its result (`Ok(message)` when the
    /// agent reports success).
    pub async fn gpu_command(
        &self,
        node: &str,
        gpu_uuid: &str,
        action: GpuAction,
        timeout: Duration,
    ) -> Result<String, String> {
        let (action, evidence) = match action {
            GpuAction::Cordon => (pb::GpuAction::Cordon, String::new()),
            GpuAction::Uncordon => (pb::GpuAction::Uncordon, String::new()),
            GpuAction::Validate => (pb::GpuAction::Validate, String::new()),
            GpuAction::Suspect(evidence) => (pb::GpuAction::Suspect, evidence),
        };
        let command_id = self.0.next_command.fetch_add(1, Ordering::Relaxed);
        let body = Down::GpuCommand(pb::GpuCommand {
            command_id,
            gpu_uuid: gpu_uuid.to_owned(),
            action: action as i32,
            evidence,
        });
        self.call(node, command_id, body, timeout).await
    }

    /// Sends a command to a node's agent and waits for its `CommandResult`.
    pub(super) async fn call(
        &self,
        node: &str,
        command_id: u64,
        body: Down,
        timeout: Duration,
    ) -> Result<String, String> {
        let tx = self
            .0
            .links
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(node)
            .map(|(_, tx)| tx.clone())
            .ok_or_else(|| format!("node {node}: no agent stream is open"))?;
        let (done, wait) = oneshot::channel();
        self.0.pending.lock().unwrap_or_else(|e| e.into_inner()).insert(command_id, done);
        let sent = tx.send(Ok(pb::OperatorMessage { body: Some(body) })).await;
        let outcome = match sent {
            Err(_) => Err(format!("node {node}: the agent stream closed")),
            Ok(()) => match tokio::time::timeout(timeout, wait).await {
                Ok(Ok(r)) if r.ok => Ok(r.message),
                Ok(Ok(r)) => Err(r.message),
                Ok(Err(_)) => Err(format!("node {node}: the agent stream closed before answering")),
                Err(_) => Err(format!("node {node}: no answer within {timeout:?}")),
            },
        };
        self.0.pending.lock().unwrap_or_else(|e| e.into_inner()).remove(&command_id);
        outcome
    }

    /// Marks agents silent past the heartbeat timeout as lost, every quarter timeout, forever.
    pub async fn sweep_lost_agents(self) {
        let every = self.0.config.heartbeat_timeout / 4;
        loop {
            tokio::time::sleep(every).await;
            for node in self.0.registry.sweep(self.0.config.heartbeat_timeout) {
                tracing::warn!(%node, timeout = ?self.0.config.heartbeat_timeout, "agent lost: no heartbeat; its GPUs leave the pool");
            }
        }
    }
}

/// Completes once the gate is closed.
async fn gate_closed(gate: &mut watch::Receiver<bool>) {
    loop {
        if !*gate.borrow_and_update() {
            return;
        }
        if gate.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

// === impl AgentService ===

#[tonic::async_trait]
impl AgentService for AgentServer {
    type LinkStream = ReceiverStream<Result<pb::OperatorMessage, Status>>;

    async fn link(
        &self,
        request: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<Self::LinkStream>, Status> {
        let inner = &self.0;
        if !inner.gate.is_serving() {
            return Err(Status::unavailable("this operator does not hold the leader lease; retry"));
        }
        let peer_cert = request.peer_certs().and_then(|certs| certs.first().cloned());
        let peer_ip = request.remote_addr().map(|a| a.ip().to_canonical());
        let mut inbound = request.into_inner();
        let first =
            tokio::time::timeout(inner.config.register_timeout, inbound.message()).await.map_err(
                |_| Status::deadline_exceeded("register: expected within the registration timeout"),
            )??;
        let register = match first {
            Some(pb::AgentMessage { body: Some(Up::Register(r)) }) => r,
            Some(_) => {
                return Err(Status::invalid_argument("agent_message: expected register first"));
            }
            None => {
                return Err(Status::invalid_argument(
                    "agent_message: stream ended before register",
                ));
            }
        };
        match &peer_cert {
            Some(cert) => {
                cert_names_node(cert, &register.node_name).map_err(Status::permission_denied)?
            }
            None if inner.config.require_client_identity => {
                return Err(Status::unauthenticated(
                    "client certificate: expected one naming the node, got none",
                ));
            }
            None => {}
        }
        let mut record = convert::register(&register).map_err(Status::invalid_argument)?;
        // A loopback peer says nothing other hosts could use (one-host setups fall back to the
        // operator's --worker-master-addr).
        if record.address.is_none() {
            record.address = peer_ip.filter(|ip| !ip.is_loopback()).map(|ip| ip.to_string());
        }
        let node = record.node.clone();
        inner.registry.set_admin_url(&node, &register.admin_url);
        let reg = inner.registry.register(record);
        tracing::info!(%node, instance = %register.instance_id, gpus = register.gpus.len(), acked = reg.applied_seq, "agent registered");

        let (tx, rx) = mpsc::channel(64);
        let registered = pb::Registered {
            heartbeat_interval_ms: inner.config.heartbeat_interval.as_millis() as u64,
            fence_timeout_ms: inner.config.fence_timeout.as_millis() as u64,
            acked_critical_seq: reg.applied_seq,
        };
        // The channel is fresh and has room; this cannot fail.
        let _ = tx.try_send(Ok(pb::OperatorMessage { body: Some(Down::Registered(registered)) }));
        inner
            .links
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(node.clone(), (reg.session, tx.clone()));
        let server = self.clone();
        tokio::spawn(async move {
            let end = server.pump(&node, &reg.cell, reg.session, &mut inbound, &tx).await;
            if let Err(status) = end {
                tracing::warn!(%node, code = ?status.code(), message = status.message(), "agent stream closed with an error");
                let _ = tx.send(Err(status)).await;
            }
            let mut links = server.0.links.lock().unwrap_or_else(|e| e.into_inner());
            if links.get(&node).is_some_and(|(s, _)| *s == reg.session) {
                links.remove(&node);
            }
            drop(links);
            server.0.registry.disconnected(&node, reg.session);
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

impl AgentServer {
    /// Applies one stream's messages until it ends, errs, is superseded or leadership is lost.
    async fn pump(
        &self,
        node: &str,
        cell: &super::state::NodeCell,
        session: u64,
        inbound: &mut Streaming<pb::AgentMessage>,
        tx: &Outbound,
    ) -> Result<(), Status> {
        let inner = &self.0;
        let mut gate = inner.gate.0.subscribe();
        loop {
            let msg = tokio::select! {
                msg = inbound.message() => msg?,
                _ = gate_closed(&mut gate) => {
                    return Err(Status::unavailable("this operator lost the leader lease; reconnect"));
                }
            };
            let Some(msg) = msg else { return Ok(()) };
            let body = msg.body.ok_or_else(|| Status::invalid_argument("agent_message.body: expected one of register, heartbeat, health, critical, worker, command_result; got none"))?;
            let ack = {
                let mut rec = lock(cell);
                if rec.session != session {
                    return Err(Status::aborted("superseded by a newer stream from the same node"));
                }
                rec.last_heard = std::time::Instant::now();
                let was_lost = std::mem::replace(&mut rec.lost, false);
                rec.connected = true;
                if was_lost {
                    inner.registry.bump();
                }
                match body {
                    Up::Register(_) => {
                        return Err(Status::invalid_argument(
                            "agent_message.register: expected once, at the start of the stream",
                        ));
                    }
                    Up::Heartbeat(hb) => Some((rec.applied_seq, hb.sent_at_unix_nanos)),
                    Up::Health(report) => {
                        convert::apply_health(&mut rec, &report);
                        None
                    }
                    Up::Critical(event) => {
                        match convert::apply_critical(&mut rec, &event) {
                            Ok(true) => {
                                tracing::info!(%node, gpu = %event.gpu_uuid, seq = event.seq, xid = event.xid, reason = ?rec.last_fault.as_ref().map(|f| &f.reason), "critical event applied");
                                inner.registry.bump();
                            }
                            Ok(false) => {}
                            Err(e) => {
                                // Refused, but acknowledged: resending it would fail the same way.
                                tracing::warn!(%node, seq = event.seq, error = %e, "critical event refused");
                                rec.applied_seq = rec.applied_seq.max(event.seq);
                            }
                        }
                        Some((rec.applied_seq, 0))
                    }
                    Up::Worker(w) => {
                        let r = w.worker.unwrap_or_default();
                        let phase = pb::WorkerPhase::try_from(w.phase)
                            .map_or(WorkerPhase::Unspecified, WorkerPhase::from);
                        let (progress, pace) =
                            w.progress.as_ref().map(super::progress::progress_of).unzip();
                        let _ = inner.worker_reports.send(WorkerReport {
                            node: node.to_owned(),
                            job_uid: r.job_uid,
                            attempt: r.attempt,
                            rank: r.rank,
                            phase,
                            exit_code: w.exit_code,
                            signal: w.signal,
                            message: w.message,
                            progress: progress.flatten(),
                            pace,
                        });
                        None
                    }
                    Up::CommandResult(result) => {
                        if let Some(done) = inner
                            .pending
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .remove(&result.command_id)
                        {
                            let _ = done.send(result);
                        }
                        None
                    }
                }
            };
            if let Some((critical_seq, heartbeat_sent_at_unix_nanos)) = ack
                && tx
                    .send(Ok(pb::OperatorMessage {
                        body: Some(Down::Ack(pb::Ack {
                            critical_seq,
                            heartbeat_sent_at_unix_nanos,
                        })),
                    }))
                    .await
                    .is_err()
            {
                return Ok(()); // the agent went away
            }
        }
    }
}
