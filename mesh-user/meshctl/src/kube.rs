//! kubectl's verbs for the local runner (`meshd local`): apply, delete, get, port-forward,
//! and `proxy read`.

use std::collections::HashMap;
use std::io::Read;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::ExitCode;
use std::time::SystemTime;

use clap::{Args, Subcommand};
use mesh_api::local::view::{
    self, ApplyReply, ConsulResourceView, ForwardTarget, List, PodView, ProxyView, ServiceView,
};
use mesh_api::local::ManifestRequest;
use mesh_core::k8s::applied::{Outcome, Source};
use mesh_dataplane::netns::{NetNs, SocketFactory};

use super::{fail, out, Ctx};

#[derive(Args)]
pub struct FileArgs {
    /// A manifest file, a directory (every .yaml, .yml and .json in it) or - for stdin; may be
    /// repeated
    #[arg(
        short = 'f',
        long = "filename",
        value_name = "FILE|DIR",
        required = true
    )]
    files: Vec<String>,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Wide,
    Json,
    Name,
}

#[derive(Args)]
pub struct GetArgs {
    /// pods (po), services (svc), serviceintentions or servicedefaults
    #[arg(value_name = "RESOURCE")]
    resource: String,
    /// Only this object
    #[arg(value_name = "NAME")]
    name: Option<String>,
    /// Every namespace
    #[arg(short = 'A', long = "all-namespaces")]
    all_namespaces: bool,
    /// wide, json or name
    #[arg(short = 'o', long = "output", value_enum)]
    output: Option<Output>,
}

#[derive(Subcommand)]
pub enum ProxyCmd {
    /// A pod's identity, listeners, upstreams with their endpoints, and the intention verdicts
    /// that apply to it
    Read {
        #[arg(value_name = "POD")]
        pod: String,
        /// json for scripts
        #[arg(short = 'o', long = "output", value_enum)]
        output: Option<Output>,
    },
}

#[derive(Args)]
pub struct ForwardArgs {
    /// pod/NAME, service/NAME (svc/NAME) or a pod's NAME
    #[arg(value_name = "TYPE/NAME")]
    target: String,
    /// LOCAL:REMOTE, PORT (the same on both sides) or :REMOTE (a free local port)
    #[arg(value_name = "[LOCAL]:REMOTE", required = true)]
    ports: Vec<String>,
    /// The local address to listen on
    #[arg(long, default_value = "127.0.0.1")]
    address: Ipv4Addr,
}

fn namespace(ctx: &Ctx) -> &str {
    ctx.ns.as_deref().unwrap_or("default")
}

/// The manifests named by `-f` arguments, in order; a directory gives its .yaml, .yml and
/// .json files, sorted by name.
pub fn read_sources(args: &[String]) -> Result<Vec<Source>, String> {
    let mut sources = Vec::new();
    for arg in args {
        if arg == "-" {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .map_err(|e| format!("error: reading stdin: {e}"))?;
            sources.push(Source {
                name: "STDIN".into(),
                text,
            });
            continue;
        }
        let path = Path::new(arg);
        let meta = std::fs::metadata(path)
            .map_err(|e| format!("error: the path \"{arg}\" does not exist ({e})"))?;
        let files = if meta.is_dir() {
            let mut files: Vec<_> = std::fs::read_dir(path)
                .map_err(|e| format!("error: reading {arg}: {e}"))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.is_file()
                        && p.extension()
                            .and_then(|e| e.to_str())
                            .is_some_and(|e| matches!(e, "yaml" | "yml" | "json"))
                })
                .collect();
            files.sort();
            if files.is_empty() {
                return Err(format!(
                    "error: no objects passed to apply: {arg} has no .yaml, .yml or .json files"
                ));
            }
            files
        } else {
            vec![path.to_path_buf()]
        };
        for f in files {
            let text = std::fs::read_to_string(&f)
                .map_err(|e| format!("error: reading {}: {e}", f.display()))?;
            sources.push(Source {
                name: f.display().to_string(),
                text,
            });
        }
    }
    Ok(sources)
}

/// `meshctl apply -f` / `meshctl delete -f`.
pub async fn apply_or_delete(ctx: &Ctx, files: FileArgs, delete: bool) -> ExitCode {
    let manifests = match read_sources(&files.files) {
        Ok(s) => s,
        Err(e) => return fail(e),
    };
    let body = ManifestRequest {
        namespace: ctx.ns.clone(),
        manifests,
    };
    let body = match serde_json::to_string(&body) {
        Ok(b) => b,
        Err(e) => return fail(format!("error: {e}")),
    };
    let path = if delete {
        "/v1/local/delete"
    } else {
        "/v1/local/apply"
    };
    let reply: ApplyReply = match ctx.call_json("PUT", path, Some(body)).await {
        Ok(r) => r,
        Err(e) => return fail(format!("error: {e}")),
    };
    let mut status = ExitCode::SUCCESS;
    for w in &reply.warnings {
        eprintln!("Warning: {w}");
    }
    for r in &reply.results {
        if r.outcome == Outcome::NotFound {
            eprintln!("{}", r.line());
            status = ExitCode::from(1);
        } else {
            out(r.line());
        }
    }
    for e in &reply.errors {
        eprintln!("error: {e}");
        status = ExitCode::from(1);
    }
    status
}

fn no_resources(ctx: &Ctx, all: bool) {
    if all {
        eprintln!("No resources found");
    } else {
        eprintln!("No resources found in {} namespace.", namespace(ctx));
    }
}

/// `meshctl get pods|services|serviceintentions|servicedefaults`.
pub async fn get(ctx: &Ctx, args: GetArgs) -> ExitCode {
    let all = args.all_namespaces;
    let query: Vec<(&str, &str)> = if all {
        Vec::new()
    } else {
        vec![("namespace", namespace(ctx))]
    };
    let now = SystemTime::now();
    let wide = args.output == Some(Output::Wide);
    let url = |path: &str| ctx.url_plain(path, &query);
    match args.resource.as_str() {
        "pods" | "pod" | "po" => {
            let mut list: List<PodView> =
                match ctx.call_json("GET", &url("/v1/local/pods"), None).await {
                    Ok(l) => l,
                    Err(e) => return fail(format!("error: {e}")),
                };
            if let Some(name) = &args.name {
                list.items.retain(|p| &p.metadata.name == name);
                if list.items.is_empty() {
                    return fail(format!(
                        "Error from server (NotFound): pods \"{name}\" not found"
                    ));
                }
            }
            match args.output {
                Some(Output::Json) => print_json(&list),
                Some(Output::Name) => {
                    for p in &list.items {
                        out(format!("pod/{}", p.metadata.name));
                    }
                }
                _ if list.items.is_empty() => no_resources(ctx, all),
                _ => print!("{}", view::pods_table(&list.items, now, wide, all)),
            }
        }
        "services" | "service" | "svc" => {
            let mut list: List<ServiceView> =
                match ctx.call_json("GET", &url("/v1/local/services"), None).await {
                    Ok(l) => l,
                    Err(e) => return fail(format!("error: {e}")),
                };
            if let Some(name) = &args.name {
                list.items.retain(|s| &s.metadata.name == name);
                if list.items.is_empty() {
                    return fail(format!(
                        "Error from server (NotFound): services \"{name}\" not found"
                    ));
                }
            }
            match args.output {
                Some(Output::Json) => print_json(&list),
                Some(Output::Name) => {
                    for s in &list.items {
                        out(format!("service/{}", s.metadata.name));
                    }
                }
                _ if list.items.is_empty() => no_resources(ctx, all),
                _ => print!("{}", view::services_table(&list.items, now, wide, all)),
            }
        }
        r @ ("serviceintentions" | "serviceintention" | "service-intentions"
        | "servicedefaults" | "servicedefault" | "service-defaults") => {
            let (kind, plural) = if r.contains("intention") {
                ("ServiceIntentions", "serviceintentions")
            } else {
                ("ServiceDefaults", "servicedefaults")
            };
            let mut list: List<ConsulResourceView> = match ctx
                .call_json("GET", &url("/v1/local/consul-resources"), None)
                .await
            {
                Ok(l) => l,
                Err(e) => return fail(format!("error: {e}")),
            };
            list.items.retain(|o| o.kind == kind);
            if let Some(name) = &args.name {
                list.items.retain(|o| &o.metadata.name == name);
                if list.items.is_empty() {
                    return fail(format!(
                        "Error from server (NotFound): {plural}.consul.hashicorp.com \"{name}\" not found"
                    ));
                }
            }
            match args.output {
                Some(Output::Json) => print_json(&list),
                Some(Output::Name) => {
                    for o in &list.items {
                        out(format!("{plural}.consul.hashicorp.com/{}", o.metadata.name));
                    }
                }
                _ if list.items.is_empty() => no_resources(ctx, all),
                _ => print!("{}", consul_resources_table(&list.items, now, wide, all)),
            }
        }
        other => {
            return fail(format!(
                "error: the server doesn't have a resource type \"{other}\" (pods, services, \
                 serviceintentions and servicedefaults are served)"
            ))
        }
    }
    ExitCode::SUCCESS
}

/// consul-k8s's printer columns `NAME SYNCED AGE` (its LAST SYNCED is left out; `-A`: `NAMESPACE` first;
/// `-o wide`: the reason when not synced).
fn consul_resources_table(
    items: &[ConsulResourceView],
    now: SystemTime,
    wide: bool,
    all: bool,
) -> String {
    let mut header: Vec<String> = Vec::new();
    if all {
        header.push("NAMESPACE".into());
    }
    header.extend(["NAME", "SYNCED", "AGE"].map(String::from));
    if wide {
        header.push("REASON".into());
    }
    let mut rows = vec![header];
    for o in items {
        let mut row = Vec::new();
        if all {
            row.push(o.metadata.namespace.clone().unwrap_or_default());
        }
        row.push(o.metadata.name.clone());
        row.push(o.synced().to_string());
        row.push(view::age(&o.metadata.creation_timestamp, now));
        if wide {
            let reason = o
                .status
                .conditions
                .iter()
                .find(|c| c.kind == "Synced" && !c.reason.is_empty())
                .map(|c| format!("{}: {}", c.reason, c.message))
                .unwrap_or_default();
            row.push(reason);
        }
        rows.push(row);
    }
    view::table(&rows)
}

fn print_json<T: serde::Serialize>(v: &T) {
    match serde_json::to_string_pretty(v) {
        Ok(s) => out(s),
        Err(e) => eprintln!("error: {e}"),
    }
}

/// `meshctl proxy read`.
pub async fn proxy(ctx: &Ctx, cmd: ProxyCmd) -> ExitCode {
    let ProxyCmd::Read { pod, output } = cmd;
    let path = format!(
        "/v1/local/pods/{}/{}/proxy",
        super::format::enc(namespace(ctx)),
        super::format::enc(&pod)
    );
    let view: ProxyView = match ctx.call_json("GET", &path, None).await {
        Ok(v) => v,
        Err(e) => return fail(format!("error: {e}")),
    };
    if output == Some(Output::Json) {
        print_json(&view);
    } else {
        print!("{}", view::proxy_text(&view));
    }
    ExitCode::SUCCESS
}

/// `LOCAL:REMOTE`, `PORT` or `:REMOTE` → (local, remote); local 0 means any free port.
pub fn parse_ports(spec: &str) -> Result<(u16, u16), String> {
    let bad = || format!("error: invalid port mapping {spec:?}: expected [LOCAL]:REMOTE or PORT");
    let port = |s: &str| s.parse::<u16>().ok().filter(|p| *p != 0);
    match spec.split_once(':') {
        None => port(spec).map(|p| (p, p)).ok_or_else(bad),
        Some(("", remote)) => port(remote).map(|r| (0, r)).ok_or_else(bad),
        Some((local, remote)) => match (port(local), port(remote)) {
            (Some(l), Some(r)) => Ok((l, r)),
            _ => Err(bad()),
        },
    }
}

async fn resolve(ctx: &Ctx, target: &str, port: u16) -> Result<ForwardTarget, String> {
    let port = port.to_string();
    let url = ctx.url_plain(
        "/v1/local/forward",
        &[
            ("namespace", namespace(ctx)),
            ("target", target),
            ("port", &port),
        ],
    );
    ctx.call_json("GET", &url, None).await
}

/// `meshctl port-forward`: listens on the host and, for each connection, asks the agent for
/// a ready pod behind the target and connects to the port inside that pod's network
/// namespace (so it needs root, like `ip netns exec`).
pub async fn port_forward(ctx: &Ctx, args: ForwardArgs) -> ExitCode {
    let mut mappings = Vec::new();
    for spec in &args.ports {
        match parse_ports(spec) {
            Ok(m) => mappings.push(m),
            Err(e) => return fail(e),
        }
    }
    let ctx = std::sync::Arc::new(Ctx {
        client: ctx.client.clone(),
        ns: ctx.ns.clone(),
    });
    type Factories = HashMap<(String, u64), SocketFactory>;
    let factories: std::sync::Arc<tokio::sync::Mutex<Factories>> = Default::default();
    let mut tasks = tokio::task::JoinSet::new();
    for (local, remote) in mappings {
        if let Err(e) = resolve(&ctx, &args.target, remote).await {
            return fail(format!("error: {e}"));
        }
        let listener =
            match tokio::net::TcpListener::bind(SocketAddr::from((args.address, local))).await {
                Ok(l) => l,
                Err(e) => {
                    return fail(format!(
                        "Unable to listen on port {local}: listen tcp4 {}:{local}: {e}",
                        args.address
                    ))
                }
            };
        let bound = listener.local_addr().map(|a| a.port()).unwrap_or(local);
        out(format!(
            "Forwarding from {}:{bound} -> {remote}",
            args.address
        ));
        let ctx = ctx.clone();
        let target = args.target.clone();
        let factories = factories.clone();
        tasks.spawn(async move {
            loop {
                let (mut client, _) = match listener.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        eprintln!("error accepting a connection: {e}");
                        continue;
                    }
                };
                out(format!("Handling connection for {bound}"));
                let ctx = ctx.clone();
                let target = target.clone();
                let factories = factories.clone();
                tokio::spawn(async move {
                    let dest = match resolve(&ctx, &target, remote).await {
                        Ok(d) => d,
                        Err(e) => {
                            eprintln!("error forwarding port {remote} to {target}: {e}");
                            return;
                        }
                    };
                    // A pod deleted and created again has a new namespace at the same path:
                    // the cache is keyed by the namespace's inode too.
                    use std::os::unix::fs::MetadataExt;
                    let key = match std::fs::metadata(&dest.netns) {
                        Ok(m) => (dest.netns.clone(), m.ino()),
                        Err(e) => {
                            eprintln!("error forwarding to pod {}: {}: {e}", dest.pod, dest.netns);
                            return;
                        }
                    };
                    let sockets = {
                        let mut f = factories.lock().await;
                        match f.get(&key) {
                            Some(s) => s.clone(),
                            None => match NetNs::open(&dest.netns)
                                .and_then(|ns| SocketFactory::spawn(&ns, None, None))
                            {
                                Ok(s) => {
                                    f.retain(|(path, _), _| *path != dest.netns);
                                    f.insert(key, s.clone());
                                    s
                                }
                                Err(e) => {
                                    eprintln!(
                                        "error entering pod {}'s network namespace (root needed): {e}",
                                        dest.pod
                                    );
                                    return;
                                }
                            },
                        }
                    };
                    match sockets
                        .connect(SocketAddr::from((Ipv4Addr::LOCALHOST, dest.port)))
                        .await
                    {
                        Ok(mut upstream) => {
                            let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                        }
                        Err(e) => eprintln!(
                            "error forwarding port {} to pod {}: {e}",
                            dest.port, dest.pod
                        ),
                    }
                });
            }
        });
    }
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(t) => t,
        Err(e) => return fail(format!("error: {e}")),
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
        _ = tasks.join_next() => {}
    }
    ExitCode::SUCCESS
}
