//! The [`ClusterView`] of a real cluster, through kube-rs.

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::api::{Api, ListParams, PostParams};

use super::server::ClusterView;

/// Asks the API server with a kube-rs client (in a cluster: the pod's ServiceAccount, which
/// needs `create` on `tokenreviews` and `get`/`list` on `pods` and `services`).
#[derive(Clone)]
pub struct KubeView {
    client: kube::Client,
}

impl std::fmt::Debug for KubeView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeView").finish_non_exhaustive()
    }
}

impl KubeView {
    /// A view through `client`.
    pub fn new(client: kube::Client) -> Self {
        Self { client }
    }

    /// A view through the client kube-rs infers: the in-cluster ServiceAccount, else
    /// `$KUBECONFIG` / `~/.kube/config`.
    ///
    /// # Errors
    ///
    /// When no configuration is found or it is unusable.
    pub async fn infer() -> Result<Self, kube::Error> {
        Ok(Self::new(kube::Client::try_default().await?))
    }
}

impl ClusterView for KubeView {
    async fn review(&self, token: &str, audience: &str) -> Result<TokenReviewStatus, String> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_owned()),
                audiences: Some(vec![audience.to_owned()]),
            },
            ..Default::default()
        };
        let api: Api<TokenReview> = Api::all(self.client.clone());
        let done = api
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| e.to_string())?;
        Ok(done.status.unwrap_or_default())
    }

    async fn pod(&self, namespace: &str, name: &str) -> Result<Option<Pod>, String> {
        let api: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
        api.get_opt(name).await.map_err(|e| e.to_string())
    }

    async fn pods_on_node(&self, node: &str) -> Result<Vec<Pod>, String> {
        let api: Api<Pod> = Api::all(self.client.clone());
        let params = ListParams::default().fields(&format!("spec.nodeName={node}"));
        Ok(api.list(&params).await.map_err(|e| e.to_string())?.items)
    }

    async fn services(&self, namespace: &str) -> Result<Vec<Service>, String> {
        let api: Api<Service> = Api::namespaced(self.client.clone(), namespace);
        Ok(api
            .list(&ListParams::default())
            .await
            .map_err(|e| e.to_string())?
            .items)
    }
}
