//! The ADS service: one task per stream, and the SotW and Delta subscription state machines.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use legate_proto::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::AggregatedDiscoveryService;
use legate_proto::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
    Resource as DeltaResource,
};
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;

use super::{
    resource_name, Request, Response, Run, Shared, State, XdsProtocol, CDS, LDS, PUSH_ORDER,
};

/// Only LDS and CDS can be subscribed by wildcard.
fn wildcard_capable(type_url: &str) -> bool {
    type_url == LDS || type_url == CDS
}

/// The ADS service of one run.
pub(super) struct Ads {
    pub(super) shared: Arc<Shared>,
    pub(super) run: Arc<Run>,
}

type Outbox<T> = mpsc::Sender<Result<T, tonic::Status>>;

#[tonic::async_trait]
impl AggregatedDiscoveryService for Ads {
    type StreamAggregatedResourcesStream = ReceiverStream<Result<DiscoveryResponse, tonic::Status>>;
    type DeltaAggregatedResourcesStream =
        ReceiverStream<Result<DeltaDiscoveryResponse, tonic::Status>>;

    async fn stream_aggregated_resources(
        &self,
        request: tonic::Request<Streaming<DiscoveryRequest>>,
    ) -> Result<tonic::Response<Self::StreamAggregatedResourcesStream>, tonic::Status> {
        let (tx, rx) = mpsc::channel(64);
        let shared = self.shared.clone();
        let task = tokio::spawn(run_stream(
            shared,
            request.into_inner(),
            tx,
            SotwStream::default(),
        ));
        self.run.track(task.abort_handle());
        Ok(tonic::Response::new(ReceiverStream::new(rx)))
    }

    async fn delta_aggregated_resources(
        &self,
        request: tonic::Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<tonic::Response<Self::DeltaAggregatedResourcesStream>, tonic::Status> {
        let (tx, rx) = mpsc::channel(64);
        let shared = self.shared.clone();
        let task = tokio::spawn(run_stream(
            shared,
            request.into_inner(),
            tx,
            DeltaStream::default(),
        ));
        self.run.track(task.abort_handle());
        Ok(tonic::Response::new(ReceiverStream::new(rx)))
    }
}

/// What differs between a SotW and a Delta stream.
trait StreamProtocol: Send + 'static {
    type Req: Message + Default + Send + 'static;
    type Resp: Send + 'static;
    /// What the log keeps of `req`.
    fn record(stream: u64, first: bool, req: &Self::Req) -> Request;
    /// Handles a request; returns the responses due now (without nonces).
    fn on_request(&mut self, req: &Self::Req, state: &State) -> Vec<Self::Resp>;
    /// The responses due because resources changed.
    fn on_change(&mut self, state: &State) -> Vec<Self::Resp>;
    /// Stamps `nonce` on a response and describes it for the log.
    fn finish(&mut self, stream: u64, nonce: String, resp: &mut Self::Resp) -> Response;
}

async fn run_stream<P: StreamProtocol>(
    shared: Arc<Shared>,
    mut requests: Streaming<P::Req>,
    tx: Outbox<P::Resp>,
    mut protocol: P,
) {
    let stream = {
        let mut state = shared.lock();
        state.next_stream += 1;
        state.next_stream
    };
    let mut changed = shared.resources_changed.subscribe();
    let mut first = true;
    loop {
        let due = tokio::select! {
            req = requests.message() => {
                let Ok(Some(req)) = req else { break };
                let mut state = shared.lock();
                state.log.requests.push(P::record(stream, first, &req));
                first = false;
                protocol.on_request(&req, &state)
            }
            res = changed.changed() => {
                if res.is_err() {
                    break;
                }
                let state = shared.lock();
                protocol.on_change(&state)
            }
        };
        shared.bump_logged();
        for mut resp in due {
            {
                let mut state = shared.lock();
                state.next_nonce += 1;
                let nonce = format!("{stream}-{}", state.next_nonce);
                let recorded = protocol.finish(stream, nonce, &mut resp);
                state.log.responses.push(recorded);
            }
            shared.bump_logged();
            if tx.send(Ok(resp)).await.is_err() {
                return;
            }
        }
    }
}

/// A state-of-the-world subscription to one type.
#[derive(Debug, Clone, PartialEq, Default)]
struct SotwSub {
    wildcard: bool,
    /// The first request named nothing: an empty list keeps meaning wildcard.
    legacy_wildcard: bool,
    names: BTreeSet<String>,
    /// The version last sent, and the nonce of that response.
    sent_version: Option<String>,
    nonce: String,
}

#[derive(Debug, Default)]
struct SotwStream {
    subs: HashMap<String, SotwSub>,
}

impl SotwStream {
    fn response(&mut self, type_url: &str, state: &State) -> Option<DiscoveryResponse> {
        let t = state.types.get(type_url)?;
        let sub = self.subs.get_mut(type_url)?;
        let resources = t
            .entries
            .iter()
            .filter(|e| sub.wildcard || sub.names.contains(&e.name))
            .map(|e| e.any.clone())
            .collect();
        sub.sent_version = Some(t.version.clone());
        Some(DiscoveryResponse {
            version_info: t.version.clone(),
            resources,
            type_url: type_url.to_string(),
            ..Default::default()
        })
    }
}

impl StreamProtocol for SotwStream {
    type Req = DiscoveryRequest;
    type Resp = DiscoveryResponse;

    fn record(stream: u64, first: bool, req: &DiscoveryRequest) -> Request {
        Request {
            stream,
            protocol: XdsProtocol::Sotw,
            type_url: req.type_url.clone(),
            version_info: req.version_info.clone(),
            response_nonce: req.response_nonce.clone(),
            resource_names: req.resource_names.clone(),
            subscribe: Vec::new(),
            unsubscribe: Vec::new(),
            initial_resource_versions: BTreeMap::new(),
            error: req.error_detail.as_ref().map(|e| e.message.clone()),
            node_id: req.node.as_ref().map(|n| n.id.clone()),
            first_on_stream: first,
        }
    }

    fn on_request(&mut self, req: &DiscoveryRequest, state: &State) -> Vec<DiscoveryResponse> {
        let t = req.type_url.as_str();
        let old = self.subs.get(t).cloned();
        if let Some(old) = &old {
            if !req.response_nonce.is_empty() && req.response_nonce != old.nonce {
                // Stale: a newer response is in flight and will be answered.
                return Vec::new();
            }
        }
        let mut sub = old.clone().unwrap_or_default();
        let names: BTreeSet<String> = req.resource_names.iter().cloned().collect();
        if old.is_none() && names.is_empty() && wildcard_capable(t) {
            sub.legacy_wildcard = true;
            sub.wildcard = true;
        } else if names.is_empty() && sub.legacy_wildcard {
            sub.wildcard = true;
        } else {
            sub.legacy_wildcard = false;
            sub.wildcard = names.contains("*");
        }
        sub.names = names.into_iter().filter(|n| n != "*").collect();
        let changed = old
            .as_ref()
            .is_none_or(|o| o.wildcard != sub.wildcard || o.names != sub.names);
        self.subs.insert(t.to_string(), sub);
        if !changed {
            return Vec::new();
        }
        self.response(t, state).into_iter().collect()
    }

    fn on_change(&mut self, state: &State) -> Vec<DiscoveryResponse> {
        let mut out = Vec::new();
        for t in ordered_types(state) {
            let due = match (self.subs.get(t), state.types.get(t)) {
                (Some(sub), Some(ts)) => sub.sent_version.as_deref() != Some(ts.version.as_str()),
                _ => false,
            };
            if due {
                out.extend(self.response(t, state));
            }
        }
        out
    }

    fn finish(&mut self, stream: u64, nonce: String, resp: &mut DiscoveryResponse) -> Response {
        if let Some(sub) = self.subs.get_mut(&resp.type_url) {
            sub.nonce = nonce.clone();
        }
        resp.nonce = nonce.clone();
        Response {
            stream,
            protocol: XdsProtocol::Sotw,
            type_url: resp.type_url.clone(),
            version: resp.version_info.clone(),
            nonce,
            resources: resp
                .resources
                .iter()
                .map(|a| resource_name(a).unwrap_or_default())
                .collect(),
            removed: Vec::new(),
        }
    }
}

/// The types with resources, in ADS push order.
fn ordered_types(state: &State) -> Vec<&str> {
    let mut out: Vec<&str> = PUSH_ORDER
        .iter()
        .copied()
        .filter(|t| state.types.contains_key(*t))
        .collect();
    out.extend(
        state
            .types
            .keys()
            .map(String::as_str)
            .filter(|t| !PUSH_ORDER.contains(t)),
    );
    out
}

/// A Delta subscription to one type.
#[derive(Debug, Default)]
struct DeltaSub {
    wildcard: bool,
    names: BTreeSet<String>,
    /// What the client has: name → version.
    has: BTreeMap<String, String>,
}

#[derive(Debug, Default)]
struct DeltaStream {
    subs: HashMap<String, DeltaSub>,
}

impl DeltaStream {
    /// The changes due for `type_url`; `force` names are sent (or reported removed) even when
    /// the client has them.
    fn response(
        &mut self,
        type_url: &str,
        state: &State,
        force: &BTreeSet<String>,
    ) -> Option<DeltaDiscoveryResponse> {
        let t = state.types.get(type_url)?;
        let sub = self.subs.get_mut(type_url)?;
        // Decide per name first, so that duplicate entries (a test of the client) all go out.
        let due: BTreeSet<&str> = t
            .entries
            .iter()
            .filter(|e| sub.wildcard || sub.names.contains(&e.name))
            .filter(|e| sub.has.get(&e.name) != Some(&e.version) || force.contains(&e.name))
            .map(|e| e.name.as_str())
            .collect();
        let mut resources = Vec::new();
        for e in t.entries.iter().filter(|e| due.contains(e.name.as_str())) {
            sub.has.insert(e.name.clone(), e.version.clone());
            resources.push(DeltaResource {
                name: e.name.clone(),
                version: e.version.clone(),
                resource: Some(e.any.clone()),
                ..Default::default()
            });
        }
        let exists = |n: &String| t.entries.iter().any(|e| &e.name == n);
        let mut removed: BTreeSet<String> =
            sub.has.keys().filter(|n| !exists(n)).cloned().collect();
        if state.report_missing {
            removed.extend(force.iter().filter(|n| !exists(n)).cloned());
        }
        for n in &removed {
            sub.has.remove(n);
        }
        if resources.is_empty() && removed.is_empty() {
            return None;
        }
        Some(DeltaDiscoveryResponse {
            system_version_info: t.version.clone(),
            resources,
            type_url: type_url.to_string(),
            removed_resources: removed.into_iter().collect(),
            ..Default::default()
        })
    }
}

impl StreamProtocol for DeltaStream {
    type Req = DeltaDiscoveryRequest;
    type Resp = DeltaDiscoveryResponse;

    fn record(stream: u64, first: bool, req: &DeltaDiscoveryRequest) -> Request {
        Request {
            stream,
            protocol: XdsProtocol::Delta,
            type_url: req.type_url.clone(),
            version_info: String::new(),
            response_nonce: req.response_nonce.clone(),
            resource_names: Vec::new(),
            subscribe: req.resource_names_subscribe.clone(),
            unsubscribe: req.resource_names_unsubscribe.clone(),
            initial_resource_versions: req
                .initial_resource_versions
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            error: req.error_detail.as_ref().map(|e| e.message.clone()),
            node_id: req.node.as_ref().map(|n| n.id.clone()),
            first_on_stream: first,
        }
    }

    fn on_request(
        &mut self,
        req: &DeltaDiscoveryRequest,
        state: &State,
    ) -> Vec<DeltaDiscoveryResponse> {
        let t = req.type_url.as_str();
        let first = !self.subs.contains_key(t);
        let sub = self.subs.entry(t.to_string()).or_default();
        if first {
            sub.wildcard = req.resource_names_subscribe.is_empty() && wildcard_capable(t);
            sub.has = req
                .initial_resource_versions
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
        }
        let mut force = BTreeSet::new();
        for n in &req.resource_names_subscribe {
            if n == "*" {
                sub.wildcard = true;
            } else {
                sub.names.insert(n.clone());
                force.insert(n.clone());
            }
        }
        for n in &req.resource_names_unsubscribe {
            if n == "*" {
                sub.wildcard = false;
            } else {
                sub.names.remove(n);
            }
            if !sub.wildcard {
                sub.has.remove(n);
            }
        }
        self.response(t, state, &force).into_iter().collect()
    }

    fn on_change(&mut self, state: &State) -> Vec<DeltaDiscoveryResponse> {
        let none = BTreeSet::new();
        let types: Vec<String> = ordered_types(state)
            .into_iter()
            .filter(|t| self.subs.contains_key(*t))
            .map(str::to_string)
            .collect();
        types
            .iter()
            .filter_map(|t| self.response(t, state, &none))
            .collect()
    }

    fn finish(
        &mut self,
        stream: u64,
        nonce: String,
        resp: &mut DeltaDiscoveryResponse,
    ) -> Response {
        resp.nonce = nonce.clone();
        Response {
            stream,
            protocol: XdsProtocol::Delta,
            type_url: resp.type_url.clone(),
            version: resp.system_version_info.clone(),
            nonce,
            resources: resp.resources.iter().map(|r| r.name.clone()).collect(),
            removed: resp.removed_resources.clone(),
        }
    }
}
