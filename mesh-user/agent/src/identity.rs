//! Workload certificates: the mesh CA and one renewing leaf per service identity.

use super::*;

/// Workload certificates: one CA, one renewing leaf per service identity.
pub struct Identity {
    ca: Mutex<CertificateAuthority>,
    /// The mesh's trust bundle (the CA's root) every proxy verifies peers against.
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
        Ok(Arc::new(Self {
            clients: ClientConfigCache::new(bundle.clone()),
            bundle,
            ca: Mutex::new(ca),
            leaves: Mutex::new(BTreeMap::new()),
            runtime: tokio::runtime::Handle::current(),
        }))
    }

    /// The trust domain of the CA's root (a fresh CA makes `<uuid>.consul`), the host part of
    /// every SPIFFE ID.
    pub fn trust_domain(&self) -> String {
        self.bundle.trust_domain().to_string()
    }

    /// The leaf store of `service`, issuing its first certificate (and starting its renewal)
    /// when needed. The renewal task re-issues at the leaf's renewal time (retrying every 60
    /// seconds on failure) and stops once the `Identity` is dropped.
    ///
    /// # Errors
    ///
    /// [`Error::Identity`] if `service` does not make a valid SPIFFE ID or the first leaf
    /// cannot be issued.
    pub fn leaf(self: &Arc<Self>, service: &ServiceRef) -> Result<Arc<LeafStore>, Error> {
        let mut leaves = self.leaves.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(store) = leaves.get(service) {
            return Ok(store.clone());
        }
        let id = service.spiffe_id(&self.trust_domain())?;
        let leaf = self
            .ca
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .issue_leaf(&id, DEFAULT_LEAF_TTL)?;
        let store = Arc::new(LeafStore::new(leaf));
        leaves.insert(service.clone(), store.clone());
        let me = Arc::downgrade(self);
        let renewing = store.clone();
        self.runtime.spawn(async move {
            loop {
                let at = renewing.current().renew_at();
                let wait = at
                    .duration_since(SystemTime::now())
                    .unwrap_or(Duration::ZERO);
                tokio::time::sleep(wait).await;
                let Some(identity) = me.upgrade() else { return };
                let issued = identity
                    .ca
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .issue_leaf(renewing.id(), DEFAULT_LEAF_TTL);
                match issued.and_then(|leaf| renewing.replace(leaf)) {
                    Ok(_) => info!(id = %renewing.id(), "renewed the leaf certificate"),
                    Err(e) => {
                        warn!(id = %renewing.id(), error = %e, "leaf renewal failed; retrying in 60 s");
                        tokio::time::sleep(Duration::from_secs(60)).await;
                    }
                }
            }
        });
        Ok(store)
    }

    /// Issues and installs a new leaf for `service` now (what the renewal task does at its
    /// time); established connections keep theirs.
    ///
    /// # Errors
    ///
    /// [`Error::Identity`] if the leaf cannot be issued or installed.
    pub fn renew_now(self: &Arc<Self>, service: &ServiceRef) -> Result<(), Error> {
        let store = self.leaf(service)?;
        let leaf = self
            .ca
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .issue_leaf(store.id(), DEFAULT_LEAF_TTL)?;
        store.replace(leaf)?;
        Ok(())
    }
}
