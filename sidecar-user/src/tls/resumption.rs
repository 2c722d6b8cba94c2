//! TLS 1.3 session resumption scoped to the trust bundle it was established under.
//!
//! A resumed handshake proves only that both ends hold the session's secret: the
//! peer's certificate is not sent or checked again. So a peer whose CA was removed
//! from the bundle could keep resuming a session it made while still trusted. Both
//! stores here forget every session when the bundle changes: the next handshake is a
//! full one, checked against the new bundle.

use std::sync::{Arc, Mutex};

use rustls::{
    NamedGroup,
    client::{
        ClientSessionMemoryCache, ClientSessionStore, Tls12ClientSessionValue,
        Tls13ClientSessionValue,
    },
    pki_types::ServerName,
    server::{ServerSessionMemoryCache, StoresServerSessions},
};

use super::IdentityStore;

/// Sessions kept per store (rustls's default for servers).
const SESSIONS: usize = 256;

/// A session store that starts afresh whenever the current bundle differs from the one
/// its sessions were made under.
#[derive(Debug)]
pub struct BundleScoped<T> {
    identity: Arc<IdentityStore>,
    current: Mutex<(u64, Arc<T>)>,
    fresh: fn() -> Arc<T>,
}

impl<T> BundleScoped<T> {
    fn new(identity: Arc<IdentityStore>, fresh: fn() -> Arc<T>) -> Self {
        let bundle = identity.current().bundle_hash;
        Self {
            identity,
            current: Mutex::new((bundle, fresh())),
            fresh,
        }
    }

    /// The store for the current bundle (a new, empty one after a bundle change).
    fn store(&self) -> Arc<T> {
        let bundle = self.identity.current().bundle_hash;
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if current.0 != bundle {
            tracing::info!(
                "trust bundle changed: TLS sessions made under the old one are forgotten"
            );
            *current = (bundle, (self.fresh)());
        }
        current.1.clone()
    }
}

/// Server-side sessions scoped to the bundle.
pub fn server_sessions(identity: Arc<IdentityStore>) -> Arc<dyn StoresServerSessions> {
    Arc::new(BundleScoped::new(identity, || {
        ServerSessionMemoryCache::new(SESSIONS)
    }))
}

/// Client-side tickets scoped to the bundle.
pub fn client_sessions(identity: Arc<IdentityStore>) -> Arc<dyn ClientSessionStore> {
    Arc::new(BundleScoped::new(identity, || {
        Arc::new(ClientSessionMemoryCache::new(SESSIONS))
    }))
}

impl StoresServerSessions for BundleScoped<ServerSessionMemoryCache> {
    fn put(&self, key: Vec<u8>, value: Vec<u8>) -> bool {
        self.store().put(key, value)
    }

    fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.store().get(key)
    }

    fn take(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.store().take(key)
    }

    fn can_cache(&self) -> bool {
        true
    }
}

impl ClientSessionStore for BundleScoped<ClientSessionMemoryCache> {
    fn set_kx_hint(&self, server_name: ServerName<'static>, group: NamedGroup) {
        self.store().set_kx_hint(server_name, group);
    }

    fn kx_hint(&self, server_name: &ServerName<'_>) -> Option<NamedGroup> {
        self.store().kx_hint(server_name)
    }

    fn set_tls12_session(&self, server_name: ServerName<'static>, value: Tls12ClientSessionValue) {
        self.store().set_tls12_session(server_name, value);
    }

    fn tls12_session(&self, server_name: &ServerName<'_>) -> Option<Tls12ClientSessionValue> {
        self.store().tls12_session(server_name)
    }

    fn remove_tls12_session(&self, server_name: &ServerName<'static>) {
        self.store().remove_tls12_session(server_name);
    }

    fn insert_tls13_ticket(
        &self,
        server_name: ServerName<'static>,
        value: Tls13ClientSessionValue,
    ) {
        self.store().insert_tls13_ticket(server_name, value);
    }

    fn take_tls13_ticket(
        &self,
        server_name: &ServerName<'static>,
    ) -> Option<Tls13ClientSessionValue> {
        self.store().take_tls13_ticket(server_name)
    }
}
