//! Dashboards and alerts against a real Prometheus (Debian's `prometheus`): it scrapes a running
//! operator, two agents with simulated GPUs, the training job's `flotilla-worker` processes and a
//! serving worker; every panel query of `deploy/grafana/*.json` and every alert expression of
//! `deploy/prometheus/flotilla-rules.yaml` evaluates without error and returns series, and an
//! injected XID 79 makes `FlotillaGpuFailed` go pending or firing.
//!
//! Run with `--nocapture` to see each panel's query and a sample value.

use flotilla_operator::crd::{JobPhase, TrainingJob};
use flotilla_tests::{
    Fleet, Process, WAIT, binary, eventually, free_port, install_crds, tiny_engine_job, workspace,
};
use kube::api::{Api, PostParams};
use serde_json::Value as Json;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Debian's `prometheus` binary: on PATH, else where the package puts it.
fn prometheus_binary() -> PathBuf {
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join("prometheus"))
        .find(|p| p.is_file());
    on_path.or_else(|| Some(PathBuf::from("/usr/bin/prometheus")).filter(|p| p.is_file())).expect(
        "the `prometheus` binary (Debian package `prometheus`, installed by scripts/setup.sh)",
    )
}

/// A GET through curl; the body.
fn curl(args: &[&str]) -> Result<String, String> {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10"])
        .args(args)
        .output()
        .map_err(|e| format!("running curl: {e}"))?;
    if !out.status.success() {
        return Err(format!("curl {args:?}: {}", String::from_utf8_lossy(&out.stderr)));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A Prometheus we started, with its storage in a temporary directory.
struct Prometheus {
    _process: Process,
    url: String,
}

impl Prometheus {
    fn start(dir: &Path, scrape: &str) -> Prometheus {
        let rules = workspace().join("deploy/prometheus/flotilla-rules.yaml");
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\nscrape_configs:\n{scrape}",
            rules.display()
        );
        let config_path = dir.join("prometheus.yml");
        std::fs::write(&config_path, config).expect("writing prometheus.yml");
        let port = free_port();
        let log = dir.join("prometheus.log");
        let file = std::fs::File::create(&log).expect("log");
        let child = Command::new(prometheus_binary())
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(file.try_clone().expect("log"))
            .stderr(file)
            .spawn()
            .expect("starting prometheus");
        let url = format!("http://127.0.0.1:{port}");
        Prometheus { _process: Process { child, log, node: String::new() }, url }
    }

    /// The series an instant query returns, or Prometheus's error.
    fn query(&self, expr: &str) -> Result<Vec<Json>, String> {
        self.query_at(expr, None)
    }

    /// The series an instant query at `time` (Unix seconds; now if none) returns.
    fn query_at(&self, expr: &str, time: Option<f64>) -> Result<Vec<Json>, String> {
        let time = time.map(|t| format!("time={t:.3}"));
        let mut args = vec!["--get", "--data-urlencode"];
        let query = format!("query={expr}");
        args.push(&query);
        if let Some(t) = &time {
            args.extend(["--data-urlencode", t]);
        }
        let url = format!("{}/api/v1/query", self.url);
        args.push(&url);
        let body = curl(&args)?;
        let reply: Json =
            serde_json::from_str(&body).map_err(|e| format!("not JSON ({e}): {body}"))?;
        if reply["status"] != "success" {
            return Err(format!("{}: {}", reply["errorType"], reply["error"]));
        }
        match reply["data"]["resultType"].as_str() {
            Some("scalar") | Some("string") => Ok(vec![reply["data"]["result"].clone()]),
            _ => Ok(reply["data"]["result"].as_array().cloned().unwrap_or_default()),
        }
    }

    fn alerts(&self) -> Vec<Json> {
        curl(&[&format!("{}/api/v1/alerts", self.url)])
            .ok()
            .and_then(|b| serde_json::from_str::<Json>(&b).ok())
            .and_then(|r| r["data"]["alerts"].as_array().cloned())
            .unwrap_or_default()
    }
}

/// Grafana's variables replaced by what a dashboard would send: every value of a variable,
/// a rate window of five minutes and a range of an hour (both cover the whole test).
fn fill(expr: &str) -> String {
    let mut out = expr.replace("$__rate_interval", "5m").replace("$__range", "1h");
    while let Some(at) = out.find('$') {
        let end = out[at + 1..]
            .find(|c: char| !(c.is_alphanumeric() || c == '_'))
            .map_or(out.len(), |n| at + 1 + n);
        out.replace_range(at..end, ".*");
    }
    out
}

/// Every panel query: (dashboard, panel title, expression).
fn panel_queries() -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for file in ["fleet-health.json", "jobs.json", "moe-engine.json"] {
        let path = workspace().join("deploy/grafana").join(file);
        let dash: Json = serde_json::from_str(&std::fs::read_to_string(&path).expect("dashboard"))
            .expect("dashboard JSON");
        for p in dash["panels"].as_array().expect("panels") {
            for t in p["targets"].as_array().map(Vec::as_slice).unwrap_or_default() {
                let expr = t["expr"].as_str().unwrap_or_default();
                out.push((
                    file.to_owned(),
                    p["title"].as_str().unwrap_or("").to_owned(),
                    expr.into(),
                ));
            }
        }
    }
    out
}

/// Every alert: (name, expression).
fn alert_rules() -> Vec<(String, String)> {
    let path = workspace().join("deploy/prometheus/flotilla-rules.yaml");
    let doc: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(&std::fs::read_to_string(path).expect("rules"))
            .expect("rules YAML");
    let mut out = Vec::new();
    for group in doc["groups"].as_sequence().expect("groups") {
        for rule in group["rules"].as_sequence().expect("rules") {
            out.push((
                rule["alert"].as_str().expect("alert").to_owned(),
                rule["expr"].as_str().expect("expr").to_owned(),
            ));
        }
    }
    out
}

/// The metric names an expression selects (Flotilla's, DCGM's and vLLM's prefixes).
fn metric_names(expr: &str) -> Vec<String> {
    let mut names: Vec<String> = expr
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|t| ["flotilla_", "DCGM_", "vllm:"].iter().any(|p| t.starts_with(p)))
        .map(str::to_owned)
        .collect();
    names.sort();
    names.dedup();
    names
}

/// A short form of a series: its labels that tell series apart, and its value.
fn sample(series: &Json) -> String {
    let value = series["value"][1].as_str().or_else(|| series[1].as_str()).unwrap_or("?");
    let labels: Vec<String> = series["metric"]
        .as_object()
        .map(|m| {
            m.iter()
                .filter(|(k, _)| !matches!(k.as_str(), "UUID" | "modelName" | "device" | "job"))
                .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
                .collect()
        })
        .unwrap_or_default();
    format!("{{{}}} {value}", labels.join(","))
}

/// The "Failed GPUs" panel's query, as the dashboard has it.
fn failed_gpus_panel() -> String {
    panel_queries()
        .into_iter()
        .find(|(file, title, _)| file == "fleet-health.json" && title == "Failed GPUs")
        .map(|(_, _, expr)| fill(&expr))
        .expect("the Failed GPUs panel")
}

/// The first series' value of an instant query, as a number.
fn first_value(series: &[Json]) -> Option<f64> {
    series.first()?["value"][1].as_str()?.parse().ok()
}

fn unix_now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs_f64()
}

/// Keeps Prometheus's worker targets file up to date as workers start (new attempts, new ports).
fn follow_workers(dir: PathBuf, fleet_dir: PathBuf, serve: String, stop: Arc<AtomicBool>) {
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            let mut targets: Vec<String> = flotilla_tests::fleet::worker_metrics(&fleet_dir)
                .into_iter()
                .map(|(a, _)| a)
                .collect();
            targets.push(serve.clone());
            let json = serde_json::json!([{ "targets": targets }]).to_string();
            let tmp = dir.join("workers.json.tmp");
            if std::fs::write(&tmp, json).is_ok() {
                let _ = std::fs::rename(&tmp, dir.join("workers.json"));
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    });
}

/// `flotilla-worker serve` on a free port.
async fn serving_worker(dir: &Path) -> (Process, String) {
    let log = dir.join("serve.log");
    let file = std::fs::File::create(&log).expect("log");
    let child = Command::new(binary("flotilla-worker", "flotilla-engine"))
        .args(["serve", "--preset", "tiny", "--host", "127.0.0.1", "--port", "0"])
        .stdout(file.try_clone().expect("log"))
        .stderr(file)
        .spawn()
        .expect("starting flotilla-worker serve");
    let process = Process { child, log, node: String::new() };
    let addr = eventually(WAIT, "the serving worker's address", || async {
        let log = process.log();
        let addr = log.lines().find_map(|l| l.split("listening on ").nth(1))?;
        Some(addr.trim().to_owned())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", process.log()));
    (process, addr)
}

/// A few completions from the serving worker at `addr`.
fn completions(addr: &str) {
    for prompt in ["hello", "the fleet", "a GPU fell off the bus"] {
        let body = serde_json::json!({"prompt": prompt, "max_tokens": 4}).to_string();
        curl(&[
            "-H",
            "content-type: application/json",
            "-d",
            &body,
            &format!("http://{addr}/v1/completions"),
        ])
        .unwrap_or_else(|e| panic!("completion: {e}"));
    }
}

#[tokio::test]
async fn every_panel_and_alert_evaluates_on_a_real_prometheus_and_a_gpu_failure_alerts() {
    let started = Instant::now();
    let cp = flotilla_tests::control_plane_for(module_path!()).await;
    install_crds(&cp).expect("CRDs install");
    let client = cp.client().await.expect("client");
    let ns = flotilla_tests::namespace(&client, "prom").await.expect("namespace");
    let fleet = Fleet::start(cp.kubeconfig(), &ns, &ns, &client).await;
    let work = tempfile::tempdir().expect("tempdir");
    let (_serve, serve_addr) = serving_worker(work.path()).await;

    let stop = Arc::new(AtomicBool::new(false));
    follow_workers(work.path().into(), fleet.dir.path().into(), serve_addr.clone(), stop.clone());
    let agents: Vec<String> =
        fleet.agents.iter().map(|(_, port)| format!("'127.0.0.1:{port}'")).collect();
    let scrape = format!(
        "  - job_name: flotilla-operator\n    static_configs:\n      - targets: ['127.0.0.1:{}']\n\
         \x20 - job_name: flotilla-agent\n    static_configs:\n      - targets: [{}]\n\
         \x20 - job_name: flotilla-worker\n    file_sd_configs:\n      - files: ['{}']\n        refresh_interval: 1s\n",
        fleet.operator_admin,
        agents.join(", "),
        work.path().join("workers.json").display()
    );
    // The serving worker's request series come into being with its first request.
    completions(&serve_addr);
    let prom = Prometheus::start(work.path(), &scrape);
    // Scraped from before anything happens, so every first event is an increase.
    eventually(
        WAIT,
        "Prometheus scraping the operator, the agents and the serving worker",
        || async {
            let n = prom.query("count(up == 1)").ok()?;
            let up = n.first()?["value"][1].as_str()?.parse::<f64>().ok()?;
            (up >= 4.0).then_some(())
        },
    )
    .await
    .unwrap_or_else(|e| {
        panic!(
            "{e}\n{}",
            std::fs::read_to_string(work.path().join("prometheus.log")).unwrap_or_default()
        )
    });
    std::thread::sleep(Duration::from_secs(2));
    completions(&serve_addr);
    let jobs: Api<TrainingJob> = Api::namespaced(client.clone(), &ns);
    // Long enough to outlast the test; checkpoints often, for the checkpoint alert's series.
    jobs.create(&PostParams::default(), &tiny_engine_job("prom-e2e", 100_000, 10))
        .await
        .expect("create job");
    let first = eventually(WAIT, "prom-e2e Running", || async {
        let s = jobs.get("prom-e2e").await.ok()?.status?;
        (s.phase == JobPhase::Running).then_some(s.attempt?)
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", fleet.logs()));

    eventually(WAIT, "Prometheus scraping the training workers", || async {
        let n = prom.query("count(up{job=\"flotilla-worker\"} == 1)").ok()?;
        let up = n.first()?["value"][1].as_str()?.parse::<f64>().ok()?;
        (up >= 3.0).then_some(()) // two training ranks and the serving worker
    })
    .await
    .unwrap_or_else(|e| {
        panic!(
            "{e}\n{}\n{}",
            std::fs::read_to_string(work.path().join("prometheus.log")).unwrap_or_default(),
            fleet.logs()
        )
    });

    let mut failures = Vec::new();
    // A GPU failure: XID 79 under rank 0; the job restarts elsewhere.
    let victim = &first.placement.workers[0];
    let out = Command::new(binary("flotilla-agent", "flotilla-agent"))
        .args(["inject", "--agent", &format!("127.0.0.1:{}", fleet.agent_admin(&victim.node))])
        .args(["--gpu", &victim.gpus[0].to_string(), "--xid", "79"])
        .output()
        .expect("flotilla-agent inject");
    assert!(out.status.success(), "inject: {}", String::from_utf8_lossy(&out.stderr));

    // Through the fault (the GPU fails, its worker goes, the job restarts elsewhere, so the
    // GPU's holder labels change), the "Failed GPUs" panel and the FlotillaGpuFailed expression
    // are evaluated at the same instants: whenever the alert holds for the victim, the panel
    // counts it. The victim's own health series are printed as they change.
    let alert_expr = alert_rules()
        .into_iter()
        .find(|(name, _)| name == "FlotillaGpuFailed")
        .map(|(_, expr)| expr)
        .expect("FlotillaGpuFailed");
    let panel_expr = failed_gpus_panel();
    let victim_series = format!(
        "flotilla_gpu_health_state{{Hostname=\"{}\",gpu=\"{}\"}}",
        victim.node, victim.gpus[0]
    );
    println!("\nThrough the fault (victim {} GPU {}):", victim.node, victim.gpus[0]);
    let watch_until = Instant::now() + WAIT;
    let (mut last, mut alert_since, mut restarted) = (String::new(), None, false);
    while Instant::now() < watch_until {
        // A second back, so every scrape up to that instant is in.
        let at = Some(unix_now() - 1.0);
        let alert = prom.query_at(&alert_expr, at).unwrap_or_else(|e| panic!("{alert_expr}: {e}"));
        let on_victim = alert.iter().any(|a| {
            a["metric"]["Hostname"] == victim.node.as_str()
                && a["metric"]["gpu"] == victim.gpus[0].to_string().as_str()
        });
        let panel = prom.query_at(&panel_expr, at).unwrap_or_else(|e| panic!("{panel_expr}: {e}"));
        let panel = first_value(&panel).unwrap_or(0.0);
        let raw = prom.query_at(&victim_series, at).unwrap_or_else(|e| panic!("{e}"));
        let raw: Vec<String> = raw.iter().map(sample).collect();
        let line = format!(
            "alert expr on victim: {on_victim}; panel: {panel}; victim series: {}",
            raw.join(" ")
        );
        if line != last {
            println!("  {:>5.1}s {line}", started.elapsed().as_secs_f64());
            last = line;
        }
        if on_victim && panel < 1.0 {
            failures.push(format!(
                "the Failed GPUs panel read {panel} while FlotillaGpuFailed's expression held \
                 for the victim; its series: {raw:?}"
            ));
        }
        if on_victim {
            alert_since.get_or_insert_with(Instant::now);
        }
        if !restarted {
            restarted = jobs.get("prom-e2e").await.ok().and_then(|j| j.status).is_some_and(|s| {
                s.phase == JobPhase::Running
                    && s.attempt.is_some_and(|a| a.number == 2 && a.start_time.is_some())
            });
        }
        // Done a few seconds after the restart, with the alert holding for a while.
        if restarted && alert_since.is_some_and(|t| t.elapsed() > Duration::from_secs(5)) {
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    assert!(restarted, "prom-e2e attempt 2 never ran\n{}", fleet.logs());
    if alert_since.is_none() {
        failures.push(format!("{alert_expr} never held for the victim"));
    }

    // Every panel query: no error, and series (polled: scrapes and rule evaluations lag).
    let deadline = Instant::now() + Duration::from_secs(120);
    println!("\n| dashboard | panel | query | series | sample |\n|---|---|---|---|---|");
    for (file, title, expr) in panel_queries() {
        let filled = fill(&expr);
        let result = loop {
            match prom.query(&filled) {
                Ok(series) if series.is_empty() && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(500))
                }
                other => break other,
            }
        };
        match result {
            Ok(series) if !series.is_empty() => {
                // Show a series with a number where there is one (quantiles of idle series are NaN).
                let shown = series
                    .iter()
                    .find(|s| s["value"][1].as_str().is_some_and(|v| v != "NaN"))
                    .unwrap_or(&series[0]);
                println!(
                    "| {file} | {title} | `{filled}` | {} | `{}` |",
                    series.len(),
                    sample(shown)
                )
            }
            Ok(_) => failures.push(format!("{file} `{title}`: no series for {filled}")),
            Err(e) => failures.push(format!("{file} `{title}`: {filled}: {e}")),
        }
    }

    // Every alert expression evaluates, and every metric it selects has series.
    println!(
        "\n| alert | expression | firing series now | metrics with series |\n|---|---|---|---|"
    );
    for (alert, expr) in alert_rules() {
        let now = match prom.query(&expr) {
            Ok(series) => series.len(),
            Err(e) => {
                failures.push(format!("alert {alert}: {e}"));
                continue;
            }
        };
        let mut counts = Vec::new();
        for name in metric_names(&expr) {
            match prom.query(&format!("count({name})")) {
                Ok(s) if !s.is_empty() => counts.push(format!("{name}: {}", sample(&s[0]))),
                Ok(_) => failures.push(format!("alert {alert}: no series of {name}")),
                Err(e) => failures.push(format!("alert {alert}: count({name}): {e}")),
            }
        }
        println!("| {alert} | `{}` | {now} | {} |", expr.replace('\n', " "), counts.join("; "));
    }

    // The GPU-failed alert for the injected GPU.
    let uuid_gpu = victim.gpus[0].to_string();
    let alert = eventually(Duration::from_secs(60), "FlotillaGpuFailed pending or firing", || {
        let alerts = prom.alerts();
        let node = victim.node.clone();
        let gpu = uuid_gpu.clone();
        async move {
            alerts.into_iter().find(|a| {
                a["labels"]["alertname"] == "FlotillaGpuFailed"
                    && a["labels"]["Hostname"] == node.as_str()
                    && a["labels"]["gpu"] == gpu.as_str()
                    && matches!(a["state"].as_str(), Some("pending" | "firing"))
            })
        }
    })
    .await;
    match alert {
        Ok(a) => {
            println!("\nFlotillaGpuFailed: {} for {} GPU {}", a["state"], victim.node, uuid_gpu)
        }
        Err(e) => failures.push(format!("{e}; alerts: {:?}", prom.alerts())),
    }
    stop.store(true, Ordering::Relaxed);
    println!("\n(test took {:.0?})", started.elapsed());
    assert!(failures.is_empty(), "{}\n\n{}", failures.join("\n"), fleet.logs());
}
