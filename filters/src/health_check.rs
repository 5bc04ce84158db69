//! `envoy.filters.http.health_check`: answers health checks (requests matching `headers`)
//! locally with 200, or lets them through to the upstream in pass-through mode.
//!
//! As in Envoy, the response to a health check carries
//! `x-envoy-upstream-healthchecked-cluster`. Envoy puts the bootstrap's `node.cluster` there;
//! filters do not see the bootstrap, so Legate sends it empty (which is what Envoy sends when
//! `node.cluster` is unset). Envoy's admin `/healthcheck/fail` and `/healthcheck/ok` belong to
//! the proxy's admin and are not wired to this filter yet: Legate always reports healthy.

use std::sync::Arc;

use http::header::{HeaderName, HeaderValue};
use http::StatusCode;
use legate_proto::pb::envoy::extensions::filters::http::health_check::v3 as pb;
use legate_proto::DynamicMessage;

use crate::api::{FilterStatus, HttpFilter, LocalReply, RequestContext};
use crate::common::{self, FieldTable, HeaderMatch};
use crate::registry::{FilterConfig, FilterError, FilterFactory};

/// Type URL of the filter's config.
pub const HEALTH_CHECK_TYPE_URL: &str =
    "type.googleapis.com/envoy.extensions.filters.http.health_check.v3.HealthCheck";

/// The fields this filter implements.
pub const FIELDS: FieldTable = &[
    (
        "envoy.extensions.filters.http.health_check.v3.HealthCheck",
        &["pass_through_mode", "headers"],
    ),
    common::HEADER_MATCHER,
    common::STRING_MATCHER,
    common::REGEX_MATCHER,
    common::GOOGLE_RE2,
];

const HEALTHCHECKED_CLUSTER: HeaderName =
    HeaderName::from_static("x-envoy-upstream-healthchecked-cluster");

/// Marks a request the filter recognised as a health check, for its response phase.
struct HealthCheckRequest;

/// The filter.
#[derive(Debug)]
pub struct HealthCheckFilter {
    name: String,
    pass_through: bool,
    headers: Vec<HeaderMatch>,
}

impl HttpFilter for HealthCheckFilter {
    fn on_request_headers(
        &self,
        ctx: &mut RequestContext,
        parts: &mut http::request::Parts,
    ) -> FilterStatus {
        if !self.headers.iter().all(|m| m.matches(parts)) {
            return FilterStatus::Continue;
        }
        ctx.filter_data.insert(&self.name, HealthCheckRequest);
        if self.pass_through {
            return FilterStatus::Continue;
        }
        FilterStatus::LocalReply(LocalReply::new(StatusCode::OK, bytes::Bytes::new()))
    }

    fn on_response_headers(
        &self,
        ctx: &mut RequestContext,
        parts: &mut http::response::Parts,
    ) -> FilterStatus {
        if ctx
            .filter_data
            .get::<HealthCheckRequest>(&self.name)
            .is_some()
        {
            parts
                .headers
                .insert(HEALTHCHECKED_CLUSTER, HeaderValue::from_static(""));
        }
        FilterStatus::Continue
    }
}

/// Factory of [`HealthCheckFilter`].
#[derive(Debug)]
pub struct HealthCheckFactory;

impl FilterFactory for HealthCheckFactory {
    fn type_url(&self) -> &'static str {
        HEALTH_CHECK_TYPE_URL
    }

    fn create(&self, name: &str, config: &DynamicMessage) -> Result<FilterConfig, FilterError> {
        let c: pb::HealthCheck = common::decode(config, FIELDS)?;
        let Some(pass_through) = c.pass_through_mode else {
            return Err(common::invalid("pass_through_mode", "required"));
        };
        let headers = c
            .headers
            .iter()
            .enumerate()
            .map(|(i, m)| HeaderMatch::new(m, &format!("headers[{i}]")))
            .collect::<Result<_, _>>()?;
        Ok(FilterConfig::Filter {
            name: name.to_owned(),
            filter: Arc::new(HealthCheckFilter {
                name: name.to_owned(),
                pass_through: pass_through.value,
                headers,
            }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn create(json: serde_json::Value) -> Result<FilterConfig, FilterError> {
        let msg = match legate_proto::dynamic_from_json(
            "envoy.extensions.filters.http.health_check.v3.HealthCheck",
            &json,
        ) {
            Ok(m) => m,
            Err(e) => panic!("{e}"),
        };
        HealthCheckFactory.create("hc", &msg)
    }

    #[test]
    fn pass_through_mode_is_required() {
        let err = create(serde_json::json!({})).err();
        assert!(
            matches!(&err, Some(FilterError::InvalidConfig { field, .. }) if field == "pass_through_mode"),
            "{err:?}"
        );
    }

    #[test]
    fn cache_time_is_refused_by_name() {
        let err = create(serde_json::json!({"pass_through_mode": true, "cache_time": "1s"})).err();
        assert!(
            matches!(&err, Some(FilterError::InvalidConfig { field, .. }) if field == "cache_time"),
            "{err:?}"
        );
    }

    #[test]
    fn a_matching_request_is_answered_and_marked() -> Result<(), Box<dyn std::error::Error>> {
        let FilterConfig::Filter { filter, .. } = create(serde_json::json!({
            "pass_through_mode": false,
            "headers": [{"name": ":path", "string_match": {"exact": "/healthz"}}]
        }))?
        else {
            panic!("not a filter")
        };
        let mut ctx = RequestContext::default();
        let (mut req, ()) = http::Request::get("/healthz").body(())?.into_parts();
        let status = filter.on_request_headers(&mut ctx, &mut req);
        assert!(matches!(status, FilterStatus::LocalReply(ref r) if r.status == StatusCode::OK));
        let (mut resp, ()) = http::Response::new(()).into_parts();
        filter.on_response_headers(&mut ctx, &mut resp);
        assert!(resp.headers.contains_key(&HEALTHCHECKED_CLUSTER));
        let (mut other, ()) = http::Request::get("/healthz?x").body(())?.into_parts();
        let mut ctx = RequestContext::default();
        assert!(matches!(
            filter.on_request_headers(&mut ctx, &mut other),
            FilterStatus::Continue
        ));
        Ok(())
    }
}
