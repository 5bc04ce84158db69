//! Filter factories, keyed by the type URL of their `typed_config`.

use std::collections::HashMap;
use std::sync::Arc;

use legate_proto::DynamicMessage;

use crate::api::{HttpFilter, RouteConfig};

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
    /// `http_filters`.
    fn create(&self, name: &str, config: &DynamicMessage) -> Result<FilterConfig, FilterError>;

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
        r
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
        let factory = self.get(type_url).ok_or_else(|| FilterError::UnknownType {
            type_url: type_url.to_owned(),
        })?;
        factory.create(name, config)
    }
}
