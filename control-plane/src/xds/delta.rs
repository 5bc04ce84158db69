//! The state of one Delta (incremental) ADS stream, without any IO.
//!
//! Per type it tracks the subscription (explicit names and/or wildcard) and the version of
//! every resource the proxy is believed to hold (`known`, per-resource versions: the hash of
//! the encoded resource). A response carries only the resources whose version changed, and
//! `removed_resources` for those the proxy holds that are gone. As the protocol requires:
//! - a reconnecting proxy's `initial_resource_versions` seed `known`, so nothing it already
//!   has is resent;
//! - every name in `resource_names_subscribe` is answered, with the resource or, when it
//!   does not exist, in `removed_resources` (which does not unsubscribe it);
//! - a request with a stale nonce is not an ACK, but its subscription changes are honoured;
//! - a NACK (`error_detail`) is recorded and the same content is not resent.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use legate_proto::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource as DeltaResource,
};
use legate_proto::pb::google::protobuf::Any;

use crate::snapshot::{ResourceMap, ResourceType, Snapshot, TypeSnapshot};
use crate::xds::stream::{RequestOutcome, TypeStatus};

/// The per-resource version string sent to proxies.
pub fn resource_version(hash: u64) -> String {
    format!("{hash:016x}")
}

#[derive(Debug, Clone, Default)]
struct DeltaType {
    requested: bool,
    wildcard: bool,
    names: HashSet<String>,
    /// Name → per-resource hash the proxy holds (as far as we know); `None` for a version
    /// that is not one of ours (from `initial_resource_versions`), which never matches.
    known: HashMap<String, Option<u64>>,
    /// Names to answer even if unchanged (just subscribed, or a cluster to warm).
    resend: BTreeSet<String>,
    /// The snapshot resources `known` is known to equal the selection of.
    synced: Option<Arc<ResourceMap>>,
    /// The names the latest response of this type changed or added.
    last_changed: Vec<String>,
    /// The nonce of the un-ACKed response and when it was sent.
    pending: Option<(String, Instant)>,
    nack: Option<String>,
    /// The snapshot version of the last response sent and of the last one ACKed.
    sent_version: Option<String>,
    acked_version: Option<String>,
    sent_once: bool,
}

impl DeltaType {
    fn selects(&self, name: &str) -> bool {
        self.wildcard || self.names.contains(name)
    }

    fn is_synced_with(&self, latest: &TypeSnapshot) -> bool {
        self.synced
            .as_ref()
            .is_some_and(|s| Arc::ptr_eq(s, &latest.resources))
    }

    /// Whether the proxy holds exactly the selection of `latest`.
    fn holds(&self, latest: &TypeSnapshot) -> bool {
        if self.is_synced_with(latest) {
            return true;
        }
        let mut count = 0;
        for (name, r) in latest.resources.iter().filter(|(n, _)| self.selects(n)) {
            if self.known.get(&**name) != Some(&Some(r.hash)) {
                return false;
            }
            count += 1;
        }
        count == self.known.len()
    }
}

/// The per-type state of one Delta stream.
#[derive(Debug, Default)]
pub struct DeltaState {
    types: [DeltaType; ResourceType::COUNT],
    next_nonce: u64,
}

impl DeltaState {
    pub fn new() -> Self {
        Self::default()
    }

    /// Digests one request.
    pub fn on_request(
        &mut self,
        req: &DeltaDiscoveryRequest,
    ) -> (Option<ResourceType>, RequestOutcome) {
        let Some(t) = ResourceType::from_type_url(&req.type_url) else {
            return (None, RequestOutcome::UnknownType(req.type_url.clone()));
        };
        let state = &mut self.types[t.index()];
        let first = !state.requested;
        state.requested = true;
        if first {
            for (name, version) in &req.initial_resource_versions {
                let hash = u64::from_str_radix(version, 16).ok();
                state.known.insert(name.clone(), hash);
            }
            // Legacy wildcard: the first LDS/CDS request names nothing.
            if t.is_wildcard() && req.resource_names_subscribe.is_empty() {
                state.wildcard = true;
            }
        }
        for name in &req.resource_names_subscribe {
            if name == "*" {
                state.wildcard = true;
            } else {
                state.names.insert(name.clone());
                state.resend.insert(name.clone());
            }
        }
        if !req.resource_names_subscribe.is_empty() || !req.resource_names_unsubscribe.is_empty() {
            state.synced = None;
        }
        for name in &req.resource_names_unsubscribe {
            if name == "*" {
                state.wildcard = false;
            } else {
                state.names.remove(name);
                state.resend.remove(name);
                if !state.wildcard {
                    state.known.remove(name);
                }
            }
        }
        let outcome = if req.response_nonce.is_empty() {
            RequestOutcome::Subscribe
        } else {
            match &state.pending {
                Some((nonce, at)) if *nonce == req.response_nonce => {
                    let push_ack = Some(at.elapsed());
                    state.pending = None;
                    match &req.error_detail {
                        Some(status) => {
                            state.nack = Some(status.message.clone());
                            RequestOutcome::Nack {
                                detail: status.message.clone(),
                                push_ack,
                            }
                        }
                        None => {
                            state.nack = None;
                            state.acked_version = state.sent_version.clone();
                            RequestOutcome::Ack { push_ack }
                        }
                    }
                }
                // Not an ACK of the latest response, but the subscription change above stands.
                _ => RequestOutcome::Stale,
            }
        };
        (Some(t), outcome)
    }

    /// The response due for `t`, if any; records what the proxy will hold.
    pub fn next_response(
        &mut self,
        t: ResourceType,
        snapshot: &Snapshot,
    ) -> Option<DeltaDiscoveryResponse> {
        let state = &mut self.types[t.index()];
        if !state.requested || state.pending.is_some() {
            return None;
        }
        let latest = snapshot.get(t);
        if state.sent_once && state.resend.is_empty() && state.is_synced_with(latest) {
            return None;
        }
        let mut resources = Vec::new();
        let mut known_selected = 0;
        for (name, r) in latest.resources.iter().filter(|(n, _)| state.selects(n)) {
            let known = state.known.get(&**name);
            if known.is_some() {
                known_selected += 1;
            }
            if known != Some(&Some(r.hash)) || state.resend.contains(&**name) {
                resources.push(DeltaResource {
                    name: name.to_string(),
                    version: resource_version(r.hash),
                    resource: Some(Any::clone(&r.any)),
                    ..Default::default()
                });
            }
        }
        // What the proxy holds or asked for that the snapshot does not have (or that it no
        // longer subscribes to).
        let mut removed = Vec::new();
        if known_selected != state.known.len() || !state.resend.is_empty() {
            let gone =
                |n: &&String| !(state.selects(n) && latest.resources.contains_key(n.as_str()));
            let set: BTreeSet<&String> = state
                .known
                .keys()
                .filter(gone)
                .chain(state.resend.iter().filter(gone))
                .collect();
            removed = set.into_iter().cloned().collect();
        }
        state.synced = Some(latest.resources.clone());
        if resources.is_empty() && removed.is_empty() && state.sent_once {
            state.resend.clear();
            return None;
        }
        state.last_changed.clear();
        for r in &resources {
            let hash = latest.resources.get(r.name.as_str()).map(|x| x.hash);
            state.known.insert(r.name.clone(), hash);
            state.last_changed.push(r.name.clone());
        }
        for name in &removed {
            state.known.remove(name);
        }
        state.resend.clear();
        state.sent_once = true;
        self.next_nonce += 1;
        let nonce = self.next_nonce.to_string();
        state.pending = Some((nonce.clone(), Instant::now()));
        state.sent_version = Some(latest.version.clone());
        Some(DeltaDiscoveryResponse {
            system_version_info: latest.version.clone(),
            resources,
            type_url: t.type_url().to_string(),
            removed_resources: removed,
            nonce,
            ..Default::default()
        })
    }

    /// Resends the assignments of the clusters the latest CDS response changed or added
    /// with the next EDS response, so that those clusters finish warming.
    pub fn warm_changed_clusters(&mut self) {
        let changed = self.types[ResourceType::Cluster.index()]
            .last_changed
            .clone();
        let eds = &mut self.types[ResourceType::Endpoint.index()];
        let wanted: Vec<String> = changed.into_iter().filter(|n| eds.selects(n)).collect();
        eds.resend.extend(wanted);
    }

    pub fn subscribed(&self, t: ResourceType) -> bool {
        self.types[t.index()].requested
    }

    /// In sync: nothing pending, no NACK, and the proxy holds exactly what it subscribed to.
    pub fn status(&self, t: ResourceType, snapshot: &Snapshot) -> TypeStatus {
        let state = &self.types[t.index()];
        let latest = snapshot.get(t);
        let holds_latest = state.holds(latest);
        let pending = state.pending.is_some();
        TypeStatus {
            subscribed: state.requested,
            sent_version: state.sent_version.clone(),
            acked_version: state.acked_version.clone(),
            latest_version: latest.version.clone(),
            pending,
            nack: state.nack.clone(),
            in_sync: !state.requested || (!pending && state.nack.is_none() && holds_latest),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::sidecar_snapshot;
    use legate_proto::pb::google::rpc::Status;

    const CLUSTER: &str = "outbound|80||a.default.svc.cluster.local";

    fn snapshot(
        services: &[&str],
        version: u64,
        prev: Option<&Snapshot>,
    ) -> Result<Snapshot, Box<dyn std::error::Error>> {
        let text: Vec<String> = services
            .iter()
            .map(|s| format!("kind: Service\nmetadata: {{name: {s}}}\nspec: {{ports: [{{name: http, port: 80}}]}}\n"))
            .collect();
        sidecar_snapshot(&text.join("---\n"), version, prev)
    }

    fn request(t: ResourceType, subscribe: &[&str], nonce: &str) -> DeltaDiscoveryRequest {
        DeltaDiscoveryRequest {
            type_url: t.type_url().into(),
            resource_names_subscribe: subscribe.iter().map(|s| (*s).to_string()).collect(),
            response_nonce: nonce.into(),
            ..Default::default()
        }
    }

    const CDS: ResourceType = ResourceType::Cluster;
    const EDS: ResourceType = ResourceType::Endpoint;

    #[test]
    fn sends_only_changes_and_removals() -> Result<(), Box<dyn std::error::Error>> {
        let s1 = snapshot(&["a", "b"], 1, None)?;
        let mut st = DeltaState::new();
        st.on_request(&request(CDS, &[], ""));
        let r = st.next_response(CDS, &s1).ok_or("no response")?;
        assert_eq!(r.resources.len(), 2);
        assert!(r.removed_resources.is_empty());
        let (_, outcome) = st.on_request(&request(CDS, &[], &r.nonce));
        assert!(matches!(outcome, RequestOutcome::Ack { .. }));
        assert!(st.status(CDS, &s1).in_sync);
        assert!(st.next_response(CDS, &s1).is_none());
        let s2 = snapshot(&["a"], 2, Some(&s1))?;
        let r2 = st.next_response(CDS, &s2).ok_or("no removal")?;
        assert!(r2.resources.is_empty());
        assert_eq!(
            r2.removed_resources,
            ["outbound|80||b.default.svc.cluster.local"]
        );
        Ok(())
    }

    #[test]
    fn reconnect_with_initial_versions_resends_nothing() -> Result<(), Box<dyn std::error::Error>> {
        let s1 = snapshot(&["a"], 1, None)?;
        let hash = s1
            .get(CDS)
            .resources
            .get(CLUSTER)
            .map(|r| r.hash)
            .ok_or("no cluster")?;
        let mut st = DeltaState::new();
        let mut req = request(CDS, &[], "");
        req.initial_resource_versions
            .insert(CLUSTER.into(), resource_version(hash));
        st.on_request(&req);
        let r = st
            .next_response(CDS, &s1)
            .ok_or("first response still due")?;
        assert!(r.resources.is_empty() && r.removed_resources.is_empty());
        Ok(())
    }

    #[test]
    fn missing_names_are_reported_removed_and_nacks_not_resent(
    ) -> Result<(), Box<dyn std::error::Error>> {
        let s1 = snapshot(&["a"], 1, None)?;
        let mut st = DeltaState::new();
        st.on_request(&request(
            EDS,
            &[CLUSTER, "outbound|80||ghost.default.svc.cluster.local"],
            "",
        ));
        let r = st.next_response(EDS, &s1).ok_or("no response")?;
        assert_eq!(r.resources.len(), 1);
        assert_eq!(
            r.removed_resources,
            ["outbound|80||ghost.default.svc.cluster.local"]
        );
        let mut nack = request(EDS, &[], &r.nonce);
        nack.error_detail = Some(Status {
            code: 13,
            message: "no".into(),
            details: vec![],
        });
        assert!(matches!(
            st.on_request(&nack).1,
            RequestOutcome::Nack { .. }
        ));
        assert!(
            st.next_response(EDS, &s1).is_none(),
            "not resent after a NACK"
        );
        assert!(!st.status(EDS, &s1).in_sync);
        // A stale nonce still carries a subscription.
        let (_, outcome) = st.on_request(&request(EDS, &["outbound|80||x"], "old"));
        assert_eq!(outcome, RequestOutcome::Stale);
        let r = st
            .next_response(EDS, &s1)
            .ok_or("new subscription answered")?;
        assert_eq!(r.removed_resources, ["outbound|80||x"]);
        Ok(())
    }
}
