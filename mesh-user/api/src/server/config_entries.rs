//! `/v1/config*`: `service-intentions` and `service-defaults` config entries (write with
//! `?cas=`, list, read, delete).

use axum::extract::{Path as UrlPath, State as AxState};
use axum::response::IntoResponse;
use axum::routing::{get, put};
use axum::{Json, Router};
use hyper::body::Bytes;
use serde_json::json;
use tracing::info;

use super::blocking::{block, rules_index};
use super::{filtered, indexed, parse_name, text_body, write, ApiResult, AppState, Caller, Params};
use crate::acl::Need;
use crate::Error;
use mesh_core::intentions::{
    ServiceDefaultsEntry, ServiceIntentionsEntry, ServiceName, SERVICE_DEFAULTS_KIND,
    SERVICE_INTENTIONS_KIND, WILDCARD,
};

/// The routes of this module.
pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/config", put(put_config))
        .route("/v1/config/{kind}", get(list_config))
        .route(
            "/v1/config/{kind}/{name}",
            get(get_config).delete(delete_config),
        )
}

/// The fields of Consul's `ServiceIntentionsConfigEntry` a `?filter=` may select.
const ENTRY_FIELDS: &[&str] = &[
    "Kind",
    "Name",
    "Partition",
    "Namespace",
    "Sources",
    "JWT",
    "Meta",
    "Hash",
    "CreateIndex",
    "ModifyIndex",
];

/// The fields of Consul's `ServiceConfigEntry` a `?filter=` may select.
const DEFAULTS_FIELDS: &[&str] = &[
    "Kind",
    "Name",
    "Partition",
    "Namespace",
    "Protocol",
    "Meta",
    "CreateIndex",
    "ModifyIndex",
];

/// The config entry kinds this agent stores.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Intentions,
    Defaults,
}

fn check_kind(kind: &str) -> Result<Kind, Error> {
    match kind {
        SERVICE_INTENTIONS_KIND => Ok(Kind::Intentions),
        SERVICE_DEFAULTS_KIND => Ok(Kind::Defaults),
        _ => Err(Error::bad(
            "kind",
            format!(
                "invalid config entry kind: {kind:?}: this agent stores only \
                 {SERVICE_INTENTIONS_KIND:?} and {SERVICE_DEFAULTS_KIND:?} entries"
            ),
        )),
    }
}

/// Writes a `service-defaults` entry (ACL: Consul's `service:write` on the service).
async fn put_defaults(st: &AppState, caller: &Caller, cas: Option<u64>, text: &str) -> ApiResult {
    let entry = ServiceDefaultsEntry::from_json(text)?;
    let svc = entry.service.clone();
    caller.need(Need::WriteService(&svc))?;
    let written = write(&st.store, move |s| {
        if let Some(cas) = cas {
            let current = s
                .rules
                .service_defaults(&entry.service)
                .map(|e| e.modify_index);
            if current.unwrap_or(0) != cas {
                return Ok(false);
            }
        }
        s.rules_mut().apply_service_defaults(&entry)?;
        Ok(true)
    })
    .await?;
    if written {
        info!(service = %svc, "service-defaults entry written");
    }
    Ok(Json(written).into_response())
}

async fn put_config(
    AxState(st): AxState<AppState>,
    caller: Caller,
    params: Params,
    body: Bytes,
) -> ApiResult {
    let ns = params.namespace(false)?;
    let cas = params.cas()?;
    let text = text_body(&body)?;
    // `?ns=` fills in a namespace the entry does not give, as Consul merges it.
    let merged;
    let text = match (ns, serde_json::from_str::<serde_json::Value>(text)) {
        (Some(ns), Ok(serde_json::Value::Object(mut m)))
            if ["Namespace", "namespace"]
                .iter()
                .all(|k| m.get(*k).and_then(|v| v.as_str()).is_none_or(str::is_empty)) =>
        {
            m.remove("namespace");
            m.insert("Namespace".into(), ns.into());
            merged = serde_json::Value::Object(m).to_string();
            merged.as_str()
        }
        _ => text,
    };
    let kind = serde_json::from_str::<serde_json::Value>(text)
        .ok()
        .and_then(|v| {
            ["Kind", "kind"]
                .iter()
                .find_map(|k| v.get(*k).and_then(|k| k.as_str()).map(str::to_owned))
        });
    if kind.as_deref() == Some(SERVICE_DEFAULTS_KIND) {
        return put_defaults(&st, &caller, cas, text).await;
    }
    let entry = ServiceIntentionsEntry::from_json(text)?;
    let dst = entry.destination.clone();
    caller.need(Need::WriteIntention(&dst))?;
    let written = write(&st.store, move |s| {
        if let Some(cas) = cas {
            let current = s.rules.entry(&entry.destination).map(|e| e.modify_index);
            let matches = match current {
                None => cas == 0,
                Some(m) => cas == m,
            };
            if !matches {
                return Ok(false);
            }
        }
        s.rules_mut().apply_entry(&entry)?;
        Ok(true)
    })
    .await?;
    if written {
        info!(destination = %dst, "service-intentions entry written");
    }
    Ok(Json(written).into_response())
}

async fn list_config(
    AxState(st): AxState<AppState>,
    caller: Caller,
    UrlPath(kind): UrlPath<String>,
    params: Params,
) -> ApiResult {
    caller.need(Need::Read)?;
    let kind = check_kind(&kind)?;
    let ns = params.namespace(true)?;
    block(&st, params.blocking()?, rules_index).await;
    let state = st.store.state();
    if kind == Kind::Defaults {
        let filter = params.filter(DEFAULTS_FIELDS)?;
        let entries: Vec<_> = state
            .rules
            .service_defaults_list()
            .into_iter()
            .filter(|e| ns.is_none_or(|ns| ns == WILDCARD || e.service.namespace() == ns))
            .filter(|e| caller.need(Need::ReadService(&e.service)).is_ok())
            .collect();
        let entries = filtered(filter.as_ref(), &entries)?;
        return Ok(indexed(state.rules.index(), entries));
    }
    let filter = params.filter(ENTRY_FIELDS)?;
    let entries: Vec<_> = state
        .rules
        .entries()
        .into_iter()
        .filter(|e| ns.is_none_or(|ns| ns == WILDCARD || e.destination.namespace() == ns))
        .filter(|e| caller.0.may_read(&e.destination))
        .collect();
    let entries = filtered(filter.as_ref(), &entries)?;
    Ok(indexed(state.rules.index(), entries))
}

fn entry_name(name: &str, params: &Params) -> Result<ServiceName, Error> {
    let ns = params.namespace(false)?;
    if name.contains('/') {
        return Err(Error::bad(
            "name",
            format!("name {name:?} is invalid: give the namespace as ?ns="),
        ));
    }
    parse_name(name, ns, "name")
}

async fn get_config(
    AxState(st): AxState<AppState>,
    caller: Caller,
    UrlPath((kind, name)): UrlPath<(String, String)>,
    params: Params,
) -> ApiResult {
    caller.need(Need::Read)?;
    let which = check_kind(&kind)?;
    let dst = entry_name(&name, &params)?;
    let state = st.store.state();
    if which == Kind::Defaults {
        caller.need(Need::ReadService(&dst))?;
        let entry = state.rules.service_defaults(&dst).ok_or_else(|| {
            Error::NotFound(format!("Config entry not found for {kind:?} / {name:?}"))
        })?;
        return Ok(indexed(state.rules.index(), entry));
    }
    caller.need(Need::ReadIntention(&dst))?;
    let entry = state.rules.entry(&dst).ok_or_else(|| {
        Error::NotFound(format!("Config entry not found for {kind:?} / {name:?}"))
    })?;
    Ok(indexed(state.rules.index(), entry))
}

async fn delete_config(
    AxState(st): AxState<AppState>,
    caller: Caller,
    UrlPath((kind, name)): UrlPath<(String, String)>,
    params: Params,
) -> ApiResult {
    let which = check_kind(&kind)?;
    let dst = entry_name(&name, &params)?;
    let cas = params.cas()?;
    if which == Kind::Defaults {
        caller.need(Need::WriteService(&dst))?;
        let svc = dst.clone();
        let deleted = write(&st.store, move |s| {
            if let Some(cas) = cas {
                if s.rules.service_defaults(&svc).map(|e| e.modify_index) != Some(cas) {
                    return Ok(false);
                }
            }
            Ok(s.rules_mut().delete_service_defaults(&svc)?)
        })
        .await?;
        if deleted {
            info!(service = %dst, "service-defaults entry deleted");
        }
        return Ok(match cas {
            Some(_) => Json(json!(deleted)).into_response(),
            None => Json(json!({})).into_response(),
        });
    }
    caller.need(Need::WriteIntention(&dst))?;
    let dst2 = dst.clone();
    let deleted = write(&st.store, move |s| {
        s.rules
            .check_writable(&dst2, &Default::default())
            .map_err(Error::Intention)?;
        if let Some(cas) = cas {
            if s.rules.entry(&dst2).map(|e| e.modify_index) != Some(cas) {
                return Ok(false);
            }
        }
        Ok(s.rules_mut().delete_entry(&dst2) > 0)
    })
    .await?;
    if deleted {
        info!(destination = %dst, "service-intentions entry deleted");
    }
    // Consul answers a CAS delete with whether it deleted, a plain one with `{}`.
    Ok(match cas {
        Some(_) => Json(json!(deleted)).into_response(),
        None => Json(json!({})).into_response(),
    })
}
