//! Open-loop fixed-rate HTTP/1.1 load without coordinated omission.
//!
//! A scheduler emits request `i` at `start + i / rate` whatever happens to earlier requests;
//! a pool of keep-alive connections takes the scheduled requests in order. The latency of a
//! request is its completion time minus its *scheduled* time, so a stall that delays later
//! requests is counted in every request it delays (the load generator never waits for the
//! server before deciding to send, which is what "coordinated omission" would hide).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, Mutex};

use crate::stats::Samples;

pub struct RateArgs {
    pub port: u16,
    pub rate: f64,
    pub seconds: f64,
    pub connections: usize,
}

type Sender = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

async fn connect(port: u16) -> anyhow::Result<Sender> {
    let stream = TcpStream::connect(("127.0.0.1", port))
        .await
        .context("connect")?;
    stream.set_nodelay(true)?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    Ok(sender)
}

async fn get(sender: &mut Sender) -> anyhow::Result<()> {
    sender.ready().await?;
    let req = Request::get("/")
        .header("host", "bench")
        .body(Empty::new())?;
    let resp = sender.send_request(req).await?;
    let ok = resp.status() == StatusCode::OK;
    resp.into_body().collect().await?;
    anyhow::ensure!(ok, "non-200 response");
    Ok(())
}

async fn worker(
    port: u16,
    queue: Arc<Mutex<mpsc::UnboundedReceiver<Instant>>>,
    deadline: Instant,
) -> Samples {
    let mut samples = Samples::default();
    let mut sender = connect(port).await.ok();
    loop {
        let next = queue.lock().await.recv().await;
        let Some(scheduled) = next else { break };
        if Instant::now() >= deadline {
            samples.errors += 1; // never sent: counted, not silently dropped
            continue;
        }
        let mut ok = false;
        if sender.is_none() {
            sender = connect(port).await.ok();
        }
        if let Some(s) = sender.as_mut() {
            ok = tokio::time::timeout_at(deadline.into(), get(s))
                .await
                .is_ok_and(|r| r.is_ok());
        }
        if ok {
            samples.record(scheduled.elapsed());
        } else {
            samples.errors += 1;
            sender = None;
        }
    }
    samples
}

pub async fn run(args: RateArgs) -> anyhow::Result<serde_json::Value> {
    anyhow::ensure!(args.rate > 0.0, "--rate must be positive");
    let (tx, rx) = mpsc::unbounded_channel();
    let queue = Arc::new(Mutex::new(rx));
    let start = Instant::now() + Duration::from_millis(100); // connections first
                                                             // Requests still queued or in flight this long after the schedule ends count as errors.
    let deadline = start + Duration::from_secs_f64(args.seconds) + Duration::from_secs(5);
    let workers: Vec<_> = (0..args.connections.max(1))
        .map(|_| tokio::spawn(worker(args.port, queue.clone(), deadline)))
        .collect();
    let total = (args.rate * args.seconds).round() as u64;
    let interval = Duration::from_secs_f64(1.0 / args.rate);
    for i in 0..total {
        let at = start + interval.mul_f64(i as f64);
        tokio::time::sleep_until(at.into()).await;
        if tx.send(at).is_err() {
            break;
        }
    }
    drop(tx);
    let mut all = Samples::default();
    for w in workers {
        all.merge(w.await?);
    }
    let mut out = all.summary(Duration::from_secs_f64(args.seconds));
    out["scheduled"] = total.into();
    out["target_rps"] = args.rate.into();
    Ok(out)
}
