//! The static half of `deploy/`: the kustomization applies (server-side dry run) against the real
//! control plane, the operator's RBAC grants what the code uses and nothing more, the workloads'
//! environment variables are flags the binaries read, and every dashboard panel and alert rule
//! queries only metrics the code exports.

use flotilla_tests::ControlPlane;
use serde_json::Value as Json;
use serde_yaml_ng::Value as Yaml;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Mutex;

// === the metrics the code exports ===

/// Every metric family the operator, agent and worker register, as `(name, is_histogram)`.
/// `known_metric_names_are_registered_by_the_code` keeps this list honest against the sources.
const EXPORTED: &[(&str, bool)] = &[
    // operator/src/metrics.rs
    ("flotilla_operator_reconciles_total", false),
    ("flotilla_operator_reconcile_errors_total", false),
    ("flotilla_operator_reconcile_duration_seconds", true),
    ("flotilla_operator_phase_transitions_total", false),
    ("flotilla_operator_is_leader", false),
    ("flotilla_operator_jobs", false),
    ("flotilla_operator_queue_wait_seconds", true),
    ("flotilla_operator_scheduling_decision_seconds", true),
    ("flotilla_operator_restarts_total", false),
    ("flotilla_operator_gpu_faults_total", false),
    ("flotilla_operator_time_to_recover_seconds", true),
    ("flotilla_operator_agents_connected", false),
    // agent/src/metrics.rs
    ("DCGM_FI_DEV_GPU_TEMP", false),
    ("DCGM_FI_DEV_MEMORY_TEMP", false),
    ("DCGM_FI_DEV_POWER_USAGE", false),
    ("DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION", false),
    ("DCGM_FI_DEV_GPU_UTIL", false),
    ("DCGM_FI_DEV_MEM_COPY_UTIL", false),
    ("DCGM_FI_DEV_SM_CLOCK", false),
    ("DCGM_FI_DEV_MEM_CLOCK", false),
    ("DCGM_FI_DEV_FB_FREE", false),
    ("DCGM_FI_DEV_FB_USED", false),
    ("DCGM_FI_DEV_XID_ERRORS", false),
    ("DCGM_FI_DEV_PCIE_REPLAY_COUNTER", false),
    ("DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS", false),
    ("DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS", false),
    ("DCGM_FI_DEV_ROW_REMAP_FAILURE", false),
    ("DCGM_FI_DEV_ECC_SBE_VOL_TOTAL", false),
    ("flotilla_gpu_health_state", false),
    ("flotilla_gpu_xid_events_total", false),
    ("flotilla_agent_connected", false),
    ("flotilla_agent_connects_total", false),
    ("flotilla_agent_unacked_events", false),
    ("flotilla_agent_samples_total", false),
    ("flotilla_agent_fence_kills_total", false),
    // engine/src/metrics.rs
    ("flotilla_train_loss", false),
    ("flotilla_train_tokens_per_second", false),
    ("flotilla_train_step_seconds", true),
    ("flotilla_train_checkpoint_seconds", true),
    ("flotilla_train_steps_total", false),
    ("flotilla_moe_expert_load", false),
    ("flotilla_moe_max_violation", false),
    ("flotilla_moe_router_bias", false),
    ("vllm:num_requests_running", false),
    ("vllm:num_requests_waiting", false),
    ("vllm:prompt_tokens_total", false),
    ("vllm:generation_tokens_total", false),
    ("vllm:time_to_first_token_seconds", true),
    ("vllm:inter_token_latency_seconds", true),
    ("vllm:e2e_request_latency_seconds", true),
];

/// The series names a query may use: every family, plus `_bucket`/`_sum`/`_count` of histograms.
fn queryable() -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for &(name, histogram) in EXPORTED {
        names.insert(name.to_owned());
        if histogram {
            for suffix in ["_bucket", "_sum", "_count"] {
                names.insert(format!("{name}{suffix}"));
            }
        }
    }
    names
}

// === a small PromQL reader: which metric names does an expression select? ===

/// Operators and aggregations: never metric names, even when not followed by `(` directly
/// (`sum by (le) (...)`).
const KEYWORDS: &[&str] = &[
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "inf",
    "nan",
    "atan2",
    "sum",
    "avg",
    "min",
    "max",
    "count",
    "group",
    "stddev",
    "stdvar",
    "topk",
    "bottomk",
    "quantile",
    "count_values",
    "limitk",
    "limit_ratio",
];
const GROUPING: &[&str] = &["by", "without", "on", "ignoring", "group_left", "group_right"];

/// The metric names `expr` selects: identifiers that are not functions, keywords, label lists,
/// label matchers, ranges, strings, numbers or Grafana variables.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let chars: Vec<char> = expr.chars().collect();
    let mut names = BTreeSet::new();
    let mut i = 0;
    let skip_to = |i: usize, open: char, close: char| -> usize {
        let mut depth = 0;
        let mut j = i;
        while j < chars.len() {
            match chars[j] {
                '"' | '\'' | '`' => j = end_of_string(&chars, j),
                c if c == open => depth += 1,
                c if c == close => {
                    depth -= 1;
                    if depth == 0 {
                        return j + 1;
                    }
                }
                _ => {}
            }
            j += 1;
        }
        j
    };
    while i < chars.len() {
        let c = chars[i];
        if c == '"' || c == '\'' || c == '`' {
            i = end_of_string(&chars, i) + 1;
        } else if c == '{' {
            i = skip_to(i, '{', '}');
        } else if c == '[' {
            i = skip_to(i, '[', ']');
        } else if c == '$' {
            i += 1;
            while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                i += 1;
            }
        } else if c.is_ascii_digit()
            || (c == '.' && chars.get(i + 1).is_some_and(char::is_ascii_digit))
        {
            while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '.') {
                i += 1;
            }
        } else if c.is_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < chars.len()
                && (chars[i].is_alphanumeric() || chars[i] == '_' || chars[i] == ':')
            {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let mut next = i;
            while next < chars.len() && chars[next].is_whitespace() {
                next += 1;
            }
            let called = chars.get(next) == Some(&'(');
            if GROUPING.contains(&word.as_str()) {
                if called {
                    i = skip_to(next, '(', ')');
                }
            } else if !called && !KEYWORDS.contains(&word.as_str()) {
                names.insert(word);
            }
        } else {
            i += 1;
        }
    }
    names
}

/// Index of the quote that closes the string opened at `start`.
fn end_of_string(chars: &[char], start: usize) -> usize {
    let quote = chars[start];
    let mut j = start + 1;
    while j < chars.len() && chars[j] != quote {
        if chars[j] == '\\' && quote != '`' {
            j += 1;
        }
        j += 1;
    }
    j
}

/// Fails naming `origin` when `expr` selects no metric or one the code does not export.
fn check_query(origin: &str, expr: &str, known: &BTreeSet<String>) -> Result<(), String> {
    let names = metric_names(expr);
    if names.is_empty() {
        return Err(format!("{origin}: expected a query that selects a metric, got `{expr}`"));
    }
    let unknown: Vec<_> = names.iter().filter(|n| !known.contains(*n)).collect();
    if !unknown.is_empty() {
        return Err(format!(
            "{origin}: {unknown:?} are not metrics the code exports (in `{expr}`)"
        ));
    }
    Ok(())
}

#[test]
fn metric_names_reads_promql() {
    let set = |names: &[&str]| names.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
    assert_eq!(
        metric_names(
            r#"sum by (Hostname, xid) (increase(foo_total{Hostname=~"$Hostname", a="b}"}[$__rate_interval])) / on(instance) group_left(gpu) bar > 0.5"#
        ),
        set(&["foo_total", "bar"])
    );
    assert_eq!(
        metric_names(
            "histogram_quantile(0.95, sum by (le) (rate(vllm:e2e_request_latency_seconds_bucket[5m]))) or vector(0)"
        ),
        set(&["vllm:e2e_request_latency_seconds_bucket"])
    );
    assert_eq!(
        metric_names("a and b unless count(c) without (d) > bool 1e-3"),
        set(&["a", "b", "c"])
    );
    let known = queryable();
    assert!(check_query("t", "rate(flotilla_train_steps_total[1m])", &known).is_ok());
    assert!(check_query("t", "flotilla_train_step_seconds_bucket", &known).is_ok());
    let err = check_query("t", "flotilla_train_loss + made_up_total", &known).unwrap_err();
    assert!(err.contains("made_up_total"), "{err}");
    assert!(check_query("t", "vector(1)", &known).is_err(), "a query must select a metric");
}

// === files ===

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent").to_path_buf()
}

fn deploy(rel: &str) -> PathBuf {
    workspace().join("deploy").join(rel)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// Every `.rs` file under `dir`, with each file cut at its first `#[cfg(test)]` so unit tests
/// do not count as the code exporting something.
fn rust_sources(dir: &Path) -> String {
    let mut out = String::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display())) {
            let path = entry.expect("dir entry").path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let text = read(&path);
                out.push_str(text.split("#[cfg(test)]").next().unwrap_or_default());
                out.push('\n');
            }
        }
    }
    out
}

/// The documents of a multi-document YAML stream.
fn yaml_documents(text: &str) -> Vec<Yaml> {
    let mut docs = Vec::new();
    let mut current = String::new();
    for line in text.lines().chain(std::iter::once("---")) {
        if line == "---" {
            if !current.trim().is_empty() {
                let doc: Yaml = serde_yaml_ng::from_str(&current)
                    .unwrap_or_else(|e| panic!("YAML document does not parse: {e}\n{current}"));
                docs.push(doc);
            }
            current.clear();
        } else {
            current.push_str(line);
            current.push('\n');
        }
    }
    docs
}

fn str_at<'a>(v: &'a Yaml, path: &[&str]) -> Option<&'a str> {
    path.iter().try_fold(v, |v, k| v.get(k)).and_then(Yaml::as_str)
}

fn find<'a>(docs: &'a [Yaml], kind: &str, name: &str) -> &'a Yaml {
    docs.iter()
        .find(|d| {
            str_at(d, &["kind"]) == Some(kind) && str_at(d, &["metadata", "name"]) == Some(name)
        })
        .unwrap_or_else(|| panic!("no {kind} {name} in the rendered manifests"))
}

// === against the real control plane ===

fn run(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| panic!("running {cmd:?}: {e}"))
}

fn expect_success(what: &str, out: &Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}\n{stdout}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// Applies the CRDs and the namespace for real, once per test binary, so that a server-side
/// dry run of everything else can resolve the custom kinds and the namespace.
fn install_crds_and_namespace(cp: &ControlPlane) {
    // Once per control plane: the module's control plane stops when its last running test lets
    // go of it, and a later test gets a fresh one without the CRDs.
    static DONE: Mutex<BTreeSet<PathBuf>> = Mutex::new(BTreeSet::new());
    let mut done = DONE.lock().unwrap_or_else(|e| e.into_inner());
    if done.insert(cp.kubeconfig().to_path_buf()) {
        let crds = deploy("crds");
        let out = run(cp.kubectl().args(["apply", "--server-side", "-f"]).arg(&crds));
        expect_success("applying deploy/crds", &out);
        let out = run(cp.kubectl().args([
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd/trainingjobs.flotilla.dev",
            "crd/inferenceservices.flotilla.dev",
            "crd/gpunodes.flotilla.dev",
        ]));
        expect_success("waiting for the CRDs", &out);
        let out =
            run(cp.kubectl().args(["apply", "--server-side", "-f"]).arg(deploy("namespace.yaml")));
        expect_success("applying deploy/namespace.yaml", &out);
    }
}

#[tokio::test]
async fn kustomization_applies_with_a_server_side_dry_run() {
    let cp = flotilla_tests::control_plane_for(module_path!()).await;
    install_crds_and_namespace(&cp);
    let out = run(cp.kubectl().args(["apply", "--dry-run=server", "-k"]).arg(deploy("")));
    let stdout = expect_success("kubectl apply -k deploy/ --dry-run=server", &out);
    for object in [
        "namespace/flotilla-system",
        "customresourcedefinition.apiextensions.k8s.io/trainingjobs.flotilla.dev",
        "customresourcedefinition.apiextensions.k8s.io/inferenceservices.flotilla.dev",
        "customresourcedefinition.apiextensions.k8s.io/gpunodes.flotilla.dev",
        "serviceaccount/flotilla-operator",
        "serviceaccount/flotilla-agent",
        "clusterrole.rbac.authorization.k8s.io/flotilla-operator",
        "clusterrolebinding.rbac.authorization.k8s.io/flotilla-operator",
        "role.rbac.authorization.k8s.io/flotilla-operator-leader-election",
        "rolebinding.rbac.authorization.k8s.io/flotilla-operator-leader-election",
        "role.rbac.authorization.k8s.io/flotilla-agent-node-lease",
        "rolebinding.rbac.authorization.k8s.io/flotilla-agent-node-lease",
        "validatingadmissionpolicy.admissionregistration.k8s.io/flotilla-agent-own-node-lease",
        "validatingadmissionpolicybinding.admissionregistration.k8s.io/flotilla-agent-own-node-lease",
        "secret/flotilla-operator-tls",
        "secret/flotilla-agent-tls",
        "service/flotilla-operator-agents",
        "service/flotilla-operator-metrics",
        "deployment.apps/flotilla-operator",
        "poddisruptionbudget.policy/flotilla-operator",
        "daemonset.apps/flotilla-agent",
        "networkpolicy.networking.k8s.io/default-deny-ingress",
        "networkpolicy.networking.k8s.io/flotilla-operator",
        "networkpolicy.networking.k8s.io/flotilla-agent",
    ] {
        assert!(
            stdout.lines().any(|l| l.starts_with(&format!("{object} "))),
            "{object} missing from the dry run:\n{stdout}"
        );
    }
    // A dry run creates nothing.
    let out = run(cp.kubectl().args([
        "-n",
        "flotilla-system",
        "get",
        "deployment,daemonset",
        "-o",
        "name",
    ]));
    assert_eq!(expect_success("listing workloads", &out).trim(), "", "the dry run created objects");
}

/// `kubectl auth can-i` for the ServiceAccount `sa` of flotilla-system.
fn can_i(cp: &ControlPlane, sa: &str, args: &[&str]) -> bool {
    let out = run(cp
        .kubectl()
        .args(["auth", "can-i"])
        .args(args)
        .arg(format!("--as=system:serviceaccount:flotilla-system:{sa}")));
    match String::from_utf8_lossy(&out.stdout).trim() {
        "yes" => true,
        "no" => false,
        other => {
            panic!("kubectl auth can-i {args:?}: {other} {}", String::from_utf8_lossy(&out.stderr))
        }
    }
}

#[tokio::test]
async fn rbac_grants_the_operator_what_its_code_uses_and_the_agent_its_lease_only() {
    let cp = flotilla_tests::control_plane_for(module_path!()).await;
    install_crds_and_namespace(&cp);
    for file in ["rbac/operator.yaml", "rbac/agent.yaml"] {
        let out = run(cp.kubectl().args(["apply", "--server-side", "-f"]).arg(deploy(file)));
        expect_success(file, &out);
    }
    let ns = ["-n", "team-a"];
    let allowed: &[&[&str]] = &[
        // controllers: watch everything, finalizers by patch, status by server-side apply
        &["list", "trainingjobs.flotilla.dev", "--all-namespaces"],
        &["watch", "trainingjobs.flotilla.dev", "--all-namespaces"],
        &["patch", "trainingjobs.flotilla.dev", ns[0], ns[1]],
        &["patch", "trainingjobs.flotilla.dev", "--subresource=status", ns[0], ns[1]],
        &["delete", "trainingjobs.flotilla.dev", ns[0], ns[1]],
        &["watch", "inferenceservices.flotilla.dev", "--all-namespaces"],
        &["patch", "inferenceservices.flotilla.dev", ns[0], ns[1]],
        &["patch", "inferenceservices.flotilla.dev", "--subresource=status", ns[0], ns[1]],
        &["watch", "gpunodes.flotilla.dev"],
        &["create", "gpunodes.flotilla.dev"],
        &["get", "gpunodes.flotilla.dev/node-1"],
        &["patch", "gpunodes.flotilla.dev", "--subresource=status"],
        // Events land in the object's namespace ("default" for GpuNodes)
        &["create", "events.events.k8s.io", ns[0], ns[1]],
        &["patch", "events.events.k8s.io", "-n", "default"],
        // InferenceService endpoints: a Service and EndpointSlices per service
        &["watch", "services", "--all-namespaces"],
        &["patch", "services", ns[0], ns[1]],
        &["watch", "endpointslices.discovery.k8s.io", "--all-namespaces"],
        &["patch", "endpointslices.discovery.k8s.io", ns[0], ns[1]],
        &["delete", "endpointslices.discovery.k8s.io", ns[0], ns[1]],
        // leader election
        &["create", "leases.coordination.k8s.io", "-n", "flotilla-system"],
        &["get", "leases.coordination.k8s.io/flotilla-operator", "-n", "flotilla-system"],
        &["update", "leases.coordination.k8s.io/flotilla-operator", "-n", "flotilla-system"],
        // the agents' node Leases: watched, verdicts patched in
        &["watch", "leases.coordination.k8s.io", "-n", "flotilla-system"],
        &["patch", "leases.coordination.k8s.io/flotilla-agent-n1", "-n", "flotilla-system"],
    ];
    let denied: &[&[&str]] = &[
        &["get", "secrets", "-n", "flotilla-system"],
        &["list", "pods", "--all-namespaces"],
        &["create", "pods", ns[0], ns[1]],
        &["delete", "services", ns[0], ns[1]],
        &["create", "events", ns[0], ns[1]], // core/v1 Events: the recorder uses events.k8s.io
        &["create", "trainingjobs.flotilla.dev", ns[0], ns[1]],
        &["update", "trainingjobs.flotilla.dev", ns[0], ns[1]],
        &["delete", "inferenceservices.flotilla.dev", ns[0], ns[1]],
        &["delete", "gpunodes.flotilla.dev/node-1"],
        &["patch", "gpunodes.flotilla.dev/node-1"],
        &["update", "leases.coordination.k8s.io/someone-else", "-n", "flotilla-system"],
        &["create", "leases.coordination.k8s.io", "-n", "kube-system"],
        &["delete", "customresourcedefinitions.apiextensions.k8s.io"],
    ];
    let wrong: Vec<String> =
        allowed
            .iter()
            .filter(|a| !can_i(&cp, "flotilla-operator", a))
            .map(|a| format!("operator may not {a:?}"))
            .chain(
                denied
                    .iter()
                    .filter(|a| can_i(&cp, "flotilla-operator", a))
                    .map(|a| format!("operator may {a:?}")),
            )
            .chain(
                [
                    &["get", "gpunodes.flotilla.dev"][..],
                    &["list", "pods", "--all-namespaces"],
                    &["get", "secrets", "-n", "flotilla-system"],
                    &["create", "events.events.k8s.io", "-n", "default"],
                    &["list", "leases.coordination.k8s.io", "-n", "flotilla-system"],
                    &[
                        "delete",
                        "leases.coordination.k8s.io/flotilla-agent-n1",
                        "-n",
                        "flotilla-system",
                    ],
                    &["create", "leases.coordination.k8s.io", "-n", "kube-system"],
                ]
                .iter()
                .filter(|a| can_i(&cp, "flotilla-agent", a))
                .map(|a| format!("agent may {a:?}")),
            )
            .chain(
                // Its node's Lease (which node's, RBAC cannot say: the admission policy does).
                [
                    &[
                        "get",
                        "leases.coordination.k8s.io/flotilla-agent-n1",
                        "-n",
                        "flotilla-system",
                    ][..],
                    &["create", "leases.coordination.k8s.io", "-n", "flotilla-system"],
                    &[
                        "update",
                        "leases.coordination.k8s.io/flotilla-agent-n1",
                        "-n",
                        "flotilla-system",
                    ],
                ]
                .iter()
                .filter(|a| !can_i(&cp, "flotilla-agent", a))
                .map(|a| format!("agent may not {a:?}")),
            )
            .collect();
    assert!(wrong.is_empty(), "RBAC differs from what the code needs:\n{}", wrong.join("\n"));
}

/// `kubectl` as whoever holds `token` (no client certificate, which would win over the token).
fn kubectl_as(cp: &ControlPlane, token: &str) -> Command {
    let mut cmd = Command::new(cp.bin_dir().join("kubectl"));
    cmd.args(["--kubeconfig", "/dev/null", "--insecure-skip-tls-verify", "--server", cp.server()]);
    cmd.args(["--token", token]);
    cmd
}

/// `cmd` with `input` on its standard input.
fn run_with_input(cmd: &mut Command, input: &str) -> Output {
    use std::io::Write;
    let mut child = cmd
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    child.stdin.take().expect("stdin").write_all(input.as_bytes()).expect("writing stdin");
    child.wait_with_output().expect("waiting for kubectl")
}

fn node_lease(name: &str) -> String {
    format!(
        "apiVersion: coordination.k8s.io/v1\nkind: Lease\nmetadata:\n  name: {name}\n  \
         namespace: flotilla-system\nspec:\n  holderIdentity: agent\n"
    )
}

/// The admission policy of `rbac/agent.yaml`, with a real pod-bound token: an agent on node n1
/// may create and update the Lease of n1 and no other node's.
#[tokio::test]
async fn an_agent_may_write_only_its_own_nodes_lease() {
    let cp = flotilla_tests::control_plane_for(module_path!()).await;
    install_crds_and_namespace(&cp);
    let out =
        run(cp.kubectl().args(["apply", "--server-side", "-f"]).arg(deploy("rbac/agent.yaml")));
    expect_success("rbac/agent.yaml", &out);
    // A node and an agent pod bound to it (nothing runs it: only its token matters here).
    let objects = "apiVersion: v1\nkind: Node\nmetadata:\n  name: lease-n1\n---\n\
                   apiVersion: v1\nkind: Pod\nmetadata:\n  name: agent-lease-n1\n  \
                   namespace: flotilla-system\nspec:\n  serviceAccountName: flotilla-agent\n  \
                   nodeName: lease-n1\n  containers:\n    - name: agent\n      image: agent\n";
    let out = run_with_input(cp.kubectl().args(["apply", "-f", "-"]), objects);
    expect_success("a node and a pod on it", &out);
    let out = run(cp.kubectl().args([
        "create",
        "token",
        "flotilla-agent",
        "-n",
        "flotilla-system",
        "--bound-object-kind",
        "Pod",
        "--bound-object-name",
        "agent-lease-n1",
    ]));
    let token = expect_success("a token bound to the agent pod", &out).trim().to_owned();

    let own = node_lease("flotilla-agent-lease-n1");
    let out = run_with_input(kubectl_as(&cp, &token).args(["create", "-f", "-"]), &own);
    expect_success("the agent creates its own node's Lease", &out);
    let out = run_with_input(kubectl_as(&cp, &token).args(["replace", "-f", "-"]), &own);
    expect_success("the agent renews its own node's Lease", &out);

    let other = node_lease("flotilla-agent-lease-n2");
    let out = run_with_input(kubectl_as(&cp, &token).args(["create", "-f", "-"]), &other);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the agent created another node's Lease");
    assert!(
        stderr.contains("may write only its own node's Lease")
            && stderr.contains("expected flotilla-agent-lease-n1"),
        "the refusal names the field and the expected value: {stderr}"
    );
    // Created by someone else, another node's Lease cannot be updated by this agent either.
    let out = run_with_input(cp.kubectl().args(["create", "-f", "-"]), &other);
    expect_success("the admin creates n2's Lease", &out);
    let out = run_with_input(kubectl_as(&cp, &token).args(["replace", "-f", "-"]), &other);
    assert!(!out.status.success(), "the agent updated another node's Lease");
}

// === rendered workloads against the binaries' flags ===

fn rendered(cp: &ControlPlane, dir: &str) -> Vec<Yaml> {
    let out = run(cp.kubectl().arg("kustomize").arg(deploy(dir)));
    yaml_documents(&expect_success(&format!("kubectl kustomize deploy/{dir}"), &out))
}

/// The environment variable names of a pod template's container `name`.
fn env_names(workload: &Yaml, container: &str) -> Vec<String> {
    let spec = &workload["spec"]["template"]["spec"];
    let c = spec["containers"]
        .as_sequence()
        .and_then(|cs| cs.iter().find(|c| c["name"].as_str() == Some(container)))
        .unwrap_or_else(|| panic!("no container {container}"));
    c["env"]
        .as_sequence()
        .map(|env| env.iter().filter_map(|e| e["name"].as_str().map(str::to_owned)).collect())
        .unwrap_or_default()
}

#[tokio::test]
async fn workloads_set_only_variables_the_binaries_read() {
    let cp = flotilla_tests::control_plane_for(module_path!()).await;
    let docs = rendered(&cp, "");
    let checks = [
        ("Deployment", "flotilla-operator", "operator", "operator/src", &[][..]),
        (
            "DaemonSet",
            "flotilla-agent",
            "agent",
            "agent/src",
            // read by the NVIDIA container runtime; FLOTILLA_POD_IP only composes
            // FLOTILLA_AGENT_ADMIN_URL and FLOTILLA_NODE_ADDRESS through Kubernetes' $(VAR) expansion
            &["NVIDIA_VISIBLE_DEVICES", "NVIDIA_DRIVER_CAPABILITIES", "FLOTILLA_POD_IP"][..],
        ),
    ];
    let mut unread = Vec::new();
    for (kind, name, container, src, external) in checks {
        let code = rust_sources(&workspace().join(src));
        let names = env_names(find(&docs, kind, name), container);
        assert!(names.len() > 5, "{kind} {name}: expected its settings as env, got {names:?}");
        for var in names {
            if !external.contains(&var.as_str()) && !code.contains(&format!("env = \"{var}\"")) {
                unread.push(format!("{kind} {name} sets {var}, which no flag in {src} reads"));
            }
        }
    }
    assert!(unread.is_empty(), "{}", unread.join("\n"));

    let operator = find(&docs, "Deployment", "flotilla-operator");
    assert_eq!(operator["spec"]["replicas"].as_u64(), Some(2));
    let agent = find(&docs, "DaemonSet", "flotilla-agent");
    let pod = &agent["spec"]["template"]["spec"];
    assert_eq!(str_at(pod, &["nodeSelector", "nvidia.com/gpu.present"]), Some("true"));
    // The token renews the node's Lease, which the ServiceAccount may write for its own node only.
    assert_eq!(pod["automountServiceAccountToken"].as_bool(), Some(true));
    for workload in [operator, agent] {
        for c in
            workload["spec"]["template"]["spec"]["containers"].as_sequence().expect("containers")
        {
            let sc = &c["securityContext"];
            assert_ne!(sc["privileged"].as_bool(), Some(true), "{c:?}");
            assert_eq!(sc["allowPrivilegeEscalation"].as_bool(), Some(false), "{c:?}");
            assert_eq!(sc["readOnlyRootFilesystem"].as_bool(), Some(true), "{c:?}");
            assert_eq!(sc["capabilities"]["drop"][0].as_str(), Some("ALL"), "{c:?}");
            assert!(sc["capabilities"]["add"].is_null(), "{c:?}");
        }
    }
}

#[tokio::test]
async fn monitoring_objects_select_the_workloads_ports() {
    let cp = flotilla_tests::control_plane_for(module_path!()).await;
    let base = rendered(&cp, "");
    let monitoring = rendered(&cp, "monitoring");
    let kinds: BTreeSet<_> = monitoring.iter().filter_map(|d| str_at(d, &["kind"])).collect();
    assert_eq!(kinds, BTreeSet::from(["PodMonitor", "PrometheusRule", "ServiceMonitor"]));

    let labels_match = |selector: &Yaml, labels: &Yaml| {
        let wanted = selector["matchLabels"].as_mapping().expect("matchLabels");
        !wanted.is_empty() && wanted.iter().all(|(k, v)| labels.get(k) == Some(v))
    };
    let service_monitor = find(&monitoring, "ServiceMonitor", "flotilla-operator");
    let service = find(&base, "Service", "flotilla-operator-metrics");
    assert!(labels_match(&service_monitor["spec"]["selector"], &service["metadata"]["labels"]));
    let port = service_monitor["spec"]["endpoints"][0]["port"].as_str();
    assert!(
        service["spec"]["ports"]
            .as_sequence()
            .expect("ports")
            .iter()
            .any(|p| p["name"].as_str() == port),
        "ServiceMonitor port {port:?} is not a port of the metrics Service"
    );

    let pod_monitor = find(&monitoring, "PodMonitor", "flotilla-agent");
    let agent = find(&base, "DaemonSet", "flotilla-agent");
    let template = &agent["spec"]["template"];
    assert!(labels_match(&pod_monitor["spec"]["selector"], &template["metadata"]["labels"]));
    let port = pod_monitor["spec"]["podMetricsEndpoints"][0]["port"].as_str();
    let ports: Vec<_> = template["spec"]["containers"][0]["ports"]
        .as_sequence()
        .expect("agent ports")
        .iter()
        .filter_map(|p| p["name"].as_str())
        .collect();
    assert!(ports.contains(&port.unwrap_or_default()), "PodMonitor port {port:?} not in {ports:?}");
}

// === dashboards and alerts ===

#[test]
fn known_metric_names_are_registered_by_the_code() {
    let code = ["operator/src", "agent/src", "engine/src"]
        .iter()
        .map(|d| rust_sources(&workspace().join(d)))
        .collect::<String>();
    let missing: Vec<_> =
        EXPORTED.iter().filter(|(name, _)| !code.contains(&format!("\"{name}\""))).collect();
    assert!(missing.is_empty(), "no longer registered by the code: {missing:?}");
}

#[test]
fn dashboards_parse_and_every_panel_queries_exported_metrics() {
    let known = queryable();
    let mut errors = Vec::new();
    let mut uids = BTreeSet::new();
    let mut recording = Vec::new();
    for file in ["fleet-health.json", "jobs.json", "moe-engine.json"] {
        let path = deploy("grafana").join(file);
        let dash: Json = serde_json::from_str(&read(&path))
            .unwrap_or_else(|e| panic!("{}: not JSON: {e}", path.display()));
        assert!(uids.insert(dash["uid"].as_str().expect("uid").to_owned()), "{file}: uid reused");
        let vars = dash["templating"]["list"].as_array().expect("templating.list");
        assert!(
            vars.iter().any(|v| v["name"] == "datasource"
                && v["type"] == "datasource"
                && v["query"] == "prometheus"),
            "{file}: no `datasource` variable of type prometheus"
        );
        for v in vars.iter().filter(|v| v["type"] == "query") {
            let q = v["definition"].as_str().unwrap_or_default();
            let metric = q
                .strip_prefix("label_values(")
                .and_then(|rest| rest.split(',').next())
                .unwrap_or(q);
            if let Err(e) = check_query(&format!("{file} variable {}", v["name"]), metric, &known) {
                errors.push(e);
            }
        }
        let panels = dash["panels"].as_array().expect("panels");
        let mut ids = BTreeSet::new();
        let mut queried = 0;
        for p in panels {
            let title = p["title"].as_str().unwrap_or_default();
            assert!(ids.insert(p["id"].as_u64().expect("panel id")), "{file}: panel id reused");
            if p["type"] == "row" {
                continue;
            }
            assert_eq!(p["datasource"]["uid"], "${datasource}", "{file} `{title}`: datasource");
            let targets = p["targets"].as_array().map(Vec::as_slice).unwrap_or_default();
            if targets.is_empty() {
                errors.push(format!("{file} `{title}`: no queries"));
            }
            for t in targets {
                let expr = t["expr"].as_str().unwrap_or_default();
                if let Err(e) = check_query(&format!("{file} `{title}`"), expr, &known) {
                    errors.push(e);
                }
                recording.push(serde_json::json!({
                    "record": format!("panel_{}_{}", recording.len(), t["refId"].as_str().unwrap_or("A")),
                    "expr": with_grafana_variables_filled(expr),
                }));
            }
            queried += 1;
        }
        assert!(queried >= 10, "{file}: expected at least 10 panels with queries, got {queried}");
    }
    assert!(errors.is_empty(), "{}", errors.join("\n"));

    // Prometheus's own parser on every query: each becomes a recording rule for promtool.
    let rules = serde_json::json!({"groups": [{"name": "dashboards", "rules": recording}]});
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("dashboard-queries.yaml");
    std::fs::write(&path, rules.to_string()).expect("writing the queries");
    let out = promtool(&["check", "rules"], &path);
    expect_success("promtool check rules on every dashboard query", &out);
}

/// Grafana's variables replaced by values Prometheus parses.
fn with_grafana_variables_filled(expr: &str) -> String {
    let mut out = expr.replace("$__rate_interval", "5m").replace("$__range", "1h");
    while let Some(at) = out.find('$') {
        let end = out[at + 1..]
            .find(|c: char| !(c.is_alphanumeric() || c == '_'))
            .map_or(out.len(), |n| at + 1 + n);
        out.replace_range(at..end, ".*");
    }
    out
}

fn promtool(args: &[&str], path: &Path) -> Output {
    Command::new("promtool")
        .args(args)
        .arg(path)
        .output()
        .expect("promtool (Debian package `prometheus`, installed by scripts/setup.sh)")
}

fn rule_groups(path: &Path) -> Yaml {
    let doc: Yaml = serde_yaml_ng::from_str(&read(path))
        .unwrap_or_else(|e| panic!("{}: not YAML: {e}", path.display()));
    doc["groups"].clone()
}

#[test]
fn alert_rules_pass_promtool_and_use_exported_metrics() {
    let path = deploy("prometheus/flotilla-rules.yaml");
    let out = promtool(&["check", "rules"], &path);
    expect_success("promtool check rules", &out);

    let known = queryable();
    let groups = rule_groups(&path);
    let mut alerts = BTreeMap::new();
    for group in groups.as_sequence().expect("groups") {
        for rule in group["rules"].as_sequence().expect("rules") {
            let name = rule["alert"].as_str().expect("only alerting rules").to_owned();
            let expr = rule["expr"].as_str().expect("expr");
            check_query(&format!("alert {name}"), expr, &known).unwrap_or_else(|e| panic!("{e}"));
            assert!(rule["labels"]["severity"].is_string(), "{name}: no severity");
            assert!(rule["annotations"]["summary"].is_string(), "{name}: no summary");
            alerts.insert(name, expr.to_owned());
        }
    }
    for wanted in [
        "FlotillaGpuFailed",
        "FlotillaNodeGpusDegraded",
        "FlotillaAgentDisconnected",
        "FlotillaJobsRestartingRepeatedly",
        "FlotillaSchedulingBacklogGrowing",
        "FlotillaCheckpointStale",
    ] {
        assert!(alerts.contains_key(wanted), "alert {wanted} missing; have {:?}", alerts.keys());
    }
    // The GPU's holder labels change when its job moves away; the alert must not restart its clock.
    assert!(
        alerts["FlotillaGpuFailed"]
            .contains("max without (job_uid, rank) (flotilla_gpu_health_state) == 2")
    );
}

#[test]
fn prometheus_rule_holds_the_same_groups_as_the_rules_file() {
    let plain = rule_groups(&deploy("prometheus/flotilla-rules.yaml"));
    let object: Yaml = serde_yaml_ng::from_str(&read(&deploy("monitoring/prometheusrule.yaml")))
        .expect("PrometheusRule parses");
    assert_eq!(object["kind"].as_str(), Some("PrometheusRule"));
    assert!(plain.as_sequence().is_some_and(|g| !g.is_empty()), "no rule groups");
    assert_eq!(object["spec"]["groups"], plain, "PrometheusRule and rules file differ");
}
