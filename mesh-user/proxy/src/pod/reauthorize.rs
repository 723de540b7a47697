//! Re-asking the authorizer about a pod's established inbound connections after a rule
//! change, and the registry of those connections that makes it possible.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Mutex, MutexGuard};

use tokio::sync::oneshot;

use super::PodProxy;
use crate::metrics::{Reporter, TcpLabels};
use crate::Decision;
use mesh_core::identity::SpiffeId;

impl PodProxy {
    /// Asks the [`Authorizer`](crate::Authorizer) again about every established inbound connection
    /// of the pod (call it after a rule change) and closes those it now denies, each with a log
    /// line. A connection served byte for byte whose pair now needs request-by-request
    /// decisions (an L7 intention appeared) is closed too, so that the client reconnects into
    /// the HTTP path. Returns how many it closed; they end (and leave the active count) shortly
    /// after.
    pub fn reauthorize(&self) -> usize {
        let service = self.pod.id();
        let authorizer = &self.shared.authorizer;
        let denied: Vec<(u64, SpiffeId, Decision)> = self
            .pod
            .inbound
            .callers()
            .into_iter()
            .filter_map(|(id, caller, per_request)| {
                let decision = authorizer.authorize(&caller, service);
                if !decision.allowed {
                    Some((id, caller, decision))
                } else if decision.per_request && !per_request {
                    // Not a denial: closed so that the client comes back into the HTTP path.
                    let reason = format!("requests now decided one by one: {}", decision.reason);
                    Some((id, caller, Decision { reason, ..decision }))
                } else {
                    None
                }
            })
            .collect();
        denied
            .into_iter()
            .filter(|(id, caller, decision)| {
                let revoked = self.pod.inbound.revoke(*id, decision.reason.clone());
                if revoked && !decision.allowed {
                    let labels = TcpLabels::mesh(Reporter::Destination, caller, service);
                    let intention = decision.intention.as_deref();
                    self.shared.metrics.denied(&labels, intention, true);
                }
                revoked
            })
            .count()
    }
}

/// A registered connection: its caller, the channel that closes it, and whether its requests
/// are decided one by one.
type Entry = (SpiffeId, oneshot::Sender<String>, bool);

/// The established inbound connections of a pod, by caller, with a channel to close each.
#[derive(Default)]
pub(crate) struct InboundRegistry {
    next: AtomicU64,
    conns: Mutex<HashMap<u64, Entry>>,
}

impl InboundRegistry {
    /// Registers a connection from `caller`; the receiver yields a reason when it is revoked.
    /// The registration ends when the returned guard drops.
    pub(crate) fn register(
        &self,
        caller: SpiffeId,
    ) -> (Registration<'_>, oneshot::Receiver<String>) {
        let id = self.next.fetch_add(1, Relaxed);
        let (tx, rx) = oneshot::channel();
        self.lock().insert(id, (caller, tx, false));
        (Registration { registry: self, id }, rx)
    }

    fn callers(&self) -> Vec<(u64, SpiffeId, bool)> {
        self.lock()
            .iter()
            .map(|(id, (caller, _, per_request))| (*id, caller.clone(), *per_request))
            .collect()
    }

    /// Closes connection `id` with `reason`; false if it already ended.
    fn revoke(&self, id: u64, reason: String) -> bool {
        match self.lock().remove(&id) {
            Some((_, tx, _)) => tx.send(reason).is_ok(),
            None => false,
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<u64, Entry>> {
        self.conns.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Removes a connection from the [`InboundRegistry`] on drop.
pub(crate) struct Registration<'a> {
    registry: &'a InboundRegistry,
    id: u64,
}

impl Registration<'_> {
    /// Marks the connection as decided request by request (the HTTP path).
    pub(crate) fn set_per_request(&self) {
        if let Some(entry) = self.registry.lock().get_mut(&self.id) {
            entry.2 = true;
        }
    }
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        self.registry.lock().remove(&self.id);
    }
}
