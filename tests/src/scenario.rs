//! The differential corpus: one YAML file per scenario under `tests/scenarios/`.
//!
//! A scenario is a bootstrap template, the named upstreams it needs, and requests with
//! expectations. It runs against Envoy and Legate with the same rendered bootstrap and the
//! same requests; each proxy must meet the explicit expectations (so a scenario cannot pass
//! vacuously) and Legate must observe the same values as Envoy for every compared key.
//!
//! Placeholders in `bootstrap`: `$UPSTREAM_<NAME>_PORT` (upper-cased upstream name),
//! `$CERT_DIR` (see [`crate::certs`]), `$UNUSED_PORT` (a reserved port nobody listens on).
//! An `admin:` block on `127.0.0.1:0` is appended when the template has none.
//!
//! `LEGATE_DIFF_ONLY=envoy` (or `legate`) runs one side only, checking expectations alone.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::bins::ProxyKind;
use crate::certs::{SharedPki, TestPki};
use crate::client::{self, Body, ClientCert, Transport};
use crate::observe::{observe, summary, Outcome};
use crate::process::TempDir;
use crate::proxy::Proxy;
use crate::raw;
use crate::upstream::Upstream;

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

/// `tests/scenarios/`.
pub fn scenario_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios")
}

/// Every scenario name (file stem), sorted.
pub fn scenario_names() -> Result<Vec<String>> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(scenario_dir())? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "yaml") {
            if let Some(stem) = path.file_stem() {
                names.push(stem.to_string_lossy().into_owned());
            }
        }
    }
    names.sort();
    Ok(names)
}

/// The proxies to run, from `LEGATE_DIFF_ONLY` (`envoy`, `legate`, or unset for both).
pub fn sides() -> Result<Vec<ProxyKind>> {
    match std::env::var("LEGATE_DIFF_ONLY").ok().as_deref() {
        None | Some("") | Some("both") => Ok(vec![ProxyKind::Envoy, ProxyKind::Legate]),
        Some("envoy") => Ok(vec![ProxyKind::Envoy]),
        Some("legate") => Ok(vec![ProxyKind::Legate]),
        Some(other) => bail!("LEGATE_DIFF_ONLY={other:?}: expected envoy, legate or both"),
    }
}

/// Loads `tests/scenarios/<name>.yaml`.
pub fn load(name: &str) -> Result<Scenario> {
    let path = scenario_dir().join(format!("{name}.yaml"));
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let scenario: Scenario =
        serde_yaml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    for r in &scenario.requests {
        if r.expect.keys().is_empty() {
            bail!("{name}: request {:?} has no expectations", r.name);
        }
    }
    if scenario.requests.is_empty() {
        bail!("{name}: no requests");
    }
    Ok(scenario)
}

/// Substitutes the placeholders and appends an admin block if missing.
pub fn render(template: &str, vars: &BTreeMap<String, String>) -> Result<String> {
    let mut out = template.to_string();
    // Longest names first so `$UPSTREAM_AB_PORT` is not eaten by `$UPSTREAM_A...`.
    let mut names: Vec<&String> = vars.keys().collect();
    names.sort_by_key(|n| std::cmp::Reverse(n.len()));
    for name in names {
        out = out.replace(&format!("${name}"), &vars[name]);
    }
    let bytes = out.as_bytes();
    for (i, w) in bytes.windows(2).enumerate() {
        if w[0] == b'$' && w[1].is_ascii_uppercase() {
            let rest: String = out[i..].chars().take(30).collect();
            bail!("unknown placeholder at {rest:?}");
        }
    }
    if !out.lines().any(|l| l.starts_with("admin:")) {
        out.push_str(
            "\nadmin:\n  address:\n    socket_address: { address: 127.0.0.1, port_value: 0 }\n",
        );
    }
    Ok(out)
}

/// Runs the named scenario against the configured sides and fails with a report of every
/// mismatch.
pub async fn run(name: &str) -> Result<()> {
    let scenario = load(name)?;
    let sides = sides()?;
    let dir = TempDir::new(name)?;
    let pki = TestPki::generate(&dir.path().join("certs"))?;

    let mut vars = BTreeMap::new();
    vars.insert("CERT_DIR".to_string(), pki.dir.display().to_string());
    let mut upstreams = Vec::new();
    for spec in &scenario.upstreams {
        let upstream = match spec.protocol {
            UpstreamProtocol::H1 | UpstreamProtocol::H2c => Upstream::plain(&spec.name).await?,
            UpstreamProtocol::Tls => Upstream::tls(&spec.name, &pki).await?,
        };
        vars.insert(
            format!("UPSTREAM_{}_PORT", spec.name.to_ascii_uppercase()),
            upstream.addr.port().to_string(),
        );
        upstreams.push(upstream);
    }
    // Bound but never listening: connecting is refused, and nobody else can take the port.
    let reserved = tokio::net::TcpSocket::new_v4()?;
    reserved.bind("127.0.0.1:0".parse()?)?;
    vars.insert(
        "UNUSED_PORT".into(),
        reserved.local_addr()?.port().to_string(),
    );

    let rendered = render(&scenario.bootstrap, &vars)?;
    let config = dir.path().join("bootstrap.yaml");
    std::fs::write(&config, &rendered)?;

    let started = futures_util::future::join_all(
        sides
            .iter()
            .map(|&kind| Proxy::start(kind, &config, dir.path())),
    )
    .await;
    let mut proxies = Vec::new();
    for p in started {
        proxies.push(p?);
    }

    let mut failures = Vec::new();
    let mut report = Vec::new();
    for request in &scenario.requests {
        let per_side =
            futures_util::future::join_all(proxies.iter().map(|p| attempts(p, request, &pki)))
                .await;
        let mut observed: BTreeMap<ProxyKind, BTreeMap<String, Value>> = BTreeMap::new();
        let mut keys: Vec<String> = request.expect.keys().into_iter().map(|(k, _)| k).collect();
        keys.extend(request.compare.iter().cloned());
        for (proxy, outcomes) in proxies.iter().zip(per_side) {
            let outcomes = outcomes?;
            let mut values: BTreeMap<String, Value> = keys
                .iter()
                .map(|k| (k.clone(), observe(k, &outcomes)))
                .collect();
            values.insert("attempts".into(), summary(&outcomes));
            observed.insert(proxy.kind, values);
        }
        for (kind, values) in &observed {
            for (key, want) in request.expect.keys() {
                if *kind == ProxyKind::Legate && request.legate_differs.contains_key(&key) {
                    continue;
                }
                let got = &values[&key];
                if *got != want {
                    failures.push(format!(
                        "[{}] {kind}: {key}: expected {want}, got {got}",
                        request.name
                    ));
                }
            }
        }
        if let (Some(envoy), Some(legate)) = (
            observed.get(&ProxyKind::Envoy),
            observed.get(&ProxyKind::Legate),
        ) {
            for key in &keys {
                if request.legate_differs.contains_key(key) {
                    continue;
                }
                if envoy[key] != legate[key] {
                    failures.push(format!(
                        "[{}] legate differs from envoy on {key}: envoy={} legate={}",
                        request.name, envoy[key], legate[key]
                    ));
                }
            }
        }
        let observed: BTreeMap<&str, &BTreeMap<String, Value>> =
            observed.iter().map(|(k, v)| (k.name(), v)).collect();
        report.push(format!("[{}] {}", request.name, json!(observed)));
    }
    if !failures.is_empty() {
        let mut outputs = String::new();
        for p in &proxies {
            outputs.push_str(&p.output());
            outputs.push('\n');
        }
        bail!(
            "scenario {name} ({}): {} mismatch(es)\n  {}\nobserved:\n  {}\n{outputs}",
            scenario.description,
            failures.len(),
            failures.join("\n  "),
            report.join("\n  ")
        );
    }
    drop(upstreams);
    Ok(())
}

async fn attempts(proxy: &Proxy, request: &RequestSpec, pki: &SharedPki) -> Result<Vec<Outcome>> {
    let addr = proxy.listener(&request.listener)?;
    let mut out = Vec::with_capacity(request.repeat);
    for _ in 0..request.repeat {
        out.push(attempt(addr, request, pki).await?);
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

async fn attempt(
    addr: std::net::SocketAddr,
    request: &RequestSpec,
    pki: &SharedPki,
) -> Result<Outcome> {
    if request.expect_continue {
        return expect_continue(addr, request).await;
    }
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
    Ok(match client::send(addr, &transport, &req).await {
        Ok(response) => Outcome::Response {
            response,
            interim: Vec::new(),
        },
        Err(e) => Outcome::Error(format!("{e:#}")),
    })
}

async fn expect_continue(addr: std::net::SocketAddr, request: &RequestSpec) -> Result<Outcome> {
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
                response: client::Response {
                    status: r.status,
                    headers: r.headers,
                    body: Bytes::from(r.body),
                    trailers: Vec::new(),
                    alpn: None,
                },
                interim,
            },
            Err(e) => Outcome::Error(format!("{e:#}")),
        },
    )
}
