//! Fresh namespaces, one per test, so that tests sharing a control plane do not meet.

use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::Context;
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, ObjectMeta, PostParams};

/// Creates a fresh namespace named `<prefix>-<n>-<random>` and returns its name.
pub async fn namespace(client: &kube::Client, prefix: &str) -> anyhow::Result<String> {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let suffix = unique_suffix();
    // A namespace name is a DNS label: at most 63 characters.
    let prefix: String = prefix.chars().take(40).collect();
    let name = format!("{prefix}-{n}-{suffix}").to_lowercase();
    let ns = Namespace {
        metadata: ObjectMeta { name: Some(name.clone()), ..ObjectMeta::default() },
        ..Namespace::default()
    };
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
        .with_context(|| format!("creating namespace {name}"))?;
    Ok(name)
}

/// Six hex digits that differ between processes and calls.
pub(crate) fn unique_suffix() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    format!("{:06x}", (nanos ^ std::process::id().rotate_left(16)) & 0xff_ffff)
}
