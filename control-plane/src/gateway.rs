//! The ingress gateway (`router` role): one HTTP listener routed by `Ingress` resources.
//!
//! Names follow Istio's gateways: listener `IP_PORT` (`0.0.0.0_8080`), route configuration
//! `http.PORT`. Ingresses without `ingressClassName` or with class `legate` are served.
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
//! The host's port is stripped before matching (`strip_any_host_port`). TLS (`spec.tls`,
//! secrets over SDS) is not implemented yet: such Ingresses are served over HTTP only.

use std::collections::BTreeMap;

use legate_proto::pb::envoy::config::listener::v3::Listener;
use legate_proto::pb::envoy::config::route::v3::{
    route::Action, route_action::ClusterSpecifier, route_match::PathSpecifier,
    DirectResponseAction, Route, RouteAction, RouteConfiguration, RouteMatch, VirtualHost,
};
use legate_proto::pb::envoy::extensions::filters::network::http_connection_manager::v3::http_connection_manager::StripPortMode;
use legate_proto::pb::google::protobuf::Duration;

use crate::identity::ProxyGroup;
use crate::model::{BackendPort, Ingress, IngressBackend, Model, PathType};
use crate::translate::{cluster_name, fqdn, http_listener, TranslateOptions};

/// The ingress class Legate serves (besides Ingresses without a class).
pub const INGRESS_CLASS: &str = "legate";

/// One route before ordering.
struct PathRoute {
    path: String,
    path_type: PathType,
    action: Action,
}

fn is_served(ingress: &Ingress) -> bool {
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

/// The gateway's listener and route configuration for `group`.
pub fn translate(
    model: &Model,
    group: &ProxyGroup,
    options: &TranslateOptions,
) -> (Listener, RouteConfiguration) {
    let port = group.listener_port;
    let route_name = format!("http.{port}");
    let mut hosts: BTreeMap<String, Vec<PathRoute>> = BTreeMap::new();
    let mut default_backend = None;
    for ingress in model.ingresses.values().filter(|i| is_served(i)) {
        if ingress.has_tls {
            tracing::warn!(namespace = %ingress.namespace, ingress = %ingress.name, "spec.tls is not implemented yet; serving HTTP only");
        }
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
    let virtual_hosts = hosts
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
        .collect();
    let listener = http_listener(
        &format!("{}_{port}", group.ip),
        group.ip,
        port,
        &route_name,
        &format!("gateway_{port}"),
        Some(StripPortMode::StripAnyHostPort(true)),
    );
    let routes = RouteConfiguration {
        name: route_name,
        virtual_hosts,
        ..Default::default()
    };
    (listener, routes)
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

    fn gateway() -> Result<(Listener, RouteConfiguration), crate::model::ManifestError> {
        let model = Model::build(parse_manifests(INGRESS)?);
        let group = ProxyGroup {
            role: Role::Router,
            ip: std::net::IpAddr::from([0, 0, 0, 0]),
            namespace: "istio-system".into(),
            listener_port: 8080,
            inbound_port: 15006,
        };
        Ok(translate(&model, &group, &TranslateOptions::default()))
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
}
