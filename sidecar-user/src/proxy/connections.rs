//! The table of open connections behind `GET /connections`: who, where, bytes, age,
//! and the kernel's view of the upstream socket (`TCP_INFO`).

use std::{
    collections::HashMap,
    net::SocketAddr,
    os::fd::RawFd,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::Instant,
};

use serde::{Deserialize, Serialize};

use crate::{
    mesh::hbone::tunnel::SharedSocket,
    proxy::{Direction, copy::Transfer},
};

/// Open connections, keyed by a process-unique id.
///
/// The table's lock is held only to insert, remove or clone the entries' handles:
/// `/connections` reads `TCP_INFO` afterwards, under each entry's own lock, so a view
/// of thousands of connections never holds up the accepts and closes of the data
/// path (each waits at most for one `getsockopt` on its own socket).
#[derive(Default)]
pub struct ConnTable {
    next_id: AtomicU64,
    open: Mutex<HashMap<u64, Arc<Slot>>>,
}

/// A table entry and the upstream socket it may still read, `None` once the
/// connection is closing.
struct Slot {
    entry: Entry,
    fd: Mutex<Option<RawFd>>,
}

/// What the table keeps per connection.
pub struct Entry {
    /// inbound / outbound.
    pub direction: Direction,
    /// The initiator's address as the proxy saw it.
    pub client: SocketAddr,
    /// Where the initiator meant to go.
    pub orig_dst: SocketAddr,
    /// Where the proxy actually connected.
    pub endpoint: SocketAddr,
    /// Peer SPIFFE ID, if mTLS identified one.
    pub peer_identity: Option<String>,
    /// Whether the connection uses mTLS.
    pub tls: bool,
    /// When it was accepted.
    pub started: Instant,
    /// Live byte counts.
    pub transfer: Arc<Transfer>,
    /// The upstream socket, for `TCP_INFO`, when the connection has one of its own
    /// (not an HBONE stream). Removed from the table before it closes.
    pub upstream_fd: Option<RawFd>,
    /// An outbound HBONE stream's: the socket of the pooled connection carrying it.
    pub shared_socket: Option<Arc<SharedSocket>>,
}

/// Removes its connection from the table when dropped.
pub struct Registration {
    table: Arc<ConnTable>,
    id: u64,
}

/// One open connection, as `/connections` returns it.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
#[allow(missing_docs)]
pub struct ConnView {
    pub id: u64,
    pub direction: String,
    pub client: SocketAddr,
    pub orig_dst: SocketAddr,
    pub endpoint: SocketAddr,
    pub peer_identity: Option<String>,
    pub tls: bool,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub age_seconds: f64,
    pub tcp: Option<TcpState>,
}

/// The kernel's state of the upstream socket (`shared`: the pooled HBONE
/// connection's, which the stream shares with the connection's other streams).
#[derive(Debug, Serialize, Deserialize, PartialEq)]
#[allow(missing_docs)]
pub struct TcpState {
    #[serde(default)]
    pub shared: bool,
    pub state: String,
    pub rtt_us: u32,
    pub rtt_var_us: u32,
    pub retransmits: u32,
    pub total_retransmits: u32,
}

// === impl ConnTable ===

impl ConnTable {
    /// Adds `entry`; it stays until the returned registration is dropped.
    pub fn register(self: &Arc<Self>, entry: Entry) -> Registration {
        let id = self.next_id.fetch_add(1, Relaxed) + 1;
        let fd = Mutex::new(entry.upstream_fd);
        self.lock().insert(id, Arc::new(Slot { entry, fd }));
        Registration {
            table: self.clone(),
            id,
        }
    }

    /// Every open connection, oldest first.
    pub fn snapshot(&self) -> Vec<ConnView> {
        let slots: Vec<(u64, Arc<Slot>)> = self
            .lock()
            .iter()
            .map(|(&id, slot)| (id, slot.clone()))
            .collect();
        let mut views: Vec<ConnView> = slots
            .into_iter()
            .map(|(id, slot)| {
                let e = &slot.entry;
                // The fd is read under the slot's lock, which the registration takes
                // (and clears) before its socket closes: it is still open here.
                let fd = slot.fd.lock().unwrap_or_else(|p| p.into_inner());
                ConnView {
                    id,
                    direction: e.direction.as_str().to_string(),
                    client: e.client,
                    orig_dst: e.orig_dst,
                    endpoint: e.endpoint,
                    peer_identity: e.peer_identity.clone(),
                    tls: e.tls,
                    bytes_sent: e.transfer.sent.load(Relaxed),
                    bytes_received: e.transfer.received.load(Relaxed),
                    age_seconds: e.started.elapsed().as_secs_f64(),
                    tcp: fd.and_then(tcp_info).or_else(|| {
                        let shared = e.shared_socket.as_ref()?.with_fd(tcp_info)?;
                        Some(TcpState {
                            shared: true,
                            ..shared
                        })
                    }),
                }
            })
            .collect();
        views.sort_by_key(|v| v.id);
        views
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Slot>>> {
        self.open
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let slot = self.table.lock().remove(&self.id);
        // A snapshot may still hold the slot: stop it reading the fd before the
        // socket closes (waits for at most one getsockopt in progress).
        if let Some(slot) = slot {
            *slot.fd.lock().unwrap_or_else(|p| p.into_inner()) = None;
        }
    }
}

/// `getsockopt(TCP_INFO)` on `fd`.
fn tcp_info(fd: RawFd) -> Option<TcpState> {
    // SAFETY: `tcp_info` is plain data; the kernel writes at most `len` bytes.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: valid pointers to `info` and `len`; `fd` is open (see `snapshot`).
    let ret = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&raw mut info).cast(),
            &mut len,
        )
    };
    if ret != 0 {
        return None;
    }
    Some(TcpState {
        shared: false,
        state: tcp_state_name(info.tcpi_state).to_string(),
        rtt_us: info.tcpi_rtt,
        rtt_var_us: info.tcpi_rttvar,
        retransmits: u32::from(info.tcpi_retransmits),
        total_retransmits: info.tcpi_total_retrans,
    })
}

fn tcp_state_name(state: u8) -> &'static str {
    match state {
        1 => "established",
        2 => "syn_sent",
        3 => "syn_recv",
        4 => "fin_wait1",
        5 => "fin_wait2",
        6 => "time_wait",
        7 => "close",
        8 => "close_wait",
        9 => "last_ack",
        10 => "listen",
        11 => "closing",
        _ => "unknown",
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd;

    use super::*;

    #[test]
    fn registration_lives_as_long_as_its_guard_and_reads_tcp_info() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let stream =
            std::net::TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let table = Arc::new(ConnTable::default());
        let transfer = Arc::new(Transfer::default());
        transfer.sent.fetch_add(5, Relaxed);
        let reg = table.register(Entry {
            direction: Direction::Outbound,
            client: "127.0.0.1:1000".parse().expect("addr"),
            orig_dst: "198.18.0.2:80".parse().expect("addr"),
            endpoint: "198.18.0.2:80".parse().expect("addr"),
            peer_identity: None,
            tls: false,
            started: Instant::now(),
            transfer,
            upstream_fd: Some(stream.as_raw_fd()),
            shared_socket: None,
        });
        let views = table.snapshot();
        assert_eq!(views.len(), 1);
        assert_eq!(views[0].bytes_sent, 5);
        assert_eq!(
            views[0].tcp.as_ref().map(|t| t.state.as_str()),
            Some("established")
        );
        assert!(views[0].tcp.as_ref().is_some_and(|t| t.rtt_us > 0));
        drop(reg);
        assert!(table.snapshot().is_empty());
    }

    #[test]
    fn an_hbone_stream_shows_its_pooled_connection_s_socket_until_it_closes() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let stream =
            std::net::TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let socket = Arc::new(SharedSocket::of(&stream));
        let table = Arc::new(ConnTable::default());
        let _reg = table.register(Entry {
            direction: Direction::Outbound,
            client: "127.0.0.1:1000".parse().expect("addr"),
            orig_dst: "198.18.0.2:80".parse().expect("addr"),
            endpoint: "198.18.0.2:15008".parse().expect("addr"),
            peer_identity: Some("spiffe://cluster.local/ns/shop/sa/db".into()),
            tls: true,
            started: Instant::now(),
            transfer: Arc::default(),
            upstream_fd: None,
            shared_socket: Some(socket.clone()),
        });
        let tcp = table.snapshot().remove(0).tcp.expect("tcp info");
        assert!(tcp.shared);
        assert_eq!(tcp.state, "established");
        // The connection ended: nothing is read from its (duplicate) descriptor.
        socket.close();
        assert_eq!(table.snapshot()[0].tcp, None);
    }
}
