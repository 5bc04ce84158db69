//! The ADS server: one task per state-of-the-world stream, fed by the snapshot cache.
//!
//! The task owns its [`stream::StreamState`] and a `watch` receiver of its group's snapshot;
//! it wakes on a request or a new snapshot, and pushes what is due in ADS order (CDS, EDS,
//! LDS, RDS). It ends cleanly when the proxy hangs up, the stream fails, or the server shuts
//! down. State of the world ([`stream`]) and Delta ([`delta`]) share this task; only the
//! per-type bookkeeping differs, behind [`Protocol`].

pub mod delta;
pub mod stream;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use legate_proto::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::AggregatedDiscoveryService;
use legate_proto::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::cache::SnapshotCache;
use crate::identity::ProxyIdentity;
use crate::metrics::Metrics;
use crate::registry::{ProxyRegistry, ProxyStatus};
use crate::snapshot::{ResourceType, Snapshot};
use delta::DeltaState;
use legate_proto::pb::envoy::config::core::v3::Node;
use stream::{RequestOutcome, StreamState, TypeStatus};

/// What differs between state-of-the-world and Delta streams.
pub trait Protocol: Send + Sync + 'static {
    type Request: Send + Sync + 'static;
    type Response: Send + Sync + 'static;
    /// `sotw` or `delta`, for logs.
    const NAME: &'static str;
    fn node(req: &Self::Request) -> Option<&Node>;
    fn nonce(req: &Self::Request) -> &str;
    /// The response's version and resource count, for logs.
    fn describe(resp: &Self::Response) -> (&str, usize);
    fn on_request(&mut self, req: &Self::Request) -> (Option<ResourceType>, RequestOutcome);
    fn next_response(&mut self, t: ResourceType, snapshot: &Snapshot) -> Option<Self::Response>;
    /// Resends the assignments of the clusters the latest CDS response changed or added.
    fn warm_changed_clusters(&mut self);
    fn subscribed(&self, t: ResourceType) -> bool;
    fn status(&self, t: ResourceType, snapshot: &Snapshot) -> TypeStatus;
}

impl Protocol for StreamState {
    type Request = DiscoveryRequest;
    type Response = DiscoveryResponse;
    const NAME: &'static str = "sotw";
    fn node(req: &DiscoveryRequest) -> Option<&Node> {
        req.node.as_ref()
    }
    fn nonce(req: &DiscoveryRequest) -> &str {
        &req.response_nonce
    }
    fn describe(resp: &DiscoveryResponse) -> (&str, usize) {
        (&resp.version_info, resp.resources.len())
    }
    fn on_request(&mut self, req: &DiscoveryRequest) -> (Option<ResourceType>, RequestOutcome) {
        StreamState::on_request(self, req)
    }
    fn next_response(&mut self, t: ResourceType, snapshot: &Snapshot) -> Option<DiscoveryResponse> {
        StreamState::next_response(self, t, snapshot)
    }
    fn warm_changed_clusters(&mut self) {
        StreamState::warm_changed_clusters(self)
    }
    fn subscribed(&self, t: ResourceType) -> bool {
        StreamState::subscribed(self, t)
    }
    fn status(&self, t: ResourceType, snapshot: &Snapshot) -> TypeStatus {
        StreamState::status(self, t, snapshot)
    }
}

impl Protocol for DeltaState {
    type Request = DeltaDiscoveryRequest;
    type Response = DeltaDiscoveryResponse;
    const NAME: &'static str = "delta";
    fn node(req: &DeltaDiscoveryRequest) -> Option<&Node> {
        req.node.as_ref()
    }
    fn nonce(req: &DeltaDiscoveryRequest) -> &str {
        &req.response_nonce
    }
    fn describe(resp: &DeltaDiscoveryResponse) -> (&str, usize) {
        (&resp.system_version_info, resp.resources.len())
    }
    fn on_request(
        &mut self,
        req: &DeltaDiscoveryRequest,
    ) -> (Option<ResourceType>, RequestOutcome) {
        DeltaState::on_request(self, req)
    }
    fn next_response(
        &mut self,
        t: ResourceType,
        snapshot: &Snapshot,
    ) -> Option<DeltaDiscoveryResponse> {
        DeltaState::next_response(self, t, snapshot)
    }
    fn warm_changed_clusters(&mut self) {
        DeltaState::warm_changed_clusters(self)
    }
    fn subscribed(&self, t: ResourceType) -> bool {
        DeltaState::subscribed(self, t)
    }
    fn status(&self, t: ResourceType, snapshot: &Snapshot) -> TypeStatus {
        DeltaState::status(self, t, snapshot)
    }
}

/// The aggregated discovery service.
pub struct AdsServer {
    cache: Arc<SnapshotCache>,
    registry: Arc<ProxyRegistry>,
    metrics: Arc<Metrics>,
    shutdown: watch::Receiver<bool>,
    next_stream: AtomicU64,
}

impl AdsServer {
    pub fn new(
        cache: Arc<SnapshotCache>,
        registry: Arc<ProxyRegistry>,
        metrics: Arc<Metrics>,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        Self {
            cache,
            registry,
            metrics,
            shutdown,
            next_stream: AtomicU64::new(1),
        }
    }

    fn spawn<P: Protocol + Default>(
        &self,
        inbound: Streaming<P::Request>,
    ) -> ReceiverStream<Result<P::Response, Status>> {
        let (tx, rx) = mpsc::channel(16);
        let task = StreamTask::<P> {
            id: self.next_stream.fetch_add(1, Ordering::Relaxed),
            cache: self.cache.clone(),
            registry: self.registry.clone(),
            metrics: self.metrics.clone(),
            tx,
        };
        self.metrics.inc(&self.metrics.streams_total);
        tokio::spawn(task.run(inbound, self.shutdown.clone()));
        ReceiverStream::new(rx)
    }
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for AdsServer {
    type StreamAggregatedResourcesStream = ReceiverStream<Result<DiscoveryResponse, Status>>;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        Ok(Response::new(
            self.spawn::<StreamState>(request.into_inner()),
        ))
    }

    type DeltaAggregatedResourcesStream = ReceiverStream<Result<DeltaDiscoveryResponse, Status>>;

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        Ok(Response::new(
            self.spawn::<DeltaState>(request.into_inner()),
        ))
    }
}

struct StreamTask<P: Protocol> {
    id: u64,
    cache: Arc<SnapshotCache>,
    registry: Arc<ProxyRegistry>,
    metrics: Arc<Metrics>,
    tx: mpsc::Sender<Result<P::Response, Status>>,
}

/// Why a stream ended.
#[derive(Debug, thiserror::Error)]
enum StreamEnd {
    #[error("the proxy closed the stream")]
    Closed,
    #[error("the control plane is shutting down")]
    Shutdown,
    #[error("stream error: {0}")]
    Transport(Status),
    #[error("{0}")]
    Refused(Status),
}

/// The per-stream context once the proxy is identified.
struct Session<P> {
    node_id: String,
    pod: Option<String>,
    labels: BTreeMap<String, String>,
    group: String,
    connected_at: u64,
    state: P,
    snapshots: watch::Receiver<Arc<Snapshot>>,
    /// When the model change behind the latest snapshot was seen, until the proxy is in
    /// sync with it (then observed as its convergence time).
    converging: Option<std::time::Instant>,
}

impl<P: Protocol + Default> StreamTask<P> {
    async fn run(self, mut inbound: Streaming<P::Request>, mut shutdown: watch::Receiver<bool>) {
        let result = self.serve(&mut inbound, &mut shutdown).await;
        self.registry.remove(self.id);
        match result {
            Err(StreamEnd::Refused(status)) => {
                tracing::warn!(stream = self.id, error = %status.message(), "stream refused");
                let _ = self.tx.send(Err(status)).await;
            }
            Err(end) => tracing::info!(stream = self.id, reason = %end, "stream ended"),
            Ok(()) => {}
        }
    }

    async fn serve(
        &self,
        inbound: &mut Streaming<P::Request>,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<(), StreamEnd> {
        let first = tokio::select! {
            msg = inbound.message() => msg.map_err(StreamEnd::Transport)?.ok_or(StreamEnd::Closed)?,
            _ = shutdown.changed() => return Err(StreamEnd::Shutdown),
        };
        let identity = ProxyIdentity::from_node(P::node(&first))
            .map_err(|e| StreamEnd::Refused(Status::invalid_argument(e.to_string())))?;
        let group = identity.group();
        let snapshots = self
            .cache
            .watch(&group)
            .map_err(|e| StreamEnd::Refused(Status::internal(e.to_string())))?;
        tracing::info!(stream = self.id, protocol = P::NAME, node = %identity.id, group = %group, "proxy connected");
        // The proxy's own pod (by its IP), and its labels when the node does not say them.
        let model = self.cache.model();
        let pod = model.as_deref().and_then(|m| m.pod_by_ip(identity.ip));
        let labels = if identity.labels.is_empty() {
            pod.map(|p| p.labels.clone()).unwrap_or_default()
        } else {
            identity.labels.clone()
        };
        let mut session = Session {
            node_id: identity.id.clone(),
            pod: pod.map(|p| format!("{}/{}", p.namespace, p.name)),
            labels,
            group: group.to_string(),
            connected_at: ProxyRegistry::connected_at_now(),
            state: P::default(),
            snapshots,
            converging: None,
        };
        self.handle_request(&mut session, &first).await?;
        loop {
            tokio::select! {
                msg = inbound.message() => {
                    let req = msg.map_err(StreamEnd::Transport)?.ok_or(StreamEnd::Closed)?;
                    self.handle_request(&mut session, &req).await?;
                }
                changed = session.snapshots.changed() => {
                    if changed.is_err() {
                        return Err(StreamEnd::Shutdown);
                    }
                    let snapshot = session.snapshots.borrow_and_update().clone();
                    if let Some(seen) = snapshot.change_seen_at() {
                        // A proxy still converging on an earlier change keeps that start.
                        session.converging.get_or_insert(seen);
                    }
                    self.push(&mut session, &snapshot, &ResourceType::ORDER).await?;
                }
                _ = shutdown.changed() => return Err(StreamEnd::Shutdown),
                _ = self.tx.closed() => return Err(StreamEnd::Closed),
            }
        }
    }

    async fn handle_request(
        &self,
        session: &mut Session<P>,
        req: &P::Request,
    ) -> Result<(), StreamEnd> {
        let (t, outcome) = session.state.on_request(req);
        match (&outcome, t) {
            (RequestOutcome::UnknownType(url), _) => {
                tracing::warn!(stream = self.id, type_url = %url, "request for an unserved type ignored");
            }
            (RequestOutcome::Ack { push_ack }, Some(t)) => {
                self.metrics.inc_type(&self.metrics.acks, t);
                if let Some(d) = push_ack {
                    self.metrics.observe_push_ack(*d);
                }
                tracing::debug!(
                    stream = self.id,
                    r#type = t.short_name(),
                    nonce = P::nonce(req),
                    "ACK"
                );
            }
            (RequestOutcome::Nack { detail, push_ack }, Some(t)) => {
                self.metrics.inc_type(&self.metrics.nacks, t);
                if let Some(d) = push_ack {
                    self.metrics.observe_push_ack(*d);
                }
                tracing::warn!(stream = self.id, node = %session.node_id, r#type = t.short_name(), nonce = P::nonce(req), error_detail = %detail, "NACK");
            }
            (RequestOutcome::Stale, Some(t)) => {
                tracing::debug!(
                    stream = self.id,
                    r#type = t.short_name(),
                    nonce = P::nonce(req),
                    "stale nonce: not an ACK"
                );
            }
            _ => {}
        }
        if let (Some(t), false) = (t, outcome == RequestOutcome::Stale) {
            let snapshot = session.snapshots.borrow().clone();
            self.push(session, &snapshot, &[t]).await?;
        } else {
            self.report(session);
        }
        Ok(())
    }

    /// Sends what is due among `types`, in ADS order. A CDS push is followed by EDS (sent
    /// even if unchanged) so that updated clusters finish warming.
    async fn push(
        &self,
        session: &mut Session<P>,
        snapshot: &Snapshot,
        types: &[ResourceType],
    ) -> Result<(), StreamEnd> {
        let mut eds_forced = false;
        for t in ResourceType::ORDER {
            let wanted = types.contains(&t) || (t == ResourceType::Endpoint && eds_forced);
            if !wanted {
                continue;
            }
            if let Some(response) = session.state.next_response(t, snapshot) {
                let (version, resources) = P::describe(&response);
                tracing::debug!(
                    stream = self.id,
                    r#type = t.short_name(),
                    version,
                    resources,
                    "push"
                );
                self.metrics.inc_type(&self.metrics.pushes, t);
                self.tx
                    .send(Ok(response))
                    .await
                    .map_err(|_| StreamEnd::Closed)?;
                if t == ResourceType::Cluster && session.state.subscribed(ResourceType::Endpoint) {
                    session.state.warm_changed_clusters();
                    eds_forced = true;
                }
            }
        }
        self.report(session);
        Ok(())
    }

    fn report(&self, session: &mut Session<P>) {
        let snapshot = session.snapshots.borrow().clone();
        let types: BTreeMap<&'static str, _> = ResourceType::ORDER
            .into_iter()
            .filter(|t| session.state.subscribed(*t))
            .map(|t| (t.short_name(), session.state.status(t, &snapshot)))
            .collect();
        let in_sync = types.values().all(|s| s.in_sync);
        if in_sync {
            if let Some(seen) = session.converging.take() {
                self.metrics.convergence.observe(seen.elapsed());
            }
        }
        self.registry.update(ProxyStatus {
            stream: self.id,
            node_id: session.node_id.clone(),
            pod: session.pod.clone(),
            labels: session.labels.clone(),
            group: session.group.clone(),
            connected_at: session.connected_at,
            types,
            in_sync,
        });
    }
}
