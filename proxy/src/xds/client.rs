//! The ADS stream. One stream carries every type; each response is answered (ACK with its
//! version and nonce, or NACK with the previous version and an `error_detail` naming the
//! resources and fields), and subscriptions follow the configuration: LDS and CDS by wildcard,
//! RDS and EDS by the names the listeners and clusters reference. A broken stream is retried
//! with jittered exponential backoff while the last good configuration keeps serving.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use legate_proto::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use legate_proto::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use legate_proto::pb::google::rpc::Status;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::transport::{Channel, Endpoint};

use super::state::{State, Upsert};
use super::Kind;
use crate::cluster::Cluster;
use crate::config::{AdsProtocol, DynamicConfig};
use crate::server::Runtime;

/// Why a stream ended.
#[derive(Debug, thiserror::Error)]
enum StreamError {
    #[error("no host in the ADS cluster")]
    NoHost,
    #[error("cannot connect to {0}: {1}")]
    Connect(SocketAddr, String),
    #[error("stream failed: {0}")]
    Grpc(#[from] tonic::Status),
    #[error("the management server closed the stream")]
    Closed,
}

const BACKOFF_BASE: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// The gRPC status code Envoy puts in a NACK's `error_detail` (INTERNAL).
const NACK_CODE: i32 = 13;
/// After this long without an update, the descriptors decoded to read resources are dropped
/// (an idle sidecar should not carry them; the next update decodes them again).
const CONFIG_MEMORY_IDLE: Duration = Duration::from_secs(10);

/// Runs the client forever: stream, and on failure reconnect after a jittered backoff.
pub(super) async fn run(
    mut state: State,
    cluster: Arc<Cluster>,
    config: DynamicConfig,
    runtime: Arc<Runtime>,
) {
    let mut failures: u32 = 0;
    loop {
        let mut progressed = false;
        let result = match config.protocol {
            AdsProtocol::StateOfTheWorld => {
                sotw(&mut state, &cluster, &config, &runtime, &mut progressed).await
            }
            AdsProtocol::Delta => {
                delta(&mut state, &cluster, &config, &runtime, &mut progressed).await
            }
        };
        if let Err(e) = result {
            tracing::warn!("xDS: {e}; reconnecting");
        }
        if progressed {
            failures = 0;
        }
        failures = failures.saturating_add(1);
        let ceiling = BACKOFF_BASE
            .saturating_mul(1u32 << failures.min(6))
            .min(BACKOFF_MAX);
        // Full jitter, at least a tenth of the ceiling.
        let wait = ceiling.mul_f64(rand::random::<f64>().max(0.1));
        let until = tokio::time::Instant::now() + wait;
        // Warming deadlines still pass while disconnected.
        loop {
            let deadline = state.next_deadline().map(tokio::time::Instant::from_std);
            tokio::select! {
                _ = tokio::time::sleep_until(until) => break,
                _ = sleep_until_opt(deadline) => state.tick(),
            }
        }
    }
}

async fn sleep_until_opt(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// The stream's next response. Meanwhile, warming that waited too long ends, and the
/// descriptors are dropped once updates have been quiet for [`CONFIG_MEMORY_IDLE`].
async fn next_response<T>(
    inbound: &mut tonic::Streaming<T>,
    state: &mut State,
    release_at: &mut Option<tokio::time::Instant>,
) -> Result<T, StreamError> {
    loop {
        let deadline = state.next_deadline().map(tokio::time::Instant::from_std);
        tokio::select! {
            m = inbound.message() => {
                let r = m?.ok_or(StreamError::Closed)?;
                *release_at = Some(tokio::time::Instant::now() + CONFIG_MEMORY_IDLE);
                return Ok(r);
            }
            _ = sleep_until_opt(deadline) => state.tick(),
            _ = sleep_until_opt(*release_at) => {
                *release_at = None;
                crate::memory::release_config_memory();
            }
        }
    }
}

async fn connect(cluster: &Cluster) -> Result<Channel, StreamError> {
    let host = cluster
        .balancer()
        .pick(None)
        .cloned()
        .ok_or(StreamError::NoHost)?;
    let addr = host.address;
    let err = |e: &dyn std::fmt::Display| StreamError::Connect(addr, e.to_string());
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| err(&e))?
        .connect_timeout(cluster.config.connect_timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10));
    match cluster.config.tls.clone() {
        None => endpoint.connect().await.map_err(|e| err(&e)),
        Some(tls) => {
            let connector = tower::service_fn(move |_uri: http::Uri| {
                let tls = tls.clone();
                async move {
                    let tcp = tokio::net::TcpStream::connect(addr).await?;
                    tcp.set_nodelay(true)?;
                    let name = tls.sni.clone().unwrap_or_else(|| {
                        rustls_pki_types::ServerName::IpAddress(addr.ip().into())
                    });
                    let s = tokio_rustls::TlsConnector::from(tls.config.clone())
                        .connect(name, tcp)
                        .await?;
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
                }
            });
            endpoint
                .connect_with_connector(connector)
                .await
                .map_err(|e| err(&e))
        }
    }
}

/// The types this client asks for, in Envoy's order: clusters (and their endpoints) before
/// listeners (and their routes).
fn kinds(config: &DynamicConfig) -> Vec<Kind> {
    let mut v = Vec::new();
    if config.cds {
        v.push(Kind::Cluster);
    }
    v.push(Kind::Endpoints);
    if config.lds {
        v.push(Kind::Listener);
    }
    v.push(Kind::Route);
    v.push(Kind::Secret);
    v
}

fn nack(message: String) -> Status {
    Status {
        code: NACK_CODE,
        message,
        details: Vec::new(),
    }
}

/// The resources of a response: decoded names, duplicates refused.
fn named(
    kind: Kind,
    items: Vec<(
        Option<String>,
        String,
        Option<legate_proto::pb::google::protobuf::Any>,
    )>,
    errors: &mut Vec<String>,
) -> Vec<Upsert> {
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for (name, version, any) in items {
        let Some(any) = any else {
            errors.push(format!(
                "{} '{}': no resource body",
                kind.noun(),
                name.unwrap_or_default()
            ));
            continue;
        };
        if any.type_url != kind.type_url() {
            errors.push(format!("{}: unexpected type {}", kind.noun(), any.type_url));
            continue;
        }
        let name = match name {
            Some(n) if !n.is_empty() => n,
            _ => match crate::config::resource_name(kind.type_name(), &any) {
                Ok(n) => n,
                Err(e) => {
                    errors.push(format!("{}: {e}", kind.noun()));
                    continue;
                }
            },
        };
        if !seen.insert(name.clone()) {
            errors.push(format!(
                "{} '{name}': duplicate resource name in one response",
                kind.noun()
            ));
            out.retain(|(n, _, _): &Upsert| *n != name);
            continue;
        }
        out.push((name, version, any));
    }
    out
}

fn request(
    kind: Kind,
    names: &BTreeSet<String>,
    nonce: String,
    error_detail: Option<Status>,
    version_info: String,
    node: &mut Option<legate_proto::pb::envoy::config::core::v3::Node>,
) -> DiscoveryRequest {
    DiscoveryRequest {
        version_info,
        node: node.take(),
        resource_names: names.iter().cloned().collect(),
        type_url: kind.type_url().to_owned(),
        response_nonce: nonce,
        error_detail,
        ..Default::default()
    }
}

async fn sotw(
    state: &mut State,
    cluster: &Cluster,
    config: &DynamicConfig,
    runtime: &Runtime,
    progressed: &mut bool,
) -> Result<(), StreamError> {
    let channel = connect(cluster).await?;
    let mut client =
        AggregatedDiscoveryServiceClient::new(channel).max_decoding_message_size(usize::MAX);
    let (tx, rx) = mpsc::unbounded_channel::<DiscoveryRequest>();
    let mut node = Some(runtime.node.node.clone());
    let mut nonces: HashMap<Kind, String> = HashMap::new();
    let mut sent: HashMap<Kind, BTreeSet<String>> = HashMap::new();
    let kinds = kinds(config);
    for &kind in &kinds {
        let names = state.wanted(kind);
        if !kind.wildcard() && names.is_empty() {
            continue;
        }
        let _ = tx.send(request(
            kind,
            &names,
            String::new(),
            None,
            state.version(kind),
            &mut node,
        ));
        sent.insert(kind, names);
    }
    let mut inbound = client
        .stream_aggregated_resources(UnboundedReceiverStream::new(rx))
        .await?
        .into_inner();
    tracing::info!("xDS: state-of-the-world ADS stream open");
    let mut release_at: Option<tokio::time::Instant> = None;
    loop {
        let resp: DiscoveryResponse = next_response(&mut inbound, state, &mut release_at).await?;
        *progressed = true;
        let Some(kind) = Kind::from_type_url(&resp.type_url) else {
            let _ = tx.send(DiscoveryRequest {
                type_url: resp.type_url.clone(),
                response_nonce: resp.nonce.clone(),
                error_detail: Some(nack(format!("unsupported type {}", resp.type_url))),
                ..Default::default()
            });
            continue;
        };
        nonces.insert(kind, resp.nonce.clone());
        let mut errors = Vec::new();
        let items = resp
            .resources
            .into_iter()
            .map(|a| (None, resp.version_info.clone(), Some(a)))
            .collect();
        let mut upserts = named(kind, items, &mut errors);
        let subscribed = sent.get(&kind).cloned().unwrap_or_default();
        if !kind.wildcard() {
            // Resources nobody asked for are ignored.
            upserts.retain(|(n, _, _)| subscribed.contains(n));
        }
        let removed: Vec<String> = if kind.wildcard() {
            // State of the world: a listener or cluster missing from the response is gone.
            let present: BTreeSet<&String> = upserts.iter().map(|(n, _, _)| n).collect();
            state
                .known(kind)
                .into_iter()
                .filter(|n| !present.contains(n))
                .collect()
        } else {
            Vec::new()
        };
        if let Some(e) = state.apply(kind, upserts, removed) {
            errors.push(e);
        }
        let names = sent.get(&kind).cloned().unwrap_or_default();
        if errors.is_empty() {
            state.set_version(kind, &resp.version_info);
            tracing::debug!(type_url = %resp.type_url, version = %resp.version_info, "xDS: ACK");
            let _ = tx.send(request(
                kind,
                &names,
                resp.nonce.clone(),
                None,
                resp.version_info.clone(),
                &mut node,
            ));
        } else {
            let message = errors.join("\n");
            tracing::warn!(type_url = %resp.type_url, version = %resp.version_info, "xDS: NACK: {message}");
            let _ = tx.send(request(
                kind,
                &names,
                resp.nonce.clone(),
                Some(nack(message)),
                state.version(kind),
                &mut node,
            ));
        }
        // Follow the references: new route or endpoint names, and the ones no longer named.
        state.prune();
        for &k in &kinds {
            if k.wildcard() {
                continue;
            }
            let wanted = state.wanted(k);
            let had = sent.get(&k);
            if had == Some(&wanted) || (had.is_none() && wanted.is_empty()) {
                continue;
            }
            let nonce = nonces.get(&k).cloned().unwrap_or_default();
            let _ = tx.send(request(
                k,
                &wanted,
                nonce,
                None,
                state.version(k),
                &mut node,
            ));
            sent.insert(k, wanted);
        }
    }
}

async fn delta(
    state: &mut State,
    cluster: &Cluster,
    config: &DynamicConfig,
    runtime: &Runtime,
    progressed: &mut bool,
) -> Result<(), StreamError> {
    let channel = connect(cluster).await?;
    let mut client =
        AggregatedDiscoveryServiceClient::new(channel).max_decoding_message_size(usize::MAX);
    let (tx, rx) = mpsc::unbounded_channel::<DeltaDiscoveryRequest>();
    let mut node = Some(runtime.node.node.clone());
    let mut sent: HashMap<Kind, BTreeSet<String>> = HashMap::new();
    let kinds = kinds(config);
    for &kind in &kinds {
        let names = state.wanted(kind);
        if !kind.wildcard() && names.is_empty() {
            continue;
        }
        // On a new stream the client says what it has, so the server sends only changes.
        let _ = tx.send(DeltaDiscoveryRequest {
            node: node.take(),
            type_url: kind.type_url().to_owned(),
            resource_names_subscribe: names.iter().cloned().collect(),
            initial_resource_versions: state.resource_versions(kind),
            ..Default::default()
        });
        sent.insert(kind, names);
    }
    let mut inbound = client
        .delta_aggregated_resources(UnboundedReceiverStream::new(rx))
        .await?
        .into_inner();
    tracing::info!("xDS: delta ADS stream open");
    let mut release_at: Option<tokio::time::Instant> = None;
    loop {
        let resp: DeltaDiscoveryResponse =
            next_response(&mut inbound, state, &mut release_at).await?;
        *progressed = true;
        let Some(kind) = Kind::from_type_url(&resp.type_url) else {
            let _ = tx.send(DeltaDiscoveryRequest {
                type_url: resp.type_url.clone(),
                response_nonce: resp.nonce.clone(),
                error_detail: Some(nack(format!("unsupported type {}", resp.type_url))),
                ..Default::default()
            });
            continue;
        };
        let mut errors = Vec::new();
        let items = resp
            .resources
            .into_iter()
            .map(|r| (Some(r.name), r.version, r.resource))
            .collect();
        let mut upserts = named(kind, items, &mut errors);
        let mut removed = resp.removed_resources;
        if !kind.wildcard() {
            let subscribed = sent.get(&kind).cloned().unwrap_or_default();
            upserts.retain(|(n, _, _)| subscribed.contains(n));
            removed.retain(|n| subscribed.contains(n));
        }
        if let Some(e) = state.apply(kind, upserts, removed) {
            errors.push(e);
        }
        let error_detail = if errors.is_empty() {
            state.set_version(kind, &resp.system_version_info);
            None
        } else {
            let message = errors.join("\n");
            tracing::warn!(type_url = %resp.type_url, "xDS: NACK: {message}");
            Some(nack(message))
        };
        let _ = tx.send(DeltaDiscoveryRequest {
            type_url: resp.type_url.clone(),
            response_nonce: resp.nonce.clone(),
            error_detail,
            ..Default::default()
        });
        state.prune();
        for &k in &kinds {
            if k.wildcard() {
                continue;
            }
            let wanted = state.wanted(k);
            let had = sent.get(&k).cloned().unwrap_or_default();
            if had == wanted {
                continue;
            }
            let _ = tx.send(DeltaDiscoveryRequest {
                type_url: k.type_url().to_owned(),
                resource_names_subscribe: wanted.difference(&had).cloned().collect(),
                resource_names_unsubscribe: had.difference(&wanted).cloned().collect(),
                ..Default::default()
            });
            sent.insert(k, wanted);
        }
    }
}
