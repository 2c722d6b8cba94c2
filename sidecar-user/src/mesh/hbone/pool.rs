//! The client side of HBONE: pooled mTLS connections to peers' HBONE ports, and the
//! `CONNECT` streams opened on them.
//!
//! A connection is keyed by the destination (pod IP and HBONE port), the serial of
//! our certificate and the trust bundle when it was made, so after a rotation or a
//! bundle change new streams go over new connections (with the new certificate,
//! verified under the new bundle), while the old ones finish their streams and close
//! once idle. A connection takes new streams while it has fewer than the
//! streams limit (ours, or the server's when lower) and neither certificate has
//! expired; past that a new one is opened, up to the per-destination cap, after
//! which streams share the least loaded one. A connection that fails (an error, a
//! GOAWAY, a PING unanswered) leaves the pool at once and is never reused; one idle
//! for `idle_timeout` is closed.
//!
//! Which identity the server must have is checked per stream, against the identity
//! the connection's handshake proved, before anything is sent: one connection serves
//! every service whose endpoint is that pod, each with its own expectation.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use h2::client::SendRequest;
use tokio::{net::TcpStream, sync::Notify};
use tokio_rustls::TlsConnector;
use tracing::{debug, warn};

use super::{
    ALPN, Settings, keepalive,
    metrics::{HboneMetrics, Side},
    tunnel::{Key, SharedSocket, Slot, Tunnel, TunnelView, now_unix},
};
use crate::{
    mesh::MeshError,
    tls::{
        IdentityStore,
        certs::check_validity,
        read_ahead::ReadAhead,
        rustls_config::{peer_identity, resumed_with_expired_certificate},
    },
    woken::woken,
};

/// Pooled HBONE connections.
pub struct Pool {
    tls: TlsConnector,
    store: Arc<IdentityStore>,
    settings: Settings,
    metrics: Arc<HboneMetrics>,
    tunnels: Mutex<HashMap<Key, Vec<Arc<Tunnel>>>>,
    /// One opener per key at a time: a burst of connects to a new destination waits
    /// for one handshake instead of making one each.
    opening: Mutex<HashMap<Key, Arc<tokio::sync::Mutex<()>>>>,
    next_id: AtomicU64,
}

/// A task's hold on its key's opener: the last one to let go, when no connection to
/// the key is left, removes it (a destination that never answered leaves nothing
/// behind, also when the task is cancelled mid-way).
struct Opener<'a> {
    pool: &'a Pool,
    key: &'a Key,
    lock: Arc<tokio::sync::Mutex<()>>,
}

impl Drop for Opener<'_> {
    fn drop(&mut self) {
        let connected = self
            .pool
            .tunnels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(self.key);
        if connected {
            return;
        }
        let mut opening = self.pool.opening.lock().unwrap_or_else(|p| p.into_inner());
        // The map's reference and ours: no other task waits on it.
        if Arc::strong_count(&self.lock) == 2 {
            opening.remove(self.key);
        }
    }
}

impl Pool {
    /// An empty pool that originates mTLS with `tls` (the current identity of `store`).
    pub fn new(
        tls: TlsConnector,
        store: Arc<IdentityStore>,
        settings: Settings,
        metrics: Arc<HboneMetrics>,
    ) -> Arc<Self> {
        Arc::new(Self {
            tls,
            store,
            settings,
            metrics,
            tunnels: Mutex::default(),
            opening: Mutex::default(),
            next_id: AtomicU64::new(0),
        })
    }

    /// The settings.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// The metrics.
    pub fn metrics(&self) -> &Arc<HboneMetrics> {
        &self.metrics
    }

    /// A connection to `ip`'s HBONE port with room for one more stream (opened if
    /// needed), the stream slot taken, and whether this call opened it.
    pub async fn checkout(
        self: &Arc<Self>,
        ip: std::net::IpAddr,
    ) -> Result<(Arc<Tunnel>, SendRequest<Bytes>, Box<dyn Send + Sync>, bool), MeshError> {
        let current = self.store.current();
        let key = Key {
            dst: SocketAddr::new(ip, self.settings.port),
            local: current.serial.clone(),
            bundle: current.bundle_hash,
        };
        if let Some(found) = self.take_slot(&key, false) {
            return Ok(self.claimed(found, false));
        }
        let opener = Opener {
            pool: self,
            key: &key,
            lock: {
                let mut opening = self.opening.lock().unwrap_or_else(|p| p.into_inner());
                opening.entry(key.clone()).or_default().clone()
            },
        };
        let _opening = opener.lock.lock().await;
        // Another task may have opened one meanwhile.
        if let Some(found) = self.take_slot(&key, false) {
            return Ok(self.claimed(found, false));
        }
        let full = {
            let tunnels = self.tunnels.lock().unwrap_or_else(|p| p.into_inner());
            tunnels.get(&key).map_or(0, Vec::len) >= self.settings.max_connections
        };
        if full {
            // At the cap: share the least loaded; HTTP/2 queues the stream until the
            // server takes it.
            if let Some(found) = self.take_slot(&key, true) {
                return Ok(self.claimed(found, false));
            }
        }
        let tunnel = match self.open(key.clone()).await {
            Ok(tunnel) => tunnel,
            Err(error) => {
                // Opening a further connection to spread the load failed: the ones
                // already open still serve.
                return match self.take_slot(&key, true) {
                    Some(found) => Ok(self.claimed(found, false)),
                    None => Err(error),
                };
            }
        };
        let send = tunnel
            .send
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let Some(send) = send else {
            return Err(MeshError::Protocol(
                key.dst,
                "connection closed at once".into(),
            ));
        };
        tunnel.streams.fetch_add(1, Relaxed);
        self.tunnels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key.clone())
            .or_default()
            .push(tunnel.clone());
        Ok(self.claimed((tunnel, send), true))
    }

    fn claimed(
        &self,
        (tunnel, send): (Arc<Tunnel>, SendRequest<Bytes>),
        opened: bool,
    ) -> (Arc<Tunnel>, SendRequest<Bytes>, Box<dyn Send + Sync>, bool) {
        self.metrics.stream_opened(Side::Client);
        tunnel.carried.fetch_add(1, Relaxed);
        let slot = Box::new(Slot {
            tunnel: tunnel.clone(),
            metrics: self.metrics.clone(),
        });
        (tunnel, send, slot, opened)
    }

    /// Takes a stream slot on a usable tunnel of `key`: the least loaded, unless
    /// every one is busy and fewer than `parallel` exist (a new one spreads the
    /// work). `any`: the least loaded one even over its limit.
    fn take_slot(&self, key: &Key, any: bool) -> Option<(Arc<Tunnel>, SendRequest<Bytes>)> {
        let tunnels = self.tunnels.lock().unwrap_or_else(|p| p.into_inner());
        let list = tunnels.get(key)?;
        let open = list
            .iter()
            .filter(|t| !t.retired.load(Relaxed) && now_unix() < t.not_after);
        let pick = if any {
            open.min_by_key(|t| t.streams.load(Relaxed))?
        } else {
            let pick = open
                .filter(|t| {
                    let send = t.send.lock().unwrap_or_else(|p| p.into_inner());
                    let max = send
                        .as_ref()
                        .map_or(0, |s| s.current_max_send_streams())
                        .min(self.settings.max_streams);
                    t.usable(max)
                })
                .min_by_key(|t| t.streams.load(Relaxed))?;
            if pick.streams.load(Relaxed) > 0 && list.len() < self.settings.parallel {
                return None;
            }
            pick
        };
        let send = pick
            .send
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()?;
        pick.streams.fetch_add(1, Relaxed);
        Some((pick.clone(), send))
    }

    /// Removes `tunnel` from the pool: it takes no new stream and closes once its
    /// streams end.
    pub fn retire(&self, tunnel: &Arc<Tunnel>) {
        if tunnel.retired.swap(true, Relaxed) {
            return;
        }
        let mut tunnels = self.tunnels.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(list) = tunnels.get_mut(&tunnel.key) {
            list.retain(|t| !Arc::ptr_eq(t, tunnel));
            if list.is_empty() {
                tunnels.remove(&tunnel.key);
            }
        }
        let gone = !tunnels.contains_key(&tunnel.key);
        drop(tunnels);
        if gone {
            // Its opener too, unless a task is opening (that task's `Opener` removes
            // it when it is done).
            let mut opening = self.opening.lock().unwrap_or_else(|p| p.into_inner());
            if opening
                .get(&tunnel.key)
                .is_some_and(|lock| Arc::strong_count(lock) == 1)
            {
                opening.remove(&tunnel.key);
            }
        }
        tunnel.send.lock().unwrap_or_else(|p| p.into_inner()).take();
    }

    /// TCP, mTLS and the HTTP/2 handshake to `key.dst`; the connection's task runs
    /// it until it fails, goes idle or a certificate expires.
    async fn open(self: &Arc<Self>, key: Key) -> Result<Arc<Tunnel>, MeshError> {
        let started = Instant::now();
        let dst = key.dst;
        let tcp = TcpStream::connect(dst)
            .await
            .map_err(|e| MeshError::Connect(dst, e))?;
        // Small records (handshake, SETTINGS, headers) must not wait for delayed ACKs.
        tcp.set_nodelay(true)
            .map_err(|e| MeshError::Connect(dst, e))?;
        let socket = Arc::new(SharedSocket::of(&tcp));
        let local = self.store.current();
        let name = rustls::pki_types::ServerName::IpAddress(dst.ip().into());
        let tls = self
            .tls
            .connect(name, ReadAhead::new(tcp))
            .await
            .map_err(|e| MeshError::Tls(dst, e.to_string()))?;
        let (_, conn) = tls.get_ref();
        if conn.alpn_protocol() != Some(ALPN) {
            return Err(MeshError::Tls(
                dst,
                "the server did not negotiate h2: not an HBONE server".into(),
            ));
        }
        let Some(peer) = peer_identity(conn) else {
            return Err(MeshError::Tls(
                dst,
                "the server certificate has no SPIFFE ID".into(),
            ));
        };
        if let Some(reason) = resumed_with_expired_certificate(conn) {
            return Err(MeshError::Tls(dst, reason));
        }
        let peer_not_after = conn
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(|leaf| check_validity(leaf, now_unix()).ok())
            .unwrap_or(0);
        let (send, mut connection) = self
            .settings
            .client()
            .handshake::<_, Bytes>(tls)
            .await
            .map_err(|e| MeshError::Protocol(dst, e.to_string()))?;
        let tunnel = Arc::new(Tunnel {
            id: self.next_id.fetch_add(1, Relaxed) + 1,
            key,
            peer,
            opened: started,
            handshake: started.elapsed(),
            not_after: peer_not_after.min(local.not_after),
            send: Mutex::new(Some(send)),
            streams: AtomicUsize::new(0),
            carried: AtomicU64::new(0),
            idle_since: AtomicU64::new(0),
            retired: AtomicBool::new(false),
            idle: Notify::new(),
            socket,
        });
        self.metrics.connection_opened(Side::Client);
        debug!(%dst, peer = %tunnel.peer, id = tunnel.id, "HBONE connection opened");
        let ping = connection.ping_pong();
        let (pool, driven) = (self.clone(), tunnel.clone());
        tokio::spawn(async move {
            let settings = &pool.settings;
            // Polled when their timers fire, not on every frame.
            let keepalive = woken(keepalive(
                ping,
                settings.keepalive_interval,
                settings.keepalive_timeout,
            ));
            let retire = woken(driven.retire_when_done(settings.idle_timeout));
            tokio::pin!(keepalive, retire);
            let mut retired = false;
            loop {
                tokio::select! {
                    result = &mut connection => {
                        if let Err(error) = result {
                            debug!(dst = %driven.key.dst, %error, "HBONE connection ended");
                        }
                        break;
                    }
                    () = &mut keepalive => {
                        warn!(dst = %driven.key.dst, timeout = ?settings.keepalive_timeout, "HBONE connection closed: PING unanswered");
                        break;
                    }
                    () = &mut retire, if !retired => {
                        retired = true;
                        pool.retire(&driven);
                    }
                }
            }
            pool.retire(&driven);
            driven.socket.close();
            pool.metrics.connection_closed(Side::Client);
        });
        Ok(tunnel)
    }

    /// Every pooled connection, oldest first.
    pub fn view(&self) -> Vec<TunnelView> {
        let tunnels = self.tunnels.lock().unwrap_or_else(|p| p.into_inner());
        let now = now_unix();
        let mut views: Vec<TunnelView> = tunnels
            .values()
            .flatten()
            .map(|t| {
                let streams = t.streams.load(Relaxed);
                let idle_secs = if streams == 0 {
                    let since = Duration::from_millis(t.idle_since.load(Relaxed));
                    t.opened.elapsed().saturating_sub(since).as_secs()
                } else {
                    0
                };
                TunnelView {
                    id: t.id,
                    destination: t.key.dst,
                    peer_identity: t.peer.to_string(),
                    local_serial: t.key.local.clone(),
                    streams,
                    streams_carried: t.carried.load(Relaxed),
                    age_secs: t.opened.elapsed().as_secs(),
                    idle_secs,
                    expires_in_secs: t.not_after - now,
                    retired: t.retired.load(Relaxed),
                }
            })
            .collect();
        views.sort_by_key(|v| v.id);
        views
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        config::HboneConfig,
        tls::{
            IdentityFiles,
            dev_ca::{DevCa, KeyType, Validity},
            rustls_config::{client_config, provider},
        },
    };

    fn pool_to(port: u16) -> Arc<Pool> {
        let dir = std::env::temp_dir().join(format!("sidecar-pool-{}", std::process::id()));
        let ca = DevCa::new("td").expect("ca");
        let id = "spiffe://td/ns/a/sa/b".parse().expect("id");
        ca.write_workload(&dir, &id, KeyType::EcdsaP256, Validity::default())
            .expect("issue");
        let files = IdentityFiles {
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
            bundle: dir.join("bundle.pem"),
            federated: Vec::new(),
        };
        let store = Arc::new(IdentityStore::load(&files, &provider()).expect("load"));
        let _ = std::fs::remove_dir_all(&dir);
        let tls = client_config(store.clone(), provider(), ALPN).expect("config");
        let config = HboneConfig {
            port,
            ..HboneConfig::default()
        };
        Pool::new(
            TlsConnector::from(tls),
            store,
            Settings::new(&config, 2),
            Arc::default(),
        )
    }

    #[tokio::test]
    async fn destinations_that_never_answer_leave_nothing_behind() {
        // Port 1 on loopback: every connect is refused.
        let pool = pool_to(1);
        for i in 1..=50u8 {
            let ip = std::net::IpAddr::from([127, 0, 0, i]);
            let failed = pool.checkout(ip).await;
            assert!(matches!(failed, Err(MeshError::Connect(..))), "127.0.0.{i}");
        }
        assert!(pool.tunnels.lock().expect("lock").is_empty());
        assert!(pool.opening.lock().expect("lock").is_empty());
        // Cancelled half-way, too: a server that never answers the handshake.
        let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let pool = pool_to(silent.local_addr().expect("addr").port());
        let stalled = pool.checkout("127.0.0.1".parse().expect("ip"));
        let waited = tokio::time::timeout(Duration::from_millis(100), stalled).await;
        assert!(waited.is_err(), "the handshake cannot finish");
        assert!(pool.opening.lock().expect("lock").is_empty());
    }
}
