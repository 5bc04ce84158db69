//! ADS over TLS: the bootstrap's `xds` cluster has an `UpstreamTlsContext`; the client
//! verifies the management server's certificate and gets its whole configuration over it.

use std::sync::Arc;

use legate_tests::certs::{provider, TestPki};

use super::*;

async fn ads_over_tls(kind: ProxyKind, proto: XdsProtocol) -> Result<()> {
    let dir = TempDir::new(&format!("xds-tls-{proto}"))?;
    let pki = TestPki::generate(&dir.path().join("pki"))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(pki.server.chain.clone(), pki.server.key())?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    let server = XdsServer::start_tls(Arc::new(config)).await?;
    let a = Upstream::plain("a").await?;
    server.set_typed("1", &[eds_cluster("c1")])?;
    server.set_typed("1", &[load_assignment("c1", &[a.addr])])?;
    server.set_typed("1", &[http_listener("l1", "r1")])?;
    server.set_typed("1", &[route_config("r1", &[("/", "c1")])])?;
    let mut bootstrap = AdsBootstrap::new(server.addr(), proto);
    bootstrap.tls_ca = Some(pki.dir.join("ca.pem"));
    let path = bootstrap.write(dir.path())?;
    let proxy = Proxy::start_dynamic(kind, &path, dir.path(), &[]).await?;
    let l1 = proxy
        .wait_listener("l1", DEADLINE)
        .await
        .with_context(|| server.describe_log())?;
    wait_upstream(l1, "/", "a").await?;
    for t in [CDS, EDS, LDS, RDS] {
        server.wait_for_ack(t, "1").await?;
    }
    Ok(())
}

xds_test!(xds_ads_over_tls_envoy_sotw, ads_over_tls, Envoy, Sotw);
xds_test!(xds_ads_over_tls_legate_sotw, ads_over_tls, Legate, Sotw);
xds_test!(xds_ads_over_tls_legate_delta, ads_over_tls, Legate, Delta);
