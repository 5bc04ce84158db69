//! `envoy.filters.http.ext_authz` against real Envoy 1.40: the same bootstrap, the same gRPC
//! authorization server (written here with the `Authorization` service of `envoy-types`), the
//! same requests; both proxies must give the same answers, the same upstream requests, the same
//! check requests (the attributes Legate fills) and the same counters.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use legate_proto::pb::envoy::config::core::v3 as corepb;
use legate_proto::pb::envoy::service::auth::v3 as authpb;
use legate_proto::pb::envoy::service::auth::v3::authorization_server::{
    Authorization, AuthorizationServer,
};
use legate_tests::bins::ProxyKind;
use legate_tests::client::{admin_get, send, Request, Response, Transport};
use legate_tests::process::TempDir;
use legate_tests::proxy::Proxy;
use legate_tests::upstream::{Echo, Upstream};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;

const DEADLINE: Duration = Duration::from_secs(10);

/// What the authorization server saw of one check.
#[derive(Debug, Clone, PartialEq)]
struct Seen {
    method: String,
    path: String,
    host: String,
    scheme: String,
    protocol: String,
    authority_header: Option<String>,
    method_header: Option<String>,
    path_header: Option<String>,
    client_header: Option<String>,
    context_extensions: BTreeMap<String, String>,
    source_ip: Option<String>,
    destination_ip: Option<String>,
}

#[derive(Debug, Clone, Default)]
struct AuthServer {
    seen: Arc<Mutex<Vec<Seen>>>,
}

fn header(key: &str, value: &str, action: i32) -> corepb::HeaderValueOption {
    corepb::HeaderValueOption {
        header: Some(corepb::HeaderValue {
            key: key.into(),
            value: value.into(),
            ..Default::default()
        }),
        append_action: action,
        ..Default::default()
    }
}

const APPEND_IF_EXISTS_OR_ADD: i32 = 0;
const OVERWRITE_IF_EXISTS_OR_ADD: i32 = 2;

fn status(code: i32) -> Option<legate_proto::pb::google::rpc::Status> {
    Some(legate_proto::pb::google::rpc::Status {
        code,
        ..Default::default()
    })
}

fn ip_of(peer: Option<&authpb::attribute_context::Peer>) -> Option<String> {
    match peer?.address.as_ref()?.address.as_ref()? {
        corepb::address::Address::SocketAddress(sa) => Some(sa.address.clone()),
        _ => None,
    }
}

#[tonic::async_trait]
impl Authorization for AuthServer {
    async fn check(
        &self,
        request: tonic::Request<authpb::CheckRequest>,
    ) -> Result<tonic::Response<authpb::CheckResponse>, tonic::Status> {
        use authpb::check_response::HttpResponse as H;
        let attrs = request.into_inner().attributes.unwrap_or_default();
        let http = attrs
            .request
            .as_ref()
            .and_then(|r| r.http.clone())
            .unwrap_or_default();
        let ctx: BTreeMap<String, String> = attrs.context_extensions.clone().into_iter().collect();
        if let Ok(mut seen) = self.seen.lock() {
            seen.push(Seen {
                method: http.method.clone(),
                path: http.path.clone(),
                host: http.host.clone(),
                scheme: http.scheme.clone(),
                protocol: http.protocol.clone(),
                authority_header: http.headers.get(":authority").cloned(),
                method_header: http.headers.get(":method").cloned(),
                path_header: http.headers.get(":path").cloned(),
                client_header: http.headers.get("x-client").cloned(),
                context_extensions: ctx.clone(),
                source_ip: ip_of(attrs.source.as_ref()),
                destination_ip: ip_of(attrs.destination.as_ref()),
            });
        }
        let path = http.path.as_str();
        let response = if path.starts_with("/deny-default") {
            authpb::CheckResponse {
                status: status(7),
                ..Default::default()
            }
        } else if path.starts_with("/deny") {
            authpb::CheckResponse {
                status: status(7),
                http_response: Some(H::DeniedResponse(authpb::DeniedHttpResponse {
                    status: Some(legate_proto::pb::envoy::r#type::v3::HttpStatus { code: 401 }),
                    headers: vec![
                        header(
                            "www-authenticate",
                            "Bearer realm=test",
                            APPEND_IF_EXISTS_OR_ADD,
                        ),
                        header("x-deny-reason", "no token", OVERWRITE_IF_EXISTS_OR_ADD),
                    ],
                    body: "denied by the test server".into(),
                })),
                ..Default::default()
            }
        } else {
            let ctx_header = ctx
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(";");
            let mut headers = vec![
                header("x-auth-user", "alice", OVERWRITE_IF_EXISTS_OR_ADD),
                header("x-auth-added", "1", APPEND_IF_EXISTS_OR_ADD),
            ];
            if !ctx_header.is_empty() {
                headers.push(header("x-ctx", &ctx_header, OVERWRITE_IF_EXISTS_OR_ADD));
            }
            authpb::CheckResponse {
                status: status(0),
                http_response: Some(H::OkResponse(authpb::OkHttpResponse {
                    headers,
                    headers_to_remove: vec!["x-remove-me".into()],
                    response_headers_to_add: vec![header(
                        "x-auth-resp",
                        "yes",
                        OVERWRITE_IF_EXISTS_OR_ADD,
                    )],
                    ..Default::default()
                })),
                ..Default::default()
            }
        };
        Ok(tonic::Response::new(response))
    }
}

async fn start_auth_server() -> Result<(AuthServer, SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let server = AuthServer::default();
    let svc = AuthorizationServer::new(server.clone());
    let task = tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(TcpListenerStream::new(listener))
            .await;
    });
    Ok((server, addr, task))
}

/// One listener whose connection manager runs ext_authz against cluster `authz_cluster`.
fn listener(name: &str, authz_cluster: &str, filter_extra: &str, log: &Path) -> String {
    format!(
        r#"
  - name: {name}
    address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          '@type': type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: {name}
          access_log:
          - name: log
            typed_config:
              '@type': type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog
              path: {log}
              log_format: {{text_format: "{name} %REQ(:PATH)% %RESPONSE_CODE% %RESPONSE_FLAGS%\n"}}
          route_config:
            name: local
            virtual_hosts:
            - name: all
              domains: ['*']
              routes:
              - match: {{prefix: /public}}
                route: {{cluster: app}}
                typed_per_filter_config:
                  envoy.filters.http.ext_authz:
                    '@type': type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute
                    disabled: true
              - match: {{prefix: /ctx}}
                route: {{cluster: app}}
                typed_per_filter_config:
                  envoy.filters.http.ext_authz:
                    '@type': type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute
                    check_settings: {{context_extensions: {{team: payments, tier: gold}}}}
              - match: {{prefix: /}}
                route: {{cluster: app}}
          http_filters:
          - name: envoy.filters.http.ext_authz
            typed_config:
              '@type': type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz
              transport_api_version: V3
              grpc_service:
                envoy_grpc: {{cluster_name: {authz_cluster}}}
                timeout: 5s
{filter_extra}
          - name: envoy.filters.http.router
            typed_config: {{'@type': type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
"#,
        log = log.display()
    )
}

fn cluster(name: &str, port: u16, h2: bool) -> String {
    let h2 = if h2 {
        "\n    typed_extension_protocol_options:\n      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:\n        '@type': type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions\n        explicit_http_config: {http2_protocol_options: {}}"
    } else {
        ""
    };
    format!(
        r#"
  - name: {name}
    type: STATIC
    connect_timeout: 1s{h2}
    load_assignment:
      cluster_name: {name}
      endpoints:
      - lb_endpoints:
        - endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}}}
"#
    )
}

fn bootstrap(app: u16, authz: u16, dead: u16, log: &Path) -> String {
    let mut y = String::from(
        "admin: {address: {socket_address: {address: 127.0.0.1, port_value: 0}}}\nstatic_resources:\n  listeners:",
    );
    y += &listener("main", "authz", "", log);
    y += &listener(
        "down_deny",
        "authz_dead",
        "              status_on_error: {code: 503}",
        log,
    );
    y += &listener(
        "down_allow",
        "authz_dead",
        "              failure_mode_allow: true\n              failure_mode_allow_header_add: true\n              stat_prefix: waf",
        log,
    );
    y += "  clusters:";
    y += &cluster("app", app, false);
    y += &cluster("authz", authz, true);
    y += &cluster("authz_dead", dead, true);
    y
}

/// What a user (and the upstream, and the authorization server) saw of one request.
#[derive(Debug, PartialEq)]
struct Outcome {
    status: u16,
    headers: BTreeMap<String, Option<String>>,
    body: String,
    /// The upstream's view of the request, when it got there.
    upstream: Option<BTreeMap<String, Option<String>>>,
}

const RESPONSE_HEADERS: &[&str] = &[
    "x-auth-resp",
    "www-authenticate",
    "x-deny-reason",
    "content-type",
];
const UPSTREAM_HEADERS: &[&str] = &[
    "x-auth-user",
    "x-auth-added",
    "x-remove-me",
    "x-ctx",
    "x-client",
    "x-envoy-auth-failure-mode-allowed",
];

fn outcome(r: &Response) -> Outcome {
    let upstream = serde_json::from_slice::<Echo>(&r.body).ok().map(|e| {
        UPSTREAM_HEADERS
            .iter()
            .map(|h| (h.to_string(), e.headers.get(*h).cloned()))
            .collect()
    });
    Outcome {
        status: r.status,
        headers: RESPONSE_HEADERS
            .iter()
            .map(|h| (h.to_string(), r.header(h)))
            .collect(),
        body: if upstream.is_some() {
            "<echo>".into()
        } else {
            String::from_utf8_lossy(&r.body).into_owned()
        },
        upstream,
    }
}

/// The requests of the test: (listener, path, extra headers).
const CASES: &[(&str, &str)] = &[
    ("main", "/allow"),
    ("main", "/deny"),
    ("main", "/deny-default"),
    ("main", "/public"),
    ("main", "/ctx/a"),
    ("down_deny", "/allow"),
    ("down_allow", "/allow"),
];

struct Run {
    outcomes: Vec<Outcome>,
    seen: Vec<Seen>,
    stats: BTreeMap<String, String>,
    log: Vec<String>,
}

async fn poll_lines(path: &Path, n: usize) -> Result<Vec<String>> {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let lines: Vec<String> = text.lines().map(str::to_owned).collect();
        if lines.len() >= n {
            return Ok(lines);
        }
        if Instant::now() > deadline {
            bail!("{} has {} lines, want {n}", path.display(), lines.len());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn run(kind: ProxyKind, auth: &AuthServer, authz: SocketAddr, app: &Upstream) -> Result<Run> {
    let dir = TempDir::new(&format!("ext-authz-{}", kind.name()))?;
    let dead = TcpListener::bind("127.0.0.1:0").await?.local_addr()?.port();
    let log = dir.path().join("access.log");
    let path = dir.path().join("bootstrap.yaml");
    std::fs::write(&path, bootstrap(app.addr.port(), authz.port(), dead, &log))?;
    if let Ok(mut s) = auth.seen.lock() {
        s.clear();
    }
    let proxy = Proxy::start(kind, &path, dir.path()).await?;
    let mut outcomes = Vec::new();
    for (listener, path) in CASES {
        let mut req = Request::get("example.com", path);
        req.headers = vec![
            ("x-client".into(), "test".into()),
            ("x-remove-me".into(), "1".into()),
            ("x-auth-added".into(), "0".into()),
        ];
        let addr = proxy.listener(listener)?;
        let resp = send(addr, &Transport::H1, &req)
            .await
            .with_context(|| format!("{kind} {listener} {path}\n{}", proxy.output()))?;
        outcomes.push(outcome(&resp));
    }
    let log = poll_lines(&log, CASES.len()).await?;
    let (_, text) = admin_get(proxy.admin, "/stats").await?;
    let stats = text
        .lines()
        .filter(|l| l.contains(".ext_authz."))
        .filter_map(|l| l.split_once(": "))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    let seen = auth.seen.lock().map(|s| s.clone()).unwrap_or_default();
    Ok(Run {
        outcomes,
        seen,
        stats,
        log,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ext_authz_matches_envoy() -> Result<()> {
    let app = Upstream::plain("app").await?;
    let (auth, authz, _task) = start_auth_server().await?;
    let envoy = run(ProxyKind::Envoy, &auth, authz, &app).await?;
    let legate = run(ProxyKind::Legate, &auth, authz, &app).await?;

    // What the user sees, and what reaches the upstream: the same on both, case by case.
    for (i, (listener, path)) in CASES.iter().enumerate() {
        assert_eq!(
            legate.outcomes[i], envoy.outcomes[i],
            "{listener} {path}: legate (left) differs from envoy (right)"
        );
    }
    // And what it is, so that both being wrong the same way fails too.
    let o = |i: usize| &envoy.outcomes[i];
    let up = |i: usize, h: &str| {
        o(i).upstream
            .as_ref()
            .and_then(|u| u.get(h).cloned().flatten())
    };
    assert_eq!(o(0).status, 200);
    assert_eq!(up(0, "x-auth-user").as_deref(), Some("alice"));
    assert_eq!(up(0, "x-remove-me"), None);
    assert_eq!(o(0).headers["x-auth-resp"].as_deref(), Some("yes"));
    assert_eq!(o(1).status, 401);
    assert_eq!(o(1).body, "denied by the test server");
    assert_eq!(o(1).headers["x-deny-reason"].as_deref(), Some("no token"));
    assert_eq!(o(2).status, 403);
    assert_eq!(o(3).status, 200);
    assert_eq!(up(3, "x-auth-user"), None, "/public is not checked");
    assert_eq!(up(4, "x-ctx").as_deref(), Some("team=payments;tier=gold"));
    assert_eq!(o(5).status, 503);
    assert_eq!(o(6).status, 200);
    assert_eq!(
        up(6, "x-envoy-auth-failure-mode-allowed").as_deref(),
        Some("true")
    );

    // The check requests: one per checked request on `main`, with the same attributes.
    assert_eq!(envoy.seen.len(), 4, "{:?}", envoy.seen);
    assert_eq!(legate.seen, envoy.seen);
    assert_eq!(envoy.seen[0].client_header.as_deref(), Some("test"));

    // Counters and access-log flags (UAEX on denials and on errors that deny).
    let mut envoy_log = envoy.log.clone();
    let mut legate_log = legate.log.clone();
    envoy_log.sort();
    legate_log.sort();
    assert_eq!(legate_log, envoy_log);
    assert!(
        envoy_log.iter().any(|l| l == "main /deny 401 UAEX"),
        "{envoy_log:?}"
    );
    let wanted: HashMap<&str, &str> = HashMap::from([
        ("http.main.ext_authz.ok", "2"),
        ("http.main.ext_authz.denied", "2"),
        ("http.down_deny.ext_authz.error", "1"),
        ("http.down_allow.ext_authz.waf.failure_mode_allowed", "1"),
    ]);
    for (name, value) in wanted {
        assert_eq!(
            envoy.stats.get(name).map(String::as_str),
            Some(value),
            "envoy {name}: {:?}",
            envoy.stats
        );
        assert_eq!(
            legate.stats.get(name).map(String::as_str),
            Some(value),
            "legate {name}: {:?}",
            legate.stats
        );
    }
    Ok(())
}
