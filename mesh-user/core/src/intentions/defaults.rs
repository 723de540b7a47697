//! The `service-defaults` config entry: a service's `Protocol`, which decides whether L7
//! intentions (`Permissions`) apply to it.
//!
//! # Effective protocol
//!
//! A destination's protocol is its `service-defaults` entry's `Protocol` when there is an entry,
//! else the catalog's (`mesh_core::catalog::Service::protocol`, which a `ServiceDefaults`
//! resource sets), else `tcp`. Only `http` destinations have their intentions' permissions
//! enforced per request; anywhere else an L7 intention is a deny, as in Consul. Writes check
//! this as Consul does: an intention with permissions is refused unless its destination's
//! entry says `http`, and an entry (or its deletion) that would take `http` away from a
//! destination with L7 intentions is refused.

use std::collections::BTreeMap;

use serde::de::IgnoredAny;
use serde::ser::SerializeStruct;
use serde::{Deserialize, Serialize, Serializer};

use super::name::validate_partition;
use super::{decode, Error, Result, ServiceName, DEFAULT_NAMESPACE, DEFAULT_PARTITION, WILDCARD};
use crate::catalog::Protocol;

/// The `Kind` of the entry.
pub const SERVICE_DEFAULTS_KIND: &str = "service-defaults";

/// A `service-defaults` config entry (the part this mesh uses: `Protocol`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceDefaultsEntry {
    /// The service (`Namespace` + `Name`); never a wildcard.
    pub service: ServiceName,
    /// `Protocol`: `tcp` or `http`.
    pub protocol: Protocol,
    /// `Meta`.
    pub meta: BTreeMap<String, String>,
    /// Write index at which the entry appeared (read-only).
    pub create_index: u64,
    /// Write index of the entry's last change (read-only).
    pub modify_index: u64,
}

/// The protocol's name as Consul writes it.
pub fn protocol_name(protocol: Protocol) -> &'static str {
    match protocol {
        Protocol::Tcp => "tcp",
        Protocol::Http => "http",
    }
}

/// Reads Consul's `Protocol` value (case-insensitive, as Consul lowercases it). An empty value
/// is `tcp`; `http2` and `grpc`, which Consul also treats as L7, are refused as unsupported.
///
/// # Errors
///
/// [`Error::Invalid`] at `field` for a protocol this mesh does not support.
pub fn parse_protocol(value: &str, field: &str) -> Result<Protocol> {
    match value.to_ascii_lowercase().as_str() {
        "" | "tcp" => Ok(Protocol::Tcp),
        "http" => Ok(Protocol::Http),
        p @ ("http2" | "grpc") => Err(Error::invalid(
            field,
            format!(
                "{field}: protocol {p:?} is not supported by this mesh: use \"http\" (HTTP/1.1) or \"tcp\""
            ),
        )),
        p => Err(Error::invalid(
            field,
            format!("{field}: unknown protocol {p:?}: use \"http\" or \"tcp\""),
        )),
    }
}

/// The `Kind` of a config entry document (JSON, or HCL when `hcl`), if it parses and has one:
/// to choose the schema before validating against it.
pub fn config_entry_kind(input: &str, hcl: bool) -> Option<String> {
    #[derive(Deserialize)]
    struct KindOnly {
        #[serde(rename = "Kind", alias = "kind")]
        kind: Option<String>,
    }
    let parsed: Result<KindOnly> = if hcl {
        decode::hcl(input, &[])
    } else {
        decode::json(input)
    };
    parsed.ok()?.kind
}

impl ServiceDefaultsEntry {
    /// An entry for `service` with `protocol`, no meta, indexes 0.
    pub fn new(service: ServiceName, protocol: Protocol) -> Self {
        ServiceDefaultsEntry {
            service,
            protocol,
            meta: BTreeMap::new(),
            create_index: 0,
            modify_index: 0,
        }
    }

    /// Reads an entry from JSON (`consul config write x.json`, `PUT /v1/config`). Unknown
    /// fields are refused by name (this mesh takes `Protocol` and `Meta`); `CreateIndex`,
    /// `ModifyIndex` and `Hash` are ignored.
    ///
    /// # Errors
    ///
    /// [`Error::Malformed`] for the wrong shape, [`Error::Invalid`] naming the field.
    pub fn from_json(input: &str) -> Result<Self> {
        let raw: RawDefaults = decode::json(input)?;
        raw.into_entry()
    }

    /// Reads an entry from HCL (`consul config write x.hcl`).
    ///
    /// # Errors
    ///
    /// As [`ServiceDefaultsEntry::from_json`], format HCL.
    pub fn from_hcl(input: &str) -> Result<Self> {
        let raw: RawDefaults = decode::hcl(input, &[])?;
        raw.into_entry()
    }

    /// Consul's JSON for this entry (pretty-printed).
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default()
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDefaults {
    #[serde(rename = "Kind", alias = "kind")]
    kind: Option<String>,
    #[serde(rename = "Name", alias = "name")]
    name: Option<String>,
    #[serde(rename = "Namespace", alias = "namespace")]
    namespace: Option<String>,
    #[serde(rename = "Partition", alias = "partition")]
    partition: Option<String>,
    #[serde(rename = "Protocol", alias = "protocol")]
    protocol: Option<String>,
    #[serde(rename = "Meta", alias = "meta")]
    meta: Option<BTreeMap<String, String>>,
    #[serde(rename = "CreateIndex", alias = "create_index")]
    _create_index: Option<IgnoredAny>,
    #[serde(rename = "ModifyIndex", alias = "modify_index")]
    _modify_index: Option<IgnoredAny>,
    #[serde(rename = "Hash", alias = "hash")]
    _hash: Option<IgnoredAny>,
}

impl RawDefaults {
    fn into_entry(self) -> Result<ServiceDefaultsEntry> {
        match self.kind.as_deref() {
            Some(SERVICE_DEFAULTS_KIND) => {}
            None | Some("") => return Err(Error::invalid("Kind", "Kind is required")),
            Some(other) => {
                return Err(Error::invalid(
                    "Kind",
                    format!("Kind: expected {SERVICE_DEFAULTS_KIND:?}, got {other:?}"),
                ))
            }
        }
        let name = self.name.unwrap_or_default();
        if name.is_empty() {
            return Err(Error::invalid("Name", "Name is required"));
        }
        let namespace = self
            .namespace
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| DEFAULT_NAMESPACE.to_owned());
        if name.contains(WILDCARD) || namespace.contains(WILDCARD) {
            return Err(Error::invalid(
                "Name",
                "Name: a service-defaults entry names one service, not a wildcard",
            ));
        }
        let service = ServiceName::new(namespace, name).map_err(|e| match e {
            Error::Invalid { message, .. } => Error::invalid("Name", message),
            other => other,
        })?;
        validate_partition(self.partition.as_deref(), "Partition")?;
        let protocol = parse_protocol(self.protocol.as_deref().unwrap_or(""), "Protocol")?;
        let meta = self.meta.unwrap_or_default();
        super::intention::validate_meta(&meta, "Meta")?;
        Ok(ServiceDefaultsEntry {
            service,
            protocol,
            meta,
            create_index: 0,
            modify_index: 0,
        })
    }
}

impl Serialize for ServiceDefaultsEntry {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        let mut s = serializer.serialize_struct("ServiceConfigEntry", 8)?;
        s.serialize_field("Kind", SERVICE_DEFAULTS_KIND)?;
        s.serialize_field("Name", self.service.name())?;
        s.serialize_field("Partition", DEFAULT_PARTITION)?;
        s.serialize_field("Namespace", self.service.namespace())?;
        s.serialize_field("Protocol", protocol_name(self.protocol))?;
        if !self.meta.is_empty() {
            s.serialize_field("Meta", &self.meta)?;
        }
        s.serialize_field("CreateIndex", &self.create_index)?;
        s.serialize_field("ModifyIndex", &self.modify_index)?;
        s.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_consuls_shapes_and_refuses_what_it_cannot_honour() {
        let e = ServiceDefaultsEntry::from_json(
            r#"{"Kind":"service-defaults","Name":"api","Protocol":"HTTP","ModifyIndex":3}"#,
        )
        .unwrap();
        assert_eq!(e.service, ServiceName::parse("default/api").unwrap());
        assert_eq!(e.protocol, Protocol::Http);
        let back = ServiceDefaultsEntry::from_json(&e.to_json()).unwrap();
        assert_eq!(back, e);
        let h = ServiceDefaultsEntry::from_hcl(
            "Kind = \"service-defaults\"\nName = \"api\"\nNamespace = \"ns1\"\nProtocol = \"tcp\"\n",
        )
        .unwrap();
        assert_eq!(h.service, ServiceName::parse("ns1/api").unwrap());
        assert_eq!(h.protocol, Protocol::Tcp);
        let cases = [
            (
                r#"{"Kind":"service-defaults","Name":"api","Protocol":"grpc"}"#,
                "Protocol",
                "not supported",
            ),
            (
                r#"{"Kind":"service-defaults","Name":"api","Protocol":"http2"}"#,
                "Protocol",
                "not supported",
            ),
            (
                r#"{"Kind":"service-defaults","Name":"api","Protocol":"smtp"}"#,
                "Protocol",
                "unknown protocol",
            ),
            (
                r#"{"Kind":"service-defaults","Protocol":"http"}"#,
                "Name",
                "Name is required",
            ),
            (
                r#"{"Kind":"service-defaults","Name":"*","Protocol":"http"}"#,
                "Name",
                "wildcard",
            ),
            (
                r#"{"Kind":"proxy-defaults","Name":"api"}"#,
                "Kind",
                "expected",
            ),
            (
                r#"{"Kind":"service-defaults","Name":"api","MaxInboundConnections":3}"#,
                "MaxInboundConnections",
                "unknown field",
            ),
        ];
        for (json, field, msg) in cases {
            let err = ServiceDefaultsEntry::from_json(json).unwrap_err();
            assert_eq!(err.field(), Some(field), "{json}: {err}");
            assert!(err.to_string().contains(msg), "{json}: {err}");
        }
    }
}
