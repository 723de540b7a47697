//! Session resumption: the switch, client sessions and server tickets across bundle changes.

use super::*;

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
