//! End to end, `kubectl flotilla` through kubectl's plugin mechanism: `logs` streams a worker's
//! log from its agent (found through the job's placement and the GpuNode's `adminUrl`), `-f`
//! ends when the job ends, `inject` fails a GPU, and bad input exits non-zero with a clear message.

use flotilla_operator::crd::{GpuHealth, GpuNode, JobPhase, TrainingJob};
use flotilla_tests::{Rig, WAIT, eventually, install_crds, kubectl_flotilla, tiny_engine_job};
use kube::api::{Api, PostParams};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn run(cmd: &mut Command) -> Output {
    cmd.output().expect("running kubectl flotilla")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn log_file(rig: &Rig, node: &str, uid: &str, attempt: i32, rank: i32) -> std::path::PathBuf {
    rig.dir
        .path()
        .join(format!("logs-{node}"))
        .join(uid)
        .join(format!("attempt-{attempt}"))
        .join(format!("rank-{rank}.log"))
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

#[tokio::test]
async fn kubectl_flotilla_streams_worker_logs_and_injects_faults() {
    let cp = flotilla_tests::control_plane_for(module_path!()).await;
    install_crds(&cp).expect("CRDs install");
    let client = cp.client().await.expect("client");
    let ns = flotilla_tests::namespace(&client, "plugin").await.expect("namespace");
    let rig = Rig::start(&cp, &ns, &client).await;
    let jobs: Api<TrainingJob> = Api::namespaced(client.clone(), &ns);
    let nodes: Api<GpuNode> = Api::all(client.clone());

    // Each agent reports its admin URL; the operator mirrors it into the GpuNode.
    for (agent, port) in &rig.agents {
        let want = format!("http://127.0.0.1:{port}");
        eventually(WAIT, "GpuNode adminUrl", || async {
            let url = nodes.get(&agent.node).await.ok()?.status?.admin_url?;
            (url == want).then_some(())
        })
        .await
        .unwrap_or_else(|e| panic!("{e}: {} wants {want}\n{}", agent.node, rig.logs()));
    }

    jobs.create(&PostParams::default(), &tiny_engine_job("plug-e2e", 300, 50))
        .await
        .expect("create job");
    let running = eventually(WAIT, "plug-e2e Running", || async {
        let j = jobs.get("plug-e2e").await.ok()?;
        let s = j.status.clone()?;
        (s.phase == JobPhase::Running).then_some(j)
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", rig.logs()));
    let uid = running.metadata.uid.clone().expect("uid");
    let attempt = running.status.clone().and_then(|s| s.attempt).expect("attempt");
    let seat = attempt.placement.workers.iter().find(|w| w.rank == 1).expect("rank 1").clone();
    let file = log_file(&rig, &seat.node, &uid, attempt.number, 1);
    eventually(WAIT, "rank 1 wrote its log", || async { (!read(&file).is_empty()).then_some(()) })
        .await
        .unwrap_or_else(|e| panic!("{e}: {}\n{}", file.display(), rig.logs()));

    // Follow from early on; it must end by itself once the job (and so the worker) ends.
    let follower = kubectl_flotilla(&cp)
        .args(["logs", "plug-e2e", "-n", &ns, "--rank", "1", "-f"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kubectl flotilla logs -f");

    let out = run(kubectl_flotilla(&cp).args(["logs", "plug-e2e", "-n", &ns, "--rank", "1"]));
    assert!(out.status.success(), "logs: {}", text(&out.stderr));
    let printed = text(&out.stdout);
    assert!(!printed.is_empty(), "logs printed nothing");
    assert!(
        read(&file).starts_with(&printed),
        "logs printed what rank 1's log file does not hold:\n{printed}\n---\n{}",
        read(&file)
    );

    let out = run(kubectl_flotilla(&cp).args(["logs", "no-such-job", "-n", &ns]));
    assert!(!out.status.success(), "an unknown job must fail");
    assert!(
        text(&out.stderr).contains("TrainingJob no-such-job not found"),
        "{}",
        text(&out.stderr)
    );
    let out = run(kubectl_flotilla(&cp).args(["logs", "plug-e2e", "-n", &ns, "--rank", "7"]));
    assert!(!out.status.success(), "a rank out of range must fail");
    let err = text(&out.stderr);
    assert!(err.contains("--rank") && err.contains("got 7"), "{err}");

    let done = eventually(Duration::from_secs(300), "plug-e2e finished", || async {
        let s = jobs.get("plug-e2e").await.ok()?.status?;
        s.phase.is_terminal().then_some(s)
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", rig.logs()));
    assert_eq!(done.phase, JobPhase::Succeeded, "{:?}\n{}", done.message, rig.logs());

    let (mut follower, started) = (follower, Instant::now());
    let status = loop {
        if let Some(status) = follower.try_wait().expect("wait") {
            break status;
        }
        assert!(
            started.elapsed() < WAIT,
            "kubectl flotilla logs -f did not end after the job ended\n{}",
            rig.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let followed = follower.wait_with_output().expect("follower output");
    assert!(status.success(), "logs -f: {}", text(&followed.stderr));
    assert_eq!(text(&followed.stdout), read(&file), "logs -f printed the whole log, once");

    // Inject an XID 79 into a GPU through the plugin; the operator marks it Failed.
    let victim = rig.node_names()[0].clone();
    let out = run(kubectl_flotilla(&cp).args(["inject", &victim, "--gpu", "3", "--xid", "79"]));
    assert!(out.status.success(), "inject: {}", text(&out.stderr));
    eventually(WAIT, "GPU 3 Failed", || async {
        let status = nodes.get(&victim).await.ok()?.status?;
        let gpu = status.gpus.iter().find(|g| g.index == 3)?;
        (gpu.health == GpuHealth::Failed).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", rig.logs()));
    let out =
        run(kubectl_flotilla(&cp).args(["inject", "no-such-node", "--gpu", "0", "--xid", "79"]));
    assert!(!out.status.success(), "an unknown node must fail");
    assert!(text(&out.stderr).contains("GpuNode no-such-node not found"), "{}", text(&out.stderr));
}
