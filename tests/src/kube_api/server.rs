//! The HTTPS side of the test API server: TLS, routing, list and watch.

use std::{
    convert::Infallible,
    net::{IpAddr, SocketAddr},
    os::fd::AsRawFd,
    pin::Pin,
    sync::{Arc, atomic::Ordering::SeqCst},
    task::{Context, Poll},
    time::Duration,
};

use anyhow::{Context as _, Result};
use base64::Engine as _;
use bytes::Bytes;
use hyper::{Request, Response, StatusCode, body::Frame, service::service_fn};
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::{Change, Kind, Shared, lock};

/// The server's certificate (for its IP) and the CA that signed it.
pub struct Tls {
    config: Arc<rustls::ServerConfig>,
    ca_pem: String,
}

impl Tls {
    /// A fresh CA and a server certificate for `ip`.
    pub fn new(ip: IpAddr) -> Result<Self> {
        let ca_key = rcgen::KeyPair::generate()?;
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "test-apiserver-ca");
        let ca = ca_params.self_signed(&ca_key)?;
        let key = rcgen::KeyPair::generate()?;
        let mut params = rcgen::CertificateParams::new(vec![ip.to_string()])?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "test-apiserver");
        let cert = params.signed_by(&key, &ca, &ca_key)?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            )?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Self {
            config: Arc::new(config),
            ca_pem: ca.pem(),
        })
    }

    /// A kubeconfig reaching `addr` with `token`.
    pub fn kubeconfig(&self, addr: SocketAddr, token: &str) -> String {
        let ca = base64::engine::general_purpose::STANDARD.encode(&self.ca_pem);
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: https://{addr}\n    certificate-authority-data: {ca}\n\
             users:\n- name: sidecar\n  user:\n    token: {token}\n\
             contexts:\n- name: test\n  context:\n    cluster: test\n    user: sidecar\ncurrent-context: test\n"
        )
    }
}

/// Serves on `addr` inside `netns` until `stop`; says on `ready` once listening.
pub fn run(
    netns: std::fs::File,
    addr: SocketAddr,
    tls: Tls,
    shared: Arc<Shared>,
    stop: tokio::sync::oneshot::Receiver<()>,
    ready: std::sync::mpsc::Sender<Result<(), String>>,
) -> Result<()> {
    // SAFETY: this thread alone enters the pod's network namespace.
    if unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error()).context("setns");
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let _ = ready.send(Ok(()));
        let acceptor = tokio_rustls::TlsAcceptor::from(tls.config);
        let mut stop = std::pin::pin!(stop);
        loop {
            let (tcp, _) = tokio::select! {
                accepted = listener.accept() => accepted?,
                _ = &mut stop => return Ok(()),
            };
            if shared.down.load(SeqCst) {
                drop(tcp);
                continue;
            }
            let (acceptor, shared2) = (acceptor.clone(), shared.clone());
            let task = tokio::spawn(async move {
                let Ok(stream) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = service_fn(move |req| {
                    let shared = shared2.clone();
                    async move { Ok::<_, Infallible>(handle(&shared, req)) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
            let mut open = lock(&shared.connections);
            open.retain(|c| !c.is_finished());
            open.push(task.abort_handle());
        }
    })
}

/// A response body fed by a channel: one chunk for a list, a chunk per event for a
/// watch (HTTP/1.1 chunked encoding, as the real server streams them).
pub struct Chunks(mpsc::Receiver<Bytes>);

impl hyper::body::Body for Chunks {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
    }
}

fn respond(status: StatusCode, body: &Value) -> Response<Chunks> {
    let (tx, rx) = mpsc::channel(1);
    let _ = tx.try_send(Bytes::from(body.to_string()));
    let mut r = Response::new(Chunks(rx));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

/// `/api/v1[/namespaces/{ns}]/{plural}` or
/// `/apis/discovery.k8s.io/v1[/namespaces/{ns}]/{plural}`.
fn route(path: &str) -> Option<(Kind, Option<String>)> {
    let rest = path
        .strip_prefix("/api/v1/")
        .or_else(|| path.strip_prefix("/apis/discovery.k8s.io/v1/"))?;
    let parts: Vec<&str> = rest.split('/').collect();
    let (ns, plural) = match parts.as_slice() {
        [plural] => (None, *plural),
        ["namespaces", ns, plural] => (Some(ns.to_string()), *plural),
        _ => return None,
    };
    let kind = Kind::from_plural(plural)?;
    // Each kind only under its own group.
    let group_ok = (kind == Kind::EndpointSlice) == path.starts_with("/apis/");
    group_ok.then_some((kind, ns))
}

fn handle(shared: &Arc<Shared>, req: Request<hyper::body::Incoming>) -> Response<Chunks> {
    let authorized = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        == Some(format!("Bearer {}", shared.token).as_str());
    if !authorized {
        return respond(
            StatusCode::UNAUTHORIZED,
            &status(401, "Unauthorized", "Unauthorized"),
        );
    }
    let Some((kind, ns)) = route(req.uri().path()) else {
        return respond(
            StatusCode::NOT_FOUND,
            &status(
                404,
                "NotFound",
                "the server could not find the requested resource",
            ),
        );
    };
    let query: Vec<(String, String)> = req
        .uri()
        .query()
        .map(|q| {
            q.split('&')
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.to_string(), v.replace("%2F", "/")))
                .collect()
        })
        .unwrap_or_default();
    let param = |k: &str| query.iter().find(|(q, _)| q == k).map(|(_, v)| v.as_str());
    if matches!(param("watch"), Some("true" | "1")) {
        let rv = param("resourceVersion")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let timeout = param("timeoutSeconds")
            .and_then(|v| v.parse().ok())
            .map_or(Duration::from_secs(1800), Duration::from_secs);
        let timeout = match shared.end_watches.load(std::sync::atomic::Ordering::SeqCst) {
            true => Duration::ZERO,
            false => timeout,
        };
        let bookmarks = param("allowWatchBookmarks") == Some("true");
        lock(&shared.state)
            .requests
            .entry(("watch", kind))
            .and_modify(|n| *n += 1)
            .or_insert(1);
        return watch(shared.clone(), kind, ns, rv, timeout, bookmarks);
    }
    let limit: usize = param("limit")
        .and_then(|v| v.parse().ok())
        .filter(|&l| l > 0)
        .unwrap_or(usize::MAX);
    let from: usize = param("continue").and_then(|v| v.parse().ok()).unwrap_or(0);
    let mut st = lock(&shared.state);
    *st.requests.entry(("list", kind)).or_insert(0) += 1;
    let all: Vec<&Value> = st
        .objects
        .iter()
        .filter(|((k, n, _), _)| *k == kind && ns.as_ref().is_none_or(|ns| ns == n))
        .map(|(_, v)| v)
        .collect();
    let page: Vec<&Value> = all.iter().skip(from).take(limit).copied().collect();
    let next = from + page.len();
    let mut metadata = json!({"resourceVersion": st.rv.to_string()});
    if next < all.len() {
        metadata["continue"] = json!(next.to_string());
    }
    let body = json!({"kind": format!("{}List", kind.name()), "apiVersion": kind.api_version(),
                      "metadata": metadata, "items": page});
    respond(StatusCode::OK, &body)
}

fn event_line(kind_of_event: &str, object: &Value) -> Bytes {
    let mut line = json!({"type": kind_of_event, "object": object}).to_string();
    line.push('\n');
    Bytes::from(line)
}

/// Changes of `kind` (in `ns`) after `after`, with the version reached.
fn changes_after(shared: &Shared, kind: Kind, ns: &Option<String>, after: u64) -> Vec<Change> {
    lock(&shared.state)
        .log
        .iter()
        .filter(|c| c.rv > after && c.kind == kind && ns.as_ref().is_none_or(|n| *n == c.namespace))
        .cloned()
        .collect()
}

fn watch(
    shared: Arc<Shared>,
    kind: Kind,
    ns: Option<String>,
    rv: u64,
    timeout: Duration,
    bookmarks: bool,
) -> Response<Chunks> {
    let (tx, rx) = mpsc::channel(64);
    let mut version = shared.version.subscribe();
    tokio::spawn(async move {
        let (compacted, current) = {
            let st = lock(&shared.state);
            (st.compacted, st.rv)
        };
        let mut last = rv;
        if rv == 0 {
            // No version: the current objects as ADDED, then what follows.
            let objects: Vec<Value> = lock(&shared.state)
                .objects
                .iter()
                .filter(|((k, n, _), _)| *k == kind && ns.as_ref().is_none_or(|ns| ns == n))
                .map(|(_, v)| v.clone())
                .collect();
            for o in objects {
                if tx.send(event_line("ADDED", &o)).await.is_err() {
                    return;
                }
            }
            last = current;
        } else if rv < compacted {
            let gone = status(
                410,
                "Expired",
                &format!("too old resource version: {rv} ({compacted})"),
            );
            let _ = tx.send(event_line("ERROR", &gone)).await;
            return;
        }
        let deadline = tokio::time::Instant::now() + timeout;
        let mut bookmark = tokio::time::interval_at(
            tokio::time::Instant::now() + shared.bookmark_every,
            shared.bookmark_every,
        );
        loop {
            for c in changes_after(&shared, kind, &ns, last) {
                last = c.rv;
                if tx
                    .send(event_line(c.kind_of_event, &c.object))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            tokio::select! {
                changed = version.changed() => if changed.is_err() { return },
                _ = bookmark.tick(), if bookmarks => {
                    last = last.max(lock(&shared.state).rv);
                    let mark = json!({"kind": kind.name(), "apiVersion": kind.api_version(),
                                      "metadata": {"resourceVersion": last.to_string()}});
                    if tx.send(event_line("BOOKMARK", &mark)).await.is_err() {
                        return;
                    }
                }
                () = tokio::time::sleep_until(deadline) => return,
            }
        }
    });
    let mut r = Response::new(Chunks(rx));
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}
