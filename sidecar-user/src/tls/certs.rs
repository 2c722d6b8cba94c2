//! Loading a workload's certificate, key and trust bundle from files, and keeping the
//! current identity up to date when the files rotate.
//!
//! Kubernetes rotates a mounted Secret by writing a new timestamped directory and
//! atomically swapping the `..data` symlink that the visible file names point through;
//! cert-manager's CSI driver rewrites files. Polling the file contents catches both
//! (an inotify watch on the visible names would miss the symlink swap). A rotation that
//! does not load (unparsable file, key not matching the certificate) is rejected: the
//! previous identity stays in use and the error names the file.

use std::{
    hash::{Hash, Hasher},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use arc_swap::ArcSwap;
use rustls::{
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, TrustAnchor, pem::PemObject},
    sign::CertifiedKey,
};
use tracing::{error, info};

use super::identity::SpiffeId;

/// Where a workload's identity lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdentityFiles {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, SEC1 or PKCS#1: ECDSA P-256, Ed25519 or RSA).
    pub key: PathBuf,
    /// PEM trust bundle of the workload's own trust domain.
    pub bundle: PathBuf,
    /// PEM trust bundles of other trust domains (SPIFFE federation), by trust domain.
    pub federated: Vec<(String, PathBuf)>,
}

/// Why an identity could not be loaded. Each variant names the file at fault.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// A file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A file holds no usable PEM of the kind expected.
    #[error("{path}: {reason}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The key does not belong to the certificate.
    #[error("private key {key} does not match certificate {cert}")]
    KeyMismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
    },
    /// The certificate is expired or not yet valid.
    #[error("{path}: {reason}")]
    Validity {
        /// The certificate file.
        path: PathBuf,
        /// Which bound is violated, with the dates.
        reason: String,
    },
    /// The certificate carries no (or more than one) SPIFFE ID.
    #[error("{path}: {reason}")]
    Identity {
        /// The certificate file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// A loaded identity: what handshakes present and trust.
#[derive(Debug)]
pub struct Identity {
    /// The workload's SPIFFE ID (the leaf's URI SAN).
    pub id: SpiffeId,
    /// Chain and signing key, as rustls presents them.
    pub certified_key: Arc<CertifiedKey>,
    /// Trust anchors of the workload's own trust domain.
    pub roots: Vec<TrustAnchor<'static>>,
    /// Trust anchors of federated trust domains, by trust domain.
    pub federated: Vec<(String, Vec<TrustAnchor<'static>>)>,
    /// The leaf's serial number, lower-case hex.
    pub serial: String,
    /// When the leaf expires, in seconds since the Unix epoch.
    pub not_after: i64,
    /// A hash of the trust bundle's contents: TLS sessions made under one bundle are
    /// not resumed under another.
    pub bundle_hash: u64,
}

/// The current identity, swapped atomically on rotation.
pub struct IdentityStore {
    current: ArcSwap<Identity>,
    /// The current bundle's hash: connections verified under an older bundle end.
    bundles: tokio::sync::watch::Sender<u64>,
    /// Fingerprint of the files the current identity (or the last rejected rotation)
    /// was read from, taken before reading them so no change can slip between.
    seen: std::sync::atomic::AtomicU64,
}

// === impl Identity ===

impl Identity {
    /// Loads and cross-checks the three files.
    pub fn load(files: &IdentityFiles, provider: &CryptoProvider) -> Result<Self, CertError> {
        Self::load_at(files, provider, now_unix())
    }

    /// As [`Identity::load`], checking the certificate's validity at `now` (seconds
    /// since the Unix epoch).
    pub fn load_at(
        files: &IdentityFiles,
        provider: &CryptoProvider,
        now: i64,
    ) -> Result<Self, CertError> {
        let cert_pem = read(&files.cert)?;
        let key_pem = read(&files.key)?;
        let mut bundle_pem = read(&files.bundle)?;
        let mut identity = Self::from_pem(files, &cert_pem, &key_pem, &bundle_pem, provider, now)?;
        for (trust_domain, path) in &files.federated {
            let pem = read(path)?;
            identity
                .federated
                .push((trust_domain.clone(), anchors(path, &pem)?));
            bundle_pem.extend_from_slice(trust_domain.as_bytes());
            bundle_pem.extend_from_slice(&pem);
        }
        // Any bundle change (own or federated) ends resumption of older sessions.
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        bundle_pem.hash(&mut hasher);
        identity.bundle_hash = hasher.finish();
        Ok(identity)
    }

    /// The trust anchors a peer of `trust_domain` must chain to: the own bundle for the
    /// workload's trust domain, a federated one for another, none for the rest (a
    /// certificate is only as good as the bundle configured for its trust domain).
    pub fn roots_for(&self, trust_domain: &str) -> Option<&[TrustAnchor<'static>]> {
        if trust_domain == self.id.trust_domain() {
            return Some(&self.roots);
        }
        self.federated
            .iter()
            .find(|(td, _)| td == trust_domain)
            .map(|(_, roots)| roots.as_slice())
    }

    fn from_pem(
        files: &IdentityFiles,
        cert_pem: &[u8],
        key_pem: &[u8],
        bundle_pem: &[u8],
        provider: &CryptoProvider,
        now: i64,
    ) -> Result<Self, CertError> {
        let chain = certificates(&files.cert, cert_pem)?;
        let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| CertError::Pem {
            path: files.key.clone(),
            reason: format!("no usable private key: {e}"),
        })?;
        let signing_key =
            provider
                .key_provider
                .load_private_key(key)
                .map_err(|e| CertError::Pem {
                    path: files.key.clone(),
                    reason: format!("unsupported private key: {e}"),
                })?;
        let certified_key = CertifiedKey::new(chain.clone(), signing_key);
        if certified_key.keys_match().is_err() {
            return Err(CertError::KeyMismatch {
                cert: files.cert.clone(),
                key: files.key.clone(),
            });
        }
        let (id, serial) = spiffe_id_of(&chain[0]).map_err(|reason| CertError::Identity {
            path: files.cert.clone(),
            reason,
        })?;
        let not_after = check_validity(&chain[0], now).map_err(|reason| CertError::Validity {
            path: files.cert.clone(),
            reason,
        })?;
        let roots = anchors(&files.bundle, bundle_pem)?;
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        bundle_pem.hash(&mut hasher);
        Ok(Self {
            id,
            certified_key: Arc::new(certified_key),
            roots,
            serial,
            not_after,
            bundle_hash: hasher.finish(),
            federated: Vec::new(),
        })
    }
}

fn read(path: &Path) -> Result<Vec<u8>, CertError> {
    std::fs::read(path).map_err(|source| CertError::Read {
        path: path.to_owned(),
        source,
    })
}

/// The CA certificates of a bundle file as trust anchors.
fn anchors(path: &Path, pem: &[u8]) -> Result<Vec<TrustAnchor<'static>>, CertError> {
    certificates(path, pem)?
        .iter()
        .map(|der| {
            webpki::anchor_from_trusted_cert(der)
                .map(|a| a.to_owned())
                .map_err(|e| CertError::Pem {
                    path: path.to_owned(),
                    reason: format!("not a usable CA certificate: {e}"),
                })
        })
        .collect()
}

fn certificates(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CertError::Pem {
            path: path.to_owned(),
            reason: format!("unparsable PEM: {e}"),
        })?;
    if certs.is_empty() {
        return Err(CertError::Pem {
            path: path.to_owned(),
            reason: "no certificate in the file".into(),
        });
    }
    Ok(certs)
}

/// Seconds since the Unix epoch.
fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Checks that `cert` is valid at `now` (seconds since the epoch); returns its expiry.
/// The sidecar's own certificate is checked at load and on every rotation: presenting
/// an expired one would only make every peer refuse us.
pub fn check_validity(cert: &CertificateDer<'_>, now: i64) -> Result<i64, String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| format!("unparsable certificate: {e}"))?;
    let validity = parsed.validity();
    let (from, until) = (
        validity.not_before.timestamp(),
        validity.not_after.timestamp(),
    );
    if now < from {
        return Err(format!(
            "certificate is not valid before {} (now {})",
            validity.not_before,
            x509_parser::time::ASN1Time::from_timestamp(now)
                .map_or_else(|_| now.to_string(), |t| t.to_string())
        ));
    }
    if now > until {
        return Err(format!(
            "certificate expired at {} (now {})",
            validity.not_after,
            x509_parser::time::ASN1Time::from_timestamp(now)
                .map_or_else(|_| now.to_string(), |t| t.to_string())
        ));
    }
    Ok(until)
}

/// The SPIFFE ID (the single `spiffe://` URI SAN) and serial of a certificate.
pub fn spiffe_id_of(cert: &CertificateDer<'_>) -> Result<(SpiffeId, String), String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| format!("unparsable certificate: {e}"))?;
    let san = parsed
        .subject_alternative_name()
        .map_err(|e| format!("bad subjectAltName: {e}"))?
        .ok_or("certificate has no subjectAltName with a SPIFFE ID")?;
    let uris: Vec<&str> = san
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            x509_parser::extensions::GeneralName::URI(uri) if uri.starts_with("spiffe://") => {
                Some(*uri)
            }
            _ => None,
        })
        .collect();
    let [uri] = uris.as_slice() else {
        return Err(format!(
            "certificate must carry exactly one spiffe:// URI SAN, found {}",
            uris.len()
        ));
    };
    let id = uri.parse::<SpiffeId>().map_err(|e| e.to_string())?;
    let serial = parsed
        .raw_serial()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Ok((id, serial))
}

// === impl IdentityStore ===

impl IdentityStore {
    /// Loads `files` into a new store.
    pub fn load(files: &IdentityFiles, provider: &CryptoProvider) -> Result<Self, CertError> {
        Ok(Self::new(files, Identity::load(files, provider)?))
    }

    /// A store holding `identity`, loaded from `files`.
    pub fn new(files: &IdentityFiles, identity: Identity) -> Self {
        Self {
            bundles: tokio::sync::watch::Sender::new(identity.bundle_hash),
            current: ArcSwap::from_pointee(identity),
            seen: fingerprint(files).into(),
        }
    }

    /// The identity new handshakes use.
    pub fn current(&self) -> Arc<Identity> {
        self.current.load_full()
    }

    /// Replaces the identity for new handshakes. Connections already established
    /// keep running, unless the trust bundle changed: they watch
    /// [`IdentityStore::bundle_changes`].
    pub fn replace(&self, identity: Identity) {
        let bundle = identity.bundle_hash;
        self.current.store(Arc::new(identity));
        self.bundles.send_if_modified(|current| {
            let changed = *current != bundle;
            *current = bundle;
            changed
        });
    }

    /// The hash of the trust bundle in force, changing with it.
    pub fn bundle_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.bundles.subscribe()
    }

    /// Re-reads `files` every `every`, swapping in a changed identity that loads and
    /// logging (once per change) one that does not. Runs until the task is dropped.
    pub async fn watch(
        self: Arc<Self>,
        files: IdentityFiles,
        provider: Arc<CryptoProvider>,
        every: Duration,
    ) {
        use std::sync::atomic::Ordering::Relaxed;
        loop {
            tokio::time::sleep(every).await;
            let now = fingerprint(&files);
            if now == self.seen.load(Relaxed) {
                continue;
            }
            self.seen.store(now, Relaxed);
            match Identity::load(&files, &provider) {
                Ok(identity) => {
                    info!(id = %identity.id, serial = %identity.serial, "identity rotated: new handshakes use the new certificate");
                    self.replace(identity);
                }
                Err(error) => {
                    let current = self.current();
                    error!(%error, keeping = %current.serial, "identity rotation rejected; keeping the previous identity");
                }
            }
        }
    }
}

/// A hash of the three files' contents (missing files hash as absent).
fn fingerprint(files: &IdentityFiles) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    for path in [&files.cert, &files.key, &files.bundle]
        .into_iter()
        .chain(files.federated.iter().map(|(_, p)| p))
    {
        std::fs::read(path).ok().hash(&mut hasher);
    }
    hasher.finish()
}
