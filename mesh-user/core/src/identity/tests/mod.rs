//! Real TLS handshakes between mesh configs over an in-memory transport: one file per area,
//! the mesh fixture and the transport here.

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

mod handshake;
mod protocol;
mod resumption;
mod rotation;
mod trust_domain;
