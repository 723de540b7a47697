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
//! meshctl status                              (kernel_intentions = in-sync | proxy-decides, ...)
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
//! `MESH_HTTP_TOKEN_FILE`, in that order. `-partition` other than `default` is refused: the
//! agent serves one admin partition.

use std::ffi::OsString;
use std::io::Write;
use std::process::ExitCode;

use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use mesh_api::{
    Address, Client, Response, DEFAULT_HTTP_ADDR, HTTP_ADDR_ENV, HTTP_TOKEN_ENV,
    HTTP_TOKEN_FILE_ENV,
};
use mesh_core::intentions::DEFAULT_PARTITION;

mod acl;
mod config;
mod format;
mod intention;
mod kube;
mod status;

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
    /// The admin partition: only "default" is served (Consul's -partition)
    #[arg(long, global = true, value_name = "PARTITION")]
    partition: Option<String>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create, read and check intentions
    #[command(subcommand)]
    Intention(intention::IntentionCmd),
    /// Write, read and delete config entries
    #[command(subcommand)]
    Config(config::ConfigCmd),
    /// Manage ACL tokens
    #[command(subcommand)]
    Acl(acl::AclCmd),
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
    /// Show whether the kernel holds the intentions or the proxies decide alone
    Status,
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

/// Prints `msg` on stderr; exit code 1.
fn fail(msg: impl AsRef<str>) -> ExitCode {
    eprintln!("{}", msg.as_ref());
    ExitCode::from(1)
}

/// Prints `text` and a newline on stdout (a closed pipe is not an error).
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
        if let Some(p) = flags
            .partition
            .as_deref()
            .filter(|p| !p.is_empty() && *p != DEFAULT_PARTITION)
        {
            return Err(format!(
                "Error: partition {p:?} does not exist; this agent serves only partition \
                 {DEFAULT_PARTITION:?}"
            ));
        }
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

/// Runs the verb `cli` names; its exit code.
async fn run(cli: Cli) -> ExitCode {
    let ctx = match Ctx::new(&cli.http) {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    match cli.cmd {
        Cmd::Intention(c) => intention::intention(&ctx, c).await,
        Cmd::Config(c) => config::config(&ctx, c).await,
        Cmd::Acl(acl::AclCmd::Token(c)) => acl::token(&ctx, c).await,
        Cmd::Apply(f) => kube::apply_or_delete(&ctx, f, false).await,
        Cmd::Delete(f) => kube::apply_or_delete(&ctx, f, true).await,
        Cmd::Get(g) => kube::get(&ctx, g).await,
        Cmd::PortForward(f) => kube::port_forward(&ctx, f).await,
        Cmd::Proxy(p) => kube::proxy(&ctx, p).await,
        Cmd::Status => status::status(&ctx).await,
    }
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
}
