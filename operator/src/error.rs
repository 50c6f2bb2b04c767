//! The operator's one error type.

/// Errors from reconciling, electing a leader and serving the admin endpoints.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A call to the API server failed.
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),

    /// Adding or removing the finalizer failed.
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),

    /// The stored object cannot be read as its kind (a schema drift or a hand-edited object).
    #[error("{kind} {name} is malformed: {message}")]
    Malformed {
        /// The kind.
        kind: &'static str,
        /// `namespace/name`.
        name: String,
        /// The deserialisation error, naming the field.
        message: String,
    },

    /// A field the API server always sets is missing.
    #[error("object has no {0}")]
    MissingField(&'static str),

    /// Encoding a patch failed.
    #[error("encoding JSON: {0}")]
    Json(#[from] serde_json::Error),

    /// Talking to the agents failed (launching or stopping workers).
    #[error("fleet: {0}")]
    Workers(String),
}

/// `Result` with the operator's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Every [`Error::metric_label`], so the error metric's series can exist at 0 before the
    /// first error of each kind (a test keeps the two in step).
    pub const METRIC_LABELS: [&'static str; 6] =
        ["kube", "finalizer", "malformed", "missing_field", "json", "fleet"];

    /// A short label for the `error` dimension of the error metric.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::Finalizer(_) => "finalizer",
            Error::Malformed { .. } => "malformed",
            Error::MissingField(_) => "missing_field",
            Error::Json(_) => "json",
            // The label predates the variant's name; dashboards and alerts may select on it.
            Error::Workers(_) => "fleet",
        }
    }

    /// True when retrying cannot help until the object changes.
    pub fn is_permanent(&self) -> bool {
        match self {
            Error::Malformed { .. } | Error::MissingField(_) | Error::Json(_) => true,
            Error::Kube(kube::Error::Api(status)) => status.code == 422 || status.code == 400,
            Error::Finalizer(inner) => {
                matches!(**inner, kube::runtime::finalizer::Error::UnnamedObject)
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_label_is_listed() {
        let status: kube::core::Status =
            serde_json::from_value(serde_json::json!({"code": 409})).expect("status");
        let json = serde_json::from_str::<u8>("x").expect_err("not a number");
        let errors = [
            Error::Kube(kube::Error::Api(Box::new(status))),
            Error::Finalizer(Box::new(kube::runtime::finalizer::Error::UnnamedObject)),
            Error::Malformed { kind: "TrainingJob", name: "ns/a".into(), message: "bad".into() },
            Error::MissingField("metadata.uid"),
            Error::Json(json),
            Error::Workers("down".into()),
        ];
        let labels: Vec<&str> = errors.iter().map(Error::metric_label).collect();
        assert_eq!(labels, Error::METRIC_LABELS);
    }
}
