//! The TLS server name that carries the requested app port from the outbound to the inbound
//! side: `p<port>.<service>.<namespace>.<datacenter>.mesh`, or `p<port>.mesh` when the long form
//! is not a valid DNS name.

use rustls::pki_types::{DnsName, ServerName};

use super::Error;
use mesh_core::identity::SpiffeId;

/// The last label of every mesh server name.
pub const SNI_SUFFIX: &str = "mesh";

/// The server name an outbound connection to `service` sends to request app port `port`.
///
/// The long form `p<port>.<service>.<namespace>.<datacenter>.mesh` (lower case) when it is a
/// valid DNS name, else the short form `p<port>.mesh`. Port 0 is refused.
///
/// # Errors
///
/// [`Error::PortZero`] for port 0.
pub fn server_name(service: &SpiffeId, port: u16) -> Result<ServerName<'static>, Error> {
    if port == 0 {
        return Err(Error::PortZero);
    }
    let long = format!("p{port}.{}.{SNI_SUFFIX}", service_labels(service));
    let name = match DnsName::try_from(long) {
        Ok(name) => name,
        Err(_) => DnsName::try_from(format!("p{port}.{SNI_SUFFIX}"))
            // "p<digits>.mesh" is always a valid DNS name; this arm is never taken.
            .map_err(|_| Error::PortZero)?,
    };
    Ok(ServerName::DnsName(name))
}

/// The app port requested by a server name, as received by the inbound side of `own`.
///
/// Accepts exactly `p<port>.<service>.<namespace>.<datacenter>.mesh` naming `own` (ASCII case
/// ignored), or `p<port>.mesh`; `<port>` is 1–65535 in decimal without a leading zero or sign.
/// Everything else is an error naming what is wrong.
///
/// # Errors
///
/// [`Error::BadServerName`] with the reason: not a mesh name, a first label that is not
/// `p<port>`, a leading zero or port 0, a port above 65535, a name not ending in `.mesh`, or
/// a long form naming another service than `own`.
pub fn parse_server_name(name: &str, own: &SpiffeId) -> Result<u16, Error> {
    let bad = |reason| Error::BadServerName {
        name: name.chars().take(253).collect(),
        reason,
    };
    let lower = name.to_ascii_lowercase();
    let (first, rest) = lower
        .split_once('.')
        .ok_or_else(|| bad("not a mesh name"))?;
    let digits = first
        .strip_prefix('p')
        .ok_or_else(|| bad("first label is not p<port>"))?;
    if digits.is_empty() || digits.len() > 5 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad("first label is not p<port>"));
    }
    if digits.starts_with('0') {
        return Err(bad("port with a leading zero or port 0"));
    }
    let port: u16 = digits.parse().map_err(|_| bad("port out of range"))?;
    if rest == SNI_SUFFIX {
        return Ok(port);
    }
    let service = rest
        .strip_suffix(SNI_SUFFIX)
        .and_then(|s| s.strip_suffix('.'))
        .ok_or_else(|| bad("does not end in .mesh"))?;
    if service != service_labels(own) {
        return Err(bad("names another service"));
    }
    Ok(port)
}

/// `<service>.<namespace>.<datacenter>` in lower case.
fn service_labels(id: &SpiffeId) -> String {
    format!("{}.{}.{}", id.service(), id.namespace(), id.datacenter()).to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(svc: &str) -> SpiffeId {
        SpiffeId::new("sni.consul", "default", "dc1", svc).unwrap()
    }

    fn dns(name: &ServerName<'_>) -> String {
        match name {
            ServerName::DnsName(d) => d.as_ref().to_owned(),
            other => panic!("not a DNS name: {other:?}"),
        }
    }

    #[test]
    fn long_form_round_trips() {
        let api = id("api-v1");
        let name = server_name(&api, 9091).unwrap();
        assert_eq!(dns(&name), "p9091.api-v1.default.dc1.mesh");
        assert_eq!(parse_server_name(&dns(&name), &api).unwrap(), 9091);
        for port in [1u16, 80, 65535] {
            let n = dns(&server_name(&api, port).unwrap());
            assert_eq!(parse_server_name(&n, &api).unwrap(), port);
        }
        // Case is ignored, as in DNS.
        let mixed = SpiffeId::new("sni.consul", "Team", "DC1", "Web").unwrap();
        let n = dns(&server_name(&mixed, 8080).unwrap());
        assert_eq!(n, "p8080.web.team.dc1.mesh");
        assert_eq!(
            parse_server_name("P8080.WEB.team.Dc1.MESH", &mixed).unwrap(),
            8080
        );
    }

    #[test]
    fn short_form_when_the_long_one_is_not_a_dns_name() {
        let long = "s".repeat(64);
        let svc = id(&long);
        let n = dns(&server_name(&svc, 443).unwrap());
        assert_eq!(n, "p443.mesh");
        assert_eq!(parse_server_name(&n, &svc).unwrap(), 443);
        let hyphen = id("-lead");
        assert_eq!(dns(&server_name(&hyphen, 5).unwrap()), "p5.mesh");
        assert!(matches!(server_name(&svc, 0), Err(Error::PortZero)));
    }

    #[test]
    fn strict_parsing() {
        let api = id("api");
        for bad in [
            "",
            "mesh",
            "p.mesh",
            "p0.mesh",
            "p08080.mesh",
            "p65536.mesh",
            "p99999.mesh",
            "p123456.mesh",
            "p+80.mesh",
            "p-80.mesh",
            "x80.mesh",
            "80.mesh",
            "p80",
            "p80.",
            "p80.api.default.dc1",
            "p80.api.default.dc1.mesh.",
            "p80.api.default.dc1.mesh.evil",
            "p80.web.default.dc1.mesh",
            "p80.api.other.dc1.mesh",
            "p80.api.default.dc2.mesh",
            "p80..mesh",
            "p80.default.dc1.mesh",
            "p80.x.api.default.dc1.mesh",
            "p 80.mesh",
        ] {
            assert!(
                matches!(
                    parse_server_name(bad, &api),
                    Err(Error::BadServerName { .. })
                ),
                "{bad:?} accepted"
            );
        }
        assert_eq!(
            parse_server_name("p80.api.default.dc1.mesh", &api).unwrap(),
            80
        );
        // Service names with dots stay unambiguous: the whole middle must match.
        let dotted = id("api.v2");
        assert_eq!(
            parse_server_name("p7.api.v2.default.dc1.mesh", &dotted).unwrap(),
            7
        );
        assert!(parse_server_name("p7.api.v2.default.dc1.mesh", &api).is_err());
    }
}
