//! Identities of another trust domain and certificates that are not SVIDs.

use super::*;

#[test]
fn configs_refuse_identities_of_another_trust_domain() {
    let mesh = Mesh::new();
    let web = mesh.leaf("web");
    let foreign = SpiffeId::new("other.consul", "default", "dc1", "api").unwrap();
    assert!(matches!(
        client_config(Arc::clone(&web), Arc::clone(&mesh.trust), foreign),
        Err(Error::TrustDomainMismatch { .. })
    ));
    let other_ca = CertificateAuthority::ephemeral("other.consul").unwrap();
    let other_leaf = Arc::new(LeafStore::new(
        other_ca
            .issue_leaf(
                &SpiffeId::new("other.consul", "default", "dc1", "api").unwrap(),
                DEFAULT_LEAF_TTL,
            )
            .unwrap(),
    ));
    assert!(matches!(
        server_config(other_leaf, Arc::clone(&mesh.trust)),
        Err(Error::TrustDomainMismatch { .. })
    ));
}

#[test]
fn spiffe_id_from_cert_rejects_non_svids() {
    let mesh = Mesh::new();
    // A root carries a trust-domain URI, not a service ID.
    assert!(matches!(
        spiffe_id_from_cert(mesh.ca.root().der()),
        Err(Error::InvalidSpiffeId { .. })
    ));
    assert!(matches!(
        spiffe_id_from_cert(&CertificateDer::from(vec![0x30, 0x03, 0x02, 0x01, 0x01])),
        Err(Error::BadCertificate(_))
    ));
    let leaf = mesh.leaf("web");
    assert_eq!(
        spiffe_id_from_cert(leaf.current().cert_der()).unwrap(),
        svc("web")
    );
}

/// Serves one fixed certificate and key, whatever it holds.
#[derive(Debug)]
struct Fixed(Arc<CertifiedKey>);

impl ResolvesClientCert for Fixed {
    fn resolve(&self, _: &[&[u8]], _: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(&self.0))
    }

    fn has_certs(&self) -> bool {
        true
    }
}

impl rustls::server::ResolvesServerCert for Fixed {
    fn resolve(&self, _: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(&self.0))
    }
}

/// A certificate the CA would never issue, signed by the mesh root: `uris` as URI SANs and
/// `eku` as extended key usages.
fn odd_cert(mesh: &Mesh, uris: &[&str], eku: Vec<rcgen::ExtendedKeyUsagePurpose>) -> Arc<Fixed> {
    let mut params = rcgen::CertificateParams::default();
    params.subject_alt_names = uris
        .iter()
        .map(|u| rcgen::SanType::URI((*u).try_into().unwrap()))
        .collect();
    params.extended_key_usages = eku;
    params.is_ca = rcgen::IsCa::ExplicitNoCa;
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::hours(1);
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let der = mesh.ca.sign_unchecked(&params, &key).unwrap();
    let key_der = rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
    Arc::new(Fixed(Arc::new(
        CertifiedKey::from_der(vec![der], key_der, &provider()).unwrap(),
    )))
}

fn with_client_cert(config: &Arc<ClientConfig>, cert: Arc<Fixed>) -> Arc<ClientConfig> {
    let mut c = (**config).clone();
    c.client_auth_cert_resolver = cert;
    Arc::new(c)
}

#[test]
fn client_cert_of_another_trust_domain_is_refused_even_if_chained() {
    let mesh = Mesh::new();
    let web = mesh.leaf("web");
    let api = mesh.leaf("api");
    let base = mesh.client(&web, "api");
    let server = mesh.server(&api);
    let both = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];

    // Chained to the mesh root, but naming a foreign trust domain.
    let foreign = odd_cert(
        &mesh,
        &["spiffe://evil.consul/ns/default/dc/dc1/svc/web"],
        both.clone(),
    );
    let e = server_refused(connect(&with_client_cert(&base, foreign), &server));
    assert!(
        matches!(mesh_error(&e), Error::TrustDomainMismatch { got, .. } if got == "evil.consul"),
        "{e}"
    );

    // Chained, but with no SPIFFE ID, or with two.
    let none = odd_cert(&mesh, &[], both.clone());
    let e = server_refused(connect(&with_client_cert(&base, none), &server));
    assert!(matches!(mesh_error(&e), Error::BadCertificate(_)), "{e}");
    let web_uri = svc("web").to_string();
    let api_uri = svc("api").to_string();
    let two = odd_cert(&mesh, &[&web_uri, &api_uri], both);
    let e = server_refused(connect(&with_client_cert(&base, two), &server));
    assert!(matches!(mesh_error(&e), Error::BadCertificate(_)), "{e}");

    // A client-only certificate cannot serve.
    let client_only = odd_cert(
        &mesh,
        &[&api_uri],
        vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth],
    );
    let mut rogue_server = (*server).clone();
    rogue_server.cert_resolver = client_only;
    let e = client_refused(connect(&base, &Arc::new(rogue_server)));
    assert_eq!(
        e,
        rustls::Error::InvalidCertificate(CertificateError::InvalidPurpose)
    );
}
