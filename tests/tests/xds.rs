//! xDS conformance: a proxy fed over ADS by the scriptable server in `legate_tests::xds`.
//!
//! Each scenario is `async fn scenario(kind, proto)`, run for state of the world and Delta by
//! one `xds_test!` line each (at the end); running it against Legate is one more line with
//! `Legate`. Each asserts both what the client told the server (ACK, NACK, subscriptions) and
//! what traffic through the proxy sees. Where Envoy's choice is its own (not the protocol's),
//! it is recorded in a comment and not asserted.
//!
//! Resources: clusters `c1`, `c2`, `c3` (EDS over ADS), listeners `l1`, `l2` on 127.0.0.1:0
//! (HCM with RDS over ADS) and route configurations `r1`, `r2`. Upstreams `a` and `b` are echo
//! servers that say which of them answered. [`server`] tests the ADS server itself.

mod server;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use legate_proto::pb::google::protobuf::Any;
use legate_tests::bins::ProxyKind;
use legate_tests::client::{admin_get, send, Request, Transport};
use legate_tests::process::TempDir;
use legate_tests::proxy::Proxy;
use legate_tests::upstream::{Echo, Upstream};
use legate_tests::xds::resources::{
    eds_cluster, http_filter, http_listener, http_listener_with, load_assignment, route_config,
    AdsBootstrap,
};
use legate_tests::xds::{Log, XdsProtocol, XdsServer, CDS, EDS, LDS, RDS};

/// How long any one change may take to show in traffic.
const DEADLINE: Duration = Duration::from_secs(10);

const POLL: Duration = Duration::from_millis(25);

/// Polls `f` until it returns `Ok(Some(_))`, or fails with the last error after `DEADLINE`.
async fn eventually<T, F, Fut>(what: &str, f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>>>,
{
    legate_tests::wait::eventually_within(what, DEADLINE, POLL, f).await
}

/// What a request for `path` through `listener` got: the status and, on a 200, which
/// upstream answered.
async fn fetch(listener: SocketAddr, path: &str) -> Result<(u16, Option<String>)> {
    let response = send(listener, &Transport::H1, &Request::get("example.com", path)).await?;
    if response.status != 200 {
        return Ok((response.status, None));
    }
    let echo: Echo = serde_json::from_slice(&response.body)
        .with_context(|| format!("echo body {:?}", String::from_utf8_lossy(&response.body)))?;
    Ok((200, Some(echo.upstream)))
}

/// Waits until `path` through `listener` is answered by upstream `want`.
async fn wait_upstream(listener: SocketAddr, path: &str, want: &str) -> Result<()> {
    eventually(&format!("{path} answered by {want}"), || async {
        Ok((fetch(listener, path).await?.1.as_deref() == Some(want)).then_some(()))
    })
    .await
}

/// Waits until `path` through `listener` answers `status`.
async fn wait_status(listener: SocketAddr, path: &str, status: u16) -> Result<()> {
    eventually(&format!("{path} answering {status}"), || async {
        Ok((fetch(listener, path).await?.0 == status).then_some(()))
    })
    .await
}

/// Asserts that `path` is answered by `want` now, `n` times in a row.
async fn assert_serves(listener: SocketAddr, path: &str, want: &str, n: usize) -> Result<()> {
    for _ in 0..n {
        let got = fetch(listener, path).await?;
        ensure!(
            got == (200, Some(want.to_string())),
            "{path}: wanted {want}, got {got:?}"
        );
    }
    Ok(())
}

/// An HTTP filter whose `typed_config` names a message type no proxy has registered.
fn unregistered_filter() -> Any {
    Any {
        type_url: "type.googleapis.com/legate.test.v1.NoSuchFilter".into(),
        value: Vec::new(),
    }
}

/// One scenario's world: the server, two upstreams, and the proxy once started.
struct World {
    kind: ProxyKind,
    proto: XdsProtocol,
    dir: TempDir,
    server: XdsServer,
    a: Upstream,
    b: Upstream,
}

impl World {
    async fn new(kind: ProxyKind, proto: XdsProtocol) -> Result<Self> {
        Ok(Self {
            kind,
            proto,
            dir: TempDir::new(&format!("xds-{proto}"))?,
            server: XdsServer::start().await?,
            a: Upstream::plain("a").await?,
            b: Upstream::plain("b").await?,
        })
    }

    /// Version 1 of everything: `l1` → `r1` (`/` → `c1`) → upstream `a`.
    fn push_initial(&self) -> Result<()> {
        self.server.set_typed("1", &[eds_cluster("c1")])?;
        self.server
            .set_typed("1", &[load_assignment("c1", &[self.a.addr])])?;
        self.server.set_typed("1", &[http_listener("l1", "r1")])?;
        self.server
            .set_typed("1", &[route_config("r1", &[("/", "c1")])])?;
        Ok(())
    }

    /// Starts the proxy from the ADS bootstrap; waits for its admin only. A removed or
    /// replaced listener drains for 1 s (not the default 10 minutes), after which what only it
    /// referenced (its route configuration) is released.
    async fn start_proxy(&self) -> Result<Proxy> {
        self.start_proxy_draining(1).await
    }

    /// Starts the proxy with `--drain-time-s drain_s`.
    async fn start_proxy_draining(&self, drain_s: u32) -> Result<Proxy> {
        let bootstrap = AdsBootstrap::new(self.server.addr(), self.proto).write(self.dir.path())?;
        let drain = drain_s.to_string();
        Proxy::start_dynamic(
            self.kind,
            &bootstrap,
            self.dir.path(),
            &["--drain-time-s", &drain],
        )
        .await
    }

    /// Starts the proxy and waits for listener `name`.
    async fn proxy_with(&self, name: &str) -> Result<(Proxy, SocketAddr)> {
        let proxy = self.start_proxy().await?;
        let addr = proxy
            .wait_listener(name, DEADLINE)
            .await
            .with_context(|| self.server.describe_log())?;
        Ok((proxy, addr))
    }
}

/// The requests of `type_url`, in order.
fn requests_of<'a>(
    log: &'a Log,
    type_url: &'a str,
) -> impl Iterator<Item = &'a legate_tests::xds::Request> + 'a {
    log.requests.iter().filter(move |r| r.type_url == type_url)
}

/// Whether the client wants `name` of this type in `r` (SotW: named; Delta: subscribed).
fn names(r: &legate_tests::xds::Request, name: &str) -> bool {
    r.resource_names.iter().any(|n| n == name) || r.subscribe.iter().any(|n| n == name)
}

// ---------------------------------------------------------------------------------------------
// Initial configuration

async fn initial_config(kind: ProxyKind, proto: XdsProtocol) -> Result<()> {
    let w = World::new(kind, proto).await?;
    w.push_initial()?;
    let (proxy, l1) = w.proxy_with("l1").await?;
    wait_upstream(l1, "/", "a").await?;
    // Initialized: ready once the first CDS and LDS (and what they need) are applied.
    eventually("GET /ready answers 200", || async {
        Ok((admin_get(proxy.admin, "/ready").await?.0 == 200).then_some(()))
    })
    .await?;

    for t in [CDS, EDS, LDS, RDS] {
        w.server.wait_for_ack(t, "1").await?;
    }
    // Every response is answered, each with an ACK of exactly its version and nonce.
    let log = w
        .server
        .wait_until("every response answered", DEADLINE, |log| {
            log.responses
                .iter()
                .all(|r| log.answer_to(r).is_some())
                .then(|| log.clone())
        })
        .await?;
    for resp in &log.responses {
        let ack = log.answer_to(resp).context("answered (checked above)")?;
        assert_eq!(ack.error, None, "{resp:?} NACKed: {ack:?}");
        if proto == XdsProtocol::Sotw {
            assert_eq!(
                ack.version_info, resp.version,
                "{resp:?} answered by {ack:?}"
            );
        }
    }
    // One stream; its first request carries the node.
    assert_eq!(w.server.streams(), 1, "{}", w.server.describe_log());
    let first = &log.requests[0];
    assert!(first.first_on_stream);
    assert_eq!(first.node_id.as_deref(), Some("test-node"), "{first:?}");
    // LDS and CDS are wildcard; EDS and RDS name what the cluster and the listener need.
    for t in [CDS, LDS] {
        let r = requests_of(&log, t).next().context("a request")?;
        let wildcard = match proto {
            XdsProtocol::Sotw => r.resource_names.is_empty() || r.resource_names == ["*"],
            XdsProtocol::Delta => r.subscribe.is_empty() || r.subscribe.iter().any(|n| n == "*"),
        };
        assert!(wildcard, "first {t} request is not wildcard: {r:?}");
        assert!(r.response_nonce.is_empty(), "{r:?}");
    }
    assert!(requests_of(&log, EDS).any(|r| names(r, "c1")), "EDS for c1");
    assert!(requests_of(&log, RDS).any(|r| names(r, "r1")), "RDS for r1");
    // Nothing was requested that does not exist.
    for r in &log.requests {
        for n in r.resource_names.iter().chain(&r.subscribe) {
            assert!(
                ["*", "c1", "r1"].contains(&n.as_str()),
                "asked for {n}: {r:?}"
            );
        }
    }
    assert_serves(l1, "/", "a", 3).await
}

// ---------------------------------------------------------------------------------------------
// NACK

async fn nack(kind: ProxyKind, proto: XdsProtocol) -> Result<()> {
    let w = World::new(kind, proto).await?;
    w.push_initial()?;
    let (proxy, l1) = w.proxy_with("l1").await?;
    wait_upstream(l1, "/", "a").await?;
    w.server.wait_for_ack(LDS, "1").await?;

    // A listener whose HCM names an HTTP filter with an unregistered typed_config.
    let bad = http_listener_with(
        "l1",
        "r1",
        vec![http_filter(
            "legate.test.no_such_filter",
            unregistered_filter(),
        )],
    );
    w.server.set_typed("2", &[bad])?;
    let message = w.server.wait_for_nack(LDS, "2").await?;
    assert!(
        message.contains("l1"),
        "the NACK names the listener: {message}"
    );
    let log = w.server.log();
    let nack = log.nack(LDS, "2").context("the NACK")?;
    if proto == XdsProtocol::Sotw {
        assert_eq!(
            nack.version_info, "1",
            "a NACK carries the last good version"
        );
    }
    // The previous listener keeps serving, on the same address.
    assert_serves(l1, "/", "a", 3).await?;
    assert_eq!(proxy.wait_listener("l1", DEADLINE).await?, l1);

    // The next good version is ACKed.
    w.server.set_typed("3", &[http_listener("l1", "r1")])?;
    w.server.wait_for_ack(LDS, "3").await?;
    assert_serves(l1, "/", "a", 1).await?;

    // Duplicate cluster names in one response (with the endpoints c2 would need, as a
    // control plane pushes them: Envoy answers a CDS update only once its clusters warmed).
    w.server.set_typed(
        "2",
        &[eds_cluster("c1"), eds_cluster("c2"), eds_cluster("c2")],
    )?;
    w.server.set_typed(
        "2",
        &[
            load_assignment("c1", &[w.a.addr]),
            load_assignment("c2", &[w.b.addr]),
        ],
    )?;
    let message = w.server.wait_for_nack(CDS, "2").await?;
    eprintln!("{kind}/{proto}: CDS NACK: {message}");
    assert!(
        message.contains("c2"),
        "the NACK names the cluster: {message}"
    );
    assert_serves(l1, "/", "a", 3).await?;
    // Whether the valid clusters of a NACKed update are applied is the client's choice, so it
    // is recorded, not asserted. Envoy 1.40 over SotW applies them ("Error adding/updating
    // cluster(s) c2: duplicate cluster c2 found", and c2 is in /clusters); over Delta its mux
    // rejects the whole response first ("duplicate name c2 found among added/updated
    // resources", c2 is not applied). gRPC (A46) applies the valid ones by design.
    if let Ok((200, clusters)) = admin_get(proxy.admin, "/clusters").await {
        eprintln!(
            "{kind}/{proto}: after the NACKed CDS update c2 {} in /clusters",
            if clusters.contains("c2::") {
                "is"
            } else {
                "is not"
            }
        );
    }

    // The next good version is ACKed and applied: c3 warms with its endpoints and serves.
    w.server
        .set_typed("3", &[eds_cluster("c1"), eds_cluster("c3")])?;
    w.server.set_typed(
        "3",
        &[
            load_assignment("c1", &[w.a.addr]),
            load_assignment("c3", &[w.b.addr]),
        ],
    )?;
    w.server.wait_for_ack(CDS, "3").await?;
    w.server
        .set_typed("2", &[route_config("r1", &[("/three", "c3"), ("/", "c1")])])?;
    wait_upstream(l1, "/three", "b").await?;
    assert_serves(l1, "/", "a", 1).await?;
    // Nothing after the NACKs was rejected.
    let log = w.server.log();
    for (t, v) in [(LDS, "3"), (CDS, "3"), (EDS, "3"), (RDS, "2")] {
        assert!(log.nack(t, v).is_none(), "{t} {v} NACKed");
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Changes: route, endpoints, cluster add/remove, listener add/remove

async fn changes(kind: ProxyKind, proto: XdsProtocol) -> Result<()> {
    let w = World::new(kind, proto).await?;
    w.push_initial()?;
    let (proxy, l1) = w.proxy_with("l1").await?;
    wait_upstream(l1, "/", "a").await?;
    let s = &w.server;

    // Route change: only /api is routed now.
    s.set_typed("2", &[route_config("r1", &[("/api", "c1")])])?;
    wait_status(l1, "/", 404).await?;
    assert_serves(l1, "/api", "a", 1).await?;
    s.wait_for_ack(RDS, "2").await?;

    // Endpoint change: c1 moves from a to b.
    s.set_typed("2", &[load_assignment("c1", &[w.b.addr])])?;
    wait_upstream(l1, "/api", "b").await?;
    assert_serves(l1, "/api", "b", 3).await?;
    s.wait_for_ack(EDS, "2").await?;

    // Cluster add: c2 on a, routed at /two.
    s.set_typed("2", &[eds_cluster("c1"), eds_cluster("c2")])?;
    s.set_typed(
        "3",
        &[
            load_assignment("c1", &[w.b.addr]),
            load_assignment("c2", &[w.a.addr]),
        ],
    )?;
    s.set_typed(
        "3",
        &[route_config("r1", &[("/api", "c1"), ("/two", "c2")])],
    )?;
    wait_upstream(l1, "/two", "a").await?;
    s.wait_for_ack(CDS, "2").await?;

    // Cluster remove: the route to c2 now names no cluster (503, Envoy's
    // cluster_not_found_response_code default); c1 is untouched.
    s.set_typed("3", &[eds_cluster("c1")])?;
    wait_status(l1, "/two", 503).await?;
    assert_serves(l1, "/api", "b", 1).await?;
    s.wait_for_ack(CDS, "3").await?;

    // Listener add: l2 routes everything to c1.
    s.set_typed("2", &[http_listener("l1", "r1"), http_listener("l2", "r2")])?;
    s.set_typed(
        "4",
        &[
            route_config("r1", &[("/api", "c1"), ("/two", "c2")]),
            route_config("r2", &[("/", "c1")]),
        ],
    )?;
    let l2 = proxy.wait_listener("l2", DEADLINE).await?;
    wait_upstream(l2, "/", "b").await?;
    s.wait_for_ack(LDS, "2").await?;

    // Listener remove: l2 is no longer listed nor accepting; l1 is untouched.
    s.set_typed("3", &[http_listener("l1", "r1")])?;
    eventually("l2 removed", || async {
        Ok((!proxy.current_listeners().await?.contains_key("l2")).then_some(()))
    })
    .await?;
    eventually("l2 refuses requests", || async {
        Ok(fetch(l2, "/").await.is_err().then_some(()))
    })
    .await?;
    assert_serves(l1, "/api", "b", 1).await?;
    s.wait_for_ack(LDS, "3").await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Warming

async fn warming(kind: ProxyKind, proto: XdsProtocol) -> Result<()> {
    let w = World::new(kind, proto).await?;
    w.push_initial()?;
    let (proxy, l1) = w.proxy_with("l1").await?;
    wait_upstream(l1, "/", "a").await?;
    let s = &w.server;
    // Over Delta, do not tell the client at once that c2's endpoints and r2 do not exist yet
    // (Envoy would end c2's warming with no endpoints), so both protocols warm alike.
    s.report_missing(false);

    // A new EDS cluster, routed before its endpoints arrive: 503 while it warms.
    s.set_typed("2", &[eds_cluster("c1"), eds_cluster("c2")])?;
    s.wait_for_request("the client asks for c2's endpoints", |r| {
        r.type_url == EDS && names(r, "c2")
    })
    .await?;
    s.set_typed("2", &[route_config("r1", &[("/two", "c2"), ("/", "c1")])])?;
    s.wait_for_ack(RDS, "2").await?;
    for _ in 0..3 {
        assert_eq!(fetch(l1, "/two").await?, (503, None), "c2 is still warming");
    }
    assert_serves(l1, "/", "a", 1).await?;
    // Its ClusterLoadAssignment ends warming.
    s.set_typed(
        "2",
        &[
            load_assignment("c1", &[w.a.addr]),
            load_assignment("c2", &[w.b.addr]),
        ],
    )?;
    wait_upstream(l1, "/two", "b").await?;
    // Envoy holds the CDS ACK until the cluster warmed (implementation-specific: a client may
    // ACK at once); either way it comes.
    s.wait_for_ack(CDS, "2").await?;

    // A new listener waits for its RouteConfiguration before it serves.
    s.set_typed("2", &[http_listener("l1", "r1"), http_listener("l2", "r2")])?;
    s.wait_for_request("the client asks for r2", |r| {
        r.type_url == RDS && names(r, "r2")
    })
    .await?;
    s.wait_for_ack(LDS, "2").await?;
    let listed = proxy.current_listeners().await?;
    assert!(
        !listed.contains_key("l2"),
        "l2 is active before its routes arrived: {listed:?}"
    );
    s.set_typed(
        "3",
        &[
            route_config("r1", &[("/two", "c2"), ("/", "c1")]),
            route_config("r2", &[("/", "c2")]),
        ],
    )?;
    let l2 = proxy.wait_listener("l2", DEADLINE).await?;
    wait_upstream(l2, "/", "b").await?;
    s.wait_for_ack(RDS, "3").await?;
    assert_serves(l1, "/", "a", 1).await
}

// ---------------------------------------------------------------------------------------------
// Server restart

async fn restart(kind: ProxyKind, proto: XdsProtocol) -> Result<()> {
    let mut w = World::new(kind, proto).await?;
    w.push_initial()?;
    let (_proxy, l1) = w.proxy_with("l1").await?;
    wait_upstream(l1, "/", "a").await?;
    for t in [CDS, EDS, LDS, RDS] {
        w.server.wait_for_ack(t, "1").await?;
    }

    // The control plane goes away: traffic keeps flowing on the last config.
    w.server.stop().await;
    assert_serves(l1, "/", "a", 5).await?;

    // It comes back on the same port: the client opens a new stream.
    let before = w.server.streams();
    w.server.restart().await?;
    let first = w
        .server
        .wait_for_request("a request on a new stream", |r| r.stream > before)
        .await?;
    assert_eq!(first.node_id.as_deref(), Some("test-node"), "{first:?}");
    let stream = first.stream;
    let cds = w
        .server
        .wait_for_request("CDS on the new stream", |r| {
            r.stream == stream && r.type_url == CDS
        })
        .await?;
    assert!(
        cds.response_nonce.is_empty(),
        "nonces do not survive: {cds:?}"
    );
    match proto {
        // SotW: the first request says which version the client has.
        XdsProtocol::Sotw => assert_eq!(cds.version_info, "1", "{cds:?}"),
        // Delta: the client says what it has, per resource.
        XdsProtocol::Delta => {
            assert_eq!(
                cds.initial_resource_versions.get("c1").map(String::as_str),
                Some("1"),
                "{cds:?}"
            );
            let lds = w
                .server
                .wait_for_request("LDS on the new stream", |r| {
                    r.stream == stream && r.type_url == LDS
                })
                .await?;
            assert_eq!(
                lds.initial_resource_versions.get("l1").map(String::as_str),
                Some("1"),
                "{lds:?}"
            );
        }
    }
    assert_serves(l1, "/", "a", 1).await?;

    // A change pushed after the restart is applied and ACKed on the new stream.
    w.server
        .set_typed("2", &[load_assignment("c1", &[w.b.addr])])?;
    wait_upstream(l1, "/", "b").await?;
    let ack = w.server.wait_for_ack(EDS, "2").await?;
    assert_eq!(ack.stream, stream);
    // Every nonce the client echoes on the new stream is one that stream sent.
    let log = w.server.log();
    for r in log.requests.iter().filter(|r| r.stream == stream) {
        if !r.response_nonce.is_empty() {
            assert!(
                log.responses
                    .iter()
                    .any(|p| p.stream == stream && p.nonce == r.response_nonce),
                "nonce from another stream: {r:?}"
            );
        }
    }
    assert!(log.nack(EDS, "2").is_none());
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Removal and unsubscription

async fn removal(kind: ProxyKind, proto: XdsProtocol) -> Result<()> {
    let w = World::new(kind, proto).await?;
    let s = &w.server;
    s.set_typed("1", &[eds_cluster("c1"), eds_cluster("c2")])?;
    s.set_typed(
        "1",
        &[
            load_assignment("c1", &[w.a.addr]),
            load_assignment("c2", &[w.b.addr]),
        ],
    )?;
    s.set_typed("1", &[http_listener("l1", "r1"), http_listener("l2", "r2")])?;
    s.set_typed(
        "1",
        &[
            route_config("r1", &[("/two", "c2"), ("/", "c1")]),
            route_config("r2", &[("/", "c2")]),
        ],
    )?;
    let (proxy, l1) = w.proxy_with("l1").await?;
    let l2 = proxy.wait_listener("l2", DEADLINE).await?;
    wait_upstream(l2, "/", "b").await?;
    wait_upstream(l1, "/two", "b").await?;
    s.wait_for_ack(RDS, "1").await?;

    // l2 goes away (Delta: removed_resources; SotW: absent from the response).
    s.set_typed("2", &[http_listener("l1", "r1")])?;
    eventually("l2 removed", || async {
        Ok((!proxy.current_listeners().await?.contains_key("l2")).then_some(()))
    })
    .await?;
    s.wait_for_ack(LDS, "2").await?;
    // Nothing references r2 any more: the client stops asking for it.
    s.wait_for_request("the client drops r2", |r| {
        r.type_url == RDS
            && match proto {
                XdsProtocol::Sotw => {
                    r.resource_names.iter().any(|n| n == "r1")
                        && !r.resource_names.iter().any(|n| n == "r2")
                }
                XdsProtocol::Delta => r.unsubscribe.iter().any(|n| n == "r2"),
            }
    })
    .await?;
    assert_serves(l1, "/", "a", 1).await?;

    // c2 goes away: /two now routes to a missing cluster, and its endpoints are dropped.
    s.set_typed("2", &[eds_cluster("c1")])?;
    wait_status(l1, "/two", 503).await?;
    s.wait_for_ack(CDS, "2").await?;
    s.wait_for_request("the client drops c2's endpoints", |r| {
        r.type_url == EDS
            && match proto {
                XdsProtocol::Sotw => {
                    r.resource_names.iter().any(|n| n == "c1")
                        && !r.resource_names.iter().any(|n| n == "c2")
                }
                XdsProtocol::Delta => r.unsubscribe.iter().any(|n| n == "c2"),
            }
    })
    .await?;
    assert_serves(l1, "/", "a", 1).await?;

    let log = s.log();
    if proto == XdsProtocol::Delta {
        for (t, name) in [(LDS, "l2"), (CDS, "c2")] {
            assert!(
                log.responses
                    .iter()
                    .any(|r| r.type_url == t && r.removed.iter().any(|n| n == name)),
                "{name} sent in removed_resources"
            );
        }
    }
    for (t, v) in [(LDS, "2"), (CDS, "2")] {
        assert!(log.nack(t, v).is_none(), "{t} {v} NACKed");
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The tests: one line per scenario, proxy and protocol.

/// `xds_test!(test_name, scenario, Kind, Protocol)`: a `#[tokio::test]` that runs
/// `scenario(ProxyKind::Kind, XdsProtocol::Protocol)`.
macro_rules! xds_test {
    ($name:ident, $scenario:ident, $kind:ident, $proto:ident) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() -> Result<()> {
            $scenario(ProxyKind::$kind, XdsProtocol::$proto).await
        }
    };
}

xds_test!(xds_initial_config_envoy_sotw, initial_config, Envoy, Sotw);
xds_test!(xds_initial_config_envoy_delta, initial_config, Envoy, Delta);
xds_test!(xds_nack_envoy_sotw, nack, Envoy, Sotw);
xds_test!(xds_nack_envoy_delta, nack, Envoy, Delta);
xds_test!(xds_changes_envoy_sotw, changes, Envoy, Sotw);
xds_test!(xds_changes_envoy_delta, changes, Envoy, Delta);
xds_test!(xds_warming_envoy_sotw, warming, Envoy, Sotw);
xds_test!(xds_warming_envoy_delta, warming, Envoy, Delta);
xds_test!(xds_restart_envoy_sotw, restart, Envoy, Sotw);
xds_test!(xds_restart_envoy_delta, restart, Envoy, Delta);
xds_test!(xds_removal_envoy_sotw, removal, Envoy, Sotw);
xds_test!(xds_removal_envoy_delta, removal, Envoy, Delta);
xds_test!(xds_initial_config_legate_sotw, initial_config, Legate, Sotw);
xds_test!(
    xds_initial_config_legate_delta,
    initial_config,
    Legate,
    Delta
);
xds_test!(xds_nack_legate_sotw, nack, Legate, Sotw);
xds_test!(xds_nack_legate_delta, nack, Legate, Delta);
xds_test!(xds_changes_legate_sotw, changes, Legate, Sotw);
xds_test!(xds_changes_legate_delta, changes, Legate, Delta);
xds_test!(xds_warming_legate_sotw, warming, Legate, Sotw);
xds_test!(xds_warming_legate_delta, warming, Legate, Delta);
xds_test!(xds_restart_legate_sotw, restart, Legate, Sotw);
xds_test!(xds_restart_legate_delta, restart, Legate, Delta);
xds_test!(xds_removal_legate_sotw, removal, Legate, Sotw);
xds_test!(xds_removal_legate_delta, removal, Legate, Delta);

// Defined after `xds_test!`, which it uses.
mod load;
mod sds;
mod tls;
