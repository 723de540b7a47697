//! `/v1/agent/connect/authorize`: may a client certificate's service connect to a target.

use axum::extract::State as AxState;
use axum::routing::post;
use axum::Router;
use hyper::body::Bytes;
use serde::Deserialize;
use serde_json::json;

use super::{indexed, text_body, ApiResult, AppState, Caller, Params};
use crate::acl::{decode_json, Need};
use crate::Error;
use mesh_core::identity::SpiffeId;
use mesh_core::intentions::{Matched, ServiceName, DEFAULT_NAMESPACE, DEFAULT_PARTITION, WILDCARD};

/// The routes of this module.
pub(super) fn routes() -> Router<AppState> {
    Router::new().route("/v1/agent/connect/authorize", post(authorize))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AuthorizeRequest {
    #[serde(rename = "Target")]
    target: Option<String>,
    #[serde(rename = "ClientCertURI")]
    client_cert_uri: Option<String>,
    #[serde(rename = "ClientCertSerial")]
    _client_cert_serial: Option<String>,
    #[serde(rename = "Namespace")]
    namespace: Option<String>,
    #[serde(rename = "Partition")]
    partition: Option<String>,
}

async fn authorize(
    AxState(st): AxState<AppState>,
    caller: Caller,
    params: Params,
    body: Bytes,
) -> ApiResult {
    caller.need(Need::Read)?;
    let ns_param = params.namespace(false)?.map(str::to_owned);
    let req: AuthorizeRequest = decode_json(text_body(&body)?)?;
    let target = req.target.unwrap_or_default();
    if target.is_empty() {
        return Err(Error::bad("Target", "Target service must be specified"));
    }
    let uri = req.client_cert_uri.unwrap_or_default();
    let id: SpiffeId = uri.parse().map_err(|e| {
        Error::bad(
            "ClientCertURI",
            format!("ClientCertURI not a valid Connect identifier: {e}"),
        )
    })?;
    let partition = req
        .partition
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| DEFAULT_PARTITION.to_owned());
    if id.partition() != partition || partition != DEFAULT_PARTITION {
        return Err(Error::bad(
            "Partition",
            format!(
                "Mismatched partitions: {:?} != {partition:?}",
                id.partition()
            ),
        ));
    }
    let ns = req
        .namespace
        .filter(|n| !n.is_empty())
        .or(ns_param)
        .unwrap_or_else(|| DEFAULT_NAMESPACE.to_owned());
    if target == WILDCARD {
        return Err(Error::bad(
            "Target",
            "Target must be a service name, not a wildcard",
        ));
    }
    let dst = ServiceName::new(ns, target.clone())
        .map_err(|e| Error::bad("Target", format!("Target {target:?} is invalid: {e}")))?;
    let src = ServiceName::new(id.namespace(), id.service()).map_err(|e| {
        Error::bad(
            "ClientCertURI",
            format!("ClientCertURI not a valid Service identifier: {e}"),
        )
    })?;
    let state = st.store.state();
    let decision = state.rules.check(&src, &dst);
    let reason = match &decision.matched {
        Matched::Intention { id, .. } => match state.rules.get(id) {
            Some(it) => format!("Matched L4 intention: {it}"),
            None => "Matched L4 intention".to_owned(),
        },
        Matched::Default => "Default intention policy".to_owned(),
    };
    Ok(indexed(
        state.rules.index(),
        json!({ "Authorized": decision.allowed, "Reason": reason }),
    ))
}
