//! `legate-pilot`'s Kubernetes source against a fake API server, and `deploy/`'s manifests.
//!
//! No Kubernetes API server can run on the test machines, so the source (kube-rs watchers) is
//! pointed, through a generated kubeconfig, at [`FakeApiServer`]: real list and watch JSON
//! over HTTP, with the faults an informer must survive scripted by the test. The source runs
//! in-process so the test can assert each model it publishes; one end-to-end test runs the
//! `legate-pilot` binary with `--kubeconfig` in front of a real Envoy sidecar.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use legate_control_plane::kube as source;
use legate_control_plane::metrics::Metrics;
use legate_control_plane::model::Model;
use legate_tests::bins::{pilot_bin, workspace_root, ProxyKind};
use legate_tests::client::admin_get;
use legate_tests::kube_api::{FakeApiServer, Gone};
use legate_tests::mesh::{self, answered_by};
use legate_tests::process::{ProcessGuard, TempDir};
use legate_tests::proxy::{parse_listeners, Proxy};
use legate_tests::upstream::Upstream;
use serde_json::{json, Value};
use tokio::sync::watch;

const DEADLINE: Duration = Duration::from_secs(15);
const POLL: Duration = Duration::from_millis(50);
const TOKEN: &str = "fake-token";

/// Polls `f` until it returns `Ok(Some(_))`, or fails with the last error after `DEADLINE`.
async fn eventually<T, F, Fut>(what: &str, f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>>>,
{
    legate_tests::wait::eventually_within(what, DEADLINE, POLL, f).await
}

fn service(name: &str, cluster_ip: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"clusterIP": cluster_ip, "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}
    })
}

fn slice(service: &str, addresses: &[&str], port: u16) -> Value {
    let endpoints: Vec<Value> = addresses
        .iter()
        .map(|a| json!({"addresses": [a], "conditions": {"ready": true}, "zone": "zone-a"}))
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("{service}-1"), "namespace": "default",
                     "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
        "endpoints": endpoints
    })
}

fn namespace(name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
}

/// The addresses of a service's endpoints in `model`, sorted.
fn addresses(model: &Model, service: &str) -> Vec<String> {
    let mut out: Vec<String> = model
        .endpoint_slices
        .values()
        .filter(|s| s.service.as_deref() == Some(service))
        .flat_map(|s| s.endpoints.iter().flat_map(|e| e.addresses.clone()))
        .collect();
    out.sort();
    out
}

fn services(model: &Model) -> Vec<String> {
    model.services.keys().map(|(_, n)| n.clone()).collect()
}

/// The source running in-process against `api`, and the models it publishes.
struct Source {
    models: watch::Receiver<Arc<Model>>,
    stop: watch::Sender<bool>,
    _dir: TempDir,
}

impl Source {
    async fn start(api: &FakeApiServer) -> Result<Self> {
        let dir = TempDir::new("kube-source")?;
        let kubeconfig = dir.path().join("kubeconfig");
        api.write_kubeconfig(&kubeconfig, TOKEN)?;
        let client = source::client_from_kubeconfig(&kubeconfig).await?;
        let (models_tx, models) = watch::channel(Arc::new(Model::default()));
        let (stop, stop_rx) = watch::channel(false);
        tokio::spawn(source::run(
            client,
            models_tx,
            Arc::new(Metrics::default()),
            stop_rx,
        ));
        Ok(Self {
            models,
            stop,
            _dir: dir,
        })
    }

    /// Waits for the next published model satisfying `f`.
    async fn wait(&mut self, what: &str, f: impl Fn(&Model) -> bool) -> Result<Arc<Model>> {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            let model = self.models.borrow_and_update().clone();
            if f(&model) {
                return Ok(model);
            }
            match tokio::time::timeout_at(deadline, self.models.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => bail!("{what}: the source stopped"),
                Err(_) => bail!(
                    "{what}: not seen within {DEADLINE:?}; last model: services {:?}, slices {:?}",
                    services(&model),
                    model.endpoint_slices.keys().collect::<Vec<_>>()
                ),
            }
        }
    }
}

impl Drop for Source {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

/// Waits until the fake has received `n` watch requests for `kind`; returns their versions.
async fn watches(api: &FakeApiServer, kind: &str, n: usize) -> Result<Vec<String>> {
    eventually(&format!("{n} watches of {kind}"), || async {
        let w = api.watches(kind)?;
        Ok((w.len() >= n).then_some(w))
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_source_follows_list_watch_bookmarks_gone_and_drops() -> Result<()> {
    let api = FakeApiServer::start().await?;
    api.apply(namespace("default"))?;
    api.apply(service("echo", "10.96.0.10"))?;
    api.apply(slice("echo", &["10.0.0.1"], 8080))?;
    // Pods and Secrets reach the model through the same parser as the file source's.
    api.apply(json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "echo-0", "namespace": "default", "labels": {"app": "echo"}},
        "spec": {"containers": [{"name": "echo", "image": "echo"}]},
        "status": {"podIP": "10.0.0.1", "phase": "Running",
                   "conditions": [{"type": "Ready", "status": "True"}]}}))?;
    api.apply(json!({"apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "opaque", "namespace": "default"},
        "type": "Opaque", "data": {"greeting": "aGVsbG8="}}))?;
    let mut source = Source::start(&api).await?;

    // The first model is the complete list: never a half-listed cluster.
    tokio::time::timeout(DEADLINE, source.models.changed())
        .await
        .context("the first model")??;
    let first = source.models.borrow_and_update().clone();
    assert_eq!(services(&first), ["echo"]);
    assert_eq!(addresses(&first, "echo"), ["10.0.0.1"]);
    assert!(first.namespaces.contains("default"));
    let pod = first
        .pod_by_ip("10.0.0.1".parse()?)
        .ok_or_else(|| anyhow!("no pod echo-0 in the model"))?;
    assert_eq!((pod.name.as_str(), pod.ready), ("echo-0", true));
    assert_eq!(pod.labels.get("app").map(String::as_str), Some("echo"));
    let secret = first
        .secret("default", "opaque")
        .ok_or_else(|| anyhow!("no secret in the model"))?;
    assert_eq!(
        secret.data.get("greeting").map(Vec::as_slice),
        Some(&b"hello"[..])
    );
    for kind in [
        "Namespace",
        "Service",
        "EndpointSlice",
        "Pod",
        "Ingress",
        "Secret",
    ] {
        assert_eq!(api.lists(kind)?, 1, "{kind} listed once");
        let w = watches(&api, kind, 1).await?;
        assert!(!w[0].is_empty(), "{kind} watched from the list's version");
    }
    let requests = api.requests();
    assert!(
        requests
            .iter()
            .all(|r| r.authorization.as_deref() == Some("Bearer fake-token")),
        "every request carries the kubeconfig's token"
    );
    assert!(requests.iter().filter(|r| r.is_watch()).all(|r| r
        .query
        .get("allowWatchBookmarks")
        .map(String::as_str)
        == Some("true")));

    // Watch events: ADDED, MODIFIED, DELETED.
    api.apply(service("other", "10.96.0.11"))?;
    api.apply(slice("other", &["10.0.0.9"], 8080))?;
    source
        .wait("other added", |m| addresses(m, "other") == ["10.0.0.9"])
        .await?;
    api.apply(slice("echo", &["10.0.0.1", "10.0.0.2"], 8080))?;
    source
        .wait("echo scaled", |m| {
            addresses(m, "echo") == ["10.0.0.1", "10.0.0.2"]
        })
        .await?;
    let last_slice_change = api.delete("EndpointSlice", "default", "other-1")?;
    api.delete("Service", "default", "other")?;
    source
        .wait("other deleted", |m| {
            services(m) == ["echo"] && addresses(m, "other").is_empty()
        })
        .await?;

    // A bookmark moves the watch's version on: after the server ends the watch (its
    // timeoutSeconds), it resumes from the bookmark's version, not the last object's.
    api.apply(namespace("elsewhere"))?;
    source
        .wait("namespace added", |m| m.namespaces.contains("elsewhere"))
        .await?;
    let bookmark = api.bookmark("Service")?;
    let before = api.watches("Service")?.len();
    // The bookmark is delivered before the end on the same stream.
    api.end_watches(Some("Service"))?;
    let w = watches(&api, "Service", before + 1).await?;
    assert_eq!(w[before], bookmark.to_string(), "resumed from the bookmark");
    assert_eq!(api.lists("Service")?, 1, "a resumed watch does not re-list");

    // A dropped watch (cut mid-stream) resumes from the last version seen and replays what
    // happened while it was gone, without a re-list.
    api.pause("EndpointSlice")?;
    let before = api.watches("EndpointSlice")?.len();
    api.apply(slice("echo", &["10.0.0.3"], 8080))?;
    api.drop_watches(Some("EndpointSlice"))?;
    source
        .wait("echo moved while the watch was down", |m| {
            addresses(m, "echo") == ["10.0.0.3"]
        })
        .await?;
    let w = watches(&api, "EndpointSlice", before + 1).await?;
    assert_eq!(
        w[before],
        last_slice_change.to_string(),
        "resumed from the last version seen"
    );
    assert_eq!(api.lists("EndpointSlice")?, 1, "no re-list after a drop");

    // 410 Gone as an ERROR event on the open watch: the source lists again and swaps in what
    // the list says (a service created and one deleted while the watch fell behind).
    api.pause("Service")?;
    api.apply(service("late", "10.96.0.12"))?;
    api.apply(service("doomed", "10.96.0.13"))?;
    api.delete("Service", "default", "doomed")?;
    api.expire("Service", Gone::Event)?;
    let model = source
        .wait("late listed after 410", |m| services(m) == ["echo", "late"])
        .await?;
    assert_eq!(api.lists("Service")?, 2, "the ERROR 410 forced a re-list");
    assert_eq!(addresses(&model, "echo"), ["10.0.0.3"], "other kinds kept");

    // 410 Gone as the HTTP answer to a watch from a compacted version: re-list too.
    api.pause("EndpointSlice")?;
    api.apply(slice("echo", &["10.0.0.4"], 8080))?;
    api.expire("EndpointSlice", Gone::Http)?;
    source
        .wait("echo moved after HTTP 410", |m| {
            addresses(m, "echo") == ["10.0.0.4"]
        })
        .await?;
    assert_eq!(
        api.lists("EndpointSlice")?,
        2,
        "the HTTP 410 forced a re-list"
    );
    let relisted = api.resource_version();
    let w = eventually("a watch from the new list", || async {
        let w = api.watches("EndpointSlice")?;
        Ok(w.last().filter(|v| **v == relisted.to_string()).cloned())
    })
    .await?;
    assert_eq!(w, relisted.to_string());
    api.apply(slice("echo", &["10.0.0.5"], 8080))?;
    source
        .wait("echo moved on the new watch", |m| {
            addresses(m, "echo") == ["10.0.0.5"]
        })
        .await?;

    // Still watching after all that.
    api.delete("Service", "default", "late")?;
    source
        .wait("late deleted", |m| services(m) == ["echo"])
        .await?;
    Ok(())
}

/// A running `legate-pilot --kubeconfig`; killed when dropped.
struct Pilot {
    guard: ProcessGuard,
    admin: SocketAddr,
    xds_file: std::path::PathBuf,
}

fn read_addr(path: &Path) -> Option<SocketAddr> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

impl Pilot {
    /// Starts the pilot and waits for its admin address (written before the first model).
    async fn spawn(dir: &Path, kubeconfig: &Path) -> Result<Self> {
        let xds_file = dir.join("pilot.xds");
        let admin_file = dir.join("pilot.admin");
        let args: Vec<String> = [
            "--kubeconfig",
            &kubeconfig.display().to_string(),
            "--xds-address",
            "127.0.0.1:0",
            "--xds-address-path",
            &xds_file.display().to_string(),
            "--admin-address",
            "127.0.0.1:0",
            "--admin-address-path",
            &admin_file.display().to_string(),
            "--debounce-ms",
            "50",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let mut guard = ProcessGuard::spawn("legate-pilot", &pilot_bin()?, &args, dir)?;
        let deadline = Instant::now() + DEADLINE;
        let admin = loop {
            if let Some(status) = guard.exited() {
                bail!("legate-pilot exited with {status}\n{}", guard.output());
            }
            if let Some(a) = read_addr(&admin_file) {
                break a;
            }
            if Instant::now() > deadline {
                bail!("legate-pilot wrote no admin address\n{}", guard.output());
            }
            tokio::time::sleep(POLL).await;
        };
        Ok(Self {
            guard,
            admin,
            xds_file,
        })
    }

    /// Waits for `/ready`; returns the xDS address.
    async fn ready(&self) -> Result<SocketAddr> {
        eventually("pilot /ready", || async {
            Ok((admin_get(self.admin, "/ready").await?.0 == 200).then_some(()))
        })
        .await
        .with_context(|| self.guard.output())?;
        read_addr(&self.xds_file).ok_or_else(|| anyhow!("ready, but no xDS address written"))
    }
}

/// The pilot is not ready, and serves no xDS, until every kind has been listed: here the
/// API server refuses Secrets (as a cluster without the RBAC rule would) until it allows them;
/// the pilot retries with backoff meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pilot_is_ready_only_once_every_kind_is_listed() -> Result<()> {
    let dir = TempDir::new("pilot-kube-ready")?;
    let api = FakeApiServer::start().await?;
    api.apply(service("echo", "10.96.0.10"))?;
    api.forbid("Secret", true)?;
    let kubeconfig = dir.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig, TOKEN)?;
    let pilot = Pilot::spawn(dir.path(), &kubeconfig).await?;

    eventually("Secrets listed twice (a retry)", || async {
        Ok((api.lists("Secret")? >= 2).then_some(()))
    })
    .await
    .with_context(|| pilot.guard.output())?;
    assert_eq!(api.lists("Service")?, 1);
    let (status, _) = admin_get(pilot.admin, "/ready").await?;
    assert_eq!(status, 503, "not ready with Secrets unlisted");
    assert!(read_addr(&pilot.xds_file).is_none(), "no xDS address yet");

    api.forbid("Secret", false)?;
    pilot.ready().await?;
    Ok(())
}

fn bootstrap(xds: SocketAddr) -> String {
    mesh::ads_bootstrap(
        xds,
        "GRPC",
        "sidecar~127.0.0.1~app.default~default.svc.cluster.local",
        r#"LEGATE_OUTBOUND_PORT: "0", LEGATE_INBOUND_PORT: "0""#,
    )
}

async fn wait_for_upstream(proxy: SocketAddr, host: &str, want: &str) -> Result<()> {
    mesh::wait_for_upstream(proxy, host, want, DEADLINE).await
}

/// `legate-pilot --kubeconfig` drives a real Envoy sidecar from the fake API server; an
/// EndpointSlice changed through the API moves Envoy's traffic, and so does one changed
/// while the pilot's watch was cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_follows_the_pilot_kube_source() -> Result<()> {
    let dir = TempDir::new("pilot-kube")?;
    let a = Upstream::plain("a").await?;
    let b = Upstream::plain("b").await?;
    let api = FakeApiServer::start().await?;
    api.apply(namespace("default"))?;
    api.apply(service("echo", "10.96.0.10"))?;
    api.apply(slice("echo", &["127.0.0.1"], a.addr.port()))?;
    let kubeconfig = dir.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig, TOKEN)?;

    let pilot = Pilot::spawn(dir.path(), &kubeconfig).await?;
    let xds = pilot.ready().await?;
    let bootstrap_path = dir.path().join("sidecar.yaml");
    std::fs::write(&bootstrap_path, bootstrap(xds))?;
    let envoy = Proxy::start(ProxyKind::Envoy, &bootstrap_path, dir.path())
        .await
        .with_context(|| pilot.guard.output())?;
    let outbound = eventually("Envoy's virtualOutbound listener", || async {
        let (_, body) = admin_get(envoy.admin, "/listeners?format=json").await?;
        Ok(parse_listeners(&body)?.get("virtualOutbound").copied())
    })
    .await
    .with_context(|| pilot.guard.output())?;
    wait_for_upstream(outbound, "echo.default.svc.cluster.local", "a").await?;

    api.apply(slice("echo", &["127.0.0.1"], b.addr.port()))?;
    let edited = Instant::now();
    wait_for_upstream(outbound, "echo.default", "b").await?;
    eprintln!(
        "envoy: traffic moved {:?} after the EndpointSlice change",
        edited.elapsed()
    );

    // Cut the pilot's watches with a change pending: the resumed watch delivers it.
    api.pause("EndpointSlice")?;
    api.apply(slice("echo", &["127.0.0.1"], a.addr.port()))?;
    api.drop_watches(None)?;
    wait_for_upstream(outbound, "echo", "a").await?;
    let before = a.requests();
    for _ in 0..3 {
        assert_eq!(answered_by(outbound, "echo").await?.as_deref(), Some("a"));
    }
    assert_eq!(a.requests(), before + 3);

    let (status, metrics) = admin_get(pilot.admin, "/metrics").await?;
    assert_eq!(status, 200);
    let nacks: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("pilot_nacks_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(nacks, 0.0, "Envoy never NACKs\n{metrics}");
    Ok(())
}

/// `kubernetes-validate` (PyPI, installed into .venv by scripts/test.sh).
fn kubernetes_validate() -> Result<std::path::PathBuf> {
    let path = std::env::var_os("KUBERNETES_VALIDATE_BIN")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| workspace_root().join(".venv/bin/kubernetes-validate"));
    if path.is_file() {
        Ok(path)
    } else {
        Err(anyhow!(
            "kubernetes-validate not found at {}: run `bash scripts/test.sh --no-run` (or \
             `.venv/bin/pip install kubernetes-validate==1.37.0`), or set \
             KUBERNETES_VALIDATE_BIN",
            path.display()
        ))
    }
}

fn validate(files: &[std::path::PathBuf]) -> Result<std::process::Output> {
    Ok(std::process::Command::new(kubernetes_validate()?)
        .arg("--strict")
        .args(files)
        .output()?)
}

/// deploy/'s manifests pass `kubernetes-validate --strict`, grant the source exactly the
/// kinds it watches, and probe the pilot's readiness on the admin port.
#[test]
fn deploy_manifests_are_valid_kubernetes() -> Result<()> {
    let deploy = workspace_root().join("deploy");
    let mut files: Vec<_> = std::fs::read_dir(&deploy)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 5, "{files:?}");
    let out = validate(&files)?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    for kind in [
        "namespace",
        "serviceaccount",
        "clusterrole",
        "clusterrolebinding",
        "deployment",
        "service",
    ] {
        assert!(
            format!("{stdout}{stderr}").contains(&format!("passed for resource {kind}/")),
            "{kind} validated:\n{stdout}{stderr}"
        );
    }

    // The validator does reject a broken manifest (so the pass above means something).
    let dir = TempDir::new("deploy-validate")?;
    let broken = dir.path().join("broken.yaml");
    let service = std::fs::read_to_string(deploy.join("service.yaml"))?;
    std::fs::write(&broken, service.replace("port: 15010", "port: xds"))?;
    assert!(!validate(&[broken])?.status.success());

    // RBAC: get/list/watch on every kind the source watches.
    let rbac = std::fs::read_to_string(deploy.join("rbac.yaml"))?;
    let role: Value = serde_yaml::from_str(rbac.split("\n---\n").next().unwrap_or(""))?;
    let rules = role["rules"].as_array().cloned().unwrap_or_default();
    for kind in source::KINDS {
        let plural = match kind {
            "Ingress" => "ingresses".to_string(),
            k => format!("{}s", k.to_ascii_lowercase()),
        };
        let rule = rules
            .iter()
            .find(|r| {
                r["resources"]
                    .as_array()
                    .is_some_and(|rs| rs.iter().any(|x| x == &json!(plural)))
            })
            .ok_or_else(|| anyhow!("no rule for {plural} in rbac.yaml"))?;
        assert_eq!(rule["verbs"], json!(["get", "list", "watch"]), "{plural}");
    }

    let deployment: Value =
        serde_yaml::from_str(&std::fs::read_to_string(deploy.join("deployment.yaml"))?)?;
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    let ports: Vec<_> = container["ports"]
        .as_array()
        .map(|ps| {
            ps.iter()
                .filter_map(|p| p["containerPort"].as_u64())
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(ports, [15010, 15014]);
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/ready");
    assert_eq!(container["readinessProbe"]["httpGet"]["port"], "http-admin");
    Ok(())
}
