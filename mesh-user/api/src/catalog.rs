//! The catalog the API serves (Consul's `/v1/catalog/*`, `/v1/health/*` and
//! `/v1/internal/ui/*`): the agent's loop [publishes](PublishedCatalog::publish) a
//! [`CatalogSnapshot`] after every change, the API reads the last one and waits on it for
//! blocking queries.

use std::sync::Arc;

use tokio::sync::watch;

pub use mesh_core::catalog::ports::{CatalogSnapshot, Instance};

/// The last published catalog and its index, which grows by one with every publication that
/// changes something (a snapshot equal to the last one changes nothing).
#[derive(Debug)]
pub struct PublishedCatalog {
    tx: watch::Sender<(u64, Arc<CatalogSnapshot>)>,
}

impl Default for PublishedCatalog {
    fn default() -> Self {
        PublishedCatalog {
            tx: watch::Sender::new((0, Arc::new(CatalogSnapshot::default()))),
        }
    }
}

impl PublishedCatalog {
    /// Makes `snapshot` the catalog the API serves; returns whether it differed from the last
    /// one (then the index grew and blocked queries woke).
    pub fn publish(&self, snapshot: CatalogSnapshot) -> bool {
        self.tx.send_if_modified(|(index, current)| {
            if **current == snapshot {
                return false;
            }
            *index += 1;
            *current = Arc::new(snapshot);
            true
        })
    }

    /// The catalog now and its index (0 before the first publication).
    pub fn current(&self) -> (u64, Arc<CatalogSnapshot>) {
        self.tx.borrow().clone()
    }

    /// A receiver that wakes at every change.
    pub(crate) fn subscribe(&self) -> watch::Receiver<(u64, Arc<CatalogSnapshot>)> {
        self.tx.subscribe()
    }
}
