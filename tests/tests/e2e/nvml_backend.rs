//! End to end, the NVML backend against the real API server: one agent on simulated GPUs and one
//! on `--backend nvml` with the stand-in `libnvidia-ml.so.1`, side by side under one operator.
//! What NVML reports (inventory, samples) reaches the `GpuNode` status, and every fault class
//! leaves the NVML node's `GpuNode` and Events exactly as the simulated node's.

use flotilla_nvml_mock::Config;
use flotilla_operator::crd::{GpuHealth, GpuNode, GpuNodeStatus};
use flotilla_tests::{Backend, ControlPlane, Fault, Rig, WAIT, clear_at, eventually, install_crds};
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, ListParams};
use std::sync::Arc;

const SIM: &str = "a";
const NVML: &str = "b";

/// A rig with node `<ns>-a` simulated and `<ns>-b` on NVML, the `GpuNode` API, and the control
/// plane they run on (fields drop in order: the rig's processes before the control plane).
struct SideBySide {
    rig: Rig,
    nodes: Api<GpuNode>,
    client: kube::Client,
    _cp: Arc<ControlPlane>,
}

async fn side_by_side(prefix: &str) -> SideBySide {
    let cp = flotilla_tests::control_plane_for(module_path!()).await;
    install_crds(&cp).expect("CRDs install");
    let client = cp.client().await.expect("client");
    let ns = flotilla_tests::namespace(&client, prefix).await.expect("namespace");
    let rig = Rig::start_on(&cp, &ns, &client, &[Backend::Simulated, Backend::Nvml], &[]).await;
    SideBySide { rig, nodes: Api::all(client.clone()), client, _cp: cp }
}

fn node(rig: &Rig, which: &str) -> String {
    let name = rig.node_names().into_iter().find(|n| n.ends_with(&format!("-{which}")));
    name.expect("node of the rig")
}

async fn status(nodes: &Api<GpuNode>, name: &str) -> Option<GpuNodeStatus> {
    nodes.get_opt(name).await.ok()??.status
}

#[tokio::test]
async fn inventory_and_samples_from_nvml_reach_the_gpunode_status() {
    let side = side_by_side("nvml-inv").await;
    let (rig, nodes) = (&side.rig, &side.nodes);
    let (sim, nvml) = (node(rig, SIM), node(rig, NVML));
    // The stand-in reports GPU i at 33 + i % 4 °C: samples read through NVML.
    let expected_temps: Vec<Option<i32>> = (0..4).map(|i| Some(33 + i % 4)).collect();
    let s = eventually(WAIT, &format!("{nvml} with the stand-in's temperatures"), || async {
        let s = status(nodes, &nvml).await?;
        let temps: Vec<Option<i32>> = s.gpus.iter().map(|g| g.temperature_celsius).collect();
        (temps == expected_temps).then_some(s)
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", rig.logs()));
    let stand_in = Config { seed: nvml.clone(), ..Config::default() };
    let uuids: Vec<String> = s.gpus.iter().map(|g| g.uuid.clone()).collect();
    assert_eq!(uuids, (0..4).map(|i| stand_in.uuid(i)).collect::<Vec<_>>(), "UUIDs from NVML");
    assert_eq!(s.gpus.iter().map(|g| g.index).collect::<Vec<_>>(), vec![0, 1, 2, 3]);
    assert_eq!((s.total_gpus, s.healthy_gpus), (4, 4));
    assert_eq!(s.max_temperature_celsius, Some(36));
    assert_eq!(s.gpu_model.as_deref(), Some("NVIDIA H100 80GB HBM3"));
    assert!(s.gpus.iter().all(|g| g.memory_mib == Some(80 << 10)), "{:?}", s.gpus);
    assert!(s.gpus.iter().all(|g| g.health == GpuHealth::Healthy), "{:?}", s.gpus);

    // The simulated node of the same model reads the same where the hardware is the same.
    let sim_status = status(nodes, &sim).await.expect("simulated GpuNode status");
    assert_eq!(sim_status.gpu_model, s.gpu_model);
    let memory = |s: &GpuNodeStatus| s.gpus.iter().map(|g| g.memory_mib).collect::<Vec<_>>();
    assert_eq!(memory(&sim_status), memory(&s));
    let ready = |s: &GpuNodeStatus| {
        s.conditions
            .iter()
            .find(|c| c.type_ == "Ready")
            .map(|c| (c.status.clone(), c.reason.clone()))
    };
    assert_eq!(ready(&s), Some((String::from("True"), String::from("AgentReporting"))));
    assert_eq!(ready(&sim_status), ready(&s));
}

/// What a `GpuNode` says of its GPUs' health: per GPU (health), the healthy count, and the last
/// fault (GPU, XID, message, summary).
type Verdict = (Vec<GpuHealth>, i32, Option<(i32, Option<i32>, String, String)>);

fn verdict(s: &GpuNodeStatus) -> Verdict {
    let fault = s.last_fault.as_ref().map(|f| (f.gpu, f.xid, f.message.clone(), f.summary.clone()));
    (s.gpus.iter().map(|g| g.health).collect(), s.healthy_gpus, fault)
}

/// One step of the comparison: a fault on one GPU of both nodes, and what both must then show.
struct Step {
    gpu: u32,
    fault: Fault,
    health: GpuHealth,
    /// The new last fault it records: its XID and, where it names one, its summary
    /// (`GPU <i> <reason>`); `None` for a step that records no fault.
    records: Option<(Option<i32>, Option<&'static str>)>,
}

const STEPS: &[Step] = &[
    // An application XID is recorded but does not condemn the GPU.
    Step {
        gpu: 0,
        fault: Fault::Xid(13),
        health: GpuHealth::Healthy,
        records: Some((Some(13), None)),
    },
    Step {
        gpu: 1,
        fault: Fault::Xid(79),
        health: GpuHealth::Failed,
        records: Some((Some(79), Some("GPU 1 Xid79"))),
    },
    Step {
        gpu: 2,
        fault: Fault::DoubleBitEcc,
        health: GpuHealth::Failed,
        records: Some((None, Some("GPU 2 DoubleBitEcc"))),
    },
    Step {
        gpu: 3,
        fault: Fault::Overheat,
        health: GpuHealth::Degraded,
        records: Some((None, Some("GPU 3 Overheating"))),
    },
    // Cooled down: the Overheating verdict lifts by itself.
    Step { gpu: 3, fault: Fault::Recover, health: GpuHealth::Healthy, records: None },
    Step {
        gpu: 0,
        fault: Fault::Lost,
        health: GpuHealth::Failed,
        records: Some((None, Some("GPU 0 GpuLost"))),
    },
];

/// Injects `step` into both nodes and waits until both `GpuNode`s show it; returns their
/// verdicts. (`lastFault.time` has whole seconds, too coarse to tell two faults apart; the steps
/// are ordered so that each recorded fault differs from the one before in GPU, XID or summary.)
async fn apply(rig: &Rig, nodes: &Api<GpuNode>, both: [&str; 2], step: &Step) -> [Verdict; 2] {
    for name in both {
        rig.inject(name, step.gpu, step.fault);
    }
    let what = format!("GPU {} {:?} after {:?} on both nodes", step.gpu, step.health, step.fault);
    let seen = eventually(WAIT, &what, || async {
        let mut seen = Vec::new();
        for name in both {
            let s = status(nodes, name).await?;
            let health = s.gpus.get(step.gpu as usize).map(|g| g.health);
            let fault = s.last_fault.as_ref();
            let recorded = match step.records {
                None => true,
                Some((xid, summary)) => fault.is_some_and(|f| {
                    f.gpu == step.gpu as i32
                        && f.xid == xid
                        && summary.is_none_or(|want| f.summary == want)
                }),
            };
            (health == Some(step.health) && recorded).then_some(())?;
            seen.push(verdict(&s));
        }
        Some(seen)
    })
    .await;
    let seen = match seen {
        Ok(seen) => seen,
        Err(e) => {
            let mut now = String::new();
            for name in both {
                let v = status(nodes, name).await.as_ref().map(verdict);
                now.push_str(&format!("{name}: {v:?}\n"));
            }
            panic!("{e}\n{now}{}", rig.logs())
        }
    };
    [seen[0].clone(), seen[1].clone()]
}

/// GPU 0 after it came back and an admin cleared it.
const AFTER_REPAIR: &[Step] = &[
    Step {
        gpu: 0,
        fault: Fault::Overheat,
        health: GpuHealth::Degraded,
        records: Some((None, Some("GPU 0 Overheating"))),
    },
    Step { gpu: 0, fault: Fault::Recover, health: GpuHealth::Healthy, records: None },
    Step {
        gpu: 0,
        fault: Fault::Lost,
        health: GpuHealth::Failed,
        records: Some((None, Some("GPU 0 GpuLost"))),
    },
];

#[tokio::test]
async fn every_fault_class_through_nvml_leaves_the_gpunode_and_events_as_the_simulation_does() {
    let side = side_by_side("nvml-faults").await;
    let (rig, nodes) = (&side.rig, &side.nodes);
    let (sim, nvml) = (node(rig, SIM), node(rig, NVML));
    let both = [sim.as_str(), nvml.as_str()];
    for step in STEPS {
        let [s, n] = apply(rig, nodes, both, step).await;
        assert_eq!(
            s,
            n,
            "after {:?} on GPU {}: simulated vs NVML\n{}",
            step.fault,
            step.gpu,
            rig.logs()
        );
    }
    let failed = vec![GpuHealth::Failed, GpuHealth::Failed, GpuHealth::Failed, GpuHealth::Healthy];
    let settled = verdict(&status(nodes, &nvml).await.expect("NVML GpuNode status"));
    assert_eq!((settled.0, settled.1), (failed, 1));

    // The lost GPU comes back (a reset) and an admin clears it.
    for name in both {
        rig.inject(name, 0, Fault::Recover);
        clear_at(rig.admin_port(name), 0);
    }
    eventually(WAIT, "GPU 0 Healthy on both nodes", || async {
        for name in both {
            let s = status(nodes, name).await?;
            (s.gpus.first()?.health == GpuHealth::Healthy).then_some(())?;
        }
        Some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", rig.logs()));
    // Back in service, it is sampled again (it overheats, cools) and a second loss is seen.
    for step in AFTER_REPAIR {
        let [s, n] = apply(rig, nodes, both, step).await;
        assert_eq!(
            s,
            n,
            "after {:?} on GPU {}: simulated vs NVML\n{}",
            step.fault,
            step.gpu,
            rig.logs()
        );
    }

    // The Events about each GpuNode are the same on both.
    let events: Api<Event> = Api::all(side.client.clone());
    let about = |name: &str, list: &[Event]| {
        let mut seen: Vec<(String, String, String)> = list
            .iter()
            .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
            .map(|e| {
                let text = |s: &Option<String>| s.clone().unwrap_or_default();
                (text(&e.type_), text(&e.reason), text(&e.note))
            })
            .collect();
        seen.sort();
        seen.dedup();
        seen
    };
    let same = eventually(WAIT, "the same Events about both GpuNodes", || async {
        let list = events.list(&ListParams::default()).await.ok()?.items;
        let (s, n) = (about(&sim, &list), about(&nvml, &list));
        (!n.is_empty() && s == n).then_some(())
    })
    .await;
    if let Err(e) = same {
        let list = events.list(&ListParams::default()).await.expect("events").items;
        panic!("{e}\nsimulated: {:#?}\nNVML: {:#?}", about(&sim, &list), about(&nvml, &list));
    }
}
