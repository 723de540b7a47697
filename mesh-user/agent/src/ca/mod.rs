//! Identity without the root key on every node: `meshd ca` holds the mesh root and signs leaf
//! certificates for node agents, and node agents ask it for the leaves of their pods.
//!
//! # Protocol
//!
//! HTTPS (TLS 1.3, the CA's serving certificate chains to the mesh root), JSON bodies:
//!
//! - `POST /v1/sign` with `Authorization: Bearer <projected ServiceAccount token>` and
//!   [`SignRequest`] (`{"spiffe_id": "...", "csr": "<PEM PKCS#10>"}`); answers
//!   `200` [`SignResponse`] (the leaf, and the roots the mesh trusts, active first), or an
//!   [`ErrorBody`] with `400` (a malformed body, CSR or SPIFFE ID), `401` (no token, a token the
//!   API server does not authenticate, or one for another audience), `403` (an authenticated
//!   caller that may not have this identity: not the node agent's ServiceAccount, no node bound
//!   to the token, no pod of the service on its node, another trust domain or datacenter) or
//!   `503` (the API server could not be asked).
//! - `GET /healthz`: `200 ok` (the readiness probe).
//!
//! The caller is authenticated with a Kubernetes `TokenReview` and authorized as Istio's node
//! authorizer does for its CA (istio/istio `security/pkg/server/ca`): the token's node (the
//! `authentication.kubernetes.io/node-name` extra, or the `spec.nodeName` of the pod the token
//! is bound to) must run a pod of the requested service, see [`authorize`].

pub mod authorize;
pub mod client;
pub mod kube;
pub mod server;

use serde::{Deserialize, Serialize};

/// The path of the signing endpoint.
pub const SIGN_PATH: &str = "/v1/sign";
/// The path of the readiness endpoint.
pub const HEALTH_PATH: &str = "/healthz";
/// The token audience `meshd ca` asks the API server to check by default; the node agent's
/// projected token must be issued for it (`serviceAccountToken.audience` in the DaemonSet).
pub const DEFAULT_AUDIENCE: &str = "meshd-ca";
/// The largest request body the CA reads, in bytes.
pub const MAX_BODY: usize = 64 * 1024;

/// The body of `POST /v1/sign`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignRequest {
    /// The identity asked for: `spiffe://<trust-domain>/ns/<ns>/dc/<dc>/svc/<service>`.
    pub spiffe_id: String,
    /// A PKCS#10 request (PEM) over the key the leaf is for; only its key is used.
    pub csr: String,
}

/// The answer of `POST /v1/sign`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignResponse {
    /// The leaf certificate (PEM), naming exactly the requested SPIFFE ID.
    pub certificate: String,
    /// Every root the mesh trusts (PEM), the active root (the leaf's signer) first.
    pub roots: Vec<String>,
    /// The mesh's trust domain.
    pub trust_domain: String,
}

/// The body of every refusal.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// Why, in a sentence naming what is wrong.
    pub error: String,
}

#[cfg(test)]
mod tests;
