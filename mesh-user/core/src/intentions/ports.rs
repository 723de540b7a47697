//! The ports through which intentions flow between the API and the agent: new rule sets go to
//! a [`RulesSink`], per-intention counts come from a [`CountersSource`]. The API calls them;
//! the agent implements them; [`NoSink`], [`MemorySink`], [`NoCounters`] and [`MemoryCounters`]
//! serve tests and agents without a dataplane.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use super::RuleSet;

/// Told about every change of the intentions. The agent compiles the rule set into its kernel
/// maps and closes established connections that it now denies.
pub trait RulesSink: Send + Sync {
    /// Called with the whole new rule set after each successful change, in the order of the
    /// changes, and once when the server starts. Writes wait while it runs (it is called on a
    /// blocking thread): do the work or hand it off, but do not call back into the API.
    fn rules_changed(&self, rules: &RuleSet);
}

/// A [`RulesSink`] that ignores every change.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoSink;

impl RulesSink for NoSink {
    fn rules_changed(&self, _rules: &RuleSet) {}
}

/// A [`RulesSink`] that keeps the last rule set it was given, for tests.
#[derive(Debug, Default)]
pub struct MemorySink {
    latest: Mutex<Option<RuleSet>>,
    calls: AtomicUsize,
}

impl MemorySink {
    /// The last rule set given, if any.
    pub fn latest(&self) -> Option<RuleSet> {
        self.latest.lock().map(|g| g.clone()).unwrap_or_default()
    }

    /// How many times [`RulesSink::rules_changed`] was called.
    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

impl RulesSink for MemorySink {
    fn rules_changed(&self, rules: &RuleSet) {
        if let Ok(mut g) = self.latest.lock() {
            *g = Some(rules.clone());
        }
        self.calls.fetch_add(1, Ordering::SeqCst);
    }
}

/// How often one intention allowed and denied a connection.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IntentionCounters {
    /// The intention's ID.
    pub id: String,
    /// Connections it allowed.
    pub allowed: u64,
    /// Connections it denied.
    pub denied: u64,
}

/// Where `GET /v1/connect/intentions/counters` gets its numbers: the agent reads them from its
/// kernel maps and proxies. Counts for IDs that are no longer intentions are ignored;
/// intentions without counts show zeros.
pub trait CountersSource: Send + Sync {
    /// The counts now, one element per intention that has any.
    fn counters(&self) -> Vec<IntentionCounters>;
}

/// A [`CountersSource`] with no counts.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoCounters;

impl CountersSource for NoCounters {
    fn counters(&self) -> Vec<IntentionCounters> {
        Vec::new()
    }
}

/// A [`CountersSource`] that counts what it is told, for tests.
#[derive(Debug, Default)]
pub struct MemoryCounters {
    counts: Mutex<HashMap<String, (u64, u64)>>,
}

impl MemoryCounters {
    /// Counts one connection that intention `id` allowed (or denied).
    pub fn record(&self, id: &str, allowed: bool) {
        if let Ok(mut m) = self.counts.lock() {
            let c = m.entry(id.to_owned()).or_default();
            if allowed {
                c.0 += 1;
            } else {
                c.1 += 1;
            }
        }
    }
}

impl CountersSource for MemoryCounters {
    fn counters(&self) -> Vec<IntentionCounters> {
        let Ok(m) = self.counts.lock() else {
            return Vec::new();
        };
        m.iter()
            .map(|(id, &(allowed, denied))| IntentionCounters {
                id: id.clone(),
                allowed,
                denied,
            })
            .collect()
    }
}

/// Shared handle types, for brevity.
pub type SharedSink = Arc<dyn RulesSink>;
/// See [`SharedSink`].
pub type SharedCounters = Arc<dyn CountersSource>;
