//! `meshctl`: the mesh's command-line client, with Consul's verbs, flags and output.
//!
//! ```text
//! meshctl intention create [-allow|-deny] [-replace] [-description D] [-meta k=v] SRC DST
//! meshctl intention get SRC DST | ID          meshctl intention delete SRC DST | ID
//! meshctl intention list                      meshctl intention match [-source|-destination] NAME
//! meshctl intention check SRC DST             (prints Allowed or Denied; exit 0, 2 if denied, 1 on error)
//! meshctl config write FILE|-                 (HCL or JSON, by extension or content)
//! meshctl config read -kind service-intentions -name NAME
//! meshctl config delete -kind service-intentions -name NAME
//! meshctl config list -kind service-intentions
//! meshctl acl token create [-description D] [-policy operator|read-only|intention-write:PATTERN]...
//! meshctl acl token list | read -id ID | read -self | delete -id ID
//!
//! meshctl apply -f FILE|DIR [-n NS]           meshctl delete -f FILE|DIR [-n NS]
//! meshctl get pods|services [NAME] [-n NS | -A] [-o wide|json|name]
//! meshctl port-forward service/web 9090:9090  (also pod/NAME; until interrupted; root)
//! meshctl proxy read POD [-n NS] [-o json]
//! ```
//!
//! The last four speak to `meshd local`, with kubectl's flags and output.
//!
//! Flags take one dash or two (`-allow`, `--allow`, `-http-addr=...`). The agent is found
//! with `-http-addr` or `MESH_HTTP_ADDR` (`127.0.0.1:8500`, `http://host:port`,
//! `unix:///path/api.sock`); the token with `-token`, `-token-file`, `MESH_HTTP_TOKEN` or
//! `MESH_HTTP_TOKEN_FILE`, in that order.

use std::ffi::OsString;
use std::io::{Read, Write};
use std::path::Path;
use std::process::ExitCode;
use std::time::SystemTime;

use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use mesh_api::{
    Address, Client, Response, DEFAULT_HTTP_ADDR, HTTP_ADDR_ENV, HTTP_TOKEN_ENV,
    HTTP_TOKEN_FILE_ENV,
};
use mesh_core::intentions::{ServiceIntentionsEntry, SERVICE_INTENTIONS_KIND};
use serde_json::{json, Value};

mod kube;

#[derive(Parser)]
#[command(name = "meshctl", about = "The mesh's command-line client", version)]
struct Cli {
    #[command(flatten)]
    http: HttpFlags,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Args)]
struct HttpFlags {
    /// The agent's API: host:port, http://host:port or unix:///path [env: MESH_HTTP_ADDR]
    #[arg(long, global = true, value_name = "ADDR")]
    http_addr: Option<String>,
    /// The ACL token [env: MESH_HTTP_TOKEN]
    #[arg(long, global = true, value_name = "TOKEN")]
    token: Option<String>,
    /// A file holding the ACL token [env: MESH_HTTP_TOKEN_FILE]
    #[arg(long, global = true, value_name = "FILE")]
    token_file: Option<String>,
    /// The namespace of names given without one
    #[arg(short = 'n', long, global = true, value_name = "NS")]
    namespace: Option<String>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create, read and check intentions
    #[command(subcommand)]
    Intention(IntentionCmd),
    /// Write, read and delete config entries
    #[command(subcommand)]
    Config(ConfigCmd),
    /// Manage ACL tokens
    #[command(subcommand)]
    Acl(AclCmd),
    /// Apply Kubernetes manifests to the local runner (meshd local)
    Apply(kube::FileArgs),
    /// Delete the objects of Kubernetes manifests from the local runner
    Delete(kube::FileArgs),
    /// List pods or services of the local runner
    Get(kube::GetArgs),
    /// Forward local ports to a pod or a service's ready pod (needs root)
    PortForward(kube::ForwardArgs),
    /// Inspect the agent's proxy for a pod
    #[command(subcommand)]
    Proxy(kube::ProxyCmd),
}

#[derive(Subcommand)]
enum IntentionCmd {
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

#[derive(Args)]
struct KindName {
    /// The entry's kind (service-intentions)
    #[arg(long)]
    kind: Option<String>,
    /// The entry's name (the destination service)
    #[arg(long)]
    name: Option<String>,
}

#[derive(Subcommand)]
enum ConfigCmd {
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
        /// The kind (service-intentions)
        #[arg(long)]
        kind: Option<String>,
    },
}

#[derive(Subcommand)]
enum AclCmd {
    /// Manage tokens
    #[command(subcommand)]
    Token(TokenCmd),
}

#[derive(Subcommand)]
enum TokenCmd {
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

/// Consul's flags have one dash (`-allow`); clap's long flags two. `-word` becomes `--word`
/// before `--`; `-h` and a lone `-` (stdin) stay.
fn normalize(args: impl IntoIterator<Item = OsString>) -> Vec<OsString> {
    let mut out = Vec::new();
    let mut rest = false;
    for (i, a) in args.into_iter().enumerate() {
        let single_dash_long = a.to_str().is_some_and(|s| {
            let b = s.as_bytes();
            b.len() > 2 && b[0] == b'-' && b[1].is_ascii_alphabetic()
        });
        // kubectl's `-owide`, `-ojson`: a short flag with its value attached.
        let short_with_value = a
            .to_str()
            .is_some_and(|s| matches!(s, "-owide" | "-ojson" | "-oname"));
        if i == 0 || rest || !single_dash_long || short_with_value {
            if a == "--" {
                rest = true;
            }
            out.push(a);
        } else {
            let mut s = OsString::from("-");
            s.push(&a);
            out.push(s);
        }
    }
    out
}

fn main() -> ExitCode {
    let matches = match Cli::command().try_get_matches_from(normalize(std::env::args_os())) {
        Ok(m) => m,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(1);
        }
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(format!("Error starting: {e}")),
    };
    rt.block_on(run(cli))
}

fn fail(msg: impl AsRef<str>) -> ExitCode {
    eprintln!("{}", msg.as_ref());
    ExitCode::from(1)
}

fn out(text: impl AsRef<str>) {
    let mut stdout = std::io::stdout().lock();
    let _ = writeln!(stdout, "{}", text.as_ref());
}

/// The client and the namespace flag.
struct Ctx {
    client: Client,
    ns: Option<String>,
}

impl Ctx {
    fn new(flags: &HttpFlags) -> Result<Ctx, String> {
        let addr = flags
            .http_addr
            .clone()
            .or_else(|| std::env::var(HTTP_ADDR_ENV).ok().filter(|s| !s.is_empty()))
            .unwrap_or_else(|| DEFAULT_HTTP_ADDR.to_owned());
        let address: Address = addr.parse().map_err(|e| format!("Error: {e}"))?;
        let from_file = |path: &str| -> Result<String, String> {
            std::fs::read_to_string(path)
                .map(|s| s.trim().to_owned())
                .map_err(|e| format!("Error reading the token file {path}: {e}"))
        };
        let env = |k: &str| std::env::var(k).ok().filter(|s| !s.is_empty());
        let token = match (&flags.token, &flags.token_file) {
            (Some(t), _) => Some(t.clone()),
            (None, Some(f)) => Some(from_file(f)?),
            (None, None) => match (env(HTTP_TOKEN_ENV), env(HTTP_TOKEN_FILE_ENV)) {
                (Some(t), _) => Some(t),
                (None, Some(f)) => Some(from_file(&f)?),
                (None, None) => None,
            },
        };
        Ok(Ctx {
            client: Client::new(address, token),
            ns: flags.namespace.clone().filter(|s| !s.is_empty()),
        })
    }

    /// `path?query`, with `ns` added when the namespace flag is set.
    fn url(&self, path: &str, query: &[(&str, &str)]) -> String {
        let mut q = form_urlencoded::Serializer::new(String::new());
        for (k, v) in query {
            q.append_pair(k, v);
        }
        if let Some(ns) = &self.ns {
            q.append_pair("ns", ns);
        }
        let q = q.finish();
        if q.is_empty() {
            path.to_owned()
        } else {
            format!("{path}?{q}")
        }
    }

    /// `path?query`, without the namespace flag.
    fn url_plain(&self, path: &str, query: &[(&str, &str)]) -> String {
        let mut q = form_urlencoded::Serializer::new(String::new());
        for (k, v) in query {
            q.append_pair(k, v);
        }
        let q = q.finish();
        if q.is_empty() {
            path.to_owned()
        } else {
            format!("{path}?{q}")
        }
    }

    /// Sends a request and decodes a 2xx JSON answer; an error is the agent's message,
    /// verbatim, or the connection failure.
    async fn call_json<T: serde::de::DeserializeOwned>(
        &self,
        method: &str,
        url: &str,
        body: Option<String>,
    ) -> Result<T, String> {
        let resp = self
            .client
            .request(method, url, body.map(String::into_bytes))
            .await
            .map_err(|e| e.to_string())?;
        if !resp.ok() {
            return Err(match resp.status {
                401 | 403 => resp.unexpected(),
                _ => resp.error_message(),
            });
        }
        serde_json::from_slice(&resp.body).map_err(|e| format!("decoding the answer: {e}"))
    }

    /// Sends a request; an error is a connection failure or a non-2xx answer, worded as
    /// Consul's client words it.
    async fn call(
        &self,
        method: &str,
        url: &str,
        body: Option<String>,
    ) -> Result<Response, String> {
        let resp = self
            .client
            .request(method, url, body.map(String::into_bytes))
            .await
            .map_err(|e| e.to_string())?;
        if resp.ok() {
            Ok(resp)
        } else {
            Err(resp.unexpected())
        }
    }
}

async fn run(cli: Cli) -> ExitCode {
    let ctx = match Ctx::new(&cli.http) {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    match cli.cmd {
        Cmd::Intention(c) => intention(&ctx, c).await,
        Cmd::Config(c) => config(&ctx, c).await,
        Cmd::Acl(AclCmd::Token(c)) => token(&ctx, c).await,
        Cmd::Apply(f) => kube::apply_or_delete(&ctx, f, false).await,
        Cmd::Delete(f) => kube::apply_or_delete(&ctx, f, true).await,
        Cmd::Get(g) => kube::get(&ctx, g).await,
        Cmd::PortForward(f) => kube::port_forward(&ctx, f).await,
        Cmd::Proxy(p) => kube::proxy(&ctx, p).await,
    }
}

// ---- intentions ----------------------------------------------------------------------------

/// `ns/name` → (ns, name); a bare name has no namespace (the agent fills it in).
fn split_target(s: &str) -> Result<(String, String), String> {
    match s.split_once('/') {
        None => Ok((String::new(), s.to_owned())),
        Some((_, name)) if name.contains('/') => Err("target can contain at most one '/'".into()),
        Some((ns, name)) => Ok((ns.to_owned(), name.to_owned())),
    }
}

/// Consul's short form: the name alone in namespace `default`, `ns/name` otherwise.
fn part_string(ns: &str, name: &str) -> String {
    if ns.is_empty() || ns == "default" {
        name.to_owned()
    } else {
        format!("{ns}/{name}")
    }
}

fn field<'a>(v: &'a Value, k: &str) -> &'a str {
    v.get(k).and_then(Value::as_str).unwrap_or("")
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

fn json_body(resp: &Response) -> Result<Value, String> {
    serde_json::from_slice(&resp.body).map_err(|e| format!("Error decoding the answer: {e}"))
}

/// Lines of columns separated by two spaces, every column but the last padded.
fn columnize(rows: &[Vec<String>]) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    rows.iter()
        .map(|r| {
            let mut line = String::new();
            for (c, cell) in r.iter().enumerate() {
                if c + 1 == r.len() {
                    line.push_str(cell);
                } else {
                    line.push_str(cell);
                    line.push_str(&" ".repeat(widths[c] - cell.chars().count() + 2));
                }
            }
            line
        })
        .collect::<Vec<_>>()
        .join("\n")
}

async fn intention(ctx: &Ctx, cmd: IntentionCmd) -> ExitCode {
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
            let (src_ns, src_name) = match split_target(src) {
                Ok(p) => p,
                Err(e) => return fail(format!("Error: Invalid intention source: {e}")),
            };
            let (dst_ns, dst_name) = match split_target(dst) {
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
                part_string(&src_ns, &src_name),
                part_string(&dst_ns, &dst_name)
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
                let body = json!({
                    "SourceNS": src_ns,
                    "SourceName": src_name,
                    "DestinationNS": dst_ns,
                    "DestinationName": dst_name,
                    "SourceType": "consul",
                    "Action": action,
                    "Description": description.unwrap_or_default(),
                    "Meta": meta_map,
                });
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

// ---- config entries ------------------------------------------------------------------------

/// Reads an entry from a file or stdin (`-`): JSON when the extension is `.json` or the text
/// starts with `{`, HCL otherwise, as `consul config write` accepts both.
fn load_entry(arg: &str) -> Result<ServiceIntentionsEntry, String> {
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
    let parsed = if json {
        ServiceIntentionsEntry::from_json(&text)
    } else {
        ServiceIntentionsEntry::from_hcl(&text)
    };
    parsed.map_err(|e| format!("Failed to decode config entry input: {e}"))
}

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

fn cas_index(cas: bool, modify_index: Option<u64>) -> Result<Option<String>, String> {
    match (cas, modify_index) {
        (true, Some(i)) => Ok(Some(i.to_string())),
        (true, None) => Err("Must specify a -modify-index index when using -cas".into()),
        (false, Some(_)) => Err("Cannot specify -modify-index without -cas".into()),
        (false, None) => Ok(None),
    }
}

async fn config(ctx: &Ctx, cmd: ConfigCmd) -> ExitCode {
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
            let name = entry.destination.name().to_owned();
            let mut query = Vec::new();
            if let Some(c) = &cas {
                query.push(("cas", c.as_str()));
            }
            let url = ctx.url("/v1/config", &query);
            let written = ctx
                .call("PUT", &url, Some(entry.to_json()))
                .await
                .and_then(|r| json_body(&r));
            match written {
                Ok(Value::Bool(true)) => {
                    out(format!(
                        "Config entry written: {SERVICE_INTENTIONS_KIND}/{name}"
                    ));
                    ExitCode::SUCCESS
                }
                Ok(_) => fail(format!(
                    "Config entry not updated: {SERVICE_INTENTIONS_KIND}/{name}"
                )),
                Err(e) => fail(format!(
                    "Error writing config entry {SERVICE_INTENTIONS_KIND}/{name}: {e}"
                )),
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

/// One path segment, percent-encoded.
fn enc(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes())
        .collect::<String>()
        .replace('+', "%20")
}

/// JSON indented by four spaces, as Consul's CLI prints it, keeping the server's field order
/// (Consul's). Falls back to the text as it came when it is not JSON.
fn pretty4(raw: &[u8]) -> String {
    let Ok(text) = std::str::from_utf8(raw) else {
        return String::from_utf8_lossy(raw).into_owned();
    };
    if serde_json::from_str::<Value>(text).is_err() {
        return text.to_owned();
    }
    let mut out = String::with_capacity(text.len() * 2);
    let mut depth = 0usize;
    let (mut in_string, mut escaped) = (false, false);
    let newline = |out: &mut String, depth: usize| {
        out.push('\n');
        out.push_str(&"    ".repeat(depth));
    };
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if in_string {
            out.push(c);
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match c {
            '"' => {
                in_string = true;
                out.push(c);
            }
            '{' | '[' => {
                while chars.peek().is_some_and(|c| c.is_whitespace()) {
                    chars.next();
                }
                out.push(c);
                if chars.peek().is_some_and(|&n| n == '}' || n == ']') {
                    if let Some(close) = chars.next() {
                        out.push(close);
                    }
                } else {
                    depth += 1;
                    newline(&mut out, depth);
                }
            }
            '}' | ']' => {
                depth = depth.saturating_sub(1);
                newline(&mut out, depth);
                out.push(c);
            }
            ',' => {
                out.push(c);
                newline(&mut out, depth);
            }
            ':' => out.push_str(": "),
            c if c.is_whitespace() => {}
            c => out.push(c),
        }
    }
    out
}

// ---- ACL tokens ----------------------------------------------------------------------------

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

async fn token(ctx: &Ctx, cmd: TokenCmd) -> ExitCode {
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

// ---- time formatting -----------------------------------------------------------------------

/// Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
fn civil(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

struct Utc {
    year: i64,
    month: u32,
    day: u32,
    weekday: usize,
    secs_of_day: u64,
    nanos: u32,
}

fn utc(rfc3339: &str) -> Option<Utc> {
    let t = humantime::parse_rfc3339(rfc3339).ok()?;
    let d = t.duration_since(SystemTime::UNIX_EPOCH).ok()?;
    let days = i64::try_from(d.as_secs() / 86_400).ok()?;
    let (year, month, day) = civil(days);
    Some(Utc {
        year,
        month,
        day,
        // 1970-01-01 was a Thursday.
        weekday: usize::try_from((days + 4).rem_euclid(7)).ok()?,
        secs_of_day: d.as_secs() % 86_400,
        nanos: d.subsec_nanos(),
    })
}

const WEEKDAYS: [&str; 7] = [
    "Sunday",
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
];
const MONTHS: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];

/// Go's `time.RFC850` in UTC: `Monday, 02-Jan-06 15:04:05 UTC` (as `consul intention get`).
fn rfc850(rfc3339: &str) -> String {
    let Some(u) = utc(rfc3339) else {
        return rfc3339.to_owned();
    };
    let s = u.secs_of_day;
    format!(
        "{}, {:02}-{}-{:02} {:02}:{:02}:{:02} UTC",
        WEEKDAYS[u.weekday],
        u.day,
        MONTHS[(u.month - 1) as usize],
        u.year.rem_euclid(100),
        s / 3600,
        s / 60 % 60,
        s % 60
    )
}

/// Go's default time format in UTC: `2018-10-22 15:33:39.01789 +0000 UTC`.
fn go_time(rfc3339: &str) -> String {
    let Some(u) = utc(rfc3339) else {
        return rfc3339.to_owned();
    };
    let s = u.secs_of_day;
    let frac = if u.nanos == 0 {
        String::new()
    } else {
        format!(".{:09}", u.nanos).trim_end_matches('0').to_owned()
    };
    format!(
        "{}-{:02}-{:02} {:02}:{:02}:{:02}{frac} +0000 UTC",
        u.year,
        u.month,
        u.day,
        s / 3600,
        s / 60 % 60,
        s % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_dash_flags_become_long_flags() {
        let n = |v: &[&str]| -> Vec<String> {
            normalize(v.iter().map(OsString::from))
                .into_iter()
                .map(|s| s.into_string().unwrap())
                .collect()
        };
        assert_eq!(
            n(&["meshctl", "intention", "create", "-deny", "web", "api"]),
            ["meshctl", "intention", "create", "--deny", "web", "api"]
        );
        assert_eq!(
            n(&[
                "meshctl",
                "-http-addr=unix:///x",
                "config",
                "write",
                "-",
                "-h"
            ]),
            [
                "meshctl",
                "--http-addr=unix:///x",
                "config",
                "write",
                "-",
                "-h"
            ]
        );
        assert_eq!(
            n(&["meshctl", "--allow", "--", "-deny"]),
            ["meshctl", "--allow", "--", "-deny"]
        );
    }

    #[test]
    fn times_print_as_consul_prints_them() {
        assert_eq!(
            rfc850("2018-02-14T00:28:07.5Z"),
            "Wednesday, 14-Feb-18 00:28:07 UTC"
        );
        assert_eq!(
            go_time("2018-10-22T15:33:39.017890Z"),
            "2018-10-22 15:33:39.01789 +0000 UTC"
        );
        assert_eq!(
            go_time("2000-03-01T00:00:00Z"),
            "2000-03-01 00:00:00 +0000 UTC"
        );
    }

    #[test]
    fn json_is_indented_in_the_order_given() {
        let raw =
            br#"{"Kind":"service-intentions","Sources":[{"Name":"a\"}{,:"}],"Meta":{},"L":[]}"#;
        assert_eq!(
            pretty4(raw),
            "{\n    \"Kind\": \"service-intentions\",\n    \"Sources\": [\n        {\n            \"Name\": \"a\\\"}{,:\"\n        }\n    ],\n    \"Meta\": {},\n    \"L\": []\n}"
        );
        assert_eq!(pretty4(b"not json"), "not json");
    }

    #[test]
    fn columns_line_up() {
        let rows = vec![
            vec!["Source:".to_owned(), "web".to_owned()],
            vec!["Destination:".to_owned(), "api".to_owned()],
        ];
        assert_eq!(columnize(&rows), "Source:       web\nDestination:  api");
    }
}
