//! `/v1/local/*`: the local runner's workloads (`meshd local`), for `meshctl apply`,
//! `delete`, `get`, `port-forward` and `proxy read`.

use axum::extract::{Path as UrlPath, RawQuery, State as AxState};
use axum::response::IntoResponse;
use axum::routing::{get, put};
use axum::{Json, Router};
use hyper::body::Bytes;

use serde_json::json;

use super::blocking::block;
use super::{filtered, indexed, text_body, ApiResult, AppState, Caller, Params};
use crate::acl::Need;
use crate::local::view::{ApplyReply, ConditionView, ConsulStatusView};
use crate::local::{Handle, ManifestRequest};
use crate::Error;
use mesh_core::intentions::{ServiceIntentionsEntry, SyncOutcome};

pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/local/apply", put(apply))
        .route("/v1/local/delete", put(delete))
        .route("/v1/local/pods", get(pods))
        .route("/v1/local/services", get(services))
        .route("/v1/local/consul-resources", get(consul_resources))
        .route("/v1/local/pods/{ns}/{name}/proxy", get(proxy))
        .route("/v1/local/forward", get(forward))
}

fn runner(st: &AppState) -> Result<&Handle, Error> {
    st.local.as_ref().ok_or_else(|| {
        Error::NotFound("this agent runs no local pods (they are served by `meshd local`)".into())
    })
}

fn manifests(body: &Bytes) -> Result<ManifestRequest, Error> {
    serde_json::from_str(text_body(body)?).map_err(|e| Error::BadRequest {
        field: None,
        message: format!("Request decode failed: {e}"),
    })
}

async fn apply(AxState(st): AxState<AppState>, caller: Caller, body: Bytes) -> ApiResult {
    caller.need(Need::WriteWorkloads)?;
    let req = manifests(&body)?;
    let reply = runner(&st)?.apply(req).await?;
    Ok(Json(sync_intentions(&st, reply).await?).into_response())
}

/// Brings the Kubernetes-managed intentions and `service-defaults` entries in step with the
/// applied `ServiceIntentions` and `ServiceDefaults` objects (see
/// `RuleSet::sync_kubernetes_entries`, `RuleSet::write_kubernetes_defaults`); an entry that
/// could not be written is a warning of the reply (and its object's `Synced` condition says
/// why).
async fn sync_intentions(st: &AppState, mut reply: ApplyReply) -> Result<ApplyReply, Error> {
    let Some(entries) = reply.intentions.take() else {
        return Ok(reply);
    };
    let defaults = reply.service_defaults.take().unwrap_or_default();
    let store = st.store.clone();
    let sync =
        tokio::task::spawn_blocking(move || store.sync_kubernetes_entries(&entries, &defaults))
            .await
            .map_err(|e| Error::Internal(e.to_string()))??;
    let kinds = sync
        .service_defaults
        .into_iter()
        .map(|o| ("ServiceDefaults", o))
        .chain(
            sync.intentions
                .into_iter()
                .map(|o| ("ServiceIntentions", o)),
        );
    for (kind, (name, outcome)) in kinds {
        if let SyncOutcome::Failed { reason, message } = outcome {
            reply.warnings.push(format!(
                "{kind} for {name}: not synced ({reason}): {message}"
            ));
        }
    }
    Ok(reply)
}

/// The `Synced` condition of an object making `entry`, against the intentions held now.
fn synced(rules: &mesh_core::intentions::RuleSet, entry: &ServiceIntentionsEntry) -> ConditionView {
    let (status, reason, message) = if rules.holds(entry) {
        ("True", String::new(), String::new())
    } else if rules.entry(&entry.destination).is_some()
        && !rules.managed_by_kubernetes(&entry.destination)
    {
        (
            "False",
            "ExternallyManagedConfigError".to_string(),
            "config entry already exists in Consul".to_string(),
        )
    } else {
        (
            "False",
            "ConsulAgentError".to_string(),
            "the intentions held differ from the object (apply it again)".to_string(),
        )
    };
    ConditionView {
        kind: "Synced".into(),
        status: status.into(),
        reason,
        message,
    }
}

async fn consul_resources(
    AxState(st): AxState<AppState>,
    caller: Caller,
    params: Params,
) -> ApiResult {
    caller.need(Need::Read)?;
    let ns = namespace_filter(&params)?;
    let mut list = runner(&st)?.consul_resources().await?;
    list.items
        .retain(|s| ns.is_none() || s.metadata.namespace == ns);
    let state = st.store.state();
    for item in &mut list.items {
        let condition = match &item.entry {
            Some(entry) => synced(state.rules(), entry),
            // ServiceDefaults take effect in the catalog as they are applied.
            None => ConditionView {
                kind: "Synced".into(),
                status: "True".into(),
                reason: String::new(),
                message: String::new(),
            },
        };
        item.status = ConsulStatusView {
            conditions: vec![condition],
        };
    }
    Ok(Json(list).into_response())
}

async fn delete(AxState(st): AxState<AppState>, caller: Caller, body: Bytes) -> ApiResult {
    caller.need(Need::WriteWorkloads)?;
    let req = manifests(&body)?;
    let reply = runner(&st)?.delete(req).await?;
    Ok(Json(sync_intentions(&st, reply).await?).into_response())
}

/// `?namespace=`: only that namespace; absent or empty: every namespace.
fn namespace_filter(params: &Params) -> Result<Option<String>, Error> {
    Ok(params
        .optional("namespace")?
        .filter(|s| !s.is_empty())
        .map(str::to_owned))
}

/// The top-level fields of a kubectl-shaped object a `?filter=` may select
/// (`metadata.name`, `status.phase`, `metadata.labels.app`, …).
const OBJECT_FIELDS: &[&str] = &["apiVersion", "kind", "metadata", "spec", "status"];

/// The index of the runner's lists: the published catalog's (pods, readiness, services).
fn catalog_index(st: &AppState) -> u64 {
    st.catalog.current().0
}

async fn pods(AxState(st): AxState<AppState>, caller: Caller, params: Params) -> ApiResult {
    caller.need(Need::Read)?;
    let ns = namespace_filter(&params)?;
    let filter = params.filter(OBJECT_FIELDS)?;
    block(&st, params.blocking()?, catalog_index).await;
    let index = catalog_index(&st);
    let mut list = runner(&st)?.pods().await?;
    list.items
        .retain(|p| ns.is_none() || p.metadata.namespace == ns);
    let items = filtered(filter.as_ref(), &list.items)?;
    Ok(indexed(
        index,
        json!({"apiVersion": list.api_version, "kind": list.kind, "items": items}),
    ))
}

async fn services(AxState(st): AxState<AppState>, caller: Caller, params: Params) -> ApiResult {
    caller.need(Need::Read)?;
    let ns = namespace_filter(&params)?;
    let filter = params.filter(OBJECT_FIELDS)?;
    block(&st, params.blocking()?, catalog_index).await;
    let index = catalog_index(&st);
    let mut list = runner(&st)?.services().await?;
    list.items
        .retain(|s| ns.is_none() || s.metadata.namespace == ns);
    let items = filtered(filter.as_ref(), &list.items)?;
    Ok(indexed(
        index,
        json!({"apiVersion": list.api_version, "kind": list.kind, "items": items}),
    ))
}

async fn proxy(
    AxState(st): AxState<AppState>,
    caller: Caller,
    UrlPath((ns, name)): UrlPath<(String, String)>,
) -> ApiResult {
    caller.need(Need::Read)?;
    Ok(Json(runner(&st)?.proxy(&ns, &name).await?).into_response())
}

async fn forward(
    AxState(st): AxState<AppState>,
    caller: Caller,
    RawQuery(q): RawQuery,
) -> ApiResult {
    caller.need(Need::WriteWorkloads)?;
    let params = Params::new(q);
    let ns = params
        .optional("namespace")?
        .filter(|s| !s.is_empty())
        .unwrap_or(mesh_core::k8s::DEFAULT_NAMESPACE);
    let target = params.required("target")?;
    let port: u16 = params
        .required("port")?
        .parse()
        .map_err(|_| Error::bad("port", "port must be a number from 1 to 65535"))?;
    if port == 0 {
        return Err(Error::bad("port", "port must be a number from 1 to 65535"));
    }
    Ok(Json(runner(&st)?.forward(ns, target, port).await?).into_response())
}
