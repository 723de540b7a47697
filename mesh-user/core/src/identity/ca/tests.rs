use super::*;

fn mode(p: &Path) -> u32 {
    fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn creates_then_reloads_the_same_root() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("ca");
    let ca = CertificateAuthority::load_or_create(&state, None).unwrap();
    let td = ca.trust_domain().to_owned();
    assert!(td.ends_with(".consul"), "{td}");
    assert_eq!(mode(&state.join(KEY_FILE)), 0o600);
    assert_eq!(mode(&state), 0o700);
    assert!(!state.join(format!(".{KEY_FILE}.tmp")).exists());

    let again = CertificateAuthority::load_or_create(&state, None).unwrap();
    assert_eq!(again.root(), ca.root());
    assert_eq!(again.trust_domain(), td);
    let named = CertificateAuthority::load_or_create(&state, Some(&td)).unwrap();
    assert_eq!(named.root(), ca.root());

    // A leaf from the reloaded CA chains to the persisted root.
    let id = SpiffeId::new(&td, "default", "dc1", "web").unwrap();
    let leaf = again.issue_leaf(&id, Duration::from_secs(3600)).unwrap();
    let cert = parse_cert(leaf.cert_der()).unwrap();
    let root = parse_cert(ca.root().der()).unwrap();
    cert.verify_signature(Some(root.public_key())).unwrap();
}

#[test]
fn root_is_a_p256_ca_with_trust_domain_uri() {
    let ca = CertificateAuthority::ephemeral("example.consul").unwrap();
    let cert = parse_cert(ca.root().der()).unwrap();
    assert!(cert.is_ca());
    assert_eq!(uris(&cert).unwrap(), vec!["spiffe://example.consul"]);
    assert_eq!(
        cert.public_key().algorithm.algorithm,
        x509_parser::oid_registry::OID_KEY_TYPE_EC_PUBLIC_KEY
    );
    let curve = cert
        .public_key()
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.as_oid().ok())
        .unwrap();
    assert_eq!(curve, x509_parser::oid_registry::OID_EC_P256);
    let ku = cert.key_usage().unwrap().unwrap().value;
    assert!(ku.key_cert_sign());
    assert_eq!(ca.root().trust_domain(), "example.consul");
    assert_eq!(ca.root().fingerprint().len(), 64);
    assert!(ca.root().pem().starts_with("-----BEGIN CERTIFICATE-----"));
}

#[test]
fn refuses_other_trust_domain_and_open_key_file() {
    let dir = tempfile::tempdir().unwrap();
    let ca = CertificateAuthority::load_or_create(dir.path(), Some("one.consul")).unwrap();
    assert_eq!(ca.trust_domain(), "one.consul");
    match CertificateAuthority::load_or_create(dir.path(), Some("two.consul")) {
        Err(Error::TrustDomainMismatch { expected, got }) => {
            assert_eq!(expected, "one.consul");
            assert_eq!(got, "two.consul");
        }
        other => panic!("{other:?}"),
    }
    fs::set_permissions(dir.path().join(KEY_FILE), fs::Permissions::from_mode(0o644)).unwrap();
    let err = CertificateAuthority::load_or_create(dir.path(), None).unwrap_err();
    assert!(matches!(err, Error::CaState { .. }), "{err}");
}

#[test]
fn garbage_state_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    CertificateAuthority::load_or_create(dir.path(), None).unwrap();
    fs::write(dir.path().join(CERT_FILE), "not a pem").unwrap();
    assert!(matches!(
        CertificateAuthority::load_or_create(dir.path(), None),
        Err(Error::CaState { .. })
    ));
    let dir = tempfile::tempdir().unwrap();
    write_durably(&dir.path().join(KEY_FILE), b"junk", 0o600).unwrap();
    assert!(matches!(
        CertificateAuthority::load_or_create(dir.path(), Some("a.consul")),
        Err(Error::CaState { .. })
    ));
}

#[test]
fn certificate_that_does_not_match_the_key_is_remade_from_the_key() {
    // As after a crash between the certificate and key renames of a rotation.
    let dir = tempfile::tempdir().unwrap();
    let ca = CertificateAuthority::load_or_create(dir.path(), None).unwrap();
    let other = CertificateAuthority::ephemeral(ca.trust_domain()).unwrap();
    write_durably(
        &dir.path().join(CERT_FILE),
        other.root().pem().as_bytes(),
        0o644,
    )
    .unwrap();
    let reloaded = CertificateAuthority::load_or_create(dir.path(), None).unwrap();
    assert_eq!(reloaded.trust_domain(), ca.trust_domain());
    assert_ne!(reloaded.root(), other.root());
    let key = KeyPair::from_pem(&fs::read_to_string(dir.path().join(KEY_FILE)).unwrap()).unwrap();
    assert!(cert_matches_key(reloaded.root().der(), &key).unwrap());
    // And it is stable from then on.
    let third = CertificateAuthority::load_or_create(dir.path(), None).unwrap();
    assert_eq!(third.root(), reloaded.root());
}

#[test]
fn key_without_certificate_needs_the_trust_domain() {
    let dir = tempfile::tempdir().unwrap();
    let ca = CertificateAuthority::load_or_create(dir.path(), None).unwrap();
    let td = ca.trust_domain().to_owned();
    fs::remove_file(dir.path().join(CERT_FILE)).unwrap();
    assert!(matches!(
        CertificateAuthority::load_or_create(dir.path(), None),
        Err(Error::CaState { .. })
    ));
    // Given the trust domain, the root is re-made from the same key.
    let remade = CertificateAuthority::load_or_create(dir.path(), Some(&td)).unwrap();
    assert_eq!(remade.trust_domain(), td);
    let key = KeyPair::from_pem(&fs::read_to_string(dir.path().join(KEY_FILE)).unwrap()).unwrap();
    assert!(cert_matches_key(remade.root().der(), &key).unwrap());
    assert!(cert_matches_key(ca.root().der(), &key).unwrap());
}

#[test]
fn certificate_without_key_is_a_crashed_first_start() {
    // The certificate is written first; a crash before the key leaves only it behind. The
    // next start keeps its trust domain and makes a fresh root.
    let dir = tempfile::tempdir().unwrap();
    let ca = CertificateAuthority::load_or_create(dir.path(), None).unwrap();
    fs::remove_file(dir.path().join(KEY_FILE)).unwrap();
    let again = CertificateAuthority::load_or_create(dir.path(), None).unwrap();
    assert_eq!(again.trust_domain(), ca.trust_domain());
    assert_ne!(again.root(), ca.root());
    assert_eq!(mode(&dir.path().join(KEY_FILE)), 0o600);
}

#[test]
fn rotation_persists_the_new_root() {
    let dir = tempfile::tempdir().unwrap();
    let mut ca = CertificateAuthority::load_or_create(dir.path(), None).unwrap();
    let old = ca.root().clone();
    let new = ca.rotate().unwrap();
    assert_ne!(old, new);
    assert_eq!(ca.root(), &new);
    assert_eq!(mode(&dir.path().join(KEY_FILE)), 0o600);
    let reloaded = CertificateAuthority::load_or_create(dir.path(), None).unwrap();
    assert_eq!(reloaded.root(), &new);
}

#[test]
fn leaf_validity_is_checked() {
    let ca = CertificateAuthority::ephemeral("a.consul").unwrap();
    let id = SpiffeId::new("a.consul", "default", "dc1", "web").unwrap();
    let now = SystemTime::now();
    assert!(matches!(
        ca.issue_leaf_with_validity(&id, now, now),
        Err(Error::InvalidValidity(_))
    ));
    assert!(matches!(
        ca.issue_leaf(&id, Duration::ZERO),
        Err(Error::InvalidValidity(_))
    ));
    assert!(matches!(
        ca.issue_leaf(&id, Duration::MAX),
        Err(Error::InvalidValidity(_))
    ));
    assert!(matches!(
        ca.issue_leaf(&id, DEFAULT_ROOT_TTL * 2),
        Err(Error::InvalidValidity(_))
    ));
    let other = SpiffeId::new("b.consul", "default", "dc1", "web").unwrap();
    assert!(matches!(
        ca.issue_leaf(&other, Duration::from_secs(60)),
        Err(Error::TrustDomainMismatch { .. })
    ));
}
