//! The controllers for the three kinds, and what they share.
//!
//! Each reconciliation is a pipeline: *dereference* (read the API and the workers) → *validate*
//! and *build* (pure, unit-tested) → *apply* (write status, then act) → *requeue*. The steps
//! every controller takes around its own work — a malformed object reported and left alone,
//! timing and counting, the finalizer, backoff — are [`reconcile_object`] and
//! [`error_policy`], written once here.

mod context;
pub mod gpu_node;
pub mod inference_service;
mod preemption;
pub mod training_job;

pub use context::{Caches, Context, Settings, StatusWrites};

use crate::error::Error;
use crate::ids::object_key;
use kube::api::{Patch, PatchParams};
use kube::core::DeserializeGuard;
use kube::runtime::controller::Action;
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::{Api, Resource};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::future::Future;
use std::sync::Arc;

/// The field manager of every write the operator makes.
pub const MANAGER: &str = "flotilla-operator";

/// Reconcile one object of kind `kind`: a malformed object is reported (a Warning Event naming
/// the field) and left alone; otherwise `work` runs, timed and counted, and a success forgets
/// the object's earlier transient failures.
pub async fn reconcile_object<'a, K, F, Fut>(
    ctx: &'a Context,
    kind: &'static str,
    guard: &'a DeserializeGuard<K>,
    work: F,
) -> Result<Action, Error>
where
    K: Resource,
    F: FnOnce(&'a K) -> Fut,
    Fut: Future<Output = Result<Action, Error>> + 'a,
{
    let obj = match &guard.0 {
        Ok(obj) => obj,
        Err(invalid) => return Err(ctx.malformed(kind, invalid).await),
    };
    let _timer = ctx.metrics.reconcile_seconds.with_label_values(&[kind]).start_timer();
    ctx.metrics.reconciles.with_label_values(&[kind]).inc();
    let action = work(obj).await?;
    ctx.succeeded(&object_key(obj));
    Ok(action)
}

/// Run `apply` on a live object, or `cleanup` once it is being deleted, under the finalizer
/// `name` (added before the first `apply`, removed after `cleanup` succeeds).
pub async fn with_finalizer<K, A, AF, C, CF>(
    api: &Api<K>,
    name: &str,
    obj: &K,
    apply: A,
    cleanup: C,
) -> Result<Action, Error>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Serialize + std::fmt::Debug,
    A: FnOnce(Arc<K>) -> AF,
    AF: Future<Output = Result<Action, Error>>,
    C: FnOnce(Arc<K>) -> CF,
    CF: Future<Output = Result<Action, Error>>,
{
    let outcome = finalizer(api, name, Arc::new(obj.clone()), |event| async move {
        match event {
            Finalizer::Apply(obj) => apply(obj).await,
            Finalizer::Cleanup(obj) => cleanup(obj).await,
        }
    })
    .await;
    finalized(outcome)
}

/// What to do after a failed reconciliation of an object of kind `kind` (see
/// [`Context::error_policy`]).
pub fn error_policy<K: Resource>(
    ctx: &Context,
    kind: &'static str,
    guard: &DeserializeGuard<K>,
    error: &Error,
) -> Action {
    let key = match &guard.0 {
        Ok(obj) => object_key(obj),
        Err(invalid) => invalid.metadata.name.clone().unwrap_or_default(),
    };
    ctx.error_policy(kind, &key, error)
}

/// The outcome of `kube`'s finalizer helper as this crate's result. Removing the finalizer of an
/// object that is already gone means an earlier reconciliation removed it and the API server
/// deleted the object since (this one ran from an older cache): nothing is left to do, so it is
/// not reported as a failure.
fn finalized(
    outcome: std::result::Result<Action, kube::runtime::finalizer::Error<Error>>,
) -> Result<Action, Error> {
    use kube::runtime::finalizer::Error as Finalizer;
    match outcome {
        Err(Finalizer::RemoveFinalizer(kube::Error::Api(status))) if status.code == 404 => {
            Ok(Action::await_change())
        }
        other => other.map_err(|e| Error::Finalizer(Box::new(e))),
    }
}

/// Write `status` with server-side apply, owning every status field the operator sets.
pub async fn apply_status<K, S>(api: &kube::Api<K>, name: &str, status: &S) -> Result<(), Error>
where
    K: Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
    S: Serialize,
{
    let patch = serde_json::json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "status": status,
    });
    api.patch_status(name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(&patch)).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::runtime::finalizer::Error as Finalizer;

    fn api_error(code: u16) -> kube::Error {
        let status: kube::core::Status =
            serde_json::from_value(serde_json::json!({"code": code})).expect("status");
        kube::Error::Api(Box::new(status))
    }

    #[test]
    fn removing_the_finalizer_of_an_object_already_gone_is_not_a_failure() {
        let gone = finalized(Err(Finalizer::RemoveFinalizer(api_error(404))));
        assert_eq!(gone.expect("not an error"), Action::await_change());
        let refused = finalized(Err(Finalizer::RemoveFinalizer(api_error(500))));
        assert!(matches!(refused, Err(Error::Finalizer(_))));
        let adding = finalized(Err(Finalizer::AddFinalizer(api_error(404))));
        assert!(matches!(adding, Err(Error::Finalizer(_))), "only removal of a gone object");
    }
}
