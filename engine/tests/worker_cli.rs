//! The `flotilla-worker` binary: two ranks on loopback train (reporting progress to an agent
//! socket), are stopped by SIGTERM after a checkpoint and resume exactly; a killed rank is named
//! by the survivor, which exits promptly.
#![cfg(feature = "runtime")]

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::time::{Duration, Instant};

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// A running rank and the lines of its stderr.
struct Worker {
    child: Child,
    stderr: Receiver<String>,
    seen: Vec<String>,
}

impl Worker {
    fn start(rank: usize, port: u16, dir: &Path, steps: u64) -> Self {
        Self::start_with(rank, port, dir, steps, &[])
    }

    fn start_with(rank: usize, port: u16, dir: &Path, steps: u64, env: &[(&str, &Path)]) -> Self {
        let mut command = Command::new(env!("CARGO_BIN_EXE_flotilla-worker"));
        command
            .args(["train", "--preset", "tiny", "--no-progress-bar", "--checkpoint-interval", "0"])
            .args(["--steps", &steps.to_string()])
            .arg("--checkpoint-dir")
            .arg(dir)
            .envs(env.iter().copied());
        Self::spawn(command, rank, 2, port)
    }

    /// Rank `rank` of an expert-parallel `serve` group of `world` (rank 0 on `http_port`).
    fn serve(rank: usize, world: usize, port: u16, http_port: u16) -> Self {
        let mut command = Command::new(env!("CARGO_BIN_EXE_flotilla-worker"));
        command
            .args(["serve", "--preset", "tiny", "--host", "127.0.0.1"])
            .args(["--port", &http_port.to_string()])
            .env_remove("FLOTILLA_CHECKPOINT_DIR");
        Self::spawn(command, rank, world, port)
    }

    fn spawn(mut command: Command, rank: usize, world: usize, port: u16) -> Self {
        let mut child = command
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string())
            .env("RANK", rank.to_string())
            .env("WORLD_SIZE", world.to_string())
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn worker");
        let (tx, stderr) = channel();
        let pipe = child.stderr.take().expect("stderr");
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        Self { child, stderr, seen: Vec::new() }
    }

    /// Waits until a stderr line contains `needle`.
    fn wait_for(&mut self, needle: &str, limit: Duration) {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(line) = self.stderr.recv_timeout(Duration::from_millis(100)) {
                let hit = line.contains(needle);
                self.seen.push(line);
                if hit {
                    return;
                }
            }
        }
        panic!("no line containing {needle:?} within {limit:?}; saw {:#?}", self.seen);
    }

    /// Waits for exit; returns (code, stdout, all stderr).
    fn finish(mut self, limit: Duration) -> (Option<i32>, String, String) {
        let deadline = Instant::now() + limit;
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                break status;
            }
            assert!(Instant::now() < deadline, "worker did not exit within {limit:?}: it hangs");
            std::thread::sleep(Duration::from_millis(50));
        };
        let mut out = String::new();
        if let Some(mut stdout) = self.child.stdout.take() {
            let _ = std::io::Read::read_to_string(&mut stdout, &mut out);
        }
        self.seen.extend(self.stderr.try_iter());
        (status.code(), out, self.seen.join("\n"))
    }

    fn signal(&self, name: &str) {
        let ok =
            Command::new("kill").args([name, &self.child.id().to_string()]).status().expect("kill");
        assert!(ok.success());
    }
}

fn final_loss(stdout: &str) -> String {
    stdout
        .lines()
        .find_map(|l| l.split("final loss ").nth(1))
        .expect("final loss line")
        .split(' ')
        .next()
        .unwrap_or("")
        .to_owned()
}

#[test]
fn a_killed_rank_is_named_and_the_survivor_exits_promptly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let mut rank0 = Worker::start(0, port, dir.path(), 1_000_000);
    let mut rank1 = Worker::start(1, port, dir.path(), 1_000_000);
    rank0.wait_for("training", Duration::from_secs(60));
    rank1.child.kill().expect("kill rank 1");
    let (code, _, stderr) = rank0.finish(Duration::from_secs(20));
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("lost rank 1"), "{stderr}");
    let _ = rank1.finish(Duration::from_secs(5));
}

#[test]
fn sigterm_checkpoints_and_the_resumed_run_matches_an_uninterrupted_one() {
    let steps = 60;
    let straight = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let socket_path = straight.path().join("progress.sock");
    let agent = UnixListener::bind(&socket_path).expect("agent socket");
    let agent = std::thread::spawn(move || {
        let (conn, _) = agent.accept().expect("worker connects");
        BufReader::new(conn).lines().map_while(Result::ok).collect::<Vec<_>>()
    });
    let env = [("FLOTILLA_PROGRESS_SOCKET", socket_path.as_path())];
    let a = Worker::start_with(0, port, straight.path(), steps, &env);
    let b = Worker::start(1, port, straight.path(), steps);
    let (code, expected_out, stderr) = a.finish(Duration::from_secs(120));
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(b.finish(Duration::from_secs(10)).0, Some(0));
    let all: Vec<serde_json::Value> = agent
        .join()
        .expect("agent thread")
        .iter()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    // A `starting` line first and a `checkpointing` line before the final checkpoint; the
    // heartbeat adds no line while the worker keeps stepping.
    let activity = |v: &serde_json::Value| v["activity"].as_str().unwrap_or("training").to_owned();
    assert_eq!(activity(&all[0]), "starting", "{:?}", all[0]);
    let others: Vec<String> =
        all.iter().map(activity).filter(|a| a != "training" && a != "starting").collect();
    assert!(others.iter().all(|a| a == "checkpointing"), "{others:?}");
    let lines: Vec<&serde_json::Value> = all.iter().filter(|v| activity(v) == "training").collect();
    assert_eq!(lines.len() as u64, steps, "one training line per step");
    assert!(lines.iter().all(|v| v["stepSeconds"].as_f64().is_some_and(|s| s > 0.0)));
    let last = lines[lines.len() - 1];
    assert_eq!(last["step"], steps);
    assert_eq!(last["totalSteps"], steps);
    assert_eq!(last["lastCheckpointStep"], steps);
    assert!(
        last["loss"].as_f64().is_some_and(|l| l > 0.0)
            && last["tokensPerSecond"].as_f64().is_some()
    );

    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let mut a = Worker::start(0, port, dir.path(), steps);
    let b = Worker::start(1, port, dir.path(), steps);
    a.wait_for("step=4", Duration::from_secs(60));
    a.signal("-TERM");
    b.signal("-TERM");
    let (code, _, stderr) = a.finish(Duration::from_secs(30));
    assert_eq!(code, Some(143), "{stderr}");
    assert_eq!(b.finish(Duration::from_secs(10)).0, Some(143));
    let latest = std::fs::read_to_string(dir.path().join("latest")).expect("latest written");
    assert!(latest.starts_with("step-"), "{latest}");

    let port = free_port();
    let a = Worker::start(0, port, dir.path(), steps);
    let b = Worker::start(1, port, dir.path(), steps);
    let (code, resumed_out, stderr) = a.finish(Duration::from_secs(120));
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.contains("resumed from checkpoint"), "{stderr}");
    assert_eq!(b.finish(Duration::from_secs(10)).0, Some(0));
    assert_eq!(final_loss(&resumed_out), final_loss(&expected_out));
}

#[test]
fn serve_on_a_taken_port_exits_with_the_port_unavailable_code() {
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port().to_string();
    let out = Command::new(env!("CARGO_BIN_EXE_flotilla-worker"))
        .args(["serve", "--preset", "tiny", "--host", "127.0.0.1", "--port", &port])
        .env_remove("FLOTILLA_CHECKPOINT_DIR")
        .output()
        .expect("running flotilla-worker serve");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(i32::from(flotilla_engine::exit::PORT_UNAVAILABLE)),
        "{stderr}"
    );
    assert!(stderr.contains(&format!("cannot bind 127.0.0.1:{port}")), "{stderr}");
}

/// `POST /v1/completions` on loopback; returns (status, body).
fn complete(http_port: u16, prompt: &str, max_tokens: u32) -> reqwest::Result<(u16, String)> {
    let body = format!(r#"{{"prompt":"{prompt}","max_tokens":{max_tokens},"temperature":0}}"#);
    let response = reqwest::blocking::Client::builder()
        .no_proxy()
        .build()?
        .post(format!("http://127.0.0.1:{http_port}/v1/completions"))
        .header("content-type", "application/json")
        .body(body)
        .timeout(Duration::from_secs(30))
        .send()?;
    let status = response.status().as_u16();
    Ok((status, response.text()?))
}

#[test]
fn an_expert_parallel_group_serves_and_ends_together() {
    // Three ranks of the tiny model (8 routed experts: 2, 3 and 3 each); rank 0 serves.
    let (port, http_port) = (free_port(), free_port());
    let mut ranks: Vec<Worker> = (0..3).map(|r| Worker::serve(r, 3, port, http_port)).collect();
    for (rank, w) in ranks.iter_mut().enumerate() {
        w.wait_for("expert-parallel", Duration::from_secs(60));
        assert!(w.seen.last().is_some_and(|l| l.contains(&format!("rank={rank}"))));
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    let (status, body) = loop {
        match complete(http_port, "hello", 6) {
            Ok(answer) => break answer,
            Err(e) if Instant::now() < deadline => {
                eprintln!("not serving yet: {e}");
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => panic!("rank 0 never served: {e}"),
        }
    };
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(r#""completion_tokens":6"#), "{body}");

    // A clean stop of rank 0 stops the followers with it, successfully.
    let leader = ranks.remove(0);
    leader.signal("-TERM");
    assert_eq!(leader.finish(Duration::from_secs(20)).0, Some(0));
    for w in ranks {
        let (code, _, stderr) = w.finish(Duration::from_secs(20));
        assert_eq!(code, Some(0), "{stderr}");
        assert!(stderr.contains("the group's leader stopped serving"), "{stderr}");
    }
}

#[test]
fn a_killed_follower_ends_the_leader_with_an_error() {
    let (port, http_port) = (free_port(), free_port());
    let mut leader = Worker::serve(0, 2, port, http_port);
    let mut follower = Worker::serve(1, 2, port, http_port);
    follower.wait_for("expert-parallel", Duration::from_secs(60));
    leader.wait_for("expert-parallel", Duration::from_secs(60));
    let deadline = Instant::now() + Duration::from_secs(60);
    while complete(http_port, "hi", 1).map(|a| a.0).ok() != Some(200) {
        assert!(Instant::now() < deadline, "rank 0 never served");
        std::thread::sleep(Duration::from_millis(200));
    }
    follower.child.kill().expect("kill rank 1");
    let _ = follower.finish(Duration::from_secs(5));
    // The next request (or the idle heartbeat) finds the group broken.
    let answer = complete(http_port, "hi", 4);
    assert!(!matches!(answer, Ok((200, _))), "{answer:?}");
    let (code, _, stderr) = leader.finish(Duration::from_secs(20));
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("lost rank 1"), "{stderr}");
}

#[test]
fn the_portable_kernels_train_to_the_same_loss_as_the_default_ones() {
    let steps = 30;
    let run = |env: &[(&str, &Path)]| {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let a = Worker::start_with(0, port, dir.path(), steps, env);
        let b = Worker::start_with(1, port, dir.path(), steps, env);
        let (code, out, stderr) = a.finish(Duration::from_secs(120));
        assert_eq!(code, Some(0), "{stderr}");
        assert_eq!(b.finish(Duration::from_secs(10)).0, Some(0));
        let loss: f64 = final_loss(&out).parse().expect("a number");
        (loss, stderr)
    };
    let portable_env = [(flotilla_engine::model::PORTABLE_KERNELS_ENV, Path::new("1"))];
    let (portable, stderr) = run(&portable_env);
    assert!(stderr.contains(r#"kernels="portable""#), "it says which kernels ran: {stderr}");
    let (default, stderr) = run(&[]);
    let expected = if flotilla_engine::model::avx512_kernels() { "avx512" } else { "portable" };
    assert!(stderr.contains(&format!(r#"kernels="{expected}""#)), "{stderr}");
    // Different kernels sum in a different order, so the losses agree closely, not bitwise.
    let gap = (portable - default).abs() / default;
    assert!(portable.is_finite() && gap < 0.01, "portable {portable} vs default {default}");
}

/// `flotilla-worker train` with only the environment an agent gives a TrainingJob's worker: the
/// configuration as JSON in `FLOTILLA_ENGINE_CONFIG`, `FLOTILLA_NO_PROGRESS_BAR=1`.
fn train_from_env(config: &str, no_progress_bar: &str, rank: &str, dir: &Path) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_flotilla-worker"))
        .arg("train")
        .env_remove("FLOTILLA_CONFIG")
        .env_remove("FLOTILLA_PRESET")
        .env("FLOTILLA_ENGINE_CONFIG", config)
        .env("FLOTILLA_NO_PROGRESS_BAR", no_progress_bar)
        .env("FLOTILLA_CHECKPOINT_DIR", dir)
        .env("RANK", rank)
        .env("WORLD_SIZE", "1")
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", free_port().to_string())
        .output()
        .expect("running flotilla-worker train");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code().unwrap_or(-1), text)
}

#[test]
fn train_takes_its_configuration_as_json_from_the_environment() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = flotilla_engine::config::EngineConfig::preset("tiny").expect("tiny");
    config.training.steps = 12;
    let json = serde_json::to_string(&config).expect("config serialises");

    let (code, out) = train_from_env(&json, "1", "0", dir.path());
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("finished 12 steps"), "{out}");
    assert!(dir.path().join("latest").exists(), "checkpoint written: {out}");

    // The flag's variable takes the usual spellings; the group check after it is what fails.
    for value in ["0", "true", "false", "yes"] {
        let (code, out) = train_from_env(&json, value, "5", dir.path());
        assert_eq!(code, i32::from(flotilla_engine::exit::INVALID_CONFIG), "{value}: {out}");
        assert!(out.contains("RANK must be below WORLD_SIZE"), "{value}: {out}");
    }
    let (code, out) = train_from_env(&json, "maybe", "0", dir.path());
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("maybe"), "{out}");

    let (code, out) = train_from_env("{\"model\": 3}", "1", "0", dir.path());
    assert_eq!(code, i32::from(flotilla_engine::exit::INVALID_CONFIG), "{out}");
    assert!(out.contains("FLOTILLA_ENGINE_CONFIG"), "{out}");
}
