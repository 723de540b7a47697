//! The two intention sets, the map-of-maps that says which is in force, and how a rule change
//! reaches them.
//!
//! `maps/INTENTION_SETS` (`BPF_MAP_TYPE_ARRAY_OF_MAPS`, one element) points at one of two hash
//! maps, `maps/INTENTIONS_0` and `maps/INTENTIONS_1`, each a whole rule set: every intention's
//! key and value, and the default verdict under [`IntentionKey::DEFAULT`]. connect4/connect6
//! look the set up once per connect and make all their probes in it. A change reaches the
//! kernel in one of two ways, both of which give every connect the old rules or the new ones,
//! never a mix (see `docs/dataplane.md`):
//!
//! - a change of **one key** (an intention added, removed or changed, or the default verdict)
//!   is written in place into the set in force: a hash-map update or delete is atomic for a
//!   reader, and a connect reads that key once, so it sees the set before or after;
//! - a change of **several keys** is written into the other set (brought up to date with the
//!   keys it lags by, then the change), and the outer map's element is pointed at it. The kernel
//!   returns from that update only after an RCU grace period, when no program still runs with
//!   the set it replaced; that set then lags by exactly this change's keys, and is the next
//!   multi-key change's target.
//!
//! Either way the work is proportional to the change, not to the rules: one change among
//! 100,000 intentions writes one key.

use std::collections::{BTreeMap, HashMap as StdHashMap, HashSet};
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;

use aya::maps::{HashMap, Map, MapData, MapInfo};
use mesh_common::{
    IntentionCounts, IntentionKey, IntentionValue, DEFAULT_VERDICT_COUNTER, INTENTION_SET_PROXY,
    MAP_INTENTIONS_0, MAP_INTENTIONS_1, MAP_INTENTION_COUNTS, MAP_INTENTION_SETS, MAX_INTENTIONS,
    VERDICT_ALLOW, VERDICT_DENY,
};

use super::maps::{ignore_missing, typed_ref};
use super::{io_err, Dataplane, Error};
use crate::sys;

/// The two sets' pin names, by index.
pub(super) const SET_NAMES: [&str; 2] = [MAP_INTENTIONS_0, MAP_INTENTIONS_1];
/// `(type, key size, value size, max entries, flags)` of each intention set, as
/// [`IntentionSets::open`] makes it.
pub(super) const SET_LAYOUT: [u32; 5] = [
    sys::BPF_MAP_TYPE_HASH,
    std::mem::size_of::<IntentionKey>() as u32,
    std::mem::size_of::<IntentionValue>() as u32,
    MAX_INTENTIONS,
    0,
];
/// The same of the outer map, [`MAP_INTENTION_SETS`]: one slot holding a set's id.
pub(super) const OUTER_LAYOUT: [u32; 5] = [sys::BPF_MAP_TYPE_ARRAY_OF_MAPS, 4, 4, 1, 0];

/// One change of an intention set: the key's new value, or `None` to remove it.
pub type IntentionChange = (IntentionKey, Option<IntentionValue>);

/// How a rule change reached the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SetWrite {
    /// The set in force already held it.
    Unchanged,
    /// One key written in place in the set in force.
    InPlace,
    /// `keys` keys written into the other set, which was then swapped in.
    Swapped {
        /// Keys written (the change, and what the set lagged by).
        keys: usize,
    },
    /// The whole set written (the first change after a start, or after a write failed): the
    /// differences between the other set, read from the kernel, and the rules, then a swap.
    Full {
        /// Keys written.
        keys: usize,
    },
}

/// What the agent knows the sets hold, because it wrote them.
#[derive(Debug)]
struct Known {
    /// The set in force (0 or 1).
    live: usize,
    /// Its content, default entry included.
    shadow: StdHashMap<IntentionKey, IntentionValue>,
    /// The keys in which the other set differs from the set in force; `None` when unknown.
    lag: Option<HashSet<IntentionKey>>,
}

/// The intention sets of one instance (see the module documentation).
pub(super) struct IntentionSets {
    outer: OwnedFd,
    sets: [HashMap<MapData, IntentionKey, IntentionValue>; 2],
    /// The sets' descriptors, as the outer map takes them.
    fds: [OwnedFd; 2],
    ids: [u32; 2],
    known: Option<Known>,
}

impl std::fmt::Debug for IntentionSets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IntentionSets")
            .field("ids", &self.ids)
            .field("known", &self.known.as_ref().map(|k| k.live))
            .finish()
    }
}

fn map_err(name: &'static str) -> impl Fn(aya::maps::MapError) -> Error {
    move |source| Error::Map { name, source }
}

impl IntentionSets {
    /// Opens the sets pinned in `maps_dir`, creating and pinning whatever is missing: the two
    /// hash maps, then the outer map (empty: until the agent writes a set, connect4 lets the
    /// proxy decide). Runs before the object is loaded, which finds the outer map by its pin.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] if a map cannot be created, pinned or opened, or a pin of that name is a
    /// map of another type or size (a pin tree of another version: `meshd uninstall` first).
    pub(super) fn open(maps_dir: &Path) -> Result<Self, Error> {
        let [set_type, key, value, capacity, flags] = SET_LAYOUT;
        let mut sets = Vec::with_capacity(2);
        let mut fds = Vec::with_capacity(2);
        let mut ids = [0; 2];
        for (i, name) in SET_NAMES.iter().enumerate() {
            let path = maps_dir.join(name);
            if !path.exists() {
                let fd = sys::create_map(name, set_type, key, value, capacity, flags, None)
                    .map_err(io_err(format!("creating the intention set {name}")))?;
                sys::obj_pin(fd.as_fd(), &path)
                    .map_err(io_err(format!("pinning {}", path.display())))?;
            }
            let data = MapData::from_pin(&path).map_err(map_err(name))?;
            let info = data.info().map_err(map_err(name))?;
            if info.key_size() != key || info.value_size() != value {
                return Err(io_err(format!(
                    "{} is not an intention set",
                    path.display()
                ))(std::io::Error::from(
                    std::io::ErrorKind::InvalidData,
                )));
            }
            ids[i] = info.id();
            fds.push(sys::obj_get(&path).map_err(io_err(format!("opening {}", path.display())))?);
            let map = Map::from_map_data(data).map_err(map_err(name))?;
            sets.push(HashMap::try_from(map).map_err(map_err(name))?);
        }
        let path = maps_dir.join(MAP_INTENTION_SETS);
        if !path.exists() {
            let template = sys::obj_get(&maps_dir.join(MAP_INTENTIONS_0))
                .map_err(io_err(format!("opening {MAP_INTENTIONS_0}")))?;
            let [outer_type, key, value, slots, flags] = OUTER_LAYOUT;
            let fd = sys::create_map(
                MAP_INTENTION_SETS,
                outer_type,
                key,
                value,
                slots,
                flags,
                Some(template.as_fd()),
            )
            .map_err(io_err(format!("creating {MAP_INTENTION_SETS}")))?;
            sys::obj_pin(fd.as_fd(), &path)
                .map_err(io_err(format!("pinning {}", path.display())))?;
        }
        let info = MapInfo::from_pin(&path).map_err(map_err(MAP_INTENTION_SETS))?;
        if info.map_type().ok() != Some(aya::maps::MapType::ArrayOfMaps) {
            return Err(io_err(format!(
                "{} is not an array of maps (a pin tree of another version: run `meshd uninstall`)",
                path.display()
            ))(std::io::Error::from(
                std::io::ErrorKind::InvalidData,
            )));
        }
        let outer = sys::obj_get(&path).map_err(io_err(format!("opening {}", path.display())))?;
        let [s0, s1]: [HashMap<MapData, IntentionKey, IntentionValue>; 2] =
            sets.try_into().expect("two sets");
        let [f0, f1]: [OwnedFd; 2] = fds.try_into().expect("two sets");
        Ok(Self {
            outer,
            sets: [s0, s1],
            fds: [f0, f1],
            ids,
            known: None,
        })
    }

    /// The set the outer map points at: `Some(0 | 1)`, or `None` when its element is empty or
    /// points at neither pinned set.
    fn pointed(&self) -> Result<Option<usize>, Error> {
        let id = sys::map_lookup_u32(self.outer.as_fd(), 0)
            .map_err(io_err(format!("reading {MAP_INTENTION_SETS}")))?;
        Ok(id.and_then(|id| self.ids.iter().position(|&x| x == id)))
    }

    /// Points the outer map at set `i`; returns once no program runs with the set it replaced.
    fn point_at(&mut self, i: usize) -> Result<(), Error> {
        use std::os::fd::AsRawFd;
        sys::map_update_u32(self.outer.as_fd(), 0, self.fds[i].as_raw_fd() as u32).map_err(io_err(
            format!("pointing {MAP_INTENTION_SETS} at {}", SET_NAMES[i]),
        ))
    }

    fn write(
        &mut self,
        i: usize,
        key: &IntentionKey,
        value: Option<&IntentionValue>,
    ) -> Result<(), Error> {
        let name = SET_NAMES[i];
        match value {
            Some(v) => self.sets[i].insert(key, v, 0).map_err(map_err(name)),
            None => ignore_missing(self.sets[i].remove(key), name),
        }
    }

    fn read(&self, i: usize) -> Result<StdHashMap<IntentionKey, IntentionValue>, Error> {
        self.sets[i]
            .iter()
            .map(|r| r.map_err(map_err(SET_NAMES[i])))
            .collect()
    }
}

/// The default verdict's entry.
fn default_entry(allow: bool) -> IntentionChange {
    (
        IntentionKey::DEFAULT,
        Some(IntentionValue {
            action: if allow { VERDICT_ALLOW } else { VERDICT_DENY },
            counter: DEFAULT_VERDICT_COUNTER,
        }),
    )
}

impl Dataplane {
    /// Brings the kernel's intentions to a rule set that differs from the one this agent last
    /// wrote by `changes` (each key's new value or removal; a key may repeat, the last one
    /// counts) and whose default verdict is `default_allow`. `full` gives the whole rule set and
    /// is called only when the kernel's sets are not known (the first change after a start, a
    /// change after a failed write or while the proxy decides): the sets are then read back and
    /// the differences written. See the [module documentation](self) for how a change is made
    /// atomic for connects.
    ///
    /// # Errors
    ///
    /// [`Error::Map`] / [`Error::Io`] if a set is full or refuses a write, or the outer map or
    /// `CONFIG` refuse theirs. The set in force then holds the rules before the change (a
    /// refused single-key write changes nothing; a multi-key change is swapped in only once
    /// written); the next change writes the whole set again.
    pub fn update_intentions(
        &mut self,
        changes: &[IntentionChange],
        default_allow: bool,
        full: &dyn Fn() -> StdHashMap<IntentionKey, IntentionValue>,
    ) -> Result<SetWrite, Error> {
        let result = self.try_update(changes, default_allow, full);
        if result.is_err() {
            self.sets.known = None;
        }
        result
    }

    fn try_update(
        &mut self,
        changes: &[IntentionChange],
        default_allow: bool,
        full: &dyn Fn() -> StdHashMap<IntentionKey, IntentionValue>,
    ) -> Result<SetWrite, Error> {
        let config = self.config()?;
        let trusted =
            matches!(&self.sets.known, Some(k) if config.intention_set as usize == k.live);
        if !trusted {
            let mut entries = full();
            let (k, v) = default_entry(default_allow);
            entries.insert(k, v.expect("a value"));
            return self.write_full(entries, default_allow);
        }
        let known = self.sets.known.as_ref().expect("trusted");
        // The effective changes, deduplicated (the last one counts), in a stable order.
        let mut effective: BTreeMap<(u32, u32, u32, u32), IntentionChange> = BTreeMap::new();
        for &(key, value) in changes
            .iter()
            .chain(std::iter::once(&default_entry(default_allow)))
        {
            effective.insert(
                (key.src_ns, key.src_name, key.dst_ns, key.dst_name),
                (key, value),
            );
        }
        effective.retain(|_, (k, v)| known.shadow.get(k) != v.as_ref());
        let effective: Vec<IntentionChange> = effective.into_values().collect();
        match effective.len() {
            0 => Ok(SetWrite::Unchanged),
            1 => {
                let (key, value) = effective[0];
                let live = known.live;
                self.sets.write(live, &key, value.as_ref())?;
                let known = self.sets.known.as_mut().expect("trusted");
                match value {
                    Some(v) => known.shadow.insert(key, v),
                    None => known.shadow.remove(&key),
                };
                if let Some(lag) = known.lag.as_mut() {
                    lag.insert(key);
                }
                self.note_default(default_allow)?;
                Ok(SetWrite::InPlace)
            }
            _ => self.swap_in(effective, default_allow),
        }
    }

    /// Writes a multi-key change into the set not in force and swaps it in.
    fn swap_in(
        &mut self,
        effective: Vec<IntentionChange>,
        default_allow: bool,
    ) -> Result<SetWrite, Error> {
        let mut known = self.sets.known.take().expect("trusted");
        let target = 1 - known.live;
        let lag = match known.lag.take() {
            Some(lag) => lag,
            None => {
                // Unknown (after a full write): read the other set and compare.
                let other = self.sets.read(target)?;
                let mut lag: HashSet<IntentionKey> = other
                    .iter()
                    .filter(|(k, v)| known.shadow.get(k) != Some(v))
                    .map(|(k, _)| *k)
                    .collect();
                lag.extend(known.shadow.keys().filter(|k| !other.contains_key(k)));
                lag
            }
        };
        let mut written: HashSet<IntentionKey> = HashSet::with_capacity(effective.len());
        for (key, value) in &effective {
            match value {
                Some(v) => known.shadow.insert(*key, *v),
                None => known.shadow.remove(key),
            };
            written.insert(*key);
        }
        let keys: Vec<IntentionKey> = lag.union(&written).copied().collect();
        for key in &keys {
            self.sets.write(target, key, known.shadow.get(key))?;
        }
        self.sets.point_at(target)?;
        self.sets.known = Some(Known {
            live: target,
            shadow: known.shadow,
            lag: Some(written),
        });
        self.note_live(target, default_allow)?;
        Ok(SetWrite::Swapped { keys: keys.len() })
    }

    /// Writes `entries` (default entry included) in full into a set not in force, then swaps it
    /// in and takes the kernel's rules back from the proxy.
    fn write_full(
        &mut self,
        entries: StdHashMap<IntentionKey, IntentionValue>,
        default_allow: bool,
    ) -> Result<SetWrite, Error> {
        let target = match self.sets.pointed()? {
            Some(i) => 1 - i,
            None => 0,
        };
        let current = self.sets.read(target)?;
        let mut keys = 0;
        for key in current.keys() {
            if !entries.contains_key(key) {
                self.sets.write(target, key, None)?;
                keys += 1;
            }
        }
        for (key, value) in &entries {
            if current.get(key) != Some(value) {
                self.sets.write(target, key, Some(value))?;
                keys += 1;
            }
        }
        self.sets.point_at(target)?;
        self.sets.known = Some(Known {
            live: target,
            shadow: entries,
            lag: None,
        });
        self.note_live(target, default_allow)?;
        Ok(SetWrite::Full { keys })
    }

    /// Records in `CONFIG` which set is in force (which also ends the proxy's deciding).
    fn note_live(&mut self, live: usize, default_allow: bool) -> Result<(), Error> {
        let mut config = self.config()?;
        config.intention_set = live as u32;
        config.default_verdict = if default_allow {
            VERDICT_ALLOW
        } else {
            VERDICT_DENY
        };
        self.set_config(config)
    }

    /// Records the default verdict in `CONFIG` when it changed (for readers; the programs read
    /// the set's own default entry).
    fn note_default(&mut self, default_allow: bool) -> Result<(), Error> {
        let mut config = self.config()?;
        let verdict = if default_allow {
            VERDICT_ALLOW
        } else {
            VERDICT_DENY
        };
        if config.default_verdict != verdict {
            config.default_verdict = verdict;
            self.set_config(config)?;
        }
        Ok(())
    }

    /// Replaces the whole intention set: `entries` (intentions only) and the default verdict.
    /// Only the differences from what the kernel holds are written, as by
    /// [`update_intentions`](Self::update_intentions).
    ///
    /// # Errors
    ///
    /// As [`update_intentions`](Self::update_intentions).
    pub fn replace_intentions(
        &mut self,
        entries: StdHashMap<IntentionKey, IntentionValue>,
        default_allow: bool,
    ) -> Result<SetWrite, Error> {
        let changes: Vec<IntentionChange> = match &self.sets.known {
            Some(known) => known
                .shadow
                .iter()
                .filter(|(k, _)| **k != IntentionKey::DEFAULT && !entries.contains_key(k))
                .map(|(k, _)| (*k, None))
                .chain(entries.iter().map(|(k, v)| (*k, Some(*v))))
                .collect(),
            None => Vec::new(),
        };
        self.update_intentions(&changes, default_allow, &|| entries.clone())
    }

    /// Takes every intention out of force with one write of `CONFIG`
    /// ([`mesh_common::INTENTION_SET_PROXY`]): connect4/connect6 then send every connection to a
    /// service to the proxy, which decides. Neither intention set nor the outer map is written
    /// or read, so this works when they refuse writes (full, frozen). The next successful
    /// [`update_intentions`](Self::update_intentions) writes a whole set and puts it back in
    /// force.
    ///
    /// # Errors
    ///
    /// [`Error::Map`] if `CONFIG` cannot be read or written.
    pub fn proxy_decides(&mut self) -> Result<(), Error> {
        self.sets.known = None;
        let mut config = self.config()?;
        config.intention_set = INTENTION_SET_PROXY;
        self.set_config(config)
    }

    /// The intentions in force, as the kernel holds them (the default entry left out): none
    /// while the proxy decides ([`proxy_decides`](Self::proxy_decides)) or no set is in force.
    ///
    /// # Errors
    ///
    /// [`Error::Map`] / [`Error::Io`] if `CONFIG`, the outer map or the set cannot be read.
    pub fn intentions(&self) -> Result<Vec<(IntentionKey, IntentionValue)>, Error> {
        if self.config()?.intention_set == INTENTION_SET_PROXY {
            return Ok(Vec::new());
        }
        let Some(live) = self.sets.pointed()? else {
            return Ok(Vec::new());
        };
        Ok(self
            .sets
            .read(live)?
            .into_iter()
            .filter(|(k, _)| *k != IntentionKey::DEFAULT)
            .collect())
    }

    /// The default verdict of the set in force (`true`: allow); `None` while the proxy decides,
    /// no set is in force or the set has no default entry.
    ///
    /// # Errors
    ///
    /// [`Error::Map`] / [`Error::Io`] if `CONFIG`, the outer map or the set cannot be read.
    pub fn default_verdict(&self) -> Result<Option<bool>, Error> {
        if self.config()?.intention_set == INTENTION_SET_PROXY {
            return Ok(None);
        }
        let Some(live) = self.sets.pointed()? else {
            return Ok(None);
        };
        match self.sets.sets[live].get(&IntentionKey::DEFAULT, 0) {
            Ok(v) => Ok(Some(v.action == VERDICT_ALLOW)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(source) => Err(Error::Map {
                name: SET_NAMES[live],
                source,
            }),
        }
    }

    /// Connections each intention allowed and denied in connect4, by counter index, summed
    /// over CPUs.
    ///
    /// # Errors
    ///
    /// [`Error::Map`] if the map cannot be read.
    pub fn intention_counts(&self) -> Result<BTreeMap<u32, IntentionCounts>, Error> {
        let map: aya::maps::PerCpuHashMap<&MapData, u32, IntentionCounts> =
            typed_ref(&self.ebpf, MAP_INTENTION_COUNTS)?;
        let mut out = BTreeMap::new();
        for item in map.iter() {
            let (k, values) = item.map_err(|source| Error::Map {
                name: MAP_INTENTION_COUNTS,
                source,
            })?;
            let mut sum = IntentionCounts::default();
            for v in values.iter() {
                sum.allowed += v.allowed;
                sum.denied += v.denied;
            }
            out.insert(k, sum);
        }
        Ok(out)
    }
}
