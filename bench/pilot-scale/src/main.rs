//! legate-pilot at scale: `--services` Services with `--endpoints` endpoints each, written as
//! manifests, and `--clients` simulated sidecars on state-of-the-world ADS, each a distinct
//! proxy (its own identity, so its own snapshot) and each the endpoint of one service, so
//! that every sidecar also has its inbound listener, routes and cluster. Reports:
//!
//! - time to first full push: from a client's stream opening to its having received (and
//!   ACKed) clusters, endpoints, listeners and routes; all clients start together;
//! - endpoint change → ACK: an EndpointSlice of one service is rewritten `--changes` times;
//!   for each, the time until each client ACKs the new endpoints (p50/p99/max over clients);
//! - the control plane's resident memory (VmRSS) after the first push, after the changes,
//!   and at rest 5 s later (once it has handed freed memory back).
//!
//! Run with `bench/pilot-scale.sh`; every wait is bounded.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::Parser;
use legate_proto::pb::envoy::config::cluster::v3::Cluster;
use legate_proto::pb::envoy::config::core::v3::{address, Node};
use legate_proto::pb::envoy::config::endpoint::v3::{lb_endpoint, ClusterLoadAssignment};
use legate_proto::pb::envoy::config::listener::v3::{filter, Listener};
use legate_proto::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    http_connection_manager::RouteSpecifier, HttpConnectionManager,
};
use legate_proto::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use legate_proto::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;

const CDS: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
const EDS: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
const LDS: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
const RDS: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
/// The cluster whose endpoints change.
const WATCHED: &str = "outbound|80||svc-0.default.svc.cluster.local";

#[derive(Debug, Parser)]
struct Args {
    /// The legate-pilot binary.
    #[arg(long)]
    pilot: PathBuf,
    #[arg(long, default_value_t = 1000)]
    services: usize,
    #[arg(long, default_value_t = 10)]
    endpoints: usize,
    #[arg(long, default_value_t = 200)]
    clients: usize,
    #[arg(long, default_value_t = 10)]
    changes: usize,
    /// Services added one after the other, after the endpoint changes.
    #[arg(long, default_value_t = 3)]
    additions: usize,
    #[arg(long, default_value_t = 100)]
    debounce_ms: u64,
    /// Write legate-pilot's log here (it is discarded otherwise).
    #[arg(long)]
    pilot_log: Option<PathBuf>,
    /// Write every figure here as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// Simulated sidecar `i`'s pod IP.
fn client_ip(i: usize) -> String {
    format!("10.250.{}.{}", i / 250, i % 250 + 1)
}

/// Service `i`'s EndpointSlice. Services 1 to `clients` are each backed (first endpoint)
/// by one simulated sidecar's pod, so every sidecar has an inbound side as in a real mesh.
fn slice(i: usize, endpoints: usize, generation: usize, clients: usize) -> String {
    let addresses: Vec<String> = (0..endpoints)
        .map(|j| {
            if j == 0 && (1..=clients).contains(&i) {
                client_ip(i - 1)
            } else if generation == 0 {
                format!("10.{}.{}.{}", 1 + i / 250, i % 250, j + 1)
            } else {
                format!("10.200.{}.{}", generation % 250, j + 1)
            }
        })
        .collect();
    let mut out = format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: svc-{i}-1\n  namespace: default\n  labels: {{kubernetes.io/service-name: svc-{i}}}\naddressType: IPv4\nports: [{{name: http, port: 8080, protocol: TCP}}]\nendpoints:\n"
    );
    for a in addresses {
        out.push_str(&format!(
            "- addresses: [{a}]\n  conditions: {{ready: true}}\n  zone: zone-a\n"
        ));
    }
    out
}

fn service(i: usize) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: svc-{i}, namespace: default}}\nspec:\n  clusterIP: 10.96.{}.{}\n  ports:\n  - {{name: http, port: 80, targetPort: 8080}}\n---\n",
        i / 250,
        i % 250 + 1
    )
}

/// Replaces a file through a rename, as editors and tooling do.
fn write(path: &Path, text: &str) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

struct Pilot {
    child: Child,
    xds: String,
    admin: String,
}

impl Drop for Pilot {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

async fn start_pilot(args: &Args, dir: &Path) -> Result<Pilot> {
    let xds_file = dir.join("xds.addr");
    let admin_file = dir.join("admin.addr");
    let child = Command::new(&args.pilot)
        .arg("--config-dir")
        .arg(dir.join("manifests"))
        .args([
            "--xds-address",
            "127.0.0.1:0",
            "--admin-address",
            "127.0.0.1:0",
        ])
        .arg("--xds-address-path")
        .arg(&xds_file)
        .arg("--admin-address-path")
        .arg(&admin_file)
        .args(["--debounce-ms", &args.debounce_ms.to_string()])
        .stdout(Stdio::null())
        .stderr(match &args.pilot_log {
            Some(path) => Stdio::from(std::fs::File::create(path)?),
            None => Stdio::null(),
        })
        .spawn()
        .with_context(|| format!("starting {}", args.pilot.display()))?;
    let mut pilot = Pilot {
        child,
        xds: String::new(),
        admin: String::new(),
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let read = |f: &Path| {
            std::fs::read_to_string(f)
                .unwrap_or_default()
                .trim()
                .to_string()
        };
        let (xds, admin) = (read(&xds_file), read(&admin_file));
        if !xds.is_empty() && !admin.is_empty() {
            pilot.xds = xds;
            pilot.admin = admin;
            return Ok(pilot);
        }
        if Instant::now() > deadline {
            bail!("legate-pilot wrote no xDS address within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

enum Event {
    /// A client had its first full push, this long after its stream opened.
    FirstFull(Duration, usize),
    /// A client ACKs endpoints of this generation, at this time.
    Generation(usize, Instant),
    /// A client has the endpoints of added service `k`, at this time.
    Added(usize, Instant),
    Failed(usize, String),
}

/// One simulated sidecar: opens a SotW stream, follows references (CDS → EDS names, LDS →
/// RDS names), ACKs everything, and reports what the benchmark times.
async fn client(i: usize, xds: String, events: mpsc::UnboundedSender<Event>) {
    if let Err(e) = run_client(i, &xds, &events).await {
        let _ = events.send(Event::Failed(i, format!("{e:#}")));
    }
}

async fn run_client(i: usize, xds: &str, events: &mpsc::UnboundedSender<Event>) -> Result<()> {
    let mut ads = AggregatedDiscoveryServiceClient::connect(format!("http://{xds}"))
        .await?
        .max_decoding_message_size(usize::MAX);
    let (tx, rx) = mpsc::unbounded_channel::<DiscoveryRequest>();
    let node = Node {
        id: format!(
            "sidecar~{}~client-{i}.default~default.svc.cluster.local",
            client_ip(i)
        ),
        cluster: "bench".into(),
        ..Default::default()
    };
    let request =
        |type_url: &str, names: &BTreeSet<String>, version: &str, nonce: &str| DiscoveryRequest {
            type_url: type_url.into(),
            resource_names: names.iter().cloned().collect(),
            version_info: version.into(),
            response_nonce: nonce.into(),
            ..Default::default()
        };
    let mut first = request(CDS, &BTreeSet::new(), "", "");
    first.node = Some(node);
    tx.send(first)?;
    tx.send(request(LDS, &BTreeSet::new(), "", ""))?;
    let started = Instant::now();
    let mut inbound = ads
        .stream_aggregated_resources(UnboundedReceiverStream::new(rx))
        .await?
        .into_inner();
    let mut names: HashMap<&'static str, BTreeSet<String>> = HashMap::new();
    let mut seen: BTreeSet<&'static str> = BTreeSet::new();
    let mut full = false;
    let mut last_generation = 0;
    // The largest response (encoded bytes) of the first full push.
    let mut largest = 0;
    while let Some(resp) = inbound.message().await? {
        largest = largest.max(resp.encoded_len());
        let DiscoveryResponse {
            type_url,
            version_info,
            nonce,
            resources,
            ..
        } = resp;
        let t: &'static str = match type_url.as_str() {
            CDS => CDS,
            EDS => EDS,
            LDS => LDS,
            RDS => RDS,
            other => bail!("unexpected type {other}"),
        };
        let mut follow: Option<(&'static str, BTreeSet<String>)> = None;
        match t {
            CDS => {
                let eds: BTreeSet<String> = resources
                    .iter()
                    .filter_map(|a| Cluster::decode(a.value.as_slice()).ok())
                    .filter(|c| c.eds_cluster_config.is_some())
                    .map(|c| c.name)
                    .collect();
                follow = Some((EDS, eds));
            }
            LDS => {
                let mut rds = BTreeSet::new();
                for l in resources
                    .iter()
                    .filter_map(|a| Listener::decode(a.value.as_slice()).ok())
                {
                    for f in l.filter_chains.iter().flat_map(|c| c.filters.iter()) {
                        if let Some(filter::ConfigType::TypedConfig(any)) = &f.config_type {
                            if let Ok(h) = HttpConnectionManager::decode(any.value.as_slice()) {
                                if let Some(RouteSpecifier::Rds(r)) = h.route_specifier {
                                    rds.insert(r.route_config_name);
                                }
                            }
                        }
                    }
                }
                follow = Some((RDS, rds));
            }
            EDS => {
                for a in &resources {
                    let Ok(cla) = ClusterLoadAssignment::decode(a.value.as_slice()) else {
                        continue;
                    };
                    if let Some(k) = cla
                        .cluster_name
                        .strip_prefix("outbound|80||added-")
                        .and_then(|r| r.split('.').next())
                        .and_then(|k| k.parse::<usize>().ok())
                    {
                        events.send(Event::Added(k, Instant::now()))?;
                        continue;
                    }
                    if cla.cluster_name != WATCHED {
                        continue;
                    }
                    let generation = cla
                        .endpoints
                        .iter()
                        .flat_map(|l| l.lb_endpoints.iter())
                        .filter_map(|e| match &e.host_identifier {
                            Some(lb_endpoint::HostIdentifier::Endpoint(ep)) => ep.address.clone(),
                            _ => None,
                        })
                        .filter_map(|a| match a.address {
                            Some(address::Address::SocketAddress(s)) => Some(s.address),
                            _ => None,
                        })
                        .find_map(|ip| {
                            ip.strip_prefix("10.200.")
                                .and_then(|r| r.split('.').next())
                                .and_then(|g| g.parse::<usize>().ok())
                        });
                    if let Some(g) = generation {
                        if g != last_generation {
                            last_generation = g;
                            // Reported as the ACK is sent.
                            events.send(Event::Generation(g, Instant::now()))?;
                        }
                    }
                }
            }
            _ => {}
        }
        let current = names.get(t).cloned().unwrap_or_default();
        tx.send(request(t, &current, &version_info, &nonce))?;
        if let Some((ft, wanted)) = follow {
            if names.get(ft) != Some(&wanted) {
                let version = String::new();
                tx.send(request(ft, &wanted, &version, ""))?;
                names.insert(ft, wanted);
            }
        }
        seen.insert(t);
        if !full && seen.len() == 4 {
            full = true;
            events.send(Event::FirstFull(started.elapsed(), largest))?;
        }
    }
    Err(anyhow!("stream closed"))
}

/// The pilot's own view of convergence, from its `/metrics` histogram
/// `pilot_proxy_convergence_seconds`: (count, mean, upper bound of the bucket holding p99).
async fn pilot_convergence(admin: &str) -> Result<(u64, f64, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::net::TcpStream::connect(admin),
    )
    .await??;
    conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: pilot\r\nConnection: close\r\n\r\n")
        .await?;
    let mut body = String::new();
    tokio::time::timeout(Duration::from_secs(5), conn.read_to_string(&mut body)).await??;
    let name = "pilot_proxy_convergence_seconds";
    let mut buckets: Vec<(String, u64)> = Vec::new();
    let (mut sum, mut count) = (0.0, 0u64);
    for line in body.lines() {
        let Some((key, value)) = line.rsplit_once(' ') else {
            continue;
        };
        if let Some(le) = key
            .strip_prefix(&format!("{name}_bucket{{le=\""))
            .and_then(|r| r.strip_suffix("\"}"))
        {
            buckets.push((le.to_string(), value.parse()?));
        } else if key == format!("{name}_sum") {
            sum = value.parse()?;
        } else if key == format!("{name}_count") {
            count = value.parse()?;
        }
    }
    let target = (count as f64 * 0.99).ceil() as u64;
    let p99 = buckets
        .iter()
        .find(|(_, c)| *c >= target)
        .map(|(le, _)| le.clone())
        .unwrap_or_default();
    let mean = if count > 0 { sum / count as f64 } else { 0.0 };
    Ok((count, mean, p99))
}

/// Waits until every client reported the event `matches` picks, and returns how long after
/// `since` each did; bounded by 60 s.
async fn every_client(
    events: &mut mpsc::UnboundedReceiver<Event>,
    clients: usize,
    since: Instant,
    matches: impl Fn(&Event) -> Option<Instant>,
) -> Result<Vec<Duration>> {
    let mut acked: Vec<Duration> = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while acked.len() < clients {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Some(Event::Failed(i, e))) => bail!("client {i}: {e}"),
            Ok(Some(event)) => {
                if let Some(at) = matches(&event) {
                    acked.push(at.saturating_duration_since(since));
                }
            }
            Ok(None) | Err(_) => bail!(
                "only {} of {} clients ACKed within 60 s",
                acked.len(),
                clients
            ),
        }
    }
    Ok(acked)
}

/// Writes `text` to `path` (after a pause that lets the previous change settle) and times,
/// from the write, every client's report of it; sorted.
async fn edit_and_time(
    events: &mut mpsc::UnboundedReceiver<Event>,
    clients: usize,
    path: &Path,
    text: &str,
    matches: impl Fn(&Event) -> Option<Instant>,
) -> Result<Vec<Duration>> {
    tokio::time::sleep(Duration::from_millis(300)).await;
    let edited = Instant::now();
    write(path, text)?;
    let mut acked = every_client(events, clients, edited, matches).await?;
    acked.sort();
    Ok(acked)
}

/// Service `added-k` and its endpoints, in one file.
fn added_service(k: usize, endpoints: usize) -> String {
    let mut out = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: added-{k}, namespace: default}}\nspec:\n  clusterIP: 10.97.0.{k}\n  ports:\n  - {{name: http, port: 80, targetPort: 8080}}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: added-{k}-1\n  namespace: default\n  labels: {{kubernetes.io/service-name: added-{k}}}\naddressType: IPv4\nports: [{{name: http, port: 8080, protocol: TCP}}]\nendpoints:\n"
    );
    for j in 0..endpoints {
        out.push_str(&format!("- addresses: [10.201.{k}.{}]\n", j + 1));
    }
    out
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let dir = std::env::temp_dir().join(format!("legate-pilot-scale-{}", std::process::id()));
    let manifests = dir.join("manifests");
    std::fs::create_dir_all(&manifests)?;
    let result = run(&args, &dir, &manifests).await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

async fn run(args: &Args, dir: &Path, manifests: &Path) -> Result<()> {
    for i in 0..args.services {
        write(
            &manifests.join(format!("svc-{i}.yaml")),
            &(service(i) + &slice(i, args.endpoints, 0, args.clients)),
        )?;
    }
    let pilot = start_pilot(args, dir).await?;
    let pid = pilot.child.id();
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let launched = Instant::now();
    for i in 0..args.clients {
        tokio::spawn(client(i, pilot.xds.clone(), events_tx.clone()));
    }
    let mut first: Vec<Duration> = Vec::new();
    let mut largest = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(300);
    while first.len() < args.clients {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Some(Event::FirstFull(d, size))) => {
                first.push(d);
                largest = largest.max(size);
            }
            Ok(Some(Event::Failed(i, e))) => bail!("client {i}: {e}"),
            Ok(Some(Event::Generation(..) | Event::Added(..))) => {}
            Ok(None) | Err(_) => bail!(
                "only {} of {} clients got a full push within 300 s",
                first.len(),
                args.clients
            ),
        }
    }
    let all_full = launched.elapsed();
    first.sort();
    let rss_after_push = rss_kb(pid);

    let mut change_p50 = Vec::new();
    let mut change_p99 = Vec::new();
    let mut change_max = Vec::new();
    for g in 1..=args.changes {
        let text = service(0) + &slice(0, args.endpoints, g, args.clients);
        let acked = edit_and_time(
            &mut events,
            args.clients,
            &manifests.join("svc-0.yaml"),
            &text,
            |e| match e {
                Event::Generation(gen, at) if *gen == g => Some(*at),
                _ => None,
            },
        )
        .await
        .with_context(|| format!("endpoint change {g}"))?;
        change_p50.push(percentile(&acked, 0.5));
        change_p99.push(percentile(&acked, 0.99));
        change_max.push(acked.last().copied().unwrap_or_default());
    }
    // Services added: a CDS change every proxy gets (the whole state of the world of
    // clusters), then the new cluster's assignment.
    let mut added_p99 = Vec::new();
    let mut added_max = Vec::new();
    for k in 1..=args.additions {
        let path = manifests.join(format!("added-{k}.yaml"));
        let acked = edit_and_time(
            &mut events,
            args.clients,
            &path,
            &added_service(k, args.endpoints),
            |e| match e {
                Event::Added(n, at) if *n == k => Some(*at),
                _ => None,
            },
        )
        .await
        .with_context(|| format!("service addition {k}"))?;
        added_p99.push(percentile(&acked, 0.99));
        added_max.push(acked.last().copied().unwrap_or_default());
    }
    added_p99.sort();
    added_max.sort();
    let rss_end = rss_kb(pid);
    let (conv_count, conv_mean, conv_p99) = pilot_convergence(&pilot.admin).await?;
    // legate-pilot hands freed memory back once pushes have been quiet for 2 s.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let rss_rest = rss_kb(pid);
    change_p99.sort();
    change_p50.sort();
    change_max.sort();

    println!(
        "legate-pilot scale: {} services × {} endpoints, {} simulated sidecars (SotW ADS), debounce {} ms",
        args.services, args.endpoints, args.clients, args.debounce_ms
    );
    println!(
        "  first full push per client: p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms; all {} clients served after {:.0} ms",
        ms(percentile(&first, 0.5)),
        ms(percentile(&first, 0.99)),
        ms(first.last().copied().unwrap_or_default()),
        args.clients,
        ms(all_full)
    );
    println!(
        "  largest response of a first push: {:.0} KB",
        largest as f64 / 1024.0
    );
    println!(
        "  endpoint change → every client's ACK ({} changes; medians over changes): p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms (worst change p99 {:.0} ms)",
        args.changes,
        ms(percentile(&change_p50, 0.5)),
        ms(percentile(&change_p99, 0.5)),
        ms(percentile(&change_max, 0.5)),
        ms(change_p99.last().copied().unwrap_or_default())
    );
    println!(
        "  service added → every client has its endpoints ({} additions; median over them): p99 {:.0} ms, max {:.0} ms",
        args.additions,
        ms(percentile(&added_p99, 0.5)),
        ms(percentile(&added_max, 0.5))
    );
    println!(
        "  the pilot's own convergence (change seen → proxy in sync, {conv_count} proxy convergences): mean {:.0} ms, p99 ≤ {conv_p99} s",
        conv_mean * 1000.0
    );
    println!(
        "  control plane RSS: {:.1} MB after the first push, {:.1} MB after the changes, {:.1} MB at rest 5 s later",
        rss_after_push as f64 / 1024.0,
        rss_end as f64 / 1024.0,
        rss_rest as f64 / 1024.0
    );
    println!(
        "  (the change latency includes the file source noticing the change and the debounce)"
    );
    if let Some(path) = &args.json {
        let doc = serde_json::json!({
            "services": args.services, "endpoints": args.endpoints, "clients": args.clients,
            "changes": args.changes, "debounce_ms": args.debounce_ms,
            "first_full_push_ms": first.iter().map(|d| ms(*d)).collect::<Vec<_>>(),
            "all_clients_served_ms": ms(all_full),
            "largest_first_push_response_bytes": largest,
            "change_p50_ms": change_p50.iter().map(|d| ms(*d)).collect::<Vec<_>>(),
            "change_p99_ms": change_p99.iter().map(|d| ms(*d)).collect::<Vec<_>>(),
            "change_max_ms": change_max.iter().map(|d| ms(*d)).collect::<Vec<_>>(),
            "additions": args.additions,
            "added_p99_ms": added_p99.iter().map(|d| ms(*d)).collect::<Vec<_>>(),
            "added_max_ms": added_max.iter().map(|d| ms(*d)).collect::<Vec<_>>(),
            "pilot_rss_kb_after_push": rss_after_push, "pilot_convergence_count": conv_count, "pilot_convergence_mean_ms": conv_mean * 1000.0,
            "pilot_convergence_p99_bucket_s": conv_p99,
            "pilot_rss_kb_end": rss_end, "pilot_rss_kb_rest": rss_rest,
        });
        std::fs::write(path, serde_json::to_string_pretty(&doc)?)?;
    }
    drop(pilot);
    Ok(())
}
