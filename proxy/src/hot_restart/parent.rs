//! The running process's side of a hot restart: listens for its successor on the domain
//! socket of its epoch, hands out duplicates of its listening sockets, and on `Drain` stops
//! accepting, drains, and reports its counters until it exits.

use std::os::fd::AsFd as _;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::Duration;

use super::wire::{self, Message};
use super::Error;
use crate::server::Runtime;
use crate::stats::Stat;

/// How often a draining parent reports its counters.
const REPORT_EVERY: Duration = Duration::from_millis(200);

/// How long a child may be silent while it takes over.
const CHILD_TIMEOUT: Duration = Duration::from_secs(30);

/// Listens on this epoch's domain socket, in a thread, for a successor. When the socket is
/// taken (another proxy with the same `--base-id` and epoch on this host), this process
/// serves on without hot restart: it warns, and `SIGHUP` and `POST /hot_restart` are refused,
/// so no successor of ours can ever reach the other proxy.
pub fn listen_or_warn(runtime: &Arc<Runtime>) {
    if let Err(e) = listen(runtime) {
        runtime
            .hot_restart
            .available
            .store(false, Ordering::Release);
        tracing::warn!("{e}; this process cannot be hot restarted");
    }
}

fn listen(runtime: &Arc<Runtime>) -> Result<(), Error> {
    let options = &runtime.hot_restart.options;
    if !options.enabled {
        return Ok(());
    }
    let name = options.socket_name(options.epoch);
    let bind = || super::child::socket_addr(&name).and_then(|a| UnixListener::bind_addr(&a));
    let listener = match bind() {
        // A file left by a process that died (nothing answers on it) is replaced; the
        // abstract namespace needs no cleanup.
        Err(e)
            if e.kind() == std::io::ErrorKind::AddrInUse
                && !name.starts_with('@')
                && UnixStream::connect(&name).is_err() =>
        {
            let _ = std::fs::remove_file(&name);
            bind()
        }
        other => other,
    }
    .map_err(|error| Error::Listen {
        socket: name.clone(),
        error,
    })?;
    if !name.starts_with('@') {
        let _ = SOCKET_FILE.set(name.clone().into());
    }
    tracing::info!(socket = %name, "hot restart: waiting for a successor");
    let runtime = runtime.clone();
    std::thread::Builder::new()
        .name("hot-restart".into())
        .spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let runtime = runtime.clone();
                let spawned = std::thread::Builder::new()
                    .name("hot-restart-child".into())
                    .spawn(move || {
                        if let Err(e) = serve_child(&runtime, stream) {
                            tracing::warn!("hot restart: {e}");
                        }
                    });
                if let Err(e) = spawned {
                    tracing::warn!("hot restart: cannot serve a child: {e}");
                }
            }
        })?;
    Ok(())
}

/// Removes this epoch's socket file (with a file-system `--socket-path`) as the process stops
/// serving.
pub fn remove_socket_file() {
    if let Some(path) = SOCKET_FILE.get() {
        let _ = std::fs::remove_file(path);
    }
}

/// The socket file this process bound, if it bound one.
static SOCKET_FILE: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();

fn counters(runtime: &Runtime) -> Vec<(String, u64)> {
    crate::admin::collect_stats(runtime)
        .into_iter()
        .filter_map(|(n, v)| match v {
            Stat::Counter(c) => Some((n, c)),
            Stat::Gauge(_) => None,
        })
        .collect()
}

fn serve_child(runtime: &Arc<Runtime>, stream: UnixStream) -> Result<(), Error> {
    let state = &runtime.hot_restart;
    let own = state.options.epoch;
    stream.set_read_timeout(Some(CHILD_TIMEOUT))?;
    let epoch = match wire::recv(&stream)? {
        Some((Message::Hello { epoch }, _)) => epoch,
        // A liveness probe of a process that wanted this socket name.
        None => return Ok(()),
        other => return Err(Error::Unexpected(format!("{other:?}"))),
    };
    let refuse = |reason: String| -> Result<(), Error> {
        wire::send(&stream, &Message::Refused { reason }, None)?;
        Ok(())
    };
    if Some(epoch) != own.checked_add(1) {
        return refuse(format!(
            "this process is epoch {own}; a child is epoch {}",
            own.saturating_add(1)
        ));
    }
    if state.is_handed_over() {
        return refuse("this process already handed over".into());
    }
    if state.busy.swap(true, Ordering::AcqRel) {
        return refuse("another child is taking over".into());
    }
    let uptime = state.uptime_before() + runtime.started.elapsed();
    tracing::info!(epoch, "hot restart: a successor connected");
    let result = talk(runtime, &stream, uptime);
    if !state.is_handed_over() {
        state.busy.store(false, Ordering::Release);
        tracing::warn!("hot restart: the successor went away before taking over; still serving");
    }
    result
}

fn talk(runtime: &Arc<Runtime>, stream: &UnixStream, uptime: Duration) -> Result<(), Error> {
    let state = &runtime.hot_restart;
    wire::send(
        stream,
        &Message::HelloReply {
            epoch: state.options.epoch,
            uptime_all_epochs_s: uptime.as_secs(),
        },
        None,
    )?;
    loop {
        match wire::recv(stream)? {
            None => return Ok(()),
            Some((Message::GetSocket { name, address }, _)) => {
                let fd = state.find_socket(&name, address);
                let found = fd.is_some();
                wire::send(
                    stream,
                    &Message::Socket { found },
                    fd.as_ref().map(|f| f.as_fd()),
                )?;
            }
            Some((Message::Drain, _)) => break,
            Some((other, _)) => return Err(Error::Unexpected(format!("{other:?}"))),
        }
    }
    // The child serves on the shared sockets: stop accepting (our duplicates close so only
    // the child's remain) and drain.
    if let Ok(mut s) = state.sockets.lock() {
        s.clear();
    }
    let (finish_tx, finish_rx) = mpsc::channel::<()>();
    if let Ok(mut f) = state.finish.lock() {
        *f = Some(finish_tx);
    }
    let _ = state.handed_over.send(true);
    runtime.start_drain();
    tracing::info!("hot restart: handed over; draining");
    wire::send(
        stream,
        &Message::Stats {
            counters: counters(runtime),
            last: false,
        },
        None,
    )?;
    loop {
        let last = match finish_rx.recv_timeout(REPORT_EVERY) {
            Ok(()) | Err(mpsc::RecvTimeoutError::Disconnected) => true,
            Err(mpsc::RecvTimeoutError::Timeout) => false,
        };
        let counters = counters(runtime);
        wire::send(stream, &Message::Stats { counters, last }, None)?;
        if last {
            if let Ok(mut d) = state.finished.lock() {
                *d = true;
            }
            state.finished_cv.notify_all();
            return Ok(());
        }
    }
}

/// Before a parent that handed over exits: sends its final counters to the child (waiting
/// at most a second).
pub fn finish(runtime: &Runtime) {
    let state = &runtime.hot_restart;
    let Some(tx) = state.finish.lock().ok().and_then(|mut f| f.take()) else {
        return;
    };
    let _ = tx.send(());
    let Ok(done) = state.finished.lock() else {
        return;
    };
    let _ = state
        .finished_cv
        .wait_timeout_while(done, Duration::from_secs(1), |d| !*d);
}
