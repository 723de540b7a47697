//! Compiling a [`RuleSet`] into flat kernel map entries, and the kernel's lookup in Rust.
//!
//! Every intention becomes one entry `(src_ns, src_name, dst_ns, dst_name) → (action,
//! precedence, counter index)`, each part an interned `u32` id and a wildcard part
//! [`WILDCARD_ID`] (0). Because an intention's wildcard parts are fixed by its precedence
//! (see the table in the [module docs](super)), the kernel can find the intention that
//! decides a connection with at most nine exact lookups: for each precedence from 9 down to 1
//! it builds the key that an intention of that precedence matching the connection would have
//! (the connection's ids, with 0 in the pattern's wildcard positions) and probes the map; the
//! first hit decides, and no hit means the default policy. Two intentions of one precedence
//! cannot both match one connection, since they would have the same key.
//!
//! | probe | prec | key                                  |
//! |-------|------|--------------------------------------|
//! | 1     | 9    | (src_ns, src_name, dst_ns, dst_name) |
//! | 2     | 8    | (src_ns, 0, dst_ns, dst_name)        |
//! | 3     | 7    | (0, 0, dst_ns, dst_name)             |
//! | 4     | 6    | (src_ns, src_name, dst_ns, 0)        |
//! | 5     | 5    | (src_ns, 0, dst_ns, 0)               |
//! | 6     | 4    | (0, 0, dst_ns, 0)                    |
//! | 7     | 3    | (src_ns, src_name, 0, 0)             |
//! | 8     | 2    | (src_ns, 0, 0, 0)                    |
//! | 9     | 1    | (0, 0, 0, 0)                         |
//!
//! Namespaces are always concrete in compiled keys: a source written without a namespace has
//! already inherited its destination's when the intention was stored, so `web → api` in
//! namespace `default` is keyed `(id(default), id(web), id(default), id(api))`.
//!
//! Ids of a connection's services come from the same [`Interner`]; a name that no intention
//! mentions has no id and gets [`UNKNOWN_ID`], which no key contains. To keep workload ids
//! stable across recompilations, pass the previous interner (with any workload names interned
//! into it) to [`compile_with`].
//!
//! # Changes
//!
//! Because each intention is one entry whose key is its own (source, destination) pair, an
//! intention added, removed or changed changes exactly one entry: every connection it can
//! match still finds it (or no longer finds it) by the same probe, and the precedence between
//! it and the others is the probe order, not something stored with the entries. So
//! [`CompiledRules::update`] brings a kernel form to a newer rule set by compiling only the
//! pairs the rule set's writes touched since ([`RuleSet::changes_since`]), and returns the
//! entries that changed: work in proportion to the change, not to the rules.

use std::collections::{HashMap, HashSet};

use super::{Action, Error, Intention, Result, RuleSet, ServiceName, WILDCARD};

/// The id of the wildcard `*`, in every interner.
pub const WILDCARD_ID: u32 = 0;
/// The id a connection part gets when the interner does not know the name; never assigned.
pub const UNKNOWN_ID: u32 = u32::MAX;

/// Assigns `u32` ids to namespace and service name strings (one id space for both). `*` is
/// always [`WILDCARD_ID`]; ids are handed out in order from 1 and never change.
#[derive(Clone, Debug)]
pub struct Interner {
    ids: HashMap<String, u32>,
    strings: Vec<String>,
}

impl Default for Interner {
    fn default() -> Self {
        Interner::new()
    }
}

impl Interner {
    /// An interner that knows only `*`.
    pub fn new() -> Self {
        let mut ids = HashMap::new();
        ids.insert(WILDCARD.to_owned(), WILDCARD_ID);
        Interner {
            ids,
            strings: vec![WILDCARD.to_owned()],
        }
    }

    /// The id of `s`, assigning the next one if it is new. Fails only when `u32::MAX - 1`
    /// strings are already interned.
    ///
    /// # Errors
    ///
    /// [`Error::Exhausted`] when no id is left; the interner is unchanged.
    pub fn intern(&mut self, s: &str) -> Result<u32> {
        if let Some(&id) = self.ids.get(s) {
            return Ok(id);
        }
        let id = u32::try_from(self.strings.len())
            .ok()
            .filter(|&id| id != UNKNOWN_ID)
            .ok_or(Error::Exhausted {
                what: "interned names",
            })?;
        self.ids.insert(s.to_owned(), id);
        self.strings.push(s.to_owned());
        Ok(id)
    }

    /// The id of `s`, if interned.
    pub fn get(&self, s: &str) -> Option<u32> {
        self.ids.get(s).copied()
    }

    /// The string with this id.
    pub fn resolve(&self, id: u32) -> Option<&str> {
        self.strings
            .get(usize::try_from(id).ok()?)
            .map(String::as_str)
    }

    /// Number of interned strings, `*` included.
    pub fn len(&self) -> usize {
        self.strings.len()
    }

    /// Whether only `*` is interned.
    pub fn is_empty(&self) -> bool {
        self.strings.len() <= 1
    }
}

/// A kernel map key: interned ids, [`WILDCARD_ID`] for `*`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KernelKey {
    /// Source namespace id.
    pub src_ns: u32,
    /// Source name id.
    pub src_name: u32,
    /// Destination namespace id.
    pub dst_ns: u32,
    /// Destination name id.
    pub dst_name: u32,
}

/// A kernel map value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct KernelValue {
    /// Allow or deny; [`Action::Allow`] for an intention with L7 permissions, whose
    /// connections the kernel must hand to the proxy (which decides each request), never deny.
    pub action: Action,
    /// The intention's precedence, 9..=1.
    pub precedence: u8,
    /// The intention's stable counter index ([`Intention::counter_index`](super::Intention)).
    pub counter_index: u32,
}

/// Which parts of a kernel key are the connection's ids (`true`) and which are the wildcard
/// id 0 (`false`), for intentions of one precedence.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeyPattern {
    /// The precedence of the intentions this pattern finds.
    pub precedence: u8,
    /// Source namespace is exact.
    pub src_ns: bool,
    /// Source name is exact.
    pub src_name: bool,
    /// Destination namespace is exact.
    pub dst_ns: bool,
    /// Destination name is exact.
    pub dst_name: bool,
}

impl KeyPattern {
    /// The key to probe for a connection whose ids are `conn`.
    pub fn key(&self, conn: &KernelKey) -> KernelKey {
        let pick = |exact: bool, id: u32| if exact { id } else { WILDCARD_ID };
        KernelKey {
            src_ns: pick(self.src_ns, conn.src_ns),
            src_name: pick(self.src_name, conn.src_name),
            dst_ns: pick(self.dst_ns, conn.dst_ns),
            dst_name: pick(self.dst_name, conn.dst_name),
        }
    }
}

const fn pattern(precedence: u8, src: u8, dst: u8) -> KeyPattern {
    // `src`/`dst`: number of exact parts (2 = ns/name, 1 = ns/*, 0 = */*).
    KeyPattern {
        precedence,
        src_ns: src >= 1,
        src_name: src == 2,
        dst_ns: dst >= 1,
        dst_name: dst == 2,
    }
}

const LOOKUP_ORDER: [KeyPattern; 9] = [
    pattern(9, 2, 2),
    pattern(8, 1, 2),
    pattern(7, 0, 2),
    pattern(6, 2, 1),
    pattern(5, 1, 1),
    pattern(4, 0, 1),
    pattern(3, 2, 0),
    pattern(2, 1, 0),
    pattern(1, 0, 0),
];

/// The nine key patterns the kernel probes for a connection, precedence 9 first. See the
/// table in this module's documentation.
pub fn kernel_lookup_order() -> &'static [KeyPattern; 9] {
    &LOOKUP_ORDER
}

/// One change of a kernel form: a key's new value, or its removal (`None`).
pub type KernelChange = (KernelKey, Option<KernelValue>);

/// A rule set in kernel form: one entry per intention, and the interner that made the ids.
#[derive(Clone, Debug)]
pub struct CompiledRules {
    interner: Interner,
    entries: HashMap<KernelKey, KernelValue>,
    ids: HashMap<u32, String>,
    /// The [`RuleSet::version`] compiled; 0 (no version) for none.
    version: u64,
}

impl CompiledRules {
    /// The kernel form of no rule set yet (no entries), with `interner`'s ids: the first
    /// [`update`](Self::update) compiles in full.
    pub fn new(interner: Interner) -> Self {
        CompiledRules {
            interner,
            entries: HashMap::new(),
            ids: HashMap::new(),
            version: 0,
        }
    }

    /// The [`RuleSet::version`] this form was compiled from (0 for none).
    pub fn version(&self) -> u64 {
        self.version
    }

    /// Brings this kernel form to `rules` and returns the entries that changed (a key at most
    /// once). When `rules` descends from the compiled state and still remembers it
    /// ([`RuleSet::changes_since`]), only the pairs touched since are compiled; otherwise
    /// `rules` is compiled in full and compared with the entries held.
    ///
    /// # Errors
    ///
    /// [`Error::Exhausted`] if the interner runs out of ids. This form is then no longer that
    /// of any rule set (its version is reset, so the next update compiles in full), and the
    /// entries it returned before are not known to be in force: write the whole set next.
    pub fn update(&mut self, rules: &RuleSet) -> Result<Vec<KernelChange>> {
        let result = self.try_update(rules);
        match &result {
            Ok(_) => self.version = rules.version(),
            Err(_) => self.version = 0,
        }
        result
    }

    fn try_update(&mut self, rules: &RuleSet) -> Result<Vec<KernelChange>> {
        let touched = if self.version == 0 {
            None
        } else {
            rules.changes_since(self.version)
        };
        let Some((pairs, _default)) = touched else {
            let fresh = compile_with(rules, std::mem::take(&mut self.interner))?;
            let mut changes: Vec<KernelChange> = self
                .entries
                .keys()
                .filter(|k| !fresh.entries.contains_key(k))
                .map(|k| (*k, None))
                .collect();
            changes.extend(
                fresh
                    .entries
                    .iter()
                    .filter(|(k, v)| self.entries.get(k) != Some(v))
                    .map(|(k, v)| (*k, Some(*v))),
            );
            *self = fresh;
            return Ok(changes);
        };
        let mut seen = HashSet::with_capacity(pairs.len());
        let mut changes = Vec::new();
        // Counter indexes move with an intention moved to another pair: forget the old owners
        // of every changed entry before recording the new ones.
        let mut owners = Vec::new();
        for (src, dst) in pairs {
            if !seen.insert((src, dst)) {
                continue;
            }
            let key = key_of(&mut self.interner, src, dst)?;
            let it = rules.get_exact(src, dst);
            let new = it.map(value_of);
            let old = self.entries.get(&key).copied();
            if new == old {
                continue;
            }
            if let Some(old) = old {
                self.ids.remove(&old.counter_index);
            }
            match (new, it) {
                (Some(value), Some(it)) => {
                    self.entries.insert(key, value);
                    owners.push((value.counter_index, it.id.clone()));
                }
                _ => {
                    self.entries.remove(&key);
                }
            }
            changes.push((key, new));
        }
        self.ids.extend(owners);
        Ok(changes)
    }

    /// The interner, to intern more names (workloads' and services'): ids are only ever added,
    /// so the entries stay valid.
    pub fn interner_mut(&mut self) -> &mut Interner {
        &mut self.interner
    }

    /// Swaps this form's interner for `interner`, which must hold every name of this form's
    /// entries under the same id (an extension of it, such as the agent's persistent table),
    /// and returns the one it held.
    pub fn swap_interner(&mut self, interner: Interner) -> Interner {
        std::mem::replace(&mut self.interner, interner)
    }

    /// The kernel map content.
    pub fn entries(&self) -> &HashMap<KernelKey, KernelValue> {
        &self.entries
    }

    /// Number of entries (= intentions).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are no entries.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The interner that assigned the ids.
    pub fn interner(&self) -> &Interner {
        &self.interner
    }

    /// Gives the interner back, to pass to the next [`compile_with`].
    pub fn into_interner(self) -> Interner {
        self.interner
    }

    /// The ID of the intention with this counter index.
    pub fn intention_id(&self, counter_index: u32) -> Option<&str> {
        self.ids.get(&counter_index).map(String::as_str)
    }

    /// A connection's ids: each part's interned id, [`UNKNOWN_ID`] when not interned.
    pub fn connection_key(&self, source: &ServiceName, destination: &ServiceName) -> KernelKey {
        let id = |s: &str| self.interner.get(s).unwrap_or(UNKNOWN_ID);
        KernelKey {
            src_ns: id(source.namespace()),
            src_name: id(source.name()),
            dst_ns: id(destination.namespace()),
            dst_name: id(destination.name()),
        }
    }
}

/// Compiles `rules` with a fresh interner. Ids are assigned in
/// [`RuleSet::iter`] order (no particular one); pass a kept interner to keep them stable.
///
/// # Errors
///
/// As [`compile_with`].
pub fn compile(rules: &RuleSet) -> Result<CompiledRules> {
    compile_with(rules, Interner::new())
}

/// Compiles `rules`, reusing (and extending) `interner` so that ids already handed out, e.g.
/// to workloads, stay valid.
///
/// # Errors
///
/// [`Error::Exhausted`] if the interner runs out of ids.
pub fn compile_with(rules: &RuleSet, mut interner: Interner) -> Result<CompiledRules> {
    let mut entries = HashMap::with_capacity(rules.len());
    let mut ids = HashMap::with_capacity(rules.len());
    for it in rules.iter() {
        let key = key_of(&mut interner, &it.source, &it.destination)?;
        entries.insert(key, value_of(it));
        ids.insert(it.counter_index, it.id.clone());
    }
    Ok(CompiledRules {
        interner,
        entries,
        ids,
        version: rules.version(),
    })
}

/// The key of an intention from `source` to `destination`, interning its names.
fn key_of(
    interner: &mut Interner,
    source: &ServiceName,
    destination: &ServiceName,
) -> Result<KernelKey> {
    Ok(KernelKey {
        src_ns: interner.intern(source.namespace())?,
        src_name: interner.intern(source.name())?,
        dst_ns: interner.intern(destination.namespace())?,
        dst_name: interner.intern(destination.name())?,
    })
}

/// The kernel value of an intention.
fn value_of(it: &Intention) -> KernelValue {
    KernelValue {
        // An L7 intention sends the connection to the proxy, which decides per request.
        action: if it.has_permissions() {
            Action::Allow
        } else {
            it.action
        },
        precedence: it.precedence,
        counter_index: it.counter_index,
    }
}

/// The kernel's answer for a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelVerdict {
    /// Whether the connection is allowed.
    pub allowed: bool,
    /// The entry that decided; `None` when the default policy did.
    pub matched: Option<KernelValue>,
    /// How many map lookups were made (1..=9).
    pub probes: u8,
}

/// Performs exactly the kernel's lookup: at most nine probes of `compiled`'s map, in
/// [`kernel_lookup_order`], the first hit deciding, else `default`.
pub fn simulate_kernel_check(
    compiled: &CompiledRules,
    source: &ServiceName,
    destination: &ServiceName,
    default: Action,
) -> KernelVerdict {
    let conn = compiled.connection_key(source, destination);
    let mut probes = 0;
    for pattern in kernel_lookup_order() {
        probes += 1;
        if let Some(value) = compiled.entries.get(&pattern.key(&conn)) {
            return KernelVerdict {
                allowed: value.action.is_allow(),
                matched: Some(*value),
                probes,
            };
        }
    }
    KernelVerdict {
        allowed: default.is_allow(),
        matched: None,
        probes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::intentions::{precedence, IntentionSpec};

    fn sn(s: &str) -> ServiceName {
        ServiceName::parse(s).unwrap()
    }

    #[test]
    fn interner_reserves_zero_for_wildcard() {
        let mut i = Interner::new();
        assert!(i.is_empty());
        assert_eq!(i.intern("*").unwrap(), WILDCARD_ID);
        let web = i.intern("web").unwrap();
        assert_eq!(web, 1);
        assert_eq!(i.intern("web").unwrap(), web);
        assert_eq!(i.intern("default").unwrap(), 2);
        assert_eq!(i.get("api"), None);
        assert_eq!(i.resolve(1), Some("web"));
        assert_eq!(i.resolve(0), Some("*"));
        assert_eq!(i.resolve(UNKNOWN_ID), None);
        assert_eq!(i.len(), 3);
    }

    #[test]
    fn lookup_order_follows_precedence() {
        let order = kernel_lookup_order();
        let precs: Vec<u8> = order.iter().map(|p| p.precedence).collect();
        assert_eq!(precs, [9, 8, 7, 6, 5, 4, 3, 2, 1]);
        // Each pattern's wildcard positions are those of an intention with that precedence.
        let shapes = ["ns/web", "ns/*", "*/*"];
        for src in shapes {
            for dst in shapes {
                let (s, d) = (sn(src), sn(dst));
                let p = precedence(&s, &d);
                let pat = order[usize::from(9 - p)];
                assert_eq!(pat.precedence, p);
                assert_eq!(pat.src_ns, s.namespace() != "*", "{src} {dst}");
                assert_eq!(pat.src_name, s.name() != "*", "{src} {dst}");
                assert_eq!(pat.dst_ns, d.namespace() != "*", "{src} {dst}");
                assert_eq!(pat.dst_name, d.name() != "*", "{src} {dst}");
            }
        }
        let conn = KernelKey {
            src_ns: 1,
            src_name: 2,
            dst_ns: 3,
            dst_name: 4,
        };
        let k = |s, n, d, m| KernelKey {
            src_ns: s,
            src_name: n,
            dst_ns: d,
            dst_name: m,
        };
        let keys: Vec<KernelKey> = order.iter().map(|p| p.key(&conn)).collect();
        assert_eq!(
            keys,
            [
                k(1, 2, 3, 4),
                k(1, 0, 3, 4),
                k(0, 0, 3, 4),
                k(1, 2, 3, 0),
                k(1, 0, 3, 0),
                k(0, 0, 3, 0),
                k(1, 2, 0, 0),
                k(1, 0, 0, 0),
                k(0, 0, 0, 0),
            ]
        );
    }

    #[test]
    fn compiled_keys_use_concrete_namespaces() {
        let mut rules = RuleSet::new();
        // `web -> api`, source namespace left to inheritance.
        let mut spec = IntentionSpec::new(&sn("web"), &sn("api"), Action::Allow);
        spec.source_namespace = None;
        spec.destination_namespace = None;
        let id = rules.create(&spec, false).unwrap().id.clone();
        rules
            .create(
                &IntentionSpec::new(&sn("ns1/*"), &sn("*/*"), Action::Deny),
                false,
            )
            .unwrap();
        let c = compile(&rules).unwrap();
        assert_eq!(c.len(), 2);
        let i = c.interner();
        let default = i.get("default").unwrap();
        assert_ne!(default, WILDCARD_ID);
        let key = KernelKey {
            src_ns: default,
            src_name: i.get("web").unwrap(),
            dst_ns: default,
            dst_name: i.get("api").unwrap(),
        };
        let v = c.entries()[&key];
        assert_eq!(v.action, Action::Allow);
        assert_eq!(v.precedence, 9);
        assert_eq!(c.intention_id(v.counter_index), Some(id.as_str()));
        let key2 = KernelKey {
            src_ns: i.get("ns1").unwrap(),
            src_name: WILDCARD_ID,
            dst_ns: WILDCARD_ID,
            dst_name: WILDCARD_ID,
        };
        assert_eq!(c.entries()[&key2].precedence, 2);

        // Probing: web -> api hits on the first probe; ns1/x -> y on the eighth.
        let v = simulate_kernel_check(&c, &sn("web"), &sn("api"), Action::Deny);
        assert!(v.allowed);
        assert_eq!(v.probes, 1);
        let v = simulate_kernel_check(&c, &sn("ns1/x"), &sn("y"), Action::Allow);
        assert!(!v.allowed);
        assert_eq!(v.probes, 8);
        let v = simulate_kernel_check(&c, &sn("ns2/x"), &sn("y"), Action::Allow);
        assert!(v.allowed);
        assert_eq!(v.matched, None);
        assert_eq!(v.probes, 9);
    }

    #[test]
    fn compile_with_keeps_ids() {
        let mut interner = Interner::new();
        let pod = interner.intern("pod-service").unwrap();
        let mut rules = RuleSet::new();
        rules
            .create(
                &IntentionSpec::new(&sn("web"), &sn("api"), Action::Allow),
                false,
            )
            .unwrap();
        let c = compile_with(&rules, interner).unwrap();
        assert_eq!(c.interner().get("pod-service"), Some(pod));
        let again = compile_with(&rules, c.clone().into_interner()).unwrap();
        assert_eq!(again.entries(), c.entries());
    }
}
