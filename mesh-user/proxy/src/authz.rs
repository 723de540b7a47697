//! The inbound side's authorization question: may this caller reach this service?

use mesh_core::identity::SpiffeId;
use mesh_core::intentions::HttpRequest;

/// The proxy's authorization decision for one connection, with the reason that is logged
/// with it (the intention that matched, or the default policy).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    /// Whether the connection may proceed.
    pub allowed: bool,
    /// Why (e.g. the intention that matched, or the default policy).
    pub reason: String,
    /// The ID of the intention that decided; `None` when the default policy did. The
    /// `intention` label of `mesh_proxy_connections_denied_total`.
    pub intention: Option<String>,
    /// For a connection: allowed, but only request by request. The inbound proxy parses
    /// HTTP/1.1 on it and asks [`Authorizer::authorize_request`] for each request (an L7
    /// intention on an `http` destination).
    pub per_request: bool,
}

impl Decision {
    /// Allowed, because of `reason`.
    pub fn allow(reason: impl Into<String>) -> Self {
        Self {
            allowed: true,
            reason: reason.into(),
            intention: None,
            per_request: false,
        }
    }

    /// Allowed request by request (L7), because of `reason`.
    pub fn per_request(reason: impl Into<String>) -> Self {
        Self {
            allowed: true,
            reason: reason.into(),
            intention: None,
            per_request: true,
        }
    }

    /// Denied, because of `reason`.
    pub fn deny(reason: impl Into<String>) -> Self {
        Self {
            allowed: false,
            reason: reason.into(),
            intention: None,
            per_request: false,
        }
    }

    /// The same decision, made by the intention with ID `id`.
    pub fn by_intention(mut self, id: impl Into<String>) -> Self {
        self.intention = Some(id.into());
        self
    }
}

/// Decides whether a caller may reach a service: the inbound proxy's authoritative intention
/// check, asked once per connection after the TLS handshake.
///
/// It is called on the connection's task and must not block for long (answer from memory).
pub trait Authorizer: Send + Sync + 'static {
    /// May `source` (the caller's certificate identity) connect to `destination` (the service
    /// of the pod whose inbound listener accepted the connection)?
    fn authorize(&self, source: &SpiffeId, destination: &SpiffeId) -> Decision;

    /// May this HTTP request from `source` go to `destination`'s app? Asked for each request
    /// of a connection [`authorize`](Authorizer::authorize) answered with
    /// [`Decision::per_request`], against the rules in force when the request arrives. The
    /// default allows (an authorizer that never answers `per_request` is never asked).
    fn authorize_request(
        &self,
        source: &SpiffeId,
        destination: &SpiffeId,
        request: &HttpRequest<'_>,
    ) -> Decision {
        let _ = (source, destination, request);
        Decision::allow("no L7 rules")
    }
}

/// Allows every authenticated caller (for tests and for a mesh without intentions).
#[derive(Clone, Copy, Debug, Default)]
pub struct AllowAll;

impl Authorizer for AllowAll {
    fn authorize(&self, _source: &SpiffeId, _destination: &SpiffeId) -> Decision {
        Decision::allow("allow-all authorizer")
    }
}
