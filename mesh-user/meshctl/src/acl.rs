//! `meshctl acl token`: create, list, read and delete ACL tokens, printed as `consul acl token`
//! prints them.

use std::process::ExitCode;

use clap::Subcommand;
use serde_json::{json, Value};

use super::format::{enc, field, go_time, json_body};
use super::{fail, out, Ctx};

#[derive(Subcommand)]
pub(crate) enum AclCmd {
    /// Manage tokens
    #[command(subcommand)]
    Token(TokenCmd),
}

#[derive(Subcommand)]
pub(crate) enum TokenCmd {
    /// Create a token
    Create {
        /// A description
        #[arg(long, value_name = "TEXT")]
        description: Option<String>,
        /// A policy by name: operator, read-only or intention-write:PATTERN; may be repeated
        #[arg(long, alias = "policy-name", value_name = "NAME")]
        policy: Vec<String>,
        /// A policy by ID; may be repeated
        #[arg(long, value_name = "ID")]
        policy_id: Vec<String>,
    },
    /// List tokens (without their secrets)
    List,
    /// Show one token
    Read {
        /// Its AccessorID
        #[arg(long)]
        id: Option<String>,
        /// The token this command uses
        #[arg(long = "self")]
        self_: bool,
    },
    /// Delete a token
    Delete {
        /// Its AccessorID
        #[arg(long)]
        id: Option<String>,
    },
}

/// A token as `consul acl token read` prints it.
fn format_token(t: &Value) -> String {
    let mut s = String::new();
    s.push_str(&format!("AccessorID:       {}\n", field(t, "AccessorID")));
    let secret = t
        .get("SecretID")
        .and_then(Value::as_str)
        .unwrap_or("<hidden>");
    s.push_str(&format!("SecretID:         {secret}\n"));
    s.push_str(&format!("Description:      {}\n", field(t, "Description")));
    s.push_str(&format!(
        "Local:            {}\n",
        t.get("Local").and_then(Value::as_bool).unwrap_or(false)
    ));
    s.push_str(&format!(
        "Create Time:      {}\n",
        go_time(field(t, "CreateTime"))
    ));
    let policies = t.get("Policies").and_then(Value::as_array);
    if let Some(ps) = policies.filter(|p| !p.is_empty()) {
        s.push_str("Policies:\n");
        for p in ps {
            match field(p, "ID") {
                "" => s.push_str(&format!("   {}\n", field(p, "Name"))),
                id => s.push_str(&format!("   {id} - {}\n", field(p, "Name"))),
            }
        }
    }
    s
}

/// Runs `meshctl acl token …`; exit 0, 1 on error.
pub(crate) async fn token(ctx: &Ctx, cmd: TokenCmd) -> ExitCode {
    match cmd {
        TokenCmd::Create {
            description,
            policy,
            policy_id,
        } => {
            let mut links: Vec<Value> = policy.iter().map(|p| json!({ "Name": p })).collect();
            links.extend(policy_id.iter().map(|id| json!({ "ID": id })));
            let body = json!({
                "Description": description.unwrap_or_default(),
                "Policies": links,
            });
            let url = ctx.url("/v1/acl/token", &[]);
            match ctx
                .call("PUT", &url, Some(body.to_string()))
                .await
                .and_then(|r| json_body(&r))
            {
                Ok(t) => {
                    print!("{}", format_token(&t));
                    ExitCode::SUCCESS
                }
                Err(e) => fail(format!("Failed to create new token: {e}")),
            }
        }
        TokenCmd::List => {
            let url = ctx.url("/v1/acl/tokens", &[]);
            match ctx
                .call("GET", &url, None)
                .await
                .and_then(|r| json_body(&r))
            {
                Ok(Value::Array(tokens)) => {
                    let text: Vec<String> = tokens.iter().map(format_token).collect();
                    print!("{}", text.join("\n"));
                    ExitCode::SUCCESS
                }
                Ok(_) => fail("Failed to retrieve the token list: not a list"),
                Err(e) => fail(format!("Failed to retrieve the token list: {e}")),
            }
        }
        TokenCmd::Read { id, self_ } => {
            let url = match (id.as_deref().filter(|i| !i.is_empty()), self_) {
                (Some(_), true) => return fail("Cannot use both -id and -self"),
                (Some(id), false) => ctx.url(&format!("/v1/acl/token/{}", enc(id)), &[]),
                (None, true) => ctx.url("/v1/acl/token/self", &[]),
                (None, false) => return fail("Must specify the -id parameter"),
            };
            match ctx
                .call("GET", &url, None)
                .await
                .and_then(|r| json_body(&r))
            {
                Ok(t) => {
                    print!("{}", format_token(&t));
                    ExitCode::SUCCESS
                }
                Err(e) => fail(format!(
                    "Error reading token {:?}: {e}",
                    id.unwrap_or_else(|| "self".into())
                )),
            }
        }
        TokenCmd::Delete { id } => {
            let Some(id) = id.filter(|i| !i.is_empty()) else {
                return fail("Must specify the -id parameter");
            };
            let url = ctx.url(&format!("/v1/acl/token/{}", enc(&id)), &[]);
            match ctx.call("DELETE", &url, None).await {
                Ok(_) => {
                    out(format!("Token {id:?} deleted successfully"));
                    ExitCode::SUCCESS
                }
                Err(e) => fail(format!("Error deleting token {id:?}: {e}")),
            }
        }
    }
}
