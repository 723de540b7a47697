//! Real TLS handshakes between mesh configs over an in-memory transport.

use std::io::{Read, Write};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::ResolvesClientCert;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, ClientConfig, ClientConnection, ConnectionCommon, DigitallySignedStruct,
    HandshakeKind, PeerIncompatible, ProtocolVersion, ServerConfig, ServerConnection,
    SignatureScheme,
};

use super::tls::provider;
use super::*;

const TD: &str = "0a1b2c3d-0000-4000-8000-00000000beef.consul";

fn svc(name: &str) -> SpiffeId {
    SpiffeId::new(TD, "default", "dc1", name).unwrap()
}

struct Mesh {
    ca: CertificateAuthority,
    trust: Arc<TrustBundle>,
}

impl Mesh {
    fn new() -> Self {
        let ca = CertificateAuthority::ephemeral(TD).unwrap();
        let trust = Arc::new(TrustBundle::new(ca.root().clone()).unwrap());
        Self { ca, trust }
    }

    fn leaf(&self, name: &str) -> Arc<LeafStore> {
        Arc::new(LeafStore::new(
            self.ca.issue_leaf(&svc(name), DEFAULT_LEAF_TTL).unwrap(),
        ))
    }

    fn leaf_valid(&self, name: &str, from: SystemTime, until: SystemTime) -> Arc<LeafStore> {
        Arc::new(LeafStore::new(
            self.ca
                .issue_leaf_with_validity(&svc(name), from, until)
                .unwrap(),
        ))
    }

    fn client(&self, source: &Arc<LeafStore>, dest: &str) -> Arc<ClientConfig> {
        client_config(Arc::clone(source), Arc::clone(&self.trust), svc(dest)).unwrap()
    }

    fn server(&self, service: &Arc<LeafStore>) -> Arc<ServerConfig> {
        server_config(Arc::clone(service), Arc::clone(&self.trust)).unwrap()
    }
}

/// Which side refused the handshake, and why.
#[derive(Debug)]
enum Refused {
    Client(rustls::Error),
    Server(rustls::Error),
}

fn endpoint() -> ServerName<'static> {
    // Mesh endpoints are dialled by IP: no DNS name to check.
    ServerName::IpAddress(IpAddr::from([10, 0, 0, 7]).into())
}

/// Moves every pending TLS record from `from` to `to`; true if anything moved.
fn transfer<A, B>(
    from: &mut ConnectionCommon<A>,
    to: &mut ConnectionCommon<B>,
) -> Result<bool, rustls::Error> {
    let mut moved = false;
    while from.wants_write() {
        let mut buf = Vec::new();
        from.write_tls(&mut buf).unwrap();
        moved |= !buf.is_empty();
        let mut rest = &buf[..];
        while !rest.is_empty() {
            to.read_tls(&mut rest).unwrap();
            to.process_new_packets()?;
        }
    }
    Ok(moved)
}

/// Runs the handshake (and the post-handshake session tickets) to quiescence.
fn drive(client: &mut ClientConnection, server: &mut ServerConnection) -> Result<(), Refused> {
    for _ in 0..32 {
        let a = transfer(client, server).map_err(Refused::Server)?;
        let b = transfer(server, client).map_err(Refused::Client)?;
        if !a && !b {
            if client.is_handshaking() || server.is_handshaking() {
                break;
            }
            return Ok(());
        }
    }
    Err(Refused::Client(rustls::Error::General(
        "handshake did not complete".into(),
    )))
}

fn connect(
    client: &Arc<ClientConfig>,
    server: &Arc<ServerConfig>,
) -> Result<(ClientConnection, ServerConnection), Refused> {
    let mut c = ClientConnection::new(Arc::clone(client), endpoint()).unwrap();
    let mut s = ServerConnection::new(Arc::clone(server)).unwrap();
    drive(&mut c, &mut s)?;
    Ok((c, s))
}

/// Sends `msg` both ways over an established pair.
fn exchange(c: &mut ClientConnection, s: &mut ServerConnection, msg: &[u8]) {
    c.writer().write_all(msg).unwrap();
    drive(c, s).unwrap();
    let mut got = vec![0u8; msg.len()];
    s.reader().read_exact(&mut got).unwrap();
    assert_eq!(got, msg);
    s.writer().write_all(msg).unwrap();
    drive(c, s).unwrap();
    let mut got = vec![0u8; msg.len()];
    c.reader().read_exact(&mut got).unwrap();
    assert_eq!(got, msg);
}

fn client_refused(r: Result<(ClientConnection, ServerConnection), Refused>) -> rustls::Error {
    match r {
        Err(Refused::Client(e)) => e,
        Err(Refused::Server(e)) => panic!("expected the client to refuse, the server did: {e}"),
        Ok(_) => panic!("handshake succeeded"),
    }
}

fn server_refused(r: Result<(ClientConnection, ServerConnection), Refused>) -> rustls::Error {
    match r {
        Err(Refused::Server(e)) => e,
        Err(Refused::Client(e)) => panic!("expected the server to refuse, the client did: {e}"),
        Ok(_) => panic!("handshake succeeded"),
    }
}

/// The identity module's error inside a rustls certificate error.
fn mesh_error(e: &rustls::Error) -> &Error {
    match e {
        rustls::Error::InvalidCertificate(CertificateError::Other(other)) => other
            .0
            .downcast_ref::<Error>()
            .unwrap_or_else(|| panic!("not an identity error: {e}")),
        other => panic!("not a certificate error from the identity module: {other}"),
    }
}

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

/// Accepts no server: used where the handshake must fail before certificates are looked at.
#[derive(Debug)]
struct RefuseAll;

impl ServerCertVerifier for RefuseAll {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Err(rustls::Error::General("refuse all".into()))
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("refuse all".into()))
    }

    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("refuse all".into()))
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[test]
fn only_tls13_is_negotiated() {
    let mesh = Mesh::new();
    let web = mesh.leaf("web");
    let api = mesh.leaf("api");

    // A TLS 1.2-only client is turned away by the mesh server.
    let tls12_client = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(RefuseAll))
        .with_client_cert_resolver(Arc::clone(&web) as Arc<dyn ResolvesClientCert>);
    let e = server_refused(connect(&Arc::new(tls12_client), &mesh.server(&api)));
    assert_eq!(
        e,
        rustls::Error::PeerIncompatible(PeerIncompatible::Tls12NotOfferedOrEnabled)
    );

    // A mesh client refuses a TLS 1.2-only server.
    let tls12_server = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .with_no_client_auth()
        .with_cert_resolver(Arc::clone(&api) as Arc<dyn rustls::server::ResolvesServerCert>);
    let r = connect(&mesh.client(&web, "api"), &Arc::new(tls12_server));
    let e = server_refused(r);
    assert_eq!(
        e,
        rustls::Error::PeerIncompatible(PeerIncompatible::Tls12NotOfferedOrEnabled)
    );
}

/// The resumption switch: the same pair of configs resumes the second connection with it on,
/// and makes a full handshake every time with it off (on either side alone too).
#[test]
fn resumption_can_be_switched_off() {
    let mesh = Mesh::new();
    let web = mesh.leaf("web");
    let api = mesh.leaf("api");
    let on = TlsOptions::default();
    let off = TlsOptions { resumption: false };
    assert!(on.resumption);
    let client = |o: TlsOptions| {
        client_config_with(Arc::clone(&web), Arc::clone(&mesh.trust), svc("api"), o).unwrap()
    };
    let server =
        |o: TlsOptions| server_config_with(Arc::clone(&api), Arc::clone(&mesh.trust), o).unwrap();
    let kinds = |c: &Arc<ClientConfig>, s: &Arc<ServerConfig>| {
        (0..3)
            .map(|_| {
                let (mut c, mut s) = connect(c, s).unwrap();
                exchange(&mut c, &mut s, b"ping");
                assert_eq!(peer_identity(&s).unwrap(), svc("web"));
                (c.handshake_kind().unwrap(), s.handshake_kind().unwrap())
            })
            .collect::<Vec<_>>()
    };
    use HandshakeKind::{Full, Resumed};
    assert_eq!(
        kinds(&client(on), &server(on)),
        [(Full, Full), (Resumed, Resumed), (Resumed, Resumed)]
    );
    assert_eq!(kinds(&client(off), &server(off)), [(Full, Full); 3]);
    // Either side alone turns it off: the client offers nothing, or the server issues nothing.
    assert_eq!(kinds(&client(off), &server(on)), [(Full, Full); 3]);
    assert_eq!(kinds(&client(on), &server(off)), [(Full, Full); 3]);
    // The cache builds its configs with its options.
    let cache = ClientConfigCache::with_options(Arc::clone(&mesh.trust), off);
    let cached = cache.get(&web, &svc("api")).unwrap();
    assert_eq!(kinds(&cached, &server(on)), [(Full, Full); 3]);
}

#[test]
fn second_connection_resumes_the_session() {
    let mesh = Mesh::new();
    let web = mesh.leaf("web");
    let api = mesh.leaf("api");
    let cache = ClientConfigCache::new(Arc::clone(&mesh.trust));
    let server = mesh.server(&api);

    let first = cache.get(&web, &svc("api")).unwrap();
    let (c1, _s1) = connect(&first, &server).unwrap();
    assert_eq!(c1.handshake_kind(), Some(HandshakeKind::Full));

    let second = cache.get(&web, &svc("api")).unwrap();
    assert!(
        Arc::ptr_eq(&first, &second),
        "one config per (source, destination)"
    );
    let (mut c2, mut s2) = connect(&second, &server).unwrap();
    assert_eq!(c2.handshake_kind(), Some(HandshakeKind::Resumed));
    assert_eq!(s2.handshake_kind(), Some(HandshakeKind::Resumed));
    // The caller's identity survives resumption.
    assert_eq!(peer_identity(&s2).unwrap(), svc("web"));
    assert_eq!(peer_identity(&c2).unwrap(), svc("api"));
    exchange(&mut c2, &mut s2, b"again");

    // Another destination, or a fresh config, does not share sessions.
    let other = cache.get(&web, &svc("billing")).unwrap();
    assert!(!Arc::ptr_eq(&first, &other));
    let fresh = mesh.client(&web, "api");
    let (c3, _s3) = connect(&fresh, &server).unwrap();
    assert_eq!(c3.handshake_kind(), Some(HandshakeKind::Full));

    // A new leaf store for the source replaces the cached config.
    let web2 = mesh.leaf("web");
    let replaced = cache.get(&web2, &svc("api")).unwrap();
    assert!(!Arc::ptr_eq(&first, &replaced));
    cache.remove_source(&svc("web"));
    assert!(!Arc::ptr_eq(
        &replaced,
        &cache.get(&web2, &svc("api")).unwrap()
    ));
}

#[test]
fn client_forgets_sessions_on_a_bundle_change() {
    let mut mesh = Mesh::new();
    let web = mesh.leaf("web");
    let api = mesh.leaf("api");
    let client = mesh.client(&web, "api");
    // The server's bundle is another instance that does not change, so it would accept the old
    // tickets: only the client's own check can stop resumption.
    let server_trust = Arc::new(TrustBundle::new(mesh.ca.root().clone()).unwrap());
    let server = server_config(Arc::clone(&api), server_trust).unwrap();
    connect(&client, &server).unwrap();
    let (c, _) = connect(&client, &server).unwrap();
    assert_eq!(c.handshake_kind(), Some(HandshakeKind::Resumed));

    let new_root = mesh.ca.rotate().unwrap();
    mesh.trust.add_active_root(new_root).unwrap();
    let (c, s) = connect(&client, &server).unwrap();
    assert_eq!(c.handshake_kind(), Some(HandshakeKind::Full));
    assert_eq!(s.handshake_kind(), Some(HandshakeKind::Full));
    let (c, _) = connect(&client, &server).unwrap();
    assert_eq!(c.handshake_kind(), Some(HandshakeKind::Resumed));
}

#[test]
fn swapped_leaf_is_served_to_new_handshakes_only() {
    let mesh = Mesh::new();
    let web = mesh.leaf("web");
    let api = mesh.leaf("api");
    let server = mesh.server(&api);
    let old_cert = api.current().cert_der().clone();

    let (mut c1, mut s1) = connect(&mesh.client(&web, "api"), &server).unwrap();
    assert_eq!(c1.peer_certificates().unwrap()[0], old_cert);

    let renewed = mesh.ca.issue_leaf(&svc("api"), DEFAULT_LEAF_TTL).unwrap();
    let new_cert = renewed.cert_der().clone();
    assert_ne!(new_cert, old_cert);
    api.replace(renewed).unwrap();

    // The established connection goes on.
    exchange(&mut c1, &mut s1, b"still here");
    // A new handshake (fresh config, so no resumption) gets the new leaf.
    let (c2, s2) = connect(&mesh.client(&web, "api"), &server).unwrap();
    assert_eq!(c2.handshake_kind(), Some(HandshakeKind::Full));
    assert_eq!(c2.peer_certificates().unwrap()[0], new_cert);
    assert_eq!(peer_identity(&s2).unwrap(), svc("web"));

    // The client side renews the same way.
    let old_web = web.current().cert_der().clone();
    web.replace(mesh.ca.issue_leaf(&svc("web"), DEFAULT_LEAF_TTL).unwrap())
        .unwrap();
    let (_c3, s3) = connect(&mesh.client(&web, "api"), &server).unwrap();
    let presented = &s3.peer_certificates().unwrap()[0];
    assert_ne!(presented, &old_web);
    assert_eq!(presented, web.current().cert_der());
}

#[test]
fn old_root_leaves_verify_until_the_old_root_is_retired() {
    let mut mesh = Mesh::new();
    let old_root = mesh.ca.root().clone();
    let web_old = mesh.leaf("web");
    let api_old = mesh.leaf("api");

    let new_root = mesh.ca.rotate().unwrap();
    mesh.trust.add_active_root(new_root.clone()).unwrap();
    let web_new = mesh.leaf("web");
    let api_new = mesh.leaf("api");
    assert_eq!(mesh.trust.signer_of(&web_new.current()), Some(new_root));
    assert_eq!(
        mesh.trust.signer_of(&api_old.current()),
        Some(old_root.clone())
    );

    // Both roots trusted: every mix of old and new leaves connects.
    for (client, server) in [
        (&web_old, &api_old),
        (&web_old, &api_new),
        (&web_new, &api_old),
        (&web_new, &api_new),
    ] {
        let (_c, s) = connect(&mesh.client(client, "api"), &mesh.server(server)).unwrap();
        assert_eq!(peer_identity(&s).unwrap(), svc("web"));
    }
    let leaves = [web_old.current(), api_new.current(), api_old.current()];
    let stale: Vec<_> = mesh
        .trust
        .stale_leaves(leaves.iter().map(|l| &**l))
        .into_iter()
        .map(|l| l.cert_der().clone())
        .collect();
    assert_eq!(
        stale,
        vec![
            web_old.current().cert_der().clone(),
            api_old.current().cert_der().clone()
        ]
    );

    mesh.trust.retire_root(&old_root).unwrap();
    // A server still on an old-root leaf is refused by clients...
    let e = client_refused(connect(
        &mesh.client(&web_new, "api"),
        &mesh.server(&api_old),
    ));
    assert_eq!(
        e,
        rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer)
    );
    // ...and a client still on one is refused by servers, even on a config built before.
    let server = mesh.server(&api_new);
    let e = server_refused(connect(&mesh.client(&web_old, "api"), &server));
    assert_eq!(
        e,
        rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer)
    );
    connect(&mesh.client(&web_new, "api"), &server).unwrap();
}

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

#[test]
fn server_refuses_tickets_from_before_a_bundle_change() {
    let mut mesh = Mesh::new();
    let web = mesh.leaf("web");
    let api = mesh.leaf("api");
    // The client's bundle is another instance that does not change, so the client keeps its
    // tickets and offers them: only the server's own check can refuse them.
    let client_trust = Arc::new(TrustBundle::new(mesh.ca.root().clone()).unwrap());
    let client = client_config(Arc::clone(&web), client_trust, svc("api")).unwrap();
    let server = mesh.server(&api);
    connect(&client, &server).unwrap();
    let (c, _) = connect(&client, &server).unwrap();
    assert_eq!(c.handshake_kind(), Some(HandshakeKind::Resumed));

    let new_root = mesh.ca.rotate().unwrap();
    mesh.trust.add_active_root(new_root).unwrap();
    let (c, s) = connect(&client, &server).unwrap();
    assert_eq!(s.handshake_kind(), Some(HandshakeKind::Full));
    assert_eq!(c.handshake_kind(), Some(HandshakeKind::Full));
}

/// Ticketer that is off, so that the server resumes from its session cache instead.
#[derive(Debug)]
struct NoTickets;

impl rustls::server::ProducesTickets for NoTickets {
    fn enabled(&self) -> bool {
        false
    }

    fn lifetime(&self) -> u32 {
        0
    }

    fn encrypt(&self, _: &[u8]) -> Option<Vec<u8>> {
        None
    }

    fn decrypt(&self, _: &[u8]) -> Option<Vec<u8>> {
        None
    }
}

#[test]
fn server_session_cache_resumes_and_is_bound_to_the_bundle() {
    let mut mesh = Mesh::new();
    let web = mesh.leaf("web");
    let api = mesh.leaf("api");
    let client_trust = Arc::new(TrustBundle::new(mesh.ca.root().clone()).unwrap());
    let client = client_config(Arc::clone(&web), client_trust, svc("api")).unwrap();
    let mut stateful = (*mesh.server(&api)).clone();
    stateful.ticketer = Arc::new(NoTickets);
    let server = Arc::new(stateful);

    connect(&client, &server).unwrap();
    let (c, s) = connect(&client, &server).unwrap();
    assert_eq!(c.handshake_kind(), Some(HandshakeKind::Resumed));
    assert_eq!(peer_identity(&s).unwrap(), svc("web"));

    let new_root = mesh.ca.rotate().unwrap();
    mesh.trust.add_active_root(new_root).unwrap();
    let (_, s) = connect(&client, &server).unwrap();
    assert_eq!(s.handshake_kind(), Some(HandshakeKind::Full));
}
