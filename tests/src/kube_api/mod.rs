//! A test double of the Kubernetes API server, for the discovery tests: no API server
//! can run on these machines, so this one speaks the part of the real protocol
//! kube-rs uses, over HTTPS with a bearer token:
//! - list (`GET /api/v1/services`, `/api/v1/namespaces/{ns}/pods`,
//!   `/apis/discovery.k8s.io/v1/endpointslices`, ...) with `resourceVersion`,
//!   `limit` and `continue`;
//! - watch (`?watch=true&resourceVersion=N`) as a chunked stream of
//!   ADDED/MODIFIED/DELETED events replayed from `N`, then live, with BOOKMARKs
//!   (`allowWatchBookmarks`) and the server-side `timeoutSeconds`;
//! - `410 Gone` (an ERROR event, as the real server sends it) for a version older
//!   than the last compaction;
//! - 401 for a missing or wrong token.
//!
//! Objects are the JSON k8s-openapi serializes. The server runs on its own thread in
//! a pod's network namespace; the test drives it ([`KubeApi::apply`],
//! [`KubeApi::delete`], [`KubeApi::compact`], [`KubeApi::set_down`]).

mod server;

use std::{
    collections::{BTreeMap, VecDeque},
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering::SeqCst},
    },
    time::Duration,
};

use anyhow::{Context, Result};
use serde_json::{Value, json};

use crate::Pod;

/// The API server's port.
pub const PORT: u16 = 6443;

/// The kinds served.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// `v1` Services.
    Service,
    /// `discovery.k8s.io/v1` EndpointSlices.
    EndpointSlice,
    /// `v1` Pods.
    Pod,
}

impl Kind {
    fn of(kind: &str) -> Option<Self> {
        match kind {
            "Service" => Some(Self::Service),
            "EndpointSlice" => Some(Self::EndpointSlice),
            "Pod" => Some(Self::Pod),
            _ => None,
        }
    }

    /// From a URL's resource segment.
    fn from_plural(plural: &str) -> Option<Self> {
        match plural {
            "services" => Some(Self::Service),
            "endpointslices" => Some(Self::EndpointSlice),
            "pods" => Some(Self::Pod),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Service => "Service",
            Self::EndpointSlice => "EndpointSlice",
            Self::Pod => "Pod",
        }
    }

    fn api_version(self) -> &'static str {
        match self {
            Self::EndpointSlice => "discovery.k8s.io/v1",
            _ => "v1",
        }
    }
}

/// One change, as a watch sends it.
#[derive(Clone, Debug)]
struct Change {
    rv: u64,
    kind: Kind,
    namespace: String,
    kind_of_event: &'static str,
    object: Value,
}

/// What the server holds.
#[derive(Debug, Default)]
struct State {
    rv: u64,
    objects: BTreeMap<(Kind, String, String), Value>,
    log: VecDeque<Change>,
    /// Versions at or below this are gone: a watch from one gets 410.
    compacted: u64,
    /// Requests served, by `list`/`watch` and kind (for tests to count relists).
    requests: BTreeMap<(&'static str, Kind), usize>,
}

/// Shared between the test and the server thread.
#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    /// The latest version: watches wait on it.
    version: tokio::sync::watch::Sender<u64>,
    token: String,
    down: AtomicBool,
    /// Open connections, aborted when the server goes down.
    connections: Mutex<Vec<tokio::task::AbortHandle>>,
    bookmark_every: Duration,
    /// Every watch ends at once with a 200 (as a misbehaving load balancer does).
    end_watches: AtomicBool,
}

/// A running test API server.
pub struct KubeApi {
    shared: Arc<Shared>,
    /// Where it listens (in its pod).
    pub addr: SocketAddr,
    dir: PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl KubeApi {
    /// Starts the server in `pod` on its IPv4 address, port [`PORT`]; it sends a
    /// BOOKMARK on every watch each `bookmark_every`.
    pub fn start(pod: &Pod, bookmark_every: Duration) -> Result<Self> {
        let addr = SocketAddr::new(IpAddr::V4(pod.ip4), PORT);
        let dir = std::env::temp_dir().join(format!(
            "sidecar-kube-api-{}-{}",
            std::process::id(),
            pod.ip4
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let tls = server::Tls::new(addr.ip())?;
        let token = format!("token-{}", std::process::id());
        std::fs::write(dir.join("kubeconfig"), tls.kubeconfig(addr, &token))?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                rv: 1,
                ..State::default()
            }),
            version: tokio::sync::watch::Sender::new(1),
            token,
            down: AtomicBool::new(false),
            connections: Mutex::new(Vec::new()),
            bookmark_every,
            end_watches: AtomicBool::new(false),
        });
        let netns = std::fs::File::open(pod.netns_path()).context("pod netns")?;
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn({
            let shared = shared.clone();
            move || {
                let result = server::run(netns, addr, tls, shared, stopped, ready_tx.clone());
                if let Err(e) = result {
                    let _ = ready_tx.send(Err(e.to_string()));
                }
            }
        });
        match ready_rx.recv_timeout(Duration::from_secs(10)) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => anyhow::bail!("test API server: {e}"),
            Err(e) => anyhow::bail!("test API server did not start: {e}"),
        }
        Ok(Self {
            shared,
            addr,
            dir,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// A kubeconfig for it: its CA, its address, the bearer token.
    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.join("kubeconfig")
    }

    /// Creates or replaces `object` (a k8s-openapi Service, EndpointSlice or Pod);
    /// watches see ADDED or MODIFIED.
    pub fn apply<K: serde::Serialize>(&self, object: &K) -> Result<()> {
        self.apply_json(serde_json::to_value(object)?)
    }

    /// [`KubeApi::apply`] for an object already in JSON (`kind`, `metadata` set).
    pub fn apply_json(&self, mut value: Value) -> Result<()> {
        let kind = value["kind"]
            .as_str()
            .and_then(Kind::of)
            .context("apply: not a Service, EndpointSlice or Pod")?;
        let ns = value["metadata"]["namespace"]
            .as_str()
            .context("apply: no metadata.namespace")?
            .to_string();
        let name = value["metadata"]["name"]
            .as_str()
            .context("apply: no metadata.name")?
            .to_string();
        let mut st = self.lock();
        st.rv += 1;
        let rv = st.rv;
        value["metadata"]["resourceVersion"] = json!(rv.to_string());
        value["metadata"]["uid"] = json!(format!("uid-{kind:?}-{ns}-{name}"));
        let key = (kind, ns.clone(), name);
        let event = match st.objects.insert(key, value.clone()) {
            Some(_) => "MODIFIED",
            None => "ADDED",
        };
        st.log.push_back(Change {
            rv,
            kind,
            namespace: ns,
            kind_of_event: event,
            object: value,
        });
        drop(st);
        self.shared.version.send_replace(rv);
        Ok(())
    }

    /// Deletes an object; watches see DELETED.
    pub fn delete(&self, kind: Kind, namespace: &str, name: &str) -> Result<()> {
        let mut st = self.lock();
        let mut object = st
            .objects
            .remove(&(kind, namespace.to_string(), name.to_string()))
            .with_context(|| format!("delete: no {kind:?} {namespace}/{name}"))?;
        st.rv += 1;
        let rv = st.rv;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        st.log.push_back(Change {
            rv,
            kind,
            namespace: namespace.to_string(),
            kind_of_event: "DELETED",
            object,
        });
        drop(st);
        self.shared.version.send_replace(rv);
        Ok(())
    }

    /// Forgets the change history, as etcd compaction does: a watch resumed from any
    /// version before now is answered 410 Gone and must list again.
    pub fn compact(&self) {
        let mut st = self.lock();
        st.compacted = st.rv;
        st.log.clear();
    }

    /// Takes the server down (every connection cut, new ones closed at once) or
    /// brings it back.
    pub fn set_down(&self, down: bool) {
        self.shared.down.store(down, SeqCst);
        if down {
            let open = std::mem::take(&mut *lock(&self.shared.connections));
            for c in open {
                c.abort();
            }
        }
    }

    /// Makes every watch from now on end at once, with a 200 and no event.
    pub fn end_watches_at_once(&self, on: bool) {
        self.shared.end_watches.store(on, SeqCst);
    }

    /// Lists (`"list"`) or watches (`"watch"`) of `kind` served so far.
    pub fn requests(&self, verb: &'static str, kind: Kind) -> usize {
        self.lock()
            .requests
            .get(&(verb, kind))
            .copied()
            .unwrap_or(0)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        lock(&self.shared.state)
    }
}

impl Drop for KubeApi {
    fn drop(&mut self) {
        self.set_down(true);
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    }
}
