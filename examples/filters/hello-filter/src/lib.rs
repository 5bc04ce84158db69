//! An HTTP filter defined outside Legate: `AddHeader` adds one header to every response (and
//! says so on the request it forwards), configured by its own message
//! `legate.example.AddHeader`.
//!
//! Legate has no descriptor for this message, so a bootstrap configures it the way Envoy
//! configures extensions it does not link in: an `xds.type.v3.TypedStruct` naming the type and
//! holding the message as proto3 JSON:
//!
//! ```yaml
//! http_filters:
//! - name: hello
//!   typed_config:
//!     "@type": type.googleapis.com/xds.type.v3.TypedStruct
//!     type_url: type.googleapis.com/legate.example.AddHeader
//!     value: {name: x-hello, value: world}
//! - name: envoy.filters.http.router
//!   typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}
//! ```
//!
//! An xDS server may also send it as a plain `Any` with the message's protobuf bytes.

use std::sync::Arc;

use http::header::{HeaderName, HeaderValue};
use legate_filters::{
    Counter, FilterConfig, FilterError, FilterFactory, FilterRegistry, FilterStatus, ForeignConfig,
    HttpFilter, RequestContext, Services,
};

/// The type URL this filter is registered under.
pub const ADD_HEADER_TYPE_URL: &str = "type.googleapis.com/legate.example.AddHeader";

/// `legate.example.AddHeader`: the filter's configuration, a protobuf message written in Rust
/// (field numbers are its wire format; serde reads its proto3 JSON form).
#[derive(Clone, PartialEq, prost::Message, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddHeader {
    /// The header to add to responses.
    #[prost(string, tag = "1")]
    pub name: String,
    /// Its value.
    #[prost(string, tag = "2")]
    #[serde(default)]
    pub value: String,
}

/// Adds the factory to a registry.
pub fn register(registry: &mut FilterRegistry) {
    registry.register(Arc::new(AddHeaderFactory));
}

/// The filter: one header name and value, and a counter of the responses it marked.
#[derive(Debug)]
struct AddHeaderFilter {
    name: HeaderName,
    value: HeaderValue,
    added: Counter,
}

impl HttpFilter for AddHeaderFilter {
    fn on_request_headers(
        &self,
        _ctx: &mut RequestContext,
        parts: &mut http::request::Parts,
    ) -> FilterStatus {
        parts
            .headers
            .insert("x-hello-filter", HeaderValue::from_static("seen"));
        FilterStatus::Continue
    }

    fn on_response_headers(
        &self,
        _ctx: &mut RequestContext,
        parts: &mut http::response::Parts,
    ) -> FilterStatus {
        parts.headers.insert(self.name.clone(), self.value.clone());
        self.added.inc();
        FilterStatus::Continue
    }
}

/// Builds [`AddHeaderFilter`]s from `legate.example.AddHeader`.
#[derive(Debug)]
pub struct AddHeaderFactory;

fn invalid(field: &str, reason: impl Into<String>) -> FilterError {
    FilterError::InvalidConfig {
        field: field.to_owned(),
        reason: reason.into(),
    }
}

impl FilterFactory for AddHeaderFactory {
    fn type_url(&self) -> &'static str {
        ADD_HEADER_TYPE_URL
    }

    fn create_foreign(
        &self,
        name: &str,
        config: ForeignConfig<'_>,
        services: &Services,
    ) -> Result<FilterConfig, FilterError> {
        let config: AddHeader = match config {
            ForeignConfig::Bytes(b) => {
                prost::Message::decode(b).map_err(|e| invalid("typed_config", e.to_string()))?
            }
            ForeignConfig::Json(v) => serde_json::from_value(v.clone())
                .map_err(|e| invalid("typed_config.value", e.to_string()))?,
        };
        let header = HeaderName::from_bytes(config.name.as_bytes())
            .map_err(|_| invalid("name", format!("{:?} is not a header name", config.name)))?;
        let value = HeaderValue::from_str(&config.value)
            .map_err(|_| invalid("value", "not a valid header value"))?;
        let filter = AddHeaderFilter {
            name: header,
            value,
            // Shown in `/stats` as `http.<stat_prefix>.hello.<filter name>.added`.
            added: services.stats.counter(&format!("hello.{name}.added")),
        };
        Ok(FilterConfig::Filter {
            name: name.to_owned(),
            filter: Arc::new(filter),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOOTSTRAP: &str = r#"
static_resources:
  listeners:
  - name: main
    address: {socket_address: {address: 127.0.0.1, port_value: 0}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          '@type': type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: main
          route_config:
            virtual_hosts:
            - {name: all, domains: ['*'], routes: [{match: {prefix: /}, direct_response: {status: 200}}]}
          http_filters:
          - name: hello
            typed_config:
              '@type': type.googleapis.com/xds.type.v3.TypedStruct
              type_url: TYPE
              value: VALUE
          - name: envoy.filters.http.router
            typed_config: {'@type': type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}
"#;

    fn load(type_url: &str, value: &str) -> Result<(), String> {
        let mut registry = FilterRegistry::with_builtins();
        register(&mut registry);
        let yaml = BOOTSTRAP.replace("TYPE", type_url).replace("VALUE", value);
        legate_proxy::config::load_text(&yaml, &registry)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    #[test]
    fn typed_struct_config_is_accepted_and_checked() {
        assert_eq!(
            load(ADD_HEADER_TYPE_URL, "{name: x-hello, value: world}"),
            Ok(())
        );
        let bad_field = load(ADD_HEADER_TYPE_URL, "{name: x-hello, colour: red}");
        assert!(
            bad_field
                .as_ref()
                .is_err_and(|e| e.contains("http_filters[0].typed_config")
                    && e.contains("unknown field `colour`")),
            "{bad_field:?}"
        );
        let bad_name = load(ADD_HEADER_TYPE_URL, "{name: 'not a header'}");
        assert!(
            bad_name
                .as_ref()
                .is_err_and(|e| e.contains("name: \"not a header\" is not a header name")),
            "{bad_name:?}"
        );
        let unknown = load("type.googleapis.com/legate.example.Nope", "{}");
        assert!(
            unknown.as_ref().is_err_and(|e| e
                .contains("unsupported extension type type.googleapis.com/legate.example.Nope")),
            "{unknown:?}"
        );
    }
}
