//! The operator against the real control plane: the sample manifests move through their
//! phases, Events are published, invalid specs get `Valid=False`.

use flotilla_operator::crd::gpu_node::{GpuHealth, GpuNodeStatus, GpuState};
use flotilla_operator::crd::{GpuNode, InferenceService, JobPhase, ServicePhase, TrainingJob};
use flotilla_tests::{Operator, eventually, install_crds, kubectl};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(60);

/// Create a GpuNode with `gpus` healthy GPUs and a fresh heartbeat, labelled for the samples.
async fn add_node(client: &kube::Client, name: &str, gpus: i32) {
    let api: Api<GpuNode> = Api::all(client.clone());
    let mut node = GpuNode::new(name, Default::default());
    node.metadata.labels = Some([("flotilla.dev/pool".to_string(), "demo".to_string())].into());
    api.create(&PostParams::default(), &node).await.expect("create GpuNode");
    let status = GpuNodeStatus {
        gpus: (0..gpus)
            .map(|index| GpuState {
                index,
                uuid: format!("GPU-{name}-{index}"),
                health: GpuHealth::Healthy,
                ..Default::default()
            })
            .collect(),
        gpu_model: Some("Simulated H100".into()),
        last_heartbeat_time: Some(Time(Timestamp::now())),
        ..Default::default()
    };
    let patch = json!({"apiVersion": "flotilla.dev/v1alpha1", "kind": "GpuNode", "status": status});
    api.patch_status(name, &PatchParams::apply("test-agent"), &Patch::Apply(&patch))
        .await
        .expect("GpuNode status");
}

async fn phase_of(api: &Api<TrainingJob>, name: &str) -> Option<JobPhase> {
    api.get_opt(name).await.ok().flatten().and_then(|j| j.status).map(|s| s.phase)
}

async fn event_reasons(client: &kube::Client, ns: &str, name: &str) -> Vec<String> {
    let api: Api<Event> = Api::namespaced(client.clone(), ns);
    let list = api.list(&ListParams::default()).await.expect("list events");
    list.items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
        .filter_map(|e| e.reason)
        .collect()
}

#[tokio::test]
async fn samples_move_through_their_phases() {
    let cp = flotilla_tests::control_plane_for(module_path!()).await;
    install_crds(&cp).expect("CRDs install");
    let client = cp.client().await.expect("client");
    let ns = flotilla_tests::namespace(&client, "samples").await.expect("namespace");
    let logs = tempfile::tempdir().expect("tempdir");
    add_node(&client, "sim-node-0", 4).await;
    add_node(&client, "sim-node-1", 4).await;
    let operator = Operator::start(&cp, "op-a", &ns, logs.path()).expect("operator starts");

    eventually(WAIT, "the operator ready on /ready", || async { operator.admin_get("/ready") })
        .await
        .unwrap_or_else(|e| panic!("{e}\noperator log:\n{}", operator.log()));
    assert!(operator.admin_get("/live").is_some());

    let examples = flotilla_tests::workspace().join("deploy/examples");
    for file in ["trainingjob-engine.yaml", "trainingjob-command.yaml", "inferenceservice.yaml"] {
        let out = kubectl(
            &cp,
            &["apply", "-n", &ns, "-f", examples.join(file).to_str().expect("utf-8")],
            None,
        );
        assert!(
            out.status.success(),
            "{file}: {}\ncontrol plane:\n{}\noperator:\n{}",
            String::from_utf8_lossy(&out.stderr),
            cp.log_tail(),
            operator.log()
        );
    }
    let jobs: Api<TrainingJob> = Api::namespaced(client.clone(), &ns);
    for name in ["moe-tiny", "custom-script"] {
        let job = eventually(WAIT, &format!("{name} Scheduled"), || async {
            let j = jobs.get(name).await.ok()?;
            (j.status.as_ref()?.phase == JobPhase::Scheduled).then_some(j)
        })
        .await
        .unwrap_or_else(|e| panic!("{e}\noperator log:\n{}", operator.log()));
        let status = job.status.expect("status");
        let attempt = status.attempt.expect("attempt written before launch");
        assert_eq!(attempt.number, 1);
        assert_eq!(attempt.placement.workers.len() as i32, job.spec.workers);
        assert!(
            attempt
                .placement
                .workers
                .iter()
                .all(|w| w.gpus.len() as i32 == job.spec.gpus_per_worker)
        );
        assert_eq!(status.observed_generation, job.metadata.generation);
        let valid = status.conditions.iter().find(|c| c.type_ == "Valid").expect("Valid condition");
        assert_eq!(valid.status, "True");
    }
    // custom-script spreads its single 2-GPU worker; the two jobs never share a GPU.
    let a = jobs.get("moe-tiny").await.unwrap().status.unwrap().attempt.unwrap().placement;
    let b = jobs.get("custom-script").await.unwrap().status.unwrap().attempt.unwrap().placement;
    for wa in &a.workers {
        for wb in &b.workers {
            assert!(
                wa.node != wb.node || wa.gpus.iter().all(|g| !wb.gpus.contains(g)),
                "GPU shared: {a:?} {b:?}"
            );
        }
    }
    // A job that fits at once goes from Pending to Scheduled in one step: no Queued event.
    let reasons = eventually(WAIT, "a Scheduled event", || async {
        let r = event_reasons(&client, &ns, "moe-tiny").await;
        r.iter().any(|x| x == "Scheduled").then_some(r)
    })
    .await
    .expect("events");
    assert!(!reasons.is_empty());

    // Suspend stops the attempt; resuming places attempt 2.
    let patch = |v: serde_json::Value| async {
        jobs.patch("moe-tiny", &PatchParams::default(), &Patch::Merge(v)).await.expect("patch")
    };
    patch(json!({"spec": {"suspend": true}})).await;
    eventually(WAIT, "moe-tiny Suspended", || async {
        (phase_of(&jobs, "moe-tiny").await? == JobPhase::Suspended).then_some(())
    })
    .await
    .expect("suspended");
    patch(json!({"spec": {"suspend": false}})).await;
    let attempt = eventually(WAIT, "moe-tiny attempt 2", || async {
        let s = jobs.get("moe-tiny").await.ok()?.status?;
        (s.phase == JobPhase::Scheduled && s.attempt.as_ref()?.number == 2).then_some(s.attempt?)
    })
    .await
    .expect("rescheduled");
    assert_eq!(attempt.placement.workers.len(), 2);

    // The service places both replicas and waits for them to serve.
    let services: Api<InferenceService> = Api::namespaced(client.clone(), &ns);
    let svc = eventually(WAIT, "moe-tiny-chat Starting", || async {
        let s = services.get("moe-tiny-chat").await.ok()?;
        (s.status.as_ref()?.phase == ServicePhase::Starting).then_some(s)
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\noperator log:\n{}", operator.log()));
    let status = svc.status.unwrap();
    assert_eq!(status.replicas.len(), 2);
    assert_eq!(status.gpus_per_replica, 1);

    // A spec only the operator can judge: a malformed nodeSelector key.
    let mut bad: TrainingJob = serde_yaml_ng::from_str(
        &std::fs::read_to_string(examples.join("trainingjob-command.yaml")).unwrap(),
    )
    .unwrap();
    bad.metadata.name = Some("bad-selector".into());
    bad.spec.scheduling.node_selector = [("not a key".to_string(), "x".to_string())].into();
    jobs.create(&PostParams::default(), &bad).await.expect("the API server accepts it");
    let valid = eventually(WAIT, "Valid=False on bad-selector", || async {
        let s = jobs.get("bad-selector").await.ok()?.status?;
        s.conditions.into_iter().find(|c| c.type_ == "Valid" && c.status == "False")
    })
    .await
    .expect("Valid=False");
    assert!(valid.message.contains("spec.scheduling.nodeSelector"), "{}", valid.message);
    assert_eq!(phase_of(&jobs, "bad-selector").await, Some(JobPhase::Pending));
    assert!(
        jobs.get("bad-selector").await.unwrap().status.unwrap().attempt.is_none(),
        "nothing was placed"
    );

    // The engine's own cross-field rules, which no schema expresses, also give Valid=False.
    let mut bad: TrainingJob = serde_yaml_ng::from_str(
        &std::fs::read_to_string(examples.join("trainingjob-engine.yaml")).unwrap(),
    )
    .unwrap();
    bad.metadata.name = Some("bad-engine".into());
    bad.spec.checkpoint.as_mut().unwrap().path = "/shared/checkpoints/bad-engine".into();
    bad.spec.engine.as_mut().unwrap().model.num_expert_groups = 3;
    jobs.create(&PostParams::default(), &bad).await.expect("the API server accepts it");
    let valid = eventually(WAIT, "Valid=False on bad-engine", || async {
        let s = jobs.get("bad-engine").await.ok()?.status?;
        s.conditions.into_iter().find(|c| c.type_ == "Valid" && c.status == "False")
    })
    .await
    .expect("Valid=False");
    assert!(valid.message.contains("spec.engine.model.numExpertGroups"), "{}", valid.message);
    assert!(event_reasons(&client, &ns, "bad-engine").await.iter().any(|r| r == "InvalidSpec"));

    let metrics = operator.admin_get("/metrics").expect("/metrics answers");
    for line in [
        "flotilla_operator_is_leader 1",
        "flotilla_operator_phase_transitions_total{kind=\"TrainingJob\",phase=\"Scheduled\"}",
    ] {
        assert!(metrics.contains(line), "{line} missing from /metrics:\n{metrics}");
    }

    // A deadline fails the job; its TTL then deletes it, through the finalizer.
    let mut short = bad.clone();
    short.metadata = kube::api::ObjectMeta { name: Some("short".into()), ..Default::default() };
    short.spec.engine.as_mut().unwrap().model.num_expert_groups = 4;
    short.spec.checkpoint.as_mut().unwrap().path = "/shared/checkpoints/short".into();
    short.spec.active_deadline_seconds = Some(2);
    short.spec.ttl_seconds_after_finished = Some(1);
    short.status = None;
    jobs.create(&PostParams::default(), &short).await.expect("short job");
    eventually(WAIT, "short deleted after its deadline and TTL", || async {
        jobs.get_opt("short").await.ok()?.is_none().then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\noperator log:\n{}", operator.log()));
    let reasons = event_reasons(&client, &ns, "short").await;
    for reason in ["Scheduled", "DeadlineExceeded", "TtlExpired"] {
        assert!(reasons.iter().any(|r| r == reason), "{reason} missing from {reasons:?}");
    }

    // Deleting a job goes through the finalizer and completes.
    jobs.delete("custom-script", &Default::default()).await.expect("delete");
    eventually(WAIT, "custom-script gone", || async {
        jobs.get_opt("custom-script").await.ok()?.is_none().then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\noperator log:\n{}", operator.log()));
}
