//! Which (source, destination) pairs recent writes touched, so that the kernel form can be
//! brought up to date by compiling only those ([`super::super::CompiledRules::update`]).

use std::sync::atomic::{AtomicU64, Ordering};

use imbl::Vector;

use super::PairKey;
use crate::intentions::ServiceName;

/// How many touches a rule set remembers. A compiled form more than this many touches behind
/// is compiled again in full.
pub(super) const CAPACITY: usize = 8192;

/// Versions are unique in the process: every touch of every rule set takes the next one, so a
/// version found in a rule set's journal names exactly one state of that rule set's history.
static NEXT_VERSION: AtomicU64 = AtomicU64::new(1);

fn next_version() -> u64 {
    NEXT_VERSION.fetch_add(1, Ordering::Relaxed)
}

/// A rule set's recent touches, oldest first.
#[derive(Clone, Debug)]
pub(super) struct Journal {
    /// The version of the state before the oldest remembered touch.
    base: u64,
    /// (version after the touch, the pair touched; `None` for the default policy). Persistent,
    /// as the rule set's maps: a clone shares it.
    touches: Vector<(u64, Option<PairKey>)>,
}

impl Journal {
    pub(super) fn new() -> Self {
        Journal {
            base: next_version(),
            touches: Vector::new(),
        }
    }

    /// The version of the current state.
    pub(super) fn version(&self) -> u64 {
        self.touches.back().map_or(self.base, |(v, _)| *v)
    }

    /// Records a write that may have changed `pair`'s intention (`None`: the default policy).
    pub(super) fn touch(&mut self, pair: Option<&PairKey>) {
        if self.touches.len() == CAPACITY {
            if let Some((v, _)) = self.touches.pop_front() {
                self.base = v;
            }
        }
        self.touches.push_back((next_version(), pair.cloned()));
    }

    /// The pairs touched since the state of version `version`, oldest first (repeats kept), and
    /// whether the default policy was touched; `None` when that state is not in this journal
    /// (another rule set's, or too old).
    pub(super) fn since(&self, version: u64) -> Option<(Vec<(&ServiceName, &ServiceName)>, bool)> {
        let start = self.after(version)?;
        let mut pairs = Vec::new();
        let mut default = false;
        for (_, pair) in self.touches.iter().skip(start) {
            match pair {
                Some(p) => pairs.push((&p.src, &p.dst)),
                None => default = true,
            }
        }
        Some((pairs, default))
    }

    /// Whether the state of version `version` is in this journal.
    pub(super) fn remembers(&self, version: u64) -> bool {
        self.after(version).is_some()
    }

    /// Where the touches after the state of version `version` start; `None` when that state is
    /// not in this journal.
    fn after(&self, version: u64) -> Option<usize> {
        if version == self.base {
            return Some(0);
        }
        // Versions increase along the journal.
        self.touches
            .binary_search_by_key(&version, |(v, _)| *v)
            .ok()
            .map(|i| i + 1)
    }
}
