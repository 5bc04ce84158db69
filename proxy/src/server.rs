//! The running proxy: the published snapshot, listener tasks, and draining on shutdown.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use tokio::sync::watch;

use crate::cluster::ClusterManager;
use crate::config::{Bootstrap, NodeInfo};
use crate::listener::ListenerConfig;
use crate::listener_manager::ListenerManager;
use crate::route::RouteTable;

/// One immutable, consistent view of the configuration. Requests load it once. Every field
/// is cheap to clone, so an update builds the next snapshot from the current one.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub listeners: Vec<(Arc<ListenerConfig>, SocketAddr)>,
    pub clusters: Arc<ClusterManager>,
    /// Route tables delivered by RDS, by [`crate::hcm::Routes::Rds`] key.
    pub routes: Arc<HashMap<Arc<str>, Arc<RouteTable>>>,
    pub bootstrap: Arc<serde_json::Value>,
    /// What xDS delivered (versions, times, rejections), for `/config_dump`.
    pub dynamic: Option<Arc<crate::xds::Dump>>,
    pub last_updated: SystemTime,
}

/// Process-wide state shared by listeners, connections and the admin server.
#[derive(Debug)]
pub struct Runtime {
    pub snapshot: ArcSwap<Snapshot>,
    pub node: NodeInfo,
    pub started: Instant,
    pub command_line: Vec<String>,
    pub concurrency: usize,
    /// `--drain-time-s`: how long a draining connection may take to finish.
    pub drain_time: Duration,
    /// Shared with the health_check filters; toggled by `/healthcheck/fail` and `/healthcheck/ok`.
    pub health: legate_filters::ServerHealth,
    /// Whether the initial configuration is in place (`/ready`): at once for a static
    /// bootstrap; with xDS, once the first complete configuration is applied or
    /// `initial_fetch_timeout` passed.
    initialized: AtomicBool,
    /// The filters' cluster calls and counters.
    pub services: Arc<crate::services::ProxyServices>,
    draining: AtomicBool,
    drain_tx: watch::Sender<bool>,
    shutdown_tx: watch::Sender<bool>,
    /// Sockets to hand over, counters inherited, the link to a parent or successor.
    pub hot_restart: crate::hot_restart::State,
}

impl Runtime {
    /// Whether the proxy is draining.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Whether the initial configuration is in place.
    pub fn is_initialized(&self) -> bool {
        self.initialized.load(Ordering::Acquire)
    }

    /// Marks the initial configuration as applied.
    pub fn set_initialized(&self) {
        if !self.initialized.swap(true, Ordering::AcqRel) {
            tracing::info!("initial configuration applied; ready");
        }
    }

    /// A receiver that turns true when the proxy drains.
    pub fn drain_signal(&self) -> watch::Receiver<bool> {
        self.drain_tx.subscribe()
    }

    /// Publishes the next snapshot, built from the current one.
    pub fn publish(&self, update: impl FnOnce(&mut Snapshot)) {
        let mut next = Snapshot::clone(&self.snapshot.load());
        update(&mut next);
        next.last_updated = SystemTime::now();
        self.snapshot.store(Arc::new(next));
    }

    /// Starts draining: listeners stop accepting and connections close gracefully.
    pub fn start_drain(&self) {
        self.draining.store(true, Ordering::Relaxed);
        let _ = self.drain_tx.send(true);
    }

    /// Asks the process to exit now (`/quitquitquit`).
    pub fn quit(&self) {
        let _ = self.shutdown_tx.send(true);
    }

    /// Connections still open on all listeners.
    pub fn active_connections(&self) -> i64 {
        let snap = self.snapshot.load();
        let mut seen: Vec<*const crate::hcm::HcmConfig> = Vec::new();
        let mut n = 0;
        for (l, _) in &snap.listeners {
            for c in l.chains.iter().chain(l.default_chain.iter()) {
                let p = Arc::as_ptr(&c.hcm);
                if !seen.contains(&p) {
                    seen.push(p);
                    n += c.hcm.stats.cx_active.get();
                }
            }
        }
        n
    }
}

/// Options the binary passes in.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub drain_time: Duration,
    pub admin_address_path: Option<String>,
    pub command_line: Vec<String>,
    pub concurrency: usize,
    pub health: legate_filters::ServerHealth,
    pub registry: Arc<legate_filters::FilterRegistry>,
    /// What the filter registry was given (see `FilterRegistry::set_services`).
    pub services: Arc<crate::services::ProxyServices>,
    /// `--restart-epoch`, `--base-id` and the rest of the hot restart options.
    pub hot_restart: crate::hot_restart::Options,
}

/// How [`run`] ended.
#[derive(Debug, Clone, Copy, Default)]
pub struct Outcome {
    /// A successor took over and this process drained.
    pub handed_over: bool,
    /// The successor this process started itself (`SIGHUP`, `POST /hot_restart`).
    pub successor: Option<u32>,
}

/// Binds everything (taking over the parent's sockets with `--restart-epoch` above 0),
/// serves until a signal, `/quitquitquit` or a successor's takeover, then drains and returns.
pub async fn run(bootstrap: Bootstrap, opts: ServeOptions) -> anyhow::Result<Outcome> {
    let clusters = Arc::new(ClusterManager::new(bootstrap.clusters));
    let (drain_tx, _) = watch::channel(false);
    let (shutdown_tx, mut shutdown_rx) = watch::channel(false);
    let runtime = Arc::new(Runtime {
        snapshot: ArcSwap::from_pointee(Snapshot {
            listeners: Vec::new(),
            clusters: clusters.clone(),
            routes: Default::default(),
            bootstrap: Arc::new(bootstrap.json),
            dynamic: None,
            last_updated: SystemTime::now(),
        }),
        node: bootstrap.node,
        started: Instant::now(),
        command_line: opts.command_line.clone(),
        concurrency: opts.concurrency,
        drain_time: opts.drain_time,
        health: opts.health.clone(),
        initialized: AtomicBool::new(bootstrap.dynamic.is_none()),
        services: opts.services.clone(),
        draining: AtomicBool::new(false),
        drain_tx,
        shutdown_tx,
        hot_restart: crate::hot_restart::State::new(opts.hot_restart.clone()),
    });
    runtime.services.bind(&runtime);
    let child = opts.hot_restart.epoch > 0;
    if let Some((link, uptime)) = crate::hot_restart::child::connect(&opts.hot_restart)? {
        crate::hot_restart::child::attach(&runtime, link, uptime);
    }
    // Clusters initialise (first DNS answers) before listeners take traffic.
    clusters.start_dns().await;
    if child {
        let mut wanted: Vec<(String, SocketAddr)> = bootstrap
            .listeners
            .iter()
            .map(|l| (l.name.clone(), l.address))
            .collect();
        if let Some(addr) = bootstrap.admin {
            wanted.push((crate::hot_restart::ADMIN_SOCKET.into(), addr));
        }
        let admin = bootstrap.admin;
        runtime.hot_restart.prepare(&wanted, |addr| {
            let s = if Some(addr) == admin {
                std::net::TcpListener::bind(addr)?
            } else {
                crate::listener::bind(addr)?.into_std()?
            };
            s.set_nonblocking(true)?;
            Ok(s)
        })?;
    }
    let mut listeners = ListenerManager::new(runtime.clone());
    for l in &bootstrap.listeners {
        listeners.upsert(l.clone()).map_err(|e| {
            anyhow::anyhow!("cannot bind listener {} on {}: {e}", l.name, l.address)
        })?;
    }
    runtime.publish(|s| s.listeners = listeners.bound());
    let mut admin_local = None;
    if let Some(addr) = bootstrap.admin {
        let local = crate::admin::start(addr, runtime.clone()).await?;
        tracing::info!(%local, "admin listening");
        admin_local = Some(local);
    }
    // The listener manager lives as long as the listeners: here, or in the xDS client that
    // changes them.
    let _listeners = match bootstrap.dynamic {
        Some(dynamic) => {
            crate::xds::spawn(runtime.clone(), listeners, dynamic, opts.registry.clone())?;
            None
        }
        None => Some(listeners),
    };
    let write_admin_address = || -> anyhow::Result<()> {
        if let (Some(path), Some(local)) = (&opts.admin_address_path, admin_local) {
            std::fs::write(path, local.to_string())?;
        }
        Ok(())
    };
    if child {
        // The parent serves until this process has its whole configuration (with xDS, the
        // first complete one); then it stops accepting and drains.
        while !runtime.is_initialized() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let rt = runtime.clone();
        tokio::task::spawn_blocking(move || crate::hot_restart::child::drain_parent(&rt)).await??;
    } else {
        write_admin_address()?;
    }
    crate::hot_restart::parent::listen_or_warn(&runtime);
    if child {
        write_admin_address()?;
    }

    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    let mut handed_over = runtime.hot_restart.handed_over_signal();
    let mut outcome = Outcome::default();
    let graceful = loop {
        tokio::select! {
            _ = term.recv() => break true,
            _ = int.recv() => break true,
            _ = shutdown_rx.changed() => break false,
            _ = hup.recv() => match crate::hot_restart::supervisor::request_restart(&runtime) {
                Ok(m) => tracing::info!("hot restart: {m}"),
                Err(m) => tracing::warn!("hot restart: {m}"),
            },
            r = handed_over.changed() => if r.is_ok() && *handed_over.borrow() {
                outcome.handed_over = true;
                break false;
            },
        }
    };
    if outcome.handed_over {
        // The successor accepts now; this process finishes what it has, up to
        // --parent-shutdown-time-s.
        let deadline = Instant::now() + opts.hot_restart.parent_shutdown_time;
        // A parent of our own still draining reports to us; our report must include its last.
        while (runtime.active_connections() > 0 || runtime.hot_restart.parent_reporting())
            && Instant::now() < deadline
        {
            // A stop meant for the whole proxy goes to a successor this process supervises.
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(20)) => {}
                _ = term.recv() => crate::hot_restart::supervisor::forward(&runtime, false),
                _ = int.recv() => crate::hot_restart::supervisor::forward(&runtime, true),
            }
        }
        outcome.successor = runtime.hot_restart.successor();
        let rt = runtime.clone();
        let _ = tokio::task::spawn_blocking(move || crate::hot_restart::parent::finish(&rt)).await;
    }
    if graceful {
        tracing::info!("draining for up to {:?}", opts.drain_time);
        runtime.start_drain();
        let deadline = Instant::now() + opts.drain_time;
        while runtime.active_connections() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    tracing::info!("exiting");
    Ok(outcome)
}
