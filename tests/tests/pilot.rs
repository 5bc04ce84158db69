//! `legate-pilot` driving real Envoy 1.40 and Legate over ADS (state of the world and Delta).
//!
//! The pilot watches a temp directory holding a Service and its EndpointSlice, which points at
//! a Rust echo upstream. Envoy starts from a bootstrap that knows nothing but the pilot's
//! address, identifies itself as a sidecar, and must route `Host: echo.default.svc...` to the
//! echo upstream through the outbound listener the pilot gives it. Editing the EndpointSlice
//! must move traffic to a second upstream; a malformed manifest must change nothing; the
//! pilot's `/debug/syncz` must show the proxy in sync and `/metrics` count pushes, no NACKs.
//! A gateway serves Ingress rules over HTTP, and over HTTPS with the certificate of the
//! Ingress's TLS Secret, delivered over SDS and rotated by editing the Secret.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use legate_tests::bins::{workspace_root, ProxyKind};
use legate_tests::certs::{SharedPki, TestPki};
use legate_tests::client::{admin_get, send, ClientCert, Request, Transport};
use legate_tests::mesh::{self, answered_by};
use legate_tests::process::{ProcessGuard, TempDir};
use legate_tests::proxy::{parse_listeners, Proxy};
use legate_tests::upstream::{Echo, Upstream};

/// How long any one convergence may take (the pilot polls files every 200 ms and debounces).
const DEADLINE: Duration = Duration::from_secs(10);

const POLL: Duration = Duration::from_millis(50);

const NODE_ID: &str = "sidecar~127.0.0.1~app.default~default.svc.cluster.local";

/// `legate-pilot`: `$LEGATE_PILOT_BIN`, else `<target>/debug/legate-pilot` (built by
/// `cargo test --workspace`, as the control-plane crate has integration tests).
fn pilot_bin() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("LEGATE_PILOT_BIN") {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(anyhow!("LEGATE_PILOT_BIN={} does not exist", p.display()))
        };
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map(|t| {
            if t.is_absolute() {
                t
            } else {
                workspace_root().join(t)
            }
        })
        .unwrap_or_else(|| workspace_root().join("target"));
    let path = target.join("debug/legate-pilot");
    if path.is_file() {
        Ok(path)
    } else {
        bail!(
            "legate-pilot not found at {}: build it with `cargo build -p legate-control-plane` \
             (same CARGO_TARGET_DIR) or set LEGATE_PILOT_BIN",
            path.display()
        )
    }
}

/// Polls `f` until it returns `Ok(Some(_))`, or fails with the last error after `DEADLINE`.
async fn eventually<T, F, Fut>(what: &str, f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>>>,
{
    legate_tests::wait::eventually_within(what, DEADLINE, POLL, f).await
}

/// A running pilot; killed when dropped.
struct Pilot {
    guard: ProcessGuard,
    xds: SocketAddr,
    admin: SocketAddr,
}

impl Pilot {
    async fn start(dir: &Path, config_dir: &Path) -> Result<Self> {
        let xds_file = dir.join("pilot.xds");
        let admin_file = dir.join("pilot.admin");
        let args: Vec<String> = vec![
            "--config-dir".into(),
            config_dir.display().to_string(),
            "--xds-address".into(),
            "127.0.0.1:0".into(),
            "--xds-address-path".into(),
            xds_file.display().to_string(),
            "--admin-address".into(),
            "127.0.0.1:0".into(),
            "--admin-address-path".into(),
            admin_file.display().to_string(),
            "--debounce-ms".into(),
            "50".into(),
        ];
        let mut guard = ProcessGuard::spawn("legate-pilot", &pilot_bin()?, &args, dir)?;
        let read_addr = |path: &Path| -> Option<SocketAddr> {
            std::fs::read_to_string(path).ok()?.trim().parse().ok()
        };
        let deadline = Instant::now() + DEADLINE;
        let (xds, admin) = loop {
            if let Some(status) = guard.exited() {
                bail!("legate-pilot exited with {status}\n{}", guard.output());
            }
            if let (Some(x), Some(a)) = (read_addr(&xds_file), read_addr(&admin_file)) {
                break (x, a);
            }
            if Instant::now() > deadline {
                bail!("legate-pilot wrote no addresses\n{}", guard.output());
            }
            tokio::time::sleep(POLL).await;
        };
        let pilot = Self { guard, xds, admin };
        eventually("pilot /ready", || async {
            Ok((admin_get(pilot.admin, "/ready").await?.0 == 200).then_some(()))
        })
        .await
        .with_context(|| pilot.guard.output())?;
        Ok(pilot)
    }

    async fn get(&self, path: &str) -> Result<String> {
        let (status, body) = admin_get(self.admin, path).await?;
        if status != 200 {
            bail!("pilot GET {path}: {status} {body}");
        }
        Ok(body)
    }

    /// The value of a Prometheus sample (`name{labels}` exactly as rendered).
    async fn metric(&self, sample: &str) -> Result<f64> {
        let text = self.get("/metrics").await?;
        text.lines()
            .find_map(|l| {
                l.strip_prefix(sample)?
                    .strip_prefix(' ')?
                    .trim()
                    .parse()
                    .ok()
            })
            .ok_or_else(|| anyhow!("no sample {sample} in\n{text}"))
    }
}

fn manifests(endpoint_port: u16) -> String {
    format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: echo, namespace: default}}
spec:
  clusterIP: 10.96.0.10
  ports:
  - {{name: http, port: 80, targetPort: {endpoint_port}}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: echo-1
  namespace: default
  labels: {{kubernetes.io/service-name: echo}}
addressType: IPv4
ports: [{{name: http, port: {endpoint_port}, protocol: TCP}}]
endpoints:
- addresses: [127.0.0.1]
  conditions: {{ready: true}}
  zone: zone-a
"#
    )
}

/// Replaces `path` atomically, as `kubectl`-driven tooling and editors do.
fn write_manifest(path: &Path, text: &str) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// `api_type` is `GRPC` (state of the world) or `DELTA_GRPC`.
fn bootstrap(xds: SocketAddr, api_type: &str) -> String {
    bootstrap_for(
        xds,
        api_type,
        NODE_ID,
        r#"LEGATE_OUTBOUND_PORT: "0", LEGATE_INBOUND_PORT: "0""#,
    )
}

/// A bootstrap for node `id` with `metadata` (flow-style YAML fields), which sets the ports
/// of the listeners the pilot gives it to 0 (ephemeral).
fn bootstrap_for(xds: SocketAddr, api_type: &str, id: &str, metadata: &str) -> String {
    mesh::ads_bootstrap(xds, api_type, id, metadata)
}

async fn wait_for_upstream(proxy: SocketAddr, host: &str, want: &str) -> Result<()> {
    mesh::wait_for_upstream(proxy, host, want, DEADLINE).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_follows_the_pilot_sotw() -> Result<()> {
    follows_the_pilot(ProxyKind::Envoy, "GRPC").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_follows_the_pilot_delta() -> Result<()> {
    follows_the_pilot(ProxyKind::Envoy, "DELTA_GRPC").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legate_follows_the_pilot_sotw() -> Result<()> {
    follows_the_pilot(ProxyKind::Legate, "GRPC").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legate_follows_the_pilot_delta() -> Result<()> {
    follows_the_pilot(ProxyKind::Legate, "DELTA_GRPC").await
}

/// A sidecar (`kind`) driven by the pilot routes to the services of the mesh and follows
/// every edit of the manifests.
async fn follows_the_pilot(kind: ProxyKind, api_type: &str) -> Result<()> {
    let dir = TempDir::new("pilot")?;
    let mesh = dir.path().join("mesh");
    std::fs::create_dir_all(&mesh)?;
    let a = Upstream::plain("a").await?;
    let b = Upstream::plain("b").await?;
    let echo_yaml = mesh.join("echo.yaml");
    write_manifest(&echo_yaml, &manifests(a.addr.port()))?;

    let pilot = Pilot::start(dir.path(), &mesh).await?;
    let bootstrap_path = dir.path().join("sidecar.yaml");
    std::fs::write(&bootstrap_path, bootstrap(pilot.xds, api_type))?;
    let envoy = Proxy::start(kind, &bootstrap_path, dir.path())
        .await
        .with_context(|| pilot.guard.output())?;

    // The outbound listener comes from LDS, on an ephemeral port (LEGATE_OUTBOUND_PORT=0).
    let outbound = eventually("Envoy's virtualOutbound listener", || async {
        let (_, body) = admin_get(envoy.admin, "/listeners?format=json").await?;
        Ok(parse_listeners(&body)?.get("virtualOutbound").copied())
    })
    .await?;

    // Every name of the service reaches the echo upstream.
    wait_for_upstream(outbound, "echo.default.svc.cluster.local", "a").await?;
    for host in [
        "echo",
        "echo:80",
        "echo.default",
        "echo.default.svc",
        "echo.default.svc.cluster.local:80",
        "10.96.0.10",
    ] {
        assert_eq!(
            answered_by(outbound, host).await?.as_deref(),
            Some("a"),
            "{host}"
        );
    }
    // This sidecar's IP (127.0.0.1) backs the echo service: its inbound listener forwards
    // to the workload's port.
    let inbound = eventually("Envoy's virtualInbound listener", || async {
        let (_, body) = admin_get(envoy.admin, "/listeners?format=json").await?;
        Ok(parse_listeners(&body)?.get("virtualInbound").copied())
    })
    .await?;
    wait_for_upstream(inbound, "echo", "a").await?;
    let unknown = send(outbound, &Transport::H1, &Request::get("nope.default", "/")).await?;
    assert_eq!(
        unknown.status, 404,
        "no virtual host for an unknown service"
    );

    // Convergence: the EndpointSlice now points at b.
    write_manifest(&echo_yaml, &manifests(b.addr.port()))?;
    let edited = Instant::now();
    wait_for_upstream(outbound, "echo.default.svc.cluster.local", "b").await?;
    eprintln!(
        "{kind} {api_type}: traffic moved to the new endpoint {:?} after the edit",
        edited.elapsed()
    );
    wait_for_upstream(inbound, "echo.default", "b").await?;
    let before = b.requests();
    for _ in 0..5 {
        assert_eq!(answered_by(outbound, "echo").await?.as_deref(), Some("b"));
    }
    assert_eq!(b.requests(), before + 5);

    // A new service is routed; removing its file removes its routes (and, over Delta, its
    // cluster through removed_resources).
    let other = manifests(a.addr.port())
        .replace("name: echo", "name: other")
        .replace("echo-1", "other-1")
        .replace("service-name: echo", "service-name: other")
        .replace("10.96.0.10", "10.96.0.11");
    write_manifest(&mesh.join("other.yaml"), &other)?;
    wait_for_upstream(outbound, "other.default", "a").await?;
    std::fs::remove_file(mesh.join("other.yaml"))?;
    eventually("other removed", || async {
        let r = send(
            outbound,
            &Transport::H1,
            &Request::get("other.default", "/"),
        )
        .await?;
        Ok((r.status == 404).then_some(()))
    })
    .await?;
    let (_, clusters) = admin_get(envoy.admin, "/clusters").await?;
    eventually("Envoy dropped the other cluster", || async {
        let (_, clusters) = admin_get(envoy.admin, "/clusters").await?;
        Ok((!clusters.contains("other.default.svc")).then_some(()))
    })
    .await
    .with_context(|| clusters)?;

    // A malformed manifest is reported and changes nothing.
    std::fs::write(
        mesh.join("broken.yaml"),
        "kind: Service\nmetadata: {name: [\n",
    )?;
    eventually("the bad manifest counted", || async {
        Ok((pilot.metric("pilot_config_errors_total").await? >= 1.0).then_some(()))
    })
    .await?;
    assert_eq!(answered_by(outbound, "echo").await?.as_deref(), Some("b"));

    // The pilot sees the proxy in sync with every type ACKed at the latest version.
    let syncz = eventually("the proxy in sync in /debug/syncz", || async {
        let body = pilot.get("/debug/syncz").await?;
        let proxies: serde_json::Value = serde_json::from_str(&body)?;
        let proxy = proxies
            .as_array()
            .and_then(|a| a.iter().find(|p| p["node_id"] == NODE_ID))
            .cloned();
        Ok(proxy.filter(|p| p["in_sync"] == true))
    })
    .await?;
    for t in ["cds", "eds", "lds", "rds"] {
        let status = &syncz["types"][t];
        assert_eq!(
            status["acked_version"], status["latest_version"],
            "{t}: {syncz}"
        );
        assert!(status["nack"].is_null(), "{t}: {syncz}");
    }

    // /config_dump shows each dynamic resource with its version and update time.
    let (_, dump) = admin_get(envoy.admin, "/config_dump").await?;
    let dump: serde_json::Value = serde_json::from_str(&dump)?;
    let configs = dump["configs"].as_array().cloned().unwrap_or_default();
    let of = |t: &str| {
        configs
            .iter()
            .find(|c| c["@type"] == format!("type.googleapis.com/envoy.admin.v3.{t}"))
            .cloned()
            .unwrap_or_default()
    };
    let cds = of("ClustersConfigDump");
    let echo = cds["dynamic_active_clusters"]
        .as_array()
        .and_then(|cs| {
            cs.iter()
                .find(|c| c["cluster"]["name"] == "outbound|80||echo.default.svc.cluster.local")
        })
        .cloned()
        .with_context(|| format!("{kind}: no dynamic echo cluster in {cds}"))?;
    assert!(
        echo["version_info"].as_str().is_some_and(|v| !v.is_empty()),
        "{echo}"
    );
    assert!(echo["last_updated"].is_string(), "{echo}");
    let lds = of("ListenersConfigDump");
    let outbound_dump = lds["dynamic_listeners"]
        .as_array()
        .and_then(|ls| ls.iter().find(|l| l["name"] == "virtualOutbound"))
        .cloned()
        .with_context(|| format!("{kind}: no virtualOutbound in {lds}"))?;
    assert!(
        outbound_dump["active_state"]["version_info"].is_string(),
        "{outbound_dump}"
    );
    let rds = of("RoutesConfigDump");
    assert!(
        rds["dynamic_route_configs"]
            .as_array()
            .is_some_and(|r| !r.is_empty()),
        "{kind}: {rds}"
    );

    // Pushes are counted; the proxy never NACKed.
    assert!(pilot.metric("pilot_xds_pushes_total{type=\"eds\"}").await? >= 2.0);
    assert_eq!(pilot.metric("pilot_xds_connected_proxies").await?, 1.0);
    for t in ["cds", "eds", "lds", "rds"] {
        let sample = format!("pilot_xds_nacks_total{{type=\"{t}\"}}");
        assert_eq!(pilot.metric(&sample).await?, 0.0, "{sample}");
    }
    drop(envoy);
    Ok(())
}

const GATEWAY_ID: &str = "router~127.0.0.1~gateway.default~default.svc.cluster.local";

/// The Ingress: `/api` on shop.example.com, HTTPS for it with the `shop-tls` Secret, and a
/// TLS entry whose Secret does not exist (left out, counted as a config error).
fn ingress(default_backend: bool) -> String {
    let default = if default_backend {
        "  defaultBackend: {service: {name: echo, port: {number: 80}}}\n"
    } else {
        ""
    };
    format!(
        r#"apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {{name: shop, namespace: default}}
spec:
{default}  tls:
  - hosts: [shop.example.com]
    secretName: shop-tls
  - hosts: [missing.example.com]
    secretName: no-such-secret
  rules:
  - host: shop.example.com
    http:
      paths:
      - path: /api
        pathType: Prefix
        backend: {{service: {{name: echo, port: {{name: http}}}}}}
"#
    )
}

/// Standard base64 (RFC 4648, padded), for Secret `data`.
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for (i, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> shift) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The `kubernetes.io/tls` Secret `shop-tls` holding `pki`'s server certificate and key.
fn tls_secret(pki: &TestPki) -> Result<String> {
    let cert = std::fs::read(pki.dir.join("server.pem"))?;
    let key = std::fs::read(pki.dir.join("server.key"))?;
    Ok(format!(
        r#"apiVersion: v1
kind: Secret
metadata: {{name: shop-tls, namespace: default}}
type: kubernetes.io/tls
data:
  tls.crt: {}
  tls.key: {}
"#,
        base64(&cert),
        base64(&key)
    ))
}

/// HTTPS to `addr` with SNI `sni`, trusting only `pki`'s CA.
fn https(pki: &SharedPki, sni: &str) -> Transport {
    Transport::Tls {
        pki: pki.clone(),
        sni: sni.into(),
        alpn: vec![],
        client_cert: ClientCert::None,
    }
}

async fn status_of(proxy: SocketAddr, host: &str, path: &str) -> Result<u16> {
    Ok(send(proxy, &Transport::H1, &Request::get(host, path))
        .await?
        .status)
}

/// A gateway Envoy (`router` role) serves the Ingress rules, and follows their edits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_envoy_serves_ingress_rules() -> Result<()> {
    gateway_serves_ingress_rules(ProxyKind::Envoy, "GRPC").await
}

/// The same with Legate as the gateway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_legate_serves_ingress_rules() -> Result<()> {
    gateway_serves_ingress_rules(ProxyKind::Legate, "GRPC").await
}

/// The gateway over Delta xDS (SDS included), Envoy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_envoy_serves_ingress_rules_delta() -> Result<()> {
    gateway_serves_ingress_rules(ProxyKind::Envoy, "DELTA_GRPC").await
}

/// The gateway over Delta xDS (SDS included), Legate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_legate_serves_ingress_rules_delta() -> Result<()> {
    gateway_serves_ingress_rules(ProxyKind::Legate, "DELTA_GRPC").await
}

async fn gateway_serves_ingress_rules(kind: ProxyKind, api_type: &str) -> Result<()> {
    let dir = TempDir::new("pilot-gw")?;
    let mesh = dir.path().join("mesh");
    std::fs::create_dir_all(&mesh)?;
    let pki = TestPki::generate(&dir.path().join("pki"))?;
    let rotated = TestPki::generate(&dir.path().join("pki-rotated"))?;
    let a = Upstream::plain("a").await?;
    write_manifest(&mesh.join("echo.yaml"), &manifests(a.addr.port()))?;
    let ingress_yaml = mesh.join("ingress.yaml");
    write_manifest(&ingress_yaml, &ingress(false))?;
    let secret_yaml = mesh.join("shop-tls.yaml");
    write_manifest(&secret_yaml, &tls_secret(&pki)?)?;

    let pilot = Pilot::start(dir.path(), &mesh).await?;
    let bootstrap_path = dir.path().join("gateway.yaml");
    std::fs::write(
        &bootstrap_path,
        bootstrap_for(
            pilot.xds,
            api_type,
            GATEWAY_ID,
            r#"LEGATE_GATEWAY_HTTP_PORT: "0", LEGATE_GATEWAY_HTTPS_PORT: "0""#,
        ),
    )?;
    let envoy = Proxy::start(kind, &bootstrap_path, dir.path())
        .await
        .with_context(|| pilot.guard.output())?;
    let (http, tls) = eventually("the gateway's HTTP and HTTPS listeners", || async {
        let (_, body) = admin_get(envoy.admin, "/listeners?format=json").await?;
        let listeners = parse_listeners(&body)?;
        Ok(listeners
            .get("127.0.0.1_0")
            .copied()
            .zip(listeners.get("127.0.0.1_0_https").copied()))
    })
    .await
    .with_context(|| envoy.output())?;

    eventually("/api/items routed to the echo service", || async {
        let r = send(
            http,
            &Transport::H1,
            &Request::get("shop.example.com:8080", "/api/items"),
        )
        .await?;
        Ok((r.status == 200).then_some(r))
    })
    .await?;
    assert_eq!(status_of(http, "shop.example.com", "/api").await?, 200);
    assert_eq!(
        status_of(http, "shop.example.com", "/").await?,
        404,
        "no rule for /"
    );
    assert_eq!(
        status_of(http, "shop.example.com", "/apix").await?,
        404,
        "Prefix matches whole segments"
    );
    assert_eq!(
        status_of(http, "other.example.com", "/api").await?,
        404,
        "unknown host"
    );

    // HTTPS for shop.example.com, with the certificate of the Secret (SDS). The listener may
    // be up before its secret arrives, so the first handshakes may fail.
    let shop = Request::get("shop.example.com", "/api/items");
    let answered = eventually("HTTPS for shop.example.com", || async {
        Ok(send(tls, &https(&pki, "shop.example.com"), &shop)
            .await
            .ok()
            .filter(|r| r.status == 200))
    })
    .await
    .with_context(|| envoy.output())?;
    let echo: Echo = serde_json::from_slice(&answered.body)?;
    assert_eq!(echo.upstream, "a");
    assert!(
        send(tls, &https(&pki, "unknown.test"), &shop)
            .await
            .is_err(),
        "no filter chain (and no certificate) for an SNI no TLS entry names"
    );
    assert!(
        send(tls, &https(&pki, "missing.example.com"), &shop)
            .await
            .is_err(),
        "the entry whose Secret does not exist is left out"
    );
    eventually("the missing secret counted as a config error", || async {
        Ok((pilot.metric("pilot_config_errors_total").await? >= 1.0).then_some(()))
    })
    .await?;

    // Rotation: the Secret now holds a certificate from another CA; new handshakes get it.
    write_manifest(&secret_yaml, &tls_secret(&rotated)?)?;
    let edited = Instant::now();
    eventually("the rotated certificate served", || async {
        Ok(send(tls, &https(&rotated, "shop.example.com"), &shop)
            .await
            .ok()
            .filter(|r| r.status == 200))
    })
    .await?;
    eprintln!(
        "{kind} {api_type}: new handshakes got the rotated certificate {:?} after the edit",
        edited.elapsed()
    );
    assert!(
        send(tls, &https(&pki, "shop.example.com"), &shop)
            .await
            .is_err(),
        "the old certificate is no longer presented"
    );

    // Adding a default backend serves every other request.
    write_manifest(&ingress_yaml, &ingress(true))?;
    eventually("the default backend serves unknown hosts", || async {
        Ok(answered_by(http, "other.example.com")
            .await?
            .filter(|u| u == "a"))
    })
    .await?;
    assert_eq!(
        answered_by(http, "shop.example.com").await?.as_deref(),
        Some("a")
    );
    let root = send(
        tls,
        &https(&rotated, "shop.example.com"),
        &Request::get("shop.example.com", "/"),
    )
    .await?;
    assert_eq!(root.status, 200, "HTTPS routes follow the edit too");

    // The secret is in the proxy's config dump by name, never its key.
    let (_, dump) = admin_get(envoy.admin, "/config_dump").await?;
    assert!(
        dump.contains("kubernetes://default/shop-tls"),
        "{kind}: {dump}"
    );
    assert!(
        !dump.contains("PRIVATE KEY"),
        "{kind}: a key in /config_dump"
    );

    // In sync for every type, SDS included; no NACK.
    let syncz = eventually("the gateway in sync in /debug/syncz", || async {
        let body = pilot.get("/debug/syncz").await?;
        let proxies: serde_json::Value = serde_json::from_str(&body)?;
        let proxy = proxies
            .as_array()
            .and_then(|a| a.iter().find(|p| p["node_id"] == GATEWAY_ID))
            .cloned();
        Ok(proxy.filter(|p| p["in_sync"] == true))
    })
    .await?;
    for t in ["cds", "eds", "lds", "rds", "sds"] {
        let status = &syncz["types"][t];
        assert_eq!(status["subscribed"], true, "{t}: {syncz}");
        assert_eq!(
            status["acked_version"], status["latest_version"],
            "{t}: {syncz}"
        );
        assert!(status["nack"].is_null(), "{t}: {syncz}");
        let sample = format!("pilot_xds_nacks_total{{type=\"{t}\"}}");
        assert_eq!(pilot.metric(&sample).await?, 0.0, "{sample}");
    }
    assert!(pilot.metric("pilot_xds_pushes_total{type=\"sds\"}").await? >= 2.0);
    Ok(())
}

mod scripted {
    //! A scripted ADS client: what Envoy does not do on demand (NACK, a bad identity).

    use super::*;
    use legate_proto::pb::envoy::config::cluster::v3::Cluster;
    use legate_proto::pb::envoy::config::core::v3::Node;
    use legate_proto::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
    use legate_proto::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
    use legate_proto::pb::google::rpc::Status;
    use prost::Message;
    use tokio::sync::mpsc;
    use tokio_stream::wrappers::ReceiverStream;
    use tonic::Streaming;

    const CDS: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";

    async fn next(responses: &mut Streaming<DiscoveryResponse>) -> Result<DiscoveryResponse> {
        tokio::time::timeout(DEADLINE, responses.message())
            .await
            .context("no response before the deadline")??
            .context("stream closed")
    }

    fn cluster_names(r: &DiscoveryResponse) -> Result<Vec<String>> {
        r.resources
            .iter()
            .map(|a| Ok(Cluster::decode(a.value.as_slice())?.name))
            .collect()
    }

    async fn open(
        pilot: &Pilot,
        first: DiscoveryRequest,
    ) -> Result<(mpsc::Sender<DiscoveryRequest>, Streaming<DiscoveryResponse>)> {
        let mut client =
            AggregatedDiscoveryServiceClient::connect(format!("http://{}", pilot.xds)).await?;
        let (tx, rx) = mpsc::channel(8);
        tx.send(first).await?;
        let responses = client
            .stream_aggregated_resources(ReceiverStream::new(rx))
            .await?
            .into_inner();
        Ok((tx, responses))
    }

    /// A NACK is counted and shown with its detail; the pilot keeps serving, and the next
    /// change is pushed and ACKed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn nacks_are_tracked_and_the_next_change_is_pushed() -> Result<()> {
        let dir = TempDir::new("pilot-nack")?;
        let mesh = dir.path().join("mesh");
        std::fs::create_dir_all(&mesh)?;
        let echo_yaml = mesh.join("echo.yaml");
        write_manifest(&echo_yaml, &manifests(9))?;
        // The client's pod: /debug/syncz names it and shows its labels.
        write_manifest(
            &mesh.join("client-pod.yaml"),
            "apiVersion: v1\nkind: Pod\nmetadata: {name: client-1, namespace: default, labels: {app: client}}\nstatus: {podIP: 127.0.0.9, phase: Running, conditions: [{type: Ready, status: \"True\"}]}\n",
        )?;
        let pilot = Pilot::start(dir.path(), &mesh).await?;

        // Not an endpoint of echo, so it has no inbound cluster.
        let node = Node {
            id: "sidecar~127.0.0.9~client.default~default.svc.cluster.local".into(),
            ..Default::default()
        };
        let (tx, mut responses) = open(
            &pilot,
            DiscoveryRequest {
                node: Some(node),
                type_url: CDS.into(),
                ..Default::default()
            },
        )
        .await?;
        let first = next(&mut responses).await?;
        assert_eq!(
            cluster_names(&first)?,
            ["outbound|80||echo.default.svc.cluster.local"]
        );
        tx.send(DiscoveryRequest {
            type_url: CDS.into(),
            response_nonce: first.nonce.clone(),
            error_detail: Some(Status {
                code: 13,
                message: "scripted rejection of outbound|80||echo".into(),
                details: vec![],
            }),
            ..Default::default()
        })
        .await?;
        eventually("the NACK counted", || async {
            Ok((pilot.metric("pilot_xds_nacks_total{type=\"cds\"}").await? == 1.0).then_some(()))
        })
        .await?;
        let syncz: serde_json::Value = serde_json::from_str(&pilot.get("/debug/syncz").await?)?;
        let cds = &syncz[0]["types"]["cds"];
        assert_eq!(
            cds["nack"], "scripted rejection of outbound|80||echo",
            "{syncz}"
        );
        assert_eq!(cds["in_sync"], false, "{syncz}");
        assert_eq!(syncz[0]["pod"], "default/client-1", "{syncz}");
        assert_eq!(syncz[0]["labels"]["app"], "client", "{syncz}");

        // A new port changes CDS: pushed despite the earlier NACK, then ACKed.
        write_manifest(
            &echo_yaml,
            &manifests(9).replace(
                "  - {name: http, port: 80",
                "  - {name: grpc, port: 90}\n  - {name: http, port: 80",
            ),
        )?;
        let second = next(&mut responses).await?;
        assert_ne!(second.version_info, first.version_info);
        assert_eq!(cluster_names(&second)?.len(), 2);
        tx.send(DiscoveryRequest {
            type_url: CDS.into(),
            version_info: second.version_info.clone(),
            response_nonce: second.nonce.clone(),
            ..Default::default()
        })
        .await?;
        eventually("in sync after the ACK", || async {
            let syncz: serde_json::Value = serde_json::from_str(&pilot.get("/debug/syncz").await?)?;
            Ok((syncz[0]["in_sync"] == true).then_some(()))
        })
        .await?;
        Ok(())
    }

    /// A node.id that is not `TYPE~IP~NAME.NS~NS.svc.DOMAIN` is refused with INVALID_ARGUMENT.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_bad_identity_is_refused() -> Result<()> {
        let dir = TempDir::new("pilot-id")?;
        let mesh = dir.path().join("mesh");
        std::fs::create_dir_all(&mesh)?;
        let pilot = Pilot::start(dir.path(), &mesh).await?;
        let (_tx, mut responses) = open(
            &pilot,
            DiscoveryRequest {
                node: Some(Node {
                    id: "just-a-name".into(),
                    ..Default::default()
                }),
                type_url: CDS.into(),
                ..Default::default()
            },
        )
        .await?;
        let status = match tokio::time::timeout(DEADLINE, responses.message()).await? {
            Err(status) => status,
            Ok(other) => bail!("expected an error, got {other:?}"),
        };
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(
            status.message().contains("just-a-name"),
            "{}",
            status.message()
        );
        Ok(())
    }
}
