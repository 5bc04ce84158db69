//! Connections to upstream hosts: per-host pools of HTTP/1.1 connections (one request at a
//! time, returned to the pool when the response body ends) and one shared HTTP/2 connection,
//! over TCP or TLS.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::{http1, http2};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;

use crate::cluster::{ClusterConfig, Host, UpstreamProtocol};
use crate::filter_body::{BodyError, FilteredBody};
use crate::stats::ClusterStats;

pin_project_lite::pin_project! {
    /// The body of a request sent upstream: the downstream request's, streamed, or one the
    /// proxy built itself (a filter's call to a cluster).
    #[project = UpstreamBodyProj]
    #[derive(Debug)]
    pub enum UpstreamBody {
        Streamed { #[pin] body: Incoming },
        Full { #[pin] body: Full<Bytes> },
        /// The downstream request's, through the request data phases of the route's filters
        /// (only on routes with such a filter).
        Filtered { body: Box<FilteredBody> },
    }
}

impl From<Incoming> for UpstreamBody {
    fn from(body: Incoming) -> Self {
        UpstreamBody::Streamed { body }
    }
}

impl From<Bytes> for UpstreamBody {
    fn from(bytes: Bytes) -> Self {
        UpstreamBody::Full {
            body: Full::new(bytes),
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BodyError;

    #[inline]
    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.project() {
            UpstreamBodyProj::Streamed { body } => body.poll_frame(cx).map_err(|e| e.into()),
            UpstreamBodyProj::Full { body } => body
                .poll_frame(cx)
                .map(|f| f.map(|r| r.map_err(|never| match never {}))),
            UpstreamBodyProj::Filtered { body } => std::pin::Pin::new(body.as_mut()).poll_frame(cx),
        }
    }

    #[inline]
    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamBody::Streamed { body } => body.is_end_stream(),
            UpstreamBody::Full { body } => body.is_end_stream(),
            UpstreamBody::Filtered { body } => body.is_end_stream(),
        }
    }

    #[inline]
    fn size_hint(&self) -> SizeHint {
        match self {
            UpstreamBody::Streamed { body } => body.size_hint(),
            UpstreamBody::Full { body } => body.size_hint(),
            UpstreamBody::Filtered { body } => body.size_hint(),
        }
    }
}

/// TLS towards a cluster's hosts.
#[derive(Debug)]
pub struct UpstreamTls {
    pub config: Arc<rustls::ClientConfig>,
    /// The SNI to send; without it Legate sends none, like Envoy.
    pub sni: Option<ServerName<'static>>,
}

/// Why an upstream request failed, classified as Envoy's response flags are.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("connection timeout")]
    ConnectTimeout,
    #[error("connection failure: {0}")]
    ConnectFailed(std::io::Error),
    #[error("TLS error: {0}")]
    Tls(std::io::Error),
    #[error("protocol error: {0}")]
    Handshake(hyper::Error),
    #[error("connection termination: {0}")]
    Reset(hyper::Error),
}

impl UpstreamError {
    /// Envoy's response flag for this failure.
    pub fn response_flag(&self) -> &'static str {
        match self {
            UpstreamError::ConnectTimeout
            | UpstreamError::ConnectFailed(_)
            | UpstreamError::Tls(_)
            | UpstreamError::Handshake(_) => "UF",
            UpstreamError::Reset(_) => "UC",
        }
    }

    /// Envoy's local reply body for this failure.
    pub fn body(&self) -> String {
        let reason = match self {
            UpstreamError::ConnectTimeout | UpstreamError::ConnectFailed(_) => {
                "connection failure".to_owned()
            }
            UpstreamError::Tls(e) => format!("connection failure, transport failure reason: {e}"),
            UpstreamError::Handshake(_) => "protocol error".to_owned(),
            UpstreamError::Reset(_) => "connection termination".to_owned(),
        };
        format!("upstream connect error or disconnect/reset before headers. reset reason: {reason}")
    }
}

/// Idle and shared connections of one host.
#[derive(Debug, Default)]
pub struct Pool {
    idle: Mutex<Vec<http1::SendRequest<UpstreamBody>>>,
    h2: Mutex<Option<http2::SendRequest<UpstreamBody>>>,
}

/// Hands an HTTP/1.1 connection back to its host's pool once the response has been read.
#[derive(Debug)]
pub struct PoolReturn {
    host: Arc<Host>,
    sender: http1::SendRequest<UpstreamBody>,
}

impl PoolReturn {
    /// Returns the connection for reuse.
    pub fn release(self) {
        if !self.sender.is_closed() {
            if let Ok(mut idle) = self.host.pool.idle.lock() {
                idle.push(self.sender);
            }
        }
    }
}

enum Connected {
    H1(http1::SendRequest<UpstreamBody>),
    H2(http2::SendRequest<UpstreamBody>),
}

trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static> Io for T {}

/// Sends a request to `host`, reusing a pooled connection when one is free.
pub async fn send(
    host: &Arc<Host>,
    cluster: &ClusterConfig,
    stats: &ClusterStats,
    mut req: Request<UpstreamBody>,
) -> Result<(Response<Incoming>, Option<PoolReturn>), UpstreamError> {
    // A pooled connection may have been closed by the peer while idle; hyper hands the request
    // back when it was not sent, so it can go out on a fresh connection.
    if let Some(mut h2) = take_h2(host) {
        fit_request(&mut req, true, cluster.tls.is_some());
        match h2.try_send_request(req).await {
            Ok(resp) => return Ok((resp, None)),
            Err(mut e) => match e.take_message() {
                Some(r) => req = r,
                None => return Err(UpstreamError::Reset(e.into_error())),
            },
        }
    }
    while let Some(mut h1) = take_idle(host) {
        fit_request(&mut req, false, cluster.tls.is_some());
        match h1.try_send_request(req).await {
            Ok(resp) => {
                return Ok((
                    resp,
                    Some(PoolReturn {
                        host: host.clone(),
                        sender: h1,
                    }),
                ))
            }
            Err(mut e) => match e.take_message() {
                Some(r) => req = r,
                None => return Err(UpstreamError::Reset(e.into_error())),
            },
        }
    }
    match connect(host, cluster, stats).await? {
        Connected::H1(mut h1) => {
            fit_request(&mut req, false, cluster.tls.is_some());
            let resp = h1.send_request(req).await.map_err(UpstreamError::Reset)?;
            Ok((
                resp,
                Some(PoolReturn {
                    host: host.clone(),
                    sender: h1,
                }),
            ))
        }
        Connected::H2(mut h2) => {
            fit_request(&mut req, true, cluster.tls.is_some());
            if let Ok(mut slot) = host.pool.h2.lock() {
                *slot = Some(h2.clone());
            }
            let resp = h2.send_request(req).await.map_err(UpstreamError::Reset)?;
            Ok((resp, None))
        }
    }
}

/// Shapes a request for the upstream codec: HTTP/2 wants an absolute URI (its `:authority`
/// comes from the `Host` header) and no `Host`; HTTP/1.1 wants origin form and a `Host`.
fn fit_request<B>(req: &mut Request<B>, h2: bool, tls: bool) {
    let pq = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "/".into());
    if h2 {
        *req.version_mut() = http::Version::HTTP_2;
        let authority = req
            .headers_mut()
            .remove(http::header::HOST)
            .and_then(|h| h.to_str().ok().map(str::to_owned))
            .or_else(|| req.uri().authority().map(|a| a.as_str().to_owned()));
        let scheme = if tls { "https" } else { "http" };
        let mut b = http::Uri::builder()
            .scheme(scheme)
            .path_and_query(pq.as_str());
        if let Some(a) = authority.as_deref().filter(|a| !a.is_empty()) {
            b = b.authority(a);
        }
        if let Ok(u) = b.build() {
            *req.uri_mut() = u;
        }
    } else {
        *req.version_mut() = http::Version::HTTP_11;
        if req.uri().authority().is_some() {
            if let Some(a) = req.uri().authority().map(|a| a.as_str().to_owned()) {
                if !req.headers().contains_key(http::header::HOST) {
                    if let Ok(v) = http::HeaderValue::from_str(&a) {
                        req.headers_mut().insert(http::header::HOST, v);
                    }
                }
            }
            if let Ok(u) = http::Uri::builder().path_and_query(pq.as_str()).build() {
                *req.uri_mut() = u;
            }
        }
    }
}

fn take_h2(host: &Host) -> Option<http2::SendRequest<UpstreamBody>> {
    let mut slot = host.pool.h2.lock().ok()?;
    match slot.as_ref() {
        Some(s) if !s.is_closed() => Some(s.clone()),
        Some(_) => {
            *slot = None;
            None
        }
        None => None,
    }
}

fn take_idle(host: &Host) -> Option<http1::SendRequest<UpstreamBody>> {
    let mut idle = host.pool.idle.lock().ok()?;
    while let Some(s) = idle.pop() {
        if s.is_ready() {
            return Some(s);
        }
    }
    None
}

async fn connect(
    host: &Arc<Host>,
    cluster: &ClusterConfig,
    stats: &ClusterStats,
) -> Result<Connected, UpstreamError> {
    stats.cx_total.inc();
    let tcp = match tokio::time::timeout(cluster.connect_timeout, TcpStream::connect(host.address))
        .await
    {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            stats.cx_connect_fail.inc();
            return Err(UpstreamError::ConnectFailed(e));
        }
        Err(_) => {
            stats.cx_connect_timeout.inc();
            return Err(UpstreamError::ConnectTimeout);
        }
    };
    let _ = tcp.set_nodelay(true);
    let (io, h2): (Box<dyn Io>, bool) = match &cluster.tls {
        None => (Box::new(tcp), cluster.protocol == UpstreamProtocol::Http2),
        Some(tls) => {
            let name = tls
                .sni
                .clone()
                .unwrap_or_else(|| ServerName::IpAddress(host.address.ip().into()));
            let connector = tokio_rustls::TlsConnector::from(tls.config.clone());
            let s =
                match tokio::time::timeout(cluster.connect_timeout, connector.connect(name, tcp))
                    .await
                {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        stats.cx_connect_fail.inc();
                        return Err(UpstreamError::Tls(e));
                    }
                    Err(_) => {
                        stats.cx_connect_timeout.inc();
                        return Err(UpstreamError::ConnectTimeout);
                    }
                };
            let alpn_h2 = s.get_ref().1.alpn_protocol() == Some(b"h2");
            let h2 = match cluster.protocol {
                UpstreamProtocol::Http2 => true,
                UpstreamProtocol::Http1 => false,
                UpstreamProtocol::Alpn => alpn_h2,
            };
            (Box::new(s), h2)
        }
    };
    let io = TokioIo::new(io);
    let active = stats.cx_active.clone_handle();
    if h2 {
        let mut b = http2::Builder::new(TokioExecutor::new());
        b.timer(hyper_util::rt::TokioTimer::new());
        b.keep_alive_interval(None::<Duration>);
        let (sender, conn) = b.handshake(io).await.map_err(UpstreamError::Handshake)?;
        tokio::spawn(async move {
            active.inc();
            if let Err(e) = conn.await {
                tracing::debug!("upstream h2 connection ended: {e}");
            }
            active.dec();
        });
        Ok(Connected::H2(sender))
    } else {
        let (sender, conn) = http1::Builder::new()
            .handshake(io)
            .await
            .map_err(UpstreamError::Handshake)?;
        tokio::spawn(async move {
            active.inc();
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!("upstream h1 connection ended: {e}");
            }
            active.dec();
        });
        Ok(Connected::H1(sender))
    }
}
