//! The agent's side of the `flotilla.agent.v1` stream: connect, register, stream health and
//! events, obey commands; reconnect with jittered backoff; fence workers when cut off too long.

use crate::convert;
use crate::core::AgentCore;
use crate::supervisor::{WorkerSupervisor, WorkerUpdate};
use backon::BackoffBuilder;
use flotilla_proto::v1 as pb;
use flotilla_proto::v1::agent_service_client::AgentServiceClient;
use pb::agent_message::Body as Up;
use pb::operator_message::Body as Down;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// Errors of the link.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// A certificate or key file could not be read.
    #[error("reading {what} from {path}: {source}")]
    ReadFile {
        /// Which file ("CA certificate", …).
        what: &'static str,
        /// Its path.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The endpoint or TLS settings are invalid.
    #[error("operator endpoint {endpoint}: {detail}")]
    Endpoint {
        /// The configured endpoint.
        endpoint: String,
        /// What is wrong.
        detail: String,
    },
    /// Connecting failed.
    #[error("connecting to {endpoint}: {detail}")]
    Connect {
        /// The endpoint.
        endpoint: String,
        /// Transport detail.
        detail: String,
    },
    /// The operator refused or ended the stream.
    #[error("stream: {0}")]
    Stream(#[from] tonic::Status),
    /// The operator broke the protocol.
    #[error("protocol: {0}")]
    Protocol(String),
}

/// Client certificate files for mTLS.
#[derive(Clone, Debug)]
pub struct ClientTlsFiles {
    /// CA that signed the operator's certificate.
    pub ca: std::path::PathBuf,
    /// This node's certificate.
    pub cert: std::path::PathBuf,
    /// This node's key.
    pub key: std::path::PathBuf,
    /// Name the operator's certificate must carry.
    pub server_name: String,
}

/// How the link behaves.
#[derive(Clone, Debug)]
pub struct LinkConfig {
    /// Operator URL, e.g. `https://127.0.0.1:7443`.
    pub endpoint: String,
    /// mTLS files; `None` for plaintext (tests and benchmarks only).
    pub tls: Option<ClientTlsFiles>,
    /// First reconnect delay.
    pub backoff_min: Duration,
    /// Largest reconnect delay.
    pub backoff_max: Duration,
    /// Kill workers after this long without reaching the operator (the operator's value from
    /// `Registered` replaces it once connected).
    pub fence_timeout: Duration,
    /// What the agent tells the operator about its node when it registers.
    pub advertise: Advertise,
    /// The node's Lease on the API server ([`crate::lease`]); `None`: the operator is the only
    /// contact, and its outage fences the node.
    pub lease: Option<crate::lease::LeaseConfig>,
}

/// Addresses the agent reports when it registers; empty ones are left to the operator.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Advertise {
    /// The admin server's URL as others reach it (the GpuNode's `status.adminUrl`).
    pub admin_url: String,
    /// The IP address workers on this node are reached at (the GpuNode's `status.address`);
    /// empty: the operator uses the address the agent's connection comes from.
    pub node_address: String,
}

fn read(what: &'static str, path: &std::path::Path) -> Result<Vec<u8>, LinkError> {
    std::fs::read(path).map_err(|source| LinkError::ReadFile {
        what,
        path: path.display().to_string(),
        source,
    })
}

/// Builds the endpoint (with mTLS when configured).
pub fn endpoint(config: &LinkConfig) -> Result<Endpoint, LinkError> {
    let bad = |detail: String| LinkError::Endpoint { endpoint: config.endpoint.clone(), detail };
    let mut ep = Endpoint::from_shared(config.endpoint.clone())
        .map_err(|e| bad(e.to_string()))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5));
    if let Some(tls) = &config.tls {
        let ca = Certificate::from_pem(read("CA certificate", &tls.ca)?);
        let identity = Identity::from_pem(
            read("client certificate", &tls.cert)?,
            read("client key", &tls.key)?,
        );
        let tls = ClientTlsConfig::new()
            .ca_certificate(ca)
            .identity(identity)
            .domain_name(tls.server_name.clone());
        ep = ep.tls_config(tls).map_err(|e| bad(e.to_string()))?;
    }
    Ok(ep)
}

/// When this agent last knew it was in contact — an acknowledged heartbeat to the operator or a
/// renewed Lease on the API server, counted from when it *sent* that heartbeat or renewal (never
/// later than when the other side saw it) — and the fence timeout now in force. Shared by the
/// link, the Lease renewer and the fence watchdog.
#[derive(Debug, Clone)]
pub struct Contact(Arc<Mutex<(Instant, Duration)>>);

impl Contact {
    fn new(fence: Duration) -> Self {
        Contact(Arc::new(Mutex::new((Instant::now(), fence))))
    }
    /// Records contact proven by something sent at `sent` (keeps the latest).
    pub fn touch_at(&self, sent: Instant) {
        let mut g = self.0.lock().unwrap_or_else(|e| e.into_inner());
        g.0 = g.0.max(sent);
    }
    fn set_fence(&self, fence: Duration) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).1 = fence;
    }
    /// The fence timeout in force.
    pub fn fence(&self) -> Duration {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).1
    }
    fn silent_for(&self) -> (Duration, Duration) {
        let g = self.0.lock().unwrap_or_else(|e| e.into_inner());
        (g.0.elapsed(), g.1)
    }
}

/// Runs the link until `shutdown` turns true: connects, reconnects, fences.
pub async fn run(
    core: Arc<AgentCore>,
    supervisor: Arc<dyn WorkerSupervisor>,
    mut worker_updates: mpsc::UnboundedReceiver<WorkerUpdate>,
    config: LinkConfig,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), LinkError> {
    let endpoint = endpoint(&config)?;
    let contact = Contact::new(config.fence_timeout);
    match &config.lease {
        Some(lease) => match kube::Client::try_default().await {
            Ok(client) => {
                tokio::spawn(crate::lease::run(
                    client,
                    lease.clone(),
                    core.clone(),
                    supervisor.clone(),
                    contact.clone(),
                    shutdown.clone(),
                ));
            }
            Err(e) => tracing::warn!(
                error = %e,
                "no API server access for the node's Lease: an operator outage longer than the \
                 fence timeout will stop this node's workers"
            ),
        },
        None => tracing::warn!(
            "the node's Lease is off: an operator outage longer than the fence timeout will \
             stop this node's workers"
        ),
    }
    tokio::spawn(fence_watchdog(
        core.clone(),
        supervisor.clone(),
        contact.clone(),
        shutdown.clone(),
    ));
    // Worker events raised while disconnected wait in `worker_updates` until the next session.
    let backoff = backon::ExponentialBuilder::default()
        .with_min_delay(config.backoff_min)
        .with_max_delay(config.backoff_max)
        .with_jitter()
        .without_max_times();
    let mut delays = backoff.build();
    loop {
        if *shutdown.borrow() {
            return Ok(());
        }
        let started = Instant::now();
        let result = match endpoint.connect().await {
            Ok(channel) => {
                let advertise = &config.advertise;
                session(
                    &core,
                    &supervisor,
                    channel,
                    &contact,
                    advertise,
                    &mut worker_updates,
                    &mut shutdown,
                )
                .await
            }
            Err(e) => Err(LinkError::Connect {
                endpoint: config.endpoint.clone(),
                detail: format!("{e:?}"),
            }),
        };
        core.metrics.connected.set(0);
        match result {
            Ok(()) => return Ok(()),
            Err(e) => tracing::warn!(error = %e, "operator link down"),
        }
        // A session that lasted a while was healthy: start the backoff again from the bottom.
        if started.elapsed() > Duration::from_secs(30) {
            delays = backoff.build();
        }
        let delay = delays.next().unwrap_or(config.backoff_max);
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.changed() => return Ok(()),
        }
    }
}

async fn fence_watchdog(
    core: Arc<AgentCore>,
    supervisor: Arc<dyn WorkerSupervisor>,
    contact: Contact,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut fenced = false;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            _ = shutdown.changed() => return,
        }
        let (silent, fence) = contact.silent_for();
        if silent <= fence {
            fenced = false;
        } else if !fenced {
            fenced = true;
            core.metrics.fence_kills.inc();
            let reason = format!("no contact for {silent:?}, past the fence timeout {fence:?}");
            tracing::error!(%reason, "reached neither the operator nor the API server: killing every worker (safety rule 1)");
            supervisor.kill_all(&reason);
        }
    }
}

fn registration(
    core: &AgentCore,
    supervisor: &dyn WorkerSupervisor,
    advertise: &Advertise,
) -> pb::AgentMessage {
    let health = core.health();
    let (last_seq, _) = core.seqs();
    let register = pb::Register {
        node_name: core.node().to_owned(),
        agent_version: env!("CARGO_PKG_VERSION").to_owned(),
        instance_id: core.instance_id().to_owned(),
        process_id: core.process_id().to_owned(),
        backend: core.backend_name().to_owned(),
        gpus: core.devices().iter().map(convert::gpu_info).collect(),
        health: core
            .devices()
            .iter()
            .zip(&health)
            .map(|(d, h)| convert::health_state(&d.uuid, h))
            .collect(),
        workers: supervisor.running().iter().map(convert::running_worker).collect(),
        last_critical_seq: last_seq,
        admin_url: advertise.admin_url.clone(),
        address: advertise.node_address.clone(),
    };
    pb::AgentMessage { body: Some(Up::Register(register)) }
}

async fn session(
    core: &Arc<AgentCore>,
    supervisor: &Arc<dyn WorkerSupervisor>,
    channel: Channel,
    contact: &Contact,
    advertise: &Advertise,
    worker_updates: &mut mpsc::UnboundedReceiver<WorkerUpdate>,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<(), LinkError> {
    let mut client = AgentServiceClient::new(channel)
        .max_decoding_message_size(flotilla_proto::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(flotilla_proto::MAX_MESSAGE_BYTES);
    let (tx, rx) = mpsc::channel::<pb::AgentMessage>(1024);
    let send = |m: pb::AgentMessage| {
        let tx = tx.clone();
        async move { tx.send(m).await.map_err(|_| LinkError::Protocol("outbound stream closed".into())) }
    };
    let registering = Instant::now();
    send(registration(core, supervisor.as_ref(), advertise)).await?;
    let mut inbound = client.link(ReceiverStream::new(rx)).await?.into_inner();
    let registered = match inbound.message().await? {
        Some(pb::OperatorMessage { body: Some(Down::Registered(r)) }) => r,
        other => {
            return Err(LinkError::Protocol(format!("expected Registered first, got {other:?}")));
        }
    };
    contact.touch_at(registering);
    if registered.fence_timeout_ms > 0 {
        contact.set_fence(Duration::from_millis(registered.fence_timeout_ms));
    }
    core.ack(registered.acked_critical_seq);
    core.metrics.connected.set(1);
    core.metrics.connects.inc();
    tracing::info!(acked = registered.acked_critical_seq, "registered with the operator");
    let mut sent_upto = registered.acked_critical_seq;
    let heartbeat_every = Duration::from_millis(registered.heartbeat_interval_ms.max(100));
    let mut heartbeat = tokio::time::interval(heartbeat_every);
    let mut samples = core.subscribe_samples();
    samples.mark_unchanged();
    // Heartbeats sent and not yet acknowledged: their stamp, and when they were sent.
    let mut unacked: VecDeque<(i64, Instant)> = VecDeque::new();
    loop {
        // Everything raised and not yet sent on this stream goes first, in order.
        let (pending, _) = core.critical_after(sent_upto);
        for e in pending {
            sent_upto = e.seq;
            send(pb::AgentMessage { body: Some(Up::Critical(convert::critical(&e))) }).await?;
        }
        tokio::select! {
            biased;
            _ = shutdown.changed() => return Ok(()),
            _ = core.critical_raised.notified() => {}
            msg = inbound.message() => {
                let msg = msg?.ok_or_else(|| LinkError::Protocol("operator closed the stream".into()))?;
                if let Some(Down::Ack(ack)) = &msg.body
                    && let Some(sent) = take_acked(&mut unacked, ack.heartbeat_sent_at_unix_nanos)
                {
                    contact.touch_at(sent);
                }
                if let Some(reply) = handle_command(core, supervisor, msg).await {
                    send(reply).await?;
                }
            }
            // Ahead of worker events: a chatty worker must not delay the heartbeats that keep
            // its node out of the fence.
            _ = heartbeat.tick() => {
                let stamp = flotilla_proto::now_unix_nanos();
                let hb = pb::Heartbeat { sent_at_unix_nanos: stamp, last_critical_seq: core.seqs().0 };
                if unacked.len() == MAX_UNACKED_HEARTBEATS {
                    unacked.pop_front();
                }
                unacked.push_back((stamp, Instant::now()));
                send(pb::AgentMessage { body: Some(Up::Heartbeat(hb)) }).await?;
            }
            Some(u) = worker_updates.recv() => {
                send(pb::AgentMessage { body: Some(Up::Worker(convert::worker_event(&u))) }).await?;
            }
            Ok(()) = samples.changed() => {
                let latest = samples.borrow_and_update().clone();
                send(pb::AgentMessage { body: Some(Up::Health(health_report(core, &latest))) }).await?;
            }
        }
    }
}

/// Heartbeats remembered while unacknowledged (older ones cannot prove more recent contact).
const MAX_UNACKED_HEARTBEATS: usize = 64;

/// When the heartbeat stamped `stamp` was sent, if it is one of `unacked`; forgets it and every
/// older one (acknowledgements come in order).
fn take_acked(unacked: &mut VecDeque<(i64, Instant)>, stamp: i64) -> Option<Instant> {
    if stamp == 0 {
        return None;
    }
    let at = unacked.iter().position(|(s, _)| *s == stamp)?;
    let sent = unacked[at].1;
    unacked.drain(..=at);
    Some(sent)
}

fn health_report(core: &AgentCore, samples: &[crate::backend::GpuSample]) -> pb::HealthReport {
    let devices = core.devices();
    pb::HealthReport {
        sampled_at_unix_nanos: flotilla_proto::now_unix_nanos(),
        samples: samples
            .iter()
            .filter_map(|s| devices.get(s.index as usize).map(|d| convert::sample(&d.uuid, s)))
            .collect(),
    }
}

fn result(command_id: u64, outcome: Result<String, String>) -> pb::AgentMessage {
    let (ok, message) = match outcome {
        Ok(m) => (true, m),
        Err(m) => (false, m),
    };
    pb::AgentMessage {
        body: Some(Up::CommandResult(pb::CommandResult { command_id, ok, message })),
    }
}

async fn handle_command(
    core: &Arc<AgentCore>,
    supervisor: &Arc<dyn WorkerSupervisor>,
    msg: pb::OperatorMessage,
) -> Option<pb::AgentMessage> {
    match msg.body? {
        Down::Registered(_) => None,
        Down::Ack(ack) => {
            core.ack(ack.critical_seq);
            None
        }
        Down::LaunchWorker(l) => {
            let outcome = convert::launch(&l).and_then(|launch| {
                core.admit_launch(&launch.id.job_uid, launch.id.attempt, &launch.gpu_uuids)
                    .and_then(|()| supervisor.launch(launch))
                    .map(|()| "launched".to_owned())
                    .map_err(|e| e.to_string())
            });
            Some(result(l.command_id, outcome))
        }
        Down::StopWorker(s) => {
            let outcome = convert::worker_id(s.worker.as_ref(), "stop_worker").and_then(|id| {
                core.admit_stop(&id.job_uid, id.attempt)
                    .and_then(|()| {
                        let rank = (!s.all_ranks).then_some(id.rank);
                        let grace = Duration::from_millis(s.grace_period_ms);
                        supervisor.stop(&id.job_uid, id.attempt, rank, grace, &s.reason)
                    })
                    .map(|()| "stopping".to_owned())
                    .map_err(|e| e.to_string())
            });
            Some(result(s.command_id, outcome))
        }
        Down::GpuCommand(c) => {
            let Some(index) = core.index_of(&c.gpu_uuid) else {
                let msg =
                    format!("gpu_command.gpu_uuid: {} is not on node {}", c.gpu_uuid, core.node());
                return Some(result(c.command_id, Err(msg)));
            };
            let outcome = match pb::GpuAction::try_from(c.action) {
                Ok(pb::GpuAction::Cordon) => {
                    core.set_cordoned(index, true);
                    Ok("cordoned".to_owned())
                }
                Ok(pb::GpuAction::Uncordon) => {
                    core.set_cordoned(index, false);
                    Ok("uncordoned".to_owned())
                }
                Ok(pb::GpuAction::Validate) => {
                    let core = core.clone();
                    match tokio::task::spawn_blocking(move || core.validate(index)).await {
                        Ok(Ok(true)) => Ok("validation passed".to_owned()),
                        Ok(Ok(false)) => Err("validation failed".to_owned()),
                        Ok(Err(e)) => Err(e.to_string()),
                        Err(e) => Err(format!("validation task: {e}")),
                    }
                }
                Ok(pb::GpuAction::Suspect) => core
                    .suspect(index, &c.evidence)
                    .map(|()| "suspected: Degraded until validation passes".to_owned())
                    .map_err(|e| e.to_string()),
                _ => Err(format!(
                    "gpu_command.action: expected CORDON, UNCORDON, VALIDATE or SUSPECT, got {}",
                    c.action
                )),
            };
            Some(result(c.command_id, outcome))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_acknowledgement_proves_contact_from_its_heartbeats_send_time_once() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut unacked = VecDeque::from([(10, at(0)), (20, at(100)), (30, at(200))]);
        assert_eq!(take_acked(&mut unacked, 0), None, "an acknowledgement of a critical event");
        assert_eq!(take_acked(&mut unacked, 99), None, "a stamp never sent");
        assert_eq!(take_acked(&mut unacked, 20), Some(at(100)));
        assert_eq!(unacked, VecDeque::from([(30, at(200))]), "older heartbeats are forgotten");
        assert_eq!(take_acked(&mut unacked, 20), None, "each counts once");
    }

    #[test]
    fn contact_keeps_the_latest_proof() {
        let contact = Contact::new(Duration::from_secs(30));
        let later = Instant::now() + Duration::from_secs(5);
        contact.touch_at(later);
        contact.touch_at(Instant::now());
        assert_eq!(contact.0.lock().unwrap().0, later, "an older proof does not move it back");
    }
}
