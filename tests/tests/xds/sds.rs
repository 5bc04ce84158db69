//! SDS: a TLS listener whose certificate comes as a `Secret` over ADS. The listener asks for
//! the secret and serves once it arrives; a new version of the secret (a certificate from another CA) is
//! what new handshakes get.

use legate_proto::pb::envoy::config::core::v3::{
    data_source::Specifier, transport_socket, DataSource, TransportSocket,
};
use legate_proto::pb::envoy::config::listener::v3::Listener;
use legate_proto::pb::envoy::extensions::transport_sockets::tls::v3::{
    secret, CommonTlsContext, DownstreamTlsContext, SdsSecretConfig, Secret, TlsCertificate,
};
use legate_tests::certs::TestPki;
use legate_tests::client::ClientCert;
use legate_tests::xds::resources::ads_source;
use legate_tests::xds::{any, SDS};

use std::sync::Arc;

use super::*;

/// The secret `server-cert`: the PKI's server certificate and key, inline.
fn server_secret(pki: &TestPki) -> Result<Secret> {
    let read = |name: &str| -> Result<DataSource> {
        let text = std::fs::read_to_string(pki.dir.join(name))?;
        Ok(DataSource {
            specifier: Some(Specifier::InlineString(text)),
            ..Default::default()
        })
    };
    Ok(Secret {
        name: "server-cert".into(),
        r#type: Some(secret::Type::TlsCertificate(TlsCertificate {
            certificate_chain: Some(read("server.pem")?),
            private_key: Some(read("server.key")?),
            ..Default::default()
        })),
    })
}

/// `l1` (RDS `r1`) terminating TLS with the certificate of secret `server-cert` over SDS.
fn tls_listener() -> Listener {
    let mut l = http_listener("l1", "r1");
    let tls = DownstreamTlsContext {
        common_tls_context: Some(CommonTlsContext {
            tls_certificate_sds_secret_configs: vec![SdsSecretConfig {
                name: "server-cert".into(),
                sds_config: Some(ads_source()),
            }],
            ..Default::default()
        }),
        ..Default::default()
    };
    if let Some(chain) = l.filter_chains.first_mut() {
        chain.transport_socket = Some(TransportSocket {
            name: "envoy.transport_sockets.tls".into(),
            config_type: Some(transport_socket::ConfigType::TypedConfig(any(&tls))),
        });
    }
    l
}

fn tls(pki: &Arc<TestPki>) -> Transport {
    Transport::Tls {
        pki: pki.clone(),
        sni: "localhost".into(),
        alpn: vec!["http/1.1".into()],
        client_cert: ClientCert::None,
    }
}

async fn sds(kind: ProxyKind, proto: XdsProtocol) -> Result<()> {
    let w = World::new(kind, proto).await?;
    let first = TestPki::generate(&w.dir.path().join("pki-1"))?;
    let second = TestPki::generate(&w.dir.path().join("pki-2"))?;
    let s = &w.server;
    s.set_typed("1", &[eds_cluster("c1")])?;
    s.set_typed("1", &[load_assignment("c1", &[w.a.addr])])?;
    s.set_typed("1", &[route_config("r1", &[("/", "c1")])])?;
    s.set_typed("1", &[tls_listener()])?;
    let proxy = w.start_proxy().await?;

    // The listener asks for its secret and warms without it.
    s.wait_for_request("the SDS request for server-cert", |r| {
        r.type_url == SDS && names(r, "server-cert")
    })
    .await
    .with_context(|| s.describe_log())?;
    s.wait_for_ack(LDS, "1").await?;

    // The secret arrives: the listener serves TLS with it.
    s.set_typed("1", &[server_secret(&first)?])?;
    let l1 = proxy
        .wait_listener("l1", DEADLINE)
        .await
        .with_context(|| s.describe_log())?;
    let req = Request::get("localhost", "/");
    eventually("TLS with the first certificate", || async {
        Ok(send(l1, &tls(&first), &req)
            .await
            .ok()
            .filter(|r| r.status == 200)
            .map(|_| ()))
    })
    .await?;
    s.wait_for_ack(SDS, "1").await?;

    // A new version of the secret: new handshakes get the new certificate.
    s.set_typed("2", &[server_secret(&second)?])?;
    eventually("TLS with the second certificate", || async {
        Ok(send(l1, &tls(&second), &req)
            .await
            .ok()
            .filter(|r| r.status == 200)
            .map(|_| ()))
    })
    .await
    .with_context(|| s.describe_log())?;
    ensure!(
        send(l1, &tls(&first), &req).await.is_err(),
        "{kind}: a client trusting only the first CA still completes a handshake"
    );
    s.wait_for_ack(SDS, "2").await?;
    // Secrets are listed in /config_dump without their keys.
    let (_, dump) = admin_get(proxy.admin, "/config_dump").await?;
    ensure!(
        dump.contains("server-cert"),
        "{kind}: no secret in /config_dump"
    );
    ensure!(
        !dump.contains("PRIVATE KEY-----\\n"),
        "{kind}: /config_dump shows a private key"
    );
    Ok(())
}

xds_test!(xds_sds_envoy_sotw, sds, Envoy, Sotw);
xds_test!(xds_sds_envoy_delta, sds, Envoy, Delta);
xds_test!(xds_sds_legate_sotw, sds, Legate, Sotw);
xds_test!(xds_sds_legate_delta, sds, Legate, Delta);
