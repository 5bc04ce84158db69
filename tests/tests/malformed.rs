//! Malformed HTTP/1.1 over raw TCP: answered 400/431 or closed, and never proxied.
//!
//! Obsolete line folding is left out on purpose: RFC 9112 lets a proxy either reject it or
//! replace it with spaces, and Envoy does the latter.
//!
//! Each case runs against every proxy in `LEGATE_DIFF_ONLY` (both by default), with an echo
//! upstream that counts what reaches it.

use std::collections::BTreeMap;

use anyhow::{bail, Result};
use legate_tests::process::TempDir;
use legate_tests::proxy::Proxy;
use legate_tests::raw::{exchange, RawOutcome};
use legate_tests::scenario::{render, sides};
use legate_tests::upstream::Upstream;

const BOOTSTRAP: &str = r#"
static_resources:
  listeners:
  - name: main
    address:
      socket_address: { address: 127.0.0.1, port_value: 0 }
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: ingress
          route_config:
            name: local
            virtual_hosts:
            - name: default
              domains: ["*"]
              routes:
              - match: { prefix: "/" }
                route: { cluster: a }
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: a
    type: STATIC
    load_assignment:
      cluster_name: a
      endpoints:
      - lb_endpoints:
        - endpoint:
            address:
              socket_address: { address: 127.0.0.1, port_value: $UPSTREAM_A_PORT }
"#;

/// (name, bytes, acceptable statuses; a close is always acceptable).
fn cases() -> Vec<(&'static str, Vec<u8>, &'static [u16])> {
    let big = "a".repeat(100 * 1024);
    vec![
        (
            "space in a header name",
            b"GET / HTTP/1.1\r\nhost: x\r\nbad header: v\r\n\r\n".to_vec(),
            &[400],
        ),
        (
            "NUL in a header value",
            b"GET / HTTP/1.1\r\nhost: x\r\nx-a: a\x00b\r\n\r\n".to_vec(),
            &[400],
        ),
        (
            "non-token byte in a header name",
            b"GET / HTTP/1.1\r\nhost: x\r\nx-\x01a: v\r\n\r\n".to_vec(),
            &[400],
        ),
        (
            "content-length with transfer-encoding chunked",
            b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n"
                .to_vec(),
            &[400],
        ),
        (
            "conflicting content-length values",
            b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\nhello"
                .to_vec(),
            &[400],
        ),
        (
            "non-numeric content-length",
            b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 5x\r\n\r\nhello".to_vec(),
            &[400],
        ),
        (
            "garbage request line",
            b"THIS IS NOT HTTP\r\n\r\n".to_vec(),
            &[400],
        ),
        (
            "oversize header",
            format!("GET / HTTP/1.1\r\nhost: x\r\nx-big: {big}\r\n\r\n").into_bytes(),
            &[431],
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_are_rejected_before_the_upstream() -> Result<()> {
    let mut failures = Vec::new();
    for kind in sides()? {
        let dir = TempDir::new("malformed")?;
        let upstream = Upstream::plain("a").await?;
        let vars = BTreeMap::from([(
            "UPSTREAM_A_PORT".to_string(),
            upstream.addr.port().to_string(),
        )]);
        let config = dir.path().join("bootstrap.yaml");
        std::fs::write(&config, render(BOOTSTRAP, &vars)?)?;
        let proxy = Proxy::start(kind, &config, dir.path()).await?;
        let addr = proxy.listener("main")?;

        for (name, bytes, statuses) in cases() {
            match exchange(addr, &bytes).await {
                Ok(RawOutcome::Closed) => {}
                Ok(RawOutcome::Response(r)) if statuses.contains(&r.status) => {}
                Ok(RawOutcome::Response(r)) => failures.push(format!(
                    "{kind}: {name}: got {} (want {statuses:?} or a close)",
                    r.status
                )),
                Err(e) => failures.push(format!("{kind}: {name}: {e:#}")),
            }
            if upstream.requests() != 0 {
                failures.push(format!("{kind}: {name}: reached the upstream"));
                break;
            }
        }
        // The same proxy does forward a well-formed request, so the zero above means something.
        match exchange(addr, b"GET /ok HTTP/1.1\r\nhost: x\r\n\r\n").await? {
            RawOutcome::Response(r) if r.status == 200 => {}
            other => failures.push(format!("{kind}: well-formed request: {other:?}")),
        }
        if upstream.requests() != 1 {
            failures.push(format!(
                "{kind}: the upstream saw {} requests, want 1\n{}",
                upstream.requests(),
                proxy.output()
            ));
        }
    }
    if !failures.is_empty() {
        bail!("{}", failures.join("\n"));
    }
    Ok(())
}
