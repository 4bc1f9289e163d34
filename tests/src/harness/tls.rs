//! Test certificates, generated in-process with `rcgen` (no `openssl` CLI needed).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use tokio_rustls::rustls::pki_types::CertificateDer;

/// PEM files for a TLS server on `127.0.0.1` and a client of it, all signed by one fresh CA.
///
/// The server certificate is valid for `127.0.0.1`, `::1` and `localhost`, and also carries
/// the client-auth usage because Redis presents it on its own outgoing cluster-bus
/// connections. Servers accept clients with or without a client certificate.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    /// CA certificate (PEM): what clients trust.
    pub ca_cert: PathBuf,
    /// Server certificate (PEM).
    pub server_cert: PathBuf,
    /// Server private key (PEM, PKCS#8).
    pub server_key: PathBuf,
    /// Client certificate (PEM), for mutual TLS.
    pub client_cert: PathBuf,
    /// Client private key (PEM, PKCS#8).
    pub client_key: PathBuf,
    ca_der: Vec<u8>,
}

impl TlsFiles {
    /// Generates a CA, a server and a client certificate into `dir`.
    pub fn generate(dir: &Path) -> Result<Self> {
        let ca_key = KeyPair::generate()?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "dlock test CA");
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_cert = ca_params.self_signed(&ca_key)?;
        let issuer = Issuer::new(ca_params, ca_key);

        let leaf = |cn: &str, sans: Vec<String>, usages: Vec<ExtendedKeyUsagePurpose>| {
            let key = KeyPair::generate()?;
            let mut params = CertificateParams::new(sans)?;
            params.distinguished_name.push(DnType::CommonName, cn);
            params.use_authority_key_identifier_extension = true;
            params.key_usages = vec![
                KeyUsagePurpose::DigitalSignature,
                KeyUsagePurpose::KeyEncipherment,
            ];
            params.extended_key_usages = usages;
            let cert = params.signed_by(&key, &issuer)?;
            anyhow::Ok((cert.pem(), key.serialize_pem()))
        };
        let (server_pem, server_key_pem) = leaf(
            "127.0.0.1",
            vec!["127.0.0.1".into(), "::1".into(), "localhost".into()],
            vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
        )?;
        let (client_pem, client_key_pem) = leaf(
            "dlock-test-client",
            vec!["dlock-test-client".into()],
            vec![ExtendedKeyUsagePurpose::ClientAuth],
        )?;

        let write = |name: &str, text: &str| {
            let p = dir.join(name);
            std::fs::write(&p, text).with_context(|| format!("writing {}", p.display()))?;
            anyhow::Ok(p)
        };
        Ok(TlsFiles {
            ca_cert: write("ca.crt", &ca_cert.pem())?,
            server_cert: write("server.crt", &server_pem)?,
            server_key: write("server.key", &server_key_pem)?,
            client_cert: write("client.crt", &client_pem)?,
            client_key: write("client.key", &client_key_pem)?,
            ca_der: ca_cert.der().to_vec(),
        })
    }

    /// The CA certificate in DER, e.g. for a rustls root store.
    pub fn ca_cert_der(&self) -> CertificateDer<'static> {
        CertificateDer::from(self.ca_der.clone())
    }

    /// The CA certificate in PEM.
    pub fn ca_cert_pem(&self) -> Result<String> {
        std::fs::read_to_string(&self.ca_cert)
            .with_context(|| format!("reading {}", self.ca_cert.display()))
    }
}
