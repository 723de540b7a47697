//! The mesh agent of the end-to-end benchmark, in a process of its own (`mesh-bench agent SPEC`),
//! as `meshd` would be: the same [`Agent::start`] the root tests use, on a multi-threaded tokio
//! runtime. A process per agent gives each agent its own CPU time and peak RSS, which the
//! benchmark reads from `/proc/<pid>` as it does HAProxy's.
//!
//! The benchmark starts it as a child, so it sits in the node's agent cgroup (inherited), and talks
//! to it over stdin/stdout, one line each way:
//!
//! - `stats` → a JSON object: every pod's proxy counters, the kernel counters (eBPF mode), this
//!   process's CPU seconds (`getrusage`), RSS and peak RSS in MiB, open proxy connections;
//! - `quit` or the end of stdin → the proxies stop and the process exits.
//!
//! The stop signals stay blocked (the mask is inherited): the benchmark decides when it ends.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{ChildStdin, ChildStdout, Command, Stdio};
use std::sync::Mutex;

use anyhow::{bail, ensure, Context, Result};
use mesh_agent::{Agent, AgentConfig, Redirect};
use mesh_core::catalog::Catalog;
use mesh_core::intentions::{Action, RuleSet};
use mesh_proxy::PodStatsSnapshot;
use serde_json::{json, Value};

use crate::e2e_app::own_cpu_seconds;
use crate::e2e_tools::status_mib;

/// What an agent process runs.
pub struct Spec<'a> {
    pub redirect: Redirect,
    pub instance: String,
    pub state_dir: &'a Path,
    pub mesh_cgroup: &'a Path,
    pub catalog: &'a Catalog,
    /// sk_msg redirect between app and proxy (eBPF mode).
    pub msg_redirect: bool,
    /// TLS session resumption between the proxies.
    pub tls_resumption: bool,
    /// The same-node splice (`--same-node-splice`; eBPF mode with the sk_msg redirect).
    pub same_node_splice: bool,
    /// The runtime's worker threads (meshd's `--worker-threads`); `None`: meshd's default.
    pub worker_threads: Option<u64>,
}

/// `mesh-bench agent SPEC`: runs until `quit` or the end of stdin.
pub fn agent_main(args: &[String]) -> Result<()> {
    let [spec] = args else {
        bail!("usage: mesh-bench agent SPEC-JSON");
    };
    let spec: Value = serde_json::from_str(spec).context("the agent spec")?;
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .try_init();
    let text = |k: &str| spec[k].as_str().with_context(|| format!("spec.{k}"));
    let redirect: Redirect = text("redirect")?.parse().map_err(anyhow::Error::msg)?;
    let catalog: Catalog = serde_json::from_value(spec["catalog"].clone())?;
    let cfg = AgentConfig {
        instance: text("instance")?.to_string(),
        state_dir: PathBuf::from(text("state_dir")?),
        mesh_cgroup: PathBuf::from(text("mesh_cgroup")?),
        redirect,
        default_policy: Action::Allow,
        msg_redirect: spec["msg_redirect"]
            .as_bool()
            .context("spec.msg_redirect")?,
        proxy: mesh_proxy::ProxyConfig {
            tls_resumption: spec["tls_resumption"]
                .as_bool()
                .context("spec.tls_resumption")?,
            same_node_splice: spec["same_node_splice"]
                .as_bool()
                .context("spec.same_node_splice")?,
            ..mesh_proxy::ProxyConfig::default()
        },
    };
    // As meshd: its runtime, with `--worker-threads` or the default worker count.
    let workers = match &spec["worker_threads"] {
        Value::Null => None,
        n => Some(n.as_u64().context("spec.worker_threads")?),
    };
    let rt = mesh_agent::workers::runtime(workers)?;
    let agent = rt.block_on(Agent::start(
        cfg,
        catalog,
        RuleSet::with_default_policy(Action::Allow),
    ))?;
    let pod_ids: Vec<String> = agent.catalog().workloads.iter().map(|w| w.id()).collect();
    for id in &pod_ids {
        ensure!(agent.pod(id).is_some(), "pod {id} was not meshed");
    }
    let mut out = std::io::stdout().lock();
    writeln!(out, "ready {}", agent.mode())?;
    out.flush()?;
    for line in std::io::stdin().lock().lines() {
        let answer = match line?.trim() {
            "stats" => stats(&agent, &pod_ids)?,
            "quit" => break,
            other => json!({ "error": format!("unknown command {other:?}") }),
        };
        writeln!(out, "{answer}")?;
        out.flush()?;
    }
    rt.block_on(async move { drop(agent) });
    Ok(())
}

fn stats(agent: &Agent, pod_ids: &[String]) -> Result<Value> {
    let mut pods = serde_json::Map::new();
    let mut active = 0;
    for id in pod_ids {
        if let Some(p) = agent.pod(id) {
            let s = p.proxy.stats();
            active += s.active_connections;
            pods.insert(id.clone(), stats_json(&s));
        }
    }
    let counters = match agent.dataplane() {
        Some(dp) => serde_json::to_value(dp.counters()?)?,
        None => Value::Null,
    };
    let status = std::fs::read_to_string("/proc/self/status")?;
    let mib = |key: &str| status_mib(&status, key);
    Ok(json!({
        "pods": pods,
        "counters": counters,
        "active_connections": active,
        "cpu_s": own_cpu_seconds(),
        "rss_mib": mib("VmRSS:"),
        "peak_rss_mib": mib("VmHWM:"),
    }))
}

fn stats_json(s: &PodStatsSnapshot) -> Value {
    json!({
        "active_connections": s.active_connections,
        "total_connections": s.total_connections,
        "inbound_connections": s.inbound_connections,
        "outbound_connections": s.outbound_connections,
        "passthrough_connections": s.passthrough_connections,
        "bytes_to_app": s.bytes_to_app,
        "bytes_from_app": s.bytes_from_app,
        "refused_by_limit": s.refused_by_limit,
        "denied": s.denied,
        "tls_failures": s.tls_failures,
        "plaintext_refused": s.plaintext_refused,
        "tls_handshakes": s.tls_handshakes,
        "tls_resumed": s.tls_resumed,
        "endpoint_failures": s.endpoint_failures,
        "idle_timeouts": s.idle_timeouts,
        "errors": s.errors,
    })
}

/// The benchmark's handle on an agent process.
pub struct AgentProc {
    pub pid: u32,
    io: Mutex<(ChildStdin, BufReader<ChildStdout>)>,
}

impl AgentProc {
    /// Starts the agent process and waits until its pods are meshed. The caller keeps `child`
    /// (the node kills it at the end); this handle only talks to it.
    pub fn start(exe: &Path, spec: &Spec) -> Result<(Self, std::process::Child)> {
        let spec = json!({
            "redirect": match spec.redirect {
                Redirect::Iptables => "iptables",
                Redirect::Ebpf => "ebpf",
                Redirect::Auto => "auto",
            },
            "instance": spec.instance,
            "state_dir": spec.state_dir,
            "mesh_cgroup": spec.mesh_cgroup,
            "catalog": spec.catalog,
            "msg_redirect": spec.msg_redirect,
            "tls_resumption": spec.tls_resumption,
            "same_node_splice": spec.same_node_splice,
            "worker_threads": spec.worker_threads,
        });
        let mut child = Command::new(exe)
            .arg("agent")
            .arg(spec.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting the agent process")?;
        let stdin = child.stdin.take().context("the agent's stdin")?;
        let mut stdout = BufReader::new(child.stdout.take().context("the agent's stdout")?);
        let mut line = String::new();
        stdout.read_line(&mut line)?;
        if !line.starts_with("ready") {
            let _ = child.kill();
            let _ = child.wait();
            bail!("the agent process did not start (see its errors above)");
        }
        Ok((
            Self {
                pid: child.id(),
                io: Mutex::new((stdin, stdout)),
            },
            child,
        ))
    }

    fn ask(&self, command: &str) -> Result<Value> {
        let mut io = self.io.lock().unwrap_or_else(|e| e.into_inner());
        let (stdin, stdout) = &mut *io;
        writeln!(stdin, "{command}").context("writing to the agent")?;
        stdin.flush()?;
        let mut line = String::new();
        ensure!(stdout.read_line(&mut line)? > 0, "the agent process ended");
        let v: Value = serde_json::from_str(&line).context("the agent's answer")?;
        if let Some(e) = v["error"].as_str() {
            bail!("agent: {e}");
        }
        Ok(v)
    }

    pub fn stats(&self) -> Result<Value> {
        self.ask("stats")
    }

    /// Asks the agent to stop its proxies and exit.
    pub fn quit(&self) {
        let mut io = self.io.lock().unwrap_or_else(|e| e.into_inner());
        let _ = writeln!(io.0, "quit");
        let _ = io.0.flush();
    }
}
