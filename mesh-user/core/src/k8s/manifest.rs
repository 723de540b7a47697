//! Multi-document YAML → [`Manifest`].

use std::collections::BTreeMap;

use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_norway::Value;

use super::objects::{self, Ctx, Object};
use super::upstreams::UpstreamSyntax;
use super::{check_rfc1123_label, object_label, Error, DEFAULT_NAMESPACE};

/// How to read a manifest.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ParseOptions {
    /// kubectl's `-n`: the namespace of objects that name none. An object naming another
    /// namespace is refused, as kubectl does.
    pub namespace: Option<String>,
    /// The upstream annotation grammar (Consul namespaces on by default: the local runner
    /// mirrors Kubernetes namespaces into Consul namespaces).
    pub upstream_syntax: UpstreamSyntax,
}

/// An object of a kind this module does not model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IgnoredObject {
    /// 1-based document number in its manifest.
    pub document: usize,
    /// Its `apiVersion`.
    pub api_version: String,
    /// Its `kind`.
    pub kind: String,
    /// Its `metadata.name`, if it has one.
    pub name: Option<String>,
    /// Its `metadata.namespace`, if it names one.
    pub namespace: Option<String>,
}

/// The modelled objects of one manifest, in document order, plus what was ignored.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Manifest {
    entries: Vec<(usize, Object)>,
    ignored: Vec<IgnoredObject>,
    warnings: Vec<String>,
}

/// What `apiVersion` each modelled kind must have.
fn modelled_api_version(kind: &str) -> Option<&'static str> {
    match kind {
        "Namespace" | "ServiceAccount" | "Service" | "Pod" => Some("v1"),
        "Deployment" => Some("apps/v1"),
        "ServiceIntentions" | "ServiceDefaults" => Some(super::crd::CONSUL_API_VERSION),
        _ => None,
    }
}

impl Manifest {
    /// Parses multi-document YAML. Any error refuses the whole manifest. Empty documents are
    /// skipped; YAML merge keys (`<<`) are applied.
    ///
    /// # Errors
    ///
    /// [`Error::Options`] for a `namespace` option that is not an RFC 1123 label,
    /// [`Error::Yaml`] for malformed YAML, [`Error::Document`] for a document that is not a
    /// Kubernetes object, [`Error::Field`] / [`Error::Object`] / [`Error::Upstream`] for a
    /// modelled object that is invalid, [`Error::Duplicate`] for the same kind, namespace and
    /// name twice.
    pub fn parse(text: &str, options: &ParseOptions) -> Result<Manifest, Error> {
        if let Some(ns) = &options.namespace {
            check_rfc1123_label(ns).map_err(Error::Options)?;
        }
        let mut manifest = Manifest::default();
        for (i, document) in serde_norway::Deserializer::from_str(text).enumerate() {
            let document_number = i + 1;
            let mut value = Value::deserialize(document).map_err(|e| Error::Yaml {
                document: document_number,
                message: e.to_string(),
            })?;
            value.apply_merge().map_err(|e| Error::Yaml {
                document: document_number,
                message: e.to_string(),
            })?;
            if value.is_null() {
                continue;
            }
            manifest.add_value(document_number, value, options)?;
        }
        let mut seen: BTreeMap<(String, Option<String>, String), usize> = BTreeMap::new();
        for (document, object) in &manifest.entries {
            let key = (
                object.kind().to_string(),
                object.namespace().map(str::to_string),
                object.name().to_string(),
            );
            if let Some(first) = seen.insert(key, *document) {
                return Err(Error::Duplicate {
                    object: object.label(),
                    first: format!("document {first}"),
                    second: format!("document {document}"),
                });
            }
        }
        Ok(manifest)
    }

    /// Parses one object as the Kubernetes API returns it (JSON, with `status`,
    /// `managedFields` and the other server-set fields, which are ignored), through the same
    /// validation as a manifest's objects: `meshd kubernetes` and `meshd local` read
    /// annotations, ports and selectors with the same code. Returns the object and the
    /// warnings it draws.
    ///
    /// # Errors
    ///
    /// As [`Manifest::parse`] for one document: the object's kind is not modelled
    /// ([`Error::Document`]), or a field or annotation is wrong ([`Error::Field`],
    /// [`Error::Object`], [`Error::Upstream`]).
    pub fn parse_api_object(
        object: &serde_json::Value,
        options: &ParseOptions,
    ) -> Result<(Object, Vec<String>), Error> {
        let value = serde_norway::to_value(object).map_err(|e| Error::Document {
            document: 1,
            message: e.to_string(),
        })?;
        let mut manifest = Manifest::default();
        manifest.add_value(1, value, options)?;
        match manifest.entries.pop() {
            Some((_, object)) => Ok((object, manifest.warnings)),
            None => Err(Error::Document {
                document: 1,
                message: format!(
                    "{} is not a kind the mesh reads",
                    object["kind"].as_str().unwrap_or("(no kind)")
                ),
            }),
        }
    }

    /// The modelled objects, in document order.
    pub fn objects(&self) -> impl Iterator<Item = &Object> {
        self.entries.iter().map(|(_, o)| o)
    }

    /// The modelled objects with their 1-based document numbers.
    pub fn objects_with_documents(&self) -> &[(usize, Object)] {
        &self.entries
    }

    /// Objects of kinds that are not modelled.
    pub fn ignored(&self) -> &[IgnoredObject] {
        &self.ignored
    }

    /// Things that are accepted but worth telling the user (ignored kinds and fields).
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    fn add_value(
        &mut self,
        document: usize,
        value: Value,
        options: &ParseOptions,
    ) -> Result<(), Error> {
        let doc_err = |message: String| Error::Document { document, message };
        let Value::Mapping(map) = &value else {
            return Err(doc_err(
                "not a Kubernetes object (expected a mapping with apiVersion and kind)".into(),
            ));
        };
        let string_field = |key: &str| -> Result<Option<String>, Error> {
            match map.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.clone())),
                Some(_) => Err(doc_err(format!("{key} must be a string"))),
            }
        };
        let api_version =
            string_field("apiVersion")?.ok_or_else(|| doc_err("apiVersion is required".into()))?;
        let kind = string_field("kind")?.ok_or_else(|| doc_err("kind is required".into()))?;

        if kind == "List" && api_version == "v1" {
            let items = match map.get("items") {
                None | Some(Value::Null) => return Ok(()),
                Some(Value::Sequence(items)) => items.clone(),
                Some(_) => return Err(doc_err("List: items must be a sequence".into())),
            };
            for item in items {
                self.add_value(document, item, options)?;
            }
            return Ok(());
        }

        let metadata = match map.get("metadata") {
            None | Some(Value::Null) => None,
            Some(Value::Mapping(m)) => Some(m),
            Some(_) => return Err(doc_err(format!("{kind}: metadata must be a mapping"))),
        };
        let meta_string = |key: &str| -> Result<Option<String>, Error> {
            match metadata.and_then(|m| m.get(key)) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) if s.is_empty() => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.clone())),
                Some(_) => Err(doc_err(format!("{kind}: metadata.{key} must be a string"))),
            }
        };
        let name = meta_string("name")?;
        let explicit_namespace = meta_string("namespace")?;

        let Some(want_version) = modelled_api_version(&kind) else {
            self.warnings.push(format!(
                "document {document}: ignored {kind} {} ({api_version}): kind not supported locally",
                name.as_deref().unwrap_or("(unnamed)")
            ));
            self.ignored.push(IgnoredObject {
                document,
                api_version,
                kind,
                name,
                namespace: explicit_namespace,
            });
            return Ok(());
        };
        let Some(name) = name else {
            return Err(doc_err(format!("{kind}: metadata.name is required")));
        };

        let cluster_scoped = kind == "Namespace";
        let namespace = if cluster_scoped {
            None
        } else {
            if let (Some(explicit), Some(over)) = (&explicit_namespace, &options.namespace) {
                if explicit != over {
                    return Err(Error::Object {
                        object: object_label(&kind, Some(explicit), &name),
                        message: format!(
                            "the namespace from the provided object {explicit:?} does not match \
                             the namespace {over:?}. You must pass '--namespace={explicit}' to \
                             perform this operation."
                        ),
                    });
                }
            }
            Some(
                explicit_namespace
                    .clone()
                    .or_else(|| options.namespace.clone())
                    .unwrap_or_else(|| DEFAULT_NAMESPACE.to_string()),
            )
        };
        let label = object_label(&kind, namespace.as_deref(), &name);
        if api_version != want_version {
            return Err(Error::Object {
                object: label,
                message: format!(
                    "apiVersion {api_version:?} is not supported (want {want_version:?})"
                ),
            });
        }
        let mut ctx = Ctx {
            object: &label,
            syntax: options.upstream_syntax,
            warnings: &mut self.warnings,
        };
        if let Some(ns) = &namespace {
            check_rfc1123_label(ns).map_err(|m| ctx.field("metadata.namespace", m))?;
        }
        let ns = namespace.as_deref().unwrap_or_default();
        let object = match kind.as_str() {
            "Namespace" => Object::Namespace(objects::namespace(&ctx, &name, typed(&ctx, value)?)?),
            "ServiceAccount" => Object::ServiceAccount(objects::service_account(
                &ctx,
                &name,
                ns,
                typed(&ctx, value)?,
            )?),
            "Service" => Object::Service(objects::service(&ctx, &name, ns, typed(&ctx, value)?)?),
            "Deployment" => {
                let raw = typed(&ctx, value)?;
                Object::Deployment(objects::deployment(&mut ctx, &name, ns, raw)?)
            }
            "Pod" => {
                let raw = typed(&ctx, value)?;
                Object::Pod(objects::pod(&mut ctx, &name, ns, raw)?)
            }
            "ServiceIntentions" => Object::ServiceIntentions(super::crd::service_intentions(
                &ctx,
                &name,
                ns,
                typed(&ctx, value)?,
            )?),
            "ServiceDefaults" => {
                let raw = typed(&ctx, value)?;
                Object::ServiceDefaults(super::crd::service_defaults(&mut ctx, &name, ns, raw)?)
            }
            _ => return Err(doc_err(format!("{kind}: not modelled"))),
        };
        self.entries.push((document, object));
        Ok(())
    }
}

/// Deserializes an object's value into its serde form, naming the failing field.
fn typed<T: DeserializeOwned>(ctx: &Ctx<'_>, value: Value) -> Result<T, Error> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let message = e.inner().to_string();
        if path.is_empty() || path == "." {
            Error::Object {
                object: ctx.object.to_string(),
                message,
            }
        } else {
            ctx.field(path, message)
        }
    })
}
