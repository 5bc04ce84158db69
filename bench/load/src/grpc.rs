//! A minimal gRPC echo service and load client over hyper's HTTP/2, written for the benchmark.
//!
//! The wire format is plain gRPC: `application/grpc`, each message prefixed by a compression
//! flag (0) and a big-endian u32 length, `grpc-status` in the trailers. The message is the
//! protobuf `message Blob { bytes data = 1; }`, encoded by hand (tag 0x0a, varint length, bytes).
//! Methods of the service `legate.bench.Echo`:
//! - `Unary`: one message in, the same message out;
//! - `Chat`: bidirectional streaming, every message echoed as it arrives (the client plays
//!   ping-pong: one message, wait for its echo, the next one);
//! - `Stream`: server streaming, the request message echoed `count` times back to back, where
//!   `count` is the `x-count` request header (default 100).

use std::convert::Infallible;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use bytes::{BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::stats::Samples;

pub type Body = BoxBody<Bytes, Infallible>;

pub const UNARY: &str = "/legate.bench.Echo/Unary";
pub const CHAT: &str = "/legate.bench.Echo/Chat";
pub const STREAM: &str = "/legate.bench.Echo/Stream";

/// One gRPC message frame carrying `Blob { data: payload }`.
pub fn frame(payload: &[u8]) -> Bytes {
    let mut pb = BytesMut::with_capacity(payload.len() + 6);
    pb.put_u8(0x0a); // field 1, wire type 2 (length-delimited)
    let mut len = payload.len() as u64;
    while len >= 0x80 {
        pb.put_u8((len as u8) | 0x80);
        len >>= 7;
    }
    pb.put_u8(len as u8);
    pb.put_slice(payload);
    let mut out = BytesMut::with_capacity(pb.len() + 5);
    out.put_u8(0);
    out.put_u32(pb.len() as u32);
    out.put_slice(&pb);
    out.freeze()
}

/// Splits complete gRPC message frames off the front of `buf` (whole frames, prefix included).
fn next_message(buf: &mut BytesMut) -> Option<Bytes> {
    if buf.len() < 5 {
        return None;
    }
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
    if buf.len() < 5 + len {
        return None;
    }
    Some(buf.split_to(5 + len).freeze())
}

fn ok_trailers() -> HeaderMap {
    let mut t = HeaderMap::new();
    t.insert("grpc-status", HeaderValue::from_static("0"));
    t
}

fn grpc_response(body: Body) -> Response<Body> {
    let mut resp = Response::new(body);
    resp.headers_mut()
        .insert("content-type", HeaderValue::from_static("application/grpc"));
    resp
}

async fn handle(req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_owned();
    if ![UNARY, CHAT, STREAM].contains(&path.as_str()) {
        let mut r = Response::new(Full::new(Bytes::new()).boxed());
        *r.status_mut() = StatusCode::NOT_FOUND;
        return Ok(r);
    }
    let count = req
        .headers()
        .get("x-count")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(100);
    let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, Infallible>>(16);
    let mut body = req.into_body();
    tokio::spawn(async move {
        let mut buf = BytesMut::new();
        let mut answered = false;
        // The whole request body is read before the trailers (no reset of a half-read stream).
        while let Some(Ok(f)) = body.frame().await {
            let Ok(data) = f.into_data() else { continue };
            buf.extend_from_slice(&data);
            while let Some(msg) = next_message(&mut buf) {
                if answered && path != CHAT {
                    continue; // Unary and Stream answer the first message only
                }
                answered = true;
                let copies = if path == STREAM { count } else { 1 };
                for _ in 0..copies {
                    if tx.send(Ok(Frame::data(msg.clone()))).await.is_err() {
                        return;
                    }
                }
            }
        }
        let _ = tx.send(Ok(Frame::trailers(ok_trailers()))).await;
    });
    Ok(grpc_response(
        StreamBody::new(ReceiverStream::new(rx)).boxed(),
    ))
}

/// Serves the echo service (HTTP/2 cleartext, prior knowledge) on 127.0.0.1:`port` forever.
pub async fn serve(port: u16) -> anyhow::Result<()> {
    let listener = TcpListener::bind(("127.0.0.1", port))
        .await
        .context("bind")?;
    println!("listening {}", listener.local_addr()?.port());
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .max_concurrent_streams(10_000)
                .serve_connection(TokioIo::new(stream), service_fn(handle))
                .await;
        });
    }
}

/// What a load run does on each of its concurrent streams.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// one Unary call after another
    Unary,
    /// one long Chat call: message, wait for the echo, next message
    Bidi,
    /// one Stream call after another, each answered with `--stream-count` messages
    Server,
}

/// `legate-load grpc`'s arguments.
#[derive(clap::Args)]
pub struct LoadArgs {
    #[arg(long)]
    pub port: u16,
    #[arg(long, value_enum, default_value = "unary")]
    pub mode: Mode,
    #[arg(long, default_value_t = 10)]
    pub connections: usize,
    /// concurrent streams (calls in flight), spread over the connections
    #[arg(long, default_value_t = 100)]
    pub streams: usize,
    #[arg(long, default_value_t = 10.0)]
    pub seconds: f64,
    /// message payload bytes
    #[arg(long, default_value_t = 64)]
    pub payload: usize,
    /// messages per call in --mode server
    #[arg(long, default_value_t = 100)]
    pub stream_count: usize,
}

fn request(path: &'static str, body: Body, stream_count: usize) -> anyhow::Result<Request<Body>> {
    Ok(Request::post(format!("http://bench{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("x-count", stream_count.to_string())
        .body(body)?)
}

fn check_status(resp_headers: &HeaderMap, trailers: Option<&HeaderMap>) -> anyhow::Result<()> {
    let st = trailers
        .and_then(|t| t.get("grpc-status"))
        .or_else(|| resp_headers.get("grpc-status"));
    match st.map(|v| v.as_bytes()) {
        Some(b"0") => Ok(()),
        other => bail!("grpc-status {other:?}"),
    }
}

/// Reads response frames until `want` whole messages arrived; returns the trailers if the body ended.
async fn read_messages(
    body: &mut Incoming,
    buf: &mut BytesMut,
    want: usize,
) -> anyhow::Result<(usize, Option<HeaderMap>)> {
    let mut got = 0;
    loop {
        while got < want && next_message(buf).is_some() {
            got += 1;
        }
        if got >= want {
            return Ok((got, None));
        }
        match body.frame().await {
            Some(Ok(f)) => match f.into_data() {
                Ok(d) => buf.extend_from_slice(&d),
                Err(f) => return Ok((got, f.into_trailers().ok())),
            },
            Some(Err(e)) => return Err(e.into()),
            None => return Ok((got, None)),
        }
    }
}

async fn unary_or_server(
    sender: &mut hyper::client::conn::http2::SendRequest<Body>,
    args: &LoadArgs,
    msg: &Bytes,
) -> anyhow::Result<usize> {
    let (path, want) = if args.mode == Mode::Server {
        (STREAM, args.stream_count)
    } else {
        (UNARY, 1)
    };
    sender.ready().await?;
    let resp = sender
        .send_request(request(path, Full::new(msg.clone()).boxed(), want)?)
        .await?;
    if resp.status() != StatusCode::OK {
        bail!("HTTP status {}", resp.status());
    }
    let (parts, mut body) = resp.into_parts();
    let mut buf = BytesMut::new();
    let (got, mut trailers) = read_messages(&mut body, &mut buf, want).await?;
    if got != want {
        bail!("{got} of {want} messages");
    }
    if trailers.is_none() {
        while let Some(f) = body.frame().await {
            if let Ok(t) = f?.into_trailers() {
                trailers = Some(t);
            }
        }
    }
    check_status(&parts.headers, trailers.as_ref())?;
    Ok(want)
}

/// One worker: calls (or ping-pongs on one Chat call) until `end`; latencies into `samples`.
async fn worker(
    mut sender: hyper::client::conn::http2::SendRequest<Body>,
    args: &LoadArgs,
    end: Instant,
) -> Samples {
    let mut samples = Samples::default();
    let msg = frame(&vec![b'x'; args.payload]);
    while Instant::now() < end {
        let t = Instant::now();
        let r = match args.mode {
            Mode::Bidi => chat(&mut sender, &msg, end, &mut samples).await,
            _ => unary_or_server(&mut sender, args, &msg).await,
        };
        match r {
            Ok(n) if args.mode != Mode::Bidi => {
                // server streaming: one sample per message, the call's time spread evenly
                let per = t.elapsed() / n.max(1) as u32;
                for _ in 0..n {
                    samples.record(per);
                }
            }
            Ok(_) => {}
            Err(_) => {
                samples.errors += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    samples
}

async fn chat(
    sender: &mut hyper::client::conn::http2::SendRequest<Body>,
    msg: &Bytes,
    end: Instant,
    samples: &mut Samples,
) -> anyhow::Result<usize> {
    let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, Infallible>>(2);
    sender.ready().await?;
    let mut t = Instant::now();
    tx.send(Ok(Frame::data(msg.clone()))).await?;
    let resp = sender
        .send_request(request(
            CHAT,
            StreamBody::new(ReceiverStream::new(rx)).boxed(),
            1,
        )?)
        .await?;
    if resp.status() != StatusCode::OK {
        bail!("HTTP status {}", resp.status());
    }
    let (parts, mut body) = resp.into_parts();
    let mut buf = BytesMut::new();
    let mut n = 0;
    loop {
        let (got, trailers) = read_messages(&mut body, &mut buf, 1).await?;
        if got != 1 {
            check_status(&parts.headers, trailers.as_ref())?;
            bail!("the Chat call ended early");
        }
        samples.record(t.elapsed());
        n += 1;
        if Instant::now() >= end {
            break;
        }
        t = Instant::now();
        tx.send(Ok(Frame::data(msg.clone()))).await?;
    }
    drop(tx); // end of the request stream: the server answers with its trailers
    let mut trailers = None;
    while let Some(f) = body.frame().await {
        if let Ok(tr) = f?.into_trailers() {
            trailers = Some(tr);
        }
    }
    check_status(&parts.headers, trailers.as_ref())?;
    Ok(n)
}

/// Opens `connections` HTTP/2 connections and runs `streams` concurrent workers over them.
pub async fn load(args: LoadArgs) -> anyhow::Result<serde_json::Value> {
    let mut senders = Vec::new();
    for _ in 0..args.connections.max(1) {
        let stream = TcpStream::connect(("127.0.0.1", args.port))
            .await
            .context("connect")?;
        stream.set_nodelay(true)?;
        let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .handshake::<_, Body>(TokioIo::new(stream))
            .await?;
        tokio::spawn(conn);
        senders.push(sender);
    }
    let args = std::sync::Arc::new(args);
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(args.seconds);
    let mut tasks = Vec::new();
    for i in 0..args.streams.max(1) {
        let sender = senders[i % senders.len()].clone();
        let args = args.clone();
        tasks.push(tokio::spawn(
            async move { worker(sender, &args, end).await },
        ));
    }
    let mut all = Samples::default();
    for t in tasks {
        all.merge(t.await?);
    }
    Ok(all.summary(start.elapsed()))
}
