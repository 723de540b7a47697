//! The inbound side's authorization question: may this caller reach this service?

use mesh_core::identity::SpiffeId;

/// An authorization verdict with the reason that is logged with it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    /// Whether the connection may proceed.
    pub allow: bool,
    /// Why (e.g. the intention that matched, or the default policy).
    pub reason: String,
}

impl Verdict {
    /// An allow verdict.
    pub fn allow(reason: impl Into<String>) -> Self {
        Self {
            allow: true,
            reason: reason.into(),
        }
    }

    /// A deny verdict.
    pub fn deny(reason: impl Into<String>) -> Self {
        Self {
            allow: false,
            reason: reason.into(),
        }
    }
}

/// Decides whether a caller may reach a service: the inbound proxy's authoritative intention
/// check, asked once per connection after the TLS handshake.
///
/// It is called on the connection's task and must not block for long (answer from memory).
pub trait Authorizer: Send + Sync + 'static {
    /// May `source` (the caller's certificate identity) connect to `destination` (the service
    /// of the pod whose inbound listener accepted the connection)?
    fn authorize(&self, source: &SpiffeId, destination: &SpiffeId) -> Verdict;
}

/// Allows every authenticated caller (for tests and for a mesh without intentions).
#[derive(Clone, Copy, Debug, Default)]
pub struct AllowAll;

impl Authorizer for AllowAll {
    fn authorize(&self, _source: &SpiffeId, _destination: &SpiffeId) -> Verdict {
        Verdict::allow("allow-all authorizer")
    }
}
