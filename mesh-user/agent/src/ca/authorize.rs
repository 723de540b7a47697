//! Who may have which identity: the rules `meshd ca` applies to an authenticated token.
//!
//! The rules, after Istio's node authorizer (istio/istio `security/pkg/server/ca/authenticate`
//! and `node_authorizer`; the idea, not the code):
//!
//! 1. The `TokenReview` must say `authenticated`, for the CA's audience.
//! 2. The user must be one of the node agent's ServiceAccounts
//!    (`system:serviceaccount:<namespace>:<name>`).
//! 3. The token must be bound to a node: the `authentication.kubernetes.io/node-name` extra
//!    (Kubernetes 1.30+), or the `spec.nodeName` of the pod named by the
//!    `authentication.kubernetes.io/pod-name` extra whose UID matches `…/pod-uid`.
//! 4. The requested SPIFFE ID must be of the CA's trust domain, datacenter and the `default`
//!    partition, and a pod of that service must run (not `Succeeded`/`Failed`, not deleted) on
//!    that node in the ID's namespace (Consul namespaces mirror Kubernetes ones).
//!
//! A pod's service, as consul-k8s names it with ACLs on (the rules `meshd kubernetes` applies):
//! the `consul.hashicorp.com/connect-service` annotation (a comma-separated list for multi-port
//! pods); else the Services of its namespace whose selector matches its labels (only the one
//! named by `consul.hashicorp.com/kubernetes-service` when that is set; Services labelled
//! `consul.hashicorp.com/service-ignore: "true"` left out). As consul-k8s's connect-init does
//! with ACLs, the pod's ServiceAccount must carry the service's name: a pod may only be the
//! service its account is for.

use std::collections::BTreeMap;

use k8s_openapi::api::authentication::v1::TokenReviewStatus;
use k8s_openapi::api::core::v1::{Pod, Service};
use mesh_core::identity::{SpiffeId, DEFAULT_PARTITION};

/// The `TokenReview` extra naming the node a token is bound to.
pub const EXTRA_NODE_NAME: &str = "authentication.kubernetes.io/node-name";
/// The `TokenReview` extra naming the pod a token is bound to.
pub const EXTRA_POD_NAME: &str = "authentication.kubernetes.io/pod-name";
/// The `TokenReview` extra with the UID of the pod a token is bound to.
pub const EXTRA_POD_UID: &str = "authentication.kubernetes.io/pod-uid";
/// consul-k8s's annotation naming a pod's service.
pub const ANNOTATION_SERVICE: &str = mesh_core::k8s::ANNOTATION_SERVICE;
/// consul-k8s's annotation picking which selecting Service names the pod.
pub const ANNOTATION_KUBERNETES_SERVICE: &str = "consul.hashicorp.com/kubernetes-service";
/// consul-k8s's Service label that keeps a Service out of the mesh.
pub const LABEL_SERVICE_IGNORE: &str = "consul.hashicorp.com/service-ignore";

/// Why a caller is refused; [`Refusal::status`] is the HTTP status.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The caller is not authenticated (401).
    #[error("unauthenticated: {0}")]
    Unauthenticated(String),
    /// The caller is authenticated but may not have this identity (403).
    #[error("forbidden: {0}")]
    Forbidden(String),
    /// The request is malformed (400).
    #[error("bad request: {0}")]
    BadRequest(String),
    /// The API server could not be asked (503); the caller should retry.
    #[error("unavailable: {0}")]
    Unavailable(String),
}

impl Refusal {
    /// The HTTP status of this refusal.
    pub fn status(&self) -> u16 {
        match self {
            Refusal::Unauthenticated(_) => 401,
            Refusal::Forbidden(_) => 403,
            Refusal::BadRequest(_) => 400,
            Refusal::Unavailable(_) => 503,
        }
    }
}

/// Where a token says its holder runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Binding {
    /// The node is named in the token.
    Node(String),
    /// The token is bound to this pod; its node is the pod's `spec.nodeName`.
    Pod {
        /// The pod's namespace (the ServiceAccount's).
        namespace: String,
        /// The pod's name.
        name: String,
        /// The pod's UID, when the token carries it.
        uid: Option<String>,
    },
}

/// Checks rules 1–3 up to the binding: an authenticated token, for `audience`, of one of
/// `agents` (`system:serviceaccount:<ns>:<name>`). Returns the user and where the token is
/// bound.
///
/// # Errors
///
/// [`Refusal::Unauthenticated`] for a token the API server refused or one for another
/// audience, [`Refusal::Forbidden`] for another user or a token bound to no node or pod.
pub fn check_review(
    status: &TokenReviewStatus,
    audience: &str,
    agents: &[String],
) -> Result<(String, Binding), Refusal> {
    if status.authenticated != Some(true) {
        let why = status
            .error
            .as_deref()
            .filter(|e| !e.is_empty())
            .unwrap_or("the API server did not authenticate it");
        return Err(Refusal::Unauthenticated(format!("token refused: {why}")));
    }
    // The API server answers with the audiences the token is valid for among those asked;
    // an empty list means it did not check any.
    match &status.audiences {
        Some(auds) if auds.iter().any(|a| a == audience) => {}
        other => {
            return Err(Refusal::Unauthenticated(format!(
                "the token is not for audience {audience:?} (valid for {:?})",
                other.clone().unwrap_or_default()
            )))
        }
    }
    let user = status.user.clone().unwrap_or_default();
    let username = user.username.unwrap_or_default();
    if !agents.contains(&username) {
        return Err(Refusal::Forbidden(format!(
            "{username:?} is not the node agent's ServiceAccount ({})",
            agents.join(", ")
        )));
    }
    let extra = user.extra.unwrap_or_default();
    let first = |key: &str| {
        extra
            .get(key)
            .and_then(|v| v.first())
            .filter(|v| !v.is_empty())
            .cloned()
    };
    if let Some(node) = first(EXTRA_NODE_NAME) {
        return Ok((username, Binding::Node(node)));
    }
    if let Some(name) = first(EXTRA_POD_NAME) {
        // system:serviceaccount:<namespace>:<name>: a bound token's pod is in the SA's namespace.
        let namespace = username.split(':').nth(2).unwrap_or_default().to_owned();
        return Ok((
            username,
            Binding::Pod {
                namespace,
                name,
                uid: first(EXTRA_POD_UID),
            },
        ));
    }
    Err(Refusal::Forbidden(format!(
        "the token of {username:?} is bound to no node or pod (use a projected \
         serviceAccountToken, not a Secret-based token)"
    )))
}

/// The node of the pod a token is bound to (rule 3's fallback): `pod` is what the API server
/// returned for `namespace/name`, `uid` the token's `pod-uid` extra.
///
/// # Errors
///
/// [`Refusal::Forbidden`] when the pod is gone, its UID differs from the token's (a pod of the
/// same name was re-created), or it is not scheduled.
pub fn node_of_bound_pod(
    pod: Option<&Pod>,
    namespace: &str,
    name: &str,
    uid: Option<&str>,
) -> Result<String, Refusal> {
    let pod = pod.ok_or_else(|| {
        Refusal::Forbidden(format!("the token's pod {namespace}/{name} does not exist"))
    })?;
    if let Some(uid) = uid {
        if pod.metadata.uid.as_deref() != Some(uid) {
            return Err(Refusal::Forbidden(format!(
                "the token's pod {namespace}/{name} has UID {:?}, the token names {uid:?}",
                pod.metadata.uid.as_deref().unwrap_or_default()
            )));
        }
    }
    pod.spec
        .as_ref()
        .and_then(|s| s.node_name.clone())
        .filter(|n| !n.is_empty())
        .ok_or_else(|| {
            Refusal::Forbidden(format!("the token's pod {namespace}/{name} is on no node"))
        })
}

/// Rule 4's first half: the requested ID is of this CA's trust domain, datacenter and the
/// default partition.
///
/// # Errors
///
/// [`Refusal::BadRequest`] for a string that is not a service SPIFFE ID,
/// [`Refusal::Forbidden`] for another trust domain, datacenter or partition.
pub fn check_id(
    requested: &str,
    trust_domain: &str,
    datacenter: &str,
) -> Result<SpiffeId, Refusal> {
    let id: SpiffeId = requested
        .parse()
        .map_err(|e| Refusal::BadRequest(format!("spiffe_id: {e}")))?;
    if id.trust_domain() != trust_domain {
        return Err(Refusal::Forbidden(format!(
            "{id} is not of this mesh's trust domain {trust_domain}"
        )));
    }
    if id.datacenter() != datacenter {
        return Err(Refusal::Forbidden(format!(
            "{id} is not of this CA's datacenter {datacenter}"
        )));
    }
    if id.partition() != DEFAULT_PARTITION {
        return Err(Refusal::Forbidden(format!(
            "{id} is of admin partition {}; only {DEFAULT_PARTITION} is served",
            id.partition()
        )));
    }
    Ok(id)
}

/// Whether a pod still runs (or is about to): not deleted, not `Succeeded` or `Failed`.
pub fn is_live(pod: &Pod) -> bool {
    if pod.metadata.deletion_timestamp.is_some() {
        return false;
    }
    !matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    )
}

/// The service names a pod runs as (see the module's rules), before the ServiceAccount
/// check; `services` are the Services of the pod's namespace.
pub fn pod_services(pod: &Pod, services: &[Service]) -> Vec<String> {
    let annotations = pod.metadata.annotations.clone().unwrap_or_default();
    if let Some(names) = annotations.get(ANNOTATION_SERVICE) {
        return names
            .split(',')
            .map(str::trim)
            .filter(|n| !n.is_empty())
            .map(str::to_owned)
            .collect();
    }
    let labels = pod.metadata.labels.clone().unwrap_or_default();
    let only = annotations.get(ANNOTATION_KUBERNETES_SERVICE);
    services
        .iter()
        .filter(|s| {
            s.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(LABEL_SERVICE_IGNORE))
                .map(String::as_str)
                != Some("true")
        })
        .filter(|s| selects(s, &labels))
        .filter_map(|s| s.metadata.name.clone())
        .filter(|n| only.is_none_or(|o| o == n))
        .collect()
}

/// The pod's ServiceAccount (`default` when unset).
pub fn pod_service_account(pod: &Pod) -> String {
    pod.spec
        .as_ref()
        .and_then(|s| s.service_account_name.clone())
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| "default".to_owned())
}

fn selects(service: &Service, labels: &BTreeMap<String, String>) -> bool {
    let selector = service
        .spec
        .as_ref()
        .and_then(|s| s.selector.clone())
        .unwrap_or_default();
    // A Service without a selector selects no pod (its endpoints are managed by hand).
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// Rule 4's second half: a live pod of `id`'s service, running as the ServiceAccount of that
/// name, is on `node` in `id`'s namespace.
/// `pods` are the pods the API server lists with `spec.nodeName=<node>`; `services` are the
/// Services of `id`'s namespace.
///
/// # Errors
///
/// [`Refusal::Forbidden`] naming the service, namespace and node when none runs there.
pub fn check_node_runs(
    id: &SpiffeId,
    node: &str,
    pods: &[Pod],
    services: &[Service],
) -> Result<(), Refusal> {
    let ns = id.namespace();
    let runs = pods
        .iter()
        .filter(|p| p.metadata.namespace.as_deref() == Some(ns))
        .filter(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node))
        .filter(|p| is_live(p))
        .any(|p| {
            pod_service_account(p) == id.service()
                && pod_services(p, services).iter().any(|s| s == id.service())
        });
    if runs {
        return Ok(());
    }
    Err(Refusal::Forbidden(format!(
        "no pod of service {}/{} runs on node {node:?}",
        ns,
        id.service()
    )))
}
