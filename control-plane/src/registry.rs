//! The connected proxies and their sync state, for `/debug/syncz` and `/metrics`.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::SystemTime;

use serde::Serialize;

use crate::xds::stream::TypeStatus;

/// What `/debug/syncz` shows for one connected proxy (one ADS stream).
#[derive(Debug, Clone, Serialize)]
pub struct ProxyStatus {
    pub stream: u64,
    pub node_id: String,
    /// `NAMESPACE/NAME` of the `Pod` whose `status.podIP` is the proxy's IP, at connect time.
    pub pod: Option<String>,
    /// `node.metadata.LABELS`, or the pod's labels when the node gives none.
    pub labels: BTreeMap<String, String>,
    pub group: String,
    /// Seconds since the Unix epoch.
    pub connected_at: u64,
    /// Keyed by `cds`, `eds`, `lds`, `rds`, `sds`; only subscribed types.
    pub types: BTreeMap<&'static str, TypeStatus>,
    /// Every subscribed type is in sync.
    pub in_sync: bool,
}

/// Every open stream's status.
#[derive(Debug, Default)]
pub struct ProxyRegistry {
    proxies: Mutex<BTreeMap<u64, ProxyStatus>>,
}

impl ProxyRegistry {
    pub fn connected_at_now() -> u64 {
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    }

    pub fn update(&self, status: ProxyStatus) {
        if let Ok(mut proxies) = self.proxies.lock() {
            proxies.insert(status.stream, status);
        }
    }

    pub fn remove(&self, stream: u64) {
        if let Ok(mut proxies) = self.proxies.lock() {
            proxies.remove(&stream);
        }
    }

    pub fn len(&self) -> usize {
        self.proxies.lock().map(|p| p.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn list(&self) -> Vec<ProxyStatus> {
        self.proxies
            .lock()
            .map(|p| p.values().cloned().collect())
            .unwrap_or_default()
    }
}
