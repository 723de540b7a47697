//! L7: `service-defaults` entries (a destination's protocol) and the per-request decision of
//! intentions with permissions.

use super::{Matched, RuleSet};
use crate::catalog::Protocol;
use crate::intentions::defaults::protocol_name;
use crate::intentions::permission::first_match;
use crate::intentions::{Error, HttpRequest, Result, ServiceDefaultsEntry, ServiceName};

/// The decision for one HTTP request on a connection from a source to a destination.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestDecision {
    /// Whether the request may go to the application.
    pub allowed: bool,
    /// The intention that decided; [`Matched::Default`] when none matched the source, or when
    /// the deciding intention's permissions did not match the request.
    pub matched: Matched,
    /// The index of the permission that matched in the deciding intention's `Permissions`.
    pub permission: Option<usize>,
}

impl RuleSet {
    /// The decision for one HTTP request, as Consul's RBAC filter makes it: the intention that
    /// decides the connection ([`RuleSet::deciding`]) decides the request; for an L7 intention
    /// its first permission that matches the request decides, and when none matches the
    /// default policy does. A lower-precedence intention never decides for a source that a
    /// higher-precedence one matches (Consul's `removeSourcePrecedence` excludes those sources
    /// from it), L7 or not.
    pub fn check_request(
        &self,
        source: &ServiceName,
        destination: &ServiceName,
        request: &HttpRequest<'_>,
    ) -> RequestDecision {
        let Some(it) = self.deciding(source, destination) else {
            return RequestDecision {
                allowed: self.default_policy().is_allow(),
                matched: Matched::Default,
                permission: None,
            };
        };
        let matched = Matched::Intention {
            id: it.id.clone(),
            precedence: it.precedence,
        };
        if !it.has_permissions() {
            return RequestDecision {
                allowed: it.action.is_allow(),
                matched,
                permission: None,
            };
        }
        match first_match(&it.permissions, request) {
            Some((i, p)) => RequestDecision {
                allowed: p.action.is_allow(),
                matched,
                permission: Some(i),
            },
            None => RequestDecision {
                allowed: self.default_policy().is_allow(),
                matched: Matched::Default,
                permission: None,
            },
        }
    }

    /// Whether the intention deciding `source` → `destination` has L7 permissions (Consul's
    /// `IntentionDecisionSummary.HasPermissions`, which the UI's topology shows on an edge).
    pub fn has_permissions(&self, source: &ServiceName, destination: &ServiceName) -> bool {
        self.deciding(source, destination)
            .is_some_and(|it| it.has_permissions())
    }

    /// Whether any intention to `destination` has permissions.
    pub fn destination_has_permissions(&self, destination: &ServiceName) -> bool {
        self.by_dst
            .get(destination)
            .is_some_and(|m| m.values().any(|it| it.has_permissions()))
    }

    /// The `service-defaults` entry of `service`.
    pub fn service_defaults(&self, service: &ServiceName) -> Option<&ServiceDefaultsEntry> {
        self.service_defaults.get(service)
    }

    /// Every `service-defaults` entry, by namespace then name.
    pub fn service_defaults_list(&self) -> Vec<&ServiceDefaultsEntry> {
        self.service_defaults.values().collect()
    }

    /// The protocol `service`'s `service-defaults` entry gives, if it has one.
    pub fn protocol(&self, service: &ServiceName) -> Option<Protocol> {
        self.service_defaults.get(service).map(|e| e.protocol)
    }

    /// The effective protocol of `service`: its entry's, else `catalog` (the catalog's protocol
    /// for it, when known), else `tcp`. See the [`defaults`](crate::intentions::defaults) docs.
    pub fn effective_protocol(&self, service: &ServiceName, catalog: Option<Protocol>) -> Protocol {
        self.protocol(service).or(catalog).unwrap_or_default()
    }

    /// Writes (creates or replaces) a `service-defaults` entry.
    ///
    /// # Errors
    ///
    /// [`Error::ReadOnly`] when the service's entry is managed by a Kubernetes `ServiceDefaults`
    /// object, or `entry` claims to be. [`Error::Invalid`] at `Protocol` when the entry takes
    /// `http` away from a destination that has intentions with permissions (Consul: "service ... has protocol ..., which is
    /// incompatible with L7 intentions permissions"); nothing changes.
    pub fn apply_service_defaults(&mut self, entry: &ServiceDefaultsEntry) -> Result<()> {
        self.check_defaults_writable(&entry.service, &entry.meta)?;
        self.put_service_defaults(entry)
    }

    /// [`apply_service_defaults`](Self::apply_service_defaults) without the read-only check
    /// (the Kubernetes sync writes managed entries with it).
    pub(super) fn put_service_defaults(&mut self, entry: &ServiceDefaultsEntry) -> Result<()> {
        if entry.protocol != Protocol::Http && self.destination_has_permissions(&entry.service) {
            return Err(incompatible(&entry.service, entry.protocol, "Protocol"));
        }
        let index = self.index + 1;
        let create_index = self
            .service_defaults
            .get(&entry.service)
            .map_or(index, |e| e.create_index);
        let mut stored = entry.clone();
        stored.create_index = create_index;
        stored.modify_index = index;
        self.service_defaults.insert(entry.service.clone(), stored);
        self.index = index;
        Ok(())
    }

    /// Deletes `service`'s `service-defaults` entry; `Ok(false)` when there was none.
    ///
    /// # Errors
    ///
    /// [`Error::ReadOnly`] when the entry is managed by a Kubernetes `ServiceDefaults` object.
    /// [`Error::Invalid`] when the service has intentions with permissions (without the entry
    /// its protocol would be `tcp`); nothing changes.
    pub fn delete_service_defaults(&mut self, service: &ServiceName) -> Result<bool> {
        self.check_defaults_writable(service, &std::collections::BTreeMap::new())?;
        self.remove_service_defaults(service)
    }

    /// [`delete_service_defaults`](Self::delete_service_defaults) without the read-only check.
    pub(super) fn remove_service_defaults(&mut self, service: &ServiceName) -> Result<bool> {
        if !self.service_defaults.contains_key(service) {
            return Ok(false);
        }
        if self.destination_has_permissions(service) {
            return Err(incompatible(service, Protocol::Tcp, "Name"));
        }
        self.service_defaults.remove(service);
        self.index += 1;
        Ok(true)
    }

    /// Puts back stored `service-defaults` entries (after [`RuleSet::restore`]).
    ///
    /// # Errors
    ///
    /// [`Error::Invalid`] naming `ServiceDefaults[i]` for an entry given twice, indexes out of
    /// order, or an L7 intention whose destination the entries do not make `http`.
    pub fn restore_service_defaults(&mut self, entries: Vec<ServiceDefaultsEntry>) -> Result<()> {
        for (i, e) in entries.into_iter().enumerate() {
            let field = format!("ServiceDefaults[{i}]");
            if e.create_index > e.modify_index || e.modify_index > self.index {
                return Err(Error::invalid(
                    field.clone(),
                    format!(
                        "{field}: CreateIndex {} <= ModifyIndex {} <= index {} does not hold",
                        e.create_index, e.modify_index, self.index
                    ),
                ));
            }
            if self.service_defaults.insert(e.service.clone(), e).is_some() {
                return Err(Error::invalid(
                    field.clone(),
                    format!("{field}: a second entry for one service"),
                ));
            }
        }
        if let Some(it) = self.iter().find(|it| {
            it.has_permissions() && self.protocol(&it.destination) != Some(Protocol::Http)
        }) {
            let proto = self.protocol(&it.destination).unwrap_or_default();
            return Err(incompatible(&it.destination, proto, "ServiceDefaults"));
        }
        Ok(())
    }

    /// Refuses permissions on a destination whose `service-defaults` protocol is not `http`.
    pub(super) fn check_l7_protocol(
        &self,
        destination: &ServiceName,
        has_permissions: bool,
        field: &str,
    ) -> Result<()> {
        let proto = self.protocol(destination).unwrap_or_default();
        if has_permissions && proto != Protocol::Http {
            return Err(incompatible(destination, proto, field));
        }
        Ok(())
    }
}

fn incompatible(service: &ServiceName, protocol: Protocol, field: &str) -> Error {
    Error::invalid(
        field,
        format!(
            "{field}: service {:?} has protocol {:?}, which is incompatible with L7 intentions permissions",
            service.to_string(),
            protocol_name(protocol)
        ),
    )
}
