//! A fake Kubernetes API server at the HTTP level, for testing `legate-pilot`'s kube-rs source.
//!
//! There is no API server to be had on the test machines, so this one speaks just enough of the
//! real protocol, with real Kubernetes JSON, for the informer discipline to be exercised: `GET`
//! of a collection answers a `List` (items without `kind`/`apiVersion`, as the real server
//! sends them, and `metadata.resourceVersion`); `?watch=true&resourceVersion=N` streams
//! newline-delimited `{"type":"ADDED|MODIFIED|DELETED|BOOKMARK|ERROR","object":...}` events
//! after `N`, replayed from a log and then live. One cluster-wide counter versions every change,
//! as etcd's revision does.
//!
//! A test scripts the faults an informer must survive: [`FakeApiServer::pause`] withholds a
//! collection's events from open watches (a watch cache falling behind),
//! [`FakeApiServer::bookmark`] sends a `BOOKMARK`, [`FakeApiServer::end_watches`] closes watches
//! cleanly (the server's `timeoutSeconds`), [`FakeApiServer::drop_watches`] cuts them
//! mid-stream, and [`FakeApiServer::expire`] compacts the history so that a watch from an older
//! version is answered `410 Gone`, either as an `ERROR` event on the open watch or as HTTP 410
//! on the next watch request, and [`FakeApiServer::forbid`] answers a kind with 403 (missing
//! RBAC). Every request is recorded for the test to assert on.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use anyhow::{anyhow, bail, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::{broadcast, mpsc};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;

/// A kind the fake serves: its collection path (cluster-wide) and whether it is namespaced.
#[derive(Debug, Clone, Copy)]
struct KindInfo {
    kind: &'static str,
    api_version: &'static str,
    path: &'static str,
    namespaced: bool,
}

const KINDS: [KindInfo; 6] = [
    KindInfo {
        kind: "Namespace",
        api_version: "v1",
        path: "/api/v1/namespaces",
        namespaced: false,
    },
    KindInfo {
        kind: "Service",
        api_version: "v1",
        path: "/api/v1/services",
        namespaced: true,
    },
    KindInfo {
        kind: "Pod",
        api_version: "v1",
        path: "/api/v1/pods",
        namespaced: true,
    },
    KindInfo {
        kind: "Secret",
        api_version: "v1",
        path: "/api/v1/secrets",
        namespaced: true,
    },
    KindInfo {
        kind: "EndpointSlice",
        api_version: "discovery.k8s.io/v1",
        path: "/apis/discovery.k8s.io/v1/endpointslices",
        namespaced: true,
    },
    KindInfo {
        kind: "Ingress",
        api_version: "networking.k8s.io/v1",
        path: "/apis/networking.k8s.io/v1/ingresses",
        namespaced: true,
    },
];

fn kind_info(kind: &str) -> Result<KindInfo> {
    KINDS
        .iter()
        .find(|k| k.kind == kind)
        .copied()
        .ok_or_else(|| anyhow!("the fake API server does not serve {kind}"))
}

/// How a compacted history answers a watch from before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gone {
    /// An `ERROR` event carrying a `Status` with code 410 on the open watch, which then ends.
    Event,
    /// Open watches are cut; the watch request that resumes them gets HTTP 410.
    Http,
}

/// One request the fake received.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub path: String,
    pub query: BTreeMap<String, String>,
    pub authorization: Option<String>,
}

impl Recorded {
    pub fn is_watch(&self) -> bool {
        self.query
            .get("watch")
            .is_some_and(|w| w == "true" || w == "1")
    }
}

#[derive(Debug, Default)]
struct Collection {
    objects: BTreeMap<(String, String), Value>,
    /// Every change: (resourceVersion, type, object).
    log: Vec<(u64, &'static str, Value)>,
    /// Watches from a resourceVersion below this are answered 410.
    compacted: u64,
    gone_http: bool,
    paused: bool,
    /// Answer 403 Forbidden to list and watch.
    forbidden: bool,
}

#[derive(Debug, Clone)]
enum Signal {
    /// A watch event line for a collection.
    Event {
        path: &'static str,
        rv: u64,
        line: String,
        bookmark: bool,
    },
    /// Send this ERROR line, then end the watch.
    Expire { path: &'static str, line: String },
    /// End (cleanly) or cut (mid-stream) every watch of the collection, or of all.
    End {
        path: Option<&'static str>,
        cut: bool,
    },
}

#[derive(Debug)]
struct State {
    rv: u64,
    collections: BTreeMap<&'static str, Collection>,
    requests: Vec<Recorded>,
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    signals: broadcast::Sender<Signal>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A running fake API server; stops when dropped.
#[derive(Debug)]
pub struct FakeApiServer {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn status_410(from: u64, now: u64) -> Value {
    json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": format!("too old resource version: {from} ({now})"),
        "reason": "Expired", "code": 410
    })
}

fn line(kind: &str, object: &Value) -> String {
    format!("{}\n", json!({"type": kind, "object": object}))
}

impl FakeApiServer {
    /// Starts serving on 127.0.0.1:0 with empty collections.
    pub async fn start() -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (signals, _) = broadcast::channel(1024);
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                rv: 1,
                collections: KINDS
                    .iter()
                    .map(|k| (k.path, Collection::default()))
                    .collect(),
                requests: Vec::new(),
            }),
            signals,
        });
        let accept = shared.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let shared = accept.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| {
                        let shared = shared.clone();
                        async move { Ok::<_, Infallible>(handle(&shared, req)) }
                    });
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(Self { addr, shared, task })
    }

    /// Writes a kubeconfig whose current context is this server, authenticating with a bearer
    /// token (which the fake records but does not check).
    pub fn write_kubeconfig(&self, path: &Path, token: &str) -> Result<()> {
        let text = format!(
            "apiVersion: v1\nkind: Config\n\
             clusters:\n- name: fake\n  cluster: {{server: \"http://{}\"}}\n\
             users:\n- name: tester\n  user: {{token: {token}}}\n\
             contexts:\n- name: fake\n  context: {{cluster: fake, user: tester, namespace: default}}\n\
             current-context: fake\n",
            self.addr
        );
        std::fs::write(path, text)?;
        Ok(())
    }

    /// Creates or replaces an object (a full manifest with `kind` and `metadata.name`; a
    /// namespaced one defaults to namespace `default`). Returns its new resourceVersion.
    pub fn apply(&self, mut object: Value) -> Result<u64> {
        let kind = object["kind"]
            .as_str()
            .ok_or_else(|| anyhow!("no kind in {object}"))?
            .to_string();
        let info = kind_info(&kind)?;
        let name = object["metadata"]["name"]
            .as_str()
            .ok_or_else(|| anyhow!("no metadata.name in {object}"))?
            .to_string();
        let namespace = if info.namespaced {
            let ns = object["metadata"]["namespace"]
                .as_str()
                .unwrap_or("default")
                .to_string();
            object["metadata"]["namespace"] = json!(ns);
            ns
        } else {
            String::new()
        };
        object["apiVersion"] = json!(info.api_version);
        let mut state = self.shared.lock();
        state.rv += 1;
        let rv = state.rv;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        object["metadata"]["uid"] = json!(format!("uid-{kind}-{namespace}-{name}"));
        let collection = state
            .collections
            .get_mut(info.path)
            .ok_or_else(|| anyhow!("no collection {}", info.path))?;
        let key = (namespace, name);
        let event = if collection.objects.contains_key(&key) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        collection.objects.insert(key, object.clone());
        self.emit(collection, info.path, rv, event, object);
        Ok(rv)
    }

    /// Deletes an object; returns the deletion's resourceVersion.
    pub fn delete(&self, kind: &str, namespace: &str, name: &str) -> Result<u64> {
        let info = kind_info(kind)?;
        let namespace = if info.namespaced { namespace } else { "" };
        let mut state = self.shared.lock();
        state.rv += 1;
        let rv = state.rv;
        let collection = state
            .collections
            .get_mut(info.path)
            .ok_or_else(|| anyhow!("no collection {}", info.path))?;
        let Some(mut object) = collection
            .objects
            .remove(&(namespace.to_string(), name.to_string()))
        else {
            bail!("no {kind} {namespace}/{name} to delete");
        };
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        self.emit(collection, info.path, rv, "DELETED", object);
        Ok(rv)
    }

    fn emit(
        &self,
        collection: &mut Collection,
        path: &'static str,
        rv: u64,
        event: &'static str,
        object: Value,
    ) {
        let text = line(event, &object);
        collection.log.push((rv, event, object));
        if !collection.paused {
            let _ = self.shared.signals.send(Signal::Event {
                path,
                rv,
                line: text,
                bookmark: false,
            });
        }
    }

    /// Withholds `kind`'s events from open watches until the next [`Self::expire`],
    /// [`Self::end_watches`] or [`Self::drop_watches`] (they stay in the history).
    pub fn pause(&self, kind: &str) -> Result<()> {
        let info = kind_info(kind)?;
        let mut state = self.shared.lock();
        if let Some(c) = state.collections.get_mut(info.path) {
            c.paused = true;
        }
        Ok(())
    }

    /// Sends a BOOKMARK at the current resourceVersion to the watches of `kind` that allow
    /// bookmarks; returns that resourceVersion.
    pub fn bookmark(&self, kind: &str) -> Result<u64> {
        let info = kind_info(kind)?;
        let state = self.shared.lock();
        let object = json!({
            "kind": info.kind, "apiVersion": info.api_version,
            "metadata": {"resourceVersion": state.rv.to_string()}
        });
        let _ = self.shared.signals.send(Signal::Event {
            path: info.path,
            rv: state.rv,
            line: line("BOOKMARK", &object),
            bookmark: true,
        });
        Ok(state.rv)
    }

    fn end(&self, kind: Option<&str>, cut: bool) -> Result<()> {
        let path = kind.map(kind_info).transpose()?.map(|k| k.path);
        let mut state = self.shared.lock();
        for (p, c) in state.collections.iter_mut() {
            if path.is_none_or(|path| path == *p) {
                c.paused = false;
            }
        }
        let _ = self.shared.signals.send(Signal::End { path, cut });
        Ok(())
    }

    /// Ends every open watch of `kind` (or of every kind) cleanly, as the server does when a
    /// watch's `timeoutSeconds` runs out.
    pub fn end_watches(&self, kind: Option<&str>) -> Result<()> {
        self.end(kind, false)
    }

    /// Cuts every open watch of `kind` (or of every kind) mid-stream: the connection closes
    /// without the chunked body's end.
    pub fn drop_watches(&self, kind: Option<&str>) -> Result<()> {
        self.end(kind, true)
    }

    /// Compacts `kind`'s history up to now: a watch from an older resourceVersion is answered
    /// 410 Gone, as `how` says. Open watches get the ERROR event ([`Gone::Event`]) or are cut
    /// ([`Gone::Http`]).
    pub fn expire(&self, kind: &str, how: Gone) -> Result<()> {
        let info = kind_info(kind)?;
        let mut state = self.shared.lock();
        let now = state.rv;
        if let Some(c) = state.collections.get_mut(info.path) {
            c.compacted = now;
            c.gone_http = how == Gone::Http;
            c.paused = false;
        }
        let signal = match how {
            Gone::Event => Signal::Expire {
                path: info.path,
                line: line("ERROR", &status_410(now.saturating_sub(1), now)),
            },
            Gone::Http => Signal::End {
                path: Some(info.path),
                cut: true,
            },
        };
        let _ = self.shared.signals.send(signal);
        Ok(())
    }

    /// Answers (or stops answering) list and watch of `kind` with 403 Forbidden, as a server
    /// does when RBAC does not grant them.
    pub fn forbid(&self, kind: &str, forbidden: bool) -> Result<()> {
        let info = kind_info(kind)?;
        let mut state = self.shared.lock();
        if let Some(c) = state.collections.get_mut(info.path) {
            c.forbidden = forbidden;
        }
        Ok(())
    }

    /// The current (cluster-wide) resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.shared.lock().rv
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<Recorded> {
        self.shared.lock().requests.clone()
    }

    /// The list (not watch) requests for `kind` so far.
    pub fn lists(&self, kind: &str) -> Result<usize> {
        let path = kind_info(kind)?.path;
        Ok(self
            .requests()
            .iter()
            .filter(|r| r.path == path && !r.is_watch())
            .count())
    }

    /// The resourceVersion of each watch request for `kind`, in order.
    pub fn watches(&self, kind: &str) -> Result<Vec<String>> {
        let path = kind_info(kind)?.path;
        Ok(self
            .requests()
            .iter()
            .filter(|r| r.path == path && r.is_watch())
            .map(|r| r.query.get("resourceVersion").cloned().unwrap_or_default())
            .collect())
    }
}

type Body = http_body_util::combinators::BoxBody<Bytes, std::io::Error>;

fn full(status: StatusCode, body: Value) -> Response<Body> {
    let mut response = Response::new(
        Full::new(Bytes::from(body.to_string()))
            .map_err(|never| match never {})
            .boxed(),
    );
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}

fn parse_query(query: Option<&str>) -> BTreeMap<String, String> {
    query
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (k.to_string(), v.replace("%2F", "/")),
            None => (p.to_string(), String::new()),
        })
        .collect()
}

fn handle(shared: &Arc<Shared>, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_string();
    let query = parse_query(req.uri().query());
    let recorded = Recorded {
        path: path.clone(),
        query,
        authorization: req
            .headers()
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string),
    };
    let watch = recorded.is_watch();
    let query = recorded.query.clone();
    let mut state = shared.lock();
    state.requests.push(recorded);
    let Some(info) = KINDS.iter().find(|k| k.path == path) else {
        return full(
            StatusCode::NOT_FOUND,
            json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                   "message": format!("the server could not find the requested resource ({path})"),
                   "reason": "NotFound", "code": 404}),
        );
    };
    let now = state.rv;
    let Some(collection) = state.collections.get(info.path) else {
        return full(StatusCode::INTERNAL_SERVER_ERROR, json!({}));
    };
    if collection.forbidden {
        let plural = info.path.rsplit('/').next().unwrap_or("");
        return full(
            StatusCode::FORBIDDEN,
            json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                   "message": format!("{plural} is forbidden: User \"system:serviceaccount:legate-system:legate-pilot\" cannot list resource \"{plural}\""),
                   "reason": "Forbidden", "code": 403}),
        );
    }
    if !watch {
        let items: Vec<Value> = collection
            .objects
            .values()
            .map(|o| {
                let mut item = o.clone();
                if let Some(map) = item.as_object_mut() {
                    // A list's items carry neither kind nor apiVersion.
                    map.remove("kind");
                    map.remove("apiVersion");
                }
                item
            })
            .collect();
        return full(
            StatusCode::OK,
            json!({
                "kind": format!("{}List", info.kind), "apiVersion": info.api_version,
                "metadata": {"resourceVersion": now.to_string()},
                "items": items
            }),
        );
    }
    let from: u64 = query
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let bookmarks = query
        .get("allowWatchBookmarks")
        .is_some_and(|b| b == "true");
    let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(64);
    let gone = from < collection.compacted;
    if gone && collection.gone_http {
        return full(StatusCode::GONE, status_410(from, now));
    }
    let mut first = Vec::new();
    if gone {
        first.push(line("ERROR", &status_410(from, now)));
    } else if !collection.paused {
        first.extend(
            collection
                .log
                .iter()
                .filter(|(rv, _, _)| *rv > from)
                .map(|(_, event, object)| line(event, object)),
        );
    }
    let last_sent = if collection.paused { from } else { now };
    let signals = shared.signals.subscribe();
    drop(state);
    tokio::spawn(stream_watch(
        info.path, first, gone, last_sent, bookmarks, signals, tx,
    ));
    let mut response = Response::new(BodyExt::boxed(StreamBody::new(ReceiverStream::new(rx))));
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}

/// Feeds one watch: the replayed history, then live events until it is ended or cut.
async fn stream_watch(
    path: &'static str,
    first: Vec<String>,
    gone: bool,
    mut last_sent: u64,
    bookmarks: bool,
    mut signals: broadcast::Receiver<Signal>,
    tx: mpsc::Sender<Result<Frame<Bytes>, std::io::Error>>,
) {
    let send = |text: String| tx.send(Ok(Frame::data(Bytes::from(text))));
    for text in first {
        if send(text).await.is_err() {
            return;
        }
    }
    if gone {
        return;
    }
    loop {
        let signal = tokio::select! {
            signal = signals.recv() => signal,
            _ = tx.closed() => return,
        };
        match signal {
            Ok(Signal::Event {
                path: p,
                rv,
                line,
                bookmark,
            }) if p == path => {
                if bookmark && !bookmarks {
                    continue;
                }
                if !bookmark && rv <= last_sent {
                    continue;
                }
                last_sent = last_sent.max(rv);
                if send(line).await.is_err() {
                    return;
                }
            }
            Ok(Signal::Expire { path: p, line }) if p == path => {
                let _ = send(line).await;
                return;
            }
            Ok(Signal::End { path: p, cut }) if p.is_none_or(|p| p == path) => {
                if cut {
                    let _ = tx
                        .send(Err(std::io::Error::other("watch cut by the test")))
                        .await;
                }
                return;
            }
            Ok(_) => {}
            Err(_) => return,
        }
    }
}
