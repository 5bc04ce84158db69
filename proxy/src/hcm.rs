//! The HTTP connection manager: what happens to one request, from its headers to the
//! response it gets. The connection-level part (codecs, timeouts) lives in `listener`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, Request, Response, StatusCode, Uri, Version};
use hyper::body::Incoming;
use legate_filters::{HttpFilter, LocalReply, Phases, RequestContext, RouterConfig};

use crate::accesslog::{AccessLog, Record};
use crate::body::{Completion, ProxyBody};
use crate::filter_body::StreamCtx;
use crate::lb::hash64;
use crate::route::{
    ClusterTarget, ForwardAction, HashPolicy, PathMatch, RedirectAction, RequestView, Route,
    RouteAction, RouteTable, VirtualHost,
};
use crate::server::{Runtime, Snapshot};
use crate::stats::HttpStats;
use crate::upstream::UpstreamBody;

/// `codec_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    Auto,
    Http1,
    Http2,
}

/// `server_header_transformation`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerHeader {
    Overwrite,
    AppendIfAbsent,
    PassThrough,
}

/// A validated HTTP connection manager.
#[derive(Debug)]
pub struct HcmConfig {
    pub stat_prefix: String,
    pub codec: Codec,
    pub routes: Routes,
    pub filters: Vec<HcmFilter>,
    /// The filters that implement a body or trailers phase (bit i = `filters[i]`); zero
    /// means bodies are never touched.
    pub body_filters: u64,
    pub router: RouterConfig,
    pub stream_idle_timeout: Option<Duration>,
    pub request_timeout: Option<Duration>,
    pub idle_timeout: Option<Duration>,
    pub max_request_headers_kb: u32,
    pub use_remote_address: bool,
    pub xff_num_trusted_hops: u32,
    pub skip_xff_append: bool,
    pub generate_request_id: bool,
    pub always_set_request_id_in_response: bool,
    /// `http_protocol_options.accept_http_10`.
    pub accept_http_10: bool,
    pub server_name: HeaderValue,
    pub server_header: ServerHeader,
    pub access_logs: Arc<[AccessLog]>,
    pub websocket: bool,
    /// `strip_any_host_port`: the port is removed from the host before routing and
    /// forwarding.
    pub strip_any_host_port: bool,
    /// `drain_timeout` (default 5 s): how long a draining HTTP/1.1 connection stays open
    /// for its next request before it is closed when idle.
    pub drain_timeout: Duration,
    pub h2_max_concurrent_streams: Option<u32>,
    pub stats: HttpStats,
}

/// Where a connection manager's routes come from.
#[derive(Debug)]
pub enum Routes {
    /// An inline `route_config`.
    Static(Arc<RouteTable>),
    /// `rds`: the route table is looked up in the request's snapshot under `key` (the route
    /// configuration's name compiled for this manager's filters).
    Rds { name: String, key: Arc<str> },
}

/// One HTTP filter of a connection manager.
#[derive(Debug)]
pub struct HcmFilter {
    pub name: String,
    pub type_url: String,
    pub filter: Arc<dyn HttpFilter>,
    /// The phases the filter implements (asked once, when the configuration is built).
    pub phases: Phases,
    /// `disabled: true` in `http_filters`: runs only on routes that enable it.
    pub disabled_by_default: bool,
}

mod chain;

pub use chain::phase_mask;

/// The most filters one connection manager may run (the chain tracks them in a bit mask).
pub const MAX_FILTERS: usize = 64;

/// What the connection knows about itself, shared by its requests.
#[derive(Debug)]
pub struct ConnInfo {
    pub remote: SocketAddr,
    pub local: SocketAddr,
    pub tls: bool,
    pub sni: Option<String>,
    pub peer_principals: Vec<String>,
    /// Set by [`crate::sniff::Sniffed`] when a request head had conflicting framing.
    pub framing_conflict: Arc<std::sync::atomic::AtomicBool>,
    /// Set when the connection drains: HTTP/1.1 responses then carry `Connection: close`.
    pub draining: Arc<std::sync::atomic::AtomicBool>,
    /// Set once an HTTP/2 request was seen (an HTTP/2 connection drains with GOAWAY).
    pub saw_h2: Arc<std::sync::atomic::AtomicBool>,
    pub hcm: Arc<HcmConfig>,
    pub runtime: Arc<Runtime>,
}

const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_ENVOY_INTERNAL: HeaderName = HeaderName::from_static("x-envoy-internal");
const X_ENVOY_EXPECTED_TIMEOUT: HeaderName =
    HeaderName::from_static("x-envoy-expected-rq-timeout-ms");
const X_ENVOY_UPSTREAM_TIME: HeaderName = HeaderName::from_static("x-envoy-upstream-service-time");
const X_ENVOY_ORIGINAL_PATH: HeaderName = HeaderName::from_static("x-envoy-original-path");
const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// The state of one request as it moves through the manager.
struct Stream<'a> {
    conn: &'a ConnInfo,
    ctx: StreamCtx,
    record: Option<Record>,
    started: Instant,
    flags: &'static str,
    details: &'static str,
    /// Filters whose request phase ran (bit i = `filters[i]`), for the response phase.
    ran_filters: u64,
    /// The matched route's per-filter configurations.
    route_filters: Option<Arc<crate::route::RouteFilters>>,
    /// A gRPC request gets its local replies as gRPC statuses.
    grpc: bool,
    /// The request id, when `always_set_request_id_in_response` wants it echoed.
    request_id: Option<HeaderValue>,
    /// The route's name when no filter context carries it (a manager without filters).
    route_name: Option<String>,
}

/// Serves one request.
pub async fn handle(
    conn: Arc<ConnInfo>,
    req: Request<Incoming>,
) -> Result<Response<ProxyBody>, Rejected> {
    let hcm = &conn.hcm;
    let limit = hcm.max_request_headers_kb as usize * 1024;
    if headers_size(&req) > limit {
        hcm.stats.rq_total.inc();
        if req.version() == Version::HTTP_2 {
            // Envoy resets an HTTP/2 stream whose headers are over the limit.
            return Err(Rejected("request headers too large"));
        }
        let mut resp = Response::new(ProxyBody::empty());
        *resp.status_mut() = StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE;
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        hcm.stats.rq_classes.record(431);
        return Ok(resp);
    }
    if let Some(status) = codec_violation(&req, hcm) {
        hcm.stats.rq_total.inc();
        hcm.stats.rq_classes.record(status.as_u16());
        let mut resp = Response::new(ProxyBody::empty());
        *resp.status_mut() = status;
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        return Ok(resp);
    }
    if req.version() != Version::HTTP_2
        && req.headers().contains_key(header::TRANSFER_ENCODING)
        && conn
            .framing_conflict
            .load(std::sync::atomic::Ordering::Relaxed)
    {
        // RFC 9112 §6.3: a request smuggling vector. Envoy answers 400 and closes.
        hcm.stats.rq_total.inc();
        hcm.stats.rq_classes.record(400);
        let mut resp = Response::new(ProxyBody::empty());
        *resp.status_mut() = StatusCode::BAD_REQUEST;
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        return Ok(resp);
    }
    hcm.stats.rq_total.inc();
    hcm.stats.rq_active.inc();
    let h2 = req.version() == Version::HTTP_2;
    if h2 && !conn.saw_h2.load(std::sync::atomic::Ordering::Relaxed) {
        conn.saw_h2
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }
    let mut stream = Stream {
        conn: &conn,
        ctx: StreamCtx::Owned(RequestContext {
            downstream_remote: Some(conn.remote),
            downstream_local: Some(conn.local),
            downstream_tls: conn.tls,
            requested_server_name: conn.sni.clone(),
            peer_principals: conn.peer_principals.clone(),
            ..Default::default()
        }),
        record: None,
        started: Instant::now(),
        flags: "",
        details: "",
        ran_filters: 0,
        route_filters: None,
        grpc: req
            .headers()
            .get(header::CONTENT_TYPE)
            .is_some_and(|v| is_grpc(v.as_bytes())),
        request_id: None,
        route_name: None,
    };
    let fut = stream.run(req);
    let mut resp = match hcm.request_timeout {
        Some(t) => match tokio::time::timeout(t, fut).await {
            Ok(r) => r,
            Err(_) => {
                hcm.stats.rq_timeout.inc();
                stream.flags = "";
                stream.details = "request_overall_timeout";
                stream.local(LocalReply::new(
                    StatusCode::REQUEST_TIMEOUT,
                    "request timeout",
                ))
            }
        },
        None => fut.await,
    };
    hcm.stats.rq_classes.record(resp.status().as_u16());
    hcm.stats.rq_active.dec();
    stream.finish(&mut resp);
    if !h2 && conn.draining.load(std::sync::atomic::Ordering::Relaxed) {
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    Ok(resp)
}

/// `application/grpc` and its `+format` subtypes, not gRPC-Web (as Envoy tells them apart).
fn is_grpc(content_type: &[u8]) -> bool {
    match content_type.strip_prefix(b"application/grpc") {
        Some(rest) => rest.is_empty() || rest[0] == b'+' || rest[0] == b';',
        None => false,
    }
}

/// Envoy's HTTP/1 codec refuses HTTP/1.0 unless `accept_http_10` (426) and an HTTP/1.1
/// request without `Host` (400).
fn codec_violation<B>(req: &Request<B>, hcm: &HcmConfig) -> Option<StatusCode> {
    match req.version() {
        Version::HTTP_10 | Version::HTTP_09 if !hcm.accept_http_10 => {
            Some(StatusCode::UPGRADE_REQUIRED)
        }
        Version::HTTP_11
            if req.uri().authority().is_none() && !req.headers().contains_key(header::HOST) =>
        {
            Some(StatusCode::BAD_REQUEST)
        }
        _ => None,
    }
}

/// A request refused at the codec level; HTTP/2 resets the stream, HTTP/1.1 closes.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Rejected(&'static str);

/// Bytes of request headers as Envoy counts them against `max_request_headers_kb`.
fn headers_size<B>(req: &Request<B>) -> usize {
    let pseudo =
        req.method().as_str().len() + req.uri().path_and_query().map_or(1, |p| p.as_str().len());
    req.headers()
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len())
        .sum::<usize>()
        + pseudo
}

fn protocol_name(v: Version) -> &'static str {
    match v {
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_11 => "HTTP/1.1",
        Version::HTTP_2 => "HTTP/2",
        Version::HTTP_3 => "HTTP/3",
        _ => "-",
    }
}

fn authority(req: &Request<Incoming>) -> String {
    req.uri()
        .authority()
        .map(|a| a.as_str().to_owned())
        .or_else(|| {
            req.headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_owned)
        })
        .unwrap_or_default()
}

/// Removes a `:port` suffix from a host (`[v6]:port` included; a bare IPv6 address has none).
fn strip_host_port(host: &mut String) {
    if let Some(i) = host.rfind(':') {
        let (name, port) = host.split_at(i);
        let digits = &port[1..];
        if !digits.is_empty()
            && digits.bytes().all(|b| b.is_ascii_digit())
            && (!name.contains(':') || name.ends_with(']'))
        {
            host.truncate(i);
        }
    }
}

fn is_internal(ip: std::net::IpAddr) -> bool {
    match ip {
        std::net::IpAddr::V4(v4) => v4.is_private() || v4.is_loopback(),
        std::net::IpAddr::V6(v6) => v6.is_loopback() || (v6.segments()[0] & 0xfe00) == 0xfc00,
    }
}

/// A random (version 4) UUID, as Envoy generates for `x-request-id`.
fn request_id() -> HeaderValue {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let b: [u8; 16] = rand::random();
    let mut s = [0u8; 36];
    let mut at = 0;
    for (i, byte) in b.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            s[at] = b'-';
            at += 1;
        }
        let byte = match i {
            6 => (byte & 0x0f) | 0x40,
            8 => (byte & 0x3f) | 0x80,
            _ => *byte,
        };
        s[at] = HEX[usize::from(byte >> 4)];
        s[at + 1] = HEX[usize::from(byte & 0x0f)];
        at += 2;
    }
    HeaderValue::from_bytes(&s).unwrap_or(HeaderValue::from_static("-"))
}

impl Stream<'_> {
    async fn run(&mut self, mut req: Request<Incoming>) -> Response<ProxyBody> {
        let conn = self.conn;
        let hcm = &conn.hcm;
        let mut host = authority(&req);
        if hcm.strip_any_host_port {
            strip_host_port(&mut host);
        }
        self.edge_headers(req.headers_mut());
        if !hcm.access_logs.is_empty() {
            self.record = Some(Record {
                start: Some(SystemTime::now()),
                request_headers: req.headers().clone(),
                method: req.method().as_str().to_owned(),
                path: req
                    .uri()
                    .path_and_query()
                    .map(|p| p.as_str().to_owned())
                    .unwrap_or_default(),
                authority: host.clone(),
                protocol: protocol_name(req.version()),
                downstream_remote: Some(conn.remote),
                downstream_local: Some(conn.local),
                requested_server_name: conn.sni.clone(),
                ..Default::default()
            });
        }

        // The request's one load of the published snapshot: routes (for RDS) and clusters
        // come from the same version.
        let snapshot = conn.runtime.snapshot.load_full();
        let table: &RouteTable = match &hcm.routes {
            Routes::Static(t) => t,
            Routes::Rds { key, .. } => match snapshot.routes.get(key) {
                Some(t) => t,
                None => return self.no_route(),
            },
        };
        let path = req
            .uri()
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/")
            .to_owned();
        let matched = table.virtual_host(&host).and_then(|vh| {
            let view = RequestView {
                method: req.method().as_str(),
                authority: &host,
                path_and_query: &path,
                scheme: if conn.tls { "https" } else { "http" },
                headers: req.headers(),
            };
            vh.route(&view).map(|route| (vh, route))
        });
        let Some((vh, route)) = matched else {
            if !hcm.filters.is_empty() {
                // Envoy runs the filter chain before the router decides: a health check, an
                // authorization or a rate limit answers requests that no route matches too.
                if let Err(r) = self.request_path(req).await {
                    return self.local(r);
                }
            }
            return self.no_route();
        };
        let route_name = Some(route.name.clone()).filter(|n| !n.is_empty());

        let req = if hcm.filters.is_empty() {
            self.route_name = route_name;
            req.map(UpstreamBody::from)
        } else {
            self.ctx.get().route_name = route_name;
            self.route_filters = route.filters.clone();
            match self.request_path(req).await {
                Ok(req) => req,
                Err(r) => return self.local(r),
            }
        };

        let resp = match &route.action {
            RouteAction::Direct { status, body } => {
                self.details = "direct_response";
                let mut r = LocalReply::new(*status, body.clone().unwrap_or_default());
                if body.is_some() {
                    r.headers
                        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
                }
                let mut resp = self.local(r);
                self.response_headers(route, vh, table, None, resp.headers_mut());
                return resp;
            }
            RouteAction::Redirect(rd) => {
                let mut resp = self.redirect(rd, route, &host, &path);
                self.response_headers(route, vh, table, None, resp.headers_mut());
                return resp;
            }
            RouteAction::Forward(fwd) => {
                self.forward(fwd, route, vh, table, &snapshot, req, &host, &path)
                    .await
            }
        };
        resp
    }

    /// Envoy's edge handling of forwarding headers and request ids.
    fn edge_headers(&mut self, h: &mut HeaderMap) {
        let conn = self.conn;
        let hcm = &conn.hcm;
        let scheme = if conn.tls { "https" } else { "http" };
        if hcm.use_remote_address {
            h.insert(X_FORWARDED_PROTO, HeaderValue::from_static(scheme));
            if !hcm.skip_xff_append {
                let ip = conn.remote.ip().to_string();
                let v = match h.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
                    Some(prev) => format!("{prev},{ip}"),
                    None => ip,
                };
                if let Ok(v) = HeaderValue::from_str(&v) {
                    h.insert(X_FORWARDED_FOR, v);
                }
            }
            if is_internal(conn.remote.ip())
                && h.get(&X_FORWARDED_FOR)
                    .is_some_and(|v| !v.as_bytes().contains(&b','))
            {
                h.insert(X_ENVOY_INTERNAL, HeaderValue::from_static("true"));
            } else {
                h.remove(X_ENVOY_INTERNAL);
            }
        } else if !h.contains_key(&X_FORWARDED_PROTO) {
            h.insert(X_FORWARDED_PROTO, HeaderValue::from_static(scheme));
        }
        if hcm.generate_request_id && !h.contains_key(&X_REQUEST_ID) {
            h.insert(X_REQUEST_ID, request_id());
        }
        if hcm.always_set_request_id_in_response {
            self.request_id = h.get(&X_REQUEST_ID).cloned();
        }
    }

    fn no_route(&mut self) -> Response<ProxyBody> {
        self.conn.hcm.stats.no_route.inc();
        self.flags = "NR";
        self.details = "route_not_found";
        self.local(LocalReply::new(StatusCode::NOT_FOUND, bytes::Bytes::new()))
    }

    /// A local reply, after the response phase of the filters that already ran.
    fn local(&mut self, mut r: LocalReply) -> Response<ProxyBody> {
        if let Some(f) = r.response_flag {
            self.flags = f;
        }
        if self.grpc {
            r = grpc_local_reply(r);
        } else if !r.body.is_empty() && !r.headers.contains_key(header::CONTENT_TYPE) {
            r.headers
                .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        }
        let mut resp = Response::new(ProxyBody::full(r.body));
        *resp.status_mut() = r.status;
        *resp.headers_mut() = r.headers;
        // The body is complete, so the response path never waits.
        futures_util::FutureExt::now_or_never(self.response_path(resp))
            .unwrap_or_else(chain::internal_error)
    }

    fn redirect(
        &mut self,
        rd: &RedirectAction,
        route: &Route,
        host: &str,
        path: &str,
    ) -> Response<ProxyBody> {
        self.details = "direct_response";
        let orig_scheme = if self.conn.tls { "https" } else { "http" };
        let scheme = rd.scheme.as_deref().unwrap_or(orig_scheme);
        let (orig_host, orig_port) = split_host_port(host);
        let mut new_host = rd.host.clone().unwrap_or_else(|| orig_host.to_owned());
        let port = match rd.port {
            Some(p) => Some(p.to_string()),
            None if rd.host.is_some() && rd.host.as_deref().is_some_and(|h| h.contains(':')) => {
                None
            }
            None if rd.scheme.is_some() && scheme != orig_scheme => None,
            None => orig_port.map(str::to_owned),
        };
        if let Some(p) = port {
            let default = (scheme == "http" && p == "80") || (scheme == "https" && p == "443");
            if !default {
                new_host = format!("{new_host}:{p}");
            }
        }
        let (p, q) = match path.find('?') {
            Some(i) => (&path[..i], Some(&path[i..])),
            None => (path, None),
        };
        let mut new_path = if let Some(np) = &rd.path {
            np.clone()
        } else if let Some(prefix) = &rd.prefix_rewrite {
            let matched = matched_prefix_len(route);
            format!("{prefix}{}", &p[matched.min(p.len())..])
        } else if let Some((re, sub)) = &rd.regex_rewrite {
            re.replace_all(p, sub.as_str()).into_owned()
        } else {
            p.to_owned()
        };
        if !rd.strip_query && !new_path.contains('?') {
            if let Some(q) = q {
                new_path.push_str(q);
            }
        }
        let location = format!("{scheme}://{new_host}{new_path}");
        let mut r = LocalReply::new(rd.status, bytes::Bytes::new());
        if let Ok(v) = HeaderValue::from_str(&location) {
            r.headers.insert(header::LOCATION, v);
        }
        self.local(r)
    }

    #[allow(clippy::too_many_arguments)]
    async fn forward(
        &mut self,
        fwd: &ForwardAction,
        route: &Route,
        vh: &VirtualHost,
        table: &RouteTable,
        snapshot: &Snapshot,
        mut req: Request<UpstreamBody>,
        host: &str,
        path: &str,
    ) -> Response<ProxyBody> {
        let conn = self.conn;
        let hcm = &conn.hcm;
        let (cluster_name, weighted) = match &fwd.target {
            ClusterTarget::Named(n) => (n.clone(), None),
            ClusterTarget::Header(h) => (
                req.headers()
                    .get(h)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_owned(),
                None,
            ),
            ClusterTarget::Weighted { clusters, total } => {
                let mut pick = rand::random::<u64>() % (*total).max(1);
                let mut chosen = clusters.first();
                for c in clusters {
                    if pick < c.weight {
                        chosen = Some(c);
                        break;
                    }
                    pick -= c.weight;
                }
                match chosen {
                    Some(c) => (c.name.clone(), Some(c)),
                    None => (String::new(), None),
                }
            }
        };
        if !hcm.filters.is_empty() {
            self.ctx.get().cluster_name = Some(cluster_name.clone());
        }
        if let Some(r) = &mut self.record {
            r.upstream_cluster = Some(cluster_name.clone());
        }
        let Some(cluster) = snapshot.clusters.get(&cluster_name).cloned() else {
            hcm.stats.no_cluster.inc();
            self.flags = "NC";
            self.details = "cluster_not_found";
            return self.local(LocalReply::new(
                fwd.cluster_not_found_status,
                bytes::Bytes::new(),
            ));
        };

        let hash = compute_hash(&fwd.hash_policy, req.headers(), conn.remote);
        let balancer = cluster.balancer();
        let Some(upstream_host) = balancer.pick(hash).cloned() else {
            cluster.stats.cx_none_healthy.inc();
            self.flags = "UH";
            self.details = "no_healthy_upstream";
            return self.local(LocalReply::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "no healthy upstream",
            ));
        };
        drop(balancer);
        if let Some(r) = &mut self.record {
            r.upstream_host = Some(upstream_host.address);
        }

        // Rewrites.
        let (p, q) = match path.find('?') {
            Some(i) => (&path[..i], &path[i..]),
            None => (path, ""),
        };
        let new_path = if let Some(prefix) = &fwd.prefix_rewrite {
            let matched = matched_prefix_len(route);
            let rest = &p[matched.min(p.len())..];
            Some(format!("{prefix}{rest}{q}"))
        } else {
            fwd.regex_rewrite
                .as_ref()
                .map(|(re, sub)| format!("{}{q}", re.replace_all(p, sub.as_str())))
        };
        let headers = req.headers_mut();
        if new_path.is_some() {
            if let Ok(v) = HeaderValue::from_str(path) {
                headers.insert(X_ENVOY_ORIGINAL_PATH, v);
            }
        }
        let mut upstream_authority = host.to_owned();
        if let Some(h) = &fwd.host_rewrite {
            upstream_authority = h.to_str().unwrap_or(host).to_owned();
        } else if fwd.auto_host_rewrite && !upstream_host.hostname.is_empty() {
            upstream_authority = upstream_host.hostname.clone();
        }
        if upstream_authority != host {
            if let Ok(v) = HeaderValue::from_str(host) {
                headers.insert(HeaderName::from_static("x-forwarded-host"), v);
            }
        }
        // Header mutations: most specific level first, so outer levels win on overwrite.
        table.apply_levels(
            [
                weighted.map(|w| &w.request_headers),
                Some(&route.request_headers),
                Some(&vh.request_headers),
                Some(&table.request_headers),
            ],
            headers,
        );

        // The codec already answered `Expect: 100-continue`; Envoy does not forward it.
        headers.remove(header::EXPECT);
        let upgrade = is_websocket(headers) && fwd.websocket.unwrap_or(hcm.websocket);
        strip_hop_by_hop(headers, upgrade);
        if !hcm.router.suppress_envoy_headers {
            if let Some(t) = fwd.timeout {
                headers.insert(
                    X_ENVOY_EXPECTED_TIMEOUT,
                    HeaderValue::from(t.as_millis() as u64),
                );
            }
        }
        let pq = new_path.as_deref().unwrap_or(path);
        let uri = match Uri::builder().path_and_query(pq).build() {
            Ok(u) => u,
            Err(_) => {
                return self.local(LocalReply::new(
                    StatusCode::BAD_REQUEST,
                    bytes::Bytes::new(),
                ))
            }
        };
        let downstream_upgrade = if upgrade {
            Some(hyper::upgrade::on(&mut req))
        } else {
            None
        };
        let (mut parts, body) = req.into_parts();
        parts.uri = uri;
        // HTTP/1.1 requests already carry the right Host unless a rewrite changed it.
        if parts.headers.get(header::HOST).map(|h| h.as_bytes())
            != Some(upstream_authority.as_bytes())
        {
            if let Ok(v) = HeaderValue::from_str(&upstream_authority) {
                parts.headers.insert(header::HOST, v);
            }
        }
        parts.extensions = http::Extensions::new();
        let up_req = Request::from_parts(parts, body);

        cluster.stats.rq_total.inc();
        cluster.stats.rq_active.inc();
        let active = upstream_host.track();
        let sent_at = Instant::now();
        let send = crate::upstream::send(&upstream_host, &cluster.config, &cluster.stats, up_req);
        let timeout = match (fwd.timeout, hcm.stream_idle_timeout) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let result = match timeout {
            Some(t) => match tokio::time::timeout(t, send).await {
                Ok(r) => r,
                Err(_) => {
                    cluster.stats.rq_active.dec();
                    cluster.stats.rq_classes.record(504);
                    if fwd.timeout == Some(t) {
                        cluster.stats.rq_timeout.inc();
                        self.flags = "UT";
                        self.details = "upstream_response_timeout";
                        return self.local(LocalReply::new(
                            StatusCode::GATEWAY_TIMEOUT,
                            "upstream request timeout",
                        ));
                    }
                    hcm.stats.rq_idle_timeout.inc();
                    self.details = "stream_idle_timeout";
                    return self.local(LocalReply::new(
                        StatusCode::REQUEST_TIMEOUT,
                        "stream timeout",
                    ));
                }
            },
            None => send.await,
        };
        cluster.stats.rq_active.dec();
        let (resp, pool) = match result {
            Ok(r) => r,
            Err(e) => {
                if let Some(r) = self.ctx.take_local_reply() {
                    // A request data phase answered locally and ended the upstream request.
                    return self.local(r);
                }
                cluster.stats.rq_classes.record(503);
                self.flags = e.response_flag();
                self.details = "upstream_reset_before_response_started";
                tracing::debug!(cluster = %cluster.config.name, host = %upstream_host.address, "upstream failure: {e}");
                return self.local(LocalReply::new(StatusCode::SERVICE_UNAVAILABLE, e.body()));
            }
        };
        if let Some(r) = self.ctx.take_local_reply() {
            // A request data phase answered locally while the upstream was answering.
            return self.local(r);
        }
        cluster.stats.rq_classes.record(resp.status().as_u16());
        self.details = "via_upstream";
        let mut resp = resp;
        let upstream_upgrade = if upgrade && resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            Some(hyper::upgrade::on(&mut resp))
        } else {
            None
        };
        let (mut parts, body) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers, upstream_upgrade.is_some());
        if !hcm.router.suppress_envoy_headers {
            let ms = HeaderValue::from(sent_at.elapsed().as_millis() as u64);
            parts.headers.insert(X_ENVOY_UPSTREAM_TIME, ms);
        }
        self.response_headers(route, vh, table, weighted, &mut parts.headers);
        if let (Some(down), Some(up)) = (downstream_upgrade, upstream_upgrade) {
            tokio::spawn(async move {
                match (down.await, up.await) {
                    (Ok(d), Ok(u)) => {
                        let mut d = hyper_util::rt::TokioIo::new(d);
                        let mut u = hyper_util::rt::TokioIo::new(u);
                        let _ = tokio::io::copy_bidirectional(&mut d, &mut u).await;
                    }
                    (d, u) => tracing::debug!("upgrade failed: {:?} {:?}", d.err(), u.err()),
                }
            });
            let resp = Response::from_parts(parts, ProxyBody::upstream(body, None, Some(active)));
            return self.response_path(resp).await;
        }
        let resp = Response::from_parts(parts, ProxyBody::upstream(body, pool, Some(active)));
        self.response_path(resp).await
    }

    fn response_headers(
        &self,
        route: &Route,
        vh: &VirtualHost,
        table: &RouteTable,
        weighted: Option<&crate::route::WeightedCluster>,
        headers: &mut HeaderMap,
    ) {
        table.apply_levels(
            [
                weighted.map(|w| &w.response_headers),
                Some(&route.response_headers),
                Some(&vh.response_headers),
                Some(&table.response_headers),
            ],
            headers,
        );
    }

    /// Final touches on every response, and the access-log hook.
    fn finish(&mut self, resp: &mut Response<ProxyBody>) {
        let hcm = &self.conn.hcm;
        let h = resp.headers_mut();
        match hcm.server_header {
            ServerHeader::Overwrite => {
                h.insert(header::SERVER, hcm.server_name.clone());
            }
            ServerHeader::AppendIfAbsent => {
                if !h.contains_key(header::SERVER) {
                    h.insert(header::SERVER, hcm.server_name.clone());
                }
            }
            ServerHeader::PassThrough => {}
        }
        if let Some(id) = self.request_id.take() {
            h.insert(X_REQUEST_ID, id);
        }
        if let Some(mut record) = self.record.take() {
            record.response_code = resp.status().as_u16();
            record.response_flags = self.flags;
            record.response_code_details = self.details;
            record.response_headers = resp.headers().clone();
            record.route_name = match self.route_name.take() {
                Some(n) => Some(n),
                None => self.ctx.get().route_name.clone(),
            };
            record.bytes_received = record
                .request_headers
                .get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok()?.parse().ok())
                .unwrap_or(0);
            resp.body_mut().on_complete(Some(Box::new(Completion {
                logs: hcm.access_logs.clone(),
                record,
                started: self.started,
            })));
        }
    }
}

/// Envoy turns a local reply to a gRPC request into a trailers-only gRPC response.
fn grpc_local_reply(mut r: LocalReply) -> LocalReply {
    let code = match r.status.as_u16() {
        400 => 13,
        401 => 16,
        403 => 7,
        404 => 12,
        429 | 502 | 503 | 504 => 14,
        _ => 2,
    };
    r.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    r.headers.insert(
        HeaderName::from_static("grpc-status"),
        HeaderValue::from(code),
    );
    if !r.body.is_empty() {
        let msg: String = String::from_utf8_lossy(&r.body)
            .bytes()
            .map(|b| {
                if (0x20..0x7f).contains(&b) && b != b'%' {
                    (b as char).to_string()
                } else {
                    format!("%{b:02X}")
                }
            })
            .collect();
        if let Ok(v) = HeaderValue::from_str(&msg) {
            r.headers.insert(HeaderName::from_static("grpc-message"), v);
        }
    }
    r.status = StatusCode::OK;
    r.body = bytes::Bytes::new();
    r
}

/// Length of the path the route's match consumed, for `prefix_rewrite`.
fn matched_prefix_len(route: &Route) -> usize {
    match &route.matcher.path {
        PathMatch::Prefix(p) | PathMatch::SeparatedPrefix(p) | PathMatch::Exact(p) => p.len(),
        PathMatch::Regex(_) => 0,
    }
}

fn split_host_port(host: &str) -> (&str, Option<&str>) {
    if host.starts_with('[') {
        if let Some(end) = host.find(']') {
            let rest = &host[end + 1..];
            return (&host[..=end], rest.strip_prefix(':'));
        }
    }
    match host.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => (h, Some(p)),
        _ => (host, None),
    }
}

fn is_websocket(h: &HeaderMap) -> bool {
    h.get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"))
}

fn strip_hop_by_hop(h: &mut HeaderMap, keep_upgrade: bool) {
    if !keep_upgrade {
        h.remove(header::CONNECTION);
        h.remove(header::UPGRADE);
    }
    h.remove(KEEP_ALIVE);
    h.remove(PROXY_CONNECTION);
    h.remove(header::TRANSFER_ENCODING);
    if h.get(header::TE)
        .is_some_and(|v| v.as_bytes() != b"trailers")
    {
        h.remove(header::TE);
    }
}

fn compute_hash(policies: &[HashPolicy], headers: &HeaderMap, remote: SocketAddr) -> Option<u64> {
    let mut acc: Option<u64> = None;
    for p in policies {
        let (h, terminal) = match p {
            HashPolicy::Header { name, terminal } => {
                (headers.get(name).map(|v| hash64(v.as_bytes())), *terminal)
            }
            HashPolicy::Cookie { name, terminal } => (
                headers
                    .get_all(header::COOKIE)
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .flat_map(|v| v.split(';'))
                    .find_map(|c| c.trim().strip_prefix(name.as_str())?.strip_prefix('='))
                    .map(|v| hash64(v.as_bytes())),
                *terminal,
            ),
            HashPolicy::SourceIp { terminal } => {
                (Some(hash64(remote.ip().to_string().as_bytes())), *terminal)
            }
        };
        if let Some(h) = h {
            acc = Some(match acc {
                Some(a) => a.rotate_left(1) ^ h,
                None => h,
            });
            if terminal {
                break;
            }
        }
    }
    acc
}
