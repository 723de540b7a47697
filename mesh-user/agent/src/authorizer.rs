//! The inbound proxy's authoritative intention check: the newest rule set, swapped atomically.
#![warn(missing_docs)]

use std::sync::Arc;

use arc_swap::ArcSwap;
use mesh_core::identity::SpiffeId;
use mesh_core::intentions::{Matched, RuleSet, ServiceName};
use mesh_proxy::Decision;

/// The inbound proxy's authoritative intention check, against the caller's certificate.
pub struct IntentionAuthorizer {
    rules: ArcSwap<RuleSet>,
}

impl IntentionAuthorizer {
    /// An authorizer that checks against `rules` until [`IntentionAuthorizer::set`].
    pub fn new(rules: Arc<RuleSet>) -> Self {
        Self {
            rules: ArcSwap::new(rules),
        }
    }

    /// Swaps in a new rule set; checks already under way finish on the old one.
    pub fn set(&self, rules: Arc<RuleSet>) {
        self.rules.store(rules);
    }
}

impl mesh_proxy::Authorizer for IntentionAuthorizer {
    fn authorize(&self, source: &SpiffeId, destination: &SpiffeId) -> Decision {
        let (Ok(src), Ok(dst)) = (
            ServiceName::new(source.namespace(), source.service()),
            ServiceName::new(destination.namespace(), destination.service()),
        ) else {
            return Decision::deny("identity is not a valid service name");
        };
        let decision = self.rules.load().check(&src, &dst);
        let (why, intention) = match &decision.matched {
            Matched::Intention { id, precedence } => (
                format!("intention {id} (precedence {precedence})"),
                Some(id),
            ),
            Matched::Default => ("default intention policy".to_string(), None),
        };
        let answer = if decision.allowed {
            Decision::allow(why)
        } else {
            Decision::deny(why)
        };
        match intention {
            Some(id) => answer.by_intention(id.clone()),
            None => answer,
        }
    }
}
