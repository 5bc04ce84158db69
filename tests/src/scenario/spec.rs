//! The scenario file format: what to start, what to send, what to expect.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::{json, Value};

/// A scenario file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    pub description: String,
    #[serde(default)]
    pub upstreams: Vec<UpstreamSpec>,
    pub bootstrap: String,
    pub requests: Vec<RequestSpec>,
}

/// An echo upstream to start.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamSpec {
    pub name: String,
    /// `h1` and `h2c` share one plaintext server (it speaks both); `tls` adds TLS with ALPN.
    #[serde(default)]
    pub protocol: UpstreamProtocol,
}

#[derive(Debug, Default, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamProtocol {
    #[default]
    H1,
    H2c,
    Tls,
}

#[derive(Debug, Default, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ClientProtocol {
    #[default]
    H1,
    H2c,
    Tls,
}

#[derive(Debug, Default, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum CertChoice {
    #[default]
    None,
    Client,
    Rogue,
}

/// One header value or several (sent as repeated headers).
#[derive(Debug, Deserialize, Clone)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

fn default_listener() -> String {
    "main".into()
}
fn default_method() -> String {
    "GET".into()
}
fn default_path() -> String {
    "/".into()
}
fn default_host() -> String {
    "example.com".into()
}
fn one() -> usize {
    1
}

/// A request, sent `repeat` times to each proxy.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestSpec {
    pub name: String,
    #[serde(default = "default_listener")]
    pub listener: String,
    #[serde(default)]
    pub protocol: ClientProtocol,
    /// SNI for `tls`; defaults to `host`.
    pub sni: Option<String>,
    /// ALPN offered for `tls`; defaults to `[h2, http/1.1]`.
    pub alpn: Option<Vec<String>>,
    #[serde(default)]
    pub client_cert: CertChoice,
    #[serde(default = "default_method")]
    pub method: String,
    #[serde(default = "default_path")]
    pub path: String,
    #[serde(default = "default_host")]
    pub host: String,
    #[serde(default)]
    pub headers: BTreeMap<String, OneOrMany>,
    pub body: Option<String>,
    /// A body of this many `x` bytes (sent with a content-length).
    pub body_size: Option<usize>,
    /// A body sent as these chunks with no content-length (chunked over HTTP/1.1).
    pub chunks: Option<Vec<String>>,
    /// gRPC messages: sent as a gRPC call (POST, `application/grpc`, `te: trailers`).
    pub grpc: Option<Vec<String>>,
    /// Send over raw HTTP/1.1 with `Expect: 100-continue`, holding the body until the 100.
    #[serde(default)]
    pub expect_continue: bool,
    #[serde(default = "one")]
    pub repeat: usize,
    /// Send all `repeat` attempts on one connection (keep-alive / successive h2 streams).
    #[serde(default)]
    pub same_connection: bool,
    /// Send these bytes verbatim over TCP instead (HTTP/1.x wire-level cases); a close with no
    /// response is observed as `error: true`.
    pub raw: Option<String>,
    pub expect: Expect,
    /// Keys compared between the proxies without a pinned value (e.g. `header:content-type`).
    #[serde(default)]
    pub compare: Vec<String>,
    /// Key → why Legate deliberately differs there; such a key is not checked for Legate.
    #[serde(default)]
    pub legate_differs: BTreeMap<String, String>,
}

/// What every proxy must show. Each field maps to an observation key (see `keys`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Expect {
    pub status: Option<u16>,
    /// The request fails below HTTP (refused, reset, TLS handshake failure).
    pub error: Option<bool>,
    pub body: Option<String>,
    pub body_len: Option<usize>,
    /// The body after gunzip (`<not gzip>` when it is not gzip).
    pub body_gunzip: Option<String>,
    /// The body in base64, for binary bodies (gRPC-Web).
    pub body_base64: Option<String>,
    #[serde(default)]
    pub body_contains: Vec<String>,
    /// Response headers; `~` means absent. Repeated headers are joined with `", "`.
    #[serde(default)]
    pub headers: BTreeMap<String, Option<String>>,
    #[serde(default)]
    pub headers_present: Vec<String>,
    pub alpn: Option<String>,
    /// Which upstream echoed the request.
    pub upstream: Option<String>,
    pub method: Option<String>,
    pub path: Option<String>,
    pub host: Option<String>,
    pub echo_body: Option<String>,
    pub echo_body_len: Option<usize>,
    /// Headers the upstream received; `~` means absent.
    #[serde(default)]
    pub request_headers: BTreeMap<String, Option<String>>,
    #[serde(default)]
    pub request_headers_present: Vec<String>,
    /// Headers the upstream received that start with the given value (for values with a
    /// machine-dependent tail).
    #[serde(default)]
    pub request_headers_prefix: BTreeMap<String, String>,
    pub upstream_tls: Option<bool>,
    pub upstream_sni: Option<String>,
    /// `HTTP/1.1` or `HTTP/2.0`, as the upstream saw it.
    pub upstream_version: Option<String>,
    pub grpc_status: Option<String>,
    pub grpc_messages: Option<Vec<String>>,
    /// 1xx statuses before the final response (`expect_continue` only).
    pub interim: Option<Vec<u16>>,
    /// Over all `repeat` attempts: upstream name → count.
    pub upstreams: Option<BTreeMap<String, u64>>,
    /// Over all `repeat` attempts: whether one upstream answered them all.
    pub sticky: Option<bool>,
}

impl Expect {
    /// The expectations as (observation key, value) pairs.
    pub fn keys(&self) -> Vec<(String, Value)> {
        let mut out: Vec<(String, Value)> = Vec::new();
        let mut put = |k: String, v: Value| out.push((k, v));
        if let Some(v) = self.status {
            put("status".into(), json!(v));
        }
        if let Some(v) = self.error {
            put("error".into(), json!(v));
        }
        if let Some(v) = &self.body {
            put("body".into(), json!(v));
        }
        if let Some(v) = self.body_len {
            put("body_len".into(), json!(v));
        }
        if let Some(v) = &self.body_gunzip {
            put("body_gunzip".into(), json!(v));
        }
        if let Some(v) = &self.body_base64 {
            put("body_base64".into(), json!(v));
        }
        for s in &self.body_contains {
            put(format!("body_contains:{s}"), json!(true));
        }
        for (n, v) in &self.headers {
            put(format!("header:{}", n.to_ascii_lowercase()), json!(v));
        }
        for n in &self.headers_present {
            put(
                format!("header_present:{}", n.to_ascii_lowercase()),
                json!(true),
            );
        }
        if let Some(v) = &self.alpn {
            put("alpn".into(), json!(v));
        }
        let echo = [
            ("echo.upstream", &self.upstream),
            ("echo.method", &self.method),
            ("echo.path", &self.path),
            ("echo.host", &self.host),
            ("echo.body", &self.echo_body),
            ("echo.sni", &self.upstream_sni),
            ("echo.version", &self.upstream_version),
        ];
        for (k, v) in echo {
            if let Some(v) = v {
                put(k.into(), json!(v));
            }
        }
        if let Some(v) = self.echo_body_len {
            put("echo.body_len".into(), json!(v));
        }
        for (n, v) in &self.request_headers {
            put(format!("echo.header:{}", n.to_ascii_lowercase()), json!(v));
        }
        for n in &self.request_headers_present {
            put(
                format!("echo.header_present:{}", n.to_ascii_lowercase()),
                json!(true),
            );
        }
        for (n, p) in &self.request_headers_prefix {
            put(
                format!("echo.header_prefix:{}:{p}", n.to_ascii_lowercase()),
                json!(true),
            );
        }
        if let Some(v) = self.upstream_tls {
            put("echo.tls".into(), json!(v));
        }
        if let Some(v) = &self.grpc_status {
            put("grpc.status".into(), json!(v));
        }
        if let Some(v) = &self.grpc_messages {
            put("grpc.messages".into(), json!(v));
        }
        if let Some(v) = &self.interim {
            put("interim".into(), json!(v));
        }
        if let Some(v) = &self.upstreams {
            put("upstreams".into(), json!(v));
        }
        if let Some(v) = self.sticky {
            put("sticky".into(), json!(v));
        }
        out
    }
}
