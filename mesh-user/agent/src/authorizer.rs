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
    /// destination it denies, as Envoy's network RBAC filter treats it in Consul. An L4 allow
    /// to an `http` destination is also served request by request (every request allowed), so
    /// that requests are counted as Envoy counts them.
    fn authorize(&self, source: &SpiffeId, destination: &SpiffeId) -> Decision {
        let Some((src, dst)) = names(source, destination) else {
            return Decision::deny("identity is not a valid service name");
        };
        let rules = self.rules.load();
        let decision = rules.check(&src, &dst);
        let why = reason(&decision.matched);
        let intention = match &decision.matched {
            Matched::Intention { id, .. } => Some(id),
            Matched::Default => None,
        };
        let answer = if decision.has_permissions {
            match self.protocol(&rules, &dst) {
                Protocol::Http => Decision::per_request(format!("{why}, L7 permissions")),
                Protocol::Tcp => Decision::deny(format!(
                    "{why}: L7 permissions on a destination whose protocol is not http"
                )),
            }
        } else if decision.allowed {
            // An allowed connection to an `http` destination is served as HTTP too, request by
            // request under the same L4 intention, as Consul's Envoy runs its HTTP connection
            // manager for every `http` service: each request is counted
            // (`istio_requests_total`, its code and duration). `tcp` stays a byte copy.
            match self.protocol(&rules, &dst) {
                Protocol::Http => Decision::per_request(format!("{why}, http")),
                Protocol::Tcp => Decision::allow(why),
            }
        } else {
            Decision::deny(why)
        };
        match intention {
            Some(id) => answer.by_intention(id.clone()),
            None => answer,
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
        let answer = if d.allowed {
            Decision::allow(why)
        } else {
            Decision::deny(why)
        };
        match &d.matched {
            Matched::Intention { id, .. } => answer.by_intention(id.clone()),
            Matched::Default => answer,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_core::intentions::permission::permissions_from_json;
    use mesh_core::intentions::{Action, EntryIndexes, IntentionSpec, ServiceDefaultsEntry};
    use mesh_proxy::Authorizer;

    fn id(service: &str) -> SpiffeId {
        SpiffeId::new(
            "5e1f0000-0000-4000-8000-0000000000aa.consul",
            "default",
            "dc1",
            service,
        )
        .unwrap()
    }

    fn sn(s: &str) -> ServiceName {
        ServiceName::parse(s).unwrap()
    }

    fn get(path: &str) -> HttpRequest<'_> {
        HttpRequest {
            method: "GET",
            path,
            headers: &[],
        }
    }

    #[test]
    fn l7_intentions_are_per_request_on_http_and_deny_elsewhere() {
        let mut rules = RuleSet::new();
        rules
            .apply_service_defaults(&ServiceDefaultsEntry::new(sn("api"), Protocol::Http))
            .unwrap();
        let perms =
            permissions_from_json(r#"[{"Action":"allow","HTTP":{"PathPrefix":"/ok"}}]"#).unwrap();
        rules
            .create(
                &IntentionSpec::with_permissions(&sn("web"), &sn("api"), perms),
                false,
            )
            .unwrap();
        rules
            .create(
                &IntentionSpec::new(&sn("db"), &sn("api"), Action::Allow),
                false,
            )
            .unwrap();
        let authz = IntentionAuthorizer::new(Arc::new(rules.clone()));
        let d = authz.authorize(&id("web"), &id("api"));
        assert!(d.allowed && d.per_request, "{d:?}");
        assert!(
            authz
                .authorize_request(&id("web"), &id("api"), &get("/ok/1"))
                .allowed
        );
        let denied = authz.authorize_request(&id("web"), &id("api"), &get("/no"));
        assert!(!denied.allowed);
        assert!(
            denied.reason.contains("default intention policy"),
            "{denied:?}"
        );
        // An L4 pair to an http destination is served as HTTP too (each request counted),
        // every request allowed by its L4 intention; to a tcp destination it stays a byte copy.
        let d = authz.authorize(&id("db"), &id("api"));
        assert!(d.allowed && d.per_request, "{d:?}");
        assert!(
            authz
                .authorize_request(&id("db"), &id("api"), &get("/anything"))
                .allowed
        );
        let mut tcp_rules = rules.clone();
        tcp_rules
            .create(
                &IntentionSpec::new(&sn("db"), &sn("cache"), Action::Allow),
                false,
            )
            .unwrap();
        let d = IntentionAuthorizer::new(Arc::new(tcp_rules)).authorize(&id("db"), &id("cache"));
        assert!(d.allowed && !d.per_request, "{d:?}");

        // Without a service-defaults entry the catalog's protocol decides (the state a
        // ServiceDefaults resource makes): tcp turns the L7 intention into a deny.
        let l7 = rules.get_exact(&sn("web"), &sn("api")).unwrap().clone();
        let entry = EntryIndexes::from(&rules.entry(&sn("api")).unwrap());
        let bare = RuleSet::restore(
            Action::Deny,
            rules.index(),
            rules.counter_watermark(),
            vec![l7],
            vec![entry],
        )
        .unwrap();
        let authz = IntentionAuthorizer::new(Arc::new(bare));
        let d = authz.authorize(&id("web"), &id("api"));
        assert!(!d.allowed, "{d:?}");
        assert!(d.reason.contains("not http"), "{d:?}");
        let mut catalog = Catalog::default();
        catalog
            .services
            .push(serde_json::from_str(r#"{"name":"api","protocol":"http"}"#).unwrap());
        authz.set_catalog(&catalog);
        assert!(authz.authorize(&id("web"), &id("api")).per_request);
    }
}
