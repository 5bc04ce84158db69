//! Request-smuggling guard for HTTP/1.1.
//!
//! hyper follows RFC 9112 §6.3 for a request carrying both `Content-Length` and
//! `Transfer-Encoding`: it drops the length, reads the body as chunked and closes the
//! connection afterwards. Envoy goes further and refuses such a request with 400, so that it
//! never reaches an upstream. hyper hides the conflict from the service, so this wrapper looks
//! at the request heads as they are read and flags the connection; the connection manager then
//! answers 400 instead of forwarding. Only reads that start with a request line are inspected,
//! and only up to the end of their head, so body bytes cost one comparison per read.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

const METHODS: &[&[u8]] = &[
    b"GET ",
    b"POST ",
    b"PUT ",
    b"PATCH ",
    b"DELETE ",
    b"HEAD ",
    b"OPTIONS ",
    b"CONNECT ",
    b"TRACE ",
];

/// Whether a request head in `buf` carries both `Content-Length` and `Transfer-Encoding`.
pub fn head_has_length_conflict(buf: &[u8]) -> bool {
    if !METHODS.iter().any(|m| buf.starts_with(m)) {
        return false;
    }
    let (mut cl, mut te) = (false, false);
    for line in buf.split(|b| *b == b'\n').skip(1) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            break;
        }
        let name = line.split(|b| *b == b':').next().unwrap_or(&[]);
        cl |= name.eq_ignore_ascii_case(b"content-length");
        te |= name.eq_ignore_ascii_case(b"transfer-encoding");
    }
    cl && te
}

pin_project_lite::pin_project! {
    /// An I/O stream that flags request heads with conflicting framing.
    pub struct Sniffed<S> {
        #[pin]
        inner: S,
        flag: Arc<AtomicBool>,
        // The head being read (a head can span several reads), reused between requests.
        head: Vec<u8>,
        in_head: bool,
    }
}

/// Heads larger than this are left to the codec's own limit.
const MAX_HEAD: usize = 96 * 1024;

impl<S> Sniffed<S> {
    /// Wraps `inner`; `flag` turns true when a conflicting head is read.
    pub fn new(inner: S, flag: Arc<AtomicBool>) -> Self {
        Self {
            inner,
            flag,
            head: Vec::new(),
            in_head: false,
        }
    }
}

fn observe(chunk: &[u8], head: &mut Vec<u8>, in_head: &mut bool, flag: &AtomicBool) {
    if !*in_head {
        // A request line starts a head; anything else is body (or HTTP/2) and is skipped.
        let n = chunk.len().min(8);
        if n == 0
            || !METHODS
                .iter()
                .any(|m| m.starts_with(&chunk[..n]) || chunk.starts_with(m))
        {
            return;
        }
        *in_head = true;
        head.clear();
    }
    let start = head.len().saturating_sub(3);
    head.extend_from_slice(&chunk[..chunk.len().min(MAX_HEAD.saturating_sub(head.len()))]);
    if let Some(end) = head[start..].windows(4).position(|w| w == b"\r\n\r\n") {
        if head_has_length_conflict(&head[..start + end + 4]) {
            flag.store(true, Ordering::Relaxed);
        }
        *in_head = false;
        head.clear();
    } else if head.len() >= MAX_HEAD {
        *in_head = false;
        head.clear();
    }
}

impl<S: AsyncRead> AsyncRead for Sniffed<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        let res = this.inner.poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = &res {
            observe(&buf.filled()[before..], this.head, this.in_head, this.flag);
        }
        res
    }
}

impl<S: AsyncWrite> AsyncWrite for Sniffed<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.project().inner.poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        self.project().inner.poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_both_framing_headers() {
        assert!(head_has_length_conflict(
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
        ));
        assert!(!head_has_length_conflict(
            b"POST / HTTP/1.1\r\ncontent-length: 5\r\n\r\nhello"
        ));
        assert!(!head_has_length_conflict(
            b"hello transfer-encoding content-length"
        ));
    }

    #[test]
    fn detects_a_head_split_across_reads() {
        let flag = AtomicBool::new(false);
        let (mut head, mut in_head) = (Vec::new(), false);
        let req: &[u8] = b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n";
        for chunk in req.chunks(24) {
            observe(chunk, &mut head, &mut in_head, &flag);
        }
        assert!(flag.load(Ordering::Relaxed));
    }
}
