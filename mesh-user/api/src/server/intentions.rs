//! `/v1/connect/intentions*`: intentions by source and destination (`exact`), by ID (legacy),
//! `check`, `match` and the per-intention `counters`.

use std::collections::BTreeMap;

use axum::extract::{Path as UrlPath, State as AxState};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use hyper::body::Bytes;
use serde_json::json;
use tracing::info;

use super::blocking::{block, rules_index};
use super::{filtered, indexed, parse_name, text_body, write, ApiResult, AppState, Caller, Params};
use crate::acl::Need;
use crate::Error;
use mesh_core::intentions::{
    Error as IntentionError, IntentionSpec, MatchType, ServiceName, DEFAULT_NAMESPACE, WILDCARD,
};

/// The routes of this module.
pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route(
            "/v1/connect/intentions",
            get(list_intentions).post(create_intention),
        )
        .route(
            "/v1/connect/intentions/exact",
            get(get_exact).put(put_exact).delete(delete_exact),
        )
        .route("/v1/connect/intentions/check", get(check))
        .route("/v1/connect/intentions/match", get(match_intentions))
        .route("/v1/connect/intentions/counters", get(counters))
        .route(
            "/v1/connect/intentions/{id}",
            get(get_by_id).put(put_by_id).delete(delete_by_id),
        )
}

/// The fields of Consul's `Intention` a `?filter=` may select (those this agent returns and
/// those it leaves out, which are absent).
const INTENTION_FIELDS: &[&str] = &[
    "ID",
    "Description",
    "SourcePeer",
    "SourcePartition",
    "SourceNS",
    "SourceName",
    "SourceSamenessGroup",
    "DestinationPartition",
    "DestinationNS",
    "DestinationName",
    "SourceType",
    "Action",
    "Permissions",
    "Meta",
    "Precedence",
    "CreatedAt",
    "UpdatedAt",
    "Hash",
    "CreateIndex",
    "ModifyIndex",
];

fn intention_not_found() -> Error {
    Error::NotFound("Intention not found".into())
}

/// The destination a spec will have once stored, for the permission check; `None` when it
/// is not valid (the write then fails with the intentions module's message).
fn spec_destination(spec: &IntentionSpec) -> Option<ServiceName> {
    let ns = spec
        .destination_namespace
        .as_deref()
        .filter(|n| !n.is_empty())
        .unwrap_or(DEFAULT_NAMESPACE);
    ServiceName::new(ns, spec.destination_name.clone()).ok()
}

async fn list_intentions(
    AxState(st): AxState<AppState>,
    caller: Caller,
    params: Params,
) -> ApiResult {
    caller.need(Need::Read)?;
    let ns = params.namespace(true)?;
    let filter = params.filter(INTENTION_FIELDS)?;
    block(&st, params.blocking()?, rules_index).await;
    let state = st.store.state();
    let list: Vec<_> = state
        .rules
        .list()
        .into_iter()
        .filter(|it| ns.is_none_or(|ns| ns == WILDCARD || it.destination.namespace() == ns))
        .filter(|it| caller.0.may_read(&it.destination))
        .collect();
    let list = filtered(filter.as_ref(), &list)?;
    Ok(indexed(state.rules.index(), list))
}

async fn create_intention(
    AxState(st): AxState<AppState>,
    caller: Caller,
    params: Params,
    body: Bytes,
) -> ApiResult {
    let mut spec = legacy_spec(&body)?;
    fill_namespaces(&mut spec, params.namespace(false)?);
    if let Some(dst) = spec_destination(&spec) {
        caller.need(Need::WriteIntention(&dst))?;
    } else {
        caller.need(Need::WriteIntention(&ServiceName::wildcard()))?;
    }
    let id = write(&st.store, move |s| {
        Ok(s.rules_mut().create(&spec, false)?.id.clone())
    })
    .await?;
    info!(%id, "intention created");
    Ok(Json(json!({ "ID": id })).into_response())
}

/// The body of a write through the ID-based (legacy) endpoints, which take L4 intentions only:
/// Consul validates them as legacy writes, where `Action` is required and excludes
/// `Permissions`.
fn legacy_spec(body: &Bytes) -> Result<IntentionSpec, Error> {
    let spec = IntentionSpec::from_json(text_body(body)?)?;
    if !spec.permissions.is_empty() {
        return Err(Error::bad(
            "Permissions",
            "Permissions: L7 permissions cannot be written through the ID-based intentions \
             API; use PUT /v1/connect/intentions/exact or a service-intentions config entry",
        ));
    }
    Ok(spec)
}

/// Consul's `FillPartitionAndNamespace` for a single intention: an empty `SourceNS` or
/// `DestinationNS` is the request's namespace (`?ns=`, `X-Consul-Namespace`, else
/// `default`). A source never inherits the destination's namespace here; only a
/// `service-intentions` entry's sources do.
fn fill_namespaces(spec: &mut IntentionSpec, ns: Option<&str>) {
    let ns = ns.unwrap_or(DEFAULT_NAMESPACE);
    for field in [&mut spec.source_namespace, &mut spec.destination_namespace] {
        if field.as_deref().is_none_or(str::is_empty) {
            *field = Some(ns.to_owned());
        }
    }
}

/// `source` and `destination` of an exact request.
fn exact_names(params: &Params) -> Result<(ServiceName, ServiceName), Error> {
    let ns = params.namespace(false)?;
    let src = parse_name(params.required("source")?, ns, "source")?;
    let dst = parse_name(params.required("destination")?, ns, "destination")?;
    Ok((src, dst))
}

async fn get_exact(AxState(st): AxState<AppState>, caller: Caller, params: Params) -> ApiResult {
    caller.need(Need::Read)?;
    let (src, dst) = exact_names(&params)?;
    let state = st.store.state();
    caller.need(Need::ReadIntention(&dst))?;
    let it = state
        .rules
        .get_exact(&src, &dst)
        .ok_or_else(intention_not_found)?;
    Ok(indexed(state.rules.index(), it))
}

async fn put_exact(
    AxState(st): AxState<AppState>,
    caller: Caller,
    params: Params,
    body: Bytes,
) -> ApiResult {
    let (src, dst) = exact_names(&params)?;
    caller.need(Need::WriteIntention(&dst))?;
    let mut spec = IntentionSpec::from_json(text_body(&body)?)?;
    // The URL names the intention, as in Consul.
    spec.source_namespace = Some(src.namespace().to_owned());
    spec.source_name = src.name().to_owned();
    spec.destination_namespace = Some(dst.namespace().to_owned());
    spec.destination_name = dst.name().to_owned();
    let id = write(&st.store, move |s| {
        Ok(s.rules_mut().create(&spec, true)?.id.clone())
    })
    .await?;
    info!(%id, source = %src, destination = %dst, "intention written");
    Ok(Json(true).into_response())
}

async fn delete_exact(AxState(st): AxState<AppState>, caller: Caller, params: Params) -> ApiResult {
    let (src, dst) = exact_names(&params)?;
    caller.need(Need::WriteIntention(&dst))?;
    let deleted = write(&st.store, move |s| {
        let Some(id) = s.rules.get_exact(&src, &dst).map(|it| it.id.clone()) else {
            return Ok(None);
        };
        s.rules_mut().delete(&id)?;
        Ok(Some(id))
    })
    .await?;
    if let Some(id) = deleted {
        info!(%id, "intention deleted");
    }
    Ok(Json(true).into_response())
}

async fn get_by_id(
    AxState(st): AxState<AppState>,
    caller: Caller,
    UrlPath(id): UrlPath<String>,
) -> ApiResult {
    caller.need(Need::Read)?;
    let state = st.store.state();
    let it = state.rules.get(&id).ok_or_else(intention_not_found)?;
    caller.need(Need::ReadIntention(&it.destination))?;
    Ok(indexed(state.rules.index(), it))
}

async fn put_by_id(
    AxState(st): AxState<AppState>,
    caller: Caller,
    UrlPath(id): UrlPath<String>,
    params: Params,
    body: Bytes,
) -> ApiResult {
    let mut spec = legacy_spec(&body)?;
    fill_namespaces(&mut spec, params.namespace(false)?);
    let old = st
        .store
        .state()
        .rules
        .get(&id)
        .map(|it| it.destination.clone())
        .ok_or_else(|| IntentionError::NotFound {
            op: "modify",
            id: id.clone(),
        })?;
    caller.need(Need::WriteIntention(&old))?;
    if let Some(dst) = spec_destination(&spec) {
        caller.need(Need::WriteIntention(&dst))?;
    }
    let id2 = id.clone();
    write(&st.store, move |s| {
        let it = s.rules.get(&id2).map(|it| it.destination.clone());
        // The destination checked above must still be the one being changed.
        if it.as_ref() != Some(&old) {
            return Err(Error::Forbidden(
                "the intention changed during the request; try again".into(),
            ));
        }
        s.rules_mut().update(&id2, &spec)?;
        Ok(())
    })
    .await?;
    info!(%id, "intention updated");
    Ok(Json(json!({ "ID": id })).into_response())
}

async fn delete_by_id(
    AxState(st): AxState<AppState>,
    caller: Caller,
    UrlPath(id): UrlPath<String>,
) -> ApiResult {
    let dst = st
        .store
        .state()
        .rules
        .get(&id)
        .map(|it| it.destination.clone())
        .ok_or_else(|| IntentionError::NotFound {
            op: "delete",
            id: id.clone(),
        })?;
    caller.need(Need::WriteIntention(&dst))?;
    let id2 = id.clone();
    write(&st.store, move |s| {
        if s.rules.get(&id2).map(|it| &it.destination) != Some(&dst) {
            return Err(IntentionError::NotFound {
                op: "delete",
                id: id2,
            }
            .into());
        }
        s.rules_mut().delete(&id2)?;
        Ok(())
    })
    .await?;
    info!(%id, "intention deleted");
    Ok(Json(true).into_response())
}

async fn check(AxState(st): AxState<AppState>, caller: Caller, params: Params) -> ApiResult {
    caller.need(Need::Read)?;
    if let Some(t) = params.optional("source-type")? {
        if t != "consul" {
            return Err(Error::bad(
                "source-type",
                format!("source-type {t:?} is not supported; only \"consul\""),
            ));
        }
    }
    let ns = params.namespace(false)?;
    let src = parse_name(params.required("source")?, ns, "source")?;
    let dst = parse_name(params.required("destination")?, ns, "destination")?;
    let state = st.store.state();
    let decision = state.rules.check(&src, &dst);
    Ok(indexed(
        state.rules.index(),
        json!({ "Allowed": decision.allowed }),
    ))
}

async fn match_intentions(
    AxState(st): AxState<AppState>,
    caller: Caller,
    params: Params,
) -> ApiResult {
    caller.need(Need::Read)?;
    let by = match params.all("by").as_slice() {
        [] => return Err(Error::bad("by", "required query parameter 'by' not set")),
        ["source"] => MatchType::Source,
        ["destination"] => MatchType::Destination,
        _ => {
            return Err(Error::bad(
                "by",
                "'by' parameter must be one of 'source' or 'destination'",
            ))
        }
    };
    let names = params.all("name");
    if names.is_empty() {
        return Err(Error::bad(
            "name",
            "required query parameter 'name' not set",
        ));
    }
    let ns = params.namespace(false)?;
    let parsed = names
        .iter()
        .map(|n| parse_name(n, ns, "name").map(|p| (*n, p)))
        .collect::<Result<Vec<_>, _>>()?;
    let state = st.store.state();
    let out: BTreeMap<&str, Vec<_>> = parsed
        .iter()
        .map(|(n, p)| {
            let mut found = state.rules.match_by(by, p);
            found.retain(|it| caller.0.may_read(&it.destination));
            (*n, found)
        })
        .collect();
    Ok(indexed(state.rules.index(), out))
}

async fn counters(AxState(st): AxState<AppState>, caller: Caller) -> ApiResult {
    caller.need(Need::Read)?;
    let state = st.store.state();
    let counts: std::collections::HashMap<String, (u64, u64)> = st
        .counters
        .counters()
        .into_iter()
        .map(|c| (c.id, (c.allowed, c.denied)))
        .collect();
    let out: Vec<_> = state
        .rules
        .list()
        .into_iter()
        .filter(|it| caller.0.may_read(&it.destination))
        .map(|it| {
            let (allowed, denied) = counts.get(&it.id).copied().unwrap_or_default();
            json!({
                "ID": it.id,
                "SourceNS": it.source.namespace(),
                "SourceName": it.source.name(),
                "DestinationNS": it.destination.namespace(),
                "DestinationName": it.destination.name(),
                "Action": it.action_str(),
                "Precedence": it.precedence,
                "Allowed": allowed,
                "Denied": denied,
            })
        })
        .collect();
    Ok(indexed(state.rules.index(), out))
}
