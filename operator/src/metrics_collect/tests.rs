use super::*;
use crate::agents::state::FaultRecord;
use serde_json::json;

fn t(second: i64) -> Time {
    Time(Timestamp::from_second(second).expect("valid time"))
}

/// A job from JSON, as the API serves it, so the fixture keeps up with new spec fields.
fn job(name: &str, created: i64, status: serde_json::Value) -> TrainingJob {
    serde_json::from_value(json!({
        "apiVersion": "flotilla.dev/v1alpha1",
        "kind": "TrainingJob",
        "metadata": {
            "name": name, "namespace": "ns", "uid": format!("uid-{name}"),
            "creationTimestamp": t(created),
        },
        "spec": {"workers": 1, "gpusPerWorker": 1, "command": {"command": ["/bin/true"]}},
        "status": status,
    }))
    .expect("a TrainingJob")
}

fn restart(attempt: i32, at: i64, cause: &str) -> serde_json::Value {
    json!({"time": t(at), "attempt": attempt, "cause": cause, "reason": "test"})
}

fn attempt(number: i32, scheduled: i64, started: Option<i64>) -> serde_json::Value {
    let mut a =
        json!({"number": number, "placement": {"workers": []}, "scheduledTime": t(scheduled)});
    if let Some(s) = started {
        a["startTime"] = json!(t(s));
    }
    a
}

fn rendered(m: &Metrics) -> String {
    m.render()
}

#[test]
fn phases_are_counted_with_zeros_for_empty_phases() {
    let m = Metrics::new();
    let mut c = MetricsCollector::new(m.clone(), Timestamp::from_second(1_000).unwrap());
    let a = job("a", 900, json!({"phase": "Running"}));
    let b = job("b", 900, json!({"phase": "Running"}));
    let q = job("q", 900, json!({"phase": "Queued"}));
    c.observe_objects(&[&a, &b, &q], &[]);
    let text = rendered(&m);
    for line in [
        r#"flotilla_operator_jobs{kind="TrainingJob",phase="Running"} 2"#,
        r#"flotilla_operator_jobs{kind="TrainingJob",phase="Queued"} 1"#,
        r#"flotilla_operator_jobs{kind="TrainingJob",phase="Failed"} 0"#,
        r#"flotilla_operator_jobs{kind="InferenceService",phase="Ready"} 0"#,
    ] {
        assert!(text.contains(line), "missing {line} in\n{text}");
    }
    // A job that finished moves between phases; the old phase drops to zero.
    let a = job("a", 900, json!({"phase": "Succeeded"}));
    c.observe_objects(&[&a], &[]);
    let text = rendered(&m);
    assert!(text.contains(r#"flotilla_operator_jobs{kind="TrainingJob",phase="Running"} 0"#));
    assert!(text.contains(r#"flotilla_operator_jobs{kind="TrainingJob",phase="Succeeded"} 1"#));
}

#[test]
fn queue_wait_is_observed_once_from_creation_to_first_placement() {
    let m = Metrics::new();
    let mut c = MetricsCollector::new(m.clone(), Timestamp::from_second(1_000).unwrap());
    let j = job("j", 1_000, json!({"phase": "Scheduled", "attempt": attempt(1, 1_004, None)}));
    c.observe_objects(&[&j], &[]);
    c.observe_objects(&[&j], &[]);
    let text = rendered(&m);
    assert!(
        text.contains(r#"flotilla_operator_queue_wait_seconds_sum{kind="TrainingJob"} 4"#),
        "{text}"
    );
    assert!(text.contains(r#"flotilla_operator_queue_wait_seconds_count{kind="TrainingJob"} 1"#));
}

#[test]
fn events_from_before_the_collector_started_are_not_counted() {
    let m = Metrics::new();
    let mut c = MetricsCollector::new(m.clone(), Timestamp::from_second(2_000).unwrap());
    let j = job(
        "old",
        1_000,
        json!({
            "phase": "Running",
            "attempt": attempt(2, 1_500, Some(1_510)),
            "restartHistory": [restart(1, 1_400, "HardwareFault")],
        }),
    );
    c.observe_objects(&[&j], &[]);
    let text = rendered(&m);
    assert!(
        !text.contains(
            r#"flotilla_operator_restarts_total{kind="TrainingJob",reason="HardwareFault"} 1"#
        ),
        "{text}"
    );
    assert!(
        text.contains(
            r#"flotilla_operator_restarts_total{kind="TrainingJob",reason="HardwareFault"} 0"#
        ),
        "{text}"
    );
    assert!(
        text.contains(r#"flotilla_operator_queue_wait_seconds_count{kind="TrainingJob"} 0"#),
        "{text}"
    );
    assert!(text.contains(r#"flotilla_operator_time_to_recover_seconds_count{kind="TrainingJob",reason="HardwareFault"} 0"#), "{text}");
}

#[test]
fn restarts_by_reason_and_time_to_recover_follow_the_history() {
    let m = Metrics::new();
    let mut c = MetricsCollector::new(m.clone(), Timestamp::from_second(1_000).unwrap());
    // Attempt 1 ended by a GPU fault at 1_100; attempt 2 placed, not yet running.
    let restarting = job(
        "j",
        1_000,
        json!({
            "phase": "Scheduled",
            "attempt": attempt(2, 1_105, None),
            "restartHistory": [restart(1, 1_100, "HardwareFault")],
        }),
    );
    c.observe_objects(&[&restarting], &[]);
    let text = rendered(&m);
    assert!(text.contains(
        r#"flotilla_operator_restarts_total{kind="TrainingJob",reason="HardwareFault"} 1"#
    ));
    assert!(text.contains(r#"flotilla_operator_time_to_recover_seconds_count{kind="TrainingJob",reason="HardwareFault"} 0"#), "{text}");
    // Attempt 2 runs at 1_112: recovered in 12 s. Attempt 2 then exits; attempt 3 runs 3 s later.
    let running = job(
        "j",
        1_000,
        json!({
            "phase": "Running",
            "attempt": attempt(2, 1_105, Some(1_112)),
            "restartHistory": [restart(1, 1_100, "HardwareFault")],
        }),
    );
    c.observe_objects(&[&running], &[]);
    c.observe_objects(&[&running], &[]);
    let again = job(
        "j",
        1_000,
        json!({
            "phase": "Running",
            "attempt": attempt(3, 1_201, Some(1_203)),
            "restartHistory": [restart(1, 1_100, "HardwareFault"), restart(2, 1_200, "WorkerExit")],
        }),
    );
    c.observe_objects(&[&again], &[]);
    let text = rendered(&m);
    for line in [
        r#"flotilla_operator_restarts_total{kind="TrainingJob",reason="HardwareFault"} 1"#,
        r#"flotilla_operator_restarts_total{kind="TrainingJob",reason="WorkerExit"} 1"#,
        r#"flotilla_operator_time_to_recover_seconds_sum{kind="TrainingJob",reason="HardwareFault"} 12"#,
        r#"flotilla_operator_time_to_recover_seconds_count{kind="TrainingJob",reason="HardwareFault"} 1"#,
        r#"flotilla_operator_time_to_recover_seconds_sum{kind="TrainingJob",reason="WorkerExit"} 3"#,
    ] {
        assert!(text.contains(line), "missing {line} in\n{text}");
    }
}

fn node(name: &str, connected: bool, fault: Option<(i64, u32, Option<u32>)>) -> NodeRecord {
    NodeRecord {
        node: name.into(),
        agent_version: "test".into(),
        instance_id: "i".into(),
        process_id: "p".into(),
        backend: "simulated".into(),
        gpus: vec![],
        applied_seq: 0,
        connected,
        lost: false,
        last_heard: std::time::Instant::now(),
        last_fault: fault.map(|(at, gpu, xid)| FaultRecord {
            gpu,
            xid,
            reason: "test".into(),
            message: String::new(),
            observed_at_unix_nanos: at,
        }),
        workers: vec![],
        session: 1,
        address: None,
    }
}

#[test]
fn faults_are_counted_once_by_xid_class_and_agents_connected_is_a_gauge() {
    let m = Metrics::new();
    let since = Timestamp::from_second(1_000).unwrap();
    let mut c = MetricsCollector::new(m.clone(), since);
    let ns = |s: i64| s * 1_000_000_000;
    let fleet = [
        node("a", true, Some((ns(1_010), 0, Some(79)))),
        node("b", false, Some((ns(900), 1, Some(48)))), // before the collector: not counted
        node("c", true, None),
    ];
    c.observe_fleet(&fleet);
    c.observe_fleet(&fleet);
    let fleet = [
        node("a", true, Some((ns(1_020), 1, Some(13)))),
        node("b", true, Some((ns(1_030), 1, Some(63)))),
        node("c", true, Some((ns(1_031), 0, None))),
    ];
    c.observe_fleet(&fleet);
    let text = rendered(&m);
    for line in [
        r#"flotilla_operator_gpu_faults_total{class="hardware-fatal"} 1"#,
        r#"flotilla_operator_gpu_faults_total{class="application"} 1"#,
        r#"flotilla_operator_gpu_faults_total{class="degraded"} 1"#,
        r#"flotilla_operator_gpu_faults_total{class="not-xid"} 1"#,
        r#"flotilla_operator_gpu_faults_total{class="unknown"} 0"#,
        "flotilla_operator_agents_connected 3",
    ] {
        assert!(text.contains(line), "missing {line} in\n{text}");
    }
    // XID 48 (hardware-fatal) came before the collector: the class counts only the XID 79.
}

#[test]
fn xid_classes_follow_the_reference_table() {
    assert_eq!(xid_class(13), "application");
    assert_eq!(xid_class(79), "hardware-fatal");
    assert_eq!(xid_class(74), "hardware-fatal");
    assert_eq!(xid_class(154), "hardware-reset");
    assert_eq!(xid_class(94), "degraded");
    assert_eq!(xid_class(12345), "unknown");
}
