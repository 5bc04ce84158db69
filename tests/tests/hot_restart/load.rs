//! A load generator that behaves like a well-written client during a hot restart: HTTP/1.1
//! keep-alive connections (a new connection after `Connection: close`), HTTP/2 connections
//! with many concurrent streams (a new connection after GOAWAY), and long-lived gRPC
//! bidirectional streams that send and check one message after another.
//!
//! It counts what a client sees. A request is *failed* when it was sent and got an error or
//! a status other than 200; a connection error is a refused or reset connect. A request the
//! server never processed because its connection was going away (handed back unsent by the
//! client library, or refused by GOAWAY, RFC 9113 §6.8) is sent again on a new connection and
//! counted as `unsent_retried`, as HTTP/2 clients do.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Buf as _, Bytes, BytesMut};
use http_body_util::{BodyExt, Empty, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::task::JoinSet;

/// How long one request or one gRPC message may take.
const STEP_TIMEOUT: Duration = Duration::from_secs(5);

/// Upper bound on requests per HTTP/1.1 or HTTP/2 connection, so no loop is unbounded.
const MAX_PER_CONNECTION: u64 = 1_000_000;

/// The shape of the load.
#[derive(Debug, Clone)]
pub struct Shape {
    pub h1_connections: usize,
    pub h2_connections: usize,
    /// Concurrent streams on each HTTP/2 connection.
    pub h2_streams: usize,
    pub grpc_streams: usize,
    /// How long one gRPC stream lives.
    pub grpc_stream_time: Duration,
    /// Pause between two messages of a gRPC stream.
    pub grpc_interval: Duration,
}

impl Default for Shape {
    fn default() -> Self {
        Self {
            h1_connections: 4,
            h2_connections: 2,
            h2_streams: 8,
            grpc_streams: 1,
            grpc_stream_time: Duration::from_secs(3),
            grpc_interval: Duration::from_millis(20),
        }
    }
}

/// What the clients saw.
#[derive(Debug, Default)]
pub struct Counts {
    pub h1_ok: AtomicU64,
    pub h1_failed: AtomicU64,
    /// HTTP/1.1 connections the proxy closed without a `Connection: close` first.
    pub h1_closed_unannounced: AtomicU64,
    pub h2_ok: AtomicU64,
    pub h2_failed: AtomicU64,
    /// Handed back unsent by the client library; sent again on a new connection.
    pub unsent_retried: AtomicU64,
    /// Refused by the server's GOAWAY (never processed); sent again on a new connection.
    pub goaway_retried: AtomicU64,
    pub grpc_messages: AtomicU64,
    pub grpc_streams_ok: AtomicU64,
    pub grpc_failed: AtomicU64,
    pub connect_errors: AtomicU64,
    pub connections: AtomicU64,
}

impl Counts {
    fn inc(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// Successful HTTP requests so far (HTTP/1.1 and HTTP/2, not gRPC).
    pub fn ok(&self) -> u64 {
        self.h1_ok.load(Ordering::Relaxed) + self.h2_ok.load(Ordering::Relaxed)
    }

    /// Failed requests, failed gRPC streams, unannounced closes and connect errors.
    pub fn failures(&self) -> u64 {
        self.h1_failed.load(Ordering::Relaxed)
            + self.h1_closed_unannounced.load(Ordering::Relaxed)
            + self.h2_failed.load(Ordering::Relaxed)
            + self.grpc_failed.load(Ordering::Relaxed)
            + self.connect_errors.load(Ordering::Relaxed)
    }

    /// One line per counter, for the test output.
    pub fn report(&self) -> String {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        format!(
            "load generator counts:\n  http/1.1 ok {}  failed {}  closed without Connection: close {}\n  http/2   ok {}  failed {}  retried: handed back unsent {}, refused by GOAWAY {}\n  grpc     messages echoed {}  streams completed {}  failed {}\n  connections opened {}  connect errors {}",
            g(&self.h1_ok),
            g(&self.h1_failed),
            g(&self.h1_closed_unannounced),
            g(&self.h2_ok),
            g(&self.h2_failed),
            g(&self.unsent_retried),
            g(&self.goaway_retried),
            g(&self.grpc_messages),
            g(&self.grpc_streams_ok),
            g(&self.grpc_failed),
            g(&self.connections),
            g(&self.connect_errors),
        )
    }
}

/// Running load; [`Load::stop`] ends it.
#[derive(Debug)]
pub struct Load {
    pub counts: Arc<Counts>,
    errors: Arc<Mutex<Vec<String>>>,
    stop: watch::Sender<bool>,
    tasks: JoinSet<()>,
}

#[derive(Clone)]
struct Ctx {
    addr: SocketAddr,
    counts: Arc<Counts>,
    errors: Arc<Mutex<Vec<String>>>,
    stop: watch::Receiver<bool>,
}

impl Ctx {
    fn stopped(&self) -> bool {
        *self.stop.borrow()
    }

    fn error(&self, counter: &AtomicU64, what: String) {
        Counts::inc(counter);
        if let Ok(mut e) = self.errors.lock() {
            if e.len() < 20 {
                e.push(what);
            }
        }
    }

    async fn connect(&self) -> Option<TcpStream> {
        match TcpStream::connect(self.addr).await {
            Ok(tcp) => {
                let _ = tcp.set_nodelay(true);
                Counts::inc(&self.counts.connections);
                Some(tcp)
            }
            Err(e) => {
                self.error(&self.counts.connect_errors, format!("connect: {e}"));
                // Do not spin on a dead address.
                tokio::time::sleep(Duration::from_millis(10)).await;
                None
            }
        }
    }
}

impl Load {
    /// Starts the load against `addr`.
    pub fn start(addr: SocketAddr, shape: &Shape) -> Self {
        let (stop, stop_rx) = watch::channel(false);
        let ctx = Ctx {
            addr,
            counts: Arc::default(),
            errors: Arc::default(),
            stop: stop_rx,
        };
        let mut tasks = JoinSet::new();
        for _ in 0..shape.h1_connections {
            tasks.spawn(h1_client(ctx.clone()));
        }
        for _ in 0..shape.h2_connections {
            tasks.spawn(h2_client(ctx.clone(), shape.h2_streams));
        }
        for _ in 0..shape.grpc_streams {
            tasks.spawn(grpc_client(
                ctx.clone(),
                shape.grpc_stream_time,
                shape.grpc_interval,
            ));
        }
        Self {
            counts: ctx.counts,
            errors: ctx.errors,
            stop,
            tasks,
        }
    }

    /// Stops the clients (a gRPC stream in progress completes first) and returns the first
    /// errors seen.
    pub async fn stop(mut self) -> Vec<String> {
        let _ = self.stop.send(true);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while tokio::time::timeout_at(deadline, self.tasks.join_next())
            .await
            .ok()
            .flatten()
            .is_some()
        {}
        self.tasks.abort_all();
        self.errors.lock().map(|e| e.clone()).unwrap_or_default()
    }
}

fn get(path: &str, h2: bool) -> http::Request<Empty<Bytes>> {
    let mut b = http::Request::builder().method("GET");
    b = if h2 {
        b.uri(format!("http://load.test{path}"))
    } else {
        b.uri(path).header(http::header::HOST, "load.test")
    };
    b.body(Empty::new()).unwrap_or_default()
}

async fn h1_client(ctx: Ctx) {
    while !ctx.stopped() {
        let Some(tcp) = ctx.connect().await else {
            continue;
        };
        let (mut sender, conn) =
            match hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await {
                Ok(h) => h,
                Err(e) => {
                    ctx.error(&ctx.counts.connect_errors, format!("h1 handshake: {e}"));
                    continue;
                }
            };
        tokio::spawn(conn);
        for _ in 0..MAX_PER_CONNECTION {
            if ctx.stopped() {
                return;
            }
            if sender.ready().await.is_err() {
                ctx.error(
                    &ctx.counts.h1_closed_unannounced,
                    "h1 connection closed without Connection: close".into(),
                );
                break;
            }
            let sent = tokio::time::timeout(STEP_TIMEOUT, async {
                let resp = sender.send_request(get("/load/h1", false)).await?;
                let status = resp.status();
                let close = resp
                    .headers()
                    .get(http::header::CONNECTION)
                    .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
                resp.into_body().collect().await?;
                Ok::<_, hyper::Error>((status, close))
            })
            .await;
            match sent {
                Ok(Ok((status, close))) => {
                    if status == http::StatusCode::OK {
                        Counts::inc(&ctx.counts.h1_ok);
                    } else {
                        ctx.error(&ctx.counts.h1_failed, format!("h1 status {status}"));
                    }
                    if close {
                        break;
                    }
                }
                Ok(Err(e)) => {
                    ctx.error(&ctx.counts.h1_failed, format!("h1 request: {e}"));
                    break;
                }
                Err(_) => {
                    ctx.error(&ctx.counts.h1_failed, "h1 request timed out".into());
                    break;
                }
            }
        }
    }
}

/// A request the server never processed because the connection was going away: the
/// stream was refused locally after a GOAWAY, or was above the GOAWAY's last stream id
/// (RFC 9113 §6.8). Clients retry these on a new connection.
fn refused_by_goaway(e: &hyper::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(h2) = s.downcast_ref::<h2::Error>() {
            return h2.is_go_away() && h2.is_remote() && h2.reason() == Some(h2::Reason::NO_ERROR);
        }
        source = s.source();
    }
    false
}

enum H2Outcome {
    Done(http::StatusCode),
    Unsent,
    Refused,
    Failed(String),
}

async fn h2_client(ctx: Ctx, streams: usize) {
    while !ctx.stopped() {
        let Some(tcp) = ctx.connect().await else {
            continue;
        };
        let (sender, conn) =
            match hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
                .await
            {
                Ok(h) => h,
                Err(e) => {
                    ctx.error(&ctx.counts.connect_errors, format!("h2 handshake: {e}"));
                    continue;
                }
            };
        tokio::spawn(conn);
        let mut set = JoinSet::new();
        for _ in 0..streams {
            let mut sender = sender.clone();
            let ctx = ctx.clone();
            set.spawn(async move {
                for _ in 0..MAX_PER_CONNECTION {
                    if ctx.stopped() || sender.is_closed() {
                        return;
                    }
                    let sent = tokio::time::timeout(STEP_TIMEOUT, async {
                        match sender.try_send_request(get("/load/h2", true)).await {
                            Ok(resp) => {
                                let status = resp.status();
                                match resp.into_body().collect().await {
                                    Ok(_) => H2Outcome::Done(status),
                                    Err(e) => H2Outcome::Failed(format!("body: {e:?}")),
                                }
                            }
                            Err(mut e) => match e.take_message() {
                                Some(_) => H2Outcome::Unsent,
                                None if refused_by_goaway(e.error()) => H2Outcome::Refused,
                                None => H2Outcome::Failed(format!("{:?}", e.error())),
                            },
                        }
                    })
                    .await;
                    match sent {
                        Ok(H2Outcome::Done(status)) if status == http::StatusCode::OK => {
                            Counts::inc(&ctx.counts.h2_ok)
                        }
                        Ok(H2Outcome::Done(status)) => {
                            ctx.error(&ctx.counts.h2_failed, format!("h2 status {status}"))
                        }
                        Ok(H2Outcome::Unsent) => {
                            // Never sent: the connection is going away.
                            Counts::inc(&ctx.counts.unsent_retried);
                            return;
                        }
                        Ok(H2Outcome::Refused) => {
                            Counts::inc(&ctx.counts.goaway_retried);
                            return;
                        }
                        Ok(H2Outcome::Failed(e)) => {
                            ctx.error(&ctx.counts.h2_failed, format!("h2 request: {e}"));
                            return;
                        }
                        Err(_) => {
                            ctx.error(&ctx.counts.h2_failed, "h2 request timed out".into());
                            return;
                        }
                    }
                }
            });
        }
        while set.join_next().await.is_some() {}
    }
}

/// A gRPC frame: flag byte, big-endian length, message.
fn grpc_frame(message: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(5 + message.len());
    out.push(0);
    out.extend_from_slice(&(message.len() as u32).to_be_bytes());
    out.extend_from_slice(message);
    out.into()
}

/// One complete message off the front of `buf`, if there is one.
fn take_message(buf: &mut BytesMut) -> Option<Bytes> {
    let len = u32::from_be_bytes(buf.get(1..5)?.try_into().ok()?) as usize;
    if buf.len() < 5 + len {
        return None;
    }
    buf.advance(5);
    Some(buf.split_to(len).freeze())
}

type GrpcBody = StreamBody<tokio_stream::wrappers::ReceiverStream<Result<Frame<Bytes>, String>>>;

async fn grpc_client(ctx: Ctx, stream_time: Duration, interval: Duration) {
    let mut stream_no = 0u64;
    while !ctx.stopped() {
        let Some(tcp) = ctx.connect().await else {
            continue;
        };
        let (mut sender, conn) = match hyper::client::conn::http2::handshake::<_, _, GrpcBody>(
            TokioExecutor::new(),
            TokioIo::new(tcp),
        )
        .await
        {
            Ok(h) => h,
            Err(e) => {
                ctx.error(&ctx.counts.connect_errors, format!("grpc handshake: {e}"));
                continue;
            }
        };
        tokio::spawn(conn);
        for _ in 0..MAX_PER_CONNECTION {
            if ctx.stopped() || sender.is_closed() {
                break;
            }
            stream_no += 1;
            match grpc_stream(&ctx, &mut sender, stream_no, stream_time, interval).await {
                Ok(true) => Counts::inc(&ctx.counts.grpc_streams_ok),
                Ok(false) => break,
                Err(e) => {
                    ctx.error(&ctx.counts.grpc_failed, format!("grpc stream: {e}"));
                    break;
                }
            }
        }
    }
}

/// One bidirectional stream: sends a message, waits for its echo, for `stream_time`.
/// `Ok(false)` when the connection refused the stream before sending it.
async fn grpc_stream(
    ctx: &Ctx,
    sender: &mut hyper::client::conn::http2::SendRequest<GrpcBody>,
    stream_no: u64,
    stream_time: Duration,
    interval: Duration,
) -> anyhow::Result<bool> {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let body = StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    let req = http::Request::builder()
        .method("POST")
        .uri("http://load.test/echo.Echo/Stream")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(body)?;
    let resp = match tokio::time::timeout(STEP_TIMEOUT, sender.try_send_request(req)).await {
        Err(_) => anyhow::bail!("no response headers in {STEP_TIMEOUT:?}"),
        Ok(Err(mut e)) => match e.take_message() {
            Some(_) => {
                Counts::inc(&ctx.counts.unsent_retried);
                return Ok(false);
            }
            None if refused_by_goaway(e.error()) => {
                Counts::inc(&ctx.counts.goaway_retried);
                return Ok(false);
            }
            None => anyhow::bail!("{:?}", e.error()),
        },
        Ok(Ok(r)) => r,
    };
    anyhow::ensure!(resp.status() == 200, "status {}", resp.status());
    let mut body = resp.into_body();
    let mut buf = BytesMut::new();
    let end = tokio::time::Instant::now() + stream_time;
    let mut seq = 0u64;
    while tokio::time::Instant::now() < end {
        seq += 1;
        let message = format!("stream {stream_no} message {seq}");
        tx.send(Ok(Frame::data(grpc_frame(message.as_bytes()))))
            .await
            .map_err(|_| anyhow::anyhow!("request body closed"))?;
        let echoed = tokio::time::timeout(STEP_TIMEOUT, async {
            loop {
                if let Some(m) = take_message(&mut buf) {
                    return Ok(m);
                }
                match body.frame().await {
                    Some(Ok(f)) => match f.into_data() {
                        Ok(d) => buf.extend_from_slice(&d),
                        Err(f) => anyhow::bail!("stream ended early: {f:?}"),
                    },
                    Some(Err(e)) => anyhow::bail!("{e}"),
                    None => anyhow::bail!("stream ended after {seq} messages"),
                }
            }
        })
        .await
        .map_err(|_| anyhow::anyhow!("no echo of message {seq} in {STEP_TIMEOUT:?}"))??;
        anyhow::ensure!(
            echoed == message.as_bytes(),
            "echo {echoed:?} for {message:?}"
        );
        Counts::inc(&ctx.counts.grpc_messages);
        if ctx.stopped() {
            break;
        }
        tokio::time::sleep(interval).await;
    }
    drop(tx);
    let trailers = tokio::time::timeout(STEP_TIMEOUT, async {
        loop {
            match body.frame().await {
                Some(Ok(f)) => {
                    if let Ok(t) = f.into_trailers() {
                        return Ok(t);
                    }
                }
                Some(Err(e)) => anyhow::bail!("{e}"),
                None => anyhow::bail!("no trailers"),
            }
        }
    })
    .await
    .map_err(|_| anyhow::anyhow!("no trailers in {STEP_TIMEOUT:?}"))??;
    let status = trailers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    anyhow::ensure!(status == "0", "grpc-status {status:?}");
    Ok(true)
}
