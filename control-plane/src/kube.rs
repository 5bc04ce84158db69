//! The Kubernetes API source: kube-rs watchers for the kinds the model reads.
//!
//! Each kind (Service, EndpointSlice, Namespace, Pod, Ingress, Secret) has its own
//! [`watcher`](::kube::runtime::watcher()), which follows the informer discipline: an initial
//! list, then a watch from the list's `resourceVersion` (with bookmarks), a resumed watch from
//! the last seen `resourceVersion` when the connection drops, a fresh list when the server
//! answers `410 Gone`, and exponential backoff on errors. The objects of one list are buffered
//! and swapped into that kind's store at once when the list completes, and no model is
//! published before every kind has been listed, so a proxy never sees a half-listed cluster.
//!
//! Objects are converted by serialising them to JSON and reading that with
//! [`parse_manifests`], the very function the file source uses, so both sources agree exactly
//! and a kind the model learns to read flows through here without a change. An object that
//! fails to convert is reported and its previous version (if any) stays in the model.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use ::kube::api::Api;
use ::kube::config::{KubeConfigOptions, Kubeconfig};
use ::kube::runtime::watcher::{self, Event};
use ::kube::runtime::WatchStreamExt;
use ::kube::{Client, Config, Resource, ResourceExt};
use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod, Secret, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::Ingress;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

use crate::metrics::Metrics;
use crate::model::{parse_manifests, Model, Object};

/// How long a watcher waits before listing again after the server refused to start a watch
/// with `410 Gone` (the watcher's own backoff covers every other error).
const RELIST_DELAY: Duration = Duration::from_millis(500);

/// Why the Kubernetes source could not start.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("reading kubeconfig {path}: {source}")]
    Kubeconfig {
        path: String,
        source: ::kube::config::KubeconfigError,
    },
    #[error("in-cluster configuration: {0}")]
    InCluster(#[from] ::kube::config::InClusterError),
    #[error("creating the Kubernetes client: {0}")]
    Client(#[from] ::kube::Error),
}

/// The kinds the source watches, in the order their stores are merged.
pub const KINDS: [&str; 6] = [
    "Namespace",
    "Service",
    "EndpointSlice",
    "Pod",
    "Ingress",
    "Secret",
];

/// A kind's objects by (namespace, name); `None` marks an object that did not convert.
type Listed = BTreeMap<(String, String), Option<Vec<Object>>>;

/// What one kind's watcher reports to the store.
#[derive(Debug)]
enum Update {
    /// A complete list: replaces the kind's store.
    Listed(&'static str, Listed),
    /// An object was added or modified (`None`: it did not convert).
    Apply(&'static str, (String, String), Option<Vec<Object>>),
    Delete(&'static str, (String, String)),
}

/// The objects of every kind, and which kinds have completed their initial list.
#[derive(Debug, Default)]
pub struct Store {
    kinds: BTreeMap<&'static str, BTreeMap<(String, String), Vec<Object>>>,
}

impl Store {
    /// Applies an update; returns whether the store changed.
    fn apply(&mut self, update: Update) -> bool {
        match update {
            Update::Listed(kind, listed) => {
                let previous = self.kinds.remove(kind).unwrap_or_default();
                let mut next = BTreeMap::new();
                for (key, objects) in listed {
                    // A rejected object keeps its previous version, as in the file source.
                    if let Some(objects) = objects.or_else(|| previous.get(&key).cloned()) {
                        next.insert(key, objects);
                    }
                }
                self.kinds.insert(kind, next);
                true
            }
            Update::Apply(kind, key, Some(objects)) => {
                self.kinds.entry(kind).or_default().insert(key, objects);
                true
            }
            Update::Apply(_, _, None) => false,
            Update::Delete(kind, key) => self
                .kinds
                .get_mut(kind)
                .is_some_and(|objects| objects.remove(&key).is_some()),
        }
    }

    /// Whether every kind has completed its initial list.
    pub fn synced(&self) -> bool {
        KINDS.iter().all(|k| self.kinds.contains_key(k))
    }

    /// The model of everything listed and watched so far.
    pub fn model(&self) -> Model {
        Model::build(
            KINDS
                .iter()
                .filter_map(|k| self.kinds.get(k))
                .flat_map(|objects| objects.values().flatten().cloned()),
        )
    }
}

/// Converts one API object to the model's objects through the manifest parser.
pub fn convert<K: Serialize>(object: &K) -> Result<Vec<Object>, String> {
    let json = serde_json::to_string(object).map_err(|e| e.to_string())?;
    parse_manifests(&json).map_err(|e| e.to_string())
}

/// A client for the API server of a kubeconfig file (its current context).
pub async fn client_from_kubeconfig(path: &Path) -> Result<Client, KubeError> {
    let kubeconfig_error = |source| KubeError::Kubeconfig {
        path: path.display().to_string(),
        source,
    };
    let kubeconfig = Kubeconfig::read_from(path).map_err(kubeconfig_error)?;
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .map_err(kubeconfig_error)?;
    Ok(Client::try_from(config)?)
}

/// A client from the pod's service account (`KUBERNETES_SERVICE_HOST` and the files under
/// `/var/run/secrets/kubernetes.io/serviceaccount`).
pub fn client_in_cluster() -> Result<Client, KubeError> {
    Ok(Client::try_from(Config::incluster()?)?)
}

/// Whether the process runs in a pod (the API server's address is in the environment).
pub fn in_cluster() -> bool {
    std::env::var_os("KUBERNETES_SERVICE_HOST").is_some()
}

/// Whether a watcher error is the API server refusing a watch from a resource version it no
/// longer has with an HTTP `410 Gone`. kube-rs re-lists on a `410` ERROR event but retries the
/// same resource version after an HTTP 410, so the source restarts the watcher itself.
fn gone_on_watch_start(error: &watcher::Error) -> bool {
    matches!(error, watcher::Error::WatchStartFailed(::kube::Error::Api(status)) if status.code == 410)
}

fn key_of<K: Resource>(object: &K) -> (String, String) {
    (object.namespace().unwrap_or_default(), object.name_any())
}

fn converted<K: Resource + Serialize>(
    kind: &'static str,
    object: &K,
    metrics: &Metrics,
) -> Option<Vec<Object>> {
    match convert(object) {
        Ok(objects) => Some(objects),
        Err(reason) => {
            let (namespace, name) = key_of(object);
            tracing::error!(kind, %namespace, %name, %reason, "object rejected; keeping its previous version");
            metrics.inc(&metrics.config_errors);
            None
        }
    }
}

/// Watches one kind forever, reporting lists and changes to `updates`.
async fn watch_kind<K>(
    kind: &'static str,
    api: Api<K>,
    updates: mpsc::Sender<Update>,
    metrics: Arc<Metrics>,
) where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Serialize + Debug + Send + 'static,
{
    loop {
        let stream = watcher::watcher(api.clone(), watcher::Config::default()).default_backoff();
        let mut stream = std::pin::pin!(stream);
        let mut buffer: Option<Listed> = None;
        while let Some(event) = stream.next().await {
            let update = match event {
                Ok(Event::Init) => {
                    tracing::debug!(kind, "listing");
                    buffer = Some(BTreeMap::new());
                    continue;
                }
                Ok(Event::InitApply(object)) => {
                    let objects = converted(kind, &object, &metrics);
                    buffer
                        .get_or_insert_with(BTreeMap::new)
                        .insert(key_of(&object), objects);
                    continue;
                }
                Ok(Event::InitDone) => {
                    let listed = buffer.take().unwrap_or_default();
                    tracing::info!(kind, objects = listed.len(), "listed");
                    Update::Listed(kind, listed)
                }
                Ok(Event::Apply(object)) => {
                    Update::Apply(kind, key_of(&object), converted(kind, &object, &metrics))
                }
                Ok(Event::Delete(object)) => Update::Delete(kind, key_of(&object)),
                Err(error) => {
                    tracing::warn!(kind, %error, "watching");
                    if gone_on_watch_start(&error) {
                        break;
                    }
                    continue;
                }
            };
            if updates.send(update).await.is_err() {
                return;
            }
        }
        tracing::info!(kind, "resource version gone; listing again");
        tokio::time::sleep(RELIST_DELAY).await;
    }
}

fn spawn_watch<K>(
    tasks: &mut JoinSet<()>,
    kind: &'static str,
    client: &Client,
    updates: &mpsc::Sender<Update>,
    metrics: &Arc<Metrics>,
) where
    K: Resource<DynamicType = ()>
        + Clone
        + DeserializeOwned
        + Serialize
        + Debug
        + Send
        + Sync
        + 'static,
{
    tasks.spawn(watch_kind::<K>(
        kind,
        Api::all(client.clone()),
        updates.clone(),
        metrics.clone(),
    ));
}

/// Watches the cluster of `client` until `shutdown` flips. The first model is sent (even if
/// equal to the channel's current one) once every kind has been listed; later ones only when
/// they differ from the last.
pub async fn run(
    client: Client,
    models: watch::Sender<Arc<Model>>,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) {
    let (tx, mut rx) = mpsc::channel(256);
    let mut tasks = JoinSet::new();
    spawn_watch::<Namespace>(&mut tasks, "Namespace", &client, &tx, &metrics);
    spawn_watch::<Service>(&mut tasks, "Service", &client, &tx, &metrics);
    spawn_watch::<EndpointSlice>(&mut tasks, "EndpointSlice", &client, &tx, &metrics);
    spawn_watch::<Pod>(&mut tasks, "Pod", &client, &tx, &metrics);
    spawn_watch::<Ingress>(&mut tasks, "Ingress", &client, &tx, &metrics);
    spawn_watch::<Secret>(&mut tasks, "Secret", &client, &tx, &metrics);
    drop(tx);

    let mut store = Store::default();
    let mut published = false;
    loop {
        let update = tokio::select! {
            update = rx.recv() => update,
            _ = shutdown.changed() => None,
        };
        let Some(update) = update else { break };
        if !store.apply(update) || !store.synced() {
            continue;
        }
        let model = Arc::new(store.model());
        if !published {
            tracing::info!(
                services = model.services.len(),
                endpoint_slices = model.endpoint_slices.len(),
                "every kind listed; publishing the first model"
            );
            models.send_replace(model);
            published = true;
            continue;
        }
        models.send_if_modified(|current| {
            if **current == *model {
                return false;
            }
            *current = model;
            true
        });
    }
    tasks.abort_all();
}

#[cfg(test)]
mod tests {
    use super::*;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    fn service(name: &str, port: i32) -> Result<Service, serde_json::Error> {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": name, "namespace": "default", "resourceVersion": "7"},
            "spec": {"clusterIP": "10.96.0.10", "ports": [
                {"name": "http", "port": port, "appProtocol": "HTTP"}
            ]}
        }))
    }

    fn key(name: &str) -> (String, String) {
        ("default".into(), name.into())
    }

    #[test]
    fn api_objects_convert_as_the_same_manifest_does() -> TestResult {
        let yaml = r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: echo-1
  namespace: default
  labels: {kubernetes.io/service-name: echo}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints:
- addresses: [10.0.0.1]
  conditions: {ready: false}
  zone: zone-a
- addresses: [10.0.0.2]
"#;
        let typed: EndpointSlice = serde_yaml::from_str(yaml)?;
        assert_eq!(convert(&typed)?, parse_manifests(yaml)?);
        let typed: Service = serde_yaml::from_str(
            "apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {clusterIP: None, ports: [{port: 80}]}\n",
        )?;
        let objects = convert(&typed)?;
        let [Object::Service(s)] = objects.as_slice() else {
            return Err(format!("{objects:?}").into());
        };
        assert_eq!(
            (s.namespace.as_str(), s.cluster_ip.as_ref()),
            ("default", None)
        );
        assert!(convert(&service("bad", 0)?).is_err());
        Ok(())
    }

    #[test]
    fn nothing_is_published_before_every_kind_is_listed() -> TestResult {
        let mut store = Store::default();
        let a = convert(&service("a", 80)?)?;
        let mut listed = Listed::new();
        listed.insert(key("a"), Some(a.clone()));
        store.apply(Update::Listed("Service", listed));
        assert!(!store.synced());
        for kind in KINDS.iter().filter(|k| **k != "Service") {
            store.apply(Update::Listed(kind, Listed::new()));
        }
        assert!(store.synced());
        assert_eq!(store.model().services.len(), 1);
        Ok(())
    }

    #[test]
    fn a_relist_replaces_the_kind_atomically() -> TestResult {
        let mut store = Store::default();
        for kind in KINDS {
            store.apply(Update::Listed(kind, Listed::new()));
        }
        assert!(store.apply(Update::Apply(
            "Service",
            key("a"),
            Some(convert(&service("a", 80)?)?)
        )));
        assert!(store.apply(Update::Apply(
            "Service",
            key("b"),
            Some(convert(&service("b", 80)?)?)
        )));
        // A rejected change keeps the previous version.
        assert!(!store.apply(Update::Apply("Service", key("a"), None)));
        assert_eq!(store.model().services.len(), 2);

        // The re-list knows only b (a was deleted while the watch was gone) and rejects c.
        let mut listed = Listed::new();
        listed.insert(key("b"), Some(convert(&service("b", 81)?)?));
        listed.insert(key("c"), None);
        store.apply(Update::Listed("Service", listed));
        let model = store.model();
        let names: Vec<_> = model.services.keys().map(|(_, n)| n.as_str()).collect();
        assert_eq!(names, ["b"]);
        assert_eq!(model.services[&key("b")].ports[0].port, 81);

        assert!(store.apply(Update::Delete("Service", key("b"))));
        assert!(!store.apply(Update::Delete("Service", key("b"))));
        assert!(store.model().services.is_empty());
        Ok(())
    }

    #[test]
    fn only_an_http_410_on_watch_start_restarts_the_watcher() {
        let status = |code| {
            Box::new(::kube::core::Status {
                code,
                ..Default::default()
            })
        };
        let api = |code| ::kube::Error::Api(status(code));
        assert!(gone_on_watch_start(&watcher::Error::WatchStartFailed(api(
            410
        ))));
        assert!(!gone_on_watch_start(&watcher::Error::WatchStartFailed(
            api(500)
        )));
        // A 410 ERROR event is handled by the watcher itself (it re-lists).
        assert!(!gone_on_watch_start(&watcher::Error::WatchError(status(
            410
        ))));
        assert!(!gone_on_watch_start(&watcher::Error::InitialListFailed(
            api(410)
        )));
    }

    #[test]
    fn an_object_that_does_not_convert_is_reported() -> TestResult {
        let metrics = Metrics::default();
        assert!(converted("Service", &service("bad", 0)?, &metrics).is_none());
        assert_eq!(
            metrics
                .config_errors
                .load(std::sync::atomic::Ordering::Relaxed),
            1
        );
        Ok(())
    }
}
