//! `envoy.filters.http.ext_authz`: asks an authorization service, over Envoy's gRPC
//! `envoy.service.auth.v3.Authorization/Check` API, whether a request may proceed.
//!
//! As in Envoy: the request waits for the answer ([`FilterStatus::Wait`]). `OK` continues
//! after applying `ok_response` (request headers set/added/appended/removed, response headers
//! added to the eventual response); any other status denies with the `denied_response` (status,
//! default 403; headers; body) and response flag `UAEX`. A failed call (no cluster, connection
//! failure, timeout — `grpc_service.timeout`, default 200 ms — or a non-OK gRPC status) is
//! allowed when `failure_mode_allow` (adding `x-envoy-auth-failure-mode-allowed: true` with
//! `failure_mode_allow_header_add`), else answered with `status_on_error` (default 403) and
//! `UAEX`. Counters `http.<stat_prefix>.ext_authz.[<filter stat_prefix>.]{ok,denied,error,
//! failure_mode_allowed,disabled}`. Per route, `ExtAuthzPerRoute` disables the check or sets
//! `check_settings.context_extensions`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, StatusCode};
use legate_proto::pb::envoy::config::core::v3 as corepb;
use legate_proto::pb::envoy::extensions::filters::http::ext_authz::v3 as pb;
use legate_proto::pb::envoy::service::auth::v3 as authpb;
use legate_proto::DynamicMessage;
use prost::Message as _;

use crate::api::{FilterStatus, HttpFilter, LocalReply, RequestContext, Resumption, RouteConfig};
use crate::common::{self, FieldTable};
use crate::registry::{FilterConfig, FilterError, FilterFactory};
use crate::services::{CallError, ClusterClient, Counter, GrpcCall, GrpcReply, Services};

/// Type URL of the filter's config.
pub const EXT_AUTHZ_TYPE_URL: &str =
    "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz";
const CONFIG_TYPE: &str = "envoy.extensions.filters.http.ext_authz.v3.ExtAuthz";
const PER_ROUTE_TYPE: &str = "envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute";
const CHECK_PATH: &str = "/envoy.service.auth.v3.Authorization/Check";
const DEFAULT_TIMEOUT: Duration = Duration::from_millis(200);
const FAILURE_MODE_ALLOWED: HeaderName =
    HeaderName::from_static("x-envoy-auth-failure-mode-allowed");

/// The fields this filter implements.
pub const FIELDS: FieldTable = &[
    (
        CONFIG_TYPE,
        &[
            "grpc_service",
            "transport_api_version",
            "failure_mode_allow",
            "failure_mode_allow_header_add",
            "status_on_error",
            "stat_prefix",
            "charge_cluster_response_stats",
        ],
    ),
    (
        "envoy.config.core.v3.GrpcService",
        &["envoy_grpc", "timeout", "initial_metadata"],
    ),
    (
        "envoy.config.core.v3.GrpcService.EnvoyGrpc",
        &["cluster_name", "authority"],
    ),
    ("envoy.config.core.v3.HeaderValue", &["key", "value"]),
    ("envoy.type.v3.HttpStatus", &["code"]),
    (PER_ROUTE_TYPE, &["disabled", "check_settings"]),
    (
        "envoy.extensions.filters.http.ext_authz.v3.CheckSettings",
        &["context_extensions", "disable_request_body_buffering"],
    ),
];

/// What a route says about the check.
#[derive(Debug)]
struct PerRoute {
    disabled: bool,
    context_extensions: HashMap<String, String>,
}

#[derive(Debug)]
struct Stats {
    ok: Counter,
    denied: Counter,
    error: Counter,
    failure_mode_allowed: Counter,
}

/// The compiled filter configuration, shared with the futures of its checks.
#[derive(Debug)]
struct Inner {
    name: String,
    cluster: String,
    authority: String,
    timeout: Duration,
    metadata: HeaderMap,
    failure_mode_allow: bool,
    failure_mode_allow_header_add: bool,
    status_on_error: StatusCode,
    client: Arc<dyn ClusterClient>,
    stats: Stats,
    /// Check request ids (Envoy sends its stream id).
    next_id: AtomicU64,
}

/// The filter.
#[derive(Debug)]
struct ExtAuthz(Arc<Inner>);

/// How a header from the authorization service changes a header map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    /// Add another value.
    Add,
    /// Replace any value.
    Set,
    /// Join to an existing value with `,` (the deprecated `append: true` on request headers).
    Append,
    AddIfAbsent,
    OverwriteIfExists,
}

#[derive(Debug, Clone)]
struct Mutation {
    name: HeaderName,
    value: HeaderValue,
    action: Action,
}

impl Mutation {
    /// Envoy's reading of a `HeaderValueOption` from a `CheckResponse`; invalid names or values
    /// are skipped. The deprecated `append` is still what many authorization servers send.
    #[allow(deprecated)]
    fn new(o: &corepb::HeaderValueOption, response: bool) -> Option<Self> {
        use corepb::header_value_option::HeaderAppendAction as A;
        let h = o.header.as_ref()?;
        let name = HeaderName::from_bytes(h.key.as_bytes()).ok()?;
        let value = if h.raw_value.is_empty() {
            HeaderValue::from_str(&h.value).ok()?
        } else {
            HeaderValue::from_bytes(&h.raw_value).ok()?
        };
        // Envoy 1.40 reads `append_action` only for response headers; a request header is
        // joined to an existing value with `append: true` and set otherwise.
        let action = match (o.append.as_ref().map(|b| b.value), response) {
            (Some(true), true) => Action::Add,
            (Some(true), false) => Action::Append,
            (Some(false), _) | (None, false) => Action::Set,
            (None, true) => match A::try_from(o.append_action) {
                Ok(A::AppendIfExistsOrAdd) => Action::Add,
                Ok(A::AddIfAbsent) => Action::AddIfAbsent,
                Ok(A::OverwriteIfExists) => Action::OverwriteIfExists,
                Ok(A::OverwriteIfExistsOrAdd) | Err(_) => Action::Set,
            },
        };
        Some(Mutation {
            name,
            value,
            action,
        })
    }

    fn apply(&self, headers: &mut HeaderMap) {
        let present = headers.contains_key(&self.name);
        match self.action {
            Action::Add => {
                headers.append(self.name.clone(), self.value.clone());
            }
            Action::Set => {
                headers.insert(self.name.clone(), self.value.clone());
            }
            Action::AddIfAbsent if !present => {
                headers.insert(self.name.clone(), self.value.clone());
            }
            Action::OverwriteIfExists if present => {
                headers.insert(self.name.clone(), self.value.clone());
            }
            Action::Append if present => {
                let joined = headers
                    .get_all(&self.name)
                    .iter()
                    .map(HeaderValue::as_bytes)
                    .chain(std::iter::once(self.value.as_bytes()))
                    .collect::<Vec<_>>()
                    .join(&b","[..]);
                if let Ok(v) = HeaderValue::from_bytes(&joined) {
                    headers.insert(self.name.clone(), v);
                }
            }
            Action::AddIfAbsent | Action::OverwriteIfExists | Action::Append => {}
        }
    }
}

/// Response headers an `OK` answer asked for, kept for the response phase.
#[derive(Debug)]
struct ResponseMutations(Vec<Mutation>);

/// What the authorization service decided.
enum Decision {
    Ok(Box<authpb::OkHttpResponse>),
    Denied(LocalReply),
    Error(Option<LocalReply>),
}

impl Inner {
    fn check_request(
        &self,
        ctx: &RequestContext,
        parts: &http::request::Parts,
        context_extensions: HashMap<String, String>,
    ) -> authpb::CheckRequest {
        use authpb::attribute_context::{HttpRequest, Peer, Request};
        let peer = |a: Option<std::net::SocketAddr>| Peer {
            address: a.map(|a| corepb::Address {
                address: Some(corepb::address::Address::SocketAddress(
                    corepb::SocketAddress {
                        address: a.ip().to_string(),
                        port_specifier: Some(corepb::socket_address::PortSpecifier::PortValue(
                            u32::from(a.port()),
                        )),
                        ..Default::default()
                    },
                )),
            }),
            ..Default::default()
        };
        let mut source = peer(ctx.downstream_remote);
        source.principal = ctx.peer_principals.first().cloned().unwrap_or_default();
        let host = parts
            .uri
            .authority()
            .map(|a| a.as_str().to_owned())
            .or_else(|| {
                parts
                    .headers
                    .get(http::header::HOST)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned)
            })
            .unwrap_or_default();
        let scheme = parts
            .uri
            .scheme_str()
            .unwrap_or(if ctx.downstream_tls { "https" } else { "http" })
            .to_owned();
        let path = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str().to_owned())
            .unwrap_or_else(|| "/".into());
        let mut headers: HashMap<String, String> = HashMap::new();
        headers.insert(":authority".into(), host.clone());
        headers.insert(":method".into(), parts.method.as_str().to_owned());
        headers.insert(":path".into(), path.clone());
        headers.insert(":scheme".into(), scheme.clone());
        for (k, v) in &parts.headers {
            if k == http::header::HOST {
                continue;
            }
            let v = String::from_utf8_lossy(v.as_bytes());
            headers
                .entry(k.as_str().to_owned())
                .and_modify(|prev| {
                    prev.push(',');
                    prev.push_str(&v);
                })
                .or_insert_with(|| v.into_owned());
        }
        let size = parts
            .headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<i64>().ok())
            .unwrap_or(0);
        let protocol = match parts.version {
            http::Version::HTTP_10 => "HTTP/1.0",
            http::Version::HTTP_2 => "HTTP/2",
            http::Version::HTTP_3 => "HTTP/3",
            _ => "HTTP/1.1",
        };
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        authpb::CheckRequest {
            attributes: Some(authpb::AttributeContext {
                source: Some(source),
                destination: Some(peer(ctx.downstream_local)),
                request: Some(Request {
                    time: Some(legate_proto::pb::google::protobuf::Timestamp {
                        seconds: i64::try_from(now.as_secs()).unwrap_or(i64::MAX),
                        nanos: i32::try_from(now.subsec_nanos()).unwrap_or(0),
                    }),
                    http: Some(HttpRequest {
                        id: self.next_id.fetch_add(1, Ordering::Relaxed).to_string(),
                        method: parts.method.as_str().to_owned(),
                        headers,
                        path,
                        host,
                        scheme,
                        size,
                        protocol: protocol.to_owned(),
                        ..Default::default()
                    }),
                }),
                context_extensions,
                ..Default::default()
            }),
        }
    }

    fn decide(&self, result: Result<GrpcReply, CallError>) -> Decision {
        use authpb::check_response::HttpResponse as H;
        let bytes = match result {
            Ok(GrpcReply::Ok(bytes)) => bytes,
            // A failed call is visible in the `error` counter and in the reply.
            Ok(GrpcReply::Status { .. }) | Err(_) => return Decision::Error(None),
        };
        let Ok(resp) = authpb::CheckResponse::decode(bytes) else {
            return Decision::Error(None);
        };
        let code = resp.status.as_ref().map_or(0, |s| s.code);
        let reply = |status: Option<StatusCode>, headers: &[corepb::HeaderValueOption], body| {
            let mut r = LocalReply::new(status.unwrap_or(StatusCode::FORBIDDEN), body);
            for m in headers.iter().filter_map(|h| Mutation::new(h, true)) {
                r.headers.append(m.name, m.value);
            }
            r.response_flag = Some("UAEX");
            r
        };
        let status_of = |s: Option<&legate_proto::pb::envoy::r#type::v3::HttpStatus>| {
            s.and_then(|s| u16::try_from(s.code).ok())
                .filter(|c| *c > 0)
                .and_then(|c| StatusCode::from_u16(c).ok())
        };
        match (code, resp.http_response) {
            (0, Some(H::OkResponse(ok))) => Decision::Ok(Box::new(ok)),
            (0, _) => Decision::Ok(Box::default()),
            (_, Some(H::ErrorResponse(e))) => Decision::Error(Some(reply(
                status_of(e.status.as_ref()).or(Some(self.status_on_error)),
                &e.headers,
                e.body,
            ))),
            (_, Some(H::DeniedResponse(d))) => {
                Decision::Denied(reply(status_of(d.status.as_ref()), &d.headers, d.body))
            }
            (_, _) => Decision::Denied(reply(None, &[], String::new())),
        }
    }

    fn resume(&self, decision: Decision) -> Resumption {
        match decision {
            Decision::Ok(ok) => {
                self.stats.ok.inc();
                let name = self.name.clone();
                Resumption::Apply(Box::new(move |ctx, parts| {
                    for m in ok.headers.iter().filter_map(|h| Mutation::new(h, false)) {
                        m.apply(&mut parts.headers);
                    }
                    for h in &ok.headers_to_remove {
                        // Pseudo-headers and Host cannot be removed (Envoy refuses too).
                        if h.starts_with(':') || h.eq_ignore_ascii_case("host") {
                            continue;
                        }
                        parts.headers.remove(h.as_str());
                    }
                    let response: Vec<Mutation> = ok
                        .response_headers_to_add
                        .iter()
                        .filter_map(|h| Mutation::new(h, true))
                        .collect();
                    if !response.is_empty() {
                        ctx.filter_data.insert(&name, ResponseMutations(response));
                    }
                }))
            }
            Decision::Denied(r) => {
                self.stats.denied.inc();
                Resumption::LocalReply(r)
            }
            Decision::Error(reply) => {
                self.stats.error.inc();
                if self.failure_mode_allow {
                    self.stats.failure_mode_allowed.inc();
                    let mut set_headers = HeaderMap::new();
                    if self.failure_mode_allow_header_add {
                        set_headers.insert(FAILURE_MODE_ALLOWED, HeaderValue::from_static("true"));
                    }
                    Resumption::Continue { set_headers }
                } else {
                    Resumption::LocalReply(reply.unwrap_or_else(|| {
                        let mut r = LocalReply::new(self.status_on_error, bytes::Bytes::new());
                        r.response_flag = Some("UAEX");
                        r
                    }))
                }
            }
        }
    }
}

impl HttpFilter for ExtAuthz {
    fn on_request_headers(
        &self,
        ctx: &mut RequestContext,
        parts: &mut http::request::Parts,
    ) -> FilterStatus {
        let per_route = ctx.route_config::<PerRoute>();
        if per_route.is_some_and(|p| p.disabled) {
            return FilterStatus::Continue;
        }
        let extensions = per_route
            .map(|p| p.context_extensions.clone())
            .unwrap_or_default();
        let inner = self.0.clone();
        let check = inner.check_request(ctx, parts, extensions);
        let call = GrpcCall {
            cluster: inner.cluster.clone(),
            path: CHECK_PATH.to_owned(),
            authority: inner.authority.clone(),
            message: check.encode_to_vec().into(),
            metadata: inner.metadata.clone(),
            timeout: inner.timeout,
        };
        let reply = inner.client.grpc_unary(call);
        FilterStatus::Wait(Box::pin(async move {
            let decision = inner.decide(reply.await);
            inner.resume(decision)
        }))
    }

    fn on_response_headers(
        &self,
        ctx: &mut RequestContext,
        parts: &mut http::response::Parts,
    ) -> FilterStatus {
        if let Some(ResponseMutations(ms)) = ctx.filter_data.get::<ResponseMutations>(&self.0.name)
        {
            for m in ms {
                m.apply(&mut parts.headers);
            }
        }
        FilterStatus::Continue
    }
}

/// Factory of `envoy.filters.http.ext_authz`.
#[derive(Debug)]
pub struct ExtAuthzFactory;

impl ExtAuthzFactory {
    fn build(
        &self,
        name: &str,
        config: &DynamicMessage,
        services: &Services,
    ) -> Result<ExtAuthz, FilterError> {
        let c: pb::ExtAuthz = common::decode(config, FIELDS)?;
        if c.transport_api_version == 1 {
            return Err(common::invalid(
                "transport_api_version",
                "only V3 is supported",
            ));
        }
        let Some(pb::ext_authz::Services::GrpcService(g)) = &c.services else {
            return Err(common::invalid(
                "grpc_service",
                "a grpc_service with envoy_grpc is required (http_service is not supported)",
            ));
        };
        let Some(corepb::grpc_service::TargetSpecifier::EnvoyGrpc(target)) = &g.target_specifier
        else {
            return Err(common::invalid(
                "grpc_service",
                "only envoy_grpc is supported",
            ));
        };
        if target.cluster_name.is_empty() {
            return Err(common::invalid(
                "grpc_service.envoy_grpc.cluster_name",
                "required",
            ));
        }
        let timeout = match &g.timeout {
            Some(d) => common::duration(d)
                .ok_or_else(|| common::invalid("grpc_service.timeout", "must not be negative"))?,
            None => DEFAULT_TIMEOUT,
        };
        let mut metadata = HeaderMap::new();
        for (i, h) in g.initial_metadata.iter().enumerate() {
            let path = format!("grpc_service.initial_metadata[{i}]");
            let k = HeaderName::from_bytes(h.key.as_bytes())
                .map_err(|_| common::invalid(&path, format!("invalid header name {:?}", h.key)))?;
            let v = HeaderValue::from_str(&h.value)
                .map_err(|_| common::invalid(&path, "invalid header value"))?;
            metadata.append(k, v);
        }
        // Envoy keeps a configured code only when it is a valid HTTP status; else 403.
        let status_on_error = c
            .status_on_error
            .as_ref()
            .and_then(|s| u16::try_from(s.code).ok())
            .filter(|c| (100..=511).contains(c))
            .and_then(|c| StatusCode::from_u16(c).ok())
            .unwrap_or(StatusCode::FORBIDDEN);
        let scope = if c.stat_prefix.is_empty() {
            services.stats.scope("ext_authz.")
        } else {
            services
                .stats
                .scope(&format!("ext_authz.{}.", c.stat_prefix))
        };
        // Created now so that they show (at zero) before the first request, as Envoy's do.
        scope.counter("disabled");
        let stats = Stats {
            ok: scope.counter("ok"),
            denied: scope.counter("denied"),
            error: scope.counter("error"),
            failure_mode_allowed: scope.counter("failure_mode_allowed"),
        };
        Ok(ExtAuthz(Arc::new(Inner {
            name: name.to_owned(),
            cluster: target.cluster_name.clone(),
            authority: if target.authority.is_empty() {
                target.cluster_name.clone()
            } else {
                target.authority.clone()
            },
            timeout,
            metadata,
            failure_mode_allow: c.failure_mode_allow,
            failure_mode_allow_header_add: c.failure_mode_allow_header_add,
            status_on_error,
            client: services.clusters.clone(),
            stats,
            next_id: AtomicU64::new(0),
        })))
    }
}

impl FilterFactory for ExtAuthzFactory {
    fn type_url(&self) -> &'static str {
        EXT_AUTHZ_TYPE_URL
    }

    fn fields(&self) -> FieldTable {
        FIELDS
    }

    fn create(&self, name: &str, config: &DynamicMessage) -> Result<FilterConfig, FilterError> {
        self.create_with_services(name, config, &Services::unavailable())
    }

    fn create_with_services(
        &self,
        name: &str,
        config: &DynamicMessage,
        services: &Services,
    ) -> Result<FilterConfig, FilterError> {
        let filter = self.build(name, config, services)?;
        Ok(FilterConfig::Filter {
            name: name.to_owned(),
            filter: Arc::new(filter),
        })
    }

    fn route_config_type(&self) -> Option<&'static str> {
        Some(PER_ROUTE_TYPE)
    }

    fn create_route_config(&self, config: &DynamicMessage) -> Result<RouteConfig, FilterError> {
        use pb::ext_authz_per_route::Override as O;
        let c: pb::ExtAuthzPerRoute = common::decode(config, FIELDS)?;
        let per_route = match c.r#override {
            Some(O::Disabled(disabled)) => PerRoute {
                disabled,
                context_extensions: HashMap::new(),
            },
            Some(O::CheckSettings(s)) => PerRoute {
                disabled: false,
                context_extensions: s.context_extensions,
            },
            None => {
                return Err(common::invalid(
                    "typed_per_filter_config",
                    "disabled or check_settings is required",
                ))
            }
        };
        Ok(Arc::new(per_route))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[allow(deprecated)]
    fn mutation(
        key: &str,
        value: &str,
        append: Option<bool>,
        action: i32,
    ) -> corepb::HeaderValueOption {
        corepb::HeaderValueOption {
            header: Some(corepb::HeaderValue {
                key: key.into(),
                value: value.into(),
                ..Default::default()
            }),
            append: append.map(|value| legate_proto::pb::google::protobuf::BoolValue { value }),
            append_action: action,
            ..Default::default()
        }
    }

    #[test]
    fn mutations_follow_envoy_actions() {
        let mut h = HeaderMap::new();
        h.insert("a", HeaderValue::from_static("1"));
        h.insert("b", HeaderValue::from_static("1"));
        for (k, v, append, action, response) in [
            ("a", "2", None, 0, false),       // request, no append: set
            ("b", "2", Some(true), 0, false), // request, append: joined
            ("e", "2", Some(true), 0, false), // request, append to nothing: nothing
            ("c", "3", None, 0, true),        // response, APPEND_IF_EXISTS_OR_ADD: added
            ("c", "4", Some(true), 0, true),  // response, append: another value
            ("d", "4", None, 3, true),        // OVERWRITE_IF_EXISTS: absent, nothing
            ("a", "5", None, 1, true),        // ADD_IF_ABSENT: present, nothing
        ] {
            if let Some(m) = Mutation::new(&mutation(k, v, append, action), response) {
                m.apply(&mut h);
            }
        }
        let all = |k: &str| {
            h.get_all(k)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .collect::<Vec<_>>()
        };
        assert_eq!(all("a"), ["2"]);
        assert_eq!(all("b"), ["1,2"]);
        assert_eq!(all("c"), ["3", "4"]);
        assert!(all("d").is_empty());
        assert!(all("e").is_empty());
    }

    #[test]
    fn unsupported_field_is_named() {
        let json = serde_json::json!({
            "grpc_service": {"envoy_grpc": {"cluster_name": "authz"}},
            "with_request_body": {"max_request_bytes": 10}
        });
        let msg = legate_proto::dynamic_from_json(CONFIG_TYPE, &json);
        let Ok(msg) = msg else {
            panic!("decode: {msg:?}")
        };
        let err = ExtAuthzFactory
            .create("authz", &msg)
            .err()
            .map(|e| e.to_string());
        assert_eq!(
            err.as_deref(),
            Some("with_request_body: field not supported by Legate")
        );
    }
}
