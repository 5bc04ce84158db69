//! The snapshot cache: the latest consistent snapshot of each proxy group.
//!
//! This is the seam between the model and the transport. Each group's snapshot sits in a
//! `watch` channel; an ADS stream holds a receiver and wakes only when its group's snapshot
//! changes, so a model change is pushed only to the proxies whose resources it touches.
//! A group nobody watches any more is dropped at the next update.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use crate::identity::ProxyGroup;
use crate::identity::Role;
use crate::metrics::Metrics;
use crate::model::Model;
use crate::snapshot::{SharedMesh, Snapshot, SnapshotError};
use crate::translate::{group_resources_with, TranslateOptions};

/// Errors from the cache.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("the cache's lock is poisoned")]
    Poisoned,
    #[error("proxy group {group}: {source}")]
    Inconsistent {
        group: String,
        source: SnapshotError,
    },
}

struct Inner {
    model: Arc<Model>,
    /// The current model's mesh-wide clusters and assignments, encoded once for every group.
    mesh: Arc<SharedMesh>,
    groups: HashMap<ProxyGroup, watch::Sender<Arc<Snapshot>>>,
    /// The next version handed to a changed resource type; shared by every group so a
    /// version string is never reused for different content.
    next_version: u64,
    /// The TLS entries of the current model that cannot be served (reported once each).
    tls_problems: BTreeSet<String>,
}

/// The mesh-wide resources of a model; a model whose service clusters collide (it cannot
/// happen: names are unique per service and port) yields an empty mesh and every group's
/// snapshot is then withheld as inconsistent.
fn shared_mesh(
    model: &Model,
    options: &TranslateOptions,
    previous: Option<&SharedMesh>,
) -> SharedMesh {
    SharedMesh::new(model, options, previous).unwrap_or_else(|e| {
        tracing::error!(error = %e, "the mesh's clusters cannot be encoded");
        SharedMesh::default()
    })
}

/// A group's own resources; a sidecar's outbound routes come encoded from the shared mesh.
fn translate_group(
    model: &Model,
    mesh: &SharedMesh,
    group: &ProxyGroup,
    options: &TranslateOptions,
) -> (
    crate::translate::Resources,
    Option<(String, crate::snapshot::Resource)>,
) {
    match group.role {
        Role::Sidecar => (
            group_resources_with(model, group, options, false),
            Some(mesh.outbound_routes(model, group, options)),
        ),
        Role::Router => (group_resources_with(model, group, options, true), None),
    }
}

/// The latest snapshot of every watched proxy group.
pub struct SnapshotCache {
    inner: Mutex<Inner>,
    options: TranslateOptions,
    metrics: Arc<Metrics>,
}

impl SnapshotCache {
    pub fn new(model: Arc<Model>, options: TranslateOptions, metrics: Arc<Metrics>) -> Self {
        let tls_problems = report_tls_problems(&model, &BTreeSet::new(), &metrics);
        let mesh = Arc::new(shared_mesh(&model, &options, None));
        Self {
            inner: Mutex::new(Inner {
                model,
                mesh,
                groups: HashMap::new(),
                next_version: 1,
                tls_problems,
            }),
            options,
            metrics,
        }
    }

    /// A receiver of `group`'s snapshots, translating the current model for a new group.
    pub fn watch(&self, group: &ProxyGroup) -> Result<watch::Receiver<Arc<Snapshot>>, CacheError> {
        let mut inner = self.inner.lock().map_err(|_| CacheError::Poisoned)?;
        if let Some(tx) = inner.groups.get(group) {
            return Ok(tx.subscribe());
        }
        let (resources, routes) = translate_group(&inner.model, &inner.mesh, group, &self.options);
        let version = inner.next_version;
        let snapshot = Snapshot::build_shared(&inner.mesh, &resources, routes, None, version)
            .map_err(|source| CacheError::Inconsistent {
                group: group.to_string(),
                source,
            })?;
        inner.next_version += 1;
        self.metrics.inc(&self.metrics.snapshots_published);
        let (tx, rx) = watch::channel(Arc::new(snapshot));
        inner.groups.insert(group.clone(), tx);
        Ok(rx)
    }

    /// Installs a new model and republishes every group whose resources changed. A group
    /// whose new resources are inconsistent keeps its previous snapshot (and it is logged).
    pub fn set_model(&self, model: Arc<Model>) -> Result<(), CacheError> {
        self.set_model_seen_at(model, None)
    }

    /// [`Self::set_model`] for a change first seen at `seen_at`: the snapshots it publishes
    /// carry that instant, so that streams can time the proxies' convergence.
    pub fn set_model_seen_at(
        &self,
        model: Arc<Model>,
        seen_at: Option<std::time::Instant>,
    ) -> Result<(), CacheError> {
        let started = std::time::Instant::now();
        let mut inner = self.inner.lock().map_err(|_| CacheError::Poisoned)?;
        self.metrics.inc(&self.metrics.model_updates);
        inner.tls_problems = report_tls_problems(&model, &inner.tls_problems, &self.metrics);
        inner.mesh = Arc::new(shared_mesh(&model, &self.options, Some(&inner.mesh)));
        inner.model = model;
        inner.groups.retain(|_, tx| tx.receiver_count() > 0);
        let version = inner.next_version;
        let mesh_done = started.elapsed();
        let mut published = 0;
        let Inner {
            model,
            mesh,
            groups,
            ..
        } = &mut *inner;
        for (group, tx) in groups.iter() {
            let (resources, routes) = translate_group(model, mesh, group, &self.options);
            let previous = tx.borrow().clone();
            match Snapshot::build_shared(mesh, &resources, routes, Some(&previous), version) {
                Ok(next) => {
                    let changed = next.changed_types(&previous);
                    if changed.is_empty() {
                        continue;
                    }
                    published += 1;
                    tracing::debug!(group = %group, version, changed = ?changed.iter().map(|t| t.short_name()).collect::<Vec<_>>(), "publishing snapshot");
                    self.metrics.inc(&self.metrics.snapshots_published);
                    tx.send_replace(Arc::new(next.seen_at(seen_at)));
                }
                Err(error) => {
                    self.metrics.inc(&self.metrics.snapshots_inconsistent);
                    tracing::error!(group = %group, %error, "inconsistent snapshot withheld");
                }
            }
        }
        if published > 0 {
            inner.next_version += 1;
        }
        tracing::info!(
            version,
            groups = inner.groups.len(),
            published,
            mesh_ms = mesh_done.as_secs_f64() * 1e3,
            total_ms = started.elapsed().as_secs_f64() * 1e3,
            "model translated"
        );
        Ok(())
    }

    /// The current model.
    pub fn model(&self) -> Option<Arc<Model>> {
        self.inner.lock().ok().map(|i| i.model.clone())
    }

    /// The groups currently watched.
    pub fn groups(&self) -> usize {
        self.inner.lock().map(|i| i.groups.len()).unwrap_or(0)
    }
}

/// Logs and counts (as config errors) the TLS entries that cannot be served and were not
/// already reported for the previous model; returns the current set.
fn report_tls_problems(
    model: &Model,
    previous: &BTreeSet<String>,
    metrics: &Metrics,
) -> BTreeSet<String> {
    let current: BTreeSet<String> = crate::tls::problems(model).into_iter().collect();
    for problem in current.difference(previous) {
        tracing::error!(%problem, "TLS entry left out of the gateways' HTTPS listener");
        metrics.inc(&metrics.config_errors);
    }
    current
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Role;
    use crate::model::parse_manifests;
    use crate::snapshot::ResourceType;

    fn group(port: u16) -> ProxyGroup {
        ProxyGroup {
            role: Role::Sidecar,
            ip: std::net::IpAddr::from([127, 0, 0, 1]),
            namespace: "default".into(),
            listener_port: port,
            inbound_port: 15006,
            https_port: 8443,
        }
    }

    fn model(endpoint: &str) -> Result<Arc<Model>, crate::model::ManifestError> {
        let text = format!(
            "kind: Service\nmetadata: {{name: a}}\nspec: {{ports: [{{name: http, port: 80}}]}}\n---\nkind: EndpointSlice\nmetadata: {{name: a-1, labels: {{kubernetes.io/service-name: a}}}}\nports: [{{name: http, port: 8080}}]\nendpoints: [{{addresses: [{endpoint}]}}]\n"
        );
        Ok(Arc::new(Model::build(parse_manifests(&text)?)))
    }

    /// The shared path gives exactly what translating the group alone gives.
    #[test]
    fn shared_translation_matches_the_whole_translation() -> Result<(), Box<dyn std::error::Error>>
    {
        let m = model("127.0.0.1")?;
        let cache = SnapshotCache::new(m.clone(), TranslateOptions::default(), Arc::default());
        for g in [group(15001), group(15002)] {
            let shared = cache.watch(&g)?.borrow().clone();
            let whole = Snapshot::build(
                &crate::translate::translate(&m, &g, &TranslateOptions::default()),
                None,
                1,
            )?;
            for t in ResourceType::ORDER {
                let a: Vec<_> = shared.get(t).resources.keys().collect();
                let b: Vec<_> = whole.get(t).resources.keys().collect();
                assert_eq!(a, b, "{t:?}");
                for (k, r) in whole.get(t).resources.iter() {
                    assert_eq!(
                        shared.get(t).resources.get(k).map(|r| &r.any),
                        Some(&r.any),
                        "{t:?} {k}"
                    );
                }
            }
        }
        Ok(())
    }

    #[test]
    fn only_changed_groups_are_notified() -> Result<(), Box<dyn std::error::Error>> {
        let cache = SnapshotCache::new(
            model("10.0.0.1")?,
            TranslateOptions::default(),
            Arc::default(),
        );
        let mut a = cache.watch(&group(1))?;
        let mut b = cache.watch(&group(2))?;
        a.mark_unchanged();
        b.mark_unchanged();
        cache.set_model(model("10.0.0.1")?)?;
        assert!(!a.has_changed()?, "same model, no push");
        cache.set_model(model("10.0.0.2")?)?;
        assert!(a.has_changed()? && b.has_changed()?);
        let snap = a.borrow_and_update().clone();
        assert_eq!(snap.get(ResourceType::Endpoint).version, "3");
        assert_eq!(snap.get(ResourceType::Cluster).version, "1");
        drop(b);
        cache.set_model(model("10.0.0.3")?)?;
        assert_eq!(cache.groups(), 1, "unwatched groups are dropped");
        Ok(())
    }
}
