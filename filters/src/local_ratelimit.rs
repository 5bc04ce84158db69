//! `envoy.filters.http.local_ratelimit`: a token bucket per filter config (the filter's, and
//! one per route that carries its own `LocalRateLimit`), shared by every worker.
//!
//! As in Envoy 1.40 the bucket refills continuously at `tokens_per_fill / fill_interval`
//! tokens per second, up to `max_tokens`, and starts full. A request that finds no whole
//! token is limited; when `filter_enforced` samples true it gets a local reply (429 unless
//! `status` says otherwise, body `local_rate_limited`, `response_headers_to_add`), otherwise
//! it continues with `request_headers_to_add_when_not_enforced`. With
//! `enable_x_ratelimit_headers: DRAFT_VERSION_03` every response the filter saw carries
//! `x-ratelimit-limit`, `x-ratelimit-remaining` and `x-ratelimit-reset` (seconds until the
//! next token).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::{HeaderValue, StatusCode};
use legate_proto::pb::envoy::extensions::filters::http::local_ratelimit::v3 as pb;
use legate_proto::DynamicMessage;

use crate::api::{FilterStatus, HttpFilter, LocalReply, RequestContext, RouteConfig};
use crate::common::{self, FieldTable, Fraction, HeaderAdd};
use crate::registry::{FilterConfig, FilterError, FilterFactory};

/// Type URL of the filter's config (also its per-route config).
pub const LOCAL_RATELIMIT_TYPE_URL: &str =
    "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit";
const CONFIG_TYPE: &str = "envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit";

/// The fields this filter implements.
pub const FIELDS: FieldTable = &[
    (
        CONFIG_TYPE,
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
    (
        "envoy.type.v3.TokenBucket",
        &["max_tokens", "tokens_per_fill", "fill_interval"],
    ),
    common::RUNTIME_FRACTIONAL_PERCENT,
    common::FRACTIONAL_PERCENT,
    common::HEADER_VALUE_OPTION,
    common::HEADER_VALUE,
];

/// A token bucket that refills continuously. `empty_at` is the instant at which the bucket
/// held (or would have held) no token; the tokens now are the time since then times the
/// rate, capped at `max`.
#[derive(Debug)]
struct TokenBucket {
    max: f64,
    /// Tokens per second.
    rate: f64,
    origin: Instant,
    /// Seconds after `origin` at which the bucket was empty.
    empty_at: Mutex<f64>,
}

impl TokenBucket {
    fn new(max_tokens: u32, tokens_per_fill: u32, fill_interval: Duration) -> Self {
        let max = f64::from(max_tokens);
        let rate = f64::from(tokens_per_fill) / fill_interval.as_secs_f64();
        TokenBucket {
            max,
            rate,
            origin: Instant::now(),
            // Starts full.
            empty_at: Mutex::new(-max / rate),
        }
    }

    fn now(&self) -> f64 {
        self.origin.elapsed().as_secs_f64()
    }

    fn tokens_at(&self, empty_at: f64, now: f64) -> f64 {
        ((now - empty_at) * self.rate).min(self.max)
    }

    /// Takes one token if there is one.
    fn consume(&self) -> bool {
        let now = self.now();
        let Ok(mut empty_at) = self.empty_at.lock() else {
            return true;
        };
        let tokens = self.tokens_at(*empty_at, now);
        if tokens < 1.0 {
            return false;
        }
        *empty_at = now - (tokens - 1.0) / self.rate;
        true
    }

    /// Whole tokens left, and whole seconds (rounded up) until the next token.
    fn status(&self) -> (u64, u64) {
        let now = self.now();
        let empty_at = self.empty_at.lock().map(|e| *e).unwrap_or(f64::MIN);
        let tokens = self.tokens_at(empty_at, now);
        let wait = if tokens >= 1.0 {
            0.0
        } else {
            ((1.0 - tokens) / self.rate).ceil()
        };
        (tokens.floor() as u64, wait as u64)
    }
}

/// One compiled `LocalRateLimit` (the filter's or a route's).
#[derive(Debug)]
struct Limiter {
    bucket: Option<Arc<TokenBucket>>,
    max_tokens: u32,
    status: StatusCode,
    enabled: Option<Fraction>,
    enforced: Option<Fraction>,
    request_headers_when_not_enforced: Vec<HeaderAdd>,
    response_headers: Vec<HeaderAdd>,
    x_ratelimit_headers: bool,
}

impl Limiter {
    fn new(msg: &DynamicMessage, per_route: bool) -> Result<Self, FilterError> {
        let c: pb::LocalRateLimit = common::decode(msg, FIELDS)?;
        if c.stat_prefix.is_empty() {
            return Err(common::invalid("stat_prefix", "required"));
        }
        let bucket = match &c.token_bucket {
            Some(tb) => {
                if tb.max_tokens == 0 {
                    return Err(common::invalid("token_bucket.max_tokens", "must be >= 1"));
                }
                let per_fill = tb.tokens_per_fill.as_ref().map_or(1, |v| v.value);
                let interval = tb
                    .fill_interval
                    .as_ref()
                    .and_then(common::duration)
                    .filter(|d| !d.is_zero())
                    .ok_or_else(|| {
                        common::invalid(
                            "token_bucket.fill_interval",
                            "a positive duration is required",
                        )
                    })?;
                if per_fill == 0 {
                    return Err(common::invalid(
                        "token_bucket.tokens_per_fill",
                        "must be >= 1",
                    ));
                }
                Some(Arc::new(TokenBucket::new(
                    tb.max_tokens,
                    per_fill,
                    interval,
                )))
            }
            None if per_route => {
                return Err(common::invalid(
                    "token_bucket",
                    "required in a per-route configuration",
                ))
            }
            None => None,
        };
        let status = c
            .status
            .as_ref()
            .and_then(|s| u16::try_from(s.code).ok())
            .filter(|c| *c >= 400)
            .and_then(|c| StatusCode::from_u16(c).ok())
            .unwrap_or(StatusCode::TOO_MANY_REQUESTS);
        let x_ratelimit_headers = match c.enable_x_ratelimit_headers {
            0 => false,
            1 => true,
            n => {
                return Err(common::invalid(
                    "enable_x_ratelimit_headers",
                    format!("unknown version {n}"),
                ))
            }
        };
        Ok(Limiter {
            max_tokens: c.token_bucket.as_ref().map_or(0, |t| t.max_tokens),
            bucket,
            status,
            enabled: Fraction::runtime(c.filter_enabled.as_ref()),
            enforced: Fraction::runtime(c.filter_enforced.as_ref()),
            request_headers_when_not_enforced: common::header_adds(
                &c.request_headers_to_add_when_not_enforced,
                "request_headers_to_add_when_not_enforced",
            )?,
            response_headers: common::header_adds(
                &c.response_headers_to_add,
                "response_headers_to_add",
            )?,
            x_ratelimit_headers,
        })
    }
}

/// What the response phase needs: the bucket whose state the `x-ratelimit-*` headers show.
struct Seen {
    bucket: Arc<TokenBucket>,
    max_tokens: u32,
}

/// The filter.
#[derive(Debug)]
pub struct LocalRateLimitFilter {
    name: String,
    limiter: Limiter,
}

impl HttpFilter for LocalRateLimitFilter {
    fn on_request_headers(
        &self,
        ctx: &mut RequestContext,
        headers: &mut http::request::Parts,
    ) -> FilterStatus {
        let limiter = ctx.route_config::<Limiter>().unwrap_or(&self.limiter);
        if !limiter.enabled.is_some_and(|f| f.sample()) {
            return FilterStatus::Continue;
        }
        let Some(bucket) = &limiter.bucket else {
            return FilterStatus::Continue;
        };
        let allowed = bucket.consume();
        let enforced = !allowed && limiter.enforced.is_some_and(|f| f.sample());
        let mut reply = None;
        if !allowed && enforced {
            let mut r = LocalReply::new(limiter.status, "local_rate_limited");
            for h in &limiter.response_headers {
                h.apply(&mut r.headers);
            }
            r.response_flag = Some("RL");
            reply = Some(r);
        } else if !allowed {
            for h in &limiter.request_headers_when_not_enforced {
                h.apply(&mut headers.headers);
            }
        }
        if limiter.x_ratelimit_headers {
            let seen = Seen {
                bucket: bucket.clone(),
                max_tokens: limiter.max_tokens,
            };
            ctx.filter_data.insert(&self.name, seen);
        }
        match reply {
            Some(r) => FilterStatus::LocalReply(r),
            None => FilterStatus::Continue,
        }
    }

    fn on_response_headers(
        &self,
        ctx: &mut RequestContext,
        headers: &mut http::response::Parts,
    ) -> FilterStatus {
        if let Some(seen) = ctx.filter_data.get::<Seen>(&self.name) {
            let (remaining, reset) = seen.bucket.status();
            let h = &mut headers.headers;
            h.append("x-ratelimit-limit", HeaderValue::from(seen.max_tokens));
            h.append("x-ratelimit-remaining", HeaderValue::from(remaining));
            h.append("x-ratelimit-reset", HeaderValue::from(reset));
        }
        FilterStatus::Continue
    }
}

/// Factory of [`LocalRateLimitFilter`].
#[derive(Debug)]
pub struct LocalRateLimitFactory;

impl FilterFactory for LocalRateLimitFactory {
    fn type_url(&self) -> &'static str {
        LOCAL_RATELIMIT_TYPE_URL
    }

    fn fields(&self) -> crate::registry::FieldTable {
        FIELDS
    }

    fn create(&self, name: &str, config: &DynamicMessage) -> Result<FilterConfig, FilterError> {
        Ok(FilterConfig::Filter {
            name: name.to_owned(),
            filter: Arc::new(LocalRateLimitFilter {
                name: name.to_owned(),
                limiter: Limiter::new(config, false)?,
            }),
        })
    }

    fn route_config_type(&self) -> Option<&'static str> {
        Some(CONFIG_TYPE)
    }

    fn create_route_config(&self, config: &DynamicMessage) -> Result<RouteConfig, FilterError> {
        Ok(Arc::new(Limiter::new(config, true)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bucket_starts_full_and_empties() {
        let b = TokenBucket::new(2, 1, Duration::from_secs(60));
        assert!(b.consume());
        assert_eq!(b.status(), (1, 0));
        assert!(b.consume());
        assert!(!b.consume());
        assert_eq!(b.status(), (0, 60));
    }

    #[test]
    fn the_bucket_refills_at_its_rate() {
        let b = TokenBucket::new(1, 1, Duration::from_millis(20));
        assert!(b.consume());
        assert!(!b.consume());
        std::thread::sleep(Duration::from_millis(30));
        assert!(b.consume());
    }
}
