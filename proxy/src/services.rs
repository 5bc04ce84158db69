//! The proxy's side of the filters' capability traits (`legate_filters::Services`): calls to
//! clusters through the same host pools the router uses, and the filters' counters.
//!
//! Filters are built while the configuration is read, before the [`Runtime`] exists, so the
//! cluster client holds a handle that [`ProxyServices::bind`] points at the runtime once it
//! is running. Each call looks the cluster up in the snapshot current at that moment, so a
//! configuration swap is honoured by calls made after it.

use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use http::header::{HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use legate_filters::{
    BoxFuture, CallError, ClusterClient, GrpcCall, GrpcReply, Services, StatsScope, StatsStore,
};

use crate::cluster::Cluster;
use crate::server::Runtime;
use crate::stats::Stat;
use crate::upstream::UpstreamBody;

/// The largest response body a filter's call reads.
const MAX_RESPONSE_BYTES: usize = 4 * 1024 * 1024;

/// Cluster calls and counters for the filters of one proxy process.
#[derive(Debug, Default)]
pub struct ProxyServices {
    runtime: OnceLock<Weak<Runtime>>,
    stats: Arc<StatsStore>,
}

impl ProxyServices {
    /// Services not yet bound to a runtime (calls fail with `Unavailable` until
    /// [`bind`](Self::bind)).
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Points cluster calls at the running proxy.
    pub fn bind(&self, runtime: &Arc<Runtime>) {
        let _ = self.runtime.set(Arc::downgrade(runtime));
    }

    /// The handle given to the filter registry.
    pub fn handle(self: &Arc<Self>) -> Services {
        Services {
            clusters: Arc::new(Caller(self.clone())),
            stats: StatsScope::new(self.stats.clone(), ""),
        }
    }

    /// The filters' counters, for `/stats`.
    pub fn render(&self, out: &mut Vec<(String, Stat)>) {
        out.extend(
            self.stats
                .snapshot()
                .into_iter()
                .map(|(name, v)| (name, Stat::Counter(v))),
        );
    }

    fn cluster(&self, name: &str) -> Result<Arc<Cluster>, CallError> {
        let runtime = self
            .runtime
            .get()
            .and_then(Weak::upgrade)
            .ok_or(CallError::Unavailable)?;
        let snapshot = runtime.snapshot.load();
        snapshot
            .clusters
            .get(name)
            .cloned()
            .ok_or_else(|| CallError::UnknownCluster(name.to_owned()))
    }
}

#[derive(Debug)]
struct Caller(Arc<ProxyServices>);

impl ClusterClient for Caller {
    fn grpc_unary(&self, call: GrpcCall) -> BoxFuture<Result<GrpcReply, CallError>> {
        let services = self.0.clone();
        Box::pin(async move {
            let timeout = call.timeout;
            match tokio::time::timeout(timeout, grpc_unary(&services, call)).await {
                Ok(r) => r,
                Err(_) => Err(CallError::Timeout),
            }
        })
    }

    fn http(
        &self,
        cluster: &str,
        request: Request<Bytes>,
        timeout: Duration,
    ) -> BoxFuture<Result<Response<Bytes>, CallError>> {
        let services = self.0.clone();
        let cluster = cluster.to_owned();
        Box::pin(async move {
            match tokio::time::timeout(timeout, http_call(&services, &cluster, request)).await {
                Ok(r) => r,
                Err(_) => Err(CallError::Timeout),
            }
        })
    }
}

/// Sends one request to a host of `cluster` and reads the whole response, counting it in the
/// cluster's stats as the router does.
async fn exchange(
    services: &ProxyServices,
    cluster: &str,
    request: Request<Bytes>,
) -> Result<(http::response::Parts, Bytes, Option<http::HeaderMap>), CallError> {
    let cluster = services.cluster(cluster)?;
    let host = cluster
        .balancer()
        .pick(None)
        .cloned()
        .ok_or_else(|| CallError::NoHost(cluster.config.name.clone()))?;
    let _active = host.track();
    cluster.stats.rq_total.inc();
    cluster.stats.rq_active.inc();
    let request = request.map(UpstreamBody::from);
    let sent = crate::upstream::send(&host, &cluster.config, &cluster.stats, request).await;
    cluster.stats.rq_active.dec();
    let (resp, pool) = sent.map_err(|e| {
        cluster.stats.rq_classes.record(503);
        CallError::Upstream(e.to_string())
    })?;
    cluster.stats.rq_classes.record(resp.status().as_u16());
    let (parts, body) = resp.into_parts();
    let collected = http_body_util::Limited::new(body, MAX_RESPONSE_BYTES)
        .collect()
        .await
        .map_err(|e| CallError::Protocol(e.to_string()))?;
    if let Some(p) = pool {
        p.release();
    }
    let trailers = collected.trailers().cloned();
    Ok((parts, collected.to_bytes(), trailers))
}

async fn http_call(
    services: &ProxyServices,
    cluster: &str,
    request: Request<Bytes>,
) -> Result<Response<Bytes>, CallError> {
    let (parts, body, _) = exchange(services, cluster, request).await?;
    Ok(Response::from_parts(parts, body))
}

async fn grpc_unary(services: &ProxyServices, call: GrpcCall) -> Result<GrpcReply, CallError> {
    let len = u32::try_from(call.message.len())
        .map_err(|_| CallError::Protocol("request message too large".into()))?;
    let mut frame = BytesMut::with_capacity(5 + call.message.len());
    frame.put_u8(0);
    frame.put_u32(len);
    frame.extend_from_slice(&call.message);
    let authority = if call.authority.is_empty() {
        call.cluster.as_str()
    } else {
        call.authority.as_str()
    };
    let mut req = Request::builder()
        .method(Method::POST)
        .uri(call.path.as_str())
        .version(http::Version::HTTP_2)
        .body(frame.freeze())
        .map_err(|e| CallError::Protocol(e.to_string()))?;
    let h = req.headers_mut();
    h.extend(call.metadata);
    let host = HeaderValue::from_str(authority).map_err(|e| CallError::Protocol(e.to_string()))?;
    h.insert(http::header::HOST, host);
    h.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    h.insert(http::header::TE, HeaderValue::from_static("trailers"));
    // gRPC's deadline, in milliseconds (at most 8 digits).
    let ms = call.timeout.as_millis().clamp(1, 99_999_999);
    if let Ok(v) = HeaderValue::from_str(&format!("{ms}m")) {
        h.insert(HeaderName::from_static("grpc-timeout"), v);
    }
    let (parts, body, trailers) = exchange(services, &call.cluster, req).await?;
    if parts.status != StatusCode::OK {
        // gRPC's mapping of HTTP statuses (https://github.com/grpc/grpc/blob/master/doc/http-grpc-status-mapping.md).
        let code = match parts.status.as_u16() {
            400 => 13,
            401 => 16,
            403 => 7,
            404 => 12,
            429 | 502..=504 => 14,
            _ => 2,
        };
        return Ok(GrpcReply::Status {
            code,
            message: format!("HTTP status {}", parts.status),
        });
    }
    // A trailers-only response carries the status in its headers.
    let meta = trailers.as_ref().unwrap_or(&parts.headers);
    let status = meta
        .get("grpc-status")
        .or_else(|| parts.headers.get("grpc-status"))
        .and_then(|v| v.to_str().ok()?.parse::<u32>().ok());
    let message = meta
        .get("grpc-message")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    match status {
        Some(0) => {}
        Some(code) => return Ok(GrpcReply::Status { code, message }),
        None => {
            return Err(CallError::Protocol("response without grpc-status".into()));
        }
    }
    if body.len() < 5 {
        return Err(CallError::Protocol("response without a message".into()));
    }
    if body[0] != 0 {
        return Err(CallError::Protocol(
            "compressed responses are not supported".into(),
        ));
    }
    let n = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
    if body.len() < 5 + n {
        return Err(CallError::Protocol("truncated response message".into()));
    }
    Ok(GrpcReply::Ok(body.slice(5..5 + n)))
}
