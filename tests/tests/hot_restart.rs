//! Hot restart: a new Legate process takes over the listening sockets of the running one and
//! the old one drains, under continuous HTTP/1.1, HTTP/2 and gRPC load, with zero failed
//! requests at the client; a changed bootstrap serves its new route right after the
//! handover; an invalid one fails in the child while the parent keeps serving; `SIGHUP` and
//! `POST /hot_restart` restart from the binary on disk with the first process as supervisor.

mod bench;
mod load;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use legate_tests::bins::legate_bin;
use legate_tests::client::{admin_get, send, Request, Transport};
use legate_tests::process::{ProcessGuard, TempDir};
use legate_tests::proxy::parse_listeners;
use legate_tests::upstream::Upstream;

use load::{Load, Shape};

const DEADLINE: Duration = Duration::from_secs(15);
const POLL: Duration = Duration::from_millis(20);

/// A `--base-id` no other test process uses, so their domain sockets never meet.
fn base_id() -> u32 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    (std::process::id() % 40_000) * 100 + 1_000 + NEXT.fetch_add(1, Ordering::Relaxed)
}

/// Listener `main` (port 0) routing `/new` to cluster `b` when `new_route`, everything else
/// to `a` over HTTP/2 (for the gRPC stream); `more_listeners` appended.
fn bootstrap(a: u16, b: u16, new_route: bool, more_listeners: &[&str]) -> String {
    let route_new = if new_route {
        "              - match: {prefix: /new}\n                route: {cluster: b}\n"
    } else {
        ""
    };
    let listener = |name: &str, port: u16| {
        format!(
            r#"  - name: {name}
    address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          '@type': type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: ingress
          route_config:
            virtual_hosts:
            - name: all
              domains: ['*']
              routes:
{route_new}              - match: {{prefix: /}}
                route: {{cluster: a, timeout: 0s}}
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{'@type': type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
"#
        )
    };
    let mut listeners = listener("main", 0);
    for l in more_listeners {
        let (name, port) = l.split_once(':').unwrap_or((l, "0"));
        listeners.push_str(&listener(name, port.parse().unwrap_or(0)));
    }
    let cluster = |name: &str, port: u16| {
        format!(
            r#"  - name: {name}
    type: STATIC
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        '@type': type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{http2_protocol_options: {{}}}}
    load_assignment:
      cluster_name: {name}
      endpoints:
      - lb_endpoints:
        - endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}}}
"#
        )
    };
    format!(
        "admin: {{address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}}}\nstatic_resources:\n  listeners:\n{listeners}  clusters:\n{}{}",
        cluster("a", a),
        cluster("b", b)
    )
}

/// The processes of one hot-restarting proxy: one base id, one directory.
struct Family {
    dir: TempDir,
    bin: PathBuf,
    base_id: u32,
    drain_time_s: u64,
    parent_shutdown_time_s: u64,
}

/// One Legate process.
struct Generation {
    epoch: u32,
    guard: ProcessGuard,
    admin_file: PathBuf,
}

impl Family {
    fn new(name: &str, drain_time_s: u64, parent_shutdown_time_s: u64) -> Result<Self> {
        Ok(Self {
            dir: TempDir::new(name)?,
            bin: legate_bin()?,
            base_id: base_id(),
            drain_time_s,
            parent_shutdown_time_s,
        })
    }

    fn args(&self, epoch: u32, config: &Path, admin_file: &Path) -> Vec<String> {
        vec![
            "-c".into(),
            config.display().to_string(),
            "--admin-address-path".into(),
            admin_file.display().to_string(),
            "-l".into(),
            "info".into(),
            "--concurrency".into(),
            "1".into(),
            "--base-id".into(),
            self.base_id.to_string(),
            "--restart-epoch".into(),
            epoch.to_string(),
            "--drain-time-s".into(),
            self.drain_time_s.to_string(),
            "--parent-shutdown-time-s".into(),
            self.parent_shutdown_time_s.to_string(),
        ]
    }

    /// Starts the process of `epoch` with the bootstrap `yaml`.
    fn spawn(&self, epoch: u32, yaml: &str) -> Result<Generation> {
        let config = self.dir.path().join(format!("bootstrap-{epoch}.yaml"));
        std::fs::write(&config, yaml)?;
        let admin_file = self.dir.path().join(format!("admin-{epoch}"));
        let _ = std::fs::remove_file(&admin_file);
        let guard = ProcessGuard::spawn(
            &format!("legate-epoch-{epoch}"),
            &self.bin,
            &self.args(epoch, &config, &admin_file),
            self.dir.path(),
        )?;
        Ok(Generation {
            epoch,
            guard,
            admin_file,
        })
    }
}

impl Generation {
    /// Waits until the process wrote its admin address: for an epoch above 0 that is once
    /// the parent stopped accepting and this process serves.
    async fn serving(&mut self) -> Result<SocketAddr> {
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(status) = self.guard.exited() {
                bail!(
                    "epoch {} exited with {status} before serving\n{}",
                    self.epoch,
                    self.guard.output()
                );
            }
            if let Ok(text) = std::fs::read_to_string(&self.admin_file) {
                if let Ok(addr) = text.trim().parse() {
                    return Ok(addr);
                }
            }
            ensure!(
                Instant::now() < deadline,
                "epoch {} did not serve within {DEADLINE:?}\n{}",
                self.epoch,
                self.guard.output()
            );
            tokio::time::sleep(POLL).await;
        }
    }

    /// Waits for the process to exit by itself.
    async fn exit(&mut self, within: Duration) -> Result<std::process::ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.guard.exited() {
                return Ok(status);
            }
            ensure!(
                Instant::now() < deadline,
                "epoch {} still runs after {within:?}\n{}",
                self.epoch,
                self.guard.output()
            );
            tokio::time::sleep(POLL).await;
        }
    }
}

async fn listeners(admin: SocketAddr) -> Result<std::collections::BTreeMap<String, SocketAddr>> {
    let (status, body) = admin_get(admin, "/listeners?format=json").await?;
    ensure!(status == 200, "/listeners answered {status}");
    parse_listeners(&body)
}

/// The address of listener `main`.
async fn main_listener(admin: SocketAddr) -> Result<SocketAddr> {
    listeners(admin)
        .await?
        .get("main")
        .copied()
        .context("no listener main")
}

/// `restart_epoch` from `/server_info`.
async fn epoch(admin: SocketAddr) -> Result<u64> {
    let (_, body) = admin_get(admin, "/server_info").await?;
    let v: serde_json::Value = serde_json::from_str(&body).context("/server_info")?;
    v["command_line_options"]["restart_epoch"]
        .as_u64()
        .with_context(|| format!("no restart_epoch in {body}"))
}

/// A counter from `/stats`.
async fn counter(admin: SocketAddr, name: &str) -> Result<u64> {
    let (_, body) = admin_get(admin, "/stats").await?;
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(": ")?.parse().ok())
        .with_context(|| format!("no {name} in /stats:\n{body}"))
}

/// Waits until the load generator counted `more` further successful requests.
async fn let_load_run(load: &Load, more: u64) -> Result<()> {
    let target = load.counts.ok() + more;
    let deadline = Instant::now() + DEADLINE;
    while load.counts.ok() < target {
        ensure!(
            Instant::now() < deadline,
            "the load stalled at {} requests\n{}",
            load.counts.ok(),
            load.counts.report()
        );
        tokio::time::sleep(POLL).await;
    }
    Ok(())
}

/// How many consecutive restarts the load test does (`LEGATE_HOT_RESTARTS`, default 20).
fn restarts() -> u32 {
    std::env::var("LEGATE_HOT_RESTARTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn consecutive_hot_restarts_under_load_fail_no_request() -> Result<()> {
    let a = Upstream::plain("a").await?;
    let b = Upstream::plain("b").await?;
    let yaml = bootstrap(a.addr.port(), b.addr.port(), false, &[]);
    let family = Family::new("hot-restart-load", 10, 20)?;
    let mut current = family.spawn(0, &yaml)?;
    let admin = current.serving().await?;
    let main = main_listener(admin).await?;
    let load = Load::start(main, &Shape::default());
    let_load_run(&load, 200).await?;

    let n = restarts();
    let mut parents = Vec::new();
    let mut handovers = Vec::new();
    let started = Instant::now();
    for e in 1..=n {
        let t = Instant::now();
        let mut next = family.spawn(e, &yaml)?;
        let next_admin = next.serving().await?;
        handovers.push(t.elapsed());
        ensure!(next_admin == admin, "the admin moved to {next_admin}");
        parents.push(std::mem::replace(&mut current, next));
        let_load_run(&load, 100).await?;
    }
    let restarting = started.elapsed();
    // Let a gRPC stream that began before the last restart run on.
    let grpc_before = load.counts.grpc_streams_ok.load(Ordering::Relaxed);
    let deadline = Instant::now() + DEADLINE;
    while load.counts.grpc_streams_ok.load(Ordering::Relaxed) < grpc_before + 1 {
        ensure!(Instant::now() < deadline, "no gRPC stream completed");
        tokio::time::sleep(POLL).await;
    }
    let counts = load.counts.clone();
    let errors = load.stop().await;
    println!("{}", counts.report());
    println!("{n} hot restarts in {restarting:?}");
    println!(
        "time to handover (child start to serving): min {:?} max {:?} mean {:?}",
        handovers.iter().min().copied().unwrap_or_default(),
        handovers.iter().max().copied().unwrap_or_default(),
        handovers.iter().sum::<Duration>() / n.max(1)
    );
    ensure!(
        counts.failures() == 0 && errors.is_empty(),
        "{}\nfirst errors: {errors:#?}",
        counts.report()
    );
    ensure!(counts.grpc_messages.load(Ordering::Relaxed) > 0);
    ensure!(epoch(admin).await? == u64::from(n));
    for p in &mut parents {
        let status = p.exit(Duration::from_secs(30)).await?;
        ensure!(
            status.success(),
            "epoch {} exited with {status}\n{}",
            p.epoch,
            p.guard.output()
        );
    }
    // Every generation's counters are in the last one's /stats.
    let total = counter(admin, "http.ingress.downstream_rq_total").await?;
    println!("/stats http.ingress.downstream_rq_total after {n} restarts: {total}");
    ensure!(
        total >= counts.ok(),
        "/stats counts {total} requests; the clients got {} answers",
        counts.ok()
    );
    drop(current);
    Ok(())
}

/// `GET path` on a new HTTP/1.1 connection; returns the status and the `x-upstream` header.
async fn get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let r = send(addr, &Transport::H1, &Request::get("example.com", path)).await?;
    Ok((r.status, r.header("x-upstream").unwrap_or_default()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_bootstrap_serves_at_once_and_an_invalid_one_leaves_the_parent_serving(
) -> Result<()> {
    let a = Upstream::plain("a").await?;
    let b = Upstream::plain("b").await?;
    let family = Family::new("hot-restart-config", 5, 10)?;
    let mut gen0 = family.spawn(0, &bootstrap(a.addr.port(), b.addr.port(), false, &["old"]))?;
    let admin = gen0.serving().await?;
    let before = listeners(admin).await?;
    let main = before.get("main").copied().context("main")?;
    let old = before.get("old").copied().context("old")?;
    ensure!(get(main, "/new/x").await? == (200, "a".into()));

    // The new bootstrap routes /new to b, drops `old` and adds `extra`.
    let new_yaml = bootstrap(a.addr.port(), b.addr.port(), true, &["extra"]);
    let mut gen1 = family.spawn(1, &new_yaml)?;
    ensure!(gen1.serving().await? == admin);
    ensure!(
        get(main, "/new/x").await? == (200, "b".into()),
        "the new route right after the handover\n{}",
        gen1.guard.output()
    );
    let after = listeners(admin).await?;
    ensure!(after.get("main") == Some(&main), "main moved: {after:?}");
    ensure!(
        after.contains_key("extra") && !after.contains_key("old"),
        "{after:?}"
    );
    let extra = after.get("extra").copied().context("extra")?;
    ensure!(get(extra, "/").await?.0 == 200);
    // The parent drains and exits; the listener the new bootstrap dropped closes with it.
    let status = gen0.exit(DEADLINE).await?;
    ensure!(status.success(), "epoch 0 exited with {status}");
    ensure!(
        tokio::net::TcpStream::connect(old).await.is_err(),
        "the dropped listener {old} still accepts"
    );

    // Failed restarts under load: the clients of the parent see nothing.
    let load = Load::start(
        main,
        &Shape {
            h1_connections: 2,
            h2_connections: 1,
            h2_streams: 4,
            grpc_streams: 0,
            ..Shape::default()
        },
    );
    let_load_run(&load, 100).await?;
    // An invalid bootstrap fails in the child before it asks for anything.
    let mut bad = family.spawn(2, "static_resources: {clusters: [{name: x, type: NOPE}]}")?;
    let status = bad.exit(DEADLINE).await?;
    ensure!(
        !status.success(),
        "an invalid bootstrap exited with {status}"
    );
    ensure!(
        bad.guard
            .output()
            .contains("error initializing configuration"),
        "{}",
        bad.guard.output()
    );
    // A child that fails after it took sockets (its new listener's port is taken) exits
    // before it accepted anything and before telling the parent to drain.
    let taken = std::net::TcpListener::bind("127.0.0.1:0")?;
    let port = taken.local_addr()?.port();
    let busy = format!("busy:{port}");
    let mut failing = family.spawn(
        2,
        &bootstrap(a.addr.port(), b.addr.port(), true, &["extra", &busy]),
    )?;
    let status = failing.exit(DEADLINE).await?;
    ensure!(
        !status.success(),
        "a child that cannot bind exited with {status}"
    );
    ensure!(gen1.guard.exited().is_none(), "the parent exited");
    ensure!(epoch(admin).await? == 1);
    let_load_run(&load, 100).await?;
    let counts = load.counts.clone();
    let errors = load.stop().await;
    println!("{}", counts.report());
    ensure!(
        counts.failures() == 0 && errors.is_empty(),
        "{}\nfirst errors: {errors:#?}",
        counts.report()
    );
    for _ in 0..20 {
        ensure!(get(main, "/new/x").await? == (200, "b".into()));
    }
    // The parent accepts the next, valid, child.
    let mut gen2 = family.spawn(2, &new_yaml)?;
    ensure!(gen2.serving().await? == admin);
    ensure!(epoch(admin).await? == 2);
    ensure!(get(main, "/new/x").await? == (200, "b".into()));
    let status = gen1.exit(DEADLINE).await?;
    ensure!(status.success(), "epoch 1 exited with {status}");
    Ok(())
}

fn signal(pid: u32, sig: &str) -> Result<()> {
    let status = std::process::Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()?;
    ensure!(status.success(), "kill {sig} {pid}: {status}");
    Ok(())
}

/// Runs `trigger` until `/server_info` reports `want` (a supervisor ignores a restart while
/// the previous generation still drains, so the trigger is repeated, at most once a second).
async fn restart_to(
    admin: SocketAddr,
    want: u64,
    mut trigger: impl AsyncFnMut() -> Result<()>,
) -> Result<()> {
    let deadline = Instant::now() + DEADLINE;
    let mut next_trigger = Instant::now();
    loop {
        if Instant::now() >= next_trigger {
            trigger().await?;
            next_trigger = Instant::now() + Duration::from_secs(1);
        }
        if let Ok(e) = epoch(admin).await {
            if e == want {
                return Ok(());
            }
        }
        ensure!(Instant::now() < deadline, "epoch {want} never served");
        tokio::time::sleep(POLL).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sighup_and_the_admin_restart_from_the_binary_on_disk_under_a_supervisor() -> Result<()> {
    let a = Upstream::plain("a").await?;
    let b = Upstream::plain("b").await?;
    let yaml = bootstrap(a.addr.port(), b.addr.port(), false, &[]);
    let mut family = Family::new("hot-restart-sighup", 5, 10)?;
    // A copy of the binary that the test replaces, as an upgrade does.
    let bin_dir = family.dir.path().join("bin");
    std::fs::create_dir_all(&bin_dir)?;
    let bin = bin_dir.join("legate");
    std::fs::copy(&family.bin, &bin)?;
    let original = std::mem::replace(&mut family.bin, bin.clone());
    let mut root = family.spawn(0, &yaml)?;
    let root_pid = root.guard.id();
    let admin = root.serving().await?;
    let main = main_listener(admin).await?;
    let load = Load::start(
        main,
        &Shape {
            h1_connections: 2,
            h2_connections: 1,
            h2_streams: 4,
            grpc_streams: 1,
            grpc_stream_time: Duration::from_millis(800),
            ..Shape::default()
        },
    );
    let_load_run(&load, 100).await?;

    restart_to(admin, 1, async || signal(root_pid, "-HUP")).await?;
    let_load_run(&load, 100).await?;
    ensure!(root.guard.exited().is_none(), "the first process exited");

    // Replace the file; the next generation starts from the new one.
    let staged = bin_dir.join("legate.new");
    std::fs::copy(&original, &staged)?;
    std::fs::rename(&staged, &bin)?;
    restart_to(admin, 2, async || signal(root_pid, "-HUP")).await?;
    let_load_run(&load, 100).await?;

    let mut post = Request::get("localhost", "/hot_restart");
    post.method = "POST".into();
    restart_to(admin, 3, async || {
        let r = send(admin, &Transport::H1, &post).await?;
        ensure!(
            r.status == 200 || r.status == 503,
            "POST /hot_restart: {}",
            r.status
        );
        Ok(())
    })
    .await?;
    let_load_run(&load, 100).await?;

    let counts = load.counts.clone();
    let errors = load.stop().await;
    println!("{}", counts.report());
    ensure!(
        counts.failures() == 0 && errors.is_empty(),
        "{}\nfirst errors: {errors:#?}\n{}",
        counts.report(),
        root.guard.output()
    );
    ensure!(
        root.guard.exited().is_none(),
        "the first process (the supervisor) exited\n{}",
        root.guard.output()
    );
    // SIGTERM to the supervisor reaches the serving generation; both exit 0.
    signal(root_pid, "-TERM")?;
    let status = root.exit(DEADLINE).await?;
    ensure!(status.success(), "the supervisor exited with {status}");
    ensure!(
        tokio::net::TcpStream::connect(main).await.is_err(),
        "{main} still accepts after the supervisor exited"
    );
    Ok(())
}

/// The process id, in this namespace, of `unshare`'s one child: the container's PID 1.
async fn pid_one_of(unshare: u32) -> Result<u32> {
    let path = format!("/proc/{unshare}/task/{unshare}/children");
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Some(pid) = std::fs::read_to_string(&path)
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse().ok())
        {
            return Ok(pid);
        }
        ensure!(Instant::now() < deadline, "{path} names no child");
        tokio::time::sleep(POLL).await;
    }
}

/// `legate` as PID 1 of its own PID namespace, as in a container: the namespace (the
/// container) lives through two restarts and ends with the serving generation on SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn as_pid_1_of_a_container_the_supervisor_keeps_the_container_alive() -> Result<()> {
    let a = Upstream::plain("a").await?;
    let b = Upstream::plain("b").await?;
    let family = Family::new("hot-restart-pid1", 5, 10)?;
    let config = family.dir.path().join("bootstrap.yaml");
    std::fs::write(&config, bootstrap(a.addr.port(), b.addr.port(), false, &[]))?;
    let admin_file = family.dir.path().join("admin");
    // `--kill-child`: the namespace dies with `unshare`, so the guard cleans up everything.
    let mut args = vec![
        "--pid".to_string(),
        "--fork".into(),
        "--kill-child".into(),
        family.bin.display().to_string(),
    ];
    args.extend(family.args(0, &config, &admin_file));
    let unshare = std::path::Path::new("/usr/bin/unshare");
    ensure!(
        unshare.is_file(),
        "util-linux's unshare is needed for this test"
    );
    let mut container = Generation {
        epoch: 0,
        guard: ProcessGuard::spawn("unshare", unshare, &args, family.dir.path())?,
        admin_file,
    };
    let admin = container.serving().await?;
    let pid_one = pid_one_of(container.guard.id()).await?;
    let status = std::fs::read_to_string(format!("/proc/{pid_one}/status"))?;
    ensure!(
        status
            .lines()
            .any(|l| l.starts_with("NSpid:") && l.trim_end().ends_with("\t1")),
        "legate is not PID 1 of its namespace:\n{status}"
    );
    let main = main_listener(admin).await?;
    let load = Load::start(
        main,
        &Shape {
            h1_connections: 2,
            h2_connections: 1,
            h2_streams: 2,
            grpc_streams: 1,
            grpc_stream_time: Duration::from_millis(500),
            ..Shape::default()
        },
    );
    let_load_run(&load, 50).await?;
    for e in 1..=2 {
        restart_to(admin, e, async || signal(pid_one, "-HUP")).await?;
        let_load_run(&load, 50).await?;
        ensure!(
            container.guard.exited().is_none(),
            "the container ended\n{}",
            container.guard.output()
        );
    }
    let counts = load.counts.clone();
    let errors = load.stop().await;
    println!("{}", counts.report());
    ensure!(
        counts.failures() == 0 && errors.is_empty(),
        "{}\nfirst errors: {errors:#?}",
        counts.report()
    );
    signal(pid_one, "-TERM")?;
    let status = container.exit(DEADLINE).await?;
    ensure!(status.success(), "the container exited with {status}");
    Ok(())
}
