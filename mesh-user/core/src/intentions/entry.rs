//! The `service-intentions` config entry: every intention for one destination, as Consul
//! reads it from JSON or HCL and writes it back as JSON.

use std::collections::{BTreeMap, HashSet};

use serde::de::IgnoredAny;
use serde::ser::SerializeStruct;
use serde::{Deserialize, Serialize, Serializer};

use super::intention::{validate_description, validate_meta};
use super::name::{validate_partition, validate_wildcards};
use super::permission::{parse_permissions, Permission, RawPermission};
use super::{
    decode, precedence, Action, Error, Result, ServiceName, DEFAULT_NAMESPACE, DEFAULT_PARTITION,
    WILDCARD,
};

/// The `Kind` of the entry.
pub const SERVICE_INTENTIONS_KIND: &str = "service-intentions";

/// A `service-intentions` config entry: the intentions whose destination is
/// `Namespace/Name`, one per source.
///
/// Built by [`from_json`](Self::from_json) / [`from_hcl`](Self::from_hcl) (validated,
/// normalized: source namespaces resolved, precedence computed, sources sorted by precedence)
/// or read from a [`RuleSet`](super::RuleSet). Serializes to Consul's JSON shape.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceIntentionsEntry {
    /// The destination (`Namespace` + `Name`).
    pub destination: ServiceName,
    /// Entry metadata (`Meta`).
    pub meta: BTreeMap<String, String>,
    /// One element per source, highest precedence first.
    pub sources: Vec<SourceIntention>,
    /// Write index at which the entry appeared (read-only).
    pub create_index: u64,
    /// Write index of the entry's last change (read-only).
    pub modify_index: u64,
}

/// One element of `Sources`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceIntention {
    /// The source (`Namespace` + `Name`), namespace resolved.
    pub source: ServiceName,
    /// Allow or deny; [`Action::Deny`] (not written out) when `permissions` is not empty.
    pub action: Action,
    /// L7 `Permissions`, in order; empty for an L4 source.
    pub permissions: Vec<Permission>,
    /// Free text.
    pub description: String,
    /// Computed, read-only: recomputed whenever the entry is normalized or applied.
    pub precedence: u8,
}

impl ServiceIntentionsEntry {
    /// An entry for `destination` with the given sources (precedence filled in, sorted by
    /// precedence, stable). Not validated until applied or [`normalized`](Self::normalized).
    pub fn new(destination: ServiceName, sources: Vec<SourceIntention>) -> Self {
        let mut entry = ServiceIntentionsEntry {
            destination,
            meta: BTreeMap::new(),
            sources,
            create_index: 0,
            modify_index: 0,
        };
        entry.compute_precedence();
        entry
    }

    /// Reads an entry from JSON (`consul config write x.json`). Unknown fields are refused by
    /// path (`Sources[1].Foo`); `Precedence`, `CreateIndex`, `ModifyIndex` and `Hash` are
    /// accepted and ignored, as Consul recomputes them.
    ///
    /// # Errors
    ///
    /// [`Error::Malformed`] for JSON that does not parse or has the wrong shape (unknown or
    /// mistyped field, trailing data), [`Error::Invalid`] for values Consul refuses, as
    /// [`ServiceIntentionsEntry::normalized`].
    pub fn from_json(input: &str) -> Result<Self> {
        let raw: RawEntry = decode::json(input)?;
        raw.into_entry()
    }

    /// Reads an entry from HCL (`consul config write x.hcl`). `Sources` may be a list of
    /// objects (`Sources = [{ ... }]`) or repeated `Sources { ... }` blocks. Attributes given
    /// twice, references to variables and unknown fields are errors naming the field.
    ///
    /// # Errors
    ///
    /// [`Error::Malformed`] (format HCL) for HCL that does not parse, uses variables or has
    /// the wrong shape, [`Error::Invalid`] for values Consul refuses.
    pub fn from_hcl(input: &str) -> Result<Self> {
        let raw: RawEntry = decode::hcl(
            input,
            &[
                "Sources",
                "sources",
                "Permissions",
                "permissions",
                "Header",
                "header",
            ],
        )?;
        raw.into_entry()
    }

    /// Consul's JSON for this entry (pretty-printed), with computed `Precedence`.
    pub fn to_json(&self) -> String {
        // Serializing strings, integers and string maps cannot fail.
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// Checks what can be wrong with an entry built in code (empty sources, duplicate
    /// sources, lengths), recomputes precedence and sorts sources by it (stable). Errors name
    /// the field with its index in `sources` as given.
    ///
    /// # Errors
    ///
    /// [`Error::Invalid`] with Consul's message and the field's path: a missing `Name`, bad
    /// `Meta`, no sources, a source given twice, or a source value Consul refuses.
    pub fn normalized(&self) -> Result<Self> {
        if self.destination.name().is_empty() {
            return Err(Error::invalid("Name", "Name is required"));
        }
        validate_meta(&self.meta, "Meta")?;
        if self.sources.is_empty() {
            return Err(Error::invalid(
                "Sources",
                "Sources: at least one source is required",
            ));
        }
        let mut seen = HashSet::new();
        for (i, src) in self.sources.iter().enumerate() {
            validate_description(&src.description, &format!("Sources[{i}].Description"))?;
            if !src.permissions.is_empty()
                && (self.destination.namespace() == WILDCARD || self.destination.name() == WILDCARD)
            {
                return Err(Error::invalid(
                    format!("Sources[{i}].Permissions"),
                    format!(
                        "Sources[{i}].Permissions cannot be specified on intentions with wildcarded destinations"
                    ),
                ));
            }
            if !seen.insert(&src.source) {
                return Err(duplicate_source(i, &src.source));
            }
        }
        let mut entry = self.clone();
        entry.compute_precedence();
        Ok(entry)
    }

    fn compute_precedence(&mut self) {
        for src in &mut self.sources {
            src.precedence = precedence(&src.source, &self.destination);
        }
        self.sources
            .sort_by_key(|s| std::cmp::Reverse(s.precedence));
    }
}

fn duplicate_source(i: usize, source: &ServiceName) -> Error {
    Error::invalid(
        format!("Sources[{i}]"),
        format!(
            "Sources[{i}] defines {:?} more than once",
            source.to_string()
        ),
    )
}

/// The entry as read, before validation.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEntry {
    #[serde(rename = "Kind", alias = "kind")]
    kind: Option<String>,
    #[serde(rename = "Name", alias = "name")]
    name: Option<String>,
    #[serde(rename = "Namespace", alias = "namespace")]
    namespace: Option<String>,
    #[serde(rename = "Partition", alias = "partition")]
    partition: Option<String>,
    #[serde(rename = "Meta", alias = "meta")]
    meta: Option<BTreeMap<String, String>>,
    #[serde(rename = "Sources", alias = "sources")]
    sources: Option<Vec<RawSource>>,
    #[serde(rename = "CreateIndex", alias = "create_index")]
    _create_index: Option<IgnoredAny>,
    #[serde(rename = "ModifyIndex", alias = "modify_index")]
    _modify_index: Option<IgnoredAny>,
    #[serde(rename = "Hash", alias = "hash")]
    _hash: Option<IgnoredAny>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSource {
    #[serde(rename = "Name", alias = "name")]
    name: Option<String>,
    #[serde(rename = "Namespace", alias = "namespace")]
    namespace: Option<String>,
    #[serde(rename = "Partition", alias = "partition")]
    partition: Option<String>,
    #[serde(rename = "Action", alias = "action")]
    action: Option<String>,
    #[serde(rename = "Permissions", alias = "permissions")]
    permissions: Option<Vec<RawPermission>>,
    #[serde(rename = "Description", alias = "description")]
    description: Option<String>,
    /// Computed by Consul on every write; whatever is given is ignored.
    #[serde(rename = "Precedence", alias = "precedence")]
    _precedence: Option<IgnoredAny>,
    #[serde(rename = "Type", alias = "type")]
    kind: Option<String>,
}

fn non_empty(s: &Option<String>) -> Option<&str> {
    s.as_deref().filter(|s| !s.is_empty())
}

impl RawEntry {
    /// Consul's `Normalize` + `Validate`, in Consul's order of checks. Source indexes in
    /// messages are positions in the input.
    fn into_entry(self) -> Result<ServiceIntentionsEntry> {
        match self.kind.as_deref() {
            Some(SERVICE_INTENTIONS_KIND) => {}
            None | Some("") => return Err(Error::invalid("Kind", "Kind is required")),
            Some(other) => {
                return Err(Error::invalid(
                    "Kind",
                    format!("Kind: expected {SERVICE_INTENTIONS_KIND:?}, got {other:?}"),
                ))
            }
        }
        let name = self.name.unwrap_or_default();
        if name.is_empty() {
            return Err(Error::invalid("Name", "Name is required"));
        }
        let dst_ns = non_empty(&self.namespace)
            .unwrap_or(DEFAULT_NAMESPACE)
            .to_owned();
        validate_wildcards(&dst_ns, &name, "Namespace", "Name")?;
        validate_partition(self.partition.as_deref(), "Partition")?;
        let meta = self.meta.unwrap_or_default();
        validate_meta(&meta, "Meta")?;
        let raw_sources = self.sources.unwrap_or_default();
        if raw_sources.is_empty() {
            return Err(Error::invalid(
                "Sources",
                "Sources: at least one source is required",
            ));
        }
        let destination = ServiceName::new_unchecked(dst_ns, name);

        let mut sources = Vec::with_capacity(raw_sources.len());
        let mut seen = HashSet::new();
        for (i, raw) in raw_sources.into_iter().enumerate() {
            let field = |f: &str| format!("Sources[{i}].{f}");
            let name = raw.name.clone().unwrap_or_default();
            if name.is_empty() {
                return Err(Error::invalid(
                    field("Name"),
                    format!("Sources[{i}].Name is required"),
                ));
            }
            // A source without a namespace inherits the destination's, unless that is `*`.
            let ns = non_empty(&raw.namespace)
                .unwrap_or(match destination.namespace() {
                    WILDCARD => DEFAULT_NAMESPACE,
                    ns => ns,
                })
                .to_owned();
            validate_wildcards(&ns, &name, &field("Namespace"), &field("Name"))?;
            validate_partition(raw.partition.as_deref(), &field("Partition"))?;
            let description = raw.description.unwrap_or_default();
            validate_description(&description, &field("Description"))?;
            let raw_permissions = raw.permissions.unwrap_or_default();
            let action = match raw.action.as_deref() {
                Some("allow") if raw_permissions.is_empty() => Action::Allow,
                Some("deny") if raw_permissions.is_empty() => Action::Deny,
                None | Some("") if !raw_permissions.is_empty() => Action::Deny,
                Some(_) if !raw_permissions.is_empty() => {
                    return Err(Error::invalid(
                        field("Action"),
                        format!("Sources[{i}].Action must be omitted if Permissions are specified"),
                    ))
                }
                _ => {
                    return Err(Error::invalid(
                        field("Action"),
                        format!("Sources[{i}].Action must be set to 'allow' or 'deny'"),
                    ))
                }
            };
            if !raw_permissions.is_empty()
                && (destination.namespace() == WILDCARD || destination.name() == WILDCARD)
            {
                return Err(Error::invalid(
                    field("Permissions"),
                    format!(
                        "Sources[{i}].Permissions cannot be specified on intentions with wildcarded destinations"
                    ),
                ));
            }
            match raw.kind.as_deref() {
                None | Some("") | Some("consul") => {}
                Some(_) => {
                    return Err(Error::invalid(
                        field("Type"),
                        format!("Sources[{i}].Type must be set to 'consul'"),
                    ))
                }
            }
            let permissions = parse_permissions(raw_permissions, &format!("Sources[{i}]."))?;
            let source = ServiceName::new_unchecked(ns, name);
            if !seen.insert(source.clone()) {
                return Err(duplicate_source(i, &source));
            }
            sources.push(SourceIntention {
                precedence: precedence(&source, &destination),
                source,
                action,
                permissions,
                description,
            });
        }
        let mut entry = ServiceIntentionsEntry::new(destination, sources);
        entry.meta = meta;
        Ok(entry)
    }
}

impl Serialize for ServiceIntentionsEntry {
    /// Consul's field order and omissions (`Meta` only when set).
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        let mut s = serializer.serialize_struct("ServiceIntentionsConfigEntry", 8)?;
        s.serialize_field("Kind", SERVICE_INTENTIONS_KIND)?;
        s.serialize_field("Name", self.destination.name())?;
        s.serialize_field("Partition", DEFAULT_PARTITION)?;
        s.serialize_field("Namespace", self.destination.namespace())?;
        s.serialize_field("Sources", &self.sources)?;
        if !self.meta.is_empty() {
            s.serialize_field("Meta", &self.meta)?;
        }
        s.serialize_field("CreateIndex", &self.create_index)?;
        s.serialize_field("ModifyIndex", &self.modify_index)?;
        s.end()
    }
}

impl Serialize for SourceIntention {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        let mut s = serializer.serialize_struct("SourceIntention", 7)?;
        s.serialize_field("Name", self.source.name())?;
        s.serialize_field("Partition", DEFAULT_PARTITION)?;
        s.serialize_field("Namespace", self.source.namespace())?;
        if self.permissions.is_empty() {
            s.serialize_field("Action", &self.action)?;
        } else {
            s.serialize_field("Permissions", &self.permissions)?;
        }
        s.serialize_field("Precedence", &self.precedence)?;
        s.serialize_field("Type", "consul")?;
        if !self.description.is_empty() {
            s.serialize_field("Description", &self.description)?;
        }
        s.end()
    }
}
