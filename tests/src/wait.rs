//! Waiting for a condition, polled.

use std::time::{Duration, Instant};

use anyhow::{Result, bail};

/// How long each phase of an end-to-end test may take.
pub const WAIT: Duration = Duration::from_secs(120);

/// Poll `check` every 200 ms until it returns `Some`, or fail after `timeout` with `what`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = check().await {
            return Ok(v);
        }
        if start.elapsed() > timeout {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
