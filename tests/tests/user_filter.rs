//! A filter from outside the proxy crate: `examples/filters/hello-filter` builds `legate-hello`,
//! a `legate` with its own `AddHeader` filter configured through an `xds.type.v3.TypedStruct`.
//! The same bootstrap serves traffic through that binary and is refused by plain `legate`,
//! which has no factory for the type.

use std::time::Duration;

use anyhow::{ensure, Result};
use legate_tests::bins::{hello_bin, legate_bin, ProxyKind};
use legate_tests::client::{admin_get, send, Request, Transport};
use legate_tests::process::{run_to_completion, TempDir};
use legate_tests::proxy::Proxy;
use legate_tests::upstream::{Echo, Upstream};

fn bootstrap(port: u16, value: &str) -> String {
    format!(
        r#"
admin: {{address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}}}
static_resources:
  listeners:
  - name: main
    address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          '@type': type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: main
          route_config:
            virtual_hosts:
            - name: all
              domains: ['*']
              routes: [{{match: {{prefix: /}}, route: {{cluster: a}}}}]
          http_filters:
          - name: hello
            typed_config:
              '@type': type.googleapis.com/xds.type.v3.TypedStruct
              type_url: type.googleapis.com/legate.example.AddHeader
              value: {value}
          - name: envoy.filters.http.router
            typed_config: {{'@type': type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
  clusters:
  - name: a
    type: STATIC
    load_assignment:
      cluster_name: a
      endpoints:
      - lb_endpoints:
        - endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}}}
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_filter_built_into_legate_serves_traffic() -> Result<()> {
    let bin = hello_bin()?;
    let up = Upstream::plain("a").await?;
    let dir = TempDir::new("user-filter")?;
    let config = dir.path().join("bootstrap.yaml");
    std::fs::write(
        &config,
        bootstrap(up.addr.port(), "{name: x-hello, value: world}"),
    )?;

    let proxy = Proxy::start_binary(ProxyKind::Legate, &bin, &config, dir.path()).await?;
    let resp = send(
        proxy.listener("main")?,
        &Transport::H1,
        &Request::get("example.com", "/"),
    )
    .await?;
    ensure!(resp.status == 200, "{resp:?}\n{}", proxy.output());
    ensure!(
        resp.header("x-hello").as_deref() == Some("world"),
        "{resp:?}"
    );
    let echo: Echo = serde_json::from_slice(&resp.body)?;
    ensure!(
        echo.headers.get("x-hello-filter").map(String::as_str) == Some("seen"),
        "{echo:?}"
    );
    let (_, stats) = admin_get(proxy.admin, "/stats").await?;
    ensure!(
        stats.lines().any(|l| l == "http.main.hello.hello.added: 1"),
        "{stats}"
    );

    // The proxy without the filter refuses the same bootstrap, naming the type and where.
    let args = |c: &std::path::Path| {
        vec![
            "--mode".to_string(),
            "validate".into(),
            "-c".into(),
            c.display().to_string(),
        ]
    };
    let plain = run_to_completion(
        &legate_bin()?,
        &args(&config),
        dir.path(),
        Duration::from_secs(10),
    )?;
    ensure!(!plain.status.success(), "{plain:?}");
    ensure!(
        plain.stdout.contains("http_filters[0].typed_config")
            && plain.stdout.contains(
                "unsupported extension type type.googleapis.com/legate.example.AddHeader"
            ),
        "{plain:?}"
    );

    // A bad value in the user's own message is refused with the field it names.
    let bad = dir.path().join("bad.yaml");
    std::fs::write(&bad, bootstrap(up.addr.port(), "{name: 'not a header'}"))?;
    let refused = run_to_completion(&bin, &args(&bad), dir.path(), Duration::from_secs(10))?;
    ensure!(!refused.status.success(), "{refused:?}");
    ensure!(
        refused.stdout.contains("http_filters[0].typed_config")
            && refused
                .stdout
                .contains("name: \"not a header\" is not a header name"),
        "{refused:?}"
    );
    Ok(())
}
