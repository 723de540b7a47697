//! consul-k8s's custom resources (`consul.hashicorp.com/v1alpha1`) that the mesh applies:
//! `ServiceIntentions` and `ServiceDefaults`, and their translation into what the API stores.
//!
//! A `ServiceIntentions` object is translated into the `service-intentions` config entry
//! consul-k8s's controller writes (`ServiceIntentions.ToConsul`): `Name`/`Namespace` from
//! `spec.destination` (the namespace defaults to the object's own), one source per
//! `spec.sources[]` (`name`, `namespace`, `partition`, `action`, `permissions`, `description`;
//! an empty source namespace inherits the entry's, as in Consul), and
//! `Meta = {"external-source": "kubernetes", "consul.hashicorp.com/source-datacenter": <dc>}`.
//! The entry is then read by [`ServiceIntentionsEntry::from_json`], the parser the HTTP API
//! uses, so one parser decides what is valid; its errors are reported with the object's field
//! names (`spec.sources[0].action`). `permissions` are mapped onto Consul's `Permissions`
//! (`Action`, `HTTP{PathExact, PathPrefix, PathRegex, Methods, Header[]}`): the entry parser
//! decides whether it accepts them. What this mesh cannot honour is refused naming the field:
//! `peer` and `samenessGroup` sources, a `partition` other than `default`, `jwt`.
//!
//! A `ServiceDefaults` object (named after its service, in its namespace) sets the service's
//! `spec.protocol` in the catalog: `tcp` (the default) or `http`; `http2` and `grpc` are
//! refused. Its other fields concern Envoy sidecars and gateways and are accepted with a
//! warning.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::{json, Map, Value as Json};
use serde_norway::Value;

use super::objects::Ctx;
use super::Error;
use crate::catalog;
use crate::intentions::{ServiceIntentionsEntry, ServiceName};

/// The `apiVersion` of consul-k8s's custom resources.
pub const CONSUL_API_VERSION: &str = "consul.hashicorp.com/v1alpha1";
pub use crate::intentions::{EXTERNAL_SOURCE_KUBERNETES, META_EXTERNAL_SOURCE};
/// `Meta` key naming the datacenter whose controller wrote the entry.
pub const META_SOURCE_DATACENTER: &str = "consul.hashicorp.com/source-datacenter";

/// A `ServiceIntentions` object, translated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceIntentions {
    /// `metadata.name`.
    pub name: String,
    /// `metadata.namespace`.
    pub namespace: String,
    /// The `service-intentions` config entry it stands for, validated by the API's parser,
    /// with `Meta["external-source"] = "kubernetes"`.
    pub entry: ServiceIntentionsEntry,
}

/// A `ServiceDefaults` object, translated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceDefaults {
    /// `metadata.name`: the service it configures.
    pub name: String,
    /// `metadata.namespace`: the service's namespace.
    pub namespace: String,
    /// `spec.protocol`.
    pub protocol: catalog::Protocol,
}

#[derive(Deserialize, Default)]
pub(in crate::k8s) struct RawServiceIntentions {
    #[serde(default)]
    spec: RawIntentionsSpec,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct RawIntentionsSpec {
    #[serde(default)]
    destination: RawDestination,
    #[serde(default)]
    sources: Vec<RawSource>,
    #[serde(default)]
    jwt: Option<Value>,
}

#[derive(Deserialize, Default)]
struct RawDestination {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    namespace: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct RawSource {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    peer: Option<String>,
    #[serde(default)]
    partition: Option<String>,
    #[serde(default)]
    sameness_group: Option<String>,
    #[serde(default)]
    action: Option<String>,
    #[serde(default)]
    permissions: Option<Vec<RawPermission>>,
    #[serde(default)]
    description: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct RawPermission {
    #[serde(default)]
    action: Option<String>,
    #[serde(default)]
    http: Option<RawHttp>,
    #[serde(default)]
    jwt: Option<Value>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct RawHttp {
    #[serde(default)]
    path_exact: Option<String>,
    #[serde(default)]
    path_prefix: Option<String>,
    #[serde(default)]
    path_regex: Option<String>,
    #[serde(default)]
    header: Vec<RawHeader>,
    #[serde(default)]
    methods: Vec<String>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct RawHeader {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    present: Option<bool>,
    #[serde(default)]
    exact: Option<String>,
    #[serde(default)]
    prefix: Option<String>,
    #[serde(default)]
    suffix: Option<String>,
    #[serde(default)]
    contains: Option<String>,
    #[serde(default)]
    regex: Option<String>,
    #[serde(default)]
    invert: Option<bool>,
    #[serde(default)]
    ignore_case: Option<bool>,
}

#[derive(Deserialize, Default)]
pub(in crate::k8s) struct RawServiceDefaults {
    #[serde(default)]
    spec: BTreeMap<String, Value>,
}

fn non_empty(s: &Option<String>) -> Option<&str> {
    s.as_deref().map(str::trim).filter(|s| !s.is_empty())
}

/// Inserts `key: value` when the value is set and not empty.
fn put(m: &mut Map<String, Json>, key: &str, value: &Option<String>) {
    if let Some(v) = value.as_deref().filter(|v| !v.is_empty()) {
        m.insert(key.into(), json!(v));
    }
}

fn permission_json(p: &RawPermission) -> Json {
    let mut m = Map::new();
    put(&mut m, "Action", &p.action);
    if let Some(h) = &p.http {
        let mut hm = Map::new();
        put(&mut hm, "PathExact", &h.path_exact);
        put(&mut hm, "PathPrefix", &h.path_prefix);
        put(&mut hm, "PathRegex", &h.path_regex);
        if !h.methods.is_empty() {
            hm.insert("Methods".into(), json!(h.methods));
        }
        if !h.header.is_empty() {
            let headers: Vec<Json> = h
                .header
                .iter()
                .map(|x| {
                    let mut xm = Map::new();
                    put(&mut xm, "Name", &x.name);
                    if x.present == Some(true) {
                        xm.insert("Present".into(), json!(true));
                    }
                    put(&mut xm, "Exact", &x.exact);
                    put(&mut xm, "Prefix", &x.prefix);
                    put(&mut xm, "Suffix", &x.suffix);
                    put(&mut xm, "Contains", &x.contains);
                    put(&mut xm, "Regex", &x.regex);
                    if x.invert == Some(true) {
                        xm.insert("Invert".into(), json!(true));
                    }
                    if x.ignore_case == Some(true) {
                        xm.insert("IgnoreCase".into(), json!(true));
                    }
                    Json::Object(xm)
                })
                .collect();
            hm.insert("Header".into(), Json::Array(headers));
        }
        m.insert("HTTP".into(), Json::Object(hm));
    }
    Json::Object(m)
}

/// The object's field for a path of the config entry (`Sources[1].Permissions[0].HTTP` →
/// `spec.sources[1].permissions[0].http`).
fn crd_field(entry_field: &str) -> String {
    match entry_field {
        "" | "." => "spec".into(),
        "Name" => "spec.destination.name".into(),
        "Namespace" => "spec.destination.namespace".into(),
        _ => {
            let parts: Vec<String> = entry_field
                .split('.')
                .map(|seg| {
                    if let Some(rest) = seg.strip_prefix("HTTP") {
                        format!("http{rest}")
                    } else {
                        let mut c = seg.chars();
                        match c.next() {
                            Some(f) => f.to_ascii_lowercase().to_string() + c.as_str(),
                            None => String::new(),
                        }
                    }
                })
                .collect();
            format!("spec.{}", parts.join("."))
        }
    }
}

/// The Consul JSON of a `ServiceIntentions` object's config entry (see the module docs);
/// `datacenter` goes into `Meta`.
fn intentions_json(
    ctx: &Ctx<'_>,
    namespace: &str,
    raw: &RawServiceIntentions,
    datacenter: &str,
) -> Result<String, Error> {
    let spec = &raw.spec;
    if spec.jwt.as_ref().is_some_and(|v| !v.is_null()) {
        return Err(ctx.field("spec.jwt", "JWT requirements are not supported here"));
    }
    let mut sources = Vec::new();
    for (i, s) in spec.sources.iter().enumerate() {
        let path = format!("spec.sources[{i}]");
        if let Some(peer) = non_empty(&s.peer) {
            return Err(ctx.field(
                format!("{path}.peer"),
                format!("{peer:?}: cluster peering is not supported here"),
            ));
        }
        if let Some(group) = non_empty(&s.sameness_group) {
            return Err(ctx.field(
                format!("{path}.samenessGroup"),
                format!("{group:?}: sameness groups are not supported here"),
            ));
        }
        if let Some(ap) = non_empty(&s.partition).filter(|p| *p != "default") {
            return Err(ctx.field(
                format!("{path}.partition"),
                format!("{ap:?}: this mesh serves only the \"default\" partition"),
            ));
        }
        let mut m = Map::new();
        put(&mut m, "Name", &s.name);
        put(&mut m, "Namespace", &s.namespace);
        put(&mut m, "Action", &s.action);
        put(&mut m, "Description", &s.description);
        if let Some(perms) = &s.permissions {
            for (j, p) in perms.iter().enumerate() {
                if p.jwt.as_ref().is_some_and(|v| !v.is_null()) {
                    return Err(ctx.field(
                        format!("{path}.permissions[{j}].jwt"),
                        "JWT requirements are not supported here",
                    ));
                }
            }
            m.insert(
                "Permissions".into(),
                Json::Array(perms.iter().map(permission_json).collect()),
            );
        }
        sources.push(Json::Object(m));
    }
    let dst_name = non_empty(&spec.destination.name).unwrap_or_default();
    let dst_namespace = non_empty(&spec.destination.namespace).unwrap_or(namespace);
    let entry = json!({
        "Kind": crate::intentions::SERVICE_INTENTIONS_KIND,
        "Name": dst_name,
        "Namespace": dst_namespace,
        "Meta": {
            META_EXTERNAL_SOURCE: EXTERNAL_SOURCE_KUBERNETES,
            META_SOURCE_DATACENTER: datacenter,
        },
        "Sources": sources,
    });
    Ok(entry.to_string())
}

pub(in crate::k8s) fn service_intentions(
    ctx: &Ctx<'_>,
    name: &str,
    namespace: &str,
    raw: RawServiceIntentions,
) -> Result<ServiceIntentions, Error> {
    super::check_rfc1123_subdomain(name).map_err(|m| ctx.field("metadata.name", m))?;
    if non_empty(&raw.spec.destination.name).is_none() {
        return Err(ctx.field("spec.destination.name", "required"));
    }
    let text = intentions_json(ctx, namespace, &raw, catalog::DEFAULT_DATACENTER)?;
    let entry = ServiceIntentionsEntry::from_json(&text).map_err(|e| {
        let field = e.field().map(crd_field).unwrap_or_else(|| "spec".into());
        ctx.field(field, e.to_string())
    })?;
    Ok(ServiceIntentions {
        name: name.to_string(),
        namespace: namespace.to_string(),
        entry,
    })
}

pub(in crate::k8s) fn service_defaults(
    ctx: &mut Ctx<'_>,
    name: &str,
    namespace: &str,
    raw: RawServiceDefaults,
) -> Result<ServiceDefaults, Error> {
    ServiceName::new(namespace.to_string(), name.to_string())
        .map_err(|e| ctx.field("metadata.name", e.to_string()))?;
    super::check_rfc1123_label(name).map_err(|m| ctx.field("metadata.name", m))?;
    let mut protocol = catalog::Protocol::Tcp;
    for (key, value) in &raw.spec {
        if key == "protocol" {
            protocol = match value {
                Value::Null => catalog::Protocol::Tcp,
                Value::String(s) => match s.as_str() {
                    "" | "tcp" => catalog::Protocol::Tcp,
                    "http" => catalog::Protocol::Http,
                    "http2" | "grpc" => {
                        return Err(ctx.field(
                            "spec.protocol",
                            format!("{s:?} is not supported here (tcp or http)"),
                        ))
                    }
                    other => {
                        return Err(ctx.field(
                            "spec.protocol",
                            format!("{other:?} is not a protocol (tcp, http, http2 or grpc)"),
                        ))
                    }
                },
                _ => return Err(ctx.field("spec.protocol", "must be a string")),
            };
        } else if !value.is_null() {
            ctx.warn(format_args!(
                "spec.{key}: accepted and ignored: only spec.protocol applies here (the other \
                 ServiceDefaults fields configure Envoy sidecars and gateways)"
            ));
        }
    }
    Ok(ServiceDefaults {
        name: name.to_string(),
        namespace: namespace.to_string(),
        protocol,
    })
}
