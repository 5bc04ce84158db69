//! Turning responses into comparable observations.
//!
//! An observation is a flat map from a key (`status`, `header:server`, `echo.path`,
//! `echo.header:x-forwarded-for`, `grpc.status`, `upstreams`, ...) to a JSON value. A
//! scenario's expectations are written as the same keys, so checking a proxy against the
//! expectations and checking Legate against Envoy are the same comparison.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use crate::client::Response;
use crate::upstream::Echo;

/// The result of one attempt at a request.
#[derive(Debug, Clone)]
pub enum Outcome {
    Response {
        response: Response,
        /// 1xx statuses seen before the final response (raw HTTP/1.1 only).
        interim: Vec<u16>,
    },
    /// The request failed below HTTP: refused, reset, TLS failure, timeout.
    Error(String),
}

const NO_RESPONSE: &str = "<no response>";
const NOT_ECHO: &str = "<not an echo response>";

impl Outcome {
    /// Whether this attempt hit the client's request timeout.
    pub fn timed_out(&self) -> bool {
        matches!(self, Outcome::Error(e) if e.contains(crate::client::TIMED_OUT))
    }

    fn echo(&self) -> Option<Echo> {
        match self {
            Outcome::Response { response, .. } => match gunzip(&response.body) {
                // A compressed echo (behind the compressor filter) is read through.
                Some(plain) => serde_json::from_slice(&plain).ok(),
                None => serde_json::from_slice(&response.body).ok(),
            },
            Outcome::Error(_) => None,
        }
    }

    /// The value of `key` for this one attempt.
    fn value(&self, key: &str) -> Value {
        if key == "error" {
            return Value::Bool(matches!(self, Outcome::Error(_)));
        }
        let (response, interim) = match self {
            Outcome::Response { response, interim } => (response, interim),
            Outcome::Error(_) => return Value::String(NO_RESPONSE.into()),
        };
        if let Some(rest) = key.strip_prefix("echo.") {
            let Some(echo) = self.echo() else {
                return Value::String(NOT_ECHO.into());
            };
            return echo_value(&echo, rest);
        }
        if let Some(name) = key.strip_prefix("header:") {
            return opt(response.header(name));
        }
        if let Some(name) = key.strip_prefix("header_present:") {
            return Value::Bool(response.header(name).is_some());
        }
        if let Some(needle) = key.strip_prefix("body_contains:") {
            return Value::Bool(String::from_utf8_lossy(&response.body).contains(needle));
        }
        match key {
            "status" => json!(response.status),
            "body" => Value::String(String::from_utf8_lossy(&response.body).into_owned()),
            "body_len" => json!(response.body.len()),
            "body_gunzip" => match gunzip(&response.body) {
                Some(plain) => Value::String(String::from_utf8_lossy(&plain).into_owned()),
                None => Value::String("<not gzip>".into()),
            },
            "body_base64" => {
                use base64::Engine;
                Value::String(base64::engine::general_purpose::STANDARD.encode(&response.body))
            }
            "alpn" => opt(response.alpn.clone()),
            "interim" => json!(interim),
            "grpc.status" => opt(response
                .trailer("grpc-status")
                .or_else(|| response.header("grpc-status"))),
            "grpc.messages"
                if !response
                    .header("content-type")
                    .is_some_and(|ct| ct.starts_with("application/grpc")) =>
            {
                let text = String::from_utf8_lossy(&response.body);
                Value::String(format!(
                    "<not a gRPC response: {:?}>",
                    text.chars().take(80).collect::<String>()
                ))
            }
            "grpc.messages" => match crate::grpc::decode(&response.body) {
                Ok(messages) => json!(messages
                    .iter()
                    .map(|m| String::from_utf8_lossy(m).into_owned())
                    .collect::<Vec<_>>()),
                Err(e) => Value::String(format!("<bad gRPC body: {e}>")),
            },
            other => Value::String(format!("<unknown key {other:?}>")),
        }
    }
}

fn opt(v: Option<String>) -> Value {
    v.map(Value::String).unwrap_or(Value::Null)
}

fn echo_value(echo: &Echo, key: &str) -> Value {
    if let Some(name) = key.strip_prefix("header:") {
        return opt(echo.headers.get(&name.to_ascii_lowercase()).cloned());
    }
    if let Some(name) = key.strip_prefix("header_present:") {
        return Value::Bool(echo.headers.contains_key(&name.to_ascii_lowercase()));
    }
    if let Some((name, prefix)) = key
        .strip_prefix("header_prefix:")
        .and_then(|rest| rest.split_once(':'))
    {
        return Value::Bool(
            echo.headers
                .get(&name.to_ascii_lowercase())
                .is_some_and(|v| v.starts_with(prefix)),
        );
    }
    match key {
        "upstream" => Value::String(echo.upstream.clone()),
        "method" => Value::String(echo.method.clone()),
        "path" => Value::String(echo.path.clone()),
        "host" => opt(echo.host.clone()),
        "body" => Value::String(echo.body.clone()),
        "body_len" => json!(echo.body.len()),
        "tls" => Value::Bool(echo.tls),
        "sni" => opt(echo.sni.clone()),
        "version" => Value::String(echo.version.clone()),
        other => Value::String(format!("<unknown echo key {other:?}>")),
    }
}

/// A short account of each attempt (status or transport error), for failure reports.
pub fn summary(outcomes: &[Outcome]) -> Value {
    Value::Array(
        outcomes
            .iter()
            .map(|o| match o {
                Outcome::Response { response, .. } => json!(response.status),
                Outcome::Error(e) => json!(format!("error: {e}")),
            })
            .collect(),
    )
}

/// The value of `key` over all attempts of one request.
///
/// `upstreams` is the multiset of echoed upstream names and `sticky` says whether every
/// attempt reached the same upstream; any other key is the per-attempt value when all
/// attempts agree, else `{"varies": [...]}`.
pub fn observe(key: &str, outcomes: &[Outcome]) -> Value {
    match key {
        "upstreams" => {
            let mut counts: BTreeMap<String, u64> = BTreeMap::new();
            for o in outcomes {
                let name = o
                    .echo()
                    .map(|e| e.upstream)
                    .unwrap_or_else(|| NOT_ECHO.into());
                *counts.entry(name).or_default() += 1;
            }
            json!(counts)
        }
        "sticky" => {
            let names: Vec<Option<String>> = outcomes
                .iter()
                .map(|o| o.echo().map(|e| e.upstream))
                .collect();
            let first = names.first().cloned().flatten();
            Value::Bool(first.is_some() && names.iter().all(|n| *n == first))
        }
        _ => {
            let values: Vec<Value> = outcomes.iter().map(|o| o.value(key)).collect();
            match values.first() {
                Some(first) if values.iter().all(|v| v == first) => first.clone(),
                _ => json!({ "varies": values }),
            }
        }
    }
}

/// The body gunzipped, if it is a complete gzip stream.
fn gunzip(body: &[u8]) -> Option<Vec<u8>> {
    if !body.starts_with(&[0x1f, 0x8b]) {
        return None;
    }
    let mut out = Vec::new();
    std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(body), &mut out).ok()?;
    Some(out)
}
