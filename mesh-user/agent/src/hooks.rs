//! The agent's side of the API's ports: new rule sets reach the agent's loop over a channel,
//! per-intention counters come from the last snapshot the loop published.
#![warn(missing_docs)]

use std::sync::Arc;

use arc_swap::ArcSwap;
use mesh_core::intentions::ports::{CountersSource, IntentionCounters, RulesSink};
use mesh_core::intentions::RuleSet;

/// The API's view of the agent: new rule sets go to the agent's loop over a channel (the API
/// must not wait for the kernel), counters come from the last snapshot the loop published.
pub struct ApiHooks {
    rules: tokio::sync::mpsc::UnboundedSender<RuleSet>,
    counters: ArcSwap<Vec<IntentionCounters>>,
}

impl ApiHooks {
    /// The hooks for the API, and the receiving end the agent's loop reads new rule sets
    /// from. Counters start empty.
    pub fn new() -> (Arc<Self>, tokio::sync::mpsc::UnboundedReceiver<RuleSet>) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        (
            Arc::new(Self {
                rules: tx,
                counters: ArcSwap::from_pointee(Vec::new()),
            }),
            rx,
        )
    }

    /// Publishes the counters the API serves.
    pub fn publish_counters(&self, counters: Vec<IntentionCounters>) {
        self.counters.store(Arc::new(counters));
    }
}

impl RulesSink for ApiHooks {
    fn rules_changed(&self, rules: &RuleSet) {
        // The receiver lives as long as the agent's loop; after that there is no one to tell.
        let _ = self.rules.send(rules.clone());
    }
}

impl CountersSource for ApiHooks {
    fn counters(&self) -> Vec<IntentionCounters> {
        self.counters.load().as_ref().clone()
    }
}
