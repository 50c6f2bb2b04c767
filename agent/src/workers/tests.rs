//! The process supervisor with real child processes.

use super::*;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

fn launch(job: &str, attempt: u64, script: &str) -> WorkerLaunch {
    WorkerLaunch {
        id: WorkerId { job_uid: job.into(), attempt, rank: 1 },
        local_rank: 0,
        world_size: 2,
        gpu_uuids: vec!["GPU-a".into(), "GPU-b".into()],
        command: "sh".into(),
        args: vec!["-c".into(), script.into()],
        env: [("USER_VAR".to_string(), "kept".to_string())].into(),
        checkpoint_dir: "/ckpt/job".into(),
        master_addr: "127.0.0.1".into(),
        master_port: 29500,
    }
}

fn supervisor(dir: &Path) -> (Arc<ProcessSupervisor>, mpsc::UnboundedReceiver<WorkerUpdate>) {
    let files = WorkerFiles {
        log_dir: dir.join("logs"),
        socket_dir: dir.join("s"),
        max_log_bytes: 4096,
        sim_misbehaviour_dir: None,
    };
    let sup = ProcessSupervisor::new(files).expect("supervisor");
    let (tx, rx) = mpsc::unbounded_channel();
    sup.attach(tx);
    (sup, rx)
}

async fn next(rx: &mut mpsc::UnboundedReceiver<WorkerUpdate>) -> WorkerUpdate {
    tokio::time::timeout(Duration::from_secs(20), rx.recv())
        .await
        .expect("an update within 20 s")
        .expect("channel open")
}

#[tokio::test]
async fn a_worker_gets_the_torchrun_environment_and_its_output_is_logged() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (sup, mut rx) = supervisor(dir.path());
    let job = launch("job-1", 3, "env; echo done; exit 7");
    sup.launch(job.clone()).expect("launch");
    assert_eq!(next(&mut rx).await, WorkerUpdate::Started(job.id.clone()));
    match next(&mut rx).await {
        WorkerUpdate::Exited { id, code, signal } => {
            assert_eq!((id, code, signal), (job.id.clone(), Some(7), None));
        }
        other => panic!("expected Exited, got {other:?}"),
    }
    let log = std::fs::read_to_string(sup.log_path(&job.id)).expect("log");
    for line in [
        "RANK=1",
        "LOCAL_RANK=0",
        "WORLD_SIZE=2",
        "MASTER_ADDR=127.0.0.1",
        "MASTER_PORT=29500",
        "CUDA_VISIBLE_DEVICES=GPU-a,GPU-b",
        "FLOTILLA_ATTEMPT=3",
        "FLOTILLA_CHECKPOINT_DIR=/ckpt/job",
        "USER_VAR=kept",
        "done",
    ] {
        assert!(log.lines().any(|l| l == line), "log lacks {line}:\n{log}");
    }
    assert!(sup.running().is_empty());
}

#[tokio::test]
async fn stop_kills_the_whole_group_after_the_grace_period() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (sup, mut rx) = supervisor(dir.path());
    // The leader ignores SIGTERM, and leaves a grandchild in its group.
    let job = launch("job-2", 1, "trap '' TERM; sleep 300 & echo $! > grandchild; wait");
    let cwd_script = format!("cd {} && {}", dir.path().display(), job.args[1]);
    let job = WorkerLaunch { args: vec!["-c".into(), cwd_script], ..job };
    sup.launch(job.clone()).expect("launch");
    assert_eq!(next(&mut rx).await, WorkerUpdate::Started(job.id.clone()));
    let pidfile = dir.path().join("grandchild");
    for _ in 0..200 {
        if std::fs::read_to_string(&pidfile).is_ok_and(|s| s.ends_with('\n')) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let grandchild: i32 =
        std::fs::read_to_string(&pidfile).expect("pid file").trim().parse().expect("pid");
    assert_eq!(sup.running().len(), 1);

    sup.stop("job-2", 1, None, Duration::from_millis(300), "test").expect("stop");
    match next(&mut rx).await {
        WorkerUpdate::Exited { id, signal, .. } => {
            assert_eq!(id, job.id);
            assert_eq!(signal, Some(9), "SIGTERM was ignored, so SIGKILL ended it");
        }
        other => panic!("expected Exited, got {other:?}"),
    }
    let alive = nix::sys::signal::kill(Pid::from_raw(grandchild), None).is_ok();
    assert!(!alive, "grandchild {grandchild} outlived its worker");
    assert!(sup.running().is_empty());
}

#[tokio::test]
async fn a_repeated_stop_sends_no_second_sigterm() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (sup, mut rx) = supervisor(dir.path());
    // Counts SIGTERMs (like the engine, a second one would mean "skip the checkpoint"),
    // exits 0 two seconds after the first.
    let script = format!(
        "cd {} && n=0; trap 'n=$((n+1)); echo $n > terms' TERM; \
         while [ ! -f terms ]; do sleep 0.05; done; sleep 2; exit 0",
        dir.path().display()
    );
    let job = launch("job-4", 1, &script);
    sup.launch(job.clone()).expect("launch");
    assert_eq!(next(&mut rx).await, WorkerUpdate::Started(job.id.clone()));
    tokio::time::sleep(Duration::from_millis(200)).await;
    for _ in 0..3 {
        sup.stop("job-4", 1, None, Duration::from_secs(30), "test").expect("stop");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    match next(&mut rx).await {
        WorkerUpdate::Exited { code, .. } => assert_eq!(code, Some(0)),
        other => panic!("expected Exited, got {other:?}"),
    }
    let terms = std::fs::read_to_string(dir.path().join("terms")).expect("terms file");
    assert_eq!(terms.trim(), "1", "three stops, one SIGTERM");
}

#[tokio::test]
async fn progress_lines_on_the_socket_become_updates_and_garbage_is_skipped() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (sup, mut rx) = supervisor(dir.path());
    let job = launch("job-3", 2, "echo \"$FLOTILLA_PROGRESS_SOCKET\"; sleep 30");
    sup.launch(job.clone()).expect("launch");
    assert_eq!(next(&mut rx).await, WorkerUpdate::Started(job.id.clone()));
    let log_path = sup.log_path(&job.id);
    let mut socket = String::new();
    for _ in 0..200 {
        socket = std::fs::read_to_string(&log_path).unwrap_or_default().trim().to_string();
        if !socket.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let mut stream = tokio::net::UnixStream::connect(&socket).await.expect("connect");
    stream.write_all(b"not json\n").await.expect("write");
    stream
        .write_all(b"{\"step\":5,\"totalSteps\":10,\"loss\":1.5,\"tokensPerSecond\":100.0,\"lastCheckpointStep\":4}\n")
        .await
        .expect("write");
    match next(&mut rx).await {
        WorkerUpdate::Progress(id, p) => {
            assert_eq!(id, job.id);
            assert_eq!((p.step, p.total_steps, p.last_checkpoint_step), (5, 10, 4));
            assert!((p.loss - 1.5).abs() < 1e-9);
        }
        other => panic!("expected Progress, got {other:?}"),
    }
    sup.kill_all("test over");
    assert!(matches!(next(&mut rx).await, WorkerUpdate::Exited { signal: Some(9), .. }));
}
