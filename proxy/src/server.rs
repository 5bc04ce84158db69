//! The running proxy: the published snapshot, listener tasks, and draining on shutdown.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use tokio::sync::watch;

use crate::cluster::ClusterManager;
use crate::config::{Bootstrap, NodeInfo};
use crate::listener::ListenerConfig;

/// One immutable, consistent view of the configuration. Requests load it once.
#[derive(Debug)]
pub struct Snapshot {
    pub listeners: Vec<(Arc<ListenerConfig>, SocketAddr)>,
    pub clusters: Arc<ClusterManager>,
    pub bootstrap: serde_json::Value,
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
    /// Shared with the health_check filters; toggled by `/healthcheck/fail` and `/healthcheck/ok`.
    pub health: legate_filters::ServerHealth,
    draining: AtomicBool,
    drain_tx: watch::Sender<bool>,
    shutdown_tx: watch::Sender<bool>,
}

impl Runtime {
    /// Whether the proxy is draining.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
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
}

/// Binds everything, serves until a signal or `/quitquitquit`, then drains and returns.
pub async fn run(bootstrap: Bootstrap, opts: ServeOptions) -> anyhow::Result<()> {
    let clusters = Arc::new(ClusterManager::new(bootstrap.clusters));
    let mut bound = Vec::new();
    for l in &bootstrap.listeners {
        let b = crate::listener::bind(l.clone()).map_err(|e| {
            anyhow::anyhow!("cannot bind listener {} on {}: {e}", l.name, l.address)
        })?;
        let addr = b.socket.local_addr()?;
        bound.push(b);
        tracing::info!(listener = %l.name, %addr, "listening");
    }
    let (drain_tx, drain_rx) = watch::channel(false);
    let (shutdown_tx, mut shutdown_rx) = watch::channel(false);
    let runtime = Arc::new(Runtime {
        snapshot: ArcSwap::from_pointee(Snapshot {
            listeners: bound
                .iter()
                .filter_map(|b| Some((b.config.clone(), b.socket.local_addr().ok()?)))
                .collect(),
            clusters: clusters.clone(),
            bootstrap: bootstrap.json,
            last_updated: SystemTime::now(),
        }),
        node: bootstrap.node,
        started: Instant::now(),
        command_line: opts.command_line.clone(),
        concurrency: opts.concurrency,
        health: opts.health.clone(),
        draining: AtomicBool::new(false),
        drain_tx,
        shutdown_tx,
    });
    // Clusters initialise (first DNS answers) before listeners take traffic.
    clusters.start_dns().await;
    for b in bound {
        tokio::spawn(crate::listener::serve(b, runtime.clone(), drain_rx.clone()));
    }
    if let Some(addr) = bootstrap.admin {
        let local = crate::admin::start(addr, runtime.clone()).await?;
        tracing::info!(%local, "admin listening");
        if let Some(path) = &opts.admin_address_path {
            std::fs::write(path, local.to_string())?;
        }
    }

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let graceful = tokio::select! {
        _ = term.recv() => true,
        _ = int.recv() => true,
        _ = shutdown_rx.changed() => false,
    };
    if graceful {
        tracing::info!("draining for up to {:?}", opts.drain_time);
        runtime.start_drain();
        let deadline = Instant::now() + opts.drain_time;
        while runtime.active_connections() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    tracing::info!("exiting");
    Ok(())
}
