//! TLS with rustls: downstream server configs (certificates, ALPN, client certificates with
//! subject-alt-name matching) and upstream client configs (trusted CA, SNI, client certificate).

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use rustls_pki_types::pem::PemObject;

use crate::route::StringMatcher;

/// Errors building TLS configuration.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("no PEM certificate found")]
    NoCertificate,
    #[error("invalid PEM: {0}")]
    Pem(String),
    #[error("{0}")]
    Rustls(#[from] rustls::Error),
    #[error("{0}")]
    Verifier(String),
}

/// Which subject-alt-name type a matcher inspects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SanType {
    Dns,
    Email,
    Uri,
    IpAddress,
}

/// A `SubjectAltNameMatcher`.
#[derive(Debug)]
pub struct SanMatcher {
    pub san_type: SanType,
    pub matcher: StringMatcher,
}

/// The subject alt names of a certificate, by type.
#[derive(Debug, Default, Clone)]
pub struct PeerSans {
    pub uri: Vec<String>,
    pub dns: Vec<String>,
    pub email: Vec<String>,
    pub ip: Vec<String>,
}

impl PeerSans {
    /// Parses the SANs of a DER certificate.
    pub fn from_der(der: &[u8]) -> Self {
        use x509_parser::extensions::GeneralName;
        let mut out = PeerSans::default();
        let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
            return out;
        };
        let Ok(Some(san)) = cert.subject_alternative_name() else {
            return out;
        };
        for name in &san.value.general_names {
            match name {
                GeneralName::URI(u) => out.uri.push((*u).to_owned()),
                GeneralName::DNSName(d) => out.dns.push((*d).to_owned()),
                GeneralName::RFC822Name(e) => out.email.push((*e).to_owned()),
                GeneralName::IPAddress(b) => {
                    let ip = match b.len() {
                        4 => <[u8; 4]>::try_from(*b)
                            .ok()
                            .map(|a| std::net::IpAddr::from(a).to_string()),
                        16 => <[u8; 16]>::try_from(*b)
                            .ok()
                            .map(|a| std::net::IpAddr::from(a).to_string()),
                        _ => None,
                    };
                    out.ip.extend(ip);
                }
                _ => {}
            }
        }
        out
    }

    /// Whether any matcher accepts one of these SANs (no matchers accepts all).
    pub fn matches(&self, matchers: &[SanMatcher]) -> bool {
        matchers.is_empty()
            || matchers.iter().any(|m| {
                let values = match m.san_type {
                    SanType::Dns => &self.dns,
                    SanType::Email => &self.email,
                    SanType::Uri => &self.uri,
                    SanType::IpAddress => &self.ip,
                };
                values.iter().any(|v| m.matcher.matches(v))
            })
    }

    /// URI SANs then DNS SANs: what Envoy reports as the peer's principals.
    pub fn principals(&self) -> Vec<String> {
        self.uri.iter().chain(self.dns.iter()).cloned().collect()
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Parses a PEM certificate chain.
pub fn parse_certs(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(pem).collect();
    let certs = certs.map_err(|e| TlsError::Pem(e.to_string()))?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate);
    }
    Ok(certs)
}

/// Parses a PEM private key (PKCS#8, PKCS#1 or SEC1).
pub fn parse_key(pem: &[u8]) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| TlsError::Pem(e.to_string()))
}

fn roots(ca_pem: &[u8]) -> Result<rustls::RootCertStore, TlsError> {
    let mut store = rustls::RootCertStore::empty();
    for cert in parse_certs(ca_pem)? {
        store.add(cert)?;
    }
    Ok(store)
}

/// What a downstream TLS context asks for.
#[derive(Debug, Default)]
pub struct ServerTlsSpec {
    pub cert_chain: Vec<u8>,
    pub private_key: Vec<u8>,
    pub alpn: Vec<Vec<u8>>,
    pub trusted_ca: Option<Vec<u8>>,
    pub require_client_certificate: bool,
}

/// Builds a rustls server config.
pub fn server_config(spec: &ServerTlsSpec) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?;
    let builder = match &spec.trusted_ca {
        Some(ca) => {
            let v = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots(ca)?),
                provider(),
            );
            let v = if spec.require_client_certificate {
                v
            } else {
                v.allow_unauthenticated()
            };
            builder.with_client_cert_verifier(
                v.build().map_err(|e| TlsError::Verifier(e.to_string()))?,
            )
        }
        None if spec.require_client_certificate => {
            return Err(TlsError::Verifier(
                "require_client_certificate needs validation_context.trusted_ca".into(),
            ))
        }
        None => builder.with_no_client_auth(),
    };
    let mut cfg = builder.with_single_cert(
        parse_certs(&spec.cert_chain)?,
        parse_key(&spec.private_key)?,
    )?;
    cfg.alpn_protocols = spec.alpn.clone();
    Ok(Arc::new(cfg))
}

/// What an upstream TLS context asks for.
#[derive(Debug, Default)]
pub struct ClientTlsSpec {
    pub trusted_ca: Option<Vec<u8>>,
    pub san_matchers: Vec<SanMatcher>,
    pub client_cert: Option<(Vec<u8>, Vec<u8>)>,
    pub alpn: Vec<Vec<u8>>,
    pub send_sni: bool,
}

/// Builds a rustls client config. As in Envoy, without a validation context the server's
/// certificate is not verified, and the hostname is only checked through SAN matchers.
pub fn client_config(spec: ClientTlsSpec) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let verifier: Arc<dyn ServerCertVerifier> = match &spec.trusted_ca {
        Some(ca) => {
            let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
                Arc::new(roots(ca)?),
                provider(),
            )
            .build()
            .map_err(|e| TlsError::Verifier(e.to_string()))?;
            Arc::new(ChainVerifier {
                inner: Some(inner),
                sans: spec.san_matchers,
            })
        }
        None => Arc::new(ChainVerifier {
            inner: None,
            sans: spec.san_matchers,
        }),
    };
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut cfg = match spec.client_cert {
        Some((chain, key)) => {
            builder.with_client_auth_cert(parse_certs(&chain)?, parse_key(&key)?)?
        }
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = spec.alpn;
    cfg.enable_sni = spec.send_sni;
    Ok(Arc::new(cfg))
}

/// Verifies the chain against the trusted CA (if any) and the SANs against the matchers, but
/// not the hostname, matching Envoy's upstream validation.
#[derive(Debug)]
struct ChainVerifier {
    inner: Option<Arc<rustls::client::WebPkiServerVerifier>>,
    sans: Vec<SanMatcher>,
}

impl ServerCertVerifier for ChainVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if let Some(inner) = &self.inner {
            match inner.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
                Ok(_) => {}
                Err(rustls::Error::InvalidCertificate(
                    rustls::CertificateError::NotValidForName,
                ))
                | Err(rustls::Error::InvalidCertificate(
                    rustls::CertificateError::NotValidForNameContext { .. },
                )) => {}
                Err(e) => return Err(e),
            }
        }
        if !PeerSans::from_der(end_entity).matches(&self.sans) {
            return Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName,
            ));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}
