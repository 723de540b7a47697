//! The desired state of the runner: every object applied so far (and not deleted), kept as
//! its YAML document, persisted in `<state dir>/local/applied.json`.
//!
//! [`Applied::apply`] and [`Applied::delete`] work on a copy and return it with what happened
//! to each object (kubectl's `created` / `configured` / `unchanged` / `deleted`) and the
//! [`DesiredState`] it builds; the caller [`commit`](Applied::commit)s the copy once it is
//! happy with it. A manifest that fails to parse, or a result that fails to build, is an error
//! and nothing changes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_norway::Value;

use super::{DesiredState, Manifest, Object, ParseOptions};

/// Why applying, deleting, loading or saving the applied objects failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A manifest that does not parse; `message` is the parser's, verbatim.
    #[error("{file}: {message}")]
    Manifest {
        /// The manifest's source name (a file name).
        file: String,
        /// What is wrong, as the parser said it.
        message: String,
    },
    /// The applied objects together do not make a valid desired state.
    #[error("{0}")]
    Build(#[source] super::Error),
    /// Reading or writing the state file failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being read or written.
        what: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The state file is damaged: an error rather than a silent reset.
    #[error("{}: damaged ({message}); move it away to start with no pods", .path.display())]
    Corrupt {
        /// The state file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
}

/// The file, in the state directory.
pub const APPLIED_FILE: &str = "local/applied.json";

/// An object's identity: kind, namespace (none for Namespaces), name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ObjectKey {
    /// The object's `kind` (`Deployment`).
    pub kind: String,
    /// Its namespace; `None` for cluster-scoped kinds (Namespace).
    pub namespace: Option<String>,
    /// Its `metadata.name`.
    pub name: String,
}

impl ObjectKey {
    fn of(o: &Object) -> Self {
        ObjectKey {
            kind: o.kind().to_string(),
            namespace: o.namespace().map(str::to_string),
            name: o.name().to_string(),
        }
    }

    /// kubectl's resource name: `deployment.apps`, `service`, ...
    pub fn resource(&self) -> String {
        match self.kind.as_str() {
            "Deployment" => "deployment.apps".into(),
            "ServiceIntentions" => "serviceintentions.consul.hashicorp.com".into(),
            "ServiceDefaults" => "servicedefaults.consul.hashicorp.com".into(),
            k => k.to_ascii_lowercase(),
        }
    }

    /// `deployment.apps/web`, as `kubectl apply` names objects.
    pub fn kubectl_name(&self) -> String {
        format!("{}/{}", self.resource(), self.name)
    }
}

/// What happened to one object.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// Applied and not there before.
    Created,
    /// Applied over a different stored document.
    Configured,
    /// Applied with the document already stored.
    Unchanged,
    /// Removed by a delete.
    Deleted,
    /// Delete of an object that is not there.
    NotFound,
}

impl Outcome {
    /// The word kubectl prints: `created`, `configured`, `unchanged`, `deleted`, `not found`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Outcome::Created => "created",
            Outcome::Configured => "configured",
            Outcome::Unchanged => "unchanged",
            Outcome::Deleted => "deleted",
            Outcome::NotFound => "not found",
        }
    }
}

/// One object's outcome.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectResult {
    /// The object (flattened into this JSON object).
    #[serde(flatten)]
    pub key: ObjectKey,
    /// What happened to it.
    pub outcome: Outcome,
}

impl ObjectResult {
    /// kubectl's line: `deployment.apps/web created`, `service "web" deleted`,
    /// `Error from server (NotFound): services "web" not found`.
    pub fn line(&self) -> String {
        match self.outcome {
            Outcome::Deleted => format!("{} \"{}\" deleted", self.key.resource(), self.key.name),
            Outcome::NotFound => {
                let r = self.key.resource();
                let (kind, group) = r.split_once('.').unwrap_or((&r, ""));
                // consul-k8s's resources are plural already (`serviceintentions`).
                let plural_kind = if kind.ends_with('s') {
                    kind.to_string()
                } else {
                    format!("{kind}s")
                };
                let plural = if group.is_empty() {
                    plural_kind
                } else {
                    format!("{plural_kind}.{group}")
                };
                format!(
                    "Error from server (NotFound): {plural} \"{}\" not found",
                    self.key.name
                )
            }
            o => format!("{} {}", self.key.kubectl_name(), o.as_str()),
        }
    }
}

/// One stored object.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Stored {
    /// The document, as normalized YAML.
    yaml: String,
    /// Seconds since the epoch when it was created.
    created: u64,
}

/// A manifest to apply or delete: its text and where it came from (a file name, for errors).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Source {
    /// Where the manifest came from (a file name); errors and warnings are prefixed with it.
    pub name: String,
    /// The manifest: multi-document YAML, `kind: List` documents expanded.
    pub text: String,
}

/// The objects applied so far.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    path: Option<PathBuf>,
    objects: BTreeMap<ObjectKey, Stored>,
}

#[derive(Serialize, Deserialize)]
struct FileForm {
    version: u32,
    objects: Vec<FileObject>,
}

#[derive(Serialize, Deserialize)]
struct FileObject {
    #[serde(flatten)]
    key: ObjectKey,
    #[serde(flatten)]
    stored: Stored,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The documents of `text` (a `kind: List` expanded into its items), each as normalized YAML.
fn documents(text: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    for document in serde_norway::Deserializer::from_str(text) {
        let mut value = Value::deserialize(document).map_err(|e| e.to_string())?;
        value.apply_merge().map_err(|e| e.to_string())?;
        if value.is_null() {
            continue;
        }
        let is_list = value.get("kind").and_then(Value::as_str) == Some("List");
        let items = match (is_list, value.get("items")) {
            (true, Some(Value::Sequence(items))) => items.clone(),
            (true, _) => Vec::new(),
            (false, _) => vec![value],
        };
        for item in items {
            out.push(serde_norway::to_string(&item).map_err(|e| e.to_string())?);
        }
    }
    Ok(out)
}

/// Parses one source; every document that is a modelled object is returned with its key and
/// normalized YAML, and the parser's warnings are added to `warnings`, prefixed with the
/// source's name. Errors name the source.
fn parse_source(
    source: &Source,
    namespace: Option<&str>,
    warnings: &mut Vec<String>,
) -> Result<Vec<(ObjectKey, String)>, Error> {
    let options = ParseOptions {
        namespace: namespace.map(str::to_string),
        ..ParseOptions::default()
    };
    let refuse = |message: String| Error::Manifest {
        file: source.name.clone(),
        message,
    };
    let manifest = Manifest::parse(&source.text, &options).map_err(|e| refuse(e.to_string()))?;
    let mut out = Vec::new();
    for doc in documents(&source.text).map_err(refuse)? {
        let one = Manifest::parse(&doc, &options).map_err(|e| refuse(e.to_string()))?;
        for o in one.objects() {
            out.push((ObjectKey::of(o), doc.clone()));
        }
    }
    warnings.extend(
        manifest
            .warnings()
            .iter()
            .map(|w| format!("{}: {w}", source.name)),
    );
    Ok(out)
}

/// Re-parses a stored object.
fn parse_stored(key: &ObjectKey, stored: &Stored) -> Result<Manifest, Error> {
    let options = ParseOptions {
        namespace: key.namespace.clone(),
        ..ParseOptions::default()
    };
    Manifest::parse(&stored.yaml, &options).map_err(|e| Error::Manifest {
        file: format!("stored {}", key.kubectl_name()),
        message: e.to_string(),
    })
}

/// The result of an apply or delete, not yet committed.
#[derive(Clone, Debug)]
pub struct Change {
    /// The applied set after the change, for [`Applied::commit`].
    pub next: Applied,
    /// What happened to each object of the manifests, in manifest order.
    pub results: Vec<ObjectResult>,
    /// The desired state `next` builds.
    pub desired: DesiredState,
    /// Warnings of the manifests given (ignored kinds, fields).
    pub warnings: Vec<String>,
}

impl Applied {
    /// In memory only (tests).
    pub fn in_memory() -> Self {
        Applied::default()
    }

    /// Loads `<state_dir>/local/applied.json` (empty if absent). A damaged file is an error.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] if the file exists but cannot be read, [`Error::Corrupt`] if it is not
    /// the expected JSON, a stored object no longer parses, or the objects no longer build a
    /// desired state.
    pub fn load(state_dir: &Path) -> Result<Self, Error> {
        let path = state_dir.join(APPLIED_FILE);
        let mut applied = Applied {
            path: Some(path.clone()),
            objects: BTreeMap::new(),
        };
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(applied),
            Err(source) => {
                return Err(Error::Io {
                    what: format!("reading {}", path.display()),
                    source,
                })
            }
        };
        let form: FileForm = serde_json::from_str(&text).map_err(|e| Error::Corrupt {
            path: path.clone(),
            message: e.to_string(),
        })?;
        for o in form.objects {
            applied.objects.insert(o.key, o.stored);
        }
        // Every stored object must still parse and the whole must build.
        applied.desired().map_err(|e| Error::Corrupt {
            path,
            message: e.to_string(),
        })?;
        Ok(applied)
    }

    /// Writes the file (if this set has one).
    fn save(&self) -> Result<(), Error> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let form = FileForm {
            version: 1,
            objects: self
                .objects
                .iter()
                .map(|(k, s)| FileObject {
                    key: k.clone(),
                    stored: s.clone(),
                })
                .collect(),
        };
        let text = serde_json::to_vec_pretty(&form).map_err(|e| Error::Corrupt {
            path: path.clone(),
            message: e.to_string(),
        })?;
        let io = |source| Error::Io {
            what: format!("writing {}", path.display()),
            source,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        crate::durable::write(path, &text, 0o600).map_err(io)
    }

    /// Makes `next` (from a [`Change`]) the applied set, and persists it (durably, mode
    /// 0600). On error nothing changes in memory.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] if the state directory or file cannot be written.
    pub fn commit(&mut self, next: Applied) -> Result<(), Error> {
        next.save()?;
        *self = next;
        Ok(())
    }

    /// Removes the file (`meshd local --reset`); a missing file is not an error.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] if the file exists and cannot be removed.
    pub fn remove_file(state_dir: &Path) -> Result<(), Error> {
        let path = state_dir.join(APPLIED_FILE);
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::Io {
                what: format!("removing {}", path.display()),
                source: e,
            }),
            _ => Ok(()),
        }
    }

    /// Whether no object is applied.
    pub fn is_empty(&self) -> bool {
        self.objects.is_empty()
    }

    /// The applied objects' keys, sorted by kind, namespace, name.
    pub fn keys(&self) -> impl Iterator<Item = &ObjectKey> {
        self.objects.keys()
    }

    /// The object's document, as stored (normalized YAML).
    pub fn document(&self, key: &ObjectKey) -> Option<&str> {
        self.objects.get(key).map(|s| s.yaml.as_str())
    }

    /// When the object was first applied (seconds since the epoch).
    pub fn created(&self, key: &ObjectKey) -> Option<u64> {
        self.objects.get(key).map(|s| s.created)
    }

    /// The desired state the applied objects build.
    ///
    /// # Errors
    ///
    /// [`Error::Manifest`] if a stored object no longer parses, [`Error::Build`] if the
    /// objects together are invalid.
    pub fn desired(&self) -> Result<DesiredState, Error> {
        let manifests = self
            .objects
            .iter()
            .map(|(k, s)| parse_stored(k, s))
            .collect::<Result<Vec<_>, _>>()?;
        DesiredState::build(&manifests).map_err(Error::Build)
    }

    /// `kubectl apply -f` of `sources` (with `-n namespace`), on a copy: commit
    /// [`Change::next`] to keep it.
    ///
    /// # Errors
    ///
    /// [`Error::Manifest`] naming the source that does not parse or repeats an object of an
    /// earlier source, [`Error::Build`] if the result is not a valid desired state. Nothing
    /// changes either way.
    pub fn apply(&self, sources: &[Source], namespace: Option<&str>) -> Result<Change, Error> {
        let mut next = self.clone();
        let mut results = Vec::new();
        let mut warnings = Vec::new();
        let mut seen = BTreeMap::new();
        for source in sources {
            let objects = parse_source(source, namespace, &mut warnings)?;
            for (key, yaml) in objects {
                if let Some(first) = seen.insert(key.clone(), source.name.clone()) {
                    return Err(Error::Manifest {
                        file: source.name.clone(),
                        message: format!("{} is also in {first}", key.kubectl_name()),
                    });
                }
                let outcome = match next.objects.get_mut(&key) {
                    None => {
                        next.objects.insert(
                            key.clone(),
                            Stored {
                                yaml,
                                created: now(),
                            },
                        );
                        Outcome::Created
                    }
                    Some(s) if s.yaml == yaml => Outcome::Unchanged,
                    Some(s) => {
                        s.yaml = yaml;
                        Outcome::Configured
                    }
                };
                results.push(ObjectResult { key, outcome });
            }
        }
        let desired = next.desired()?;
        Ok(Change {
            next,
            results,
            desired,
            warnings,
        })
    }

    /// `kubectl delete -f` of `sources`. Deleting a Namespace deletes every object in it.
    /// Works on a copy, as [`Applied::apply`]; objects that are not applied come back as
    /// [`Outcome::NotFound`].
    ///
    /// # Errors
    ///
    /// [`Error::Manifest`] naming the source that does not parse, [`Error::Build`] if what
    /// remains is not a valid desired state. Nothing changes either way.
    pub fn delete(&self, sources: &[Source], namespace: Option<&str>) -> Result<Change, Error> {
        let mut next = self.clone();
        let mut results = Vec::new();
        let mut warnings = Vec::new();
        for source in sources {
            let objects = parse_source(source, namespace, &mut warnings)?;
            for (key, _) in objects {
                let outcome = if next.objects.remove(&key).is_some() {
                    Outcome::Deleted
                } else {
                    Outcome::NotFound
                };
                results.push(ObjectResult { key, outcome });
            }
        }
        // A deleted Namespace takes what is left in it, after the objects named explicitly
        // (which are reported as deleted, whatever their order in the manifests).
        for r in &results {
            if r.key.kind == "Namespace" && r.outcome == Outcome::Deleted {
                next.objects
                    .retain(|k, _| k.namespace.as_deref() != Some(r.key.name.as_str()));
            }
        }
        let desired = next.desired()?;
        Ok(Change {
            next,
            results,
            desired,
            warnings,
        })
    }
}
