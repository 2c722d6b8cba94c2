//! A throwaway certificate authority for demos and tests (`sidecar certs`): a CA and
//! workload certificates whose URI SAN is a SPIFFE ID, written as PEM files laid out the
//! way a mounted Secret would be (`cert.pem`, `key.pem`, `bundle.pem`). Not for
//! production: the CA key sits on disk next to the certificates.

use std::{fs, path::Path, time::Duration};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use time::OffsetDateTime;

use super::SpiffeId;

/// Key algorithm of issued certificates.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum KeyType {
    /// ECDSA P-256 (the default).
    #[default]
    EcdsaP256,
    /// Ed25519.
    Ed25519,
}

/// Why certificates could not be made or written.
#[derive(Debug, thiserror::Error)]
pub enum DevCaError {
    /// rcgen refused the parameters.
    #[error("generating a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    /// A file could not be written.
    #[error("writing {path}: {source}")]
    Write {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// A CA that can issue workload certificates.
pub struct DevCa {
    cert: rcgen::Certificate,
    key: KeyPair,
    /// The original certificate's PEM when reopened, so bundles stay byte-identical.
    pem: Option<String>,
}

/// One issued certificate and its key, PEM.
pub struct Issued {
    /// Certificate PEM.
    pub cert_pem: String,
    /// Private key PEM (PKCS#8).
    pub key_pem: String,
}

/// Validity of an issued certificate relative to now.
#[derive(Clone, Copy, Debug)]
pub struct Validity {
    /// Starts this long before now (covers clock skew between pods).
    pub backdate: Duration,
    /// Ends this long after now; a negative validity makes an expired certificate.
    pub lifetime: time::Duration,
}

impl Default for Validity {
    fn default() -> Self {
        Self {
            backdate: Duration::from_secs(3600),
            lifetime: time::Duration::days(1),
        }
    }
}

// === impl DevCa ===

impl DevCa {
    /// A new self-signed CA for `trust_domain`.
    pub fn new(trust_domain: &str) -> Result<Self, DevCaError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = name(&format!("sidecar dev CA ({trust_domain})"));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + time::Duration::days(365);
        params.serial_number = Some(random_serial());
        let cert = params.self_signed(&key)?;
        Ok(Self {
            cert,
            key,
            pem: None,
        })
    }

    /// Reopens a CA from its certificate and key (as `sidecar certs` wrote them), to
    /// issue more certificates that chain to it.
    pub fn load(cert_pem: &str, key_pem: &str) -> Result<Self, DevCaError> {
        let key = KeyPair::from_pem(key_pem)?;
        let params = CertificateParams::from_ca_cert_pem(cert_pem)?;
        // Re-signing the same name and key yields an issuer whose signatures verify
        // against the original CA certificate.
        let cert = params.self_signed(&key)?;
        Ok(Self {
            cert,
            key,
            pem: Some(cert_pem.to_string()),
        })
    }

    /// The CA certificate, PEM (the trust bundle).
    pub fn ca_pem(&self) -> String {
        self.pem.clone().unwrap_or_else(|| self.cert.pem())
    }

    /// The CA private key, PEM.
    pub fn ca_key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// Issues a workload certificate for `id`.
    pub fn issue(
        &self,
        id: &SpiffeId,
        key_type: KeyType,
        validity: Validity,
    ) -> Result<Issued, DevCaError> {
        let key = match key_type {
            KeyType::EcdsaP256 => KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?,
            KeyType::Ed25519 => KeyPair::generate_for(&rcgen::PKCS_ED25519)?,
        };
        let mut params = CertificateParams::default();
        params.distinguished_name = name(&id.to_string());
        params.subject_alt_names = vec![SanType::URI(id.to_string().try_into()?)];
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let now = OffsetDateTime::now_utc();
        params.not_before = now - validity.backdate;
        params.not_after = now + validity.lifetime;
        if params.not_after <= params.not_before {
            // An expired certificate still needs a valid interval: end it just after it starts.
            params.not_before = params.not_after - time::Duration::hours(1);
        }
        params.serial_number = Some(random_serial());
        let cert = params.signed_by(&key, &self.cert, &self.key)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Issues a certificate for `id` and writes `cert.pem`, `key.pem` and `bundle.pem`
    /// into `dir` (key file mode 0600).
    pub fn write_workload(
        &self,
        dir: &Path,
        id: &SpiffeId,
        key_type: KeyType,
        validity: Validity,
    ) -> Result<Issued, DevCaError> {
        let issued = self.issue(id, key_type, validity)?;
        fs::create_dir_all(dir).map_err(|source| DevCaError::Write {
            path: dir.display().to_string(),
            source,
        })?;
        write(&dir.join("cert.pem"), &issued.cert_pem, false)?;
        write(&dir.join("key.pem"), &issued.key_pem, true)?;
        write(&dir.join("bundle.pem"), &self.ca_pem(), false)?;
        Ok(issued)
    }
}

fn name(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn
}

/// 16 random bytes with the top bit clear (serials must be positive).
fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    // Getrandom via ring's system RNG.
    let rng = ring::rand::SystemRandom::new();
    let _ = ring::rand::SecureRandom::fill(&rng, &mut bytes);
    bytes[0] &= 0x7f;
    SerialNumber::from(bytes.to_vec())
}

/// Writes `text` to `path`; `secret` files get mode 0600.
pub fn write(path: &Path, text: &str, secret: bool) -> Result<(), DevCaError> {
    use std::os::unix::fs::OpenOptionsExt;
    let err = |source| DevCaError::Write {
        path: path.display().to_string(),
        source,
    };
    let mut options = fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    if secret {
        options.mode(0o600);
    }
    let mut file = options.open(path).map_err(err)?;
    std::io::Write::write_all(&mut file, text.as_bytes()).map_err(err)
}
