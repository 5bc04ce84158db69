//! The listeners the proxy runs, by name: binding new ones, swapping in a new configuration
//! for a changed one (its old connections drain), and closing removed ones.
//!
//! A listener keeps its socket across updates that keep its address, so a client never sees a
//! refused connection because of a configuration change; an update that moves it binds the new
//! address before the old one is closed.

use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::sync::watch;

use crate::listener::{Generation, ListenerConfig};
use crate::server::Runtime;

/// One running listener.
#[derive(Debug)]
struct Active {
    config: Arc<ListenerConfig>,
    local: SocketAddr,
    current: Arc<ArcSwap<Generation>>,
    /// Drains the connections of the current generation when dropped or set.
    generation_drain: watch::Sender<bool>,
    /// Stops the accept loop.
    stop: watch::Sender<bool>,
}

/// The running listeners, in the order they were added.
#[derive(Debug)]
pub struct ListenerManager {
    runtime: Arc<Runtime>,
    active: Vec<(String, Active)>,
}

impl ListenerManager {
    pub fn new(runtime: Arc<Runtime>) -> Self {
        Self {
            runtime,
            active: Vec::new(),
        }
    }

    /// Adds a listener, or replaces the configuration of the one with the same name. Fails
    /// only when a new address cannot be bound; the previous listener then keeps serving.
    pub fn upsert(&mut self, config: Arc<ListenerConfig>) -> std::io::Result<()> {
        if let Some((_, a)) = self.active.iter_mut().find(|(n, _)| *n == config.name) {
            if a.config.address == config.address {
                let (tx, rx) = watch::channel(false);
                a.current.store(Arc::new(Generation {
                    config: config.clone(),
                    drain: rx,
                }));
                let old = std::mem::replace(&mut a.generation_drain, tx);
                let _ = old.send(true);
                a.config = config;
                return Ok(());
            }
        }
        // During a hot restart the parent's socket for this listener is taken over.
        let socket = match self
            .runtime
            .hot_restart
            .inherit(&config.name, config.address)
        {
            Some(s) => tokio::net::TcpListener::from_std(s)?,
            None => crate::listener::bind(config.address)?,
        };
        let local = socket.local_addr()?;
        self.remove(&config.name);
        self.runtime
            .hot_restart
            .register(&config.name, config.address, &socket);
        let (generation_drain, drain_rx) = watch::channel(false);
        let (stop, stop_rx) = watch::channel(false);
        let current = Arc::new(ArcSwap::from_pointee(Generation {
            config: config.clone(),
            drain: drain_rx,
        }));
        tracing::info!(listener = %config.name, %local, "listening");
        tokio::spawn(crate::listener::serve(
            socket,
            config.name.clone(),
            current.clone(),
            self.runtime.clone(),
            stop_rx,
        ));
        self.active.push((
            config.name.clone(),
            Active {
                config,
                local,
                current,
                generation_drain,
                stop,
            },
        ));
        Ok(())
    }

    /// Stops accepting on a listener and drains its connections.
    pub fn remove(&mut self, name: &str) {
        if let Some(i) = self.active.iter().position(|(n, _)| n == name) {
            let (_, a) = self.active.remove(i);
            let _ = a.stop.send(true);
            let _ = a.generation_drain.send(true);
            self.runtime.hot_restart.unregister(name);
            tracing::info!(listener = %name, "listener removed; draining");
        }
    }

    /// Whether a listener of this name runs.
    pub fn contains(&self, name: &str) -> bool {
        self.active.iter().any(|(n, _)| n == name)
    }

    /// Names of the running listeners.
    pub fn names(&self) -> Vec<String> {
        self.active.iter().map(|(n, _)| n.clone()).collect()
    }

    /// Every running listener's configuration and bound address.
    pub fn bound(&self) -> Vec<(Arc<ListenerConfig>, SocketAddr)> {
        self.active
            .iter()
            .map(|(_, a)| (a.config.clone(), a.local))
            .collect()
    }
}
