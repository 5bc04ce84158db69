//! The ingress gateway (`router` role): an HTTP listener routed by `Ingress` resources, and
//! an HTTPS listener for their `spec.tls` entries.
//!
//! Names follow Istio's gateways: listener `IP_PORT` (`0.0.0.0_8080`), route configuration
//! `http.PORT`; for HTTPS `IP_PORT` (`0.0.0.0_8443`) and `https.PORT`. Ingresses without `ingressClassName` or with class `legate` are served.
//! Kubernetes semantics:
//! - a rule's host (or every host when absent; `*.example.com` wildcards as Envoy does) is a
//!   virtual host; rules of several Ingresses for one host are merged;
//! - `Exact` matches the path exactly; `Prefix` matches whole path elements (`/foo` matches
//!   `/foo` and `/foo/bar`, not `/foobar`) and ignores a trailing slash;
//!   `ImplementationSpecific` is a plain string prefix;
//! - the longest path wins, `Exact` before `Prefix` at equal length;
//! - `defaultBackend` (of the first Ingress by namespace/name that has one) serves whatever
//!   no rule matches, on every host;
//! - a backend whose service or port does not exist answers 503.
//!
//! The host's port is stripped before matching (`strip_any_host_port`).
//!
//! HTTPS (only when some `spec.tls` entry can be served): a TLS inspector reads the SNI, and
//! each entry is one filter chain matching its hosts (`server_names`; no hosts = any name)
//! whose `DownstreamTlsContext` names the entry's Secret over SDS (see [`crate::tls`]), ALPN
//! `h2`, `http/1.1`. A host claimed by an earlier entry (Ingresses by namespace/name, entries
//! in order) is not claimed again, as Envoy refuses two chains with one server name. Every
//! chain's connection manager uses `https.PORT`: the virtual hosts of the hosts some entry
//! covers (exactly or by a `*.` wildcard), and the `*` one. An entry whose Secret is missing
//! or invalid is left out. When both ports are 0 (tests) the HTTPS listener is named
//! `IP_0_https` so the two names differ.

use std::collections::{BTreeMap, BTreeSet};

use legate_proto::pb::envoy::config::core::v3::{transport_socket, TransportSocket};
use legate_proto::pb::envoy::config::listener::v3::{
    listener_filter, FilterChain, FilterChainMatch, Listener, ListenerFilter,
};
use legate_proto::pb::envoy::config::route::v3::{
    route::Action, route_action::ClusterSpecifier, route_match::PathSpecifier,
    DirectResponseAction, Route, RouteAction, RouteConfiguration, RouteMatch, VirtualHost,
};
use legate_proto::pb::envoy::extensions::filters::network::http_connection_manager::v3::http_connection_manager::StripPortMode;
use legate_proto::pb::envoy::extensions::filters::listener::tls_inspector::v3::TlsInspector;
use legate_proto::pb::envoy::extensions::transport_sockets::tls::v3::{
    CommonTlsContext, DownstreamTlsContext, SdsSecretConfig, Secret,
};
use legate_proto::pb::google::protobuf::Duration;

use crate::identity::ProxyGroup;
use crate::model::{BackendPort, Ingress, IngressBackend, Model, PathType};
use crate::translate::{
    ads, cluster_name, fqdn, hcm_filter, http_listener, socket_address, to_any, TranslateOptions,
};

/// What a gateway gets besides clusters and endpoints.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GatewayResources {
    pub listeners: Vec<Listener>,
    pub routes: Vec<RouteConfiguration>,
    /// The secrets the HTTPS listener names, and only those.
    pub secrets: Vec<Secret>,
}

/// The ingress class Legate serves (besides Ingresses without a class).
pub const INGRESS_CLASS: &str = "legate";

/// One route before ordering.
struct PathRoute {
    path: String,
    path_type: PathType,
    action: Action,
}

/// Whether Legate serves this Ingress (no class, or class `legate`).
pub fn is_served(ingress: &Ingress) -> bool {
    ingress.class.as_deref().is_none_or(|c| c == INGRESS_CLASS)
}

/// The route action for a backend: its cluster, or 503 when it does not resolve.
fn backend_action(
    model: &Model,
    namespace: &str,
    backend: &IngressBackend,
    options: &TranslateOptions,
) -> Action {
    let service = model
        .services
        .get(&(namespace.to_string(), backend.service.clone()));
    let port = service.and_then(|s| {
        s.ports
            .iter()
            .find(|p| match &backend.port {
                BackendPort::Number(n) => p.port == *n,
                BackendPort::Name(name) => p.name == *name,
            })
            .map(|p| (s, p.port))
    });
    match port {
        Some((service, port)) => Action::Route(RouteAction {
            cluster_specifier: Some(ClusterSpecifier::Cluster(cluster_name(
                port,
                &fqdn(service, options),
            ))),
            timeout: Some(Duration {
                seconds: 0,
                nanos: 0,
            }),
            ..Default::default()
        }),
        None => {
            tracing::warn!(namespace, service = %backend.service, port = ?backend.port, "ingress backend does not resolve; answering 503");
            Action::DirectResponse(DirectResponseAction {
                status: 503,
                ..Default::default()
            })
        }
    }
}

fn route_match(path: &str, path_type: PathType) -> RouteMatch {
    let specifier = match path_type {
        PathType::Exact => PathSpecifier::Path(path.to_string()),
        PathType::ImplementationSpecific => PathSpecifier::Prefix(path.to_string()),
        PathType::Prefix => {
            let trimmed = path.trim_end_matches('/');
            if trimmed.is_empty() {
                PathSpecifier::Prefix("/".into())
            } else {
                PathSpecifier::PathSeparatedPrefix(trimmed.to_string())
            }
        }
    };
    RouteMatch {
        path_specifier: Some(specifier),
        ..Default::default()
    }
}

fn route(name: String, r#match: RouteMatch, action: Action) -> Route {
    Route {
        name,
        r#match: Some(r#match),
        action: Some(action),
        ..Default::default()
    }
}

/// The gateway's listeners, route configurations and secrets for `group`.
pub fn translate(
    model: &Model,
    group: &ProxyGroup,
    options: &TranslateOptions,
) -> GatewayResources {
    let port = group.listener_port;
    let route_name = format!("http.{port}");
    let virtual_hosts = virtual_hosts(model, options);
    let https = https_listener(model, group).map(|(listener, secrets)| {
        let routes = RouteConfiguration {
            name: format!("https.{}", group.https_port),
            virtual_hosts: covered(&virtual_hosts, &listener),
            ..Default::default()
        };
        (listener, routes, secrets)
    });
    let mut out = GatewayResources {
        listeners: vec![http_listener(
            &format!("{}_{port}", group.ip),
            group.ip,
            port,
            &route_name,
            &format!("gateway_{port}"),
            Some(StripPortMode::StripAnyHostPort(true)),
        )],
        routes: vec![RouteConfiguration {
            name: route_name,
            virtual_hosts,
            ..Default::default()
        }],
        secrets: Vec::new(),
    };
    if let Some((listener, routes, secrets)) = https {
        out.listeners.push(listener);
        out.routes.push(routes);
        out.secrets = secrets;
    }
    out
}

/// Whether the TLS host `pattern` (`a.example.com` or `*.example.com`) covers `host`.
fn covers(pattern: &str, host: &str) -> bool {
    pattern == host
        || pattern.strip_prefix('*').is_some_and(|suffix| {
            suffix.starts_with('.') && host.ends_with(suffix) && host.len() > suffix.len()
        })
}

/// The virtual hosts the HTTPS listener's chains cover, and `*`.
fn covered(virtual_hosts: &[VirtualHost], listener: &Listener) -> Vec<VirtualHost> {
    let mut patterns = Vec::new();
    for chain in &listener.filter_chains {
        match chain.filter_chain_match.as_ref().map(|m| &m.server_names) {
            Some(names) if !names.is_empty() => patterns.extend(names.iter().map(String::as_str)),
            _ => return virtual_hosts.to_vec(),
        }
    }
    virtual_hosts
        .iter()
        .filter(|v| v.name == "*" || patterns.iter().any(|p| covers(p, &v.name)))
        .cloned()
        .collect()
}

/// The HTTPS listener and the secrets it names, or `None` when no TLS entry can be served.
fn https_listener(model: &Model, group: &ProxyGroup) -> Option<(Listener, Vec<Secret>)> {
    let port = group.https_port;
    let route_name = format!("https.{port}");
    let mut claimed: BTreeSet<String> = BTreeSet::new();
    let mut any_host_claimed = false;
    let mut chains = Vec::new();
    let mut secrets: BTreeMap<String, Secret> = BTreeMap::new();
    for ingress in model.ingresses.values().filter(|i| is_served(i)) {
        for (i, entry) in ingress.tls.iter().enumerate() {
            let pair = match crate::tls::resolve(model, ingress, entry) {
                Ok(pair) => pair,
                Err(error) => {
                    tracing::debug!(namespace = %ingress.namespace, ingress = %ingress.name, entry = i, %error, "TLS entry left out");
                    continue;
                }
            };
            let server_names: Vec<String> = if entry.hosts.is_empty() {
                if std::mem::replace(&mut any_host_claimed, true) {
                    continue;
                }
                Vec::new()
            } else {
                let names: Vec<String> = entry
                    .hosts
                    .iter()
                    .filter(|h| claimed.insert((*h).clone()))
                    .cloned()
                    .collect();
                if names.is_empty() {
                    continue;
                }
                names
            };
            let sds_name = pair.sds_name();
            let context = DownstreamTlsContext {
                common_tls_context: Some(CommonTlsContext {
                    tls_certificate_sds_secret_configs: vec![SdsSecretConfig {
                        name: sds_name.clone(),
                        sds_config: Some(ads()),
                    }],
                    alpn_protocols: vec!["h2".into(), "http/1.1".into()],
                    ..Default::default()
                }),
                ..Default::default()
            };
            chains.push(FilterChain {
                name: format!("{}/{}/tls[{i}]", ingress.namespace, ingress.name),
                filter_chain_match: Some(FilterChainMatch {
                    server_names,
                    ..Default::default()
                }),
                filters: vec![hcm_filter(
                    &route_name,
                    &format!("gateway_https_{port}"),
                    Some(StripPortMode::StripAnyHostPort(true)),
                )],
                transport_socket: Some(TransportSocket {
                    name: "envoy.transport_sockets.tls".into(),
                    config_type: Some(transport_socket::ConfigType::TypedConfig(to_any(&context))),
                }),
                ..Default::default()
            });
            secrets.entry(sds_name).or_insert_with(|| pair.to_envoy());
        }
    }
    if chains.is_empty() {
        return None;
    }
    let name = if port == group.listener_port {
        format!("{}_{port}_https", group.ip)
    } else {
        format!("{}_{port}", group.ip)
    };
    let listener = Listener {
        name,
        address: Some(socket_address(&group.ip.to_string(), port)),
        listener_filters: vec![ListenerFilter {
            name: "envoy.filters.listener.tls_inspector".into(),
            config_type: Some(listener_filter::ConfigType::TypedConfig(to_any(
                &TlsInspector::default(),
            ))),
            ..Default::default()
        }],
        filter_chains: chains,
        ..Default::default()
    };
    Some((listener, secrets.into_values().collect()))
}

/// The virtual hosts of every served Ingress, by host name (`*` for rules without one).
fn virtual_hosts(model: &Model, options: &TranslateOptions) -> Vec<VirtualHost> {
    let mut hosts: BTreeMap<String, Vec<PathRoute>> = BTreeMap::new();
    let mut default_backend = None;
    for ingress in model.ingresses.values().filter(|i| is_served(i)) {
        if default_backend.is_none() {
            default_backend = ingress
                .default_backend
                .as_ref()
                .map(|b| backend_action(model, &ingress.namespace, b, options));
        }
        for rule in &ingress.rules {
            let host = rule.host.clone().unwrap_or_else(|| "*".into());
            let routes = hosts.entry(host).or_default();
            for path in &rule.paths {
                // A Prefix path's trailing slash does not count (`/api/` is `/api`).
                let normalized = match path.path_type {
                    PathType::Prefix => match path.path.trim_end_matches('/') {
                        "" => "/".to_string(),
                        p => p.to_string(),
                    },
                    _ => path.path.clone(),
                };
                routes.push(PathRoute {
                    path: normalized,
                    path_type: path.path_type,
                    action: backend_action(model, &ingress.namespace, &path.backend, options),
                });
            }
        }
    }
    if default_backend.is_some() {
        hosts.entry("*".into()).or_default();
    }
    hosts
        .into_iter()
        .map(|(host, mut paths)| {
            // Longest path first; Exact before the others at equal length. The sort is
            // stable, so equal rules keep the order of the Ingresses (by namespace/name).
            paths.sort_by(|a, b| {
                b.path
                    .len()
                    .cmp(&a.path.len())
                    .then(a.path_type.cmp(&b.path_type))
            });
            let mut routes: Vec<Route> = paths
                .into_iter()
                .enumerate()
                .map(|(i, p)| route(format!("{i}"), route_match(&p.path, p.path_type), p.action))
                .collect();
            if let Some(action) = &default_backend {
                routes.push(route(
                    "default-backend".into(),
                    route_match("/", PathType::ImplementationSpecific),
                    action.clone(),
                ));
            }
            VirtualHost {
                name: host.clone(),
                domains: vec![host],
                routes,
                ..Default::default()
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Role;
    use crate::model::parse_manifests;

    const INGRESS: &str = r#"
kind: Service
metadata: {name: web, namespace: shop}
spec: {ports: [{name: http, port: 80}]}
---
kind: Service
metadata: {name: api, namespace: shop}
spec: {ports: [{name: http, port: 8080}]}
---
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {name: shop, namespace: shop}
spec:
  defaultBackend: {service: {name: web, port: {number: 80}}}
  rules:
  - host: shop.example.com
    http:
      paths:
      - {path: /, pathType: Prefix, backend: {service: {name: web, port: {name: http}}}}
      - {path: /api/, pathType: Prefix, backend: {service: {name: api, port: {number: 8080}}}}
      - {path: /api, pathType: Exact, backend: {service: {name: web, port: {number: 80}}}}
      - {path: /gone, pathType: Exact, backend: {service: {name: nope, port: {number: 80}}}}
---
kind: Ingress
metadata: {name: other-class, namespace: shop}
spec:
  ingressClassName: nginx
  rules: [{host: nginx.example.com}]
"#;

    fn group(http: u16, https: u16) -> ProxyGroup {
        ProxyGroup {
            role: Role::Router,
            ip: std::net::IpAddr::from([0, 0, 0, 0]),
            namespace: "istio-system".into(),
            listener_port: http,
            inbound_port: 15006,
            https_port: https,
        }
    }

    fn gateway() -> Result<(Listener, RouteConfiguration), crate::model::ManifestError> {
        let model = Model::build(parse_manifests(INGRESS)?);
        let mut out = translate(&model, &group(8080, 8443), &TranslateOptions::default());
        assert_eq!(out.listeners.len(), 1, "no TLS entry, no HTTPS listener");
        assert!(out.secrets.is_empty());
        match (out.listeners.pop(), out.routes.pop()) {
            (Some(l), Some(r)) => Ok((l, r)),
            _ => Err(crate::model::ManifestError::Document {
                index: 0,
                reason: "no listener".into(),
            }),
        }
    }

    fn describe(r: &Route) -> String {
        let m = match r.r#match.as_ref().and_then(|m| m.path_specifier.as_ref()) {
            Some(PathSpecifier::Path(p)) => format!("exact {p}"),
            Some(PathSpecifier::Prefix(p)) => format!("prefix {p}"),
            Some(PathSpecifier::PathSeparatedPrefix(p)) => format!("segments {p}"),
            _ => "?".into(),
        };
        let a = match &r.action {
            Some(Action::Route(RouteAction {
                cluster_specifier: Some(ClusterSpecifier::Cluster(c)),
                ..
            })) => c.clone(),
            Some(Action::DirectResponse(d)) => format!("direct {}", d.status),
            _ => "?".into(),
        };
        format!("{m} -> {a}")
    }

    #[test]
    fn ingress_rules_become_ordered_routes() -> Result<(), crate::model::ManifestError> {
        let (listener, routes) = gateway()?;
        assert_eq!(listener.name, "0.0.0.0_8080");
        assert_eq!(routes.name, "http.8080");
        let hosts: Vec<&str> = routes
            .virtual_hosts
            .iter()
            .map(|v| v.name.as_str())
            .collect();
        assert_eq!(
            hosts,
            ["*", "shop.example.com"],
            "the nginx-class Ingress is not served"
        );
        let shop: Vec<String> = routes.virtual_hosts[1]
            .routes
            .iter()
            .map(describe)
            .collect();
        assert_eq!(
            shop,
            [
                "exact /gone -> direct 503",
                "exact /api -> outbound|80||web.shop.svc.cluster.local",
                "segments /api -> outbound|8080||api.shop.svc.cluster.local",
                "prefix / -> outbound|80||web.shop.svc.cluster.local",
                "prefix / -> outbound|80||web.shop.svc.cluster.local",
            ]
        );
        let any: Vec<String> = routes.virtual_hosts[0]
            .routes
            .iter()
            .map(describe)
            .collect();
        assert_eq!(any, ["prefix / -> outbound|80||web.shop.svc.cluster.local"]);
        Ok(())
    }

    #[test]
    fn tls_entries_become_sni_chains_with_sds_secrets() -> Result<(), Box<dyn std::error::Error>> {
        let secret = crate::tls::tests::tls_secret(&["shop.example.com"], true)?;
        let tls = r#"
---
kind: Ingress
metadata: {name: tls, namespace: shop}
spec:
  tls:
  - {hosts: [shop.example.com, "*.api.example.com"], secretName: s}
  - {hosts: [shop.example.com, x.example.com], secretName: s}
  - {hosts: [gone.example.com], secretName: missing}
  rules:
  - host: a.api.example.com
    http: {paths: [{path: /, pathType: Prefix, backend: {service: {name: api, port: {number: 8080}}}}]}
"#;
        let model = Model::build(parse_manifests(&format!("{INGRESS}{tls}---\n{secret}"))?);
        let out = translate(&model, &group(0, 0), &TranslateOptions::default());
        let names: Vec<&str> = out.listeners.iter().map(|l| l.name.as_str()).collect();
        assert_eq!(names, ["0.0.0.0_0", "0.0.0.0_0_https"]);
        let https = &out.listeners[1];
        assert_eq!(
            https.listener_filters[0].name,
            "envoy.filters.listener.tls_inspector"
        );
        let server_names: Vec<&[String]> = https
            .filter_chains
            .iter()
            .filter_map(|c| {
                c.filter_chain_match
                    .as_ref()
                    .map(|m| m.server_names.as_slice())
            })
            .collect();
        assert_eq!(
            server_names,
            [
                &[
                    "shop.example.com".to_string(),
                    "*.api.example.com".to_string()
                ][..],
                &["x.example.com".to_string()][..],
            ],
            "a host claimed once; the entry with a missing secret left out"
        );
        let secrets: Vec<&str> = out.secrets.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(secrets, ["kubernetes://shop/s"]);
        let routes: Vec<&str> = out.routes.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(routes, ["http.0", "https.0"]);
        let hosts: Vec<&str> = out.routes[1]
            .virtual_hosts
            .iter()
            .map(|v| v.name.as_str())
            .collect();
        assert_eq!(hosts, ["*", "a.api.example.com", "shop.example.com"]);
        let resources = crate::translate::Resources {
            listeners: out.listeners.clone(),
            routes: out.routes.clone(),
            secrets: out.secrets.clone(),
            ..Default::default()
        };
        let mut without_secret = resources.clone();
        without_secret.secrets.clear();
        assert!(matches!(
            crate::snapshot::check_consistent(&without_secret),
            Err(crate::snapshot::SnapshotError::MissingSecret { .. })
        ));
        Ok(())
    }

    #[test]
    fn a_new_certificate_changes_only_sds() -> Result<(), Box<dyn std::error::Error>> {
        let tls = "---\nkind: Ingress\nmetadata: {name: tls, namespace: shop}\nspec:\n  tls: [{hosts: [shop.example.com], secretName: s}]\n";
        let snapshot = |previous: Option<&crate::snapshot::Snapshot>, version| {
            let secret = crate::tls::tests::tls_secret(&["shop.example.com"], true)?;
            let model = Model::build(parse_manifests(&format!("{INGRESS}{tls}---\n{secret}"))?);
            let resources = crate::translate::translate(
                &model,
                &group(8080, 8443),
                &TranslateOptions::default(),
            );
            Ok::<_, Box<dyn std::error::Error>>(crate::snapshot::Snapshot::build(
                &resources, previous, version,
            )?)
        };
        let first = snapshot(None, 1)?;
        let second = snapshot(Some(&first), 2)?;
        assert_eq!(
            second.changed_types(&first),
            [crate::snapshot::ResourceType::Secret]
        );
        Ok(())
    }
}
