//! Starting Envoy or Legate from a bootstrap file and learning what it bound.
//!
//! Both are started the same way:
//! `BIN -c FILE --admin-address-path ADMINFILE -l warning --concurrency 1 --disable-hot-restart`.
//! The bootstrap's admin listens on port 0; we wait (with a deadline) for the admin address
//! file, then for `GET /ready` to answer 200, then read `GET /listeners?format=json` to map
//! listener names to their bound addresses. [`Proxy::start_dynamic`] waits only for the admin,
//! for a proxy whose listeners arrive later over xDS.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde::Deserialize;

use crate::bins::ProxyKind;
use crate::client::admin_get;
use crate::process::ProcessGuard;

/// How long a proxy may take to become ready.
pub const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// Poll interval while waiting for readiness.
const POLL: Duration = Duration::from_millis(25);

/// A ready proxy; killed when dropped.
#[derive(Debug)]
pub struct Proxy {
    pub kind: ProxyKind,
    pub admin: SocketAddr,
    /// Listener name → bound address.
    pub listeners: BTreeMap<String, SocketAddr>,
    guard: ProcessGuard,
}

impl Proxy {
    /// The bound address of the named listener.
    pub fn listener(&self, name: &str) -> Result<SocketAddr> {
        self.listeners.get(name).copied().ok_or_else(|| {
            anyhow!(
                "{} has no listener named {name:?} (has {:?})",
                self.kind,
                self.listeners.keys().collect::<Vec<_>>()
            )
        })
    }

    /// The captured stdout/stderr so far.
    pub fn output(&self) -> String {
        self.guard.output()
    }

    /// The process id (for signals and `/proc`).
    pub fn pid(&self) -> u32 {
        self.guard.id()
    }

    /// Waits up to `timeout` for the process to exit by itself.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.guard.exited() {
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!(
                    "{} did not exit within {timeout:?}\n{}",
                    self.kind,
                    self.output()
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Starts `kind` with the bootstrap at `config`, in `dir`, and waits until it is ready.
    pub async fn start(kind: ProxyKind, config: &Path, dir: &Path) -> Result<Self> {
        Self::launch(kind, kind.binary()?, config, dir, Wait::Ready, &[]).await
    }

    /// Like [`start`](Self::start) with `workers` worker threads (`--concurrency`) instead
    /// of one.
    pub async fn start_with_workers(
        kind: ProxyKind,
        config: &Path,
        dir: &Path,
        workers: usize,
    ) -> Result<Self> {
        let workers = workers.to_string();
        let args = ["--concurrency", workers.as_str()];
        Self::launch(kind, kind.binary()?, config, dir, Wait::Ready, &args).await
    }

    /// Like [`start`](Self::start) with another binary of the same kind (a `legate` built
    /// with extra filters).
    pub async fn start_binary(
        kind: ProxyKind,
        bin: &Path,
        config: &Path,
        dir: &Path,
    ) -> Result<Self> {
        Self::launch(kind, bin.to_path_buf(), config, dir, Wait::Ready, &[]).await
    }

    /// Starts `kind` with `extra_args` (command-line options both proxies take, such as
    /// `--drain-time-s`) and waits only for its admin to answer, not for `/ready` nor
    /// listeners: for a proxy whose listeners arrive later over xDS. `listeners` is left
    /// empty; use [`Self::wait_listener`].
    pub async fn start_dynamic(
        kind: ProxyKind,
        config: &Path,
        dir: &Path,
        extra_args: &[&str],
    ) -> Result<Self> {
        Self::launch(kind, kind.binary()?, config, dir, Wait::Admin, extra_args).await
    }

    /// The listeners the admin reports now (name → bound address).
    pub async fn current_listeners(&self) -> Result<BTreeMap<String, SocketAddr>> {
        let (status, body) = admin_get(self.admin, "/listeners?format=json").await?;
        if status != 200 {
            bail!("GET /listeners?format=json answered {status}: {body}");
        }
        parse_listeners(&body)
    }

    /// Polls `/listeners` until `name` is listed, for up to `timeout`; returns its address.
    pub async fn wait_listener(&self, name: &str, timeout: Duration) -> Result<SocketAddr> {
        let deadline = Instant::now() + timeout;
        loop {
            let last = match self.current_listeners().await {
                Ok(l) => match l.get(name) {
                    Some(addr) => return Ok(*addr),
                    None => format!("has {:?}", l.keys().collect::<Vec<_>>()),
                },
                Err(e) => format!("{e:#}"),
            };
            if Instant::now() > deadline {
                bail!(
                    "{} never listed listener {name:?} within {timeout:?} ({last})",
                    self.kind
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    async fn launch(
        kind: ProxyKind,
        bin: std::path::PathBuf,
        config: &Path,
        dir: &Path,
        wait: Wait,
        extra_args: &[&str],
    ) -> Result<Self> {
        let admin_file = dir.join(format!("{}.admin", kind.name()));
        let _ = std::fs::remove_file(&admin_file);
        let mut args: Vec<String> = vec![
            "-c".into(),
            config.display().to_string(),
            "--admin-address-path".into(),
            admin_file.display().to_string(),
            "-l".into(),
            "warning".into(),
            "--disable-hot-restart".into(),
        ];
        if !extra_args.contains(&"--concurrency") {
            args.extend(["--concurrency".into(), "1".into()]);
        }
        args.extend(extra_args.iter().map(|a| a.to_string()));
        let mut guard = ProcessGuard::spawn(kind.name(), &bin, &args, dir)?;
        let deadline = Instant::now() + READY_TIMEOUT;
        match wait_ready(&mut guard, &admin_file, deadline, wait).await {
            Ok((admin, listeners)) => Ok(Self {
                kind,
                admin,
                listeners,
                guard,
            }),
            Err(e) => Err(e.context(format!(
                "{kind} ({}) did not become ready\n{}",
                bin.display(),
                guard.output()
            ))),
        }
    }
}

/// How far [`Proxy::launch`] waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wait {
    /// The admin answers any request.
    Admin,
    /// `/ready` answers 200; then the listeners are read.
    Ready,
}

async fn wait_ready(
    guard: &mut ProcessGuard,
    admin_file: &Path,
    deadline: Instant,
    wait: Wait,
) -> Result<(SocketAddr, BTreeMap<String, SocketAddr>)> {
    let admin = loop {
        if let Some(status) = guard.exited() {
            bail!("exited with {status} before writing the admin address");
        }
        if let Ok(text) = std::fs::read_to_string(admin_file) {
            if let Ok(addr) = text.trim().parse::<SocketAddr>() {
                break addr;
            }
        }
        if Instant::now() > deadline {
            bail!(
                "no admin address in {} before the deadline",
                admin_file.display()
            );
        }
        tokio::time::sleep(POLL).await;
    };
    loop {
        if let Some(status) = guard.exited() {
            bail!("exited with {status} before /ready");
        }
        match admin_get(admin, "/ready").await {
            Ok((200, _)) => break,
            Ok(_) if wait == Wait::Admin => return Ok((admin, BTreeMap::new())),
            _ => {}
        }
        if Instant::now() > deadline {
            bail!("GET /ready on {admin} never answered 200");
        }
        tokio::time::sleep(POLL).await;
    }
    let (status, body) = admin_get(admin, "/listeners?format=json").await?;
    if status != 200 {
        bail!("GET /listeners?format=json answered {status}: {body}");
    }
    let listeners = parse_listeners(&body)?;
    Ok((admin, listeners))
}

#[derive(Deserialize)]
struct ListenersDoc {
    #[serde(default)]
    listener_statuses: Vec<ListenerStatus>,
}

#[derive(Deserialize)]
struct ListenerStatus {
    name: String,
    local_address: Address,
}

#[derive(Deserialize)]
struct Address {
    socket_address: SocketAddress,
}

#[derive(Deserialize)]
struct SocketAddress {
    address: String,
    #[serde(default)]
    port_value: u16,
}

/// Parses Envoy's `/listeners?format=json` into name → address.
pub fn parse_listeners(body: &str) -> Result<BTreeMap<String, SocketAddr>> {
    let doc: ListenersDoc =
        serde_json::from_str(body).with_context(|| format!("parsing /listeners: {body}"))?;
    let mut out = BTreeMap::new();
    for l in doc.listener_statuses {
        let ip: std::net::IpAddr = l
            .local_address
            .socket_address
            .address
            .parse()
            .with_context(|| format!("listener {} address", l.name))?;
        let port = l.local_address.socket_address.port_value;
        if port == 0 {
            bail!("listener {} reports port 0: {body}", l.name);
        }
        out.insert(l.name, SocketAddr::new(ip, port));
    }
    Ok(out)
}
