//! Holds many idle HTTP/1.1 keep-alive connections open, to measure a proxy's memory per
//! connection: each connection sends one request and reads its response (so the proxy has
//! set the connection up completely), then stays open and silent until stdin closes or the
//! hold time ends.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

async fn open_one(port: u16) -> anyhow::Result<TcpStream> {
    let mut s = TcpStream::connect(("127.0.0.1", port))
        .await
        .context("connect")?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n")
        .await?;
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 512];
    // The benchmark's upstream answers 200 with the body "hello\n".
    while !buf.ends_with(b"hello\n") {
        let n = s.read(&mut chunk).await?;
        anyhow::ensure!(
            n > 0 && buf.len() < 64 * 1024,
            "connection closed before the response"
        );
        buf.extend_from_slice(&chunk[..n]);
    }
    anyhow::ensure!(buf.starts_with(b"HTTP/1.1 200"), "not a 200 response");
    Ok(s)
}

pub async fn run(port: u16, connections: usize, hold: Duration) -> anyhow::Result<()> {
    let gate = Arc::new(Semaphore::new(200)); // connections being set up at once
                                              // Connections not set up within a minute count as failed: the run stays bounded.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut tasks = Vec::with_capacity(connections);
    for _ in 0..connections {
        let gate = gate.clone();
        tasks.push(tokio::spawn(async move {
            tokio::time::timeout_at(deadline, async {
                let _permit = gate.acquire_owned().await.ok()?;
                open_one(port).await.ok()
            })
            .await
            .ok()
            .flatten()
        }));
    }
    let mut open = Vec::with_capacity(connections);
    for t in tasks {
        if let Some(s) = t.await? {
            open.push(s);
        }
    }
    let failed = connections - open.len();
    println!(
        "{}",
        serde_json::json!({"opened": open.len(), "failed": failed})
    );
    // Held until the driver closes our stdin (or kills us), at most `hold`.
    let mut stdin = tokio::io::stdin();
    let mut sink = [0u8; 64];
    let _ = tokio::time::timeout(hold, async {
        while stdin.read(&mut sink).await.is_ok_and(|n| n > 0) {}
    })
    .await;
    drop(open);
    Ok(())
}
