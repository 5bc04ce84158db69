//! Invalid HTTP/2 over raw h2c: every case ends in a GOAWAY, a RST_STREAM or a close, and none
//! reaches the upstream. Runs against every proxy in `LEGATE_DIFF_ONLY` (both by default).

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{bail, Result};
use legate_tests::process::TempDir;
use legate_tests::proxy::Proxy;
use legate_tests::scenario::{render, sides};
use legate_tests::upstream::Upstream;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const BOOTSTRAP: &str = r#"
static_resources:
  listeners:
  - name: main
    address: {socket_address: {address: 127.0.0.1, port_value: 0}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: ingress
          route_config:
            virtual_hosts:
            - {name: default, domains: ["*"], routes: [{match: {prefix: "/"}, route: {cluster: a}}]}
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}
  clusters:
  - name: a
    type: STATIC
    load_assignment:
      cluster_name: a
      endpoints:
      - lb_endpoints:
        - endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: $UPSTREAM_A_PORT}}}
"#;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len();
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// HPACK for `GET / http example.com` plus extra literal headers (no Huffman, no indexing).
fn headers_block(extra: &[(&str, &str)]) -> Vec<u8> {
    let mut b = vec![0x82, 0x86, 0x84, 0x01, 11];
    b.extend_from_slice(b"example.com");
    for (n, v) in extra {
        b.push(0x00);
        b.push(n.len() as u8);
        b.extend_from_slice(n.as_bytes());
        b.push(v.len() as u8);
        b.extend_from_slice(v.as_bytes());
    }
    b
}

const HEADERS: u8 = 1;
const SETTINGS: u8 = 4;
const END_STREAM_HEADERS: u8 = 0x5;

/// (name, frames after the preface and an empty SETTINGS).
fn cases() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        (
            "HEADERS on stream 0",
            frame(HEADERS, END_STREAM_HEADERS, 0, &headers_block(&[])),
        ),
        (
            "SETTINGS with a length not a multiple of 6",
            frame(SETTINGS, 0, 0, &[0, 3, 0, 0, 0]),
        ),
        ("DATA on an idle stream", frame(0, 1, 3, b"hello")),
        (
            "upper-case header name",
            frame(
                HEADERS,
                END_STREAM_HEADERS,
                1,
                &headers_block(&[("X-Bad", "v")]),
            ),
        ),
        (
            "connection-specific header",
            frame(
                HEADERS,
                END_STREAM_HEADERS,
                1,
                &headers_block(&[("connection", "close")]),
            ),
        ),
        (
            "even stream id from the client",
            frame(HEADERS, END_STREAM_HEADERS, 2, &headers_block(&[])),
        ),
        (
            "garbage HPACK",
            frame(
                HEADERS,
                END_STREAM_HEADERS,
                1,
                &[0xff, 0xff, 0xff, 0xff, 0x7f],
            ),
        ),
    ]
}

#[derive(Debug, PartialEq)]
enum Outcome {
    GoAway(u32),
    Reset(u32),
    Closed,
    /// A response HEADERS frame: the request was accepted.
    Answered,
}

async fn exchange(addr: std::net::SocketAddr, bad: &[u8]) -> Result<Outcome> {
    let mut s = TcpStream::connect(addr).await?;
    let mut out = PREFACE.to_vec();
    out.extend(frame(SETTINGS, 0, 0, &[]));
    out.extend_from_slice(bad);
    s.write_all(&out).await?;
    let read = async {
        loop {
            let mut head = [0u8; 9];
            if s.read_exact(&mut head).await.is_err() {
                return Ok(Outcome::Closed);
            }
            let len =
                (usize::from(head[0]) << 16) | (usize::from(head[1]) << 8) | usize::from(head[2]);
            let mut payload = vec![0u8; len];
            if s.read_exact(&mut payload).await.is_err() {
                return Ok(Outcome::Closed);
            }
            let code = |at: usize| {
                payload
                    .get(at..at + 4)
                    .map_or(0, |c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
            };
            match head[3] {
                7 => return Ok(Outcome::GoAway(code(4))),
                3 => return Ok(Outcome::Reset(code(0))),
                1 => return Ok(Outcome::Answered),
                4 if head[4] & 1 == 0 => {
                    // Acknowledge the server's SETTINGS so it keeps talking.
                    let _ = s.write_all(&frame(SETTINGS, 1, 0, &[])).await;
                }
                _ => {}
            }
        }
    };
    match tokio::time::timeout(Duration::from_secs(5), read).await {
        Ok(r) => r,
        Err(_) => bail!("no GOAWAY, RST_STREAM or close within 5s"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_http2_frames_are_refused_before_the_upstream() -> Result<()> {
    let mut failures = Vec::new();
    for kind in sides()? {
        let dir = TempDir::new("malformed-h2")?;
        let upstream = Upstream::plain("a").await?;
        let vars = BTreeMap::from([(
            "UPSTREAM_A_PORT".to_string(),
            upstream.addr.port().to_string(),
        )]);
        let config = dir.path().join("bootstrap.yaml");
        std::fs::write(&config, render(BOOTSTRAP, &vars)?)?;
        let proxy = Proxy::start(kind, &config, dir.path()).await?;
        let addr = proxy.listener("main")?;
        for (name, bad) in cases() {
            match exchange(addr, &bad).await {
                Ok(Outcome::Answered) => {
                    failures.push(format!("{kind}: {name}: the request was answered"))
                }
                Ok(_) => {}
                Err(e) => failures.push(format!("{kind}: {name}: {e:#}")),
            }
            if upstream.requests() != 0 {
                failures.push(format!("{kind}: {name}: reached the upstream"));
                break;
            }
        }
        // A well-formed request on the same kind of connection is answered, so the checks above
        // are not vacuous.
        let good = frame(HEADERS, END_STREAM_HEADERS, 1, &headers_block(&[]));
        match exchange(addr, &good).await {
            Ok(Outcome::Answered) => {}
            other => failures.push(format!(
                "{kind}: well-formed request: {other:?}\n{}",
                proxy.output()
            )),
        }
    }
    if !failures.is_empty() {
        bail!("{}", failures.join("\n"));
    }
    Ok(())
}
