//! Leaves signed by a remote CA: the node agent makes the key pair and a certificate signing
//! request (PKCS#10) and keeps the key; the CA checks the request's signature, takes only its
//! public key, and signs a leaf for the identity it decided on (the request's own subject and
//! SANs are ignored). The CA also issues itself a TLS serving certificate for its DNS names.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rcgen::{
    CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType, PKCS_ECDSA_P256_SHA256,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::sign::CertifiedKey;

use super::ca::{to_offset, CertificateAuthority};
use super::leaf::LeafCert;
use super::spiffe::SpiffeId;
use super::tls::provider;
use super::Error;

/// A key pair and the certificate signing request for one identity, waiting for the CA's
/// answer. The private key never leaves it.
pub struct LeafRequest {
    id: SpiffeId,
    key: KeyPair,
    csr_pem: String,
}

impl std::fmt::Debug for LeafRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeafRequest")
            .field("id", &self.id.to_string())
            .finish_non_exhaustive()
    }
}

impl LeafRequest {
    /// Makes a fresh ECDSA P-256 key and a PKCS#10 request for `id` (its URI SAN, the service
    /// name as common name).
    ///
    /// # Errors
    ///
    /// [`Error::Generate`] if the key or request cannot be made.
    pub fn new(id: &SpiffeId) -> Result<Self, Error> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        let cn: String = id.service().chars().take(64).collect();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.subject_alt_names = vec![SanType::URI(id.to_string().try_into()?)];
        let csr_pem = params.serialize_request(&key)?.pem()?;
        Ok(Self {
            id: id.clone(),
            key,
            csr_pem,
        })
    }

    /// The identity asked for.
    pub fn id(&self) -> &SpiffeId {
        &self.id
    }

    /// The request, PEM (`CERTIFICATE REQUEST`).
    pub fn csr_pem(&self) -> &str {
        &self.csr_pem
    }

    /// Joins the CA's answer with the key: the certificate (PEM or DER) must carry this
    /// request's identity and public key.
    ///
    /// # Errors
    ///
    /// [`Error::BadCertificate`] for a PEM block that is not one certificate,
    /// [`Error::IdentityMismatch`] for another identity, [`Error::Tls`] when the certificate's
    /// key is not this request's.
    pub fn complete(self, cert_pem: &str) -> Result<LeafCert, Error> {
        let der = certificate_from_pem(cert_pem)?;
        let leaf = LeafCert::new(self.id, der, self.key.serialize_der())?;
        leaf.certified_key().keys_match()?;
        Ok(leaf)
    }
}

/// Reads one PEM `CERTIFICATE` block.
///
/// # Errors
///
/// [`Error::BadCertificate`] when the text is not PEM or the block is of another kind.
pub fn certificate_from_pem(text: &str) -> Result<CertificateDer<'static>, Error> {
    let p = pem::parse(text).map_err(|e| Error::BadCertificate(format!("PEM: {e}")))?;
    if p.tag() != "CERTIFICATE" {
        return Err(Error::BadCertificate(format!(
            "PEM block {:?}, expected CERTIFICATE",
            p.tag()
        )));
    }
    Ok(CertificateDer::from(p.into_contents()))
}

/// PEM-encodes a certificate.
pub fn certificate_to_pem(der: &CertificateDer<'_>) -> String {
    pem::encode(&pem::Pem::new("CERTIFICATE", der.to_vec()))
}

impl CertificateAuthority {
    /// Signs a leaf for `id` over the public key of a PKCS#10 request (PEM), valid from now
    /// (back-dated a minute) for `ttl`. The request's signature is checked (it proves the
    /// caller holds the key); its subject and SANs are ignored: the leaf names `id` only.
    ///
    /// # Errors
    ///
    /// [`Error::BadCertificate`] for a request that does not parse or whose signature does not
    /// verify, and the errors of [`issue_leaf`](Self::issue_leaf) (another trust domain, a TTL
    /// past the root's expiry).
    pub fn sign_request(
        &self,
        id: &SpiffeId,
        csr_pem: &str,
        ttl: Duration,
    ) -> Result<CertificateDer<'static>, Error> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| Error::BadCertificate(format!("certificate signing request: {e}")))?;
        let (not_before, not_after) = self.leaf_validity(id, ttl)?;
        let params = leaf_params(id, not_before, not_after)?;
        Ok(params
            .signed_by(&csr.public_key, self.issuer())?
            .der()
            .clone())
    }

    /// A TLS serving certificate for the CA's own endpoint, signed by the active root: `names`
    /// are DNS names or IP addresses (SANs), valid for `ttl`. Clients verify it against the
    /// mesh's roots like any web PKI certificate.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidValidity`] for no names or a TTL past the root's expiry,
    /// [`Error::Generate`] for a name that is not a valid DNS name, [`Error::Tls`] if rustls
    /// refuses the key.
    pub fn issue_serving(
        &self,
        names: &[String],
        ttl: Duration,
    ) -> Result<Arc<CertifiedKey>, Error> {
        if names.is_empty() {
            return Err(Error::InvalidValidity(
                "a serving certificate needs at least one name".into(),
            ));
        }
        let now = SystemTime::now();
        let not_after = now
            .checked_add(ttl)
            .filter(|t| *t <= self.root().not_after())
            .ok_or_else(|| {
                Error::InvalidValidity("a certificate cannot outlive its root".into())
            })?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(
            DnType::CommonName,
            names[0].chars().take(64).collect::<String>(),
        );
        params.subject_alt_names = names
            .iter()
            .map(|n| match n.parse::<IpAddr>() {
                Ok(ip) => Ok(SanType::IpAddress(ip)),
                Err(_) => Ok(SanType::DnsName(n.clone().try_into()?)),
            })
            .collect::<Result<_, rcgen::Error>>()?;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(super::ca::random_serial());
        params.not_before = to_offset(now.checked_sub(Duration::from_secs(60)).unwrap_or(now))?;
        params.not_after = to_offset(not_after)?;
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let cert = params.signed_by(&key, self.issuer())?;
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        Ok(Arc::new(CertifiedKey::from_der(
            vec![cert.der().clone()],
            key,
            &provider(),
        )?))
    }
}

/// The parameters of a leaf for `id` (the same as [`CertificateAuthority::issue_leaf`]'s).
pub(super) fn leaf_params(
    id: &SpiffeId,
    not_before: SystemTime,
    not_after: SystemTime,
) -> Result<CertificateParams, Error> {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    // A common name is at most 64 characters; the identity is in the URI SAN anyway.
    let cn: String = id.service().chars().take(64).collect();
    params.distinguished_name.push(DnType::CommonName, cn);
    params.subject_alt_names = vec![SanType::URI(id.to_string().try_into()?)];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    params.serial_number = Some(super::ca::random_serial());
    params.not_before = to_offset(not_before)?;
    params.not_after = to_offset(not_after)?;
    Ok(params)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::TrustBundle;

    fn web(td: &str) -> SpiffeId {
        SpiffeId::new(td, "default", "dc1", "web").unwrap()
    }

    #[test]
    fn a_signed_request_makes_a_leaf_that_chains_to_the_root() {
        let ca = CertificateAuthority::ephemeral("example.consul").unwrap();
        let id = web("example.consul");
        let req = LeafRequest::new(&id).unwrap();
        assert!(req
            .csr_pem()
            .starts_with("-----BEGIN CERTIFICATE REQUEST-----"));
        let cert = ca
            .sign_request(&id, req.csr_pem(), Duration::from_secs(3600))
            .unwrap();
        let leaf = req.complete(&certificate_to_pem(&cert)).unwrap();
        assert_eq!(leaf.id(), &id);
        let bundle = TrustBundle::new(ca.root().clone()).unwrap();
        assert_eq!(bundle.signer_of(&leaf).as_ref(), Some(ca.root()));
        let lifetime = leaf.not_after().duration_since(leaf.not_before()).unwrap();
        assert_eq!(lifetime, Duration::from_secs(3600 + 60));
    }

    #[test]
    fn the_ca_names_the_identity_it_decided_on_not_the_requests() {
        let ca = CertificateAuthority::ephemeral("example.consul").unwrap();
        let asked = web("example.consul");
        let req = LeafRequest::new(&asked).unwrap();
        let api = SpiffeId::new("example.consul", "default", "dc1", "api").unwrap();
        let cert = ca
            .sign_request(&api, req.csr_pem(), Duration::from_secs(3600))
            .unwrap();
        assert_eq!(crate::identity::spiffe_id_from_cert(&cert).unwrap(), api);
        // The request's holder asked for web: a leaf naming api is refused on completion.
        let err = req.complete(&certificate_to_pem(&cert)).unwrap_err();
        assert!(matches!(err, Error::IdentityMismatch { .. }), "{err}");
    }

    #[test]
    fn a_tampered_request_or_another_trust_domain_is_refused() {
        let ca = CertificateAuthority::ephemeral("example.consul").unwrap();
        let id = web("example.consul");
        let req = LeafRequest::new(&id).unwrap();
        let err = ca
            .sign_request(&id, "not a request", Duration::from_secs(60))
            .unwrap_err();
        assert!(
            err.to_string().contains("certificate signing request"),
            "{err}"
        );
        // Flip one byte of the signed body: the signature no longer verifies.
        let mut der = pem::parse(req.csr_pem()).unwrap().into_contents();
        let i = der.len() / 2;
        der[i] ^= 0x01;
        let tampered = pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", der));
        let err = ca
            .sign_request(&id, &tampered, Duration::from_secs(60))
            .unwrap_err();
        assert!(matches!(err, Error::BadCertificate(_)), "{err}");
        let other = web("other.consul");
        let err = ca
            .sign_request(&other, req.csr_pem(), Duration::from_secs(60))
            .unwrap_err();
        assert!(matches!(err, Error::TrustDomainMismatch { .. }), "{err}");
    }

    #[test]
    fn a_leaf_for_another_key_is_refused() {
        let ca = CertificateAuthority::ephemeral("example.consul").unwrap();
        let id = web("example.consul");
        let mine = LeafRequest::new(&id).unwrap();
        let theirs = LeafRequest::new(&id).unwrap();
        let cert = ca
            .sign_request(&id, theirs.csr_pem(), Duration::from_secs(60))
            .unwrap();
        assert!(mine.complete(&certificate_to_pem(&cert)).is_err());
    }

    #[test]
    fn the_serving_certificate_verifies_for_its_names_against_the_root() {
        use rustls::client::danger::ServerCertVerifier;
        use rustls::pki_types::{ServerName, UnixTime};
        let ca = CertificateAuthority::ephemeral("example.consul").unwrap();
        let names = vec![
            "meshd-ca.mesh-system.svc".to_owned(),
            "127.0.0.1".to_owned(),
        ];
        let key = ca.issue_serving(&names, Duration::from_secs(3600)).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.root().der().clone()).unwrap();
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            provider(),
        )
        .build()
        .unwrap();
        let now = UnixTime::now();
        for name in ["meshd-ca.mesh-system.svc", "127.0.0.1"] {
            let sn = ServerName::try_from(name).unwrap();
            verifier
                .verify_server_cert(&key.cert[0], &[], &sn, &[], now)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
        }
        let wrong = ServerName::try_from("meshd-ca.other.svc").unwrap();
        assert!(verifier
            .verify_server_cert(&key.cert[0], &[], &wrong, &[], now)
            .is_err());
        assert!(ca.issue_serving(&[], Duration::from_secs(60)).is_err());
    }
}
