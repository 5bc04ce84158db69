//! Listeners: binding, accepting, picking a filter chain (`filter_chain_match` on SNI,
//! transport protocol and ALPN, read by the TLS inspector), TLS termination, and serving the
//! connection's HTTP codec until it closes or the proxy drains.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::hcm::{Codec, ConnInfo, HcmConfig};
use crate::server::Runtime;
use crate::tls::{PeerSans, SanMatcher};

/// `filter_chain_match`.
#[derive(Debug, Default)]
pub struct ChainMatch {
    pub server_names: Vec<String>,
    pub transport_protocol: Option<String>,
    pub application_protocols: Vec<String>,
}

/// Downstream TLS of a filter chain.
#[derive(Debug)]
pub struct DownstreamTls {
    pub config: Arc<rustls::ServerConfig>,
    pub san_matchers: Vec<SanMatcher>,
}

/// A filter chain: its match, its TLS and its connection manager.
#[derive(Debug)]
pub struct FilterChain {
    pub name: String,
    pub matcher: ChainMatch,
    pub tls: Option<DownstreamTls>,
    pub hcm: Arc<HcmConfig>,
}

/// A validated listener.
#[derive(Debug)]
pub struct ListenerConfig {
    pub name: String,
    pub address: SocketAddr,
    pub chains: Vec<Arc<FilterChain>>,
    pub default_chain: Option<Arc<FilterChain>>,
    pub tls_inspector: bool,
    pub buffer_limit: Option<u32>,
}

/// What the TLS inspector learned from the first bytes.
#[derive(Debug, Default)]
struct Detected {
    tls: bool,
    sni: Option<String>,
    alpn: Vec<String>,
}

impl ListenerConfig {
    /// Envoy's filter chain selection: server name (exact, then longest wildcard, then none),
    /// then transport protocol (exact, then none), then ALPN (any match, then none).
    fn select(&self, d: &Detected) -> Option<&Arc<FilterChain>> {
        let transport = if d.tls { "tls" } else { "raw_buffer" };
        let mut cands: Vec<&Arc<FilterChain>> = Vec::new();
        if let Some(sni) = &d.sni {
            let sni = sni.to_ascii_lowercase();
            cands = self
                .chains
                .iter()
                .filter(|c| c.matcher.server_names.contains(&sni))
                .collect();
            if cands.is_empty() {
                let mut best = 0;
                for c in &self.chains {
                    for n in &c.matcher.server_names {
                        if let Some(suffix) = n.strip_prefix('*') {
                            if sni.ends_with(suffix) && sni.len() > suffix.len() {
                                if suffix.len() > best {
                                    best = suffix.len();
                                    cands.clear();
                                }
                                if suffix.len() == best {
                                    cands.push(c);
                                }
                            }
                        }
                    }
                }
            }
        }
        if cands.is_empty() {
            cands = self
                .chains
                .iter()
                .filter(|c| c.matcher.server_names.is_empty())
                .collect();
        }
        let exact: Vec<_> = cands
            .iter()
            .copied()
            .filter(|c| c.matcher.transport_protocol.as_deref() == Some(transport))
            .collect();
        let cands: Vec<_> = if exact.is_empty() {
            cands
                .into_iter()
                .filter(|c| c.matcher.transport_protocol.is_none())
                .collect()
        } else {
            exact
        };
        let alpn: Vec<_> = cands
            .iter()
            .copied()
            .filter(|c| {
                c.matcher
                    .application_protocols
                    .iter()
                    .any(|p| d.alpn.contains(p))
            })
            .collect();
        let mut cands = if alpn.is_empty() {
            cands
                .into_iter()
                .filter(|c| c.matcher.application_protocols.is_empty())
                .collect()
        } else {
            alpn
        };
        if cands.is_empty() {
            self.default_chain.as_ref()
        } else {
            Some(cands.swap_remove(0))
        }
    }
}

/// Binds a listener's socket (with `SO_REUSEADDR`, dual-stack off for IPv6).
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let domain = if addr.is_ipv6() {
        socket2::Domain::IPV6
    } else {
        socket2::Domain::IPV4
    };
    let s = socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
    s.set_reuse_address(true)?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(1024)?;
    TcpListener::from_std(s.into())
}

/// What a connection's listener is running now: its configuration and the drain signal of
/// that configuration's generation. An update swaps in a new generation; the old one's
/// connections are told to drain.
#[derive(Debug)]
pub struct Generation {
    pub config: Arc<ListenerConfig>,
    pub drain: watch::Receiver<bool>,
}

/// When a connection must drain: the whole proxy drains, or its listener generation was
/// replaced or removed (a dropped sender counts as drained).
#[derive(Debug, Clone)]
pub struct Drain {
    global: watch::Receiver<bool>,
    listener: watch::Receiver<bool>,
}

impl Drain {
    fn is_set(&self) -> bool {
        *self.global.borrow() || *self.listener.borrow()
    }

    /// Whether the whole proxy drains (rather than only this listener's generation).
    fn is_global(&self) -> bool {
        *self.global.borrow()
    }

    /// Resolves once the connection must drain.
    async fn wait(&mut self) {
        loop {
            if self.is_set() {
                return;
            }
            tokio::select! {
                r = self.global.changed() => if r.is_err() { return },
                r = self.listener.changed() => if r.is_err() { return },
            }
        }
    }
}

/// Accepts connections until the proxy drains or `stop` turns true (the listener was
/// removed). Each connection takes the listener's current generation.
pub async fn serve(
    socket: TcpListener,
    name: String,
    current: Arc<arc_swap::ArcSwap<Generation>>,
    runtime: Arc<Runtime>,
    mut stop: watch::Receiver<bool>,
) {
    let mut global = runtime.drain_signal();
    let local = socket.local_addr().ok();
    loop {
        // Draining wins over a waiting connection: after a hot restart the successor,
        // which shares the socket, accepts it.
        let accepted = tokio::select! {
            biased;
            _ = global.changed() => break,
            _ = stop.changed() => break,
            a = socket.accept() => a,
        };
        let (stream, remote) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(listener = %name, "accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let generation = current.load_full();
        let config = generation.config.clone();
        let drain = Drain {
            global: global.clone(),
            listener: generation.drain.clone(),
        };
        let runtime = runtime.clone();
        let local = stream.local_addr().ok().or(local).unwrap_or(config.address);
        tokio::spawn(async move {
            if let Err(e) = connection(stream, remote, local, config, runtime, drain).await {
                tracing::debug!(%remote, "connection ended: {e}");
            }
        });
    }
}

async fn inspect(stream: &TcpStream) -> std::io::Result<Detected> {
    let mut buf = vec![0u8; 16 * 1024];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let n = tokio::time::timeout_at(deadline, stream.peek(&mut buf))
            .await
            .map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::TimedOut, "listener filter timeout")
            })??;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        match crate::tls_inspector::parse_client_hello(&buf[..n]) {
            crate::tls_inspector::Parse::NotTls => return Ok(Detected::default()),
            crate::tls_inspector::Parse::Hello { sni, alpn } => {
                return Ok(Detected {
                    tls: true,
                    sni,
                    alpn,
                })
            }
            crate::tls_inspector::Parse::NeedMore => {
                if n == buf.len() {
                    return Ok(Detected {
                        tls: true,
                        ..Default::default()
                    });
                }
                stream.readable().await?;
            }
        }
    }
}

async fn connection(
    stream: TcpStream,
    remote: SocketAddr,
    local: SocketAddr,
    config: Arc<ListenerConfig>,
    runtime: Arc<Runtime>,
    drain: Drain,
) -> std::io::Result<()> {
    let detected = if config.tls_inspector {
        inspect(&stream).await?
    } else {
        Detected::default()
    };
    let Some(chain) = config.select(&detected) else {
        tracing::debug!(%remote, "no matching filter chain");
        return Ok(());
    };
    let hcm = chain.hcm.clone();
    hcm.stats.cx_total.inc();
    let active = hcm.stats.cx_active.clone_handle();
    active.inc();
    let result = match &chain.tls {
        // Boxed: a TLS session and its connection are several KB that a plaintext
        // connection's task should not reserve.
        Some(tls) => {
            let peer = Peer {
                remote,
                local,
                hcm,
                runtime,
            };
            Box::pin(serve_tls(stream, tls, peer, config.buffer_limit, drain)).await
        }
        None => {
            let flag = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let info = ConnInfo {
                remote,
                local,
                tls: false,
                sni: detected.sni,
                peer_principals: Vec::new(),
                framing_conflict: flag.clone(),
                draining: Default::default(),
                saw_h2: Default::default(),
                hcm,
                runtime,
            };
            let codec = info.hcm.codec;
            let io = crate::sniff::Sniffed::new(stream, flag);
            serve_http(io, Arc::new(info), codec, config.buffer_limit, drain).await
        }
    };
    active.dec();
    result
}

/// Who a connection is from and to, and what serves it.
struct Peer {
    remote: SocketAddr,
    local: SocketAddr,
    hcm: Arc<HcmConfig>,
    runtime: Arc<Runtime>,
}

/// Completes the TLS handshake, checks the client certificate's SANs, and serves HTTP over
/// the session.
async fn serve_tls(
    stream: TcpStream,
    tls: &DownstreamTls,
    peer: Peer,
    buffer_limit: Option<u32>,
    drain: Drain,
) -> std::io::Result<()> {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls.config.clone());
    let s = acceptor.accept(stream).await?;
    let (_, session) = s.get_ref();
    let sni = session.server_name().map(str::to_owned);
    let h2 = session.alpn_protocol() == Some(b"h2");
    let sans = session
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| PeerSans::from_der(c.as_ref()));
    match &sans {
        Some(sans) if !sans.matches(&tls.san_matchers) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                "client certificate SAN mismatch",
            ));
        }
        None if !tls.san_matchers.is_empty() => return Ok(()),
        _ => {}
    }
    let flag = Arc::new(AtomicBool::new(false));
    let info = ConnInfo {
        remote: peer.remote,
        local: peer.local,
        tls: true,
        sni,
        peer_principals: sans.map(|s| s.principals()).unwrap_or_default(),
        framing_conflict: flag.clone(),
        draining: Default::default(),
        saw_h2: Default::default(),
        hcm: peer.hcm,
        runtime: peer.runtime,
    };
    let codec = if h2 { Codec::Http2 } else { info.hcm.codec };
    serve_http(
        crate::sniff::Sniffed::new(s, flag),
        Arc::new(info),
        codec,
        buffer_limit,
        drain,
    )
    .await
}

async fn serve_http<S>(
    io: S,
    info: Arc<ConnInfo>,
    codec: Codec,
    buffer_limit: Option<u32>,
    mut drain: Drain,
) -> std::io::Result<()>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let hcm = info.hcm.clone();
    let hcm_drain_time = info.runtime.drain_time;
    let draining_flag = info.draining.clone();
    let saw_h2 = info.saw_h2.clone();
    let activity = Arc::new(Activity::default());
    let svc = {
        let activity = activity.clone();
        service_fn(move |req: http::Request<hyper::body::Incoming>| {
            if req.version() == http::Version::HTTP_2 && !activity.h2.swap(true, Ordering::Relaxed)
            {
                // The protocol is known now; a draining connection sends its GOAWAY.
                activity.h2_known.notify_one();
            }
            activity.requests.fetch_add(1, Ordering::Relaxed);
            activity.in_flight.fetch_add(1, Ordering::Relaxed);
            let handled = crate::hcm::handle(info.clone(), req);
            let activity = activity.clone();
            async move {
                let result = handled.await;
                activity.in_flight.fetch_sub(1, Ordering::Relaxed);
                result
            }
        })
    };
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    let max_headers = (hcm.max_request_headers_kb as usize * 1024).max(8192);
    // `per_connection_buffer_limit_bytes` (Envoy's default 1 MiB) bounds the HTTP/1.1 read
    // buffer; it never goes below what the header limit needs.
    let read_buffer = (buffer_limit.unwrap_or(1024 * 1024) as usize).max(max_headers + 1024);
    builder
        .http1()
        .timer(TokioTimer::new())
        .keep_alive(true)
        .max_buf_size(read_buffer)
        .header_read_timeout(hcm.idle_timeout.unwrap_or(Duration::from_secs(3600)));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(max_headers).unwrap_or(u32::MAX))
        .max_concurrent_streams(hcm.h2_max_concurrent_streams.unwrap_or(2_147_483_647));
    let builder = match codec {
        Codec::Auto => builder,
        Codec::Http1 => builder.http1_only(),
        Codec::Http2 => builder.http2_only(),
    };
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), svc);
    tokio::pin!(conn);
    // Draining: HTTP/2 gets GOAWAY at once. HTTP/1.1 gets `Connection: close` on its next
    // response; closing an idle keep-alive connection at once would race a request the client
    // is sending on it, so when the proxy drains (SIGTERM, a hot restart) it is closed once
    // it has been idle for `IDLE_GRACE`, and when only its listener drains, once idle after
    // the connection manager's `drain_timeout`. After `--drain-time-s` the connection is
    // closed whatever it is doing.
    let drain_time = hcm_drain_time;
    let far = tokio::time::Instant::now() + Duration::from_secs(86_400 * 365);
    let mut deadline = far;
    let mut soft_deadline = far;
    let mut draining = false;
    let mut idle_close = false;
    let mut shut = false;
    let mut seen_requests = 0;
    let mut idle_check = tokio::time::interval(IDLE_GRACE);
    let start_drain = |drain: &Drain| {
        draining_flag.store(true, Ordering::Relaxed);
        let now = tokio::time::Instant::now();
        let h2 = saw_h2.load(Ordering::Relaxed)
            || activity.h2.load(Ordering::Relaxed)
            || codec == Codec::Http2;
        // The idle close comes well before the hard one, so a request the client sends just
        // before the idle close still has time to finish.
        let soft = if h2 {
            now
        } else if drain.is_global() {
            far
        } else {
            now + hcm.drain_timeout.min(drain_time / 2)
        };
        (now + drain_time, soft, drain.is_global())
    };
    if drain.is_set() {
        draining = true;
        (deadline, soft_deadline, idle_close) = start_drain(&drain);
        idle_check.reset();
    }
    loop {
        tokio::select! {
            r = conn.as_mut() => return r.map_err(|e| std::io::Error::other(e.to_string())),
            _ = drain.wait(), if !draining => {
                draining = true;
                (deadline, soft_deadline, idle_close) = start_drain(&drain);
                idle_check.reset();
                seen_requests = activity.requests.load(Ordering::Relaxed);
            }
            _ = tokio::time::sleep_until(soft_deadline), if draining && !shut => {
                shut = true;
                // HTTP/1.1: close after the in-flight response; HTTP/2: GOAWAY.
                conn.as_mut().graceful_shutdown();
            }
            _ = activity.h2_known.notified(), if draining && !shut => {
                shut = true;
                conn.as_mut().graceful_shutdown();
            }
            _ = idle_check.tick(), if draining && idle_close && !shut => {
                let requests = activity.requests.load(Ordering::Relaxed);
                if requests == seen_requests && activity.in_flight.load(Ordering::Relaxed) == 0 {
                    shut = true;
                    conn.as_mut().graceful_shutdown();
                }
                seen_requests = requests;
            }
            _ = tokio::time::sleep_until(deadline), if draining => {
                return Ok(());
            }
        }
    }
}

/// How long a connection may stay idle, once the proxy drains, before it is closed.
const IDLE_GRACE: Duration = Duration::from_secs(1);

/// What a connection's requests tell its drain loop.
#[derive(Debug, Default)]
struct Activity {
    /// The connection speaks HTTP/2 (seen on its first request).
    h2: AtomicBool,
    h2_known: tokio::sync::Notify,
    requests: AtomicU64,
    in_flight: AtomicUsize,
}
