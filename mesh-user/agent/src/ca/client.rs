//! The node agent's side: asks `meshd ca` for the leaf of a service over HTTPS, with the
//! agent's projected ServiceAccount token.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use mesh_core::identity::{LeafCert, LeafRequest, RootCert, SpiffeId, TrustBundle};
use rustls::pki_types::ServerName;

use super::{ErrorBody, SignRequest, SignResponse, SIGN_PATH};

/// Where the kubelet puts the agent's projected ServiceAccount token for the CA's audience
/// (the DaemonSet's `meshd-ca-token` volume).
pub const DEFAULT_TOKEN_FILE: &str = "/var/run/secrets/meshd-ca/token";
/// Where the CA's root certificate (PEM) is mounted in the agent (the `meshd-ca-root`
/// ConfigMap).
pub const DEFAULT_ROOT_FILE: &str = "/etc/meshd-ca/root-cert.pem";
/// How long one request to the CA may take (connect, handshake, answer).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest answer the client reads, in bytes.
const MAX_RESPONSE: usize = 1024 * 1024;

/// How the agent reaches the CA.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CaClientConfig {
    /// `https://host[:port]` of `meshd ca` (`--ca-url`).
    pub url: String,
    /// The bearer token file, re-read for every request as the kubelet rotates it
    /// (`--ca-token-file`).
    pub token_file: PathBuf,
    /// The mesh's root certificate(s), PEM, the active one first (`--ca-root-file`).
    pub root_file: PathBuf,
    /// How long one request may take.
    pub timeout: Duration,
}

impl CaClientConfig {
    /// `url` with the default token and root files and timeout.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            token_file: DEFAULT_TOKEN_FILE.into(),
            root_file: DEFAULT_ROOT_FILE.into(),
            timeout: DEFAULT_TIMEOUT,
        }
    }
}

/// What can go wrong asking the CA.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The configuration is unusable (the URL).
    #[error("CA client: {0}")]
    Config(String),
    /// A file could not be read.
    #[error("{}: {source}", path.display())]
    Io {
        /// The token or root file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The CA could not be reached or the exchange failed (connect, TLS, HTTP, timeout).
    #[error("CA {url}: {message}")]
    Unreachable {
        /// The CA's URL.
        url: String,
        /// What failed.
        message: String,
    },
    /// The CA refused the request.
    #[error("CA {url} refused {id} ({status}): {message}")]
    Refused {
        /// The CA's URL.
        url: String,
        /// The identity asked for.
        id: String,
        /// The HTTP status (400, 401, 403, 503).
        status: u16,
        /// The CA's reason.
        message: String,
    },
    /// The CA's answer is malformed, or its certificate or roots are unusable.
    #[error("CA {url}: {message}")]
    BadAnswer {
        /// The CA's URL.
        url: String,
        /// What is wrong.
        message: String,
    },
    /// The root file or a certificate is invalid.
    #[error(transparent)]
    Identity(#[from] mesh_core::identity::Error),
}

/// A client of `meshd ca`.
#[derive(Debug)]
pub struct CaClient {
    cfg: CaClientConfig,
    host: String,
    port: u16,
    server_name: ServerName<'static>,
}

impl CaClient {
    /// Checks the configuration: `url` must be `https://host[:port]` (no path).
    ///
    /// # Errors
    ///
    /// [`ClientError::Config`] naming what is wrong with the URL.
    pub fn new(cfg: CaClientConfig) -> Result<Self, ClientError> {
        let bad = |why: &str| ClientError::Config(format!("--ca-url {:?}: {why}", cfg.url));
        let uri: Uri = cfg.url.parse().map_err(|_| bad("not a URL"))?;
        if uri.scheme_str() != Some("https") {
            return Err(bad("the scheme must be https"));
        }
        if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
            return Err(bad("expected https://host[:port] without a path"));
        }
        let host = uri.host().ok_or_else(|| bad("no host"))?;
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let server_name = ServerName::try_from(host.clone())
            .map_err(|_| bad("the host is not a DNS name or IP address"))?;
        Ok(Self {
            port: uri.port_u16().unwrap_or(443),
            host,
            server_name,
            cfg,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &CaClientConfig {
        &self.cfg
    }

    /// Reads the root file: one or more PEM certificates, the active root first.
    ///
    /// # Errors
    ///
    /// [`ClientError::Io`] if it cannot be read, [`ClientError::Identity`] if it holds no
    /// certificate or one that is not a mesh root.
    pub fn read_roots(&self) -> Result<Vec<RootCert>, ClientError> {
        read_roots(&self.cfg.root_file)
    }

    /// The trust bundle of the root file (the active root first, the others trusted too).
    ///
    /// # Errors
    ///
    /// As [`read_roots`](Self::read_roots), and roots of different trust domains.
    pub fn initial_bundle(&self) -> Result<TrustBundle, ClientError> {
        let roots = self.read_roots()?;
        let bundle = TrustBundle::new(roots[0].clone())?;
        update_bundle(&bundle, &roots)?;
        Ok(bundle)
    }

    /// Asks the CA for a leaf of `id` (a fresh key; the key stays here), verifying the CA's
    /// serving certificate against `bundle`, and brings `bundle` to the roots the CA answers
    /// with (new roots trusted, the active one switched, retired ones dropped).
    ///
    /// # Errors
    ///
    /// [`ClientError::Io`] for an unreadable token file, [`ClientError::Unreachable`],
    /// [`ClientError::Refused`] with the CA's reason, [`ClientError::BadAnswer`] for an answer
    /// whose leaf is not for `id`, not for this key, or not signed by one of its roots.
    pub async fn sign(&self, id: &SpiffeId, bundle: &TrustBundle) -> Result<LeafCert, ClientError> {
        let token =
            std::fs::read_to_string(&self.cfg.token_file).map_err(|source| ClientError::Io {
                path: self.cfg.token_file.clone(),
                source,
            })?;
        let request = LeafRequest::new(id)?;
        let body = serde_json::to_vec(&SignRequest {
            spiffe_id: id.to_string(),
            csr: request.csr_pem().to_owned(),
        })
        .map_err(|e| ClientError::Config(e.to_string()))?;
        let (status, answer) =
            tokio::time::timeout(self.cfg.timeout, self.post(token.trim(), body, bundle))
                .await
                .map_err(|_| {
                    self.unreachable(format!("no answer within {:?}", self.cfg.timeout))
                })??;
        if status != StatusCode::OK {
            let message = serde_json::from_slice::<ErrorBody>(&answer)
                .map(|e| e.error)
                .unwrap_or_else(|_| String::from_utf8_lossy(&answer).into_owned());
            return Err(ClientError::Refused {
                url: self.cfg.url.clone(),
                id: id.to_string(),
                status: status.as_u16(),
                message,
            });
        }
        let bad = |message: String| ClientError::BadAnswer {
            url: self.cfg.url.clone(),
            message,
        };
        let resp: SignResponse =
            serde_json::from_slice(&answer).map_err(|e| bad(format!("answer: {e}")))?;
        let roots = resp
            .roots
            .iter()
            .map(|r| RootCert::from_pem(r))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad(format!("roots: {e}")))?;
        if roots.is_empty() {
            return Err(bad("the answer has no roots".into()));
        }
        let leaf = request
            .complete(&resp.certificate)
            .map_err(|e| bad(format!("certificate: {e}")))?;
        update_bundle(bundle, &roots).map_err(|e| bad(format!("roots: {e}")))?;
        if bundle.signer_of(&leaf).is_none() {
            return Err(bad(format!(
                "the leaf of {id} is not signed by any root of the trust bundle"
            )));
        }
        Ok(leaf)
    }

    fn unreachable(&self, message: String) -> ClientError {
        ClientError::Unreachable {
            url: self.cfg.url.clone(),
            message,
        }
    }

    async fn post(
        &self,
        token: &str,
        body: Vec<u8>,
        bundle: &TrustBundle,
    ) -> Result<(StatusCode, Bytes), ClientError> {
        let mut roots = rustls::RootCertStore::empty();
        for r in bundle.roots() {
            roots
                .add(r.der().clone())
                .map_err(|e| self.unreachable(format!("trust bundle: {e}")))?;
        }
        let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| self.unreachable(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let tcp = tokio::net::TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|e| self.unreachable(format!("connect: {e}")))?;
        let stream = tokio_rustls::TlsConnector::from(Arc::new(tls))
            .connect(self.server_name.clone(), tcp)
            .await
            .map_err(|e| self.unreachable(format!("TLS: {e}")))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| self.unreachable(format!("HTTP: {e}")))?;
        let conn = tokio::spawn(conn);
        let authority = match self.server_name {
            ServerName::IpAddress(_) if self.host.contains(':') => {
                format!("[{}]:{}", self.host, self.port)
            }
            _ => format!("{}:{}", self.host, self.port),
        };
        let req = Request::builder()
            .method(Method::POST)
            .uri(SIGN_PATH)
            .header(hyper::header::HOST, authority)
            .header(hyper::header::AUTHORIZATION, format!("Bearer {token}"))
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| ClientError::Config(format!("request: {e}")))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| self.unreachable(format!("HTTP: {e}")))?;
        let status = resp.status();
        let answer = Limited::new(resp.into_body(), MAX_RESPONSE)
            .collect()
            .await
            .map_err(|e| self.unreachable(format!("reading the answer: {e}")))?
            .to_bytes();
        conn.abort();
        Ok((status, answer))
    }
}

/// Reads PEM root certificates from `path`, the active root first.
///
/// # Errors
///
/// [`ClientError::Io`] if it cannot be read, [`ClientError::Identity`] if it holds no
/// certificate or one that is not a mesh root.
pub fn read_roots(path: &Path) -> Result<Vec<RootCert>, ClientError> {
    let text = std::fs::read_to_string(path).map_err(|source| ClientError::Io {
        path: path.to_owned(),
        source,
    })?;
    let blocks = pem::parse_many(&text).map_err(|e| {
        mesh_core::identity::Error::BadCertificate(format!("{}: {e}", path.display()))
    })?;
    let roots = blocks
        .into_iter()
        .filter(|b| b.tag() == "CERTIFICATE")
        .map(|b| RootCert::from_der(b.into_contents().into()))
        .collect::<Result<Vec<_>, _>>()?;
    if roots.is_empty() {
        return Err(mesh_core::identity::Error::BadCertificate(format!(
            "{}: no PEM CERTIFICATE block",
            path.display()
        ))
        .into());
    }
    Ok(roots)
}

/// Brings `bundle` to `roots` (the active first): trusts the new ones, makes the first
/// active, stops trusting the roots not listed.
fn update_bundle(
    bundle: &TrustBundle,
    roots: &[RootCert],
) -> Result<(), mesh_core::identity::Error> {
    let current = bundle.roots();
    for r in roots.iter().skip(1) {
        if !current.contains(r) {
            // Trust it, then the active root below is made active again.
            bundle.add_active_root(r.clone())?;
        }
    }
    if bundle.active_root() != roots[0] || !current.contains(&roots[0]) {
        bundle.add_active_root(roots[0].clone())?;
    }
    for r in bundle.roots() {
        if !roots.contains(&r) {
            bundle.retire_root(&r)?;
        }
    }
    Ok(())
}
