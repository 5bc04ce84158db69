//! `RouteConfiguration` → [`RouteTable`].

use std::time::Duration;

use http::header::{HeaderName, HeaderValue};
use http::StatusCode;
use legate_proto::pb::envoy::config::core::v3 as core;
use legate_proto::pb::envoy::config::route::v3 as rt;
use legate_proto::pb::envoy::r#type::matcher::v3 as matcher;
use regex::Regex;

use super::{duration, Ctx};
use crate::route::*;

pub(crate) fn route_table(cx: &mut Ctx<'_>, rc: &rt::RouteConfiguration, path: &str) -> RouteTable {
    let mut vhosts = Vec::new();
    for (i, vh) in rc.virtual_hosts.iter().enumerate() {
        vhosts.push(virtual_host(cx, vh, &format!("{path}.virtual_hosts[{i}]")));
    }
    let req = header_ops(
        cx,
        &rc.request_headers_to_add,
        &rc.request_headers_to_remove,
        &format!("{path}.request_headers_to_add"),
    );
    let resp = header_ops(
        cx,
        &rc.response_headers_to_add,
        &rc.response_headers_to_remove,
        &format!("{path}.response_headers_to_add"),
    );
    // Envoy checks that statically configured routes name existing clusters.
    if rc.validate_clusters.is_none_or(|v| v.value) {
        for (i, vh) in vhosts.iter().enumerate() {
            for (j, r) in vh.routes.iter().enumerate() {
                if let RouteAction::Forward(f) = &r.action {
                    let p = format!("{path}.virtual_hosts[{i}].routes[{j}].route");
                    match &f.target {
                        ClusterTarget::Named(n) => {
                            cx.cluster_refs.push((format!("{p}.cluster"), n.clone()))
                        }
                        ClusterTarget::Weighted { clusters, .. } => {
                            for (k, c) in clusters.iter().enumerate() {
                                cx.cluster_refs.push((
                                    format!("{p}.weighted_clusters.clusters[{k}].name"),
                                    c.name.clone(),
                                ));
                            }
                        }
                        ClusterTarget::Header(_) => {}
                    }
                }
            }
        }
    }
    match RouteTable::new(rc.name.clone(), vhosts, req, resp) {
        Ok(mut t) => {
            t.most_specific_wins = rc.most_specific_header_mutations_wins;
            t
        }
        Err(e) => {
            cx.err(&format!("{path}.virtual_hosts"), e);
            RouteTable::default()
        }
    }
}

fn virtual_host(cx: &mut Ctx<'_>, vh: &rt::VirtualHost, path: &str) -> VirtualHost {
    if vh.domains.is_empty() {
        cx.err(
            &format!("{path}.domains"),
            "at least one domain is required",
        );
    }
    let mut domains = Vec::new();
    for (i, d) in vh.domains.iter().enumerate() {
        let d = d.to_ascii_lowercase();
        if d != "*" && d.matches('*').count() > 0 && !(d.starts_with('*') ^ d.ends_with('*')) {
            cx.err(
                &format!("{path}.domains[{i}]"),
                format!("invalid domain wildcard {d:?}"),
            );
        }
        domains.push(d);
    }
    if vh.require_tls != 0 {
        cx.err(
            &format!("{path}.require_tls"),
            "field not supported by Legate",
        );
    }
    let vh_filters = per_filter(
        cx,
        &vh.typed_per_filter_config,
        &format!("{path}.typed_per_filter_config"),
    );
    let routes = vh
        .routes
        .iter()
        .enumerate()
        .filter_map(|(i, r)| route(cx, r, &vh_filters, &format!("{path}.routes[{i}]")))
        .collect();
    VirtualHost {
        name: vh.name.clone(),
        domains,
        routes,
        request_headers: header_ops(
            cx,
            &vh.request_headers_to_add,
            &vh.request_headers_to_remove,
            &format!("{path}.request_headers_to_add"),
        ),
        response_headers: header_ops(
            cx,
            &vh.response_headers_to_add,
            &vh.response_headers_to_remove,
            &format!("{path}.response_headers_to_add"),
        ),
    }
}

/// Resolves `typed_per_filter_config` against the connection manager's filters.
fn per_filter(
    cx: &mut Ctx<'_>,
    map: &std::collections::HashMap<String, legate_proto::pb::google::protobuf::Any>,
    path: &str,
) -> RouteFilters {
    let mut out = RouteFilters::new();
    let mut names: Vec<&String> = map.keys().collect();
    names.sort();
    for name in names {
        let p = format!("{path}[\"{name}\"]");
        let any = &map[name];
        let (disabled, inner) = if legate_proto::type_name_of(&any.type_url) == FILTER_CONFIG {
            match <rt::FilterConfig as prost::Message>::decode(any.value.as_slice()) {
                Ok(fc) => (fc.disabled, fc.config),
                Err(e) => {
                    cx.err(&p, format!("cannot decode {FILTER_CONFIG}: {e}"));
                    continue;
                }
            }
        } else {
            (false, Some(any.clone()))
        };
        if disabled {
            out.insert(name.clone(), RouteFilter::Disabled);
            continue;
        }
        let factory = cx
            .http_filters
            .iter()
            .find(|(n, _)| n == name)
            .and_then(|(_, t)| cx.registry.get(t))
            .cloned();
        let Some(factory) = factory else {
            // Envoy keeps configs for filters this manager does not run; so does Legate, but
            // only for types it knows.
            let known = inner.as_ref().is_none_or(|a| {
                legate_proto::type_name_of(&a.type_url) == FILTER_CONFIG
                    || legate_proto::descriptor(legate_proto::type_name_of(&a.type_url)).is_ok()
            });
            if !known {
                cx.err(&p, "unsupported per-filter configuration type");
            }
            continue;
        };
        let Some(inner) = inner else {
            out.insert(name.clone(), RouteFilter::Enabled(None));
            continue;
        };
        let outer = legate_proto::type_name_of(&inner.type_url);
        // A `TypedStruct` carries the message as proto3 JSON (Envoy accepts it here too).
        let typed_struct = if legate_proto::TYPED_STRUCT_TYPES.contains(&outer) {
            match legate_filters::typed_struct_json(outer, &inner.value) {
                Ok(v) => Some(v),
                Err(e) => {
                    cx.err(&p, e.to_string());
                    continue;
                }
            }
        } else {
            None
        };
        let ty = typed_struct
            .as_ref()
            .map_or(outer, |(url, _)| legate_proto::type_name_of(url));
        if factory.route_config_type() != Some(ty) {
            cx.err(
                &p,
                format!("filter {name} takes no per-route configuration of type {ty}"),
            );
            continue;
        }
        let decoded = match &typed_struct {
            Some((_, json)) => legate_proto::dynamic_from_json(ty, json),
            None => legate_proto::dynamic_from_bytes(ty, &inner.value),
        };
        let built = decoded
            .map_err(|e| e.to_string())
            .and_then(|d| factory.create_route_config(&d).map_err(|e| e.to_string()));
        match built {
            Ok(c) => {
                out.insert(name.clone(), RouteFilter::Enabled(Some(c)));
            }
            Err(e) => cx.err(&p, e),
        }
    }
    out
}

const FILTER_CONFIG: &str = "envoy.config.route.v3.FilterConfig";

fn route(cx: &mut Ctx<'_>, r: &rt::Route, vh_filters: &RouteFilters, path: &str) -> Option<Route> {
    let Some(m) = &r.r#match else {
        cx.err(&format!("{path}.match"), "required");
        return None;
    };
    let matcher = route_match(cx, m, &format!("{path}.match"))?;
    let action = match &r.action {
        Some(rt::route::Action::Route(a)) => {
            RouteAction::Forward(forward(cx, a, &format!("{path}.route"))?)
        }
        Some(rt::route::Action::Redirect(a)) => {
            RouteAction::Redirect(redirect(cx, a, &format!("{path}.redirect"))?)
        }
        Some(rt::route::Action::DirectResponse(a)) => {
            let status = u16::try_from(a.status)
                .ok()
                .and_then(|s| StatusCode::from_u16(s).ok());
            let Some(status) = status.filter(|s| s.as_u16() >= 200) else {
                cx.err(
                    &format!("{path}.direct_response.status"),
                    format!("invalid status {}", a.status),
                );
                return None;
            };
            let body = match &a.body {
                Some(ds) => Some(bytes::Bytes::from(
                    cx.data_source(ds, &format!("{path}.direct_response.body"))?,
                )),
                None => None,
            };
            RouteAction::Direct { status, body }
        }
        _ => {
            cx.err(
                path,
                "route needs one of route, redirect or direct_response",
            );
            return None;
        }
    };
    let mut filters = vh_filters.clone();
    filters.extend(per_filter(
        cx,
        &r.typed_per_filter_config,
        &format!("{path}.typed_per_filter_config"),
    ));
    Some(Route {
        filters: (!filters.is_empty()).then(|| std::sync::Arc::new(filters)),
        name: r.name.clone(),
        matcher,
        action,
        request_headers: header_ops(
            cx,
            &r.request_headers_to_add,
            &r.request_headers_to_remove,
            &format!("{path}.request_headers_to_add"),
        ),
        response_headers: header_ops(
            cx,
            &r.response_headers_to_add,
            &r.response_headers_to_remove,
            &format!("{path}.response_headers_to_add"),
        ),
    })
}

fn regex(cx: &mut Ctx<'_>, m: &matcher::RegexMatcher, path: &str, anchored: bool) -> Option<Regex> {
    let pattern = if anchored {
        format!("^(?:{})$", m.regex)
    } else {
        m.regex.clone()
    };
    match Regex::new(&pattern) {
        Ok(r) => Some(r),
        Err(e) => {
            cx.err(&format!("{path}.regex"), format!("invalid regex: {e}"));
            None
        }
    }
}

fn route_match(cx: &mut Ctx<'_>, m: &rt::RouteMatch, path: &str) -> Option<RouteMatch> {
    use rt::route_match::PathSpecifier as P;
    let case_sensitive = m.case_sensitive.is_none_or(|v| v.value);
    let path_match = match &m.path_specifier {
        Some(P::Prefix(p)) => PathMatch::Prefix(p.clone()),
        Some(P::Path(p)) => PathMatch::Exact(p.clone()),
        Some(P::PathSeparatedPrefix(p)) => {
            if p.contains('?') || p.contains('#') || (p.ends_with('/') && p.len() > 1) {
                cx.err(
                    &format!("{path}.path_separated_prefix"),
                    "must not contain ?, # or end with /",
                );
                return None;
            }
            PathMatch::SeparatedPrefix(p.clone())
        }
        Some(P::SafeRegex(r)) => {
            PathMatch::Regex(regex(cx, r, &format!("{path}.safe_regex"), true)?)
        }
        _ => {
            cx.err(
                path,
                "one of prefix, path, safe_regex or path_separated_prefix is required",
            );
            return None;
        }
    };
    let mut headers = Vec::new();
    for (i, h) in m.headers.iter().enumerate() {
        headers.push(header_matcher(cx, h, &format!("{path}.headers[{i}]"))?);
    }
    let mut query = Vec::new();
    for (i, q) in m.query_parameters.iter().enumerate() {
        use rt::query_parameter_matcher::QueryParameterMatchSpecifier as Q;
        let p = format!("{path}.query_parameters[{i}]");
        let value = match &q.query_parameter_match_specifier {
            Some(Q::StringMatch(s)) => Some(string_matcher(cx, s, &format!("{p}.string_match"))?),
            Some(Q::PresentMatch(_)) | None => None,
        };
        query.push(QueryMatcher {
            name: q.name.clone(),
            value,
        });
    }
    Some(RouteMatch {
        path: path_match,
        case_sensitive,
        headers,
        query,
    })
}

pub(crate) fn string_matcher(
    cx: &mut Ctx<'_>,
    m: &matcher::StringMatcher,
    path: &str,
) -> Option<StringMatcher> {
    use matcher::string_matcher::MatchPattern as M;
    let lc = |s: &String| {
        if m.ignore_case {
            s.to_ascii_lowercase()
        } else {
            s.clone()
        }
    };
    let kind = match &m.match_pattern {
        Some(M::Exact(s)) => StringMatch::Exact(lc(s)),
        Some(M::Prefix(s)) => StringMatch::Prefix(lc(s)),
        Some(M::Suffix(s)) => StringMatch::Suffix(lc(s)),
        Some(M::Contains(s)) => StringMatch::Contains(lc(s)),
        Some(M::SafeRegex(r)) => {
            StringMatch::Regex(regex(cx, r, &format!("{path}.safe_regex"), true)?)
        }
        _ => {
            cx.err(path, "a match pattern is required");
            return None;
        }
    };
    Some(StringMatcher {
        kind,
        ignore_case: m.ignore_case,
    })
}

fn header_matcher(cx: &mut Ctx<'_>, h: &rt::HeaderMatcher, path: &str) -> Option<HeaderMatcher> {
    use rt::header_matcher::HeaderMatchSpecifier as H;
    let lowered = h.name.to_ascii_lowercase();
    let name = match lowered.as_str() {
        ":method" => HeaderSource::Method,
        ":authority" | "host" => HeaderSource::Authority,
        ":path" => HeaderSource::Path,
        ":scheme" => HeaderSource::Scheme,
        n => match HeaderName::from_bytes(n.as_bytes()) {
            Ok(n) => HeaderSource::Header(n),
            Err(_) => {
                cx.err(
                    &format!("{path}.name"),
                    format!("invalid header name {:?}", h.name),
                );
                return None;
            }
        },
    };
    let plain = |kind| StringMatcher {
        kind,
        ignore_case: false,
    };
    let kind = match &h.header_match_specifier {
        Some(H::ExactMatch(s)) => HeaderMatchKind::String(plain(StringMatch::Exact(s.clone()))),
        Some(H::PrefixMatch(s)) => HeaderMatchKind::String(plain(StringMatch::Prefix(s.clone()))),
        Some(H::SuffixMatch(s)) => HeaderMatchKind::String(plain(StringMatch::Suffix(s.clone()))),
        Some(H::ContainsMatch(s)) => {
            HeaderMatchKind::String(plain(StringMatch::Contains(s.clone())))
        }
        Some(H::SafeRegexMatch(r)) => HeaderMatchKind::String(plain(StringMatch::Regex(regex(
            cx,
            r,
            &format!("{path}.safe_regex_match"),
            true,
        )?))),
        Some(H::StringMatch(s)) => {
            HeaderMatchKind::String(string_matcher(cx, s, &format!("{path}.string_match"))?)
        }
        Some(H::PresentMatch(b)) => HeaderMatchKind::Present(*b),
        Some(H::RangeMatch(r)) => HeaderMatchKind::Range {
            start: r.start,
            end: r.end,
        },
        None => HeaderMatchKind::Present(true),
    };
    Some(HeaderMatcher {
        name,
        kind,
        invert: h.invert_match,
        treat_missing_as_empty: h.treat_missing_header_as_empty,
    })
}

fn substitution(
    cx: &mut Ctx<'_>,
    r: &matcher::RegexMatchAndSubstitute,
    path: &str,
) -> Option<(Regex, String)> {
    let Some(p) = &r.pattern else {
        cx.err(&format!("{path}.pattern"), "required");
        return None;
    };
    let re = regex(cx, p, &format!("{path}.pattern"), false)?;
    // RE2 substitutions use \1; the regex crate uses ${1}.
    let mut sub = String::new();
    let mut chars = r.substitution.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\\' {
            match chars.peek() {
                Some(d) if d.is_ascii_digit() => {
                    sub.push_str(&format!("${{{d}}}"));
                    chars.next();
                    continue;
                }
                Some('\\') => {
                    sub.push('\\');
                    chars.next();
                    continue;
                }
                _ => {}
            }
        }
        if c == '$' {
            sub.push_str("$$");
        } else {
            sub.push(c);
        }
    }
    Some((re, sub))
}

fn forward(cx: &mut Ctx<'_>, a: &rt::RouteAction, path: &str) -> Option<ForwardAction> {
    use rt::route_action::ClusterSpecifier as C;
    use rt::route_action::HostRewriteSpecifier as HR;
    let target = match &a.cluster_specifier {
        Some(C::Cluster(c)) => ClusterTarget::Named(c.clone()),
        Some(C::ClusterHeader(h)) => {
            match HeaderName::from_bytes(h.to_ascii_lowercase().as_bytes()) {
                Ok(h) => ClusterTarget::Header(h),
                Err(_) => {
                    cx.err(&format!("{path}.cluster_header"), "invalid header name");
                    return None;
                }
            }
        }
        Some(C::WeightedClusters(w)) => {
            let mut clusters = Vec::new();
            for (i, c) in w.clusters.iter().enumerate() {
                let p = format!("{path}.weighted_clusters.clusters[{i}]");
                clusters.push(WeightedCluster {
                    name: c.name.clone(),
                    weight: u64::from(c.weight.map_or(0, |v| v.value)),
                    request_headers: header_ops(
                        cx,
                        &c.request_headers_to_add,
                        &c.request_headers_to_remove,
                        &format!("{p}.request_headers_to_add"),
                    ),
                    response_headers: header_ops(
                        cx,
                        &c.response_headers_to_add,
                        &c.response_headers_to_remove,
                        &format!("{p}.response_headers_to_add"),
                    ),
                });
            }
            let sum: u64 = clusters.iter().map(|c| c.weight).sum();
            let total = w.total_weight.map_or(sum, |v| u64::from(v.value));
            if total == 0 || clusters.is_empty() {
                cx.err(
                    &format!("{path}.weighted_clusters"),
                    "the sum of weights must be greater than 0",
                );
                return None;
            }
            ClusterTarget::Weighted { clusters, total }
        }
        _ => {
            cx.err(
                path,
                "cluster, cluster_header or weighted_clusters is required",
            );
            return None;
        }
    };
    let (host_rewrite, auto_host_rewrite) = match &a.host_rewrite_specifier {
        Some(HR::HostRewriteLiteral(h)) => match HeaderValue::from_str(h) {
            Ok(v) => (Some(v), false),
            Err(_) => {
                cx.err(
                    &format!("{path}.host_rewrite_literal"),
                    "invalid header value",
                );
                return None;
            }
        },
        Some(HR::AutoHostRewrite(b)) => (None, b.value),
        Some(_) => {
            cx.err(
                &format!("{path}.host_rewrite_specifier"),
                "only host_rewrite_literal and auto_host_rewrite are supported",
            );
            return None;
        }
        None => (None, false),
    };
    let timeout = match &a.timeout {
        Some(d) => Some(duration(d)).filter(|d| !d.is_zero()),
        None => Some(Duration::from_secs(15)),
    };
    let mut hash_policy = Vec::new();
    for (i, h) in a.hash_policy.iter().enumerate() {
        use rt::route_action::hash_policy::PolicySpecifier as PS;
        let p = format!("{path}.hash_policy[{i}]");
        hash_policy.push(match &h.policy_specifier {
            Some(PS::Header(hh)) => {
                match HeaderName::from_bytes(hh.header_name.to_ascii_lowercase().as_bytes()) {
                    Ok(name) => HashPolicy::Header {
                        name,
                        terminal: h.terminal,
                    },
                    Err(_) => {
                        cx.err(&format!("{p}.header.header_name"), "invalid header name");
                        return None;
                    }
                }
            }
            Some(PS::Cookie(c)) => {
                if c.ttl.is_some() {
                    cx.err(
                        &format!("{p}.cookie.ttl"),
                        "generated cookies are not supported by Legate",
                    );
                }
                HashPolicy::Cookie {
                    name: c.name.clone(),
                    terminal: h.terminal,
                }
            }
            Some(PS::ConnectionProperties(c)) if c.source_ip => HashPolicy::SourceIp {
                terminal: h.terminal,
            },
            _ => {
                cx.err(
                    &p,
                    "only header, cookie and connection_properties.source_ip are supported",
                );
                return None;
            }
        });
    }
    let cluster_not_found_status = match a.cluster_not_found_response_code {
        1 => StatusCode::NOT_FOUND,
        2 => StatusCode::INTERNAL_SERVER_ERROR,
        _ => StatusCode::SERVICE_UNAVAILABLE,
    };
    let mut websocket = None;
    for u in &a.upgrade_configs {
        if u.upgrade_type.eq_ignore_ascii_case("websocket") {
            websocket = Some(u.enabled.is_none_or(|v| v.value));
        }
    }
    Some(ForwardAction {
        target,
        prefix_rewrite: Some(a.prefix_rewrite.clone()).filter(|p| !p.is_empty()),
        regex_rewrite: match &a.regex_rewrite {
            Some(r) => Some(substitution(cx, r, &format!("{path}.regex_rewrite"))?),
            None => None,
        },
        host_rewrite,
        auto_host_rewrite,
        timeout,
        hash_policy,
        cluster_not_found_status,
        websocket,
    })
}

fn redirect(cx: &mut Ctx<'_>, a: &rt::RedirectAction, path: &str) -> Option<RedirectAction> {
    use rt::redirect_action::PathRewriteSpecifier as PR;
    use rt::redirect_action::SchemeRewriteSpecifier as SR;
    let scheme = match &a.scheme_rewrite_specifier {
        Some(SR::HttpsRedirect(true)) => Some("https".to_owned()),
        Some(SR::SchemeRedirect(s)) => Some(s.to_ascii_lowercase()),
        _ => None,
    };
    let (p, prefix, re) = match &a.path_rewrite_specifier {
        Some(PR::PathRedirect(p)) => (Some(p.clone()), None, None),
        Some(PR::PrefixRewrite(p)) => (None, Some(p.clone()), None),
        Some(PR::RegexRewrite(r)) => (
            None,
            None,
            Some(substitution(cx, r, &format!("{path}.regex_rewrite"))?),
        ),
        Some(_) => {
            cx.err(
                &format!("{path}.path_rewrite"),
                "field not supported by Legate",
            );
            return None;
        }
        None => (None, None, None),
    };
    let status = match a.response_code {
        0 => StatusCode::MOVED_PERMANENTLY,
        1 => StatusCode::FOUND,
        2 => StatusCode::SEE_OTHER,
        3 => StatusCode::TEMPORARY_REDIRECT,
        4 => StatusCode::PERMANENT_REDIRECT,
        other => {
            cx.err(
                &format!("{path}.response_code"),
                format!("unknown response code {other}"),
            );
            return None;
        }
    };
    Some(RedirectAction {
        scheme,
        host: Some(a.host_redirect.clone()).filter(|h| !h.is_empty()),
        port: Some(a.port_redirect).filter(|p| *p != 0),
        path: p,
        prefix_rewrite: prefix,
        regex_rewrite: re,
        status,
        strip_query: a.strip_query,
    })
}

pub(crate) fn header_ops(
    cx: &mut Ctx<'_>,
    add: &[core::HeaderValueOption],
    remove: &[String],
    path: &str,
) -> HeaderOps {
    let mut ops = HeaderOps::default();
    for (i, o) in add.iter().enumerate() {
        let p = format!("{path}[{i}]");
        let Some(h) = &o.header else {
            cx.err(&format!("{p}.header"), "required");
            continue;
        };
        let Ok(name) = HeaderName::from_bytes(h.key.to_ascii_lowercase().as_bytes()) else {
            cx.err(
                &format!("{p}.header.key"),
                format!("invalid header name {:?}", h.key),
            );
            continue;
        };
        if h.value.contains('%') {
            cx.err(
                &format!("{p}.header.value"),
                "format operators in header values are not supported by Legate",
            );
            continue;
        }
        let Ok(value) = HeaderValue::from_str(&h.value) else {
            cx.err(&format!("{p}.header.value"), "invalid header value");
            continue;
        };
        let action = match (o.append, o.append_action) {
            (Some(b), _) if b.value => AppendAction::AppendOrAdd,
            (Some(_), _) => AppendAction::OverwriteOrAdd,
            (None, 1) => AppendAction::AddIfAbsent,
            (None, 2) => AppendAction::OverwriteOrAdd,
            (None, 3) => AppendAction::OverwriteIfExists,
            (None, _) => AppendAction::AppendOrAdd,
        };
        ops.add.push((name, value, action));
    }
    for (i, r) in remove.iter().enumerate() {
        match HeaderName::from_bytes(r.to_ascii_lowercase().as_bytes()) {
            Ok(n) => ops.remove.push(n),
            Err(_) => cx.err(&format!("{path}_remove[{i}]"), "invalid header name"),
        }
    }
    ops
}
