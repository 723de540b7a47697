//! The inbound proxy's authoritative intention check: the newest rule set and the catalog's
//! service protocols, each swapped atomically.
#![warn(missing_docs)]

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use mesh_core::catalog::{Catalog, Protocol};
use mesh_core::identity::SpiffeId;
use mesh_core::intentions::{HttpRequest, Matched, RuleSet, ServiceName};
use mesh_proxy::Decision;

/// The inbound proxy's authoritative intention check, against the caller's certificate.
pub struct IntentionAuthorizer {
    rules: ArcSwap<RuleSet>,
    protocols: ArcSwap<HashMap<ServiceName, Protocol>>,
}

impl IntentionAuthorizer {
    /// An authorizer that checks against `rules` until [`IntentionAuthorizer::set`]; every
    /// service is `tcp` until [`IntentionAuthorizer::set_catalog`].
    pub fn new(rules: Arc<RuleSet>) -> Self {
        Self {
            rules: ArcSwap::new(rules),
            protocols: ArcSwap::from_pointee(HashMap::new()),
        }
    }

    /// Swaps in a new rule set; checks already under way finish on the old one.
    pub fn set(&self, rules: Arc<RuleSet>) {
        self.rules.store(rules);
    }

    /// Takes the catalog's service protocols, the fallback when a service has no
    /// `service-defaults` entry.
    pub fn set_catalog(&self, catalog: &Catalog) {
        let protocols = catalog
            .services
            .iter()
            .filter_map(|s| Some((ServiceName::new(&s.namespace, &s.name).ok()?, s.protocol)))
            .collect();
        self.protocols.store(Arc::new(protocols));
    }

    /// The destination's effective protocol: its `service-defaults` entry's, else the
    /// catalog's, else `tcp`.
    fn protocol(&self, rules: &RuleSet, destination: &ServiceName) -> Protocol {
        rules.effective_protocol(destination, self.protocols.load().get(destination).copied())
    }
}

fn names(source: &SpiffeId, destination: &SpiffeId) -> Option<(ServiceName, ServiceName)> {
    Some((
        ServiceName::new(source.namespace(), source.service()).ok()?,
        ServiceName::new(destination.namespace(), destination.service()).ok()?,
    ))
}

fn reason(matched: &Matched) -> String {
    match matched {
        Matched::Intention { id, precedence } => {
            format!("intention {id} (precedence {precedence})")
        }
        Matched::Default => "default intention policy".to_string(),
    }
}

impl mesh_proxy::Authorizer for IntentionAuthorizer {
    /// Consul's decision for a connection. An L7 intention (with permissions) lets an `http`
    /// destination's connection through to be decided request by request; on any other
    /// destination it denies, as Envoy's network RBAC filter treats it in Consul.
    fn authorize(&self, source: &SpiffeId, destination: &SpiffeId) -> Decision {
        let Some((src, dst)) = names(source, destination) else {
            return Decision::deny("identity is not a valid service name");
        };
        let rules = self.rules.load();
        let decision = rules.check(&src, &dst);
        let why = reason(&decision.matched);
        if decision.has_permissions {
            return match self.protocol(&rules, &dst) {
                Protocol::Http => Decision::per_request(format!("{why}, L7 permissions")),
                Protocol::Tcp => Decision::deny(format!(
                    "{why}: L7 permissions on a destination whose protocol is not http"
                )),
            };
        }
        if decision.allowed {
            Decision::allow(why)
        } else {
            Decision::deny(why)
        }
    }

    fn authorize_request(
        &self,
        source: &SpiffeId,
        destination: &SpiffeId,
        request: &HttpRequest<'_>,
    ) -> Decision {
        let Some((src, dst)) = names(source, destination) else {
            return Decision::deny("identity is not a valid service name");
        };
        let d = self.rules.load().check_request(&src, &dst, request);
        let mut why = reason(&d.matched);
        if let Some(i) = d.permission {
            why.push_str(&format!(", permission {i}"));
        }
        if d.allowed {
            Decision::allow(why)
        } else {
            Decision::deny(why)
        }
    }
}
