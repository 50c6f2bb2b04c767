//! Development certificates: a CA, the operator's server certificate and one client certificate
//! per node. The node name is the client certificate's DNS subject alternative name (and common
//! name); the operator binds a stream to it.

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use std::path::{Path, PathBuf};

/// Errors of certificate generation.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// rcgen refused the parameters.
    #[error("generating the certificate for {subject}: {source}")]
    Generate {
        /// Whose certificate.
        subject: String,
        /// rcgen's error.
        source: rcgen::Error,
    },
    /// Writing a file failed.
    #[error("writing {path}: {source}")]
    Write {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A node name is not a valid DNS name.
    #[error("--node: expected a DNS-1123 name (lowercase letters, digits, '-', '.'), got {0:?}")]
    BadNodeName(String),
}

/// Files written by [`generate`].
#[derive(Debug, Clone)]
pub struct CertFiles {
    /// `ca.pem`.
    pub ca: PathBuf,
    /// `operator.pem` / `operator-key.pem`.
    pub operator: (PathBuf, PathBuf),
    /// Per node: name, `<node>.pem`, `<node>-key.pem`.
    pub nodes: Vec<(String, PathBuf, PathBuf)>,
}

fn valid_node_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        })
}

fn write(path: &Path, contents: &str) -> Result<(), CertError> {
    std::fs::write(path, contents)
        .map_err(|source| CertError::Write { path: path.display().to_string(), source })
}

/// Writes a CA, an operator certificate valid for `operator_names` (DNS names or IPs), and a
/// client certificate per node into `out`.
pub fn generate(
    out: &Path,
    operator_names: &[String],
    nodes: &[String],
) -> Result<CertFiles, CertError> {
    if let Some(bad) = nodes.iter().find(|n| !valid_node_name(n)) {
        return Err(CertError::BadNodeName(bad.clone()));
    }
    std::fs::create_dir_all(out)
        .map_err(|source| CertError::Write { path: out.display().to_string(), source })?;
    let gen_err = |subject: &str| {
        let subject = subject.to_owned();
        move |source| CertError::Generate { subject, source }
    };

    let ca_key = KeyPair::generate().map_err(gen_err("CA"))?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(gen_err("CA"))?;
    ca_params.distinguished_name.push(DnType::CommonName, "Flotilla development CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca_params.self_signed(&ca_key).map_err(gen_err("CA"))?;
    let issuer = Issuer::new(ca_params, ca_key);

    let ca = out.join("ca.pem");
    write(&ca, &ca_cert.pem())?;

    let leaf = |subject: &str, sans: Vec<String>, usage: ExtendedKeyUsagePurpose| {
        let key = KeyPair::generate().map_err(gen_err(subject))?;
        let mut params = CertificateParams::new(sans).map_err(gen_err(subject))?;
        params.distinguished_name.push(DnType::CommonName, subject);
        params.extended_key_usages = vec![usage];
        params.key_usages =
            vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        let cert = params.signed_by(&key, &issuer).map_err(gen_err(subject))?;
        Ok::<_, CertError>((cert.pem(), key.serialize_pem()))
    };

    let (cert, key) =
        leaf("flotilla-operator", operator_names.to_vec(), ExtendedKeyUsagePurpose::ServerAuth)?;
    let operator = (out.join("operator.pem"), out.join("operator-key.pem"));
    write(&operator.0, &cert)?;
    write(&operator.1, &key)?;

    let mut node_files = Vec::new();
    for node in nodes {
        let (cert, key) = leaf(node, vec![node.clone()], ExtendedKeyUsagePurpose::ClientAuth)?;
        let files =
            (node.clone(), out.join(format!("{node}.pem")), out.join(format!("{node}-key.pem")));
        write(&files.1, &cert)?;
        write(&files.2, &key)?;
        node_files.push(files);
    }
    Ok(CertFiles { ca, operator, nodes: node_files })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_ca_operator_and_node_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let files = generate(
            dir.path(),
            &["localhost".into(), "127.0.0.1".into()],
            &["node-a".into(), "node-b".into()],
        )
        .expect("generate");
        for path in
            [&files.ca, &files.operator.0, &files.operator.1, &files.nodes[1].1, &files.nodes[1].2]
        {
            let text = std::fs::read_to_string(path).expect("read");
            assert!(text.starts_with("-----BEGIN"), "{} is not PEM", path.display());
        }
        assert_eq!(files.nodes[0].0, "node-a");
    }

    #[test]
    fn refuses_node_names_that_cannot_be_dns_names() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err =
            generate(dir.path(), &["localhost".into()], &["Node_A".into()]).expect_err("bad name");
        assert!(err.to_string().contains("Node_A"), "{err}");
    }
}
