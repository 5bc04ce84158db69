//! Envoy v3 configuration → Legate's validated model.
//!
//! This is the only place that reads Envoy protos. The text (YAML or JSON) is decoded with
//! Envoy's descriptors (unknown fields are errors), every set field is checked against what
//! Legate implements (`check`), then the typed messages are converted into the structures the
//! proxy runs (`listener`, `route`, `cluster`). Every problem is reported with its path.

#![allow(deprecated)] // Envoy's deprecated fields are still part of its API; Legate honours them.

mod check;
mod cluster;
mod dynamic;
mod listener;
mod route;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use legate_filters::FilterRegistry;
use legate_proto::pb::envoy::config::bootstrap::v3 as bs;
use legate_proto::pb::envoy::config::core::v3 as core;
use legate_proto::pb::envoy::extensions::transport_sockets::tls::v3::Secret;

pub use check::Issue;
pub use dynamic::{
    decode_cla, decode_cluster, decode_listener, decode_route, decode_secret, resource_name,
    AdsProtocol, Decoded, DynamicConfig,
};

use crate::cluster::ClusterConfig;
use crate::listener::ListenerConfig;

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot parse configuration: {0}")]
    Parse(String),
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<Issue>),
}

/// The node identity.
#[derive(Debug, Clone, Default)]
pub struct NodeInfo {
    pub id: String,
    pub cluster: String,
    /// The whole `node` (metadata, locality), as sent to the management server.
    pub node: core::Node,
}

/// A connection manager's reference to a route configuration delivered by RDS. Per-filter
/// route configuration is built by the manager's own filters, so a route configuration is
/// compiled once per distinct filter list that uses it; `key` names that compilation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RdsRef {
    pub name: String,
    pub key: Arc<str>,
    /// The manager's HTTP filters: (name in `http_filters`, type URL).
    pub filters: Vec<(String, String)>,
}

impl RdsRef {
    pub(crate) fn new(name: &str, filters: &[(String, String)]) -> Self {
        let mut key = name.to_owned();
        for (n, t) in filters {
            key.push('\0');
            key.push_str(n);
            key.push('=');
            key.push_str(t);
        }
        Self {
            name: name.to_owned(),
            key: key.into(),
            filters: filters.to_vec(),
        }
    }
}

/// A validated bootstrap.
#[derive(Debug)]
pub struct Bootstrap {
    pub node: NodeInfo,
    pub admin: Option<SocketAddr>,
    pub listeners: Vec<Arc<ListenerConfig>>,
    pub clusters: Vec<ClusterConfig>,
    /// `dynamic_resources`, when configuration comes over xDS.
    pub dynamic: Option<DynamicConfig>,
    /// The bootstrap as decoded, in Envoy's JSON shape, for `/config_dump`.
    pub json: serde_json::Value,
    pub warnings: Vec<Issue>,
}

/// Conversion state: the errors found so far and the filter registry.
pub(crate) struct Ctx<'a> {
    errors: Vec<Issue>,
    /// Clusters named by routes that Envoy would validate: (path, cluster name).
    cluster_refs: Vec<(String, String)>,
    /// The HTTP filters (name, type URL) of the connection manager being converted, for
    /// `typed_per_filter_config`.
    http_filters: Vec<(String, String)>,
    /// Route configurations named by `rds` in the listeners converted.
    rds_refs: Vec<RdsRef>,
    /// The secrets TLS contexts may name (`static_resources.secrets`, or what SDS delivered).
    secrets: &'a Secrets,
    /// Secrets named through SDS by the resources converted.
    sds_refs: Vec<String>,
    /// Named secrets that have not arrived (the resource must wait for them).
    missing_secrets: Vec<String>,
    registry: &'a FilterRegistry,
}

/// Secrets by name.
pub type Secrets = std::collections::BTreeMap<String, Secret>;

impl Ctx<'_> {
    pub(crate) fn err(&mut self, path: &str, message: impl Into<String>) {
        self.errors.push(Issue {
            path: path.to_owned(),
            message: message.into(),
        });
    }

    /// Reads a `DataSource`.
    pub(crate) fn data_source(&mut self, ds: &core::DataSource, path: &str) -> Option<Vec<u8>> {
        use core::data_source::Specifier as S;
        match &ds.specifier {
            Some(S::Filename(f)) => match std::fs::read(f) {
                Ok(b) => Some(b),
                Err(e) => {
                    self.err(&format!("{path}.filename"), format!("cannot read {f}: {e}"));
                    None
                }
            },
            Some(S::InlineString(s)) => Some(s.clone().into_bytes()),
            Some(S::InlineBytes(b)) => Some(b.clone()),
            _ => {
                self.err(path, "filename, inline_string or inline_bytes is required");
                None
            }
        }
    }
}

/// A protobuf `Duration` as a std one (negative values clamp to zero).
pub(crate) fn duration(d: &legate_proto::pb::google::protobuf::Duration) -> Duration {
    Duration::from_secs(u64::try_from(d.seconds).unwrap_or(0))
        + Duration::from_nanos(u64::try_from(d.nanos).unwrap_or(0))
}

pub(crate) fn socket_address(
    cx: &mut Ctx<'_>,
    a: Option<&core::Address>,
    path: &str,
) -> Option<SocketAddr> {
    use core::address::Address as A;
    use core::socket_address::PortSpecifier as P;
    let Some(A::SocketAddress(sa)) = a.and_then(|a| a.address.as_ref()) else {
        cx.err(path, "a socket_address is required");
        return None;
    };
    if sa.protocol != 0 {
        cx.err(
            &format!("{path}.socket_address.protocol"),
            "only TCP is supported",
        );
        return None;
    }
    let port = match sa.port_specifier {
        Some(P::PortValue(p)) => p,
        _ => {
            cx.err(&format!("{path}.socket_address.port_value"), "required");
            return None;
        }
    };
    let Ok(port) = u16::try_from(port) else {
        cx.err(
            &format!("{path}.socket_address.port_value"),
            format!("{port} is not a port"),
        );
        return None;
    };
    let host = sa.address.trim_start_matches('[').trim_end_matches(']');
    match host.parse::<std::net::IpAddr>() {
        Ok(ip) => Some(SocketAddr::new(ip, port)),
        Err(_) => {
            cx.err(
                &format!("{path}.socket_address.address"),
                format!("{:?} is not an IP address", sa.address),
            );
            None
        }
    }
}

/// Parses YAML or JSON text into a JSON value (YAML is a superset of JSON).
pub fn parse_text(text: &str) -> Result<serde_json::Value, ConfigError> {
    serde_yaml::from_str::<serde_json::Value>(text).map_err(|e| ConfigError::Parse(e.to_string()))
}

/// Loads a bootstrap file.
pub fn load_file(path: &str, registry: &FilterRegistry) -> Result<Bootstrap, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    load_text(&text, registry)
}

/// Loads a bootstrap from YAML or JSON text.
pub fn load_text(text: &str, registry: &FilterRegistry) -> Result<Bootstrap, ConfigError> {
    let json = parse_text(text)?;
    load_json(json, registry)
}

/// Validates and converts a bootstrap given as JSON.
pub fn load_json(
    json: serde_json::Value,
    registry: &FilterRegistry,
) -> Result<Bootstrap, ConfigError> {
    const BOOTSTRAP: &str = "envoy.config.bootstrap.v3.Bootstrap";
    let msg = legate_proto::dynamic_from_json(BOOTSTRAP, &json)
        .map_err(|e| ConfigError::Parse(e.to_string()))?;
    let mut errors = Vec::new();
    let mut warnings = Vec::new();
    check::check_message(&msg, "", registry, &mut errors, &mut warnings);
    if !errors.is_empty() {
        return Err(ConfigError::Invalid(errors));
    }
    let typed: bs::Bootstrap =
        legate_proto::to_typed(&msg).map_err(|e| ConfigError::Parse(e.to_string()))?;
    let dump = legate_proto::dynamic_to_json(&msg).unwrap_or(json);
    let static_secrets: Secrets = typed
        .static_resources
        .iter()
        .flat_map(|sr| sr.secrets.iter())
        .map(|s| (s.name.clone(), s.clone()))
        .collect();
    let mut cx = Ctx {
        errors: Vec::new(),
        cluster_refs: Vec::new(),
        http_filters: Vec::new(),
        rds_refs: Vec::new(),
        secrets: &static_secrets,
        sds_refs: Vec::new(),
        missing_secrets: Vec::new(),
        registry,
    };
    let node = typed
        .node
        .as_ref()
        .map(|n| NodeInfo {
            id: n.id.clone(),
            cluster: n.cluster.clone(),
            node: n.clone(),
        })
        .unwrap_or_default();
    let dynamic = typed
        .dynamic_resources
        .as_ref()
        .and_then(|d| dynamic::dynamic_resources(&mut cx, d, "dynamic_resources"));
    let admin = typed
        .admin
        .as_ref()
        .and_then(|a| socket_address(&mut cx, a.address.as_ref(), "admin.address"));
    let mut listeners = Vec::new();
    let mut clusters = Vec::new();
    if let Some(sr) = &typed.static_resources {
        for (i, c) in sr.clusters.iter().enumerate() {
            if let Some(c) =
                cluster::cluster(&mut cx, c, &format!("static_resources.clusters[{i}]"))
            {
                if clusters.iter().any(|x: &ClusterConfig| x.name == c.name) {
                    cx.err(
                        &format!("static_resources.clusters[{i}].name"),
                        format!("duplicate cluster {}", c.name),
                    );
                }
                clusters.push(c);
            }
        }
        for (i, l) in sr.listeners.iter().enumerate() {
            if let Some(l) =
                listener::listener(&mut cx, l, &format!("static_resources.listeners[{i}]"))
            {
                if listeners
                    .iter()
                    .any(|x: &Arc<ListenerConfig>| x.name == l.name)
                {
                    cx.err(
                        &format!("static_resources.listeners[{i}].name"),
                        format!("duplicate listener {}", l.name),
                    );
                }
                listeners.push(Arc::new(l));
            }
        }
    }
    if let Some(d) = &dynamic {
        if !clusters.iter().any(|c| c.name == d.ads_cluster) {
            cx.err(
                "dynamic_resources.ads_config.grpc_services[0].envoy_grpc.cluster_name",
                format!(
                    "unknown cluster '{}' (it must be a static cluster)",
                    d.ads_cluster
                ),
            );
        }
    }
    if dynamic.is_none() {
        if let Some(c) = clusters.iter().find(|c| c.eds_service_name.is_some()) {
            cx.err(
                "static_resources.clusters",
                format!(
                    "EDS cluster '{}' needs dynamic_resources.ads_config",
                    c.name
                ),
            );
        }
        if !cx.rds_refs.is_empty() {
            cx.err(
                "static_resources.listeners",
                "rds needs dynamic_resources.ads_config",
            );
        }
    }
    for name in std::mem::take(&mut cx.missing_secrets) {
        cx.err(
            "static_resources",
            format!("secret '{name}' is not in static_resources.secrets (SDS secrets are supported for resources that come over xDS)"),
        );
    }
    let static_rds = std::mem::take(&mut cx.rds_refs);
    for (path, name) in std::mem::take(&mut cx.cluster_refs) {
        if !clusters.iter().any(|c| c.name == name) {
            cx.err(&path, format!("route references unknown cluster '{name}' (set validate_clusters: false to allow it)"));
        }
    }
    if !cx.errors.is_empty() {
        return Err(ConfigError::Invalid(cx.errors));
    }
    Ok(Bootstrap {
        node,
        admin,
        listeners,
        clusters,
        dynamic: dynamic.map(|mut d| {
            d.static_rds = static_rds;
            d
        }),
        json: dump,
        warnings,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(y: &str) -> Result<Bootstrap, ConfigError> {
        load_text(y, &FilterRegistry::with_builtins())
    }

    #[test]
    fn unsupported_field_names_its_path() {
        let err = load(
            "static_resources:\n  clusters:\n  - name: c\n    type: STATIC\n    health_checks: [{timeout: 1s, interval: 1s, http_health_check: {path: /}}]\n",
        );
        let msg = err.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(
            msg.contains("static_resources.clusters[0].health_checks"),
            "{msg}"
        );
    }

    #[test]
    fn unknown_extension_names_its_type() {
        let err = load(
            "static_resources:\n  listeners:\n  - name: l\n    address: {socket_address: {address: 127.0.0.1, port_value: 0}}\n    filter_chains:\n    - filters:\n      - name: x\n        typed_config: {\"@type\": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy, stat_prefix: x, cluster: c}\n",
        );
        let msg = err.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(msg.contains("tcp_proxy"), "{msg}");
    }

    fn with_filter(filter: &str) -> String {
        format!(
            "static_resources:\n  listeners:\n  - name: l\n    address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}\n    filter_chains:\n    - filters:\n      - name: hcm\n        typed_config:\n          '@type': type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager\n          stat_prefix: x\n          route_config: {{virtual_hosts: [{{name: v, domains: ['*'], routes: [{{match: {{prefix: /}}, direct_response: {{status: 200}}}}]}}]}}\n          http_filters:\n          - name: f\n            typed_config: {filter}\n          - name: envoy.filters.http.router\n            typed_config: {{'@type': type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}\n"
        )
    }

    #[test]
    fn a_filter_field_is_checked_against_its_factory_table() {
        let path = "static_resources.listeners[0].filter_chains[0].filters[0].typed_config.http_filters[0].typed_config";
        let err = load(&with_filter(
            "{'@type': type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz, grpc_service: {envoy_grpc: {cluster_name: a}}, with_request_body: {max_request_bytes: 1}}",
        ));
        let msg = err.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(
            msg.contains(&format!(
                "{path}.with_request_body: field not supported by Legate"
            )),
            "{msg}"
        );
        // The same message through a TypedStruct is checked the same way.
        let err = load(&with_filter(
            "{'@type': type.googleapis.com/xds.type.v3.TypedStruct, type_url: type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz, value: {grpc_service: {envoy_grpc: {cluster_name: a}}, with_request_body: {max_request_bytes: 1}}}",
        ));
        let msg = err.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(
            msg.contains(&format!(
                "{path}.value.with_request_body: field not supported by Legate"
            )),
            "{msg}"
        );
        let err = load(&with_filter(
            "{'@type': type.googleapis.com/udpa.type.v1.TypedStruct, type_url: type.googleapis.com/acme.Unknown, value: {}}",
        ));
        let msg = err.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(
            msg.contains(&format!(
                "{path}: unsupported extension type type.googleapis.com/acme.Unknown"
            )),
            "{msg}"
        );
        assert!(load(&with_filter(
            "{'@type': type.googleapis.com/xds.type.v3.TypedStruct, type_url: type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz, value: {grpc_service: {envoy_grpc: {cluster_name: a}}, failure_mode_allow: true}}",
        ))
        .is_ok());
    }

    #[test]
    fn a_per_route_config_may_be_a_typed_struct() {
        let yaml = |per_route: &str| {
            with_filter("{'@type': type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz, grpc_service: {envoy_grpc: {cluster_name: a}}}")
                .replace(
                    "direct_response: {status: 200}}",
                    &format!("direct_response: {{status: 200}}, typed_per_filter_config: {{f: {per_route}}}}}"),
                )
        };
        let ok = load(&yaml("{'@type': type.googleapis.com/xds.type.v3.TypedStruct, type_url: type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute, value: {disabled: true}}"));
        assert!(ok.is_ok(), "{:?}", ok.err().map(|e| e.to_string()));
        let err = load(&yaml("{'@type': type.googleapis.com/xds.type.v3.TypedStruct, type_url: type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute, value: {check_settings: {with_request_body: {max_request_bytes: 1}}}}"));
        let msg = err.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(
            msg.contains("typed_per_filter_config[\"f\"].value.check_settings.with_request_body: field not supported by Legate"),
            "{msg}"
        );
    }
}
