//! SPIFFE IDs in Consul's service form.
//!
//! `spiffe://<trust-domain>/ns/<ns>/dc/<dc>/svc/<service>`, and, when the admin partition is not
//! `default`, `spiffe://<trust-domain>/ap/<ap>/ns/<ns>/dc/<dc>/svc/<service>` (Consul's
//! `SpiffeIDService.URI()`).

use std::fmt;
use std::str::FromStr;

use super::Error;

/// The admin partition that is left out of the printed form.
pub const DEFAULT_PARTITION: &str = "default";

/// The longest SPIFFE ID the SPIFFE specification allows, in bytes.
const MAX_URI_LEN: usize = 2048;
/// The longest trust domain (a DNS-like name), in bytes.
const MAX_TRUST_DOMAIN_LEN: usize = 255;
const SCHEME: &str = "spiffe://";

/// Why a string is not a valid service SPIFFE ID (or trust domain).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SpiffeIdReason {
    /// The URI does not start with `spiffe://`.
    WrongScheme,
    /// The URI carries a `?query` or a `#fragment`.
    QueryOrFragment,
    /// The URI is longer than the 2048 bytes SPIFFE allows.
    TooLong,
    /// The trust domain (URI authority) is empty.
    EmptyTrustDomain,
    /// The trust domain is longer than 255 bytes.
    TrustDomainTooLong,
    /// The trust domain holds a character outside `[a-z0-9._-]` (ports, user info and upper case
    /// are not allowed).
    BadTrustDomainChar(char),
    /// A required segment is missing: `ns`, `dc`, `svc` or the value after one of them.
    MissingSegment(&'static str),
    /// A keyword segment is not the one expected at that position.
    UnexpectedSegment {
        /// The keyword that was expected (`ns`, `dc`, `svc`).
        expected: &'static str,
        /// What was found instead.
        found: String,
    },
    /// A name (partition, namespace, datacenter, service) is empty.
    EmptyName(&'static str),
    /// A name holds a character outside `[A-Za-z0-9._-]`.
    BadChar {
        /// Which name.
        component: &'static str,
        /// The offending character.
        ch: char,
    },
    /// A name is `.` or `..`.
    DotSegment(&'static str),
    /// Segments follow the service name.
    ExtraSegments,
}

impl fmt::Display for SpiffeIdReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::WrongScheme => write!(f, "scheme must be \"spiffe://\""),
            Self::QueryOrFragment => write!(f, "query and fragment are not allowed"),
            Self::TooLong => write!(f, "longer than {MAX_URI_LEN} bytes"),
            Self::EmptyTrustDomain => write!(f, "empty trust domain"),
            Self::TrustDomainTooLong => {
                write!(f, "trust domain longer than {MAX_TRUST_DOMAIN_LEN} bytes")
            }
            Self::BadTrustDomainChar(c) => {
                write!(f, "trust domain holds {c:?}, allowed are [a-z0-9._-]")
            }
            Self::MissingSegment(what) => write!(f, "missing {what}"),
            Self::UnexpectedSegment { expected, found } => {
                write!(f, "expected segment {expected:?}, found {found:?}")
            }
            Self::EmptyName(what) => write!(f, "empty {what}"),
            Self::BadChar { component, ch } => {
                write!(f, "{component} holds {ch:?}, allowed are [A-Za-z0-9._-]")
            }
            Self::DotSegment(what) => write!(f, "{what} must not be \".\" or \"..\""),
            Self::ExtraSegments => write!(f, "unexpected segments after the service name"),
        }
    }
}

/// A workload identity: the SPIFFE ID of a service, in Consul's form.
///
/// Equality compares every field; the partition is kept in lower case, as Consul prints it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    trust_domain: String,
    partition: String,
    namespace: String,
    datacenter: String,
    service: String,
}

impl SpiffeId {
    /// A service identity in the `default` partition:
    /// `spiffe://<trust domain>/ns/<namespace>/dc/<datacenter>/svc/<service>`.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidSpiffeId`] naming the first part that is not allowed: a trust domain
    /// outside `[a-z0-9._-]` or longer than 255 bytes, or a namespace, datacenter or service
    /// name that is empty, `.` or `..`, or has a character outside `[A-Za-z0-9._-]`.
    pub fn new(
        trust_domain: &str,
        namespace: &str,
        datacenter: &str,
        service: &str,
    ) -> Result<Self, Error> {
        let invalid = |reason| Error::InvalidSpiffeId {
            input: format!("{trust_domain}/ns/{namespace}/dc/{datacenter}/svc/{service}"),
            reason,
        };
        check_trust_domain(trust_domain).map_err(invalid)?;
        check_name("namespace", namespace).map_err(invalid)?;
        check_name("datacenter", datacenter).map_err(invalid)?;
        check_name("service", service).map_err(invalid)?;
        Ok(Self {
            trust_domain: trust_domain.to_owned(),
            partition: DEFAULT_PARTITION.to_owned(),
            namespace: namespace.to_owned(),
            datacenter: datacenter.to_owned(),
            service: service.to_owned(),
        })
    }

    /// The same identity in admin partition `partition` (stored in lower case, like Consul).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidSpiffeId`] if `partition` is not a valid name.
    pub fn with_partition(mut self, partition: &str) -> Result<Self, Error> {
        check_name("partition", partition).map_err(|reason| Error::InvalidSpiffeId {
            input: partition.to_owned(),
            reason,
        })?;
        self.partition = partition.to_ascii_lowercase();
        Ok(self)
    }

    /// The trust domain, e.g. `7f3c…-….consul`.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The admin partition (`default` unless set).
    pub fn partition(&self) -> &str {
        &self.partition
    }

    /// The namespace.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The datacenter.
    pub fn datacenter(&self) -> &str {
        &self.datacenter
    }

    /// The service name.
    pub fn service(&self) -> &str {
        &self.service
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{SCHEME}{}", self.trust_domain)?;
        if self.partition != DEFAULT_PARTITION {
            write!(f, "/ap/{}", self.partition)?;
        }
        write!(
            f,
            "/ns/{}/dc/{}/svc/{}",
            self.namespace, self.datacenter, self.service
        )
    }
}

impl FromStr for SpiffeId {
    type Err = Error;

    /// Parses a service SPIFFE ID. `/ap/default/…` is accepted and means the default partition,
    /// as in Consul's parser.
    fn from_str(input: &str) -> Result<Self, Error> {
        parse(input).map_err(|reason| Error::InvalidSpiffeId {
            input: input.chars().take(256).collect(),
            reason,
        })
    }
}

fn parse(input: &str) -> Result<SpiffeId, SpiffeIdReason> {
    if input.len() > MAX_URI_LEN {
        return Err(SpiffeIdReason::TooLong);
    }
    let rest = input
        .strip_prefix(SCHEME)
        .ok_or(SpiffeIdReason::WrongScheme)?;
    if rest.contains(['?', '#']) {
        return Err(SpiffeIdReason::QueryOrFragment);
    }
    let (trust_domain, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, ""),
    };
    check_trust_domain(trust_domain)?;
    if path.is_empty() {
        return Err(SpiffeIdReason::MissingSegment("ns"));
    }
    let mut segments = path.split('/').peekable();

    let mut partition = DEFAULT_PARTITION.to_owned();
    if segments.peek() == Some(&"ap") {
        segments.next();
        partition = value(&mut segments, "partition")?.to_ascii_lowercase();
    }
    keyword(&mut segments, "ns")?;
    let namespace = value(&mut segments, "namespace")?;
    keyword(&mut segments, "dc")?;
    let datacenter = value(&mut segments, "datacenter")?;
    keyword(&mut segments, "svc")?;
    let service = value(&mut segments, "service")?;
    if segments.next().is_some() {
        return Err(SpiffeIdReason::ExtraSegments);
    }
    Ok(SpiffeId {
        trust_domain: trust_domain.to_owned(),
        partition,
        namespace: namespace.to_owned(),
        datacenter: datacenter.to_owned(),
        service: service.to_owned(),
    })
}

fn keyword<'a>(
    segments: &mut impl Iterator<Item = &'a str>,
    expected: &'static str,
) -> Result<(), SpiffeIdReason> {
    match segments.next() {
        None => Err(SpiffeIdReason::MissingSegment(expected)),
        Some(s) if s == expected => Ok(()),
        Some(found) => Err(SpiffeIdReason::UnexpectedSegment {
            expected,
            found: found.chars().take(64).collect(),
        }),
    }
}

fn value<'a>(
    segments: &mut impl Iterator<Item = &'a str>,
    component: &'static str,
) -> Result<&'a str, SpiffeIdReason> {
    let v = segments
        .next()
        .ok_or(SpiffeIdReason::MissingSegment(component))?;
    check_name(component, v)?;
    Ok(v)
}

fn check_name(component: &'static str, name: &str) -> Result<(), SpiffeIdReason> {
    if name.is_empty() {
        return Err(SpiffeIdReason::EmptyName(component));
    }
    if name == "." || name == ".." {
        return Err(SpiffeIdReason::DotSegment(component));
    }
    match name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')))
    {
        Some(ch) => Err(SpiffeIdReason::BadChar { component, ch }),
        None => Ok(()),
    }
}

fn check_trust_domain(td: &str) -> Result<(), SpiffeIdReason> {
    if td.is_empty() {
        return Err(SpiffeIdReason::EmptyTrustDomain);
    }
    if td.len() > MAX_TRUST_DOMAIN_LEN {
        return Err(SpiffeIdReason::TrustDomainTooLong);
    }
    match td
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-' | '_')))
    {
        Some(c) => Err(SpiffeIdReason::BadTrustDomainChar(c)),
        None => Ok(()),
    }
}

/// Checks that `trust_domain` is a valid SPIFFE trust domain (`[a-z0-9._-]`, 1 to 255 bytes).
///
/// # Errors
///
/// [`Error::InvalidSpiffeId`] with the reason (empty, too long, or the first bad character).
pub fn validate_trust_domain(trust_domain: &str) -> Result<(), Error> {
    check_trust_domain(trust_domain).map_err(|reason| Error::InvalidSpiffeId {
        input: trust_domain.chars().take(256).collect(),
        reason,
    })
}

/// A fresh trust domain in Consul's default form, `<uuid>.consul`.
pub fn new_trust_domain() -> String {
    format!("{}.consul", uuid::Uuid::new_v4())
}

/// The SPIFFE ID of a trust domain itself, `spiffe://<trust-domain>`: the URI SAN of a root
/// certificate, as Consul's signing ID.
pub fn trust_domain_uri(trust_domain: &str) -> String {
    format!("{SCHEME}{trust_domain}")
}

/// Parses `spiffe://<trust-domain>` (no path) back to the trust domain.
pub(crate) fn parse_trust_domain_uri(uri: &str) -> Result<&str, SpiffeIdReason> {
    let td = uri
        .strip_prefix(SCHEME)
        .ok_or(SpiffeIdReason::WrongScheme)?;
    if td.contains(['?', '#']) {
        return Err(SpiffeIdReason::QueryOrFragment);
    }
    let td = td.strip_suffix('/').unwrap_or(td);
    if td.contains('/') {
        return Err(SpiffeIdReason::ExtraSegments);
    }
    check_trust_domain(td)?;
    Ok(td)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TD: &str = "11111111-2222-3333-4444-555555555555.consul";

    fn reason(s: &str) -> SpiffeIdReason {
        match s.parse::<SpiffeId>() {
            Err(Error::InvalidSpiffeId { reason, .. }) => reason,
            other => panic!("{s:?} parsed as {other:?}"),
        }
    }

    #[test]
    fn round_trip_without_partition() {
        let s = format!("spiffe://{TD}/ns/default/dc/dc1/svc/web");
        let id: SpiffeId = s.parse().unwrap();
        assert_eq!(id.trust_domain(), TD);
        assert_eq!(id.partition(), "default");
        assert_eq!(id.namespace(), "default");
        assert_eq!(id.datacenter(), "dc1");
        assert_eq!(id.service(), "web");
        assert_eq!(id.to_string(), s);
        assert_eq!(id, SpiffeId::new(TD, "default", "dc1", "web").unwrap());
    }

    #[test]
    fn round_trip_with_partition() {
        let s = format!("spiffe://{TD}/ap/team-a/ns/billing/dc/eu-west_1/svc/api-v1.2");
        let id: SpiffeId = s.parse().unwrap();
        assert_eq!(id.partition(), "team-a");
        assert_eq!(id.namespace(), "billing");
        assert_eq!(id.datacenter(), "eu-west_1");
        assert_eq!(id.service(), "api-v1.2");
        assert_eq!(id.to_string(), s);
        let built = SpiffeId::new(TD, "billing", "eu-west_1", "api-v1.2")
            .unwrap()
            .with_partition("team-a")
            .unwrap();
        assert_eq!(built, id);
        assert_eq!(built.to_string(), s);
    }

    #[test]
    fn default_partition_is_not_printed() {
        let id = SpiffeId::new(TD, "ns1", "dc1", "web")
            .unwrap()
            .with_partition("default")
            .unwrap();
        assert_eq!(
            id.to_string(),
            format!("spiffe://{TD}/ns/ns1/dc/dc1/svc/web")
        );
        // Consul's parser accepts an explicit default partition; it means the same identity.
        let explicit: SpiffeId = format!("spiffe://{TD}/ap/default/ns/ns1/dc/dc1/svc/web")
            .parse()
            .unwrap();
        assert_eq!(explicit, id);
    }

    #[test]
    fn partition_is_lower_cased_like_consul() {
        let id: SpiffeId = format!("spiffe://{TD}/ap/Team/ns/a/dc/b/svc/c")
            .parse()
            .unwrap();
        assert_eq!(id.partition(), "team");
        assert_eq!(
            id.to_string(),
            format!("spiffe://{TD}/ap/team/ns/a/dc/b/svc/c")
        );
    }

    #[test]
    fn rejects_with_reasons() {
        use SpiffeIdReason as R;
        let cases: Vec<(String, SpiffeIdReason)> = vec![
            (format!("https://{TD}/ns/a/dc/b/svc/c"), R::WrongScheme),
            (format!("SPIFFE://{TD}/ns/a/dc/b/svc/c"), R::WrongScheme),
            ("".into(), R::WrongScheme),
            (
                format!("spiffe://{TD}/ns/a/dc/b/svc/c?x=1"),
                R::QueryOrFragment,
            ),
            (
                format!("spiffe://{TD}/ns/a/dc/b/svc/c#frag"),
                R::QueryOrFragment,
            ),
            ("spiffe:///ns/a/dc/b/svc/c".into(), R::EmptyTrustDomain),
            (
                "spiffe://Example.consul/ns/a/dc/b/svc/c".into(),
                R::BadTrustDomainChar('E'),
            ),
            (
                "spiffe://td.consul:8443/ns/a/dc/b/svc/c".into(),
                R::BadTrustDomainChar(':'),
            ),
            (
                "spiffe://user@td.consul/ns/a/dc/b/svc/c".into(),
                R::BadTrustDomainChar('@'),
            ),
            (format!("spiffe://{TD}"), R::MissingSegment("ns")),
            (format!("spiffe://{TD}/"), R::MissingSegment("ns")),
            (format!("spiffe://{TD}/ns/a"), R::MissingSegment("dc")),
            (format!("spiffe://{TD}/ns/a/dc/b"), R::MissingSegment("svc")),
            (
                format!("spiffe://{TD}/ns/a/dc/b/svc"),
                R::MissingSegment("service"),
            ),
            (
                format!("spiffe://{TD}/ns/a/dc/b/svc/"),
                R::EmptyName("service"),
            ),
            (
                format!("spiffe://{TD}/ns//dc/b/svc/c"),
                R::EmptyName("namespace"),
            ),
            (
                format!("spiffe://{TD}/ap//ns/a/dc/b/svc/c"),
                R::EmptyName("partition"),
            ),
            (
                format!("spiffe://{TD}/ns/a/svc/c/dc/b"),
                R::UnexpectedSegment {
                    expected: "dc",
                    found: "svc".into(),
                },
            ),
            (
                format!("spiffe://{TD}/agent/client/dc/dc1/id/n1"),
                R::UnexpectedSegment {
                    expected: "ns",
                    found: "agent".into(),
                },
            ),
            (
                format!("spiffe://{TD}/ns/a/dc/b/svc/web%2f"),
                R::BadChar {
                    component: "service",
                    ch: '%',
                },
            ),
            (
                format!("spiffe://{TD}/ns/a b/dc/b/svc/c"),
                R::BadChar {
                    component: "namespace",
                    ch: ' ',
                },
            ),
            (
                format!("spiffe://{TD}/ns/a/dc/dç/svc/c"),
                R::BadChar {
                    component: "datacenter",
                    ch: 'ç',
                },
            ),
            (
                format!("spiffe://{TD}/ns/../dc/b/svc/c"),
                R::DotSegment("namespace"),
            ),
            (format!("spiffe://{TD}/ns/a/dc/b/svc/c/"), R::ExtraSegments),
            (
                format!("spiffe://{TD}/ns/a/dc/b/svc/c/extra"),
                R::ExtraSegments,
            ),
            (
                format!("spiffe://{TD}/ns/a/dc/b/svc/{}", "x".repeat(2100)),
                R::TooLong,
            ),
            (
                format!("spiffe://{}/ns/a/dc/b/svc/c", "t".repeat(256)),
                R::TrustDomainTooLong,
            ),
        ];
        for (input, want) in cases {
            assert_eq!(reason(&input), want, "input {input:?}");
        }
    }

    #[test]
    fn error_message_carries_input_and_reason() {
        let err = "http://x/ns/a/dc/b/svc/c".parse::<SpiffeId>().unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("http://x/ns/a/dc/b/svc/c"), "{msg}");
        assert!(msg.contains("spiffe://"), "{msg}");
    }

    #[test]
    fn constructors_validate() {
        assert!(SpiffeId::new("", "a", "b", "c").is_err());
        assert!(SpiffeId::new(TD, "a/b", "b", "c").is_err());
        assert!(SpiffeId::new(TD, "a", "", "c").is_err());
        assert!(SpiffeId::new(TD, "a", "b", "..").is_err());
        let id = SpiffeId::new(TD, "a", "b", "c").unwrap();
        assert!(id.clone().with_partition("").is_err());
        assert!(id.with_partition("p/q").is_err());
    }

    #[test]
    fn trust_domain_helpers() {
        let td = new_trust_domain();
        assert!(td.ends_with(".consul"));
        assert_eq!(td.len(), 36 + ".consul".len());
        validate_trust_domain(&td).unwrap();
        assert_ne!(td, new_trust_domain());
        let uri = trust_domain_uri(&td);
        assert_eq!(uri, format!("spiffe://{td}"));
        assert_eq!(parse_trust_domain_uri(&uri).unwrap(), td);
        assert_eq!(
            parse_trust_domain_uri(&format!("{uri}/ns/x")),
            Err(SpiffeIdReason::ExtraSegments)
        );
        assert!(validate_trust_domain("UPPER.consul").is_err());
    }
}
