//! ACL tokens and policies: what a token may do, Consul's token JSON, constant-time lookup.

use std::collections::BTreeMap;
use std::fmt;
use std::time::SystemTime;

use serde::de::IgnoredAny;
use serde::ser::SerializeStruct;
use serde::{Deserialize, Serialize, Serializer};
use subtle::ConstantTimeEq;

use super::Error;
use mesh_core::intentions::ServiceName;

/// The ID of Consul's `global-management` policy, which `operator` is here.
pub const OPERATOR_POLICY_ID: &str = "00000000-0000-0000-0000-000000000001";
/// The ID of Consul's `builtin/global-read-only` policy, which `read-only` is here.
pub const READ_ONLY_POLICY_ID: &str = "00000000-0000-0000-0000-000000000002";

const INTENTION_WRITE_PREFIX: &str = "intention-write:";
const SERVICE_WRITE_PREFIX: &str = "service-write:";
const MAX_DESCRIPTION: usize = 512;

/// What a token may do. A token holds one or more; their rights add up.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Policy {
    /// Everything, token management included (`operator`, alias Consul's
    /// `global-management`).
    Operator,
    /// Read intentions, entries, checks, counters (`read-only`, alias Consul's
    /// `builtin/global-read-only`).
    ReadOnly,
    /// Read and write the intentions and `service-intentions` entries whose destination the
    /// pattern covers (lists show it only those) (`intention-write:api`, `intention-write:ns/*`, `intention-write:*/*`).
    /// A bare name means namespace `default`.
    IntentionWrite(ServiceName),
    /// Consul's `service:write` on the services the pattern covers: write (and read) their
    /// `service-defaults` entries (`service-write:api`, `service-write:ns/*`). A bare name means
    /// namespace `default`.
    ServiceWrite(ServiceName),
}

impl Policy {
    /// Parses a policy name: `operator`, `global-management`, `read-only`,
    /// `builtin/global-read-only`, `intention-write:<pattern>` or `service-write:<pattern>`.
    ///
    /// # Errors
    /// A message naming an unknown policy or a bad destination pattern.
    pub fn parse(name: &str) -> Result<Policy, String> {
        match name {
            "operator" | "global-management" => Ok(Policy::Operator),
            "read-only" | "builtin/global-read-only" => Ok(Policy::ReadOnly),
            _ => match name.strip_prefix(INTENTION_WRITE_PREFIX) {
                Some(pattern) => ServiceName::parse(pattern)
                    .map(Policy::IntentionWrite)
                    .map_err(|e| format!("bad destination pattern {pattern:?}: {e}")),
                None => match name.strip_prefix(SERVICE_WRITE_PREFIX) {
                    Some(pattern) => ServiceName::parse(pattern)
                        .map(Policy::ServiceWrite)
                        .map_err(|e| format!("bad service pattern {pattern:?}: {e}")),
                    None => Err(format!(
                        "unknown policy {name:?}; the policies are operator, read-only, \
                         intention-write:<destination pattern> and service-write:<service pattern>"
                    )),
                },
            },
        }
    }

    /// The policy with this Consul ID (the two built-in ones).
    pub fn from_id(id: &str) -> Option<Policy> {
        match id {
            OPERATOR_POLICY_ID => Some(Policy::Operator),
            READ_ONLY_POLICY_ID => Some(Policy::ReadOnly),
            _ => None,
        }
    }

    /// The canonical name (`intention-write:default/api`).
    pub fn name(&self) -> String {
        match self {
            Policy::Operator => "operator".into(),
            Policy::ReadOnly => "read-only".into(),
            Policy::IntentionWrite(p) => format!("{INTENTION_WRITE_PREFIX}{p}"),
            Policy::ServiceWrite(p) => format!("{SERVICE_WRITE_PREFIX}{p}"),
        }
    }

    /// The Consul ID of a built-in policy.
    pub fn id(&self) -> Option<&'static str> {
        match self {
            Policy::Operator => Some(OPERATOR_POLICY_ID),
            Policy::ReadOnly => Some(READ_ONLY_POLICY_ID),
            Policy::IntentionWrite(_) | Policy::ServiceWrite(_) => None,
        }
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

/// What a request needs.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Need<'a> {
    /// Reading intentions, entries, checks, counters.
    Read,
    /// Reading the intentions (or the entry) of this destination.
    ReadIntention(&'a ServiceName),
    /// Writing intentions to this destination.
    WriteIntention(&'a ServiceName),
    /// Reading the agent's own data (its metrics), Consul's `agent:read`: operators and
    /// `read-only` tokens.
    AgentRead,
    /// Reading this service's `service-defaults` entry (Consul's `service:read`).
    ReadService(&'a ServiceName),
    /// Writing this service's `service-defaults` entry (Consul's `service:write`).
    WriteService(&'a ServiceName),
    /// Reading tokens.
    AclRead,
    /// Creating or deleting tokens.
    AclWrite,
    /// Changing the local runner's workloads (apply, delete) or reaching into a pod
    /// (port-forward): operators only.
    WriteWorkloads,
}

/// A secret: compared in constant time, never printed by `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct Secret(String);

impl Secret {
    pub(crate) fn new(s: String) -> Self {
        Secret(s)
    }

    pub(crate) fn expose(&self) -> &str {
        &self.0
    }

    fn ct_eq(&self, other: &str) -> bool {
        bool::from(self.0.as_bytes().ct_eq(other.as_bytes()))
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// An ACL token.
#[derive(Clone, Debug)]
pub struct Token {
    /// The public ID, used to name the token (list, delete, messages).
    pub accessor_id: String,
    pub(crate) secret: Secret,
    /// Free text.
    pub description: String,
    /// What it may do.
    pub policies: Vec<Policy>,
    /// When it was made.
    pub create_time: SystemTime,
    /// Token write index at creation.
    pub create_index: u64,
    /// Token write index of the last change.
    pub modify_index: u64,
}

impl Token {
    /// The secret that authenticates with this token.
    pub fn secret_id(&self) -> &str {
        self.secret.expose()
    }

    /// Whether the token has the right `need` asks for; otherwise the 403 to answer.
    pub(crate) fn check(&self, need: Need<'_>) -> Result<(), Error> {
        let operator = self.policies.contains(&Policy::Operator);
        let ok = match need {
            Need::Read => !self.policies.is_empty(),
            Need::ReadIntention(dst) => self.may_read(dst),
            Need::WriteIntention(dst) => {
                operator
                    || self.policies.iter().any(|p| match p {
                        Policy::IntentionWrite(pattern) => pattern.matches(dst),
                        _ => false,
                    })
            }
            Need::AgentRead => self
                .policies
                .iter()
                .any(|p| matches!(p, Policy::Operator | Policy::ReadOnly)),
            Need::ReadService(svc) => self.policies.iter().any(|p| match p {
                Policy::Operator | Policy::ReadOnly => true,
                Policy::ServiceWrite(pattern) => pattern.matches(svc),
                Policy::IntentionWrite(_) => false,
            }),
            Need::WriteService(svc) => {
                operator
                    || self.policies.iter().any(|p| match p {
                        Policy::ServiceWrite(pattern) => pattern.matches(svc),
                        _ => false,
                    })
            }
            Need::AclRead | Need::AclWrite | Need::WriteWorkloads => operator,
        };
        if ok {
            return Ok(());
        }
        let (permission, resource) = match need {
            Need::Read => ("intentions:read", "\"*/*\"".to_owned()),
            Need::ReadIntention(dst) => ("intentions:read", format!("{:?}", dst.to_string())),
            Need::WriteIntention(dst) => ("intentions:write", format!("{:?}", dst.to_string())),
            Need::AgentRead => ("agent:read", "\"agent\"".to_owned()),
            Need::ReadService(svc) => ("service:read", format!("{:?}", svc.to_string())),
            Need::WriteService(svc) => ("service:write", format!("{:?}", svc.to_string())),
            Need::AclRead => ("acl:read", "\"tokens\"".to_owned()),
            Need::AclWrite => ("acl:write", "\"tokens\"".to_owned()),
            Need::WriteWorkloads => ("workloads:write", "\"local\"".to_owned()),
        };
        Err(Error::PermissionDenied {
            accessor: self.accessor_id.clone(),
            permission,
            resource,
        })
    }

    /// Whether the token may read the intentions whose destination is `dst`, as Consul's
    /// `intentions = "read"` on the destination: operators and `read-only` read every one,
    /// `intention-write:<pattern>` those whose destination the pattern covers. Lists show a
    /// token only these.
    pub(crate) fn may_read(&self, dst: &ServiceName) -> bool {
        self.policies.iter().any(|p| match p {
            Policy::Operator | Policy::ReadOnly => true,
            Policy::IntentionWrite(pattern) => pattern.matches(dst),
            Policy::ServiceWrite(_) => false,
        })
    }

    /// The JSON Consul's list endpoint returns: the token without its `SecretID`.
    pub(crate) fn stub(&self) -> TokenView<'_> {
        TokenView {
            token: self,
            secret: false,
        }
    }

    /// The JSON Consul returns for one token, `SecretID` included.
    pub(crate) fn full(&self) -> TokenView<'_> {
        TokenView {
            token: self,
            secret: true,
        }
    }
}

/// Finds the token whose secret is `presented`, comparing against every token in constant
/// time per comparison and without stopping at the first match.
pub(crate) fn find_token<'a>(tokens: &'a [Token], presented: &str) -> Option<&'a Token> {
    let mut found = None;
    for t in tokens {
        if t.secret.ct_eq(presented) {
            found = Some(t);
        }
    }
    found
}

/// Serializes a token in Consul's shape.
pub(crate) struct TokenView<'a> {
    token: &'a Token,
    secret: bool,
}

#[derive(Serialize)]
struct PolicyLink {
    #[serde(rename = "ID", skip_serializing_if = "Option::is_none")]
    id: Option<&'static str>,
    #[serde(rename = "Name")]
    name: String,
}

impl Serialize for TokenView<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let t = self.token;
        let mut s = serializer.serialize_struct("ACLToken", 8)?;
        s.serialize_field("AccessorID", &t.accessor_id)?;
        if self.secret {
            s.serialize_field("SecretID", t.secret.expose())?;
        }
        s.serialize_field("Description", &t.description)?;
        let links: Vec<PolicyLink> = t
            .policies
            .iter()
            .map(|p| PolicyLink {
                id: p.id(),
                name: p.name(),
            })
            .collect();
        s.serialize_field("Policies", &links)?;
        s.serialize_field("Local", &false)?;
        s.serialize_field("CreateTime", &rfc3339(t.create_time))?;
        s.serialize_field("CreateIndex", &t.create_index)?;
        s.serialize_field("ModifyIndex", &t.modify_index)?;
        s.end()
    }
}

pub(crate) fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_nanos(t).to_string()
}

/// The body of `PUT /v1/acl/token`, as Consul's clients send it. Read-only fields that a
/// client may echo (`CreateTime`, `Hash`, indexes) are ignored; features this agent lacks
/// (roles, identities, other partitions) are refused by name.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TokenRequest {
    /// A chosen AccessorID (a UUID), or none for a fresh one.
    pub accessor_id: Option<String>,
    /// A chosen SecretID (a UUID), or none for a fresh one.
    pub secret_id: Option<String>,
    /// Free text, at most 512 bytes.
    pub description: String,
    /// At least one policy.
    pub policies: Vec<Policy>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTokenRequest {
    #[serde(rename = "AccessorID")]
    accessor_id: Option<String>,
    #[serde(rename = "SecretID")]
    secret_id: Option<String>,
    #[serde(rename = "Description")]
    description: Option<String>,
    #[serde(rename = "Policies")]
    policies: Option<Vec<RawPolicyLink>>,
    #[serde(rename = "Local")]
    local: Option<bool>,
    #[serde(rename = "Roles")]
    roles: Option<Vec<IgnoredAny>>,
    #[serde(rename = "ServiceIdentities")]
    service_identities: Option<Vec<IgnoredAny>>,
    #[serde(rename = "NodeIdentities")]
    node_identities: Option<Vec<IgnoredAny>>,
    #[serde(rename = "Namespace")]
    namespace: Option<String>,
    #[serde(rename = "Partition")]
    partition: Option<String>,
    #[serde(rename = "CreateTime")]
    _create_time: Option<IgnoredAny>,
    #[serde(rename = "Hash")]
    _hash: Option<IgnoredAny>,
    #[serde(rename = "CreateIndex")]
    _create_index: Option<IgnoredAny>,
    #[serde(rename = "ModifyIndex")]
    _modify_index: Option<IgnoredAny>,
    #[serde(rename = "Legacy")]
    _legacy: Option<IgnoredAny>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicyLink {
    #[serde(rename = "ID")]
    id: Option<String>,
    #[serde(rename = "Name")]
    name: Option<String>,
}

impl TokenRequest {
    /// Reads Consul's token JSON.
    ///
    /// # Errors
    /// [`Error::BadRequest`] naming the field (`Policies[1].Name`) when the JSON is not a
    /// token request, has unknown fields or names an unknown policy.
    pub fn from_json(input: &str) -> Result<TokenRequest, Error> {
        let raw: RawTokenRequest = decode_json(input)?;
        let none_or_empty = |v: &Option<Vec<IgnoredAny>>| v.as_ref().is_none_or(|v| v.is_empty());
        for (field, ok) in [
            ("Roles", none_or_empty(&raw.roles)),
            ("ServiceIdentities", none_or_empty(&raw.service_identities)),
            ("NodeIdentities", none_or_empty(&raw.node_identities)),
            ("Local", raw.local != Some(true)),
        ] {
            if !ok {
                return Err(Error::bad(
                    field,
                    format!("{field}: not supported by this agent; use Policies"),
                ));
            }
        }
        for (field, v) in [("Namespace", &raw.namespace), ("Partition", &raw.partition)] {
            if let Some(v) = v.as_deref().filter(|v| !v.is_empty() && *v != "default") {
                return Err(Error::bad(
                    field,
                    format!("{field}: tokens live in \"default\" only, not {v:?}"),
                ));
            }
        }
        let description = raw.description.unwrap_or_default();
        if description.len() > MAX_DESCRIPTION {
            return Err(Error::bad(
                "Description",
                format!("Description exceeds maximum length {MAX_DESCRIPTION}"),
            ));
        }
        let links = raw.policies.unwrap_or_default();
        if links.is_empty() {
            return Err(Error::bad(
                "Policies",
                "Policies: at least one policy is required (operator, read-only, \
                 intention-write:<destination pattern>)",
            ));
        }
        let mut policies = Vec::new();
        for (i, link) in links.into_iter().enumerate() {
            let by_id = match link.id.as_deref().filter(|s| !s.is_empty()) {
                Some(id) => Some(Policy::from_id(id).ok_or_else(|| {
                    Error::bad(
                        format!("Policies[{i}].ID"),
                        format!(
                            "Policies[{i}].ID: no policy has ID {id:?} (built-in: \
                             {OPERATOR_POLICY_ID} operator, {READ_ONLY_POLICY_ID} read-only)"
                        ),
                    )
                })?),
                None => None,
            };
            let by_name = match link.name.as_deref().filter(|s| !s.is_empty()) {
                Some(name) => Some(Policy::parse(name).map_err(|e| {
                    Error::bad(
                        format!("Policies[{i}].Name"),
                        format!("Policies[{i}].Name: {e}"),
                    )
                })?),
                None => None,
            };
            let policy = match (by_id, by_name) {
                (Some(a), Some(b)) if a != b => {
                    return Err(Error::bad(
                        format!("Policies[{i}]"),
                        format!("Policies[{i}]: ID and Name name different policies"),
                    ))
                }
                (Some(p), _) | (None, Some(p)) => p,
                (None, None) => {
                    return Err(Error::bad(
                        format!("Policies[{i}]"),
                        format!("Policies[{i}]: ID or Name must be set"),
                    ))
                }
            };
            if !policies.contains(&policy) {
                policies.push(policy);
            }
        }
        let uuid_field = |field: &str, v: Option<String>| -> Result<Option<String>, Error> {
            match v.filter(|v| !v.is_empty()) {
                None => Ok(None),
                Some(v) => match uuid::Uuid::parse_str(&v) {
                    Ok(u) if u.hyphenated().to_string() == v.to_ascii_lowercase() => Ok(Some(v)),
                    _ => Err(Error::bad(field, format!("{field}: invalid UUID {v:?}"))),
                },
            }
        };
        Ok(TokenRequest {
            accessor_id: uuid_field("AccessorID", raw.accessor_id)?,
            secret_id: uuid_field("SecretID", raw.secret_id)?,
            description,
            policies,
        })
    }

    /// A request for a token with these policies.
    pub fn new(description: impl Into<String>, policies: Vec<Policy>) -> Self {
        TokenRequest {
            accessor_id: None,
            secret_id: None,
            description: description.into(),
            policies,
        }
    }

    /// The JSON body Consul's endpoint takes.
    pub fn to_json(&self) -> String {
        let mut m = BTreeMap::new();
        m.insert("Description", serde_json::json!(self.description));
        let links: Vec<serde_json::Value> = self
            .policies
            .iter()
            .map(|p| serde_json::json!({ "Name": p.name() }))
            .collect();
        m.insert("Policies", serde_json::Value::Array(links));
        if let Some(a) = &self.accessor_id {
            m.insert("AccessorID", serde_json::json!(a));
        }
        if let Some(s) = &self.secret_id {
            m.insert("SecretID", serde_json::json!(s));
        }
        serde_json::to_string(&m).unwrap_or_default()
    }
}

/// Strict JSON decoding whose errors name the field.
pub(crate) fn decode_json<T: serde::de::DeserializeOwned>(input: &str) -> Result<T, Error> {
    let mut de = serde_json::Deserializer::from_str(input);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let message = e.inner().to_string();
        if path.is_empty() || path == "." {
            Error::BadRequest {
                field: None,
                message: format!("Request decode failed: {message}"),
            }
        } else {
            Error::bad(
                path.clone(),
                format!("Request decode failed: {path}: {message}"),
            )
        }
    })?;
    de.end().map_err(|e| Error::BadRequest {
        field: None,
        message: format!("Request decode failed: {e}"),
    })?;
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sn(s: &str) -> ServiceName {
        ServiceName::parse(s).unwrap()
    }

    fn token(policies: Vec<Policy>) -> Token {
        Token {
            accessor_id: "a".into(),
            secret: Secret::new("s".into()),
            description: String::new(),
            policies,
            create_time: SystemTime::UNIX_EPOCH,
            create_index: 1,
            modify_index: 1,
        }
    }

    #[test]
    fn policy_names_round_trip() {
        for (input, canonical) in [
            ("operator", "operator"),
            ("global-management", "operator"),
            ("read-only", "read-only"),
            ("builtin/global-read-only", "read-only"),
            ("intention-write:api", "intention-write:default/api"),
            ("intention-write:ns/*", "intention-write:ns/*"),
            ("intention-write:*/*", "intention-write:*/*"),
        ] {
            let p = Policy::parse(input).unwrap();
            assert_eq!(p.name(), canonical);
            assert_eq!(Policy::parse(&p.name()).unwrap(), p);
        }
        for bad in ["admin", "intention-write:", "intention-write:*/web", ""] {
            assert!(Policy::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn intention_write_covers_its_pattern_only() {
        let t = token(vec![Policy::parse("intention-write:ns/*").unwrap()]);
        assert!(t.check(Need::Read).is_ok());
        assert!(t.check(Need::WriteIntention(&sn("ns/api"))).is_ok());
        assert!(t.check(Need::WriteIntention(&sn("ns/*"))).is_ok());
        let err = t.check(Need::WriteIntention(&sn("api"))).unwrap_err();
        assert_eq!(err.status(), 403);
        assert_eq!(
            err.to_string(),
            "Permission denied: token with AccessorID 'a' lacks permission 'intentions:write' on \"default/api\""
        );
        assert!(t.check(Need::WriteIntention(&sn("*/*"))).is_err());
        assert!(t.check(Need::AclWrite).is_err());
        let ro = token(vec![Policy::ReadOnly]);
        assert!(ro.check(Need::Read).is_ok());
        assert!(ro.check(Need::WriteIntention(&sn("api"))).is_err());
        assert!(ro.check(Need::AclRead).is_err());
        let op = token(vec![Policy::Operator]);
        assert!(op.check(Need::WriteIntention(&sn("*/*"))).is_ok());
        assert!(op.check(Need::AclWrite).is_ok());
    }

    #[test]
    fn secrets_compare_exactly_and_never_print() {
        let tokens = vec![token(vec![Policy::ReadOnly])];
        assert!(find_token(&tokens, "s").is_some());
        assert!(find_token(&tokens, "S").is_none());
        assert!(find_token(&tokens, "s ").is_none());
        assert!(find_token(&tokens, "").is_none());
        assert!(!format!("{:?}", tokens[0]).contains("\"s\""));
    }

    #[test]
    fn token_request_errors_name_the_field() {
        let cases = [
            (r#"{"Policies": []}"#, "Policies"),
            (r#"{"Description": "x"}"#, "Policies"),
            (r#"{"Policies": [{"Name": "root"}]}"#, "Policies[0].Name"),
            (
                r#"{"Policies": [{"Name": "read-only"}, {"ID": "nope"}]}"#,
                "Policies[1].ID",
            ),
            (r#"{"Policies": [{}]}"#, "Policies[0]"),
            (
                r#"{"Policies": [{"ID": "00000000-0000-0000-0000-000000000001", "Name": "read-only"}]}"#,
                "Policies[0]",
            ),
            (
                r#"{"Policies": [{"Name": "operator"}], "Rules": "x"}"#,
                "Rules",
            ),
            (
                r#"{"Policies": [{"Name": "operator"}], "SecretID": "abc"}"#,
                "SecretID",
            ),
            (
                r#"{"Policies": [{"Name": "operator"}], "Roles": [{"Name": "r"}]}"#,
                "Roles",
            ),
            (r#"{"Policies": [{"Name": 3}]}"#, "Policies[0].Name"),
        ];
        for (input, field) in cases {
            let err = TokenRequest::from_json(input).unwrap_err();
            assert_eq!(err.status(), 400, "{input}");
            assert_eq!(err.field(), Some(field), "{input}: {err}");
            assert!(err.to_string().contains(field), "{input}: {err}");
        }
        let ok = TokenRequest::from_json(
            r#"{"Description": "ci", "Policies": [{"Name": "intention-write:api"}, {"ID": "00000000-0000-0000-0000-000000000002"}], "Local": false, "CreateTime": "0001-01-01T00:00:00Z", "CreateIndex": 0}"#,
        )
        .unwrap();
        assert_eq!(ok.description, "ci");
        assert_eq!(
            ok.policies,
            vec![Policy::IntentionWrite(sn("api")), Policy::ReadOnly]
        );
        assert_eq!(TokenRequest::from_json(&ok.to_json()).unwrap(), ok);
    }
}
