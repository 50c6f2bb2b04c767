//! The pure gang scheduler: no kube, no tonic, no tokio.
