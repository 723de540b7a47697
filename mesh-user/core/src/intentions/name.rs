//! Service names (namespace + name), wildcard rules and the `ns/name` parser.

use std::fmt;
use std::str::FromStr;

use super::{Error, Result};

/// The wildcard: a whole namespace or a whole name.
pub const WILDCARD: &str = "*";
/// The namespace a bare name belongs to.
pub const DEFAULT_NAMESPACE: &str = "default";
/// The only admin partition this agent serves.
pub const DEFAULT_PARTITION: &str = "default";
/// The prefix of Consul's cluster-peer names (`peer:NAME/svc`), which this agent refuses.
const PEER_PREFIX: &str = "peer:";

/// A service (or service pattern) as intentions name it: a namespace and a name, each either
/// exact or the wildcard `*`.
///
/// Always valid: neither part is empty, `*` is never part of a longer word, an exact name never
/// follows a wildcard namespace, and neither part contains `/`. Orders by namespace, then name
/// (byte-wise, as Consul's tie-break does).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceName {
    namespace: String,
    name: String,
}

impl ServiceName {
    /// A validated service name. Errors name the field `Namespace` or `Name`.
    ///
    /// # Errors
    ///
    /// [`Error::Invalid`] if a part is empty or its wildcard use is not allowed (a partial
    /// wildcard like `web*`, or `*` as namespace with a named service).
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Result<Self> {
        let (namespace, name) = (namespace.into(), name.into());
        if namespace.is_empty() {
            return Err(Error::invalid("Namespace", "Namespace is required"));
        }
        if name.is_empty() {
            return Err(Error::invalid("Name", "Name is required"));
        }
        validate_wildcards(&namespace, &name, "Namespace", "Name")?;
        Ok(ServiceName { namespace, name })
    }

    /// Parses the forms the API accepts: `svc`, `*` (namespace `default`), `ns/svc`, `ns/*`
    /// and `*/*`. `*/svc`, partial wildcards, empty parts and extra `/` are errors naming the
    /// field (`Namespace` or `Name`).
    ///
    /// # Errors
    ///
    /// [`Error::Invalid`], as [`ServiceName::new`] on the two parts.
    pub fn parse(input: &str) -> Result<Self> {
        ServiceName::parse_in(input, DEFAULT_NAMESPACE)
    }

    /// The one parser of a single intention's source or destination as a request names it
    /// (CLI arguments, `source`/`destination`/`name` query parameters, ACL patterns): `svc`
    /// and `*` are in `namespace` (the request's: `-namespace`, `?ns=`, `X-Consul-Namespace`,
    /// else `default`); `ns/svc`, `ns/*` and `*/*` name theirs; `partition/ns/svc` is
    /// accepted for partition `default` (or empty) only. Only a `service-intentions` config
    /// entry's sources inherit another namespace (the entry's), and they do not come here.
    ///
    /// # Errors
    ///
    /// [`Error::Invalid`]: a `peer:` name (field `Peer`; this agent has no cluster peers), a
    /// partition other than `default` (field `Partition`), more than two `/` (field `Name`),
    /// and what [`ServiceName::new`] refuses in the two parts.
    pub fn parse_in(input: &str, namespace: &str) -> Result<Self> {
        // `peer:` names a cluster peer in whichever part it stands (the fuzzer found
        // `/peer:/x`, whose namespace `peer:` displayed as a peer name).
        if let Some(rest) = input
            .split('/')
            .find_map(|part| part.strip_prefix(PEER_PREFIX))
        {
            let peer = rest.split('/').next().unwrap_or_default();
            return Err(Error::invalid(
                "Peer",
                format!(
                    "Peer: peer {peer:?} is not served: this agent has no cluster peers \
                     (name the service as ns/name or partition/ns/name)"
                ),
            ));
        }
        let parts: Vec<&str> = input.split('/').collect();
        match parts.as_slice() {
            [name] => ServiceName::new(namespace, *name),
            [ns, name] => ServiceName::new(*ns, *name),
            [partition, ns, name] => {
                validate_partition(Some(partition), "Partition")?;
                ServiceName::new(*ns, *name)
            }
            _ => Err(Error::invalid(
                "Name",
                format!("Name: input can contain at most two '/': {input:?}"),
            )),
        }
    }

    /// Builds without validation; callers have validated both parts with
    /// [`validate_wildcards`] and checked they are not empty.
    pub(crate) fn new_unchecked(namespace: String, name: String) -> Self {
        ServiceName { namespace, name }
    }

    /// The namespace (`*` for any).
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The name (`*` for any).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `*/*`.
    pub fn wildcard() -> Self {
        ServiceName::new_unchecked(WILDCARD.into(), WILDCARD.into())
    }

    /// How many parts are exact: 2 (`ns/name`), 1 (`ns/*`) or 0 (`*/*`).
    pub(crate) fn exact_count(&self) -> u8 {
        if self.namespace == WILDCARD {
            0
        } else if self.name == WILDCARD {
            1
        } else {
            2
        }
    }

    /// Whether this pattern (possibly with wildcards) matches `target`. A wildcard in `target`
    /// is taken literally: it only matches a wildcard in the pattern.
    pub fn matches(&self, target: &ServiceName) -> bool {
        (self.namespace == WILDCARD || self.namespace == target.namespace)
            && (self.name == WILDCARD || self.name == target.name)
    }
}

impl fmt::Display for ServiceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

impl FromStr for ServiceName {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        ServiceName::parse(s)
    }
}

/// Consul's wildcard checks for a (namespace, name) pair, with the field names to report.
/// Both parts must be non-empty already. Also rejects `/`, which would make `ns/name`
/// ambiguous.
pub(crate) fn validate_wildcards(
    ns: &str,
    name: &str,
    ns_field: &str,
    name_field: &str,
) -> Result<()> {
    if ns != WILDCARD && ns.contains(WILDCARD) {
        return Err(Error::invalid(
            ns_field,
            format!("{ns_field}: wildcard character '*' cannot be used with partial values"),
        ));
    }
    if name != WILDCARD {
        if name.contains(WILDCARD) {
            return Err(Error::invalid(
                name_field,
                format!("{name_field}: wildcard character '*' cannot be used with partial values"),
            ));
        }
        if ns == WILDCARD {
            return Err(Error::invalid(
                name_field,
                format!("{name_field}: exact value cannot follow wildcard namespace"),
            ));
        }
    }
    for (value, field) in [(ns, ns_field), (name, name_field)] {
        if value.contains('/') {
            return Err(Error::invalid(
                field,
                format!("{field}: '/' is not allowed in a namespace or name: {value:?}"),
            ));
        }
    }
    Ok(())
}

/// Checks a partition value: empty or `default` is accepted (and means `default`).
pub(crate) fn validate_partition(partition: Option<&str>, field: &str) -> Result<()> {
    match partition {
        None | Some("") | Some(DEFAULT_PARTITION) => Ok(()),
        Some(p) if p.contains(WILDCARD) => Err(Error::invalid(
            field,
            format!("{field}: cannot use wildcard '*' in partition"),
        )),
        Some(p) => Err(Error::invalid(
            field,
            format!("{field}: partition {p:?} does not exist; this agent serves only partition {DEFAULT_PARTITION:?}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_five_forms() {
        let p = |s: &str| ServiceName::parse(s).unwrap();
        assert_eq!(p("web"), ServiceName::new("default", "web").unwrap());
        assert_eq!(p("*"), ServiceName::new("default", "*").unwrap());
        assert_eq!(p("ns1/web"), ServiceName::new("ns1", "web").unwrap());
        assert_eq!(p("ns1/*"), ServiceName::new("ns1", "*").unwrap());
        assert_eq!(p("*/*"), ServiceName::wildcard());
        assert_eq!(p("ns1/web").to_string(), "ns1/web");
        assert_eq!("ns1/*".parse::<ServiceName>().unwrap().exact_count(), 1);
        assert_eq!(p("web").exact_count(), 2);
        assert_eq!(p("*/*").exact_count(), 0);
    }

    #[test]
    fn rejects_bad_names_naming_the_field() {
        let cases = [
            (
                "we*",
                "Name",
                "wildcard character '*' cannot be used with partial values",
            ),
            (
                "*/web",
                "Name",
                "exact value cannot follow wildcard namespace",
            ),
            (
                "n*s/web",
                "Namespace",
                "wildcard character '*' cannot be used with partial values",
            ),
            ("ns/*b", "Name", "partial values"),
            ("", "Name", "Name is required"),
            ("ns/", "Name", "Name is required"),
            ("/web", "Namespace", "Namespace is required"),
            ("a/b/c", "Partition", "partition \"a\" does not exist"),
            ("a/b/c/d", "Name", "at most two '/'"),
            ("peer:other/web", "Peer", "peer \"other\" is not served"),
            // Found by the service_name fuzz target: a peer in the namespace position displayed
            // as a peer name that did not parse back.
            ("/peer:/;", "Peer", "is not served"),
            ("default/peer:x/web", "Peer", "peer \"x\" is not served"),
            ("default/n*/web", "Namespace", "partial values"),
        ];
        for (input, field, msg) in cases {
            let err = ServiceName::parse(input).unwrap_err();
            assert_eq!(err.field(), Some(field), "{input}: {err}");
            assert!(err.to_string().contains(msg), "{input}: {err}");
            assert!(err.to_string().contains(field), "{input}: {err}");
        }
    }

    #[test]
    fn a_bare_name_is_in_the_requests_namespace() {
        let p = |s: &str, ns: &str| ServiceName::parse_in(s, ns).unwrap();
        assert_eq!(
            p("web", "backend"),
            ServiceName::new("backend", "web").unwrap()
        );
        assert_eq!(p("*", "backend"), ServiceName::new("backend", "*").unwrap());
        assert_eq!(
            p("ns1/web", "backend"),
            ServiceName::new("ns1", "web").unwrap()
        );
        assert_eq!(
            p("default/ns1/web", "x"),
            ServiceName::new("ns1", "web").unwrap()
        );
        assert_eq!(p("/ns1/web", "x"), ServiceName::new("ns1", "web").unwrap());
        assert_eq!(
            ServiceName::parse("web").unwrap(),
            p("web", DEFAULT_NAMESPACE)
        );
    }

    #[test]
    fn wildcard_matching_is_literal_for_targets() {
        let web = ServiceName::parse("web").unwrap();
        assert!(ServiceName::parse("*").unwrap().matches(&web));
        assert!(ServiceName::wildcard().matches(&web));
        assert!(!ServiceName::parse("ns1/*").unwrap().matches(&web));
        assert!(!web.matches(&ServiceName::parse("*").unwrap()));
    }

    #[test]
    fn partitions() {
        assert!(validate_partition(None, "Partition").is_ok());
        assert!(validate_partition(Some(""), "Partition").is_ok());
        assert!(validate_partition(Some("default"), "Partition").is_ok());
        let err = validate_partition(Some("p*"), "Sources[0].Partition").unwrap_err();
        assert_eq!(err.field(), Some("Sources[0].Partition"));
        assert!(err.to_string().contains("wildcard"));
        let err = validate_partition(Some("other"), "Partition").unwrap_err();
        assert!(err.to_string().starts_with("Partition: "));
    }
}
