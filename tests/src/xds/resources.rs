//! Typed Envoy resources for xDS tests, and the bootstrap of a client fed over ADS.
//!
//! Everything is built from `envoy-types` messages; only fields a proxy implementing Envoy's
//! API would be expected to support are set.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use legate_proto::pb::envoy::config::cluster::v3::cluster::{
    ClusterDiscoveryType, DiscoveryType, EdsClusterConfig,
};
use legate_proto::pb::envoy::config::cluster::v3::Cluster;
use legate_proto::pb::envoy::config::core::v3::{
    address, config_source::ConfigSourceSpecifier, socket_address::PortSpecifier, Address,
    AggregatedConfigSource, ApiVersion, ConfigSource, SocketAddress,
};
use legate_proto::pb::envoy::config::endpoint::v3::{
    lb_endpoint::HostIdentifier, ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints,
};
use legate_proto::pb::envoy::config::listener::v3::{filter, Filter, FilterChain, Listener};
use legate_proto::pb::envoy::config::route::v3::{
    route::Action, route_action::ClusterSpecifier, route_match::PathSpecifier, Route, RouteAction,
    RouteConfiguration, RouteMatch, VirtualHost,
};
use legate_proto::pb::envoy::extensions::filters::http::router::v3::Router;
use legate_proto::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    http_connection_manager::RouteSpecifier, http_filter, HttpConnectionManager, HttpFilter, Rds,
};
use legate_proto::pb::google::protobuf::{Any, Duration};

use super::{any, XdsProtocol};

/// `{ads: {}, resource_api_version: V3}`.
pub fn ads_source() -> ConfigSource {
    ConfigSource {
        resource_api_version: ApiVersion::V3 as i32,
        config_source_specifier: Some(ConfigSourceSpecifier::Ads(AggregatedConfigSource {})),
        ..Default::default()
    }
}

/// A socket address.
pub fn socket_address(addr: SocketAddr) -> Address {
    Address {
        address: Some(address::Address::SocketAddress(SocketAddress {
            address: addr.ip().to_string(),
            port_specifier: Some(PortSpecifier::PortValue(u32::from(addr.port()))),
            ..Default::default()
        })),
    }
}

/// A cluster whose endpoints come from EDS over ADS (the load assignment named `name`).
pub fn eds_cluster(name: &str) -> Cluster {
    Cluster {
        name: name.to_string(),
        cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::Eds as i32)),
        eds_cluster_config: Some(EdsClusterConfig {
            eds_config: Some(ads_source()),
            service_name: String::new(),
        }),
        connect_timeout: Some(Duration {
            seconds: 1,
            nanos: 0,
        }),
        ..Default::default()
    }
}

/// The endpoints of cluster `cluster`: one locality with every address in `endpoints`.
pub fn load_assignment(cluster: &str, endpoints: &[SocketAddr]) -> ClusterLoadAssignment {
    ClusterLoadAssignment {
        cluster_name: cluster.to_string(),
        endpoints: vec![LocalityLbEndpoints {
            lb_endpoints: endpoints
                .iter()
                .map(|a| LbEndpoint {
                    host_identifier: Some(HostIdentifier::Endpoint(Endpoint {
                        address: Some(socket_address(*a)),
                        ..Default::default()
                    })),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// An HTTP filter entry: `name` with `typed_config`.
pub fn http_filter(name: &str, typed_config: Any) -> HttpFilter {
    HttpFilter {
        name: name.to_string(),
        config_type: Some(http_filter::ConfigType::TypedConfig(typed_config)),
        ..Default::default()
    }
}

/// The router filter, last in every chain.
pub fn router_filter() -> HttpFilter {
    http_filter("envoy.filters.http.router", any(&Router::default()))
}

/// A listener on 127.0.0.1:0 with one HTTP connection manager taking its routes from RDS
/// (`route_config_name`) over ADS, with `filters` before the router.
pub fn http_listener_with(
    name: &str,
    route_config_name: &str,
    filters: Vec<HttpFilter>,
) -> Listener {
    let mut http_filters = filters;
    http_filters.push(router_filter());
    let hcm = HttpConnectionManager {
        stat_prefix: name.to_string(),
        route_specifier: Some(RouteSpecifier::Rds(Rds {
            config_source: Some(ads_source()),
            route_config_name: route_config_name.to_string(),
        })),
        http_filters,
        ..Default::default()
    };
    Listener {
        name: name.to_string(),
        address: Some(socket_address(SocketAddr::from(([127, 0, 0, 1], 0)))),
        filter_chains: vec![FilterChain {
            filters: vec![Filter {
                name: "envoy.filters.network.http_connection_manager".into(),
                config_type: Some(filter::ConfigType::TypedConfig(any(&hcm))),
            }],
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// [`http_listener_with`] and only the router.
pub fn http_listener(name: &str, route_config_name: &str) -> Listener {
    http_listener_with(name, route_config_name, Vec::new())
}

/// A route configuration with one virtual host for every domain, routing each path prefix
/// to its cluster (first match wins).
pub fn route_config(name: &str, routes: &[(&str, &str)]) -> RouteConfiguration {
    RouteConfiguration {
        name: name.to_string(),
        virtual_hosts: vec![VirtualHost {
            name: format!("{name}-all"),
            domains: vec!["*".into()],
            routes: routes
                .iter()
                .map(|(prefix, cluster)| Route {
                    r#match: Some(RouteMatch {
                        path_specifier: Some(PathSpecifier::Prefix((*prefix).to_string())),
                        ..Default::default()
                    }),
                    action: Some(Action::Route(RouteAction {
                        cluster_specifier: Some(ClusterSpecifier::Cluster((*cluster).to_string())),
                        ..Default::default()
                    })),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// The bootstrap of a proxy that gets its listeners and clusters over ADS from the test
/// server, with an admin on 127.0.0.1:0.
#[derive(Debug, Clone)]
pub struct AdsBootstrap {
    pub node_id: String,
    pub node_cluster: String,
    /// The ADS server's address (the static cluster `xds`).
    pub xds: SocketAddr,
    pub protocol: XdsProtocol,
    /// When set, the `xds` cluster speaks TLS (SNI `localhost`) trusting this CA file.
    pub tls_ca: Option<PathBuf>,
}

impl AdsBootstrap {
    /// Node `test-node` in cluster `test-cluster`.
    pub fn new(xds: SocketAddr, protocol: XdsProtocol) -> Self {
        Self {
            node_id: "test-node".into(),
            node_cluster: "test-cluster".into(),
            xds,
            protocol,
            tls_ca: None,
        }
    }

    /// The bootstrap as YAML.
    pub fn yaml(&self) -> String {
        format!(
            r#"node: {{id: {id}, cluster: {cluster}}}
admin: {{address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}}}
dynamic_resources:
  ads_config:
    api_type: {api_type}
    transport_api_version: V3
    grpc_services: [{{envoy_grpc: {{cluster_name: xds}}}}]
  lds_config: {{ads: {{}}, resource_api_version: V3}}
  cds_config: {{ads: {{}}, resource_api_version: V3}}
static_resources:
  clusters:
  - name: xds
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        '@type': type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{http2_protocol_options: {{}}}}
{tls}    load_assignment:
      cluster_name: xds
      endpoints:
      - lb_endpoints:
        - endpoint: {{address: {{socket_address: {{address: {ip}, port_value: {port}}}}}}}
"#,
            id = self.node_id,
            cluster = self.node_cluster,
            api_type = self.protocol.api_type(),
            ip = self.xds.ip(),
            port = self.xds.port(),
            tls = match &self.tls_ca {
                Some(ca) => format!(
                    r#"    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        '@type': type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        sni: localhost
        common_tls_context:
          validation_context: {{trusted_ca: {{filename: {}}}}}
"#,
                    ca.display()
                ),
                None => String::new(),
            },
        )
    }

    /// Writes the bootstrap to `dir/bootstrap.yaml`; returns the path.
    pub fn write(&self, dir: &Path) -> Result<PathBuf> {
        let path = dir.join("bootstrap.yaml");
        std::fs::write(&path, self.yaml())
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }
}
