//! Building and reading the X.509 certificates of the mesh: the self-signed root, serials,
//! validity times, SPIFFE URIs.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rand::RngExt;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, KeyPair, KeyUsagePurpose,
    SanType, SerialNumber,
};
use rustls::pki_types::CertificateDer;

use super::{RootCert, BACKDATE, DEFAULT_ROOT_TTL};
use crate::identity::spiffe;
use crate::identity::Error;

pub(super) fn self_signed_root(trust_domain: &str, key: &KeyPair) -> Result<RootCert, Error> {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    let tag: u32 = rand::rng().random();
    params
        .distinguished_name
        .push(DnType::CommonName, format!("Mesh CA Root {tag:08x}"));
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.subject_alt_names = vec![SanType::URI(
        spiffe::trust_domain_uri(trust_domain).try_into()?,
    )];
    params.serial_number = Some(random_serial());
    let now = SystemTime::now();
    let not_after = now
        .checked_add(DEFAULT_ROOT_TTL)
        .ok_or_else(|| Error::InvalidValidity("root validity out of range".into()))?;
    params.not_before = to_offset(now.checked_sub(BACKDATE).unwrap_or(now))?;
    params.not_after = to_offset(not_after)?;
    let cert = params.self_signed(key)?;
    RootCert::from_der(cert.der().clone())
}

pub(crate) fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    rand::rng().fill(&mut bytes[..]);
    // Positive and exactly 16 bytes long.
    bytes[0] = (bytes[0] & 0x7f) | 0x01;
    SerialNumber::from_slice(&bytes)
}

pub(crate) fn to_offset(t: SystemTime) -> Result<time::OffsetDateTime, Error> {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map_err(|_| Error::InvalidValidity("time before 1970".into()))?
        .as_secs();
    let secs =
        i64::try_from(secs).map_err(|_| Error::InvalidValidity("time out of range".into()))?;
    let t = time::OffsetDateTime::from_unix_timestamp(secs)
        .map_err(|e| Error::InvalidValidity(e.to_string()))?;
    if t.year() > 9999 {
        return Err(Error::InvalidValidity("time after year 9999".into()));
    }
    Ok(t)
}

pub(crate) fn parse_cert<'a>(
    der: &'a CertificateDer<'_>,
) -> Result<x509_parser::certificate::X509Certificate<'a>, Error> {
    let (rest, cert) = x509_parser::parse_x509_certificate(der.as_ref())
        .map_err(|e| Error::BadCertificate(e.to_string()))?;
    if !rest.is_empty() {
        return Err(Error::BadCertificate(
            "trailing data after certificate".into(),
        ));
    }
    Ok(cert)
}

/// Every URI SAN of `cert`.
pub(crate) fn uris<'a>(
    cert: &'a x509_parser::certificate::X509Certificate<'_>,
) -> Result<Vec<&'a str>, Error> {
    let san = cert
        .subject_alternative_name()
        .map_err(|e| Error::BadCertificate(format!("subject alternative names: {e}")))?;
    Ok(san
        .map(|ext| {
            ext.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    x509_parser::extensions::GeneralName::URI(u) => Some(*u),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default())
}

pub(crate) fn validity(
    cert: &x509_parser::certificate::X509Certificate<'_>,
) -> Result<(SystemTime, SystemTime), Error> {
    let v = cert.validity();
    let at = |ts: i64| {
        u64::try_from(ts)
            .ok()
            .and_then(|s| UNIX_EPOCH.checked_add(Duration::from_secs(s)))
            .ok_or_else(|| Error::BadCertificate(format!("validity time {ts} out of range")))
    };
    Ok((at(v.not_before.timestamp())?, at(v.not_after.timestamp())?))
}

pub(super) fn cert_matches_key(der: &CertificateDer<'_>, key: &KeyPair) -> Result<bool, Error> {
    let cert = parse_cert(der)?;
    Ok(cert.public_key().subject_public_key.data.as_ref() == key.public_key_raw())
}
