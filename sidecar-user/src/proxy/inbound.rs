//! Inbound: `sk_lookup` handed the connection to our listener; the socket's own local
//! address (`getsockname`) is the address the client dialed. The port's policy comes
//! first ([`super::admission`]: detection, mTLS, allow-list, within the cap on
//! unauthenticated connections); then the proxy delivers to the pod IP and port, never
//! to loopback (an app bound only to 127.0.0.1 stays unreachable from outside, as
//! without a sidecar), and tells a client sidecar whether the application took it.

use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, warn};

use crate::{
    drain::DrainWatcher,
    mesh::server::send_status,
    proxy::{
        CloseReason, Direction, OrigDstAddr,
        addr::unmap,
        conn::{self, Conn, ConnError, Connected, Downstream, Inputs},
    },
};

/// Accepts steered connections on `listener` until a drain starts.
pub async fn serve(listener: TcpListener, inputs: Arc<Inputs>, drain: DrainWatcher) {
    conn::accept_loop(listener, Direction::Inbound, inputs, drain, handle).await;
}

async fn handle(mut conn: Conn, client: TcpStream) {
    let inputs = conn.inputs.clone();
    // Inbound clients are other hosts: dead ones must be noticed.
    inputs.dead_peer.apply(&client);
    let port = client.local_addr().map(|a| a.port()).unwrap_or(0);
    // Held until the client has proved who it is (or was refused).
    let pass = if inputs.inbound.authenticates(port) {
        match inputs.unauthenticated.enter(conn.client.0.ip()) {
            Ok(pass) => Some(pass),
            Err(limit) => {
                conn.recorder.label(None);
                conn.recorder.set_reason(CloseReason::Overflow);
                debug!(
                    port,
                    limit = limit.as_str(),
                    "too many unauthenticated connections: reset"
                );
                let _ = client.set_zero_linger();
                return;
            }
        }
    } else {
        None
    };
    let mut down = match inputs.inbound.admit(port, client).await {
        Ok(down) => down,
        Err((refusal, io)) => {
            conn.recorder.label_refused(refusal.identity());
            conn.recorder.set_reason(refusal.reason());
            warn!(%refusal, port, "refusing inbound connection");
            if let Some(io) = io {
                let _ = io.set_zero_linger();
            }
            return;
        }
    };
    drop(pass);
    let connected = deliver(&conn, down.tcp()).await;
    // A client sidecar waits for our status byte before sending anything: tell it
    // whether the application took the connection.
    if let Downstream::Mtls(tls, _) = &mut down {
        send_status(&mut **tls, connected.is_ok()).await;
    }
    conn.carry(down, connected).await;
}

/// Connects to the application at the address the client dialed.
async fn deliver(conn: &Conn, client: &TcpStream) -> Result<Connected, ConnError> {
    let inputs = &conn.inputs;
    let local = client.local_addr().map_err(ConnError::OrigDstLookup)?;
    let dst = OrigDstAddr(unmap(local));
    // Never steered to the sidecar's own ports: such a destination would loop.
    if inputs.own_ports.contains(&dst.0.port()) {
        return Err(ConnError::Loop(dst));
    }
    conn.connect_direct(dst, None).await
}
