//! Clusters: their configuration, their hosts (static or resolved by DNS) and the manager that
//! names them. Each cluster publishes its current host set through an `ArcSwap`, so DNS
//! refreshes never block a request.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;

use crate::lb::{Balancer, LbPolicy};
use crate::stats::ClusterStats;
use crate::upstream::{Pool, UpstreamTls};

/// How a cluster finds its hosts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Discovery {
    Static,
    StrictDns,
    LogicalDns,
    /// Endpoints delivered by EDS (`ClusterLoadAssignment`s over ADS).
    Eds,
}

/// `dns_lookup_family`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DnsFamily {
    Auto,
    V4Only,
    V6Only,
    V4Preferred,
    All,
}

/// The HTTP protocol used towards a cluster's hosts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamProtocol {
    Http1,
    Http2,
    /// HTTP/2 when ALPN negotiates it, else HTTP/1.1.
    Alpn,
}

/// One configured endpoint.
#[derive(Debug, Clone)]
pub struct EndpointConfig {
    pub host: String,
    pub port: u16,
    pub weight: u32,
    pub hostname: String,
}

/// A locality's endpoints.
#[derive(Debug, Clone)]
pub struct LocalityConfig {
    pub zone: String,
    pub priority: u32,
    pub endpoints: Vec<EndpointConfig>,
}

/// A validated cluster.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    pub name: String,
    pub discovery: Discovery,
    /// The name the cluster's endpoints are requested under, for EDS clusters.
    pub eds_service_name: Option<String>,
    pub connect_timeout: Duration,
    pub lb: LbPolicy,
    pub localities: Vec<LocalityConfig>,
    pub tls: Option<Arc<UpstreamTls>>,
    pub protocol: UpstreamProtocol,
    pub dns_refresh: Duration,
    pub dns_family: DnsFamily,
    pub buffer_limit: Option<u32>,
    pub idle_timeout: Option<Duration>,
}

impl ClusterConfig {
    /// Whether the cluster resolves its hosts by DNS.
    pub fn is_dns(&self) -> bool {
        matches!(self.discovery, Discovery::StrictDns | Discovery::LogicalDns)
    }
}

/// An upstream host with its connection pool.
#[derive(Debug)]
pub struct Host {
    pub address: SocketAddr,
    pub hostname: String,
    pub weight: u32,
    pub zone: String,
    pub pool: Pool,
    active: AtomicUsize,
    pub rq_total: AtomicU64,
}

impl Host {
    fn new(address: SocketAddr, hostname: String, weight: u32, zone: String) -> Self {
        Self {
            address,
            hostname,
            weight,
            zone,
            pool: Pool::default(),
            active: AtomicUsize::new(0),
            rq_total: AtomicU64::new(0),
        }
    }

    /// Requests currently in flight to this host.
    pub fn active_requests(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }

    /// Counts a request in flight until the guard drops.
    pub fn track(self: &Arc<Self>) -> ActiveGuard {
        self.active.fetch_add(1, Ordering::Relaxed);
        self.rq_total.fetch_add(1, Ordering::Relaxed);
        ActiveGuard(self.clone())
    }
}

/// Decrements a host's active request count on drop.
#[derive(Debug)]
pub struct ActiveGuard(Arc<Host>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A running cluster.
#[derive(Debug)]
pub struct Cluster {
    pub config: ClusterConfig,
    balancer: ArcSwap<Balancer>,
    pub stats: ClusterStats,
}

impl Cluster {
    /// Builds a cluster. Static endpoints are parsed now; DNS clusters start empty and fill on
    /// their first resolution (see [`ClusterManager::start_dns`]).
    pub fn new(config: ClusterConfig) -> Self {
        let hosts = if config.discovery == Discovery::Static {
            static_hosts(&config)
        } else {
            Vec::new()
        };
        let balancer = Balancer::new(config.lb, hosts);
        Self {
            config,
            balancer: ArcSwap::from_pointee(balancer),
            stats: ClusterStats::default(),
        }
    }

    /// The current balancer (and so host set).
    pub fn balancer(&self) -> arc_swap::Guard<Arc<Balancer>> {
        self.balancer.load()
    }

    fn set_hosts(&self, new_hosts: Vec<(SocketAddr, String, u32, String)>) {
        // Keep existing hosts (and their pools) when their address survives.
        let current = self.balancer.load();
        let hosts: Vec<Arc<Host>> = new_hosts
            .into_iter()
            .map(|(addr, hostname, weight, zone)| {
                current
                    .hosts()
                    .iter()
                    .find(|h| h.address == addr && h.weight == weight)
                    .cloned()
                    .unwrap_or_else(|| Arc::new(Host::new(addr, hostname, weight, zone)))
            })
            .collect();
        let unchanged = hosts.len() == current.hosts().len()
            && hosts
                .iter()
                .zip(current.hosts())
                .all(|(a, b)| Arc::ptr_eq(a, b));
        if !unchanged {
            self.balancer
                .store(Arc::new(Balancer::new(self.config.lb, hosts)));
        }
    }

    /// Resolves a DNS cluster in the background after `first`, then every
    /// `dns_refresh_rate` while the cluster is in use.
    pub fn keep_resolving(self: &Arc<Self>, first: Duration) {
        if !self.config.is_dns() {
            return;
        }
        let weak = Arc::downgrade(self);
        let every = self.config.dns_refresh;
        tokio::spawn(async move {
            tokio::time::sleep(first).await;
            loop {
                let Some(c) = weak.upgrade() else { break };
                c.resolve_once().await;
                drop(c);
                tokio::time::sleep(every).await;
            }
        });
    }

    /// Replaces the hosts with an EDS assignment (the lowest priority with endpoints takes
    /// the traffic). Hosts whose address and weight survive keep their connection pools.
    pub fn set_localities(&self, localities: &[LocalityConfig]) {
        let hosts = lowest_priority(localities)
            .flat_map(|loc| {
                loc.endpoints.iter().filter_map(move |ep| {
                    let ip = ep.host.parse().ok()?;
                    Some((
                        SocketAddr::new(ip, ep.port),
                        ep.hostname.clone(),
                        ep.weight,
                        loc.zone.clone(),
                    ))
                })
            })
            .collect();
        self.set_hosts(hosts);
    }

    async fn resolve_once(&self) {
        let mut out = Vec::new();
        for loc in lowest_priority(&self.config.localities) {
            for ep in &loc.endpoints {
                let addrs = match tokio::net::lookup_host((ep.host.as_str(), ep.port)).await {
                    Ok(a) => a.collect::<Vec<_>>(),
                    Err(e) => {
                        tracing::warn!(cluster = %self.config.name, host = %ep.host, "DNS resolution failed: {e}");
                        continue;
                    }
                };
                let mut addrs = filter_family(addrs, self.config.dns_family);
                if self.config.discovery == Discovery::LogicalDns {
                    addrs.truncate(1);
                }
                for a in addrs {
                    out.push((a, ep.host.clone(), ep.weight, loc.zone.clone()));
                }
            }
        }
        self.set_hosts(out);
    }
}

fn filter_family(addrs: Vec<SocketAddr>, family: DnsFamily) -> Vec<SocketAddr> {
    let v4: Vec<_> = addrs.iter().copied().filter(SocketAddr::is_ipv4).collect();
    let v6: Vec<_> = addrs.iter().copied().filter(SocketAddr::is_ipv6).collect();
    match family {
        DnsFamily::V4Only => v4,
        DnsFamily::V6Only => v6,
        DnsFamily::Auto => {
            if v6.is_empty() {
                v4
            } else {
                v6
            }
        }
        DnsFamily::V4Preferred => {
            if v4.is_empty() {
                v6
            } else {
                v4
            }
        }
        DnsFamily::All => addrs,
    }
}

/// Without health checking every host is healthy, so the lowest priority with endpoints takes
/// all traffic, as Envoy's priority load computation gives.
fn lowest_priority(localities: &[LocalityConfig]) -> impl Iterator<Item = &LocalityConfig> {
    let p = localities
        .iter()
        .filter(|l| !l.endpoints.is_empty())
        .map(|l| l.priority)
        .min()
        .unwrap_or(0);
    localities.iter().filter(move |l| l.priority == p)
}

fn static_hosts(config: &ClusterConfig) -> Vec<Arc<Host>> {
    lowest_priority(&config.localities)
        .flat_map(|loc| {
            loc.endpoints.iter().filter_map(move |ep| {
                let ip = ep.host.parse().ok()?;
                Some(Arc::new(Host::new(
                    SocketAddr::new(ip, ep.port),
                    ep.hostname.clone(),
                    ep.weight,
                    loc.zone.clone(),
                )))
            })
        })
        .collect()
}

/// All clusters by name.
#[derive(Debug, Default)]
pub struct ClusterManager {
    clusters: HashMap<String, Arc<Cluster>>,
}

impl ClusterManager {
    /// Builds the clusters.
    pub fn new(configs: Vec<ClusterConfig>) -> Self {
        let clusters = configs
            .into_iter()
            .map(|c| (c.name.clone(), Arc::new(Cluster::new(c))))
            .collect();
        Self { clusters }
    }

    /// A manager over clusters that already run (their hosts and pools carry over).
    pub fn from_clusters(clusters: HashMap<String, Arc<Cluster>>) -> Self {
        Self { clusters }
    }

    /// The running clusters by name.
    pub fn clusters(&self) -> &HashMap<String, Arc<Cluster>> {
        &self.clusters
    }

    /// A cluster by name.
    pub fn get(&self, name: &str) -> Option<&Arc<Cluster>> {
        self.clusters.get(name)
    }

    /// All clusters, sorted by name.
    pub fn all(&self) -> Vec<&Arc<Cluster>> {
        let mut v: Vec<_> = self.clusters.values().collect();
        v.sort_by(|a, b| a.config.name.cmp(&b.config.name));
        v
    }

    /// Resolves every DNS cluster once (initialisation), then keeps refreshing them in the
    /// background at their `dns_refresh_rate`.
    pub async fn start_dns(&self) {
        let dns: Vec<Arc<Cluster>> = self
            .clusters
            .values()
            .filter(|c| c.config.is_dns())
            .cloned()
            .collect();
        futures_util::future::join_all(dns.iter().map(|c| c.resolve_once())).await;
        for c in dns {
            c.keep_resolving(c.config.dns_refresh);
        }
    }
}
