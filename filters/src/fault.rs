//! `envoy.filters.http.fault`: injects delays and aborts, by percentage or as the request's
//! `x-envoy-fault-*` headers ask, up to `max_active_faults` at a time.
//!
//! As in Envoy: a per-route `HTTPFault` replaces the filter's; when the active faults reach
//! `max_active_faults` no fault is injected; a delay comes first (the request waits in
//! [`FilterStatus::Wait`]) and an abort, if any, follows it; an abort is a local reply with
//! body `fault filter abort` (or `abort.response_body`) and response flag `FI`. With
//! `header_abort` the status comes from `x-envoy-fault-abort-request` (200..=599, else no
//! abort) and with `header_delay` the delay from `x-envoy-fault-delay-request` (ms); the
//! `...-percentage` headers then lower the configured percentage (never raise it).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, StatusCode};
use legate_proto::pb::envoy::extensions::filters::common::fault::v3 as commonpb;
use legate_proto::pb::envoy::extensions::filters::http::fault::v3 as pb;
use legate_proto::pb::envoy::r#type::v3 as typepb;
use legate_proto::DynamicMessage;

use crate::api::{FilterStatus, HttpFilter, LocalReply, RequestContext, Resumption, RouteConfig};
use crate::common::{self, FieldTable, Fraction};
use crate::registry::{FilterConfig, FilterError, FilterFactory};

/// Type URL of the filter's config (also its per-route config).
pub const FAULT_TYPE_URL: &str =
    "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault";
const CONFIG_TYPE: &str = "envoy.extensions.filters.http.fault.v3.HTTPFault";

const ABORT_HEADER: &str = "x-envoy-fault-abort-request";
const ABORT_PERCENT_HEADER: &str = "x-envoy-fault-abort-request-percentage";
const DELAY_HEADER: &str = "x-envoy-fault-delay-request";
const DELAY_PERCENT_HEADER: &str = "x-envoy-fault-delay-request-percentage";

/// The fields this filter implements.
pub const FIELDS: FieldTable = &[
    (
        CONFIG_TYPE,
        &[
            "delay",
            "abort",
            "max_active_faults",
            "disable_downstream_cluster_stats",
        ],
    ),
    (
        "envoy.extensions.filters.http.fault.v3.FaultAbort",
        &["http_status", "header_abort", "percentage", "response_body"],
    ),
    (
        "envoy.extensions.filters.http.fault.v3.FaultAbort.HeaderAbort",
        &[],
    ),
    (
        "envoy.extensions.filters.common.fault.v3.FaultDelay",
        &["fixed_delay", "header_delay", "percentage"],
    ),
    (
        "envoy.extensions.filters.common.fault.v3.FaultDelay.HeaderDelay",
        &[],
    ),
    common::FRACTIONAL_PERCENT,
];

/// Where a fault's value comes from.
#[derive(Debug, Clone, Copy)]
enum Source<T> {
    Fixed(T),
    Header,
}

/// A percentage that the request's header may lower when the fault is header-controlled.
#[derive(Debug, Clone, Copy)]
struct Percent {
    numerator: u32,
    denominator: i32,
}

impl Percent {
    fn new(p: Option<&typepb::FractionalPercent>) -> Self {
        Percent {
            numerator: p.map_or(0, |p| p.numerator),
            denominator: p.map_or(0, |p| p.denominator),
        }
    }

    fn sample(&self, headers: &HeaderMap, header: Option<&str>) -> bool {
        let from_header = header
            .and_then(|h| headers.get(h))
            .and_then(|v| v.to_str().ok()?.trim().parse::<u32>().ok());
        let numerator = from_header.map_or(self.numerator, |n| n.min(self.numerator));
        Fraction::new(&typepb::FractionalPercent {
            numerator,
            denominator: self.denominator,
        })
        .sample()
    }
}

/// One compiled `HTTPFault`.
#[derive(Debug)]
struct Settings {
    delay: Option<(Source<Duration>, Percent)>,
    abort: Option<(Source<StatusCode>, Percent, bytes::Bytes)>,
    max_active_faults: Option<u64>,
    /// Faults in progress under this config.
    active: Arc<AtomicU64>,
}

impl Settings {
    fn new(msg: &DynamicMessage) -> Result<Self, FilterError> {
        let c: pb::HttpFault = common::decode(msg, FIELDS)?;
        let delay = match &c.delay {
            None => None,
            Some(d) => {
                use commonpb::fault_delay::FaultDelaySecifier as S;
                let source = match &d.fault_delay_secifier {
                    Some(S::FixedDelay(fd)) => {
                        Source::Fixed(common::duration(fd).ok_or_else(|| {
                            common::invalid("delay.fixed_delay", "must not be negative")
                        })?)
                    }
                    Some(S::HeaderDelay(_)) => Source::Header,
                    None => {
                        return Err(common::invalid(
                            "delay",
                            "fixed_delay or header_delay is required",
                        ))
                    }
                };
                Some((source, Percent::new(d.percentage.as_ref())))
            }
        };
        let abort = match &c.abort {
            None => None,
            Some(a) => {
                use pb::fault_abort::ErrorType as E;
                let source = match &a.error_type {
                    Some(E::HttpStatus(s)) => Source::Fixed(
                        u16::try_from(*s)
                            .ok()
                            .filter(|s| (200..600).contains(s))
                            .and_then(|s| StatusCode::from_u16(s).ok())
                            .ok_or_else(|| {
                                common::invalid("abort.http_status", format!("invalid status {s}"))
                            })?,
                    ),
                    Some(E::HeaderAbort(_)) => Source::Header,
                    Some(E::GrpcStatus(_)) | None => {
                        return Err(common::invalid(
                            "abort",
                            "http_status or header_abort is required",
                        ))
                    }
                };
                let body = if a.response_body.is_empty() {
                    bytes::Bytes::from_static(b"fault filter abort")
                } else {
                    bytes::Bytes::from(a.response_body.clone())
                };
                Some((source, Percent::new(a.percentage.as_ref()), body))
            }
        };
        Ok(Settings {
            delay,
            abort,
            max_active_faults: c.max_active_faults.map(|v| u64::from(v.value)),
            active: Arc::new(AtomicU64::new(0)),
        })
    }

    fn delay(&self, headers: &HeaderMap) -> Option<Duration> {
        let (source, percent) = self.delay.as_ref()?;
        if !percent.sample(
            headers,
            Some(DELAY_PERCENT_HEADER).filter(|_| is_header(source)),
        ) {
            return None;
        }
        let d = match source {
            Source::Fixed(d) => *d,
            Source::Header => Duration::from_millis(
                headers
                    .get(DELAY_HEADER)?
                    .to_str()
                    .ok()?
                    .trim()
                    .parse()
                    .ok()?,
            ),
        };
        Some(d).filter(|d| !d.is_zero())
    }

    fn abort(&self, headers: &HeaderMap) -> Option<LocalReply> {
        let (source, percent, body) = self.abort.as_ref()?;
        if !percent.sample(
            headers,
            Some(ABORT_PERCENT_HEADER).filter(|_| is_header(source)),
        ) {
            return None;
        }
        let status = match source {
            Source::Fixed(s) => *s,
            Source::Header => headers
                .get(ABORT_HEADER)?
                .to_str()
                .ok()?
                .trim()
                .parse::<u16>()
                .ok()
                .filter(|s| (200..600).contains(s))
                .and_then(|s| StatusCode::from_u16(s).ok())?,
        };
        let mut r = LocalReply::new(status, body.clone());
        r.response_flag = Some("FI");
        Some(r)
    }
}

fn is_header<T>(s: &Source<T>) -> bool {
    matches!(s, Source::Header)
}

/// Counts a fault as active until the request's context is dropped.
struct ActiveFault(Arc<AtomicU64>);

impl Drop for ActiveFault {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The filter.
#[derive(Debug)]
pub struct FaultFilter {
    name: String,
    settings: Settings,
}

impl HttpFilter for FaultFilter {
    fn on_request_headers(
        &self,
        ctx: &mut RequestContext,
        parts: &mut http::request::Parts,
    ) -> FilterStatus {
        let settings = ctx.route_config::<Settings>().unwrap_or(&self.settings);
        // A fuzzy limit, as in Envoy: checked, not reserved.
        if settings
            .max_active_faults
            .is_some_and(|max| settings.active.load(Ordering::Relaxed) >= max)
        {
            return FilterStatus::Continue;
        }
        // Envoy draws the abort after the delay; without a runtime the draw is the same.
        let delay = settings.delay(&parts.headers);
        let abort = settings.abort(&parts.headers);
        if delay.is_none() && abort.is_none() {
            return FilterStatus::Continue;
        }
        settings.active.fetch_add(1, Ordering::Relaxed);
        ctx.filter_data
            .insert(&self.name, ActiveFault(settings.active.clone()));
        let Some(delay) = delay else {
            return match abort {
                Some(r) => FilterStatus::LocalReply(r),
                None => FilterStatus::Continue,
            };
        };
        FilterStatus::Wait(Box::pin(async move {
            tokio::time::sleep(delay).await;
            match abort {
                Some(r) => Resumption::LocalReply(r),
                None => Resumption::Continue {
                    set_headers: HeaderMap::new(),
                },
            }
        }))
    }
}

/// Factory of [`FaultFilter`].
#[derive(Debug)]
pub struct FaultFactory;

impl FilterFactory for FaultFactory {
    fn type_url(&self) -> &'static str {
        FAULT_TYPE_URL
    }

    fn fields(&self) -> crate::registry::FieldTable {
        FIELDS
    }

    fn create(&self, name: &str, config: &DynamicMessage) -> Result<FilterConfig, FilterError> {
        Ok(FilterConfig::Filter {
            name: name.to_owned(),
            filter: Arc::new(FaultFilter {
                name: name.to_owned(),
                settings: Settings::new(config)?,
            }),
        })
    }

    fn route_config_type(&self) -> Option<&'static str> {
        Some(CONFIG_TYPE)
    }

    fn create_route_config(&self, config: &DynamicMessage) -> Result<RouteConfig, FilterError> {
        Ok(Arc::new(Settings::new(config)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(json: serde_json::Value) -> Settings {
        let msg = match legate_proto::dynamic_from_json(CONFIG_TYPE, &json) {
            Ok(m) => m,
            Err(e) => panic!("{e}"),
        };
        match Settings::new(&msg) {
            Ok(s) => s,
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn the_percentage_header_only_lowers_the_configured_one() {
        let s = settings(serde_json::json!({
            "abort": {"header_abort": {}, "percentage": {"numerator": 0}}
        }));
        let mut h = HeaderMap::new();
        h.insert(ABORT_HEADER, http::HeaderValue::from_static("503"));
        h.insert(ABORT_PERCENT_HEADER, http::HeaderValue::from_static("100"));
        assert!(s.abort(&h).is_none());
    }

    #[test]
    fn header_abort_needs_a_valid_status() {
        let s = settings(serde_json::json!({
            "abort": {"header_abort": {}, "percentage": {"numerator": 100}}
        }));
        let mut h = HeaderMap::new();
        assert!(s.abort(&h).is_none());
        h.insert(ABORT_HEADER, http::HeaderValue::from_static("700"));
        assert!(s.abort(&h).is_none());
        h.insert(ABORT_HEADER, http::HeaderValue::from_static("418"));
        assert_eq!(s.abort(&h).map(|r| r.status.as_u16()), Some(418));
    }
}
