//! The new process's side of a hot restart: connect to the parent, take the listening
//! sockets of the listeners this configuration shares with it, then tell it to drain.

use std::net::SocketAddr;
use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::wire::{self, Message};
use super::{Error, Options};
use crate::server::Runtime;

/// How long the parent may take to answer one request.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// The connection to the parent while this process takes over.
#[derive(Debug)]
pub struct ParentLink {
    stream: UnixStream,
}

/// The address of a domain socket name: `@name` is in the abstract namespace.
pub(crate) fn socket_addr(name: &str) -> std::io::Result<std::os::unix::net::SocketAddr> {
    use std::os::linux::net::SocketAddrExt as _;
    match name.strip_prefix('@') {
        Some(abstract_name) => {
            std::os::unix::net::SocketAddr::from_abstract_name(abstract_name.as_bytes())
        }
        None => std::os::unix::net::SocketAddr::from_pathname(name),
    }
}

/// Connects to the parent of an epoch above 0 and says hello. Returns the link and how long
/// the previous generations have been running.
pub fn connect(options: &Options) -> Result<Option<(ParentLink, Duration)>, Error> {
    let Some(parent_epoch) = options.epoch.checked_sub(1) else {
        return Ok(None);
    };
    let socket = options.socket_name(parent_epoch);
    let stream = socket_addr(&socket)
        .and_then(|a| UnixStream::connect_addr(&a))
        .map_err(|error| Error::Connect {
            epoch: parent_epoch,
            socket: socket.clone(),
            error,
        })?;
    stream.set_read_timeout(Some(ANSWER_TIMEOUT))?;
    wire::send(
        &stream,
        &Message::Hello {
            epoch: options.epoch,
        },
        None,
    )?;
    match wire::recv(&stream)? {
        Some((
            Message::HelloReply {
                uptime_all_epochs_s,
                ..
            },
            _,
        )) => Ok(Some((
            ParentLink { stream },
            Duration::from_secs(uptime_all_epochs_s),
        ))),
        Some((Message::Refused { reason }, _)) => Err(Error::Refused(reason)),
        other => Err(Error::Unexpected(format!("{other:?}"))),
    }
}

impl ParentLink {
    /// Asks for the listening socket of a listener; `None` when the parent has none for it.
    pub fn get_socket(
        &mut self,
        name: &str,
        address: SocketAddr,
    ) -> Result<Option<std::net::TcpListener>, Error> {
        wire::send(
            &self.stream,
            &Message::GetSocket {
                name: name.to_string(),
                address,
            },
            None,
        )?;
        match wire::recv(&self.stream)? {
            Some((Message::Socket { found: true }, Some(fd))) => {
                let socket = std::net::TcpListener::from(fd);
                socket.set_nonblocking(true)?;
                // A descriptor that is not a listening TCP socket fails here.
                let local = socket.local_addr()?;
                tracing::info!(listener = %name, %local, "took over the parent's socket");
                Ok(Some(socket))
            }
            Some((Message::Socket { .. }, _)) => Ok(None),
            other => Err(Error::Unexpected(format!("{other:?}"))),
        }
    }
}

/// Once this process serves, tells the parent to drain, waits for its first counters (its
/// acknowledgement) and keeps taking its counters until it exits.
pub fn drain_parent(runtime: &Arc<Runtime>) -> Result<(), Error> {
    let link = runtime
        .hot_restart
        .parent
        .lock()
        .ok()
        .and_then(|mut p| p.take());
    let Some(link) = link else {
        return Ok(());
    };
    wire::send(&link.stream, &Message::Drain, None)?;
    match wire::recv(&link.stream)? {
        Some((Message::Stats { counters, .. }, _)) => runtime.hot_restart.set_inherited(counters),
        other => return Err(Error::Unexpected(format!("{other:?}"))),
    }
    tracing::info!("the parent drains; this process serves");
    // The parent reports while it drains; its last report comes just before it exits.
    link.stream.set_read_timeout(None)?;
    let state = &runtime.hot_restart;
    state.parent_reporting.store(true, Ordering::Release);
    let runtime = runtime.clone();
    let reporting = std::thread::Builder::new()
        .name("hot-restart-stats".into())
        .spawn(move || {
            receive_reports(&runtime, &link);
            runtime
                .hot_restart
                .parent_reporting
                .store(false, Ordering::Release);
        });
    if let Err(e) = reporting {
        state.parent_reporting.store(false, Ordering::Release);
        return Err(e.into());
    }
    Ok(())
}

fn receive_reports(runtime: &Runtime, link: &ParentLink) {
    loop {
        match wire::recv(&link.stream) {
            Ok(Some((Message::Stats { counters, last }, _))) => {
                runtime.hot_restart.set_inherited(counters);
                if last {
                    return;
                }
            }
            Ok(Some(other)) => {
                tracing::warn!("unexpected message from the parent: {other:?}");
                return;
            }
            Ok(None) => return,
            Err(e) => {
                tracing::debug!("parent link closed: {e}");
                return;
            }
        }
    }
}

/// Keeps the parent link for [`super::State::inherit`].
pub fn attach(runtime: &Runtime, link: ParentLink, uptime_before: Duration) {
    if let Ok(mut p) = runtime.hot_restart.parent.lock() {
        *p = Some(link);
    }
    if let Ok(mut u) = runtime.hot_restart.uptime_before.lock() {
        *u = uptime_before;
    }
}
