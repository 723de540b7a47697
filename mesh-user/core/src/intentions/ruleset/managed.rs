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

    /// Whether the rule set's entry for `entry`'s destination is the same entry: the same
    /// `Meta` and sources, field for field as Consul's JSON shows them (so that any field a
    /// source carries counts), indexes aside.
    pub fn holds(&self, entry: &ServiceIntentionsEntry) -> bool {
        let Ok(want) = entry.normalized() else {
            return false;
        };
        let canonical = |e: &ServiceIntentionsEntry| {
            let mut e = e.clone();
            e.create_index = 0;
            e.modify_index = 0;
            e.sources.sort_by(|a, b| {
                b.precedence
                    .cmp(&a.precedence)
                    .then_with(|| a.source.cmp(&b.source))
            });
            e.to_json()
        };
        self.entry(&entry.destination)
            .is_some_and(|have| canonical(&have) == canonical(&want))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::intentions::{Action, IntentionSpec};

    fn managed(json: &str) -> ServiceIntentionsEntry {
        ServiceIntentionsEntry::from_json(json).unwrap()
    }

    fn name(s: &str) -> ServiceName {
        let (ns, n) = s.split_once('/').unwrap();
        ServiceName::new(ns, n).unwrap()
    }

    const API: &str = r#"{"Kind":"service-intentions","Name":"api","Namespace":"default",
        "Meta":{"external-source":"kubernetes"},
        "Sources":[{"Name":"web","Action":"allow"}]}"#;

    #[test]
    fn synced_entries_are_read_only_and_leave_when_no_longer_wanted() {
        let mut rules = RuleSet::new();
        let out = rules.sync_kubernetes_entries(&[managed(API)]);
        assert_eq!(out, [(name("default/api"), SyncOutcome::Synced)]);
        assert!(
            rules
                .check(&name("default/web"), &name("default/api"))
                .allowed
        );
        assert!(rules.managed_by_kubernetes(&name("default/api")));

        // Every write through the rule set's API is refused.
        let spec = IntentionSpec::new(&name("default/db"), &name("default/api"), Action::Allow);
        assert!(matches!(
            rules.create(&spec, false),
            Err(Error::ReadOnly { .. })
        ));
        let id = rules
            .get_exact(&name("default/web"), &name("default/api"))
            .unwrap()
            .id
            .clone();
        assert!(matches!(rules.delete(&id), Err(Error::ReadOnly { .. })));
        assert!(matches!(
            rules.update(&id, &spec),
            Err(Error::ReadOnly { .. })
        ));
        let overwrite = ServiceIntentionsEntry::from_json(
            r#"{"Kind":"service-intentions","Name":"api","Sources":[{"Name":"web","Action":"deny"}]}"#,
        )
        .unwrap();
        assert!(matches!(
            rules.apply_entry(&overwrite),
            Err(Error::ReadOnly { .. })
        ));
        // Nor may an API write claim to come from Kubernetes.
        let claim = managed(&API.replace("\"api\"", "\"other\""));
        assert!(matches!(
            rules.apply_entry(&claim),
            Err(Error::ReadOnly { .. })
        ));
        assert!(
            rules
                .check(&name("default/web"), &name("default/api"))
                .allowed
        );

        // Syncing the same set again changes nothing; an empty set removes it.
        let index = rules.index();
        rules.sync_kubernetes_entries(&[managed(API)]);
        assert_eq!(rules.index(), index);
        rules.sync_kubernetes_entries(&[]);
        assert!(rules.entry(&name("default/api")).is_none());
    }

    #[test]
    fn an_entry_made_through_the_api_is_left_alone_and_the_sync_says_why() {
        let mut rules = RuleSet::new();
        let spec = IntentionSpec::new(&name("default/db"), &name("default/api"), Action::Allow);
        rules.create(&spec, false).unwrap();
        let out = rules.sync_kubernetes_entries(&[managed(API)]);
        assert_eq!(
            out,
            [(
                name("default/api"),
                SyncOutcome::Failed {
                    reason: "ExternallyManagedConfigError".into(),
                    message: "config entry already exists in Consul".into(),
                }
            )]
        );
        assert!(
            !rules
                .check(&name("default/web"), &name("default/api"))
                .allowed
        );
        assert!(
            rules
                .check(&name("default/db"), &name("default/api"))
                .allowed
        );
        // And a sync without it does not delete what the API made.
        rules.sync_kubernetes_entries(&[]);
        assert!(
            rules
                .check(&name("default/db"), &name("default/api"))
                .allowed
        );
    }
}
