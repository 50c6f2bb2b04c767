//! Binding a stream to a node: the registration's node name must be a DNS name of the client
//! certificate the TLS handshake verified.

use rustls_pki_types::{CertificateDer, ServerName};

/// Checks that `node` is a DNS subject alternative name of `cert` (DER).
pub fn cert_names_node(cert: &CertificateDer<'_>, node: &str) -> Result<(), String> {
    let parsed = webpki::EndEntityCert::try_from(cert)
        .map_err(|e| format!("client certificate: cannot be parsed ({e})"))?;
    let name = ServerName::try_from(node)
        .map_err(|_| format!("register.node_name: expected a DNS name, got {node:?}"))?;
    parsed.verify_is_valid_for_subject_name(&name).map_err(|_| {
        format!(
            "register.node_name: expected the node named in the client certificate, got {node:?}"
        )
    })
}
