//! A stored object the operator cannot read (written while the CRD schema was looser) gets a
//! Warning Event naming what is wrong, and the watch goes on serving every other object.

use flotilla_operator::crd::gpu_node::{GpuHealth, GpuNodeStatus, GpuState};
use flotilla_operator::crd::{GpuNode, JobPhase, TrainingJob};
use flotilla_tests::{Operator, eventually, install_crds, training_job};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use serde_json::json;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(60);

/// The committed TrainingJob CRD with its schema opened up (anything goes).
fn loose_crd() -> CustomResourceDefinition {
    let path = flotilla_tests::workspace().join("deploy/crds/trainingjobs.flotilla.dev.yaml");
    let mut crd: CustomResourceDefinition =
        serde_yaml_ng::from_str(&std::fs::read_to_string(path).expect("CRD file"))
            .expect("CRD YAML");
    let schema = json!({"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}});
    crd.spec.versions[0].schema = Some(serde_json::from_value(schema).expect("schema"));
    crd.metadata.managed_fields = None;
    crd
}

#[tokio::test]
async fn a_malformed_object_is_reported_and_the_watch_goes_on() {
    let cp = flotilla_tests::control_plane_for(module_path!()).await;
    install_crds(&cp).expect("CRDs install");
    let client = cp.client().await.expect("client");
    let ns = flotilla_tests::namespace(&client, "malformed").await.expect("namespace");
    let logs = tempfile::tempdir().expect("tempdir");
    let nodes: Api<GpuNode> = Api::all(client.clone());
    nodes
        .create(&PostParams::default(), &GpuNode::new("m-node", Default::default()))
        .await
        .expect("node");
    let status = GpuNodeStatus {
        gpus: (0..4)
            .map(|index| GpuState { index, health: GpuHealth::Healthy, ..Default::default() })
            .collect(),
        last_heartbeat_time: Some(Time(Timestamp::now())),
        ..Default::default()
    };
    let patch = json!({"apiVersion": "flotilla.dev/v1alpha1", "kind": "GpuNode", "status": status});
    nodes
        .patch_status("m-node", &PatchParams::apply("test-agent"), &Patch::Apply(&patch))
        .await
        .expect("status");
    let operator = Operator::start(&cp, "op-m", &ns, logs.path()).expect("operator starts");
    let jobs: Api<TrainingJob> = Api::namespaced(client.clone(), &ns);
    jobs.create(&PostParams::default(), &training_job("before").build()).await.expect("before");

    // Loosen the schema, store an object without `spec.workers`, restore the schema.
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let apply = PatchParams::apply("malformed-test").force();
    crds.patch("trainingjobs.flotilla.dev", &apply, &Patch::Apply(loose_crd()))
        .await
        .expect("loosen CRD");
    let gvk = GroupVersionKind::gvk("flotilla.dev", "v1alpha1", "TrainingJob");
    let raw: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), &ns, &ApiResource::from_gvk(&gvk));
    let broken: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "flotilla.dev/v1alpha1", "kind": "TrainingJob", "metadata": {"name": "broken"},
        "spec": {"gpusPerWorker": 1, "command": {"command": ["/bin/true"]}}
    }))
    .expect("object");
    eventually(WAIT, "the loose schema to admit the broken object", || async {
        raw.create(&PostParams::default(), &broken).await.ok()
    })
    .await
    .expect("broken object stored");
    install_crds(&cp).expect("restore the CRDs");

    let warning = eventually(WAIT, "a Malformed event on the broken object", || async {
        let events: Api<Event> = Api::namespaced(client.clone(), &ns);
        events.list(&ListParams::default()).await.ok()?.items.into_iter().find(|e| {
            e.reason.as_deref() == Some("Malformed")
                && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("broken")
        })
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\noperator:\n{}", operator.log()));
    assert_eq!(warning.type_.as_deref(), Some("Warning"));
    let note = warning.note.unwrap_or_default();
    assert!(note.contains("workers"), "the event names the field: {note}");

    // The watch is intact: objects before and after the broken one are handled.
    jobs.create(&PostParams::default(), &training_job("after").build()).await.expect("after");
    for name in ["before", "after"] {
        eventually(WAIT, &format!("{name} Scheduled"), || async {
            (jobs.get(name).await.ok()?.status?.phase == JobPhase::Scheduled).then_some(())
        })
        .await
        .unwrap_or_else(|e| panic!("{e}\noperator:\n{}", operator.log()));
    }
}
