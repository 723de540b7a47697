//! The set of all intentions, with Consul's operations and the config-entry view.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::time::SystemTime;

use super::intention::{precedence, validate_description, validate_meta, Normalized};
use super::name::validate_wildcards;
use super::{
    Action, Error, Intention, IntentionSpec, Result, ServiceIntentionsEntry, ServiceName,
    SourceIntention,
};

/// Which side of intentions a [`RuleSet::match_by`] query is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MatchType {
    /// Intentions whose source matches the name (`?by=source`).
    Source,
    /// Intentions whose destination matches the name (`?by=destination`).
    Destination,
}

/// What decided a [`Decision`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Matched {
    /// This intention matched first.
    Intention {
        /// Its ID.
        id: String,
        /// Its precedence.
        precedence: u8,
    },
    /// No intention matched; the default policy decided.
    Default,
}

/// The answer to "may source connect to destination".
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    /// Whether the connection is allowed.
    pub allowed: bool,
    /// What decided.
    pub matched: Matched,
}

/// The entry-level state of one destination's `service-intentions` entry, as saved and given
/// back to [`RuleSet::restore`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EntryIndexes {
    /// The entry's destination.
    pub destination: ServiceName,
    /// The entry's `Meta`.
    pub meta: BTreeMap<String, String>,
    /// Write index at which the entry appeared.
    pub create_index: u64,
    /// Write index of the entry's last change.
    pub modify_index: u64,
}

impl From<&ServiceIntentionsEntry> for EntryIndexes {
    fn from(e: &ServiceIntentionsEntry) -> Self {
        EntryIndexes {
            destination: e.destination.clone(),
            meta: e.meta.clone(),
            create_index: e.create_index,
            modify_index: e.modify_index,
        }
    }
}

/// (source, destination): the identity of an intention.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct PairKey {
    src: ServiceName,
    dst: ServiceName,
}

/// Entry-level state for one destination: exists while it has intentions.
#[derive(Clone, Debug)]
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

/// Every intention known to the agent, with a default policy for connections none matches.
///
/// Each write operation either succeeds whole or returns an error and changes nothing; each
/// successful write advances a write index (like Consul's Raft index) recorded in
/// `CreateIndex`/`ModifyIndex`.
#[derive(Clone, Debug)]
pub struct RuleSet {
    default_policy: Action,
    /// destination → source → intention: the intentions themselves.
    by_dst: HashMap<ServiceName, BTreeMap<ServiceName, Intention>>,
    /// source → destinations that have an intention from it.
    by_src: HashMap<ServiceName, BTreeSet<ServiceName>>,
    /// ID → (source, destination).
    ids: HashMap<String, PairKey>,
    count: usize,
    entries: HashMap<ServiceName, EntryState>,
    index: u64,
    next_counter: u32,
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
            by_dst: HashMap::new(),
            by_src: HashMap::new(),
            ids: HashMap::new(),
            count: 0,
            entries: HashMap::new(),
            index: 0,
            next_counter: 0,
        }
    }

    /// What happens to connections no intention matches.
    pub fn default_policy(&self) -> Action {
        self.default_policy
    }

    /// Changes the default policy.
    pub fn set_default_policy(&mut self, policy: Action) {
        self.default_policy = policy;
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
            existing.description = n.description;
            existing.meta = n.meta;
            existing.updated_at = now;
            existing.modify_index = index;
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

    /// The intentions whose source (or destination) matches `name`, in precedence order, as
    /// `GET /v1/connect/intentions/match` returns them: those naming exactly `ns/name`, then
    /// `ns/*`, then `*/*` (a wildcard in `name` narrows the query to the wildcard forms).
    pub fn match_by(&self, by: MatchType, name: &ServiceName) -> Vec<&Intention> {
        let mut out: Vec<&Intention> = self.matching(by, name).collect();
        out.sort_by(|a, b| precedence_order(a, b));
        out
    }

    /// The intentions whose `by` side matches `name`, unordered.
    fn matching<'a>(
        &'a self,
        by: MatchType,
        name: &ServiceName,
    ) -> impl Iterator<Item = &'a Intention> {
        match_candidates(name)
            .into_iter()
            .flat_map(move |candidate| {
                let found: Box<dyn Iterator<Item = &'a Intention>> = match by {
                    MatchType::Destination => Box::new(
                        self.by_dst
                            .get(&candidate)
                            .into_iter()
                            .flat_map(|m| m.values()),
                    ),
                    MatchType::Source => Box::new(
                        self.by_src
                            .get(&candidate)
                            .into_iter()
                            .flatten()
                            .filter_map(move |dst| self.by_dst.get(dst)?.get(&candidate)),
                    ),
                };
                found
            })
    }

    /// Whether `source` may connect to `destination`: the first intention, in precedence
    /// order, whose destination and source both match decides; otherwise the default policy.
    /// Names are meant to be concrete services; a `*` in them is taken literally (it matches
    /// only wildcard intentions).
    ///
    /// This is the reference semantics, a scan of every intention whose destination matches
    /// (linear in their number); the hot path uses the compiled form, which needs at most nine
    /// map lookups ([`simulate_kernel_check`](super::simulate_kernel_check)).
    pub fn check(&self, source: &ServiceName, destination: &ServiceName) -> Decision {
        let first = self
            .matching(MatchType::Destination, destination)
            .filter(|it| it.source.matches(source))
            .min_by(|a, b| precedence_order(a, b));
        match first {
            Some(it) => Decision {
                allowed: it.action.is_allow(),
                matched: Matched::Intention {
                    id: it.id.clone(),
                    precedence: it.precedence,
                },
            },
            None => Decision {
                allowed: self.default_policy.is_allow(),
                matched: Matched::Default,
            },
        }
    }

    /// Writes a `service-intentions` entry: every intention whose destination is the entry's
    /// destination is replaced by the entry's sources. A source that already had an
    /// intention to this destination keeps its ID, creation time and counter index. The
    /// entry is validated first ([`ServiceIntentionsEntry::normalized`]); on error nothing
    /// changes.
    ///
    /// # Errors
    ///
    /// [`Error::Invalid`] as [`ServiceIntentionsEntry::normalized`], [`Error::Exhausted`] when
    /// the new sources need more counter indexes than are left.
    pub fn apply_entry(&mut self, entry: &ServiceIntentionsEntry) -> Result<()> {
        let entry = entry.normalized()?;
        let dst = entry.destination.clone();
        let fresh = entry
            .sources
            .iter()
            .filter(|s| self.get_exact(&s.source, &dst).is_none())
            .count();
        // Counter indexes for new sources are `base..base + fresh`; check they exist before
        // changing anything.
        let base = self.next_counter;
        let Some(end) = u32::try_from(fresh).ok().and_then(|f| base.checked_add(f)) else {
            return Err(Error::Exhausted {
                what: "intention counter indexes",
            });
        };
        let mut new_counters = base..end;
        self.next_counter = end;

        let index = self.index + 1;
        let now = SystemTime::now();
        let mut previous: HashMap<ServiceName, Intention> = HashMap::new();
        let old_sources: Vec<ServiceName> = self
            .by_dst
            .get(&dst)
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default();
        let create_index = self.entries.get(&dst).map(|e| e.create_index);
        for src in old_sources {
            let key = PairKey {
                src: src.clone(),
                dst: dst.clone(),
            };
            if let Some(it) = self.remove_raw(&key) {
                previous.insert(src, it);
            }
        }
        for s in &entry.sources {
            let n = Normalized {
                source: s.source.clone(),
                destination: dst.clone(),
                action: s.action,
                description: s.description.clone(),
                meta: entry.meta.clone(),
            };
            let it = match previous.remove(&s.source) {
                Some(old) => Intention {
                    action: n.action,
                    description: n.description,
                    meta: n.meta,
                    precedence: precedence(&n.source, &n.destination),
                    updated_at: now,
                    modify_index: index,
                    ..old
                },
                None => {
                    let counter_index = new_counters.next().unwrap_or(end);
                    let id = self.fresh_id();
                    new_intention(n, id, counter_index, now, index)
                }
            };
            self.insert_raw(it);
        }
        self.entries.insert(
            dst.clone(),
            EntryState {
                meta: entry.meta.clone(),
                create_index: create_index.unwrap_or(index),
                modify_index: index,
            },
        );
        self.commit(index, [&dst]);
        Ok(())
    }

    /// The `service-intentions` entry for `destination` (exact, wildcards literal): every
    /// intention to it, however it was created. `None` when there is none.
    pub fn entry(&self, destination: &ServiceName) -> Option<ServiceIntentionsEntry> {
        let state = self.entries.get(destination)?;
        let mut intentions: Vec<&Intention> = self.by_dst.get(destination)?.values().collect();
        intentions.sort_by(|a, b| precedence_order(a, b));
        Some(ServiceIntentionsEntry {
            destination: destination.clone(),
            meta: state.meta.clone(),
            sources: intentions
                .into_iter()
                .map(|it| SourceIntention {
                    source: it.source.clone(),
                    action: it.action,
                    description: it.description.clone(),
                    precedence: it.precedence,
                })
                .collect(),
            create_index: state.create_index,
            modify_index: state.modify_index,
        })
    }

    /// Every entry, ordered by destination namespace and name.
    pub fn entries(&self) -> Vec<ServiceIntentionsEntry> {
        let mut dsts: Vec<&ServiceName> = self.entries.keys().collect();
        dsts.sort();
        dsts.into_iter().filter_map(|d| self.entry(d)).collect()
    }

    /// Deletes the entry for `destination`, i.e. every intention to it. Returns how many
    /// intentions were removed (0 when there was no entry: deleting is idempotent, as in
    /// Consul).
    pub fn delete_entry(&mut self, destination: &ServiceName) -> usize {
        let sources: Vec<ServiceName> = self
            .by_dst
            .get(destination)
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default();
        let mut removed = 0;
        for src in sources {
            let key = PairKey {
                src,
                dst: destination.clone(),
            };
            if self.remove_raw(&key).is_some() {
                removed += 1;
            }
        }
        if removed > 0 {
            let index = self.index + 1;
            self.commit(index, [destination]);
        }
        removed
    }

    /// The counter index the next new intention will get: every counter index below it has
    /// been handed out (some perhaps to intentions deleted since). Saved with the rules so
    /// that a restored rule set never reuses one.
    pub fn counter_watermark(&self) -> u32 {
        self.next_counter
    }

    /// Rebuilds a rule set exactly as it was saved: IDs, times, write indexes, counter
    /// indexes and entry metadata as given, for durable storage. `index` is the saved
    /// [`index`](Self::index), `counter_watermark` the saved
    /// [`counter_watermark`](Self::counter_watermark), and `entries` one
    /// [`EntryIndexes`] per destination that has intentions (as [`entries`](Self::entries)
    /// lists them).
    ///
    /// Everything is checked, so that a damaged file is an error rather than a rule set that
    /// answers differently: names and lengths as on write, precedence as computed, IDs,
    /// source/destination pairs and counter indexes unique, counter indexes below the
    /// watermark, write indexes not above `index`, and exactly one entry per destination.
    /// Errors name the offending element (`Intentions[3].Precedence`, `Entries[0]`).
    ///
    /// # Errors
    ///
    /// [`Error::Invalid`] for the first check that fails.
    pub fn restore(
        default_policy: Action,
        index: u64,
        counter_watermark: u32,
        intentions: Vec<Intention>,
        entries: Vec<EntryIndexes>,
    ) -> Result<RuleSet> {
        let mut rules = RuleSet::with_default_policy(default_policy);
        let mut counters = HashSet::new();
        for (i, it) in intentions.into_iter().enumerate() {
            let at = |field: &str| format!("Intentions[{i}].{field}");
            let bad = |field: &str, what: String| {
                let field = at(field);
                Error::invalid(field.clone(), format!("{field}: {what}"))
            };
            if it.id.is_empty() {
                return Err(bad("ID", "must be set".into()));
            }
            if rules.ids.contains_key(&it.id) {
                return Err(bad("ID", format!("{:?} is used twice", it.id)));
            }
            validate_wildcards(
                it.source.namespace(),
                it.source.name(),
                &at("SourceNS"),
                &at("SourceName"),
            )?;
            validate_wildcards(
                it.destination.namespace(),
                it.destination.name(),
                &at("DestinationNS"),
                &at("DestinationName"),
            )?;
            validate_description(&it.description, &at("Description"))?;
            validate_meta(&it.meta, &at("Meta"))?;
            let want = precedence(&it.source, &it.destination);
            if it.precedence != want {
                return Err(bad(
                    "Precedence",
                    format!("is {} but must be {want}", it.precedence),
                ));
            }
            if rules.get_exact(&it.source, &it.destination).is_some() {
                return Err(bad(
                    "SourceName",
                    format!(
                        "a second intention from {} to {}",
                        it.source, it.destination
                    ),
                ));
            }
            if it.counter_index >= counter_watermark || !counters.insert(it.counter_index) {
                return Err(bad(
                    "CounterIndex",
                    format!(
                        "{} is used twice or not below the watermark {counter_watermark}",
                        it.counter_index
                    ),
                ));
            }
            if it.create_index > it.modify_index || it.modify_index > index {
                return Err(bad(
                    "ModifyIndex",
                    format!(
                        "CreateIndex {} <= ModifyIndex {} <= index {index} does not hold",
                        it.create_index, it.modify_index
                    ),
                ));
            }
            rules.insert_raw(it);
        }
        for (i, e) in entries.into_iter().enumerate() {
            let field = format!("Entries[{i}]");
            if !rules.by_dst.contains_key(&e.destination) {
                return Err(Error::invalid(
                    field.clone(),
                    format!("{field}: no intention has destination {}", e.destination),
                ));
            }
            if e.create_index > e.modify_index || e.modify_index > index {
                return Err(Error::invalid(
                    field.clone(),
                    format!(
                        "{field}: CreateIndex {} <= ModifyIndex {} <= index {index} does not hold",
                        e.create_index, e.modify_index
                    ),
                ));
            }
            validate_meta(&e.meta, &format!("{field}.Meta"))?;
            let state = EntryState {
                meta: e.meta,
                create_index: e.create_index,
                modify_index: e.modify_index,
            };
            if rules.entries.insert(e.destination.clone(), state).is_some() {
                return Err(Error::invalid(
                    field.clone(),
                    format!("{field}: a second entry for {}", e.destination),
                ));
            }
        }
        if let Some(dst) = rules
            .by_dst
            .keys()
            .find(|d| !rules.entries.contains_key(*d))
        {
            return Err(Error::invalid(
                "Entries",
                format!("Entries: none for destination {dst}, which has intentions"),
            ));
        }
        rules.index = index;
        rules.next_counter = counter_watermark;
        Ok(rules)
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
        description: n.description,
        meta: n.meta,
        created_at: now,
        updated_at: now,
        create_index: index,
        modify_index: index,
        counter_index,
    }
}

/// The patterns an intention side must equal to match `name`: `*/*`, then `ns/*`, then
/// `ns/name`, stopping at the first wildcard in `name` (Consul's `intentionMatchGetParams`).
fn match_candidates(name: &ServiceName) -> Vec<ServiceName> {
    let mut out = vec![ServiceName::wildcard()];
    if name.namespace() == super::WILDCARD {
        return out;
    }
    out.push(ServiceName::new_unchecked(
        name.namespace().to_owned(),
        super::WILDCARD.to_owned(),
    ));
    if name.name() != super::WILDCARD {
        out.push(name.clone());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sn(s: &str) -> ServiceName {
        ServiceName::parse(s).unwrap()
    }

    fn source(s: &str) -> SourceIntention {
        SourceIntention {
            source: sn(s),
            action: Action::Allow,
            description: String::new(),
            precedence: 0,
        }
    }

    #[test]
    fn counter_exhaustion_changes_nothing() {
        let mut rules = RuleSet::new();
        rules
            .create(
                &IntentionSpec::new(&sn("web"), &sn("api"), Action::Deny),
                false,
            )
            .unwrap();
        rules.next_counter = u32::MAX - 1;
        let before: Vec<Intention> = rules.list().into_iter().cloned().collect();
        let index = rules.index();

        // Two new sources need two indexes; only one is left. `web` reuses its own.
        let entry =
            ServiceIntentionsEntry::new(sn("api"), vec![source("web"), source("a"), source("b")]);
        let err = rules.apply_entry(&entry).unwrap_err();
        assert!(matches!(err, Error::Exhausted { .. }), "{err}");
        let after: Vec<Intention> = rules.list().into_iter().cloned().collect();
        assert_eq!(after, before);
        assert_eq!(rules.index(), index);
        assert_eq!(rules.next_counter, u32::MAX - 1);

        // One new source fits, and takes the last index.
        let entry = ServiceIntentionsEntry::new(sn("api"), vec![source("web"), source("a")]);
        rules.apply_entry(&entry).unwrap();
        assert_eq!(
            rules.get_exact(&sn("a"), &sn("api")).unwrap().counter_index,
            u32::MAX - 1
        );
        let err = rules
            .create(
                &IntentionSpec::new(&sn("c"), &sn("api"), Action::Deny),
                false,
            )
            .unwrap_err();
        assert!(matches!(err, Error::Exhausted { .. }), "{err}");
        assert_eq!(rules.len(), 2);
    }

    fn saved(rules: &RuleSet) -> (Vec<Intention>, Vec<EntryIndexes>) {
        (
            rules.list().into_iter().cloned().collect(),
            rules.entries().iter().map(EntryIndexes::from).collect(),
        )
    }

    #[test]
    fn restore_gives_back_the_same_rules() {
        let mut rules = RuleSet::new();
        rules
            .create(
                &IntentionSpec::new(&sn("web"), &sn("api"), Action::Deny),
                false,
            )
            .unwrap();
        let gone = rules
            .create(
                &IntentionSpec::new(&sn("old"), &sn("api"), Action::Deny),
                false,
            )
            .unwrap()
            .id
            .clone();
        rules.delete(&gone).unwrap();
        let mut entry = ServiceIntentionsEntry::new(sn("ns1/db"), vec![source("ns1/*")]);
        entry.meta.insert("team".into(), "a".into());
        rules.apply_entry(&entry).unwrap();
        let (intentions, entries) = saved(&rules);
        let back = RuleSet::restore(
            Action::Allow,
            rules.index(),
            rules.counter_watermark(),
            intentions,
            entries,
        )
        .unwrap();
        assert_eq!(saved(&back), saved(&rules));
        assert_eq!(back.index(), rules.index());
        assert_eq!(back.counter_watermark(), 3);
        assert_eq!(back.default_policy(), Action::Allow);
        assert_eq!(back.len(), 2);
        assert!(!back.check(&sn("web"), &sn("api")).allowed);
        // The restored set goes on where the saved one stopped.
        let mut back = back;
        let it = back
            .create(
                &IntentionSpec::new(&sn("x"), &sn("api"), Action::Deny),
                false,
            )
            .unwrap();
        assert_eq!(it.counter_index, 3);
        assert_eq!(it.create_index, rules.index() + 1);
    }

    #[test]
    fn restore_refuses_damaged_state_naming_the_element() {
        let mut rules = RuleSet::new();
        for src in ["a", "b"] {
            rules
                .create(
                    &IntentionSpec::new(&sn(src), &sn("api"), Action::Deny),
                    false,
                )
                .unwrap();
        }
        let (intentions, entries) = saved(&rules);
        let try_restore = |its: Vec<Intention>, ents: Vec<EntryIndexes>| {
            RuleSet::restore(Action::Deny, rules.index(), 2, its, ents).unwrap_err()
        };
        let mut its = intentions.clone();
        its[1].id = its[0].id.clone();
        assert_eq!(
            try_restore(its, entries.clone()).field(),
            Some("Intentions[1].ID")
        );
        let mut its = intentions.clone();
        its[0].precedence = 3;
        assert_eq!(
            try_restore(its, entries.clone()).field(),
            Some("Intentions[0].Precedence")
        );
        let mut its = intentions.clone();
        its[1].counter_index = its[0].counter_index;
        assert_eq!(
            try_restore(its, entries.clone()).field(),
            Some("Intentions[1].CounterIndex")
        );
        let mut its = intentions.clone();
        its[0].modify_index = rules.index() + 1;
        assert_eq!(
            try_restore(its, entries.clone()).field(),
            Some("Intentions[0].ModifyIndex")
        );
        let mut its = intentions.clone();
        its[1].source = its[0].source.clone();
        assert_eq!(
            try_restore(its, entries.clone()).field(),
            Some("Intentions[1].SourceName")
        );
        assert_eq!(
            try_restore(intentions.clone(), vec![]).field(),
            Some("Entries")
        );
        let twice = vec![entries[0].clone(), entries[0].clone()];
        assert_eq!(
            try_restore(intentions.clone(), twice).field(),
            Some("Entries[1]")
        );
        let mut stray = entries.clone();
        stray[0].destination = sn("other");
        assert_eq!(try_restore(intentions, stray).field(), Some("Entries[0]"));
    }
}
