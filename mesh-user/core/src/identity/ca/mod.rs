//! The mesh certificate authority: an ECDSA P-256 self-signed root, persisted in a state
//! directory, that signs leaf certificates.
//!
//! This module holds the root and the authority (creation, persistence, rotation, issuing);
//! `cert` builds and reads the X.509 certificates themselves.

use std::fmt;
use std::fs;
use std::io::ErrorKind;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{Issuer, KeyPair, PKCS_ECDSA_P256_SHA256};
use rustls::pki_types::CertificateDer;

use super::leaf::LeafCert;
use super::spiffe::{self, SpiffeId};
use super::Error;

mod cert;

#[cfg(test)]
mod tests;

pub(crate) use cert::random_serial;
use cert::{cert_matches_key, self_signed_root};
pub(crate) use cert::{parse_cert, to_offset, uris, validity};

/// How long a new root certificate is valid (10 years, as Consul's default).
pub const DEFAULT_ROOT_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Certificates start this long before they are made, to absorb clock skew between nodes.
const BACKDATE: Duration = Duration::from_secs(60);

const KEY_FILE: &str = "root-key.pem";
const CERT_FILE: &str = "root-cert.pem";

/// A trusted root certificate of the mesh.
#[derive(Clone, PartialEq, Eq)]
pub struct RootCert {
    der: CertificateDer<'static>,
    trust_domain: String,
    fingerprint: String,
    not_before: SystemTime,
    not_after: SystemTime,
}

impl RootCert {
    /// Parses a root certificate: it must be a CA certificate whose URI SAN is the trust-domain
    /// SPIFFE ID `spiffe://<trust-domain>`.
    ///
    /// # Errors
    ///
    /// [`Error::BadCertificate`] if the DER does not parse as one X.509 certificate, is not a
    /// CA, has no `spiffe://<trust-domain>` URI SAN, or has a validity outside what
    /// `SystemTime` holds.
    pub fn from_der(der: CertificateDer<'static>) -> Result<Self, Error> {
        let (trust_domain, not_before, not_after) = {
            let cert = parse_cert(&der)?;
            if !cert.is_ca() {
                return Err(Error::BadCertificate("root is not a CA certificate".into()));
            }
            let td = uris(&cert)?
                .into_iter()
                .find_map(|u| spiffe::parse_trust_domain_uri(u).ok())
                .ok_or_else(|| {
                    Error::BadCertificate("root has no spiffe://<trust-domain> URI SAN".into())
                })?
                .to_owned();
            let (nb, na) = validity(&cert)?;
            (td, nb, na)
        };
        let fingerprint = ring::digest::digest(&ring::digest::SHA256, &der)
            .as_ref()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        Ok(Self {
            der,
            trust_domain,
            fingerprint,
            not_before,
            not_after,
        })
    }

    /// Parses a root certificate from PEM (one `CERTIFICATE` block), as [`from_der`](Self::from_der).
    ///
    /// # Errors
    ///
    /// [`Error::BadCertificate`] for text that is not one PEM certificate, and the errors of
    /// [`from_der`](Self::from_der).
    pub fn from_pem(text: &str) -> Result<Self, Error> {
        parse_root_pem(text)
    }

    /// The certificate, DER-encoded.
    pub fn der(&self) -> &CertificateDer<'static> {
        &self.der
    }

    /// The certificate, PEM-encoded.
    pub fn pem(&self) -> String {
        pem::encode(&pem::Pem::new("CERTIFICATE", self.der.to_vec()))
    }

    /// The trust domain named by the root's URI SAN.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// Lower-case hex SHA-256 of the DER: the root's ID.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// Start of validity.
    pub fn not_before(&self) -> SystemTime {
        self.not_before
    }

    /// End of validity.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }
}

impl fmt::Debug for RootCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RootCert")
            .field("trust_domain", &self.trust_domain)
            .field("fingerprint", &self.fingerprint)
            .finish()
    }
}

/// The mesh CA: signs leaf certificates with its active root key.
///
/// Persisted state (when made by [`load_or_create`](Self::load_or_create)): `root-key.pem`
/// (PKCS#8, mode 0600) and `root-cert.pem` in the state directory. Files are written durably
/// (temporary file, fsync, rename, fsync of the directory), the certificate before the key. The
/// key is the source of truth: a certificate that is missing or does not match the key (a crash
/// in the middle of [`rotate`](Self::rotate)) is re-made from the key on the next start.
pub struct CertificateAuthority {
    trust_domain: String,
    issuer: Issuer<'static, KeyPair>,
    root: RootCert,
    state_dir: Option<PathBuf>,
}

impl fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("trust_domain", &self.trust_domain)
            .field("root", &self.root)
            .field("state_dir", &self.state_dir)
            .finish_non_exhaustive()
    }
}

impl CertificateAuthority {
    /// Loads the CA from `state_dir`, or creates it there on first start.
    ///
    /// `trust_domain`: `None` keeps the persisted one, or makes a fresh `<uuid>.consul` on first
    /// start; `Some(td)` must equal the persisted one (else [`Error::TrustDomainMismatch`]).
    /// A key file readable by group or others is refused.
    ///
    /// Files: `root-key.pem` (PEM, ECDSA P-256, mode 0600) and `root-cert.pem` (PEM, 0644) in
    /// `state_dir` (created 0700). A certificate that no longer matches the key is re-made
    /// from the key.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidSpiffeId`] for an invalid `trust_domain`, [`Error::TrustDomainMismatch`]
    /// if it differs from the persisted one, [`Error::Io`] if the directory or files cannot be
    /// created, read or written, [`Error::CaState`] for a key file that is too open, not a P-256
    /// key, without its certificate and no trust domain given, a damaged certificate, or an
    /// expired root; [`Error::Generate`] if a key or certificate cannot be made.
    pub fn load_or_create(state_dir: &Path, trust_domain: Option<&str>) -> Result<Self, Error> {
        if let Some(td) = trust_domain {
            spiffe::validate_trust_domain(td)?;
        }
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(state_dir)
            .map_err(|source| io_err(state_dir, source))?;
        let key_path = state_dir.join(KEY_FILE);
        let cert_path = state_dir.join(CERT_FILE);
        let state_err = |reason: String| Error::CaState {
            dir: state_dir.to_owned(),
            reason,
        };

        let cert_pem = read_optional(&cert_path)?;
        let persisted_cert = match &cert_pem {
            Some(pem) => Some(parse_root_pem(pem).map_err(|e| state_err(e.to_string()))?),
            None => None,
        };
        // The trust domain survives even a certificate that no longer matches the key.
        let trust_domain = match (trust_domain, &persisted_cert) {
            (Some(td), Some(root)) if td != root.trust_domain() => {
                return Err(Error::TrustDomainMismatch {
                    expected: root.trust_domain().to_owned(),
                    got: td.to_owned(),
                })
            }
            (Some(td), _) => Some(td.to_owned()),
            (None, Some(root)) => Some(root.trust_domain().to_owned()),
            (None, None) => None,
        };

        let Some(key) = read_key(&key_path, state_dir)? else {
            // First start (or a crash before the key landed): make both, certificate first.
            let trust_domain = trust_domain.unwrap_or_else(spiffe::new_trust_domain);
            let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
            let root = self_signed_root(&trust_domain, &key)?;
            write_durably(&cert_path, root.pem().as_bytes(), 0o644)?;
            write_durably(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
            return Self::from_parts(trust_domain, key, root, Some(state_dir.to_owned()));
        };
        // The certificate is written before the key, so a key without a certificate means the
        // certificate was removed: the trust domain must then be given again.
        let trust_domain = trust_domain.ok_or_else(|| {
            state_err(format!(
                "{KEY_FILE} exists without {CERT_FILE}; pass the trust domain to re-make the root"
            ))
        })?;

        let root = match persisted_cert {
            Some(root) if cert_matches_key(root.der(), &key)? => {
                if root.not_after() <= SystemTime::now() {
                    return Err(state_err(format!(
                        "root certificate {} has expired",
                        root.fingerprint()
                    )));
                }
                root
            }
            _ => {
                let root = self_signed_root(&trust_domain, &key)?;
                write_durably(&cert_path, root.pem().as_bytes(), 0o644)?;
                root
            }
        };
        Self::from_parts(trust_domain, key, root, Some(state_dir.to_owned()))
    }

    /// A CA that lives in memory only (nothing is persisted), with a new root.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidSpiffeId`] for an invalid trust domain, [`Error::Generate`] if the key
    /// or root cannot be made.
    pub fn ephemeral(trust_domain: &str) -> Result<Self, Error> {
        spiffe::validate_trust_domain(trust_domain)?;
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let root = self_signed_root(trust_domain, &key)?;
        Self::from_parts(trust_domain.to_owned(), key, root, None)
    }

    fn from_parts(
        trust_domain: String,
        key: KeyPair,
        root: RootCert,
        state_dir: Option<PathBuf>,
    ) -> Result<Self, Error> {
        let issuer = Issuer::from_ca_cert_der(root.der(), key)?;
        Ok(Self {
            trust_domain,
            issuer,
            root,
            state_dir,
        })
    }

    /// The trust domain of every identity this CA signs.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The active root certificate.
    pub fn root(&self) -> &RootCert {
        &self.root
    }

    /// Replaces the root with a new key and certificate (persisted if the CA has a state
    /// directory) and returns the new root. Leaves signed afterwards chain to it; add it to the
    /// [`TrustBundle`](super::TrustBundle) before handing them out.
    ///
    /// # Errors
    ///
    /// [`Error::Generate`] if the key or certificate cannot be made, [`Error::Io`] if they
    /// cannot be persisted. The CA keeps its old root on error (files may already hold the new
    /// certificate if only the key write failed).
    pub fn rotate(&mut self) -> Result<RootCert, Error> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let root = self_signed_root(&self.trust_domain, &key)?;
        if let Some(dir) = &self.state_dir {
            write_durably(&dir.join(CERT_FILE), root.pem().as_bytes(), 0o644)?;
            write_durably(&dir.join(KEY_FILE), key.serialize_pem().as_bytes(), 0o600)?;
        }
        self.issuer = Issuer::from_ca_cert_der(root.der(), key)?;
        self.root = root.clone();
        Ok(root)
    }

    /// Issues a leaf for `id`, valid from now (back-dated one minute for clock skew) for `ttl`
    /// ([`DEFAULT_LEAF_TTL`](super::DEFAULT_LEAF_TTL) is the usual value).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidValidity`] for a zero or unrepresentable TTL, and the errors of
    /// [`CertificateAuthority::issue_leaf_with_validity`] (a TTL reaching past the root's
    /// expiry included).
    pub fn issue_leaf(&self, id: &SpiffeId, ttl: Duration) -> Result<LeafCert, Error> {
        let (not_before, not_after) = self.leaf_validity(id, ttl)?;
        self.issue_leaf_with_validity(id, not_before, not_after)
    }

    /// The validity of a leaf for `id` issued now for `ttl` (back-dated for clock skew),
    /// after checking `id`'s trust domain and the TTL.
    pub(super) fn leaf_validity(
        &self,
        id: &SpiffeId,
        ttl: Duration,
    ) -> Result<(SystemTime, SystemTime), Error> {
        self.check_leaf(id)?;
        if ttl.is_zero() {
            return Err(Error::InvalidValidity("TTL must not be zero".into()));
        }
        let now = SystemTime::now();
        let not_after = now
            .checked_add(ttl)
            .ok_or_else(|| Error::InvalidValidity(format!("TTL {ttl:?} is out of range")))?;
        let not_before = now.checked_sub(BACKDATE).unwrap_or(now);
        self.check_validity(not_before, not_after)?;
        Ok((not_before, not_after))
    }

    fn check_leaf(&self, id: &SpiffeId) -> Result<(), Error> {
        if id.trust_domain() != self.trust_domain {
            return Err(Error::TrustDomainMismatch {
                expected: self.trust_domain.clone(),
                got: id.trust_domain().to_owned(),
            });
        }
        Ok(())
    }

    fn check_validity(&self, not_before: SystemTime, not_after: SystemTime) -> Result<(), Error> {
        if not_after <= not_before {
            return Err(Error::InvalidValidity(
                "not_after must be later than not_before".into(),
            ));
        }
        if not_after > self.root.not_after() {
            return Err(Error::InvalidValidity(
                "a leaf cannot outlive its root".into(),
            ));
        }
        Ok(())
    }

    /// The signer of the active root.
    pub(super) fn issuer(&self) -> &Issuer<'static, KeyPair> {
        &self.issuer
    }

    /// Issues a leaf for `id` with an explicit validity period, which must lie within the
    /// root's.
    ///
    /// # Errors
    ///
    /// [`Error::TrustDomainMismatch`] if `id` is of another trust domain,
    /// [`Error::InvalidValidity`] if `not_after` is not after `not_before` or is past the
    /// root's expiry, [`Error::Generate`] / [`Error::Tls`] if the key or certificate cannot be
    /// made.
    pub fn issue_leaf_with_validity(
        &self,
        id: &SpiffeId,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<LeafCert, Error> {
        self.check_leaf(id)?;
        self.check_validity(not_before, not_after)?;
        let params = super::request::leaf_params(id, not_before, not_after)?;
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let cert = params.signed_by(&key, &self.issuer)?;
        LeafCert::new(id.clone(), cert.der().clone(), key.serialize_der())
    }
}

#[cfg(test)]
impl CertificateAuthority {
    /// Signs arbitrary parameters with the active root, bypassing every check: tests use it to
    /// make certificates the CA would never issue.
    pub(crate) fn sign_unchecked(
        &self,
        params: &rcgen::CertificateParams,
        key: &KeyPair,
    ) -> Result<CertificateDer<'static>, Error> {
        Ok(params.signed_by(key, &self.issuer)?.der().clone())
    }
}

fn parse_root_pem(pem_text: &str) -> Result<RootCert, Error> {
    let p = pem::parse(pem_text).map_err(|e| Error::BadCertificate(format!("PEM: {e}")))?;
    if p.tag() != "CERTIFICATE" {
        return Err(Error::BadCertificate(format!(
            "PEM block {:?}, expected CERTIFICATE",
            p.tag()
        )));
    }
    RootCert::from_der(CertificateDer::from(p.into_contents()))
}

fn read_optional(path: &Path) -> Result<Option<String>, Error> {
    match fs::read_to_string(path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(source) => Err(io_err(path, source)),
    }
}

fn read_key(path: &Path, dir: &Path) -> Result<Option<KeyPair>, Error> {
    let meta = match fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(io_err(path, source)),
    };
    let state_err = |reason: String| Error::CaState {
        dir: dir.to_owned(),
        reason,
    };
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(state_err(format!(
            "{KEY_FILE} has mode {mode:04o}; it must not be readable by group or others (0600)"
        )));
    }
    let text = fs::read_to_string(path).map_err(|source| io_err(path, source))?;
    let key = KeyPair::from_pem(&text).map_err(|e| state_err(format!("{KEY_FILE}: {e}")))?;
    if key.algorithm() != &PKCS_ECDSA_P256_SHA256 {
        return Err(state_err(format!("{KEY_FILE} is not an ECDSA P-256 key")));
    }
    Ok(Some(key))
}

/// Writes `contents` to `path` durably (see [`crate::durable::write`]).
fn write_durably(path: &Path, contents: &[u8], mode: u32) -> Result<(), Error> {
    crate::durable::write(path, contents, mode).map_err(|source| io_err(path, source))
}

fn io_err(path: &Path, source: std::io::Error) -> Error {
    Error::Io {
        path: path.to_owned(),
        source,
    }
}
