//! Changes to a catalog (whole or delta) and what they changed.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use super::{Catalog, Error, Service, ServiceRef, Workload};

/// A change to the catalog.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Update {
    /// Replace everything.
    Full(Catalog),
    /// Add or replace, and remove, services and workloads by key.
    Delta {
        /// Services to add, or to replace when one with the same key exists.
        #[serde(default)]
        upsert_services: Vec<Service>,
        /// Services to remove; unknown keys are ignored.
        #[serde(default)]
        remove_services: Vec<ServiceRef>,
        /// Workloads to add, or to replace when one with the same id exists.
        #[serde(default)]
        upsert_workloads: Vec<Workload>,
        /// Workload ids (`namespace.name`).
        #[serde(default)]
        remove_workloads: Vec<String>,
    },
}

/// What an update changed, by key.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Diff {
    /// Services added or whose entry differs.
    pub services_changed: BTreeSet<ServiceRef>,
    /// Services no longer in the catalog.
    pub services_removed: BTreeSet<ServiceRef>,
    /// Workload ids (`namespace.name`) added or whose entry differs.
    pub workloads_changed: BTreeSet<String>,
    /// Workload ids no longer in the catalog.
    pub workloads_removed: BTreeSet<String>,
}

impl Diff {
    /// Whether the update changed nothing.
    pub fn is_empty(&self) -> bool {
        self.services_changed.is_empty()
            && self.services_removed.is_empty()
            && self.workloads_changed.is_empty()
            && self.workloads_removed.is_empty()
    }
}

impl Catalog {
    /// Applies an update. The result is validated as a whole; on error the catalog is unchanged.
    ///
    /// # Errors
    ///
    /// [`Error::Invalid`] if the resulting catalog does not pass [`Catalog::validate`].
    pub fn apply(&mut self, update: Update) -> Result<Diff, Error> {
        let next = match update {
            Update::Full(c) => c,
            Update::Delta {
                upsert_services,
                remove_services,
                upsert_workloads,
                remove_workloads,
            } => {
                let mut next = self.clone();
                next.services
                    .retain(|s| !remove_services.contains(&s.service_ref()));
                next.workloads
                    .retain(|w| !remove_workloads.contains(&w.id()));
                for s in upsert_services {
                    match next
                        .services
                        .iter_mut()
                        .find(|x| x.service_ref() == s.service_ref())
                    {
                        Some(slot) => *slot = s,
                        None => next.services.push(s),
                    }
                }
                for w in upsert_workloads {
                    match next.workloads.iter_mut().find(|x| x.id() == w.id()) {
                        Some(slot) => *slot = w,
                        None => next.workloads.push(w),
                    }
                }
                next
            }
        };
        next.validate()?;
        let diff = self.diff(&next);
        *self = next;
        Ok(diff)
    }

    /// What changes from `self` to `next`.
    pub fn diff(&self, next: &Catalog) -> Diff {
        let mut d = Diff::default();
        for s in &next.services {
            if self.service(&s.service_ref()) != Some(s) {
                d.services_changed.insert(s.service_ref());
            }
        }
        for s in &self.services {
            if next.service(&s.service_ref()).is_none() {
                d.services_removed.insert(s.service_ref());
            }
        }
        for w in &next.workloads {
            if self.workload(&w.id()) != Some(w) {
                d.workloads_changed.insert(w.id());
            }
        }
        for w in &self.workloads {
            if next.workload(&w.id()).is_none() {
                d.workloads_removed.insert(w.id());
            }
        }
        d
    }
}
