//! Gateway TLS: the certificates `Ingress.spec.tls` names, checked and served over SDS.
//!
//! A TLS entry names a Secret in the Ingress's namespace. The gateway's HTTPS listener refers
//! to it by SDS with Istio's resource name, `kubernetes://NAMESPACE/NAME` (Istio also accepts
//! the short `kubernetes://NAME` for the proxy's own namespace; the qualified form is never
//! ambiguous). The Secret resource carries `tls.crt` and `tls.key` inline.
//!
//! A secret is served only when it would load: type `kubernetes.io/tls` (or `Opaque` with the
//! same keys), a PEM certificate chain and a PEM private key that belongs to its first
//! certificate. An entry whose secret is missing or invalid is left out of the listener, so
//! the snapshot stays consistent and no proxy NACKs; [`problems`] lists such entries once per
//! model for the logs and `pilot_config_errors_total`. Errors never contain key material.

use std::sync::Arc;

use legate_proto::pb::envoy::config::core::v3::{data_source::Specifier, DataSource};
use legate_proto::pb::envoy::extensions::transport_sockets::tls::v3::{
    secret, Secret as EnvoySecret, TlsCertificate,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::model::{Ingress, IngressTls, Model, Secret, TLS_SECRET_TYPE};

/// The prefix of SDS names for Kubernetes secrets, as Istio spells it.
pub const SDS_PREFIX: &str = "kubernetes://";

/// The data keys of a TLS secret.
pub const TLS_CERT_KEY: &str = "tls.crt";
pub const TLS_PRIVATE_KEY_KEY: &str = "tls.key";

/// The SDS resource name of secret `name` in `namespace`.
pub fn sds_name(namespace: &str, name: &str) -> String {
    format!("{SDS_PREFIX}{namespace}/{name}")
}

/// Why a TLS entry cannot be served.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum TlsSecretError {
    #[error("no secretName")]
    NoSecretName,
    #[error("secret {0} does not exist")]
    Missing(String),
    #[error("secret {name}: type {secret_type:?} is not {TLS_SECRET_TYPE}")]
    Type { name: String, secret_type: String },
    #[error("secret {name}: no {key}")]
    NoKey { name: String, key: &'static str },
    #[error("secret {name}: {key} holds no PEM certificate")]
    NoCertificate { name: String, key: &'static str },
    #[error("secret {name}: {key} holds no PEM private key")]
    NoPrivateKey { name: String, key: &'static str },
    #[error("secret {name}: the private key does not belong to the certificate ({reason})")]
    Mismatch { name: String, reason: String },
}

/// A secret that passed every check, ready to be served.
#[derive(Debug, Clone, Copy)]
pub struct TlsPair<'a> {
    pub secret: &'a Secret,
}

impl TlsPair<'_> {
    /// The SDS name of the secret.
    pub fn sds_name(&self) -> String {
        sds_name(&self.secret.namespace, &self.secret.name)
    }

    /// The Envoy `Secret` resource: certificate chain and key inline, as PEM.
    pub fn to_envoy(&self) -> EnvoySecret {
        let inline = |key: &str| DataSource {
            specifier: Some(Specifier::InlineBytes(
                self.secret.data.get(key).cloned().unwrap_or_default(),
            )),
            ..Default::default()
        };
        EnvoySecret {
            name: self.sds_name(),
            r#type: Some(secret::Type::TlsCertificate(TlsCertificate {
                certificate_chain: Some(inline(TLS_CERT_KEY)),
                private_key: Some(inline(TLS_PRIVATE_KEY_KEY)),
                ..Default::default()
            })),
        }
    }
}

/// Checks that `secret` holds a certificate chain and the matching private key.
pub fn check(secret: &Secret) -> Result<(), TlsSecretError> {
    let name = format!("{}/{}", secret.namespace, secret.name);
    if secret.secret_type != TLS_SECRET_TYPE && secret.secret_type != "Opaque" {
        return Err(TlsSecretError::Type {
            name,
            secret_type: secret.secret_type.clone(),
        });
    }
    let get = |key: &'static str| {
        secret.data.get(key).ok_or_else(|| TlsSecretError::NoKey {
            name: name.clone(),
            key,
        })
    };
    let cert = get(TLS_CERT_KEY)?;
    let key = get(TLS_PRIVATE_KEY_KEY)?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert)
        .collect::<Result<_, _>>()
        .ok()
        .filter(|c: &Vec<_>| !c.is_empty())
        .ok_or_else(|| TlsSecretError::NoCertificate {
            name: name.clone(),
            key: TLS_CERT_KEY,
        })?;
    let key = PrivateKeyDer::from_pem_slice(key).map_err(|_| TlsSecretError::NoPrivateKey {
        name: name.clone(),
        key: TLS_PRIVATE_KEY_KEY,
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    rustls::sign::CertifiedKey::from_der(chain, key, &provider).map_err(|e| {
        TlsSecretError::Mismatch {
            name,
            reason: e.to_string(),
        }
    })?;
    Ok(())
}

/// The secret a TLS entry of `ingress` names, if it can be served.
pub fn resolve<'a>(
    model: &'a Model,
    ingress: &Ingress,
    tls: &IngressTls,
) -> Result<TlsPair<'a>, TlsSecretError> {
    let name = tls
        .secret_name
        .as_deref()
        .ok_or(TlsSecretError::NoSecretName)?;
    let secret = model
        .secret(&ingress.namespace, name)
        .ok_or_else(|| TlsSecretError::Missing(format!("{}/{name}", ingress.namespace)))?;
    check(secret)?;
    Ok(TlsPair { secret })
}

/// Every TLS entry of a served Ingress that cannot be served, as `NAMESPACE/INGRESS
/// spec.tls[i]: reason`.
pub fn problems(model: &Model) -> Vec<String> {
    let mut out = Vec::new();
    for ingress in model
        .ingresses
        .values()
        .filter(|i| crate::gateway::is_served(i))
    {
        for (i, tls) in ingress.tls.iter().enumerate() {
            if let Err(e) = resolve(model, ingress, tls) {
                out.push(format!(
                    "Ingress {}/{} spec.tls[{i}]: {e}",
                    ingress.namespace, ingress.name
                ));
            }
        }
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::model::parse_manifests;
    use base64::Engine as _;

    /// A `kubernetes.io/tls` Secret `shop/s` with a fresh self-signed certificate for
    /// `hosts` and, unless `matching`, the key of another certificate.
    pub(crate) fn tls_secret(
        hosts: &[&str],
        matching: bool,
    ) -> Result<String, Box<dyn std::error::Error>> {
        let names: Vec<String> = hosts.iter().map(|h| (*h).to_string()).collect();
        let cert = rcgen::generate_simple_self_signed(names.clone())?;
        let other = rcgen::generate_simple_self_signed(names)?;
        let key = if matching {
            cert.signing_key.serialize_pem()
        } else {
            other.signing_key.serialize_pem()
        };
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        Ok(format!(
            "kind: Secret\nmetadata: {{name: s, namespace: shop}}\ntype: kubernetes.io/tls\ndata: {{tls.crt: {}, tls.key: {}}}\n",
            b64(&cert.cert.pem()),
            b64(&key)
        ))
    }

    fn model(secret: &str) -> Result<Model, crate::model::ManifestError> {
        let text = format!(
            "kind: Ingress\nmetadata: {{name: i, namespace: shop}}\nspec:\n  tls: [{{hosts: [a.example.com], secretName: s}}]\n---\n{secret}"
        );
        Ok(Model::build(parse_manifests(&text)?))
    }

    #[test]
    fn names_follow_istio() {
        assert_eq!(sds_name("shop", "shop-tls"), "kubernetes://shop/shop-tls");
    }

    #[test]
    fn bad_secrets_are_reported_without_their_content() -> Result<(), Box<dyn std::error::Error>> {
        let mismatched = tls_secret(&["a.example.com"], false)?;
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        let cases = [
            ("", "secret shop/s does not exist"),
            (
                "kind: Secret\nmetadata: {name: s, namespace: shop}\ntype: kubernetes.io/dockerconfigjson\n",
                "is not kubernetes.io/tls",
            ),
            (
                "kind: Secret\nmetadata: {name: s, namespace: shop}\ntype: kubernetes.io/tls\nstringData: {tls.crt: x}\n",
                "secret shop/s: no tls.key",
            ),
            (
                &format!("kind: Secret\nmetadata: {{name: s, namespace: shop}}\ntype: kubernetes.io/tls\ndata: {{tls.crt: {}, tls.key: {}}}\n", b64("not a pem"), b64("topsecret")),
                "tls.crt holds no PEM certificate",
            ),
            (
                &format!(
                    "kind: Secret\nmetadata: {{name: s, namespace: shop}}\ntype: kubernetes.io/tls\ndata: {{tls.crt: {}, tls.key: {}}}\n",
                    b64("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"),
                    b64("topsecret")
                ),
                "tls.key holds no PEM private key",
            ),
            (&mismatched, "the private key does not belong to the certificate"),
        ];
        for (secret, want) in cases {
            let problems = problems(&model(secret)?);
            assert_eq!(problems.len(), 1, "{secret}");
            assert!(problems[0].contains(want), "{} vs {want}", problems[0]);
            assert!(problems[0].starts_with("Ingress shop/i spec.tls[0]: "));
            assert!(!problems[0].contains("topsecret"));
        }
        Ok(())
    }

    #[test]
    fn a_good_secret_is_served_inline() -> Result<(), Box<dyn std::error::Error>> {
        let model = model(&tls_secret(&["a.example.com"], true)?)?;
        assert!(problems(&model).is_empty(), "{:?}", problems(&model));
        let ingress = &model.ingresses[&("shop".to_string(), "i".to_string())];
        let pair = resolve(&model, ingress, &ingress.tls[0])?;
        let secret = pair.to_envoy();
        assert_eq!(secret.name, "kubernetes://shop/s");
        let Some(secret::Type::TlsCertificate(tls)) = secret.r#type else {
            return Err("not a TLS certificate".into());
        };
        let Some(Specifier::InlineBytes(chain)) = tls.certificate_chain.and_then(|d| d.specifier)
        else {
            return Err("no inline chain".into());
        };
        assert!(chain.starts_with(b"-----BEGIN CERTIFICATE-----"));
        Ok(())
    }
}
