//! The file source: a directory of Kubernetes manifests, watched for changes.
//!
//! On Linux, inotify wakes the source as soon as something in the directory changes, and it
//! rescans after [`SETTLE`] (so that a burst of writes is read once). Polling the files'
//! modification time and size every [`POLL_INTERVAL`] stays as the fallback: it is what
//! notices changes where inotify is not available (another system, a file system without
//! it), and it is cheap for the few hundred files a local mesh has.
//! A file that fails to parse is reported with its path and reason and its previous objects
//! stay in the model, so one bad edit never takes services away from the proxies.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;

use crate::metrics::Metrics;
use crate::model::{parse_manifests, Model, Object};

/// How often the directory is scanned.
pub const POLL_INTERVAL: Duration = Duration::from_millis(200);

/// How long after a change notification the directory is rescanned.
pub const SETTLE: Duration = Duration::from_millis(10);

/// Errors reading the directory itself (a bad file is not an error of the source).
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("reading directory {path}: {source}")]
    ReadDir {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// What tells a changed file: modification time, size and (on Unix) inode, since tools that
/// replace a file by a rename may leave the first two equal within the clock's granularity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
}

#[cfg(unix)]
fn inode(meta: &std::fs::Metadata) -> u64 {
    std::os::unix::fs::MetadataExt::ino(meta)
}

#[cfg(not(unix))]
fn inode(_: &std::fs::Metadata) -> u64 {
    0
}

#[derive(Debug)]
struct FileState {
    stamp: Stamp,
    /// The objects of the last version that parsed.
    objects: Vec<Object>,
    /// The error of the current version, if it did not parse.
    error: Option<String>,
}

/// A watched directory and what was last read from each file in it.
#[derive(Debug)]
pub struct FileSource {
    dir: PathBuf,
    files: BTreeMap<PathBuf, FileState>,
}

fn is_manifest(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml" | "json")
    )
}

impl FileSource {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            files: BTreeMap::new(),
        }
    }

    /// Re-reads every new or changed file and forgets removed ones. Returns whether the
    /// model may have changed.
    pub fn scan(&mut self, metrics: &Metrics) -> Result<bool, SourceError> {
        let entries = std::fs::read_dir(&self.dir).map_err(|source| SourceError::ReadDir {
            path: self.dir.clone(),
            source,
        })?;
        let mut present = BTreeMap::new();
        for entry in entries.flatten() {
            let path = entry.path();
            if !is_manifest(&path) {
                continue;
            }
            // Follow symlinks: a mounted ConfigMap's files are links swapped atomically.
            let Ok(meta) = std::fs::metadata(&path) else {
                continue;
            };
            if !meta.is_file() {
                continue;
            }
            present.insert(
                path,
                Stamp {
                    modified: meta.modified().ok(),
                    len: meta.len(),
                    inode: inode(&meta),
                },
            );
        }
        let before = self.files.len();
        self.files.retain(|path, _| present.contains_key(path));
        let mut changed = self.files.len() != before;
        for (path, stamp) in present {
            if self.files.get(&path).is_some_and(|f| f.stamp == stamp) {
                continue;
            }
            let parsed = std::fs::read_to_string(&path)
                .map_err(|e| e.to_string())
                .and_then(|text| parse_manifests(&text).map_err(|e| e.to_string()));
            match parsed {
                Ok(objects) => {
                    tracing::info!(file = %path.display(), objects = objects.len(), "read manifest");
                    self.files.insert(
                        path,
                        FileState {
                            stamp,
                            objects,
                            error: None,
                        },
                    );
                    changed = true;
                }
                Err(reason) => {
                    tracing::error!(file = %path.display(), %reason, "manifest rejected; keeping its previous objects");
                    metrics.inc(&metrics.config_errors);
                    let objects = self
                        .files
                        .remove(&path)
                        .map(|f| f.objects)
                        .unwrap_or_default();
                    self.files.insert(
                        path,
                        FileState {
                            stamp,
                            objects,
                            error: Some(reason),
                        },
                    );
                }
            }
        }
        Ok(changed)
    }

    /// The model from every file's last good objects.
    pub fn model(&self) -> Model {
        Model::build(self.files.values().flat_map(|f| f.objects.iter().cloned()))
    }

    /// Files whose current version was rejected, with the reason.
    pub fn errors(&self) -> Vec<(PathBuf, String)> {
        self.files
            .iter()
            .filter_map(|(p, f)| f.error.clone().map(|e| (p.clone(), e)))
            .collect()
    }

    /// Polls the directory until `shutdown` flips, publishing each changed model.
    pub async fn run(
        mut self,
        models: watch::Sender<Arc<Model>>,
        metrics: Arc<Metrics>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut interval = tokio::time::interval(POLL_INTERVAL);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let changes = watch_dir(&self.dir);
        loop {
            tokio::select! {
                _ = interval.tick() => {}
                _ = next_change(changes.as_deref()) => tokio::time::sleep(SETTLE).await,
                _ = shutdown.changed() => return,
            }
            match self.scan(&metrics) {
                Ok(true) => {
                    let model = Arc::new(self.model());
                    models.send_if_modified(|current| {
                        if **current == *model {
                            return false;
                        }
                        *current = model;
                        true
                    });
                }
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "scanning the config directory"),
            }
        }
    }
}

/// Resolves at the next change notification; never without a watcher.
async fn next_change(changes: Option<&tokio::sync::Notify>) {
    match changes {
        // A notification sent while nobody waited is kept for the next wait.
        Some(notify) => notify.notified().await,
        None => std::future::pending().await,
    }
}

/// A notification for every change in `dir`, from a thread reading inotify; `None` where it
/// is not available (polling still notices changes).
#[cfg(target_os = "linux")]
fn watch_dir(dir: &Path) -> Option<Arc<tokio::sync::Notify>> {
    use rustix::fs::inotify::{self, CreateFlags, WatchFlags};
    let setup = || -> rustix::io::Result<std::os::fd::OwnedFd> {
        let fd = inotify::init(CreateFlags::CLOEXEC)?;
        // A mounted ConfigMap swaps its files by renaming a symlink: MOVED_TO covers it.
        let flags = WatchFlags::CREATE
            | WatchFlags::CLOSE_WRITE
            | WatchFlags::MODIFY
            | WatchFlags::MOVED_TO
            | WatchFlags::MOVED_FROM
            | WatchFlags::DELETE
            | WatchFlags::ATTRIB;
        inotify::add_watch(&fd, dir, flags)?;
        Ok(fd)
    };
    let fd = match setup() {
        Ok(fd) => fd,
        Err(error) => {
            tracing::info!(dir = %dir.display(), %error, "no inotify; polling the directory only");
            return None;
        }
    };
    let notify = Arc::new(tokio::sync::Notify::new());
    let wake = notify.clone();
    std::thread::Builder::new()
        .name("config-dir-watch".into())
        .spawn(move || {
            let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 4096];
            let mut events = inotify::Reader::new(&fd, &mut buf);
            loop {
                match events.next() {
                    Ok(_) => wake.notify_one(),
                    Err(rustix::io::Errno::INTR) => {}
                    Err(error) => {
                        tracing::warn!(%error, "inotify stopped; polling the directory only");
                        return;
                    }
                }
            }
        })
        .ok()?;
    Some(notify)
}

/// Polling only, off Linux.
#[cfg(not(target_os = "linux"))]
fn watch_dir(_: &Path) -> Option<Arc<tokio::sync::Notify>> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> std::io::Result<PathBuf> {
        let dir =
            std::env::temp_dir().join(format!("legate-pilot-source-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        Ok(dir)
    }

    #[test]
    fn the_example_mesh_translates_consistently() -> Result<(), Box<dyn std::error::Error>> {
        use crate::identity::Role;
        use crate::snapshot::{ResourceType, Snapshot};
        use crate::translate::{translate, TranslateOptions};
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/mesh");
        let mut source = FileSource::new(&dir);
        source.scan(&Metrics::default())?;
        assert!(source.errors().is_empty(), "{:?}", source.errors());
        let model = source.model();
        assert_eq!((model.services.len(), model.ingresses.len()), (1, 1));
        for role in [Role::Sidecar, Role::Router] {
            let group = crate::test_support::group(role, [127, 0, 0, 1]);
            let snapshot = Snapshot::build(
                &translate(&model, &group, &TranslateOptions::default()),
                None,
                1,
            )?;
            let listeners = snapshot.get(ResourceType::Listener).resources.len();
            assert_eq!(listeners, if role == Role::Sidecar { 2 } else { 1 });
        }
        Ok(())
    }

    #[test]
    fn a_bad_edit_keeps_the_previous_objects() -> Result<(), Box<dyn std::error::Error>> {
        let dir = temp_dir("bad-edit")?;
        let file = dir.join("svc.yaml");
        std::fs::write(
            &file,
            "kind: Service\nmetadata: {name: a}\nspec: {ports: [{port: 80}]}\n",
        )?;
        std::fs::write(dir.join("notes.txt"), "not a manifest")?;
        let metrics = Metrics::default();
        let mut source = FileSource::new(&dir);
        assert!(source.scan(&metrics)?);
        assert_eq!(source.model().services.len(), 1);
        assert!(!source.scan(&metrics)?, "nothing changed");

        std::fs::write(
            &file,
            "kind: Service\nmetadata: {name: a}\nspec: {ports: [{port: 0}]}\n# longer",
        )?;
        assert!(!source.scan(&metrics)?);
        assert_eq!(source.model().services.len(), 1, "old objects kept");
        let errors = source.errors();
        assert_eq!(errors.len(), 1);
        assert!(errors[0].1.contains("spec.ports[0].port"), "{errors:?}");

        std::fs::remove_file(&file)?;
        assert!(source.scan(&metrics)?);
        assert!(source.model().services.is_empty());
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }
}
