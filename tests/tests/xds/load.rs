//! xDS changes under load: 100 consecutive route, cluster, endpoint and listener changes
//! pushed over ADS while an HTTP/1.1 keep-alive client and an HTTP/2 client (8 streams in
//! flight on one connection) send requests without pause. Not one request may fail, and each
//! change must show in traffic; the time from each push to the first request that sees it is
//! printed as a distribution (run with `--nocapture` to read it).
//!
//! Resources: listener `l1` (HCM over RDS, its `server_name` marks the listener version) →
//! route configuration `r1` (`/s` → `cs`, `/e` → `ce`; an `x-gen` response header marks the
//! route version) → `cs`, a STATIC cluster whose inline endpoint alternates between upstreams
//! `a` and `b` (CDS changes), and `ce`, an EDS cluster whose assignment alternates (EDS
//! changes).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use legate_proto::pb::envoy::config::cluster::v3::cluster::{ClusterDiscoveryType, DiscoveryType};
use legate_proto::pb::envoy::config::cluster::v3::Cluster;
use legate_proto::pb::envoy::config::core::v3::{HeaderValue, HeaderValueOption};
use legate_proto::pb::envoy::config::listener::v3::{filter, Filter, FilterChain, Listener};
use legate_proto::pb::envoy::config::route::v3::{
    route::Action, route_action::ClusterSpecifier, route_match::PathSpecifier, Route, RouteAction,
    RouteConfiguration, RouteMatch, VirtualHost,
};
use legate_proto::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    http_connection_manager::RouteSpecifier, HttpConnectionManager, Rds,
};
use legate_tests::xds::any;
use legate_tests::xds::resources::{ads_source, router_filter, socket_address};

use super::*;

const CHANGES: usize = 100;
/// Each load loop stops by itself after this many requests at the latest.
const MAX_REQUESTS: u64 = 2_000_000;

fn static_cluster(name: &str, upstream: SocketAddr) -> Cluster {
    Cluster {
        name: name.into(),
        cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::Static as i32)),
        connect_timeout: Some(legate_proto::pb::google::protobuf::Duration {
            seconds: 1,
            nanos: 0,
        }),
        load_assignment: Some(load_assignment(name, &[upstream])),
        ..Default::default()
    }
}

fn route(prefix: &str, cluster: &str) -> Route {
    Route {
        r#match: Some(RouteMatch {
            path_specifier: Some(PathSpecifier::Prefix(prefix.into())),
            ..Default::default()
        }),
        action: Some(Action::Route(RouteAction {
            cluster_specifier: Some(ClusterSpecifier::Cluster(cluster.into())),
            ..Default::default()
        })),
        ..Default::default()
    }
}

/// `r1`, marked with `x-gen: gen` on every response.
fn routes(gen: usize) -> RouteConfiguration {
    RouteConfiguration {
        name: "r1".into(),
        virtual_hosts: vec![VirtualHost {
            name: "all".into(),
            domains: vec!["*".into()],
            routes: vec![route("/s", "cs"), route("/e", "ce")],
            response_headers_to_add: vec![HeaderValueOption {
                header: Some(HeaderValue {
                    key: "x-gen".into(),
                    value: gen.to_string(),
                    ..Default::default()
                }),
                ..Default::default()
            }],
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// `l1` on 127.0.0.1:0, its responses carrying `server: gen-N`.
fn listener(gen: usize) -> Listener {
    let hcm = HttpConnectionManager {
        stat_prefix: "l1".into(),
        server_name: format!("gen-{gen}"),
        route_specifier: Some(RouteSpecifier::Rds(Rds {
            config_source: Some(ads_source()),
            route_config_name: "r1".into(),
        })),
        http_filters: vec![router_filter()],
        ..Default::default()
    };
    Listener {
        name: "l1".into(),
        address: Some(socket_address(SocketAddr::from(([127, 0, 0, 1], 0)))),
        filter_chains: vec![FilterChain {
            filters: vec![Filter {
                name: "envoy.filters.network.http_connection_manager".into(),
                config_type: Some(filter::ConfigType::TypedConfig(any(&hcm))),
            }],
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// What the load clients saw.
#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    failed: AtomicU64,
    /// HTTP/2 requests refused by a GOAWAY before the server processed them, and sent again
    /// on a new connection, as every HTTP/2 client does (RFC 9113 §6.8).
    refused_and_retried: AtomicU64,
    first_failures: Mutex<Vec<String>>,
}

impl Tally {
    fn fail(&self, what: String) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut f) = self.first_failures.lock() {
            if f.len() < 10 {
                f.push(what);
            }
        }
    }
}

/// No request may take longer than this (a hung request is a failure, not a hung test).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// A client request bounded by [`REQUEST_TIMEOUT`]; a timeout reads as an error.
async fn bounded<F, T>(request: F) -> Result<T, String>
where
    F: std::future::Future<Output = Result<T, hyper_util::client::legacy::Error>>,
{
    match tokio::time::timeout(REQUEST_TIMEOUT, request).await {
        Ok(r) => r.map_err(|e| format!("{e:?}")),
        Err(_) => Err(format!("no response within {REQUEST_TIMEOUT:?}")),
    }
}

/// Requests `/s` and `/e` in turn through `client` until `stop` (or `MAX_REQUESTS`).
async fn load_loop(
    client: Client<hyper_util::client::legacy::connect::HttpConnector, Empty<Bytes>>,
    addr: SocketAddr,
    tally: Arc<Tally>,
    stop: Arc<AtomicBool>,
) {
    for i in 0..MAX_REQUESTS {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let path = if i % 2 == 0 { "/s" } else { "/e" };
        let req = http::Request::get(format!("http://{addr}{path}"))
            .header(http::header::HOST, "example.com")
            .body(Empty::<Bytes>::new());
        let req = match req {
            Ok(r) => r,
            Err(e) => {
                tally.fail(format!("building the request: {e}"));
                break;
            }
        };
        let mut attempt = bounded(client.request(req)).await;
        if let Err(e) = &attempt {
            // A stream the server refused with GOAWAY was not processed: safe to retry. The
            // error comes from h2 (`GoAway(…, NO_ERROR, Remote)` or `REFUSED_STREAM`).
            let text = e.clone();
            if text.contains("GoAway(") || text.contains("REFUSED_STREAM") {
                tally.refused_and_retried.fetch_add(1, Ordering::Relaxed);
                let again = http::Request::get(format!("http://{addr}{path}"))
                    .header(http::header::HOST, "example.com")
                    .body(Empty::<Bytes>::new());
                if let Ok(again) = again {
                    attempt = bounded(client.request(again)).await;
                }
            }
        }
        match attempt {
            Ok(resp) => {
                let status = resp.status();
                match tokio::time::timeout(REQUEST_TIMEOUT, resp.into_body().collect()).await {
                    Ok(Ok(_)) if status == 200 => {
                        tally.ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(Ok(_)) => tally.fail(format!("{path}: status {status}")),
                    Ok(Err(e)) => tally.fail(format!("{path}: body: {e}")),
                    Err(_) => tally.fail(format!("{path}: no body within {REQUEST_TIMEOUT:?}")),
                }
            }
            Err(e) => tally.fail(format!("{path}: {e}")),
        }
    }
}

/// Polls through new connections until `seen` accepts a response; returns how long it took.
async fn visible(
    l1: SocketAddr,
    path: &str,
    probes: &Tally,
    seen: impl Fn(&legate_tests::client::Response) -> bool,
) -> Result<Duration> {
    let start = Instant::now();
    loop {
        match send(l1, &Transport::H1, &Request::get("example.com", path)).await {
            Ok(r) if r.status != 200 => probes.fail(format!("probe {path}: status {}", r.status)),
            Ok(r) => {
                probes.ok.fetch_add(1, Ordering::Relaxed);
                if seen(&r) {
                    return Ok(start.elapsed());
                }
            }
            Err(e) => probes.fail(format!("probe {path}: {e:#}")),
        }
        if start.elapsed() > DEADLINE {
            bail!("{path}: change not visible within {DEADLINE:?}");
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

fn upstream_of(r: &legate_tests::client::Response) -> Option<String> {
    serde_json::from_slice::<Echo>(&r.body)
        .ok()
        .map(|e| e.upstream)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

async fn changes_under_load(kind: ProxyKind, proto: XdsProtocol) -> Result<()> {
    let w = World::new(kind, proto).await?;
    let (a, b) = (w.a.addr, w.b.addr);
    let s = &w.server;
    s.set_typed("0", &[static_cluster("cs", a), eds_cluster("ce")])?;
    s.set_typed("0", &[load_assignment("ce", &[a])])?;
    s.set_typed("0", &[listener(0)])?;
    s.set_typed("0", &[routes(0)])?;
    // Replaced listeners drain for 10 s (Envoy's default is 600 s): a request in flight on
    // an old connection finishes even when the machine is slow.
    let proxy = w.start_proxy_draining(10).await?;
    let l1 = proxy
        .wait_listener("l1", DEADLINE)
        .await
        .with_context(|| s.describe_log())?;
    wait_upstream(l1, "/s", "a").await?;
    wait_upstream(l1, "/e", "a").await?;

    let stop = Arc::new(AtomicBool::new(false));
    let h1 = Arc::new(Tally::default());
    let h2 = Arc::new(Tally::default());
    let probes = Arc::new(Tally::default());
    let h1_client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let h2_client = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http::<Empty<Bytes>>();
    let mut tasks = vec![tokio::spawn(load_loop(
        h1_client,
        l1,
        h1.clone(),
        stop.clone(),
    ))];
    for _ in 0..8 {
        tasks.push(tokio::spawn(load_loop(
            h2_client.clone(),
            l1,
            h2.clone(),
            stop.clone(),
        )));
    }

    let kinds = ["route", "cluster", "endpoint", "listener"];
    let mut times: Vec<Vec<Duration>> = vec![Vec::new(); kinds.len()];
    let result: Result<()> = async {
        for i in 1..=CHANGES {
            let version = i.to_string();
            let upstream = if i % 2 == 0 { a } else { b };
            let name = if upstream == a { "a" } else { "b" };
            let k = i % kinds.len();
            let took = match k {
                0 => {
                    s.set_typed(&version, &[routes(i)])?;
                    let want = i.to_string();
                    visible(l1, "/s", &probes, |r| {
                        r.header("x-gen").as_deref() == Some(&want)
                    })
                    .await?
                }
                1 => {
                    s.set_typed(
                        &version,
                        &[static_cluster("cs", upstream), eds_cluster("ce")],
                    )?;
                    visible(l1, "/s", &probes, |r| {
                        upstream_of(r).as_deref() == Some(name)
                    })
                    .await?
                }
                2 => {
                    s.set_typed(&version, &[load_assignment("ce", &[upstream])])?;
                    visible(l1, "/e", &probes, |r| {
                        upstream_of(r).as_deref() == Some(name)
                    })
                    .await?
                }
                _ => {
                    s.set_typed(&version, &[listener(i)])?;
                    let want = format!("gen-{i}");
                    visible(l1, "/s", &probes, |r| {
                        r.header("server").as_deref() == Some(&want)
                    })
                    .await?
                }
            };
            times[k].push(took);
        }
        Ok(())
    }
    .await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    result.with_context(|| s.describe_log())?;

    let mut report =
        format!("{kind} {proto}: {CHANGES} changes under load; push → visible in traffic:\n");
    let mut all: Vec<Duration> = Vec::new();
    for (k, name) in kinds.iter().enumerate() {
        let mut t = times[k].clone();
        t.sort();
        all.extend(&t);
        report.push_str(&format!(
            "  {name:<9} n={:<3} p50={:>7.2?} p90={:>7.2?} p99={:>7.2?} max={:>7.2?}\n",
            t.len(),
            percentile(&t, 0.5),
            percentile(&t, 0.9),
            percentile(&t, 0.99),
            t.last().copied().unwrap_or_default()
        ));
    }
    all.sort();
    report.push_str(&format!(
        "  all       n={:<3} p50={:>7.2?} p90={:>7.2?} p99={:>7.2?} max={:>7.2?}\n",
        all.len(),
        percentile(&all, 0.5),
        percentile(&all, 0.9),
        percentile(&all, 0.99),
        all.last().copied().unwrap_or_default()
    ));
    for (name, t) in [
        ("HTTP/1.1 keep-alive", &h1),
        ("HTTP/2 (8 streams)", &h2),
        ("probes (new connections)", &probes),
    ] {
        report.push_str(&format!(
            "  {name}: {} ok, {} failed, {} refused by GOAWAY before processing and retried\n",
            t.ok.load(Ordering::Relaxed),
            t.failed.load(Ordering::Relaxed),
            t.refused_and_retried.load(Ordering::Relaxed)
        ));
    }
    eprintln!("{report}");
    for (name, t) in [("HTTP/1.1", &h1), ("HTTP/2", &h2), ("probes", &probes)] {
        let failures = t
            .first_failures
            .lock()
            .map(|f| f.clone())
            .unwrap_or_default();
        ensure!(
            t.failed.load(Ordering::Relaxed) == 0,
            "{name}: failed requests during the changes: {failures:?}\n{report}"
        );
        ensure!(
            t.ok.load(Ordering::Relaxed) > 0,
            "{name}: no request went through\n{report}"
        );
    }
    Ok(())
}

xds_test!(
    xds_changes_under_load_legate_sotw,
    changes_under_load,
    Legate,
    Sotw
);
xds_test!(
    xds_changes_under_load_legate_delta,
    changes_under_load,
    Legate,
    Delta
);
