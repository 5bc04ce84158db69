//! Filter factories, keyed by the type URL of their `typed_config`.

use std::collections::HashMap;
use std::sync::Arc;

use legate_proto::DynamicMessage;

use crate::api::{HttpFilter, RouteConfig};
use crate::services::Services;

/// The fields a filter implements, per message type (full name → field names). The
/// configuration gate checks a filter's `typed_config` (and its per-route config) against its
/// factory's table, and the factory checks again when it decodes: one list, in the filter.
pub type FieldTable = &'static [(&'static str, &'static [&'static str])];

/// A filter configuration whose message type Legate has no descriptor for (a user filter's
/// own message), as it arrived.
#[derive(Debug, Clone, Copy)]
pub enum ForeignConfig<'a> {
    /// The protobuf encoding (an `Any` received over xDS).
    Bytes(&'a [u8]),
    /// The proto3 JSON form: the `value` of an `xds.type.v3.TypedStruct` (or
    /// `udpa.type.v1.TypedStruct`) whose `type_url` names the filter's type.
    Json(&'a serde_json::Value),
}

/// Errors from building a filter out of its configuration.
#[derive(Debug, thiserror::Error)]
pub enum FilterError {
    #[error("unsupported filter type {type_url}")]
    UnknownType { type_url: String },
    #[error("{field}: {reason}")]
    InvalidConfig { field: String, reason: String },
}

/// A filter built from configuration: either the terminal router or a filter instance.
#[derive(Debug, Clone)]
pub enum FilterConfig {
    /// `envoy.filters.http.router`: the proxy forwards the request upstream here.
    Router(crate::router::RouterConfig),
    /// Any other filter.
    Filter {
        name: String,
        filter: Arc<dyn HttpFilter>,
    },
}

/// Builds filters of one type from their decoded `typed_config`.
pub trait FilterFactory: Send + Sync {
    /// The `@type` this factory accepts.
    fn type_url(&self) -> &'static str;

    /// Validates the configuration and builds the filter. `name` is the filter's name in
    /// `http_filters`. Factories of Envoy's filters implement this (or
    /// [`create_with_services`](Self::create_with_services)); a factory whose message is not
    /// one of Envoy's implements [`create_foreign`](Self::create_foreign) instead.
    fn create(&self, _name: &str, config: &DynamicMessage) -> Result<FilterConfig, FilterError> {
        Err(FilterError::InvalidConfig {
            field: "typed_config".into(),
            reason: format!(
                "{} is not built from an Envoy message",
                legate_proto::ReflectMessage::descriptor(config).full_name()
            ),
        })
    }

    /// Like [`create`](Self::create), for a filter that needs proxy capabilities (calling a
    /// cluster, counting stats). The registry always calls this one; the default forwards to
    /// `create`.
    fn create_with_services(
        &self,
        name: &str,
        config: &DynamicMessage,
        _services: &Services,
    ) -> Result<FilterConfig, FilterError> {
        self.create(name, config)
    }

    /// Builds the filter from a configuration whose type has no descriptor in Legate (see
    /// [`ForeignConfig`]); the factory decodes and validates it itself.
    fn create_foreign(
        &self,
        _name: &str,
        _config: ForeignConfig<'_>,
        _services: &Services,
    ) -> Result<FilterConfig, FilterError> {
        Err(FilterError::UnknownType {
            type_url: self.type_url().to_owned(),
        })
    }

    /// The fields this filter implements, for every message type its configuration (and its
    /// per-route configuration) may contain. The configuration gate rejects any other set
    /// field with its path.
    fn fields(&self) -> FieldTable {
        &[]
    }

    /// The message type this filter accepts in `typed_per_filter_config`, if any (its full
    /// name, e.g. `envoy.extensions.filters.http.fault.v3.HTTPFault`).
    fn route_config_type(&self) -> Option<&'static str> {
        None
    }

    /// Validates and builds a per-route configuration.
    fn create_route_config(&self, _config: &DynamicMessage) -> Result<RouteConfig, FilterError> {
        Err(FilterError::InvalidConfig {
            field: "typed_per_filter_config".into(),
            reason: "this filter has no per-route configuration".into(),
        })
    }
}

/// The set of filters a proxy build knows. Built explicitly at start-up and passed down; there
/// is no global registry.
#[derive(Default)]
pub struct FilterRegistry {
    factories: HashMap<&'static str, Arc<dyn FilterFactory>>,
    health: crate::health_check::ServerHealth,
    services: Services,
}

impl std::fmt::Debug for FilterRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.factories.keys()).finish()
    }
}

impl FilterRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// The registry with every built-in filter.
    pub fn with_builtins() -> Self {
        let mut r = Self::new();
        r.register(Arc::new(crate::router::RouterFactory));
        r.register(Arc::new(crate::header_mutation::HeaderMutationFactory));
        r.register(Arc::new(crate::local_ratelimit::LocalRateLimitFactory));
        r.register(Arc::new(crate::fault::FaultFactory));
        r.register(Arc::new(crate::cors::CorsFactory));
        r.register(Arc::new(crate::health_check::HealthCheckFactory::new(
            r.health.clone(),
        )));
        r.register(Arc::new(crate::rbac::RbacFactory));
        r.register(Arc::new(crate::ext_authz::ExtAuthzFactory));
        r.register(Arc::new(crate::buffer::BufferFactory));
        r.register(Arc::new(crate::compressor::CompressorFactory));
        r.register(Arc::new(crate::grpc_web::GrpcWebFactory));
        r
    }

    /// Gives the factories the proxy's capabilities (cluster calls, stats). Until this is
    /// called they get [`Services::unavailable`].
    pub fn set_services(&mut self, services: Services) {
        self.services = services;
    }

    /// The capabilities handed to factories.
    pub fn services(&self) -> &Services {
        &self.services
    }

    /// Every registered factory, in type URL order.
    pub fn factories(&self) -> Vec<&Arc<dyn FilterFactory>> {
        let mut v: Vec<_> = self.factories.values().collect();
        v.sort_by_key(|f| f.type_url());
        v
    }

    /// The factory whose filter or per-route configuration is the message `type_name`
    /// (`envoy.extensions.filters.http.cors.v3.CorsPolicy` → the cors factory).
    pub fn factory_for_message(&self, type_name: &str) -> Option<&Arc<dyn FilterFactory>> {
        self.factories().into_iter().find(|f| {
            legate_proto::type_name_of(f.type_url()) == type_name
                || f.route_config_type() == Some(type_name)
        })
    }

    /// The health state the built-in health_check filters follow; the admin's
    /// `/healthcheck/fail` and `/healthcheck/ok` flip it.
    pub fn server_health(&self) -> crate::health_check::ServerHealth {
        self.health.clone()
    }

    /// Adds (or replaces) a factory.
    pub fn register(&mut self, factory: Arc<dyn FilterFactory>) {
        self.factories.insert(factory.type_url(), factory);
    }

    /// The factory for a type URL.
    pub fn get(&self, type_url: &str) -> Option<&Arc<dyn FilterFactory>> {
        self.factories.get(type_url)
    }

    /// Builds a filter from its type URL and configuration.
    pub fn create(
        &self,
        name: &str,
        type_url: &str,
        config: &DynamicMessage,
    ) -> Result<FilterConfig, FilterError> {
        self.create_with(name, type_url, config, &self.services)
    }

    /// Builds a filter with the given services (the registry's, scoped to a connection
    /// manager).
    pub fn create_with(
        &self,
        name: &str,
        type_url: &str,
        config: &DynamicMessage,
        services: &Services,
    ) -> Result<FilterConfig, FilterError> {
        let factory = self.get(type_url).ok_or_else(|| FilterError::UnknownType {
            type_url: type_url.to_owned(),
        })?;
        factory.create_with_services(name, config, services)
    }

    /// Builds a filter from its `typed_config` as received (type URL and protobuf bytes):
    /// an Envoy message Legate has the descriptor of, a user filter's own message, or either
    /// wrapped in a `TypedStruct`. Returns the filter's type URL (the inner one for a
    /// `TypedStruct`) with the filter.
    pub fn create_from_any(
        &self,
        name: &str,
        type_url: &str,
        bytes: &[u8],
        services: &Services,
    ) -> Result<(String, FilterConfig), FilterError> {
        let type_name = legate_proto::type_name_of(type_url);
        if legate_proto::TYPED_STRUCT_TYPES.contains(&type_name) {
            let (inner_url, json) = typed_struct_json(type_name, bytes)?;
            let factory = self
                .get(&inner_url)
                .ok_or_else(|| FilterError::UnknownType {
                    type_url: inner_url.clone(),
                })?;
            let inner_name = legate_proto::type_name_of(&inner_url);
            let built = if legate_proto::descriptor(inner_name).is_ok() {
                let msg = legate_proto::dynamic_from_json(inner_name, &json).map_err(|e| {
                    FilterError::InvalidConfig {
                        field: "typed_config.value".into(),
                        reason: e.to_string(),
                    }
                })?;
                factory.create_with_services(name, &msg, services)?
            } else {
                factory.create_foreign(name, ForeignConfig::Json(&json), services)?
            };
            return Ok((inner_url, built));
        }
        let factory = self.get(type_url).ok_or_else(|| FilterError::UnknownType {
            type_url: type_url.to_owned(),
        })?;
        let built = if legate_proto::descriptor(type_name).is_ok() {
            let msg = legate_proto::dynamic_from_bytes(type_name, bytes).map_err(|e| {
                FilterError::InvalidConfig {
                    field: "typed_config".into(),
                    reason: e.to_string(),
                }
            })?;
            factory.create_with_services(name, &msg, services)?
        } else {
            factory.create_foreign(name, ForeignConfig::Bytes(bytes), services)?
        };
        Ok((type_url.to_owned(), built))
    }
}

/// The inner type URL and JSON value of a `TypedStruct` given as protobuf bytes.
pub fn typed_struct_json(
    type_name: &str,
    bytes: &[u8],
) -> Result<(String, serde_json::Value), FilterError> {
    let invalid = |reason: String| FilterError::InvalidConfig {
        field: "typed_config".into(),
        reason,
    };
    let msg =
        legate_proto::dynamic_from_bytes(type_name, bytes).map_err(|e| invalid(e.to_string()))?;
    let mut json = legate_proto::dynamic_to_json(&msg).map_err(|e| invalid(e.to_string()))?;
    let inner_url = match json.get("type_url") {
        Some(serde_json::Value::String(s)) if !s.is_empty() => s.clone(),
        _ => {
            return Err(FilterError::InvalidConfig {
                field: "typed_config.type_url".into(),
                reason: "a TypedStruct needs a type_url".into(),
            })
        }
    };
    let value = json
        .get_mut("value")
        .map(serde_json::Value::take)
        .unwrap_or_else(|| serde_json::Value::Object(Default::default()));
    Ok((inner_url, value))
}
