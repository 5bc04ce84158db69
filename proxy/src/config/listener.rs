//! `Listener` (with its filter chains, TLS and HTTP connection manager) → [`ListenerConfig`].

use std::sync::Arc;

use http::header::HeaderValue;
use legate_filters::{FilterConfig, RouterConfig};
use legate_proto::pb::envoy::config::core::v3 as core;
use legate_proto::pb::envoy::config::listener::v3 as lis;
use legate_proto::pb::envoy::extensions::filters::network::http_connection_manager::v3 as hcmpb;
use legate_proto::pb::envoy::extensions::transport_sockets::tls::v3 as tlspb;
use legate_proto::pb::google::protobuf::Any;
use prost::Message;

use super::{duration, socket_address, Ctx};
use crate::accesslog::{AccessLog, Format, LogFormat, DEFAULT_FORMAT};
use crate::hcm::{Codec, HcmConfig, HcmFilter, Routes, ServerHeader};
use crate::listener::{ChainMatch, DownstreamTls, FilterChain, ListenerConfig};
use crate::tls::{SanMatcher, SanType, ServerTlsSpec};

const HCM_TYPE: &str =
    "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";
const TLS_INSPECTOR_TYPE: &str = "envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector";
const DOWNSTREAM_TLS_TYPE: &str = "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext";

pub(crate) fn decode<T: Message + Default>(
    cx: &mut Ctx<'_>,
    any: &Any,
    want: &str,
    path: &str,
) -> Option<T> {
    let got = legate_proto::type_name_of(&any.type_url);
    if got != want {
        cx.err(path, format!("expected {want}, got {}", any.type_url));
        return None;
    }
    match T::decode(any.value.as_slice()) {
        Ok(m) => Some(m),
        Err(e) => {
            cx.err(path, format!("cannot decode {want}: {e}"));
            None
        }
    }
}

pub(crate) fn listener(cx: &mut Ctx<'_>, l: &lis::Listener, path: &str) -> Option<ListenerConfig> {
    let address = socket_address(cx, l.address.as_ref(), &format!("{path}.address"))?;
    let mut tls_inspector = false;
    for (i, f) in l.listener_filters.iter().enumerate() {
        let p = format!("{path}.listener_filters[{i}]");
        match &f.config_type {
            Some(lis::listener_filter::ConfigType::TypedConfig(any))
                if legate_proto::type_name_of(&any.type_url) == TLS_INSPECTOR_TYPE =>
            {
                tls_inspector = true
            }
            _ => cx.err(
                &p,
                "only envoy.filters.listener.tls_inspector (with typed_config) is supported",
            ),
        }
    }
    if l.filter_chains.is_empty() && l.default_filter_chain.is_none() {
        cx.err(
            &format!("{path}.filter_chains"),
            "at least one filter chain is required",
        );
    }
    let chains: Vec<Arc<FilterChain>> = l
        .filter_chains
        .iter()
        .enumerate()
        .filter_map(|(i, c)| {
            filter_chain(cx, c, &format!("{path}.filter_chains[{i}]")).map(Arc::new)
        })
        .collect();
    let default_chain = l
        .default_filter_chain
        .as_ref()
        .and_then(|c| filter_chain(cx, c, &format!("{path}.default_filter_chain")).map(Arc::new));
    Some(ListenerConfig {
        name: if l.name.is_empty() {
            address.to_string()
        } else {
            l.name.clone()
        },
        address,
        chains,
        default_chain,
        tls_inspector,
        buffer_limit: l.per_connection_buffer_limit_bytes.map(|v| v.value),
    })
}

fn filter_chain(cx: &mut Ctx<'_>, c: &lis::FilterChain, path: &str) -> Option<FilterChain> {
    let matcher = match &c.filter_chain_match {
        Some(m) => ChainMatch {
            server_names: m
                .server_names
                .iter()
                .map(|s| s.to_ascii_lowercase())
                .collect(),
            transport_protocol: Some(m.transport_protocol.clone()).filter(|t| !t.is_empty()),
            application_protocols: m.application_protocols.clone(),
        },
        None => ChainMatch::default(),
    };
    let tls = match &c.transport_socket {
        Some(ts) => downstream_tls(cx, ts, &format!("{path}.transport_socket")),
        None => None,
    };
    if c.filters.len() != 1 {
        cx.err(&format!("{path}.filters"), "exactly one network filter (envoy.filters.network.http_connection_manager) is supported");
        return None;
    }
    let fp = format!("{path}.filters[0]");
    let Some(lis::filter::ConfigType::TypedConfig(any)) = &c.filters[0].config_type else {
        cx.err(&fp, "typed_config is required");
        return None;
    };
    let hcm: hcmpb::HttpConnectionManager =
        decode(cx, any, HCM_TYPE, &format!("{fp}.typed_config"))?;
    let hcm = http_connection_manager(cx, &hcm, &format!("{fp}.typed_config"))?;
    Some(FilterChain {
        name: c.name.clone(),
        matcher,
        tls,
        hcm: Arc::new(hcm),
    })
}

fn san_matchers(
    cx: &mut Ctx<'_>,
    v: &tlspb::CertificateValidationContext,
    path: &str,
) -> Vec<SanMatcher> {
    let mut out = Vec::new();
    for (i, m) in v.match_typed_subject_alt_names.iter().enumerate() {
        let p = format!("{path}.match_typed_subject_alt_names[{i}]");
        let san_type = match m.san_type {
            1 => SanType::Email,
            2 => SanType::Dns,
            3 => SanType::Uri,
            4 => SanType::IpAddress,
            _ => {
                cx.err(
                    &format!("{p}.san_type"),
                    "one of DNS, EMAIL, URI or IP_ADDRESS is required",
                );
                continue;
            }
        };
        let Some(sm) = &m.matcher else {
            cx.err(&format!("{p}.matcher"), "required");
            continue;
        };
        if let Some(matcher) = super::route::string_matcher(cx, sm, &format!("{p}.matcher")) {
            out.push(SanMatcher { san_type, matcher });
        }
    }
    out
}

/// The secret an `SdsSecretConfig` names, if it has arrived. A name without `sds_config`
/// refers to `static_resources.secrets`; with one, to SDS over ADS.
fn sds_secret(cx: &mut Ctx<'_>, sds: &tlspb::SdsSecretConfig, path: &str) -> Option<tlspb::Secret> {
    if sds.name.is_empty() {
        cx.err(&format!("{path}.name"), "required");
        return None;
    }
    if sds.sds_config.is_some() {
        super::dynamic::ads_source(cx, sds.sds_config.as_ref(), &format!("{path}.sds_config"));
        cx.sds_refs.push(sds.name.clone());
    }
    match cx.secrets.get(&sds.name) {
        Some(s) => Some(s.clone()),
        None => {
            cx.missing_secrets.push(sds.name.clone());
            None
        }
    }
}

/// A validation context's trusted CA and SAN matchers.
fn validation_context(
    cx: &mut Ctx<'_>,
    v: &tlspb::CertificateValidationContext,
    path: &str,
) -> (Option<Vec<u8>>, Vec<SanMatcher>) {
    let ca = v
        .trusted_ca
        .as_ref()
        .and_then(|ds| cx.data_source(ds, &format!("{path}.trusted_ca")));
    let sans = san_matchers(cx, v, path);
    (ca, sans)
}

/// The validation context a secret holds.
fn secret_validation(
    cx: &mut Ctx<'_>,
    sds: &tlspb::SdsSecretConfig,
    path: &str,
) -> Option<(Option<Vec<u8>>, Vec<SanMatcher>)> {
    use tlspb::secret::Type as T;
    match sds_secret(cx, sds, path)?.r#type {
        Some(T::ValidationContext(v)) => Some(validation_context(
            cx,
            &v,
            &format!("secret '{}'.validation_context", sds.name),
        )),
        _ => {
            cx.err(
                path,
                format!("secret '{}' is not a validation context", sds.name),
            );
            None
        }
    }
}

/// The validation context of a common TLS context, if any: inline, from a secret, or both
/// combined (the secret's CA and SAN matchers added to the inline ones).
pub(crate) fn validation(
    cx: &mut Ctx<'_>,
    common: &tlspb::CommonTlsContext,
    path: &str,
) -> (Option<Vec<u8>>, Vec<SanMatcher>) {
    use tlspb::common_tls_context::ValidationContextType as V;
    match &common.validation_context_type {
        Some(V::ValidationContext(v)) => {
            validation_context(cx, v, &format!("{path}.validation_context"))
        }
        Some(V::ValidationContextSdsSecretConfig(sds)) => secret_validation(
            cx,
            sds,
            &format!("{path}.validation_context_sds_secret_config"),
        )
        .unwrap_or_default(),
        Some(V::CombinedValidationContext(c)) => {
            let p = format!("{path}.combined_validation_context");
            let (mut ca, mut sans) = match &c.default_validation_context {
                Some(v) => validation_context(cx, v, &format!("{p}.default_validation_context")),
                None => (None, Vec::new()),
            };
            if let Some(sds) = &c.validation_context_sds_secret_config {
                if let Some((sca, ssans)) = secret_validation(
                    cx,
                    sds,
                    &format!("{p}.validation_context_sds_secret_config"),
                ) {
                    ca = sca.or(ca);
                    sans.extend(ssans);
                }
            }
            (ca, sans)
        }
        Some(_) => {
            cx.err(
                &format!("{path}.validation_context_type"),
                "only validation_context, validation_context_sds_secret_config and combined_validation_context are supported",
            );
            (None, Vec::new())
        }
        None => (None, Vec::new()),
    }
}

fn tls_certificate(
    cx: &mut Ctx<'_>,
    c: &tlspb::TlsCertificate,
    p: &str,
) -> Option<(Vec<u8>, Vec<u8>)> {
    let chain = c
        .certificate_chain
        .as_ref()
        .and_then(|d| cx.data_source(d, &format!("{p}.certificate_chain")));
    let key = c
        .private_key
        .as_ref()
        .and_then(|d| cx.data_source(d, &format!("{p}.private_key")));
    match (chain, key) {
        (Some(c), Some(k)) => Some((c, k)),
        _ => {
            cx.err(p, "certificate_chain and private_key are required");
            None
        }
    }
}

/// The certificate of a common TLS context: inline, or from a secret. `None` without one
/// (or while its secret has not arrived: see `Ctx::missing_secrets`).
pub(crate) fn certificate(
    cx: &mut Ctx<'_>,
    common: &tlspb::CommonTlsContext,
    path: &str,
) -> Option<(Vec<u8>, Vec<u8>)> {
    match (
        common.tls_certificates.as_slice(),
        common.tls_certificate_sds_secret_configs.as_slice(),
    ) {
        ([], []) => None,
        ([c], _) => tls_certificate(cx, c, &format!("{path}.tls_certificates[0]")),
        ([], [sds]) => {
            let p = format!("{path}.tls_certificate_sds_secret_configs[0]");
            use tlspb::secret::Type as T;
            match sds_secret(cx, sds, &p)?.r#type {
                Some(T::TlsCertificate(c)) => {
                    tls_certificate(cx, &c, &format!("secret '{}'.tls_certificate", sds.name))
                }
                _ => {
                    cx.err(
                        &p,
                        format!("secret '{}' is not a TLS certificate", sds.name),
                    );
                    None
                }
            }
        }
        _ => {
            cx.err(
                &format!("{path}.tls_certificates"),
                "only one certificate is supported",
            );
            None
        }
    }
}

fn downstream_tls(
    cx: &mut Ctx<'_>,
    ts: &core::TransportSocket,
    path: &str,
) -> Option<DownstreamTls> {
    let Some(core::transport_socket::ConfigType::TypedConfig(any)) = &ts.config_type else {
        cx.err(path, "typed_config is required");
        return None;
    };
    let p = format!("{path}.typed_config");
    let ctx: tlspb::DownstreamTlsContext = decode(cx, any, DOWNSTREAM_TLS_TYPE, &p)?;
    let common = ctx.common_tls_context.unwrap_or_default();
    let cp = format!("{p}.common_tls_context");
    let Some((cert_chain, private_key)) = certificate(cx, &common, &cp) else {
        if !cx.missing_secrets.is_empty() {
            return None;
        }
        cx.err(
            &format!("{cp}.tls_certificates"),
            "a server certificate is required",
        );
        return None;
    };
    let (trusted_ca, san_matchers) = validation(cx, &common, &cp);
    let spec = ServerTlsSpec {
        cert_chain,
        private_key,
        alpn: common
            .alpn_protocols
            .iter()
            .map(|a| a.as_bytes().to_vec())
            .collect(),
        trusted_ca,
        require_client_certificate: ctx.require_client_certificate.is_some_and(|v| v.value),
    };
    match crate::tls::server_config(&spec) {
        Ok(config) => Some(DownstreamTls {
            config,
            san_matchers,
        }),
        Err(e) => {
            cx.err(&p, e.to_string());
            None
        }
    }
}

fn access_logs(
    cx: &mut Ctx<'_>,
    logs: &[legate_proto::pb::envoy::config::accesslog::v3::AccessLog],
    path: &str,
) -> Vec<AccessLog> {
    use legate_proto::pb::envoy::config::accesslog::v3::access_log::ConfigType;
    use legate_proto::pb::envoy::extensions::access_loggers::file::v3 as file;
    use legate_proto::pb::envoy::extensions::access_loggers::stream::v3 as stream;
    let mut out = Vec::new();
    for (i, l) in logs.iter().enumerate() {
        let p = format!("{path}[{i}].typed_config");
        let Some(ConfigType::TypedConfig(any)) = &l.config_type else {
            cx.err(&format!("{path}[{i}]"), "typed_config is required");
            continue;
        };
        let (file_path, fmt) = match legate_proto::type_name_of(&any.type_url) {
            "envoy.extensions.access_loggers.file.v3.FileAccessLog" => {
                let Some(f) = decode::<file::FileAccessLog>(
                    cx,
                    any,
                    "envoy.extensions.access_loggers.file.v3.FileAccessLog",
                    &p,
                ) else {
                    continue;
                };
                #[allow(deprecated)]
                let fmt = match f.access_log_format {
                    None => None,
                    Some(file::file_access_log::AccessLogFormat::Format(s)) => Some(Ok(s)),
                    Some(file::file_access_log::AccessLogFormat::JsonFormat(j)) => Some(Err(j)),
                    Some(file::file_access_log::AccessLogFormat::LogFormat(sfs)) => {
                        substitution_format(cx, sfs, &format!("{p}.log_format"))
                    }
                    Some(_) => {
                        cx.err(&p, "only format, json_format and log_format are supported");
                        continue;
                    }
                };
                (f.path, fmt)
            }
            "envoy.extensions.access_loggers.stream.v3.StdoutAccessLog" => {
                let Some(f) = decode::<stream::StdoutAccessLog>(
                    cx,
                    any,
                    "envoy.extensions.access_loggers.stream.v3.StdoutAccessLog",
                    &p,
                ) else {
                    continue;
                };
                let fmt = match f.access_log_format {
                    Some(stream::stdout_access_log::AccessLogFormat::LogFormat(sfs)) => {
                        substitution_format(cx, sfs, &format!("{p}.log_format"))
                    }
                    None => None,
                };
                ("/dev/stdout".to_owned(), fmt)
            }
            "envoy.extensions.access_loggers.stream.v3.StderrAccessLog" => {
                let Some(f) = decode::<stream::StderrAccessLog>(
                    cx,
                    any,
                    "envoy.extensions.access_loggers.stream.v3.StderrAccessLog",
                    &p,
                ) else {
                    continue;
                };
                let fmt = match f.access_log_format {
                    Some(stream::stderr_access_log::AccessLogFormat::LogFormat(sfs)) => {
                        substitution_format(cx, sfs, &format!("{p}.log_format"))
                    }
                    None => None,
                };
                ("/dev/stderr".to_owned(), fmt)
            }
            other => {
                cx.err(&p, format!("unsupported access logger {other}"));
                continue;
            }
        };
        let format = match fmt {
            None => Format::parse(DEFAULT_FORMAT).map(LogFormat::Text),
            Some(Ok(text)) => Format::parse(&text).map(LogFormat::Text),
            Some(Err(json)) => {
                let mut fields = Vec::new();
                let mut result = Ok(());
                for (k, v) in &json.fields {
                    use legate_proto::pb::google::protobuf::value::Kind;
                    let text = match &v.kind {
                        Some(Kind::StringValue(s)) => s.clone(),
                        Some(Kind::NumberValue(n)) => n.to_string(),
                        Some(Kind::BoolValue(b)) => b.to_string(),
                        _ => {
                            cx.err(
                                &format!("{p}.json_format.{k}"),
                                "only string values are supported",
                            );
                            continue;
                        }
                    };
                    match Format::parse(&text) {
                        Ok(f) => fields.push((k.clone(), f)),
                        Err(e) => result = Err(e),
                    }
                }
                fields.sort_by(|a, b| a.0.cmp(&b.0));
                result.map(|_| LogFormat::Json(fields))
            }
        };
        let format = match format {
            Ok(f) => f,
            Err(e) => {
                cx.err(&p, e.to_string());
                continue;
            }
        };
        match AccessLog::open(&file_path, format) {
            Ok(l) => out.push(l),
            Err(e) => cx.err(
                &format!("{p}.path"),
                format!("cannot open {file_path}: {e}"),
            ),
        }
    }
    out
}

type TextOrJson = Result<String, legate_proto::pb::google::protobuf::Struct>;

fn substitution_format(
    cx: &mut Ctx<'_>,
    sfs: core::SubstitutionFormatString,
    path: &str,
) -> Option<TextOrJson> {
    use core::substitution_format_string::Format as F;
    #[allow(deprecated)]
    match sfs.format {
        Some(F::TextFormat(t)) => Some(Ok(t)),
        Some(F::JsonFormat(j)) => Some(Err(j)),
        Some(F::TextFormatSource(ds)) => {
            let b = cx.data_source(&ds, &format!("{path}.text_format_source"))?;
            Some(Ok(String::from_utf8_lossy(&b).into_owned()))
        }
        _ => {
            cx.err(
                path,
                "text_format, json_format or text_format_source is required",
            );
            None
        }
    }
}

fn http_connection_manager(
    cx: &mut Ctx<'_>,
    h: &hcmpb::HttpConnectionManager,
    path: &str,
) -> Option<HcmConfig> {
    use hcmpb::http_connection_manager::RouteSpecifier as RS;
    let codec = match h.codec_type {
        0 => Codec::Auto,
        1 => Codec::Http1,
        2 => Codec::Http2,
        _ => {
            cx.err(&format!("{path}.codec_type"), "HTTP3 is not supported");
            return None;
        }
    };
    let mut filters = Vec::new();
    let mut router = None;
    for (i, f) in h.http_filters.iter().enumerate() {
        let p = format!("{path}.http_filters[{i}]");
        if router.is_some() {
            cx.err(&p, "the router must be the last filter");
            continue;
        }
        let Some(hcmpb::http_filter::ConfigType::TypedConfig(any)) = &f.config_type else {
            cx.err(&p, "typed_config is required");
            continue;
        };
        // Filters count their stats under the connection manager's `http.<stat_prefix>.`.
        let services = cx
            .registry
            .services()
            .scoped(&format!("http.{}.", h.stat_prefix));
        match cx
            .registry
            .create_from_any(&f.name, &any.type_url, &any.value, &services)
        {
            Ok((_, FilterConfig::Router(r))) => router = Some(r),
            Ok((type_url, FilterConfig::Filter { name, filter })) => filters.push(HcmFilter {
                name,
                type_url,
                phases: filter.phases(),
                filter,
                disabled_by_default: f.disabled,
            }),
            Err(legate_filters::FilterError::UnknownType { type_url }) if f.is_optional => {
                tracing::warn!(
                    "{p}: optional filter {type_url} is not supported by Legate; skipped"
                );
            }
            Err(e) => cx.err(&format!("{p}.typed_config"), e.to_string()),
        }
    }
    if filters.len() > crate::hcm::MAX_FILTERS {
        cx.err(
            &format!("{path}.http_filters"),
            format!("at most {} filters are supported", crate::hcm::MAX_FILTERS),
        );
        return None;
    }
    // Routes are converted after the filters: per-route filter configs are built by the
    // factories of the filters this manager runs.
    cx.http_filters = filters
        .iter()
        .map(|f: &HcmFilter| (f.name.clone(), f.type_url.clone()))
        .collect();
    let routes = match &h.route_specifier {
        Some(RS::RouteConfig(rc)) => Routes::Static(Arc::new(super::route::route_table(
            cx,
            rc,
            &format!("{path}.route_config"),
        ))),
        Some(RS::Rds(rds)) => {
            super::dynamic::ads_source(
                cx,
                rds.config_source.as_ref(),
                &format!("{path}.rds.config_source"),
            );
            if rds.route_config_name.is_empty() {
                cx.err(&format!("{path}.rds.route_config_name"), "required");
                return None;
            }
            let r = super::RdsRef::new(&rds.route_config_name, &cx.http_filters);
            let routes = Routes::Rds {
                name: r.name.clone(),
                key: r.key.clone(),
            };
            cx.rds_refs.push(r);
            routes
        }
        _ => {
            cx.err(
                path,
                "route_config or rds is required (scoped routes are not supported)",
            );
            return None;
        }
    };
    let router: RouterConfig = match router {
        Some(r) => r,
        None => {
            cx.err(
                &format!("{path}.http_filters"),
                "the last filter must be envoy.filters.http.router",
            );
            return None;
        }
    };
    let mut websocket = false;
    for (i, u) in h.upgrade_configs.iter().enumerate() {
        if u.upgrade_type.eq_ignore_ascii_case("websocket") {
            websocket = u.enabled.is_none_or(|v| v.value);
        } else {
            cx.err(
                &format!("{path}.upgrade_configs[{i}].upgrade_type"),
                "only websocket upgrades are supported",
            );
        }
    }
    let server_header = match h.server_header_transformation {
        0 => ServerHeader::Overwrite,
        1 => ServerHeader::AppendIfAbsent,
        _ => ServerHeader::PassThrough,
    };
    let server_name = if h.server_name.is_empty() {
        "legate"
    } else {
        h.server_name.as_str()
    };
    let Ok(server_name) = HeaderValue::from_str(server_name) else {
        cx.err(&format!("{path}.server_name"), "invalid header value");
        return None;
    };
    let max_kb = h.max_request_headers_kb.map_or(60, |v| v.value);
    if !(1..=8192).contains(&max_kb) {
        cx.err(
            &format!("{path}.max_request_headers_kb"),
            "must be between 1 and 8192",
        );
    }
    let opt = |d: &Option<legate_proto::pb::google::protobuf::Duration>,
               default: Option<std::time::Duration>| match d {
        Some(d) => Some(duration(d)).filter(|d| !d.is_zero()),
        None => default,
    };
    let idle_timeout = opt(
        &h.common_http_protocol_options
            .as_ref()
            .and_then(|o| o.idle_timeout),
        Some(std::time::Duration::from_secs(3600)),
    );
    Some(HcmConfig {
        stat_prefix: h.stat_prefix.clone(),
        codec,
        routes,
        body_filters: crate::hcm::phase_mask(
            &filters,
            legate_filters::Phases::REQUEST_BODY | legate_filters::Phases::RESPONSE_BODY,
        ),
        filters,
        router,
        stream_idle_timeout: opt(
            &h.stream_idle_timeout,
            Some(std::time::Duration::from_secs(300)),
        ),
        request_timeout: opt(&h.request_timeout, None),
        idle_timeout,
        max_request_headers_kb: max_kb,
        use_remote_address: h.use_remote_address.is_some_and(|v| v.value),
        xff_num_trusted_hops: h.xff_num_trusted_hops,
        skip_xff_append: h.skip_xff_append,
        generate_request_id: h.generate_request_id.is_none_or(|v| v.value),
        always_set_request_id_in_response: h.always_set_request_id_in_response,
        accept_http_10: h
            .http_protocol_options
            .as_ref()
            .is_some_and(|o| o.accept_http_10),
        server_name,
        server_header,
        access_logs: access_logs(cx, &h.access_log, &format!("{path}.access_log")).into(),
        websocket,
        drain_timeout: h
            .drain_timeout
            .as_ref()
            .map_or(std::time::Duration::from_secs(5), duration),
        strip_any_host_port: matches!(
            h.strip_port_mode,
            Some(hcmpb::http_connection_manager::StripPortMode::StripAnyHostPort(true))
        ),
        h2_max_concurrent_streams: h
            .http2_protocol_options
            .as_ref()
            .and_then(|o| o.max_concurrent_streams)
            .map(|v| v.value),
        stats: Default::default(),
    })
}
