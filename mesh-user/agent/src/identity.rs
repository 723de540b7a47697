//! Workload certificates: one renewing leaf per service identity, signed by the mesh CA in the
//! state directory (the default) or by `meshd ca` over HTTPS ([`Identity::remote`]).

use super::*;
use crate::ca::client::CaClient;

/// Who signs the leaves.
enum Signer {
    /// The CA in `<state_dir>/ca`, in this process.
    Local(Box<Mutex<CertificateAuthority>>),
    /// `meshd ca`, asked over HTTPS.
    Remote(CaClient),
}

/// The first retry after a failed renewal from a remote CA; doubled up to
/// [`RENEW_RETRY_MAX`].
const RENEW_RETRY_MIN: Duration = Duration::from_secs(5);
/// The longest wait between renewal attempts.
const RENEW_RETRY_MAX: Duration = Duration::from_secs(60);

/// Workload certificates: one signer, one renewing leaf per service identity.
pub struct Identity {
    signer: Signer,
    /// The mesh's trust bundle (the CA's roots) every proxy verifies peers against.
    pub bundle: Arc<TrustBundle>,
    /// TLS client configurations by leaf, built once and shared by outbound connections.
    pub clients: ClientConfigCache,
    leaves: Mutex<BTreeMap<ServiceRef, Arc<LeafStore>>>,
    /// Runs the renewal tasks, whichever thread asks for a leaf.
    runtime: tokio::runtime::Handle,
}

impl Identity {
    /// Loads (or creates) the CA, kept in `<state_dir>/ca`. Must be called inside the agent's
    /// tokio runtime (renewals run on it).
    ///
    /// # Errors
    ///
    /// [`Error::Identity`] if the CA cannot be read, created or written, or its root does not
    /// make a trust bundle.
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime.
    pub fn load(state_dir: &Path) -> Result<Arc<Self>, Error> {
        let ca = CertificateAuthority::load_or_create(&state_dir.join(CA_DIR), None)?;
        let bundle = Arc::new(TrustBundle::new(ca.root().clone())?);
        Ok(Self::with_signer(
            Signer::Local(Box::new(Mutex::new(ca))),
            bundle,
        ))
    }

    /// Leaves from `meshd ca` through `client`: the trust bundle starts from its root file and
    /// follows the roots the CA answers with. No key of the root is on this node. Must be
    /// called inside the agent's tokio runtime.
    ///
    /// # Errors
    ///
    /// [`Error::Ca`] if the root file cannot be read or holds no mesh root.
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime.
    pub fn remote(client: CaClient) -> Result<Arc<Self>, Error> {
        let bundle = Arc::new(client.initial_bundle()?);
        Ok(Self::with_signer(Signer::Remote(client), bundle))
    }

    fn with_signer(signer: Signer, bundle: Arc<TrustBundle>) -> Arc<Self> {
        Arc::new(Self {
            clients: ClientConfigCache::new(bundle.clone()),
            bundle,
            signer,
            leaves: Mutex::new(BTreeMap::new()),
            runtime: tokio::runtime::Handle::current(),
        })
    }

    /// The trust domain of the CA's root (a fresh CA makes `<uuid>.consul`), the host part of
    /// every SPIFFE ID.
    pub fn trust_domain(&self) -> String {
        self.bundle.trust_domain().to_string()
    }

    /// Whether leaves come from a remote CA (`meshd ca`).
    pub fn is_remote(&self) -> bool {
        matches!(self.signer, Signer::Remote(_))
    }

    fn cached(&self, service: &ServiceRef) -> Option<Arc<LeafStore>> {
        self.leaves
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(service)
            .cloned()
    }

    /// Makes sure the leaf of `service` exists: with a remote CA, asks it for the first leaf
    /// (and starts its renewal); with the local CA, issues it as [`leaf`](Self::leaf) does.
    ///
    /// # Errors
    ///
    /// [`Error::Identity`] for a service that does not make a valid SPIFFE ID, [`Error::Ca`]
    /// when the CA cannot be reached or refuses (the pod cannot be served without a leaf).
    pub async fn prepare(self: &Arc<Self>, service: &ServiceRef) -> Result<Arc<LeafStore>, Error> {
        let Signer::Remote(client) = &self.signer else {
            return self.leaf(service);
        };
        if let Some(store) = self.cached(service) {
            return Ok(store);
        }
        let id = service.spiffe_id(&self.trust_domain())?;
        let leaf = client.sign(&id, &self.bundle).await?;
        info!(%id, ca = %client.config().url, "got the leaf certificate from the CA");
        let mut leaves = self.leaves.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(store) = leaves.get(service) {
            // Another pod of the service got there first.
            return Ok(store.clone());
        }
        let store = Arc::new(LeafStore::new(leaf));
        leaves.insert(service.clone(), store.clone());
        drop(leaves);
        self.spawn_renewal(store.clone());
        Ok(store)
    }

    /// The leaf store of `service`. With the local CA it issues the first certificate (and
    /// starts its renewal) when needed; with a remote CA the leaf must have been fetched by
    /// [`prepare`](Self::prepare). The renewal task re-issues at the leaf's renewal time
    /// (retrying on failure, the last good leaf served meanwhile) and stops once the
    /// `Identity` is dropped.
    ///
    /// # Errors
    ///
    /// [`Error::Identity`] if `service` does not make a valid SPIFFE ID or the first leaf
    /// cannot be issued; [`Error::Ca`] for a remote CA's leaf not prepared yet.
    pub fn leaf(self: &Arc<Self>, service: &ServiceRef) -> Result<Arc<LeafStore>, Error> {
        let mut leaves = self.leaves.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(store) = leaves.get(service) {
            return Ok(store.clone());
        }
        let ca = match &self.signer {
            Signer::Local(ca) => ca,
            Signer::Remote(client) => {
                return Err(Error::Ca(ca::client::ClientError::Config(format!(
                    "no leaf of {service} from the CA {} yet",
                    client.config().url
                ))))
            }
        };
        let id = service.spiffe_id(&self.trust_domain())?;
        let leaf = ca
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .issue_leaf(&id, DEFAULT_LEAF_TTL)?;
        let store = Arc::new(LeafStore::new(leaf));
        leaves.insert(service.clone(), store.clone());
        drop(leaves);
        self.spawn_renewal(store.clone());
        Ok(store)
    }

    /// Issues a leaf for `id` with the signer in force.
    async fn issue(&self, id: &mesh_core::identity::SpiffeId) -> Result<LeafCert, Error> {
        match &self.signer {
            Signer::Local(ca) => Ok(ca
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .issue_leaf(id, DEFAULT_LEAF_TTL)?),
            Signer::Remote(client) => Ok(client.sign(id, &self.bundle).await?),
        }
    }

    fn spawn_renewal(self: &Arc<Self>, renewing: Arc<LeafStore>) {
        let me = Arc::downgrade(self);
        self.runtime.spawn(async move {
            let mut retry = RENEW_RETRY_MIN;
            loop {
                let at = renewing.current().renew_at();
                let wait = at
                    .duration_since(SystemTime::now())
                    .unwrap_or(Duration::ZERO);
                tokio::time::sleep(wait).await;
                let Some(identity) = me.upgrade() else { return };
                let issued = identity.issue(renewing.id()).await;
                drop(identity);
                match issued.and_then(|leaf| Ok(renewing.replace(leaf)?)) {
                    Ok(_) => {
                        retry = RENEW_RETRY_MIN;
                        info!(id = %renewing.id(), "renewed the leaf certificate");
                    }
                    Err(e) => {
                        // The last good leaf keeps being served meanwhile (past its expiry
                        // too: peers then refuse it, which is all that can happen without
                        // the CA).
                        warn!(
                            id = %renewing.id(),
                            error = %e,
                            retry_in = ?retry,
                            not_after = ?renewing.current().not_after(),
                            "leaf renewal failed; serving the last good leaf"
                        );
                        tokio::time::sleep(retry).await;
                        retry = (retry * 2).min(RENEW_RETRY_MAX);
                    }
                }
            }
        });
    }

    /// Issues and installs a new leaf for `service` now (what the renewal task does at its
    /// time); established connections keep theirs.
    ///
    /// # Errors
    ///
    /// [`Error::Identity`] if the leaf cannot be issued or installed, [`Error::Ca`] if a
    /// remote CA cannot be reached or refuses.
    pub async fn renew(self: &Arc<Self>, service: &ServiceRef) -> Result<(), Error> {
        let store = self.prepare(service).await?;
        let leaf = self.issue(store.id()).await?;
        store.replace(leaf)?;
        Ok(())
    }

    /// [`renew`](Self::renew) for the local CA, without a runtime.
    ///
    /// # Errors
    ///
    /// [`Error::Identity`] if the leaf cannot be issued or installed; [`Error::Ca`] with a
    /// remote CA (use [`renew`](Self::renew)).
    pub fn renew_now(self: &Arc<Self>, service: &ServiceRef) -> Result<(), Error> {
        let Signer::Local(ca) = &self.signer else {
            return Err(Error::Ca(ca::client::ClientError::Config(
                "renew_now works with the local CA; a remote CA's leaves renew with renew()".into(),
            )));
        };
        let store = self.leaf(service)?;
        let leaf = ca
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .issue_leaf(store.id(), DEFAULT_LEAF_TTL)?;
        store.replace(leaf)?;
        Ok(())
    }
}
