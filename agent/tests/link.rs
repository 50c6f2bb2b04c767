//! Agents against the operator's agent server on 127.0.0.1: registration, fault delivery,
//! reconnects, certificates, malformed input, leadership and fencing.

mod common;

use common::*;
use flotilla_agent::backend::simulated::Injection;
use flotilla_agent::link::Advertise;
use flotilla_operator::agents::{GpuAction, GpuHealth, NodeRegistry, WorkerPhase};
use flotilla_proto::v1 as pb;
use flotilla_proto::v1::agent_service_client::AgentServiceClient;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

fn health_is(fleet: &NodeRegistry, node: &str, gpu: u32, want: GpuHealth) -> bool {
    fleet.gpu_health(node, gpu) == Some(want)
}

#[tokio::test]
async fn several_agents_register_with_their_inventory() {
    let nodes = ["node-a", "node-b", "node-c"];
    let certs = Certs::new(&nodes);
    let op = operator("127.0.0.1:0", NodeRegistry::new(), Some(&certs), fast_config()).await;
    let mut agents = Vec::new();
    for (i, node) in nodes.into_iter().enumerate() {
        let mut options = agent_options(node, op.addr, Some(certs.client(node)), 4);
        // Each agent in this one process advertises its own addresses.
        options.link.advertise = Advertise {
            admin_url: format!("http://{node}:9400"),
            node_address: format!("10.0.0.{i}"),
        };
        agents.push(agent(options).await);
    }
    for (i, (node, agent)) in nodes.iter().zip(&agents).enumerate() {
        registered(op.registry(), node).await;
        let rec = op.registry().node(node).expect("registered");
        assert_eq!(op.registry().admin_url(node), Some(format!("http://{node}:9400")));
        assert_eq!(rec.address, Some(format!("10.0.0.{i}")));
        let uuids: Vec<&str> = rec.gpus.iter().map(|g| g.uuid.as_str()).collect();
        let expected: Vec<&str> = agent.core.devices().iter().map(|d| d.uuid.as_str()).collect();
        assert_eq!(uuids, expected, "{node}");
        assert_eq!(rec.gpus[1].model, "NVIDIA H100 80GB HBM3");
        assert_eq!(rec.gpus[1].nvlink_peers, vec![0, 2, 3]);
        assert_eq!(rec.backend, "simulated");
        assert_eq!(rec.schedulable_gpus().count(), 4);
    }
}

#[tokio::test]
async fn xid_79_fails_the_gpu_and_xid_13_does_not() {
    let certs = Certs::new(&["node-a"]);
    let op = operator("127.0.0.1:0", NodeRegistry::new(), Some(&certs), fast_config()).await;
    let a = agent(agent_options("node-a", op.addr, Some(certs.client("node-a")), 4)).await;
    registered(op.registry(), "node-a").await;
    let sim = a.sim.as_ref().expect("simulated");

    sim.inject(1, Injection::Xid(13)).expect("inject 13");
    let seen = op
        .registry()
        .wait_for(PATIENCE, |f| f.node("node-a").is_some_and(|n| n.gpus[1].last_xid == 13))
        .await;
    assert!(seen, "XID 13 never reached the operator");
    assert!(
        health_is(op.registry(), "node-a", 1, GpuHealth::Healthy),
        "an application XID condemned the GPU"
    );

    sim.inject(2, Injection::Xid(79)).expect("inject 79");
    let failed =
        op.registry().wait_for(PATIENCE, |f| health_is(f, "node-a", 2, GpuHealth::Failed)).await;
    assert!(failed, "XID 79 did not fail GPU 2");
    let rec = op.registry().node("node-a").expect("node");
    assert_eq!(rec.gpus[2].reason, "Xid79");
    assert_eq!(rec.last_fault.as_ref().and_then(|f| f.xid), Some(79));
    assert_eq!(rec.schedulable_gpus().count(), 3);
    assert!(health_is(op.registry(), "node-a", 1, GpuHealth::Healthy));
}

#[tokio::test]
async fn events_raised_while_disconnected_arrive_after_the_operator_restarts() {
    let certs = Certs::new(&["node-a"]);
    let op = operator("127.0.0.1:0", NodeRegistry::new(), Some(&certs), fast_config()).await;
    let addr = op.addr;
    let a = agent(agent_options("node-a", addr, Some(certs.client("node-a")), 4)).await;
    registered(op.registry(), "node-a").await;
    op.stop().await;
    let down = eventually(|| a.core.metrics.connected.get() == 0).await;
    assert!(down, "agent still thinks it is connected");

    let sim = a.sim.as_ref().expect("simulated");
    sim.inject(0, Injection::Xid(79)).expect("inject");
    sim.inject(3, Injection::DoubleBitEcc).expect("inject");
    // The backend hands events to the agent's event task; wait until both are in the outbox.
    let pending = eventually(|| a.core.critical_after(0).0.len() == 2).await;
    assert!(pending, "both events wait in the outbox: {:?}", a.core.critical_after(0));

    // A restarted operator knows nothing; the events must be resent, not only the health.
    let op = operator(&addr.to_string(), NodeRegistry::new(), Some(&certs), fast_config()).await;
    let delivered = op
        .registry()
        .wait_for(PATIENCE, |f| f.node("node-a").is_some_and(|n| n.applied_seq == 2))
        .await;
    assert!(delivered, "events raised while disconnected were not delivered");
    let rec = op.registry().node("node-a").expect("node");
    assert_eq!(rec.gpus[0].health, GpuHealth::Failed);
    assert_eq!(rec.gpus[3].health, GpuHealth::Failed);
    assert_eq!(rec.gpus[3].reason, "DoubleBitEcc");
    let acked = eventually(|| a.core.seqs() == (2, 2)).await;
    assert!(acked, "agent never saw the acknowledgement: {:?}", a.core.seqs());
}

#[tokio::test]
async fn a_failed_gpu_heals_only_after_validation_passes() {
    let certs = Certs::new(&["node-a"]);
    let op = operator("127.0.0.1:0", NodeRegistry::new(), Some(&certs), fast_config()).await;
    let a = agent(agent_options("node-a", op.addr, Some(certs.client("node-a")), 2)).await;
    registered(op.registry(), "node-a").await;
    let sim = a.sim.as_ref().expect("simulated");
    let uuid = a.core.devices()[1].uuid.clone();
    sim.inject(1, Injection::GpuLost).expect("inject");
    assert!(
        op.registry().wait_for(PATIENCE, |f| health_is(f, "node-a", 1, GpuHealth::Failed)).await
    );

    let refused = op.server.gpu_command("node-a", &uuid, GpuAction::Validate, PATIENCE).await;
    assert_eq!(refused, Err("validation failed".to_owned()));
    assert!(health_is(op.registry(), "node-a", 1, GpuHealth::Failed));

    sim.inject(1, Injection::Recover).expect("recover");
    let passed = op.server.gpu_command("node-a", &uuid, GpuAction::Validate, PATIENCE).await;
    assert_eq!(passed, Ok("validation passed".to_owned()));
    assert!(
        op.registry().wait_for(PATIENCE, |f| health_is(f, "node-a", 1, GpuHealth::Healthy)).await
    );
    assert_eq!(op.registry().node("node-a").expect("node").gpus[1].reason, "Validated");
}

async fn raw_client(
    certs: &Certs,
    cert_node: &str,
    addr: std::net::SocketAddr,
) -> Result<AgentServiceClient<tonic::transport::Channel>, tonic::transport::Error> {
    let read = |f: &str| std::fs::read(certs.path(f)).expect("cert file");
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read("ca.pem")))
        .identity(Identity::from_pem(
            read(&format!("{cert_node}.pem")),
            read(&format!("{cert_node}-key.pem")),
        ))
        .domain_name("localhost");
    let channel =
        Endpoint::from_shared(format!("https://{addr}"))?.tls_config(tls)?.connect().await?;
    Ok(AgentServiceClient::new(channel).max_encoding_message_size(8 << 20))
}

fn register_msg(node: &str) -> pb::AgentMessage {
    pb::AgentMessage {
        body: Some(pb::agent_message::Body::Register(pb::Register {
            node_name: node.into(),
            agent_version: "test".into(),
            instance_id: "raw".into(),
            backend: "simulated".into(),
            gpus: vec![pb::GpuInfo { index: 0, uuid: format!("GPU-{node}"), ..Default::default() }],
            ..Default::default()
        })),
    }
}

/// Opens a stream sending `messages`; returns the first error the operator answers with.
async fn first_error(
    client: &mut AgentServiceClient<tonic::transport::Channel>,
    messages: Vec<pb::AgentMessage>,
) -> tonic::Status {
    let response = client.link(tokio_stream::iter(messages).chain(tokio_stream::pending())).await;
    let mut inbound = match response {
        Ok(r) => r.into_inner(),
        Err(status) => return status,
    };
    loop {
        match tokio::time::timeout(PATIENCE, inbound.message()).await.expect("operator answered") {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("stream ended without an error"),
            Err(status) => return status,
        }
    }
}

use tokio_stream::StreamExt;

#[tokio::test]
async fn a_node_may_only_speak_for_itself() {
    let certs = Certs::new(&["node-a", "node-b"]);
    let op = operator("127.0.0.1:0", NodeRegistry::new(), Some(&certs), fast_config()).await;
    let mut client = raw_client(&certs, "node-a", op.addr).await.expect("TLS connects");
    let status = first_error(&mut client, vec![register_msg("node-b")]).await;
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains("register.node_name"), "{status:?}");
    assert!(op.registry().node("node-b").is_none());
}

#[tokio::test]
async fn a_certificate_from_another_ca_is_refused() {
    let certs = Certs::new(&["node-a"]);
    let strangers = Certs::new(&["node-a"]);
    let op = operator("127.0.0.1:0", NodeRegistry::new(), Some(&certs), fast_config()).await;
    // The stranger's client trusts the real CA for the server, but presents a foreign identity.
    std::fs::copy(certs.path("ca.pem"), strangers.path("ca.pem")).expect("copy CA");
    let refused = match raw_client(&strangers, "node-a", op.addr).await {
        Err(_) => true,
        Ok(mut client) => {
            let status = first_error(&mut client, vec![register_msg("node-a")]).await;
            status.code() != tonic::Code::Ok
        }
    };
    assert!(refused, "a foreign client certificate was accepted");
    assert!(op.registry().node("node-a").is_none());
}

#[tokio::test]
async fn malformed_and_oversized_messages_close_only_their_own_stream() {
    let certs = Certs::new(&["node-a", "node-b", "node-c"]);
    let op = operator("127.0.0.1:0", NodeRegistry::new(), Some(&certs), fast_config()).await;
    let good = agent(agent_options("node-a", op.addr, Some(certs.client("node-a")), 2)).await;
    registered(op.registry(), "node-a").await;

    let mut b = raw_client(&certs, "node-b", op.addr).await.expect("connects");
    let empty = pb::AgentMessage { body: None };
    let status = first_error(&mut b, vec![register_msg("node-b"), empty]).await;
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("agent_message.body"), "{status:?}");

    let mut c = raw_client(&certs, "node-c", op.addr).await.expect("connects");
    let huge = pb::AgentMessage {
        body: Some(pb::agent_message::Body::Worker(pb::WorkerEvent {
            message: "x".repeat(2 << 20),
            ..Default::default()
        })),
    };
    let status = first_error(&mut c, vec![register_msg("node-c"), huge]).await;
    assert_ne!(status.code(), tonic::Code::Ok, "{status:?}");

    let mut d = raw_client(&certs, "node-c", op.addr).await.expect("connects");
    let mut bad = register_msg("node-c");
    if let Some(pb::agent_message::Body::Register(r)) = &mut bad.body {
        r.gpus.push(pb::GpuInfo { index: 1, uuid: "GPU-node-c".into(), ..Default::default() });
    }
    let status = first_error(&mut d, vec![bad]).await;
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().contains("register.gpus[1].uuid"), "{status:?}");

    // The well-behaved agent is untouched and still delivers.
    good.sim.as_ref().expect("sim").inject(0, Injection::Xid(79)).expect("inject");
    assert!(
        op.registry().wait_for(PATIENCE, |f| health_is(f, "node-a", 0, GpuHealth::Failed)).await
    );
    assert!(op.registry().node("node-a").expect("node").connected);
}

#[tokio::test]
async fn a_silent_agent_is_marked_lost_and_its_gpus_leave_the_pool() {
    let certs = Certs::new(&["node-a"]);
    let config = flotilla_operator::agents::AgentServerConfig {
        heartbeat_timeout: Duration::from_millis(800),
        ..fast_config()
    };
    let op = operator("127.0.0.1:0", NodeRegistry::new(), Some(&certs), config).await;
    let a = agent(agent_options("node-a", op.addr, Some(certs.client("node-a")), 2)).await;
    registered(op.registry(), "node-a").await;
    let _ = a.shutdown.send(true);
    let lost = op.registry().wait_for(PATIENCE, |f| f.node("node-a").is_some_and(|n| n.lost)).await;
    assert!(lost, "silent agent never marked lost");
    assert_eq!(op.registry().node("node-a").expect("node").schedulable_gpus().count(), 0);
}

#[tokio::test]
async fn only_the_leader_serves_and_agents_retry_until_it_does() {
    let certs = Certs::new(&["node-a"]);
    let op = operator("127.0.0.1:0", NodeRegistry::new(), Some(&certs), fast_config()).await;
    op.gate.set(false);
    let mut raw = raw_client(&certs, "node-a", op.addr).await.expect("connects");
    let status = first_error(&mut raw, vec![register_msg("node-a")]).await;
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");

    let _a = agent(agent_options("node-a", op.addr, Some(certs.client("node-a")), 2)).await;
    op.gate.set(true);
    registered(op.registry(), "node-a").await;
}

/// A stop as the supervisor saw it: job, attempt, rank, grace.
type Stop = (String, u64, Option<u32>, Duration);

#[derive(Default)]
struct CountingSupervisor {
    kills: AtomicUsize,
    launches: std::sync::Mutex<Vec<flotilla_agent::supervisor::WorkerLaunch>>,
    stops: std::sync::Mutex<Vec<Stop>>,
}

impl flotilla_agent::supervisor::WorkerSupervisor for CountingSupervisor {
    fn launch(
        &self,
        launch: flotilla_agent::supervisor::WorkerLaunch,
    ) -> Result<(), flotilla_agent::supervisor::SupervisorError> {
        self.launches.lock().expect("lock").push(launch);
        Ok(())
    }
    fn stop(
        &self,
        job_uid: &str,
        attempt: u64,
        rank: Option<u32>,
        grace: Duration,
        _: &str,
    ) -> Result<(), flotilla_agent::supervisor::SupervisorError> {
        self.stops.lock().expect("lock").push((job_uid.to_owned(), attempt, rank, grace));
        Ok(())
    }
    fn kill_all(&self, _: &str) {
        self.kills.fetch_add(1, Ordering::SeqCst);
    }
    fn running(&self) -> Vec<flotilla_agent::supervisor::RunningWorker> {
        let launches = self.launches.lock().expect("lock");
        let worker = |(pid, l): (usize, &flotilla_agent::supervisor::WorkerLaunch)| {
            flotilla_agent::supervisor::RunningWorker {
                id: l.id.clone(),
                pid: 1000 + pid as u32,
                gpu_uuids: l.gpu_uuids.clone(),
                started_at_unix_nanos: 0,
            }
        };
        launches.iter().enumerate().map(worker).collect()
    }
}

#[tokio::test]
async fn an_agent_cut_off_past_the_fence_timeout_kills_its_workers() {
    let certs = Certs::new(&["node-a"]);
    let config = flotilla_operator::agents::AgentServerConfig {
        fence_timeout: Duration::from_millis(500),
        ..fast_config()
    };
    let op = operator("127.0.0.1:0", NodeRegistry::new(), Some(&certs), config).await;
    let supervisor = Arc::new(CountingSupervisor::default());
    let a = agent_with(
        agent_options("node-a", op.addr, Some(certs.client("node-a")), 2),
        supervisor.clone(),
    )
    .await;
    registered(op.registry(), "node-a").await;
    assert_eq!(supervisor.kills.load(Ordering::SeqCst), 0, "connected agents keep their workers");
    op.stop().await;
    let killed = eventually(|| supervisor.kills.load(Ordering::SeqCst) > 0).await;
    assert!(killed, "workers survived past the fence timeout");
    assert_eq!(a.core.metrics.fence_kills.get(), 1);
}

#[tokio::test]
async fn an_agent_restart_keeps_verdicts_and_delivers_unacknowledged_events() {
    let certs = Certs::new(&["node-a"]);
    let op = operator("127.0.0.1:0", NodeRegistry::new(), Some(&certs), fast_config()).await;
    let addr = op.addr;
    let mut options = agent_options("node-a", addr, Some(certs.client("node-a")), 4);
    options.state_file = Some(certs.path("agent-state.json"));
    let first = agent(options.clone()).await;
    registered(op.registry(), "node-a").await;
    op.stop().await;
    assert!(eventually(|| first.core.metrics.connected.get() == 0).await);
    first.sim.as_ref().expect("simulated").inject(1, Injection::Xid(79)).expect("inject");
    assert!(eventually(|| first.core.seqs() == (1, 0)).await, "event raised, not acknowledged");
    let _ = first.shutdown.send(true);
    first.link.await.expect("link task").expect("link ends cleanly");

    // The restarted agent's fresh backend sees nothing wrong; the verdict and the event survive.
    let second = agent(options).await;
    assert_eq!(second.core.health()[1].reason, "Xid79");
    let op = operator(&addr.to_string(), NodeRegistry::new(), Some(&certs), fast_config()).await;
    let delivered = op
        .registry()
        .wait_for(PATIENCE, |f| {
            f.node("node-a")
                .is_some_and(|n| n.applied_seq == 1 && n.gpus[1].health == GpuHealth::Failed)
        })
        .await;
    assert!(delivered, "the event raised before the restart was not delivered");
    let rec = op.registry().node("node-a").expect("node");
    assert_eq!(rec.last_fault.as_ref().and_then(|f| f.xid), Some(79));
    assert_eq!(rec.instance_id, second.core.instance_id());
}

#[tokio::test]
async fn worker_commands_carry_job_and_attempt_and_stale_attempts_are_refused() {
    use flotilla_operator::agents::WorkerLaunchSpec;
    let certs = Certs::new(&["node-a", "node-b"]);
    let op = operator("127.0.0.1:0", NodeRegistry::new(), Some(&certs), fast_config()).await;
    let supervisor = Arc::new(CountingSupervisor::default());
    let a = agent_with(
        agent_options("node-a", op.addr, Some(certs.client("node-a")), 2),
        supervisor.clone(),
    )
    .await;
    let _b = agent(agent_options("node-b", op.addr, Some(certs.client("node-b")), 2)).await;
    registered(op.registry(), "node-a").await;
    registered(op.registry(), "node-b").await;
    let gpus: Vec<String> = a.core.devices().iter().map(|d| d.uuid.clone()).collect();
    let spec = |attempt: u64, gpu: &str| WorkerLaunchSpec {
        job_uid: "job-1".into(),
        attempt,
        rank: 1,
        world_size: 2,
        gpu_uuids: vec![gpu.to_owned()],
        command: "flotilla-worker".into(),
        env: [("FOO".to_owned(), "bar".to_owned())].into(),
        master_addr: "127.0.0.1".into(),
        master_port: 29500,
        ..Default::default()
    };

    let ok = op.server.launch_worker("node-a", &spec(2, &gpus[0]), PATIENCE).await;
    assert_eq!(ok, Ok("launched".to_owned()));
    let launched = supervisor.launches.lock().expect("lock").clone();
    assert_eq!(launched.len(), 1);
    assert_eq!(
        (launched[0].id.job_uid.as_str(), launched[0].id.attempt, launched[0].id.rank),
        ("job-1", 2, 1)
    );
    assert_eq!(launched[0].env.get("FOO").map(String::as_str), Some("bar"));
    assert_eq!(launched[0].gpu_uuids, vec![gpus[0].clone()]);

    let stale =
        op.server.launch_worker("node-a", &spec(1, &gpus[0]), PATIENCE).await.expect_err("stale");
    assert!(stale.contains("attempt 1 is stale"), "{stale}");

    op.server.gpu_command("node-a", &gpus[1], GpuAction::Cordon, PATIENCE).await.expect("cordon");
    let cordoned = op
        .server
        .launch_worker("node-a", &spec(3, &gpus[1]), PATIENCE)
        .await
        .expect_err("cordoned");
    assert!(cordoned.contains("cordoned"), "{cordoned}");

    let stopped = op
        .server
        .stop_workers("node-a", "job-1", 3, Duration::from_secs(5), "test", PATIENCE)
        .await;
    assert_eq!(stopped, Ok("stopping".to_owned()));
    let stops = supervisor.stops.lock().expect("lock").clone();
    assert_eq!(stops, vec![("job-1".to_owned(), 3, None, Duration::from_secs(5))]);
    assert_eq!(
        supervisor.launches.lock().expect("lock").len(),
        1,
        "refused launches never reach the supervisor"
    );

    let none = op
        .server
        .launch_worker("node-b", &spec(1, "GPU-x"), PATIENCE)
        .await
        .expect_err("foreign GPU");
    assert!(none.contains("GPU-x"), "{none}");
    let missing = op
        .server
        .launch_worker("node-z", &spec(1, "GPU-x"), PATIENCE)
        .await
        .expect_err("no such node");
    assert!(missing.contains("node-z"), "{missing}");
}

#[tokio::test]
async fn worker_events_reach_the_operator_and_a_restarted_operator_learns_running_workers() {
    use flotilla_agent::supervisor::{WorkerId, WorkerUpdate};
    use flotilla_operator::agents::{RunningWorkerRecord, WorkerLaunchSpec};
    let certs = Certs::new(&["node-a"]);
    let op = operator("127.0.0.1:0", NodeRegistry::new(), Some(&certs), fast_config()).await;
    let addr = op.addr;
    let supervisor = Arc::new(CountingSupervisor::default());
    let a = agent_with(
        agent_options("node-a", addr, Some(certs.client("node-a")), 2),
        supervisor.clone(),
    )
    .await;
    registered(op.registry(), "node-a").await;
    let gpu = a.core.devices()[0].uuid.clone();
    let spec = WorkerLaunchSpec {
        job_uid: "job-7".into(),
        attempt: 4,
        rank: 0,
        world_size: 1,
        gpu_uuids: vec![gpu.clone()],
        ..Default::default()
    };
    op.server.launch_worker("node-a", &spec, PATIENCE).await.expect("launched");

    let mut reports = op.server.worker_reports();
    let id = WorkerId { job_uid: "job-7".into(), attempt: 4, rank: 0 };
    a.worker_updates.send(WorkerUpdate::Exited { id, code: Some(3), signal: None }).expect("send");
    let report =
        tokio::time::timeout(PATIENCE, reports.recv()).await.expect("a report").expect("open");
    assert_eq!(
        (report.node.as_str(), report.job_uid.as_str(), report.attempt),
        ("node-a", "job-7", 4)
    );
    assert_eq!(
        (report.phase, report.exit_code, report.signal),
        (WorkerPhase::Exited, Some(3), None)
    );

    op.stop().await;
    let op = operator(&addr.to_string(), NodeRegistry::new(), Some(&certs), fast_config()).await;
    registered(op.registry(), "node-a").await;
    let workers = op.registry().node("node-a").expect("node").workers;
    let expected = RunningWorkerRecord {
        job_uid: "job-7".into(),
        attempt: 4,
        rank: 0,
        pid: 1000,
        gpu_uuids: vec![gpu],
    };
    assert_eq!(workers, vec![expected]);
}
