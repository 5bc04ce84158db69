//! Snapshots: one proxy group's encoded resources, with a version per resource type.
//!
//! A snapshot is built only from a consistent set of resources (every route configuration a
//! listener names, every SDS secret its TLS contexts name, every cluster a route names and
//! the ClusterLoadAssignment of every EDS cluster exist; names are unique per type). A type keeps its version when none of its
//! resources changed, so a proxy is never pushed what it already has.

use std::collections::{BTreeMap, BTreeSet};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;

use legate_proto::pb::envoy::config::cluster::v3::cluster::{ClusterDiscoveryType, DiscoveryType};
use legate_proto::pb::envoy::config::core::v3::transport_socket::ConfigType as TransportSocketConfig;
use legate_proto::pb::envoy::config::listener::v3::filter::ConfigType;
use legate_proto::pb::envoy::config::route::v3::route::Action;
use legate_proto::pb::envoy::config::route::v3::route_action::ClusterSpecifier;
use legate_proto::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    http_connection_manager::RouteSpecifier, HttpConnectionManager,
};
use legate_proto::pb::envoy::extensions::transport_sockets::tls::v3::DownstreamTlsContext;
use legate_proto::pb::google::protobuf::Any;
use prost::{Message, Name};

use crate::translate::{to_any, Resources};

/// The xDS resource types the control plane serves, in ADS push order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ResourceType {
    Cluster,
    Endpoint,
    Listener,
    Route,
    Secret,
}

impl ResourceType {
    /// How many types there are.
    pub const COUNT: usize = 5;

    /// Push order over ADS: CDS, EDS, LDS, RDS, SDS — Istio's order. A listener waits
    /// (warms) for its routes and secrets, so both may follow it; secrets are only ever
    /// requested by name, once a proxy has the listeners that name them.
    pub const ORDER: [ResourceType; Self::COUNT] = [
        ResourceType::Cluster,
        ResourceType::Endpoint,
        ResourceType::Listener,
        ResourceType::Route,
        ResourceType::Secret,
    ];

    pub fn index(self) -> usize {
        self as usize
    }

    pub fn type_url(self) -> &'static str {
        match self {
            ResourceType::Cluster => "type.googleapis.com/envoy.config.cluster.v3.Cluster",
            ResourceType::Endpoint => {
                "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
            }
            ResourceType::Listener => "type.googleapis.com/envoy.config.listener.v3.Listener",
            ResourceType::Route => "type.googleapis.com/envoy.config.route.v3.RouteConfiguration",
            ResourceType::Secret => {
                "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
            }
        }
    }

    pub fn from_type_url(url: &str) -> Option<Self> {
        Self::ORDER.into_iter().find(|t| t.type_url() == url)
    }

    /// `cds`, `eds`, `lds`, `rds`, `sds`.
    pub fn short_name(self) -> &'static str {
        match self {
            ResourceType::Cluster => "cds",
            ResourceType::Endpoint => "eds",
            ResourceType::Listener => "lds",
            ResourceType::Route => "rds",
            ResourceType::Secret => "sds",
        }
    }

    /// Only LDS and CDS support wildcard subscriptions.
    pub fn is_wildcard(self) -> bool {
        matches!(self, ResourceType::Cluster | ResourceType::Listener)
    }
}

/// Why a set of resources cannot be published.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SnapshotError {
    #[error("{kind} {name:?} appears twice")]
    Duplicate { kind: &'static str, name: String },
    #[error("listener {listener:?} names route configuration {route:?}, which does not exist")]
    MissingRoute { listener: String, route: String },
    #[error("route configuration {route:?} names cluster {cluster:?}, which does not exist")]
    MissingCluster { route: String, cluster: String },
    #[error("EDS cluster {0:?} has no ClusterLoadAssignment")]
    MissingEndpoints(String),
    #[error("listener {listener:?} names secret {secret:?}, which does not exist")]
    MissingSecret { listener: String, secret: String },
    #[error("listener {listener:?}: cannot decode its HTTP connection manager: {reason}")]
    BadFilter { listener: String, reason: String },
    #[error("listener {listener:?}: cannot decode its TLS context: {reason}")]
    BadTransportSocket { listener: String, reason: String },
}

/// Encoded resources by name. A name is shared (not copied) by every snapshot and map
/// that holds its resource.
pub type ResourceMap = BTreeMap<Arc<str>, Resource>;

/// One encoded resource; `hash` is its per-resource version. The encoding is shared by
/// every snapshot that holds the resource.
#[derive(Debug, Clone, PartialEq)]
pub struct Resource {
    pub any: Arc<Any>,
    pub hash: u64,
}

impl Resource {
    pub fn new(any: Any) -> Self {
        let mut hasher = DefaultHasher::new();
        any.value.hash(&mut hasher);
        Self {
            any: Arc::new(any),
            hash: hasher.finish(),
        }
    }
}

/// The resources of one type and their version.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TypeSnapshot {
    pub version: String,
    /// Shared (one allocation) between the groups whose resources of this type are the same
    /// mesh-wide set.
    pub resources: Arc<ResourceMap>,
}

impl TypeSnapshot {
    fn same_content(&self, other: &TypeSnapshot) -> bool {
        if Arc::ptr_eq(&self.resources, &other.resources) {
            return true;
        }
        same_resources(&self.resources, &other.resources)
    }
}

/// Whether two sets of encoded resources are the same. A resource's hash covers its whole
/// encoding, its name included, so equal hashes stand for equal resources (a 64-bit hash:
/// the chance that a change goes unnoticed is 2^-64), and no resource's bytes are read.
fn same_resources(a: &ResourceMap, b: &ResourceMap) -> bool {
    a.len() == b.len()
        && a.values()
            .zip(b.values())
            .all(|(ra, rb)| ra.hash == rb.hash)
}

/// `next`, or `previous` when it has the same content, so that unchanged resources stay one
/// allocation from model to model and comparing them is a pointer comparison.
fn keep_if_same(next: ResourceMap, previous: Option<&Arc<ResourceMap>>) -> Arc<ResourceMap> {
    match previous {
        Some(p) if same_resources(p, &next) => p.clone(),
        _ => Arc::new(next),
    }
}

impl TypeSnapshot {}

/// The mesh-wide part of every group's resources for one model version (a cluster and its
/// assignment per service port), translated and encoded once and shared by every snapshot.
#[derive(Debug, Default)]
pub struct SharedMesh {
    clusters: Arc<ResourceMap>,
    endpoints: Arc<ResourceMap>,
    cluster_names: BTreeSet<String>,
    /// Sidecars' outbound route configurations, encoded once per (namespace, port).
    outbound_routes: std::sync::Mutex<std::collections::HashMap<(String, u16), (String, Resource)>>,
}

impl SharedMesh {
    /// Translates and encodes the mesh of `model`; what did not change since `previous`
    /// keeps `previous`'s allocation.
    pub fn new(
        model: &crate::model::Model,
        options: &crate::translate::TranslateOptions,
        previous: Option<&SharedMesh>,
    ) -> Result<Self, SnapshotError> {
        let (clusters, endpoints) = crate::translate::mesh(model, options);
        Ok(Self {
            outbound_routes: Default::default(),
            cluster_names: clusters.iter().map(|c| c.name.clone()).collect(),
            clusters: keep_if_same(
                encode("cluster", &clusters, |c| c.name.as_str())?,
                previous.map(|p| &p.clusters),
            ),
            endpoints: keep_if_same(
                encode("cluster load assignment", &endpoints, |e| {
                    e.cluster_name.as_str()
                })?,
                previous.map(|p| &p.endpoints),
            ),
        })
    }
}

impl SharedMesh {
    /// A sidecar's outbound route configuration, encoded: translated for the first sidecar
    /// of its namespace and port, shared by the others.
    pub fn outbound_routes(
        &self,
        model: &crate::model::Model,
        group: &crate::identity::ProxyGroup,
        options: &crate::translate::TranslateOptions,
    ) -> (String, Resource) {
        let key = (group.namespace.clone(), group.listener_port);
        if let Ok(memo) = self.outbound_routes.lock() {
            if let Some(r) = memo.get(&key) {
                return r.clone();
            }
        }
        let routes = crate::translate::outbound_route_config(model, group, options);
        let resource = Resource::new(to_any(&routes));
        let entry = (routes.name, resource);
        if let Ok(mut memo) = self.outbound_routes.lock() {
            memo.insert(key, entry.clone());
        }
        entry
    }
}

/// An immutable, consistent set of resources for one proxy group.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    types: [TypeSnapshot; ResourceType::COUNT],
    /// When the model change this snapshot answers was first seen (None for a proxy
    /// group's first snapshot).
    seen_at: Option<std::time::Instant>,
}

fn encode<M: Message + Name>(
    kind: &'static str,
    items: &[M],
    name: impl Fn(&M) -> &str,
) -> Result<ResourceMap, SnapshotError> {
    let mut out = BTreeMap::new();
    for item in items {
        let resource = Resource::new(to_any(item));
        if out.insert(Arc::from(name(item)), resource).is_some() {
            return Err(SnapshotError::Duplicate {
                kind,
                name: name(item).to_string(),
            });
        }
    }
    Ok(out)
}

/// Checks that every reference between the resources resolves.
pub fn check_consistent(resources: &Resources) -> Result<(), SnapshotError> {
    check_consistent_with(resources, &BTreeSet::new(), None)
}

/// [`check_consistent`] for a group's own resources, which may also name the clusters of
/// the shared mesh (`mesh_clusters`; each has its assignment by construction) and a shared
/// route configuration (`shared_route`, whose clusters are the mesh's).
fn check_consistent_with(
    resources: &Resources,
    mesh_clusters: &BTreeSet<String>,
    shared_route: Option<&str>,
) -> Result<(), SnapshotError> {
    let mut routes: BTreeSet<&str> = resources.routes.iter().map(|r| r.name.as_str()).collect();
    routes.extend(shared_route);
    // The group's own clusters; the mesh's are looked up where they are, not copied.
    let own_clusters: BTreeSet<&str> = resources.clusters.iter().map(|c| c.name.as_str()).collect();
    let cluster_exists = |name: &str| own_clusters.contains(name) || mesh_clusters.contains(name);
    let secrets: BTreeSet<&str> = resources.secrets.iter().map(|s| s.name.as_str()).collect();
    let assignments: BTreeSet<&str> = resources
        .endpoints
        .iter()
        .map(|e| e.cluster_name.as_str())
        .collect();
    for listener in &resources.listeners {
        for chain in &listener.filter_chains {
            let tls = chain
                .transport_socket
                .as_ref()
                .and_then(|t| match &t.config_type {
                    Some(TransportSocketConfig::TypedConfig(any))
                        if any.type_url == DownstreamTlsContext::type_url() =>
                    {
                        Some(any)
                    }
                    _ => None,
                });
            if let Some(any) = tls {
                let context = DownstreamTlsContext::decode(any.value.as_slice()).map_err(|e| {
                    SnapshotError::BadTransportSocket {
                        listener: listener.name.clone(),
                        reason: e.to_string(),
                    }
                })?;
                let named = context
                    .common_tls_context
                    .iter()
                    .flat_map(|c| &c.tls_certificate_sds_secret_configs);
                for sds in named {
                    if !secrets.contains(sds.name.as_str()) {
                        return Err(SnapshotError::MissingSecret {
                            listener: listener.name.clone(),
                            secret: sds.name.clone(),
                        });
                    }
                }
            }
            for filter in &chain.filters {
                let Some(ConfigType::TypedConfig(any)) = &filter.config_type else {
                    continue;
                };
                if any.type_url != HttpConnectionManager::type_url() {
                    continue;
                }
                let hcm = HttpConnectionManager::decode(any.value.as_slice()).map_err(|e| {
                    SnapshotError::BadFilter {
                        listener: listener.name.clone(),
                        reason: e.to_string(),
                    }
                })?;
                if let Some(RouteSpecifier::Rds(rds)) = &hcm.route_specifier {
                    if !routes.contains(rds.route_config_name.as_str()) {
                        return Err(SnapshotError::MissingRoute {
                            listener: listener.name.clone(),
                            route: rds.route_config_name.clone(),
                        });
                    }
                }
            }
        }
    }
    for route in &resources.routes {
        for vhost in &route.virtual_hosts {
            for r in &vhost.routes {
                let Some(Action::Route(action)) = &r.action else {
                    continue;
                };
                if let Some(ClusterSpecifier::Cluster(cluster)) = &action.cluster_specifier {
                    if !cluster_exists(cluster) {
                        return Err(SnapshotError::MissingCluster {
                            route: route.name.clone(),
                            cluster: cluster.clone(),
                        });
                    }
                }
            }
        }
    }
    for cluster in &resources.clusters {
        let eds = cluster.cluster_discovery_type
            == Some(ClusterDiscoveryType::Type(DiscoveryType::Eds as i32));
        let service_name = cluster
            .eds_cluster_config
            .as_ref()
            .map(|c| c.service_name.as_str())
            .filter(|s| !s.is_empty())
            .unwrap_or(cluster.name.as_str());
        if eds && !assignments.contains(service_name) {
            return Err(SnapshotError::MissingEndpoints(cluster.name.clone()));
        }
    }
    Ok(())
}

impl Snapshot {
    /// Encodes `resources` into a snapshot. A type whose content equals `previous`'s keeps
    /// its version; a changed type takes `version`.
    pub fn build(
        resources: &Resources,
        previous: Option<&Snapshot>,
        version: u64,
    ) -> Result<Snapshot, SnapshotError> {
        check_consistent(resources)?;
        let encoded = [
            Arc::new(encode("cluster", &resources.clusters, |c| c.name.as_str())?),
            Arc::new(encode(
                "cluster load assignment",
                &resources.endpoints,
                |e| e.cluster_name.as_str(),
            )?),
            Arc::new(encode("listener", &resources.listeners, |l| {
                l.name.as_str()
            })?),
            Arc::new(encode("route configuration", &resources.routes, |r| {
                r.name.as_str()
            })?),
            Arc::new(encode("secret", &resources.secrets, |s| s.name.as_str())?),
        ];
        Ok(Self::assemble(encoded, previous, version))
    }

    /// A group's snapshot from the shared mesh and the group's own resources
    /// ([`crate::translate::group_resources`]): the mesh's encoded clusters and assignments
    /// are shared, not copied, unless the group adds its own (a sidecar's inbound clusters).
    pub fn build_shared(
        mesh: &SharedMesh,
        own: &Resources,
        shared_routes: Option<(String, Resource)>,
        previous: Option<&Snapshot>,
        version: u64,
    ) -> Result<Snapshot, SnapshotError> {
        check_consistent_with(
            own,
            &mesh.cluster_names,
            shared_routes.as_ref().map(|(n, _)| n.as_str()),
        )?;
        let merge = |kind: &'static str,
                     shared: &Arc<ResourceMap>,
                     extra: ResourceMap|
         -> Result<Arc<ResourceMap>, SnapshotError> {
            if extra.is_empty() {
                return Ok(shared.clone());
            }
            let mut all = BTreeMap::clone(shared);
            for (name, r) in extra {
                if all.insert(name.clone(), r).is_some() {
                    return Err(SnapshotError::Duplicate {
                        kind,
                        name: name.to_string(),
                    });
                }
            }
            Ok(Arc::new(all))
        };
        let encoded = [
            merge(
                "cluster",
                &mesh.clusters,
                encode("cluster", &own.clusters, |c| c.name.as_str())?,
            )?,
            merge(
                "cluster load assignment",
                &mesh.endpoints,
                encode("cluster load assignment", &own.endpoints, |e| {
                    e.cluster_name.as_str()
                })?,
            )?,
            Arc::new(encode("listener", &own.listeners, |l| l.name.as_str())?),
            {
                let mut routes = encode("route configuration", &own.routes, |r| r.name.as_str())?;
                if let Some((name, r)) = shared_routes {
                    if routes.insert(Arc::from(name.as_str()), r).is_some() {
                        return Err(SnapshotError::Duplicate {
                            kind: "route configuration",
                            name,
                        });
                    }
                }
                Arc::new(routes)
            },
            Arc::new(encode("secret", &own.secrets, |s| s.name.as_str())?),
        ];
        Ok(Self::assemble(encoded, previous, version))
    }

    fn assemble(
        encoded: [Arc<ResourceMap>; ResourceType::COUNT],
        previous: Option<&Snapshot>,
        version: u64,
    ) -> Snapshot {
        let mut snapshot = Snapshot::default();
        for (t, resources) in ResourceType::ORDER.into_iter().zip(encoded) {
            let mut next = TypeSnapshot {
                version: version.to_string(),
                resources,
            };
            if let Some(prev) = previous.map(|p| p.get(t)) {
                if prev.same_content(&next) {
                    // Unchanged: the previous allocation stays, so that streams see at once
                    // (by pointer) that there is nothing to send.
                    next = prev.clone();
                }
            }
            snapshot.types[t.index()] = next;
        }
        snapshot
    }

    /// The snapshot, marked as answering a model change first seen at `at`.
    pub fn seen_at(mut self, at: Option<std::time::Instant>) -> Self {
        self.seen_at = at;
        self
    }

    /// When the model change this snapshot answers was first seen.
    pub fn change_seen_at(&self) -> Option<std::time::Instant> {
        self.seen_at
    }

    pub fn get(&self, t: ResourceType) -> &TypeSnapshot {
        &self.types[t.index()]
    }

    /// The types whose version differs from `other`'s.
    pub fn changed_types(&self, other: &Snapshot) -> Vec<ResourceType> {
        ResourceType::ORDER
            .into_iter()
            .filter(|t| self.get(*t).version != other.get(*t).version)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{parse_manifests, Model};
    use crate::test_support::sidecar;
    use crate::translate::{translate, TranslateOptions};

    fn resources(manifests: &str) -> Result<Resources, crate::model::ManifestError> {
        let model = Model::build(parse_manifests(manifests)?);
        Ok(translate(&model, &sidecar(), &TranslateOptions::default()))
    }

    const SVC: &str =
        "kind: Service\nmetadata: {name: a}\nspec: {ports: [{name: http, port: 80}]}\n";
    const SLICE: &str = "---\nkind: EndpointSlice\nmetadata: {name: a-1, labels: {kubernetes.io/service-name: a}}\nports: [{name: http, port: 8080}]\nendpoints: [{addresses: [10.0.0.1]}]\n";

    #[test]
    fn unchanged_types_keep_their_version() -> Result<(), Box<dyn std::error::Error>> {
        let first = Snapshot::build(&resources(SVC)?, None, 1)?;
        for t in ResourceType::ORDER {
            assert_eq!(first.get(t).version, "1");
        }
        let second = Snapshot::build(&resources(&format!("{SVC}{SLICE}"))?, Some(&first), 2)?;
        assert_eq!(second.changed_types(&first), [ResourceType::Endpoint]);
        assert_eq!(second.get(ResourceType::Cluster).version, "1");
        assert_eq!(second.get(ResourceType::Endpoint).version, "2");
        let same = Snapshot::build(&resources(&format!("{SVC}{SLICE}"))?, Some(&second), 3)?;
        assert!(same.changed_types(&second).is_empty());
        Ok(())
    }

    #[test]
    fn inconsistent_resources_are_refused() -> Result<(), Box<dyn std::error::Error>> {
        let mut r = resources(SVC)?;
        r.endpoints.clear();
        assert_eq!(
            Snapshot::build(&r, None, 1).err(),
            Some(SnapshotError::MissingEndpoints(
                "outbound|80||a.default.svc.cluster.local".into()
            ))
        );
        let mut r = resources(SVC)?;
        r.clusters.clear();
        assert!(matches!(
            Snapshot::build(&r, None, 1),
            Err(SnapshotError::MissingCluster { .. })
        ));
        let mut r = resources(SVC)?;
        r.routes.clear();
        assert!(matches!(
            Snapshot::build(&r, None, 1),
            Err(SnapshotError::MissingRoute { .. })
        ));
        let mut r = resources(SVC)?;
        let dup = r.clusters[0].clone();
        r.clusters.push(dup);
        assert!(matches!(
            Snapshot::build(&r, None, 1),
            Err(SnapshotError::Duplicate { .. })
        ));
        Ok(())
    }
}
