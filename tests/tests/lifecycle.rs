//! What an operator sees of one Legate process: access logs, the admin API, WebSocket
//! upgrades, back-pressure on a slow reader and the drain on SIGTERM. These are Legate-only
//! (the differential corpus covers what Envoy also does on the data path).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use legate_tests::bins::ProxyKind;
use legate_tests::client::{admin_get, send, Request, Transport};
use legate_tests::process::TempDir;
use legate_tests::proxy::Proxy;
use legate_tests::upstream::Upstream;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const DEADLINE: Duration = Duration::from_secs(10);

/// A bootstrap with one listener `main` routing everything to cluster `a` at `port`.
fn bootstrap(port: u16, hcm_extra: &str) -> String {
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
          stat_prefix: ingress
{hcm_extra}
          route_config:
            name: local
            virtual_hosts:
            - name: all
              domains: ['*']
              routes:
              - match: {{prefix: /}}
                route: {{cluster: a}}
          http_filters:
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

async fn start_legate(dir: &TempDir, yaml: &str) -> Result<Proxy> {
    let path = dir.path().join("bootstrap.yaml");
    std::fs::write(&path, yaml)?;
    Proxy::start(ProxyKind::Legate, &path, dir.path()).await
}

async fn poll_file(path: &Path, lines: usize) -> Result<String> {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.lines().count() >= lines {
            return Ok(text);
        }
        if Instant::now() > deadline {
            bail!(
                "{} has {} lines, want {lines}:\n{text}",
                path.display(),
                text.lines().count()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_logs_use_envoy_operators_in_text_and_json() -> Result<()> {
    let up = Upstream::plain("a").await?;
    let dir = TempDir::new("lifecycle-accesslog")?;
    let text_log = dir.path().join("access.log");
    let json_log = dir.path().join("access.json");
    let extra = format!(
        r#"          access_log:
          - name: text
            typed_config:
              '@type': type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog
              path: {}
              log_format:
                text_format: "%REQ(:METHOD)% %REQ(:PATH)% %PROTOCOL% %RESPONSE_CODE% %RESPONSE_FLAGS% %BYTES_RECEIVED% %BYTES_SENT% %UPSTREAM_HOST% %UPSTREAM_CLUSTER% %REQ(X-MISSING)% %RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)%\n"
          - name: json
            typed_config:
              '@type': type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog
              path: {}
              log_format:
                json_format: {{code: "%RESPONSE_CODE%", path: "%REQ(:PATH)%", start: "%START_TIME%", duration: "%DURATION%", remote: "%DOWNSTREAM_REMOTE_ADDRESS%", upstream: "%UPSTREAM_HOST%", missing: "%REQ(X-MISSING)%"}}"#,
        text_log.display(),
        json_log.display()
    );
    // `/down` goes to a port nothing listens on.
    let dead = TcpListener::bind("127.0.0.1:0").await?.local_addr()?.port();
    let yaml = bootstrap(up.addr.port(), &extra)
        .replace(
            "              - match: {prefix: /}\n",
            "              - match: {prefix: /down}\n                route: {cluster: dead}\n              - match: {prefix: /}\n",
        )
        .replace(
            "  clusters:\n",
            &format!("  clusters:\n  - name: dead\n    type: STATIC\n    load_assignment:\n      cluster_name: dead\n      endpoints:\n      - lb_endpoints:\n        - endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {dead}}}}}}}\n"),
        );
    let legate = start_legate(&dir, &yaml).await?;
    let addr = legate.listener("main")?;
    let mut req = Request::get("example.com", "/logged?x=1");
    req.method = "POST".into();
    req.body = legate_tests::client::Body::Full("hello".into());
    let resp = send(addr, &Transport::H1, &req).await?;
    ensure!(resp.status == 200, "status {}", resp.status);
    let sent = resp.body.len();

    let text = poll_file(&text_log, 1).await?;
    let fields: Vec<&str> = text.lines().next().unwrap_or_default().split(' ').collect();
    let upstream = up.addr.to_string();
    ensure!(fields.len() == 11, "unexpected line {text:?}");
    ensure!(
        fields[..4] == ["POST", "/logged?x=1", "HTTP/1.1", "200"],
        "{fields:?}"
    );
    ensure!(fields[4] == "-", "no response flags expected: {fields:?}");
    ensure!(fields[5] == "5", "bytes received: {fields:?}");
    ensure!(
        fields[6] == sent.to_string(),
        "bytes sent {} != {sent}",
        fields[6]
    );
    ensure!(fields[7] == upstream && fields[8] == "a", "{fields:?}");
    ensure!(
        fields[9] == "-",
        "a missing header renders as '-': {fields:?}"
    );
    ensure!(
        fields[10].parse::<u64>().is_ok(),
        "service time: {fields:?}"
    );

    let json = poll_file(&json_log, 1).await?;
    let v: serde_json::Value = serde_json::from_str(json.lines().next().unwrap_or_default())?;
    ensure!(v["code"] == 200, "{v}");
    ensure!(v["path"] == "/logged?x=1", "{v}");
    ensure!(v["upstream"] == upstream.as_str(), "{v}");
    ensure!(v["missing"].is_null(), "{v}");
    ensure!(v["duration"].is_u64(), "{v}");
    ensure!(
        v["start"]
            .as_str()
            .is_some_and(|s| s.ends_with('Z') && s.len() == 24),
        "{v}"
    );
    ensure!(
        v["remote"]
            .as_str()
            .is_some_and(|s| s.starts_with("127.0.0.1:")),
        "{v}"
    );

    // A local reply is logged with its response flag.
    let resp = send(addr, &Transport::H1, &Request::get("example.com", "/x")).await?;
    ensure!(resp.status == 200);
    let resp = send(addr, &Transport::H1, &Request::get("example.com", "/down")).await?;
    ensure!(resp.status == 503, "status {}", resp.status);
    let text = poll_file(&text_log, 3).await?;
    let last = text.lines().last().unwrap_or_default();
    ensure!(last.starts_with("GET /down HTTP/1.1 503 UF "), "{last}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_reports_stats_clusters_listeners_and_config() -> Result<()> {
    let up = Upstream::plain("a").await?;
    let dir = TempDir::new("lifecycle-admin")?;
    let legate = start_legate(&dir, &bootstrap(up.addr.port(), "")).await?;
    let addr = legate.listener("main")?;
    for _ in 0..3 {
        let r = send(addr, &Transport::H1, &Request::get("example.com", "/")).await?;
        ensure!(r.status == 200);
    }
    let (code, body) = admin_get(legate.admin, "/ready").await?;
    ensure!(code == 200 && body.trim() == "LIVE", "{code} {body}");

    let (_, stats) = admin_get(legate.admin, "/stats").await?;
    for want in [
        "http.ingress.downstream_rq_total: 3",
        "http.ingress.downstream_rq_2xx: 3",
        "cluster.a.upstream_rq_total: 3",
        "cluster.a.upstream_rq_2xx: 3",
        "cluster.a.upstream_cx_total: ",
        "cluster.a.membership_total: 1",
    ] {
        ensure!(stats.contains(want), "/stats lacks {want:?}:\n{stats}");
    }
    let (_, prom) = admin_get(legate.admin, "/stats/prometheus").await?;
    ensure!(
        prom.contains("# TYPE envoy_cluster_a_upstream_rq_total counter"),
        "{prom}"
    );

    let (_, clusters) = admin_get(legate.admin, "/clusters").await?;
    ensure!(
        clusters.contains(&format!("a::{}::rq_total::3", up.addr)),
        "{clusters}"
    );

    let (_, listeners) = admin_get(legate.admin, "/listeners").await?;
    ensure!(listeners.contains(&format!("main::{addr}")), "{listeners}");

    let (_, dump) = admin_get(legate.admin, "/config_dump").await?;
    let dump: serde_json::Value = serde_json::from_str(&dump)?;
    let types: Vec<&str> = dump["configs"]
        .as_array()
        .context("configs")?
        .iter()
        .filter_map(|c| c["@type"].as_str())
        .collect();
    ensure!(
        types.contains(&"type.googleapis.com/envoy.admin.v3.BootstrapConfigDump"),
        "{types:?}"
    );
    let static_listener = &dump["configs"][2]["static_listeners"][0]["listener"];
    ensure!(static_listener["name"] == "main", "{dump}");

    let (code, info) = admin_get(legate.admin, "/server_info").await?;
    let info: serde_json::Value = serde_json::from_str(&info)?;
    ensure!(code == 200 && info["state"] == "LIVE", "{info}");
    Ok(())
}

/// One worker runs Legate on a single-threaded runtime, several on a multi-threaded one; both
/// serve the same. Here two workers, HTTP/1.1 and HTTP/2 clients at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_workers_serve_http1_and_http2_alike() -> Result<()> {
    let up = Upstream::plain("a").await?;
    let dir = TempDir::new("lifecycle-workers")?;
    let path = dir.path().join("bootstrap.yaml");
    std::fs::write(&path, bootstrap(up.addr.port(), ""))?;
    let legate = Proxy::start_with_workers(ProxyKind::Legate, &path, dir.path(), 2).await?;
    let addr = legate.listener("main")?;
    let mut calls = Vec::new();
    for i in 0..40 {
        let transport = if i % 2 == 0 {
            Transport::H1
        } else {
            Transport::H2c
        };
        calls.push(tokio::spawn(async move {
            send(addr, &transport, &Request::get("example.com", "/")).await
        }));
    }
    for call in calls {
        let r = call.await??;
        ensure!(r.status == 200, "{}", r.status);
    }
    let (_, info) = admin_get(legate.admin, "/server_info").await?;
    let info: serde_json::Value = serde_json::from_str(&info)?;
    ensure!(info["command_line_options"]["concurrency"] == 2, "{info}");
    Ok(())
}

/// A connection whose TLS handshake fails is no longer counted as active.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_tls_handshakes_leave_no_active_connection() -> Result<()> {
    let up = Upstream::plain("a").await?;
    let dir = TempDir::new("lifecycle-tls-fail")?;
    legate_tests::certs::TestPki::generate(dir.path())?;
    // The one listener of `bootstrap`, with TLS.
    let tls = format!(
        "    - transport_socket:\n        name: envoy.transport_sockets.tls\n        typed_config:\n          '@type': type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext\n          common_tls_context:\n            tls_certificates:\n            - certificate_chain: {{filename: {0}/server.pem}}\n              private_key: {{filename: {0}/server.key}}\n      filters:",
        dir.path().display()
    );
    let yaml = bootstrap(up.addr.port(), "").replacen("    - filters:", &tls, 1);
    let legate = start_legate(&dir, &yaml).await?;
    let addr = legate.listener("main")?;
    for _ in 0..3 {
        let mut s = TcpStream::connect(addr).await?;
        // Not a ClientHello: the handshake fails and Legate closes the connection.
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await?;
        let mut sink = Vec::new();
        let _ = tokio::time::timeout(DEADLINE, s.read_to_end(&mut sink)).await;
    }
    let deadline = Instant::now() + DEADLINE;
    loop {
        let (_, stats) = admin_get(legate.admin, "/stats").await?;
        let total = stats.contains("http.ingress.downstream_cx_total: 3");
        if total && stats.contains("http.ingress.downstream_cx_active: 0") {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("connections still counted as active:\n{stats}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A WebSocket handshake and frames pass through untouched when the HCM enables upgrades.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_upgrade_is_passed_through() -> Result<()> {
    let upstream = TcpListener::bind("127.0.0.1:0").await?;
    let port = upstream.local_addr()?.port();
    let server = tokio::spawn(async move {
        let (mut s, _) = upstream.accept().await?;
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            s.read_exact(&mut b).await?;
            head.push(b[0]);
        }
        let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
        anyhow::ensure!(head.contains("upgrade: websocket"), "upstream saw {head}");
        s.write_all(b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n").await?;
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf).await?;
        s.write_all(&buf).await?;
        anyhow::Ok(())
    });
    let dir = TempDir::new("lifecycle-ws")?;
    let extra = "          upgrade_configs: [{upgrade_type: websocket}]";
    let legate = start_legate(&dir, &bootstrap(port, extra)).await?;
    let mut c = TcpStream::connect(legate.listener("main")?).await?;
    c.write_all(b"GET /ws HTTP/1.1\r\nhost: x\r\nconnection: upgrade\r\nupgrade: websocket\r\nsec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n").await?;
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        tokio::time::timeout(DEADLINE, c.read_exact(&mut b)).await??;
        head.push(b[0]);
    }
    let head = String::from_utf8_lossy(&head);
    ensure!(head.starts_with("HTTP/1.1 101"), "{head}");
    c.write_all(b"ping!").await?;
    let mut echoed = [0u8; 5];
    tokio::time::timeout(DEADLINE, c.read_exact(&mut echoed)).await??;
    ensure!(&echoed == b"ping!");
    server.await??;
    Ok(())
}

fn rss_kb(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("VmRSS")
}

/// A client that stops reading a large response must not make Legate buffer it: memory stays
/// flat while the upstream is stalled by flow control.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_reader_does_not_make_legate_buffer_the_body() -> Result<()> {
    let up = Upstream::plain("a").await?;
    let dir = TempDir::new("lifecycle-backpressure")?;
    let legate = start_legate(&dir, &bootstrap(up.addr.port(), "")).await?;
    let before = rss_kb(legate.pid())?;
    let mut c = TcpStream::connect(legate.listener("main")?).await?;
    c.write_all(b"GET /big HTTP/1.1\r\nhost: x\r\nx-echo-body-size: 16000000\r\n\r\n")
        .await?;
    // Read only the first bytes, then stall while the upstream tries to push 16 MB.
    let mut first = [0u8; 1024];
    let n = tokio::time::timeout(DEADLINE, c.read(&mut first)).await??;
    ensure!(
        n > 0 && first.starts_with(b"HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&first[..n])
    );
    let mut peak = before;
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        peak = peak.max(rss_kb(legate.pid())?);
    }
    ensure!(
        peak < before + 8 * 1024,
        "RSS grew from {before} kB to {peak} kB while the client was not reading"
    );
    // Then the whole body still arrives.
    let mut total = n;
    let mut buf = vec![0u8; 64 * 1024];
    let deadline = Instant::now() + DEADLINE;
    while total < 16_000_000 && Instant::now() < deadline {
        let m = tokio::time::timeout(DEADLINE, c.read(&mut buf)).await??;
        if m == 0 {
            break;
        }
        total += m;
    }
    ensure!(total > 16_000_000, "read {total} bytes");
    Ok(())
}

/// SIGTERM: the in-flight request finishes, new connections are refused, the process exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_requests_then_exits() -> Result<()> {
    let up = Upstream::plain("a").await?;
    let dir = TempDir::new("lifecycle-sigterm")?;
    let mut legate = start_legate(&dir, &bootstrap(up.addr.port(), "")).await?;
    let addr = legate.listener("main")?;
    let mut slow = Request::get("example.com", "/slow");
    slow.headers.push(("x-echo-delay-ms".into(), "700".into()));
    let in_flight = tokio::spawn(async move { send(addr, &Transport::H1, &slow).await });
    // Wait until the request is at the upstream, then signal.
    let deadline = Instant::now() + DEADLINE;
    while up.requests() == 0 {
        ensure!(
            Instant::now() < deadline,
            "request never reached the upstream"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let status = std::process::Command::new("kill")
        .args(["-TERM", &legate.pid().to_string()])
        .status()?;
    ensure!(status.success());
    let resp = in_flight.await??;
    ensure!(resp.status == 200, "in-flight request got {}", resp.status);
    ensure!(
        resp.header("connection").as_deref() == Some("close"),
        "{:?}",
        resp.headers
    );
    let exit = legate.wait_exit(DEADLINE).await?;
    ensure!(exit.success(), "legate exited with {exit}");
    ensure!(
        TcpStream::connect(addr).await.is_err(),
        "the listener still accepts"
    );
    Ok(())
}

/// `POST /healthcheck/fail` makes the health_check filter answer 503; `/healthcheck/ok` undoes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_healthcheck_fail_and_ok_drive_the_health_check_filter() -> Result<()> {
    let up = Upstream::plain("a").await?;
    let dir = TempDir::new("lifecycle-healthcheck")?;
    let yaml = bootstrap(up.addr.port(), "").replace(
        "          http_filters:\n",
        "          http_filters:\n          - name: envoy.filters.http.health_check\n            typed_config:\n              '@type': type.googleapis.com/envoy.extensions.filters.http.health_check.v3.HealthCheck\n              pass_through_mode: false\n              headers: [{name: ':path', string_match: {exact: /healthz}}]\n",
    );
    let legate = start_legate(&dir, &yaml).await?;
    let addr = legate.listener("main")?;
    let check = Request::get("example.com", "/healthz");
    let mut fail = Request::get("localhost", "/healthcheck/fail");
    fail.method = "POST".into();
    let mut ok = Request::get("localhost", "/healthcheck/ok");
    ok.method = "POST".into();
    let h1 = Transport::H1;
    ensure!(
        send(addr, &h1, &check).await?.status == 200,
        "{}",
        legate.output()
    );
    ensure!(send(legate.admin, &h1, &fail).await?.status == 200);
    ensure!(
        send(addr, &h1, &check).await?.status == 503,
        "after /healthcheck/fail"
    );
    ensure!(send(legate.admin, &h1, &ok).await?.status == 200);
    ensure!(
        send(addr, &h1, &check).await?.status == 200,
        "after /healthcheck/ok"
    );
    ensure!(up.requests() == 0, "health checks were answered locally");
    Ok(())
}
