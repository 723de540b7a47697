//! Intentions managed from outside the API: the `service-intentions` entries made from
//! consul-k8s's `ServiceIntentions` objects carry `Meta["external-source"] = "kubernetes"` and
//! are read-only through the API and CLI (Consul's UI shows them as "Managed by CRDs"); only
//! [`RuleSet::sync_kubernetes_entries`] writes them.

use std::collections::BTreeMap;

use super::RuleSet;
use crate::intentions::{Error, Result, ServiceIntentionsEntry, ServiceName};

/// `Meta` key naming who manages a config entry (consul-k8s's `common.SourceKey`).
pub const META_EXTERNAL_SOURCE: &str = "external-source";
/// The value of [`META_EXTERNAL_SOURCE`] on entries made from Kubernetes objects
/// (consul-k8s's `common.SourceValue`).
pub const EXTERNAL_SOURCE_KUBERNETES: &str = "kubernetes";

fn from_kubernetes(meta: &BTreeMap<String, String>) -> bool {
    meta.get(META_EXTERNAL_SOURCE).map(String::as_str) == Some(EXTERNAL_SOURCE_KUBERNETES)
}

/// How one entry of a [`RuleSet::sync_kubernetes_entries`] fared.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SyncOutcome {
    /// The rule set holds the entry as given.
    Synced,
    /// The entry was not written: `reason` is consul-k8s's condition reason
    /// (`ExternallyManagedConfigError`, `ConsulAgentError`), `message` says why.
    Failed {
        /// consul-k8s's reason word.
        reason: String,
        /// What went wrong.
        message: String,
    },
}

impl RuleSet {
    /// Whether the intentions to `destination` come from a Kubernetes `ServiceIntentions`
    /// object (their entry's `Meta["external-source"]` is `kubernetes`).
    pub fn managed_by_kubernetes(&self, destination: &ServiceName) -> bool {
        self.entries
            .get(destination)
            .is_some_and(|e| from_kubernetes(&e.meta))
    }

    /// Refuses a write through the API to the intentions of `destination` when they are
    /// managed by Kubernetes, or a write that would mark its intentions as such (`meta`).
    ///
    /// # Errors
    ///
    /// [`Error::ReadOnly`] as said.
    pub fn check_writable(
        &self,
        destination: &ServiceName,
        meta: &BTreeMap<String, String>,
    ) -> Result<()> {
        if self.managed_by_kubernetes(destination) {
            return Err(Error::ReadOnly {
                message: format!(
                    "intentions to {destination} are managed by a Kubernetes ServiceIntentions \
                     object (Meta external-source = kubernetes) and are read-only here: change \
                     or delete that object instead (meshctl apply -f / meshctl delete -f)"
                ),
            });
        }
        if from_kubernetes(meta) {
            return Err(Error::ReadOnly {
                message: format!(
                    "Meta {META_EXTERNAL_SOURCE:?} = {EXTERNAL_SOURCE_KUBERNETES:?} is reserved \
                     for intentions made from Kubernetes ServiceIntentions objects"
                ),
            });
        }
        Ok(())
    }

    /// Makes the Kubernetes-managed entries exactly `entries` (each with
    /// `Meta["external-source"] = "kubernetes"`, one per destination), as consul-k8s's
    /// controller keeps Consul in step with the `ServiceIntentions` objects: a managed entry
    /// no longer wanted is deleted; a wanted one is written unless its destination already
    /// has intentions made through the API, which are left alone (consul-k8s's
    /// `ExternallyManagedConfigError`: "config entry already exists in Consul"). An entry
    /// already held as given is not rewritten. Returns one outcome per entry, in order.
    pub fn sync_kubernetes_entries(
        &mut self,
        entries: &[ServiceIntentionsEntry],
    ) -> Vec<(ServiceName, SyncOutcome)> {
        let stale: Vec<ServiceName> = self
            .entries
            .iter()
            .filter(|(d, e)| {
                from_kubernetes(&e.meta) && !entries.iter().any(|w| &w.destination == *d)
            })
            .map(|(d, _)| d.clone())
            .collect();
        for d in stale {
            self.delete_entry(&d);
        }
        let mut out = Vec::new();
        for entry in entries {
            let dst = entry.destination.clone();
            let outcome = if self.entries.contains_key(&dst) && !self.managed_by_kubernetes(&dst) {
                SyncOutcome::Failed {
                    reason: "ExternallyManagedConfigError".into(),
                    message: "config entry already exists in Consul".into(),
                }
            } else if self.holds(entry) {
                SyncOutcome::Synced
            } else {
                match self.write_entry(entry) {
                    Ok(()) => SyncOutcome::Synced,
                    Err(e) => SyncOutcome::Failed {
                        reason: "ConsulAgentError".into(),
                        message: e.to_string(),
                    },
                }
            };
            out.push((dst, outcome));
        }
        out
    }

    /// Whether the rule set's entry for `entry`'s destination has the same meta and sources
    /// (sources, actions, descriptions).
    pub fn holds(&self, entry: &ServiceIntentionsEntry) -> bool {
        let Ok(want) = entry.normalized() else {
            return false;
        };
        self.entry(&entry.destination).is_some_and(|have| {
            let key = |e: &ServiceIntentionsEntry| {
                let mut s: Vec<String> = e
                    .sources
                    .iter()
                    .map(|s| format!("{}|{}|{}", s.source, s.action.as_str(), s.description))
                    .collect();
                s.sort();
                s
            };
            have.meta == want.meta && key(&have) == key(&want)
        })
    }
}
