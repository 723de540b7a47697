//! The protocol version: TLS 1.3 only.

use super::*;

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
