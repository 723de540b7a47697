//! One intention: its action, precedence, validation and Consul's JSON shape.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::time::SystemTime;

use serde::de::IgnoredAny;
use serde::ser::SerializeStruct;
use serde::{Deserialize, Serialize, Serializer};

use super::name::{validate_partition, validate_wildcards};
use super::permission::{parse_permissions, Permission, RawPermission};
use super::{decode, Error, Result, ServiceName, DEFAULT_NAMESPACE, DEFAULT_PARTITION};

/// Consul's limits on opaque values (`metaKeyMaxLength`, `metaValueMaxLength`,
/// `metaMaxKeyPairs`).
pub(crate) const META_KEY_MAX_LENGTH: usize = 128;
pub(crate) const META_VALUE_MAX_LENGTH: usize = 512;
pub(crate) const META_MAX_KEY_PAIRS: usize = 64;

/// What an intention does with a matching connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Let the connection through.
    Allow,
    /// Refuse the connection.
    Deny,
}

impl Action {
    /// `"allow"` or `"deny"`, as Consul writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Allow => "allow",
            Action::Deny => "deny",
        }
    }

    /// Whether this is [`Action::Allow`].
    pub fn is_allow(self) -> bool {
        self == Action::Allow
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Action {
    type Err = Error;

    /// Exactly `allow` or `deny` (case-sensitive, as in Consul).
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "allow" => Ok(Action::Allow),
            "deny" => Ok(Action::Deny),
            _ => Err(Error::invalid(
                "Action",
                "Action must be set to 'allow' or 'deny'",
            )),
        }
    }
}

/// The precedence (9..=1) of an intention from `source` to `destination`: the more exact the
/// destination, then the source, the higher.
pub fn precedence(source: &ServiceName, destination: &ServiceName) -> u8 {
    let max = match destination.exact_count() {
        2 => 9,
        1 => 6,
        _ => 3,
    };
    max - (2 - source.exact_count())
}

/// What a user writes to create or update one intention (CLI, HTTP API). Validated and
/// normalized by [`RuleSet`](super::RuleSet) operations:
/// an empty or absent destination namespace means `default`; an empty or absent source
/// namespace inherits the destination's (or `default` when that is `*`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IntentionSpec {
    /// Source namespace; `None` inherits the destination namespace.
    pub source_namespace: Option<String>,
    /// Source service name or `*`.
    pub source_name: String,
    /// Source partition; only `default` (or none) exists here.
    pub source_partition: Option<String>,
    /// Destination namespace; `None` means `default`.
    pub destination_namespace: Option<String>,
    /// Destination service name or `*`.
    pub destination_name: String,
    /// Allow or deny. Not used when `permissions` is not empty (Consul's `Action` is then
    /// omitted); such an intention is stored with [`Action::Deny`], its meaning at L4.
    pub action: Action,
    /// L7 `Permissions`, in order; empty for an L4 intention. Only on an exact destination
    /// whose protocol is `http`.
    pub permissions: Vec<Permission>,
    /// Free text, at most 512 bytes.
    pub description: String,
    /// Opaque metadata: at most 64 pairs, keys ≤ 128 bytes, values ≤ 512 bytes.
    pub meta: BTreeMap<String, String>,
}

/// A spec after validation and namespace inheritance.
#[derive(Clone, Debug)]
pub(crate) struct Normalized {
    pub source: ServiceName,
    pub destination: ServiceName,
    pub action: Action,
    pub permissions: Vec<Permission>,
    pub description: String,
    pub meta: BTreeMap<String, String>,
}

impl IntentionSpec {
    /// An intention from `source` to `destination`, with no description or meta.
    pub fn new(source: &ServiceName, destination: &ServiceName, action: Action) -> Self {
        IntentionSpec {
            source_namespace: Some(source.namespace().to_owned()),
            source_name: source.name().to_owned(),
            source_partition: None,
            destination_namespace: Some(destination.namespace().to_owned()),
            destination_name: destination.name().to_owned(),
            action,
            permissions: Vec::new(),
            description: String::new(),
            meta: BTreeMap::new(),
        }
    }

    /// An L7 intention from `source` to `destination` with these permissions.
    pub fn with_permissions(
        source: &ServiceName,
        destination: &ServiceName,
        permissions: Vec<Permission>,
    ) -> Self {
        let mut spec = IntentionSpec::new(source, destination, Action::Deny);
        spec.permissions = permissions;
        spec
    }

    /// Reads Consul's intention JSON (the body of `POST /v1/connect/intentions` or
    /// `PUT /v1/connect/intentions/:id`). Unknown fields are rejected by name; read-only fields
    /// that Consul returns (`ID`, `Precedence`, `CreatedAt`, `UpdatedAt`, `CreateIndex`,
    /// `ModifyIndex`, `Hash`) are accepted and ignored, so a read intention can be written back.
    /// Names are validated when the spec is applied to a [`RuleSet`](super::RuleSet).
    ///
    /// # Errors
    ///
    /// [`Error::Malformed`] for JSON that does not parse or has the wrong shape,
    /// [`Error::Invalid`] for a missing or unknown `Action`, an unsupported `SourceType`, or
    /// another value Consul refuses.
    pub fn from_json(input: &str) -> Result<Self> {
        let raw: RawIntention = decode::json(input)?;
        let permissions = parse_permissions(raw.permissions.unwrap_or_default(), "")?;
        let action = match raw.action.as_deref() {
            Some("") | None if !permissions.is_empty() => Action::Deny,
            Some(_) if !permissions.is_empty() => {
                return Err(Error::invalid(
                    "Action",
                    "Action must be omitted if Permissions are specified",
                ))
            }
            Some(a) => a.parse()?,
            None => {
                return Err(Error::invalid(
                    "Action",
                    "Action must be set to 'allow' or 'deny'",
                ))
            }
        };
        match raw.source_type.as_deref() {
            None | Some("") | Some("consul") => {}
            Some(_) => {
                return Err(Error::invalid(
                    "SourceType",
                    "SourceType must be set to 'consul'",
                ))
            }
        }
        validate_partition(raw.destination_partition.as_deref(), "DestinationPartition")?;
        Ok(IntentionSpec {
            source_namespace: raw.source_ns,
            source_name: raw.source_name.unwrap_or_default(),
            source_partition: raw.source_partition,
            destination_namespace: raw.destination_ns,
            destination_name: raw.destination_name.unwrap_or_default(),
            action,
            permissions,
            description: raw.description.unwrap_or_default(),
            meta: raw.meta.unwrap_or_default(),
        })
    }

    /// Validates in Consul's order and applies namespace defaults and inheritance.
    pub(crate) fn normalize(&self) -> Result<Normalized> {
        if self.source_name.is_empty() {
            return Err(Error::invalid("SourceName", "SourceName must be set"));
        }
        if self.destination_name.is_empty() {
            return Err(Error::invalid(
                "DestinationName",
                "DestinationName must be set",
            ));
        }
        let dst_ns = non_empty(self.destination_namespace.as_deref()).unwrap_or(DEFAULT_NAMESPACE);
        // A single intention's bare source is in the request's namespace, which the API fills
        // in before it gets here (Consul's `FillPartitionAndNamespace`); without one it is the
        // default namespace, never the destination's. Only a `service-intentions` config
        // entry's sources inherit the entry's namespace (see `ServiceIntentionsEntry`).
        let src_ns = non_empty(self.source_namespace.as_deref()).unwrap_or(DEFAULT_NAMESPACE);
        validate_wildcards(src_ns, &self.source_name, "SourceNS", "SourceName")?;
        validate_wildcards(
            dst_ns,
            &self.destination_name,
            "DestinationNS",
            "DestinationName",
        )?;
        validate_partition(self.source_partition.as_deref(), "SourcePartition")?;
        if !self.permissions.is_empty()
            && (dst_ns == super::WILDCARD || self.destination_name == super::WILDCARD)
        {
            return Err(Error::invalid(
                "Permissions",
                "Permissions cannot be specified on intentions with wildcarded destinations",
            ));
        }
        validate_description(&self.description, "Description")?;
        validate_meta(&self.meta, "Meta")?;
        Ok(Normalized {
            source: ServiceName::new_unchecked(src_ns.to_owned(), self.source_name.clone()),
            destination: ServiceName::new_unchecked(
                dst_ns.to_owned(),
                self.destination_name.clone(),
            ),
            action: if self.permissions.is_empty() {
                self.action
            } else {
                Action::Deny
            },
            permissions: self.permissions.clone(),
            description: self.description.clone(),
            meta: self.meta.clone(),
        })
    }
}

fn non_empty(s: Option<&str>) -> Option<&str> {
    s.filter(|s| !s.is_empty())
}

pub(crate) fn validate_description(description: &str, field: &str) -> Result<()> {
    if description.len() > META_VALUE_MAX_LENGTH {
        return Err(Error::invalid(
            field,
            format!("{field} exceeds maximum length {META_VALUE_MAX_LENGTH}"),
        ));
    }
    Ok(())
}

pub(crate) fn validate_meta(meta: &BTreeMap<String, String>, field: &str) -> Result<()> {
    if meta.len() > META_MAX_KEY_PAIRS {
        return Err(Error::invalid(
            field,
            format!("{field} exceeds maximum element count {META_MAX_KEY_PAIRS}"),
        ));
    }
    for (k, v) in meta {
        if k.len() > META_KEY_MAX_LENGTH {
            return Err(Error::invalid(
                field,
                format!("{field} key {k:?} exceeds maximum length {META_KEY_MAX_LENGTH}"),
            ));
        }
        if v.len() > META_VALUE_MAX_LENGTH {
            return Err(Error::invalid(
                field,
                format!(
                    "{field} value for key {k:?} exceeds maximum length {META_VALUE_MAX_LENGTH}"
                ),
            ));
        }
    }
    Ok(())
}

/// Consul's intention JSON, as read.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIntention {
    #[serde(rename = "SourceNS")]
    source_ns: Option<String>,
    #[serde(rename = "SourceName")]
    source_name: Option<String>,
    #[serde(rename = "SourcePartition")]
    source_partition: Option<String>,
    #[serde(rename = "DestinationNS")]
    destination_ns: Option<String>,
    #[serde(rename = "DestinationName")]
    destination_name: Option<String>,
    #[serde(rename = "DestinationPartition")]
    destination_partition: Option<String>,
    #[serde(rename = "SourceType")]
    source_type: Option<String>,
    #[serde(rename = "Action")]
    action: Option<String>,
    #[serde(rename = "Permissions")]
    permissions: Option<Vec<RawPermission>>,
    #[serde(rename = "Description")]
    description: Option<String>,
    #[serde(rename = "Meta")]
    meta: Option<BTreeMap<String, String>>,
    // Read-only: Consul computes these and ignores them on write.
    #[serde(rename = "ID")]
    _id: Option<IgnoredAny>,
    #[serde(rename = "Precedence")]
    _precedence: Option<IgnoredAny>,
    #[serde(rename = "CreatedAt")]
    _created_at: Option<IgnoredAny>,
    #[serde(rename = "UpdatedAt")]
    _updated_at: Option<IgnoredAny>,
    #[serde(rename = "CreateIndex")]
    _create_index: Option<IgnoredAny>,
    #[serde(rename = "ModifyIndex")]
    _modify_index: Option<IgnoredAny>,
    #[serde(rename = "Hash")]
    _hash: Option<IgnoredAny>,
}

/// A stored intention, as the API returns it. Serializes to Consul's intention JSON.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Intention {
    /// UUID, assigned at creation, kept across updates.
    pub id: String,
    /// Source (namespace resolved).
    pub source: ServiceName,
    /// Destination.
    pub destination: ServiceName,
    /// Allow or deny; [`Action::Deny`] for an L7 intention (see [`Intention::permissions`]).
    pub action: Action,
    /// L7 `Permissions`, in order; empty for an L4 intention. When not empty, the intention
    /// decides each HTTP request (the first matching permission's action; no match means the
    /// default policy, as Consul's RBAC filter), and at L4 (`intention check`, a destination
    /// that is not `http`) it is a deny, as in Consul.
    pub permissions: Vec<Permission>,
    /// Free text.
    pub description: String,
    /// Opaque metadata.
    pub meta: BTreeMap<String, String>,
    /// 9..=1, see [`precedence`].
    pub precedence: u8,
    /// When it was created.
    pub created_at: SystemTime,
    /// When it last changed.
    pub updated_at: SystemTime,
    /// Write index at creation.
    pub create_index: u64,
    /// Write index of the last change.
    pub modify_index: u64,
    /// Stable index for per-intention kernel counters: assigned once at creation, never reused
    /// within a [`RuleSet`](super::RuleSet), kept across updates and entry rewrites.
    pub counter_index: u32,
}

impl Intention {
    /// The source's admin partition (always `default` on this agent).
    pub fn source_partition(&self) -> &'static str {
        DEFAULT_PARTITION
    }

    /// Whether this is an L7 intention (Consul's `HasPermissions`).
    pub fn has_permissions(&self) -> bool {
        !self.permissions.is_empty()
    }

    /// `allow`, `deny`, or `""` for an L7 intention, as Consul's `Action` field reads.
    pub fn action_str(&self) -> &'static str {
        if self.has_permissions() {
            ""
        } else {
            self.action.as_str()
        }
    }
}

impl fmt::Display for Intention {
    /// As Consul prints an intention: `ALLOW default/web => default/api (ID: …, Precedence: 9)`
    /// (an L7 intention has no action in front, as Consul's `Action` is empty).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} => {} (ID: {}, Precedence: {})",
            self.action_str().to_uppercase(),
            self.source,
            self.destination,
            self.id,
            self.precedence
        )
    }
}

pub(crate) fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_nanos(t).to_string()
}

impl Serialize for Intention {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        let mut s = serializer.serialize_struct("Intention", 16)?;
        s.serialize_field("ID", &self.id)?;
        s.serialize_field("Description", &self.description)?;
        s.serialize_field("SourceNS", self.source.namespace())?;
        s.serialize_field("SourceName", self.source.name())?;
        s.serialize_field("DestinationNS", self.destination.namespace())?;
        s.serialize_field("DestinationName", self.destination.name())?;
        s.serialize_field("SourcePartition", DEFAULT_PARTITION)?;
        s.serialize_field("DestinationPartition", DEFAULT_PARTITION)?;
        s.serialize_field("SourceType", "consul")?;
        s.serialize_field("Action", self.action_str())?;
        if self.has_permissions() {
            s.serialize_field("Permissions", &self.permissions)?;
        }
        s.serialize_field("Meta", &self.meta)?;
        s.serialize_field("Precedence", &self.precedence)?;
        s.serialize_field("CreatedAt", &rfc3339(self.created_at))?;
        s.serialize_field("UpdatedAt", &rfc3339(self.updated_at))?;
        s.serialize_field("CreateIndex", &self.create_index)?;
        s.serialize_field("ModifyIndex", &self.modify_index)?;
        s.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sn(s: &str) -> ServiceName {
        ServiceName::parse(s).unwrap()
    }

    #[test]
    fn precedence_table_row_by_row() {
        // (source, destination, expected) for every row of Consul's table.
        let rows = [
            ("ns1/web", "ns2/api", 9),
            ("ns1/*", "ns2/api", 8),
            ("*/*", "ns2/api", 7),
            ("ns1/web", "ns2/*", 6),
            ("ns1/*", "ns2/*", 5),
            ("*/*", "ns2/*", 4),
            ("ns1/web", "*/*", 3),
            ("ns1/*", "*/*", 2),
            ("*/*", "*/*", 1),
        ];
        for (src, dst, want) in rows {
            assert_eq!(precedence(&sn(src), &sn(dst)), want, "{src} -> {dst}");
        }
    }

    #[test]
    fn action_parsing_is_exact() {
        assert_eq!("allow".parse::<Action>().unwrap(), Action::Allow);
        assert_eq!("deny".parse::<Action>().unwrap(), Action::Deny);
        for bad in ["Allow", "permit", "", " deny"] {
            let err = bad.parse::<Action>().unwrap_err();
            assert_eq!(err.field(), Some("Action"));
            assert_eq!(err.to_string(), "Action must be set to 'allow' or 'deny'");
        }
    }

    #[test]
    fn normalize_puts_a_bare_source_in_the_default_namespace_never_the_destinations() {
        let mut spec = IntentionSpec::new(&sn("web"), &sn("ns2/api"), Action::Allow);
        spec.source_namespace = None;
        let n = spec.normalize().unwrap();
        assert_eq!(n.source, sn("default/web"));
        assert_eq!(n.destination, sn("ns2/api"));
        spec.source_namespace = Some(String::new());
        assert_eq!(spec.normalize().unwrap().source, sn("default/web"));
        // Nor a wildcard destination namespace.
        let mut spec = IntentionSpec::new(&sn("web"), &sn("*/*"), Action::Deny);
        spec.source_namespace = None;
        assert_eq!(spec.normalize().unwrap().source, sn("default/web"));
        // No destination namespace means default.
        spec.destination_namespace = None;
        spec.destination_name = "api".into();
        let n = spec.normalize().unwrap();
        assert_eq!(n.destination, sn("default/api"));
        assert_eq!(n.source, sn("default/web"));
    }

    #[test]
    fn normalize_rejects_with_consul_messages() {
        let base = IntentionSpec::new(&sn("web"), &sn("api"), Action::Allow);
        type Mutation = Box<dyn Fn(&mut IntentionSpec)>;
        let cases: Vec<(Mutation, &str, &str)> = vec![
            (
                Box::new(|s| s.source_name.clear()),
                "SourceName",
                "SourceName must be set",
            ),
            (
                Box::new(|s| s.destination_name.clear()),
                "DestinationName",
                "DestinationName must be set",
            ),
            (
                Box::new(|s| s.source_name = "we*".into()),
                "SourceName",
                "SourceName: wildcard character '*' cannot be used with partial values",
            ),
            (
                Box::new(|s| s.source_namespace = Some("*".into())),
                "SourceName",
                "SourceName: exact value cannot follow wildcard namespace",
            ),
            (
                Box::new(|s| s.destination_namespace = Some("n*".into())),
                "DestinationNS",
                "DestinationNS: wildcard character '*' cannot be used with partial values",
            ),
            (
                Box::new(|s| {
                    s.destination_namespace = Some("*".into());
                    s.source_namespace = Some("default".into());
                }),
                "DestinationName",
                "DestinationName: exact value cannot follow wildcard namespace",
            ),
            (
                Box::new(|s| s.description = "x".repeat(513)),
                "Description",
                "Description exceeds maximum length 512",
            ),
            (
                Box::new(|s| {
                    s.meta.insert("k".repeat(129), "v".into());
                }),
                "Meta",
                "exceeds maximum length 128",
            ),
            (
                Box::new(|s| {
                    s.meta.insert("k".into(), "v".repeat(513));
                }),
                "Meta",
                "Meta value for key \"k\" exceeds maximum length 512",
            ),
            (
                Box::new(|s| {
                    for i in 0..65 {
                        s.meta.insert(format!("k{i}"), "v".into());
                    }
                }),
                "Meta",
                "Meta exceeds maximum element count 64",
            ),
            (
                Box::new(|s| s.source_partition = Some("eu".into())),
                "SourcePartition",
                "SourcePartition: partition \"eu\" does not exist",
            ),
        ];
        for (mutate, field, msg) in cases {
            let mut spec = base.clone();
            mutate(&mut spec);
            let err = spec.normalize().unwrap_err();
            assert_eq!(err.field(), Some(field), "{err}");
            assert!(err.to_string().contains(msg), "{err} !~ {msg}");
        }
    }

    #[test]
    fn spec_from_json() {
        let spec = IntentionSpec::from_json(
            r#"{"SourceName":"web","DestinationName":"api","Action":"deny",
                "Description":"d","Meta":{"a":"b"},"SourceType":"consul",
                "ID":"ignored","Precedence":3,"CreateIndex":1}"#,
        )
        .unwrap();
        assert_eq!(spec.action, Action::Deny);
        assert_eq!(spec.source_namespace, None);
        assert_eq!(spec.meta.get("a").map(String::as_str), Some("b"));
        let n = spec.normalize().unwrap();
        assert_eq!(n.source, sn("default/web"));

        let bad = [
            (
                r#"{"SourceName":"web","DestinationName":"api","Action":"permit"}"#,
                "Action",
            ),
            (r#"{"SourceName":"web","DestinationName":"api"}"#, "Action"),
            (
                r#"{"SourceName":"web","DestinationName":"api","Action":"allow","SourceType":"external"}"#,
                "SourceType",
            ),
            (
                r#"{"SourceName":"web","DestinationName":"api","Action":"allow","Bogus":1}"#,
                "Bogus",
            ),
            (
                r#"{"SourceName":"web","DestinationName":"api","Action":"allow","DestinationPartition":"p"}"#,
                "DestinationPartition",
            ),
        ];
        for (json, field) in bad {
            let err = IntentionSpec::from_json(json).unwrap_err();
            assert_eq!(err.field(), Some(field), "{json}: {err}");
            assert!(err.to_string().contains(field), "{err}");
        }
        let err = IntentionSpec::from_json(r#"{"SourceName":"web""#).unwrap_err();
        assert!(matches!(err, Error::Malformed { .. }), "{err}");
        let err =
            IntentionSpec::from_json(r#"{"SourceName":"web","Action":"allow"} x"#).unwrap_err();
        assert!(matches!(err, Error::Malformed { .. }), "{err}");
    }
}
