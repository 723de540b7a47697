//! The set of all intentions, with Consul's operations and the config-entry view.
//!
//! This module holds the rule set itself (its indexes, Consul's intention CRUD and the write
//! bookkeeping); `query` answers the read-side questions (match, check) and `entries` keeps
//! the `service-intentions` config-entry view and the durable restore.

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::time::SystemTime;

// Persistent maps: a clone shares every node and a write copies only the path to what it
// changes, so the copy of a rule set per write (the API's new version, the agent's) is O(1)
// rather than a copy of every intention (about 0.6 s for 100,000).
use imbl::{HashMap, OrdMap, OrdSet};

pub use entries::EntryIndexes;

use super::intention::{precedence, Normalized};
use super::{Action, Error, Intention, IntentionSpec, Result, ServiceName};

mod entries;
mod journal;
mod l7;
mod managed;
mod query;

#[cfg(test)]
mod tests;

pub use l7::RequestDecision;
pub use managed::{SyncOutcome, EXTERNAL_SOURCE_KUBERNETES, META_EXTERNAL_SOURCE};
pub use query::{Decision, MatchType, Matched};

/// (source, destination): the identity of an intention.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct PairKey {
    src: ServiceName,
    dst: ServiceName,
}

/// Entry-level state for one destination: exists while it has intentions.
#[derive(Clone, Debug, PartialEq, Eq)]
struct EntryState {
    meta: BTreeMap<String, String>,
    create_index: u64,
    modify_index: u64,
}

/// Consul's sort for intentions: precedence high to low, then source namespace, source name,
/// destination namespace, destination name.
fn precedence_order(a: &Intention, b: &Intention) -> Ordering {
    b.precedence
        .cmp(&a.precedence)
        .then_with(|| a.source.cmp(&b.source))
        .then_with(|| a.destination.cmp(&b.destination))
}

/// What a rule set holds that another does not, from [`RuleSet::changes_from`]: each list in
/// key order, each key at most once.
#[derive(Debug, Default)]
pub struct RuleSetChanges<'a> {
    /// Intentions that are new or whose any field changed, as they are now.
    pub intentions_put: Vec<&'a Intention>,
    /// Intentions gone: (source, destination).
    pub intentions_removed: Vec<(&'a ServiceName, &'a ServiceName)>,
    /// `service-intentions` entries (by destination) that are new or whose meta or indexes
    /// changed, as they are now.
    pub entries_put: Vec<EntryIndexes>,
    /// Destinations whose `service-intentions` entry is gone.
    pub entries_removed: Vec<&'a ServiceName>,
    /// `service-defaults` entries that are new or changed, as they are now.
    pub service_defaults_put: Vec<&'a super::ServiceDefaultsEntry>,
    /// Services whose `service-defaults` entry is gone.
    pub service_defaults_removed: Vec<&'a ServiceName>,
}

impl RuleSetChanges<'_> {
    /// Whether nothing differs.
    pub fn is_empty(&self) -> bool {
        self.intentions_put.is_empty()
            && self.intentions_removed.is_empty()
            && self.entries_put.is_empty()
            && self.entries_removed.is_empty()
            && self.service_defaults_put.is_empty()
            && self.service_defaults_removed.is_empty()
    }
}

/// Every intention known to the agent, with a default policy for connections none matches.
///
/// Each write operation either succeeds whole or returns an error and changes nothing; each
/// successful write advances a write index (like Consul's Raft index) recorded in
/// `CreateIndex`/`ModifyIndex`.
#[derive(Clone, Debug)]
pub struct RuleSet {
    default_policy: Action,
    /// destination → source → intention: the intentions themselves.
    by_dst: OrdMap<ServiceName, OrdMap<ServiceName, Intention>>,
    /// source → destinations that have an intention from it.
    by_src: HashMap<ServiceName, OrdSet<ServiceName>>,
    /// ID → (source, destination).
    ids: HashMap<String, PairKey>,
    count: usize,
    entries: OrdMap<ServiceName, EntryState>,
    index: u64,
    next_counter: u32,
    service_defaults: OrdMap<ServiceName, super::ServiceDefaultsEntry>,
    /// `meshd kubernetes`: intentions come from `ServiceIntentions` objects only; every write
    /// through the API is refused (it would hold on one node only). Not stored: each start
    /// sets it.
    kubernetes_only: bool,
    /// The pairs recent writes touched, for compiling only what changed.
    journal: journal::Journal,
}

impl Default for RuleSet {
    fn default() -> Self {
        RuleSet::new()
    }
}

impl RuleSet {
    /// An empty rule set whose default policy is deny (the agent's default).
    pub fn new() -> Self {
        RuleSet::with_default_policy(Action::Deny)
    }

    /// An empty rule set with the given default policy.
    pub fn with_default_policy(default_policy: Action) -> Self {
        RuleSet {
            default_policy,
            by_dst: OrdMap::new(),
            by_src: HashMap::new(),
            ids: HashMap::new(),
            count: 0,
            entries: OrdMap::new(),
            index: 0,
            next_counter: 0,
            service_defaults: OrdMap::new(),
            kubernetes_only: false,
            journal: journal::Journal::new(),
        }
    }

    /// Refuses (`true`) every intention write through the API, as `meshd kubernetes` does:
    /// there the `ServiceIntentions` objects are the only source, shared by every node.
    pub fn set_kubernetes_only(&mut self, on: bool) {
        self.kubernetes_only = on;
    }

    /// What happens to connections no intention matches.
    pub fn default_policy(&self) -> Action {
        self.default_policy
    }

    /// Changes the default policy.
    pub fn set_default_policy(&mut self, policy: Action) {
        self.default_policy = policy;
        self.journal.touch(None);
    }

    /// The version of this rule set's current state: unique in the process, so that a kernel
    /// form compiled from this state can later find what changed since
    /// ([`RuleSet::changes_since`]). Clones share their history up to the clone.
    pub fn version(&self) -> u64 {
        self.journal.version()
    }

    /// The (source, destination) pairs whose intention writes may have changed since the state
    /// of `version` ([`RuleSet::version`]), oldest first, repeats kept, and whether the default
    /// policy was set since. `None` when this rule set does not descend from that state or no
    /// longer remembers that far back (some thousands of writes): compile it in full then.
    pub fn changes_since(&self, version: u64) -> Option<(Vec<(&ServiceName, &ServiceName)>, bool)> {
        self.journal.since(version)
    }

    /// Whether this rule set continues the state of `version` ([`RuleSet::version`]) and still
    /// remembers it: exactly when [`RuleSet::changes_since`] would be `Some`, without listing
    /// the changes.
    pub fn descends_from(&self, version: u64) -> bool {
        self.journal.remembers(version)
    }

    /// Number of intentions.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Whether there are no intentions.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The index of the last successful write (0 before any).
    pub fn index(&self) -> u64 {
        self.index
    }

    /// Creates an intention. If one already exists for the same source and destination, this
    /// fails with [`Error::Duplicate`] unless `replace`, in which case that intention
    /// is updated in place (same ID; as `PUT /v1/connect/intentions/exact` does).
    ///
    /// # Errors
    ///
    /// [`Error::Invalid`] if the spec does not validate, [`Error::Duplicate`] as said,
    /// [`Error::Exhausted`] when no counter index is left. Nothing changes on error.
    pub fn create(&mut self, spec: &IntentionSpec, replace: bool) -> Result<&Intention> {
        let n = spec.normalize()?;
        self.check_writable(&n.destination, &n.meta)?;
        self.check_l7_protocol(&n.destination, !n.permissions.is_empty(), "Permissions")?;
        let key = PairKey {
            src: n.source.clone(),
            dst: n.destination.clone(),
        };
        let index = self.index + 1;
        let now = SystemTime::now();
        if let Some(existing) = self.lookup_mut(&key) {
            if !replace {
                return Err(Error::Duplicate {
                    existing: existing.to_string(),
                });
            }
            existing.action = n.action;
            existing.permissions = n.permissions;
            existing.description = n.description;
            existing.meta = n.meta;
            existing.updated_at = now;
            existing.modify_index = index;
            self.journal.touch(Some(&key));
        } else {
            let counter_index = self.next_counter_index()?;
            let id = self.fresh_id();
            self.insert_raw(new_intention(n, id, counter_index, now, index));
        }
        self.commit(index, [&key.dst]);
        self.lookup(&key).ok_or_else(|| not_found("modify", ""))
    }

    /// Replaces the intention with this ID (source and destination may change). Fails with
    /// [`Error::NotFound`] for an unknown ID and [`Error::Duplicate`] when
    /// another intention already has the new source/destination pair.
    ///
    /// # Errors
    ///
    /// [`Error::NotFound`] and [`Error::Duplicate`] as said, [`Error::Invalid`] if the spec
    /// does not validate. Nothing changes on error.
    pub fn update(&mut self, id: &str, spec: &IntentionSpec) -> Result<&Intention> {
        let old_key = self
            .ids
            .get(id)
            .cloned()
            .ok_or_else(|| not_found("modify", id))?;
        let n = spec.normalize()?;
        self.check_writable(&old_key.dst, &n.meta)?;
        self.check_writable(&n.destination, &n.meta)?;
        self.check_l7_protocol(&n.destination, !n.permissions.is_empty(), "Permissions")?;
        let new_key = PairKey {
            src: n.source.clone(),
            dst: n.destination.clone(),
        };
        if new_key != old_key {
            if let Some(other) = self.lookup(&new_key) {
                return Err(Error::Duplicate {
                    existing: other.to_string(),
                });
            }
        }
        let Some(mut it) = self.remove_raw(&old_key) else {
            return Err(not_found("modify", id));
        };
        let index = self.index + 1;
        it.precedence = precedence(&n.source, &n.destination);
        it.source = n.source;
        it.destination = n.destination;
        it.action = n.action;
        it.permissions = n.permissions;
        it.description = n.description;
        it.meta = n.meta;
        it.updated_at = SystemTime::now();
        it.modify_index = index;
        self.insert_raw(it);
        self.commit(index, [&old_key.dst, &new_key.dst]);
        self.lookup(&new_key).ok_or_else(|| not_found("modify", id))
    }

    /// Deletes the intention with this ID and returns it.
    ///
    /// # Errors
    ///
    /// [`Error::NotFound`] (op `delete`) for an unknown ID.
    pub fn delete(&mut self, id: &str) -> Result<Intention> {
        let key = self
            .ids
            .get(id)
            .cloned()
            .ok_or_else(|| not_found("delete", id))?;
        self.check_writable(&key.dst, &BTreeMap::new())?;
        let it = self
            .remove_raw(&key)
            .ok_or_else(|| not_found("delete", id))?;
        let index = self.index + 1;
        self.commit(index, [&key.dst]);
        Ok(it)
    }

    /// The intention with this ID.
    pub fn get(&self, id: &str) -> Option<&Intention> {
        self.ids.get(id).and_then(|k| self.lookup(k))
    }

    /// The intention with exactly this source and destination (wildcards taken literally), as
    /// `GET /v1/connect/intentions/exact` finds it.
    pub fn get_exact(&self, source: &ServiceName, destination: &ServiceName) -> Option<&Intention> {
        self.by_dst.get(destination)?.get(source)
    }

    /// Every intention, in no particular order: for work that does not
    /// need precedence order, such as compiling, without the cost of sorting.
    pub fn iter(&self) -> impl Iterator<Item = &Intention> {
        self.by_dst.values().flat_map(|m| m.values())
    }

    /// All intentions, highest precedence first, ties by source namespace, source name,
    /// destination namespace, destination name.
    pub fn list(&self) -> Vec<&Intention> {
        let mut all: Vec<&Intention> = self.by_dst.values().flat_map(|m| m.values()).collect();
        all.sort_by(|a, b| precedence_order(a, b));
        all
    }

    /// What differs from `old` in what a store keeps (intentions, `service-intentions` entry
    /// indexes, `service-defaults` entries): for writing a change as a journal record rather
    /// than the whole set. The write index and counter watermark are [`RuleSet::index`] and
    /// [`RuleSet::counter_watermark`]. Compares values, whatever operation made the change;
    /// parts `self` shares with `old` (a clone's, see the maps above) are skipped unvisited,
    /// so the cost follows the size of the change, not of the set.
    pub fn changes_from<'a>(&'a self, old: &'a RuleSet) -> RuleSetChanges<'a> {
        use imbl::ordmap::DiffItem;
        let mut c = RuleSetChanges::default();
        for item in old.by_dst.diff(&self.by_dst) {
            match item {
                DiffItem::Add(_, new) => c.intentions_put.extend(new.values()),
                DiffItem::Remove(_, gone) => c
                    .intentions_removed
                    .extend(gone.values().map(|it| (&it.source, &it.destination))),
                DiffItem::Update {
                    old: (_, before),
                    new: (_, after),
                } => {
                    for item in before.diff(after) {
                        match item {
                            DiffItem::Add(_, it) | DiffItem::Update { new: (_, it), .. } => {
                                c.intentions_put.push(it)
                            }
                            DiffItem::Remove(_, it) => {
                                c.intentions_removed.push((&it.source, &it.destination))
                            }
                        }
                    }
                }
            }
        }
        for item in old.entries.diff(&self.entries) {
            match item {
                DiffItem::Add(dst, e) | DiffItem::Update { new: (dst, e), .. } => {
                    c.entries_put.push(EntryIndexes {
                        destination: dst.clone(),
                        meta: e.meta.clone(),
                        create_index: e.create_index,
                        modify_index: e.modify_index,
                    })
                }
                DiffItem::Remove(dst, _) => c.entries_removed.push(dst),
            }
        }
        for item in old.service_defaults.diff(&self.service_defaults) {
            match item {
                DiffItem::Add(_, e) | DiffItem::Update { new: (_, e), .. } => {
                    c.service_defaults_put.push(e)
                }
                DiffItem::Remove(service, _) => c.service_defaults_removed.push(service),
            }
        }
        c
    }

    fn next_counter_index(&mut self) -> Result<u32> {
        if self.next_counter == u32::MAX {
            return Err(Error::Exhausted {
                what: "intention counter indexes",
            });
        }
        let c = self.next_counter;
        self.next_counter += 1;
        Ok(c)
    }

    fn fresh_id(&self) -> String {
        loop {
            let id = uuid::Uuid::new_v4().to_string();
            if !self.ids.contains_key(&id) {
                return id;
            }
        }
    }

    fn lookup(&self, key: &PairKey) -> Option<&Intention> {
        self.by_dst.get(&key.dst)?.get(&key.src)
    }

    fn lookup_mut(&mut self, key: &PairKey) -> Option<&mut Intention> {
        self.by_dst.get_mut(&key.dst)?.get_mut(&key.src)
    }

    fn insert_raw(&mut self, it: Intention) {
        let key = PairKey {
            src: it.source.clone(),
            dst: it.destination.clone(),
        };
        self.journal.touch(Some(&key));
        self.ids.insert(it.id.clone(), key.clone());
        self.by_src
            .entry(key.src.clone())
            .or_default()
            .insert(key.dst.clone());
        if self
            .by_dst
            .entry(key.dst)
            .or_default()
            .insert(key.src, it)
            .is_none()
        {
            self.count += 1;
        }
    }

    fn remove_raw(&mut self, key: &PairKey) -> Option<Intention> {
        let srcs = self.by_dst.get_mut(&key.dst)?;
        let it = srcs.remove(&key.src)?;
        self.journal.touch(Some(key));
        if srcs.is_empty() {
            self.by_dst.remove(&key.dst);
        }
        self.count -= 1;
        self.ids.remove(&it.id);
        if let Some(dsts) = self.by_src.get_mut(&key.src) {
            dsts.remove(&key.dst);
            if dsts.is_empty() {
                self.by_src.remove(&key.src);
            }
        }
        Some(it)
    }

    /// Records a successful write at `index` that touched these destinations: their entry
    /// state is created or advanced, or dropped when no intention to them remains.
    fn commit<'a>(&mut self, index: u64, touched: impl IntoIterator<Item = &'a ServiceName>) {
        self.index = index;
        for dst in touched {
            if self.by_dst.contains_key(dst) {
                self.entries
                    .entry(dst.clone())
                    .or_insert(EntryState {
                        meta: BTreeMap::new(),
                        create_index: index,
                        modify_index: index,
                    })
                    .modify_index = index;
            } else {
                self.entries.remove(dst);
            }
        }
    }
}

fn not_found(op: &'static str, id: &str) -> Error {
    Error::NotFound {
        op,
        id: id.to_owned(),
    }
}

fn new_intention(
    n: Normalized,
    id: String,
    counter_index: u32,
    now: SystemTime,
    index: u64,
) -> Intention {
    Intention {
        id,
        precedence: precedence(&n.source, &n.destination),
        source: n.source,
        destination: n.destination,
        action: n.action,
        permissions: n.permissions,
        description: n.description,
        meta: n.meta,
        created_at: now,
        updated_at: now,
        create_index: index,
        modify_index: index,
        counter_index,
    }
}
