//! Inbound on application ports: `sk_lookup` handed the connection to our listener;
//! the socket's own local address (`getsockname`) is the address the client dialed.
//! The port's mode comes first ([`super::admission`]: a strict port takes nothing
//! but HBONE, see [`super::tunnel`]); then the proxy delivers to the pod IP and port,
//! never to loopback (an app bound only to 127.0.0.1 stays unreachable from outside,
//! as without a sidecar).

use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};

use crate::{
    drain::DrainWatcher,
    proxy::{
        Direction, OrigDstAddr,
        addr::unmap,
        conn::{self, Conn, ConnError, Connected, Downstream, Inputs},
    },
};

/// Accepts steered connections on `listener` until a drain starts.
pub async fn serve(listener: TcpListener, inputs: Arc<Inputs>, drain: DrainWatcher) {
    conn::accept_loop(listener, Direction::Inbound, inputs, drain, handle).await;
}

async fn handle(conn: Conn, client: TcpStream) {
    let inputs = conn.inputs.clone();
    // Inbound clients are other hosts: dead ones must be noticed.
    inputs.dead_peer.apply(&client);
    let local = match client.local_addr() {
        Ok(local) => OrigDstAddr(unmap(local)),
        Err(e) => {
            let connected = Err(ConnError::OrigDstLookup(e));
            return conn.carry(Downstream::Plain(client), connected).await;
        }
    };
    let unauthenticated = inputs
        .peers
        .as_ref()
        .map_or(inputs.inbound.unauthenticated, |peers| {
            peers.allows_unauthenticated()
        });
    if let Err(refusal) =
        inputs
            .inbound
            .admit_direct(local.0.port(), inputs.hbone_port, unauthenticated)
    {
        let _ = client.set_zero_linger();
        let port = local.0.port();
        return conn.refused(
            None,
            &format_args!("{refusal} (port {port})"),
            refusal.reason(),
        );
    }
    let connected = deliver(&conn, local).await;
    conn.carry(Downstream::Plain(client), connected).await;
}

/// Connects to the application at `dst`, the address the client dialed.
pub async fn deliver(conn: &Conn, dst: OrigDstAddr) -> Result<Connected, ConnError> {
    // Never steered to the sidecar's own ports: such a destination would loop.
    if conn.inputs.own_ports.contains(&dst.0.port()) {
        return Err(ConnError::Loop(dst));
    }
    conn.connect_direct(dst, None).await
}
