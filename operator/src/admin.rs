//! The admin HTTP server: `/live`, `/ready`, `/metrics`.

use crate::metrics::Metrics;
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// What the admin endpoints read.
#[derive(Clone, Debug)]
pub struct AdminState {
    /// True once this replica is a synced leader or a connected standby.
    pub ready: Arc<AtomicBool>,
    /// The process's metrics.
    pub metrics: Metrics,
}

/// The admin routes.
pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/live", get(|| async { "live\n" }))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn ready(State(s): State<AdminState>) -> (StatusCode, &'static str) {
    if s.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

async fn metrics(State(s): State<AdminState>) -> ([(&'static str, &'static str); 1], String) {
    ([("content-type", "text/plain; version=0.0.4")], s.metrics.render())
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt;

    async fn get_status(state: &AdminState, path: &str) -> StatusCode {
        let req = Request::builder().uri(path).body(Body::empty()).unwrap();
        router(state.clone()).oneshot(req).await.unwrap().status()
    }

    #[tokio::test]
    async fn ready_follows_the_flag_and_live_always_answers() {
        let state = AdminState { ready: Arc::default(), metrics: Metrics::new() };
        assert_eq!(get_status(&state, "/live").await, StatusCode::OK);
        assert_eq!(get_status(&state, "/ready").await, StatusCode::SERVICE_UNAVAILABLE);
        state.ready.store(true, Ordering::Relaxed);
        assert_eq!(get_status(&state, "/ready").await, StatusCode::OK);
        assert_eq!(get_status(&state, "/metrics").await, StatusCode::OK);
    }
}
