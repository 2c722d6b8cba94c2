//! HBONE, the mesh protocol: one HTTP/2 `CONNECT` stream per application connection,
//! over mTLS connections to port 15008 of the destination pod, pooled on the client
//! side. It is what Istio's ztunnel speaks (checked by hand against a real one both ways:
//! `tests/tests/ztunnel_interop.rs`).
//!
//! [`pool`] opens and reuses client connections ([`tunnel`]: one of them) and their
//! streams; [`server`] terminates them (the listener that delivers streams lives in
//! the proxy); [`stream`] turns a stream into bytes both ways; [`metrics`] counts
//! both.

pub mod metrics;
pub mod pool;
pub mod server;
pub mod stream;
pub mod tunnel;

use std::time::Duration;

use crate::config::HboneConfig;

pub use pool::Pool;
pub use stream::H2Stream;

/// The ALPN HBONE's mTLS negotiates: plain HTTP/2.
pub const ALPN: &[u8] = b"h2";

/// HTTP/2 flow-control window of each stream (ztunnel's).
const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
/// HTTP/2 flow-control window of a connection (ztunnel's).
const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
/// Largest HTTP/2 frame accepted (ztunnel's).
const MAX_FRAME: u32 = 1024 * 1024;
/// Largest header block accepted: a `CONNECT` needs a few hundred bytes.
const MAX_HEADER_LIST: u32 = 16 * 1024;
/// Bytes a stream may queue for sending: caps what one stream holds while its
/// window is shut (a slow reader on the other side).
const MAX_SEND_BUFFER: usize = 256 * 1024;

/// Settings both sides share.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Port of the HBONE listener on every pod.
    pub port: u16,
    /// Streams per pooled connection at most.
    pub max_streams: usize,
    /// Streams an inbound connection may carry at once.
    pub max_inbound_streams: u32,
    /// Pooled connections per destination at most.
    pub max_connections: usize,
    /// Connections overlapping streams are spread over before they share one.
    pub parallel: usize,
    /// Idle pooled connections close after this long.
    pub idle_timeout: Duration,
    /// PING interval.
    pub keepalive_interval: Duration,
    /// An unanswered PING closes the connection after this long.
    pub keepalive_timeout: Duration,
}

impl Settings {
    /// From the configuration; `workers` is the proxy's thread count.
    pub fn new(config: &HboneConfig, workers: usize) -> Self {
        Self {
            parallel: config
                .parallel_connections
                .unwrap_or(workers)
                .clamp(1, config.max_connections_per_destination),
            port: config.port,
            max_streams: config.max_streams_per_connection as usize,
            max_inbound_streams: config.max_inbound_streams_per_connection,
            max_connections: config.max_connections_per_destination,
            idle_timeout: config.idle_timeout,
            keepalive_interval: config.keepalive_interval,
            keepalive_timeout: config.keepalive_timeout,
        }
    }

    /// The HTTP/2 client a pooled connection runs.
    pub fn client(&self) -> h2::client::Builder {
        let mut b = h2::client::Builder::new();
        b.initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME)
            .max_header_list_size(MAX_HEADER_LIST)
            .initial_max_send_streams(self.max_streams)
            .max_send_buffer_size(MAX_SEND_BUFFER)
            .enable_push(false);
        b
    }

    /// The HTTP/2 server an inbound connection runs.
    pub fn server(&self) -> h2::server::Builder {
        let mut b = h2::server::Builder::new();
        b.initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME)
            .max_header_list_size(MAX_HEADER_LIST)
            .max_concurrent_streams(self.max_inbound_streams)
            .max_send_buffer_size(MAX_SEND_BUFFER);
        b
    }
}

/// Sends a PING every `interval` and resolves when one goes unanswered for
/// `timeout`: the connection is dead. Pending forever if PINGs cannot be sent.
pub async fn keepalive(ping: Option<h2::PingPong>, interval: Duration, timeout: Duration) {
    let Some(mut ping) = ping else {
        return std::future::pending().await;
    };
    loop {
        tokio::time::sleep(interval).await;
        match tokio::time::timeout(timeout, ping.ping(h2::Ping::opaque())).await {
            Ok(Ok(_)) => {}
            // The connection is closing anyway: let its own end report it.
            Ok(Err(_)) => return std::future::pending().await,
            Err(_) => return,
        }
    }
}
