//! `/v1/acl/*`: ACL tokens (create, list, read, `self`, delete) and the refused `bootstrap`.

use axum::extract::{Path as UrlPath, State as AxState};
use axum::response::IntoResponse;
use axum::routing::{get, put};
use axum::{Json, Router};
use hyper::body::Bytes;
use tracing::info;

use super::blocking::block;
use super::{filtered, indexed, text_body, write, ApiResult, AppState, Caller, Params};
use crate::acl::Need;
use crate::{Error, Token, TokenRequest};

/// The routes of this module.
pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/acl/token", put(create_token))
        .route("/v1/acl/tokens", get(list_tokens))
        .route("/v1/acl/token/self", get(token_self))
        .route("/v1/acl/token/{id}", get(read_token).delete(delete_token))
        .route("/v1/acl/bootstrap", put(bootstrap))
}

/// The fields of Consul's `ACLTokenListStub` a `?filter=` may select.
const TOKEN_FIELDS: &[&str] = &[
    "AccessorID",
    "SecretID",
    "Description",
    "Policies",
    "Roles",
    "ServiceIdentities",
    "NodeIdentities",
    "TemplatedPolicies",
    "Local",
    "AuthMethod",
    "ExpirationTime",
    "CreateTime",
    "Hash",
    "CreateIndex",
    "ModifyIndex",
    "Legacy",
];

async fn create_token(AxState(st): AxState<AppState>, caller: Caller, body: Bytes) -> ApiResult {
    caller.need(Need::AclWrite)?;
    let req = TokenRequest::from_json(text_body(&body)?)?;
    let token = write(&st.store, move |s| s.add_token(req)).await?;
    info!(accessor = %token.accessor_id, by = %caller.0.accessor_id, "ACL token created");
    Ok(Json(token.full()).into_response())
}

async fn list_tokens(AxState(st): AxState<AppState>, caller: Caller, params: Params) -> ApiResult {
    caller.need(Need::AclRead)?;
    let filter = params.filter(TOKEN_FIELDS)?;
    block(&st, params.blocking()?, |st| st.store.state().acl_index).await;
    let state = st.store.state();
    let stubs: Vec<_> = state.tokens.iter().map(Token::stub).collect();
    let stubs = filtered(filter.as_ref(), &stubs)?;
    Ok(indexed(state.acl_index, stubs))
}

async fn token_self(caller: Caller) -> ApiResult {
    Ok(Json(caller.0.full()).into_response())
}

async fn read_token(
    AxState(st): AxState<AppState>,
    caller: Caller,
    UrlPath(id): UrlPath<String>,
) -> ApiResult {
    caller.need(Need::AclRead)?;
    let state = st.store.state();
    let token = state
        .tokens
        .iter()
        .find(|t| t.accessor_id == id)
        .ok_or_else(|| Error::NotFound("ACL token not found".into()))?;
    Ok(indexed(state.acl_index, token.full()))
}

async fn delete_token(
    AxState(st): AxState<AppState>,
    caller: Caller,
    UrlPath(id): UrlPath<String>,
) -> ApiResult {
    caller.need(Need::AclWrite)?;
    if id == caller.0.accessor_id {
        return Err(Error::Forbidden(
            "Deletion of the request's authorization token is not permitted".into(),
        ));
    }
    let id2 = id.clone();
    write(&st.store, move |s| s.remove_token(&id2)).await?;
    info!(accessor = %id, by = %caller.0.accessor_id, "ACL token deleted");
    Ok(Json(true).into_response())
}

async fn bootstrap() -> ApiResult {
    Err(Error::Forbidden(
        "Permission denied: ACL bootstrap no longer allowed: the agent made the bootstrap \
         token on its first start (see acl-bootstrap-token in its state directory)"
            .into(),
    ))
}
