//! The sidecar's inbound side: listener `virtualInbound` on the proxy's IP and port 15006
//! (or `LEGATE_INBOUND_PORT`), forwarding to the local workload.
//!
//! The workload's ports are those of the services whose EndpointSlices list the proxy's IP:
//! each becomes a STATIC cluster `inbound|PORT||` to `IP:PORT` (the endpoint's port on the
//! pod IP, as Istio forwards since 1.10), HTTP/2 when the service port says so. The route
//! configuration `virtualInbound` routes by `Host` with the same names as the outbound side.
//! Without traffic capture a client reaches the workload through this port directly; with
//! capture it will be where redirected inbound connections land.

use std::collections::BTreeMap;

use legate_proto::pb::envoy::config::cluster::v3::cluster::{ClusterDiscoveryType, DiscoveryType};
use legate_proto::pb::envoy::config::cluster::v3::Cluster;
use legate_proto::pb::envoy::config::core::v3::TrafficDirection;
use legate_proto::pb::envoy::config::endpoint::v3::{
    lb_endpoint::HostIdentifier, ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints,
};
use legate_proto::pb::envoy::config::listener::v3::Listener;
use legate_proto::pb::envoy::config::route::v3::{
    route::Action, route_action::ClusterSpecifier, route_match::PathSpecifier, Route, RouteAction,
    RouteConfiguration, RouteMatch, VirtualHost,
};
use legate_proto::pb::google::protobuf::Duration;

use crate::identity::ProxyGroup;
use crate::model::Model;
use crate::translate::{
    cluster, fqdn, host_names, http_listener, is_http, socket_address, with_port, TranslateOptions,
};

/// The name of the inbound listener and of its route configuration.
pub const INBOUND_LISTENER: &str = "virtualInbound";

/// Istio's inbound cluster name for a workload port.
pub fn inbound_cluster_name(port: u16) -> String {
    format!("inbound|{port}||")
}

/// The inbound resources of one sidecar.
pub struct Inbound {
    pub clusters: Vec<Cluster>,
    pub listener: Listener,
    pub routes: RouteConfiguration,
}

/// Translates the inbound side for `group`.
pub fn translate(model: &Model, group: &ProxyGroup, options: &TranslateOptions) -> Inbound {
    let ip = group.ip.to_string();
    let mut clusters: BTreeMap<u16, Cluster> = BTreeMap::new();
    let mut virtual_hosts = Vec::new();
    // Only the services whose endpoints list the proxy's IP can have a port here.
    for service in model.services_with_address(&ip) {
        let hosts = host_names(service, group, options);
        let http_ports: Vec<_> = service.ports.iter().filter(|p| is_http(p)).collect();
        let default_port = http_ports
            .iter()
            .find(|p| p.port == 80)
            .or_else(|| http_ports.first())
            .map(|p| p.port);
        for port in http_ports {
            // The workload's port for this service port, if the proxy's IP backs it.
            let target = model.slices_of(service).find_map(|slice| {
                let slice_port = slice.ports.iter().find(|p| p.name == port.name)?;
                slice
                    .endpoints
                    .iter()
                    .any(|e| e.addresses.contains(&ip))
                    .then_some(slice_port.port)
            });
            let Some(target) = target else { continue };
            let name = inbound_cluster_name(target);
            clusters.entry(target).or_insert_with(|| {
                let mut c = cluster(&name, port);
                c.cluster_discovery_type =
                    Some(ClusterDiscoveryType::Type(DiscoveryType::Static as i32));
                c.eds_cluster_config = None;
                c.load_assignment = Some(ClusterLoadAssignment {
                    cluster_name: name.clone(),
                    endpoints: vec![LocalityLbEndpoints {
                        lb_endpoints: vec![LbEndpoint {
                            host_identifier: Some(HostIdentifier::Endpoint(Endpoint {
                                address: Some(socket_address(&ip, target)),
                                ..Default::default()
                            })),
                            ..Default::default()
                        }],
                        ..Default::default()
                    }],
                    ..Default::default()
                });
                c
            });
            let mut domains: Vec<String> = hosts.iter().map(|h| with_port(h, port.port)).collect();
            if Some(port.port) == default_port {
                domains.extend(hosts.iter().cloned());
            }
            virtual_hosts.push(VirtualHost {
                name: format!("inbound|http|{}|{}", port.port, fqdn(service, options)),
                domains,
                routes: vec![Route {
                    name: "default".into(),
                    r#match: Some(RouteMatch {
                        path_specifier: Some(PathSpecifier::Prefix("/".into())),
                        ..Default::default()
                    }),
                    action: Some(Action::Route(RouteAction {
                        cluster_specifier: Some(ClusterSpecifier::Cluster(name)),
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
    let mut listener = http_listener(
        INBOUND_LISTENER,
        group.ip,
        group.inbound_port,
        INBOUND_LISTENER,
        &format!("inbound_{}_{}", group.ip, group.inbound_port),
        None,
    );
    listener.traffic_direction = TrafficDirection::Inbound as i32;
    Inbound {
        clusters: clusters.into_values().collect(),
        listener,
        routes: RouteConfiguration {
            name: INBOUND_LISTENER.into(),
            virtual_hosts,
            ..Default::default()
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Role;
    use crate::model::parse_manifests;

    const WORKLOAD: &str = r#"
kind: Service
metadata: {name: reviews}
spec: {ports: [{name: http, port: 80}, {name: grpc, port: 9090}]}
---
kind: Service
metadata: {name: ratings}
spec: {ports: [{name: http, port: 80}]}
---
kind: EndpointSlice
metadata: {name: reviews-1, labels: {kubernetes.io/service-name: reviews}}
ports: [{name: http, port: 9080}, {name: grpc, port: 9091}]
endpoints: [{addresses: [10.0.0.5]}, {addresses: [10.0.0.6]}]
---
kind: EndpointSlice
metadata: {name: ratings-1, labels: {kubernetes.io/service-name: ratings}}
ports: [{name: http, port: 9080}]
endpoints: [{addresses: [10.0.0.7]}]
"#;

    #[test]
    fn the_workload_is_found_by_the_proxy_ip() -> Result<(), crate::model::ManifestError> {
        let model = Model::build(parse_manifests(WORKLOAD)?);
        let group = crate::test_support::group(Role::Sidecar, [10, 0, 0, 5]);
        let inbound = translate(&model, &group, &TranslateOptions::default());
        let names: Vec<&str> = inbound.clusters.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(
            names,
            ["inbound|9080||", "inbound|9091||"],
            "ratings is not this workload"
        );
        assert_eq!(inbound.listener.name, INBOUND_LISTENER);
        let vhosts: Vec<&str> = inbound
            .routes
            .virtual_hosts
            .iter()
            .map(|v| v.name.as_str())
            .collect();
        assert_eq!(
            vhosts,
            [
                "inbound|http|80|reviews.default.svc.cluster.local",
                "inbound|http|9090|reviews.default.svc.cluster.local"
            ]
        );
        assert!(inbound.routes.virtual_hosts[0]
            .domains
            .iter()
            .any(|d| d == "reviews"));
        Ok(())
    }
}
