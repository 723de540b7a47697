//! Leaf and root rotation: what new and old handshakes see.

use super::*;

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
