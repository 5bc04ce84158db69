//! Proxy capabilities a filter may need, defined here and implemented by the proxy.
//!
//! A filter that calls a cluster (an authorization service over gRPC, a token endpoint over
//! HTTP) or emits a stat gets a [`Services`] handle from the registry when its factory builds
//! it ([`crate::FilterFactory::create_with_services`]). The handle is explicit: there is no
//! global client or stats store. A registry without services (unit tests, `--mode validate`
//! before the proxy exists) hands out [`Services::unavailable`], whose calls fail and whose
//! counters count without being shown anywhere.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::HeaderMap;

/// A boxed future, as the capability traits return them (they must stay object-safe).
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// How a call to a cluster failed before an application answer came back.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum CallError {
    /// The cluster is not in the current configuration.
    #[error("unknown cluster {0}")]
    UnknownCluster(String),
    /// The cluster has no host to send to.
    #[error("no healthy upstream in cluster {0}")]
    NoHost(String),
    /// Connecting or talking to the host failed.
    #[error("upstream failure: {0}")]
    Upstream(String),
    /// The call did not complete within its timeout.
    #[error("timeout")]
    Timeout,
    /// The peer answered with something that is not a valid response.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The proxy offers no such capability here (a registry without services).
    #[error("cluster calls are not available")]
    Unavailable,
}

/// The answer to a unary gRPC call that reached the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GrpcReply {
    /// `grpc-status: 0` with the response message (without its 5-byte frame header).
    Ok(Bytes),
    /// A non-zero `grpc-status` (or an HTTP status other than 200), with `grpc-message`.
    Status { code: u32, message: String },
}

/// A request for [`ClusterClient::grpc_unary`].
#[derive(Debug, Clone)]
pub struct GrpcCall {
    /// The cluster to call, by name, looked up in the configuration current at call time.
    pub cluster: String,
    /// `/package.Service/Method`.
    pub path: String,
    /// The `:authority` to send; the cluster name when empty (as Envoy does).
    pub authority: String,
    /// The serialized request message (the client adds the gRPC frame).
    pub message: Bytes,
    /// Extra request headers (`initial_metadata`).
    pub metadata: HeaderMap,
    /// Deadline of the whole call; also sent as `grpc-timeout`.
    pub timeout: Duration,
}

/// Calls to the proxy's clusters, through its connection pools.
pub trait ClusterClient: Send + Sync + std::fmt::Debug {
    /// A unary gRPC call over HTTP/2.
    fn grpc_unary(&self, call: GrpcCall) -> BoxFuture<Result<GrpcReply, CallError>>;

    /// An HTTP request whose body is sent in one piece and whose response is read whole (up
    /// to the client's limit).
    fn http(
        &self,
        cluster: &str,
        request: http::Request<Bytes>,
        timeout: Duration,
    ) -> BoxFuture<Result<http::Response<Bytes>, CallError>>;
}

/// A counter handle: cheap to clone and to increment (one relaxed atomic add).
#[derive(Debug, Clone, Default)]
pub struct Counter(Arc<AtomicU64>);

impl Counter {
    /// Adds one.
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    /// The current value.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// The named counters of a proxy. The proxy renders them in its admin `/stats`; counters
/// keep their value when a configuration is replaced by one that uses the same names.
#[derive(Debug, Default)]
pub struct StatsStore {
    counters: Mutex<BTreeMap<String, Counter>>,
}

impl StatsStore {
    /// The counter called `name`, created at zero on first use.
    pub fn counter(&self, name: &str) -> Counter {
        match self.counters.lock() {
            Ok(mut map) => map.entry(name.to_owned()).or_default().clone(),
            // A poisoned map still counts, unseen, rather than failing the filter.
            Err(_) => Counter::default(),
        }
    }

    /// Every counter with its value, sorted by name.
    pub fn snapshot(&self) -> Vec<(String, u64)> {
        match self.counters.lock() {
            Ok(map) => map.iter().map(|(k, c)| (k.clone(), c.get())).collect(),
            Err(_) => Vec::new(),
        }
    }
}

/// A stats scope: names are prefixed (`http.<stat_prefix>.` for a connection manager's
/// filters, as in Envoy).
#[derive(Debug, Clone)]
pub struct StatsScope {
    store: Arc<StatsStore>,
    prefix: String,
}

impl StatsScope {
    /// A scope over `store` with `prefix` (empty for the root).
    pub fn new(store: Arc<StatsStore>, prefix: impl Into<String>) -> Self {
        Self {
            store,
            prefix: prefix.into(),
        }
    }

    /// A nested scope: `prefix` is appended as is (include the trailing dot).
    pub fn scope(&self, prefix: &str) -> Self {
        Self {
            store: self.store.clone(),
            prefix: format!("{}{prefix}", self.prefix),
        }
    }

    /// The counter `<prefix><name>`.
    pub fn counter(&self, name: &str) -> Counter {
        self.store.counter(&format!("{}{name}", self.prefix))
    }

    /// The prefix of this scope.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }
}

/// The capabilities handed to a filter factory.
#[derive(Debug, Clone)]
pub struct Services {
    /// Calls to clusters.
    pub clusters: Arc<dyn ClusterClient>,
    /// Where the filter's counters go, already scoped to its connection manager.
    pub stats: StatsScope,
}

impl Services {
    /// Services whose cluster calls fail with [`CallError::Unavailable`] and whose counters
    /// are not shown anywhere.
    pub fn unavailable() -> Self {
        Self {
            clusters: Arc::new(NoClusters),
            stats: StatsScope::new(Arc::new(StatsStore::default()), ""),
        }
    }

    /// The same services with the stats scope narrowed by `prefix`.
    pub fn scoped(&self, prefix: &str) -> Self {
        Self {
            clusters: self.clusters.clone(),
            stats: self.stats.scope(prefix),
        }
    }
}

impl Default for Services {
    fn default() -> Self {
        Self::unavailable()
    }
}

#[derive(Debug)]
struct NoClusters;

impl ClusterClient for NoClusters {
    fn grpc_unary(&self, _call: GrpcCall) -> BoxFuture<Result<GrpcReply, CallError>> {
        Box::pin(async { Err(CallError::Unavailable) })
    }

    fn http(
        &self,
        _cluster: &str,
        _request: http::Request<Bytes>,
        _timeout: Duration,
    ) -> BoxFuture<Result<http::Response<Bytes>, CallError>> {
        Box::pin(async { Err(CallError::Unavailable) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scoped_counters_share_the_store() {
        let store = Arc::new(StatsStore::default());
        let s = Services {
            clusters: Arc::new(NoClusters),
            stats: StatsScope::new(store.clone(), "http.ingress."),
        };
        let c = s.scoped("ext_authz.").stats.counter("ok");
        c.inc();
        s.stats.scope("ext_authz.").counter("ok").inc();
        assert_eq!(
            store.snapshot(),
            vec![("http.ingress.ext_authz.ok".to_owned(), 2)]
        );
    }
}
