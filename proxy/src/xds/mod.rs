//! The xDS client: one ADS stream (state of the world or Delta) to the management server
//! named in `dynamic_resources`, carrying LDS, RDS, CDS and EDS. See `docs/xds.md`.
//!
//! - `client`: the stream — requests, ACK/NACK, subscriptions, reconnects with backoff.
//! - `state`: the resources, warming, and the snapshot every change is published as.

mod client;
mod state;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::SystemTime;

use legate_filters::FilterRegistry;
use legate_proto::pb::google::protobuf::Any;
use serde_json::json;

use crate::config::DynamicConfig;
use crate::listener_manager::ListenerManager;
use crate::server::Runtime;

/// The resource types Legate takes over ADS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Cluster,
    Endpoints,
    Listener,
    Route,
    Secret,
}

impl Kind {
    pub const ALL: [Kind; 5] = [
        Kind::Cluster,
        Kind::Endpoints,
        Kind::Listener,
        Kind::Route,
        Kind::Secret,
    ];

    /// The message's full name.
    pub fn type_name(self) -> &'static str {
        match self {
            Kind::Cluster => "envoy.config.cluster.v3.Cluster",
            Kind::Endpoints => "envoy.config.endpoint.v3.ClusterLoadAssignment",
            Kind::Listener => "envoy.config.listener.v3.Listener",
            Kind::Route => "envoy.config.route.v3.RouteConfiguration",
            Kind::Secret => "envoy.extensions.transport_sockets.tls.v3.Secret",
        }
    }

    /// The `type_url` of the resource type on the stream.
    pub fn type_url(self) -> &'static str {
        match self {
            Kind::Cluster => "type.googleapis.com/envoy.config.cluster.v3.Cluster",
            Kind::Endpoints => "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment",
            Kind::Listener => "type.googleapis.com/envoy.config.listener.v3.Listener",
            Kind::Route => "type.googleapis.com/envoy.config.route.v3.RouteConfiguration",
            Kind::Secret => "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret",
        }
    }

    pub fn from_type_url(url: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.type_url() == url)
    }

    /// How errors name a resource of this type.
    pub fn noun(self) -> &'static str {
        match self {
            Kind::Cluster => "cluster",
            Kind::Endpoints => "cluster load assignment",
            Kind::Listener => "listener",
            Kind::Route => "route configuration",
            Kind::Secret => "secret",
        }
    }

    /// Whether the type is subscribed by wildcard (LDS, CDS) rather than by name.
    pub fn wildcard(self) -> bool {
        matches!(self, Kind::Cluster | Kind::Listener)
    }
}

/// Where a resource stands.
#[derive(Debug, Clone)]
pub enum EntryState {
    Active,
    Warming,
    Rejected(String),
}

/// One resource for `/config_dump`.
#[derive(Debug, Clone)]
pub struct DumpEntry {
    pub kind: Kind,
    pub name: String,
    pub version: String,
    pub updated: SystemTime,
    pub resource: Arc<Any>,
    pub state: EntryState,
}

/// What xDS delivered, as `/config_dump` shows it.
#[derive(Debug, Clone, Default)]
pub struct Dump {
    pub versions: BTreeMap<Kind, String>,
    pub entries: Vec<DumpEntry>,
}

impl Dump {
    /// The last accepted version of a type.
    pub fn version(&self, kind: Kind) -> &str {
        self.versions.get(&kind).map_or("", String::as_str)
    }

    /// Dynamic entries of one type in Envoy's config-dump shapes:
    /// `dynamic_listeners`, `dynamic_active_clusters`/`dynamic_warming_clusters`,
    /// `dynamic_route_configs`, `dynamic_endpoint_configs`.
    pub fn json(&self, kind: Kind, timestamp: impl Fn(SystemTime) -> String) -> serde_json::Value {
        let resource = |e: &DumpEntry| {
            let mut v = any_to_json(&e.resource);
            if let serde_json::Value::Object(m) = &mut v {
                m.insert("@type".into(), json!(kind.type_url()));
            }
            v
        };
        let entries = self.entries.iter().filter(|e| e.kind == kind);
        match kind {
            Kind::Listener => {
                let mut by_name: BTreeMap<&str, serde_json::Map<String, serde_json::Value>> =
                    BTreeMap::new();
                for e in entries {
                    let slot = by_name.entry(&e.name).or_default();
                    slot.insert("name".into(), json!(e.name));
                    let state = json!({
                        "version_info": e.version,
                        "listener": resource(e),
                        "last_updated": timestamp(e.updated),
                    });
                    match &e.state {
                        EntryState::Active => {
                            slot.insert("active_state".into(), state);
                        }
                        EntryState::Warming => {
                            slot.insert("warming_state".into(), state);
                        }
                        EntryState::Rejected(details) => {
                            slot.insert(
                                "error_state".into(),
                                json!({"failed_configuration": resource(e), "last_update_attempt": timestamp(e.updated), "details": details}),
                            );
                        }
                    }
                }
                json!({"dynamic_listeners": by_name.into_values().collect::<Vec<_>>()})
            }
            Kind::Cluster => {
                let mut active = Vec::new();
                let mut warming = Vec::new();
                let mut errors = Vec::new();
                for e in entries {
                    let v = json!({"version_info": e.version, "cluster": resource(e), "last_updated": timestamp(e.updated)});
                    match &e.state {
                        EntryState::Active => active.push(v),
                        EntryState::Warming => warming.push(v),
                        EntryState::Rejected(details) => errors.push(json!({"name": e.name, "error_state": {"failed_configuration": resource(e), "last_update_attempt": timestamp(e.updated), "details": details}})),
                    }
                }
                json!({"dynamic_active_clusters": active, "dynamic_warming_clusters": warming, "dynamic_cluster_errors": errors})
            }
            Kind::Route | Kind::Endpoints => {
                let field = if kind == Kind::Route {
                    "route_config"
                } else {
                    "endpoint_config"
                };
                let list: Vec<_> = entries
                    .map(|e| match &e.state {
                        EntryState::Rejected(details) => json!({"name": e.name, "error_state": {"failed_configuration": resource(e), "last_update_attempt": timestamp(e.updated), "details": details}}),
                        _ => json!({"version_info": e.version, field: resource(e), "last_updated": timestamp(e.updated)}),
                    })
                    .collect();
                let key = if kind == Kind::Route {
                    "dynamic_route_configs"
                } else {
                    "dynamic_endpoint_configs"
                };
                json!({ key: list })
            }
            Kind::Secret => {
                // Secrets are listed without their contents: private keys never leave.
                let list: Vec<_> = entries
                    .map(|e| match &e.state {
                        EntryState::Rejected(details) => json!({"name": e.name, "error_state": {"last_update_attempt": timestamp(e.updated), "details": details}}),
                        _ => json!({"name": e.name, "version_info": e.version, "last_updated": timestamp(e.updated)}),
                    })
                    .collect();
                json!({ "dynamic_active_secrets": list })
            }
        }
    }
}

/// A resource in Envoy's JSON shape (null if it cannot be decoded).
fn any_to_json(any: &Any) -> serde_json::Value {
    legate_proto::dynamic_from_bytes(legate_proto::type_name_of(&any.type_url), &any.value)
        .and_then(|m| legate_proto::dynamic_to_json(&m))
        .unwrap_or(serde_json::Value::Null)
}

/// Starts the xDS client. The listener manager moves into it: from now on, listeners change
/// only through xDS.
pub fn spawn(
    runtime: Arc<Runtime>,
    listeners: ListenerManager,
    config: DynamicConfig,
    registry: Arc<FilterRegistry>,
) -> anyhow::Result<()> {
    let cluster = runtime
        .snapshot
        .load()
        .clusters
        .get(&config.ads_cluster)
        .cloned()
        .ok_or_else(|| anyhow::anyhow!("unknown ADS cluster {}", config.ads_cluster))?;
    let state = state::State::new(runtime.clone(), registry, listeners, &config);
    tokio::spawn(client::run(state, cluster, config, runtime));
    Ok(())
}
