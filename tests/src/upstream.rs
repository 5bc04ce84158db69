//! Named echo upstreams on 127.0.0.1:0.
//!
//! Each serves HTTP/1.1 and h2c (prior knowledge) on one port, or the same over TLS with ALPN
//! `h2`/`http/1.1`. A request is answered with JSON describing what arrived:
//!
//! ```json
//! {"upstream": "a", "method": "GET", "path": "/x?y=1", "host": "example.com",
//!  "headers": {"user-agent": "..."}, "body": "...", "tls": false, "sni": null, "version": "HTTP/1.1"}
//! ```
//!
//! Control headers: `x-echo-status: 503` sets the status, `x-echo-header: name=value` (repeatable)
//! adds a response header, `x-echo-delay-ms: 500` delays the response, `x-echo-body: text`
//! replaces the JSON body, `x-echo-body-size: N` replaces it with N bytes of `y`, and
//! `x-echo-chunks: N` sends the body as N frames with no content-length (chunked on HTTP/1.1). Requests with `content-type: application/grpc*` are served by the
//! gRPC echo in [`crate::grpc`].

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::certs::{provider, TestPki};
use crate::grpc::{self, RespBody};

/// Upper bound on `x-echo-delay-ms`, so a typo cannot hang a test.
const MAX_DELAY: Duration = Duration::from_secs(10);

/// Upper bound on `x-echo-body-size`.
const MAX_BODY: usize = 16 * 1024 * 1024;

/// What an echo upstream reports about the request it received.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Echo {
    pub upstream: String,
    pub method: String,
    pub path: String,
    pub host: Option<String>,
    pub headers: BTreeMap<String, String>,
    pub body: String,
    pub tls: bool,
    pub sni: Option<String>,
    pub version: String,
}

/// A running echo upstream; stops when dropped.
#[derive(Debug)]
pub struct Upstream {
    pub name: String,
    pub addr: SocketAddr,
    requests: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Upstream {
    /// How many requests (of any kind) it has received.
    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }

    /// Starts a plaintext upstream (HTTP/1.1 and h2c).
    pub async fn plain(name: &str) -> Result<Self> {
        Self::start(name, None).await
    }

    /// Starts a TLS upstream using `server.pem` from `pki`.
    pub async fn tls(name: &str, pki: &TestPki) -> Result<Self> {
        Self::start(name, Some(pki)).await
    }

    async fn start(name: &str, pki: Option<&TestPki>) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let requests = Arc::new(AtomicUsize::new(0));
        let acceptor = match pki {
            Some(pki) => {
                let mut config = rustls::ServerConfig::builder_with_provider(provider())
                    .with_safe_default_protocol_versions()?
                    .with_no_client_auth()
                    .with_single_cert(pki.server.chain.clone(), pki.server.key())?;
                config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
                Some(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
            }
            None => None,
        };
        let ctx = Arc::new(Ctx {
            name: name.to_string(),
            requests: requests.clone(),
        });
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let _ = tcp.set_nodelay(true);
                let ctx = ctx.clone();
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    match acceptor {
                        None => serve(tcp, ctx, None).await,
                        Some(acceptor) => {
                            let Ok(tls) = acceptor.accept(tcp).await else {
                                return;
                            };
                            let sni = tls.get_ref().1.server_name().map(str::to_string);
                            serve(tls, ctx, Some(sni)).await
                        }
                    }
                });
            }
        });
        Ok(Self {
            name: name.to_string(),
            addr,
            requests,
            task,
        })
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct Ctx {
    name: String,
    requests: Arc<AtomicUsize>,
}

/// `tls` is `Some(sni)` on a TLS connection.
async fn serve<IO>(io: IO, ctx: Arc<Ctx>, tls: Option<Option<String>>)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |req| {
        let ctx = ctx.clone();
        let tls = tls.clone();
        async move { Ok::<_, Infallible>(handle(req, &ctx, tls).await) }
    });
    let _ = auto::Builder::new(TokioExecutor::new())
        .serve_connection(TokioIo::new(io), service)
        .await;
}

fn header<'a>(req: &'a http::Request<Incoming>, name: &str) -> Option<&'a str> {
    req.headers().get(name).and_then(|v| v.to_str().ok())
}

async fn handle(
    req: http::Request<Incoming>,
    ctx: &Ctx,
    tls: Option<Option<String>>,
) -> http::Response<RespBody> {
    ctx.requests.fetch_add(1, Ordering::SeqCst);
    if header(&req, "content-type").is_some_and(|ct| ct.starts_with("application/grpc")) {
        return grpc::echo_call(req, ctx.name.clone());
    }
    let status = header(&req, "x-echo-status")
        .and_then(|s| s.parse::<u16>().ok())
        .and_then(|s| http::StatusCode::from_u16(s).ok())
        .unwrap_or(http::StatusCode::OK);
    let delay = header(&req, "x-echo-delay-ms")
        .and_then(|s| s.parse::<u64>().ok())
        .map(Duration::from_millis)
        .unwrap_or_default()
        .min(MAX_DELAY);
    let literal_body = header(&req, "x-echo-body").map(str::to_string).or_else(|| {
        header(&req, "x-echo-body-size")
            .and_then(|n| n.parse::<usize>().ok())
            .map(|n| "y".repeat(n.min(MAX_BODY)))
    });
    let chunks = header(&req, "x-echo-chunks")
        .and_then(|n| n.parse::<usize>().ok())
        .unwrap_or(1)
        .clamp(1, 1024);
    let extra: Vec<(String, String)> = req
        .headers()
        .get_all("x-echo-header")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .filter_map(|v| v.split_once('='))
        .map(|(n, v)| (n.trim().to_string(), v.trim().to_string()))
        .collect();

    let mut headers: BTreeMap<String, String> = BTreeMap::new();
    for (name, value) in req.headers() {
        let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
        headers
            .entry(name.as_str().to_string())
            .and_modify(|v| {
                v.push_str(", ");
                v.push_str(&value);
            })
            .or_insert(value);
    }
    let host = header(&req, "host")
        .map(str::to_string)
        .or_else(|| req.uri().authority().map(|a| a.to_string()));
    let method = req.method().to_string();
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.to_string())
        .unwrap_or_else(|| "/".into());
    let version = format!("{:?}", req.version());
    let body = match req.into_body().collect().await {
        Ok(c) => String::from_utf8_lossy(&c.to_bytes()).into_owned(),
        Err(e) => format!("<body error: {e}>"),
    };
    let echo = Echo {
        upstream: ctx.name.clone(),
        method,
        path,
        host,
        headers,
        body,
        tls: tls.is_some(),
        sni: tls.flatten(),
        version,
    };
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let (content_type, payload) = match literal_body {
        Some(text) => ("text/plain", Bytes::from(text)),
        None => (
            "application/json",
            Bytes::from(serde_json::to_vec(&echo).unwrap_or_default()),
        ),
    };
    let body = if chunks > 1 {
        // Separate frames and no length: chunked on HTTP/1.1.
        let size = payload.len().div_ceil(chunks).max(1);
        let frames: Vec<Result<Frame<Bytes>, Infallible>> = payload
            .chunks(size)
            .map(|c| Ok(Frame::data(Bytes::copy_from_slice(c))))
            .collect();
        StreamBody::new(futures_util::stream::iter(frames)).boxed()
    } else {
        Full::new(payload).boxed()
    };
    let mut response = http::Response::new(body);
    *response.status_mut() = status;
    let h = response.headers_mut();
    h.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    if let Ok(v) = http::HeaderValue::from_str(&ctx.name) {
        h.insert("x-upstream", v);
    }
    for (name, value) in extra {
        if let (Ok(n), Ok(v)) = (
            http::HeaderName::from_bytes(name.as_bytes()),
            http::HeaderValue::from_str(&value),
        ) {
            h.append(n, v);
        }
    }
    response
}
