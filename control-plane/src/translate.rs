//! Translation: a pure function from the model and a proxy group to Envoy v3 resources.
//!
//! Names and shapes follow Istio's, so an Istio user finds their way:
//! - a cluster `outbound|PORT||NAME.NAMESPACE.svc.DOMAIN` of type EDS per service port, its
//!   ClusterLoadAssignment grouping the EndpointSlices' endpoints by zone (ready → HEALTHY,
//!   not ready → UNHEALTHY), HTTP/2 upstream for `appProtocol: grpc|http2|kubernetes.io/h2c`
//!   or a port name starting with `grpc` or `http2`;
//! - for a sidecar, the outbound listener `virtualOutbound` on the proxy's IP and port 15001
//!   (or `LEGATE_OUTBOUND_PORT`), whose route configuration is named by that port ("15001")
//!   and routes by `Host` to every HTTP service port. Without traffic capture every service is
//!   reached through this one port, so its virtual hosts carry the `:port` forms of each
//!   service port's names, and the bare names and the cluster IP map to the service's default
//!   port (80 if it has one, else its first). Per-port listeners and routes ("80") come with
//!   capture.
//!
//! The router (gateway) role gets the same clusters and endpoints, and an HTTP listener
//! routed by the cluster's `Ingress` resources (see [`crate::gateway`]).

use std::collections::BTreeMap;
use std::net::IpAddr;

use legate_proto::pb::envoy::config::cluster::v3::cluster::{
    ClusterDiscoveryType, DiscoveryType, EdsClusterConfig,
};
use legate_proto::pb::envoy::config::cluster::v3::Cluster;
use legate_proto::pb::envoy::config::core::v3::{
    address, config_source::ConfigSourceSpecifier, socket_address::PortSpecifier, Address,
    AggregatedConfigSource, ApiVersion, ConfigSource, HealthStatus, Http2ProtocolOptions, Locality,
    SocketAddress, TrafficDirection,
};
use legate_proto::pb::envoy::config::endpoint::v3::{
    lb_endpoint::HostIdentifier, ClusterLoadAssignment, Endpoint as EnvoyEndpoint, LbEndpoint,
    LocalityLbEndpoints,
};
use legate_proto::pb::envoy::config::listener::v3::{filter, Filter, FilterChain, Listener};
use legate_proto::pb::envoy::config::route::v3::{
    route::Action, route_action::ClusterSpecifier, route_match::PathSpecifier, Route, RouteAction,
    RouteConfiguration, RouteMatch, VirtualHost,
};
use legate_proto::pb::envoy::extensions::filters::http::router::v3::Router;
use legate_proto::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    http_connection_manager::{CodecType, RouteSpecifier, StripPortMode},
    http_filter, HttpConnectionManager, HttpFilter, Rds,
};
use legate_proto::pb::envoy::extensions::transport_sockets::tls::v3::Secret;
use legate_proto::pb::envoy::extensions::upstreams::http::v3::{
    http_protocol_options::{
        explicit_http_config::ProtocolConfig, ExplicitHttpConfig, UpstreamProtocolOptions,
    },
    HttpProtocolOptions,
};
use legate_proto::pb::google::protobuf::{Any, Duration};
use prost::{Message, Name};

use crate::identity::{ProxyGroup, Role};
use crate::model::{Model, Service, ServicePort};

/// The name of a sidecar's outbound listener.
pub const OUTBOUND_LISTENER: &str = "virtualOutbound";

/// The key of `HttpProtocolOptions` in a cluster's `typed_extension_protocol_options`.
pub const HTTP_PROTOCOL_OPTIONS: &str = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions";

/// The typed resources of one proxy group, before encoding.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Resources {
    pub clusters: Vec<Cluster>,
    pub endpoints: Vec<ClusterLoadAssignment>,
    pub listeners: Vec<Listener>,
    pub routes: Vec<RouteConfiguration>,
    /// SDS secrets; only a gateway gets any, and only those its listeners name.
    pub secrets: Vec<Secret>,
}

/// What translation needs besides the model and the group.
#[derive(Debug, Clone)]
pub struct TranslateOptions {
    /// The cluster's DNS domain (`cluster.local`).
    pub domain_suffix: String,
}

impl Default for TranslateOptions {
    fn default() -> Self {
        Self {
            domain_suffix: "cluster.local".into(),
        }
    }
}

/// Packs a message into an `Any` with Envoy's type URL.
pub fn to_any<M: Message + Name>(message: &M) -> Any {
    Any {
        type_url: M::type_url(),
        value: message.encode_to_vec(),
    }
}

/// The service's fully qualified name, `NAME.NAMESPACE.svc.DOMAIN`.
pub fn fqdn(service: &Service, options: &TranslateOptions) -> String {
    format!(
        "{}.{}.svc.{}",
        service.name, service.namespace, options.domain_suffix
    )
}

/// Istio's outbound cluster name, `outbound|PORT||FQDN`.
pub fn cluster_name(port: u16, fqdn: &str) -> String {
    format!("outbound|{port}||{fqdn}")
}

/// Whether the port speaks HTTP/2 to its endpoints (gRPC included).
pub fn is_http2(port: &ServicePort) -> bool {
    let by_app = matches!(
        port.app_protocol.as_deref(),
        Some("grpc" | "http2" | "grpc-web" | "kubernetes.io/h2c")
    );
    let name = port.name.to_ascii_lowercase();
    by_app || name.starts_with("grpc") || name.starts_with("http2")
}

/// Whether the port carries HTTP (and so gets routes); opaque TCP protocols do not.
pub fn is_http(port: &ServicePort) -> bool {
    if !port.protocol.eq_ignore_ascii_case("TCP") {
        return false;
    }
    let opaque = ["tcp", "tls", "mongo", "mysql", "redis"];
    let by_app = port
        .app_protocol
        .as_deref()
        .is_some_and(|a| opaque.contains(&a));
    let name = port.name.to_ascii_lowercase();
    let by_name = opaque
        .iter()
        .any(|p| name == *p || name.starts_with(&format!("{p}-")));
    !(by_app || by_name)
}

/// Translates the model for one proxy group.
pub fn translate(model: &Model, group: &ProxyGroup, options: &TranslateOptions) -> Resources {
    let (clusters, endpoints) = mesh(model, options);
    let mut resources = group_resources(model, group, options);
    resources.clusters.splice(0..0, clusters);
    resources.endpoints = endpoints;
    resources
}

/// What every proxy gets alike, whoever it is: a cluster and its ClusterLoadAssignment per
/// service port. Translated (and encoded, see [`crate::snapshot::SharedMesh`]) once per model.
pub fn mesh(
    model: &Model,
    options: &TranslateOptions,
) -> (Vec<Cluster>, Vec<ClusterLoadAssignment>) {
    let mut clusters = Vec::new();
    let mut endpoints = Vec::new();
    for service in model.services.values() {
        let fqdn = fqdn(service, options);
        for port in service
            .ports
            .iter()
            .filter(|p| p.protocol.eq_ignore_ascii_case("TCP"))
        {
            let name = cluster_name(port.port, &fqdn);
            clusters.push(cluster(&name, port));
            endpoints.push(load_assignment(&name, model, service, port));
        }
    }
    (clusters, endpoints)
}

/// What depends on the proxy: its listeners and routes, its inbound clusters, its secrets.
pub fn group_resources(model: &Model, group: &ProxyGroup, options: &TranslateOptions) -> Resources {
    group_resources_with(model, group, options, true)
}

/// [`group_resources`], leaving out a sidecar's outbound route configuration when
/// `outbound_routes` is false (the cache shares it between the sidecars of a namespace; see
/// [`outbound_route_config`]).
pub fn group_resources_with(
    model: &Model,
    group: &ProxyGroup,
    options: &TranslateOptions,
    outbound_routes: bool,
) -> Resources {
    let mut resources = Resources::default();
    match group.role {
        Role::Sidecar => {
            let route_name = group.listener_port.to_string();
            resources.listeners.push(outbound_listener(
                group.ip,
                group.listener_port,
                &route_name,
            ));
            if outbound_routes {
                resources
                    .routes
                    .push(outbound_route_config(model, group, options));
            }
            let inbound = crate::inbound::translate(model, group, options);
            resources.clusters.extend(inbound.clusters);
            resources.listeners.push(inbound.listener);
            resources.routes.push(inbound.routes);
        }
        Role::Router => {
            let gateway = crate::gateway::translate(model, group, options);
            resources.listeners.extend(gateway.listeners);
            resources.routes.extend(gateway.routes);
            resources.secrets.extend(gateway.secrets);
        }
    }
    resources
}

pub(crate) fn ads() -> ConfigSource {
    ConfigSource {
        resource_api_version: ApiVersion::V3 as i32,
        config_source_specifier: Some(ConfigSourceSpecifier::Ads(AggregatedConfigSource {})),
        ..Default::default()
    }
}

pub(crate) fn cluster(name: &str, port: &ServicePort) -> Cluster {
    let mut cluster = Cluster {
        name: name.to_string(),
        cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::Eds as i32)),
        eds_cluster_config: Some(EdsClusterConfig {
            eds_config: Some(ads()),
            service_name: String::new(),
        }),
        connect_timeout: Some(Duration {
            seconds: 10,
            nanos: 0,
        }),
        ..Default::default()
    };
    if is_http2(port) {
        let options = HttpProtocolOptions {
            upstream_protocol_options: Some(UpstreamProtocolOptions::ExplicitHttpConfig(
                ExplicitHttpConfig {
                    protocol_config: Some(ProtocolConfig::Http2ProtocolOptions(
                        Http2ProtocolOptions::default(),
                    )),
                },
            )),
            ..Default::default()
        };
        cluster
            .typed_extension_protocol_options
            .insert(HTTP_PROTOCOL_OPTIONS.to_string(), to_any(&options));
    }
    cluster
}

pub(crate) fn socket_address(ip: &str, port: u16) -> Address {
    Address {
        address: Some(address::Address::SocketAddress(SocketAddress {
            address: ip.to_string(),
            port_specifier: Some(PortSpecifier::PortValue(u32::from(port))),
            ..Default::default()
        })),
    }
}

fn load_assignment(
    name: &str,
    model: &Model,
    service: &Service,
    port: &ServicePort,
) -> ClusterLoadAssignment {
    // zone → endpoints; BTreeMap keeps the output (and so the resource's version) stable.
    let mut by_zone: BTreeMap<String, Vec<LbEndpoint>> = BTreeMap::new();
    for slice in model.slices_of(service) {
        if !matches!(slice.address_type.as_str(), "IPv4" | "IPv6") {
            continue;
        }
        let Some(slice_port) = slice.ports.iter().find(|p| p.name == port.name) else {
            continue;
        };
        for endpoint in &slice.endpoints {
            let health = if endpoint.ready {
                HealthStatus::Healthy
            } else {
                HealthStatus::Unhealthy
            };
            for addr in &endpoint.addresses {
                if addr.parse::<IpAddr>().is_err() {
                    continue;
                }
                by_zone
                    .entry(endpoint.zone.clone().unwrap_or_default())
                    .or_default()
                    .push(LbEndpoint {
                        host_identifier: Some(HostIdentifier::Endpoint(EnvoyEndpoint {
                            address: Some(socket_address(addr, slice_port.port)),
                            ..Default::default()
                        })),
                        health_status: health as i32,
                        ..Default::default()
                    });
            }
        }
    }
    ClusterLoadAssignment {
        cluster_name: name.to_string(),
        endpoints: by_zone
            .into_iter()
            .map(|(zone, lb_endpoints)| LocalityLbEndpoints {
                locality: (!zone.is_empty()).then(|| Locality {
                    zone,
                    ..Default::default()
                }),
                lb_endpoints,
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

fn outbound_listener(ip: IpAddr, port: u16, route_name: &str) -> Listener {
    let mut listener = http_listener(
        OUTBOUND_LISTENER,
        ip,
        port,
        route_name,
        &format!("outbound_{ip}_{port}"),
        None,
    );
    listener.traffic_direction = TrafficDirection::Outbound as i32;
    listener
}

/// The HTTP connection manager filter, its routes from RDS over ADS.
pub(crate) fn hcm_filter(
    route_name: &str,
    stat_prefix: &str,
    strip_port_mode: Option<StripPortMode>,
) -> Filter {
    let hcm = HttpConnectionManager {
        stat_prefix: stat_prefix.to_string(),
        codec_type: CodecType::Auto as i32,
        strip_port_mode,
        route_specifier: Some(RouteSpecifier::Rds(Rds {
            config_source: Some(ads()),
            route_config_name: route_name.to_string(),
        })),
        http_filters: vec![HttpFilter {
            name: "envoy.filters.http.router".into(),
            config_type: Some(http_filter::ConfigType::TypedConfig(to_any(
                &Router::default(),
            ))),
            ..Default::default()
        }],
        ..Default::default()
    };
    Filter {
        name: "envoy.filters.network.http_connection_manager".into(),
        config_type: Some(filter::ConfigType::TypedConfig(to_any(&hcm))),
    }
}

/// A listener with one HTTP connection manager whose routes come from RDS over ADS.
pub(crate) fn http_listener(
    name: &str,
    ip: IpAddr,
    port: u16,
    route_name: &str,
    stat_prefix: &str,
    strip_port_mode: Option<StripPortMode>,
) -> Listener {
    Listener {
        name: name.to_string(),
        address: Some(socket_address(&ip.to_string(), port)),
        filter_chains: vec![FilterChain {
            filters: vec![hcm_filter(route_name, stat_prefix, strip_port_mode)],
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// The host names a service answers to: the short name only from its own namespace, as
/// DNS search paths resolve it.
pub(crate) fn host_names(
    service: &Service,
    group: &ProxyGroup,
    options: &TranslateOptions,
) -> Vec<String> {
    let mut names = Vec::new();
    if service.namespace == group.namespace {
        names.push(service.name.clone());
    }
    names.push(format!("{}.{}", service.name, service.namespace));
    names.push(format!("{}.{}.svc", service.name, service.namespace));
    names.push(fqdn(service, options));
    if let Some(ip) = &service.cluster_ip {
        names.push(ip.clone());
    }
    names
}

pub(crate) fn with_port(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// A sidecar's outbound route configuration (named by its outbound port). It depends only on
/// the model, the sidecar's namespace and that port.
pub fn outbound_route_config(
    model: &Model,
    group: &ProxyGroup,
    options: &TranslateOptions,
) -> RouteConfiguration {
    outbound_routes(&group.listener_port.to_string(), model, group, options)
}

fn outbound_routes(
    name: &str,
    model: &Model,
    group: &ProxyGroup,
    options: &TranslateOptions,
) -> RouteConfiguration {
    let mut virtual_hosts = Vec::new();
    for service in model.services.values() {
        let http_ports: Vec<&ServicePort> = service.ports.iter().filter(|p| is_http(p)).collect();
        let default_port = http_ports
            .iter()
            .find(|p| p.port == 80)
            .or_else(|| http_ports.first())
            .map(|p| p.port);
        let hosts = host_names(service, group, options);
        let fqdn = fqdn(service, options);
        for port in http_ports {
            let mut domains: Vec<String> = hosts.iter().map(|h| with_port(h, port.port)).collect();
            if Some(port.port) == default_port {
                domains.extend(hosts.iter().cloned());
            }
            virtual_hosts.push(VirtualHost {
                name: format!("{fqdn}:{}", port.port),
                domains,
                routes: vec![Route {
                    name: "default".into(),
                    r#match: Some(RouteMatch {
                        path_specifier: Some(PathSpecifier::Prefix("/".into())),
                        ..Default::default()
                    }),
                    action: Some(Action::Route(RouteAction {
                        cluster_specifier: Some(ClusterSpecifier::Cluster(cluster_name(
                            port.port, &fqdn,
                        ))),
                        // Like Istio: no per-route deadline, so streams (gRPC) are not cut.
                        timeout: Some(Duration {
                            seconds: 0,
                            nanos: 0,
                        }),
                        ..Default::default()
                    })),
                    ..Default::default()
                }],
                ..Default::default()
            });
        }
    }
    RouteConfiguration {
        name: name.to_string(),
        virtual_hosts,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::parse_manifests;
    use crate::test_support::sidecar;

    const MESH: &str = r#"
kind: Service
metadata: {name: reviews, namespace: default}
spec:
  clusterIP: 10.96.0.7
  ports:
  - {name: http, port: 80}
  - {name: grpc-api, port: 9090}
  - {name: db, port: 5432, appProtocol: tcp}
---
kind: Service
metadata: {name: ratings, namespace: other}
spec:
  ports: [{name: web, port: 8080, appProtocol: http2}]
---
kind: EndpointSlice
metadata: {name: reviews-1, namespace: default, labels: {kubernetes.io/service-name: reviews}}
addressType: IPv4
ports: [{name: http, port: 9080}, {name: grpc-api, port: 9091}]
endpoints:
- {addresses: [10.0.0.1], zone: z1}
- {addresses: [10.0.0.2], zone: z2, conditions: {ready: false}}
- {addresses: [10.0.0.3], zone: z1}
"#;

    fn endpoint_addr(e: &LbEndpoint) -> String {
        let Some(HostIdentifier::Endpoint(ep)) = &e.host_identifier else {
            return String::new();
        };
        match ep.address.as_ref().and_then(|a| a.address.as_ref()) {
            Some(address::Address::SocketAddress(s)) => match s.port_specifier {
                Some(PortSpecifier::PortValue(p)) => format!("{}:{p}", s.address),
                _ => s.address.clone(),
            },
            _ => String::new(),
        }
    }

    fn translated() -> Result<Resources, crate::model::ManifestError> {
        let model = Model::build(parse_manifests(MESH)?);
        Ok(translate(&model, &sidecar(), &TranslateOptions::default()))
    }

    #[test]
    fn clusters_are_named_like_istio_and_use_eds() -> Result<(), crate::model::ManifestError> {
        let r = translated()?;
        let names: Vec<&str> = r.clusters.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "outbound|80||reviews.default.svc.cluster.local",
                "outbound|9090||reviews.default.svc.cluster.local",
                "outbound|5432||reviews.default.svc.cluster.local",
                "outbound|8080||ratings.other.svc.cluster.local",
            ]
        );
        for c in &r.clusters {
            assert_eq!(
                c.cluster_discovery_type,
                Some(ClusterDiscoveryType::Type(DiscoveryType::Eds as i32))
            );
        }
        let h2: Vec<bool> = r
            .clusters
            .iter()
            .map(|c| {
                c.typed_extension_protocol_options
                    .contains_key(HTTP_PROTOCOL_OPTIONS)
            })
            .collect();
        assert_eq!(
            h2,
            [false, true, false, true],
            "appProtocol http2, port name grpc-*"
        );
        Ok(())
    }

    #[test]
    fn endpoints_are_grouped_by_zone_with_health() -> Result<(), crate::model::ManifestError> {
        let r = translated()?;
        let cla = r
            .endpoints
            .iter()
            .find(|c| c.cluster_name == "outbound|80||reviews.default.svc.cluster.local");
        let Some(cla) = cla else {
            panic!("no CLA for reviews:80");
        };
        let zones: Vec<(String, Vec<(String, i32)>)> = cla
            .endpoints
            .iter()
            .map(|l| {
                let zone = l
                    .locality
                    .as_ref()
                    .map(|l| l.zone.clone())
                    .unwrap_or_default();
                let eps = l
                    .lb_endpoints
                    .iter()
                    .map(|e| {
                        let addr = endpoint_addr(e);
                        (addr, e.health_status)
                    })
                    .collect();
                (zone, eps)
            })
            .collect();
        let healthy = HealthStatus::Healthy as i32;
        let unhealthy = HealthStatus::Unhealthy as i32;
        assert_eq!(
            zones,
            [
                (
                    "z1".to_string(),
                    vec![
                        ("10.0.0.1:9080".to_string(), healthy),
                        ("10.0.0.3:9080".to_string(), healthy)
                    ]
                ),
                (
                    "z2".to_string(),
                    vec![("10.0.0.2:9080".to_string(), unhealthy)]
                ),
            ]
        );
        let no_slice = r
            .endpoints
            .iter()
            .find(|c| c.cluster_name.contains("ratings"))
            .map(|c| c.endpoints.len());
        assert_eq!(
            no_slice,
            Some(0),
            "a service without slices has no endpoints"
        );
        Ok(())
    }

    #[test]
    fn the_outbound_route_has_every_host_form() -> Result<(), crate::model::ManifestError> {
        let r = translated()?;
        assert_eq!(r.listeners.len(), 2, "outbound and inbound");
        assert_eq!(r.listeners[0].name, OUTBOUND_LISTENER);
        assert_eq!(r.routes.len(), 2);
        let routes = &r.routes[0];
        assert_eq!(routes.name, "15001");
        let vhosts: Vec<&str> = routes
            .virtual_hosts
            .iter()
            .map(|v| v.name.as_str())
            .collect();
        assert_eq!(
            vhosts,
            [
                "reviews.default.svc.cluster.local:80",
                "reviews.default.svc.cluster.local:9090",
                "ratings.other.svc.cluster.local:8080",
            ],
            "the opaque tcp port has no route"
        );
        let reviews80 = &routes.virtual_hosts[0].domains;
        for d in [
            "reviews",
            "reviews:80",
            "reviews.default",
            "reviews.default.svc",
            "reviews.default.svc.cluster.local",
            "reviews.default.svc.cluster.local:80",
            "10.96.0.7",
            "10.96.0.7:80",
        ] {
            assert!(
                reviews80.iter().any(|x| x == d),
                "{d} missing from {reviews80:?}"
            );
        }
        let reviews9090 = &routes.virtual_hosts[1].domains;
        assert!(
            reviews9090.iter().all(|d| d.ends_with(":9090")),
            "{reviews9090:?}"
        );
        let ratings = &routes.virtual_hosts[2].domains;
        assert!(
            !ratings.iter().any(|d| d == "ratings"),
            "short names only within the proxy's namespace: {ratings:?}"
        );
        Ok(())
    }

    #[test]
    fn routers_get_the_gateway_listener() -> Result<(), crate::model::ManifestError> {
        let model = Model::build(parse_manifests(MESH)?);
        let group = ProxyGroup {
            role: Role::Router,
            listener_port: 8080,
            inbound_port: 15006,
            https_port: 8443,
            ..sidecar()
        };
        let r = translate(&model, &group, &TranslateOptions::default());
        let names: Vec<&str> = r.listeners.iter().map(|l| l.name.as_str()).collect();
        assert_eq!(names, ["127.0.0.1_8080"]);
        assert_eq!(r.routes[0].name, "http.8080");
        assert_eq!(r.clusters.len(), 4);
        Ok(())
    }
}
