//! `legate-pilot`: serves the services of a directory of Kubernetes manifests, or of a
//! Kubernetes cluster, over ADS.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use legate_control_plane::admin::{self, AdminState};
use legate_control_plane::cache::SnapshotCache;
use legate_control_plane::debounce;
use legate_control_plane::kube as kube_source;
use legate_control_plane::metrics::Metrics;
use legate_control_plane::model::Model;
use legate_control_plane::registry::ProxyRegistry;
use legate_control_plane::source::FileSource;
use legate_control_plane::translate::TranslateOptions;
use legate_control_plane::xds::AdsServer;
use legate_proto::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::AggregatedDiscoveryServiceServer;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_stream::wrappers::TcpListenerStream;

/// legate-pilot: a small Istio-like control plane for Envoy and Legate.
#[derive(Debug, Parser)]
#[command(name = "legate-pilot", version)]
struct Args {
    /// A directory of Kubernetes manifests (Service, EndpointSlice, Namespace, Ingress, ...),
    /// watched for changes.
    #[arg(long, conflicts_with = "kubeconfig")]
    config_dir: Option<PathBuf>,
    /// Watch the Kubernetes API server of this kubeconfig file (its current context). Without
    /// this or --config-dir, the in-cluster configuration is used (KUBERNETES_SERVICE_HOST and
    /// the pod's service account).
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// Where ADS (plaintext gRPC) listens.
    #[arg(long, default_value = "0.0.0.0:15010")]
    xds_address: SocketAddr,
    /// Write the bound xDS address to this file (useful with port 0).
    #[arg(long)]
    xds_address_path: Option<PathBuf>,
    /// Where the admin endpoint (/ready, /metrics, /debug/syncz) listens.
    #[arg(long, default_value = "127.0.0.1:15014")]
    admin_address: SocketAddr,
    /// Write the bound admin address to this file (useful with port 0).
    #[arg(long)]
    admin_address_path: Option<PathBuf>,
    /// How long the model must be quiet before a change is translated and pushed.
    #[arg(long, default_value_t = 100)]
    debounce_ms: u64,
    /// The cluster's DNS domain.
    #[arg(long, default_value = "cluster.local")]
    domain_suffix: String,
}

/// Writes `addr` to `path` through a rename, so a reader never sees half of it.
fn write_address(path: &Path, addr: SocketAddr) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, format!("{addr}\n"))
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))
}

/// Where the model comes from.
enum Source {
    Dir(PathBuf),
    Kube(kube::Client),
}

async fn source_kind(args: &Args) -> Result<Source> {
    if let Some(dir) = &args.config_dir {
        return Ok(Source::Dir(dir.clone()));
    }
    if let Some(path) = &args.kubeconfig {
        let client = kube_source::client_from_kubeconfig(path)
            .await
            .context("--kubeconfig")?;
        return Ok(Source::Kube(client));
    }
    if kube_source::in_cluster() {
        return Ok(Source::Kube(kube_source::client_in_cluster()?));
    }
    anyhow::bail!(
        "no source: pass --config-dir DIR or --kubeconfig FILE (or run in a pod, where the \
         in-cluster configuration is used)"
    )
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let metrics = Arc::new(Metrics::default());
    let registry = Arc::new(ProxyRegistry::default());
    let (shutdown_tx, shutdown_rx) = watch::channel(false);

    let admin_listener = TcpListener::bind(args.admin_address)
        .await
        .with_context(|| format!("binding the admin address {}", args.admin_address))?;
    let admin_addr = admin_listener.local_addr()?;
    let xds_listener = TcpListener::bind(args.xds_address)
        .await
        .with_context(|| format!("binding the xDS address {}", args.xds_address))?;
    let xds_addr = xds_listener.local_addr()?;
    // The admin endpoint answers (not ready) while the first model loads, which may take a
    // while against a large cluster.
    let admin_state = Arc::new(AdminState {
        ready: AtomicBool::new(false),
        metrics: metrics.clone(),
        registry: registry.clone(),
    });
    tokio::spawn(admin::serve(
        admin_listener,
        admin_state.clone(),
        shutdown_rx.clone(),
    ));
    if let Some(path) = &args.admin_address_path {
        write_address(path, admin_addr)?;
    }

    let (models_tx, mut models_rx) = watch::channel(Arc::new(Model::default()));
    let model = match source_kind(&args).await? {
        Source::Dir(dir) => {
            let mut source = FileSource::new(&dir);
            source
                .scan(&metrics)
                .with_context(|| format!("--config-dir {}", dir.display()))?;
            let model = Arc::new(source.model());
            models_tx.send_replace(model.clone());
            models_rx.borrow_and_update();
            tokio::spawn(source.run(models_tx, metrics.clone(), shutdown_rx.clone()));
            model
        }
        Source::Kube(client) => {
            tokio::spawn(kube_source::run(
                client,
                models_tx,
                metrics.clone(),
                shutdown_rx.clone(),
            ));
            tracing::info!("listing the cluster's objects");
            tokio::select! {
                changed = models_rx.changed() => changed.context("the Kubernetes source stopped")?,
                _ = shutdown_signal() => return Ok(()),
            }
            models_rx.borrow_and_update().clone()
        }
    };
    tracing::info!(
        services = model.services.len(),
        endpoint_slices = model.endpoint_slices.len(),
        "initial model loaded"
    );
    let options = TranslateOptions {
        domain_suffix: args.domain_suffix.clone(),
    };
    let cache = Arc::new(SnapshotCache::new(model, options, metrics.clone()));
    tokio::spawn(debounce::run(
        models_rx,
        cache.clone(),
        Duration::from_millis(args.debounce_ms),
        shutdown_rx.clone(),
    ));

    tokio::spawn(legate_control_plane::memory::run(
        metrics.clone(),
        shutdown_rx.clone(),
    ));
    let ads = AdsServer::new(cache, registry, metrics, shutdown_rx.clone());
    let server = tonic::transport::Server::builder()
        .add_service(AggregatedDiscoveryServiceServer::new(ads))
        .serve_with_incoming_shutdown(TcpListenerStream::new(xds_listener), async move {
            shutdown_signal().await;
            tracing::info!("shutting down");
            let _ = shutdown_tx.send(true);
        });

    if let Some(path) = &args.xds_address_path {
        write_address(path, xds_addr)?;
    }
    admin_state.ready.store(true, Ordering::Release);
    tracing::info!(xds = %xds_addr, admin = %admin_addr, "legate-pilot ready");
    server.await.context("serving xDS")?;
    Ok(())
}
