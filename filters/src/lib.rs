//! Legate's HTTP filter API.
//!
//! A filter is an object-safe [`HttpFilter`] created once per listener configuration by a
//! [`FilterFactory`] registered under the Envoy type URL of its `typed_config`. The proxy runs
//! the filters of a connection manager in `http_filters` order on the request and in reverse
//! order on the response; the chain ends with the router (`envoy.filters.http.router`), which
//! is terminal and implemented by the proxy itself. See `docs/filters.md` for the phase chart.

mod api;
mod buffer;
mod common;
mod compressor;
mod cors;
mod ext_authz;
mod fault;
mod grpc_web;
mod header_mutation;
mod health_check;
mod local_ratelimit;
mod rbac;
mod registry;
mod router;
mod services;

pub use api::{
    Data, DataStatus, FilterData, FilterStatus, HttpFilter, LocalReply, Phases, RequestContext,
    RequestEdit, Resumption, RouteConfig, Trailers,
};
pub use ext_authz::EXT_AUTHZ_TYPE_URL;
pub use health_check::ServerHealth;
pub use registry::{
    typed_struct_json, FieldTable, FilterConfig, FilterError, FilterFactory, FilterRegistry,
    ForeignConfig,
};
pub use router::{RouterConfig, RouterFactory, ROUTER_TYPE_URL};
pub use services::{
    BoxFuture, CallError, ClusterClient, Counter, GrpcCall, GrpcReply, Services, StatsScope,
    StatsStore,
};
