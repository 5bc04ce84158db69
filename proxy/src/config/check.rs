//! The gate between Envoy's API and what Legate implements.
//!
//! Every field that is set in a configuration message is looked up here by message type and
//! field name. A field Legate implements is recursed into; a field that is safe to ignore
//! (tuning or observability with no effect on traffic) produces a warning; anything else is an
//! error naming the field's path. `Any` values are opened and checked the same way, so an
//! extension Legate does not implement is rejected with its type URL. The list of ignored
//! fields is documented in `docs/configuration.md`.
//!
//! The tables here cover the proxy's own messages. An HTTP filter's configuration is checked
//! against the table of the factory that claims its type in the [`FilterRegistry`]
//! (`FilterFactory::fields`), the same table the factory decodes with: one list per filter.
//! A `TypedStruct` (`xds.type.v3` or `udpa.type.v1`) is opened like an `Any`, and a filter
//! whose message Legate has no descriptor for (a user filter's own type) is left to its
//! factory, which validates it when it builds the filter.

use legate_filters::{FieldTable, FilterRegistry};
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
    // The compressor filter's library (an extension inside its config, not a filter).
    (
        "envoy.extensions.compression.gzip.compressor.v3.Gzip",
        &[
            "compression_level",
            "memory_level",
            "window_bits",
            "compression_strategy",
            "chunk_size",
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

/// Checks a message against the implemented-field tables (the proxy's, and the filters' of
/// `registry`). Errors and warnings are appended.
pub fn check_message(
    msg: &DynamicMessage,
    path: &str,
    registry: &FilterRegistry,
    errors: &mut Vec<Issue>,
    warnings: &mut Vec<Issue>,
) {
    Checker {
        registry,
        errors,
        warnings,
    }
    .message(msg, path, Tables::Proxy);
}

/// Which table the fields of a message are looked up in.
#[derive(Clone, Copy)]
enum Tables {
    /// The proxy's own (`SUPPORTED`, `IGNORED`).
    Proxy,
    /// A filter factory's.
    Filter(FieldTable),
}

struct Checker<'a> {
    registry: &'a FilterRegistry,
    errors: &'a mut Vec<Issue>,
    warnings: &'a mut Vec<Issue>,
}

impl Checker<'_> {
    fn message(&mut self, msg: &DynamicMessage, path: &str, tables: Tables) {
        let desc = msg.descriptor();
        let type_name = desc.full_name();
        if type_name.starts_with("google.protobuf.") && type_name != "google.protobuf.Any" {
            return;
        }
        if type_name == "google.protobuf.Any" {
            self.any(msg, path);
            return;
        }
        let (supported, ignored) = match tables {
            Tables::Proxy => (
                lookup(SUPPORTED, type_name),
                lookup(IGNORED, type_name).unwrap_or(&[]),
            ),
            Tables::Filter(t) => (lookup(t, type_name), &[][..]),
        };
        for (field, value) in msg.fields() {
            let name = field.name();
            let field_path = join(path, name);
            if supported.is_some_and(|s| s.contains(&name)) {
                self.value(value, &field_path, tables);
            } else if ignored.contains(&name) {
                self.warnings.push(Issue {
                    path: field_path,
                    message: "ignored by Legate (no effect on traffic)".into(),
                });
            } else if supported.is_none() {
                self.errors.push(Issue {
                    path: path.to_owned(),
                    message: format!("{type_name} is not supported by Legate"),
                });
                return;
            } else {
                self.errors.push(Issue {
                    path: field_path,
                    message: "field not supported by Legate".into(),
                });
            }
        }
    }

    fn value(&mut self, value: &Value, path: &str, tables: Tables) {
        match value {
            Value::Message(m) => self.message(m, path, tables),
            Value::List(items) => {
                for (i, item) in items.iter().enumerate() {
                    self.value(item, &format!("{path}[{i}]"), tables);
                }
            }
            Value::Map(map) => {
                for (k, v) in map {
                    let key = match k {
                        legate_proto::MapKey::String(s) => s.clone(),
                        other => format!("{other:?}"),
                    };
                    self.value(v, &format!("{path}[\"{key}\"]"), tables);
                }
            }
            _ => {}
        }
    }

    fn err(&mut self, path: &str, message: String) {
        self.errors.push(Issue {
            path: path.to_owned(),
            message,
        });
    }

    fn any(&mut self, msg: &DynamicMessage, path: &str) {
        let type_url = match msg.get_field_by_name("type_url").as_deref() {
            Some(Value::String(s)) => s.clone(),
            _ => String::new(),
        };
        let bytes = match msg.get_field_by_name("value").as_deref() {
            Some(Value::Bytes(b)) => b.clone(),
            _ => Default::default(),
        };
        let type_name = legate_proto::type_name_of(&type_url);
        if legate_proto::TYPED_STRUCT_TYPES.contains(&type_name) {
            self.typed_struct(type_name, &bytes, path);
            return;
        }
        let known = legate_proto::descriptor(type_name).is_ok();
        let tables = match self.registry.factory_for_message(type_name) {
            // A user filter's own message: its factory validates it.
            Some(_) if !known => return,
            Some(f) => Tables::Filter(f.fields()),
            None if lookup(SUPPORTED, type_name).is_some() => Tables::Proxy,
            None => {
                self.err(path, format!("unsupported extension type {type_url}"));
                return;
            }
        };
        match legate_proto::dynamic_from_bytes(type_name, &bytes) {
            Ok(inner) => self.message(&inner, path, tables),
            Err(e) => self.err(path, e.to_string()),
        }
    }

    /// A `TypedStruct` is accepted for a filter type the registry knows; its value is checked
    /// against the filter's table when Legate has the message's descriptor.
    fn typed_struct(&mut self, type_name: &str, bytes: &[u8], path: &str) {
        let (inner_url, json) = match legate_filters::typed_struct_json(type_name, bytes) {
            Ok(v) => v,
            Err(e) => {
                self.err(path, e.to_string());
                return;
            }
        };
        let inner_name = legate_proto::type_name_of(&inner_url);
        let Some(factory) = self.registry.factory_for_message(inner_name) else {
            self.err(
                path,
                format!("unsupported extension type {inner_url} (in a {type_name})"),
            );
            return;
        };
        if legate_proto::descriptor(inner_name).is_err() {
            return;
        }
        match legate_proto::dynamic_from_json(inner_name, &json) {
            Ok(inner) => self.message(
                &inner,
                &join(path, "value"),
                Tables::Filter(factory.fields()),
            ),
            Err(e) => self.err(&join(path, "value"), e.to_string()),
        }
    }
}

fn lookup(table: FieldTable, name: &str) -> Option<&'static [&'static str]> {
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

    /// The lines `scripts/gen-config-docs.py` writes for a table.
    fn lines(table: FieldTable) -> Vec<(String, Vec<String>)> {
        table
            .iter()
            .map(|(ty, fields)| {
                (
                    ty.to_string(),
                    fields.iter().map(|f| f.to_string()).collect(),
                )
            })
            .collect()
    }

    fn section<'a>(docs: &'a str, heading: &str) -> &'a str {
        let Some(start) = docs.find(heading) else {
            panic!("docs/configuration.md lacks {heading}")
        };
        let rest = &docs[start + heading.len()..];
        let level = heading.split(' ').next().unwrap_or("##");
        &rest[..rest.find(&format!("\n{level} ")).unwrap_or(rest.len())]
    }

    fn assert_listed(section: &str, table: FieldTable, what: &str) {
        for (ty, fields) in lines(table) {
            let line = section
                .lines()
                .find(|l| l.starts_with(&format!("- `{ty}`:")));
            let Some(line) = line else {
                panic!("docs/configuration.md does not list {ty} ({what}); run scripts/gen-config-docs.py")
            };
            for f in fields {
                assert!(
                    line.contains(&format!("`{f}`")),
                    "docs/configuration.md: {ty} lacks {f} ({what}); run scripts/gen-config-docs.py"
                );
            }
        }
    }

    /// `docs/configuration.md` must list every field Legate accepts or ignores: the proxy's
    /// tables and every built-in filter's.
    #[test]
    fn docs_list_every_table_entry() {
        let docs = include_str!("../../../docs/configuration.md");
        assert_listed(
            section(docs, "## Accepted with a warning"),
            IGNORED,
            "ignored",
        );
        let implemented = section(docs, "## Implemented");
        let proxy = &implemented[..implemented.find("\n### ").unwrap_or(implemented.len())];
        assert_listed(proxy, SUPPORTED, "implemented");
        for f in FilterRegistry::with_builtins().factories() {
            let heading = format!("#### `{}`", legate_proto::type_name_of(f.type_url()));
            assert_listed(section(implemented, &heading), f.fields(), f.type_url());
        }
    }

    /// Prints every table as JSON for `scripts/gen-config-docs.py` (run with `--ignored`).
    #[test]
    #[ignore = "used by scripts/gen-config-docs.py"]
    fn print_field_tables() {
        let table = |t: FieldTable| serde_json::to_value(lines(t)).unwrap_or_default();
        let filters: Vec<_> = FilterRegistry::with_builtins()
            .factories()
            .into_iter()
            .map(|f| {
                serde_json::json!({
                    "type": legate_proto::type_name_of(f.type_url()),
                    "per_route": f.route_config_type(),
                    "fields": table(f.fields()),
                })
            })
            .collect();
        let all = serde_json::json!({
            "ignored": table(IGNORED),
            "supported": table(SUPPORTED),
            "filters": filters,
        });
        println!("FIELD-TABLES-BEGIN\n{all}\nFIELD-TABLES-END");
    }
}
