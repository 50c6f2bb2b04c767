//! The agent's admin HTTP server: `/metrics`, `/live`, `/ready`, `/gpus`, and — with the simulated
//! backend — fault injection (`POST /inject`) and `POST /clear`; `GET /v1/logs` streams a
//! worker's log file (see [`logs_router`]).

use crate::backend::simulated::{Injection, SimulatedBackend};
use crate::core::AgentCore;
use crate::supervisor::{WorkerId, WorkerSupervisor};
use crate::workers::{ProcessSupervisor, rotated_path};
use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

#[derive(Clone)]
struct AdminState {
    core: Arc<AgentCore>,
    sim: Option<Arc<SimulatedBackend>>,
}

/// Body of `POST /inject`: `{"gpu": 2, "fault": {"xid": 79}}`, `{"gpu": 0, "fault": "ecc_storm"}`.
#[derive(Debug, Deserialize)]
pub struct InjectRequest {
    /// GPU index.
    pub gpu: u32,
    /// The fault.
    pub fault: Injection,
}

/// Body of `POST /clear`.
#[derive(Debug, Deserialize)]
pub struct ClearRequest {
    /// GPU index.
    pub gpu: u32,
}

/// The admin router; `sim` enables injection, `worker_logs` serves `GET /v1/logs`.
pub fn router(
    core: Arc<AgentCore>,
    sim: Option<Arc<SimulatedBackend>>,
    worker_logs: Option<Arc<dyn WorkerLogSource>>,
) -> axum::Router {
    axum::Router::new()
        .route("/metrics", get(metrics))
        .route("/live", get(|| async { "ok" }))
        .route("/ready", get(ready))
        .route("/gpus", get(gpus))
        .route("/inject", post(inject))
        .route("/clear", post(clear))
        .with_state(AdminState { core, sim })
        .merge(logs_router(worker_logs))
}

async fn metrics(State(s): State<AdminState>) -> impl IntoResponse {
    ([("content-type", "text/plain; version=0.0.4")], s.core.metrics.render())
}

async fn ready(State(s): State<AdminState>) -> Response {
    if s.core.metrics.connected.get() == 1 {
        "ready".into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not connected to the operator").into_response()
    }
}

async fn gpus(State(s): State<AdminState>) -> impl IntoResponse {
    Json(s.core.view())
}

async fn inject(State(s): State<AdminState>, Json(req): Json<InjectRequest>) -> Response {
    let Some(sim) = s.sim else {
        return (StatusCode::BAD_REQUEST, "fault injection needs --backend simulated")
            .into_response();
    };
    match sim.inject(req.gpu, req.fault) {
        Ok(()) => (StatusCode::OK, format!("injected {:?} into gpu {}", req.fault, req.gpu))
            .into_response(),
        Err(e) => (StatusCode::BAD_REQUEST, e.to_string()).into_response(),
    }
}

async fn clear(State(s): State<AdminState>, Json(req): Json<ClearRequest>) -> Response {
    match s.core.admin_clear(req.gpu) {
        Ok(()) => (StatusCode::OK, format!("gpu {} cleared", req.gpu)).into_response(),
        Err(e) => (StatusCode::BAD_REQUEST, e.to_string()).into_response(),
    }
}

/// Sends one JSON POST to an agent's admin server (used by `flotilla-agent inject` / `clear`).
pub async fn post_json(addr: &str, path: &str, body: &serde_json::Value) -> Result<String, String> {
    let request = http_client(addr)?.post(format!("http://{addr}{path}")).json(body);
    let response = send(request, addr, "POST", path).await?;
    let status = response.status();
    let bytes = response.bytes().await.map_err(|e| format!("POST {path}: {e}"))?;
    let text = String::from_utf8_lossy(&bytes).into_owned();
    if status.is_success() { Ok(text) } else { Err(format!("{status}: {text}")) }
}

/// The one HTTP client of the agent's admin calls: plain HTTP to `addr`, no proxy (an admin
/// server is reached directly, as before, whatever `HTTP_PROXY` says).
fn http_client(addr: &str) -> Result<reqwest::Client, String> {
    reqwest::Client::builder()
        .no_proxy()
        .build()
        .map_err(|e| format!("HTTP client for {addr}: {e}"))
}

async fn send(
    request: reqwest::RequestBuilder,
    addr: &str,
    method: &str,
    path: &str,
) -> Result<reqwest::Response, String> {
    request.send().await.map_err(|e| {
        if e.is_connect() {
            format!("connecting to {addr}: {e}")
        } else {
            format!("{method} {path}: {e}")
        }
    })
}

/// Where a worker's log file is and whether the worker still runs: what `GET /v1/logs` needs.
pub trait WorkerLogSource: Send + Sync + std::fmt::Debug {
    /// The worker's current log file (the rotated earlier chunk is `<file>.1`).
    fn log_path(&self, id: &WorkerId) -> PathBuf;
    /// Whether the worker is still running (its output may still grow).
    fn is_running(&self, id: &WorkerId) -> bool;
}

impl WorkerLogSource for ProcessSupervisor {
    fn log_path(&self, id: &WorkerId) -> PathBuf {
        ProcessSupervisor::log_path(self, id)
    }

    fn is_running(&self, id: &WorkerId) -> bool {
        self.running().iter().any(|w| &w.id == id)
    }
}

/// How often a followed log is polled for new bytes.
const FOLLOW_POLL: Duration = Duration::from_millis(200);

/// The worker a `GET /v1/logs` names.
#[derive(Clone, Debug, PartialEq)]
pub struct LogQuery {
    /// The worker.
    pub id: WorkerId,
    /// Keep streaming new bytes until the worker has exited.
    pub follow: bool,
}

/// Parses `job=<uid>&attempt=<n>&rank=<r>[&follow=true]`; the error names the parameter.
pub fn parse_log_query(params: &HashMap<String, String>) -> Result<LogQuery, String> {
    if let Some(unknown) =
        params.keys().find(|k| !["job", "attempt", "rank", "follow"].contains(&k.as_str()))
    {
        return Err(format!(
            "{unknown}: unknown parameter (expected job, attempt, rank and optionally follow)"
        ));
    }
    let job = params.get("job").map(String::as_str).unwrap_or_default();
    if job.is_empty() {
        return Err("job: expected the TrainingJob's UID, got nothing".into());
    }
    if !job.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') || job.len() > 128 {
        return Err(format!("job: expected a UID (letters, digits, '-'), got {job:?}"));
    }
    let number = |name: &str| -> Result<u64, String> {
        let raw = params
            .get(name)
            .ok_or_else(|| format!("{name}: expected a non-negative integer, got nothing"))?;
        raw.parse::<u64>()
            .map_err(|_| format!("{name}: expected a non-negative integer, got {raw:?}"))
    };
    let attempt = number("attempt")?;
    let rank = u32::try_from(number("rank")?)
        .map_err(|_| format!("rank: expected at most {}, got {}", u32::MAX, params["rank"]))?;
    let follow = match params.get("follow").map(String::as_str) {
        None | Some("false") | Some("0") => false,
        Some("true") | Some("1") | Some("") => true,
        Some(other) => return Err(format!("follow: expected true or false, got {other:?}")),
    };
    Ok(LogQuery { id: WorkerId { job_uid: job.to_owned(), attempt, rank }, follow })
}

/// `GET /v1/logs` over `source` (`None`: answers 503, this agent keeps no worker logs).
pub fn logs_router(source: Option<Arc<dyn WorkerLogSource>>) -> axum::Router {
    axum::Router::new().route("/v1/logs", get(logs)).with_state(source)
}

async fn logs(
    State(source): State<Option<Arc<dyn WorkerLogSource>>>,
    Query(params): Query<HashMap<String, String>>,
) -> Response {
    let Some(source) = source else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "this agent runs no worker supervisor: no logs\n",
        )
            .into_response();
    };
    let query = match parse_log_query(&params) {
        Ok(q) => q,
        Err(e) => return (StatusCode::BAD_REQUEST, format!("{e}\n")).into_response(),
    };
    let path = source.log_path(&query.id);
    let exists = tokio::fs::metadata(&path).await.is_ok()
        || tokio::fs::metadata(rotated_path(&path)).await.is_ok();
    let wait_for_it = query.follow && source.is_running(&query.id);
    if !(exists || wait_for_it) {
        let LogQuery { id, .. } = &query;
        return (
            StatusCode::NOT_FOUND,
            format!(
                "no log for job {} attempt {} rank {} on this node (looked for {})\n",
                id.job_uid,
                id.attempt,
                id.rank,
                path.display()
            ),
        )
            .into_response();
    }
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<Bytes>>(16);
    tokio::spawn(async move {
        if let Err(e) = pump(source, query, path, tx.clone()).await {
            // The client is gone (or the file vanished): nothing to crash over.
            tracing::debug!(error = %e, "log stream ended early");
        }
    });
    (
        [("content-type", "text/plain; charset=utf-8")],
        Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx)),
    )
        .into_response()
}

type Chunks = tokio::sync::mpsc::Sender<std::io::Result<Bytes>>;

/// Sends everything from the file's position to its end.
async fn drain(file: &mut tokio::fs::File, tx: &Chunks) -> std::io::Result<()> {
    use tokio::io::AsyncReadExt;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = file.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        tx.send(Ok(Bytes::copy_from_slice(&buf[..n])))
            .await
            .map_err(|_| std::io::Error::other("client went away"))?;
    }
}

fn inode(meta: &std::fs::Metadata) -> u64 {
    use std::os::unix::fs::MetadataExt;
    meta.ino()
}

/// Streams the earlier chunk (if any), then the current file; when following, keeps reading
/// new bytes (and follows a rotation) until the worker has exited and the file is drained.
async fn pump(
    source: Arc<dyn WorkerLogSource>,
    query: LogQuery,
    path: PathBuf,
    tx: Chunks,
) -> std::io::Result<()> {
    let mut current: Option<(tokio::fs::File, u64)> = None;
    if let Ok(mut old) = tokio::fs::File::open(rotated_path(&path)).await {
        drain(&mut old, &tx).await?;
    }
    loop {
        // Asked before reading: once it is not running, its output is complete on disk.
        let running = query.follow && source.is_running(&query.id);
        loop {
            if let Some((file, _)) = current.as_mut() {
                drain(file, &tx).await?;
            }
            // (Re)open when the path now names another file: created, or rotated under us.
            let on_disk = tokio::fs::metadata(&path).await.ok().map(|m| inode(&m));
            match (on_disk, current.as_ref().map(|(_, ino)| *ino)) {
                (Some(new), old) if Some(new) != old => {
                    let file = tokio::fs::File::open(&path).await?;
                    current = Some((file, new));
                }
                _ => break,
            }
        }
        if !running {
            return Ok(());
        }
        tokio::time::sleep(FOLLOW_POLL).await;
    }
}

/// `GET`s `path` from an admin server at `addr` (`host:port`), calling `on_chunk` for each
/// piece of the body as it arrives. A non-2xx answer is an error with its status and text.
pub async fn get_streaming(
    addr: &str,
    path: &str,
    mut on_chunk: impl FnMut(&[u8]),
) -> Result<(), String> {
    let request = http_client(addr)?.get(format!("http://{addr}{path}"));
    let mut response = send(request, addr, "GET", path).await?;
    let status = response.status();
    if !status.is_success() {
        let bytes = response.bytes().await.map_err(|e| format!("GET {path}: {e}"))?;
        return Err(format!("{status}: {}", String::from_utf8_lossy(&bytes).trim_end()));
    }
    while let Some(chunk) = response.chunk().await.map_err(|e| format!("reading {path}: {e}"))? {
        on_chunk(&chunk);
    }
    Ok(())
}

/// `GET`s `path` and returns the whole body as text (non-2xx: an error with status and text).
pub async fn get_text(addr: &str, path: &str) -> Result<String, String> {
    let mut out = Vec::new();
    get_streaming(addr, path, |c| out.extend_from_slice(c)).await?;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Debug)]
    struct FakeSource {
        dir: PathBuf,
        running: Mutex<bool>,
    }

    impl WorkerLogSource for FakeSource {
        fn log_path(&self, id: &WorkerId) -> PathBuf {
            self.dir.join(format!("{}-{}-{}.log", id.job_uid, id.attempt, id.rank))
        }
        fn is_running(&self, _: &WorkerId) -> bool {
            *self.running.lock().unwrap()
        }
    }

    fn params(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    async fn serve(source: Option<Arc<dyn WorkerLogSource>>) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        tokio::spawn(async move { axum::serve(listener, logs_router(source)).await });
        addr
    }

    #[test]
    fn bad_queries_name_the_parameter() {
        let ok = params(&[("job", "abc-1"), ("attempt", "2"), ("rank", "1")]);
        let q = parse_log_query(&ok).unwrap();
        assert_eq!(q.id, WorkerId { job_uid: "abc-1".into(), attempt: 2, rank: 1 });
        assert!(!q.follow);
        let cases: &[(&[(&str, &str)], &str)] = &[
            (&[("attempt", "1"), ("rank", "0")], "job:"),
            (&[("job", "../etc"), ("attempt", "1"), ("rank", "0")], "job:"),
            (&[("job", "a"), ("rank", "0")], "attempt:"),
            (&[("job", "a"), ("attempt", "-1"), ("rank", "0")], "attempt:"),
            (&[("job", "a"), ("attempt", "1"), ("rank", "x")], "rank:"),
            (&[("job", "a"), ("attempt", "1"), ("rank", "99999999999")], "rank:"),
            (&[("job", "a"), ("attempt", "1"), ("rank", "0"), ("follow", "maybe")], "follow:"),
            (&[("job", "a"), ("attempt", "1"), ("rank", "0"), ("tail", "3")], "tail:"),
        ];
        for (pairs, field) in cases {
            let err = parse_log_query(&params(pairs)).unwrap_err();
            assert!(err.starts_with(field), "{pairs:?}: {err}");
        }
    }

    #[tokio::test]
    async fn serves_the_earlier_chunk_then_the_current_file_and_answers_4xx_for_bad_input() {
        let dir = tempfile::tempdir().unwrap();
        let source =
            Arc::new(FakeSource { dir: dir.path().to_owned(), running: Mutex::new(false) });
        let id = WorkerId { job_uid: "j1".into(), attempt: 3, rank: 1 };
        let path = source.log_path(&id);
        std::fs::write(rotated_path(&path), "old line\n").unwrap();
        std::fs::write(&path, "new line\n").unwrap();
        let addr = serve(Some(source)).await;
        let body = get_text(&addr, "/v1/logs?job=j1&attempt=3&rank=1").await.unwrap();
        assert_eq!(body, "old line\nnew line\n");

        let err = get_text(&addr, "/v1/logs?job=j1&attempt=3&rank=2").await.unwrap_err();
        assert!(err.starts_with("404") && err.contains("rank 2"), "{err}");
        let err = get_text(&addr, "/v1/logs?job=j1&attempt=x&rank=1").await.unwrap_err();
        assert!(err.starts_with("400") && err.contains("attempt:"), "{err}");
        let none = serve(None).await;
        let err = get_text(&none, "/v1/logs?job=j1&attempt=3&rank=1").await.unwrap_err();
        assert!(err.starts_with("503"), "{err}");
    }

    #[tokio::test]
    async fn follow_streams_new_bytes_and_a_rotation_until_the_worker_exits() {
        let dir = tempfile::tempdir().unwrap();
        let source = Arc::new(FakeSource { dir: dir.path().to_owned(), running: Mutex::new(true) });
        let id = WorkerId { job_uid: "j2".into(), attempt: 0, rank: 0 };
        let path = source.log_path(&id);
        let addr = serve(Some(source.clone())).await;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let reader = tokio::spawn(async move {
            get_streaming(&addr, "/v1/logs?job=j2&attempt=0&rank=0&follow=true", |chunk| {
                let _ = tx.send(chunk.to_vec());
            })
            .await
        });
        let mut seen = Vec::new();
        let mut wait_for = async |want: &str, seen: &mut Vec<u8>| {
            while !String::from_utf8_lossy(seen).contains(want) {
                let chunk = tokio::time::timeout(Duration::from_secs(10), rx.recv())
                    .await
                    .unwrap_or_else(|_| {
                        panic!("waiting for {want:?}, got {:?}", String::from_utf8_lossy(seen))
                    })
                    .expect("stream open");
                seen.extend(chunk);
            }
        };
        // The file does not exist yet: a running worker's log is waited for.
        tokio::time::sleep(FOLLOW_POLL * 2).await;
        std::fs::write(&path, "first\n").unwrap();
        wait_for("first\n", &mut seen).await;
        {
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new().append(true).open(&path).unwrap();
            f.write_all(b"second\n").unwrap();
        }
        wait_for("second\n", &mut seen).await;
        // Rotation: the file moves to .1 and a fresh one starts.
        std::fs::rename(&path, rotated_path(&path)).unwrap();
        std::fs::write(&path, "third\n").unwrap();
        wait_for("third\n", &mut seen).await;
        assert!(!reader.is_finished(), "a running worker's log stream must stay open");
        std::fs::write(&path, "third\nlast\n").unwrap();
        *source.running.lock().unwrap() = false;
        let result = tokio::time::timeout(Duration::from_secs(10), reader)
            .await
            .expect("the stream ends once the worker has exited")
            .unwrap();
        assert!(result.is_ok(), "{result:?}");
        while let Ok(chunk) = rx.try_recv() {
            seen.extend(chunk);
        }
        assert_eq!(String::from_utf8_lossy(&seen), "first\nsecond\nthird\nlast\n");
    }
}
