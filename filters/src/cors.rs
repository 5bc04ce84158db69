//! `envoy.filters.http.cors`: answers CORS preflights locally and adds the
//! `access-control-*` headers to the responses of allowed cross-origin requests.
//!
//! The policy is the route's (or its virtual host's) `typed_per_filter_config` of type
//! `envoy.extensions.filters.http.cors.v3.CorsPolicy`; a route without one is left alone, as
//! in Envoy. Legate keeps one per-route config per route, so a route's policy does not inherit
//! the fields its virtual host's policy sets (Envoy takes each field from the most specific
//! policy that sets it).

use std::sync::Arc;

use http::header::{self, HeaderName, HeaderValue};
use http::{Method, StatusCode};
use legate_proto::pb::envoy::extensions::filters::http::cors::v3 as pb;
use legate_proto::DynamicMessage;

use crate::api::{FilterStatus, HttpFilter, LocalReply, RequestContext, RouteConfig};
use crate::common::{self, FieldTable, Fraction, StringMatch};
use crate::registry::{FilterConfig, FilterError, FilterFactory};

/// Type URL of the filter's config.
pub const CORS_TYPE_URL: &str = "type.googleapis.com/envoy.extensions.filters.http.cors.v3.Cors";
const POLICY_TYPE: &str = "envoy.extensions.filters.http.cors.v3.CorsPolicy";

/// The fields this filter implements.
pub const FIELDS: FieldTable = &[
    ("envoy.extensions.filters.http.cors.v3.Cors", &[]),
    (
        POLICY_TYPE,
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
    common::STRING_MATCHER,
    common::REGEX_MATCHER,
    common::GOOGLE_RE2,
    common::RUNTIME_FRACTIONAL_PERCENT,
    common::FRACTIONAL_PERCENT,
];

const ALLOW_ORIGIN: HeaderName = HeaderName::from_static("access-control-allow-origin");
const ALLOW_CREDENTIALS: HeaderName = HeaderName::from_static("access-control-allow-credentials");
const ALLOW_METHODS: HeaderName = HeaderName::from_static("access-control-allow-methods");
const ALLOW_HEADERS: HeaderName = HeaderName::from_static("access-control-allow-headers");
const EXPOSE_HEADERS: HeaderName = HeaderName::from_static("access-control-expose-headers");
const MAX_AGE: HeaderName = HeaderName::from_static("access-control-max-age");
const REQUEST_METHOD: HeaderName = HeaderName::from_static("access-control-request-method");
const REQUEST_HEADERS: HeaderName = HeaderName::from_static("access-control-request-headers");
const REQUEST_PRIVATE_NETWORK: HeaderName =
    HeaderName::from_static("access-control-request-private-network");
const ALLOW_PRIVATE_NETWORK: HeaderName =
    HeaderName::from_static("access-control-allow-private-network");

/// A compiled `CorsPolicy`.
#[derive(Debug)]
struct Policy {
    allow_origins: Vec<StringMatch>,
    allow_methods: Option<HeaderValue>,
    allow_headers: Option<HeaderValue>,
    expose_headers: Option<HeaderValue>,
    max_age: Option<HeaderValue>,
    allow_credentials: bool,
    /// Unset means always.
    enabled: Option<Fraction>,
    allow_private_network_access: bool,
    forward_not_matching_preflights: bool,
}

fn value(s: &str, field: &str) -> Result<Option<HeaderValue>, FilterError> {
    if s.is_empty() {
        return Ok(None);
    }
    HeaderValue::from_str(s)
        .map(Some)
        .map_err(|e| common::invalid(field, e.to_string()))
}

impl Policy {
    fn new(msg: &DynamicMessage) -> Result<Self, FilterError> {
        let c: pb::CorsPolicy = common::decode(msg, FIELDS)?;
        let allow_origins = c
            .allow_origin_string_match
            .iter()
            .enumerate()
            .map(|(i, m)| StringMatch::new(m, &format!("allow_origin_string_match[{i}]")))
            .collect::<Result<_, _>>()?;
        Ok(Policy {
            allow_origins,
            allow_methods: value(&c.allow_methods, "allow_methods")?,
            allow_headers: value(&c.allow_headers, "allow_headers")?,
            expose_headers: value(&c.expose_headers, "expose_headers")?,
            max_age: value(&c.max_age, "max_age")?,
            allow_credentials: c.allow_credentials.is_some_and(|b| b.value),
            enabled: Fraction::runtime(c.filter_enabled.as_ref()),
            allow_private_network_access: c.allow_private_network_access.is_some_and(|b| b.value),
            forward_not_matching_preflights: c
                .forward_not_matching_preflights
                .is_none_or(|b| b.value),
        })
    }

    fn origin_allowed(&self, origin: &str) -> bool {
        self.allow_origins
            .iter()
            .any(|m| m.matches("*") || m.matches(origin))
    }

    /// The preflight answer; `origin` is the request's origin if it is allowed.
    fn preflight(&self, origin: Option<&HeaderValue>, req: &http::HeaderMap) -> LocalReply {
        let mut r = LocalReply::new(StatusCode::OK, bytes::Bytes::new());
        let h = &mut r.headers;
        if let Some(o) = origin {
            h.insert(ALLOW_ORIGIN, o.clone());
        }
        if self.allow_credentials {
            h.insert(ALLOW_CREDENTIALS, HeaderValue::from_static("true"));
        }
        let echo = |configured: &HeaderValue, asked: &HeaderName| {
            if configured == "*" {
                req.get(asked).cloned()
            } else {
                Some(configured.clone())
            }
        };
        if let Some(v) = self
            .allow_methods
            .as_ref()
            .and_then(|m| echo(m, &REQUEST_METHOD))
        {
            h.insert(ALLOW_METHODS, v);
        }
        if let Some(v) = self
            .allow_headers
            .as_ref()
            .and_then(|m| echo(m, &REQUEST_HEADERS))
        {
            h.insert(ALLOW_HEADERS, v);
        }
        if let Some(v) = &self.max_age {
            h.insert(MAX_AGE, v.clone());
        }
        if self.allow_private_network_access
            && req
                .get(&REQUEST_PRIVATE_NETWORK)
                .is_some_and(|v| v == "true")
        {
            h.insert(ALLOW_PRIVATE_NETWORK, HeaderValue::from_static("true"));
        }
        r
    }
}

/// The allowed origin of a cross-origin request, for the response phase.
struct Latched(HeaderValue);

/// The filter.
#[derive(Debug)]
pub struct CorsFilter {
    name: String,
}

impl HttpFilter for CorsFilter {
    fn on_request_headers(
        &self,
        ctx: &mut RequestContext,
        parts: &mut http::request::Parts,
    ) -> FilterStatus {
        let Some(policy) = ctx.route_config::<Policy>() else {
            return FilterStatus::Continue;
        };
        // In shadow mode (`shadow_enabled` without `filter_enabled`) Envoy only counts stats,
        // which Legate does not keep: either way the request passes untouched.
        if !policy.enabled.is_none_or(|f| f.sample()) {
            return FilterStatus::Continue;
        }
        let Some(origin) = parts.headers.get(header::ORIGIN).filter(|o| !o.is_empty()) else {
            return FilterStatus::Continue;
        };
        let allowed = origin
            .to_str()
            .is_ok_and(|o| policy.origin_allowed(o))
            .then(|| origin.clone());
        let preflight = parts.method == Method::OPTIONS
            && parts
                .headers
                .get(&REQUEST_METHOD)
                .is_some_and(|m| !m.is_empty());
        let reply = (preflight && (allowed.is_some() || !policy.forward_not_matching_preflights))
            .then(|| policy.preflight(allowed.as_ref(), &parts.headers));
        if let Some(o) = allowed {
            ctx.filter_data.insert(&self.name, Latched(o));
        }
        match reply {
            Some(r) => FilterStatus::LocalReply(r),
            None => FilterStatus::Continue,
        }
    }

    fn on_response_headers(
        &self,
        ctx: &mut RequestContext,
        parts: &mut http::response::Parts,
    ) -> FilterStatus {
        let (Some(Latched(origin)), Some(policy)) = (
            ctx.filter_data.get::<Latched>(&self.name),
            ctx.route_config::<Policy>(),
        ) else {
            return FilterStatus::Continue;
        };
        let h = &mut parts.headers;
        h.insert(ALLOW_ORIGIN, origin.clone());
        if policy.allow_credentials {
            h.insert(ALLOW_CREDENTIALS, HeaderValue::from_static("true"));
        }
        if let Some(v) = &policy.expose_headers {
            h.insert(EXPOSE_HEADERS, v.clone());
        }
        FilterStatus::Continue
    }
}

/// Factory of [`CorsFilter`].
#[derive(Debug)]
pub struct CorsFactory;

impl FilterFactory for CorsFactory {
    fn type_url(&self) -> &'static str {
        CORS_TYPE_URL
    }

    fn fields(&self) -> crate::registry::FieldTable {
        FIELDS
    }

    fn create(&self, name: &str, config: &DynamicMessage) -> Result<FilterConfig, FilterError> {
        let _: pb::Cors = common::decode(config, FIELDS)?;
        Ok(FilterConfig::Filter {
            name: name.to_owned(),
            filter: Arc::new(CorsFilter {
                name: name.to_owned(),
            }),
        })
    }

    fn route_config_type(&self) -> Option<&'static str> {
        Some(POLICY_TYPE)
    }

    fn create_route_config(&self, config: &DynamicMessage) -> Result<RouteConfig, FilterError> {
        Ok(Arc::new(Policy::new(config)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(json: serde_json::Value) -> Policy {
        let msg = match legate_proto::dynamic_from_json(POLICY_TYPE, &json) {
            Ok(m) => m,
            Err(e) => panic!("{e}"),
        };
        match Policy::new(&msg) {
            Ok(p) => p,
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn a_matcher_that_matches_star_allows_every_origin() {
        let p = policy(serde_json::json!({"allow_origin_string_match": [{"exact": "*"}]}));
        assert!(p.origin_allowed("https://anything.example"));
        let p = policy(serde_json::json!({"allow_origin_string_match": [{"exact": "https://a"}]}));
        assert!(!p.origin_allowed("https://b"));
    }

    #[test]
    fn star_echoes_what_the_preflight_asks() {
        let p = policy(serde_json::json!({
            "allow_origin_string_match": [{"prefix": "https://"}],
            "allow_methods": "*",
            "allow_headers": "x-a",
            "allow_credentials": true
        }));
        let mut req = http::HeaderMap::new();
        req.insert(REQUEST_METHOD, HeaderValue::from_static("PUT"));
        let origin = HeaderValue::from_static("https://a");
        let r = p.preflight(Some(&origin), &req);
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(
            r.headers.get(&ALLOW_METHODS),
            Some(&HeaderValue::from_static("PUT"))
        );
        assert_eq!(
            r.headers.get(&ALLOW_HEADERS),
            Some(&HeaderValue::from_static("x-a"))
        );
        assert_eq!(r.headers.get(&ALLOW_ORIGIN), Some(&origin));
        assert!(r.headers.contains_key(&ALLOW_CREDENTIALS));
    }
}
