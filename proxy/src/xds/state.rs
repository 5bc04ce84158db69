//! What xDS delivered and what of it runs: clusters (active and warming), endpoints,
//! listeners (active and warming), route configurations, and rejected resources. Every change
//! ends in one published snapshot.
//!
//! Warming follows Envoy: a new or changed EDS cluster serves only once its endpoints arrive
//! (the previous version serves meanwhile); a new or changed listener serves only once every
//! route configuration it names has arrived. Both give up waiting after
//! `initial_fetch_timeout` and go on without (no endpoints, no routes), as Envoy does.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use legate_filters::FilterRegistry;
use legate_proto::pb::google::protobuf::Any;

use super::{Dump, DumpEntry, EntryState, Kind};
use crate::cluster::{Cluster, Discovery, LocalityConfig};
use crate::config::{self, RdsRef};
use crate::listener::ListenerConfig;
use crate::listener_manager::ListenerManager;
use crate::route::RouteTable;
use crate::server::Runtime;

/// A resource as received.
#[derive(Debug, Clone)]
struct Meta {
    version: String,
    resource: Arc<Any>,
    updated: SystemTime,
}

#[derive(Debug, Default)]
struct ClusterEntry {
    active: Option<(Meta, Arc<Cluster>)>,
    warming: Option<(Meta, Arc<Cluster>, Instant)>,
    /// The newest version, waiting for the secrets it names.
    awaiting: Option<(Meta, Instant)>,
    /// Secrets the newest version names.
    sds: Vec<String>,
}

impl ClusterEntry {
    /// The newest version received.
    fn newest(&self) -> Option<&Meta> {
        self.awaiting
            .as_ref()
            .map(|(m, _)| m)
            .or(self.warming.as_ref().map(|(m, _, _)| m))
            .or(self.active.as_ref().map(|(m, _)| m))
    }
}

#[derive(Debug, Clone)]
struct ListenerVersion {
    meta: Meta,
    config: Arc<ListenerConfig>,
    rds: Vec<RdsRef>,
}

#[derive(Debug, Default)]
struct ListenerEntry {
    active: Option<ListenerVersion>,
    warming: Option<(ListenerVersion, Instant)>,
    /// The newest version, waiting for the secrets it names (with the routes it names, so
    /// they are fetched meanwhile).
    awaiting: Option<(Meta, Vec<RdsRef>, Instant)>,
    /// Secrets the newest version names.
    sds: Vec<String>,
}

impl ListenerEntry {
    /// The route configurations every version names.
    fn rds_refs(&self) -> impl Iterator<Item = &RdsRef> {
        self.active
            .iter()
            .chain(self.warming.iter().map(|(v, _)| v))
            .flat_map(|v| v.rds.iter())
            .chain(self.awaiting.iter().flat_map(|(_, r, _)| r.iter()))
    }

    fn newest(&self) -> Option<&Meta> {
        self.awaiting
            .as_ref()
            .map(|(m, _, _)| m)
            .or(self.warming.as_ref().map(|(v, _)| &v.meta))
            .or(self.active.as_ref().map(|v| &v.meta))
    }
}

#[derive(Debug)]
struct RouteEntry {
    meta: Meta,
    /// The configuration compiled for each filter list that uses it.
    compiled: HashMap<Arc<str>, Arc<RouteTable>>,
}

#[derive(Debug)]
struct EndpointEntry {
    meta: Meta,
    localities: Vec<LocalityConfig>,
}

#[derive(Debug)]
struct Rejected {
    resource: Arc<Any>,
    details: String,
    at: SystemTime,
}

/// An incoming resource: name, version, body.
pub type Upsert = (String, String, Any);

/// The xDS client's view of the dynamic configuration.
#[derive(Debug)]
pub struct State {
    runtime: Arc<Runtime>,
    registry: Arc<FilterRegistry>,
    manager: ListenerManager,
    static_clusters: HashMap<String, Arc<Cluster>>,
    static_rds: Vec<RdsRef>,
    clusters: BTreeMap<String, ClusterEntry>,
    endpoints: BTreeMap<String, EndpointEntry>,
    listeners: BTreeMap<String, ListenerEntry>,
    routes: BTreeMap<String, RouteEntry>,
    secrets: BTreeMap<String, Meta>,
    secret_values: config::Secrets,
    rejected: BTreeMap<(Kind, String), Rejected>,
    /// The last accepted `version_info` per type (state of the world).
    versions: BTreeMap<Kind, String>,
    /// Types that have had their first response.
    received: BTreeSet<Kind>,
    /// Types the proxy waits for before it is ready.
    expected: BTreeSet<Kind>,
    started: Instant,
    fetch_timeout: Duration,
}

impl State {
    pub fn new(
        runtime: Arc<Runtime>,
        registry: Arc<FilterRegistry>,
        manager: ListenerManager,
        config: &config::DynamicConfig,
    ) -> Self {
        let static_clusters = runtime.snapshot.load().clusters.clusters().clone();
        let mut expected = BTreeSet::new();
        if config.cds {
            expected.insert(Kind::Cluster);
        }
        if config.lds {
            expected.insert(Kind::Listener);
        }
        Self {
            runtime,
            registry,
            manager,
            static_clusters,
            static_rds: config.static_rds.clone(),
            clusters: BTreeMap::new(),
            endpoints: BTreeMap::new(),
            listeners: BTreeMap::new(),
            routes: BTreeMap::new(),
            secrets: BTreeMap::new(),
            secret_values: config::Secrets::new(),
            rejected: BTreeMap::new(),
            versions: BTreeMap::new(),
            received: BTreeSet::new(),
            expected,
            started: Instant::now(),
            fetch_timeout: config.initial_fetch_timeout,
        }
    }

    /// The last accepted state-of-the-world version of a type.
    pub fn version(&self, kind: Kind) -> String {
        self.versions.get(&kind).cloned().unwrap_or_default()
    }

    /// Records the version of an accepted state-of-the-world response.
    pub fn set_version(&mut self, kind: Kind, version: &str) {
        self.versions.insert(kind, version.to_owned());
    }

    /// Names known for a type (active or warming), for state-of-the-world removal.
    pub fn known(&self, kind: Kind) -> BTreeSet<String> {
        match kind {
            Kind::Cluster => self.clusters.keys().cloned().collect(),
            Kind::Listener => self.listeners.keys().cloned().collect(),
            Kind::Route => self.routes.keys().cloned().collect(),
            Kind::Endpoints => self.endpoints.keys().cloned().collect(),
            Kind::Secret => self.secrets.keys().cloned().collect(),
        }
    }

    /// The versions of what the proxy has, for Delta's `initial_resource_versions`.
    pub fn resource_versions(&self, kind: Kind) -> HashMap<String, String> {
        let mut out = HashMap::new();
        match kind {
            Kind::Cluster => {
                for (n, e) in &self.clusters {
                    if let Some((m, _)) = &e.active {
                        out.insert(n.clone(), m.version.clone());
                    }
                }
            }
            Kind::Listener => {
                for (n, e) in &self.listeners {
                    if let Some(v) = &e.active {
                        out.insert(n.clone(), v.meta.version.clone());
                    }
                }
            }
            Kind::Route => {
                for (n, e) in &self.routes {
                    out.insert(n.clone(), e.meta.version.clone());
                }
            }
            Kind::Endpoints => {
                for (n, e) in &self.endpoints {
                    out.insert(n.clone(), e.meta.version.clone());
                }
            }
            Kind::Secret => {
                for (n, m) in &self.secrets {
                    out.insert(n.clone(), m.version.clone());
                }
            }
        }
        out
    }

    /// The names the proxy must subscribe to for RDS and EDS (LDS and CDS are wildcard).
    pub fn wanted(&self, kind: Kind) -> BTreeSet<String> {
        match kind {
            Kind::Route => self
                .listeners
                .values()
                .flat_map(ListenerEntry::rds_refs)
                .chain(self.static_rds.iter())
                .map(|r| r.name.clone())
                .collect(),
            Kind::Endpoints => self
                .clusters
                .values()
                .flat_map(|e| {
                    e.active
                        .iter()
                        .map(|(_, c)| c)
                        .chain(e.warming.iter().map(|(_, c, _)| c))
                })
                .chain(self.static_clusters.values())
                .filter_map(|c| c.config.eds_service_name.clone())
                .collect(),
            Kind::Secret => self
                .clusters
                .values()
                .flat_map(|e| e.sds.iter())
                .chain(self.listeners.values().flat_map(|e| e.sds.iter()))
                .cloned()
                .collect(),
            Kind::Listener | Kind::Cluster => BTreeSet::new(),
        }
    }

    /// Applies one response: `upserts` replace or add resources, `removed` delete them.
    /// Returns the rejection message (for a NACK) when a resource was refused; the others
    /// are applied either way, and a refused resource keeps its previous version.
    pub fn apply(
        &mut self,
        kind: Kind,
        upserts: Vec<Upsert>,
        removed: Vec<String>,
    ) -> Option<String> {
        self.received.insert(kind);
        let mut errors = Vec::new();
        let now = SystemTime::now();
        for (name, version, any) in upserts {
            let meta = Meta {
                version,
                resource: Arc::new(any),
                updated: now,
            };
            let result = match kind {
                Kind::Cluster => self.upsert_cluster(&name, meta.clone(), false),
                Kind::Endpoints => self.upsert_endpoints(&name, meta.clone()),
                Kind::Listener => self.upsert_listener(&name, meta.clone(), false),
                Kind::Route => self.upsert_route(&name, meta.clone()),
                Kind::Secret => self.upsert_secret(&name, meta.clone()),
            };
            match result {
                Ok(()) => {
                    self.rejected.remove(&(kind, name));
                }
                Err(details) => {
                    errors.push(format!("{} '{name}': {details}", kind.noun()));
                    self.rejected.insert(
                        (kind, name),
                        Rejected {
                            resource: meta.resource,
                            details,
                            at: now,
                        },
                    );
                }
            }
        }
        for name in removed {
            self.remove(kind, &name);
        }
        self.settle();
        if errors.is_empty() {
            None
        } else {
            Some(errors.join("\n"))
        }
    }

    /// `rebuild`: the cluster is converted again even if unchanged (a secret it names
    /// changed).
    fn upsert_cluster(&mut self, name: &str, meta: Meta, rebuild: bool) -> Result<(), String> {
        if let Some(e) = self.clusters.get_mut(name).filter(|_| !rebuild) {
            if let Some((m, _)) = &mut e.active {
                if m.resource.value == meta.resource.value {
                    // Same cluster: a new version number only. A pending change is dropped.
                    *m = meta;
                    e.warming = None;
                    e.awaiting = None;
                    return Ok(());
                }
            }
        }
        let decoded = config::decode_cluster(&self.registry, &self.secret_values, &meta.resource)?;
        let Some(config) = decoded.value else {
            let entry = self.clusters.entry(name.to_owned()).or_default();
            entry.sds = decoded.sds;
            entry.awaiting = Some((meta, Instant::now()));
            return Ok(());
        };
        if config.name != name {
            return Err(format!("name mismatch ({})", config.name));
        }
        let cluster = Arc::new(Cluster::new(config));
        cluster.keep_resolving(Duration::ZERO);
        let entry = self.clusters.entry(name.to_owned()).or_default();
        entry.sds = decoded.sds;
        entry.awaiting = None;
        match cluster.config.eds_service_name.as_deref() {
            Some(service) => {
                if let Some(e) = self.endpoints.get(service) {
                    cluster.set_localities(&e.localities);
                    entry.active = Some((meta, cluster));
                    entry.warming = None;
                } else {
                    entry.warming = Some((meta, cluster, Instant::now()));
                }
            }
            None => {
                entry.active = Some((meta, cluster));
                entry.warming = None;
            }
        }
        Ok(())
    }

    fn upsert_endpoints(&mut self, name: &str, meta: Meta) -> Result<(), String> {
        let (service, localities) = config::decode_cla(&self.registry, &meta.resource)?;
        if service != name {
            return Err(format!("name mismatch ({service})"));
        }
        for c in self.clusters_of(name) {
            c.set_localities(&localities);
        }
        for e in self.clusters.values_mut() {
            let ready = e
                .warming
                .as_ref()
                .is_some_and(|(_, c, _)| c.config.eds_service_name.as_deref() == Some(name));
            if ready {
                if let Some((m, c, _)) = e.warming.take() {
                    c.set_localities(&localities);
                    e.active = Some((m, c));
                }
            }
        }
        self.endpoints
            .insert(name.to_owned(), EndpointEntry { meta, localities });
        Ok(())
    }

    /// Every running cluster (static, active, warming) whose endpoints come as `service`.
    fn clusters_of(&self, service: &str) -> Vec<Arc<Cluster>> {
        self.static_clusters
            .values()
            .chain(self.clusters.values().flat_map(|e| {
                e.active
                    .iter()
                    .map(|(_, c)| c)
                    .chain(e.warming.iter().map(|(_, c, _)| c))
            }))
            .filter(|c| {
                c.config.discovery == Discovery::Eds
                    && c.config.eds_service_name.as_deref() == Some(service)
            })
            .cloned()
            .collect()
    }

    /// `rebuild`: the listener is converted again even if unchanged (a secret it names
    /// changed).
    fn upsert_listener(&mut self, name: &str, meta: Meta, rebuild: bool) -> Result<(), String> {
        if let Some(e) = self.listeners.get_mut(name).filter(|_| !rebuild) {
            if let Some(v) = &mut e.active {
                if v.meta.resource.value == meta.resource.value {
                    v.meta = meta;
                    e.warming = None;
                    e.awaiting = None;
                    return Ok(());
                }
            }
        }
        let decoded = config::decode_listener(&self.registry, &self.secret_values, &meta.resource)?;
        let entry = self.listeners.entry(name.to_owned()).or_default();
        entry.sds = decoded.sds;
        let Some(config) = decoded.value else {
            entry.awaiting = Some((meta, decoded.rds, Instant::now()));
            return Ok(());
        };
        if config.name != name {
            return Err(format!("name mismatch ({})", config.name));
        }
        entry.awaiting = None;
        entry.warming = Some((
            ListenerVersion {
                meta,
                config: Arc::new(config),
                rds: decoded.rds,
            },
            Instant::now(),
        ));
        Ok(())
    }

    fn upsert_secret(&mut self, name: &str, meta: Meta) -> Result<(), String> {
        if self
            .secrets
            .get(name)
            .is_some_and(|m| m.resource.value == meta.resource.value)
        {
            self.secrets.insert(name.to_owned(), meta);
            return Ok(());
        }
        let secret = config::decode_secret(&self.registry, &meta.resource)?;
        self.secret_values.insert(name.to_owned(), secret);
        self.secrets.insert(name.to_owned(), meta);
        // Everything that names the secret is built again with it.
        let clusters: Vec<(String, Meta)> = self
            .clusters
            .iter()
            .filter(|(_, e)| e.sds.iter().any(|s| s == name))
            .filter_map(|(n, e)| Some((n.clone(), e.newest()?.clone())))
            .collect();
        for (n, m) in clusters {
            if let Err(e) = self.upsert_cluster(&n, m, true) {
                tracing::warn!(cluster = %n, "rebuilding with secret {name}: {e}");
            }
        }
        let listeners: Vec<(String, Meta)> = self
            .listeners
            .iter()
            .filter(|(_, e)| e.sds.iter().any(|s| s == name))
            .filter_map(|(n, e)| Some((n.clone(), e.newest()?.clone())))
            .collect();
        for (n, m) in listeners {
            if let Err(e) = self.upsert_listener(&n, m, true) {
                tracing::warn!(listener = %n, "rebuilding with secret {name}: {e}");
            }
        }
        Ok(())
    }

    fn upsert_route(&mut self, name: &str, meta: Meta) -> Result<(), String> {
        if let Some(e) = self.routes.get_mut(name) {
            if e.meta.resource.value == meta.resource.value {
                e.meta = meta;
                return Ok(());
            }
        }
        let mut compiled = HashMap::new();
        let refs = self.rds_refs(name);
        if refs.is_empty() {
            // Validate it even though nothing uses it yet.
            config::decode_route(&self.registry, &meta.resource, &[])?;
        }
        for r in refs {
            let table = config::decode_route(&self.registry, &meta.resource, &r.filters)?;
            compiled.insert(r.key.clone(), Arc::new(table));
        }
        self.routes
            .insert(name.to_owned(), RouteEntry { meta, compiled });
        Ok(())
    }

    /// Every distinct use of a route configuration.
    fn rds_refs(&self, name: &str) -> Vec<RdsRef> {
        let mut out: Vec<RdsRef> = Vec::new();
        let all = self
            .listeners
            .values()
            .flat_map(ListenerEntry::rds_refs)
            .chain(self.static_rds.iter());
        for r in all {
            if r.name == name && !out.iter().any(|o| o.key == r.key) {
                out.push(r.clone());
            }
        }
        out
    }

    fn remove(&mut self, kind: Kind, name: &str) {
        self.rejected.remove(&(kind, name.to_owned()));
        match kind {
            Kind::Cluster => {
                self.clusters.remove(name);
            }
            Kind::Endpoints => {
                if self.endpoints.remove(name).is_some() {
                    for c in self.clusters_of(name) {
                        c.set_localities(&[]);
                    }
                }
            }
            Kind::Listener => {
                self.listeners.remove(name);
                self.manager.remove(name);
            }
            Kind::Route => {
                self.routes.remove(name);
            }
            Kind::Secret => {
                // What was built with it keeps running; new uses wait for it again.
                self.secrets.remove(name);
                self.secret_values.remove(name);
            }
        }
    }

    /// Drops RDS and EDS resources nothing names any more (they have no delete signal in the
    /// state-of-the-world protocol).
    pub fn prune(&mut self) {
        let routes = self.wanted(Kind::Route);
        self.routes.retain(|n, _| routes.contains(n));
        let eds = self.wanted(Kind::Endpoints);
        self.endpoints.retain(|n, _| eds.contains(n));
        let sds = self.wanted(Kind::Secret);
        self.secrets.retain(|n, _| sds.contains(n));
        self.secret_values.retain(|n, _| sds.contains(n));
    }

    /// Finishes warming what can finish (or has waited long enough), then publishes.
    fn settle(&mut self) {
        let now = Instant::now();
        let timeout = self.fetch_timeout;
        let expired = |since: Instant| !timeout.is_zero() && now.duration_since(since) >= timeout;
        for e in self.clusters.values_mut() {
            if e.warming
                .as_ref()
                .is_some_and(|(_, _, since)| expired(*since))
            {
                if let Some((m, c, _)) = e.warming.take() {
                    tracing::warn!(cluster = %c.config.name, "no endpoints within the initial fetch timeout; serving without");
                    e.active = Some((m, c));
                }
            }
        }
        // Compile route configurations for listeners that name them under new filter lists.
        let names: Vec<String> = self.routes.keys().cloned().collect();
        for name in names {
            for r in self.rds_refs(&name) {
                let Some(entry) = self.routes.get(&name) else {
                    continue;
                };
                if entry.compiled.contains_key(&r.key) {
                    continue;
                }
                let result = config::decode_route(&self.registry, &entry.meta.resource, &r.filters);
                match result {
                    Ok(t) => {
                        if let Some(e) = self.routes.get_mut(&name) {
                            e.compiled.insert(r.key.clone(), Arc::new(t));
                        }
                    }
                    Err(e) => {
                        tracing::warn!(route = %name, "cannot compile for a listener's filters: {e}")
                    }
                }
            }
        }
        let ready_names: Vec<String> = self
            .listeners
            .iter()
            .filter_map(|(n, e)| {
                let (v, since) = e.warming.as_ref()?;
                let routes_ready = v.rds.iter().all(|r| {
                    self.routes
                        .get(&r.name)
                        .is_some_and(|e| e.compiled.contains_key(&r.key))
                });
                (routes_ready || expired(*since)).then(|| n.clone())
            })
            .collect();
        for name in ready_names {
            let Some(e) = self.listeners.get_mut(&name) else {
                continue;
            };
            let Some((v, _)) = e.warming.take() else {
                continue;
            };
            match self.manager.upsert(v.config.clone()) {
                Ok(()) => e.active = Some(v),
                Err(err) => {
                    let details = format!("cannot bind {}: {err}", v.config.address);
                    tracing::warn!(listener = %name, "{details}");
                    self.rejected.insert(
                        (Kind::Listener, name.clone()),
                        Rejected {
                            resource: v.meta.resource.clone(),
                            details,
                            at: SystemTime::now(),
                        },
                    );
                    if e.active.is_none() {
                        self.listeners.remove(&name);
                    }
                }
            }
        }
        self.publish();
        if self.initial_config_done(now) {
            self.runtime.set_initialized();
        }
    }

    fn initial_config_done(&self, now: Instant) -> bool {
        if self.runtime.is_initialized() {
            return true;
        }
        if !self.fetch_timeout.is_zero() && now.duration_since(self.started) >= self.fetch_timeout {
            return true;
        }
        self.expected.iter().all(|k| self.received.contains(k))
            && self
                .clusters
                .values()
                .all(|e| e.warming.is_none() && e.awaiting.is_none())
            && self
                .listeners
                .values()
                .all(|e| e.warming.is_none() && e.awaiting.is_none())
            && self.static_rds.iter().all(|r| {
                self.routes
                    .get(&r.name)
                    .is_some_and(|e| e.compiled.contains_key(&r.key))
            })
    }

    /// When warming next gives up (for the client's timer).
    pub fn next_deadline(&self) -> Option<Instant> {
        if self.fetch_timeout.is_zero() {
            return None;
        }
        let init = (!self.runtime.is_initialized()).then_some(self.started);
        self.clusters
            .values()
            .filter_map(|e| e.warming.as_ref().map(|(_, _, s)| *s))
            .chain(
                self.listeners
                    .values()
                    .filter_map(|e| e.warming.as_ref().map(|(_, s)| *s)),
            )
            .chain(init)
            .min()
            .map(|s| s + self.fetch_timeout)
    }

    /// Called when [`Self::next_deadline`] passes.
    pub fn tick(&mut self) {
        self.settle();
    }

    fn publish(&mut self) {
        let mut clusters = self.static_clusters.clone();
        for (n, e) in &self.clusters {
            if let Some((_, c)) = &e.active {
                clusters.insert(n.clone(), c.clone());
            }
        }
        let mut routes: HashMap<Arc<str>, Arc<RouteTable>> = HashMap::new();
        for e in self.routes.values() {
            for (k, t) in &e.compiled {
                routes.insert(k.clone(), t.clone());
            }
        }
        let dump = Arc::new(self.dump());
        let listeners = self.manager.bound();
        self.runtime.publish(|s| {
            s.clusters = Arc::new(crate::cluster::ClusterManager::from_clusters(clusters));
            s.routes = Arc::new(routes);
            s.listeners = listeners;
            s.dynamic = Some(dump);
        });
    }

    fn dump(&self) -> Dump {
        let mut entries = Vec::new();
        let mut push = |kind: Kind, name: &str, m: &Meta, state: EntryState| {
            entries.push(DumpEntry {
                kind,
                name: name.to_owned(),
                version: m.version.clone(),
                updated: m.updated,
                resource: m.resource.clone(),
                state,
            })
        };
        for (n, e) in &self.clusters {
            if let Some((m, _)) = &e.active {
                push(Kind::Cluster, n, m, EntryState::Active);
            }
            if let Some((m, _, _)) = &e.warming {
                push(Kind::Cluster, n, m, EntryState::Warming);
            }
        }
        for (n, e) in &self.listeners {
            if let Some(v) = &e.active {
                push(Kind::Listener, n, &v.meta, EntryState::Active);
            }
            if let Some((v, _)) = &e.warming {
                push(Kind::Listener, n, &v.meta, EntryState::Warming);
            }
        }
        for (n, e) in &self.routes {
            push(Kind::Route, n, &e.meta, EntryState::Active);
        }
        for (n, e) in &self.endpoints {
            push(Kind::Endpoints, n, &e.meta, EntryState::Active);
        }
        for (n, m) in &self.secrets {
            push(Kind::Secret, n, m, EntryState::Active);
        }
        for (n, e) in &self.clusters {
            if let Some((m, _)) = &e.awaiting {
                push(Kind::Cluster, n, m, EntryState::Warming);
            }
        }
        for (n, e) in &self.listeners {
            if let Some((m, _, _)) = &e.awaiting {
                push(Kind::Listener, n, m, EntryState::Warming);
            }
        }
        for ((kind, n), r) in &self.rejected {
            entries.push(DumpEntry {
                kind: *kind,
                name: n.clone(),
                version: String::new(),
                updated: r.at,
                resource: r.resource.clone(),
                state: EntryState::Rejected(r.details.clone()),
            });
        }
        Dump {
            versions: self.versions.clone(),
            entries,
        }
    }
}
