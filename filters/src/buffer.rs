//! `envoy.filters.http.buffer`: buffers the whole request before it goes upstream.
//!
//! As in Envoy: a request with a body has its headers held ([`FilterStatus::StopIteration`])
//! and its body buffered ([`DataStatus::StopAndBuffer`]) up to `max_request_bytes`, which
//! becomes the request's buffer limit (over it the chain answers 413 `Payload Too Large`); at
//! the end of the body (or at its trailers) a request without `content-length` gets one, and
//! everything goes upstream at once. Headers-only requests pass. A `BufferPerRoute` replaces
//! the limit (`buffer`) or turns the filter off on the route (`disabled`).

use std::sync::Arc;

use http::header::{HeaderMap, HeaderValue, CONTENT_LENGTH};
use legate_proto::pb::envoy::extensions::filters::http::buffer::v3 as pb;
use legate_proto::DynamicMessage;

use crate::api::{
    Data, DataStatus, FilterStatus, HttpFilter, Phases, RequestContext, RouteConfig, Trailers,
};
use crate::common::{self, FieldTable};
use crate::registry::{FilterConfig, FilterError, FilterFactory};

/// Type URL of the filter's config.
pub const BUFFER_TYPE_URL: &str =
    "type.googleapis.com/envoy.extensions.filters.http.buffer.v3.Buffer";
const CONFIG_TYPE: &str = "envoy.extensions.filters.http.buffer.v3.Buffer";
const PER_ROUTE_TYPE: &str = "envoy.extensions.filters.http.buffer.v3.BufferPerRoute";

/// The fields this filter implements.
pub const FIELDS: FieldTable = &[
    (CONFIG_TYPE, &["max_request_bytes"]),
    (PER_ROUTE_TYPE, &["disabled", "buffer"]),
];

/// One route's setting: a limit, or off.
#[derive(Debug, Clone, Copy)]
struct PerRoute(Option<usize>);

fn max_request_bytes(c: &pb::Buffer, field: &str) -> Result<usize, FilterError> {
    match c.max_request_bytes {
        Some(v) if v.value > 0 => Ok(v.value as usize),
        Some(_) => Err(common::invalid(field, "must be greater than 0")),
        None => Err(common::invalid(field, "is required")),
    }
}

/// Marks a request whose body this filter is buffering.
struct Buffering;

/// The filter.
#[derive(Debug)]
pub struct BufferFilter {
    name: String,
    max_request_bytes: usize,
}

/// Sets `content-length` on held headers that have none.
fn add_content_length(headers: Option<&mut HeaderMap>, len: usize) {
    if let Some(h) = headers {
        if !h.contains_key(CONTENT_LENGTH) {
            h.insert(CONTENT_LENGTH, HeaderValue::from(len));
        }
    }
}

impl HttpFilter for BufferFilter {
    fn phases(&self) -> Phases {
        Phases::REQUEST_HEADERS | Phases::REQUEST_BODY
    }

    fn on_request_headers(
        &self,
        ctx: &mut RequestContext,
        _parts: &mut http::request::Parts,
    ) -> FilterStatus {
        if ctx.end_stream {
            return FilterStatus::Continue;
        }
        let limit = match ctx.route_config::<PerRoute>() {
            Some(PerRoute(None)) => return FilterStatus::Continue,
            Some(PerRoute(Some(l))) => *l,
            None => self.max_request_bytes,
        };
        ctx.request_buffer_limit = Some(limit);
        ctx.filter_data.insert(&self.name, Buffering);
        FilterStatus::StopIteration
    }

    fn on_request_data(&self, ctx: &mut RequestContext, data: &mut Data<'_>) -> DataStatus {
        if ctx.filter_data.get::<Buffering>(&self.name).is_none() {
            return DataStatus::Continue;
        }
        if data.end_stream {
            add_content_length(data.headers.as_deref_mut(), data.data.len());
            return DataStatus::Continue;
        }
        DataStatus::StopAndBuffer
    }

    fn on_request_trailers(
        &self,
        ctx: &mut RequestContext,
        trailers: &mut Trailers<'_>,
    ) -> DataStatus {
        if ctx.filter_data.get::<Buffering>(&self.name).is_some() {
            add_content_length(trailers.headers.as_deref_mut(), trailers.data.len());
        }
        DataStatus::Continue
    }
}

/// Factory of [`BufferFilter`].
#[derive(Debug)]
pub struct BufferFactory;

impl FilterFactory for BufferFactory {
    fn type_url(&self) -> &'static str {
        BUFFER_TYPE_URL
    }

    fn fields(&self) -> FieldTable {
        FIELDS
    }

    fn create(&self, name: &str, config: &DynamicMessage) -> Result<FilterConfig, FilterError> {
        let c: pb::Buffer = common::decode(config, FIELDS)?;
        Ok(FilterConfig::Filter {
            name: name.to_owned(),
            filter: Arc::new(BufferFilter {
                name: name.to_owned(),
                max_request_bytes: max_request_bytes(&c, "max_request_bytes")?,
            }),
        })
    }

    fn route_config_type(&self) -> Option<&'static str> {
        Some(PER_ROUTE_TYPE)
    }

    fn create_route_config(&self, config: &DynamicMessage) -> Result<RouteConfig, FilterError> {
        use pb::buffer_per_route::Override;
        let c: pb::BufferPerRoute = common::decode(config, FIELDS)?;
        let setting = match &c.r#override {
            Some(Override::Disabled(true)) => PerRoute(None),
            Some(Override::Disabled(false)) => {
                return Err(common::invalid("disabled", "must be true when set"))
            }
            Some(Override::Buffer(b)) => {
                PerRoute(Some(max_request_bytes(b, "buffer.max_request_bytes")?))
            }
            None => {
                return Err(common::invalid(
                    "override",
                    "disabled or buffer is required",
                ))
            }
        };
        Ok(Arc::new(setting))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(json: serde_json::Value) -> Result<RouteConfig, FilterError> {
        let msg = match legate_proto::dynamic_from_json(PER_ROUTE_TYPE, &json) {
            Ok(m) => m,
            Err(e) => panic!("{e}"),
        };
        BufferFactory.create_route_config(&msg)
    }

    #[test]
    fn per_route_needs_disabled_true_or_a_buffer() {
        assert!(route(serde_json::json!({"disabled": true})).is_ok());
        assert!(route(serde_json::json!({"buffer": {"max_request_bytes": 10}})).is_ok());
        assert!(route(serde_json::json!({"buffer": {}})).is_err());
        assert!(route(serde_json::json!({})).is_err());
    }

    #[test]
    fn content_length_is_added_only_when_missing() {
        let mut h = HeaderMap::new();
        add_content_length(Some(&mut h), 12);
        assert_eq!(
            h.get(CONTENT_LENGTH).map(|v| v.as_bytes()),
            Some(&b"12"[..])
        );
        add_content_length(Some(&mut h), 99);
        assert_eq!(
            h.get(CONTENT_LENGTH).map(|v| v.as_bytes()),
            Some(&b"12"[..])
        );
    }
}
