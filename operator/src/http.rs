//! The one HTTP client the operator and `kubectl-flotilla` use for plain-HTTP calls to
//! replicas and agents (readiness checks, the agents' admin API).

use std::error::Error as _;
use std::sync::OnceLock;

/// The shared client. No connection is kept idle: each call is a fresh connection, so a
/// readiness check says whether a replica accepts connections now, not whether an old one
/// still works. No proxy from the environment: these addresses are cluster-internal.
pub fn client() -> &'static reqwest::Client {
    static CLIENT: OnceLock<reqwest::Client> = OnceLock::new();
    CLIENT.get_or_init(|| {
        reqwest::Client::builder()
            .pool_max_idle_per_host(0)
            .no_proxy()
            .build()
            .expect("building an HTTP client without TLS options cannot fail")
    })
}

/// An error and its causes in one line ("error sending request: connection refused").
pub fn cause(e: &reqwest::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}
