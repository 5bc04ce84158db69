//! Sending a scenario's requests: one attempt per `repeat`, over the requested transport.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{anyhow, Result};
use bytes::Bytes;

use super::spec::{CertChoice, ClientProtocol, OneOrMany, RequestSpec};
use crate::certs::SharedPki;
use crate::client::{self, Body, ClientCert, Transport};
use crate::observe::Outcome;
use crate::proxy::Proxy;
use crate::raw;

pub(super) async fn attempts(
    proxy: &Proxy,
    request: &RequestSpec,
    pki: &SharedPki,
) -> Result<Vec<Outcome>> {
    let addr = proxy.listener(&request.listener)?;
    if request.same_connection {
        let (transport, req) = prepare(request, pki);
        return Ok(
            match client::send_many(addr, &transport, &req, request.repeat).await {
                Ok(responses) => responses
                    .into_iter()
                    .map(|response| Outcome::Response {
                        response,
                        interim: Vec::new(),
                    })
                    .collect(),
                Err(e) => vec![Outcome::Error(format!("{e:#}")); request.repeat],
            },
        );
    }
    let mut out = Vec::with_capacity(request.repeat);
    for _ in 0..request.repeat {
        let outcome = attempt(addr, request, pki).await?;
        // A proxy that hangs once will hang again: don't wait out every repeat.
        let hung = outcome.timed_out();
        if hung {
            out.resize(request.repeat, outcome);
            break;
        }
        out.push(outcome);
    }
    Ok(out)
}

fn body_of(request: &RequestSpec) -> Body {
    if let Some(messages) = &request.grpc {
        let messages: Vec<Bytes> = messages.iter().map(|m| Bytes::from(m.clone())).collect();
        return Body::Full(crate::grpc::encode(&messages));
    }
    if let Some(chunks) = &request.chunks {
        return Body::Chunks(chunks.iter().map(|c| Bytes::from(c.clone())).collect());
    }
    if let Some(n) = request.body_size {
        return Body::Full(Bytes::from(vec![b'x'; n]));
    }
    match &request.body {
        Some(b) => Body::Full(Bytes::from(b.clone())),
        None => Body::Empty,
    }
}

fn headers_of(request: &RequestSpec) -> Vec<(String, String)> {
    let mut headers = Vec::new();
    if request.grpc.is_some() {
        headers.push(("content-type".into(), "application/grpc".into()));
        headers.push(("te".into(), "trailers".into()));
    }
    for (name, value) in &request.headers {
        match value {
            OneOrMany::One(v) => headers.push((name.clone(), v.clone())),
            OneOrMany::Many(vs) => headers.extend(vs.iter().map(|v| (name.clone(), v.clone()))),
        }
    }
    headers
}

fn prepare(request: &RequestSpec, pki: &SharedPki) -> (Transport, client::Request) {
    let transport = match request.protocol {
        ClientProtocol::H1 => Transport::H1,
        ClientProtocol::H2c => Transport::H2c,
        ClientProtocol::Tls => Transport::Tls {
            pki: Arc::clone(pki),
            sni: request.sni.clone().unwrap_or_else(|| request.host.clone()),
            alpn: request
                .alpn
                .clone()
                .unwrap_or_else(|| vec!["h2".into(), "http/1.1".into()]),
            client_cert: match request.client_cert {
                CertChoice::None => ClientCert::None,
                CertChoice::Client => ClientCert::Client,
                CertChoice::Rogue => ClientCert::Rogue,
            },
        },
    };
    let req = client::Request {
        method: if request.grpc.is_some() {
            "POST".into()
        } else {
            request.method.clone()
        },
        path: request.path.clone(),
        host: request.host.clone(),
        headers: headers_of(request),
        body: body_of(request),
    };
    (transport, req)
}

async fn attempt(addr: SocketAddr, request: &RequestSpec, pki: &SharedPki) -> Result<Outcome> {
    if request.expect_continue {
        return expect_continue(addr, request).await;
    }
    if let Some(bytes) = &request.raw {
        return Ok(match raw::exchange(addr, bytes.as_bytes()).await {
            Ok(raw::RawOutcome::Response(r)) => Outcome::Response {
                response: from_raw(r),
                interim: Vec::new(),
            },
            Ok(raw::RawOutcome::Closed) => Outcome::Error("closed without a response".into()),
            Err(e) => Outcome::Error(format!("{e:#}")),
        });
    }
    let (transport, req) = prepare(request, pki);
    Ok(match client::send(addr, &transport, &req).await {
        Ok(response) => Outcome::Response {
            response,
            interim: Vec::new(),
        },
        Err(e) => Outcome::Error(format!("{e:#}")),
    })
}

fn from_raw(r: raw::RawResponse) -> client::Response {
    client::Response {
        status: r.status,
        headers: r.headers,
        body: Bytes::from(r.body),
        trailers: Vec::new(),
        alpn: None,
    }
}

async fn expect_continue(addr: SocketAddr, request: &RequestSpec) -> Result<Outcome> {
    let body = match body_of(request) {
        Body::Full(b) => b,
        _ => return Err(anyhow!("expect_continue needs `body` or `body_size`")),
    };
    let mut head = format!(
        "{} {} HTTP/1.1\r\nhost: {}\r\ncontent-length: {}\r\nexpect: 100-continue\r\n",
        request.method,
        request.path,
        request.host,
        body.len()
    );
    for (name, value) in headers_of(request) {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    Ok(
        match raw::expect_continue(addr, head.as_bytes(), &body).await {
            Ok((interim, r)) => Outcome::Response {
                response: from_raw(r),
                interim,
            },
            Err(e) => Outcome::Error(format!("{e:#}")),
        },
    )
}
