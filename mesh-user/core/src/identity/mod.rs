//! Workload identity: SPIFFE IDs, the mesh certificate authority, leaf certificates and the
//! rustls configurations of the mTLS proxy.
//!
//! - [`SpiffeId`]: a service identity in Consul's form
//!   `spiffe://<trust-domain>[/ap/<ap>]/ns/<ns>/dc/<dc>/svc/<service>`.
//! - [`CertificateAuthority`]: an ECDSA P-256 root whose key and certificate persist in a state
//!   directory; it issues [`LeafCert`]s (72 h by default) per service identity.
//! - [`LeafStore`]: the current leaf of one service, swapped atomically on renewal; it is the
//!   rustls certificate resolver on both sides, so a renewal never touches established
//!   connections. [`renewal_instant`] picks when to renew.
//! - [`LeafRequest`] / [`CertificateAuthority::sign_request`]: a leaf signed by a remote CA
//!   (`meshd ca`) over a PKCS#10 request, the key staying with the node agent.
//! - [`TrustBundle`]: the trusted roots (several during a root rotation).
//! - [`client_config`] / [`server_config`] / [`ClientConfigCache`]: TLS 1.3-only rustls configs
//!   (crypto provider `ring`) whose verifiers chain peers to the bundle and check SPIFFE IDs;
//!   [`peer_identity`] gives the proxy the caller's identity after the handshake.
#![forbid(unsafe_code)]

mod ca;
mod leaf;
mod request;
mod spiffe;
mod tls;
mod trust;

#[cfg(test)]
mod tests;

use std::path::PathBuf;

pub use ca::{CertificateAuthority, RootCert, DEFAULT_ROOT_TTL};
pub use leaf::{renewal_instant, LeafCert, LeafStore, DEFAULT_LEAF_TTL};
pub use request::{certificate_from_pem, certificate_to_pem, LeafRequest};
pub use spiffe::{
    new_trust_domain, trust_domain_uri, validate_trust_domain, SpiffeId, SpiffeIdReason,
    DEFAULT_PARTITION,
};
pub use tls::{
    client_config, client_config_with, peer_identity, server_config, server_config_with,
    spiffe_id_from_cert, ClientConfigCache, TlsOptions,
};
pub use trust::TrustBundle;

/// Errors of the identity module.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A string is not a valid service SPIFFE ID or trust domain.
    #[error("invalid SPIFFE ID {input:?}: {reason}")]
    InvalidSpiffeId {
        /// The input (cut to 256 characters).
        input: String,
        /// Why it was refused.
        reason: SpiffeIdReason,
    },
    /// Reading or writing the CA state failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The persisted CA state is unusable.
    #[error("CA state in {}: {reason}", dir.display())]
    CaState {
        /// The state directory.
        dir: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// Two trust domains that must agree do not.
    #[error("trust domain mismatch: expected {expected:?}, got {got:?}")]
    TrustDomainMismatch {
        /// The trust domain in force.
        expected: String,
        /// The one presented.
        got: String,
    },
    /// A certificate could not be generated.
    #[error("certificate generation: {0}")]
    Generate(#[from] rcgen::Error),
    /// A certificate is malformed or lacks what the mesh needs.
    #[error("bad certificate: {0}")]
    BadCertificate(String),
    /// A requested validity period is empty or out of range.
    #[error("invalid validity: {0}")]
    InvalidValidity(String),
    /// A leaf for another identity was offered to a [`LeafStore`].
    #[error("leaf store holds {expected}, refused a leaf for {got}")]
    IdentityMismatch {
        /// The identity of the store.
        expected: Box<SpiffeId>,
        /// The identity of the offered leaf.
        got: Box<SpiffeId>,
    },
    /// The peer's SPIFFE ID is not the one the connection is for.
    #[error("peer is {got}, expected {expected}")]
    UnexpectedPeer {
        /// The identity that was dialled.
        expected: Box<SpiffeId>,
        /// The identity the peer presented.
        got: Box<SpiffeId>,
    },
    /// A root rotation step is not possible.
    #[error("trust bundle: {0}")]
    Bundle(String),
    /// The peer presented no certificate (or the handshake is not complete).
    #[error("peer presented no certificate")]
    NoPeerCertificate,
    /// rustls refused a configuration or key.
    #[error("TLS: {0}")]
    Tls(#[from] rustls::Error),
}
