//! How clients reach an `InferenceService`: the readiness checks of its replicas, and the
//! selector-less `Service` plus the `EndpointSlice`s that list the replicas' addresses.
//!
//! A replica is ready only when one token comes back through its real HTTP API: the [`Prober`]
//! sends `POST /v1/completions` with `max_tokens: 1` to every running replica, once per period,
//! with a timeout, and wakes the service's reconciliation when a verdict changes. The slices
//! are built by pure functions from the status the controller computed; each distinct
//! (address type, port) gets one slice, because a slice's ports apply to all its endpoints and
//! replicas sharing a node address listen on different ports.

use crate::crd::InferenceService;
use crate::crd::inference_service::{ReplicaState, ReplicaStatus};
use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};
use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The label that ties an `EndpointSlice` to its `Service`.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// The label that says which controller manages an `EndpointSlice`.
pub const MANAGED_BY_LABEL: &str = "endpointslice.kubernetes.io/managed-by";
/// Our value of [`MANAGED_BY_LABEL`].
pub const MANAGED_BY: &str = "flotilla-operator.flotilla.dev";
/// The label selector of the `EndpointSlice`s of service `name`.
pub fn slice_selector(name: &str) -> String {
    format!("{SERVICE_NAME_LABEL}={name},{MANAGED_BY_LABEL}={MANAGED_BY}")
}

/// The name of the port in the `Service` and the slices.
pub const PORT_NAME: &str = "http";
/// Consecutive failed checks that turn a passing replica not ready.
const FAILURE_THRESHOLD: u32 = 2;

// === readiness checks ===

/// One generated token through `POST /v1/completions` at `addr` (`host:port`), within
/// `timeout`; `Err` says what went wrong.
pub async fn check_completion(addr: &str, timeout: Duration) -> Result<(), String> {
    complete(addr, "a", 1, timeout).await.map(drop)
}

/// `POST /v1/completions` with `prompt` and `max_tokens` at `addr` (`host:port`), on a new
/// connection, within `timeout`; the generated text, or what went wrong.
pub async fn complete(
    addr: &str,
    prompt: &str,
    max_tokens: u32,
    timeout: Duration,
) -> Result<String, String> {
    let body =
        serde_json::json!({ "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0 });
    let exchange = async {
        let response = crate::http::client()
            .post(format!("http://{addr}/v1/completions"))
            .json(&body)
            .send()
            .await
            .map_err(|e| format!("POST /v1/completions to {addr}: {}", crate::http::cause(&e)))?;
        let status = response.status();
        let bytes = response
            .bytes()
            .await
            .map_err(|e| format!("reading the answer of {addr}: {}", crate::http::cause(&e)))?;
        let text = String::from_utf8_lossy(&bytes);
        if !status.is_success() {
            return Err(format!("{addr} answered HTTP {status}: {}", text.trim()));
        }
        let value: serde_json::Value = serde_json::from_slice(&bytes)
            .map_err(|e| format!("{addr} answered something not JSON ({e}): {text}"))?;
        let generated = value["usage"]["completion_tokens"].as_u64().unwrap_or(0);
        match value["choices"][0]["text"].as_str() {
            Some(out) if generated >= 1 => Ok(out.to_string()),
            _ => Err(format!("{addr} answered without a generated token: {text}")),
        }
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .unwrap_or_else(|_| Err(format!("{addr}: no answer within {timeout:?}")))
}

/// The verdict on one replica's readiness.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Probe {
    /// The replica serves: its last check passed, or fewer than the failure threshold of
    /// checks failed since one did.
    pub passed: bool,
    /// At least one check has finished.
    pub checked: bool,
    /// The last failure, if the last check failed.
    pub message: Option<String>,
    failures: u32,
}

impl Probe {
    /// Fold in one check's outcome; true when the verdict changed.
    pub fn record(&mut self, outcome: Result<(), String>) -> bool {
        let before = self.passed;
        self.checked = true;
        match outcome {
            Ok(()) => {
                self.failures = 0;
                self.message = None;
                self.passed = true;
            }
            Err(e) => {
                self.failures = self.failures.saturating_add(1);
                self.message = Some(e);
                if self.failures >= FAILURE_THRESHOLD {
                    self.passed = false;
                }
            }
        }
        self.passed != before
    }
}

/// The service that wakes when a verdict changes.
pub type ServiceRef = ObjectRef<kube::core::DeserializeGuard<InferenceService>>;

struct Target {
    addr: String,
    probe: Arc<Mutex<Probe>>,
    task: tokio::task::AbortHandle,
}

/// Checks every running replica's readiness in the background. Cheap to clone.
#[derive(Clone)]
pub struct Prober {
    targets: Arc<Mutex<HashMap<String, Target>>>,
    wake: tokio::sync::mpsc::UnboundedSender<ServiceRef>,
    period: Duration,
    timeout: Duration,
}

impl std::fmt::Debug for Prober {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prober").field("period", &self.period).finish()
    }
}

impl Prober {
    /// A prober checking each replica every `period`, each check within `timeout`, and the
    /// services to look at again when a verdict changes.
    pub fn new(
        period: Duration,
        timeout: Duration,
    ) -> (Self, tokio::sync::mpsc::UnboundedReceiver<ServiceRef>) {
        let (wake, woken) = tokio::sync::mpsc::unbounded_channel();
        (Prober { targets: Arc::default(), wake, period, timeout }, woken)
    }

    /// Check exactly `wanted` (replica id → `host:port`) of the service whose replica ids start
    /// with `prefix`: start checking new ones, stop checking the others. Returns the current
    /// verdicts of `wanted`.
    pub fn sync(
        &self,
        prefix: &str,
        service: &ServiceRef,
        wanted: &BTreeMap<String, String>,
    ) -> BTreeMap<String, Probe> {
        let mut targets = self.targets.lock().unwrap_or_else(|e| e.into_inner());
        targets.retain(|id, t| {
            let keep = !id.starts_with(prefix) || wanted.get(id) == Some(&t.addr);
            if !keep {
                t.task.abort();
            }
            keep
        });
        let mut out = BTreeMap::new();
        for (id, addr) in wanted {
            let target = targets.entry(id.clone()).or_insert_with(|| self.spawn(addr, service));
            let probe = target.probe.lock().unwrap_or_else(|e| e.into_inner()).clone();
            out.insert(id.clone(), probe);
        }
        out
    }

    /// The current verdicts of the replicas whose ids start with `prefix`.
    pub fn verdicts(&self, prefix: &str) -> BTreeMap<String, Probe> {
        let targets = self.targets.lock().unwrap_or_else(|e| e.into_inner());
        targets
            .iter()
            .filter(|(id, _)| id.starts_with(prefix))
            .map(|(id, t)| (id.clone(), t.probe.lock().unwrap_or_else(|e| e.into_inner()).clone()))
            .collect()
    }

    fn spawn(&self, addr: &str, service: &ServiceRef) -> Target {
        let probe = Arc::new(Mutex::new(Probe::default()));
        let (shared, addr_owned, wake) = (probe.clone(), addr.to_string(), self.wake.clone());
        let (period, timeout, service) = (self.period, self.timeout, service.clone());
        let task = tokio::spawn(async move {
            loop {
                let outcome = check_completion(&addr_owned, timeout).await;
                let changed = shared.lock().unwrap_or_else(|e| e.into_inner()).record(outcome);
                if changed && wake.send(service.clone()).is_err() {
                    return;
                }
                tokio::time::sleep(period).await;
            }
        });
        Target { addr: addr.to_string(), probe, task: task.abort_handle() }
    }
}

// === Service and EndpointSlices ===

/// `host:port` of an endpoint URL `http://host:port` (IPv6 hosts in brackets).
pub fn host_port(endpoint: &str) -> Option<(String, u16)> {
    let rest = endpoint.strip_prefix("http://")?;
    let (host, port) = rest.rsplit_once(':')?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    Some((host.to_string(), port.parse().ok()?))
}

/// The URL of an endpoint at `host` and `port`.
pub fn url(host: &str, port: u16) -> String {
    match host.parse::<IpAddr>() {
        Ok(IpAddr::V6(_)) => format!("http://[{host}]:{port}"),
        _ => format!("http://{host}:{port}"),
    }
}

/// The dialable address (`host:port`) of an endpoint URL.
pub fn dial_addr(endpoint: &str) -> Option<String> {
    endpoint.strip_prefix("http://").map(str::to_string)
}

fn owner_meta(svc: &InferenceService, name: String) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: svc.namespace(),
        owner_references: svc.controller_owner_ref(&()).map(|o| vec![o]),
        labels: Some(BTreeMap::from([
            ("app.kubernetes.io/name".to_string(), svc.name_any()),
            ("app.kubernetes.io/managed-by".to_string(), "flotilla-operator".to_string()),
        ])),
        ..Default::default()
    }
}

/// The selector-less `Service` named after `svc`: clients reach the model by this name; its
/// endpoints come from the slices.
pub fn service(svc: &InferenceService) -> Service {
    Service {
        metadata: owner_meta(svc, svc.name_any()),
        spec: Some(ServiceSpec {
            ports: Some(vec![ServicePort {
                name: Some(PORT_NAME.into()),
                port: svc.spec.serving.port,
                protocol: Some("TCP".into()),
                app_protocol: Some("http".into()),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        status: None,
    }
}

fn address_type(host: &str) -> &'static str {
    match host.parse::<IpAddr>() {
        Ok(IpAddr::V4(_)) => "IPv4",
        Ok(IpAddr::V6(_)) => "IPv6",
        Err(_) => "FQDN",
    }
}

/// The `EndpointSlice`s of `svc`'s replicas: ready ones as ready, starting ones as not ready,
/// draining ones as terminating; stopping ones are left out. The API server refuses loopback
/// and link-local addresses in a slice: nodes must report an address clients can reach. One slice per address type and
/// port, named `<service>-<port>` (`-ipv6`, `-fqdn` for those types); every such slice exists
/// even when empty of ready endpoints, so readers see a removal at once.
pub fn endpoint_slices(svc: &InferenceService, replicas: &[ReplicaStatus]) -> Vec<EndpointSlice> {
    let mut groups: BTreeMap<(&'static str, u16), Vec<Endpoint>> = BTreeMap::new();
    for r in replicas {
        if r.state == ReplicaState::Stopping {
            continue;
        }
        let Some((host, port)) = r.endpoint.as_deref().and_then(host_port) else { continue };
        let ready = r.state == ReplicaState::Ready;
        let draining = r.state == ReplicaState::Draining;
        groups.entry((address_type(&host), port)).or_default().push(Endpoint {
            addresses: vec![host],
            conditions: Some(EndpointConditions {
                ready: Some(ready),
                serving: Some(ready || draining),
                terminating: Some(draining),
            }),
            node_name: None,
            ..Default::default()
        });
    }
    groups
        .into_iter()
        .map(|((kind, port), endpoints)| {
            let suffix = match kind {
                "IPv4" => String::new(),
                other => format!("-{}", other.to_ascii_lowercase()),
            };
            let mut metadata = owner_meta(svc, format!("{}-{port}{suffix}", svc.name_any()));
            let labels = metadata.labels.get_or_insert_with(BTreeMap::new);
            labels.insert(SERVICE_NAME_LABEL.into(), svc.name_any());
            labels.insert(MANAGED_BY_LABEL.into(), MANAGED_BY.into());
            EndpointSlice {
                metadata,
                address_type: kind.into(),
                endpoints: Some(endpoints),
                ports: Some(vec![EndpointPort {
                    name: Some(PORT_NAME.into()),
                    port: Some(i32::from(port)),
                    protocol: Some("TCP".into()),
                    app_protocol: Some("http".into()),
                }]),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::inference_service::{InferenceServiceSpec, ModelSource};

    fn svc() -> InferenceService {
        let mut s = InferenceService::new(
            "chat",
            InferenceServiceSpec {
                replicas: 3,
                workers_per_replica: 1,
                gpus_per_worker: 1,
                model: ModelSource { checkpoint_path: "/c".into(), ..Default::default() },
                serving: Default::default(),
                priority: 0,
                scheduling: Default::default(),
                rollout: Default::default(),
            },
        );
        s.metadata.namespace = Some("ns".into());
        s.metadata.uid = Some("u1".into());
        s
    }

    fn replica(index: i32, endpoint: &str, state: ReplicaState) -> ReplicaStatus {
        ReplicaStatus {
            index,
            attempt: index + 1,
            state,
            ready: state == ReplicaState::Ready,
            endpoint: Some(endpoint.into()),
            ..Default::default()
        }
    }

    #[test]
    fn slices_group_replicas_by_port_with_ready_serving_and_terminating() {
        let replicas = [
            replica(0, "http://10.0.0.1:8000", ReplicaState::Ready),
            replica(1, "http://10.0.0.1:8001", ReplicaState::Starting),
            replica(2, "http://10.0.0.2:8000", ReplicaState::Draining),
            replica(2, "http://10.0.0.3:8000", ReplicaState::Stopping),
            replica(3, "http://node-c:8000", ReplicaState::Ready),
        ];
        let slices = endpoint_slices(&svc(), &replicas);
        let names: Vec<_> = slices.iter().map(|s| s.metadata.name.clone().unwrap()).collect();
        assert_eq!(names, vec!["chat-8000-fqdn", "chat-8000", "chat-8001"]);
        let s8000 = &slices[1];
        assert_eq!(s8000.address_type, "IPv4");
        assert_eq!(s8000.metadata.labels.as_ref().unwrap()[SERVICE_NAME_LABEL], "chat");
        assert_eq!(s8000.metadata.owner_references.as_ref().unwrap()[0].uid, "u1");
        let seen: Vec<_> = s8000
            .endpoints
            .as_deref()
            .unwrap_or_default()
            .iter()
            .map(|e| {
                let c = e.conditions.clone().unwrap();
                (e.addresses[0].as_str(), c.ready, c.serving, c.terminating)
            })
            .collect();
        assert_eq!(
            seen,
            vec![
                ("10.0.0.1", Some(true), Some(true), Some(false)),
                ("10.0.0.2", Some(false), Some(true), Some(true)),
            ],
            "the stopping replica is left out"
        );
        assert_eq!(
            slices[2].endpoints.as_ref().unwrap()[0].conditions.as_ref().unwrap().ready,
            Some(false)
        );
        assert_eq!(slices[2].ports.as_ref().unwrap()[0].port, Some(8001));
    }

    #[test]
    fn the_service_has_no_selector_and_the_spec_port() {
        let s = service(&svc());
        let spec = s.spec.unwrap();
        assert!(spec.selector.is_none());
        assert_eq!(spec.ports.unwrap()[0].port, 8000);
        assert_eq!(s.metadata.owner_references.unwrap()[0].controller, Some(true));
    }

    #[test]
    fn a_replica_turns_unready_only_after_consecutive_failures() {
        let mut p = Probe::default();
        assert!(!p.record(Err("refused".into())), "not passed yet: no change");
        assert!(p.record(Ok(())));
        assert!(p.passed && p.checked);
        assert!(!p.record(Err("timeout".into())), "one failure is tolerated");
        assert!(p.passed);
        assert!(p.record(Err("timeout".into())));
        assert_eq!((p.passed, p.message.as_deref()), (false, Some("timeout")));
    }

    #[test]
    fn endpoint_urls_round_trip() {
        assert_eq!(host_port("http://10.1.2.3:8001"), Some(("10.1.2.3".into(), 8001)));
        assert_eq!(url("fd00::1", 80), "http://[fd00::1]:80");
        assert_eq!(host_port("http://[fd00::1]:80"), Some(("fd00::1".into(), 80)));
        assert_eq!(dial_addr("http://h:1").as_deref(), Some("h:1"));
    }

    #[tokio::test]
    async fn a_check_against_nothing_listening_fails_with_the_address() {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let err = check_completion(&format!("127.0.0.1:{port}"), Duration::from_secs(2))
            .await
            .unwrap_err();
        assert!(err.contains(&format!("127.0.0.1:{port}")), "{err}");
    }
}
