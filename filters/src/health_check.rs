//! `envoy.filters.http.health_check`: answers health checks (requests matching `headers`)
//! locally with 200, or lets them through to the upstream in pass-through mode.
//!
//! As in Envoy, the response to a health check carries
//! `x-envoy-upstream-healthchecked-cluster`. Envoy puts the bootstrap's `node.cluster` there;
//! filters do not see the bootstrap, so Legate sends it empty (which is what Envoy sends when
//! `node.cluster` is unset).
//!
//! While the server is failed ([`ServerHealth::fail`], what Envoy's admin
//! `POST /healthcheck/fail` does), health checks are answered locally with 503 even in
//! pass-through mode, and other responses carry `x-envoy-immediate-health-check-fail: true`.

use std::sync::atomic::{AtomicBool, Ordering};
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
const IMMEDIATE_FAIL: HeaderName = HeaderName::from_static("x-envoy-immediate-health-check-fail");

/// The server's health as Envoy's admin `/healthcheck/fail` and `/healthcheck/ok` set it,
/// shared by the health_check filters a registry builds
/// ([`crate::FilterRegistry::server_health`]). Cheap to clone; starts healthy.
#[derive(Debug, Clone, Default)]
pub struct ServerHealth(Arc<AtomicBool>);

impl ServerHealth {
    /// Marks the server failed (`POST /healthcheck/fail`).
    pub fn fail(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    /// Marks the server healthy again (`POST /healthcheck/ok`).
    pub fn ok(&self) {
        self.0.store(false, Ordering::Relaxed);
    }

    /// Whether the server is marked failed.
    pub fn is_failed(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// Marks a request the filter recognised as a health check, for its response phase.
struct HealthCheckRequest;

/// The filter.
#[derive(Debug)]
pub struct HealthCheckFilter {
    name: String,
    pass_through: bool,
    headers: Vec<HeaderMatch>,
    health: ServerHealth,
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
        if self.health.is_failed() {
            let mut r = LocalReply::new(StatusCode::SERVICE_UNAVAILABLE, bytes::Bytes::new());
            r.response_flag = Some("LH");
            return FilterStatus::LocalReply(r);
        }
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
        } else if self.health.is_failed() {
            parts
                .headers
                .insert(IMMEDIATE_FAIL, HeaderValue::from_static("true"));
        }
        FilterStatus::Continue
    }
}

/// Factory of [`HealthCheckFilter`]; its filters share one [`ServerHealth`].
#[derive(Debug, Default)]
pub struct HealthCheckFactory {
    health: ServerHealth,
}

impl HealthCheckFactory {
    /// A factory whose filters follow `health`.
    pub fn new(health: ServerHealth) -> Self {
        HealthCheckFactory { health }
    }
}

impl FilterFactory for HealthCheckFactory {
    fn type_url(&self) -> &'static str {
        HEALTH_CHECK_TYPE_URL
    }

    fn fields(&self) -> crate::registry::FieldTable {
        FIELDS
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
                health: self.health.clone(),
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
        HealthCheckFactory::default().create("hc", &msg)
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

    #[test]
    fn a_failed_server_answers_503_even_in_pass_through() -> Result<(), Box<dyn std::error::Error>>
    {
        let health = ServerHealth::default();
        let msg = legate_proto::dynamic_from_json(
            "envoy.extensions.filters.http.health_check.v3.HealthCheck",
            &serde_json::json!({
                "pass_through_mode": true,
                "headers": [{"name": ":path", "string_match": {"exact": "/healthz"}}]
            }),
        )?;
        let FilterConfig::Filter { filter, .. } =
            HealthCheckFactory::new(health.clone()).create("hc", &msg)?
        else {
            panic!("not a filter")
        };
        health.fail();
        let mut ctx = RequestContext::default();
        let (mut req, ()) = http::Request::get("/healthz").body(())?.into_parts();
        assert!(matches!(
            filter.on_request_headers(&mut ctx, &mut req),
            FilterStatus::LocalReply(ref r) if r.status == StatusCode::SERVICE_UNAVAILABLE
        ));
        let mut ctx = RequestContext::default();
        let (mut other, ()) = http::Request::get("/app").body(())?.into_parts();
        assert!(matches!(
            filter.on_request_headers(&mut ctx, &mut other),
            FilterStatus::Continue
        ));
        let (mut resp, ()) = http::Response::new(()).into_parts();
        filter.on_response_headers(&mut ctx, &mut resp);
        assert_eq!(
            resp.headers.get(&IMMEDIATE_FAIL),
            Some(&HeaderValue::from_static("true"))
        );
        health.ok();
        let mut ctx = RequestContext::default();
        assert!(matches!(
            filter.on_request_headers(&mut ctx, &mut req),
            FilterStatus::Continue
        ));
        Ok(())
    }
}
