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
use tracing::{debug, warn};

use crate::{ebpf::KernelMaps, proxy::ProxyStats};

/// State the endpoints report on.
pub struct AdminState {
    /// True once programs are attached and listeners accept; false again on drain.
    pub ready: AtomicBool,
    /// Proxy counters.
    pub stats: Arc<ProxyStats>,
    /// Kernel maps (counters, fill of the original-destination maps).
    pub kernel: Arc<KernelMaps>,
    /// The cgroup the programs are attached to.
    pub cgroup: PathBuf,
    /// When the sidecar started.
    pub started: Instant,
}

/// Which endpoints a listener serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Surface {
    /// `/healthz`, `/readyz`: safe to expose on the pod IP.
    Health,
    /// Health plus debug endpoints (`/stats`); loopback only.
    Admin,
}

/// The `/stats` document.
#[derive(Serialize)]
struct Stats<'a> {
    cgroup: &'a std::path::Path,
    uptime_seconds: u64,
    ready: bool,
    proxy: crate::proxy::stats::ProxyStatsSnapshot,
    kernel: std::collections::BTreeMap<&'static str, u64>,
    orig_dst_map: OrigDstMap,
}

#[derive(Serialize)]
struct OrigDstMap {
    by_cookie: usize,
    by_flow: usize,
    capacity: u32,
    /// Entries that left the flow map without the proxy taking them: LRU evictions
    /// (connects abandoned before accept). Derived: re-keyed − taken − still present.
    evicted: u64,
}

/// Serves HTTP/1 on `listener` until the task is aborted.
pub async fn serve(listener: TcpListener, surface: Surface, state: Arc<AdminState>) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(pair) => pair,
            Err(error) => {
                warn!(%error, ?surface, "admin accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                continue;
            }
        };
        let state = state.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(route(&req, surface, &state)) }
            });
            if let Err(error) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                debug!(%error, %peer, "admin connection error");
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
        ("/readyz", _) if state.ready.load(Ordering::Relaxed) => text(StatusCode::OK, "ready\n"),
        ("/readyz", _) => text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n"),
        ("/stats", Surface::Admin) => json(&stats(state)),
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

fn stats(state: &AdminState) -> Stats<'_> {
    let (by_cookie, by_flow) = state.kernel.orig_dst_entries();
    let kernel: std::collections::BTreeMap<_, _> = state
        .kernel
        .counters()
        .into_iter()
        .map(|(c, v)| (c.name(), v))
        .collect();
    let proxy = state.stats.snapshot();
    let rekeyed = kernel
        .get(sidecar_common::Counter::OrigDstRekeyed.name())
        .copied()
        .unwrap_or(0);
    let evicted = rekeyed.saturating_sub(proxy.orig_dst_found + by_flow as u64);
    Stats {
        cgroup: &state.cgroup,
        uptime_seconds: state.started.elapsed().as_secs(),
        ready: state.ready.load(Ordering::Relaxed),
        proxy: state.stats.snapshot(),
        kernel: state
            .kernel
            .counters()
            .into_iter()
            .map(|(c, v)| (c.name(), v))
            .collect(),
        orig_dst_map: OrigDstMap {
            by_cookie,
            by_flow,
            capacity: sidecar_common::ORIG_DST_MAP_CAPACITY,
            evicted,
        },
    }
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
