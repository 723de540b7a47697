//! `meshctl intention`: create, get, delete, list, match and check intentions, printed as
//! `consul intention` prints them.

use std::process::ExitCode;

use clap::Subcommand;
use mesh_core::intentions::{ServiceName, DEFAULT_NAMESPACE};
use serde_json::{json, Value};

use super::format::{columnize, field, json_body, rfc850};
use super::{fail, out, Ctx};

#[derive(Subcommand)]
pub(crate) enum IntentionCmd {
    /// Create an intention (allow unless -deny)
    Create {
        /// Create an intention that allows when matched
        #[arg(long)]
        allow: bool,
        /// Create an intention that denies when matched
        #[arg(long)]
        deny: bool,
        /// Replace a matching intention
        #[arg(long)]
        replace: bool,
        /// A description
        #[arg(long, value_name = "TEXT")]
        description: Option<String>,
        /// Metadata, key=value; may be repeated
        #[arg(long, value_name = "KEY=VALUE")]
        meta: Vec<String>,
        /// SRC DST
        #[arg(value_name = "SRC DST", num_args = 0..)]
        args: Vec<String>,
    },
    /// Delete an intention: SRC DST, or its ID
    Delete {
        #[arg(value_name = "SRC DST | ID", num_args = 0..)]
        args: Vec<String>,
    },
    /// Show an intention: SRC DST, or its ID
    Get {
        #[arg(value_name = "SRC DST | ID", num_args = 0..)]
        args: Vec<String>,
    },
    /// List every intention
    List,
    /// Show the intentions that match a source or a destination, in evaluation order
    Match {
        /// Match intentions with the given source
        #[arg(long)]
        source: bool,
        /// Match intentions with the given destination (the default)
        #[arg(long)]
        destination: bool,
        #[arg(value_name = "NAME", num_args = 0..)]
        args: Vec<String>,
    },
    /// Check whether SRC may connect to DST
    Check {
        #[arg(value_name = "SRC DST", num_args = 0..)]
        args: Vec<String>,
    },
}

/// A `create` argument split as Consul's `ParseIntentionTarget` splits it.
struct Target {
    partition: String,
    namespace: String,
    name: String,
}

/// `name`, `ns/name` or `partition/ns/name`. A bare name has no namespace: the agent puts it
/// in the request's namespace (`-namespace`, else `default`) with the same rule
/// ([`ServiceName::parse_in`]) it reads `get`, `check`, `delete` and `-replace` arguments
/// with, so the same arguments always name the same intention. `peer:` names and more than
/// two `/` are refused with that parser's message; a partition other than `default` is
/// refused by the agent, naming it.
fn split_target(s: &str) -> Result<Target, String> {
    if s.starts_with("peer:") || s.matches('/').count() > 2 {
        return Err(match ServiceName::parse_in(s, DEFAULT_NAMESPACE) {
            Err(e) => e.to_string(),
            Ok(_) => format!("{s:?} is not a service name"),
        });
    }
    let parts: Vec<&str> = s.split('/').collect();
    let (partition, namespace, name) = match parts.as_slice() {
        [name] => ("", "", *name),
        [ns, name] => ("", *ns, *name),
        [partition, ns, name] => (*partition, *ns, *name),
        _ => unreachable!("at most two '/' checked above"),
    };
    Ok(Target {
        partition: partition.to_owned(),
        namespace: namespace.to_owned(),
        name: name.to_owned(),
    })
}

/// Consul's short form: the name alone in namespace `default`, `ns/name` otherwise.
fn part_string(ns: &str, name: &str) -> String {
    if ns.is_empty() || ns == "default" {
        name.to_owned()
    } else {
        format!("{ns}/{name}")
    }
}

/// `web => api (allow)`, as Consul's `Intention.String` prints it.
fn ixn_string(v: &Value) -> String {
    format!(
        "{} => {} ({})",
        part_string(field(v, "SourceNS"), field(v, "SourceName")),
        part_string(field(v, "DestinationNS"), field(v, "DestinationName")),
        field(v, "Action")
    )
}

/// Runs `meshctl intention …`; exit 0, 1 on error, 2 when `check` answers Denied.
pub(crate) async fn intention(ctx: &Ctx, cmd: IntentionCmd) -> ExitCode {
    match cmd {
        IntentionCmd::Create {
            allow,
            deny,
            replace,
            description,
            meta,
            args,
        } => {
            if allow && deny {
                return fail("Only one of -allow or -deny may be specified.");
            }
            let action = if deny { "deny" } else { "allow" };
            let [src, dst] = args.as_slice() else {
                return fail("Error: Must specify two arguments: source and destination");
            };
            let source = match split_target(src) {
                Ok(p) => p,
                Err(e) => return fail(format!("Error: Invalid intention source: {e}")),
            };
            let destination = match split_target(dst) {
                Ok(p) => p,
                Err(e) => return fail(format!("Error: Invalid intention destination: {e}")),
            };
            let mut meta_map = serde_json::Map::new();
            for kv in &meta {
                let Some((k, v)) = kv.split_once('=') else {
                    return fail(format!(
                        "invalid value {kv:?} for flag -meta: expected key=value"
                    ));
                };
                meta_map.insert(k.to_owned(), v.into());
            }
            let shown = format!(
                "{} => {} ({action})",
                part_string(&source.namespace, &source.name),
                part_string(&destination.namespace, &destination.name)
            );
            let result = if replace {
                let body = json!({
                    "SourceType": "consul",
                    "Action": action,
                    "Description": description.clone().unwrap_or_default(),
                    "Meta": meta_map,
                });
                let url = ctx.url(
                    "/v1/connect/intentions/exact",
                    &[("source", src), ("destination", dst)],
                );
                ctx.call("PUT", &url, Some(body.to_string()))
                    .await
                    .map_err(|e| {
                        format!(
                            "Error replacing intention with source {src:?} and destination {dst:?}: {e}"
                        )
                    })
            } else {
                let mut body = json!({
                    "SourceNS": source.namespace,
                    "SourceName": source.name,
                    "DestinationNS": destination.namespace,
                    "DestinationName": destination.name,
                    "SourceType": "consul",
                    "Action": action,
                    "Description": description.unwrap_or_default(),
                    "Meta": meta_map,
                });
                for (key, value) in [
                    ("SourcePartition", source.partition),
                    ("DestinationPartition", destination.partition),
                ] {
                    if !value.is_empty() {
                        body[key] = value.into();
                    }
                }
                ctx.call(
                    "POST",
                    &ctx.url("/v1/connect/intentions", &[]),
                    Some(body.to_string()),
                )
                .await
                .map_err(|e| format!("Error creating intention {shown:?}: {e}"))
            };
            match result {
                Ok(_) => {
                    out(format!("Created: {shown}"));
                    ExitCode::SUCCESS
                }
                Err(e) => fail(e),
            }
        }
        IntentionCmd::Delete { args } => {
            let (method, url) = match args.as_slice() {
                [id] => (
                    "DELETE",
                    ctx.url(&format!("/v1/connect/intentions/{id}"), &[]),
                ),
                [src, dst] => (
                    "DELETE",
                    ctx.url(
                        "/v1/connect/intentions/exact",
                        &[("source", src), ("destination", dst)],
                    ),
                ),
                _ => return fail("command requires exactly 1 or 2 arguments"),
            };
            match ctx.call(method, &url, None).await {
                Ok(_) => {
                    out("Intention deleted.");
                    ExitCode::SUCCESS
                }
                Err(e) => fail(format!("Error deleting the intention: {e}")),
            }
        }
        IntentionCmd::Get { args } => {
            let url = match args.as_slice() {
                [id] => ctx.url(&format!("/v1/connect/intentions/{id}"), &[]),
                [src, dst] => ctx.url(
                    "/v1/connect/intentions/exact",
                    &[("source", src), ("destination", dst)],
                ),
                _ => return fail("command requires exactly 1 or 2 arguments"),
            };
            let ixn = match ctx
                .call("GET", &url, None)
                .await
                .and_then(|r| json_body(&r))
            {
                Ok(v) => v,
                Err(e) => return fail(format!("Error reading the intention: {e}")),
            };
            let mut rows = vec![
                vec![
                    "Source:".to_owned(),
                    part_string(field(&ixn, "SourceNS"), field(&ixn, "SourceName")),
                ],
                vec![
                    "Destination:".to_owned(),
                    part_string(field(&ixn, "DestinationNS"), field(&ixn, "DestinationName")),
                ],
                vec!["Action:".to_owned(), field(&ixn, "Action").to_owned()],
                vec!["ID:".to_owned(), field(&ixn, "ID").to_owned()],
            ];
            if !field(&ixn, "Description").is_empty() {
                rows.push(vec![
                    "Description:".to_owned(),
                    field(&ixn, "Description").to_owned(),
                ]);
            }
            if let Some(meta) = ixn.get("Meta").and_then(Value::as_object) {
                for (k, v) in meta {
                    rows.push(vec![
                        format!("Meta[{k}]:"),
                        v.as_str().unwrap_or("").to_owned(),
                    ]);
                }
            }
            rows.push(vec![
                "Created At:".to_owned(),
                rfc850(field(&ixn, "CreatedAt")),
            ]);
            out(columnize(&rows));
            ExitCode::SUCCESS
        }
        IntentionCmd::List => {
            let url = ctx.url("/v1/connect/intentions", &[]);
            let list = match ctx
                .call("GET", &url, None)
                .await
                .and_then(|r| json_body(&r))
            {
                Ok(Value::Array(l)) => l,
                Ok(_) => return fail("Failed to retrieve the intentions list: not a list"),
                Err(e) => return fail(format!("Failed to retrieve the intentions list: {e}")),
            };
            super::status::warn_if_proxy_decides(ctx).await;
            if list.is_empty() {
                eprintln!("There are no intentions.");
                return ExitCode::from(2);
            }
            let mut rows = vec![vec![
                "ID".to_owned(),
                "Source".to_owned(),
                "Action".to_owned(),
                "Destination".to_owned(),
                "Precedence".to_owned(),
            ]];
            for ixn in &list {
                rows.push(vec![
                    field(ixn, "ID").to_owned(),
                    part_string(field(ixn, "SourceNS"), field(ixn, "SourceName")),
                    field(ixn, "Action").to_owned(),
                    part_string(field(ixn, "DestinationNS"), field(ixn, "DestinationName")),
                    ixn.get("Precedence")
                        .map(Value::to_string)
                        .unwrap_or_default(),
                ]);
            }
            out(columnize(&rows));
            ExitCode::SUCCESS
        }
        IntentionCmd::Match {
            source,
            destination,
            args,
        } => {
            let [name] = args.as_slice() else {
                return fail("Error: command requires exactly one argument: src or dst");
            };
            if source && destination {
                return fail("Error: only one of -source or -destination may be specified");
            }
            let by = if source { "source" } else { "destination" };
            let url = ctx.url(
                "/v1/connect/intentions/match",
                &[("by", by), ("name", name)],
            );
            let v = match ctx
                .call("GET", &url, None)
                .await
                .and_then(|r| json_body(&r))
            {
                Ok(v) => v,
                Err(e) => return fail(format!("Error matching the connection: {e}")),
            };
            for ixn in v
                .get(name.as_str())
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                out(ixn_string(ixn));
            }
            ExitCode::SUCCESS
        }
        IntentionCmd::Check { args } => {
            let [src, dst] = args.as_slice() else {
                return fail("Error: command requires exactly two arguments: src and dst");
            };
            let url = ctx.url(
                "/v1/connect/intentions/check",
                &[("source", src), ("destination", dst)],
            );
            let v = match ctx
                .call("GET", &url, None)
                .await
                .and_then(|r| json_body(&r))
            {
                Ok(v) => v,
                Err(e) => return fail(format!("Error checking the connection: {e}")),
            };
            match v.get("Allowed").and_then(Value::as_bool) {
                Some(true) => {
                    out("Allowed");
                    ExitCode::SUCCESS
                }
                Some(false) => {
                    out("Denied");
                    ExitCode::from(2)
                }
                None => fail("Error checking the connection: no Allowed in the answer"),
            }
        }
    }
}
