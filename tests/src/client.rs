//! A small HTTP client over HTTP/1.1, h2c (prior knowledge) and TLS (ALPN h2/http1.1).
//!
//! One connection per request keeps results independent of connection reuse.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use bytes::Bytes;
use http::{HeaderName, HeaderValue, Method};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use crate::certs::{provider, TestPki};

/// How long one request may take, connection included.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// The marker in the error of a request that hit [`REQUEST_TIMEOUT`].
pub const TIMED_OUT: &str = "timed out after";

/// Which client certificate to present over TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ClientCert {
    #[default]
    None,
    /// `client.pem`, signed by the test CA.
    Client,
    /// `rogue-client.pem`, signed by an unrelated CA.
    Rogue,
}

/// The transport to the proxy.
#[derive(Debug, Clone)]
pub enum Transport {
    H1,
    H2c,
    Tls {
        pki: Arc<TestPki>,
        sni: String,
        alpn: Vec<String>,
        client_cert: ClientCert,
    },
}

/// A request body.
#[derive(Debug, Clone, Default)]
pub enum Body {
    #[default]
    Empty,
    /// Sent with a `content-length` (over HTTP/1.1).
    Full(Bytes),
    /// Sent as separate frames with no length: `transfer-encoding: chunked` over HTTP/1.1.
    Chunks(Vec<Bytes>),
}

/// A request to send.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    /// Path and query, as sent on the wire.
    pub path: String,
    /// The authority: the `host` header over HTTP/1.1, `:authority` over HTTP/2.
    pub host: String,
    pub headers: Vec<(String, String)>,
    pub body: Body,
}

impl Request {
    pub fn get(host: &str, path: &str) -> Self {
        Self {
            method: "GET".into(),
            path: path.into(),
            host: host.into(),
            headers: Vec::new(),
            body: Body::Empty,
        }
    }
}

/// What came back.
#[derive(Debug, Clone, Default)]
pub struct Response {
    pub status: u16,
    /// Lower-cased names, in the order received.
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
    pub trailers: Vec<(String, String)>,
    /// The ALPN protocol negotiated over TLS.
    pub alpn: Option<String>,
}

impl Response {
    /// All values of a header joined with `", "`, or `None` when absent.
    pub fn header(&self, name: &str) -> Option<String> {
        join_values(&self.headers, name)
    }

    /// A trailer, or `None` when absent.
    pub fn trailer(&self, name: &str) -> Option<String> {
        join_values(&self.trailers, name)
    }
}

pub(crate) fn join_values(pairs: &[(String, String)], name: &str) -> Option<String> {
    let values: Vec<&str> = pairs
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
        .collect();
    if values.is_empty() {
        None
    } else {
        Some(values.join(", "))
    }
}

type ReqBody = BoxBody<Bytes, Infallible>;

fn to_body(body: &Body) -> ReqBody {
    match body {
        Body::Empty => Empty::<Bytes>::new().boxed(),
        Body::Full(b) => Full::new(b.clone()).boxed(),
        Body::Chunks(chunks) => {
            let frames: Vec<Result<Frame<Bytes>, Infallible>> =
                chunks.iter().cloned().map(|c| Ok(Frame::data(c))).collect();
            StreamBody::new(futures_util::stream::iter(frames)).boxed()
        }
    }
}

fn build(req: &Request, h2: bool, scheme: &str) -> Result<http::Request<ReqBody>> {
    let method = Method::from_bytes(req.method.as_bytes())?;
    let uri = if h2 {
        format!("{scheme}://{}{}", req.host, req.path)
    } else {
        req.path.clone()
    };
    let mut builder = http::Request::builder().method(method).uri(uri);
    if !h2 {
        builder = builder.header(http::header::HOST, req.host.as_str());
    }
    let mut out = builder.body(to_body(&req.body))?;
    for (name, value) in &req.headers {
        let name = HeaderName::from_bytes(name.as_bytes())
            .with_context(|| format!("bad header name {name:?}"))?;
        let value =
            HeaderValue::from_str(value).with_context(|| format!("bad header value {value:?}"))?;
        out.headers_mut().append(name, value);
    }
    if h2 {
        *out.version_mut() = http::Version::HTTP_2;
    }
    Ok(out)
}

fn pairs(map: &http::HeaderMap) -> Vec<(String, String)> {
    map.iter()
        .map(|(n, v)| {
            (
                n.as_str().to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect()
}

/// Sends `req` `count` times, one after another, on the one connection `io`.
async fn exchange<IO>(
    io: IO,
    h2: bool,
    scheme: &str,
    req: &Request,
    count: usize,
) -> Result<Vec<Response>>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut out = Vec::with_capacity(count);
    if h2 {
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io)).await?;
        tokio::spawn(conn);
        for _ in 0..count {
            sender.ready().await?;
            out.push(collect(sender.send_request(build(req, h2, scheme)?).await?).await?);
        }
    } else {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
        tokio::spawn(conn);
        for _ in 0..count {
            sender.ready().await?;
            out.push(collect(sender.send_request(build(req, h2, scheme)?).await?).await?);
        }
    }
    Ok(out)
}

async fn collect(response: http::Response<hyper::body::Incoming>) -> Result<Response> {
    let status = response.status().as_u16();
    let headers = pairs(response.headers());
    let collected = response.into_body().collect().await?;
    let trailers = collected.trailers().map(pairs).unwrap_or_default();
    Ok(Response {
        status,
        headers,
        body: collected.to_bytes(),
        trailers,
        alpn: None,
    })
}

/// A rustls client config trusting the test CA.
pub fn tls_config(
    pki: &TestPki,
    alpn: &[String],
    cert: ClientCert,
) -> Result<rustls::ClientConfig> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(pki.roots()?);
    let mut config = match cert {
        ClientCert::None => builder.with_no_client_auth(),
        ClientCert::Client => {
            builder.with_client_auth_cert(pki.client.chain.clone(), pki.client.key())?
        }
        ClientCert::Rogue => {
            builder.with_client_auth_cert(pki.rogue_client.chain.clone(), pki.rogue_client.key())?
        }
    };
    config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    Ok(config)
}

/// Sends one request on a new connection to `addr`.
pub async fn send(addr: SocketAddr, transport: &Transport, req: &Request) -> Result<Response> {
    send_many(addr, transport, req, 1)
        .await?
        .pop()
        .ok_or_else(|| anyhow!("no response"))
}

/// Sends `req` `count` times in sequence over one new connection to `addr` (keep-alive on
/// HTTP/1.1, one stream after another on HTTP/2).
pub async fn send_many(
    addr: SocketAddr,
    transport: &Transport,
    req: &Request,
    count: usize,
) -> Result<Vec<Response>> {
    tokio::time::timeout(REQUEST_TIMEOUT, send_inner(addr, transport, req, count))
        .await
        .map_err(|_| anyhow!("request to {addr} {TIMED_OUT} {REQUEST_TIMEOUT:?}"))?
}

async fn send_inner(
    addr: SocketAddr,
    transport: &Transport,
    req: &Request,
    count: usize,
) -> Result<Vec<Response>> {
    let tcp = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    tcp.set_nodelay(true)?;
    match transport {
        Transport::H1 => exchange(tcp, false, "http", req, count).await,
        Transport::H2c => exchange(tcp, true, "http", req, count).await,
        Transport::Tls {
            pki,
            sni,
            alpn,
            client_cert,
        } => {
            let config = tls_config(pki, alpn, *client_cert)?;
            let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
            let name = ServerName::try_from(sni.clone())?;
            let tls = connector
                .connect(name, tcp)
                .await
                .context("TLS handshake")?;
            let negotiated = tls
                .get_ref()
                .1
                .alpn_protocol()
                .map(|p| String::from_utf8_lossy(p).into_owned());
            let h2 = negotiated.as_deref() == Some("h2");
            let mut responses = exchange(tls, h2, "https", req, count).await?;
            for r in &mut responses {
                r.alpn = negotiated.clone();
            }
            Ok(responses)
        }
    }
}

/// `GET path` over HTTP/1.1 to an admin endpoint; returns status and body.
pub async fn admin_get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let response = send(addr, &Transport::H1, &Request::get("localhost", path)).await?;
    Ok((
        response.status,
        String::from_utf8_lossy(&response.body).into_owned(),
    ))
}
