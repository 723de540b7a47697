//! Consul Connect intentions: allow/deny rules between services, their precedence, the
//! `service-intentions` config entry, and their compilation into flat kernel map entries.
//!
//! # Model
//!
//! An [`Intention`] says whether a source service may connect to a destination service. Both
//! sides are a [`ServiceName`] (namespace + name); either part may be the wildcard `*`, but only
//! as a whole value (`we*` is rejected) and never as an exact name under a wildcard namespace
//! (`*/web` is rejected). Each intention has a [precedence] from 9 (everything exact)
//! to 1 (`*/*` to `*/*`), destination exactness counting before source exactness:
//!
//! | prec | src ns | src name | dst ns | dst name |
//! |------|--------|----------|--------|----------|
//! | 9    | exact  | exact    | exact  | exact    |
//! | 8    | exact  | `*`      | exact  | exact    |
//! | 7    | `*`    | `*`      | exact  | exact    |
//! | 6    | exact  | exact    | exact  | `*`      |
//! | 5    | exact  | `*`      | exact  | `*`      |
//! | 4    | `*`    | `*`      | exact  | `*`      |
//! | 3    | exact  | exact    | `*`    | `*`      |
//! | 2    | exact  | `*`      | `*`    | `*`      |
//! | 1    | `*`    | `*`      | `*`    | `*`      |
//!
//! Ties sort by source namespace, source name, destination namespace, destination name. For a
//! connection, the highest-precedence intention whose source and destination both match
//! decides; when none matches, the [`RuleSet`]'s default policy decides (deny unless set).
//! A source without a namespace inherits the destination's namespace (or `default` when the
//! destination namespace is `*`).
//!
//! [`RuleSet`] keeps every intention and offers Consul's operations: create (refusing a
//! duplicate source/destination pair unless asked to replace), update, delete, exact get,
//! sorted list, `check` and `match`. The `service-intentions` config entry
//! ([`ServiceIntentionsEntry`], read from JSON or HCL) is a second view of the same rules:
//! writing an entry replaces every intention for its destination, and reading it lists them.
//!
//! # Kernel form
//!
//! [`compile`] turns a rule set into one [`KernelKey`] → [`KernelValue`] entry per intention,
//! with namespaces and names interned to `u32` ids by an [`Interner`] (id 0 is the wildcard).
//! The kernel answers a connection with at most nine exact-key lookups, one per precedence
//! level from 9 down to 1, in [`kernel_lookup_order`]; the first hit decides.
//! [`simulate_kernel_check`] performs exactly those probes in Rust and is tested to agree with
//! [`RuleSet::check`].
//!
//! This agent serves a single admin partition, `default`: partitions are accepted in input
//! only when empty or `default`.
#![forbid(unsafe_code)]

mod compile;
mod decode;
pub mod defaults;
mod entry;
mod intention;
mod name;
pub mod permission;
pub mod ports;
mod ruleset;

#[cfg(test)]
mod tests;

use std::fmt;

pub use compile::{
    compile, compile_with, kernel_lookup_order, simulate_kernel_check, CompiledRules, Interner,
    KernelChange, KernelKey, KernelValue, KernelVerdict, KeyPattern, UNKNOWN_ID, WILDCARD_ID,
};
pub use defaults::{ServiceDefaultsEntry, SERVICE_DEFAULTS_KIND};
pub use entry::{ServiceIntentionsEntry, SourceIntention, SERVICE_INTENTIONS_KIND};
pub use intention::{precedence, Action, Intention, IntentionSpec};
pub use name::{ServiceName, DEFAULT_NAMESPACE, DEFAULT_PARTITION, WILDCARD};
pub use permission::{normalize_path, HttpRequest, Permission};
pub use ruleset::{
    Decision, EntryIndexes, MatchType, Matched, RequestDecision, RuleSet, RuleSetChanges,
    SyncOutcome, EXTERNAL_SOURCE_KUBERNETES, META_EXTERNAL_SOURCE,
};

/// The input format a document was read from, for error messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// JSON, as the HTTP API and `consul config write x.json` take it.
    Json,
    /// HCL, as `consul config write x.hcl` takes it.
    Hcl,
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Format::Json => "JSON",
            Format::Hcl => "HCL",
        })
    }
}

/// Everything that can go wrong in this module. No operation that returns this error has
/// changed any state.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A value is not acceptable. `field` is its path as Consul names it (`SourceName`,
    /// `Sources[1].Action`, ...) and `message` is the full, Consul-worded message, which
    /// starts with or contains that path.
    #[error("{message}")]
    Invalid {
        /// Path of the offending field.
        field: String,
        /// Human-readable message, naming the field.
        message: String,
    },
    /// The document is not well-formed, or does not have the schema's shape (unknown field,
    /// wrong type, field given twice). `field` is the path where it went wrong (empty when the
    /// document does not parse at all).
    #[error("malformed {format}{}: {message}", at_field(.field))]
    Malformed {
        /// Which input format.
        format: Format,
        /// Path of the offending field, e.g. `Sources[1].Foo`; empty for syntax errors.
        field: String,
        /// The parser's message (names the unknown field, includes line/column for JSON).
        message: String,
    },
    /// Another intention already has this source/destination pair.
    #[error("duplicate intention found: {existing}")]
    Duplicate {
        /// The existing intention, as Consul prints it.
        existing: String,
    },
    /// No intention has this ID.
    #[error("Cannot {op} non-existent intention: '{id}'")]
    NotFound {
        /// `modify` or `delete`.
        op: &'static str,
        /// The ID that was asked for.
        id: String,
    },
    /// The intentions are managed by a Kubernetes `ServiceIntentions` object and read-only
    /// through the API and CLI (see [`RuleSet::check_writable`]).
    #[error("{message}")]
    ReadOnly {
        /// What is read-only and what to do instead.
        message: String,
    },
    /// A `u32` id space (interned strings or counter indexes) is used up.
    #[error("{what} exhausted: more than {} values", u32::MAX - 1)]
    Exhausted {
        /// Which id space.
        what: &'static str,
    },
}

fn at_field(field: &str) -> String {
    if field.is_empty() || field == "." {
        String::new()
    } else {
        format!(" at {field}")
    }
}

impl Error {
    /// The path of the field this error is about, when there is one.
    pub fn field(&self) -> Option<&str> {
        match self {
            Error::Invalid { field, .. } | Error::Malformed { field, .. } if !field.is_empty() => {
                Some(field)
            }
            _ => None,
        }
    }

    pub(crate) fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Invalid {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// Shorthand for results of this module.
pub type Result<T, E = Error> = std::result::Result<T, E>;
