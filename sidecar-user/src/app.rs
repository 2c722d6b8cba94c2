//! Wiring: [`build`] binds every listener and attaches the kernel programs, returning
//! a [`Bound`] that holds all of it; [`Bound::run`] serves until a signal, then drains
//! and detaches. Building fails on anything wrong; running does not fail on config.

use std::{
    net::SocketAddr,
    path::Path,
    sync::{Arc, atomic::Ordering},
    time::Instant,
};

use tokio::{net::TcpListener, signal::unix::SignalKind, task::JoinSet};
use tracing::{info, warn};

use crate::{
    admin::{self, AdminState, Surface},
    config::Config,
    drain::{self, DrainOutcome},
    ebpf::{Capture, CaptureError, KernelMaps, metrics::KernelCollector},
    kubernetes::{self, metrics::DiscoveryMetrics, translate::Rules},
    mesh::{
        MeshConnector,
        hbone::{self, Pool, Settings as HboneSettings, metrics::HboneMetrics},
        peer_policy::PeerPolicy,
    },
    metrics::Metrics,
    proxy::{
        admission::InboundPolicy,
        conn::{self, Inputs},
        connections::ConnTable,
        gate::Gate,
        listener::{self, BindError},
        metrics::ProxyMetrics,
        pod_addrs::PodAddrs,
        socket_opts::DeadPeer,
        tunnel::{self, TunnelServer},
    },
    service::{
        Services,
        discovery::{ConfigSource, Discovery, DiscoveryStats},
        metrics::ServiceCollector,
    },
    tls::{IdentityFiles, IdentityStore, rustls_config},
};

/// Trust domain of discovered identities when neither `kubernetes.trust_domain` nor a
/// workload identity names one (Istio's default).
const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

/// Why the sidecar could not start.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The workload identity files could not be loaded (the file is named).
    #[error("loading the workload identity: {0}")]
    Identity(#[from] crate::tls::CertError),
    /// The pin folder could not be used.
    #[error(transparent)]
    Pins(#[from] crate::ebpf::pins::PinError),
    /// The TLS configuration could not be built.
    #[error("building the TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    /// A listener could not be bound (the address is named).
    #[error(transparent)]
    Bind(#[from] BindError),
    /// The kernel programs could not be loaded or attached.
    #[error(transparent)]
    Capture(#[from] CaptureError),
    /// The pod's interfaces could not be listed.
    #[error("listing the pod's addresses: {0}")]
    PodAddrs(std::io::Error),
}

/// Every address the sidecar listens on.
#[derive(Clone, Debug)]
pub struct BoundAddrs {
    /// Outbound listeners (captured connects land here).
    pub outbound: Vec<SocketAddr>,
    /// Inbound listeners (`sk_lookup` steers here), when inbound capture is on.
    pub inbound: Vec<SocketAddr>,
    /// Loopback-only admin listener.
    pub admin: SocketAddr,
    /// Health listener on the pod IP.
    pub health: SocketAddr,
    /// HBONE listener on every pod address, when an identity is configured.
    pub hbone: Option<SocketAddr>,
}

/// A started-but-not-serving sidecar: listeners bound, programs attached.
pub struct Bound {
    /// Where it listens.
    pub addrs: BoundAddrs,
    config: Config,
    capture: Capture,
    kernel: Arc<KernelMaps>,
    outbound: Vec<std::net::TcpListener>,
    inbound: Vec<std::net::TcpListener>,
    identity: Option<LoadedIdentity>,
    admin: std::net::TcpListener,
    health: std::net::TcpListener,
    hbone: Option<std::net::TcpListener>,
    source: Option<ConfigSource>,
    app_probes: crate::app_health::AppProbes,
    pod: PodAddrs,
}

/// The workload identity and what its rotation watcher needs.
struct LoadedIdentity {
    store: Arc<IdentityStore>,
    files: IdentityFiles,
    provider: Arc<rustls::crypto::CryptoProvider>,
    reload_interval: std::time::Duration,
}

/// Binds the listeners, then loads and attaches the programs to `cgroup`. Listeners
/// come first so that a redirected connect always finds one.
pub fn build(config: Config, cgroup: &Path) -> Result<Bound, BuildError> {
    let admin = listener::bind(config.admin.address, "admin.address")?;
    let health = listener::bind(config.health.address, "health.address")?;
    let outbound = config
        .outbound_addrs()
        .into_iter()
        .map(|addr| listener::bind(addr, "proxy.outbound_port"))
        .collect::<Result<Vec<_>, _>>()?;
    let inbound = if config.inbound.enabled {
        config
            .inbound_addrs()
            .into_iter()
            .map(|addr| listener::bind(addr, "inbound.port"))
            .collect::<Result<Vec<_>, _>>()?
    } else {
        Vec::new()
    };
    // Every pod address, both families (never captured: a sidecar port).
    let hbone_addr = SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, config.mesh.hbone.port));
    let hbone = match config.identity {
        Some(_) => Some(listener::bind(hbone_addr, "mesh.hbone.port")?),
        None => None,
    };
    let local = |l: &std::net::TcpListener, addr: SocketAddr| l.local_addr().unwrap_or(addr);
    let addrs = BoundAddrs {
        outbound: outbound
            .iter()
            .zip(config.outbound_addrs())
            .map(|(l, a)| local(l, a))
            .collect(),
        inbound: inbound
            .iter()
            .zip(config.inbound_addrs())
            .map(|(l, a)| local(l, a))
            .collect(),
        admin: local(&admin, config.admin.address),
        health: local(&health, config.health.address),
        hbone: hbone.as_ref().map(|l| local(l, hbone_addr)),
    };
    // Identity first: a bad certificate must stop startup before anything attaches.
    let identity = match &config.identity {
        Some(c) => {
            let files = IdentityFiles {
                cert: c.cert.clone(),
                key: c.key.clone(),
                bundle: c.bundle.clone(),
                federated: c
                    .federated_bundles
                    .iter()
                    .map(|(td, path)| (td.clone(), path.clone()))
                    .collect(),
            };
            let provider = rustls_config::provider();
            let store = Arc::new(IdentityStore::load(&files, &provider)?);
            tracing::info!(id = %store.current().id, serial = %store.current().serial, "workload identity loaded");
            Some(LoadedIdentity {
                store,
                files,
                provider,
                reload_interval: c.reload_interval,
            })
        }
        None => None,
    };
    let mut capture = Capture::load(&config)?;
    if config.pins.enabled {
        // The folder first: it checks (or mounts) the bpffs the collection reads.
        let pins = crate::ebpf::pins::PinDir::for_cgroup(&config.pins.dir, cgroup)?;
        for path in crate::ebpf::pins::collect_garbage(&config.pins.dir, cgroup) {
            tracing::info!(path = %path.display(), "removed stale pins (a cgroup that no longer exists, or links detached by a clean stop)");
        }
        tracing::info!(dir = %pins.path().display(), "links are pinned: capture outlives a crash");
        capture.use_pins(pins);
    }
    capture.attach(cgroup)?;
    if !inbound.is_empty() {
        capture.attach_inbound(&inbound)?;
    }
    capture.prune_pins()?;
    let kernel = Arc::new(capture.kernel_maps()?);
    let pod = PodAddrs::detect().map_err(BuildError::PodAddrs)?;
    tracing::info!(addresses = ?pod.all(), "pod addresses");
    Ok(Bound {
        pod,
        addrs,
        config,
        capture,
        kernel,
        outbound,
        inbound,
        identity,
        admin,
        health,
        hbone,
        source: None,
        app_probes: Default::default(),
    })
}

// === impl Bound ===

impl Bound {
    /// Answers `/app-health/...` on the health listener with these app probes.
    pub fn with_app_probes(mut self, probes: crate::app_health::AppProbes) -> Self {
        self.app_probes = probes;
        self
    }

    /// Reloads services from `source` when the file changes.
    pub fn watch_config(mut self, source: ConfigSource) -> Self {
        self.source = Some(source);
        self
    }

    /// Starts the runtime and serves until SIGTERM or SIGINT, then drains and detaches.
    pub fn run(self) -> std::io::Result<()> {
        crate::process::release_startup_memory();
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(self.config.proxy.worker_threads)
            .thread_name("sidecar-worker")
            .enable_all()
            .build()?
            .block_on(self.serve())
    }

    async fn serve(self) -> std::io::Result<()> {
        let Bound {
            addrs,
            config,
            mut capture,
            kernel,
            outbound,
            inbound,
            identity,
            admin,
            health,
            hbone,
            source,
            app_probes,
            pod,
        } = self;
        if let Some(logger) = capture.take_logger() {
            tokio::spawn(crate::ebpf::logs::forward(logger));
        }
        let mut terminate = tokio::signal::unix::signal(SignalKind::terminate())?;
        let mut interrupt = tokio::signal::unix::signal(SignalKind::interrupt())?;

        let mut metrics = Metrics::new();
        let proxy_metrics = ProxyMetrics::register(
            &mut metrics,
            config.metrics.max_peer_identities,
            config.metrics.max_services,
        );
        let services = Arc::new(Services::new(&config));
        let discovery_stats = Arc::new(DiscoveryStats::default());
        ServiceCollector::register(
            services.clone(),
            discovery_stats.clone(),
            metrics.registry_mut(),
        );
        KernelCollector::register(kernel.clone(), metrics.registry_mut());
        if let Some(id) = &identity {
            crate::tls::metrics::IdentityCollector::register(
                id.store.clone(),
                metrics.registry_mut(),
            );
        }
        metrics.registry_mut().register_collector(Box::new(
            crate::ebpf::held_links::CaptureCollector(capture.held_links()),
        ));
        let unauthenticated = Gate::unauthenticated(
            config.inbound.max_unauthenticated,
            config.inbound.max_unauthenticated_per_client,
        );
        unauthenticated.register(metrics.registry_mut());
        let hbone_connections = Gate::hbone(
            config.inbound.max_hbone_connections,
            config.inbound.max_hbone_connections_per_client,
        );
        hbone_connections.register(metrics.registry_mut());
        let connections = Arc::new(ConnTable::default());
        let hbone_metrics = Arc::new(HboneMetrics::default());
        hbone_metrics.register(metrics.registry_mut());
        let kube_metrics = Arc::new(DiscoveryMetrics::default());
        if config.kubernetes.enabled {
            kube_metrics.register(metrics.registry_mut());
        }
        let hbone_settings = HboneSettings::new(&config.mesh.hbone, config.proxy.worker_threads);
        let state = Arc::new(AdminState {
            ready: false.into(),
            metrics,
            connections: connections.clone(),
            links: capture.held_links(),
            kernel: kernel.clone(),
            services: services.clone(),
            app_probes,
            cgroup: capture.cgroup().to_owned(),
            started: Instant::now(),
            pool: Default::default(),
        });
        let admin = tokio::spawn(admin::serve(
            TcpListener::from_std(admin)?,
            Surface::Admin,
            state.clone(),
        ));
        let health = tokio::spawn(admin::serve(
            TcpListener::from_std(health)?,
            Surface::Health,
            state.clone(),
        ));

        let (tunnel_server, mesh, connector) = match &identity {
            Some(id) => {
                tokio::spawn(id.store.clone().watch(
                    id.files.clone(),
                    id.provider.clone(),
                    id.reload_interval,
                ));
                let server = rustls_config::server_config(
                    id.store.clone(),
                    id.provider.clone(),
                    hbone::ALPN,
                )
                .map_err(std::io::Error::other)?;
                let client = rustls_config::client_config(
                    id.store.clone(),
                    id.provider.clone(),
                    hbone::ALPN,
                )
                .map_err(std::io::Error::other)?;
                let pool = Pool::new(
                    tokio_rustls::TlsConnector::from(client),
                    id.store.clone(),
                    hbone_settings.clone(),
                    hbone_metrics.clone(),
                );
                let connector = MeshConnector {
                    pool,
                    policy: PeerPolicy::new(&config, id.store.current().id.trust_domain()),
                };
                let mesh = conn::Mesh {
                    cidrs: config.mesh.cidrs.clone(),
                    client: connector.clone(),
                };
                let tunnel_server = TunnelServer {
                    acceptor: tokio_rustls::TlsAcceptor::from(server),
                    settings: hbone_settings.clone(),
                    peers: connector.policy.clone(),
                    metrics: hbone_metrics.clone(),
                    store: id.store.clone(),
                };
                (Some(Arc::new(tunnel_server)), Some(mesh), Some(connector))
            }
            None => (None, None, None),
        };
        if let Some(connector) = &connector {
            let _ = state.pool.set(connector.pool.clone());
        }
        let peers = connector.as_ref().map(|c| c.policy.clone());
        let synced = match config.kubernetes.enabled {
            true => {
                let client = kubernetes::client(&config.kubernetes)
                    .await
                    .map_err(std::io::Error::other)?;
                let rules = Rules {
                    trust_domain: config
                        .kubernetes
                        .trust_domain
                        .clone()
                        .or_else(|| {
                            let id = identity.as_ref()?;
                            Some(id.store.current().id.trust_domain().to_string())
                        })
                        .unwrap_or_else(|| DEFAULT_TRUST_DOMAIN.to_string()),
                    zone: config.kubernetes.zone.clone(),
                    pod_ips: pod.all().to_vec(),
                    plaintext: config.kubernetes.plaintext,
                    limits: config.kubernetes.limits,
                };
                Some(kubernetes::start(
                    client,
                    &config.kubernetes,
                    rules,
                    services.clone(),
                    kube_metrics,
                ))
            }
            false => None,
        };
        let discovery = Discovery::start(&config, services.clone(), discovery_stats, connector);
        let watcher_task =
            source.map(|source| tokio::spawn(discovery.watch(source, config.clone())));
        let (trigger, watcher) = drain::channel();
        let inputs = Arc::new(Inputs {
            kernel,
            own_ports: config.own_ports().to_vec(),
            connect_timeout: config.proxy.connect_timeout,
            timeouts: crate::proxy::copy::Timeouts {
                idle: config.proxy.idle_timeout,
                half_closed: config.proxy.half_close_timeout,
            },
            metrics: proxy_metrics,
            connections,
            inbound: InboundPolicy::new(&config),
            hbone_port: config.mesh.hbone.port,
            handshake_timeout: config.inbound.handshake_timeout,
            mesh,
            services,
            pod,
            dead_peer: DeadPeer::new(&config.proxy),
            unauthenticated,
            hbone_connections,
            peers,
            synced: synced.clone(),
        });
        let mut accept_loops = JoinSet::new();
        for listener in outbound {
            let listener = TcpListener::from_std(listener)?;
            let serve = crate::proxy::outbound::serve(listener, inputs.clone(), watcher.clone());
            accept_loops.spawn(serve);
        }
        for listener in inbound {
            let listener = TcpListener::from_std(listener)?;
            let serve = crate::proxy::inbound::serve(listener, inputs.clone(), watcher.clone());
            accept_loops.spawn(serve);
        }
        if let (Some(listener), Some(server)) = (hbone, tunnel_server) {
            let listener = TcpListener::from_std(listener)?;
            let serve = tunnel::serve(listener, inputs.clone(), server, watcher.clone());
            accept_loops.spawn(serve);
        }
        // Ready once listening and, with discovery, once the cluster is listed.
        let ready = tokio::spawn({
            let state = state.clone();
            async move {
                if let Some(synced) = synced {
                    synced.synced().await;
                }
                state.ready.store(true, Ordering::SeqCst);
            }
        });
        info!(
            outbound = ?addrs.outbound,
            inbound = ?addrs.inbound,
            hbone = ?addrs.hbone,
            admin = %addrs.admin,
            health = %addrs.health,
            cgroup = %capture.cgroup().display(),
            "sidecar ready: capture attached"
        );

        let signal = tokio::select! {
            _ = terminate.recv() => "SIGTERM",
            _ = interrupt.recv() => "SIGINT",
        };
        info!(signal, grace = ?config.proxy.drain_timeout, "draining: listeners closing");
        ready.abort();
        state.ready.store(false, Ordering::SeqCst);
        let outcome = trigger.drain(config.proxy.drain_timeout).await;
        accept_loops.join_all().await;
        match outcome {
            DrainOutcome::Completed => info!("drained: every connection finished"),
            DrainOutcome::Forced(open) => {
                warn!(open, "drain timeout: closed remaining connections")
            }
        }
        let cgroup = capture.cgroup().to_owned();
        capture.detach();
        info!(cgroup = %cgroup.display(), "programs detached");
        admin.abort();
        health.abort();
        if let Some(task) = watcher_task {
            task.abort();
        }
        Ok(())
    }
}
