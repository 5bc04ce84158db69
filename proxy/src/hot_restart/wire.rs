//! The hot restart protocol between a child (epoch N) and its parent (epoch N-1): JSON
//! messages behind a 4-byte big-endian length on a Unix stream socket, a listening socket
//! passed beside a message with `SCM_RIGHTS`.

use std::io::{IoSlice, IoSliceMut, Read as _, Write as _};
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;

use rustix::net::{
    recvmsg, sendmsg, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use serde::{Deserialize, Serialize};

/// Upper bound on one message (a stats message of a large configuration stays far below).
const MAX_MESSAGE: usize = 64 * 1024 * 1024;

/// One message of the protocol. The child speaks first; the parent answers each request.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Message {
    /// Child → parent: the first message.
    Hello { epoch: u32 },
    /// Parent → child: the handover may proceed.
    HelloReply {
        epoch: u32,
        /// How long the parent's generations have been running, for `uptime_all_epochs`.
        uptime_all_epochs_s: u64,
    },
    /// Parent → child: no handover now (another child is taking over, or it already did).
    Refused { reason: String },
    /// Child → parent: the listening socket of this listener, if the parent has it.
    GetSocket { name: String, address: SocketAddr },
    /// Parent → child: the answer; when `found`, the socket travels with this message.
    Socket { found: bool },
    /// Child → parent: the child serves; stop accepting, drain and exit.
    Drain,
    /// Parent → child: the parent's counters (including what it inherited itself), sent
    /// after `Drain` while it drains; `last` on the final one, just before it exits.
    Stats {
        counters: Vec<(String, u64)>,
        last: bool,
    },
}

/// Sends `msg`, with `fd` attached when given.
pub fn send(stream: &UnixStream, msg: &Message, fd: Option<BorrowedFd<'_>>) -> std::io::Result<()> {
    let body = serde_json::to_vec(msg).map_err(std::io::Error::other)?;
    let len = u32::try_from(body.len())
        .map_err(|_| std::io::Error::other("hot restart message too large"))?;
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(&body);
    let fds: Vec<BorrowedFd<'_>> = fd.into_iter().collect();
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(&fds)) {
        return Err(std::io::Error::other("control buffer too small"));
    }
    let sent = sendmsg(
        stream,
        &[IoSlice::new(&frame)],
        &mut control,
        SendFlags::NOSIGNAL,
    )?;
    // The descriptor went with the first byte; the rest is plain data.
    if let Some(rest) = frame.get(sent..) {
        if !rest.is_empty() {
            (&*stream).write_all(rest)?;
        }
    }
    Ok(())
}

/// Receives one message and the descriptor that came with it. `None` at a clean end of
/// stream.
pub fn recv(stream: &UnixStream) -> std::io::Result<Option<(Message, Option<OwnedFd>)>> {
    let mut header = [0u8; 4];
    let mut got = 0;
    let mut fd = None;
    while got < header.len() {
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let Some(rest) = header.get_mut(got..) else {
            break;
        };
        let r = recvmsg(
            stream,
            &mut [IoSliceMut::new(rest)],
            &mut control,
            RecvFlags::CMSG_CLOEXEC,
        )?;
        for m in control.drain() {
            if let RecvAncillaryMessage::ScmRights(fds) = m {
                // Extra descriptors (a confused peer) are closed as they drop.
                for f in fds {
                    if fd.is_none() {
                        fd = Some(f);
                    }
                }
            }
        }
        if r.bytes == 0 {
            if got == 0 {
                return Ok(None);
            }
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        got += r.bytes;
    }
    let len = u32::from_be_bytes(header) as usize;
    if len > MAX_MESSAGE {
        return Err(std::io::Error::other(format!(
            "hot restart message of {len} bytes"
        )));
    }
    let mut body = vec![0u8; len];
    (&*stream).read_exact(&mut body)?;
    let msg = serde_json::from_slice(&body).map_err(|e| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("bad hot restart message: {e}"),
        )
    })?;
    Ok(Some((msg, fd)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd as _;

    #[test]
    fn messages_and_sockets_cross_a_socket_pair() -> anyhow::Result<()> {
        let (a, b) = UnixStream::pair()?;
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        let local = listener.local_addr()?;
        send(&a, &Message::Socket { found: true }, Some(listener.as_fd()))?;
        send(&a, &Message::Drain, None)?;
        let (msg, fd) = recv(&b)?.ok_or_else(|| anyhow::anyhow!("eof"))?;
        assert_eq!(msg, Message::Socket { found: true });
        let received = std::net::TcpListener::from(fd.ok_or_else(|| anyhow::anyhow!("no fd"))?);
        assert_eq!(received.local_addr()?, local);
        let (msg, fd) = recv(&b)?.ok_or_else(|| anyhow::anyhow!("eof"))?;
        assert_eq!(msg, Message::Drain);
        assert!(fd.is_none());
        drop(a);
        assert!(recv(&b)?.is_none());
        Ok(())
    }
}
