//! The `legate` command line (Envoy's), as a library entry point: the `legate` binary calls
//! [`main_with_registry`] with the built-in filters, and a build with extra filters calls it
//! with its own registry (see `examples/filters/hello-filter`).

use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use legate_filters::FilterRegistry;

use crate::config;
use crate::server::ServeOptions;
use crate::services::ProxyServices;

#[derive(Debug, Parser)]
#[command(
    name = "legate",
    version,
    about = "Legate: an Envoy-compatible L7 proxy"
)]
struct Args {
    /// Bootstrap file (YAML or JSON, Envoy v3 API).
    #[arg(short = 'c', long = "config-path")]
    config_path: Option<String>,
    /// Bootstrap as a YAML string, merged over --config-path.
    #[arg(long = "config-yaml")]
    config_yaml: Option<String>,
    /// `serve` (default) or `validate`.
    #[arg(long, default_value = "serve")]
    mode: String,
    /// Worker threads (default: number of CPUs).
    #[arg(long)]
    concurrency: Option<usize>,
    /// trace, debug, info, warning/warn, error, critical, off.
    #[arg(short = 'l', long = "log-level", default_value = "info")]
    log_level: String,
    /// Overrides node.id.
    #[arg(long = "service-node")]
    service_node: Option<String>,
    /// Overrides node.cluster.
    #[arg(long = "service-cluster")]
    service_cluster: Option<String>,
    /// How long to drain connections on shutdown.
    #[arg(long = "drain-time-s", default_value_t = 600)]
    drain_time_s: u64,
    /// Writes the admin address here once it is bound.
    #[arg(long = "admin-address-path")]
    admin_address_path: Option<String>,
    /// No hot restart: no domain socket, SIGHUP and POST /hot_restart refused.
    #[arg(long = "disable-hot-restart")]
    disable_hot_restart: bool,
    /// Separates independent proxies on one host (their hot restart sockets).
    #[arg(long = "base-id", default_value_t = 0)]
    base_id: u32,
    /// Hot restart epoch: 0 for the first process, N to take over from epoch N-1.
    #[arg(long = "restart-epoch", default_value_t = 0)]
    restart_epoch: u32,
    /// How long a parent drains after a hot restart before it exits.
    #[arg(long = "parent-shutdown-time-s", default_value_t = 900)]
    parent_shutdown_time_s: u64,
    /// Prefix of the hot restart domain sockets (`@` = abstract namespace).
    #[arg(long = "socket-path", default_value = crate::hot_restart::DEFAULT_SOCKET_PATH)]
    socket_path: String,
}

/// Merges `b` into `a` as Envoy merges `--config-yaml` over the file: objects key by key,
/// everything else (lists included) replaced.
fn merge(a: &mut serde_json::Value, b: serde_json::Value) {
    match (a, b) {
        (serde_json::Value::Object(a), serde_json::Value::Object(b)) => {
            for (k, v) in b {
                merge(a.entry(k).or_insert(serde_json::Value::Null), v);
            }
        }
        (a, b) => *a = b,
    }
}

fn init_logging(level: &str) -> anyhow::Result<()> {
    let level = match level {
        "warning" => "warn",
        "critical" => "error",
        "trace" | "debug" | "info" | "warn" | "error" | "off" => level,
        other => anyhow::bail!("invalid log level {other:?}"),
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("LEGATE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    Ok(())
}

/// Runs `legate` with the filters of `registry`: parses Envoy's command line, reads and
/// validates the bootstrap, serves until a signal, and returns the process exit code.
pub fn main_with_registry(registry: FilterRegistry) -> std::process::ExitCode {
    match real_main(registry) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("{e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn real_main(mut registry: FilterRegistry) -> anyhow::Result<std::process::ExitCode> {
    let args = Args::parse();
    init_logging(&args.log_level)?;
    if args.restart_epoch != 0 && args.disable_hot_restart {
        anyhow::bail!(
            "--restart-epoch {} with --disable-hot-restart",
            args.restart_epoch
        );
    }
    let mut json = match &args.config_path {
        Some(p) => {
            let text = std::fs::read_to_string(p).with_context(|| format!("cannot read {p}"))?;
            config::parse_text(&text)?
        }
        None => serde_json::Value::Object(Default::default()),
    };
    if let Some(y) = &args.config_yaml {
        merge(&mut json, config::parse_text(y)?);
    }
    if args.config_path.is_none() && args.config_yaml.is_none() {
        anyhow::bail!("a configuration is required: -c FILE or --config-yaml STRING");
    }
    if let Some(node) = &args.service_node {
        merge(&mut json, serde_json::json!({"node": {"id": node}}));
    }
    if let Some(cluster) = &args.service_cluster {
        merge(&mut json, serde_json::json!({"node": {"cluster": cluster}}));
    }
    let services = ProxyServices::new();
    registry.set_services(services.handle());
    let name = args
        .config_path
        .clone()
        .unwrap_or_else(|| "--config-yaml".into());
    let validate = args.mode == "validate";
    if !validate && args.mode != "serve" {
        anyhow::bail!("--mode {}: expected serve or validate", args.mode);
    }
    // Building TLS contexts and access-log writers needs no runtime, but log files are opened
    // here, so validate mode builds exactly what serve mode would.
    let bootstrap = match config::load_json(json, &registry) {
        Ok(b) => b,
        Err(e) => {
            if validate {
                println!("error initializing configuration '{name}':\n{e}");
                return Ok(std::process::ExitCode::FAILURE);
            }
            anyhow::bail!("error initializing configuration '{name}':\n{e}");
        }
    };
    // The descriptors are only needed to read configuration; an idle proxy should not carry
    // them.
    crate::memory::release_config_memory();
    for w in &bootstrap.warnings {
        tracing::warn!("{w}");
    }
    if validate {
        println!("configuration '{name}' OK");
        return Ok(std::process::ExitCode::SUCCESS);
    }
    let concurrency = args
        .concurrency
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .max(1);
    let rt = runtime(concurrency)?;
    let opts = ServeOptions {
        drain_time: Duration::from_secs(args.drain_time_s),
        admin_address_path: args.admin_address_path.clone(),
        command_line: std::env::args().collect(),
        concurrency,
        health: registry.server_health(),
        registry: std::sync::Arc::new(registry),
        services,
        hot_restart: crate::hot_restart::Options {
            epoch: args.restart_epoch,
            base_id: args.base_id,
            parent_shutdown_time: Duration::from_secs(args.parent_shutdown_time_s),
            socket_path: args.socket_path.clone(),
            enabled: !args.disable_hot_restart,
            exe: std::env::args_os()
                .next()
                .map(|a| crate::hot_restart::Options::resolve_exe(&a))
                .unwrap_or_default(),
            args: std::env::args_os().skip(1).collect(),
        },
    };
    crate::hot_restart::serve(rt, bootstrap, opts)
}

/// The runtime the proxy serves on, with `workers` worker threads.
///
/// A proxy's tasks mostly hand data to one another: a stream's body to the upstream
/// connection's task, and back. Woken tasks should wait their turn, so that a connection's
/// task runs once for the frames of all the streams that were ready, and writes them with one
/// system call: that halves the CPU per message of a busy gRPC stream. With one worker a
/// current-thread runtime does that (its run queue is first in, first out). A multi-threaded
/// runtime runs the task a task just woke next, on the same thread (its "LIFO slot"); that
/// is turned off when tokio's unstable API is compiled in (`.cargo/config.toml` sets
/// `--cfg tokio_unstable` for this workspace's builds).
fn runtime(workers: usize) -> std::io::Result<tokio::runtime::Runtime> {
    if workers == 1 {
        return tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build();
    }
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.worker_threads(workers).enable_all();
    #[cfg(tokio_unstable)]
    builder.disable_lifo_slot();
    builder.build()
}
