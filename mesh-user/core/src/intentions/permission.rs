//! L7 intentions: an intention's `Permissions`, as Consul writes them, and their evaluation
//! against one HTTP request.
//!
//! An intention to a destination whose protocol is `http` may carry an ordered list of
//! permissions instead of an `Action`. Each permission has its own `Action` and an `HTTP` match:
//! at most one of `PathExact`, `PathPrefix`, `PathRegex` (matched against the path without the
//! query string, as Envoy's `url_path` matcher), `Methods` (any of them), and `Header[]` (all of
//! them; each by `Name` with exactly one of `Present`, `Exact`, `Prefix`, `Suffix`, `Regex`,
//! optionally `Invert`ed). All parts given must match. Regular expressions are RE2-like (Envoy's
//! `safe_regex`) and must match the whole value.
//!
//! Validation follows Consul's `ServiceIntentionsConfigEntry.validate`
//! (`agent/structs/config_entry_intentions.go`), in its order and with its messages; a regular
//! expression that does not compile is refused at write time too (Consul leaves that to Envoy,
//! which then rejects the listener).

use std::fmt;

use regex_automata::meta::Regex;
use serde::ser::SerializeStruct;
use serde::{Deserialize, Serialize, Serializer};

use super::{Action, Error, Result};

/// The HTTP methods Consul accepts in `Methods` (its `isValidHTTPMethod`).
pub const HTTP_METHODS: [&str; 9] = [
    "GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "CONNECT", "OPTIONS", "TRACE",
];

/// The longest regular expression accepted, in bytes (a bound on compile time and memory).
const MAX_REGEX_LEN: usize = 1024;

/// One element of an intention's `Permissions`: an action for the requests its `HTTP` match
/// selects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Permission {
    /// What to do with a matching request.
    pub action: Action,
    /// Which requests match.
    pub http: HttpMatch,
}

/// The `HTTP` part of a permission. Every part given must match; at least one is given.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HttpMatch {
    /// `PathExact`, `PathPrefix` or `PathRegex`, when given.
    pub path: Option<PathMatch>,
    /// `Methods`, upper case; the request's method must be one of them (when not empty).
    pub methods: Vec<String>,
    /// `Header`: every one must match.
    pub headers: Vec<HeaderMatch>,
}

/// How a permission matches the request path (without its query string).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PathMatch {
    /// `PathExact`: the path equals this.
    Exact(String),
    /// `PathPrefix`: the path starts with this.
    Prefix(String),
    /// `PathRegex`: the whole path matches this expression.
    Regex(Pattern),
}

/// One element of `Header`: a condition on a request header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeaderMatch {
    /// The header's name (compared case-insensitively).
    pub name: String,
    /// The condition on its value.
    pub rule: HeaderRule,
    /// `Invert`: the header matches when the condition does not hold.
    pub invert: bool,
}

/// The condition of a [`HeaderMatch`]. A header given several times is matched on its values
/// joined with `,` (as Envoy does).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HeaderRule {
    /// `Present`: the header is there, whatever its value.
    Present,
    /// `Exact`: the value equals this.
    Exact(String),
    /// `Prefix`: the value starts with this.
    Prefix(String),
    /// `Suffix`: the value ends with this.
    Suffix(String),
    /// `Regex`: the whole value matches this expression.
    Regex(Pattern),
}

/// A compiled regular expression that matches whole values, compared by its source text.
#[derive(Clone)]
pub struct Pattern {
    source: String,
    regex: Regex,
}

impl Pattern {
    /// Compiles `source` to match whole values.
    ///
    /// # Errors
    ///
    /// The compiler's message when `source` is not a valid expression or is too long.
    pub fn new(source: &str) -> std::result::Result<Self, String> {
        if source.len() > MAX_REGEX_LEN {
            return Err(format!("longer than {MAX_REGEX_LEN} bytes"));
        }
        let regex = Regex::new(&format!("^(?:{source})$")).map_err(|e| e.to_string())?;
        Ok(Pattern {
            source: source.to_owned(),
            regex,
        })
    }

    /// The expression as written.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// Whether the whole of `value` matches.
    pub fn is_match(&self, value: &str) -> bool {
        self.regex.is_match(value)
    }
}

impl PartialEq for Pattern {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source
    }
}

impl Eq for Pattern {}

impl fmt::Debug for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Pattern").field(&self.source).finish()
    }
}

/// What a permission looks at in one HTTP request.
#[derive(Clone, Copy, Debug)]
pub struct HttpRequest<'a> {
    /// The method, as sent (`GET`).
    pub method: &'a str,
    /// The path, without the query string (`/api/v1`).
    pub path: &'a str,
    /// Every header as (name, value), in order; names in any case.
    pub headers: &'a [(&'a str, &'a str)],
}

impl HttpRequest<'_> {
    /// The values of header `name` joined with `,`, or `None` when absent.
    fn header(&self, name: &str) -> Option<String> {
        let mut values = self
            .headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| *v);
        let first = values.next()?;
        let mut joined = first.to_owned();
        for v in values {
            joined.push(',');
            joined.push_str(v);
        }
        Some(joined)
    }
}

/// The path a request's permissions are matched against, and the one forwarded to the app:
/// `path` normalized as Consul's Envoy does by default since Consul 1.20.2 (`normalize_path`,
/// the fix for CVE-2024-10005; RFC 3986): percent-encoded unreserved characters are decoded
/// (`/%61dmin` is `/admin`), other percent-encodings are upper-cased, a backslash is a slash,
/// and `.` and `..` segments are removed (`/x/../admin` is `/admin`). Repeated slashes are
/// merged (`//admin` is `/admin`): that is Consul's `MergeSlashes`, off by default in Consul
/// but recommended there for path-based intentions; this mesh has no `mesh` config entry to
/// turn it on, so it is always on. A path that does not start with `/` (the `*` of
/// `OPTIONS *`) is returned as it is.
///
/// `None` for a malformed percent-encoding (`%G1`, a trailing `%`): Envoy answers those 400.
pub fn normalize_path(path: &str) -> Option<String> {
    if !path.starts_with('/') && !path.starts_with('\\') {
        return Some(path.to_owned());
    }
    let bytes = path.as_bytes();
    let mut decoded = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = |b: u8| char::from(b).to_digit(16);
                let (hi, lo) = (hex(*bytes.get(i + 1)?)?, hex(*bytes.get(i + 2)?)?);
                let c = char::from(u8::try_from(hi * 16 + lo).ok()?);
                if c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_' | '~') {
                    decoded.push(c);
                } else {
                    decoded.push_str(&format!("%{:02X}", hi * 16 + lo));
                }
                i += 3;
            }
            b'\\' => {
                decoded.push('/');
                i += 1;
            }
            _ => {
                // `path` is a str: copy the whole character.
                let ch = path[i..].chars().next()?;
                decoded.push(ch);
                i += ch.len_utf8();
            }
        }
    }
    let segments: Vec<&str> = decoded[1..].split('/').collect();
    let last = segments.len() - 1;
    let mut out: Vec<&str> = Vec::with_capacity(segments.len());
    for (n, seg) in segments.iter().enumerate() {
        match *seg {
            "." => {}
            ".." => {
                out.pop();
            }
            // Repeated slashes are merged; a trailing one is kept below.
            "" if n != last => continue,
            s => {
                out.push(s);
                continue;
            }
        }
        // A path ending in `.` or `..` names a directory: keep its trailing slash.
        if n == last {
            out.push("");
        }
    }
    Some(format!("/{}", out.join("/")))
}

impl Permission {
    /// Whether `request` matches this permission's `HTTP` part.
    pub fn matches(&self, request: &HttpRequest<'_>) -> bool {
        self.http.matches(request)
    }
}

impl HttpMatch {
    /// Whether every part given matches `request`.
    pub fn matches(&self, request: &HttpRequest<'_>) -> bool {
        let path_ok = match &self.path {
            None => true,
            Some(PathMatch::Exact(p)) => request.path == p,
            Some(PathMatch::Prefix(p)) => request.path.starts_with(p.as_str()),
            Some(PathMatch::Regex(re)) => re.is_match(request.path),
        };
        path_ok
            && (self.methods.is_empty() || self.methods.iter().any(|m| m == request.method))
            && self.headers.iter().all(|h| h.matches(request))
    }
}

impl HeaderMatch {
    /// Whether `request` satisfies this condition (after `Invert`).
    pub fn matches(&self, request: &HttpRequest<'_>) -> bool {
        let value = request.header(&self.name);
        let hit = match (&self.rule, value.as_deref()) {
            (_, None) => false,
            (HeaderRule::Present, Some(_)) => true,
            (HeaderRule::Exact(x), Some(v)) => v == x,
            (HeaderRule::Prefix(x), Some(v)) => v.starts_with(x.as_str()),
            (HeaderRule::Suffix(x), Some(v)) => v.ends_with(x.as_str()),
            (HeaderRule::Regex(re), Some(v)) => re.is_match(v),
        };
        hit != self.invert
    }
}

/// The first permission in `permissions` that `request` matches, with its index.
pub fn first_match<'p>(
    permissions: &'p [Permission],
    request: &HttpRequest<'_>,
) -> Option<(usize, &'p Permission)> {
    permissions
        .iter()
        .enumerate()
        .find(|(_, p)| p.matches(request))
}

/// A permission as read from JSON or HCL, before validation.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawPermission {
    #[serde(rename = "Action", alias = "action")]
    action: Option<String>,
    #[serde(rename = "HTTP", alias = "http")]
    http: Option<RawHttp>,
    #[serde(rename = "JWT", alias = "jwt")]
    jwt: Option<serde::de::IgnoredAny>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHttp {
    #[serde(rename = "PathExact", alias = "path_exact")]
    path_exact: Option<String>,
    #[serde(rename = "PathPrefix", alias = "path_prefix")]
    path_prefix: Option<String>,
    #[serde(rename = "PathRegex", alias = "path_regex")]
    path_regex: Option<String>,
    #[serde(rename = "Header", alias = "header")]
    header: Option<Vec<RawHeader>>,
    #[serde(rename = "Methods", alias = "methods")]
    methods: Option<Vec<String>>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHeader {
    #[serde(rename = "Name", alias = "name")]
    name: Option<String>,
    #[serde(rename = "Present", alias = "present")]
    present: Option<bool>,
    #[serde(rename = "Exact", alias = "exact")]
    exact: Option<String>,
    #[serde(rename = "Prefix", alias = "prefix")]
    prefix: Option<String>,
    #[serde(rename = "Suffix", alias = "suffix")]
    suffix: Option<String>,
    #[serde(rename = "Regex", alias = "regex")]
    regex: Option<String>,
    #[serde(rename = "Invert", alias = "invert")]
    invert: Option<bool>,
}

fn given(s: &Option<String>) -> Option<&str> {
    s.as_deref().filter(|s| !s.is_empty())
}

/// Validates and converts `Permissions`, in Consul's order of checks. `prefix` is the path of
/// the list's owner with a trailing dot (`Sources[0].`) or empty for a single intention; error
/// fields read `{prefix}Permissions[j].HTTP.PathExact`.
pub(crate) fn parse_permissions(raw: Vec<RawPermission>, prefix: &str) -> Result<Vec<Permission>> {
    raw.into_iter()
        .enumerate()
        .map(|(j, p)| parse_permission(p, &format!("{prefix}Permissions[{j}]")))
        .collect()
}

fn parse_permission(raw: RawPermission, at: &str) -> Result<Permission> {
    let invalid = |field: String, message: String| Error::invalid(field, message);
    let action = match raw.action.as_deref() {
        Some("allow") => Action::Allow,
        Some("deny") => Action::Deny,
        _ => {
            return Err(invalid(
                format!("{at}.Action"),
                format!("{at}.Action must be set to 'allow' or 'deny'"),
            ))
        }
    };
    let base = at;
    let at = format!("{base}.HTTP");
    let Some(http) = raw.http else {
        return Err(invalid(at.clone(), format!("{at} is required")));
    };
    if raw.jwt.is_some() {
        return Err(invalid(
            format!("{base}.JWT"),
            format!("{base}.JWT: JWT requirements are not supported by this mesh"),
        ));
    }
    let mut path = None;
    let mut path_parts = 0;
    if let Some(p) = given(&http.path_exact) {
        path_parts += 1;
        if !p.starts_with('/') {
            return Err(invalid(
                format!("{at}.PathExact"),
                format!("{at}.PathExact doesn't start with '/': {p:?}"),
            ));
        }
        path = Some(PathMatch::Exact(p.to_owned()));
    }
    if let Some(p) = given(&http.path_prefix) {
        path_parts += 1;
        if !p.starts_with('/') {
            return Err(invalid(
                format!("{at}.PathPrefix"),
                format!("{at}.PathPrefix doesn't start with '/': {p:?}"),
            ));
        }
        path = Some(PathMatch::Prefix(p.to_owned()));
    }
    if let Some(p) = given(&http.path_regex) {
        path_parts += 1;
        let re = Pattern::new(p).map_err(|e| {
            invalid(
                format!("{at}.PathRegex"),
                format!("{at}.PathRegex is not a valid regular expression: {e}"),
            )
        })?;
        path = Some(PathMatch::Regex(re));
    }
    if path_parts > 1 {
        return Err(invalid(
            at.clone(),
            format!("{at} should only contain at most one of PathExact, PathPrefix, or PathRegex"),
        ));
    }
    let mut parts = path_parts;
    let mut headers = Vec::new();
    for (k, h) in http.header.unwrap_or_default().into_iter().enumerate() {
        let here = format!("{at}.Header[{k}]");
        let name = h.name.clone().unwrap_or_default();
        if name.is_empty() {
            return Err(invalid(
                here.clone(),
                format!("{here} missing required Name field"),
            ));
        }
        let mut rules = Vec::new();
        if h.present == Some(true) {
            rules.push(HeaderRule::Present);
        }
        if let Some(v) = given(&h.exact) {
            rules.push(HeaderRule::Exact(v.to_owned()));
        }
        if let Some(v) = given(&h.regex) {
            let re = Pattern::new(v).map_err(|e| {
                invalid(
                    format!("{here}.Regex"),
                    format!("{here}.Regex is not a valid regular expression: {e}"),
                )
            })?;
            rules.push(HeaderRule::Regex(re));
        }
        if let Some(v) = given(&h.prefix) {
            rules.push(HeaderRule::Prefix(v.to_owned()));
        }
        if let Some(v) = given(&h.suffix) {
            rules.push(HeaderRule::Suffix(v.to_owned()));
        }
        if rules.len() != 1 {
            return Err(invalid(
                here.clone(),
                format!(
                    "{here} should only contain one of Present, Exact, Prefix, Suffix, or Regex"
                ),
            ));
        }
        headers.push(HeaderMatch {
            name,
            rule: rules.remove(0),
            invert: h.invert.unwrap_or(false),
        });
        parts += 1;
    }
    let methods: Vec<String> = http
        .methods
        .unwrap_or_default()
        .into_iter()
        .map(|m| m.to_uppercase())
        .collect();
    if !methods.is_empty() {
        for (i, m) in methods.iter().enumerate() {
            if !HTTP_METHODS.contains(&m.as_str()) {
                return Err(invalid(
                    format!("{at}.Methods"),
                    format!("{at}.Methods contains an invalid method {m:?}"),
                ));
            }
            if methods[..i].contains(m) {
                return Err(invalid(
                    format!("{at}.Methods"),
                    format!("{at}.Methods contains {m:?} more than once"),
                ));
            }
        }
        parts += 1;
    }
    if parts == 0 {
        return Err(invalid(at.clone(), format!("{at} should not be empty")));
    }
    Ok(Permission {
        action,
        http: HttpMatch {
            path,
            methods,
            headers,
        },
    })
}

impl Serialize for Permission {
    /// Consul's shape: `{"Action": "allow", "HTTP": {...}}`.
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        let mut s = serializer.serialize_struct("IntentionPermission", 2)?;
        s.serialize_field("Action", &self.action)?;
        s.serialize_field("HTTP", &self.http)?;
        s.end()
    }
}

impl Serialize for HttpMatch {
    /// Consul's field names, empty parts omitted.
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        let mut s = serializer.serialize_struct("IntentionHTTPPermission", 3)?;
        match &self.path {
            Some(PathMatch::Exact(p)) => s.serialize_field("PathExact", p)?,
            Some(PathMatch::Prefix(p)) => s.serialize_field("PathPrefix", p)?,
            Some(PathMatch::Regex(re)) => s.serialize_field("PathRegex", re.as_str())?,
            None => {}
        }
        if !self.headers.is_empty() {
            s.serialize_field("Header", &self.headers)?;
        }
        if !self.methods.is_empty() {
            s.serialize_field("Methods", &self.methods)?;
        }
        s.end()
    }
}

impl Serialize for HeaderMatch {
    /// Consul's `IntentionHTTPHeaderPermission`: `Name`, the one condition, `Invert` when set.
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        let mut s = serializer.serialize_struct("IntentionHTTPHeaderPermission", 3)?;
        s.serialize_field("Name", &self.name)?;
        match &self.rule {
            HeaderRule::Present => s.serialize_field("Present", &true)?,
            HeaderRule::Exact(v) => s.serialize_field("Exact", v)?,
            HeaderRule::Prefix(v) => s.serialize_field("Prefix", v)?,
            HeaderRule::Suffix(v) => s.serialize_field("Suffix", v)?,
            HeaderRule::Regex(re) => s.serialize_field("Regex", re.as_str())?,
        }
        if self.invert {
            s.serialize_field("Invert", &true)?;
        }
        s.end()
    }
}

/// Reads a list of permissions from Consul's JSON (as [`Permission`] serializes), validated;
/// for stored state and tests.
///
/// # Errors
///
/// As the API's validation: [`Error::Malformed`] for the wrong shape, [`Error::Invalid`] naming
/// the field (`Permissions[0].HTTP.PathExact`).
pub fn permissions_from_json(input: &str) -> Result<Vec<Permission>> {
    let raw: Vec<RawPermission> = super::decode::json(input)?;
    parse_permissions(raw, "")
}

#[cfg(test)]
mod tests {

    /// The path tricks that reached a denied `/admin` before normalization, and what Consul's
    /// default Envoy makes of each.
    #[test]
    fn paths_are_normalized_as_consuls_envoy_does() {
        for (raw, want) in [
            ("/admin", Some("/admin")),
            ("/%61dmin", Some("/admin")),
            ("/%2e%2E/admin", Some("/admin")),
            ("/./admin", Some("/admin")),
            ("/x/../admin", Some("/admin")),
            ("/\\admin", Some("/admin")),
            ("\\admin", Some("/admin")),
            ("//admin", Some("/admin")),
            ("/a//b///", Some("/a/b/")),
            ("/admin/..", Some("/")),
            ("/a/b/.", Some("/a/b/")),
            ("/../../etc", Some("/etc")),
            ("/a%2fb", Some("/a%2Fb")),
            ("/caf%C3%A9/é", Some("/caf%C3%A9/é")),
            ("*", Some("*")),
            ("/%G1", None),
            ("/a%", None),
            ("/a%4", None),
        ] {
            assert_eq!(normalize_path(raw).as_deref(), want, "{raw}");
        }
    }

    use super::*;

    fn parse(json: &str) -> Result<Vec<Permission>> {
        permissions_from_json(json)
    }

    fn req<'a>(
        method: &'a str,
        path: &'a str,
        headers: &'a [(&'a str, &'a str)],
    ) -> HttpRequest<'a> {
        HttpRequest {
            method,
            path,
            headers,
        }
    }

    #[test]
    fn refuses_what_consul_refuses_naming_the_field() {
        let cases = [
            (
                r#"[{"HTTP":{"PathExact":"/"}}]"#,
                "Permissions[0].Action",
                "must be set to 'allow' or 'deny'",
            ),
            (
                r#"[{"Action":"permit","HTTP":{"PathExact":"/"}}]"#,
                "Permissions[0].Action",
                "must be set",
            ),
            (
                r#"[{"Action":"allow"}]"#,
                "Permissions[0].HTTP",
                "Permissions[0].HTTP is required",
            ),
            (
                r#"[{"Action":"allow","HTTP":{}}]"#,
                "Permissions[0].HTTP",
                "should not be empty",
            ),
            (
                r#"[{"Action":"allow","HTTP":{"PathExact":"x"}}]"#,
                "Permissions[0].HTTP.PathExact",
                "doesn't start with '/': \"x\"",
            ),
            (
                r#"[{"Action":"allow","HTTP":{"PathPrefix":"x"}}]"#,
                "Permissions[0].HTTP.PathPrefix",
                "doesn't start with '/'",
            ),
            (
                r#"[{"Action":"allow","HTTP":{"PathExact":"/a","PathPrefix":"/b"}}]"#,
                "Permissions[0].HTTP",
                "at most one of PathExact, PathPrefix, or PathRegex",
            ),
            (
                r#"[{"Action":"allow","HTTP":{"PathRegex":"(/a"}}]"#,
                "Permissions[0].HTTP.PathRegex",
                "not a valid regular expression",
            ),
            (
                r#"[{"Action":"allow","HTTP":{"Methods":["GET","FETCH"]}}]"#,
                "Permissions[0].HTTP.Methods",
                "invalid method \"FETCH\"",
            ),
            (
                r#"[{"Action":"allow","HTTP":{"Methods":["get","GET"]}}]"#,
                "Permissions[0].HTTP.Methods",
                "\"GET\" more than once",
            ),
            (
                r#"[{"Action":"allow","HTTP":{"Header":[{"Exact":"x"}]}}]"#,
                "Permissions[0].HTTP.Header[0]",
                "missing required Name field",
            ),
            (
                r#"[{"Action":"allow","HTTP":{"Header":[{"Name":"x"}]}}]"#,
                "Permissions[0].HTTP.Header[0]",
                "should only contain one of Present",
            ),
            (
                r#"[{"Action":"allow","HTTP":{"Header":[{"Name":"x","Exact":"a","Prefix":"b"}]}}]"#,
                "Permissions[0].HTTP.Header[0]",
                "should only contain one of",
            ),
            (
                r#"[{"Action":"allow","HTTP":{"Header":[{"Name":"x","Regex":"["}]}}]"#,
                "Permissions[0].HTTP.Header[0].Regex",
                "not a valid regular expression",
            ),
            (
                r#"[{"Action":"allow","HTTP":{"PathExact":"/"}},{"Action":"deny","HTTP":{"Bogus":1}}]"#,
                "[1].HTTP.Bogus",
                "unknown field",
            ),
            (
                r#"[{"Action":"allow","HTTP":{"PathExact":"/"},"JWT":{}}]"#,
                "Permissions[0].JWT",
                "not supported",
            ),
        ];
        for (json, field, msg) in cases {
            let err = parse(json).unwrap_err();
            assert_eq!(err.field(), Some(field), "{json}: {err}");
            assert!(err.to_string().contains(msg), "{json}: {err} !~ {msg}");
        }
    }

    #[test]
    fn round_trips_in_consuls_shape() {
        let json = r#"[{"Action":"deny","HTTP":{"PathPrefix":"/admin"}},{"Action":"allow","HTTP":{"PathRegex":"/v[0-9]+/.*","Header":[{"Name":"X-Env","Exact":"prod"},{"Name":"X-Debug","Present":true,"Invert":true}],"Methods":["GET","POST"]}}]"#;
        let perms = parse(json).unwrap();
        assert_eq!(serde_json::to_string(&perms).unwrap(), json);
        let methods = parse(r#"[{"Action":"allow","HTTP":{"Methods":["get"]}}]"#).unwrap();
        assert_eq!(methods[0].http.methods, ["GET"]);
    }

    #[test]
    fn every_given_part_must_match() {
        let perms = parse(
            r#"[{"Action":"allow","HTTP":{"PathPrefix":"/api","Methods":["GET"],
                 "Header":[{"Name":"x-env","Suffix":"-prod"}]}}]"#,
        )
        .unwrap();
        let p = &perms[0];
        assert!(p.matches(&req("GET", "/api/x", &[("X-Env", "eu-prod")])));
        assert!(!p.matches(&req("POST", "/api/x", &[("X-Env", "eu-prod")])));
        assert!(!p.matches(&req("GET", "/ap", &[("X-Env", "eu-prod")])));
        assert!(!p.matches(&req("GET", "/api", &[("X-Env", "eu-dev")])));
        assert!(!p.matches(&req("GET", "/api", &[])));
    }

    #[test]
    fn path_and_header_matchers() {
        let one = |json: &str| {
            parse(&format!(r#"[{{"Action":"allow","HTTP":{json}}}]"#))
                .unwrap()
                .remove(0)
        };
        let exact = one(r#"{"PathExact":"/a"}"#);
        assert!(exact.matches(&req("GET", "/a", &[])));
        assert!(!exact.matches(&req("GET", "/a/", &[])));
        // A regex matches the whole path, never a part of it.
        let re = one(r#"{"PathRegex":"/v[0-9]+"}"#);
        assert!(re.matches(&req("GET", "/v12", &[])));
        assert!(!re.matches(&req("GET", "/v12/x", &[])));
        assert!(!re.matches(&req("GET", "/x/v1", &[])));
        let present = one(r#"{"Header":[{"Name":"X-A","Present":true}]}"#);
        assert!(present.matches(&req("GET", "/", &[("x-a", "")])));
        assert!(!present.matches(&req("GET", "/", &[])));
        let inverted = one(r#"{"Header":[{"Name":"X-A","Exact":"1","Invert":true}]}"#);
        assert!(inverted.matches(&req("GET", "/", &[("x-a", "2")])));
        assert!(inverted.matches(&req("GET", "/", &[])));
        assert!(!inverted.matches(&req("GET", "/", &[("X-A", "1")])));
        let prefix = one(r#"{"Header":[{"Name":"X-A","Prefix":"ab"}]}"#);
        assert!(prefix.matches(&req("GET", "/", &[("X-A", "abc")])));
        assert!(!prefix.matches(&req("GET", "/", &[("X-A", "cab")])));
        // Repeated headers are matched joined with ','.
        let joined = one(r#"{"Header":[{"Name":"X-A","Regex":"1,2"}]}"#);
        assert!(joined.matches(&req("GET", "/", &[("X-A", "1"), ("x-a", "2")])));
    }

    #[test]
    fn first_match_is_in_order() {
        let perms = parse(
            r#"[{"Action":"deny","HTTP":{"PathExact":"/v2/admin"}},
                {"Action":"allow","HTTP":{"PathPrefix":"/v2"}}]"#,
        )
        .unwrap();
        let (i, p) = first_match(&perms, &req("GET", "/v2/admin", &[])).unwrap();
        assert_eq!((i, p.action), (0, Action::Deny));
        let (i, p) = first_match(&perms, &req("GET", "/v2/x", &[])).unwrap();
        assert_eq!((i, p.action), (1, Action::Allow));
        assert!(first_match(&perms, &req("GET", "/v3", &[])).is_none());
    }
}
