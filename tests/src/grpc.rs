//! gRPC without protobuf: length-prefixed frames over HTTP/2, echoed back verbatim.
//!
//! The proxy never looks inside a message, so the tests send opaque bytes. The echo upstream
//! answers every message with the same bytes, then trailers carrying `grpc-status`
//! (`x-grpc-status` request metadata picks a non-zero status).

use std::convert::Infallible;

use anyhow::{bail, Result};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use tokio::sync::mpsc;

/// Encodes messages as uncompressed gRPC frames.
pub fn encode(messages: &[Bytes]) -> Bytes {
    let mut out = BytesMut::new();
    for m in messages {
        out.put_u8(0);
        out.put_u32(m.len() as u32);
        out.put_slice(m);
    }
    out.freeze()
}

/// Decodes complete gRPC frames; fails on a truncated or compressed frame.
pub fn decode(mut data: &[u8]) -> Result<Vec<Bytes>> {
    let mut out = Vec::new();
    while !data.is_empty() {
        if data.len() < 5 {
            bail!("truncated gRPC frame header ({} bytes)", data.len());
        }
        let compressed = data.get_u8();
        let len = data.get_u32() as usize;
        if compressed != 0 {
            bail!("compressed gRPC frame");
        }
        if data.len() < len {
            bail!("truncated gRPC frame: want {len}, have {}", data.len());
        }
        out.push(Bytes::copy_from_slice(&data[..len]));
        data = &data[len..];
    }
    Ok(out)
}

/// Pulls whole frames off the front of `buf`.
fn take_frames(buf: &mut BytesMut) -> Vec<Bytes> {
    let mut out = Vec::new();
    loop {
        if buf.len() < 5 {
            return out;
        }
        let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
        if buf.len() < 5 + len {
            return out;
        }
        let frame = buf.split_to(5 + len);
        out.push(frame.freeze().slice(5..));
    }
}

pub(crate) type RespBody = BoxBody<Bytes, Infallible>;

/// Serves one gRPC call: echoes each message as it arrives, then sends trailers.
pub(crate) fn echo_call(
    req: http::Request<Incoming>,
    upstream: String,
) -> http::Response<RespBody> {
    let status = req
        .headers()
        .get("x-grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u32>().ok())
        .unwrap_or(0);
    let path = req.uri().path().to_string();
    let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, Infallible>>(16);
    let mut body = req.into_body();
    tokio::spawn(async move {
        let mut buf = BytesMut::new();
        while let Some(frame) = body.frame().await {
            let Ok(frame) = frame else { break };
            if let Ok(data) = frame.into_data() {
                buf.extend_from_slice(&data);
                for message in take_frames(&mut buf) {
                    if tx.send(Ok(Frame::data(encode(&[message])))).await.is_err() {
                        return;
                    }
                }
            }
        }
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", http::HeaderValue::from(status));
        if status != 0 {
            trailers.insert(
                "grpc-message",
                http::HeaderValue::from_static("requested-by-test"),
            );
        }
        let _ = tx.send(Ok(Frame::trailers(trailers))).await;
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    let mut response = http::Response::new(StreamBody::new(stream).boxed());
    let headers = response.headers_mut();
    headers.insert(
        "content-type",
        http::HeaderValue::from_static("application/grpc"),
    );
    if let Ok(v) = http::HeaderValue::from_str(&upstream) {
        headers.insert("x-upstream", v);
    }
    if let Ok(v) = http::HeaderValue::from_str(&path) {
        headers.insert("x-grpc-path", v);
    }
    response
}
