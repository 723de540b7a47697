//! The `consul.hashicorp.com/connect-service-upstreams` annotation, parsed the way consul-k8s's
//! endpoints controller does (`processUpstreams` and the functions it calls).
//!
//! Entries are separated by commas; each entry is trimmed. An entry is one of
//!
//! * `prepared_query:<query>:<port>`
//! * labelled: `<svc>.svc[.<ns>.ns][.<x>.(peer|ap|dc)]:<port>[:<extra>]`; without Consul
//!   namespaces/partitions only `<svc>.svc` and `<svc>.svc.<x>.(peer|dc)` are accepted. `<extra>`
//!   is a destination port, or an option string (`destination_port=…&local_bind_address=…`).
//! * unlabelled: `<svc>[.<ns>[.<partition>]]:<port>[:<dc>|:<options>|:<dc>?<options>]`; the
//!   `.<ns>.<partition>` suffix is read only with Consul namespaces or partitions enabled.
//!
//! `<port>` is a number (Go `strconv.ParseInt` base-0 syntax: `9091`, `0x2383`) or the name of a
//! container port of the pod. Messages are consul-k8s's: `upstream structured incorrectly:
//! <entry>` and `invalid upstream local bind port "<port>" in "<entry>"`.
//!
//! Where consul-k8s is more lenient and would register an upstream that can never work, this
//! parser refuses the entry as `upstream structured incorrectly`: an empty service, namespace,
//! partition, peer or datacenter name (`:9091`, `api..ns:9091` style), a datacenter or destination
//! port containing `:` (`api:9091:dc1:extra`), and a port above 65535.

use super::{Container, Error};
use crate::catalog;

/// What an upstream points at.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DestinationType {
    /// A Consul service (every entry but `prepared_query:`). The default.
    #[default]
    Service,
    /// `prepared_query:<name>:<port>`: [`Upstream::service`] holds the query name.
    PreparedQuery,
}

/// Consul's mesh gateway modes for an upstream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum MeshGatewayMode {
    /// `none`: connect to the destination directly.
    None,
    /// `local`: through the mesh gateway of the local datacenter.
    Local,
    /// `remote`: through the mesh gateway of the destination's datacenter.
    Remote,
}

/// One parsed upstream entry. `None` means "not given": Consul then uses the pod's own
/// namespace, partition and datacenter.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Upstream {
    /// A service or a prepared query.
    pub destination_type: DestinationType,
    /// Destination service name (or prepared query name).
    pub service: String,
    /// The destination's Consul namespace (`.<ns>.ns` or `<svc>.<ns>`).
    pub namespace: Option<String>,
    /// The destination's admin partition (`.<x>.ap` or `<svc>.<ns>.<partition>`).
    pub partition: Option<String>,
    /// The cluster peer the destination is imported from (`.<x>.peer`).
    pub peer: Option<String>,
    /// The destination's datacenter (`.<x>.dc` or the unlabelled `:<dc>`).
    pub datacenter: Option<String>,
    /// The local port the application connects to (`127.0.0.1:<bind_port>` in the pod).
    pub bind_port: u16,
    /// The destination port, as written (a number or a port name), from `<extra>` or the
    /// `destination_port` option.
    pub destination_port: Option<String>,
    /// The `local_bind_address` option, as written (an IP address the app dials instead of
    /// `127.0.0.1`).
    pub local_bind_address: Option<String>,
    /// The `mesh_gateway_mode` option.
    pub mesh_gateway_mode: Option<MeshGatewayMode>,
}

impl Upstream {
    /// Whether this mesh can route the upstream exactly as written: a Consul service of the
    /// local datacenter (`local_datacenter`) and admin partition `default`, reached on
    /// `127.0.0.1:<bind_port>`, on the destination's service port. The error is the reason
    /// an entry is refused (the manifest is refused with it, so that nothing is ever routed
    /// to something else than what was written):
    ///
    /// * `prepared_query:` (no prepared queries here);
    /// * `.<peer>.peer` (no cluster peering);
    /// * a partition other than `default` (this mesh serves the `default` partition only);
    /// * a datacenter other than `local_datacenter` (no WAN federation);
    /// * `mesh_gateway_mode` `local` or `remote` (no mesh gateways; `none` is what happens);
    /// * `local_bind_address` other than `127.0.0.1` (upstream listeners are on loopback);
    /// * a destination port (an upstream reaches the destination's service port,
    ///   `consul.hashicorp.com/connect-service-port` or its first container port, as Consul's).
    ///
    /// # Errors
    ///
    /// The reason, naming the part of the entry that cannot be honoured.
    pub fn check_routable(&self, local_datacenter: &str) -> Result<(), String> {
        if self.destination_type == DestinationType::PreparedQuery {
            return Err(format!(
                "prepared query {:?}: prepared queries are not supported here (name the \
                 service instead)",
                self.service
            ));
        }
        if let Some(peer) = &self.peer {
            return Err(format!(
                "peer {peer:?}: cluster peering is not supported here; only services of this \
                 mesh can be upstreams"
            ));
        }
        if let Some(ap) = self.partition.as_deref().filter(|p| *p != "default") {
            return Err(format!(
                "admin partition {ap:?}: this mesh serves only the \"default\" partition"
            ));
        }
        if let Some(dc) = self
            .datacenter
            .as_deref()
            .filter(|d| *d != local_datacenter)
        {
            return Err(format!(
                "datacenter {dc:?}: this mesh is datacenter {local_datacenter:?} alone (no WAN \
                 federation)"
            ));
        }
        match self.mesh_gateway_mode {
            None | Some(MeshGatewayMode::None) => {}
            Some(mode) => {
                return Err(format!(
                    "mesh_gateway_mode {:?}: there are no mesh gateways here",
                    match mode {
                        MeshGatewayMode::Local => "local",
                        _ => "remote",
                    }
                ))
            }
        }
        if let Some(addr) = self
            .local_bind_address
            .as_deref()
            .filter(|a| *a != "127.0.0.1")
        {
            return Err(format!(
                "local_bind_address {addr:?}: upstream listeners are on 127.0.0.1 only"
            ));
        }
        if let Some(port) = &self.destination_port {
            return Err(format!(
                "destination port {port:?}: an upstream reaches the destination's service port \
                 (its consul.hashicorp.com/connect-service-port, else its first container port)"
            ));
        }
        Ok(())
    }

    /// The catalog's form of this upstream, for a pod in `pod_namespace` of `local_datacenter`.
    /// `None` for prepared queries, which the mesh cannot resolve; callers refuse the others
    /// [`check_routable`](Self::check_routable) refuses before they get here.
    pub fn to_catalog(
        &self,
        pod_namespace: &str,
        local_datacenter: &str,
    ) -> Option<catalog::Upstream> {
        if self.destination_type != DestinationType::Service {
            return None;
        }
        Some(catalog::Upstream {
            service: self.service.clone(),
            namespace: self
                .namespace
                .clone()
                .unwrap_or_else(|| pod_namespace.to_string()),
            datacenter: self
                .datacenter
                .clone()
                .unwrap_or_else(|| local_datacenter.to_string()),
            bind_port: self.bind_port,
        })
    }
}

/// Which Consul features the annotation grammar assumes, as consul-k8s's
/// `-enable-namespaces` / `-enable-partitions` flags do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UpstreamSyntax {
    /// Consul namespaces (Enterprise; the local runner mirrors Kubernetes namespaces).
    pub consul_namespaces: bool,
    /// Consul admin partitions (Enterprise).
    pub consul_partitions: bool,
}

impl Default for UpstreamSyntax {
    fn default() -> Self {
        Self {
            consul_namespaces: true,
            consul_partitions: false,
        }
    }
}

impl UpstreamSyntax {
    fn enterprise(&self) -> bool {
        self.consul_namespaces || self.consul_partitions
    }
}

/// Parses a whole annotation value. An empty value means no upstreams; any malformed entry
/// (including an empty one, as in `a:1,,b:2` or a trailing comma) refuses the whole value.
/// `containers` resolves named ports.
///
/// # Errors
///
/// [`Error::Upstream`] with consul-k8s's message for the first malformed entry, as
/// [`parse_upstream`].
pub fn parse_upstreams(
    annotation: &str,
    containers: &[Container],
    syntax: UpstreamSyntax,
) -> Result<Vec<Upstream>, Error> {
    if annotation.is_empty() {
        return Ok(Vec::new());
    }
    annotation
        .split(',')
        .map(|raw| parse_upstream(raw.trim(), containers, syntax))
        .collect()
}

/// Parses one (already trimmed) entry; the grammar is the module's.
///
/// # Errors
///
/// [`Error::Upstream`]: `upstream structured incorrectly: <entry>` for an entry of no known
/// form (or an empty name part), `invalid upstream local bind port ...` for a port that is
/// neither a number in 1–65535 nor a container port's name, and a message naming an unknown
/// mesh gateway mode.
pub fn parse_upstream(
    raw: &str,
    containers: &[Container],
    syntax: UpstreamSyntax,
) -> Result<Upstream, Error> {
    let parts: Vec<&str> = raw.splitn(3, ':').collect();
    let service_parts: Vec<&str> = parts[0].split('.').collect();
    let labeled = service_parts.len() >= 2 && service_parts[1] == "svc";
    let upstream = if parts[0].trim() == "prepared_query" {
        prepared_query(raw, &parts, containers)?
    } else if labeled {
        labeled_upstream(raw, &parts, containers, syntax)?
    } else {
        unlabeled_upstream(raw, &parts, containers, syntax)?
    };
    check_names(raw, &upstream)?;
    Ok(upstream)
}

fn structure(raw: &str) -> Error {
    Error::Upstream(format!("upstream structured incorrectly: {raw}"))
}

fn bad_port(token: &str, raw: &str) -> Error {
    Error::Upstream(format!(
        "invalid upstream local bind port {} in {}",
        go_quote(token),
        go_quote(raw)
    ))
}

/// The stricter checks this parser adds to consul-k8s's (see the module docs).
fn check_names(raw: &str, u: &Upstream) -> Result<(), Error> {
    let bad = |s: &str| s.is_empty() || s.contains(':') || s.chars().any(char::is_whitespace);
    if bad(&u.service) {
        return Err(structure(raw));
    }
    for s in [
        &u.namespace,
        &u.partition,
        &u.peer,
        &u.datacenter,
        &u.destination_port,
    ]
    .into_iter()
    .flatten()
    {
        if bad(s) {
            return Err(structure(raw));
        }
    }
    Ok(())
}

/// consul-k8s's `common.PortValue`: a named container port, else a Go base-0 integer; the
/// result must be a usable port.
fn local_bind_port(token: &str, raw: &str, containers: &[Container]) -> Result<u16, Error> {
    for c in containers {
        for p in &c.ports {
            if p.name.as_deref() == Some(token) {
                return Ok(p.container_port);
            }
        }
    }
    match parse_go_int(token) {
        Some(n) if (1..=i64::from(u16::MAX)).contains(&n) => {
            u16::try_from(n).map_err(|_| bad_port(token, raw))
        }
        _ => Err(bad_port(token, raw)),
    }
}

fn prepared_query(raw: &str, parts: &[&str], containers: &[Container]) -> Result<Upstream, Error> {
    if parts.len() < 3 {
        return Err(structure(raw));
    }
    let token = parts[2].trim();
    let bind_port = local_bind_port(token, raw, containers)?;
    let service = parts[1].trim();
    if service.is_empty() {
        return Err(structure(raw));
    }
    Ok(Upstream {
        destination_type: DestinationType::PreparedQuery,
        service: service.to_string(),
        bind_port,
        ..Upstream::default()
    })
}

fn unlabeled_upstream(
    raw: &str,
    parts: &[&str],
    containers: &[Container],
    syntax: UpstreamSyntax,
) -> Result<Upstream, Error> {
    if parts.len() < 2 {
        return Err(structure(raw));
    }
    let bind_port = local_bind_port(parts[1].trim(), raw, containers)?;
    let mut u = Upstream {
        bind_port,
        ..Upstream::default()
    };
    if syntax.enterprise() {
        let pieces: Vec<&str> = parts[0].splitn(3, '.').collect();
        u.service = pieces[0].trim().to_string();
        if pieces.len() >= 2 {
            u.namespace = Some(pieces[1].trim().to_string());
        }
        if pieces.len() == 3 {
            u.partition = Some(pieces[2].trim().to_string());
        }
    } else {
        u.service = parts[0].trim().to_string();
    }
    if parts.len() > 2 {
        let extra = unlabeled_extra(parts[2], raw)?;
        u.datacenter = extra.datacenter;
        u.destination_port = extra.destination_port;
        u.local_bind_address = extra.local_bind_address;
        u.mesh_gateway_mode = extra.mesh_gateway_mode;
    }
    Ok(u)
}

fn labeled_upstream(
    raw: &str,
    parts: &[&str],
    containers: &[Container],
    syntax: UpstreamSyntax,
) -> Result<Upstream, Error> {
    if parts.len() < 2 {
        return Err(structure(raw));
    }
    let bind_port = local_bind_port(parts[1].trim(), raw, containers)?;
    let mut u = Upstream {
        bind_port,
        ..Upstream::default()
    };
    let pieces: Vec<&str> = parts[0].split('.').map(str::trim).collect();
    // pieces[1] is "svc" (that is how the labelled form was recognised).
    if syntax.enterprise() {
        match pieces.len() {
            2 | 4 | 6 => {}
            _ => return Err(structure(raw)),
        }
        if pieces.len() == 6 {
            let value = Some(pieces[4].to_string());
            match pieces[5] {
                "peer" => u.peer = value,
                "ap" => u.partition = value,
                "dc" => u.datacenter = value,
                _ => return Err(structure(raw)),
            }
        }
        if pieces.len() >= 4 {
            if pieces[3] != "ns" {
                return Err(structure(raw));
            }
            u.namespace = Some(pieces[2].to_string());
        }
    } else {
        match pieces.len() {
            2 => {}
            4 => {
                let value = Some(pieces[2].to_string());
                match pieces[3] {
                    "peer" => u.peer = value,
                    "dc" => u.datacenter = value,
                    _ => return Err(structure(raw)),
                }
            }
            _ => return Err(structure(raw)),
        }
    }
    u.service = pieces[0].to_string();
    if parts.len() > 2 {
        let extra = labeled_extra(parts[2], raw)?;
        if let Some(dc) = extra.datacenter {
            if u.datacenter.as_ref().is_some_and(|d| *d != dc) {
                return Err(structure(raw));
            }
            u.datacenter = Some(dc);
        }
        u.destination_port = extra.destination_port;
        u.local_bind_address = extra.local_bind_address;
        u.mesh_gateway_mode = extra.mesh_gateway_mode;
    }
    Ok(u)
}

#[derive(Default)]
struct Extra {
    datacenter: Option<String>,
    destination_port: Option<String>,
    local_bind_address: Option<String>,
    mesh_gateway_mode: Option<MeshGatewayMode>,
}

/// `parseUnlabeledUpstreamExtraFields`: `<dc>`, `<options>`, `?<options>` or `<dc>?<options>`.
fn unlabeled_extra(raw_extra: &str, raw: &str) -> Result<Extra, Error> {
    let extra = raw_extra.trim();
    if extra.is_empty() {
        return Ok(Extra::default());
    }
    if let Some((prefix, query)) = extra.split_once('?') {
        let prefix = prefix.trim();
        let mut fields = option_string(query.trim(), raw)?;
        if !prefix.is_empty() && fields.datacenter.is_none() {
            fields.datacenter = Some(prefix.to_string());
        }
        return Ok(fields);
    }
    if extra.contains('=') || extra.contains('&') {
        return option_string(extra, raw);
    }
    Ok(Extra {
        datacenter: Some(extra.to_string()),
        ..Extra::default()
    })
}

/// `parseLabeledUpstreamExtraFields`: a destination port, or options.
fn labeled_extra(raw_extra: &str, raw: &str) -> Result<Extra, Error> {
    let extra = raw_extra.trim();
    if extra.is_empty() {
        return Ok(Extra::default());
    }
    if extra.contains('=') || extra.contains('&') || extra.contains('?') {
        return option_string(extra, raw);
    }
    Ok(Extra {
        destination_port: Some(extra.to_string()),
        ..Extra::default()
    })
}

/// `parseUpstreamOptionString`: URL query syntax (`;` also separates), known keys only.
fn option_string(raw_options: &str, raw: &str) -> Result<Extra, Error> {
    let cleaned = raw_options.trim();
    let cleaned = cleaned
        .strip_prefix('?')
        .unwrap_or(cleaned)
        .replace(';', "&");
    let mut fields = Extra::default();
    let mut seen: Vec<String> = Vec::new();
    for pair in cleaned.split('&') {
        if pair.is_empty() {
            continue;
        }
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let key = query_unescape(k).ok_or_else(|| structure(raw))?;
        let value = query_unescape(v).ok_or_else(|| structure(raw))?;
        if key.is_empty() {
            continue;
        }
        // url.Values keeps every value; consul-k8s reads the first one of each key.
        if seen.contains(&key) {
            continue;
        }
        seen.push(key.clone());
        let value = value.trim();
        if value.is_empty() {
            continue;
        }
        match key.trim() {
            "destination_port" | "destination-port" | "destinationPort" | "port" => {
                fields.destination_port = Some(value.to_string())
            }
            "local_bind_address" | "local-bind-address" | "localBindAddress" => {
                fields.local_bind_address = Some(value.to_string())
            }
            "mesh_gateway_mode" | "mesh-gateway-mode" | "meshGatewayMode" => {
                fields.mesh_gateway_mode = Some(match value {
                    "none" => MeshGatewayMode::None,
                    "local" => MeshGatewayMode::Local,
                    "remote" => MeshGatewayMode::Remote,
                    _ => {
                        return Err(Error::Upstream(format!(
                            "invalid upstream mesh gateway mode {} in {}",
                            go_quote(value),
                            go_quote(raw)
                        )))
                    }
                })
            }
            "datacenter" | "dc" => fields.datacenter = Some(value.to_string()),
            _ => {
                return Err(Error::Upstream(format!(
                    "unsupported upstream option {} in {}",
                    go_quote(&key),
                    go_quote(raw)
                )))
            }
        }
    }
    Ok(fields)
}

/// Go's `url.QueryUnescape`: `+` is a space, `%XX` a byte; a bad escape is an error.
fn query_unescape(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                // Exactly two hex digits, as Go's `url.QueryUnescape` (from_str_radix alone
                // would also take a sign: `%+5`).
                let hex = bytes.get(i + 1..i + 3)?;
                if !hex.iter().all(u8::is_ascii_hexdigit) {
                    return None;
                }
                let hex = std::str::from_utf8(hex).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// Go's `strconv.ParseInt(s, 0, 32)` without digit-separating underscores: optional sign, then
/// `0x`/`0o`/`0b` prefixes or a leading `0` for octal.
pub(crate) fn parse_go_int(s: &str) -> Option<i64> {
    let (negative, digits) = match s.as_bytes().first()? {
        b'+' => (false, &s[1..]),
        b'-' => (true, &s[1..]),
        _ => (false, s),
    };
    let lower = digits.to_ascii_lowercase();
    let (radix, body) = if let Some(b) = lower.strip_prefix("0x") {
        (16, b)
    } else if let Some(b) = lower.strip_prefix("0o") {
        (8, b)
    } else if let Some(b) = lower.strip_prefix("0b") {
        (2, b)
    } else if lower.len() > 1 && lower.starts_with('0') {
        (8, &lower[1..])
    } else {
        (10, lower.as_str())
    };
    if body.is_empty() || !body.chars().all(|c| c.is_digit(radix)) {
        return None;
    }
    let n = i64::from_str_radix(body, radix).ok()?;
    let n = if negative { -n } else { n };
    (i64::from(i32::MIN)..=i64::from(i32::MAX))
        .contains(&n)
        .then_some(n)
}

/// Go's `%q` for a string: double quotes, with `"`, `\` and non-printable characters escaped.
pub(crate) fn go_quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 || c == '\u{7f}' => {
                out.push_str(&format!("\\x{:02x}", c as u32));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod unescape_tests {
    use super::query_unescape;

    #[test]
    fn percent_escapes_take_exactly_two_hex_digits_as_go_does() {
        assert_eq!(query_unescape("a%20b+c").as_deref(), Some("a b c"));
        assert_eq!(query_unescape("%41").as_deref(), Some("A"));
        // Go's url.QueryUnescape refuses these; a sign is not a hex digit.
        for bad in ["%+5", "%-1", "%4", "%zz", "%"] {
            assert_eq!(query_unescape(bad), None, "{bad}");
        }
    }
}
