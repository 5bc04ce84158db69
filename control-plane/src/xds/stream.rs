//! The state of one state-of-the-world ADS stream, without any IO.
//!
//! Per resource type it tracks what the proxy subscribed to, what was last sent (version,
//! nonce, content) and what the proxy ACKed or NACKed. [`StreamState::on_request`] digests a
//! `DiscoveryRequest`; [`StreamState::next_response`] decides whether a response is due:
//! - at most one un-ACKed response per type (flow control);
//! - nothing is sent when the proxy already has exactly what the snapshot holds for its
//!   subscription, so a NACKed version is never resent in a loop;
//! - a NACK is detected by `error_detail`, never by comparing versions;
//! - a request whose nonce is not the latest one sent for its type is stale and ignored;
//! - LDS/CDS subscriptions are wildcard while the proxy sends empty `resource_names` from its
//!   first request on; after an explicit subscription, an empty list unsubscribes from all.

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use legate_proto::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use legate_proto::pb::google::protobuf::Any;
use serde::Serialize;

use crate::snapshot::{Resource, ResourceMap, ResourceType, Snapshot, TypeSnapshot};

/// What the proxy subscribed to for one type.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Subscription {
    /// Whether any request arrived for this type.
    pub requested: bool,
    pub wildcard: bool,
    /// Wildcard by the legacy rule (empty names from the first request on).
    legacy_wildcard: bool,
    /// A hash set: every request repeats the whole list (an ACK of a mesh's endpoints names
    /// every cluster), and every response looks each resource up in it.
    pub names: HashSet<String>,
}

impl Subscription {
    /// Applies the `resource_names` of a request. Returns `None` when the subscription did
    /// not change, else the explicit names it gained.
    pub fn update(&mut self, t: ResourceType, names: &[String]) -> Option<Vec<String>> {
        let first = !self.requested;
        self.requested = true;
        let before = (self.wildcard, self.legacy_wildcard);
        if names.is_empty() {
            let had_names = !self.names.is_empty();
            self.names.clear();
            self.legacy_wildcard = t.is_wildcard() && (first || self.legacy_wildcard);
            self.wildcard = self.legacy_wildcard;
            let changed = first || had_names || before != (self.wildcard, self.legacy_wildcard);
            return changed.then(Vec::new);
        }
        self.legacy_wildcard = false;
        self.wildcard = names.iter().any(|n| n == "*");
        let explicit = names.iter().filter(|n| *n != "*");
        // Usually the same list again (an ACK): compare before rebuilding.
        let added: Vec<String> = explicit
            .clone()
            .filter(|n| !self.names.contains(*n))
            .cloned()
            .collect();
        let same = added.is_empty() && explicit.clone().count() == self.names.len();
        if !same {
            self.names = explicit.cloned().collect();
        }
        (first || !same || before != (self.wildcard, self.legacy_wildcard)).then_some(added)
    }

    /// Whether the subscription selects the resource `name`.
    fn selects(&self, name: &str) -> bool {
        self.wildcard || self.names.contains(name)
    }

    /// The resources of `snapshot` this subscription selects, in name order.
    fn select<'a>(
        &'a self,
        snapshot: &'a TypeSnapshot,
    ) -> impl Iterator<Item = (&'a str, &'a Resource)> + 'a {
        snapshot
            .resources
            .iter()
            .filter(|(name, _)| self.selects(name))
            .map(|(name, r)| (&**name, r))
    }
}

#[derive(Debug, Clone)]
struct Sent {
    version: String,
    nonce: String,
    at: Instant,
}

/// What a request meant.
#[derive(Debug, Clone, PartialEq)]
pub enum RequestOutcome {
    /// The first request for the type, one after a reconnect (empty nonce), or a
    /// subscription change after the latest response was already answered.
    Subscribe,
    /// The proxy applied the response with this nonce (`push_ack` is the round trip).
    Ack { push_ack: Option<Duration> },
    /// The proxy rejected the response with this nonce.
    Nack {
        detail: String,
        push_ack: Option<Duration>,
    },
    /// A request for a response superseded since; ignored.
    Stale,
    /// A type this control plane does not serve.
    UnknownType(String),
}

type Resources = Arc<ResourceMap>;

/// One type's state on a stream.
#[derive(Debug, Clone, Default)]
struct TypeState {
    sub: Subscription,
    sent: Option<Sent>,
    /// The snapshot resources of the latest response (or of the latest check that found
    /// nothing to send): the proxy holds their selection by the subscription, as far as we
    /// know (what was sent, whether or not it was ACKed: a NACKed version is not resent),
    /// except the names in `force`. Sharing the snapshot's map costs a stream nothing per
    /// resource, and an unchanged type is recognised by pointer.
    synced: Option<Resources>,
    /// Waiting for the ACK/NACK of `sent`.
    pending: bool,
    acked_version: Option<String>,
    nack: Option<String>,
    /// Names to send even when unchanged: just subscribed to, or, for EDS after a CDS push,
    /// assignments of changed clusters (Envoy warms an updated cluster only when a new
    /// ClusterLoadAssignment arrives for it).
    force: BTreeSet<String>,
    /// The names whose content the latest response of this type changed or added.
    last_changed: Vec<String>,
}

impl TypeState {
    fn is_synced_with(&self, latest: &TypeSnapshot) -> bool {
        self.synced
            .as_ref()
            .is_some_and(|s| Arc::ptr_eq(s, &latest.resources))
    }

    /// The hash of `name` as the proxy holds it, if it does.
    fn held(&self, name: &str) -> Option<u64> {
        if self.force.contains(name) {
            return None;
        }
        self.synced.as_ref()?.get(name).map(|r| r.hash)
    }

    /// Whether the proxy holds exactly the selection of `latest` (compared resource by
    /// resource, without allocating).
    fn holds(&self, latest: &TypeSnapshot) -> bool {
        if !self.force.is_empty() {
            return false;
        }
        if self.is_synced_with(latest) {
            return true;
        }
        let Some(synced) = &self.synced else {
            return false;
        };
        let held = synced.iter().filter(|(n, _)| self.sub.selects(n));
        let mut latest = self.sub.select(latest);
        for (name, r) in held {
            match latest.next() {
                Some((n, l)) if n == &**name && l.hash == r.hash => {}
                _ => return false,
            }
        }
        latest.next().is_none()
    }
}

/// What `/debug/syncz` reports for one type.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TypeStatus {
    pub subscribed: bool,
    pub sent_version: Option<String>,
    pub acked_version: Option<String>,
    pub latest_version: String,
    pub pending: bool,
    pub nack: Option<String>,
    pub in_sync: bool,
}

/// The per-type xDS state of one stream.
#[derive(Debug, Default)]
pub struct StreamState {
    types: [TypeState; ResourceType::COUNT],
    next_nonce: u64,
}

impl StreamState {
    pub fn new() -> Self {
        Self::default()
    }

    /// Digests one request.
    pub fn on_request(&mut self, req: &DiscoveryRequest) -> (Option<ResourceType>, RequestOutcome) {
        let Some(t) = ResourceType::from_type_url(&req.type_url) else {
            return (None, RequestOutcome::UnknownType(req.type_url.clone()));
        };
        let state = &mut self.types[t.index()];
        let outcome = if req.response_nonce.is_empty() {
            RequestOutcome::Subscribe
        } else {
            match &state.sent {
                // The latest response, already answered: a subscription update.
                Some(sent) if sent.nonce == req.response_nonce && !state.pending => {
                    RequestOutcome::Subscribe
                }
                Some(sent) if sent.nonce == req.response_nonce => {
                    let push_ack = Some(sent.at.elapsed());
                    state.pending = false;
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
                            state.acked_version = Some(req.version_info.clone());
                            RequestOutcome::Ack { push_ack }
                        }
                    }
                }
                _ => return (Some(t), RequestOutcome::Stale),
            }
        };
        if !req.version_info.is_empty() && state.acked_version.is_none() {
            // A reconnecting proxy tells us what it already has.
            state.acked_version = Some(req.version_info.clone());
        }
        if let Some(added) = state.sub.update(t, &req.resource_names) {
            if t.is_wildcard() {
                // The next LDS/CDS response is the whole state of the world again.
                state.synced = None;
            } else {
                // A proxy forgets what it unsubscribed from: a name it (re)subscribes to is
                // sent whatever it held before.
                let sub = &state.sub;
                state.force.retain(|n| sub.selects(n));
                state.force.extend(added);
            }
        }
        (Some(t), outcome)
    }

    /// The response due for `t`, if any; records it as sent. LDS and CDS responses carry
    /// the whole state of the world; an EDS, RDS or SDS response carries only the resources
    /// the proxy does not hold yet in their latest version (the protocol lets a proxy keep
    /// what a response leaves out of these types), so an endpoint change sends one
    /// assignment, not the mesh's.
    pub fn next_response(
        &mut self,
        t: ResourceType,
        snapshot: &Snapshot,
    ) -> Option<DiscoveryResponse> {
        let state = &mut self.types[t.index()];
        if !state.sub.requested || state.pending {
            return None;
        }
        let latest = snapshot.get(t);
        let first = state.sent.is_none();
        if !first && state.force.is_empty() && state.is_synced_with(latest) {
            return None;
        }
        // What the proxy lacks: resources new or changed since `synced`, and forced names.
        let changed: Vec<(&str, &Resource)> = state
            .sub
            .select(latest)
            .filter(|(name, r)| state.held(name) != Some(r.hash))
            .collect();
        // A new version whose changes are all outside the proxy's subscription (or removals,
        // which a partial response cannot express) is still announced, in a response without
        // resources that changes nothing on the proxy's side, so that the version it ACKs is
        // the latest.
        let new_version = state
            .sent
            .as_ref()
            .is_some_and(|s| s.version != latest.version);
        // LDS and CDS: a removal is a change of the state of the world.
        let removed = t.is_wildcard() && !state.holds(latest) && changed.is_empty();
        let due = first || !changed.is_empty() || new_version || removed;
        if !due {
            // Nothing new for the proxy; a NACKed version is never resent.
            state.synced = Some(latest.resources.clone());
            state.force.clear();
            return None;
        }
        let resources = if t.is_wildcard() {
            // State of the world: everything selected, and the proxy drops the rest.
            state
                .sub
                .select(latest)
                .map(|(_, r)| Any::clone(&r.any))
                .collect()
        } else {
            changed.iter().map(|(_, r)| Any::clone(&r.any)).collect()
        };
        state.last_changed = changed.iter().map(|(n, _)| (*n).to_string()).collect();
        state.synced = Some(latest.resources.clone());
        self.next_nonce += 1;
        let nonce = self.next_nonce.to_string();
        state.force.clear();
        state.pending = true;
        state.sent = Some(Sent {
            version: latest.version.clone(),
            nonce: nonce.clone(),
            at: Instant::now(),
        });
        Some(DiscoveryResponse {
            version_info: latest.version.clone(),
            resources,
            type_url: t.type_url().to_string(),
            nonce,
            ..Default::default()
        })
    }

    /// Asks for the assignments of the clusters the latest CDS response changed or added to
    /// be sent with the next EDS response even if unchanged, so that those clusters finish
    /// warming (the cluster's and its assignment's names are the same here).
    pub fn warm_changed_clusters(&mut self) {
        let changed = self.types[ResourceType::Cluster.index()]
            .last_changed
            .clone();
        let eds = &mut self.types[ResourceType::Endpoint.index()];
        let wanted: Vec<String> = changed.into_iter().filter(|n| eds.sub.selects(n)).collect();
        eds.force.extend(wanted);
    }

    /// Whether `t` was subscribed.
    pub fn subscribed(&self, t: ResourceType) -> bool {
        self.types[t.index()].sub.requested
    }

    /// The status of `t` against the latest snapshot. In sync means: nothing pending, no
    /// NACK outstanding, and what the proxy ACKed is what the snapshot holds for it.
    pub fn status(&self, t: ResourceType, snapshot: &Snapshot) -> TypeStatus {
        let state = &self.types[t.index()];
        let latest = snapshot.get(t);
        let in_sync = !state.sub.requested
            || (!state.pending
                && state.nack.is_none()
                && state.sent.is_some()
                && state.holds(latest));
        TypeStatus {
            subscribed: state.sub.requested,
            sent_version: state.sent.as_ref().map(|s| s.version.clone()),
            acked_version: state.acked_version.clone(),
            latest_version: latest.version.clone(),
            pending: state.pending,
            nack: state.nack.clone(),
            in_sync,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::sidecar_snapshot;
    use legate_proto::pb::google::rpc::Status;
    use prost::Message;

    fn snapshot(
        endpoint: &str,
        version: u64,
        prev: Option<&Snapshot>,
    ) -> Result<Snapshot, Box<dyn std::error::Error>> {
        let text = format!(
            "kind: Service\nmetadata: {{name: a}}\nspec: {{ports: [{{name: http, port: 80}}]}}\n---\nkind: EndpointSlice\nmetadata: {{name: a-1, labels: {{kubernetes.io/service-name: a}}}}\nports: [{{name: http, port: 8080}}]\nendpoints: [{{addresses: [{endpoint}]}}]\n"
        );
        sidecar_snapshot(&text, version, prev)
    }

    fn request(t: ResourceType, names: &[&str], version: &str, nonce: &str) -> DiscoveryRequest {
        DiscoveryRequest {
            type_url: t.type_url().into(),
            resource_names: names.iter().map(|s| (*s).to_string()).collect(),
            version_info: version.into(),
            response_nonce: nonce.into(),
            ..Default::default()
        }
    }

    fn nack(t: ResourceType, names: &[&str], nonce: &str, message: &str) -> DiscoveryRequest {
        DiscoveryRequest {
            error_detail: Some(Status {
                code: 13,
                message: message.into(),
                details: vec![],
            }),
            ..request(t, names, "", nonce)
        }
    }

    const CDS: ResourceType = ResourceType::Cluster;
    const EDS: ResourceType = ResourceType::Endpoint;

    #[test]
    fn ack_then_push_on_change_only() -> Result<(), Box<dyn std::error::Error>> {
        let s1 = snapshot("10.0.0.1", 1, None)?;
        let mut st = StreamState::new();
        assert_eq!(
            st.on_request(&request(CDS, &[], "", "")).1,
            RequestOutcome::Subscribe
        );
        let r = st.next_response(CDS, &s1).ok_or("no CDS response")?;
        assert_eq!((r.version_info.as_str(), r.resources.len()), ("1", 1));
        assert!(
            st.next_response(CDS, &s1).is_none(),
            "one un-ACKed push per type"
        );
        assert!(!st.status(CDS, &s1).in_sync);
        let (_, outcome) = st.on_request(&request(CDS, &[], "1", &r.nonce));
        assert!(matches!(outcome, RequestOutcome::Ack { push_ack: Some(_) }));
        assert!(st.status(CDS, &s1).in_sync);
        assert!(st.next_response(CDS, &s1).is_none(), "nothing new");
        // An EDS-only change does not re-push CDS.
        let s2 = snapshot("10.0.0.2", 2, Some(&s1))?;
        assert!(st.next_response(CDS, &s2).is_none());
        Ok(())
    }

    #[test]
    fn nack_is_tracked_and_not_resent() -> Result<(), Box<dyn std::error::Error>> {
        let s1 = snapshot("10.0.0.1", 1, None)?;
        let mut st = StreamState::new();
        st.on_request(&request(
            EDS,
            &["outbound|80||a.default.svc.cluster.local"],
            "",
            "",
        ));
        let r = st.next_response(EDS, &s1).ok_or("no EDS response")?;
        assert_eq!(r.resources.len(), 1);
        let (_, outcome) = st.on_request(&nack(
            EDS,
            &["outbound|80||a.default.svc.cluster.local"],
            &r.nonce,
            "bad endpoint",
        ));
        assert!(
            matches!(outcome, RequestOutcome::Nack { ref detail, .. } if detail == "bad endpoint")
        );
        let status = st.status(EDS, &s1);
        assert_eq!(status.nack.as_deref(), Some("bad endpoint"));
        assert!(!status.in_sync);
        assert!(
            st.next_response(EDS, &s1).is_none(),
            "a NACKed version is not resent"
        );
        let s2 = snapshot("10.0.0.2", 2, Some(&s1))?;
        let r2 = st.next_response(EDS, &s2).ok_or("new content is sent")?;
        assert_eq!(r2.version_info, "2");
        st.on_request(&request(
            EDS,
            &["outbound|80||a.default.svc.cluster.local"],
            "2",
            &r2.nonce,
        ));
        assert!(st.status(EDS, &s2).in_sync && st.status(EDS, &s2).nack.is_none());
        Ok(())
    }

    #[test]
    fn stale_nonces_are_ignored() -> Result<(), Box<dyn std::error::Error>> {
        let s1 = snapshot("10.0.0.1", 1, None)?;
        let mut st = StreamState::new();
        st.on_request(&request(CDS, &[], "", ""));
        let r = st.next_response(CDS, &s1).ok_or("no response")?;
        let (_, outcome) = st.on_request(&request(CDS, &[], "", "not-the-nonce"));
        assert_eq!(outcome, RequestOutcome::Stale);
        assert!(st.status(CDS, &s1).pending, "still waiting for {}", r.nonce);
        Ok(())
    }

    #[test]
    fn wildcard_rules() {
        let mut sub = Subscription::default();
        sub.update(CDS, &[]);
        assert!(sub.wildcard, "empty first request on CDS is a wildcard");
        sub.update(CDS, &[]);
        assert!(sub.wildcard, "and stays one");
        sub.update(CDS, &["a".into()]);
        assert!(!sub.wildcard);
        sub.update(CDS, &[]);
        assert!(
            !sub.wildcard && sub.names.is_empty(),
            "empty after explicit = unsubscribe all"
        );
        sub.update(CDS, &["*".into(), "b".into()]);
        assert!(sub.wildcard && sub.names.contains("b"));
        let mut eds = Subscription::default();
        eds.update(EDS, &[]);
        assert!(!eds.wildcard, "EDS is never wildcard");
    }

    #[test]
    fn eds_is_partial_and_changed_clusters_are_warmed() -> Result<(), Box<dyn std::error::Error>> {
        const A: &str = "outbound|80||a.default.svc.cluster.local";
        let s1 = snapshot("10.0.0.1", 1, None)?;
        let mut st = StreamState::new();
        st.on_request(&request(CDS, &[], "", ""));
        let cds = st.next_response(CDS, &s1).ok_or("no CDS")?;
        st.on_request(&request(CDS, &[], "1", &cds.nonce));
        st.on_request(&request(EDS, &[A, "outbound|80||ghost"], "", ""));
        let r = st.next_response(EDS, &s1).ok_or("no response")?;
        assert_eq!(r.resources.len(), 1);
        st.on_request(&request(EDS, &[A, "outbound|80||ghost"], "1", &r.nonce));
        assert!(st.status(EDS, &s1).in_sync);
        assert!(st.next_response(EDS, &s1).is_none());
        // Warming resends the assignment of a cluster the CDS response carried.
        st.warm_changed_clusters();
        let warm = st.next_response(EDS, &s1).ok_or("not warmed")?;
        assert_eq!(warm.resources.len(), 1);
        st.on_request(&request(EDS, &[A, "outbound|80||ghost"], "1", &warm.nonce));
        // An unsubscribed name is forgotten; subscribing again sends it again.
        st.on_request(&request(EDS, &["outbound|80||ghost"], "1", &warm.nonce));
        assert!(st.next_response(EDS, &s1).is_none(), "nothing to send");
        st.on_request(&request(EDS, &[A, "outbound|80||ghost"], "1", &warm.nonce));
        let again = st
            .next_response(EDS, &s1)
            .ok_or("resubscription not answered")?;
        assert_eq!(again.resources.len(), 1);
        Ok(())
    }

    /// Services `a` (endpoint `a_ip`) and `b` (10.0.0.9).
    fn two_services(
        a_ip: &str,
        version: u64,
        prev: Option<&Snapshot>,
    ) -> Result<Snapshot, Box<dyn std::error::Error>> {
        let mut text = String::new();
        for (name, ip) in [("a", a_ip), ("b", "10.0.0.9")] {
            text.push_str(&format!(
                "kind: Service\nmetadata: {{name: {name}}}\nspec: {{ports: [{{name: http, port: 80}}]}}\n---\nkind: EndpointSlice\nmetadata: {{name: {name}-1, labels: {{kubernetes.io/service-name: {name}}}}}\nports: [{{name: http, port: 8080}}]\nendpoints: [{{addresses: [{ip}]}}]\n---\n"
            ));
        }
        sidecar_snapshot(&text, version, prev)
    }

    #[test]
    fn an_endpoint_change_sends_only_its_assignment() -> Result<(), Box<dyn std::error::Error>> {
        const A: &str = "outbound|80||a.default.svc.cluster.local";
        const B: &str = "outbound|80||b.default.svc.cluster.local";
        let s1 = two_services("10.0.0.1", 1, None)?;
        let mut st = StreamState::new();
        st.on_request(&request(EDS, &[A, B], "", ""));
        let r = st.next_response(EDS, &s1).ok_or("no response")?;
        assert_eq!(r.resources.len(), 2);
        st.on_request(&request(EDS, &[A, B], "1", &r.nonce));
        let s2 = two_services("10.0.0.2", 2, Some(&s1))?;
        let r2 = st.next_response(EDS, &s2).ok_or("change not pushed")?;
        assert_eq!(r2.version_info, "2");
        let names: Vec<String> = r2
            .resources
            .iter()
            .filter_map(|a| {
                legate_proto::pb::envoy::config::endpoint::v3::ClusterLoadAssignment::decode(
                    a.value.as_slice(),
                )
                .ok()
            })
            .map(|c| c.cluster_name)
            .collect();
        assert_eq!(names, [A]);
        st.on_request(&request(EDS, &[A, B], "2", &r2.nonce));
        assert!(st.status(EDS, &s2).in_sync);
        // A change to a resource the proxy did not subscribe to is announced without resources.
        st.on_request(&request(EDS, &[B], "2", &r2.nonce));
        let s3 = two_services("10.0.0.3", 3, Some(&s2))?;
        let r3 = st
            .next_response(EDS, &s3)
            .ok_or("new version not announced")?;
        assert!(r3.resources.is_empty() && r3.version_info == "3");
        Ok(())
    }
}
