//! A throwaway PKI generated at test time with `rcgen`.
//!
//! Files written into the directory (referenced from bootstraps as `$CERT_DIR/<file>`):
//!
//! | file | what |
//! |---|---|
//! | `ca.pem` | the test CA every other certificate chains to |
//! | `server.pem`, `server.key` | server cert for `localhost`, `example.com`, `*.example.com`, `127.0.0.1` |
//! | `client.pem`, `client.key` | client cert with URI SAN `spiffe://cluster.local/ns/default/sa/client` |
//! | `other-ca.pem` | an unrelated CA |
//! | `rogue-client.pem`, `rogue-client.key` | a client cert signed by the unrelated CA |

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// The SPIFFE identity carried by `client.pem`.
pub const CLIENT_SPIFFE_ID: &str = "spiffe://cluster.local/ns/default/sa/client";

/// A certificate with its private key, in DER.
#[derive(Debug)]
pub struct Identity {
    pub chain: Vec<CertificateDer<'static>>,
    key: Vec<u8>,
}

impl Identity {
    pub fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key.clone()))
    }
}

/// The generated PKI: in-memory DER for the Rust side, PEM files for the proxies.
#[derive(Debug)]
pub struct TestPki {
    pub dir: PathBuf,
    pub ca: CertificateDer<'static>,
    pub server: Identity,
    pub client: Identity,
    pub rogue_client: Identity,
}

/// Shared handle; the PKI is immutable once made.
pub type SharedPki = Arc<TestPki>;

fn ca_params(name: &str) -> Result<CertificateParams> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    Ok(params)
}

fn leaf(
    cn: &str,
    sans: Vec<SanType>,
    usage: ExtendedKeyUsagePurpose,
    issuer: &CertifiedIssuer<'_, KeyPair>,
) -> Result<(Identity, String, String)> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name.push(DnType::CommonName, cn);
    params.subject_alt_names = sans;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![usage];
    let cert = params.signed_by(&key, issuer)?;
    let pem = cert.pem();
    let key_pem = key.serialize_pem();
    let identity = Identity {
        chain: vec![cert.der().clone()],
        key: key.serialize_der(),
    };
    Ok((identity, pem, key_pem))
}

fn dns(name: &str) -> Result<SanType> {
    Ok(SanType::DnsName(name.try_into()?))
}

impl TestPki {
    /// Generates the PKI and writes its PEM files into `dir` (created if missing).
    pub fn generate(dir: &Path) -> Result<SharedPki> {
        std::fs::create_dir_all(dir)?;
        let ca = CertifiedIssuer::self_signed(ca_params("Legate Test CA")?, KeyPair::generate()?)?;
        let other = CertifiedIssuer::self_signed(ca_params("Other CA")?, KeyPair::generate()?)?;

        let server_sans = vec![
            dns("localhost")?,
            dns("example.com")?,
            dns("*.example.com")?,
            SanType::IpAddress("127.0.0.1".parse()?),
        ];
        let (server, server_pem, server_key) = leaf(
            "server",
            server_sans,
            ExtendedKeyUsagePurpose::ServerAuth,
            &ca,
        )?;
        let spiffe = SanType::URI(CLIENT_SPIFFE_ID.try_into()?);
        let (client, client_pem, client_key) = leaf(
            "client",
            vec![spiffe],
            ExtendedKeyUsagePurpose::ClientAuth,
            &ca,
        )?;
        let rogue_spiffe = SanType::URI("spiffe://cluster.local/ns/default/sa/rogue".try_into()?);
        let (rogue_client, rogue_pem, rogue_key) = leaf(
            "rogue",
            vec![rogue_spiffe],
            ExtendedKeyUsagePurpose::ClientAuth,
            &other,
        )?;

        let files = [
            ("ca.pem", ca.pem()),
            ("other-ca.pem", other.pem()),
            ("server.pem", server_pem),
            ("server.key", server_key),
            ("client.pem", client_pem),
            ("client.key", client_key),
            ("rogue-client.pem", rogue_pem),
            ("rogue-client.key", rogue_key),
        ];
        for (name, contents) in files {
            let path = dir.join(name);
            std::fs::write(&path, contents)
                .with_context(|| format!("writing {}", path.display()))?;
        }
        Ok(Arc::new(TestPki {
            dir: dir.to_path_buf(),
            ca: ca.der().clone(),
            server,
            client,
            rogue_client,
        }))
    }

    /// A root store trusting only the test CA.
    pub fn roots(&self) -> Result<rustls::RootCertStore> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca.clone())?;
        Ok(roots)
    }
}

/// The rustls crypto provider used everywhere in the tests.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}
