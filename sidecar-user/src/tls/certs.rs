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
    /// PEM trust bundle: the CA certificates peers must chain to.
    pub bundle: PathBuf,
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
    /// Trust anchors from the bundle.
    pub roots: Vec<TrustAnchor<'static>>,
    /// The leaf's serial number, lower-case hex.
    pub serial: String,
}

/// The current identity, swapped atomically on rotation.
pub struct IdentityStore {
    current: ArcSwap<Identity>,
    /// Fingerprint of the files the current identity (or the last rejected rotation)
    /// was read from, taken before reading them so no change can slip between.
    seen: std::sync::atomic::AtomicU64,
}

// === impl Identity ===

impl Identity {
    /// Loads and cross-checks the three files.
    pub fn load(files: &IdentityFiles, provider: &CryptoProvider) -> Result<Self, CertError> {
        let cert_pem = read(&files.cert)?;
        let key_pem = read(&files.key)?;
        let bundle_pem = read(&files.bundle)?;
        Self::from_pem(files, &cert_pem, &key_pem, &bundle_pem, provider)
    }

    fn from_pem(
        files: &IdentityFiles,
        cert_pem: &[u8],
        key_pem: &[u8],
        bundle_pem: &[u8],
        provider: &CryptoProvider,
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
        let roots = certificates(&files.bundle, bundle_pem)?
            .iter()
            .map(|der| {
                webpki::anchor_from_trusted_cert(der)
                    .map(|a| a.to_owned())
                    .map_err(|e| CertError::Pem {
                        path: files.bundle.clone(),
                        reason: format!("not a usable CA certificate: {e}"),
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            id,
            certified_key: Arc::new(certified_key),
            roots,
            serial,
        })
    }
}

fn read(path: &Path) -> Result<Vec<u8>, CertError> {
    std::fs::read(path).map_err(|source| CertError::Read {
        path: path.to_owned(),
        source,
    })
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
        let seen = fingerprint(files);
        let identity = Identity::load(files, provider)?;
        Ok(Self {
            current: ArcSwap::from_pointee(identity),
            seen: seen.into(),
        })
    }

    /// The identity new handshakes use.
    pub fn current(&self) -> Arc<Identity> {
        self.current.load_full()
    }

    /// Replaces the identity; connections already established are not affected.
    pub fn replace(&self, identity: Identity) {
        self.current.store(Arc::new(identity));
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
    for path in [&files.cert, &files.key, &files.bundle] {
        std::fs::read(path).ok().hash(&mut hasher);
    }
    hasher.finish()
}
