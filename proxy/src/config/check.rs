//! The gate between Envoy's API and what Legate implements.
//!
//! Every field that is set in a configuration message is looked up here by message type and
//! field name. A field Legate implements is recursed into; a field that is safe to ignore
//! (tuning or observability with no effect on traffic) produces a warning; anything else is an
//! error naming the field's path. `Any` values are opened and checked the same way, so an
//! extension Legate does not implement is rejected with its type URL. The list of ignored
//! fields is documented in `docs/configuration.md`.

use legate_proto::{DynamicMessage, ReflectMessage, Value};

/// Fields Legate implements, per message type.
const SUPPORTED: &[(&str, &[&str])] = &[
    ("envoy.config.bootstrap.v3.Bootstrap", &["node", "static_resources", "dynamic_resources", "admin"]),
    ("envoy.config.bootstrap.v3.Bootstrap.DynamicResources", &["lds_config", "cds_config", "ads_config"]),
    ("envoy.config.core.v3.ConfigSource", &["ads", "resource_api_version", "initial_fetch_timeout"]),
    ("envoy.config.core.v3.AggregatedConfigSource", &[]),
    (
        "envoy.config.core.v3.ApiConfigSource",
        &["api_type", "transport_api_version", "grpc_services", "set_node_on_first_message_only"],
    ),
    ("envoy.config.core.v3.GrpcService", &["envoy_grpc"]),
    ("envoy.config.core.v3.GrpcService.EnvoyGrpc", &["cluster_name"]),
    ("envoy.config.cluster.v3.Cluster.EdsClusterConfig", &["eds_config", "service_name"]),
    (
        "envoy.extensions.filters.network.http_connection_manager.v3.Rds",
        &["config_source", "route_config_name"],
    ),
    ("envoy.config.bootstrap.v3.Bootstrap.StaticResources", &["listeners", "clusters", "secrets"]),
    (
        "envoy.extensions.transport_sockets.tls.v3.Secret",
        &["name", "tls_certificate", "validation_context"],
    ),
    ("envoy.extensions.transport_sockets.tls.v3.SdsSecretConfig", &["name", "sds_config"]),
    (
        "envoy.extensions.transport_sockets.tls.v3.CommonTlsContext.CombinedCertificateValidationContext",
        &["default_validation_context", "validation_context_sds_secret_config"],
    ),
    ("envoy.config.bootstrap.v3.Admin", &["address", "access_log", "access_log_path"]),
    ("envoy.config.core.v3.Node", &["id", "cluster", "metadata", "locality"]),
    ("envoy.config.core.v3.Locality", &["region", "zone", "sub_zone"]),
    ("envoy.config.core.v3.Address", &["socket_address"]),
    ("envoy.config.core.v3.SocketAddress", &["address", "port_value", "protocol", "ipv4_compat"]),
    (
        "envoy.config.listener.v3.Listener",
        &[
            "name",
            "address",
            "filter_chains",
            "listener_filters",
            "per_connection_buffer_limit_bytes",
            "default_filter_chain",
        ],
    ),
    ("envoy.config.listener.v3.ListenerFilter", &["name", "typed_config"]),
    (
        "envoy.config.listener.v3.FilterChain",
        &["filter_chain_match", "filters", "transport_socket", "name"],
    ),
    (
        "envoy.config.listener.v3.FilterChainMatch",
        &["server_names", "transport_protocol", "application_protocols"],
    ),
    ("envoy.config.listener.v3.Filter", &["name", "typed_config"]),
    ("envoy.config.core.v3.TransportSocket", &["name", "typed_config"]),
    (
        "envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector",
        &[],
    ),
    (
        "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
        &["common_tls_context", "require_client_certificate"],
    ),
    (
        "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
        &["common_tls_context", "sni", "allow_renegotiation"],
    ),
    (
        "envoy.extensions.transport_sockets.tls.v3.CommonTlsContext",
        &[
            "tls_certificates",
            "tls_certificate_sds_secret_configs",
            "validation_context",
            "validation_context_sds_secret_config",
            "combined_validation_context",
            "alpn_protocols",
            "tls_params",
        ],
    ),
    (
        "envoy.extensions.transport_sockets.tls.v3.TlsParameters",
        &["tls_minimum_protocol_version", "tls_maximum_protocol_version"],
    ),
    (
        "envoy.extensions.transport_sockets.tls.v3.TlsCertificate",
        &["certificate_chain", "private_key"],
    ),
    (
        "envoy.extensions.transport_sockets.tls.v3.CertificateValidationContext",
        &["trusted_ca", "match_typed_subject_alt_names"],
    ),
    (
        "envoy.extensions.transport_sockets.tls.v3.SubjectAltNameMatcher",
        &["san_type", "matcher"],
    ),
    ("envoy.config.core.v3.DataSource", &["filename", "inline_string", "inline_bytes"]),
    (
        "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        &[
            "codec_type",
            "stat_prefix",
            "route_config",
            "rds",
            "http_filters",
            "stream_idle_timeout",
            "request_timeout",
            "common_http_protocol_options",
            "http_protocol_options",
            "http2_protocol_options",
            "max_request_headers_kb",
            "use_remote_address",
            "xff_num_trusted_hops",
            "skip_xff_append",
            "generate_request_id",
            "always_set_request_id_in_response",
            "server_name",
            "server_header_transformation",
            "access_log",
            "upgrade_configs",
            "drain_timeout",
            "normalize_path",
            "merge_slashes",
            "strip_any_host_port",
        ],
    ),
    (
        "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager.UpgradeConfig",
        &["upgrade_type", "enabled"],
    ),
    (
        "envoy.extensions.filters.network.http_connection_manager.v3.HttpFilter",
        &["name", "typed_config", "is_optional", "disabled"],
    ),
    ("envoy.extensions.filters.http.router.v3.Router", &["suppress_envoy_headers", "dynamic_stats", "start_child_span"]),
    (
        "envoy.config.core.v3.HttpProtocolOptions",
        &["idle_timeout", "max_headers_count", "max_connection_duration", "max_stream_duration"],
    ),
    ("envoy.config.core.v3.Http1ProtocolOptions", &["accept_http_10"]),
    (
        "envoy.config.core.v3.Http2ProtocolOptions",
        &["max_concurrent_streams", "initial_stream_window_size", "initial_connection_window_size"],
    ),
    ("envoy.config.accesslog.v3.AccessLog", &["name", "typed_config"]),
    ("envoy.extensions.access_loggers.file.v3.FileAccessLog", &["path", "format", "json_format", "log_format"]),
    ("envoy.extensions.access_loggers.stream.v3.StdoutAccessLog", &["log_format"]),
    ("envoy.extensions.access_loggers.stream.v3.StderrAccessLog", &["log_format"]),
    ("envoy.config.core.v3.SubstitutionFormatString", &["text_format", "json_format", "text_format_source", "omit_empty_values", "content_type"]),
    (
        "envoy.config.route.v3.RouteConfiguration",
        &[
            "name",
            "virtual_hosts",
            "request_headers_to_add",
            "request_headers_to_remove",
            "response_headers_to_add",
            "response_headers_to_remove",
            "most_specific_header_mutations_wins",
            "validate_clusters",
        ],
    ),
    (
        "envoy.config.route.v3.VirtualHost",
        &[
            "name",
            "domains",
            "routes",
            "request_headers_to_add",
            "request_headers_to_remove",
            "response_headers_to_add",
            "response_headers_to_remove",
            "require_tls",
            "typed_per_filter_config",
        ],
    ),
    (
        "envoy.config.route.v3.Route",
        &[
            "name",
            "match",
            "route",
            "redirect",
            "direct_response",
            "request_headers_to_add",
            "request_headers_to_remove",
            "response_headers_to_add",
            "response_headers_to_remove",
            "typed_per_filter_config",
        ],
    ),
    (
        "envoy.config.route.v3.FilterConfig",
        &["config", "disabled", "is_optional"],
    ),
    (
        "envoy.config.route.v3.RouteMatch",
        &[
            "prefix",
            "path",
            "safe_regex",
            "path_separated_prefix",
            "case_sensitive",
            "headers",
            "query_parameters",
        ],
    ),
    (
        "envoy.config.route.v3.HeaderMatcher",
        &[
            "name",
            "exact_match",
            "safe_regex_match",
            "range_match",
            "present_match",
            "prefix_match",
            "suffix_match",
            "contains_match",
            "string_match",
            "invert_match",
            "treat_missing_header_as_empty",
        ],
    ),
    (
        "envoy.config.route.v3.QueryParameterMatcher",
        &["name", "string_match", "present_match"],
    ),
    (
        "envoy.type.matcher.v3.StringMatcher",
        &["exact", "prefix", "suffix", "safe_regex", "contains", "ignore_case"],
    ),
    ("envoy.type.matcher.v3.RegexMatcher", &["google_re2", "regex"]),
    ("envoy.type.matcher.v3.RegexMatcher.GoogleRE2", &[]),
    ("envoy.type.matcher.v3.RegexMatchAndSubstitute", &["pattern", "substitution"]),
    ("envoy.type.v3.Int64Range", &["start", "end"]),
    (
        "envoy.config.route.v3.RouteAction",
        &[
            "cluster",
            "cluster_header",
            "weighted_clusters",
            "prefix_rewrite",
            "regex_rewrite",
            "host_rewrite_literal",
            "auto_host_rewrite",
            "timeout",
            "hash_policy",
            "cluster_not_found_response_code",
            "upgrade_configs",
        ],
    ),
    (
        "envoy.config.route.v3.RouteAction.UpgradeConfig",
        &["upgrade_type", "enabled"],
    ),
    ("envoy.config.route.v3.WeightedCluster", &["clusters", "total_weight"]),
    ("envoy.config.route.v3.WeightedCluster.ClusterWeight", &["name", "weight", "request_headers_to_add", "request_headers_to_remove", "response_headers_to_add", "response_headers_to_remove"]),
    (
        "envoy.config.route.v3.RouteAction.HashPolicy",
        &["header", "cookie", "connection_properties", "terminal"],
    ),
    ("envoy.config.route.v3.RouteAction.HashPolicy.Header", &["header_name"]),
    ("envoy.config.route.v3.RouteAction.HashPolicy.Cookie", &["name", "ttl", "path"]),
    ("envoy.config.route.v3.RouteAction.HashPolicy.ConnectionProperties", &["source_ip"]),
    (
        "envoy.config.route.v3.RedirectAction",
        &[
            "https_redirect",
            "scheme_redirect",
            "host_redirect",
            "port_redirect",
            "path_redirect",
            "prefix_rewrite",
            "regex_rewrite",
            "response_code",
            "strip_query",
        ],
    ),
    ("envoy.config.route.v3.DirectResponseAction", &["status", "body"]),
    ("envoy.config.core.v3.HeaderValueOption", &["header", "append", "append_action", "keep_empty_value"]),
    ("envoy.config.core.v3.HeaderValue", &["key", "value"]),
    (
        "envoy.config.cluster.v3.Cluster",
        &[
            "name",
            "type",
            "eds_cluster_config",
            "connect_timeout",
            "lb_policy",
            "load_assignment",
            "transport_socket",
            "typed_extension_protocol_options",
            "dns_lookup_family",
            "dns_refresh_rate",
            "ring_hash_lb_config",
            "maglev_lb_config",
            "least_request_lb_config",
            "per_connection_buffer_limit_bytes",
            "common_lb_config",
            "respect_dns_ttl",
            "alt_stat_name",
        ],
    ),
    ("envoy.config.cluster.v3.Cluster.RingHashLbConfig", &["minimum_ring_size", "maximum_ring_size", "hash_function"]),
    ("envoy.config.cluster.v3.Cluster.MaglevLbConfig", &["table_size"]),
    ("envoy.config.cluster.v3.Cluster.LeastRequestLbConfig", &["choice_count"]),
    ("envoy.config.cluster.v3.Cluster.CommonLbConfig", &[]),
    (
        "envoy.config.endpoint.v3.ClusterLoadAssignment",
        &["cluster_name", "endpoints"],
    ),
    (
        "envoy.config.endpoint.v3.LocalityLbEndpoints",
        &["locality", "lb_endpoints", "load_balancing_weight", "priority"],
    ),
    ("envoy.config.endpoint.v3.LbEndpoint", &["endpoint", "load_balancing_weight", "health_status"]),
    ("envoy.config.endpoint.v3.Endpoint", &["address", "hostname"]),
    (
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
        &["explicit_http_config", "auto_config", "common_http_protocol_options"],
    ),
    (
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions.ExplicitHttpConfig",
        &["http_protocol_options", "http2_protocol_options"],
    ),
    (
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions.AutoHttpConfig",
        &["http_protocol_options", "http2_protocol_options"],
    ),
    // HTTP filters (legate-filters): the same lists as each filter's own table.
    (
        "envoy.extensions.filters.http.header_mutation.v3.HeaderMutation",
        &["mutations", "most_specific_header_mutations_wins"],
    ),
    (
        "envoy.extensions.filters.http.header_mutation.v3.HeaderMutationPerRoute",
        &["mutations"],
    ),
    (
        "envoy.extensions.filters.http.header_mutation.v3.Mutations",
        &["request_mutations", "response_mutations"],
    ),
    (
        "envoy.config.common.mutation_rules.v3.HeaderMutation",
        &["remove", "append", "remove_on_match"],
    ),
    (
        "envoy.config.common.mutation_rules.v3.HeaderMutation.RemoveOnMatch",
        &["key_matcher"],
    ),
    (
        "envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit",
        &[
            "stat_prefix",
            "status",
            "token_bucket",
            "filter_enabled",
            "filter_enforced",
            "request_headers_to_add_when_not_enforced",
            "response_headers_to_add",
            "enable_x_ratelimit_headers",
        ],
    ),
    ("envoy.type.v3.HttpStatus", &["code"]),
    ("envoy.type.v3.TokenBucket", &["max_tokens", "tokens_per_fill", "fill_interval"]),
    (
        "envoy.config.core.v3.RuntimeFractionalPercent",
        &["default_value", "runtime_key"],
    ),
    ("envoy.type.v3.FractionalPercent", &["numerator", "denominator"]),
    (
        "envoy.extensions.filters.http.fault.v3.HTTPFault",
        &["delay", "abort", "max_active_faults", "disable_downstream_cluster_stats"],
    ),
    (
        "envoy.extensions.filters.http.fault.v3.FaultAbort",
        &["http_status", "header_abort", "percentage", "response_body"],
    ),
    ("envoy.extensions.filters.http.fault.v3.FaultAbort.HeaderAbort", &[]),
    (
        "envoy.extensions.filters.common.fault.v3.FaultDelay",
        &["fixed_delay", "header_delay", "percentage"],
    ),
    ("envoy.extensions.filters.common.fault.v3.FaultDelay.HeaderDelay", &[]),
    ("envoy.extensions.filters.http.cors.v3.Cors", &[]),
    (
        "envoy.extensions.filters.http.health_check.v3.HealthCheck",
        &["pass_through_mode", "headers"],
    ),
    (
        "envoy.extensions.filters.http.rbac.v3.RBAC",
        &[
            "rules",
            "rules_stat_prefix",
            "shadow_rules",
            "shadow_rules_stat_prefix",
            "track_per_rule_stats",
        ],
    ),
    ("envoy.extensions.filters.http.rbac.v3.RBACPerRoute", &["rbac"]),
    ("envoy.config.rbac.v3.RBAC", &["action", "policies"]),
    ("envoy.config.rbac.v3.Policy", &["permissions", "principals"]),
    (
        "envoy.config.rbac.v3.Permission",
        &[
            "and_rules",
            "or_rules",
            "any",
            "header",
            "url_path",
            "destination_ip",
            "destination_port",
            "destination_port_range",
            "not_rule",
            "requested_server_name",
        ],
    ),
    ("envoy.config.rbac.v3.Permission.Set", &["rules"]),
    (
        "envoy.config.rbac.v3.Principal",
        &[
            "and_ids",
            "or_ids",
            "any",
            "authenticated",
            "direct_remote_ip",
            "remote_ip",
            "header",
            "url_path",
            "not_id",
        ],
    ),
    ("envoy.config.rbac.v3.Principal.Set", &["ids"]),
    ("envoy.config.rbac.v3.Principal.Authenticated", &["principal_name"]),
    ("envoy.config.core.v3.CidrRange", &["address_prefix", "prefix_len"]),
    ("envoy.type.v3.Int32Range", &["start", "end"]),
    ("envoy.type.matcher.v3.PathMatcher", &["path"]),
    (
        "envoy.extensions.filters.http.cors.v3.CorsPolicy",
        &[
            "allow_origin_string_match",
            "allow_methods",
            "allow_headers",
            "expose_headers",
            "max_age",
            "allow_credentials",
            "filter_enabled",
            "shadow_enabled",
            "allow_private_network_access",
            "forward_not_matching_preflights",
        ],
    ),
];

/// Fields accepted with a warning because they tune or observe without changing traffic.
const IGNORED: &[(&str, &[&str])] = &[
    (
        "envoy.config.bootstrap.v3.Bootstrap",
        &[
            "stats_config",
            "stats_flush_interval",
            "layered_runtime",
            "overload_manager",
            "stats_sinks",
            "watchdogs",
            "cluster_manager",
        ],
    ),
    (
        "envoy.config.listener.v3.Listener",
        &[
            "stat_prefix",
            "traffic_direction",
            "listener_filters_timeout",
            "continue_on_listener_filters_timeout",
            "tcp_backlog_size",
            "connection_balance_config",
        ],
    ),
    (
        "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        &["tracing", "stream_error_on_invalid_http_message"],
    ),
    (
        "envoy.config.cluster.v3.Cluster",
        &[
            "circuit_breakers",
            "outlier_detection",
            "upstream_connection_options",
            "track_cluster_stats",
        ],
    ),
    (
        "envoy.config.core.v3.Http2ProtocolOptions",
        &[
            "hpack_table_size",
            "max_outbound_frames",
            "connection_keepalive",
        ],
    ),
    (
        "envoy.config.core.v3.Http1ProtocolOptions",
        &["header_key_format"],
    ),
];

/// A problem found while checking or converting configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issue {
    /// Dotted path of the field (`static_resources.listeners[0].address`).
    pub path: String,
    pub message: String,
}

impl std::fmt::Display for Issue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// Checks a message against the implemented-field tables. Errors and warnings are appended.
pub fn check_message(
    msg: &DynamicMessage,
    path: &str,
    errors: &mut Vec<Issue>,
    warnings: &mut Vec<Issue>,
) {
    let desc = msg.descriptor();
    let type_name = desc.full_name();
    if type_name.starts_with("google.protobuf.") && type_name != "google.protobuf.Any" {
        return;
    }
    if type_name == "google.protobuf.Any" {
        check_any(msg, path, errors, warnings);
        return;
    }
    let supported = lookup(SUPPORTED, type_name);
    let ignored = lookup(IGNORED, type_name).unwrap_or(&[]);
    for (field, value) in msg.fields() {
        let name = field.name();
        let field_path = join(path, name);
        if supported.is_some_and(|s| s.contains(&name)) {
            check_value(value, &field_path, errors, warnings);
        } else if ignored.contains(&name) {
            warnings.push(Issue {
                path: field_path,
                message: "ignored by Legate (no effect on traffic)".into(),
            });
        } else if supported.is_none() {
            errors.push(Issue {
                path: path.to_owned(),
                message: format!("{type_name} is not supported by Legate"),
            });
            return;
        } else {
            errors.push(Issue {
                path: field_path,
                message: "field not supported by Legate".into(),
            });
        }
    }
}

fn check_value(value: &Value, path: &str, errors: &mut Vec<Issue>, warnings: &mut Vec<Issue>) {
    match value {
        Value::Message(m) => check_message(m, path, errors, warnings),
        Value::List(items) => {
            for (i, item) in items.iter().enumerate() {
                check_value(item, &format!("{path}[{i}]"), errors, warnings);
            }
        }
        Value::Map(map) => {
            for (k, v) in map {
                let key = match k {
                    legate_proto::MapKey::String(s) => s.clone(),
                    other => format!("{other:?}"),
                };
                check_value(v, &format!("{path}[\"{key}\"]"), errors, warnings);
            }
        }
        _ => {}
    }
}

fn check_any(msg: &DynamicMessage, path: &str, errors: &mut Vec<Issue>, warnings: &mut Vec<Issue>) {
    let type_url = match msg.get_field_by_name("type_url").as_deref() {
        Some(Value::String(s)) => s.clone(),
        _ => String::new(),
    };
    let bytes = match msg.get_field_by_name("value").as_deref() {
        Some(Value::Bytes(b)) => b.clone(),
        _ => Default::default(),
    };
    let type_name = legate_proto::type_name_of(&type_url);
    if lookup(SUPPORTED, type_name).is_none() {
        errors.push(Issue {
            path: path.to_owned(),
            message: format!("unsupported extension type {type_url}"),
        });
        return;
    }
    match legate_proto::dynamic_from_bytes(type_name, &bytes) {
        Ok(inner) => check_message(&inner, path, errors, warnings),
        Err(e) => errors.push(Issue {
            path: path.to_owned(),
            message: e.to_string(),
        }),
    }
}

fn lookup(
    table: &'static [(&str, &'static [&'static str])],
    name: &str,
) -> Option<&'static [&'static str]> {
    table.iter().find(|(n, _)| *n == name).map(|(_, f)| *f)
}

/// Joins a path and a field name.
pub fn join(path: &str, field: &str) -> String {
    if path.is_empty() {
        field.to_owned()
    } else {
        format!("{path}.{field}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `docs/configuration.md` must list every field Legate accepts or ignores.
    #[test]
    fn docs_list_every_table_entry() {
        let docs = include_str!("../../../docs/configuration.md");
        for (table, heading) in [
            (SUPPORTED, "## Implemented"),
            (IGNORED, "## Accepted with a warning"),
        ] {
            let Some(start) = docs.find(heading) else {
                panic!("docs lack {heading}")
            };
            let section = &docs[start + heading.len()..];
            let section = &section[..section.find("\n## ").unwrap_or(section.len())];
            for (ty, fields) in table {
                let line = section
                    .lines()
                    .find(|l| l.starts_with(&format!("- `{ty}`:")));
                let Some(line) = line else {
                    panic!("docs/configuration.md does not list {ty}")
                };
                for f in *fields {
                    assert!(
                        line.contains(&format!("`{f}`")),
                        "docs/configuration.md: {ty} lacks {f}"
                    );
                }
            }
        }
    }
}
