//! Binding listeners before the runtime starts, with errors naming the address, and
//! accepting on them without ever giving up.

use std::{
    net::{SocketAddr, TcpListener},
    time::Duration,
};

use socket2::{Domain, Socket, Type};

/// Backlog of proxy listeners: captured connects complete in the kernel before the
/// proxy accepts them, so bursts of thousands queue here. Capped by `net.core.somaxconn`.
const BACKLOG: i32 = 4096;

/// A listener could not be bound.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr} ({what}): {source}")]
pub struct BindError {
    /// The address.
    pub addr: SocketAddr,
    /// Which listener.
    pub what: &'static str,
    /// The I/O error (`Address already in use`, ...).
    pub source: std::io::Error,
}

/// Binds a non-blocking TCP listener. An unspecified IPv6 address (`[::]`) listens
/// dual-stack; any other IPv6 address is IPv6-only (as the kernel makes it anyway).
pub fn bind(addr: SocketAddr, what: &'static str) -> Result<TcpListener, BindError> {
    bind_with(addr, what, addr.ip().is_unspecified())
}

/// The next connection on `listener`. An accept error (out of descriptors or
/// buffers) is logged and retried after a short back-off: a listener never stops.
pub async fn accept(listener: &tokio::net::TcpListener) -> (tokio::net::TcpStream, SocketAddr) {
    loop {
        match listener.accept().await {
            Ok(pair) => return pair,
            Err(error) => {
                let local = listener.local_addr().ok();
                tracing::warn!(%error, ?local, "accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

fn bind_with(
    addr: SocketAddr,
    what: &'static str,
    dual_stack: bool,
) -> Result<TcpListener, BindError> {
    let err = |source| BindError { addr, what, source };
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None).map_err(err)?;
    if addr.is_ipv6() {
        socket.set_only_v6(!dual_stack).map_err(err)?;
    }
    socket.set_reuse_address(true).map_err(err)?;
    socket.set_nonblocking(true).map_err(err)?;
    socket.bind(&addr.into()).map_err(err)?;
    socket.listen(BACKLOG).map_err(err)?;
    Ok(socket.into())
}
