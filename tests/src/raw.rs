//! Raw HTTP/1.1 over TCP, for what a well-behaved client cannot send: malformed requests and
//! `Expect: 100-continue` with the body held back until the interim response.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long to wait for bytes from the proxy.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// A parsed response head and body.
#[derive(Debug, Clone, Default)]
pub struct RawResponse {
    pub status: u16,
    /// Lower-cased names.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<String> {
        crate::client::join_values(&self.headers, name)
    }
}

/// One raw connection with a read buffer.
#[derive(Debug)]
pub struct RawConn {
    tcp: TcpStream,
    buf: Vec<u8>,
    eof: bool,
}

impl RawConn {
    pub async fn connect(addr: SocketAddr) -> Result<Self> {
        let tcp = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connecting to {addr}"))?;
        tcp.set_nodelay(true)?;
        Ok(Self {
            tcp,
            buf: Vec::new(),
            eof: false,
        })
    }

    pub async fn write(&mut self, bytes: &[u8]) -> Result<()> {
        self.tcp.write_all(bytes).await?;
        self.tcp.flush().await?;
        Ok(())
    }

    /// Reads more bytes; returns false at end of stream (or on a reset).
    async fn fill(&mut self) -> Result<bool> {
        if self.eof {
            return Ok(false);
        }
        let mut chunk = [0u8; 16 * 1024];
        let n = match tokio::time::timeout(READ_TIMEOUT, self.tcp.read(&mut chunk)).await {
            Err(_) => bail!(
                "no bytes from the peer: {} {READ_TIMEOUT:?}",
                crate::client::TIMED_OUT
            ),
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => 0,
            Ok(r) => r?,
        };
        if n == 0 {
            self.eof = true;
            return Ok(false);
        }
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(true)
    }

    /// Reads one response head, including 1xx interim ones; `None` if the peer closed first.
    pub async fn read_head(&mut self) -> Result<Option<RawResponse>> {
        loop {
            if let Some(end) = find(&self.buf, b"\r\n\r\n") {
                let head: Vec<u8> = self.buf.drain(..end + 4).collect();
                return parse_head(&head).map(Some);
            }
            if !self.fill().await? {
                if self.buf.is_empty() {
                    return Ok(None);
                }
                bail!(
                    "connection closed mid-head: {:?}",
                    String::from_utf8_lossy(&self.buf)
                );
            }
        }
    }

    /// Reads a final response (skipping 1xx); `None` if the peer closed without one.
    /// `interim` collects the 1xx statuses seen on the way.
    pub async fn read_response(&mut self, interim: &mut Vec<u16>) -> Result<Option<RawResponse>> {
        let mut response = loop {
            match self.read_head().await? {
                None => return Ok(None),
                Some(r) if (100..200).contains(&r.status) => interim.push(r.status),
                Some(r) => break r,
            }
        };
        let chunked = response
            .header("transfer-encoding")
            .is_some_and(|te| te.to_ascii_lowercase().contains("chunked"));
        if response.status == 204 || response.status == 304 {
            return Ok(Some(response));
        }
        if chunked {
            response.body = self.read_chunked().await?;
        } else if let Some(len) = response.header("content-length") {
            let len: usize = len.trim().parse().context("content-length")?;
            while self.buf.len() < len {
                if !self.fill().await? {
                    bail!("closed after {} of {len} body bytes", self.buf.len());
                }
            }
            response.body = self.buf.drain(..len).collect();
        } else {
            while self.fill().await? {}
            response.body = std::mem::take(&mut self.buf);
        }
        Ok(Some(response))
    }

    async fn read_chunked(&mut self) -> Result<Vec<u8>> {
        let mut body = Vec::new();
        loop {
            let line = self.read_line().await?;
            let size_text = line.split(';').next().unwrap_or("").trim();
            let size = usize::from_str_radix(size_text, 16)
                .with_context(|| format!("chunk size {line:?}"))?;
            if size == 0 {
                // Trailers, up to the empty line.
                while !self.read_line().await?.is_empty() {}
                return Ok(body);
            }
            while self.buf.len() < size + 2 {
                if !self.fill().await? {
                    bail!("closed mid-chunk");
                }
            }
            body.extend(self.buf.drain(..size));
            self.buf.drain(..2);
        }
    }

    async fn read_line(&mut self) -> Result<String> {
        loop {
            if let Some(end) = find(&self.buf, b"\r\n") {
                let line: Vec<u8> = self.buf.drain(..end + 2).collect();
                return Ok(String::from_utf8_lossy(&line[..end]).into_owned());
            }
            if !self.fill().await? {
                bail!("closed mid-line");
            }
        }
    }

    /// True if the peer closes the connection (or resets it) before the deadline, having sent
    /// nothing more.
    pub async fn closed(&mut self) -> Result<bool> {
        Ok(!self.fill().await?)
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn parse_head(head: &[u8]) -> Result<RawResponse> {
    let text = String::from_utf8_lossy(head);
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| anyhow!("bad status line {status_line:?}"))?;
    let headers = lines
        .filter(|l| !l.is_empty())
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Ok(RawResponse {
        status,
        headers,
        body: Vec::new(),
    })
}

/// The outcome of a raw exchange: a response, or a close without one.
#[derive(Debug)]
pub enum RawOutcome {
    Response(RawResponse),
    Closed,
}

/// Sends `bytes` on a new connection and reads one response (or the close).
pub async fn exchange(addr: SocketAddr, bytes: &[u8]) -> Result<RawOutcome> {
    let mut conn = RawConn::connect(addr).await?;
    // The proxy may reset before reading everything; that is an outcome, not an error.
    if conn.write(bytes).await.is_err() {
        return Ok(RawOutcome::Closed);
    }
    let mut interim = Vec::new();
    Ok(match conn.read_response(&mut interim).await {
        Ok(Some(r)) => RawOutcome::Response(r),
        Ok(None) => RawOutcome::Closed,
        Err(e) if is_reset(&e) => RawOutcome::Closed,
        Err(e) => return Err(e),
    })
}

fn is_reset(e: &anyhow::Error) -> bool {
    e.downcast_ref::<std::io::Error>().is_some_and(|io| {
        matches!(
            io.kind(),
            std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
        )
    })
}

/// Sends `head` (which carries `Expect: 100-continue`), waits for the interim response,
/// then sends `body` and reads the final response. Returns the 1xx statuses and the response.
pub async fn expect_continue(
    addr: SocketAddr,
    head: &[u8],
    body: &[u8],
) -> Result<(Vec<u16>, RawResponse)> {
    let mut conn = RawConn::connect(addr).await?;
    conn.write(head).await?;
    let first = conn
        .read_head()
        .await?
        .ok_or_else(|| anyhow!("closed before answering the Expect: 100-continue head"))?;
    let mut interim = vec![first.status];
    if first.status != 100 {
        bail!(
            "expected 100 Continue before sending the body, got {}",
            first.status
        );
    }
    conn.write(body).await?;
    let response = conn
        .read_response(&mut interim)
        .await?
        .ok_or_else(|| anyhow!("closed without a final response"))?;
    Ok((interim, response))
}
