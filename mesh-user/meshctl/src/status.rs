//! `meshctl status`: the agent's view of the intentions in force (`GET /v1/agent/mesh/status`),
//! printed in `consul info`'s shape; and the warning `intention list` prints when the kernel
//! does not hold the rules.

use std::process::ExitCode;

use serde_json::Value;

use super::format::{field, json_body};
use super::{fail, out, Ctx};

/// The status path.
const STATUS_PATH: &str = "/v1/agent/mesh/status";

/// `meshctl status`: exit 0 when read (a warning on stderr when the proxy decides), 1 on error.
pub(crate) async fn status(ctx: &Ctx) -> ExitCode {
    let url = ctx.url_plain(STATUS_PATH, &[]);
    let v = match ctx
        .call("GET", &url, None)
        .await
        .and_then(|r| json_body(&r))
    {
        Ok(v) => v,
        Err(e) => return fail(format!("Error querying the agent's status: {e}")),
    };
    let num = |k: &str| match &v[k] {
        Value::Number(n) => n.to_string(),
        _ => "none".to_owned(),
    };
    let mut lines = vec![
        "mesh:".to_owned(),
        format!("\tkernel_intentions = {}", field(&v, "KernelIntentions")),
    ];
    if let Some(r) = v["Reason"].as_str() {
        lines.push(format!("\treason = {r}"));
    }
    lines.push(format!("\tintentions = {}", num("Intentions")));
    lines.push(format!("\tstored_intentions = {}", num("StoredIntentions")));
    lines.push(format!("\tmax_intentions = {}", num("MaxIntentions")));
    out(lines.join("\n"));
    if let Some(w) = warning(&v) {
        eprintln!("{w}");
    }
    ExitCode::SUCCESS
}

/// The warning for a status answer, when the kernel lets the proxy decide.
fn warning(v: &Value) -> Option<String> {
    (field(v, "KernelIntentions") == "proxy-decides").then(|| {
        format!(
            "Warning: the kernel does not hold the intentions ({}); the proxies decide every \
             connection",
            v["Reason"].as_str().unwrap_or("no reason given")
        )
    })
}

/// Prints the warning on stderr when the agent says the kernel lets the proxy decide; says
/// nothing when the status cannot be read (an older agent, a token that may not read it).
pub(crate) async fn warn_if_proxy_decides(ctx: &Ctx) {
    let url = ctx.url_plain(STATUS_PATH, &[]);
    if let Ok(v) = ctx
        .call("GET", &url, None)
        .await
        .and_then(|r| json_body(&r))
    {
        if let Some(w) = warning(&v) {
            eprintln!("{w}");
        }
    }
}
