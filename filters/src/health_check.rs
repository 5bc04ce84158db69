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
