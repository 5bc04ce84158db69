//! The admin server (`admin.address`): readiness, stats, clusters, listeners, config dump and
//! `/quitquitquit`, with Envoy's paths and shapes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::UNIX_EPOCH;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::json;

use crate::server::Runtime;
use crate::stats::{render_prometheus, render_text, Stat};

/// Binds the admin server and serves it in the background.
/// During a hot restart the child takes over the parent's admin socket, and the parent
/// stops accepting on it once the child serves.
pub async fn start(addr: SocketAddr, runtime: Arc<Runtime>) -> std::io::Result<SocketAddr> {
    use crate::hot_restart::ADMIN_SOCKET;
    let listener = match runtime.hot_restart.inherit(ADMIN_SOCKET, addr) {
        Some(s) => tokio::net::TcpListener::from_std(s)?,
        None => tokio::net::TcpListener::bind(addr).await?,
    };
    runtime.hot_restart.register(ADMIN_SOCKET, addr, &listener);
    let local = listener.local_addr()?;
    let mut handed_over = runtime.hot_restart.handed_over_signal();
    tokio::spawn(async move {
        loop {
            // Once a successor took over, not one more connection: it owns the socket.
            let accepted = tokio::select! {
                biased;
                _ = handed_over.changed() => return,
                a = listener.accept() => a,
            };
            let Ok((stream, _)) = accepted else {
                continue;
            };
            let rt = runtime.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let rt = rt.clone();
                    async move { Ok::<_, std::convert::Infallible>(handle(&rt, req)) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok(local)
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=UTF-8"),
    );
    r
}

fn as_json(v: &serde_json::Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(
        serde_json::to_vec_pretty(v).unwrap_or_default(),
    )));
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r
}

/// Every stat, merged by name, with the counters inherited from previous generations
/// (hot restart) added in.
pub(crate) fn collect_stats(rt: &Runtime) -> Vec<(String, Stat)> {
    let snap = rt.snapshot.load();
    let mut out = Vec::new();
    let mut seen = Vec::new();
    for (l, _) in &snap.listeners {
        for c in l.chains.iter().chain(l.default_chain.iter()) {
            let p = Arc::as_ptr(&c.hcm);
            if !seen.contains(&p) {
                seen.push(p);
                c.hcm.stats.render(&c.hcm.stat_prefix, &mut out);
            }
        }
    }
    for c in snap.clusters.all() {
        c.stats.render(&c.config.name, &mut out);
        out.push((
            format!("cluster.{}.membership_total", c.config.name),
            Stat::Gauge(c.balancer().hosts().len() as i64),
        ));
    }
    rt.services.render(&mut out);
    out.push((
        "server.live".into(),
        Stat::Gauge(i64::from(!rt.is_draining())),
    ));
    out.push((
        "server.uptime".into(),
        Stat::Gauge(rt.started.elapsed().as_secs() as i64),
    ));
    out.push((
        "server.concurrency".into(),
        Stat::Gauge(rt.concurrency as i64),
    ));
    for (name, value) in rt.hot_restart.inherited_counters() {
        out.push((name, Stat::Counter(value)));
    }
    // Several HCMs may share a stat prefix: sum them, as Envoy's shared stat names do.
    out.sort_by(|a, b| a.0.cmp(&b.0));
    let mut merged: Vec<(String, Stat)> = Vec::with_capacity(out.len());
    for (name, v) in out {
        match (merged.last_mut(), v) {
            (Some((n, Stat::Counter(a))), Stat::Counter(b)) if *n == name => *a += b,
            (Some((n, Stat::Gauge(a))), Stat::Gauge(b)) if *n == name => *a += b,
            (_, v) => merged.push((name, v)),
        }
    }
    merged
}

fn handle(rt: &Arc<Runtime>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    let query = req.uri().query().unwrap_or("");
    let json_format = query.split('&').any(|kv| kv == "format=json");
    match (req.method(), path) {
        (_, "/ready") => {
            if rt.is_draining() {
                text(StatusCode::SERVICE_UNAVAILABLE, "DRAINING\n")
            } else if !rt.is_initialized() {
                text(StatusCode::SERVICE_UNAVAILABLE, "INITIALIZING\n")
            } else {
                text(StatusCode::OK, "LIVE\n")
            }
        }
        (_, "/server_info") => as_json(&json!({
            "version": format!("legate/{}", env!("CARGO_PKG_VERSION")),
            "state": if rt.is_draining() { "DRAINING" } else { "LIVE" },
            "hot_restart_version": if rt.hot_restart.is_available() { "legate.1" } else { "disabled" },
            "command_line_options": {
                "concurrency": rt.concurrency,
                "argv": rt.command_line,
                "restart_epoch": rt.hot_restart.options.epoch,
                "base_id": rt.hot_restart.options.base_id,
                "parent_shutdown_time": format!("{}s", rt.hot_restart.options.parent_shutdown_time.as_secs()),
                "drain_time": format!("{}s", rt.drain_time.as_secs()),
            },
            "node": {"id": rt.node.id, "cluster": rt.node.cluster},
            "uptime_current_epoch": format!("{}s", rt.started.elapsed().as_secs()),
            "uptime_all_epochs": format!("{}s", (rt.hot_restart.uptime_before() + rt.started.elapsed()).as_secs()),
        })),
        (_, "/stats") if json_format => {
            let stats: Vec<_> = collect_stats(rt)
                .into_iter()
                .map(|(name, v)| match v {
                    Stat::Counter(c) => json!({"name": name, "value": c}),
                    Stat::Gauge(g) => json!({"name": name, "value": g}),
                })
                .collect();
            as_json(&json!({"stats": stats}))
        }
        (_, "/stats") => text(StatusCode::OK, render_text(&collect_stats(rt))),
        (_, "/stats/prometheus") => text(StatusCode::OK, render_prometheus(&collect_stats(rt))),
        (_, "/clusters") => clusters(rt, json_format),
        (_, "/listeners") => listeners(rt, json_format),
        (_, "/config_dump") => as_json(&config_dump(
            rt,
            query
                .split('&')
                .any(|kv| kv == "include_eds" || kv == "include_eds=true"),
        )),
        (&Method::POST, "/quitquitquit") => {
            rt.quit();
            text(StatusCode::OK, "OK\n")
        }
        (&Method::POST, "/healthcheck/fail") => {
            rt.health.fail();
            text(StatusCode::OK, "OK\n")
        }
        (&Method::POST, "/healthcheck/ok") => {
            rt.health.ok();
            text(StatusCode::OK, "OK\n")
        }
        (&Method::POST, "/hot_restart") => match crate::hot_restart::supervisor::trigger(rt) {
            Ok(m) => text(StatusCode::OK, format!("{m}\n")),
            Err(m) => text(StatusCode::SERVICE_UNAVAILABLE, format!("{m}\n")),
        },
        (&Method::POST, "/drain_listeners") => {
            rt.start_drain();
            text(StatusCode::OK, "OK\n")
        }
        (
            _,
            "/quitquitquit" | "/drain_listeners" | "/healthcheck/fail" | "/healthcheck/ok"
            | "/hot_restart",
        ) => text(
            StatusCode::METHOD_NOT_ALLOWED,
            "This endpoint requires POST\n",
        ),
        _ => text(
            StatusCode::NOT_FOUND,
            "invalid path; see Envoy's admin documentation\n",
        ),
    }
}

/// Whether a cluster came over xDS rather than from the bootstrap.
fn added_via_api(snap: &crate::server::Snapshot, name: &str) -> bool {
    !snap.bootstrap["static_resources"]["clusters"]
        .as_array()
        .is_some_and(|cs| cs.iter().any(|c| c["name"] == name))
}

fn clusters(rt: &Runtime, json_format: bool) -> Response<Full<Bytes>> {
    let snap = rt.snapshot.load();
    if json_format {
        let statuses: Vec<_> = snap
            .clusters
            .all()
            .into_iter()
            .map(|c| {
                let hosts: Vec<_> = c
                    .balancer()
                    .hosts()
                    .iter()
                    .map(|h| json!({
                        "address": {"socket_address": {"address": h.address.ip().to_string(), "port_value": h.address.port()}},
                        "hostname": h.hostname,
                        "weight": h.weight,
                        "locality": {"zone": h.zone},
                        "stats": [{"name": "rq_total", "value": h.rq_total.load(std::sync::atomic::Ordering::Relaxed).to_string(), "type": "COUNTER"},
                                  {"name": "rq_active", "value": h.active_requests().to_string(), "type": "GAUGE"}],
                        "health_status": {"eds_health_status": "HEALTHY"}
                    }))
                    .collect();
                json!({"name": c.config.name, "added_via_api": added_via_api(&snap, &c.config.name), "host_statuses": hosts})
            })
            .collect();
        return as_json(&json!({"cluster_statuses": statuses}));
    }
    let mut out = String::new();
    for c in snap.clusters.all() {
        let n = &c.config.name;
        out.push_str(&format!(
            "{n}::added_via_api::{}\n",
            added_via_api(&snap, n)
        ));
        for h in c.balancer().hosts() {
            let a = h.address;
            out.push_str(&format!(
                "{n}::{a}::rq_total::{}\n",
                h.rq_total.load(std::sync::atomic::Ordering::Relaxed)
            ));
            out.push_str(&format!("{n}::{a}::rq_active::{}\n", h.active_requests()));
            out.push_str(&format!("{n}::{a}::weight::{}\n", h.weight));
            out.push_str(&format!("{n}::{a}::zone::{}\n", h.zone));
            out.push_str(&format!("{n}::{a}::health_flags::healthy\n"));
        }
    }
    text(StatusCode::OK, out)
}

fn listeners(rt: &Runtime, json_format: bool) -> Response<Full<Bytes>> {
    let snap = rt.snapshot.load();
    if json_format {
        let statuses: Vec<_> = snap
            .listeners
            .iter()
            .map(|(l, a)| json!({"name": l.name, "local_address": {"socket_address": {"address": a.ip().to_string(), "port_value": a.port()}}}))
            .collect();
        return as_json(&json!({"listener_statuses": statuses}));
    }
    let mut out = String::new();
    for (l, a) in &snap.listeners {
        out.push_str(&format!("{}::{a}\n", l.name));
    }
    text(StatusCode::OK, out)
}

fn timestamp(t: std::time::SystemTime) -> String {
    crate::accesslog::format_time(t)
}

fn config_dump(rt: &Runtime, include_eds: bool) -> serde_json::Value {
    use crate::xds::Kind;
    let snap = rt.snapshot.load();
    let updated = timestamp(snap.last_updated);
    let _ = UNIX_EPOCH;
    let sr = &snap.bootstrap["static_resources"];
    let listeners: Vec<_> = sr["listeners"]
        .as_array()
        .map(|ls| {
            ls.iter()
                .map(|l| json!({"listener": l, "last_updated": updated}))
                .collect()
        })
        .unwrap_or_default();
    let clusters: Vec<_> = sr["clusters"]
        .as_array()
        .map(|cs| {
            cs.iter()
                .map(|c| json!({"cluster": c, "last_updated": updated}))
                .collect()
        })
        .unwrap_or_default();
    let mut cds = json!({"@type": "type.googleapis.com/envoy.admin.v3.ClustersConfigDump", "static_clusters": clusters});
    let mut lds = json!({"@type": "type.googleapis.com/envoy.admin.v3.ListenersConfigDump", "static_listeners": listeners});
    let mut configs = vec![
        json!({"@type": "type.googleapis.com/envoy.admin.v3.BootstrapConfigDump", "bootstrap": &*snap.bootstrap, "last_updated": updated}),
    ];
    if let Some(d) = &snap.dynamic {
        let merge = |target: &mut serde_json::Value, extra: serde_json::Value| {
            if let (Some(t), serde_json::Value::Object(e)) = (target.as_object_mut(), extra) {
                t.extend(e);
            }
        };
        merge(&mut cds, d.json(Kind::Cluster, timestamp));
        merge(&mut cds, json!({"version_info": d.version(Kind::Cluster)}));
        merge(&mut lds, d.json(Kind::Listener, timestamp));
        merge(&mut lds, json!({"version_info": d.version(Kind::Listener)}));
        configs.push(cds);
        configs.push(lds);
        let mut rds = json!({"@type": "type.googleapis.com/envoy.admin.v3.RoutesConfigDump"});
        merge(&mut rds, d.json(Kind::Route, timestamp));
        configs.push(rds);
        let mut sds = json!({"@type": "type.googleapis.com/envoy.admin.v3.SecretsConfigDump"});
        merge(&mut sds, d.json(Kind::Secret, timestamp));
        configs.push(sds);
        if include_eds {
            let mut eds =
                json!({"@type": "type.googleapis.com/envoy.admin.v3.EndpointsConfigDump"});
            merge(&mut eds, d.json(Kind::Endpoints, timestamp));
            configs.push(eds);
        }
    } else {
        configs.push(cds);
        configs.push(lds);
    }
    json!({ "configs": configs })
}
