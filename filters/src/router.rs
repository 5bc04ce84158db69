//! The router's place in the chain: `envoy.filters.http.router` is terminal; the proxy
//! implements the forwarding itself and reads its options from [`RouterConfig`].

use legate_proto::{DynamicMessage, Value};

use crate::registry::{FilterConfig, FilterError, FilterFactory};

/// Type URL of Envoy's router filter.
pub const ROUTER_TYPE_URL: &str =
    "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router";

/// The fields of the router's config Legate accepts.
pub const FIELDS: crate::registry::FieldTable = &[(
    "envoy.extensions.filters.http.router.v3.Router",
    &[
        "suppress_envoy_headers",
        "dynamic_stats",
        "start_child_span",
    ],
)];

/// Router options Legate honours.
#[derive(Debug, Clone, Default)]
pub struct RouterConfig {
    /// `suppress_envoy_headers`: do not add `x-envoy-*` headers to upstream requests.
    pub suppress_envoy_headers: bool,
}

/// Factory of the router.
#[derive(Debug)]
pub struct RouterFactory;

impl FilterFactory for RouterFactory {
    fn type_url(&self) -> &'static str {
        ROUTER_TYPE_URL
    }

    fn fields(&self) -> crate::registry::FieldTable {
        FIELDS
    }

    fn create(&self, _name: &str, config: &DynamicMessage) -> Result<FilterConfig, FilterError> {
        let mut out = RouterConfig::default();
        for (field, value) in config.fields() {
            match (field.name(), value) {
                ("suppress_envoy_headers", Value::Bool(b)) => out.suppress_envoy_headers = *b,
                // Observability-only knobs that change no traffic.
                ("dynamic_stats" | "start_child_span", _) => {}
                (other, _) => {
                    return Err(FilterError::InvalidConfig {
                        field: other.to_owned(),
                        reason: "unsupported field".to_owned(),
                    })
                }
            }
        }
        Ok(FilterConfig::Router(out))
    }
}
