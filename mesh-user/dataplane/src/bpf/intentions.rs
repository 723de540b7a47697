//! The two intention sets and the atomic flip between them.

use std::collections::BTreeMap;

use aya::maps::{HashMap, MapData};
use mesh_common::{
    IntentionCounts, IntentionKey, IntentionValue, MAP_INTENTIONS_0, MAP_INTENTIONS_1,
    MAP_INTENTION_COUNTS,
};

use super::maps::{entries_of, ignore_missing, typed, typed_ref};
use super::{Dataplane, Error};

/// How long after flipping the intention set the agent waits before rewriting the set it
/// flipped away from.
const FLIP_QUIESCE: std::time::Duration = std::time::Duration::from_millis(2);

impl Dataplane {
    /// Replaces the whole intention set at once: the set not in force is brought to `entries`
    /// (only the differences are written), then `CONFIG.intention_set` flips to it together with
    /// the default verdict. A connection sees the old rules or the new ones, never a mix.
    ///
    /// # Errors
    ///
    /// [`Error::Map`] if the set being written is full or refuses a write; the set in force is
    /// then unchanged (the flip did not happen).
    pub fn replace_intentions(
        &mut self,
        entries: std::collections::HashMap<IntentionKey, IntentionValue>,
        default_allow: bool,
    ) -> Result<(), Error> {
        let mut config = self.config()?;
        // While the proxy decides (set 2) neither set is read by connect4: write set 1.
        let next = 1 - (config.intention_set & 1);
        // A connect4 run that picked the set we are about to rewrite (before the last flip)
        // finishes within microseconds; leave it time before touching that set again.
        if let Some(at) = self.last_flip {
            let since = at.elapsed();
            if since < FLIP_QUIESCE {
                std::thread::sleep(FLIP_QUIESCE - since);
            }
        }
        let name = if next == 0 {
            MAP_INTENTIONS_0
        } else {
            MAP_INTENTIONS_1
        };
        // What the set holds: known from our own last write, read from the kernel otherwise
        // (the first change after a start, when the maps were adopted).
        let current = match self.shadow[next as usize].take() {
            Some(known) => known,
            None => entries_of(&self.ebpf, name)?.into_iter().collect(),
        };
        {
            let mut map: HashMap<&mut MapData, IntentionKey, IntentionValue> =
                typed(&mut self.ebpf, name)?;
            for key in current.keys() {
                if !entries.contains_key(key) {
                    ignore_missing(map.remove(key), name)?;
                }
            }
            for (key, value) in &entries {
                if current.get(key) != Some(value) {
                    map.insert(key, value, 0)
                        .map_err(|source| Error::Map { name, source })?;
                }
            }
        }
        config.intention_set = next;
        config.default_verdict = if default_allow {
            mesh_common::VERDICT_ALLOW
        } else {
            mesh_common::VERDICT_DENY
        };
        self.set_config(config)?;
        self.last_flip = Some(std::time::Instant::now());
        self.shadow[next as usize] = Some(entries);
        Ok(())
    }

    /// Takes every intention out of force with one write of `CONFIG`
    /// ([`mesh_common::INTENTION_SET_PROXY`]): connect4/connect6 then send every connection to a
    /// service to the proxy, which decides. Neither intention map is written or read, so this
    /// works when they refuse writes (full, frozen). The next successful
    /// [`replace_intentions`](Self::replace_intentions) puts a set back in force.
    ///
    /// # Errors
    ///
    /// [`Error::Map`] if `CONFIG` cannot be read or written.
    pub fn proxy_decides(&mut self) -> Result<(), Error> {
        let mut config = self.config()?;
        config.intention_set = mesh_common::INTENTION_SET_PROXY;
        self.set_config(config)?;
        self.last_flip = Some(std::time::Instant::now());
        Ok(())
    }

    /// The intentions in force, as the kernel holds them: none while the proxy decides
    /// ([`proxy_decides`](Self::proxy_decides)).
    ///
    /// # Errors
    ///
    /// [`Error::Map`] if `CONFIG` or the set cannot be read.
    pub fn intentions(&self) -> Result<Vec<(IntentionKey, IntentionValue)>, Error> {
        let set = self.config()?.intention_set;
        if set == mesh_common::INTENTION_SET_PROXY {
            return Ok(Vec::new());
        }
        entries_of(
            &self.ebpf,
            if set == 0 {
                MAP_INTENTIONS_0
            } else {
                MAP_INTENTIONS_1
            },
        )
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
