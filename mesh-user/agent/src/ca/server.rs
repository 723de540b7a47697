//! `meshd ca`'s server: the mesh root, the signing endpoint over HTTPS, and the Kubernetes
//! look-ups that authorize each request ([`ClusterView`]).

use std::convert::Infallible;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use k8s_openapi::api::authentication::v1::TokenReviewStatus;
use k8s_openapi::api::core::v1::{Pod, Service};
use mesh_core::identity::{
    certificate_to_pem, CertificateAuthority, TrustBundle, DEFAULT_LEAF_TTL,
};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::net::TcpListener;
use tracing::{debug, info, warn};

use super::authorize::{self, Binding, Refusal};
use super::{ErrorBody, SignRequest, SignResponse, HEALTH_PATH, MAX_BODY, SIGN_PATH};

/// How long the CA's serving certificate is valid; it is re-issued every [`SERVING_REFRESH`].
pub const SERVING_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
/// How often the CA re-issues its serving certificate.
pub const SERVING_REFRESH: Duration = Duration::from_secs(24 * 3600);
/// How long a connection may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// What the CA asks the Kubernetes API server. Errors are the API's message; the CA answers
/// `503` with it.
pub trait ClusterView: Send + Sync + 'static {
    /// `POST /apis/authentication.k8s.io/v1/tokenreviews` for `token` with `audiences:
    /// [audience]`; the review's status.
    fn review(
        &self,
        token: &str,
        audience: &str,
    ) -> impl Future<Output = Result<TokenReviewStatus, String>> + Send;
    /// The pod `namespace/name`, `None` when it does not exist.
    fn pod(
        &self,
        namespace: &str,
        name: &str,
    ) -> impl Future<Output = Result<Option<Pod>, String>> + Send;
    /// The pods of every namespace with `spec.nodeName=<node>` (a field selector).
    fn pods_on_node(&self, node: &str) -> impl Future<Output = Result<Vec<Pod>, String>> + Send;
    /// The Services of `namespace`.
    fn services(
        &self,
        namespace: &str,
    ) -> impl Future<Output = Result<Vec<Service>, String>> + Send;
}

/// How `meshd ca` authorizes and signs.
#[derive(Clone, Debug)]
pub struct CaConfig {
    /// The Consul datacenter of every identity it signs (`dc1` by default).
    pub datacenter: String,
    /// The token audience checked by the `TokenReview`.
    pub audience: String,
    /// The node agents' users, `system:serviceaccount:<namespace>:<name>`.
    pub agents: Vec<String>,
    /// The lifetime of a leaf.
    pub leaf_ttl: Duration,
    /// The DNS names and IP addresses of the serving certificate (the Service's names).
    pub serving_names: Vec<String>,
}

impl CaConfig {
    /// The defaults for a CA whose node agents run as `system:serviceaccount:<ns>:meshd`:
    /// datacenter `dc1`, audience [`DEFAULT_AUDIENCE`](super::DEFAULT_AUDIENCE), leaves of
    /// [`DEFAULT_LEAF_TTL`], and the names of Service `meshd-ca` in `namespace`.
    pub fn new(namespace: &str) -> Self {
        Self {
            datacenter: "dc1".into(),
            audience: super::DEFAULT_AUDIENCE.into(),
            agents: vec![format!("system:serviceaccount:{namespace}:meshd")],
            leaf_ttl: DEFAULT_LEAF_TTL,
            serving_names: vec![
                "meshd-ca".into(),
                format!("meshd-ca.{namespace}"),
                format!("meshd-ca.{namespace}.svc"),
                format!("meshd-ca.{namespace}.svc.cluster.local"),
            ],
        }
    }
}

/// The CA server: holds the root, authorizes with a [`ClusterView`], signs.
pub struct CaServer<V> {
    ca: Mutex<CertificateAuthority>,
    bundle: TrustBundle,
    cfg: CaConfig,
    view: V,
    serving: ArcSwap<CertifiedKey>,
}

impl<V> std::fmt::Debug for CaServer<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaServer")
            .field("bundle", &self.bundle)
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

/// A resolver that always presents the current serving certificate.
struct Serving<V>(Arc<CaServer<V>>);

impl<V> std::fmt::Debug for Serving<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Serving")
    }
}

impl<V: ClusterView> ResolvesServerCert for Serving<V> {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.serving.load_full())
    }
}

impl<V: ClusterView> CaServer<V> {
    /// A server for `ca` (its root is the trust bundle) that authorizes with `view`.
    ///
    /// # Errors
    ///
    /// The identity errors of making the trust bundle or the serving certificate (no names, a
    /// name that is not a DNS name or IP address).
    pub fn new(
        ca: CertificateAuthority,
        cfg: CaConfig,
        view: V,
    ) -> Result<Arc<Self>, mesh_core::identity::Error> {
        let bundle = TrustBundle::new(ca.root().clone())?;
        let serving = ca.issue_serving(&cfg.serving_names, SERVING_TTL)?;
        Ok(Arc::new(Self {
            ca: Mutex::new(ca),
            bundle,
            cfg,
            view,
            serving: ArcSwap::new(serving),
        }))
    }

    /// The trust bundle the CA hands out.
    pub fn bundle(&self) -> &TrustBundle {
        &self.bundle
    }

    /// The TLS configuration of the endpoint: TLS 1.3, the serving certificate, no client
    /// certificates (callers authenticate with their token).
    ///
    /// # Errors
    ///
    /// rustls refusing the protocol versions (never with the ring provider).
    pub fn tls_config(self: &Arc<Self>) -> Result<Arc<rustls::ServerConfig>, rustls::Error> {
        let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(Serving(self.clone())));
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(cfg))
    }

    /// Authenticates `token`, authorizes `req` and signs its leaf.
    ///
    /// # Errors
    ///
    /// A [`Refusal`] naming why (see [`authorize`] for the rules).
    pub async fn sign(
        &self,
        token: Option<&str>,
        req: &SignRequest,
    ) -> Result<SignResponse, Refusal> {
        let token = token
            .filter(|t| !t.is_empty())
            .ok_or_else(|| Refusal::Unauthenticated("no bearer token".into()))?;
        let trust_domain = self.bundle.trust_domain().to_owned();
        let id = authorize::check_id(&req.spiffe_id, &trust_domain, &self.cfg.datacenter)?;
        let status = self
            .view
            .review(token, &self.cfg.audience)
            .await
            .map_err(|e| Refusal::Unavailable(format!("TokenReview: {e}")))?;
        let (user, binding) =
            authorize::check_review(&status, &self.cfg.audience, &self.cfg.agents)?;
        let node = match &binding {
            Binding::Node(node) => node.clone(),
            Binding::Pod {
                namespace,
                name,
                uid,
            } => {
                let pod = self.view.pod(namespace, name).await.map_err(|e| {
                    Refusal::Unavailable(format!("get pod {namespace}/{name}: {e}"))
                })?;
                authorize::node_of_bound_pod(pod.as_ref(), namespace, name, uid.as_deref())?
            }
        };
        let pods = self
            .view
            .pods_on_node(&node)
            .await
            .map_err(|e| Refusal::Unavailable(format!("list pods on node {node}: {e}")))?;
        let services = if pods
            .iter()
            .any(|p| p.metadata.namespace.as_deref() == Some(id.namespace()))
        {
            self.view.services(id.namespace()).await.map_err(|e| {
                Refusal::Unavailable(format!("list services in {}: {e}", id.namespace()))
            })?
        } else {
            Vec::new()
        };
        authorize::check_node_runs(&id, &node, &pods, &services)?;
        let certificate = self
            .ca
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .sign_request(&id, &req.csr, self.cfg.leaf_ttl)
            .map_err(|e| match e {
                mesh_core::identity::Error::BadCertificate(m) => {
                    Refusal::BadRequest(format!("csr: {m}"))
                }
                other => Refusal::Unavailable(format!("signing: {other}")),
            })?;
        info!(%id, %node, %user, "signed a leaf certificate");
        let active = self.bundle.active_root();
        let mut roots = vec![active.pem()];
        roots.extend(
            self.bundle
                .roots()
                .into_iter()
                .filter(|r| r != &active)
                .map(|r| r.pem()),
        );
        Ok(SignResponse {
            certificate: certificate_to_pem(&certificate),
            roots,
            trust_domain,
        })
    }

    async fn handle(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        match (req.method(), req.uri().path()) {
            (&Method::GET, HEALTH_PATH) => text(StatusCode::OK, "ok"),
            (&Method::POST, SIGN_PATH) => {
                let token = req
                    .headers()
                    .get(hyper::header::AUTHORIZATION)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.strip_prefix("Bearer "))
                    .map(|t| t.trim().to_owned());
                let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
                    Ok(b) => b.to_bytes(),
                    Err(e) => {
                        return refuse(&Refusal::BadRequest(format!(
                            "reading the body (at most {MAX_BODY} bytes): {e}"
                        )))
                    }
                };
                let sign: SignRequest = match serde_json::from_slice(&body) {
                    Ok(s) => s,
                    Err(e) => return refuse(&Refusal::BadRequest(format!("body: {e}"))),
                };
                match self.sign(token.as_deref(), &sign).await {
                    Ok(resp) => json(StatusCode::OK, &resp),
                    Err(r) => {
                        warn!(spiffe_id = %sign.spiffe_id, reason = %r, "refused a leaf certificate");
                        refuse(&r)
                    }
                }
            }
            (_, SIGN_PATH | HEALTH_PATH) => {
                text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed")
            }
            (_, path) => text(StatusCode::NOT_FOUND, &format!("no endpoint {path}")),
        }
    }

    /// Serves HTTPS on `listener` until the task is dropped, and re-issues the serving
    /// certificate every [`SERVING_REFRESH`].
    ///
    /// # Errors
    ///
    /// rustls refusing the configuration; errors of single connections are logged.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) -> Result<(), rustls::Error> {
        let acceptor = tokio_rustls::TlsAcceptor::from(self.tls_config()?);
        let refresher = {
            let me = Arc::downgrade(&self);
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(SERVING_REFRESH).await;
                    let Some(me) = me.upgrade() else { return };
                    let issued = me
                        .ca
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .issue_serving(&me.cfg.serving_names, SERVING_TTL);
                    match issued {
                        Ok(key) => me.serving.store(key),
                        Err(e) => warn!(error = %e, "re-issuing the serving certificate failed"),
                    }
                }
            })
        };
        let _stop_refresh = AbortOnDrop(refresher);
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let acceptor = acceptor.clone();
            let me = self.clone();
            tokio::spawn(async move {
                let tls = match tokio::time::timeout(REQUEST_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => {
                        debug!(%peer, error = %e, "TLS handshake failed");
                        return;
                    }
                    Err(_) => return,
                };
                let service = hyper::service::service_fn(move |req| {
                    let me = me.clone();
                    async move { Ok::<_, Infallible>(me.handle(req).await) }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .header_read_timeout(REQUEST_TIMEOUT)
                    .timer(hyper_util::rt::TokioTimer::new())
                    .serve_connection(TokioIo::new(tls), service);
                if let Err(e) = conn.await {
                    debug!(%peer, error = %e, "connection ended with an error");
                }
            });
        }
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body.to_owned())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

fn json<T: serde::Serialize>(status: StatusCode, body: &T) -> Response<Full<Bytes>> {
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    let mut resp = Response::new(Full::new(Bytes::from(bytes)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    resp
}

fn refuse(r: &Refusal) -> Response<Full<Bytes>> {
    let status = StatusCode::from_u16(r.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    json(
        status,
        &ErrorBody {
            error: r.to_string(),
        },
    )
}
