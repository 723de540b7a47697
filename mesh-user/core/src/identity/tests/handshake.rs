//! Handshakes that succeed, and peers refused for their certificate: issuer, identity, validity.

use super::*;

#[test]
fn good_handshake_and_server_sees_caller() {
    let mesh = Mesh::new();
    let web = mesh.leaf("web");
    let api = mesh.leaf("api");
    let (mut c, mut s) = connect(&mesh.client(&web, "api"), &mesh.server(&api)).unwrap();
    assert_eq!(peer_identity(&s).unwrap(), svc("web"));
    assert_eq!(peer_identity(&c).unwrap(), svc("api"));
    assert_eq!(c.protocol_version(), Some(ProtocolVersion::TLSv1_3));
    assert_eq!(s.protocol_version(), Some(ProtocolVersion::TLSv1_3));
    assert_eq!(c.handshake_kind(), Some(HandshakeKind::Full));
    // The SHA-256 suite, as Envoy negotiates between Consul sidecars.
    assert_eq!(
        c.negotiated_cipher_suite().map(|s| s.suite()),
        Some(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256)
    );
    exchange(&mut c, &mut s, b"GET / HTTP/1.1\r\n\r\n");
}

#[test]
fn partitioned_identities_work_end_to_end() {
    let mesh = Mesh::new();
    let web_id = svc("web").with_partition("team-a").unwrap();
    let web = Arc::new(LeafStore::new(
        mesh.ca.issue_leaf(&web_id, DEFAULT_LEAF_TTL).unwrap(),
    ));
    let api = mesh.leaf("api");
    let (_c, s) = connect(&mesh.client(&web, "api"), &mesh.server(&api)).unwrap();
    let caller = peer_identity(&s).unwrap();
    assert_eq!(caller, web_id);
    assert_eq!(caller.partition(), "team-a");
}

#[test]
fn peer_identity_needs_a_completed_handshake() {
    let mesh = Mesh::new();
    let web = mesh.leaf("web");
    let c = ClientConnection::new(mesh.client(&web, "api"), endpoint()).unwrap();
    assert!(matches!(peer_identity(&c), Err(Error::NoPeerCertificate)));
}

#[test]
fn server_cert_from_another_ca_is_refused() {
    let mesh = Mesh::new();
    // Same trust domain, different root key: an impostor CA.
    let rogue = CertificateAuthority::ephemeral(TD).unwrap();
    let web = mesh.leaf("web");
    let fake_api = Arc::new(LeafStore::new(
        rogue.issue_leaf(&svc("api"), DEFAULT_LEAF_TTL).unwrap(),
    ));
    let rogue_trust = Arc::new(TrustBundle::new(rogue.root().clone()).unwrap());
    let rogue_server = server_config(fake_api, rogue_trust).unwrap();
    let e = client_refused(connect(&mesh.client(&web, "api"), &rogue_server));
    assert_eq!(
        e,
        rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer)
    );
}

#[test]
fn server_with_another_identity_is_refused() {
    let mesh = Mesh::new();
    let web = mesh.leaf("web");
    let billing = mesh.leaf("billing");
    let e = client_refused(connect(&mesh.client(&web, "api"), &mesh.server(&billing)));
    match mesh_error(&e) {
        Error::UnexpectedPeer { expected, got } => {
            assert_eq!(**expected, svc("api"));
            assert_eq!(**got, svc("billing"));
        }
        other => panic!("{other}"),
    }

    // Same service name elsewhere (namespace, datacenter, partition) is another identity too.
    let api_server = mesh.server(&mesh.leaf("api"));
    for dest in [
        SpiffeId::new(TD, "other-ns", "dc1", "api").unwrap(),
        SpiffeId::new(TD, "default", "dc2", "api").unwrap(),
        svc("api").with_partition("team-b").unwrap(),
    ] {
        let config = client_config(Arc::clone(&web), Arc::clone(&mesh.trust), dest).unwrap();
        let e = client_refused(connect(&config, &api_server));
        assert!(
            matches!(mesh_error(&e), Error::UnexpectedPeer { .. }),
            "{e}"
        );
    }
}

/// A client that offers no certificate.
#[derive(Debug)]
struct NoClientCert;

impl ResolvesClientCert for NoClientCert {
    fn resolve(&self, _: &[&[u8]], _: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        None
    }

    fn has_certs(&self) -> bool {
        false
    }
}

#[test]
fn client_without_certificate_is_refused() {
    let mesh = Mesh::new();
    let web = mesh.leaf("web");
    let api = mesh.leaf("api");
    let mut anonymous = (*mesh.client(&web, "api")).clone();
    anonymous.client_auth_cert_resolver = Arc::new(NoClientCert);
    let e = server_refused(connect(&Arc::new(anonymous), &mesh.server(&api)));
    assert_eq!(e, rustls::Error::NoCertificatesPresented);
}

#[test]
fn client_cert_from_another_ca_is_refused() {
    let mesh = Mesh::new();
    let rogue = CertificateAuthority::ephemeral(TD).unwrap();
    let fake_web = Arc::new(LeafStore::new(
        rogue.issue_leaf(&svc("web"), DEFAULT_LEAF_TTL).unwrap(),
    ));
    let api = mesh.leaf("api");
    // The client trusts the real mesh (so it accepts the server) but presents a rogue leaf.
    let config = client_config(fake_web, Arc::clone(&mesh.trust), svc("api")).unwrap();
    let e = server_refused(connect(&config, &mesh.server(&api)));
    assert_eq!(
        e,
        rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer)
    );
}

#[test]
fn expired_and_not_yet_valid_leaves_are_refused() {
    let mesh = Mesh::new();
    let now = SystemTime::now();
    let hour = Duration::from_secs(3600);
    let web = mesh.leaf("web");
    let api = mesh.leaf("api");

    let expired_api = mesh.leaf_valid("api", now - 3 * hour, now - hour);
    let e = client_refused(connect(
        &mesh.client(&web, "api"),
        &mesh.server(&expired_api),
    ));
    assert!(
        matches!(
            e,
            rustls::Error::InvalidCertificate(CertificateError::ExpiredContext { .. })
        ),
        "{e:?}"
    );

    let future_api = mesh.leaf_valid("api", now + hour, now + 3 * hour);
    let e = client_refused(connect(
        &mesh.client(&web, "api"),
        &mesh.server(&future_api),
    ));
    assert!(
        matches!(
            e,
            rustls::Error::InvalidCertificate(CertificateError::NotValidYetContext { .. })
        ),
        "{e:?}"
    );

    let expired_web = mesh.leaf_valid("web", now - 3 * hour, now - hour);
    let e = server_refused(connect(
        &mesh.client(&expired_web, "api"),
        &mesh.server(&api),
    ));
    assert!(
        matches!(
            e,
            rustls::Error::InvalidCertificate(CertificateError::ExpiredContext { .. })
        ),
        "{e:?}"
    );

    let future_web = mesh.leaf_valid("web", now + hour, now + 3 * hour);
    let e = server_refused(connect(
        &mesh.client(&future_web, "api"),
        &mesh.server(&api),
    ));
    assert!(
        matches!(
            e,
            rustls::Error::InvalidCertificate(CertificateError::NotValidYetContext { .. })
        ),
        "{e:?}"
    );
}
