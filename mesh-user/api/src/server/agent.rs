//! `GET /v1/agent/mesh/status`: the agent's view of the intentions in force. Whether the
//! kernel holds them (`KernelIntentions`: `in-sync`, or `proxy-decides` with the `Reason`
//! when a kernel update failed and the proxies alone decide), how many the agent applied,
//! and how many the store accepts (`MaxIntentions`). Consul has no such endpoint; it lives
//! under `/v1/agent/` beside the agent's other local views and needs a token that may read
//! intentions.

use axum::extract::State as AxState;
use axum::routing::get;
use axum::Router;
use serde_json::json;

use super::{indexed, ApiResult, AppState, Caller};
use crate::acl::Need;
use crate::KernelIntentions;

/// The routes of this module.
pub(super) fn routes() -> Router<AppState> {
    Router::new().route("/v1/agent/mesh/status", get(status))
}

async fn status(AxState(st): AxState<AppState>, caller: Caller) -> ApiResult {
    caller.need(Need::Read)?;
    let report = st.status.status();
    let state = st.store.state();
    let max = st.store.max_intentions();
    let reason = match &report.kernel_intentions {
        KernelIntentions::ProxyDecides { reason } => Some(reason.clone()),
        _ => None,
    };
    Ok(indexed(
        state.rules.index(),
        json!({
            "KernelIntentions": report.kernel_intentions.as_str(),
            "Reason": reason,
            "Intentions": report.intentions,
            "StoredIntentions": state.rules.len(),
            "MaxIntentions": (max != usize::MAX).then_some(max),
        }),
    ))
}
