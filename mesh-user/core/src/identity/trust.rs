//! The trust bundle: the mesh roots that peers' certificates must chain to.

use std::fmt;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use rustls::pki_types::TrustAnchor;
use rustls::server::danger::ClientCertVerifier;
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;

use super::ca::{parse_cert, RootCert};
use super::leaf::LeafCert;
use super::tls::provider;
use super::Error;

/// The roots trusted by the mesh, shared by every verifier built from it.
///
/// Normally one root. During a root rotation:
/// 1. [`add_active_root`](Self::add_active_root) with the CA's new root (old leaves still
///    verify, new leaves are signed by the new root),
/// 2. re-issue leaves until [`stale_leaves`](Self::stale_leaves) is empty,
/// 3. [`retire_root`](Self::retire_root) the old one: from then on its leaves are refused.
///
/// Changes take effect for the next handshake of every config built on this bundle. TLS session
/// resumption never crosses a change: tickets and cached sessions from before it are not used.
pub struct TrustBundle {
    trust_domain: String,
    state: ArcSwap<BundleState>,
    write: Mutex<()>,
}

/// One immutable version of the bundle.
pub(crate) struct BundleState {
    /// Bumped on every change.
    pub(crate) generation: u64,
    /// The roots; the last one is active.
    pub(crate) roots: Vec<RootCert>,
    /// The root that signs new leaves (the last of `roots`).
    pub(crate) active: RootCert,
    /// The roots as webpki trust anchors.
    pub(crate) anchors: Vec<TrustAnchor<'static>>,
    /// rustls' chain verifier for client certificates over these roots.
    pub(crate) client_verifier: Arc<dyn ClientCertVerifier>,
}

impl BundleState {
    fn new(generation: u64, roots: Vec<RootCert>) -> Result<Self, Error> {
        let active = roots
            .last()
            .cloned()
            .ok_or_else(|| Error::Bundle("a bundle needs at least one root".into()))?;
        let mut store = RootCertStore::empty();
        let mut anchors = Vec::with_capacity(roots.len());
        for root in &roots {
            store.add(root.der().clone())?;
            let anchor = webpki::anchor_from_trusted_cert(root.der())
                .map_err(|e| Error::BadCertificate(format!("root as trust anchor: {e}")))?;
            anchors.push(anchor.to_owned());
        }
        let client_verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(store), provider())
                .build()
                .map_err(|e| Error::Bundle(format!("client verifier: {e}")))?;
        Ok(Self {
            generation,
            roots,
            active,
            anchors,
            client_verifier,
        })
    }
}

impl TrustBundle {
    /// A bundle trusting `root` only, for `root`'s trust domain.
    ///
    /// # Errors
    ///
    /// [`Error::Tls`] / [`Error::BadCertificate`] if `root` cannot serve as a trust anchor,
    /// [`Error::Bundle`] if the client verifier cannot be built from it.
    pub fn new(root: RootCert) -> Result<Self, Error> {
        let trust_domain = root.trust_domain().to_owned();
        Ok(Self {
            trust_domain,
            state: ArcSwap::from_pointee(BundleState::new(0, vec![root])?),
            write: Mutex::new(()),
        })
    }

    /// The trust domain of every root (and every identity) in the bundle.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// Every trusted root, the active one last.
    pub fn roots(&self) -> Vec<RootCert> {
        self.state.load().roots.clone()
    }

    /// The root that signs new leaves.
    pub fn active_root(&self) -> RootCert {
        self.state.load().active.clone()
    }

    /// Trusts `root` beside the current roots and makes it the active one. Adding a root that is
    /// already trusted only makes it active.
    ///
    /// # Errors
    ///
    /// [`Error::TrustDomainMismatch`] if `root` is of another trust domain, and the errors of
    /// [`TrustBundle::new`] for the new set of roots. The bundle is unchanged on error.
    pub fn add_active_root(&self, root: RootCert) -> Result<(), Error> {
        if root.trust_domain() != self.trust_domain {
            return Err(Error::TrustDomainMismatch {
                expected: self.trust_domain.clone(),
                got: root.trust_domain().to_owned(),
            });
        }
        let _guard = self.write.lock().unwrap_or_else(|p| p.into_inner());
        let current = self.state.load();
        let mut roots: Vec<RootCert> = current
            .roots
            .iter()
            .filter(|r| **r != root)
            .cloned()
            .collect();
        roots.push(root);
        self.state
            .store(Arc::new(BundleState::new(current.generation + 1, roots)?));
        Ok(())
    }

    /// Stops trusting `root`. The active root cannot be retired.
    ///
    /// # Errors
    ///
    /// [`Error::Bundle`] if `root` is not in the bundle or is the active root, and the errors
    /// of [`TrustBundle::new`] for the remaining roots.
    pub fn retire_root(&self, root: &RootCert) -> Result<(), Error> {
        let _guard = self.write.lock().unwrap_or_else(|p| p.into_inner());
        let current = self.state.load();
        let Some(pos) = current.roots.iter().position(|r| r == root) else {
            return Err(Error::Bundle(format!(
                "root {} is not in the bundle",
                root.fingerprint()
            )));
        };
        if *root == current.active {
            return Err(Error::Bundle(format!(
                "root {} is the active root",
                root.fingerprint()
            )));
        }
        let mut roots = current.roots.clone();
        roots.remove(pos);
        self.state
            .store(Arc::new(BundleState::new(current.generation + 1, roots)?));
        Ok(())
    }

    /// The trusted root that signed `leaf`, if any.
    pub fn signer_of(&self, leaf: &LeafCert) -> Option<RootCert> {
        let state = self.state.load();
        state.roots.iter().find(|r| signed_by(leaf, r)).cloned()
    }

    /// The leaves among `leaves` that are not signed by the active root (signed by an older
    /// root, or by none in the bundle): the ones to re-issue before retiring old roots.
    pub fn stale_leaves<'a>(
        &self,
        leaves: impl IntoIterator<Item = &'a LeafCert>,
    ) -> Vec<&'a LeafCert> {
        let active = self.active_root();
        leaves
            .into_iter()
            .filter(|l| !signed_by(l, &active))
            .collect()
    }

    /// The current version of the bundle, for the verifiers.
    pub(crate) fn snapshot(&self) -> Arc<BundleState> {
        self.state.load_full()
    }

    /// The current generation number, for session-resumption invalidation.
    pub(crate) fn generation(&self) -> u64 {
        self.state.load().generation
    }
}

impl fmt::Debug for TrustBundle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.state.load();
        f.debug_struct("TrustBundle")
            .field("trust_domain", &self.trust_domain)
            .field("generation", &state.generation)
            .field("roots", &state.roots)
            .finish()
    }
}

/// Whether `root` issued `leaf`: same issuer name and a valid signature under root's key.
fn signed_by(leaf: &LeafCert, root: &RootCert) -> bool {
    let (Ok(leaf), Ok(root)) = (parse_cert(leaf.cert_der()), parse_cert(root.der())) else {
        return false;
    };
    leaf.issuer().as_raw() == root.subject().as_raw()
        && leaf.verify_signature(Some(root.public_key())).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{CertificateAuthority, SpiffeId, DEFAULT_LEAF_TTL};

    #[test]
    fn rotation_bookkeeping() {
        let mut ca = CertificateAuthority::ephemeral("rot.consul").unwrap();
        let old = ca.root().clone();
        let bundle = TrustBundle::new(old.clone()).unwrap();
        let web = SpiffeId::new("rot.consul", "default", "dc1", "web").unwrap();
        let api = SpiffeId::new("rot.consul", "default", "dc1", "api").unwrap();
        let web_old = ca.issue_leaf(&web, DEFAULT_LEAF_TTL).unwrap();
        let api_old = ca.issue_leaf(&api, DEFAULT_LEAF_TTL).unwrap();
        assert!(bundle.stale_leaves([&web_old, &api_old]).is_empty());
        assert_eq!(bundle.signer_of(&web_old), Some(old.clone()));
        let g0 = bundle.generation();

        let new = ca.rotate().unwrap();
        bundle.add_active_root(new.clone()).unwrap();
        assert!(bundle.generation() > g0);
        assert_eq!(bundle.roots(), vec![old.clone(), new.clone()]);
        assert_eq!(bundle.active_root(), new);
        assert_eq!(bundle.stale_leaves([&web_old, &api_old]).len(), 2);

        let web_new = ca.issue_leaf(&web, DEFAULT_LEAF_TTL).unwrap();
        assert_eq!(bundle.signer_of(&web_new), Some(new.clone()));
        let stale = bundle.stale_leaves([&web_new, &api_old]);
        assert_eq!(stale.len(), 1);
        assert_eq!(stale[0].id(), &api);

        // The active root cannot go; an unknown one is an error.
        assert!(matches!(bundle.retire_root(&new), Err(Error::Bundle(_))));
        let stranger = CertificateAuthority::ephemeral("rot.consul").unwrap();
        assert!(matches!(
            bundle.retire_root(stranger.root()),
            Err(Error::Bundle(_))
        ));
        assert_eq!(
            bundle.signer_of(&stranger.issue_leaf(&web, DEFAULT_LEAF_TTL).unwrap()),
            None
        );

        bundle.retire_root(&old).unwrap();
        assert_eq!(bundle.roots(), vec![new.clone()]);
        assert_eq!(bundle.signer_of(&api_old), None);

        // Re-adding an old root makes it trusted and active again.
        bundle.add_active_root(old.clone()).unwrap();
        assert_eq!(bundle.roots(), vec![new, old]);

        let foreign = CertificateAuthority::ephemeral("other.consul").unwrap();
        assert!(matches!(
            bundle.add_active_root(foreign.root().clone()),
            Err(Error::TrustDomainMismatch { .. })
        ));
    }
}
