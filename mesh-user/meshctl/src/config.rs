//! `meshctl config`: write, read, list and delete `service-intentions` and `service-defaults`
//! config entries, as `consul config` does.

use std::io::Read;
use std::path::Path;
use std::process::ExitCode;

use clap::{Args, Subcommand};
use mesh_core::intentions::defaults::config_entry_kind;
use mesh_core::intentions::{
    ServiceDefaultsEntry, ServiceIntentionsEntry, SERVICE_DEFAULTS_KIND, SERVICE_INTENTIONS_KIND,
};
use serde_json::Value;

use super::format::{enc, field, json_body, pretty4};
use super::{fail, out, Ctx};

#[derive(Args)]
pub(crate) struct KindName {
    /// The entry's kind (service-intentions, service-defaults)
    #[arg(long)]
    kind: Option<String>,
    /// The entry's name (the service)
    #[arg(long)]
    name: Option<String>,
}

#[derive(Subcommand)]
pub(crate) enum ConfigCmd {
    /// Create or update a config entry from a file (HCL or JSON), or - for stdin
    Write {
        /// Write only if the entry's ModifyIndex is -modify-index (0: only if absent)
        #[arg(long)]
        cas: bool,
        #[arg(long, value_name = "INDEX")]
        modify_index: Option<u64>,
        #[arg(value_name = "FILE", num_args = 0..)]
        args: Vec<String>,
    },
    /// Print a config entry as JSON
    Read {
        #[command(flatten)]
        which: KindName,
    },
    /// Delete a config entry
    Delete {
        #[command(flatten)]
        which: KindName,
        /// Delete only if the entry's ModifyIndex is -modify-index
        #[arg(long)]
        cas: bool,
        #[arg(long, value_name = "INDEX")]
        modify_index: Option<u64>,
    },
    /// List the names of the config entries of a kind
    List {
        /// The kind (service-intentions, service-defaults)
        #[arg(long)]
        kind: Option<String>,
    },
}

/// An entry read and validated, ready to send.
struct Loaded {
    kind: &'static str,
    name: String,
    json: String,
}

/// Reads an entry from a file or stdin (`-`): JSON when the extension is `.json` or the text
/// starts with `{`, HCL otherwise, as `consul config write` accepts both. The `Kind` decides
/// the schema.
fn load_entry(arg: &str) -> Result<Loaded, String> {
    let mut text = String::new();
    if arg == "-" {
        std::io::stdin()
            .read_to_string(&mut text)
            .map_err(|e| format!("Failed to load data: reading stdin: {e}"))?;
    } else {
        text = std::fs::read_to_string(arg)
            .map_err(|e| format!("Failed to load data: Failed to read file: {e}"))?;
    }
    let ext = Path::new(arg)
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    let json = match ext.as_deref() {
        Some("json") => true,
        Some("hcl") => false,
        _ => text.trim_start().starts_with('{'),
    };
    let failed = |e| format!("Failed to decode config entry input: {e}");
    if config_entry_kind(&text, !json).as_deref() == Some(SERVICE_DEFAULTS_KIND) {
        let entry = if json {
            ServiceDefaultsEntry::from_json(&text)
        } else {
            ServiceDefaultsEntry::from_hcl(&text)
        }
        .map_err(failed)?;
        return Ok(Loaded {
            kind: SERVICE_DEFAULTS_KIND,
            name: entry.service.name().to_owned(),
            json: entry.to_json(),
        });
    }
    let entry = if json {
        ServiceIntentionsEntry::from_json(&text)
    } else {
        ServiceIntentionsEntry::from_hcl(&text)
    }
    .map_err(failed)?;
    Ok(Loaded {
        kind: SERVICE_INTENTIONS_KIND,
        name: entry.destination.name().to_owned(),
        json: entry.to_json(),
    })
}

/// `-kind` and `-name`, both required (Consul's messages when missing).
fn kind_name(which: &KindName) -> Result<(&str, &str), String> {
    let kind = which
        .kind
        .as_deref()
        .filter(|k| !k.is_empty())
        .ok_or("Must specify the -kind parameter")?;
    let name = which
        .name
        .as_deref()
        .filter(|n| !n.is_empty())
        .ok_or("Must specify the -name parameter")?;
    Ok((kind, name))
}

/// The `?cas=` value of `-cas -modify-index N`; an error when only one of them is given.
fn cas_index(cas: bool, modify_index: Option<u64>) -> Result<Option<String>, String> {
    match (cas, modify_index) {
        (true, Some(i)) => Ok(Some(i.to_string())),
        (true, None) => Err("Must specify a -modify-index index when using -cas".into()),
        (false, Some(_)) => Err("Cannot specify -modify-index without -cas".into()),
        (false, None) => Ok(None),
    }
}

/// Runs `meshctl config …`; exit 0, 1 on error.
pub(crate) async fn config(ctx: &Ctx, cmd: ConfigCmd) -> ExitCode {
    match cmd {
        ConfigCmd::Write {
            cas,
            modify_index,
            args,
        } => {
            let [file] = args.as_slice() else {
                return fail(
                    "Must provide exactly one positional argument to specify the config entry to write",
                );
            };
            let cas = match cas_index(cas, modify_index) {
                Ok(c) => c,
                Err(e) => return fail(e),
            };
            let entry = match load_entry(file) {
                Ok(e) => e,
                Err(e) => return fail(e),
            };
            let Loaded { kind, name, json } = entry;
            let mut query = Vec::new();
            if let Some(c) = &cas {
                query.push(("cas", c.as_str()));
            }
            let url = ctx.url("/v1/config", &query);
            let written = ctx
                .call("PUT", &url, Some(json))
                .await
                .and_then(|r| json_body(&r));
            match written {
                Ok(Value::Bool(true)) => {
                    out(format!("Config entry written: {kind}/{name}"));
                    ExitCode::SUCCESS
                }
                Ok(_) => fail(format!("Config entry not updated: {kind}/{name}")),
                Err(e) => fail(format!("Error writing config entry {kind}/{name}: {e}")),
            }
        }
        ConfigCmd::Read { which } => {
            let (kind, name) = match kind_name(&which) {
                Ok(kn) => kn,
                Err(e) => return fail(e),
            };
            let url = ctx.url(&format!("/v1/config/{}/{}", enc(kind), enc(name)), &[]);
            match ctx.call("GET", &url, None).await {
                Ok(r) => {
                    out(pretty4(&r.body));
                    ExitCode::SUCCESS
                }
                Err(e) => fail(format!("Error reading config entry {kind}/{name}: {e}")),
            }
        }
        ConfigCmd::Delete {
            which,
            cas,
            modify_index,
        } => {
            let (kind, name) = match kind_name(&which) {
                Ok(kn) => kn,
                Err(e) => return fail(e),
            };
            let cas = match cas_index(cas, modify_index) {
                Ok(c) => c,
                Err(e) => return fail(e),
            };
            let mut query = Vec::new();
            if let Some(c) = &cas {
                query.push(("cas", c.as_str()));
            }
            let url = ctx.url(&format!("/v1/config/{}/{}", enc(kind), enc(name)), &query);
            match ctx
                .call("DELETE", &url, None)
                .await
                .and_then(|r| json_body(&r))
            {
                Ok(Value::Bool(false)) => fail(format!("Config entry not deleted: {kind}/{name}")),
                Ok(_) => {
                    out(format!("Config entry deleted: {kind}/{name}"));
                    ExitCode::SUCCESS
                }
                Err(e) => fail(format!("Error deleting config entry {kind}/{name}: {e}")),
            }
        }
        ConfigCmd::List { kind } => {
            let Some(kind) = kind.filter(|k| !k.is_empty()) else {
                return fail("Must specify the -kind parameter");
            };
            let url = ctx.url(&format!("/v1/config/{}", enc(&kind)), &[]);
            match ctx
                .call("GET", &url, None)
                .await
                .and_then(|r| json_body(&r))
            {
                Ok(Value::Array(entries)) => {
                    for e in &entries {
                        out(field(e, "Name"));
                    }
                    ExitCode::SUCCESS
                }
                Ok(_) => fail("Error listing config entries: not a list"),
                Err(e) => fail(format!(
                    "Error listing config entries for kind {kind:?}: {e}"
                )),
            }
        }
    }
}
