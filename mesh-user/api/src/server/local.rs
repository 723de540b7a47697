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
use crate::local::{Handle, ManifestRequest};
use crate::Error;

pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/local/apply", put(apply))
        .route("/v1/local/delete", put(delete))
        .route("/v1/local/pods", get(pods))
        .route("/v1/local/services", get(services))
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
    Ok(Json(runner(&st)?.apply(req).await?).into_response())
}

async fn delete(AxState(st): AxState<AppState>, caller: Caller, body: Bytes) -> ApiResult {
    caller.need(Need::WriteWorkloads)?;
    let req = manifests(&body)?;
    Ok(Json(runner(&st)?.delete(req).await?).into_response())
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
