//! Hot restart: a new process (epoch N) takes over the listening sockets of the running one
//! (epoch N-1) and the old one drains and exits, without a refused or reset connection.
//!
//! * [`wire`]: the messages on the Unix domain socket between child and parent.
//! * [`parent`]: the running process's side: hands out its sockets, drains on request and
//!   reports its counters until it exits.
//! * [`child`]: the new process's side: asks for the sockets of the listeners it runs,
//!   then tells the parent to drain.
//! * [`supervisor`]: `SIGHUP` / `POST /hot_restart` start the successor from the binary on
//!   disk; the process the user started stays as a small supervisor so that, as PID 1 of a
//!   container, it never exits during a handover.
//!
//! See `docs/hot-restart.md` for the design.

pub mod child;
pub mod parent;
pub mod supervisor;
pub mod wire;

use std::ffi::OsString;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use tokio::sync::watch;

/// The name under which the admin server's socket is handed over.
pub const ADMIN_SOCKET: &str = "(admin)";

/// Errors of the hot restart protocol.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot reach the parent (epoch {epoch}) at {socket}: {error}")]
    Connect {
        epoch: u32,
        socket: String,
        error: std::io::Error,
    },
    #[error("cannot listen for a hot restart successor on {socket} (another legate with this --base-id? give each its own --base-id, or --disable-hot-restart): {error}")]
    Listen {
        socket: String,
        error: std::io::Error,
    },
    #[error("cannot bind listener {name} on {address}: {error}")]
    Bind {
        name: String,
        address: SocketAddr,
        error: std::io::Error,
    },
    #[error("the parent refused the hot restart: {0}")]
    Refused(String),
    #[error("hot restart protocol: {0}")]
    Io(std::io::Error),
    #[error("hot restart protocol: unexpected answer {0}")]
    Unexpected(String),
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Self::Io(e)
    }
}

/// How this process takes part in hot restarts (from the command line).
#[derive(Debug, Clone)]
pub struct Options {
    /// `--restart-epoch`: 0 for the first process.
    pub epoch: u32,
    /// `--base-id`: separates independent proxies on one host.
    pub base_id: u32,
    /// `--parent-shutdown-time-s`: how long a parent drains before it exits.
    pub parent_shutdown_time: Duration,
    /// `--socket-path`: the prefix of the domain socket names; a leading `@` means the
    /// abstract namespace.
    pub socket_path: String,
    /// False with `--disable-hot-restart`: no socket is opened and restarts are refused.
    pub enabled: bool,
    /// The binary to start a successor from: argv\[0\] made absolute at startup.
    pub exe: PathBuf,
    /// The arguments after argv\[0\], as given.
    pub args: Vec<OsString>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            epoch: 0,
            base_id: 0,
            parent_shutdown_time: Duration::from_secs(900),
            socket_path: DEFAULT_SOCKET_PATH.into(),
            enabled: false,
            exe: PathBuf::new(),
            args: Vec::new(),
        }
    }
}

/// The default `--socket-path`.
pub const DEFAULT_SOCKET_PATH: &str = "@legate_hot_restart";

impl Options {
    /// The domain socket on which the process of `epoch` listens for its successor:
    /// `<socket-path>_<base-id>_<epoch>`.
    pub fn socket_name(&self, epoch: u32) -> String {
        format!("{}_{}_{}", self.socket_path, self.base_id, epoch)
    }

    /// Resolves argv\[0\] against the working directory without following symlinks, so a
    /// successor starts from whatever file is at that path when the restart happens.
    pub fn resolve_exe(argv0: &OsString) -> PathBuf {
        let p = PathBuf::from(argv0);
        if p.is_absolute() {
            return p;
        }
        if p.components().count() > 1 {
            if let Ok(cwd) = std::env::current_dir() {
                return cwd.join(p);
            }
            return p;
        }
        // A bare name was found on $PATH.
        std::env::var_os("PATH")
            .and_then(|path| {
                std::env::split_paths(&path)
                    .map(|d| d.join(&p))
                    .find(|c| c.is_file())
            })
            .unwrap_or(p)
    }
}

/// A listening socket this process can hand to a successor.
#[derive(Debug)]
struct Registered {
    name: String,
    /// The address from the configuration (port 0 included).
    configured: SocketAddr,
    fd: OwnedFd,
}

/// Hot restart state shared through the [`crate::server::Runtime`].
#[derive(Debug)]
pub struct State {
    pub options: Options,
    sockets: Mutex<Vec<Registered>>,
    /// Counters of the previous generations, last reported by the parent.
    inherited: Mutex<Vec<(String, u64)>>,
    /// Uptime of the previous generations when this one connected.
    uptime_before: Mutex<Duration>,
    /// The link to the parent while this process takes over.
    parent: Mutex<Option<child::ParentLink>>,
    /// Sockets taken from the parent or bound before any listener starts (see
    /// [`State::prepare`]), by name and configured address.
    prepared: Mutex<Vec<(String, SocketAddr, std::net::TcpListener)>>,
    /// Turns true once a child took over: the admin server stops accepting too.
    handed_over: watch::Sender<bool>,
    /// The successor this process started itself (it becomes its supervisor).
    successor: Mutex<Option<u32>>,
    /// A child is talking to this process.
    busy: AtomicBool,
    /// Hot restart is enabled and this process holds its domain socket.
    available: AtomicBool,
    /// The parent still reports its counters (it has not exited yet).
    parent_reporting: AtomicBool,
    /// Tells the thread reporting to the child to send its last report.
    finish: Mutex<Option<std::sync::mpsc::Sender<()>>>,
    finished: Mutex<bool>,
    finished_cv: Condvar,
}

impl State {
    pub fn new(options: Options) -> Self {
        let enabled = options.enabled;
        Self {
            options,
            sockets: Mutex::new(Vec::new()),
            inherited: Mutex::new(Vec::new()),
            uptime_before: Mutex::new(Duration::ZERO),
            parent: Mutex::new(None),
            prepared: Mutex::new(Vec::new()),
            handed_over: watch::channel(false).0,
            successor: Mutex::new(None),
            busy: AtomicBool::new(false),
            available: AtomicBool::new(enabled),
            parent_reporting: AtomicBool::new(false),
            finish: Mutex::new(None),
            finished: Mutex::new(false),
            finished_cv: Condvar::new(),
        }
    }

    /// Keeps a duplicate of a listening socket to hand to a successor.
    pub fn register(&self, name: &str, configured: SocketAddr, socket: &impl AsFd) {
        if !self.options.enabled {
            return;
        }
        let fd = match socket.as_fd().try_clone_to_owned() {
            Ok(fd) => fd,
            Err(e) => {
                tracing::warn!(listener = %name, "cannot keep the socket for a hot restart: {e}");
                return;
            }
        };
        if let Ok(mut s) = self.sockets.lock() {
            s.retain(|r| r.name != name);
            s.push(Registered {
                name: name.to_string(),
                configured,
                fd,
            });
        }
    }

    /// Forgets a listener's socket (it was removed or moved).
    pub fn unregister(&self, name: &str) {
        if let Ok(mut s) = self.sockets.lock() {
            s.retain(|r| r.name != name);
        }
    }

    /// In a child, before any listener accepts: takes the parent's sockets for `wanted`
    /// (name, configured address) and binds the others with `bind`, so a child that cannot
    /// get all its sockets fails before it has accepted a connection.
    pub fn prepare(
        &self,
        wanted: &[(String, SocketAddr)],
        bind: impl Fn(SocketAddr) -> std::io::Result<std::net::TcpListener>,
    ) -> Result<(), Error> {
        for (name, address) in wanted {
            let socket = match self.inherit(name, *address) {
                Some(s) => s,
                None => bind(*address).map_err(|error| Error::Bind {
                    name: name.clone(),
                    address: *address,
                    error,
                })?,
            };
            if let Ok(mut p) = self.prepared.lock() {
                p.push((name.clone(), *address, socket));
            }
        }
        Ok(())
    }

    /// The socket for this listener while this process takes over: one [`State::prepare`]
    /// set aside, or the parent's (same name and configured address, or for a fixed port
    /// the same configured address under any name).
    pub fn inherit(&self, name: &str, configured: SocketAddr) -> Option<std::net::TcpListener> {
        if let Ok(mut p) = self.prepared.lock() {
            if let Some(i) = p.iter().position(|(n, a, _)| n == name && *a == configured) {
                return Some(p.swap_remove(i).2);
            }
        }
        let mut guard = self.parent.lock().ok()?;
        let link = guard.as_mut()?;
        match link.get_socket(name, configured) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(listener = %name, "no socket from the parent: {e}");
                None
            }
        }
    }

    /// Duplicates the socket the child asked for.
    fn find_socket(&self, name: &str, configured: SocketAddr) -> Option<OwnedFd> {
        let s = self.sockets.lock().ok()?;
        let found = s
            .iter()
            .find(|r| r.name == name && r.configured == configured)
            .or_else(|| {
                (configured.port() != 0)
                    .then(|| s.iter().find(|r| r.configured == configured))
                    .flatten()
            })?;
        found.fd.try_clone().ok()
    }

    /// Counters carried over from the previous generations.
    pub fn inherited_counters(&self) -> Vec<(String, u64)> {
        self.inherited.lock().map(|c| c.clone()).unwrap_or_default()
    }

    fn set_inherited(&self, counters: Vec<(String, u64)>) {
        if let Ok(mut c) = self.inherited.lock() {
            *c = counters;
        }
    }

    /// How long the previous generations had run when this one took over.
    pub fn uptime_before(&self) -> Duration {
        self.uptime_before.lock().map(|d| *d).unwrap_or_default()
    }

    /// A receiver that turns true once a successor took over.
    pub fn handed_over_signal(&self) -> watch::Receiver<bool> {
        self.handed_over.subscribe()
    }

    /// Whether a successor took over.
    pub fn is_handed_over(&self) -> bool {
        *self.handed_over.borrow()
    }

    /// Whether this process can be hot restarted: enabled, and it holds its domain socket.
    pub fn is_available(&self) -> bool {
        self.available.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Whether the parent is still draining (and reporting its counters).
    pub fn parent_reporting(&self) -> bool {
        self.parent_reporting
            .load(std::sync::atomic::Ordering::Acquire)
    }

    /// The successor this process started, if any.
    pub fn successor(&self) -> Option<u32> {
        self.successor.lock().ok().and_then(|s| *s)
    }
}

/// Serves with `rt` until this process exits or hands over; a process that handed over to
/// a successor it started itself then stays as that successor's supervisor. Returns the
/// process exit code.
pub fn serve(
    rt: tokio::runtime::Runtime,
    bootstrap: crate::config::Bootstrap,
    opts: crate::server::ServeOptions,
) -> anyhow::Result<std::process::ExitCode> {
    let options = opts.hot_restart.clone();
    supervisor::follow_supervisor();
    let outcome = rt.block_on(crate::server::run(bootstrap, opts));
    parent::remove_socket_file();
    let outcome = outcome?;
    // Listeners, clusters, xDS and the admin server go with the runtime.
    rt.shutdown_timeout(Duration::from_millis(200));
    match outcome.successor {
        Some(pid) if outcome.handed_over => {
            let epoch = options.epoch.saturating_add(1);
            Ok(supervisor::supervise(options, pid, epoch))
        }
        _ => Ok(std::process::ExitCode::SUCCESS),
    }
}
