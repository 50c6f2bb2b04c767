//! End to end, workloads outlive the control plane (issue 23, part 0), with the node Leases the
//! agents renew as installed:
//!
//! - the operator down for five fence timeouts while a job trains on both agents: no worker is
//!   killed (the same processes run on), the job is adopted and finishes as if nothing happened;
//! - the API server frozen (SIGSTOP) for five fence timeouts: the same;
//! - one agent cut off from the operator but not from the API server, with a fence far longer
//!   than the test: the operator declares the node lost through its Lease, the agent stops its
//!   workers and confirms, and the job restarts on the other node without waiting for the fence.

use flotilla_operator::crd::{JobPhase, RestartCause, TrainingJob};
use flotilla_tests::{
    Proxy, Rig, WAIT, assert_no_overlap, eventually, install_crds, tiny_engine_job,
};
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Api, PostParams};
use std::time::Duration;

const FENCE_TIMEOUT_S: u64 = 5;
/// Five fence timeouts: before the node Leases, agents killed every worker after one.
const OUTAGE: Duration = Duration::from_secs(5 * FENCE_TIMEOUT_S);
/// Long enough that the job still trains when the outage ends (7–25 steps a second on the 2-core
/// machine, depending on its load), short enough to finish within the rig's 5 minutes.
const STEPS: i64 = 1200;

fn short_timeouts(fence: &str) -> [(&'static str, &str); 3] {
    [
        ("FLOTILLA_AGENT_HEARTBEAT_SECONDS", "1"),
        ("FLOTILLA_AGENT_HEARTBEAT_TIMEOUT_SECONDS", "3"),
        ("FLOTILLA_FENCE_TIMEOUT_SECONDS", fence),
    ]
}

enum Outage {
    Operator,
    ApiServer,
}

/// Starts a 2-worker job on two agents, takes the operator or the API server away for
/// [`OUTAGE`], brings it back, and checks that nothing was lost.
async fn survives(outage: Outage, prefix: &str) {
    // A control plane per test: GpuNodes are cluster-scoped, and an operator offers the GPUs of
    // another rig's leftover GpuNodes (whose agents are gone) to its scheduler.
    let cp = flotilla_tests::control_plane_for(&format!("{}::{prefix}", module_path!())).await;
    install_crds(&cp).expect("CRDs install");
    let client = cp.client().await.expect("client");
    let ns = flotilla_tests::namespace(&client, prefix).await.expect("namespace");
    let fence = FENCE_TIMEOUT_S.to_string();
    let mut rig = Rig::start_with(&cp, &ns, &client, 2, &short_timeouts(&fence)).await;
    let jobs: Api<TrainingJob> = Api::namespaced(client.clone(), &ns);
    let name = format!("{prefix}-e2e");
    // Spread over both nodes: each worker takes 3 of a node's 4 GPUs.
    let mut job = tiny_engine_job(&name, STEPS as u64, 100);
    job.spec.gpus_per_worker = 3;
    jobs.create(&PostParams::default(), &job).await.expect("create job");
    eventually(WAIT, &format!("{name} Running with progress"), || async {
        let s = jobs.get(&name).await.ok()?.status?;
        (s.phase == JobPhase::Running && s.progress.as_ref().is_some_and(|p| p.step > 0))
            .then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", rig.logs()));
    // Both agents renew their Leases (the installed default).
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns);
    for node in rig.node_names() {
        let lease = format!("flotilla-agent-{node}");
        eventually(WAIT, &format!("Lease {lease}"), || async {
            leases.get_opt(&lease).await.ok()?.map(drop)
        })
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", rig.logs()));
    }
    let pids = [rig.worker_pids(&name, 0), rig.worker_pids(&name, 1)];
    assert!(pids.iter().all(|p| p.len() == 1), "one process per rank: {pids:?}\n{}", rig.logs());

    match outage {
        Outage::Operator => {
            rig.kill_operator();
            tokio::time::sleep(OUTAGE).await;
            assert_eq!(
                [rig.worker_pids(&name, 0), rig.worker_pids(&name, 1)],
                pids,
                "the workers outlived {OUTAGE:?} without an operator\n{}",
                rig.logs()
            );
            rig.restart_operator();
        }
        Outage::ApiServer => {
            cp.freeze();
            tokio::time::sleep(OUTAGE).await;
            let after = [rig.worker_pids(&name, 0), rig.worker_pids(&name, 1)];
            cp.resume();
            assert_eq!(
                after,
                pids,
                "the workers outlived {OUTAGE:?} without an API server\n{}",
                rig.logs()
            );
        }
    }

    let done = rig.finished(&jobs, &name).await;
    assert_eq!(done.phase, JobPhase::Succeeded, "{:?}\n{}", done.message, rig.logs());
    assert_eq!((done.restarts, done.hardware_restarts), (0, 0), "{:?}", done.restart_history);
    assert!(done.restart_history.is_empty(), "{:?}", done.restart_history);
    assert_eq!(done.attempt.as_ref().map(|a| a.number), Some(1), "the same attempt");
    assert_eq!(done.progress.as_ref().map(|p| p.step), Some(STEPS), "exactly the requested steps");
    let attempts = assert_no_overlap(&rig.ledger(&name), &[]);
    assert_eq!(attempts, vec![(1, vec![0, 1])]);
    assert!(!rig.logs().contains("killing every worker"), "an agent fenced itself\n{}", rig.logs());
}

#[tokio::test]
async fn an_operator_down_for_five_fence_timeouts_kills_no_worker() {
    survives(Outage::Operator, "opdown").await;
}

#[tokio::test]
async fn an_api_server_frozen_for_five_fence_timeouts_kills_no_worker() {
    survives(Outage::ApiServer, "apidown").await;
}

#[tokio::test]
async fn an_agent_cut_off_from_the_operator_stops_its_workers_on_the_verdict_in_its_lease() {
    let cp = flotilla_tests::control_plane_for(&format!("{}::verdict", module_path!())).await;
    install_crds(&cp).expect("CRDs install");
    let client = cp.client().await.expect("client");
    let ns = flotilla_tests::namespace(&client, "verdict").await.expect("namespace");
    // A fence far longer than this test waits: only the verdict can restart the job in time.
    let mut rig = Rig::start_with(&cp, &ns, &client, 3, &short_timeouts("600")).await;
    // Every agent dials the operator through a proxy of its own, so one can be cut off alone.
    let mut proxies = std::collections::BTreeMap::new();
    for node in rig.node_names() {
        let proxy = Proxy::start(rig.agent_port()).await;
        rig.restart_agent_via(&node, proxy.port());
        proxies.insert(node, proxy);
    }
    for node in rig.node_names() {
        // The agent's log is appended to across restarts: the second registration is this one.
        let log = rig.dir.path().join(format!("agent-{node}.log"));
        eventually(WAIT, &format!("{node} registered through its proxy"), || async {
            let text = std::fs::read_to_string(&log).ok()?;
            (text.matches("registered with the operator").count() >= 2).then_some(())
        })
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", rig.logs()));
    }

    let jobs: Api<TrainingJob> = Api::namespaced(client.clone(), &ns);
    let name = "verdict-e2e";
    let mut job = tiny_engine_job(name, 600, 20);
    job.spec.gpus_per_worker = 3; // one worker per node
    jobs.create(&PostParams::default(), &job).await.expect("create job");
    let first = rig.running_with_checkpoint(&jobs, name).await;
    let victim = first.placement.workers.iter().find(|w| w.rank == 0).expect("rank 0").node.clone();
    let pids = rig.worker_pids(name, 0);
    assert_eq!(pids.len(), 1, "{pids:?}\n{}", rig.logs());

    // The agent reaches the API server, not the operator: it keeps renewing its Lease, so
    // nothing but the verdict stops its worker.
    proxies[&victim].cut();
    eventually(WAIT, "the cut-off agent's worker stopped", || async {
        rig.worker_pids(name, 0).iter().all(|p| !pids.contains(p)).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}: {pids:?} still run\n{}", rig.logs()));
    let logs = rig.logs();
    assert!(logs.contains("the operator declared node"), "not the verdict that stopped it\n{logs}");

    // The job restarts on the two other nodes while the victim is still cut off.
    let done = rig.finished(&jobs, name).await;
    assert_eq!(done.phase, JobPhase::Succeeded, "{:?}\n{}", done.message, rig.logs());
    let record = done.restart_history.first().expect("a restart record");
    assert_eq!(record.cause, RestartCause::NodeLost, "{:?}", done.restart_history);
    assert_eq!(record.node.as_deref(), Some(victim.as_str()));
    let last = done.attempt.as_ref().expect("attempt");
    assert!(
        last.placement.workers.iter().all(|w| w.node != victim),
        "placed on the cut-off node: {:?}",
        last.placement
    );
    assert_eq!(done.progress.as_ref().map(|p| p.step), Some(600), "exactly the requested steps");
    // The stopped worker wrote no end line (SIGKILL); it was gone before the agent confirmed
    // the verdict, and so before attempt 2 could start.
    let attempts = assert_no_overlap(&rig.ledger(name), &[(1, 0)]);
    assert_eq!(attempts, vec![(1, vec![0, 1]), (2, vec![0, 1])]);

    // Connected again, the agent's verdict is taken back.
    proxies[&victim].restore();
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns);
    let lease = format!("flotilla-agent-{victim}");
    eventually(WAIT, "the verdict taken back", || async {
        let l = leases.get_opt(&lease).await.ok()??;
        let annotations = l.metadata.annotations.unwrap_or_default();
        (!annotations.contains_key("flotilla.dev/lost-verdict")).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", rig.logs()));
}
