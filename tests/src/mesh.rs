//! What the tests of `legate-pilot` share: the bootstrap of a proxy the pilot drives over
//! ADS, and which echo upstream answered a request through it.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::client::{send, Request, Transport};
use crate::upstream::Echo;

/// A bootstrap for node `id` with `metadata` (flow-style YAML fields) whose only static
/// cluster is the pilot's ADS server at `xds`; `api_type` is `GRPC` (state of the world) or
/// `DELTA_GRPC`.
pub fn ads_bootstrap(xds: SocketAddr, api_type: &str, id: &str, metadata: &str) -> String {
    format!(
        r#"
node:
  id: {id}
  cluster: app.default
  metadata: {{{metadata}}}
admin: {{address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}}}
dynamic_resources:
  ads_config:
    api_type: {api_type}
    transport_api_version: V3
    grpc_services: [{{envoy_grpc: {{cluster_name: xds-grpc}}}}]
  cds_config: {{ads: {{}}, resource_api_version: V3}}
  lds_config: {{ads: {{}}, resource_api_version: V3}}
static_resources:
  clusters:
  - name: xds-grpc
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        '@type': type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{http2_protocol_options: {{}}}}
    load_assignment:
      cluster_name: xds-grpc
      endpoints:
      - lb_endpoints:
        - endpoint: {{address: {{socket_address: {{address: {ip}, port_value: {port}}}}}}}
"#,
        ip = xds.ip(),
        port = xds.port(),
    )
}

/// Which upstream answered a request for `host` through `proxy`, if one did.
pub async fn answered_by(proxy: SocketAddr, host: &str) -> Result<Option<String>> {
    let response = send(proxy, &Transport::H1, &Request::get(host, "/hello")).await?;
    if response.status != 200 {
        return Ok(None);
    }
    let echo: Echo = serde_json::from_slice(&response.body)
        .with_context(|| format!("echo body {:?}", String::from_utf8_lossy(&response.body)))?;
    Ok(Some(echo.upstream))
}

/// Waits until upstream `want` answers requests for `host` through `proxy`.
pub async fn wait_for_upstream(
    proxy: SocketAddr,
    host: &str,
    want: &str,
    within: Duration,
) -> Result<()> {
    let what = format!("{host} answered by {want}");
    crate::wait::eventually_within(&what, within, Duration::from_millis(50), || async {
        Ok(answered_by(proxy, host)
            .await?
            .filter(|u| u == want)
            .map(|_| ()))
    })
    .await
}
