//! Intentions managed from outside the API: the `service-intentions` entries made from
//! consul-k8s's `ServiceIntentions` objects carry `Meta["external-source"] = "kubernetes"` and
//! are read-only through the API and CLI (Consul's UI shows them as "Managed by CRDs"); only
//! [`RuleSet::sync_kubernetes_entries`] writes them. Likewise the `service-defaults` entries
//! made from `ServiceDefaults` objects ([`RuleSet::write_kubernetes_defaults`]).

use std::collections::BTreeMap;

use super::RuleSet;
use crate::intentions::{Error, Result, ServiceDefaultsEntry, ServiceIntentionsEntry, ServiceName};

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
        if self.kubernetes_only {
            return Err(Error::ReadOnly {
                message: format!(
                    "this agent runs in a Kubernetes cluster (meshd kubernetes), where intentions \
                     come from ServiceIntentions objects (consul.hashicorp.com/v1alpha1) shared \
                     by every node; a write here would hold on this node only. Create or change \
                     the ServiceIntentions object for {destination} with kubectl instead"
                ),
            });
        }
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

    /// Refuses a write through the API to `service`'s `service-defaults` entry when a Kubernetes
    /// `ServiceDefaults` object manages it, or when the written `meta` claims to come from one.
    ///
    /// # Errors
    /// [`Error::ReadOnly`] naming the object to change instead.
    pub fn check_defaults_writable(
        &self,
        service: &ServiceName,
        meta: &BTreeMap<String, String>,
    ) -> Result<()> {
        if self
            .service_defaults(service)
            .is_some_and(|e| from_kubernetes(&e.meta))
        {
            return Err(Error::ReadOnly {
                message: format!(
                    "the service-defaults entry of {service} is managed by a Kubernetes \
                     ServiceDefaults object (Meta external-source = kubernetes) and is read-only \
                     here: change or delete that object instead (meshctl apply -f / meshctl \
                     delete -f)"
                ),
            });
        }
        if from_kubernetes(meta) {
            return Err(Error::ReadOnly {
                message: format!(
                    "Meta {META_EXTERNAL_SOURCE:?} = {EXTERNAL_SOURCE_KUBERNETES:?} is reserved \
                     for entries made from Kubernetes ServiceDefaults objects"
                ),
            });
        }
        Ok(())
    }

    /// The first half of bringing the `service-defaults` entries in step with the
    /// `ServiceDefaults` objects, as consul-k8s's controller writes each object into Consul's
    /// `service-defaults` entry: writes every wanted entry, marked `Meta["external-source"] =
    /// "kubernetes"`, unless the service already has an entry made through the API
    /// (`ExternallyManagedConfigError`). Run it before
    /// [`sync_kubernetes_entries`](Self::sync_kubernetes_entries), so that L7 intentions of the
    /// same apply find their destination's `http` protocol, and
    /// [`remove_stale_kubernetes_defaults`](Self::remove_stale_kubernetes_defaults) after it.
    /// Returns one outcome per wanted entry, in order.
    pub fn write_kubernetes_defaults(
        &mut self,
        wanted: &[ServiceDefaultsEntry],
    ) -> Vec<(ServiceName, SyncOutcome)> {
        wanted
            .iter()
            .map(|w| {
                let mut entry = w.clone();
                entry.meta.insert(
                    META_EXTERNAL_SOURCE.to_owned(),
                    EXTERNAL_SOURCE_KUBERNETES.to_owned(),
                );
                let outcome = match self.service_defaults(&entry.service) {
                    Some(held) if !from_kubernetes(&held.meta) => SyncOutcome::Failed {
                        reason: "ExternallyManagedConfigError".into(),
                        message: "config entry already exists in Consul".into(),
                    },
                    Some(held) if held.protocol == entry.protocol && held.meta == entry.meta => {
                        SyncOutcome::Synced
                    }
                    _ => match self.put_service_defaults(&entry) {
                        Ok(()) => SyncOutcome::Synced,
                        Err(e) => SyncOutcome::Failed {
                            reason: "ConsulAgentError".into(),
                            message: e.to_string(),
                        },
                    },
                };
                (entry.service, outcome)
            })
            .collect()
    }

    /// The second half (see [`write_kubernetes_defaults`](Self::write_kubernetes_defaults)):
    /// deletes the managed `service-defaults` entries no object wants any more. An entry still
    /// needed by L7 intentions made through the API stays, reported as failed.
    pub fn remove_stale_kubernetes_defaults(
        &mut self,
        wanted: &[ServiceDefaultsEntry],
    ) -> Vec<(ServiceName, SyncOutcome)> {
        let stale: Vec<ServiceName> = self
            .service_defaults_list()
            .into_iter()
            .filter(|e| from_kubernetes(&e.meta) && !wanted.iter().any(|w| w.service == e.service))
            .map(|e| e.service.clone())
            .collect();
        stale
            .into_iter()
            .map(|service| {
                let outcome = match self.remove_service_defaults(&service) {
                    Ok(_) => SyncOutcome::Synced,
                    Err(e) => SyncOutcome::Failed {
                        reason: "ConsulAgentError".into(),
                        message: e.to_string(),
                    },
                };
                (service, outcome)
            })
            .collect()
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

    /// `ServiceDefaults` objects become managed `service-defaults` entries written before the
    /// intentions (so an object's L7 intention is accepted in the same sync), read-only through
    /// the API, and removed after the intentions once no object wants them; an entry made
    /// through the API is left alone.
    #[test]
    fn synced_service_defaults_come_before_l7_intentions_and_are_read_only() {
        use crate::catalog::Protocol;
        let l7 = managed(
            r#"{"Kind":"service-intentions","Name":"api","Meta":{"external-source":"kubernetes"},
                "Sources":[{"Name":"web","Permissions":[{"Action":"allow","HTTP":{"PathPrefix":"/"}}]}]}"#,
        );
        let http = ServiceDefaultsEntry::new(name("default/api"), Protocol::Http);
        let mut rules = RuleSet::new();
        // Without the defaults first, the L7 intention is refused.
        let out = rules.sync_kubernetes_entries(std::slice::from_ref(&l7));
        assert!(matches!(out[0].1, SyncOutcome::Failed { .. }), "{out:?}");
        let written = rules.write_kubernetes_defaults(std::slice::from_ref(&http));
        assert_eq!(written, [(name("default/api"), SyncOutcome::Synced)]);
        let out = rules.sync_kubernetes_entries(std::slice::from_ref(&l7));
        assert_eq!(out, [(name("default/api"), SyncOutcome::Synced)]);
        assert!(rules.has_permissions(&name("default/web"), &name("default/api")));
        let held = rules.service_defaults(&name("default/api")).unwrap();
        assert_eq!(held.meta[META_EXTERNAL_SOURCE], EXTERNAL_SOURCE_KUBERNETES);
        // Read-only through the API, and the marker is reserved.
        let err = rules
            .delete_service_defaults(&name("default/api"))
            .unwrap_err();
        assert!(matches!(err, Error::ReadOnly { .. }), "{err}");
        let err = rules.apply_service_defaults(&http).unwrap_err();
        assert!(matches!(err, Error::ReadOnly { .. }), "{err}");
        let mut claims = ServiceDefaultsEntry::new(name("default/db"), Protocol::Http);
        claims.meta.insert(
            META_EXTERNAL_SOURCE.into(),
            EXTERNAL_SOURCE_KUBERNETES.into(),
        );
        assert!(matches!(
            rules.apply_service_defaults(&claims),
            Err(Error::ReadOnly { .. })
        ));
        // Writing the same again changes nothing.
        let index = rules.index();
        rules.write_kubernetes_defaults(std::slice::from_ref(&http));
        assert_eq!(rules.index(), index);
        // An API-made entry is not taken over.
        rules
            .apply_service_defaults(&ServiceDefaultsEntry::new(
                name("default/db"),
                Protocol::Tcp,
            ))
            .unwrap();
        let db = ServiceDefaultsEntry::new(name("default/db"), Protocol::Http);
        let out = rules.write_kubernetes_defaults(&[http.clone(), db]);
        assert!(
            matches!(&out[1].1, SyncOutcome::Failed { reason, .. } if reason == "ExternallyManagedConfigError")
        );
        // Both objects deleted: intentions leave first, then the defaults.
        assert!(rules.sync_kubernetes_entries(&[]).is_empty());
        let removed = rules.remove_stale_kubernetes_defaults(&[]);
        assert_eq!(removed, [(name("default/api"), SyncOutcome::Synced)]);
        assert!(rules.service_defaults(&name("default/api")).is_none());
        assert!(rules.service_defaults(&name("default/db")).is_some());
    }

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
