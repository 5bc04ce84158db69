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

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use legate_proto::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use serde::Serialize;

use crate::snapshot::{ResourceType, Snapshot, TypeSnapshot};

/// What the proxy subscribed to for one type.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Subscription {
    /// Whether any request arrived for this type.
    pub requested: bool,
    pub wildcard: bool,
    /// Wildcard by the legacy rule (empty names from the first request on).
    legacy_wildcard: bool,
    pub names: BTreeSet<String>,
}

impl Subscription {
    /// Applies the `resource_names` of a request.
    pub fn update(&mut self, t: ResourceType, names: &[String]) {
        let first = !self.requested;
        self.requested = true;
        if names.is_empty() {
            self.names.clear();
            self.legacy_wildcard = t.is_wildcard() && (first || self.legacy_wildcard);
            self.wildcard = self.legacy_wildcard;
            return;
        }
        self.legacy_wildcard = false;
        self.wildcard = names.iter().any(|n| n == "*");
        self.names = names.iter().filter(|n| *n != "*").cloned().collect();
    }

    /// The resources of `snapshot` this subscription selects, by name.
    fn select<'a>(
        &self,
        snapshot: &'a TypeSnapshot,
    ) -> BTreeMap<&'a str, &'a crate::snapshot::Resource> {
        snapshot
            .resources
            .iter()
            .filter(|(name, _)| self.wildcard || self.names.contains(name.as_str()))
            .map(|(name, r)| (name.as_str(), r))
            .collect()
    }
}

#[derive(Debug, Clone)]
struct Sent {
    version: String,
    nonce: String,
    /// Name → per-resource hash of what was sent.
    content: BTreeMap<String, u64>,
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

/// One type's state on a stream.
#[derive(Debug, Clone, Default)]
struct TypeState {
    sub: Subscription,
    sent: Option<Sent>,
    /// Waiting for the ACK/NACK of `sent`.
    pending: bool,
    acked_version: Option<String>,
    nack: Option<String>,
    /// Send even when the content is unchanged (EDS after a CDS push: Envoy warms a cluster
    /// only when a new ClusterLoadAssignment arrives).
    force: bool,
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
        state.sub.update(t, &req.resource_names);
        (Some(t), outcome)
    }

    /// The response due for `t`, if any; records it as sent.
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
        let selected = state.sub.select(latest);
        let content: BTreeMap<String, u64> = selected
            .iter()
            .map(|(name, r)| ((*name).to_string(), r.hash))
            .collect();
        if let Some(sent) = &state.sent {
            if sent.content == content && !state.force {
                return None;
            }
        }
        self.next_nonce += 1;
        let nonce = self.next_nonce.to_string();
        state.force = false;
        state.pending = true;
        state.sent = Some(Sent {
            version: latest.version.clone(),
            nonce: nonce.clone(),
            content,
            at: Instant::now(),
        });
        Some(DiscoveryResponse {
            version_info: latest.version.clone(),
            resources: selected.values().map(|r| r.any.clone()).collect(),
            type_url: t.type_url().to_string(),
            nonce,
            ..Default::default()
        })
    }

    /// Asks for the next `t` response to be sent even if its content is unchanged.
    pub fn force(&mut self, t: ResourceType) {
        self.types[t.index()].force = true;
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
        let current: BTreeMap<String, u64> = state
            .sub
            .select(latest)
            .iter()
            .map(|(n, r)| ((*n).to_string(), r.hash))
            .collect();
        let in_sync = !state.sub.requested
            || (!state.pending
                && state.nack.is_none()
                && state.sent.as_ref().is_some_and(|s| s.content == current));
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
    use crate::identity::{ProxyGroup, Role};
    use crate::model::{parse_manifests, Model};
    use crate::translate::{translate, TranslateOptions};
    use legate_proto::pb::google::rpc::Status;

    fn snapshot(
        endpoint: &str,
        version: u64,
        prev: Option<&Snapshot>,
    ) -> Result<Snapshot, Box<dyn std::error::Error>> {
        let text = format!(
            "kind: Service\nmetadata: {{name: a}}\nspec: {{ports: [{{name: http, port: 80}}]}}\n---\nkind: EndpointSlice\nmetadata: {{name: a-1, labels: {{kubernetes.io/service-name: a}}}}\nports: [{{name: http, port: 8080}}]\nendpoints: [{{addresses: [{endpoint}]}}]\n"
        );
        let group = ProxyGroup {
            role: Role::Sidecar,
            ip: std::net::IpAddr::from([127, 0, 0, 1]),
            namespace: "default".into(),
            listener_port: 15001,
            inbound_port: 15006,
            https_port: 8443,
        };
        let r = translate(
            &Model::build(parse_manifests(&text)?),
            &group,
            &TranslateOptions::default(),
        );
        Ok(Snapshot::build(&r, prev, version)?)
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
    fn forced_eds_is_resent_with_the_same_content() -> Result<(), Box<dyn std::error::Error>> {
        let s1 = snapshot("10.0.0.1", 1, None)?;
        let mut st = StreamState::new();
        st.on_request(&request(
            EDS,
            &["outbound|80||a.default.svc.cluster.local"],
            "",
            "",
        ));
        let r = st.next_response(EDS, &s1).ok_or("no response")?;
        st.on_request(&request(
            EDS,
            &["outbound|80||a.default.svc.cluster.local"],
            "1",
            &r.nonce,
        ));
        assert!(st.next_response(EDS, &s1).is_none());
        st.force(EDS);
        assert!(st.next_response(EDS, &s1).is_some());
        Ok(())
    }
}
