//! rustls configurations for mesh mTLS: TLS 1.3 only, crypto provider `ring`, peers chained to
//! the [`TrustBundle`] and identified by their SPIFFE IDs.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, OnceLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ClientSessionMemoryCache, ClientSessionStore, Resumption};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{
    NoServerSessionStorage, ProducesTickets, ServerSessionMemoryCache, StoresServerSessions,
};
use rustls::{
    CertificateError, ClientConfig, CommonState, DigitallySignedStruct, DistinguishedName,
    NamedGroup, OtherError, ServerConfig, SignatureScheme,
};

use super::ca::{parse_cert, uris};
use super::leaf::LeafStore;
use super::spiffe::SpiffeId;
use super::trust::TrustBundle;
use super::Error;

/// How many sessions the client and server caches keep.
const SESSION_CACHE_SIZE: usize = 1024;

/// The crypto provider of every mesh config: `ring`.
pub(crate) fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    Arc::clone(PROVIDER.get_or_init(|| {
        let mut provider = rustls::crypto::ring::default_provider();
        // TLS13_AES_128_GCM_SHA256 first (ring lists the SHA-384 suite first), as BoringSSL
        // and so Envoy order them: its key schedule and every resumed handshake hash with
        // SHA-256, which CPUs with SHA extensions run in hardware, where ring's SHA-512 has
        // no hardware path.
        let preferred = rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256;
        provider
            .cipher_suites
            .sort_by_key(|s| s.suite() != preferred.suite());
        Arc::new(provider)
    }))
}

/// The SPIFFE ID in a certificate's URI SAN. An X.509 SVID carries exactly one URI SAN.
///
/// # Errors
///
/// [`Error::BadCertificate`] if the DER does not parse or has no URI SAN or more than one,
/// [`Error::InvalidSpiffeId`] if the URI is not a service SPIFFE ID.
pub fn spiffe_id_from_cert(cert: &CertificateDer<'_>) -> Result<SpiffeId, Error> {
    let parsed = parse_cert(cert)?;
    match uris(&parsed)?.as_slice() {
        [uri] => uri.parse(),
        [] => Err(Error::BadCertificate("no URI SAN".into())),
        _ => Err(Error::BadCertificate("more than one URI SAN".into())),
    }
}

/// The identity of the peer of an established connection (client or server side): the SPIFFE
/// ID of its verified end-entity certificate. On the server side this is the caller whose
/// intentions apply.
///
/// # Errors
///
/// [`Error::NoPeerCertificate`] before the handshake completes or without a client
/// certificate, and the errors of [`spiffe_id_from_cert`].
pub fn peer_identity(conn: &CommonState) -> Result<SpiffeId, Error> {
    let cert = conn
        .peer_certificates()
        .and_then(|chain| chain.first())
        .ok_or(Error::NoPeerCertificate)?;
    spiffe_id_from_cert(cert)
}

/// Options of the mesh TLS configs beyond identities and trust. [`Default`] is what production
/// uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TlsOptions {
    /// TLS session resumption: the client keeps session tickets, the server issues tickets and
    /// keeps a session cache. Off, every connection makes a full handshake (certificate
    /// signatures and chain checks both ways), which is what the benchmark compares against.
    pub resumption: bool,
}

impl Default for TlsOptions {
    fn default() -> Self {
        Self { resumption: true }
    }
}

/// A client config for connections from `source` to the service `destination`, with the
/// default [`TlsOptions`] (resumption on).
///
/// # Errors
///
/// As [`client_config_with`].
pub fn client_config(
    source: Arc<LeafStore>,
    trust: Arc<TrustBundle>,
    destination: SpiffeId,
) -> Result<Arc<ClientConfig>, Error> {
    client_config_with(source, trust, destination, TlsOptions::default())
}

/// A client config for connections from `source` to the service `destination`.
///
/// The server must present a certificate that chains to `trust` and whose SPIFFE ID equals
/// `destination` (trust domain, partition, namespace, datacenter and service); the TLS server
/// name is not checked, since mesh endpoints are dialled by IP. The client authenticates with
/// `source`'s current leaf. With `options.resumption`, sessions are resumed when the same config
/// is used again (prefer [`ClientConfigCache`] to share one config per source and destination);
/// without, the config keeps no session and every handshake is a full one.
///
/// # Errors
///
/// [`Error::TrustDomainMismatch`] if `source` or `destination` is not of the bundle's trust
/// domain, [`Error::Tls`] if rustls refuses the configuration.
pub fn client_config_with(
    source: Arc<LeafStore>,
    trust: Arc<TrustBundle>,
    destination: SpiffeId,
    options: TlsOptions,
) -> Result<Arc<ClientConfig>, Error> {
    same_trust_domain(&trust, source.id())?;
    same_trust_domain(&trust, &destination)?;
    let provider = provider();
    let verifier = Arc::new(SpiffeServerVerifier {
        trust: Arc::clone(&trust),
        expected: destination,
        provider: Arc::clone(&provider),
    });
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(source);
    config.resumption = if options.resumption {
        Resumption::store(Arc::new(BundleBoundClientSessions::new(trust)))
    } else {
        Resumption::disabled()
    };
    Ok(Arc::new(config))
}

/// The server config of a service's inbound listener, with the default [`TlsOptions`]
/// (resumption on).
///
/// # Errors
///
/// As [`server_config_with`].
pub fn server_config(
    service: Arc<LeafStore>,
    trust: Arc<TrustBundle>,
) -> Result<Arc<ServerConfig>, Error> {
    server_config_with(service, trust, TlsOptions::default())
}

/// The server config of a service's inbound listener.
///
/// It serves `service`'s current leaf and requires a client certificate that chains to `trust`
/// and carries a SPIFFE ID of the bundle's trust domain; read it with [`peer_identity`] after
/// the handshake. With `options.resumption`, resumption uses session tickets and a session
/// cache, so use one config for all of a service's inbound connections; without, the server
/// issues no ticket and stores no session.
///
/// # Errors
///
/// [`Error::TrustDomainMismatch`] if `service` is not of the bundle's trust domain,
/// [`Error::Tls`] if rustls refuses the configuration.
pub fn server_config_with(
    service: Arc<LeafStore>,
    trust: Arc<TrustBundle>,
    options: TlsOptions,
) -> Result<Arc<ServerConfig>, Error> {
    same_trust_domain(&trust, service.id())?;
    let provider = provider();
    let verifier = Arc::new(SpiffeClientVerifier {
        trust: Arc::clone(&trust),
        provider: Arc::clone(&provider),
    });
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(service);
    if !options.resumption {
        // The builder's default ticketer issues none; a session store that keeps nothing
        // leaves nothing to resume.
        config.session_storage = Arc::new(NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
        return Ok(Arc::new(config));
    }
    config.session_storage = Arc::new(BundleBoundServerSessions {
        inner: ServerSessionMemoryCache::new(SESSION_CACHE_SIZE),
        trust: Arc::clone(&trust),
    });
    config.ticketer = Arc::new(BundleBoundTickets {
        inner: rustls::crypto::ring::Ticketer::new()?,
        trust,
    });
    Ok(Arc::new(config))
}

fn same_trust_domain(trust: &TrustBundle, id: &SpiffeId) -> Result<(), Error> {
    if id.trust_domain() == trust.trust_domain() {
        Ok(())
    } else {
        Err(Error::TrustDomainMismatch {
            expected: trust.trust_domain().to_owned(),
            got: id.trust_domain().to_owned(),
        })
    }
}

/// Cached configs by (source, destination), with the leaf store each was built on.
type ConfigMap = HashMap<(SpiffeId, SpiffeId), (Arc<LeafStore>, Arc<ClientConfig>)>;

/// One shared client config per (source service, destination service), so that connections
/// between the same pair resume their TLS sessions.
pub struct ClientConfigCache {
    trust: Arc<TrustBundle>,
    options: TlsOptions,
    configs: Mutex<ConfigMap>,
}

impl ClientConfigCache {
    /// An empty cache for configs verifying against `trust`, with the default [`TlsOptions`].
    pub fn new(trust: Arc<TrustBundle>) -> Self {
        Self::with_options(trust, TlsOptions::default())
    }

    /// An empty cache whose configs are made with `options`.
    pub fn with_options(trust: Arc<TrustBundle>, options: TlsOptions) -> Self {
        Self {
            trust,
            options,
            configs: Mutex::new(HashMap::new()),
        }
    }

    /// The config for connections from `source` to `destination`, made on first use. A new
    /// [`LeafStore`] for the same source identity replaces the cached config.
    ///
    /// # Errors
    ///
    /// As [`client_config_with`]; nothing is cached then.
    pub fn get(
        &self,
        source: &Arc<LeafStore>,
        destination: &SpiffeId,
    ) -> Result<Arc<ClientConfig>, Error> {
        let key = (source.id().clone(), destination.clone());
        let mut configs = self.configs.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((store, config)) = configs.get(&key) {
            if Arc::ptr_eq(store, source) {
                return Ok(Arc::clone(config));
            }
        }
        let config = client_config_with(
            Arc::clone(source),
            Arc::clone(&self.trust),
            destination.clone(),
            self.options,
        )?;
        configs.insert(key, (Arc::clone(source), Arc::clone(&config)));
        Ok(config)
    }

    /// Drops every config of `source` (when its workload goes away).
    pub fn remove_source(&self, source: &SpiffeId) {
        self.configs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|(src, _), _| src != source);
    }
}

impl fmt::Debug for ClientConfigCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.configs.lock().map(|c| c.len()).unwrap_or(0);
        f.debug_struct("ClientConfigCache")
            .field("trust", &self.trust)
            .field("options", &self.options)
            .field("configs", &n)
            .finish()
    }
}

/// Checks a server's chain against the bundle (no DNS/IP name check) and its SPIFFE ID against
/// the destination that was dialled.
#[derive(Debug)]
struct SpiffeServerVerifier {
    trust: Arc<TrustBundle>,
    expected: SpiffeId,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let state = self.trust.snapshot();
        let cert = webpki::EndEntityCert::try_from(end_entity).map_err(pki_error)?;
        cert.verify_for_usage(
            self.provider.signature_verification_algorithms.all,
            &state.anchors,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
            None,
            None,
        )
        .map_err(pki_error)?;
        let presented = spiffe_id_from_cert(end_entity).map_err(other_error)?;
        if presented != self.expected {
            return Err(other_error(Error::UnexpectedPeer {
                expected: Box::new(self.expected.clone()),
                got: Box::new(presented),
            }));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Requires a client certificate chained to the bundle (checked by rustls'
/// `WebPkiClientVerifier` over the current roots) that carries a SPIFFE service ID of the
/// bundle's trust domain.
#[derive(Debug)]
struct SpiffeClientVerifier {
    trust: Arc<TrustBundle>,
    provider: Arc<CryptoProvider>,
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // Mesh clients have a single certificate; hints would only grow the handshake.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let state = self.trust.snapshot();
        state
            .client_verifier
            .verify_client_cert(end_entity, intermediates, now)?;
        let id = spiffe_id_from_cert(end_entity).map_err(other_error)?;
        same_trust_domain(&self.trust, &id).map_err(other_error)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

fn other_error(e: Error) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
}

/// Maps webpki's verdicts to rustls' certificate errors (as rustls' own verifiers do).
fn pki_error(e: webpki::Error) -> rustls::Error {
    use webpki::Error as E;
    let ce = match e {
        E::BadDer | E::BadDerTime | E::TrailingData(_) => CertificateError::BadEncoding,
        E::CertNotValidYet { time, not_before } => {
            CertificateError::NotValidYetContext { time, not_before }
        }
        E::CertExpired { time, not_after } => CertificateError::ExpiredContext { time, not_after },
        E::InvalidCertValidity => CertificateError::Expired,
        E::UnknownIssuer => CertificateError::UnknownIssuer,
        E::CertRevoked => CertificateError::Revoked,
        E::InvalidSignatureForPublicKey => CertificateError::BadSignature,
        E::RequiredEkuNotFoundContext(_) => CertificateError::InvalidPurpose,
        other => CertificateError::Other(OtherError(Arc::new(other))),
    };
    rustls::Error::InvalidCertificate(ce)
}

/// Client session store that forgets every session when the trust bundle changes.
#[derive(Debug)]
struct BundleBoundClientSessions {
    trust: Arc<TrustBundle>,
    inner: Mutex<(u64, Arc<ClientSessionMemoryCache>)>,
}

impl BundleBoundClientSessions {
    fn new(trust: Arc<TrustBundle>) -> Self {
        let generation = trust.generation();
        Self {
            trust,
            inner: Mutex::new((
                generation,
                Arc::new(ClientSessionMemoryCache::new(SESSION_CACHE_SIZE)),
            )),
        }
    }

    fn current(&self) -> Arc<ClientSessionMemoryCache> {
        let generation = self.trust.generation();
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if inner.0 != generation {
            *inner = (
                generation,
                Arc::new(ClientSessionMemoryCache::new(SESSION_CACHE_SIZE)),
            );
        }
        Arc::clone(&inner.1)
    }
}

impl ClientSessionStore for BundleBoundClientSessions {
    fn set_kx_hint(&self, server_name: ServerName<'static>, group: NamedGroup) {
        self.current().set_kx_hint(server_name, group);
    }

    fn kx_hint(&self, server_name: &ServerName<'_>) -> Option<NamedGroup> {
        self.current().kx_hint(server_name)
    }

    fn set_tls12_session(
        &self,
        server_name: ServerName<'static>,
        value: rustls::client::Tls12ClientSessionValue,
    ) {
        self.current().set_tls12_session(server_name, value);
    }

    fn tls12_session(
        &self,
        server_name: &ServerName<'_>,
    ) -> Option<rustls::client::Tls12ClientSessionValue> {
        self.current().tls12_session(server_name)
    }

    fn remove_tls12_session(&self, server_name: &ServerName<'static>) {
        self.current().remove_tls12_session(server_name);
    }

    fn insert_tls13_ticket(
        &self,
        server_name: ServerName<'static>,
        value: rustls::client::Tls13ClientSessionValue,
    ) {
        self.current().insert_tls13_ticket(server_name, value);
    }

    fn take_tls13_ticket(
        &self,
        server_name: &ServerName<'static>,
    ) -> Option<rustls::client::Tls13ClientSessionValue> {
        self.current().take_tls13_ticket(server_name)
    }
}

/// Prefixes `value` with the bundle generation.
fn tag(generation: u64, value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + value.len());
    out.extend_from_slice(&generation.to_be_bytes());
    out.extend_from_slice(value);
    out
}

/// The value behind a generation prefix, if the prefix is `generation`.
fn untag(generation: u64, tagged: &[u8]) -> Option<Vec<u8>> {
    let (prefix, value) = tagged.split_at_checked(8)?;
    (prefix == generation.to_be_bytes()).then(|| value.to_vec())
}

/// Server session cache whose entries are valid only for the bundle generation they were made in.
#[derive(Debug)]
struct BundleBoundServerSessions {
    inner: Arc<ServerSessionMemoryCache>,
    trust: Arc<TrustBundle>,
}

impl StoresServerSessions for BundleBoundServerSessions {
    fn put(&self, key: Vec<u8>, value: Vec<u8>) -> bool {
        self.inner.put(key, tag(self.trust.generation(), &value))
    }

    fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        untag(self.trust.generation(), &self.inner.get(key)?)
    }

    fn take(&self, key: &[u8]) -> Option<Vec<u8>> {
        untag(self.trust.generation(), &self.inner.take(key)?)
    }

    fn can_cache(&self) -> bool {
        self.inner.can_cache()
    }
}

/// Session tickets that carry (encrypted) the bundle generation they were issued in and are
/// refused after a change.
#[derive(Debug)]
struct BundleBoundTickets {
    inner: Arc<dyn ProducesTickets>,
    trust: Arc<TrustBundle>,
}

impl ProducesTickets for BundleBoundTickets {
    fn enabled(&self) -> bool {
        self.inner.enabled()
    }

    fn lifetime(&self) -> u32 {
        self.inner.lifetime()
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        self.inner.encrypt(&tag(self.trust.generation(), plain))
    }

    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        untag(self.trust.generation(), &self.inner.decrypt(cipher)?)
    }
}
