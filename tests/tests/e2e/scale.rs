//! The `scale` subresource of `InferenceService`: the README's `kubectl scale` on the sample
//! service changes `spec.replicas`, `kubectl get --subresource=scale` shows the replica count and
//! the selector the operator writes, and kube-controller-manager's HorizontalPodAutoscaler
//! controller drives the service through it (up to `minReplicas`, then reading the selector to
//! fetch its metric).

use flotilla_operator::crd::InferenceService;
use flotilla_operator::endpoints::slice_selector;
use flotilla_tests::{ControlPlane, Operator, eventually, install_crds, kubectl};
use kube::api::Api;
use serde_json::{Value, json};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(90);
/// The sample's name (deploy/examples/inferenceservice.yaml).
const NAME: &str = "moe-tiny-chat";

/// kubectl `args` in namespace `ns`; its stdout, or a panic with its stderr.
fn run(cp: &ControlPlane, ns: &str, args: &[&str], stdin: Option<&str>) -> String {
    let mut all = vec!["-n", ns];
    all.extend_from_slice(args);
    let out = kubectl(cp, &all, stdin);
    assert!(
        out.status.success(),
        "kubectl {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// kube-controller-manager with only the HPA controller, syncing every second; killed on drop.
struct HpaController(Child);

impl HpaController {
    fn start(cp: &ControlPlane, log: &std::path::Path) -> Self {
        let file = std::fs::File::create(log).expect("controller-manager log");
        let kubeconfig = cp.kubeconfig().to_str().expect("utf-8 path").to_owned();
        let child = Command::new(cp.bin_dir().join("kube-controller-manager"))
            .arg(format!("--kubeconfig={kubeconfig}"))
            .arg(format!("--authentication-kubeconfig={kubeconfig}"))
            .arg(format!("--authorization-kubeconfig={kubeconfig}"))
            .arg("--controllers=horizontal-pod-autoscaler-controller")
            .arg("--horizontal-pod-autoscaler-sync-period=1s")
            .args(["--leader-elect=false", "--bind-address=127.0.0.1", "--secure-port=0"])
            .arg(format!("--cert-dir={}", log.with_extension("certs").display()))
            .stdout(Stdio::from(file.try_clone().expect("log")))
            .stderr(Stdio::from(file))
            .spawn()
            .expect("starting kube-controller-manager");
        Self(child)
    }
}

impl Drop for HpaController {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// An `autoscaling/v2` HPA on the sample service: at least `min` replicas, scaling on an
/// External metric (no metrics adapter runs here, so only `minReplicas` moves it).
fn hpa(min: i32) -> Value {
    json!({
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": { "name": NAME },
        "spec": {
            "scaleTargetRef": { "apiVersion": "flotilla.dev/v1alpha1", "kind": "InferenceService", "name": NAME },
            "minReplicas": min,
            "maxReplicas": 8,
            "metrics": [{
                "type": "External",
                "external": {
                    "metric": { "name": "vllm:num_requests_waiting" },
                    "target": { "type": "AverageValue", "averageValue": "4" }
                }
            }]
        }
    })
}

#[tokio::test]
async fn kubectl_scale_and_an_hpa_drive_the_replica_count() {
    let cp = flotilla_tests::control_plane_for(module_path!()).await;
    install_crds(&cp).expect("CRDs install");
    let client = cp.client().await.expect("client");
    let ns = flotilla_tests::namespace(&client, "scale").await.expect("namespace");
    let logs = tempfile::tempdir().expect("tempdir");
    let operator = Operator::start(&cp, "op-scale", &ns, logs.path()).expect("operator starts");
    let services: Api<InferenceService> = Api::namespaced(client.clone(), &ns);

    let sample = flotilla_tests::workspace().join("deploy/examples/inferenceservice.yaml");
    run(&cp, &ns, &["apply", "-f", sample.to_str().expect("utf-8")], None);
    // The operator's status fills the scale subresource's status (no GPU node here: 0 serve).
    let want_selector = slice_selector(NAME);
    eventually(WAIT, "the operator writes the selector", || async {
        let status = services.get(NAME).await.ok()?.status?;
        (status.selector == want_selector).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\noperator log:\n{}", operator.log()));

    // The README's command.
    let out = run(&cp, &ns, &["scale", &format!("infsvc/{NAME}"), "--replicas", "3"], None);
    assert!(out.contains("scaled"), "{out}");
    assert_eq!(services.get(NAME).await.expect("get").spec.replicas, 3);
    let scale: Value = serde_json::from_str(&run(
        &cp,
        &ns,
        &["get", "infsvc", NAME, "--subresource=scale", "-o", "json"],
        None,
    ))
    .expect("scale json");
    assert_eq!(scale["kind"], "Scale", "{scale}");
    assert_eq!(scale["spec"]["replicas"], 3, "{scale}");
    assert_eq!(scale["status"]["selector"], want_selector.as_str(), "{scale}");
    assert_eq!(scale["status"]["replicas"], 0, "no GPU node, so no replica runs: {scale}");
    // The CRD's bounds hold through the subresource too.
    let too_many =
        kubectl(&cp, &["-n", &ns, "scale", &format!("infsvc/{NAME}"), "--replicas", "300"], None);
    assert!(!too_many.status.success(), "300 replicas were accepted");

    let _hpa_controller =
        HpaController::start(&cp, &logs.path().join("kube-controller-manager.log"));
    run(&cp, &ns, &["apply", "-f", "-"], Some(&hpa(5).to_string()));
    eventually(WAIT, "the HPA scales the service to its minReplicas", || async {
        (services.get(NAME).await.ok()?.spec.replicas == 5).then_some(())
    })
    .await
    .unwrap_or_else(|e| {
        let hpa = run(&cp, &ns, &["get", "hpa", NAME, "-o", "yaml"], None);
        let kcm = std::fs::read_to_string(logs.path().join("kube-controller-manager.log"));
        panic!("{e}\nHPA:\n{hpa}\nkube-controller-manager:\n{}", kcm.unwrap_or_default())
    });
    // Next the HPA reads the selector from the scale subresource and asks for its metric: it
    // fails only there (no metrics adapter), not on the selector.
    let condition = |hpa: &Value, type_: &str| -> Option<(String, String)> {
        let c = hpa["status"]["conditions"].as_array()?.iter().find(|c| c["type"] == type_)?;
        Some((c["status"].as_str()?.to_owned(), c["reason"].as_str()?.to_owned()))
    };
    let hpa = eventually(WAIT, "the HPA asks for its metric", || async {
        let out = kubectl(&cp, &["-n", &ns, "get", "hpa", NAME, "-o", "json"], None);
        let hpa: Value = serde_json::from_slice(&out.stdout).ok()?;
        let active = condition(&hpa, "ScalingActive")?;
        (active.1 == "FailedGetExternalMetric").then_some(hpa)
    })
    .await
    .unwrap_or_else(|e| {
        let hpa = run(&cp, &ns, &["get", "hpa", NAME, "-o", "yaml"], None);
        panic!("{e}\nHPA:\n{hpa}")
    });
    assert_eq!(condition(&hpa, "AbleToScale").map(|c| c.0), Some("True".into()), "{hpa}");
}
