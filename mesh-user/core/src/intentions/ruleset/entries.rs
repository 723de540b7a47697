//! The `service-intentions` config-entry view of the rule set, and its durable restore.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::SystemTime;

use super::{new_intention, precedence_order, EntryState, PairKey, RuleSet};
use crate::intentions::intention::{precedence, validate_description, validate_meta, Normalized};
use crate::intentions::name::validate_wildcards;
use crate::intentions::{
    Action, Error, Intention, Result, ServiceIntentionsEntry, ServiceName, SourceIntention,
};

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

impl RuleSet {
    /// Writes a `service-intentions` entry: every intention whose destination is the entry's
    /// destination is replaced by the entry's sources. A source that already had an
    /// intention to this destination keeps its ID, creation time and counter index. The
    /// entry is validated first ([`ServiceIntentionsEntry::normalized`]); on error nothing
    /// changes.
    ///
    /// # Errors
    ///
    /// [`Error::Invalid`] as [`ServiceIntentionsEntry::normalized`], [`Error::Exhausted`] when
    /// the new sources need more counter indexes than are left, [`Error::ReadOnly`] for a
    /// destination whose intentions come from Kubernetes (see
    /// [`RuleSet::check_writable`]).
    pub fn apply_entry(&mut self, entry: &ServiceIntentionsEntry) -> Result<()> {
        self.check_writable(&entry.destination, &entry.meta)?;
        self.write_entry(entry)
    }

    /// [`apply_entry`](Self::apply_entry) without the read-only check, for the entries made
    /// from Kubernetes objects.
    pub(super) fn write_entry(&mut self, entry: &ServiceIntentionsEntry) -> Result<()> {
        let entry = entry.normalized()?;
        let dst = entry.destination.clone();
        if let Some(i) = entry.sources.iter().position(|s| !s.permissions.is_empty()) {
            self.check_l7_protocol(&dst, true, &format!("Sources[{i}].Permissions"))?;
        }
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
                permissions: s.permissions.clone(),
                description: s.description.clone(),
                meta: entry.meta.clone(),
            };
            let it = match previous.remove(&s.source) {
                Some(old) => Intention {
                    action: n.action,
                    permissions: n.permissions,
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
                    permissions: it.permissions.clone(),
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
}
