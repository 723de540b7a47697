//! Leaf certificates, their renewal schedule, and the swappable store that serves them to rustls.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use rand::{Rng, RngExt};
use rustls::client::ResolvesClientCert;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::SignatureScheme;

use super::ca::{parse_cert, validity};
use super::spiffe::SpiffeId;
use super::tls::{provider, spiffe_id_from_cert};
use super::Error;

/// Default lifetime of a leaf certificate (Consul's `LeafCertTTL`).
pub const DEFAULT_LEAF_TTL: Duration = Duration::from_secs(72 * 3600);

/// Renewal happens at a uniformly random point in this fraction of the lifetime.
const RENEW_FROM: f64 = 0.6;
const RENEW_UNTIL: f64 = 0.9;

/// A leaf certificate and its private key, for one service identity.
#[derive(Clone)]
pub struct LeafCert {
    id: SpiffeId,
    cert: CertificateDer<'static>,
    certified: Arc<CertifiedKey>,
    not_before: SystemTime,
    not_after: SystemTime,
    renew_at: SystemTime,
}

impl LeafCert {
    /// Assembles a leaf from its certificate and PKCS#8 key. The certificate's SPIFFE URI SAN
    /// must be `id` and the key must match it.
    pub(crate) fn new(
        id: SpiffeId,
        cert: CertificateDer<'static>,
        pkcs8: Vec<u8>,
    ) -> Result<Self, Error> {
        let presented = spiffe_id_from_cert(&cert)?;
        if presented != id {
            return Err(Error::IdentityMismatch {
                expected: Box::new(id),
                got: Box::new(presented),
            });
        }
        let (not_before, not_after) = validity(&parse_cert(&cert)?)?;
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pkcs8));
        let certified = CertifiedKey::from_der(vec![cert.clone()], key, &provider())?;
        let renew_at = renewal_instant(not_before, not_after);
        Ok(Self {
            id,
            cert,
            certified: Arc::new(certified),
            not_before,
            not_after,
            renew_at,
        })
    }

    /// The identity in the certificate's URI SAN.
    pub fn id(&self) -> &SpiffeId {
        &self.id
    }

    /// The certificate, DER-encoded.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    /// Start of validity.
    pub fn not_before(&self) -> SystemTime {
        self.not_before
    }

    /// End of validity.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// When to renew this leaf: drawn once, uniformly between 60 % and 90 % of its lifetime
    /// (see [`renewal_instant`]).
    pub fn renew_at(&self) -> SystemTime {
        self.renew_at
    }

    /// The certificate chain and signing key as rustls uses them.
    pub fn certified_key(&self) -> Arc<CertifiedKey> {
        Arc::clone(&self.certified)
    }
}

impl fmt::Debug for LeafCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LeafCert")
            .field("id", &self.id.to_string())
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .field("renew_at", &self.renew_at)
            .finish_non_exhaustive()
    }
}

/// When to renew a certificate valid from `not_before` to `not_after`: a uniformly random
/// instant between 60 % and 90 % of the lifetime, so that many leaves issued together do not
/// renew together. An empty or inverted period gives `not_before`.
pub fn renewal_instant(not_before: SystemTime, not_after: SystemTime) -> SystemTime {
    renewal_instant_with(not_before, not_after, &mut rand::rng())
}

pub(crate) fn renewal_instant_with<R: Rng + ?Sized>(
    not_before: SystemTime,
    not_after: SystemTime,
    rng: &mut R,
) -> SystemTime {
    let Ok(lifetime) = not_after.duration_since(not_before) else {
        return not_before;
    };
    let fraction: f64 = rng.random_range(RENEW_FROM..=RENEW_UNTIL);
    // mul_f64 of a fraction below one cannot overflow the lifetime it scales.
    not_before + lifetime.mul_f64(fraction)
}

/// The current leaf of one service identity, replaced atomically on renewal.
///
/// It resolves certificates for rustls on both sides ([`ResolvesServerCert`] and
/// [`ResolvesClientCert`]): each new handshake reads the current leaf; established connections
/// keep the keys they negotiated and are not affected by a swap.
pub struct LeafStore {
    id: SpiffeId,
    current: ArcSwap<LeafCert>,
}

impl LeafStore {
    /// A store serving `leaf`; it only ever accepts leaves for the same identity.
    pub fn new(leaf: LeafCert) -> Self {
        Self {
            id: leaf.id().clone(),
            current: ArcSwap::from_pointee(leaf),
        }
    }

    /// The identity this store serves.
    pub fn id(&self) -> &SpiffeId {
        &self.id
    }

    /// The leaf that new handshakes use.
    pub fn current(&self) -> Arc<LeafCert> {
        self.current.load_full()
    }

    /// Makes `leaf` the current one and returns the previous one. A leaf for another identity
    /// is refused.
    ///
    /// # Errors
    ///
    /// [`Error::IdentityMismatch`] if `leaf` is for another SPIFFE ID; the current leaf stays.
    pub fn replace(&self, leaf: LeafCert) -> Result<Arc<LeafCert>, Error> {
        if leaf.id() != &self.id {
            return Err(Error::IdentityMismatch {
                expected: Box::new(self.id.clone()),
                got: Box::new(leaf.id().clone()),
            });
        }
        Ok(self.current.swap(Arc::new(leaf)))
    }
}

impl fmt::Debug for LeafStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LeafStore")
            .field("id", &self.id.to_string())
            .field("current", &self.current.load())
            .finish()
    }
}

impl ResolvesServerCert for LeafStore {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load().certified_key())
    }
}

impl ResolvesClientCert for LeafStore {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load().certified_key())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::ca::{parse_cert, uris, CertificateAuthority};
    use rand::SeedableRng;

    fn id(svc: &str) -> SpiffeId {
        SpiffeId::new("leaf.consul", "default", "dc1", svc).unwrap()
    }

    #[test]
    fn renewal_is_always_between_60_and_90_percent() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let nb = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        for lifetime_s in [1u64, 59, 3600, 72 * 3600, 365 * 24 * 3600] {
            let lifetime = Duration::from_secs(lifetime_s);
            let na = nb + lifetime;
            let (lo, hi) = (nb + lifetime.mul_f64(0.6), nb + lifetime.mul_f64(0.9));
            let (mut min, mut max) = (na, nb);
            for _ in 0..5000 {
                let t = renewal_instant_with(nb, na, &mut rng);
                assert!(t >= lo && t <= hi, "{t:?} outside [{lo:?}, {hi:?}]");
                min = min.min(t);
                max = max.max(t);
            }
            // Jittered, and spread over most of the window.
            let spread = max.duration_since(min).unwrap();
            assert!(
                spread >= lifetime.mul_f64(0.25),
                "spread {spread:?} of {lifetime:?}"
            );
        }
        // The public function with the thread RNG obeys the same bounds.
        let na = nb + DEFAULT_LEAF_TTL;
        for _ in 0..1000 {
            let t = renewal_instant(nb, na);
            assert!(t >= nb + DEFAULT_LEAF_TTL.mul_f64(0.6));
            assert!(t <= nb + DEFAULT_LEAF_TTL.mul_f64(0.9));
        }
        assert_eq!(renewal_instant(na, nb), na);
    }

    #[test]
    fn leaf_has_spiffe_san_validity_and_usages() {
        let ca = CertificateAuthority::ephemeral("leaf.consul").unwrap();
        let web = id("web");
        let before = SystemTime::now();
        let leaf = ca.issue_leaf(&web, DEFAULT_LEAF_TTL).unwrap();
        let after = SystemTime::now();
        assert_eq!(leaf.id(), &web);

        let cert = parse_cert(leaf.cert_der()).unwrap();
        assert_eq!(uris(&cert).unwrap(), vec![web.to_string().as_str()]);
        assert!(!cert.is_ca());
        let (nb, na) = validity(&cert).unwrap();
        assert_eq!((nb, na), (leaf.not_before(), leaf.not_after()));
        // 72 h from now, back-dated one minute; certificate times have whole seconds.
        let slack = Duration::from_secs(2);
        assert!(na + slack >= before + DEFAULT_LEAF_TTL && na <= after + DEFAULT_LEAF_TTL);
        assert!(
            nb + Duration::from_secs(60) <= after && nb + Duration::from_secs(60) + slack >= before
        );
        let lifetime = na.duration_since(nb).unwrap();
        assert!(leaf.renew_at() >= nb + lifetime.mul_f64(0.6));
        assert!(leaf.renew_at() <= nb + lifetime.mul_f64(0.9));

        let ku = cert.key_usage().unwrap().unwrap().value;
        assert!(ku.digital_signature());
        assert!(!ku.key_cert_sign());
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && eku.client_auth);
        assert_eq!(
            cert.public_key()
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.as_oid().ok())
                .unwrap(),
            x509_parser::oid_registry::OID_EC_P256
        );
        // Signed by the root.
        let root = parse_cert(ca.root().der()).unwrap();
        cert.verify_signature(Some(root.public_key())).unwrap();
        assert_eq!(cert.issuer().as_raw(), root.subject().as_raw());
    }

    #[test]
    fn store_swaps_and_keeps_identity() {
        let ca = CertificateAuthority::ephemeral("leaf.consul").unwrap();
        let first = ca.issue_leaf(&id("web"), DEFAULT_LEAF_TTL).unwrap();
        let second = ca.issue_leaf(&id("web"), DEFAULT_LEAF_TTL).unwrap();
        let store = LeafStore::new(first.clone());
        assert_eq!(store.current().cert_der(), first.cert_der());
        let old = store.replace(second.clone()).unwrap();
        assert_eq!(old.cert_der(), first.cert_der());
        assert_eq!(store.current().cert_der(), second.cert_der());
        let resolved = ResolvesClientCert::resolve(&store, &[], &[]).unwrap();
        assert_eq!(&resolved.cert[0], second.cert_der());

        let other = ca.issue_leaf(&id("api"), DEFAULT_LEAF_TTL).unwrap();
        assert!(matches!(
            store.replace(other),
            Err(Error::IdentityMismatch { .. })
        ));
        assert_eq!(store.current().cert_der(), second.cert_der());
    }
}
