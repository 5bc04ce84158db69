//! legate-load: the benchmark's own load tools (bench/run.py drives them).
//!
//! - `serve-grpc`: the gRPC echo upstream (HTTP/2 cleartext);
//! - `grpc`: N concurrent gRPC streams (unary, bidi ping-pong or server streaming) for a
//!   duration; prints req/s (messages/s) and latency percentiles as JSON;
//! - `rate`: open-loop fixed-rate HTTP/1.1 GETs, latency measured from the scheduled send
//!   time (no coordinated omission); prints JSON;
//! - `idle`: opens N keep-alive connections, one request each, prints `{"opened": n, ...}`
//!   and holds them until stdin closes.

mod grpc;
mod idle;
mod rate;
mod stats;

use std::time::Duration;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "legate-load",
    about = "The benchmark's gRPC upstream and load clients"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve the gRPC echo service on 127.0.0.1:PORT (0: any free port, printed on stdout)
    ServeGrpc {
        #[arg(long, default_value_t = 0)]
        port: u16,
    },
    /// gRPC load on 127.0.0.1:PORT (HTTP/2 cleartext, prior knowledge)
    Grpc(grpc::LoadArgs),
    /// Fixed-rate HTTP/1.1 GET / on 127.0.0.1:PORT, open loop
    Rate {
        #[arg(long)]
        port: u16,
        /// requests per second
        #[arg(long, default_value_t = 2000.0)]
        rate: f64,
        #[arg(long, default_value_t = 10.0)]
        seconds: f64,
        /// keep-alive connections taking the scheduled requests
        #[arg(long, default_value_t = 50)]
        connections: usize,
    },
    /// Open N idle keep-alive connections to 127.0.0.1:PORT and hold them until stdin closes
    Idle {
        #[arg(long)]
        port: u16,
        #[arg(long, default_value_t = 10_000)]
        connections: usize,
        #[arg(long, default_value_t = 120.0)]
        hold_seconds: f64,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // One thread: the load client must not take CPU from the proxy it measures.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        match cli.cmd {
            Cmd::ServeGrpc { port } => grpc::serve(port).await,
            Cmd::Grpc(args) => {
                println!("{}", grpc::load(args).await?);
                Ok(())
            }
            Cmd::Rate {
                port,
                rate,
                seconds,
                connections,
            } => {
                println!(
                    "{}",
                    rate::run(rate::RateArgs {
                        port,
                        rate,
                        seconds,
                        connections
                    })
                    .await?
                );
                Ok(())
            }
            Cmd::Idle {
                port,
                connections,
                hold_seconds,
            } => idle::run(port, connections, Duration::from_secs_f64(hold_seconds)).await,
        }
    })
}
