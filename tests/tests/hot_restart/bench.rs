//! The hot restart benchmark: the same consecutive restarts under the same load, for
//! Legate and for real Envoy 1.40 (`--restart-epoch`, shared memory, `--base-id`). Ignored by
//! `cargo test`; `bench/hot-restart.sh` runs it and writes `bench/results/hot-restart.md`.
//!
//! `HOT_RESTART_BENCH_RESTARTS` (default 20), `HOT_RESTART_BENCH_INTERVAL_MS` (least time
//! between two restarts, default 0), `HOT_RESTART_BENCH_ONLY` (`legate` or `envoy`) and
//! `HOT_RESTART_BENCH_OUT` (a file for the markdown table) shape a run.
//!
//! Both proxies get the same bootstrap with a fixed listener port (Envoy matches a parent's
//! socket by bound address, so a port-0 listener would move), the same `--drain-time-s` and
//! `--parent-shutdown-time-s`, and a new epoch every time the load has made progress. Time
//! to handover is from starting the child until its admin answers `GET /ready` 200 (Legate
//! writes its admin address once the parent stopped accepting; Envoy is LIVE once it told its
//! parent to drain).

use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use legate_tests::bins::ProxyKind;
use legate_tests::client::admin_get;
use legate_tests::process::{ProcessGuard, TempDir};
use legate_tests::upstream::Upstream;

use super::load::{Load, Shape};
use super::{base_id, bootstrap, POLL};

const DRAIN_TIME_S: u64 = 5;
const PARENT_SHUTDOWN_TIME_S: u64 = 6;

/// What one proxy did.
struct Outcome {
    kind: ProxyKind,
    restarts: u32,
    interval: Duration,
    wall: Duration,
    handovers: Vec<Duration>,
    counts: std::sync::Arc<super::load::Counts>,
    errors: Vec<String>,
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Waits (with a deadline) for the process's admin address, then for `/ready` 200.
async fn ready(guard: &mut ProcessGuard, admin_file: &std::path::Path) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = guard.exited() {
            anyhow::bail!("{} exited with {status}\n{}", guard.name(), guard.output());
        }
        if let Some(addr) = std::fs::read_to_string(admin_file)
            .ok()
            .and_then(|t| t.trim().parse().ok())
        {
            if let Ok((200, _)) = admin_get(addr, "/ready").await {
                return Ok(());
            }
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{} not ready\n{}",
            guard.name(),
            guard.output()
        );
        tokio::time::sleep(POLL).await;
    }
}

/// Waits for `more` further successful requests, or at most 10 s (a stalled proxy is a
/// result here, not an error).
async fn progress(load: &Load, more: u64) {
    let target = load.counts.ok() + more;
    let deadline = Instant::now() + Duration::from_secs(10);
    while load.counts.ok() < target && Instant::now() < deadline {
        tokio::time::sleep(POLL).await;
    }
}

/// `interval`: the least time from one restart to the next (0: as soon as the load made
/// progress).
async fn run(kind: ProxyKind, restarts: u32, interval: Duration) -> Result<Outcome> {
    let a = Upstream::plain("a").await?;
    let b = Upstream::plain("b").await?;
    let port = free_port()?;
    let yaml = bootstrap(a.addr.port(), b.addr.port(), false, &[]).replacen(
        "port_value: 0}}\n    filter_chains",
        &format!("port_value: {port}}}}}\n    filter_chains"),
        1,
    );
    let dir = TempDir::new(&format!("hot-restart-bench-{}", kind.name()))?;
    let config = dir.path().join("bootstrap.yaml");
    std::fs::write(&config, &yaml)?;
    let bin = kind.binary()?;
    let base = base_id();
    let spawn = |epoch: u32| -> Result<(ProcessGuard, std::path::PathBuf)> {
        let admin_file = dir.path().join(format!("admin-{epoch}"));
        let args: Vec<String> = [
            "-c",
            &config.display().to_string(),
            "--admin-address-path",
            &admin_file.display().to_string(),
            "-l",
            "warning",
            "--concurrency",
            "1",
            "--base-id",
            &base.to_string(),
            "--restart-epoch",
            &epoch.to_string(),
            "--drain-time-s",
            &DRAIN_TIME_S.to_string(),
            "--parent-shutdown-time-s",
            &PARENT_SHUTDOWN_TIME_S.to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let guard = ProcessGuard::spawn(
            &format!("{}-epoch-{epoch}", kind.name()),
            &bin,
            &args,
            dir.path(),
        )?;
        Ok((guard, admin_file))
    };
    let (mut first, admin_file) = spawn(0)?;
    ready(&mut first, &admin_file).await?;
    let main = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let load = Load::start(main, &Shape::default());
    progress(&load, 200).await;
    let mut guards = vec![first];
    let mut handovers = Vec::new();
    let started = Instant::now();
    for epoch in 1..=restarts {
        let t = Instant::now();
        let (mut child, admin_file) = spawn(epoch)?;
        ready(&mut child, &admin_file)
            .await
            .with_context(|| format!("{kind} epoch {epoch}"))?;
        handovers.push(t.elapsed());
        guards.push(child);
        progress(&load, 100).await;
        let next = t + interval;
        while Instant::now() < next {
            tokio::time::sleep(POLL).await;
        }
    }
    let wall = started.elapsed();
    // One more gRPC stream across the end of the restarts.
    let before = load.counts.grpc_streams_ok.load(Ordering::Relaxed);
    let deadline = Instant::now() + Duration::from_secs(10);
    while load.counts.grpc_streams_ok.load(Ordering::Relaxed) == before && Instant::now() < deadline
    {
        tokio::time::sleep(POLL).await;
    }
    let counts = load.counts.clone();
    let errors = load.stop().await;
    drop(guards);
    Ok(Outcome {
        kind,
        restarts,
        interval,
        wall,
        handovers,
        counts,
        errors,
    })
}

fn table(outcomes: &[Outcome]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| proxy | restarts (least interval) | failed requests + connection errors | http/1.1 ok / failed / closed unannounced | http/2 ok / failed / retried (unsent, GOAWAY) | gRPC messages / streams ok / failed | connect errors | time to handover mean (min–max) | wall time of the restarts |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|");
    for o in outcomes {
        let g = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
        let c = &o.counts;
        let n = u32::try_from(o.handovers.len()).unwrap_or(u32::MAX).max(1);
        let _ = writeln!(
            out,
            "| {} | {} ({:?}) | **{}** | {} / {} / {} | {} / {} / ({}, {}) | {} / {} / {} | {} | {:.0?} ({:.0?}–{:.0?}) | {:.1?} |",
            o.kind,
            o.restarts,
            o.interval,
            c.failures(),
            g(&c.h1_ok),
            g(&c.h1_failed),
            g(&c.h1_closed_unannounced),
            g(&c.h2_ok),
            g(&c.h2_failed),
            g(&c.unsent_retried),
            g(&c.goaway_retried),
            g(&c.grpc_messages),
            g(&c.grpc_streams_ok),
            g(&c.grpc_failed),
            g(&c.connect_errors),
            o.handovers.iter().sum::<Duration>() / n,
            o.handovers.iter().min().copied().unwrap_or_default(),
            o.handovers.iter().max().copied().unwrap_or_default(),
            o.wall,
        );
    }
    for o in outcomes {
        if !o.errors.is_empty() {
            let _ = writeln!(out, "\nFirst errors {} saw:\n", o.kind);
            for e in o.errors.iter().take(8) {
                let _ = writeln!(out, "- `{e}`");
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "benchmark with real Envoy; run by bench/hot-restart.sh"]
async fn bench_hot_restart_legate_and_envoy() -> Result<()> {
    let restarts = std::env::var("HOT_RESTART_BENCH_RESTARTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let kinds: Vec<ProxyKind> = match std::env::var("HOT_RESTART_BENCH_ONLY").as_deref() {
        Ok("legate") => vec![ProxyKind::Legate],
        Ok("envoy") => vec![ProxyKind::Envoy],
        _ => vec![ProxyKind::Legate, ProxyKind::Envoy],
    };
    let interval = Duration::from_millis(
        std::env::var("HOT_RESTART_BENCH_INTERVAL_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
    );
    let mut outcomes = Vec::new();
    for kind in kinds {
        outcomes.push(run(kind, restarts, interval).await?);
    }
    let report = table(&outcomes);
    println!("{report}");
    if let Ok(path) = std::env::var("HOT_RESTART_BENCH_OUT") {
        std::fs::write(&path, &report).with_context(|| format!("writing {path}"))?;
    }
    Ok(())
}
