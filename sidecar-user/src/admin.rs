//! The two HTTP listeners: the health listener on the pod IP (kubelet probes,
//! later Prometheus) and the loopback-only admin listener (debug endpoints).

use std::{
    convert::Infallible,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Instant,
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::net::TcpListener;
use tracing::debug;

use crate::{
    ebpf::KernelMaps,
    metrics::{Metrics, render},
    proxy::{connections::ConnTable, gate::Gate},
};

/// State the endpoints report on.
pub struct AdminState {
    /// True once programs are attached and listeners accept; false again on drain.
    pub ready: AtomicBool,
    /// Every metric, for `/metrics`.
    pub metrics: Metrics,
    /// Kernel maps (fill of the original-destination maps).
    pub kernel: Arc<KernelMaps>,
    /// Open connections, for `/connections`.
    pub connections: Arc<ConnTable>,
    /// The pinned links capture runs on: readiness requires them attached.
    pub links: Arc<crate::ebpf::held_links::HeldLinks>,
    /// Services and endpoints, for `/services`.
    pub services: Arc<crate::service::Services>,
    /// Kubelet probes rewritten by `sidecar inject`, by path.
    pub app_probes: crate::app_health::AppProbes,
    /// The cgroup the programs are attached to.
    pub cgroup: PathBuf,
    /// When the sidecar started.
    pub started: Instant,
    /// Pooled HBONE connections, for `/pool` (set once the mesh is up).
    pub pool: std::sync::OnceLock<Arc<crate::mesh::hbone::Pool>>,
}

/// Which endpoints a listener serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Surface {
    /// `/healthz`, `/readyz`, `/metrics`: safe to expose on the pod IP.
    Health,
    /// Health plus debug endpoints (`/stats`, `/connections`); loopback only.
    Admin,
}

/// The `/stats` document: where capture is attached and how full the kernel maps are.
#[derive(Serialize)]
struct Stats<'a> {
    cgroup: &'a std::path::Path,
    uptime_seconds: u64,
    ready: bool,
    kernel: std::collections::BTreeMap<String, u64>,
    orig_dst_map: OrigDstMap,
}

#[derive(Serialize)]
struct OrigDstMap {
    by_cookie: usize,
    by_flow: usize,
    capacity: u32,
}

/// A client must send a request's headers within this long (also the idle time
/// between requests on a kept-alive connection).
const HEADER_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// No connection lives longer than this (Prometheus and the kubelet reconnect).
const MAX_CONNECTION_AGE: std::time::Duration = std::time::Duration::from_secs(120);
/// Connections served at once per listener, and per client address: the health
/// listener is reachable from the whole cluster, and one client must not be able to
/// hold every slot the kubelet needs for its probes.
const MAX_CONNECTIONS: usize = 256;
const MAX_CONNECTIONS_PER_CLIENT: usize = 16;

/// Serves HTTP/1 on `listener` until the task is aborted.
pub async fn serve(listener: TcpListener, surface: Surface, state: Arc<AdminState>) {
    let gate = Gate::new(MAX_CONNECTIONS, MAX_CONNECTIONS_PER_CLIENT);
    loop {
        let (stream, peer) = crate::proxy::listener::accept(&listener).await;
        let pass = match gate.enter(peer.ip()) {
            Ok(pass) => pass,
            Err(limit) => {
                debug!(%peer, ?surface, limit = limit.as_str(), "too many HTTP connections: closed");
                continue;
            }
        };
        let state = state.clone();
        let pass = Arc::new(pass);
        // The pod IP the kubelet dialed: forwarded app probes go to the same address.
        let local_ip = stream
            .local_addr()
            .map(|a| crate::proxy::addr::unmap_ip(a.ip()))
            .ok();
        tokio::spawn(async move {
            let serving = pass.clone();
            let service = service_fn(move |req: Request<Incoming>| {
                let state = state.clone();
                // A request in progress: this connection is not idle (`None`: it
                // was asked to close; the request is still answered, and the
                // connection then closes).
                let busy = serving.busy();
                async move {
                    let _busy = busy;
                    let probe = state.app_probes.get(req.uri().path()).cloned();
                    let response = match (probe, local_ip) {
                        (Some(probe), Some(ip)) => {
                            let (code, body) = crate::app_health::check(&probe, ip).await;
                            let code = StatusCode::from_u16(code)
                                .unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
                            let mut resp = Response::new(Full::new(Bytes::from(body)));
                            *resp.status_mut() = code;
                            resp
                        }
                        _ => route(&req, surface, &state),
                    };
                    Ok::<_, Infallible>(response)
                }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            let served = async {
                tokio::pin!(connection);
                tokio::select! {
                    served = connection.as_mut() => served,
                    // Idle, and a client holding fewer connections (the kubelet)
                    // needs its place: a response being written is finished, then
                    // the connection closes.
                    () = pass.evicted() => {
                        debug!(%peer, "idle connection closing to admit a client holding fewer");
                        connection.as_mut().graceful_shutdown();
                        connection.await
                    }
                }
            };
            match tokio::time::timeout(MAX_CONNECTION_AGE, served).await {
                Ok(Err(error)) => debug!(%error, %peer, "admin connection error"),
                Err(_) => debug!(%peer, "admin connection closed at its maximum age"),
                Ok(Ok(())) => {}
            }
        });
    }
}

fn route(req: &Request<Incoming>, surface: Surface, state: &AdminState) -> Response<Full<Bytes>> {
    if req.method() != Method::GET {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n");
    }
    match (req.uri().path(), surface) {
        ("/healthz", _) => text(StatusCode::OK, "ok\n"),
        ("/readyz", _) if !state.ready.load(Ordering::Relaxed) => {
            text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
        }
        ("/readyz", _) => match state.links.detached().as_slice() {
            [] => text(StatusCode::OK, "ready\n"),
            detached => {
                let body = format!("not ready: capture detached ({})\n", detached.join(", "));
                let mut resp = Response::new(Full::new(Bytes::from(body)));
                *resp.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                resp
            }
        },
        ("/metrics", _) => metrics(req, state),
        ("/stats", Surface::Admin) => json(&stats(state)),
        ("/connections", Surface::Admin) => json(&state.connections.snapshot()),
        ("/services", Surface::Admin) => json(&state.services.view()),
        ("/pool", Surface::Admin) => json(&state.pool.get().map(|p| p.view()).unwrap_or_default()),
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

fn stats(state: &AdminState) -> Stats<'_> {
    let (by_cookie, by_flow) = state.kernel.orig_dst_entries();
    let kernel = state
        .kernel
        .counters()
        .into_iter()
        .map(|(p, c, v)| (format!("{}.{}", p.name(), c.name()), v))
        .collect();
    Stats {
        cgroup: &state.cgroup,
        uptime_seconds: state.started.elapsed().as_secs(),
        ready: state.ready.load(Ordering::Relaxed),
        kernel,
        orig_dst_map: OrigDstMap {
            by_cookie,
            by_flow,
            capacity: sidecar_common::ORIG_DST_MAP_CAPACITY,
        },
    }
}

/// `/metrics`, in OpenMetrics when the scraper asks for it, else Prometheus text.
fn metrics(req: &Request<Incoming>, state: &AdminState) -> Response<Full<Bytes>> {
    let accept = req
        .headers()
        .get(hyper::header::ACCEPT)
        .and_then(|v| v.to_str().ok());
    let Ok(text) = render::openmetrics(state.metrics.registry()) else {
        return text(StatusCode::INTERNAL_SERVER_ERROR, "encoding failed\n");
    };
    let (body, content_type) = if render::wants_openmetrics(accept) {
        (text, render::OPENMETRICS_CONTENT_TYPE)
    } else {
        (
            render::to_prometheus_text(&text),
            render::PROMETHEUS_CONTENT_TYPE,
        )
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    resp
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *resp.status_mut() = status;
    resp
}

fn json<T: Serialize>(value: &T) -> Response<Full<Bytes>> {
    match serde_json::to_vec_pretty(value) {
        Ok(body) => {
            let mut resp = Response::new(Full::new(Bytes::from(body)));
            resp.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("application/json"),
            );
            resp
        }
        Err(_) => text(StatusCode::INTERNAL_SERVER_ERROR, "serialization failed\n"),
    }
}
