//! A scriptable ADS server for xDS conformance tests.
//!
//! [`XdsServer`] serves `StreamAggregatedResources` (state of the world) and
//! `DeltaAggregatedResources` (Delta) on 127.0.0.1:0. A test sets the resources of a type URL
//! with a version ([`XdsServer::set`]); every open stream subscribed to that type is pushed the
//! change at once. Each request the client sends and each response the server sends is
//! recorded ([`Request`], [`Response`]), and the `wait_for_*` helpers wait (with a deadline)
//! for an ACK or NACK of a given version, so a test can assert what the client did.
//!
//! Subscriptions are honoured as the xDS protocol specifies:
//! - State of the world: LDS and CDS are wildcard when the first request names nothing (or
//!   names `*`); other types get exactly the resources they name. A response is sent on a
//!   stream's first request for a type, when its subscription changes, and when the type's
//!   version changes. Requests carrying a stale nonce (not the last one sent for that type on
//!   that stream) are recorded and otherwise ignored. NACKs are never answered by a resend.
//! - Delta: `resource_names_subscribe` / `_unsubscribe` (with `*` for wildcard) are honoured on
//!   every request, stale nonce or not. `initial_resource_versions` seeds what the client has,
//!   so unchanged resources are not resent on reconnect; a resource that changed or was deleted
//!   is sent or listed in `removed_resources`. A name explicitly subscribed is always sent, or
//!   reported in `removed_resources` when it does not exist (see
//!   [`XdsServer::report_missing`]). Versions are per resource: a resource keeps its version
//!   across [`XdsServer::set`] calls while its bytes do not change. A NACK does not change what
//!   the server believes the client has; the next change of a resource is sent as usual.
//!
//! Nonces are fresh for every response and belong to one stream (`<stream>-<n>`). The server
//! can be stopped ([`XdsServer::stop`], which drops every connection as a crash would) and
//! restarted on the same port ([`XdsServer::restart`]) with its resources kept.
//!
//! [`resources`] builds the typed resources tests push and the client's ADS bootstrap.

pub mod resources;
mod stream;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use legate_proto::pb::envoy::config::cluster::v3::Cluster;
use legate_proto::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use legate_proto::pb::envoy::config::listener::v3::Listener;
use legate_proto::pb::envoy::config::route::v3::RouteConfiguration;
use legate_proto::pb::envoy::extensions::transport_sockets::tls::v3::Secret;
use legate_proto::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::AggregatedDiscoveryServiceServer;
use legate_proto::pb::google::protobuf::Any;
use prost::{Message, Name};
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::watch;
use tokio::task::{AbortHandle, JoinHandle};
use tonic::codegen::Service;

/// The type URL of clusters (CDS).
pub const CDS: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
/// The type URL of cluster load assignments (EDS).
pub const EDS: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
/// The type URL of listeners (LDS).
pub const LDS: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
/// The type URL of route configurations (RDS).
pub const RDS: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
/// The type URL of secrets (SDS).
pub const SDS: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";

/// The order in which one wake-up pushes several changed types (the ADS order).
const PUSH_ORDER: [&str; 5] = [CDS, EDS, LDS, RDS, SDS];

/// The default deadline of the `wait_for_*` helpers.
pub const WAIT: Duration = Duration::from_secs(10);

/// Which ADS flavour a stream speaks; also the bootstrap's `ads_config.api_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum XdsProtocol {
    /// State of the world: `StreamAggregatedResources`, `api_type: GRPC`.
    Sotw,
    /// Incremental: `DeltaAggregatedResources`, `api_type: DELTA_GRPC`.
    Delta,
}

impl XdsProtocol {
    /// The bootstrap's `ads_config.api_type`.
    pub fn api_type(self) -> &'static str {
        match self {
            XdsProtocol::Sotw => "GRPC",
            XdsProtocol::Delta => "DELTA_GRPC",
        }
    }
}

impl std::fmt::Display for XdsProtocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            XdsProtocol::Sotw => "sotw",
            XdsProtocol::Delta => "delta",
        })
    }
}

/// One request the client sent, as received.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// The stream it arrived on (1 for the first stream the server accepted, and so on).
    pub stream: u64,
    pub protocol: XdsProtocol,
    pub type_url: String,
    /// SotW only: the version the client last accepted.
    pub version_info: String,
    pub response_nonce: String,
    /// SotW only: the names the client wants (empty: wildcard or nothing).
    pub resource_names: Vec<String>,
    /// Delta only.
    pub subscribe: Vec<String>,
    /// Delta only.
    pub unsubscribe: Vec<String>,
    /// Delta only: what the client already has, name → version.
    pub initial_resource_versions: BTreeMap<String, String>,
    /// `error_detail.message` of a NACK.
    pub error: Option<String>,
    /// `node.id`, when the request carried a node.
    pub node_id: Option<String>,
    /// Whether this was the first request on its stream.
    pub first_on_stream: bool,
}

/// One response the server sent.
#[derive(Debug, Clone, PartialEq)]
pub struct Response {
    pub stream: u64,
    pub protocol: XdsProtocol,
    pub type_url: String,
    /// `version_info` (SotW) or `system_version_info` (Delta).
    pub version: String,
    pub nonce: String,
    /// The names of the resources it carried, in order.
    pub resources: Vec<String>,
    /// Delta only: `removed_resources`.
    pub removed: Vec<String>,
}

/// Everything a run recorded.
#[derive(Debug, Clone, Default)]
pub struct Log {
    pub requests: Vec<Request>,
    pub responses: Vec<Response>,
}

impl Log {
    /// The answer (ACK or NACK) to `response`, if the client sent one.
    pub fn answer_to(&self, response: &Response) -> Option<&Request> {
        self.requests.iter().find(|r| {
            r.stream == response.stream
                && r.type_url == response.type_url
                && r.response_nonce == response.nonce
        })
    }

    /// Responses of `type_url` with `version`.
    pub fn responses_of<'a>(
        &'a self,
        type_url: &'a str,
        version: &'a str,
    ) -> impl Iterator<Item = &'a Response> + 'a {
        self.responses
            .iter()
            .filter(move |r| r.type_url == type_url && r.version == version)
    }

    /// The ACK of a response of `type_url` at `version`: an answer with no error (and, over
    /// SotW, carrying that version).
    pub fn ack(&self, type_url: &str, version: &str) -> Option<&Request> {
        self.responses_of(type_url, version).find_map(|resp| {
            self.answer_to(resp).filter(|r| {
                r.error.is_none()
                    && (r.protocol == XdsProtocol::Delta || r.version_info == resp.version)
            })
        })
    }

    /// The NACK of a response of `type_url` at `version`.
    pub fn nack(&self, type_url: &str, version: &str) -> Option<&Request> {
        self.responses_of(type_url, version)
            .find_map(|resp| self.answer_to(resp).filter(|r| r.error.is_some()))
    }
}

/// One resource as the server holds it.
#[derive(Debug, Clone)]
struct Entry {
    name: String,
    /// Per-resource version (Delta).
    version: String,
    any: Any,
}

/// The resources of one type.
#[derive(Debug, Clone, Default)]
struct TypeState {
    version: String,
    /// In the order given; duplicate names are kept (to test that clients reject them).
    entries: Vec<Entry>,
}

#[derive(Debug)]
struct State {
    types: BTreeMap<String, TypeState>,
    /// Delta: report a subscribed name that does not exist in `removed_resources`.
    report_missing: bool,
    log: Log,
    next_stream: u64,
    next_nonce: u64,
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    /// Bumped on every [`XdsServer::set`]; streams wake and push what changed.
    resources_changed: watch::Sender<u64>,
    /// Bumped on every recorded request or response; waiters wake and look again.
    logged: watch::Sender<u64>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain data behind; keep using it.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn bump_logged(&self) {
        self.logged.send_modify(|n| *n += 1);
    }
}

/// The tasks of one run of the server (between a start and a stop).
#[derive(Debug, Default)]
struct Run {
    tasks: Mutex<Vec<AbortHandle>>,
}

impl Run {
    fn track(&self, handle: AbortHandle) {
        self.tasks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(handle);
    }

    fn abort_all(&self) {
        let tasks = std::mem::take(
            &mut *self
                .tasks
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        for t in tasks {
            t.abort();
        }
    }
}

/// A TLS acceptor (for `Debug`).
#[derive(Clone)]
struct Acceptor(tokio_rustls::TlsAcceptor);

impl std::fmt::Debug for Acceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsAcceptor")
    }
}

/// The scriptable ADS server. Stops (dropping every connection) when dropped.
#[derive(Debug)]
pub struct XdsServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    /// Serves gRPC over TLS when set.
    tls: Option<Acceptor>,
    running: Option<(Arc<Run>, JoinHandle<()>)>,
}

impl XdsServer {
    /// Starts a server on 127.0.0.1:0 with no resources.
    pub async fn start() -> Result<Self> {
        Self::start_with(None).await
    }

    /// Starts a server that speaks gRPC over TLS with `config` (its certificate).
    pub async fn start_tls(config: Arc<rustls::ServerConfig>) -> Result<Self> {
        Self::start_with(Some(tokio_rustls::TlsAcceptor::from(config))).await
    }

    async fn start_with(tls: Option<tokio_rustls::TlsAcceptor>) -> Result<Self> {
        let tls = tls.map(Acceptor);
        let listener = bind("127.0.0.1:0".parse()?)?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                types: BTreeMap::new(),
                report_missing: true,
                log: Log::default(),
                next_stream: 0,
                next_nonce: 0,
            }),
            resources_changed: watch::channel(0).0,
            logged: watch::channel(0).0,
        });
        let mut server = Self {
            addr,
            shared,
            tls,
            running: None,
        };
        server.serve(listener);
        Ok(server)
    }

    /// The address the client's bootstrap points at (the same across restarts).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn serve(&mut self, listener: TcpListener) {
        let run = Arc::new(Run::default());
        let service = AggregatedDiscoveryServiceServer::new(stream::Ads {
            shared: self.shared.clone(),
            run: run.clone(),
        });
        let accept_run = run.clone();
        let tls = self.tls.clone();
        let accept = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let _ = tcp.set_nodelay(true);
                let service = service.clone();
                let tls = tls.clone();
                let conn = tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let mut service = service.clone();
                        async move { service.call(req).await }
                    });
                    let h2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
                    match tls {
                        Some(acceptor) => {
                            if let Ok(stream) = acceptor.0.accept(tcp).await {
                                let _ = h2.serve_connection(TokioIo::new(stream), svc).await;
                            }
                        }
                        None => {
                            let _ = h2.serve_connection(TokioIo::new(tcp), svc).await;
                        }
                    }
                });
                accept_run.track(conn.abort_handle());
            }
        });
        self.running = Some((run, accept));
    }

    /// Stops accepting and drops every connection and stream at once, as a crashed control
    /// plane would. Resources and the log are kept.
    pub async fn stop(&mut self) {
        if let Some((run, accept)) = self.running.take() {
            accept.abort();
            let _ = accept.await;
            run.abort_all();
        }
    }

    /// Stops (if running) and serves again on the same address.
    pub async fn restart(&mut self) -> Result<()> {
        self.stop().await;
        // The old listening socket is closed; binding again can race its teardown briefly.
        let deadline = Instant::now() + WAIT;
        let listener = loop {
            match bind(self.addr) {
                Ok(l) => break l,
                Err(e) if Instant::now() > deadline => {
                    return Err(e.context(format!("rebinding {}", self.addr)))
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        };
        self.serve(listener);
        Ok(())
    }

    /// Replaces every resource of `type_url` with `resources` at `version`, and pushes the
    /// change to every stream subscribed to the type. Over SotW a stream is pushed only when
    /// `version` differs from the one it was last sent.
    pub fn set(&self, type_url: &str, version: &str, resources: Vec<Any>) -> Result<()> {
        let mut entries = Vec::with_capacity(resources.len());
        let mut state = self.shared.lock();
        let old = state.types.get(type_url);
        for any in resources {
            if any.type_url != type_url {
                bail!("a {} set as {type_url}", any.type_url);
            }
            let name = resource_name(&any)?;
            // Delta versions are per resource: unchanged bytes keep their version.
            let version = old
                .and_then(|t| t.entries.iter().find(|e| e.name == name && e.any == any))
                .map(|e| e.version.clone())
                .unwrap_or_else(|| version.to_string());
            entries.push(Entry { name, version, any });
        }
        state.types.insert(
            type_url.to_string(),
            TypeState {
                version: version.to_string(),
                entries,
            },
        );
        drop(state);
        self.shared.resources_changed.send_modify(|n| *n += 1);
        Ok(())
    }

    /// Delta only: whether a subscribed name that does not exist is reported at once in
    /// `removed_resources` (the default), or left unanswered, so that the client waits for it
    /// (as over SotW, where nothing signals absence) and a cluster or listener that needs it
    /// keeps warming.
    pub fn report_missing(&self, on: bool) {
        self.shared.lock().report_missing = on;
    }

    /// [`Self::set`] for typed messages; the type URL is the message's.
    pub fn set_typed<M: Message + Name>(&self, version: &str, resources: &[M]) -> Result<()> {
        self.set(&M::type_url(), version, resources.iter().map(any).collect())
    }

    /// A copy of everything recorded so far.
    pub fn log(&self) -> Log {
        self.shared.lock().log.clone()
    }

    /// How many streams the server has accepted (over all runs).
    pub fn streams(&self) -> u64 {
        self.shared.lock().next_stream
    }

    /// Waits up to `timeout` for `f` to find something in the log.
    pub async fn wait_until<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut f: impl FnMut(&Log) -> Option<T>,
    ) -> Result<T> {
        let deadline = Instant::now() + timeout;
        let mut logged = self.shared.logged.subscribe();
        loop {
            logged.borrow_and_update();
            if let Some(v) = f(&self.shared.lock().log) {
                return Ok(v);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || tokio::time::timeout(left, logged.changed()).await.is_err() {
                bail!(
                    "xDS server: {what}: not seen within {timeout:?}\n{}",
                    self.describe_log()
                );
            }
        }
    }

    /// Waits for the client to ACK the response of `type_url` at `version`; returns the ACK.
    pub async fn wait_for_ack(&self, type_url: &str, version: &str) -> Result<Request> {
        self.wait_until(
            &format!("ACK of {} version {version}", short(type_url)),
            WAIT,
            |log| log.ack(type_url, version).cloned(),
        )
        .await
    }

    /// Waits for the client to NACK the response of `type_url` at `version`; returns
    /// `error_detail.message`.
    pub async fn wait_for_nack(&self, type_url: &str, version: &str) -> Result<String> {
        self.wait_until(
            &format!("NACK of {} version {version}", short(type_url)),
            WAIT,
            |log| log.nack(type_url, version)?.error.clone(),
        )
        .await
    }

    /// Waits for a request matching `pred`; returns it.
    pub async fn wait_for_request(
        &self,
        what: &str,
        pred: impl Fn(&Request) -> bool,
    ) -> Result<Request> {
        self.wait_until(what, WAIT, |log| {
            log.requests.iter().find(|r| pred(r)).cloned()
        })
        .await
    }

    /// The log in a few lines, for failure messages.
    pub fn describe_log(&self) -> String {
        let log = self.log();
        let mut out = String::from("requests:\n");
        for r in &log.requests {
            out.push_str(&format!(
                "  s{} {} v={:?} nonce={:?} names={:?} sub={:?} unsub={:?} initial={:?} \
                 error={:?}\n",
                r.stream,
                short(&r.type_url),
                r.version_info,
                r.response_nonce,
                r.resource_names,
                r.subscribe,
                r.unsubscribe,
                r.initial_resource_versions,
                r.error
            ));
        }
        out.push_str("responses:\n");
        for r in &log.responses {
            out.push_str(&format!(
                "  s{} {} v={:?} nonce={:?} resources={:?} removed={:?}\n",
                r.stream,
                short(&r.type_url),
                r.version,
                r.nonce,
                r.resources,
                r.removed
            ));
        }
        out
    }
}

impl Drop for XdsServer {
    fn drop(&mut self) {
        if let Some((run, accept)) = self.running.take() {
            accept.abort();
            run.abort_all();
        }
    }
}

fn bind(addr: SocketAddr) -> Result<TcpListener> {
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket
        .bind(addr)
        .with_context(|| format!("binding {addr}"))?;
    Ok(socket.listen(64)?)
}

/// Packs a typed message into an `Any`.
pub fn any<M: Message + Name>(message: &M) -> Any {
    Any {
        type_url: M::type_url(),
        value: message.encode_to_vec(),
    }
}

/// `CDS`, `EDS`... for messages.
pub fn short(type_url: &str) -> &str {
    match type_url {
        CDS => "CDS",
        EDS => "EDS",
        LDS => "LDS",
        RDS => "RDS",
        SDS => "SDS",
        other => other,
    }
}

/// The name of a resource, by its type.
pub fn resource_name(any: &Any) -> Result<String> {
    let bytes = any.value.as_slice();
    let name = match any.type_url.as_str() {
        CDS => Cluster::decode(bytes)?.name,
        EDS => ClusterLoadAssignment::decode(bytes)?.cluster_name,
        LDS => Listener::decode(bytes)?.name,
        RDS => RouteConfiguration::decode(bytes)?.name,
        SDS => Secret::decode(bytes)?.name,
        other => bail!("the test xDS server cannot name a {other}"),
    };
    Ok(name)
}
