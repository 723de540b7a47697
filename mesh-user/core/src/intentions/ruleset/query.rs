//! Read-side queries of the rule set: Consul's `match` and the reference `check`.

use super::{precedence_order, RuleSet};
use crate::intentions::{Intention, ServiceName, WILDCARD};

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
    /// Whether the connection is allowed. `false` when the deciding intention has permissions:
    /// Consul's check looks at source and destination only, and an L7 intention denies at L4.
    pub allowed: bool,
    /// What decided.
    pub matched: Matched,
    /// Whether the deciding intention has L7 permissions (Consul's `HasPermissions`): requests
    /// on the connection are then decided one by one ([`RuleSet::check_request`]).
    pub has_permissions: bool,
}

impl RuleSet {
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
    /// map lookups ([`simulate_kernel_check`](crate::intentions::simulate_kernel_check)).
    pub fn check(&self, source: &ServiceName, destination: &ServiceName) -> Decision {
        match self.deciding(source, destination) {
            Some(it) => Decision {
                allowed: it.action.is_allow() && !it.has_permissions(),
                matched: Matched::Intention {
                    id: it.id.clone(),
                    precedence: it.precedence,
                },
                has_permissions: it.has_permissions(),
            },
            None => Decision {
                allowed: self.default_policy.is_allow(),
                matched: Matched::Default,
                has_permissions: false,
            },
        }
    }

    /// The intention that decides connections from `source` to `destination`: the first, in
    /// precedence order, whose destination and source both match.
    pub fn deciding(&self, source: &ServiceName, destination: &ServiceName) -> Option<&Intention> {
        self.matching(MatchType::Destination, destination)
            .filter(|it| it.source.matches(source))
            .min_by(|a, b| precedence_order(a, b))
    }
}

/// The patterns an intention side must equal to match `name`: `*/*`, then `ns/*`, then
/// `ns/name`, stopping at the first wildcard in `name` (Consul's `intentionMatchGetParams`).
fn match_candidates(name: &ServiceName) -> Vec<ServiceName> {
    let mut out = vec![ServiceName::wildcard()];
    if name.namespace() == WILDCARD {
        return out;
    }
    out.push(ServiceName::new_unchecked(
        name.namespace().to_owned(),
        WILDCARD.to_owned(),
    ));
    if name.name() != WILDCARD {
        out.push(name.clone());
    }
    out
}
