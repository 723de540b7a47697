//! The ports through which intentions flow between the API and the agent: new rule sets go to
//! a [`RulesSink`], per-intention counts come from a [`CountersSource`], whether the kernel
//! holds the rules comes from a [`StatusSource`]. The API calls them; the agent implements
//! them; [`NoSink`], [`MemorySink`], [`NoCounters`], [`MemoryCounters`], [`NoStatus`] and
//! [`PublishedStatus`] serve tests and agents without a dataplane.

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

/// Whether the kernel enforces the rules the proxies enforce.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum KernelIntentions {
    /// The agent has not reported yet.
    #[default]
    Unknown,
    /// The kernel holds the newest rules (or the agent runs in iptables mode, where the
    /// proxy alone decides by design).
    InSync,
    /// The kernel could not take the newest rules: it holds none and lets every connection
    /// reach the proxy, which decides (fail closed, but without the kernel's early deny).
    ProxyDecides {
        /// Why, as the kernel write failed.
        reason: String,
    },
}

impl KernelIntentions {
    /// The name the API shows: `unknown`, `in-sync` or `proxy-decides`.
    pub fn as_str(&self) -> &'static str {
        match self {
            KernelIntentions::Unknown => "unknown",
            KernelIntentions::InSync => "in-sync",
            KernelIntentions::ProxyDecides { .. } => "proxy-decides",
        }
    }
}

/// What the agent reports about the rules in force.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MeshStatus {
    /// Whether the kernel holds them.
    pub kernel_intentions: KernelIntentions,
    /// How many intentions the agent last applied (proxies and, when in sync, kernel).
    pub intentions: usize,
}

/// Where `GET /v1/agent/mesh/status` gets the agent's view of the rules in force. The agent's
/// loop publishes after each rule change; the API reads the last report without waiting.
pub trait StatusSource: Send + Sync {
    /// The last report.
    fn status(&self) -> MeshStatus;
}

/// A [`StatusSource`] that never reports ([`KernelIntentions::Unknown`]).
#[derive(Clone, Copy, Debug, Default)]
pub struct NoStatus;

impl StatusSource for NoStatus {
    fn status(&self) -> MeshStatus {
        MeshStatus::default()
    }
}

/// A [`StatusSource`] holding the last status [`published`](PublishedStatus::publish): the
/// agent's loop publishes into it, the API reads it.
#[derive(Debug, Default)]
pub struct PublishedStatus {
    last: Mutex<MeshStatus>,
}

impl PublishedStatus {
    /// Replaces the reported status.
    pub fn publish(&self, status: MeshStatus) {
        match self.last.lock() {
            Ok(mut g) => *g = status,
            Err(e) => *e.into_inner() = status,
        }
    }
}

impl StatusSource for PublishedStatus {
    fn status(&self) -> MeshStatus {
        match self.last.lock() {
            Ok(g) => g.clone(),
            Err(e) => e.into_inner().clone(),
        }
    }
}

/// Shared handle types, for brevity.
pub type SharedSink = Arc<dyn RulesSink>;
/// See [`SharedSink`].
pub type SharedCounters = Arc<dyn CountersSource>;
/// See [`SharedSink`].
pub type SharedStatus = Arc<dyn StatusSource>;
