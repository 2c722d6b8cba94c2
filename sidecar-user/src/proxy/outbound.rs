//! Outbound: the application's connect was redirected to the proxy by `connect4/6`;
//! the original destination comes from the kernel's table, keyed by the 4-tuple. A
//! service address is balanced over its endpoints ([`super::balance`]); any other
//! destination is reached directly, over the mesh protocol when it has a sidecar.

use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};

use crate::{
    drain::DrainWatcher,
    mesh::{MeshError, MeshTarget, server_identity::Required},
    proxy::{
        Direction, OrigDstAddr,
        addr::unmap,
        balance,
        conn::{self, Conn, ConnError, Connected, Downstream, Inputs},
    },
    service::Route,
};

/// Accepts redirected application connections on `listener` until a drain starts.
pub async fn serve(listener: TcpListener, inputs: Arc<Inputs>, drain: DrainWatcher) {
    conn::accept_loop(listener, Direction::Outbound, inputs, drain, handle).await;
}

async fn handle(mut conn: Conn, app: TcpStream) {
    let connected = connect(&mut conn, &app).await;
    conn.carry(Downstream::Plain(app), connected).await;
}

/// Finds where the application was going and connects there.
async fn connect(conn: &mut Conn, app: &TcpStream) -> Result<Connected, ConnError> {
    let inputs = conn.inputs.clone();
    let dst = original_destination(conn, app)?;
    if let Some(synced) = &inputs.synced {
        synced.wait().await.map_err(ConnError::NotSynced)?;
    }
    let snapshot = inputs.services.load_full();
    match snapshot.route(dst.0) {
        Route::Service(service) => {
            conn.recorder.set_service(service.name());
            return balance::connect(&inputs, &service, conn.client, dst).await;
        }
        Route::Denied => return Err(ConnError::NotInRegistry(dst)),
        Route::Passthrough => {}
    }
    let local = inputs.pod.is_self(dst.0.ip()) || inputs.own_ports.contains(&dst.0.port());
    // A pod discovery knows (a headless service's member, say): over HBONE to exactly
    // its service account's identity when it has a sidecar, else in plaintext (or
    // refused, under `kubernetes.plaintext: deny`), whatever `mesh.cidrs` says.
    if let Some(pod) = snapshot.workload(dst.0.ip()).filter(|_| !local) {
        if !pod.hbone {
            return match snapshot.plaintext_denied() {
                true => Err(ConnError::Plaintext(
                    dst,
                    format!("{}/{}", pod.pod.0, pod.pod.1),
                )),
                false => conn.connect_direct(dst, None).await,
            };
        }
        let Some(mesh) = inputs.mesh.as_ref() else {
            return Err(ConnError::Upstream(
                MeshError::Tls(dst.0, "no workload identity".into()).into(),
            ));
        };
        let target = MeshTarget {
            client: &mesh.client,
            expected: Some(Required::Pod(&pod.identity)),
        };
        return conn.connect_direct(dst, Some(target)).await;
    }
    let mesh = inputs
        .mesh
        .as_ref()
        .filter(|m| m.contains(dst.0.ip()))
        // The pod calling itself never leaves the pod: no sidecar answers there. A
        // peer sidecar's own ports (its health port, say) are plaintext by design.
        .filter(|_| !local)
        .map(|m| MeshTarget {
            client: &m.client,
            expected: None,
        });
    conn.connect_direct(dst, mesh).await
}

/// What the kernel recorded at the application's connect.
fn original_destination(conn: &Conn, app: &TcpStream) -> Result<OrigDstAddr, ConnError> {
    let inputs = &conn.inputs;
    let local = app.local_addr().map_err(ConnError::OrigDstLookup)?;
    // A connection reset while it waited in the accept queue has left the kernel's
    // hash, so its 4-tuple may already belong to a new connection from the same port,
    // whose original destination is the entry under that key: leave it to that one.
    if let Ok(Some(error)) = app.take_error() {
        return Err(ConnError::ClientGone(error));
    }
    let found = inputs.kernel.orig_dst.take(conn.client.0, local);
    inputs.metrics.orig_dst_lookup(matches!(found, Ok(Some(_))));
    let dst = match found {
        Ok(Some(dst)) => OrigDstAddr(unmap(dst)),
        Ok(None) => return Err(ConnError::NoOrigDst),
        Err(e) => return Err(ConnError::OrigDstLookup(e)),
    };
    // The kernel never redirects to the sidecar's ports: such a destination on
    // loopback would loop back into the sidecar.
    if inputs.own_ports.contains(&dst.0.port()) && dst.0.ip().is_loopback() {
        return Err(ConnError::Loop(dst));
    }
    Ok(dst)
}
