//! rustls configurations for mTLS between sidecars: TLS 1.3 only, HBONE's ALPN (`h2`), the current
//! identity presented on every handshake (so rotation applies to new handshakes), and
//! peers verified against the current trust bundle by chain and SPIFFE ID rather than
//! DNS name. Which identities may connect is decided after the handshake, from
//! [`peer_identity`], so one configuration serves every port and policy.

use std::sync::Arc;

use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, Error, SignatureScheme,
    client::{
        ResolvesClientCert,
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    },
    crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature},
    pki_types::{CertificateDer, ServerName, UnixTime},
    server::{
        ClientHello, ResolvesServerCert,
        danger::{ClientCertVerified, ClientCertVerifier},
    },
    sign::CertifiedKey,
};

use super::{IdentityStore, SpiffeId, certs::spiffe_id_of};

/// The crypto provider every configuration uses: TLS 1.3's AES-GCM suites (as
/// ztunnel offers them), AES-128 first. Both are as strong as the mesh needs, and
/// AES-128 takes 10 rounds to AES-256's 14: between two of our sidecars (the server
/// follows the client's order) bulk transfers cost less CPU. A ztunnel client, which
/// offers AES-256 first, gets AES-256.
pub fn provider() -> Arc<CryptoProvider> {
    use rustls::crypto::ring::cipher_suite::{TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384};
    let mut provider = rustls::crypto::ring::default_provider();
    provider.cipher_suites = vec![TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384];
    Arc::new(provider)
}

/// Server side of sidecar mTLS: requires a client certificate from the trust bundle;
/// `alpn` is the mesh protocol's.
pub fn server_config(
    store: Arc<IdentityStore>,
    provider: Arc<CryptoProvider>,
    alpn: &[u8],
) -> Result<Arc<rustls::ServerConfig>, Error> {
    let verifier = Arc::new(PeerVerifier {
        store: store.clone(),
        provider: provider.clone(),
    });
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(CurrentIdentity(store.clone())));
    config.alpn_protocols = vec![alpn.to_vec()];
    config.session_storage = super::resumption::server_sessions(store);
    Ok(Arc::new(config))
}

/// Client side of sidecar mTLS: presents our certificate, verifies the server's chain;
/// `alpn` is the mesh protocol's.
pub fn client_config(
    store: Arc<IdentityStore>,
    provider: Arc<CryptoProvider>,
    alpn: &[u8],
) -> Result<Arc<rustls::ClientConfig>, Error> {
    let verifier = Arc::new(PeerVerifier {
        store: store.clone(),
        provider: provider.clone(),
    });
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(Arc::new(CurrentIdentity(store.clone())));
    config.alpn_protocols = vec![alpn.to_vec()];
    // Peers are named by SPIFFE ID, not DNS: no SNI (as ztunnel sends none).
    config.enable_sni = false;
    config.resumption =
        rustls::client::Resumption::store(super::resumption::client_sessions(store));
    Ok(Arc::new(config))
}

/// The SPIFFE ID of the peer of an established connection (verified by the handshake).
pub fn peer_identity(conn: &rustls::CommonState) -> Option<SpiffeId> {
    let leaf = conn.peer_certificates()?.first()?;
    spiffe_id_of(leaf).ok().map(|(id, _)| id)
}

/// Why a resumed session must be refused: a resumption skips certificate checks, and
/// rustls does not bound a stateful session's age, so a peer whose certificate expired
/// could otherwise go on resuming. `None` for full handshakes (webpki checked the
/// validity) and for resumed ones whose certificate is still valid.
pub fn resumed_with_expired_certificate(conn: &rustls::CommonState) -> Option<String> {
    if conn.handshake_kind() != Some(rustls::HandshakeKind::Resumed) {
        return None;
    }
    let leaf = conn.peer_certificates()?.first()?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    super::certs::check_validity(leaf, now)
        .err()
        .map(|reason| format!("resumed session: {reason}"))
}

/// Presents whatever identity the store holds now.
#[derive(Debug)]
struct CurrentIdentity(Arc<IdentityStore>);

impl std::fmt::Debug for IdentityStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "IdentityStore({})", self.current().id)
    }
}

impl ResolvesServerCert for CurrentIdentity {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.current().certified_key.clone())
    }
}

impl ResolvesClientCert for CurrentIdentity {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.current().certified_key.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Verifies a peer's chain against the current bundle and that it carries a SPIFFE ID.
#[derive(Debug)]
struct PeerVerifier {
    store: Arc<IdentityStore>,
    provider: Arc<CryptoProvider>,
}

impl PeerVerifier {
    fn verify(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        usage: webpki::KeyUsage,
    ) -> Result<(), Error> {
        let identity = self.store.current();
        let (id, _) = spiffe_id_of(end_entity).map_err(|_| {
            Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure)
        })?;
        // The chain must lead to the bundle of the certificate's own trust domain: a CA
        // trusted for one trust domain cannot vouch for IDs of another.
        let Some(roots) = identity.roots_for(id.trust_domain()) else {
            return Err(Error::InvalidCertificate(CertificateError::Other(
                rustls::OtherError(Arc::new(UnknownTrustDomain(id.trust_domain().into()))),
            )));
        };
        let cert = webpki::EndEntityCert::try_from(end_entity)
            .map_err(|_| Error::InvalidCertificate(CertificateError::BadEncoding))?;
        cert.verify_for_usage(
            self.provider.signature_verification_algorithms.all,
            roots,
            intermediates,
            now,
            usage,
            None,
            None,
        )
        .map_err(webpki_error)?;
        Ok(())
    }
}

/// A peer certificate of a trust domain with no bundle configured.
#[derive(Debug, thiserror::Error)]
#[error("no trust bundle is configured for trust domain {0}")]
struct UnknownTrustDomain(String);

fn webpki_error(e: webpki::Error) -> Error {
    use webpki::Error as E;
    let cert = match e {
        E::CertExpired { .. } => CertificateError::Expired,
        E::CertNotValidYet { .. } => CertificateError::NotValidYet,
        E::UnknownIssuer => CertificateError::UnknownIssuer,
        E::InvalidSignatureForPublicKey => CertificateError::BadSignature,
        E::CertRevoked => CertificateError::Revoked,
        _ => CertificateError::Other(rustls::OtherError(Arc::new(e))),
    };
    Error::InvalidCertificate(cert)
}

/// The handshake-signature methods both verifier traits share, checked with the
/// provider's algorithms.
macro_rules! signature_checks {
    () => {
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, Error> {
            verify_tls12_signature(
                message,
                cert,
                dss,
                &self.provider.signature_verification_algorithms,
            )
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, Error> {
            verify_tls13_signature(
                message,
                cert,
                dss,
                &self.provider.signature_verification_algorithms,
            )
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.provider
                .signature_verification_algorithms
                .supported_schemes()
        }
    };
}

impl ServerCertVerifier for PeerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        // Sidecars name each other by SPIFFE ID, not DNS: the caller checks the ID
        // against what it expects once the handshake is done.
        self.verify(
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
        )?;
        Ok(ServerCertVerified::assertion())
    }

    signature_checks!();
}

impl ClientCertVerifier for PeerVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        self.verify(
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::client_auth(),
        )?;
        Ok(ClientCertVerified::assertion())
    }

    signature_checks!();
}
