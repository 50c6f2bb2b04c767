//! The agent's admin HTTP server: `/metrics`, `/live`, `/ready`, `/gpus`, and — with the simulated
//! backend — fault injection (`POST /inject`) and `POST /clear`.

use crate::backend::simulated::{Injection, SimulatedBackend};
use crate::core::AgentCore;
use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use std::sync::Arc;

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

/// The admin router; `sim` enables injection.
pub fn router(core: Arc<AgentCore>, sim: Option<Arc<SimulatedBackend>>) -> axum::Router {
    axum::Router::new()
        .route("/metrics", get(metrics))
        .route("/live", get(|| async { "ok" }))
        .route("/ready", get(ready))
        .route("/gpus", get(gpus))
        .route("/inject", post(inject))
        .route("/clear", post(clear))
        .with_state(AdminState { core, sim })
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
    use hyper_util::rt::TokioIo;
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connecting to {addr}: {e}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("HTTP handshake with {addr}: {e}"))?;
    tokio::spawn(conn);
    let request = hyper::Request::post(path)
        .header("host", addr)
        .header("content-type", "application/json")
        .body(body.to_string())
        .map_err(|e| e.to_string())?;
    let response = sender.send_request(request).await.map_err(|e| format!("POST {path}: {e}"))?;
    let status = response.status();
    let bytes = http_body_util_collect(response.into_body()).await?;
    let text = String::from_utf8_lossy(&bytes).into_owned();
    if status.is_success() { Ok(text) } else { Err(format!("{status}: {text}")) }
}

async fn http_body_util_collect(mut body: hyper::body::Incoming) -> Result<Vec<u8>, String> {
    use hyper::body::Body;
    let mut out = Vec::new();
    while let Some(frame) =
        std::future::poll_fn(|cx| std::pin::Pin::new(&mut body).poll_frame(cx)).await
    {
        let frame = frame.map_err(|e| e.to_string())?;
        if let Ok(data) = frame.into_data() {
            out.extend_from_slice(&data);
        }
    }
    Ok(out)
}
