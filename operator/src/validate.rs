//! The operator's own checks of a spec: what the API server's schema and CEL rules cannot know.

use crate::crd::TrainingJob;

/// A spec the operator cannot run, with the field at fault.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InvalidSpec {
    /// The field path, such as `spec.scheduling.nodeSelector`.
    pub field: String,
    /// What is wrong, naming what was expected and what came.
    pub message: String,
}

/// A label key as Kubernetes accepts it: an optional DNS-subdomain prefix and a name of at most
/// 63 characters.
fn is_label_key(key: &str) -> bool {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    let name_ok = !name.is_empty()
        && name.len() <= 63
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric());
    let prefix_ok = prefix.is_none_or(|p| {
        !p.is_empty()
            && p.len() <= 253
            && p.split('.').all(|part| {
                !part.is_empty()
                    && part
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                    && !part.starts_with('-')
                    && !part.ends_with('-')
            })
    });
    name_ok && prefix_ok
}

/// Every key of `spec.scheduling.nodeSelector` must be a label key.
pub fn node_selector(
    selector: &std::collections::BTreeMap<String, String>,
) -> Result<(), InvalidSpec> {
    match selector.keys().find(|k| !is_label_key(k)) {
        Some(key) => Err(InvalidSpec {
            field: format!("spec.scheduling.nodeSelector[{key:?}]"),
            message: "expected a label key (optional DNS prefix, '/', then at most 63 alphanumerics, '-', '_' or '.')".into(),
        }),
        None => Ok(()),
    }
}

/// Check one job against the rules only the operator can apply; `others` are the other jobs
/// in the cluster (for conflicts between jobs).
pub fn training_job(job: &TrainingJob, others: &[&TrainingJob]) -> Result<(), InvalidSpec> {
    node_selector(&job.spec.scheduling.node_selector)?;
    if let Some(engine) = &job.spec.engine
        && let Err(errors) = engine.validate()
    {
        let first = errors.0.first();
        return Err(InvalidSpec {
            field: first
                .map_or_else(|| "spec.engine".into(), |e| format!("spec.engine.{}", e.path)),
            message: errors
                .0
                .iter()
                .map(|e| format!("spec.engine.{e}"))
                .collect::<Vec<_>>()
                .join("; "),
        });
    }
    if let Some(path) = job.spec.checkpoint.as_ref().map(|c| c.path.as_str()) {
        let clash = others.iter().find(|o| {
            o.metadata.uid != job.metadata.uid
                && o.metadata.namespace == job.metadata.namespace
                && !o.status.as_ref().is_some_and(|s| s.phase.is_terminal())
                && o.spec.checkpoint.as_ref().is_some_and(|c| c.path == path)
                && o.metadata.creation_timestamp < job.metadata.creation_timestamp
        });
        if let Some(other) = clash {
            return Err(InvalidSpec {
                field: "spec.checkpoint.path".into(),
                message: format!(
                    "expected a directory no other active job writes to; {path:?} is used by TrainingJob {}",
                    other.metadata.name.as_deref().unwrap_or("?")
                ),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::training_job::{CheckpointSpec, TrainingJobSpec};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use k8s_openapi::jiff::Timestamp;

    fn job(name: &str, path: &str, created: i64) -> TrainingJob {
        let mut j = TrainingJob::new(
            name,
            TrainingJobSpec {
                workers: 1,
                gpus_per_worker: 1,
                engine: None,
                command: None,
                checkpoint: Some(CheckpointSpec {
                    path: path.into(),
                    interval_seconds: Some(60),
                    keep: 1,
                }),
                restart_policy: Default::default(),
                hang_detection: Default::default(),
                stragglers: Default::default(),
                priority: 0,
                scheduling: Default::default(),
                suspend: false,
                active_deadline_seconds: None,
                ttl_seconds_after_finished: None,
            },
        );
        j.metadata.namespace = Some("ns".into());
        j.metadata.uid = Some(name.into());
        j.metadata.creation_timestamp = Some(Time(Timestamp::from_second(created).unwrap()));
        j
    }

    #[test]
    fn engine_rules_beyond_the_schema_name_the_field() {
        let mut j = job("a", "/ckpt/a", 1);
        let mut engine = crate::crd::engine::EngineConfig::preset("tiny").expect("tiny preset");
        assert!(
            training_job(
                &TrainingJob {
                    spec: TrainingJobSpec { engine: Some(engine.clone()), ..j.spec.clone() },
                    ..j.clone()
                },
                &[]
            )
            .is_ok()
        );
        engine.model.num_expert_groups = 3; // does not divide the 8 routed experts
        j.spec.engine = Some(engine);
        let err = training_job(&j, &[]).unwrap_err();
        assert_eq!(err.field, "spec.engine.model.numExpertGroups", "{err:?}");
        assert!(err.message.contains("got 3"), "{}", err.message);
    }

    #[test]
    fn label_keys() {
        for ok in ["zone", "flotilla.dev/pool", "a-b_c.d", "x"] {
            assert!(is_label_key(ok), "{ok}");
        }
        for bad in ["", "-a", "a-", "UPPER.case/x", "/x", &"a".repeat(64), "a b"] {
            assert!(!is_label_key(bad), "{bad}");
        }
    }

    #[test]
    fn bad_node_selector_key_names_the_field() {
        let mut j = job("a", "/ckpt/a", 1);
        j.spec.scheduling.node_selector.insert("bad key".into(), "v".into());
        let err = training_job(&j, &[]).unwrap_err();
        assert!(err.field.starts_with("spec.scheduling.nodeSelector"), "{}", err.field);
    }

    #[test]
    fn the_younger_of_two_jobs_sharing_a_checkpoint_path_is_invalid() {
        let (old, young) = (job("old", "/ckpt/x", 1), job("young", "/ckpt/x", 2));
        assert!(training_job(&old, &[&young]).is_ok());
        let err = training_job(&young, &[&old]).unwrap_err();
        assert_eq!(err.field, "spec.checkpoint.path");
        assert!(err.message.contains("old"));
        let elsewhere = job("other", "/ckpt/y", 0);
        assert!(training_job(&young, &[&elsewhere]).is_ok());
    }
}
