//! The bad-input table: invalid manifests are rejected at admission by the real API server
//! with a message naming the field, and nothing in the cluster changes.

use flotilla_tests::{ControlPlane, install_crds, kubectl};
use serde_json::{Value, json};

fn training_job(name: &str) -> Value {
    json!({
        "apiVersion": "flotilla.dev/v1alpha1",
        "kind": "TrainingJob",
        "metadata": {"name": name},
        "spec": {
            "workers": 2,
            "gpusPerWorker": 1,
            "command": {"command": ["/bin/train"]},
            "checkpoint": {"path": "/ckpt/run", "intervalSeconds": 60},
        }
    })
}

/// The engine's `tiny` preset, as the engine crate serialises it.
fn engine() -> Value {
    let preset = flotilla_operator::crd::engine::EngineConfig::preset("tiny").expect("tiny preset");
    serde_json::to_value(preset).expect("engine config serialises")
}

fn inference_service(name: &str) -> Value {
    json!({
        "apiVersion": "flotilla.dev/v1alpha1",
        "kind": "InferenceService",
        "metadata": {"name": name},
        "spec": {"replicas": 1, "model": {"checkpointPath": "/ckpt/run"}}
    })
}

fn gpu_node(name: &str) -> Value {
    json!({"apiVersion": "flotilla.dev/v1alpha1", "kind": "GpuNode", "metadata": {"name": name}, "spec": {}})
}

/// Set `value` at a JSON pointer, creating objects on the way; `Value::Null` removes the field.
fn with(mut doc: Value, pointer: &str, value: Value) -> Value {
    let (parent, key) = pointer.rsplit_once('/').expect("pointer has a slash");
    let mut target = &mut doc;
    for part in parent.split('/').filter(|p| !p.is_empty()) {
        target = target.as_object_mut().expect("object").entry(part).or_insert_with(|| json!({}));
    }
    let obj = target.as_object_mut().expect("object");
    if value.is_null() {
        obj.remove(key);
    } else {
        obj.insert(key.to_string(), value);
    }
    doc
}

/// One invalid manifest: created fresh, it must be rejected with `field` in the message.
struct Bad {
    what: &'static str,
    manifest: Value,
    field: &'static str,
}

fn create_cases() -> Vec<Bad> {
    let tj = || training_job("bad");
    let bad = |what, manifest, field| Bad { what, manifest, field };
    vec![
        bad("zero workers", with(tj(), "/spec/workers", json!(0)), "spec.workers"),
        bad("negative workers", with(tj(), "/spec/workers", json!(-3)), "spec.workers"),
        bad("huge workers", with(tj(), "/spec/workers", json!(100000)), "spec.workers"),
        bad("workers as a string", with(tj(), "/spec/workers", json!("four")), "spec.workers"),
        bad("workers missing", with(tj(), "/spec/workers", Value::Null), "spec.workers"),
        bad(
            "zero GPUs per worker",
            with(tj(), "/spec/gpusPerWorker", json!(0)),
            "spec.gpusPerWorker",
        ),
        bad(
            "more GPUs than a node holds",
            with(tj(), "/spec/gpusPerWorker", json!(32)),
            "spec.gpusPerWorker",
        ),
        bad(
            "more GPUs than a job may use",
            with(with(tj(), "/spec/workers", json!(1024)), "/spec/gpusPerWorker", json!(16)),
            "spec.workers",
        ),
        bad("unknown field", with(tj(), "/spec/replicas", json!(3)), "spec.replicas"),
        bad("neither engine nor command", with(tj(), "/spec/command", Value::Null), "spec.engine"),
        bad("both engine and command", with(tj(), "/spec/engine", engine()), "spec.command"),
        bad(
            "engine with an unknown field",
            with(
                with(tj(), "/spec/command", Value::Null),
                "/spec/engine",
                with(engine(), "/model/expertCount", json!(8)),
            ),
            "spec.engine.model.expertCount",
        ),
        bad(
            "engine field of the wrong type",
            with(
                with(tj(), "/spec/command", Value::Null),
                "/spec/engine",
                with(engine(), "/model/hiddenSize", json!("big")),
            ),
            "spec.engine.model.hiddenSize",
        ),
        bad(
            "engine without its model",
            with(
                with(tj(), "/spec/command", Value::Null),
                "/spec/engine",
                with(engine(), "/model", Value::Null),
            ),
            "spec.engine.model",
        ),
        bad(
            "empty command",
            with(tj(), "/spec/command/command", json!([])),
            "spec.command.command",
        ),
        bad(
            "env overrides RANK",
            with(tj(), "/spec/command/env", json!([{"name": "RANK", "value": "0"}])),
            "spec.command.env[0].name",
        ),
        bad(
            "env name starts with a digit",
            with(tj(), "/spec/command/env", json!([{"name": "1BAD", "value": "x"}])),
            "spec.command.env[0].name",
        ),
        bad(
            "relative checkpoint path",
            with(tj(), "/spec/checkpoint/path", json!("ckpt/run")),
            "spec.checkpoint.path",
        ),
        bad(
            "checkpoint path with ..",
            with(tj(), "/spec/checkpoint/path", json!("/ckpt/../etc")),
            "spec.checkpoint.path",
        ),
        bad(
            "restarts without checkpoints",
            with(tj(), "/spec/checkpoint", Value::Null),
            "spec.checkpoint",
        ),
        bad(
            "checkpoint interval too short",
            with(tj(), "/spec/checkpoint/intervalSeconds", json!(1)),
            "spec.checkpoint.intervalSeconds",
        ),
        bad(
            "max backoff below backoff",
            with(
                with(tj(), "/spec/restartPolicy/backoffSeconds", json!(60)),
                "/spec/restartPolicy/maxBackoffSeconds",
                json!(5),
            ),
            "spec.restartPolicy.maxBackoffSeconds",
        ),
        bad(
            "exit code out of range",
            with(tj(), "/spec/restartPolicy/retryableExitCodes", json!([300])),
            "spec.restartPolicy.retryableExitCodes[0]",
        ),
        bad(
            "exit code both retryable and fatal",
            with(
                with(tj(), "/spec/restartPolicy/retryableExitCodes", json!([1, 2])),
                "/spec/restartPolicy/fatalExitCodes",
                json!([2]),
            ),
            "spec.restartPolicy.retryableExitCodes",
        ),
        bad(
            "negative restart budget",
            with(tj(), "/spec/restartPolicy/maxRestarts", json!(-1)),
            "spec.restartPolicy.maxRestarts",
        ),
        bad("priority too high", with(tj(), "/spec/priority", json!(5000)), "spec.priority"),
        bad(
            "unknown placement strategy",
            with(tj(), "/spec/scheduling/strategy", json!("Random")),
            "spec.scheduling.strategy",
        ),
        bad(
            "zero deadline",
            with(tj(), "/spec/activeDeadlineSeconds", json!(0)),
            "spec.activeDeadlineSeconds",
        ),
        bad(
            "negative TTL",
            with(tj(), "/spec/ttlSecondsAfterFinished", json!(-1)),
            "spec.ttlSecondsAfterFinished",
        ),
        bad("name too long", training_job(&"x".repeat(64)), "metadata.name"),
        bad(
            "service with negative replicas",
            with(inference_service("bad"), "/spec/replicas", json!(-1)),
            "spec.replicas",
        ),
        bad(
            "service without a model",
            with(inference_service("bad"), "/spec/model", Value::Null),
            "spec.model",
        ),
        bad(
            "service on a privileged port",
            with(inference_service("bad"), "/spec/serving/port", json!(80)),
            "spec.serving.port",
        ),
        bad(
            "cordon without a reason",
            with(gpu_node("bad-node"), "/spec/cordoned", json!(true)),
            "spec.cordonReason",
        ),
        bad(
            "cordoned GPU index out of range",
            with(gpu_node("bad-node"), "/spec/cordonedGpus", json!([99])),
            "spec.cordonedGpus[0]",
        ),
    ]
}

/// One invalid edit of a valid object: `patch` (a merge patch) must be rejected naming `field`.
struct BadEdit {
    what: &'static str,
    kind: &'static str,
    base: Value,
    patch: Value,
    field: &'static str,
}

fn edit_cases() -> Vec<BadEdit> {
    let edit = |what, kind, base, patch, field| BadEdit { what, kind, base, patch, field };
    vec![
        edit(
            "change workers",
            "trainingjob",
            training_job("e1"),
            json!({"spec": {"workers": 3}}),
            "spec.workers",
        ),
        edit(
            "change GPUs per worker",
            "trainingjob",
            training_job("e2"),
            json!({"spec": {"gpusPerWorker": 2}}),
            "spec.gpusPerWorker",
        ),
        edit(
            "change the command",
            "trainingjob",
            training_job("e3"),
            json!({"spec": {"command": {"command": ["/bin/other"]}}}),
            "spec.command",
        ),
        edit(
            "switch command to engine",
            "trainingjob",
            training_job("e4"),
            json!({"spec": {"command": null, "engine": engine()}}),
            "spec.engine",
        ),
        edit(
            "move the checkpoint path",
            "trainingjob",
            training_job("e5"),
            json!({"spec": {"checkpoint": {"path": "/ckpt/elsewhere"}}}),
            "spec.checkpoint",
        ),
        edit(
            "reshape a service replica",
            "inferenceservice",
            inference_service("e6"),
            json!({"spec": {"gpusPerWorker": 2}}),
            "spec.gpusPerWorker",
        ),
    ]
}

fn names(cp: &ControlPlane, ns: &str) -> String {
    let out = kubectl(cp, &["get", "-n", ns, "trainingjobs,inferenceservices", "-o", "name"], None);
    // Only this test creates GpuNodes named bad-node; other tests may create other nodes.
    let nodes =
        kubectl(cp, &["get", "gpunode", "bad-node", "--ignore-not-found", "-o", "name"], None);
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&nodes.stdout))
}

#[tokio::test]
async fn invalid_manifests_are_rejected_at_admission_naming_the_field() {
    let cp = flotilla_tests::control_plane_for(module_path!()).await;
    install_crds(&cp).expect("CRDs install");
    let client = cp.client().await.expect("client");
    let ns = flotilla_tests::namespace(&client, "bad-input").await.expect("namespace");

    let mut failures = Vec::new();
    let cases = create_cases();
    assert!(cases.len() + edit_cases().len() >= 25);
    let before = names(&cp, &ns);
    for case in &cases {
        let out = kubectl(&cp, &["create", "-n", &ns, "-f", "-"], Some(&case.manifest.to_string()));
        let stderr = String::from_utf8_lossy(&out.stderr);
        if out.status.success() {
            failures.push(format!(
                "{}: accepted, expected a rejection naming {}",
                case.what, case.field
            ));
        } else if !stderr.contains(case.field) {
            failures.push(format!(
                "{}: rejected without naming {}: {}",
                case.what,
                case.field,
                stderr.trim()
            ));
        }
    }
    assert_eq!(names(&cp, &ns), before, "a rejected manifest changed the cluster");

    for case in edit_cases() {
        let created = kubectl(&cp, &["create", "-n", &ns, "-f", "-"], Some(&case.base.to_string()));
        assert!(
            created.status.success(),
            "{}: base object rejected: {}",
            case.what,
            String::from_utf8_lossy(&created.stderr)
        );
        let name = case.base["metadata"]["name"].as_str().expect("name");
        let get = || {
            kubectl(
                &cp,
                &[
                    "get",
                    "-n",
                    &ns,
                    case.kind,
                    name,
                    "-o",
                    "jsonpath={.metadata.generation} {.spec}",
                ],
                None,
            )
            .stdout
        };
        let stored = get();
        let out = kubectl(
            &cp,
            &["patch", "-n", &ns, case.kind, name, "--type=merge", "-p", &case.patch.to_string()],
            None,
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        if out.status.success() {
            failures.push(format!(
                "{}: edit accepted, expected a rejection naming {}",
                case.what, case.field
            ));
        } else if !stderr.contains(case.field) {
            failures.push(format!(
                "{}: rejected without naming {}: {}",
                case.what,
                case.field,
                stderr.trim()
            ));
        }
        assert_eq!(get(), stored, "{}: a rejected edit changed the object", case.what);
    }
    assert!(
        failures.is_empty(),
        "{} of the bad-input cases misbehaved:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[tokio::test]
async fn valid_samples_and_mutable_edits_are_accepted() {
    let cp = flotilla_tests::control_plane_for(module_path!()).await;
    install_crds(&cp).expect("CRDs install");
    let client = cp.client().await.expect("client");
    let ns = flotilla_tests::namespace(&client, "samples").await.expect("namespace");
    let examples = flotilla_tests::workspace().join("deploy/examples");
    let out = kubectl(&cp, &["create", "-n", &ns, "-f", examples.to_str().expect("utf-8")], None);
    assert!(out.status.success(), "samples rejected: {}", String::from_utf8_lossy(&out.stderr));
    for patch in [
        json!({"spec": {"suspend": true}}),
        json!({"spec": {"priority": 100}}),
        json!({"spec": {"restartPolicy": {"maxRestarts": 5}}}),
        json!({"spec": {"activeDeadlineSeconds": 7200}}),
    ] {
        let out = kubectl(
            &cp,
            &["patch", "-n", &ns, "tj", "moe-tiny", "--type=merge", "-p", &patch.to_string()],
            None,
        );
        assert!(
            out.status.success(),
            "mutable edit {patch} rejected: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = kubectl(&cp, &["explain", "trainingjob.spec.restartPolicy.maxRestarts"], None);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("budget"), "kubectl explain shows the field's doc: {text}");
}
