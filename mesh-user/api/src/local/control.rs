//! How the HTTP API reaches the runner: requests over a channel to the loop that owns the
//! runner and the agent, each with its own reply channel.

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use super::view::{
    ApplyReply, ConsulResourceView, ForwardTarget, List, PodView, ProxyView, ServiceView,
};
use mesh_core::k8s::applied::Source;

/// Why a request failed: an HTTP status and a message for the user, verbatim.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct ControlError {
    /// The HTTP status: 400 (the request is wrong), 404 (nothing by that name) or 500.
    pub status: u16,
    /// What happened, for the user.
    pub message: String,
}

impl ControlError {
    /// A 400: the request (its manifests, names or ports) is wrong.
    pub fn bad(message: impl Into<String>) -> Self {
        ControlError {
            status: 400,
            message: message.into(),
        }
    }

    /// A 404: no pod or Service by that name.
    pub fn not_found(message: impl Into<String>) -> Self {
        ControlError {
            status: 404,
            message: message.into(),
        }
    }

    /// A 500: the runner failed (or has stopped).
    pub fn internal(message: impl Into<String>) -> Self {
        ControlError {
            status: 500,
            message: message.into(),
        }
    }
}

/// The body of an apply or delete request.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestRequest {
    /// kubectl's `-n`.
    #[serde(default)]
    pub namespace: Option<String>,
    /// The manifest files, each with its name (for messages) and YAML text.
    pub manifests: Vec<Source>,
}

type Reply<T> = oneshot::Sender<Result<T, ControlError>>;

/// A request to the runner.
#[derive(Debug)]
pub enum Request {
    /// `meshctl apply -f`.
    Apply(ManifestRequest, Reply<ApplyReply>),
    /// `meshctl delete -f`.
    Delete(ManifestRequest, Reply<ApplyReply>),
    /// Every pod (the API filters by namespace).
    Pods(Reply<List<PodView>>),
    /// Every Service (the API filters by namespace).
    Services(Reply<List<ServiceView>>),
    /// Every `ServiceIntentions` and `ServiceDefaults` object (status not filled in).
    ConsulResources(Reply<List<ConsulResourceView>>),
    /// `namespace`, pod name.
    Proxy(String, String, Reply<ProxyView>),
    /// `namespace`, `pod/<name>` or `service/<name>`, port.
    Forward(String, String, u16, Reply<ForwardTarget>),
}

/// The API's end of the channel.
#[derive(Clone, Debug)]
pub struct Handle {
    tx: mpsc::Sender<Request>,
}

fn gone() -> ControlError {
    ControlError::internal("the local runner has stopped")
}

impl Handle {
    /// A handle and the receiver the runner's loop serves.
    pub fn new() -> (Handle, mpsc::Receiver<Request>) {
        let (tx, rx) = mpsc::channel(64);
        (Handle { tx }, rx)
    }

    async fn ask<T>(&self, make: impl FnOnce(Reply<T>) -> Request) -> Result<T, ControlError> {
        let (reply, answer) = oneshot::channel();
        self.tx.send(make(reply)).await.map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }

    /// Applies manifests, as `kubectl apply -f`.
    ///
    /// # Errors
    /// The runner's [`ControlError`]: 400 for manifests it refuses, 500 when it failed or has
    /// stopped.
    pub async fn apply(&self, req: ManifestRequest) -> Result<ApplyReply, ControlError> {
        self.ask(|r| Request::Apply(req, r)).await
    }

    /// Deletes the objects of manifests, as `kubectl delete -f`.
    ///
    /// # Errors
    /// As [`apply`](Self::apply).
    pub async fn delete(&self, req: ManifestRequest) -> Result<ApplyReply, ControlError> {
        self.ask(|r| Request::Delete(req, r)).await
    }

    /// Every pod, kubectl-shaped.
    ///
    /// # Errors
    /// A 500 [`ControlError`] when the runner has stopped.
    pub async fn pods(&self) -> Result<List<PodView>, ControlError> {
        self.ask(Request::Pods).await
    }

    /// Every Service, kubectl-shaped.
    ///
    /// # Errors
    /// A 500 [`ControlError`] when the runner has stopped.
    pub async fn services(&self) -> Result<List<ServiceView>, ControlError> {
        self.ask(Request::Services).await
    }

    /// Every consul-k8s custom resource applied, kubectl-shaped, status not filled in.
    ///
    /// # Errors
    /// A 500 [`ControlError`] when the runner has stopped.
    pub async fn consul_resources(&self) -> Result<List<ConsulResourceView>, ControlError> {
        self.ask(Request::ConsulResources).await
    }

    /// The proxy of pod `namespace/pod`: identity, listeners, upstreams, intentions.
    ///
    /// # Errors
    /// 404 when there is no such pod, 400 when it is not in the mesh, 500 when the runner
    /// has stopped.
    pub async fn proxy(&self, namespace: &str, pod: &str) -> Result<ProxyView, ControlError> {
        let (ns, pod) = (namespace.to_string(), pod.to_string());
        self.ask(|r| Request::Proxy(ns, pod, r)).await
    }

    /// Where to port-forward `target` (`pod/<name>` or `service/<name>`) in `namespace`,
    /// `port` being the pod's or the Service's port.
    ///
    /// # Errors
    /// 404 when there is no such pod or Service, 400 when it cannot be forwarded to (not
    /// running, no ready pod, no such port), 500 when the runner has stopped.
    pub async fn forward(
        &self,
        namespace: &str,
        target: &str,
        port: u16,
    ) -> Result<ForwardTarget, ControlError> {
        let (ns, target) = (namespace.to_string(), target.to_string());
        self.ask(|r| Request::Forward(ns, target, port, r)).await
    }
}
