//! `mesh-bench cross-node`: client and server on two different nodes (issue #15, part 2), four
//! configurations one after the other:
//!
//! 1. `direct`: plain TCP across the nodes, no mesh;
//! 2. `mesh`: `meshd run --redirect ebpf` on each node; app connections between the nodes are
//!    streams of pooled HTTP/2 mTLS connections;
//! 3. `mesh-iptables`: the same agents with `--redirect iptables`;
//! 4. `haproxy-sidecars`: HAProxy as a pair of mTLS sidecars (`e2e_haproxy`), one per node.
//!
//! ```text
//! mesh-bench cross-node [--quick] [--pinning both|pinned|unpinned] [--cpu N]
//!                       [--wrk-secs S] [--iperf-secs S] [--conn-secs S]
//!                       [--json PATH] [--markdown PATH | --no-markdown]
//! ```
//!
//! The topology is `mesh_kit::cluster`: two node network namespaces linked by a veth pair, a
//! pair of pods (`web-X` on node 1, `api-X` on node 2) per configuration. Each agent is a
//! `meshd` process in its node's network namespace and agent cgroup; both trust one CA. Every
//! configuration runs, in each placement (`--pinning`: with every process of the path on one
//! CPU, `--cpu`, 0 by default; and where the scheduler puts them): `wrk --latency` at 16 and
//! 64 keep-alive connections (requests/s, p50, p99), new connections (`mesh-bench client
//! conns`: connect, one 1 KiB exchange, close, one at a time: connections/s, and the proxies'
//! CPU per 10,000 connections, both ends together), and one-way bulk (`iperf3`, one stream).
//! `--quick` runs the pinned placement only, one second per run. With `MESH_BENCH_PERF=<dir>`
//! each run's proxy processes are profiled into `<dir>/cross-node-<config>-<workload>-
//! <placement>.data`. The load average is recorded at start and end: on a shared machine the
//! figures are indicative.

use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use mesh_core::catalog::{Catalog, Endpoint, Protocol, Service};
use mesh_kit::cluster::{Cluster, ClusterNode};
use mesh_kit::{workload, Pod};
use nix::sched::CpuSet;
use nix::unistd::Pid;
use serde_json::{json, Value};

use crate::e2e_haproxy::{self as hap, Forward, Haproxy};
use crate::e2e_report::{Goal, Target};
use crate::e2e_tools as tools;
use crate::harness::{self, Pinning};
use crate::report::{self, Machine, Section};

/// The server app's port in every api pod.
const APP_PORT: u16 = 9091;
/// The iperf3 server's port in every api pod.
const IPERF_PORT: u16 = 5201;
const HAPROXY_FORWARDS: [Forward; 2] = [
    Forward {
        app_port: APP_PORT,
        tls_port: 8443,
    },
    Forward {
        app_port: IPERF_PORT,
        tls_port: 8444,
    },
];

/// The configurations, in table order.
pub const CONFIGS: [&str; 4] = ["direct", "mesh", "mesh-iptables", "haproxy-sidecars"];

/// The workloads, in table order.
pub const WORKLOADS: [&str; 4] = ["http-16", "http-64", "connect", "bulk"];

/// The section of `docs/benchmarks.md`.
pub const SECTION: Section = Section {
    begin: "<!-- cross-node:begin -->",
    end: "<!-- cross-node:end -->",
};

const USAGE: &str = "usage: mesh-bench cross-node [--quick] [--pinning both|pinned|unpinned] \
                     [--cpu N] [--worker-threads N] [--wrk-secs S] [--iperf-secs S] \
                     [--conn-secs S] [--json PATH] [--markdown PATH | --no-markdown]

  --quick             1-second runs, pinned placement only (a smoke run)
  --pinning P         placements to measure (default: both; pinned with --quick)
  --cpu N             the CPU of the pinned placement (default 0; needs a pinned placement)
  --worker-threads N  each agent's `meshd run --worker-threads N` (default: meshd's, half the CPUs)
  --wrk-secs S        length of each wrk run (default 7)
  --iperf-secs S      length of each iperf3 run (default 5)
  --conn-secs S       length of each new-connection run (default 3)
  --json PATH         also write the records and targets as JSON
  --markdown PATH     the file whose cross-node section is rewritten (default docs/benchmarks.md)
  --no-markdown       write no markdown";

struct Options {
    quick: bool,
    pinnings: Vec<Pinning>,
    /// Each agent's `--worker-threads`; meshd's default without it.
    worker_threads: Option<u64>,
    wrk_secs: u64,
    iperf_secs: u64,
    conn_secs: f64,
    json: Option<PathBuf>,
    markdown: Option<PathBuf>,
}

fn parse_options(args: &[String]) -> Result<Option<Options>> {
    let mut o = Options {
        quick: false,
        pinnings: vec![],
        worker_threads: None,
        wrk_secs: 7,
        iperf_secs: 5,
        conn_secs: 3.0,
        json: None,
        markdown: Some(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/benchmarks.md")),
    };
    let mut pinning = None::<String>;
    let mut cpu = None::<usize>;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = |name: &str| {
            it.next()
                .cloned()
                .with_context(|| format!("{name} needs a value\n{USAGE}"))
        };
        match a.as_str() {
            "--quick" => {
                o.quick = true;
                o.wrk_secs = 1;
                o.iperf_secs = 1;
                o.conn_secs = 1.0;
            }
            "--pinning" => pinning = Some(value(a)?),
            "--cpu" => cpu = Some(value(a)?.parse().context("--cpu")?),
            "--worker-threads" => {
                o.worker_threads = Some(crate::harness::worker_threads_arg(&value(a)?)?)
            }
            "--wrk-secs" => o.wrk_secs = value(a)?.parse().context("--wrk-secs")?,
            "--iperf-secs" => o.iperf_secs = value(a)?.parse().context("--iperf-secs")?,
            "--conn-secs" => o.conn_secs = value(a)?.parse().context("--conn-secs")?,
            "--json" => o.json = Some(value(a)?.into()),
            "--markdown" => o.markdown = Some(value(a)?.into()),
            "--no-markdown" => o.markdown = None,
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(None);
            }
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    ensure!(
        o.wrk_secs > 0 && o.iperf_secs > 0 && o.conn_secs > 0.0,
        "run lengths must be positive"
    );
    // A smoke run measures the pinned placement only, as `mesh-bench e2e --quick` does.
    let pinning = pinning.unwrap_or_else(|| if o.quick { "pinned" } else { "both" }.into());
    ensure!(
        cpu.is_none() || pinning != "unpinned",
        "--cpu places the pinned runs; --pinning unpinned has none"
    );
    let cpu = cpu.unwrap_or(0);
    o.pinnings = match pinning.as_str() {
        "both" => vec![Pinning::Pinned(cpu), Pinning::Unpinned],
        "pinned" => vec![Pinning::Pinned(cpu)],
        "unpinned" => vec![Pinning::Unpinned],
        other => bail!("--pinning {other:?}: expected both, pinned or unpinned\n{USAGE}"),
    };
    Ok(Some(o))
}

/// One configuration's pods and what its clients dial.
struct Pair {
    config: &'static str,
    web: Pod,
    api: Pod,
    /// Where wrk and the connection client connect, and iperf3.
    dial: SocketAddr,
    dial_iperf: SocketAddr,
    /// The server app's and iperf3's processes in `api`.
    server_pids: Vec<u32>,
}

/// One measurement.
#[derive(Clone, Debug)]
pub struct Record {
    /// One of [`CONFIGS`].
    pub config: &'static str,
    /// One of [`WORKLOADS`].
    pub workload: &'static str,
    /// `pinned` or `unpinned` ([`Pinning::name`]).
    pub pinning: &'static str,
    /// `req_per_s`, `p50_us`, `p99_us`, `conns_per_s`, `gbit_per_s`, `proxy_cpu_per_10k`.
    pub metrics: Vec<(String, f64)>,
    /// What failed, if the run failed.
    pub error: Option<String>,
}

impl Record {
    fn metric(&self, name: &str) -> Option<f64> {
        report::metric(&self.metrics, name)
    }
}

fn find(records: &[Record], config: &str, workload: &str, metric: &str) -> Option<f64> {
    records
        .iter()
        .find(|r| r.config == config && r.workload == workload)
        .and_then(|r| r.metric(metric))
}

/// The records of each placement `records` measured, pinned first.
fn by_placement(records: &[Record]) -> Vec<(&'static str, Vec<Record>)> {
    let mut placed = Vec::new();
    for placement in ["pinned", "unpinned"] {
        let of: Vec<Record> = records
            .iter()
            .filter(|r| r.pinning == placement)
            .cloned()
            .collect();
        if !of.is_empty() {
            placed.push((placement, of));
        }
    }
    placed
}

/// The targets of issue #15 across nodes, over the records of one placement.
pub fn targets(records: &[Record]) -> Vec<Target> {
    let vs = |workload: &str, metric: &str, base: &str| match (
        find(records, "mesh", workload, metric),
        find(records, base, workload, metric),
    ) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    };
    let mut t = Vec::new();
    for (wl, c) in [("http-16", 16), ("http-64", 64)] {
        t.push(Target {
            label: format!("mesh ÷ haproxy-sidecars, requests/s at {c} conns"),
            value: vs(wl, "req_per_s", "haproxy-sidecars"),
            goal: Goal::AtLeast(2.0),
        });
        t.push(Target {
            label: format!("mesh ÷ haproxy-sidecars, p99 at {c} conns"),
            value: vs(wl, "p99_us", "haproxy-sidecars"),
            goal: Goal::Below(1.0),
        });
    }
    t.push(Target {
        label: "mesh ÷ haproxy-sidecars, new connections/s".into(),
        value: vs("connect", "conns_per_s", "haproxy-sidecars"),
        goal: Goal::AtLeast(3.0),
    });
    t.push(Target {
        label: "mesh ÷ direct, new connections/s".into(),
        value: vs("connect", "conns_per_s", "direct"),
        goal: Goal::AtLeast(0.5),
    });
    t.push(Target {
        label: "mesh ÷ haproxy-sidecars, bulk throughput".into(),
        value: vs("bulk", "gbit_per_s", "haproxy-sidecars"),
        goal: Goal::AtLeast(2.0),
    });
    t.push(Target {
        label: "mesh proxy CPU s per 10k new connections (both nodes)".into(),
        value: find(records, "mesh", "connect", "proxy_cpu_per_10k"),
        goal: Goal::AtMost(2.5),
    });
    t
}

fn goal_text(g: Goal) -> String {
    match g {
        Goal::AtLeast(v) => format!(">= {v}"),
        Goal::AtMost(v) => format!("<= {v}"),
        Goal::Below(v) => format!("< {v}"),
    }
}

fn verdict(t: &Target) -> &'static str {
    match t.met() {
        Some(true) => "met",
        Some(false) => "MISSED",
        None => "not measured",
    }
}

fn fmt_value(v: Option<f64>) -> String {
    match v {
        Some(v) if v >= 100.0 => format!("{v:.0}"),
        Some(v) => format!("{v:.2}"),
        None => "-".into(),
    }
}

/// The result table rows: (workload, metric, heading).
const ROWS: [(&str, &str, &str); 9] = [
    ("http-16", "req_per_s", "HTTP 16 conns, requests/s"),
    ("http-16", "p50_us", "HTTP 16 conns, p50 µs"),
    ("http-16", "p99_us", "HTTP 16 conns, p99 µs"),
    ("http-64", "req_per_s", "HTTP 64 conns, requests/s"),
    ("http-64", "p50_us", "HTTP 64 conns, p50 µs"),
    ("http-64", "p99_us", "HTTP 64 conns, p99 µs"),
    ("connect", "conns_per_s", "new connections/s"),
    (
        "connect",
        "proxy_cpu_per_10k",
        "proxy CPU s per 10k new connections",
    ),
    ("bulk", "gbit_per_s", "bulk Gbit/s"),
];

/// The terminal report.
pub fn terminal(records: &[Record], machine: &Machine, workers: Option<u64>) -> String {
    let mut out = String::new();
    out += &format!("{}\n", machine.terminal_line());
    out += &format!("mesh agents: {}\n", agents_text(workers));
    for (placement, records) in by_placement(records) {
        out += &format!("{:<40}", format!("cross-node, {placement}"));
        for c in CONFIGS {
            out += &format!(" {c:>17}");
        }
        out += "\n";
        for (wl, metric, heading) in ROWS {
            out += &format!("{heading:<40}");
            for c in CONFIGS {
                out += &format!(" {:>17}", fmt_value(find(&records, c, wl, metric)));
            }
            out += "\n";
        }
        for r in records.iter().filter(|r| r.error.is_some()) {
            out += &format!(
                "FAILED {} {}: {}\n",
                r.config,
                r.workload,
                r.error.as_deref().unwrap_or("")
            );
        }
        out += &format!("\nTargets (issue #15, across nodes, {placement}):\n");
        for t in targets(&records) {
            out += &format!(
                "  {:<58} {:>8} (target {:>6}): {}\n",
                t.label,
                fmt_value(t.value),
                goal_text(t.goal),
                verdict(&t)
            );
        }
        out += "\n";
    }
    out
}

/// The markdown section (markers included).
pub fn markdown(
    records: &[Record],
    machine: &Machine,
    quick: bool,
    workers: Option<u64>,
) -> String {
    let mut md = String::new();
    md += SECTION.begin;
    md += "\n\n## Across nodes\n\n";
    md += &machine.generated_by("cross-node", quick);
    md += " Client and server on two nodes (`mesh_kit::cluster`), one run each; pinned: the \
           client, the server apps and every proxy process of both nodes on one CPU (the whole \
           path's CPU cost); unpinned: where the scheduler puts them. The mesh carries app \
           connections between the nodes as streams of pooled HTTP/2 mTLS connections. A \
           shared machine makes these figures indicative.";
    md += &format!(" The mesh's agents: {}.\n\n", agents_text(workers));
    for (placement, records) in by_placement(records) {
        md += &format!("### {}\n\n", placement_heading(placement));
        md += "| |";
        for c in CONFIGS {
            md += &format!(" {c} |");
        }
        md += "\n|---|";
        for _ in CONFIGS {
            md += "---:|";
        }
        md += "\n";
        for (wl, metric, heading) in ROWS {
            md += &format!("| {heading} |");
            for c in CONFIGS {
                md += &format!(" {} |", fmt_value(find(&records, c, wl, metric)));
            }
            md += "\n";
        }
        md += &format!(
            "\nTargets of issue #15 across nodes, {placement}:\n\n\
             | target | measured | goal | |\n|---|---:|---:|---|\n"
        );
        for t in targets(&records) {
            md += &format!(
                "| {} | {} | {} | {} |\n",
                t.label,
                fmt_value(t.value),
                goal_text(t.goal),
                verdict(&t)
            );
        }
        md += "\n";
    }
    md += SECTION.end;
    md += "\n";
    md
}

/// How the mesh's agents ran, for the reports.
fn agents_text(workers: Option<u64>) -> String {
    match workers {
        Some(n) => format!("`meshd run --worker-threads {n}` on each node"),
        None => {
            "`meshd run` on each node, its default worker threads (half the CPUs, at least one)"
                .into()
        }
    }
}

fn placement_heading(placement: &str) -> &'static str {
    if placement == "pinned" {
        "Pinned: everything on one CPU (the whole path's CPU cost)"
    } else {
        "Unpinned: the scheduler places everything (what users see)"
    }
}

/// The run as JSON: every record, and the targets per placement.
pub fn to_json(records: &[Record], machine: &Machine, workers: Option<u64>) -> Value {
    json!({
        "machine": machine.to_json(),
        "agent_worker_threads": workers,
        "records": records.iter().map(|r| json!({
            "config": r.config,
            "workload": r.workload,
            "pinning": r.pinning,
            "metrics": report::metrics_json(&r.metrics),
            "error": r.error,
        })).collect::<Vec<_>>(),
        "targets": by_placement(records).into_iter().flat_map(|(p, of)| {
            targets(&of).into_iter().map(move |t| json!({
                "pinning": p,
                "target": t.label,
                "value": t.value,
                "goal": goal_text(t.goal),
                "met": t.met(),
            }))
        }).collect::<Vec<_>>(),
    })
}

fn service(name: &str, endpoints: &[&Pod]) -> Service {
    Service {
        name: name.into(),
        namespace: "default".into(),
        datacenter: "dc1".into(),
        ports: vec![APP_PORT, IPERF_PORT],
        protocol: Protocol::Tcp,
        endpoints: endpoints
            .iter()
            .map(|p| Endpoint {
                ip: p.ip,
                port: mesh_common::INBOUND_PORT,
            })
            .collect(),
        ..Default::default()
    }
}

/// The catalog of node `k` for `pair`: both services everywhere, this node's pod as workload.
fn catalog(pair: &Pair, k: u8) -> Catalog {
    let w = if k == 1 {
        workload(&pair.web, "web", vec![], vec![])
    } else {
        workload(&pair.api, "api", vec![APP_PORT, IPERF_PORT], vec![])
    };
    Catalog {
        services: vec![service("web", &[&pair.web]), service("api", &[&pair.api])],
        workloads: vec![w],
    }
}

/// A `meshd run` on one node; killed and its kernel state removed (`meshd uninstall`) on drop.
struct Meshd {
    child: Child,
    meshd: PathBuf,
    instance: String,
    catalog: PathBuf,
    state: PathBuf,
}

impl Meshd {
    /// Starts `meshd run` on `node`. Node 2's agent shares node 1's CA; a state directory with a
    /// CA but no API state starts only with the default policy deny, so node 2 runs with deny
    /// and an intention allows `web → api`.
    fn start(
        node: &ClusterNode,
        redirect: &str,
        instance: String,
        catalog: PathBuf,
        state: PathBuf,
        worker_threads: Option<u64>,
    ) -> Result<Self> {
        let policy = if node.index == 1 { "allow" } else { "deny" };
        let meshd = mesh_kit::bin_path("meshd")?;
        let http = format!("unix://{}", state.with_extension("sock").display());
        let mut child = node
            .agent_command(&meshd)
            .args([
                "run",
                "--redirect",
                redirect,
                "--default-intention-policy",
                policy,
            ])
            .arg("--catalog")
            .arg(&catalog)
            .arg("--instance")
            .arg(&instance)
            .arg("--state-dir")
            .arg(&state)
            .arg("--mesh-cgroup")
            .arg(&node.mesh_cgroup)
            .args(["--metrics-addr", "off"])
            .args(worker_threads.map(|n| format!("--worker-threads={n}")))
            .env("NO_COLOR", "1")
            .env("MESH_HTTP_ADDR", &http)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting meshd")?;
        let stderr = child.stderr.take().context("meshd stderr")?;
        let (tx, rx) = mpsc::channel();
        let tag = instance.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("meshd ready") {
                    let _ = tx.send(());
                }
                if line.contains("ERROR") {
                    eprintln!("meshd[{tag}]: {line}");
                }
            }
        });
        let me = Self {
            child,
            meshd,
            instance,
            catalog,
            state,
        };
        rx.recv_timeout(Duration::from_secs(30))
            .with_context(|| format!("meshd {} did not get ready within 30 s", me.instance))?;
        if node.index == 2 {
            let token = std::fs::read_to_string(me.state.join("acl-bootstrap-token"))?;
            let out = Command::new(mesh_kit::bin_path("meshctl")?)
                .args(["intention", "create", "-allow", "web", "api"])
                .env("MESH_HTTP_ADDR", &http)
                .env("MESH_HTTP_TOKEN", token.trim())
                .stdin(Stdio::null())
                .output()
                .context("running meshctl")?;
            ensure!(
                out.status.success(),
                "meshctl intention create: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(me)
    }
}

impl Drop for Meshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = Command::new(&self.meshd)
            .args(["uninstall", "--instance", &self.instance])
            .arg("--catalog")
            .arg(&self.catalog)
            .arg("--state-dir")
            .arg(&self.state)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// Starts both nodes' agents for `pair`; node 2 shares node 1's CA.
fn start_agents(
    cluster: &Cluster,
    pair: &Pair,
    redirect: &str,
    dir: &Path,
    worker_threads: Option<u64>,
) -> Result<[Meshd; 2]> {
    let mut agents = Vec::new();
    for k in [1u8, 2] {
        let path = dir.join(format!("{}-catalog{k}.json", pair.config));
        std::fs::write(&path, serde_json::to_string_pretty(&catalog(pair, k))?)?;
        let state = dir.join(format!("{}-state{k}", pair.config));
        if k == 2 {
            std::fs::create_dir_all(&state)?;
            let ca = dir.join(format!("{}-state1", pair.config)).join("ca");
            std::os::unix::fs::symlink(&ca, state.join("ca"))?;
        }
        let node = cluster.node(k);
        let instance = format!("{}-{}", node.instance(), pair.config);
        agents.push(Meshd::start(
            node,
            redirect,
            instance,
            path,
            state,
            worker_threads,
        )?);
    }
    let [a, b]: [Meshd; 2] = agents
        .try_into()
        .map_err(|_| anyhow::anyhow!("two agents"))?;
    Ok([a, b])
}

/// Runs `program` in `pod` through `mesh-bench exec`, on `cpu` if given.
fn pod_command(exe: &Path, pod: &Pod, cpu: Option<usize>, program: &str) -> Command {
    let mut cmd = Command::new(exe);
    cmd.arg("exec")
        .arg("--netns")
        .arg(&pod.netns_path)
        .arg("--cgroup")
        .arg(&pod.cgroup);
    if let Some(cpu) = cpu {
        cmd.arg("--cpu").arg(cpu.to_string());
    }
    cmd.args(["--", program]);
    cmd
}

fn wait_listening(pod: &Pod, port: u16) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = mesh_kit::run("ip", &["netns", "exec", &pod.netns_name, "ss", "-Hltn"])?;
        if out.contains(&format!(":{port} ")) {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "nothing listens on {port} in {}",
            pod.name
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The server app and iperf3 in `pod`, kept by the cluster; their process ids.
fn start_servers(cluster: &mut Cluster, exe: &Path, pod: &Pod) -> Result<Vec<u32>> {
    let mut child = Command::new(exe)
        .arg("server")
        .arg("--netns")
        .arg(&pod.netns_path)
        .arg("--cgroup")
        .arg(&pod.cgroup)
        .arg(format!("0.0.0.0:{APP_PORT}"))
        .arg("2")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting the server app")?;
    let stdout = child.stdout.take().context("the server's stdout")?;
    let mut pids = vec![child.id()];
    cluster.keep(child);
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    ensure!(
        line.starts_with("listening"),
        "the server app in {} did not start",
        pod.name
    );
    let iperf = pod_command(exe, pod, None, "iperf3")
        .args(["-s", "-p", &IPERF_PORT.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting the iperf3 server")?;
    pids.push(iperf.id());
    cluster.keep(iperf);
    wait_listening(pod, IPERF_PORT)?;
    Ok(pids)
}

/// Where a run goes: its placement, and the CPUs processes get back after a pinned one.
struct Placement<'a> {
    pinning: Pinning,
    all_cpus: &'a CpuSet,
}

/// One workload of one configuration; `proxies` are the proxy processes of both ends. In the
/// pinned placement the client, the server apps and the proxies run on its CPU.
fn measure(
    exe: &Path,
    o: &Options,
    pair: &Pair,
    proxies: &[u32],
    wl: &'static str,
    at: &Placement<'_>,
) -> Record {
    let cpu = match at.pinning {
        Pinning::Pinned(cpu) => Some(cpu),
        Pinning::Unpinned => None,
    };
    let result = (|| -> Result<Vec<(String, f64)>> {
        let mut path = pair.server_pids.clone();
        path.extend(proxies);
        let pinned = harness::Pinned::place(at.pinning, &path, at.all_cpus)?;
        let profile = harness::Profile::start(
            exe,
            proxies,
            &format!("cross-node-{}-{wl}-{}", pair.config, at.pinning.name()),
        )?;
        let cpu0 = harness::cpu_of(proxies)?;
        let metrics = match wl {
            "http-16" | "http-64" => {
                let conns: usize = wl[5..].parse()?;
                let out = harness::run_client(pod_command(exe, &pair.web, cpu, "wrk").args([
                    "-t2".to_string(),
                    format!("-c{conns}"),
                    format!("-d{}s", o.wrk_secs),
                    "--latency".to_string(),
                    format!("http://{}/", pair.dial),
                ]))?;
                let w = tools::parse_wrk(&out)?;
                ensure!(
                    w.socket_errors == 0 && w.non_2xx == 0,
                    "wrk saw {} socket errors and {} non-2xx answers",
                    w.socket_errors,
                    w.non_2xx
                );
                vec![
                    ("req_per_s".to_string(), w.req_per_s),
                    ("p50_us".to_string(), w.p50_us),
                    ("p99_us".to_string(), w.p99_us),
                ]
            }
            "connect" => {
                let mut cmd = Command::new(exe);
                cmd.arg("client")
                    .arg("--netns")
                    .arg(&pair.web.netns_path)
                    .arg("--cgroup")
                    .arg(&pair.web.cgroup);
                if let Some(cpu) = cpu {
                    cmd.arg("--cpu").arg(cpu.to_string());
                }
                cmd.args(["conns", &pair.dial.to_string()])
                    .arg(o.conn_secs.to_string())
                    .arg((o.conn_secs / 10.0).to_string());
                let v: Value = serde_json::from_str(&harness::run_client(&mut cmd)?)?;
                let rate = v["conns_per_s"].as_f64().context("no conns_per_s")?;
                let total = v["connections"].as_f64().context("no connections")?;
                // Let the proxies close what the client closed before reading their CPU time.
                std::thread::sleep(Duration::from_millis(300));
                let mut m = vec![("conns_per_s".to_string(), rate)];
                if !proxies.is_empty() && total > 0.0 {
                    let cpu = harness::cpu_of(proxies)? - cpu0;
                    m.push(("proxy_cpu_per_10k".to_string(), cpu / total * 10_000.0));
                }
                m
            }
            "bulk" => {
                let out = harness::run_client(pod_command(exe, &pair.web, cpu, "iperf3").args([
                    "-c".to_string(),
                    pair.dial_iperf.ip().to_string(),
                    "-p".to_string(),
                    pair.dial_iperf.port().to_string(),
                    "-t".to_string(),
                    o.iperf_secs.to_string(),
                    "-J".to_string(),
                ]))?;
                vec![(
                    "gbit_per_s".to_string(),
                    tools::parse_iperf3(&out)?.gbit_per_s,
                )]
            }
            other => bail!("unknown workload {other}"),
        };
        drop(profile);
        drop(pinned);
        Ok(metrics)
    })();
    let (metrics, error) = match result {
        Ok(metrics) => (metrics, None),
        Err(e) => (vec![], Some(format!("{e:#}"))),
    };
    Record {
        config: pair.config,
        workload: wl,
        pinning: at.pinning.name(),
        metrics,
        error,
    }
}

/// `mesh-bench cross-node ARGS`: returns the exit status (2 when a run failed).
pub fn main(args: &[String]) -> Result<i32> {
    let Some(o) = parse_options(args)? else {
        return Ok(0);
    };
    mesh_kit::require_root();
    harness::watch_stop_signals()?;
    let load_start = report::load_average();
    let exe = std::env::current_exe()?;
    let all_cpus = nix::sched::sched_getaffinity(Pid::from_raw(0))?;
    for p in &o.pinnings {
        if let Pinning::Pinned(cpu) = p {
            ensure!(
                all_cpus.is_set(*cpu).unwrap_or(false),
                "--cpu {cpu}: not a CPU this process may run on"
            );
        }
    }
    let dir = tempfile::tempdir()?;
    let mut cluster = Cluster::new()?;
    let mut pairs = Vec::new();
    for (config, tag) in [
        ("direct", "d"),
        ("mesh", "m"),
        ("mesh-iptables", "i"),
        ("haproxy-sidecars", "h"),
    ] {
        let web = cluster.add_pod(1, &format!("web-{tag}"))?;
        let api = cluster.add_pod(2, &format!("api-{tag}"))?;
        for pod in [&web, &api] {
            for setting in [
                "net.ipv4.tcp_tw_reuse=1",
                "net.ipv4.ip_local_port_range=10000 65000",
            ] {
                mesh_kit::run(
                    "ip",
                    &[
                        "netns",
                        "exec",
                        &pod.netns_name,
                        "sysctl",
                        "-q",
                        "-w",
                        setting,
                    ],
                )?;
            }
        }
        let server_pids = start_servers(&mut cluster, &exe, &api)?;
        let (dial, dial_iperf) = if config == "haproxy-sidecars" {
            (
                SocketAddr::from((Ipv4Addr::LOCALHOST, APP_PORT)),
                SocketAddr::from((Ipv4Addr::LOCALHOST, IPERF_PORT)),
            )
        } else {
            (
                SocketAddr::from((api.ip, APP_PORT)),
                SocketAddr::from((api.ip, IPERF_PORT)),
            )
        };
        pairs.push(Pair {
            config,
            web,
            api,
            dial,
            dial_iperf,
            server_pids,
        });
    }
    let mut records = Vec::new();
    for pair in &pairs {
        eprintln!("cross-node: {}", pair.config);
        // The configuration's proxies, kept for its turn.
        let mut agents = None;
        let mut haproxies = Vec::new();
        let proxies: Vec<u32> = match pair.config {
            "mesh" | "mesh-iptables" => {
                let redirect = if pair.config == "mesh" {
                    "ebpf"
                } else {
                    "iptables"
                };
                let started = start_agents(&cluster, pair, redirect, dir.path(), o.worker_threads)?;
                let pids = started.iter().map(|a| a.child.id()).collect();
                agents = Some(started);
                pids
            }
            "haproxy-sidecars" => {
                let certs = hap::make_certs(dir.path())?;
                let client = dir.path().join("haproxy-client.cfg");
                let server = dir.path().join("haproxy-server.cfg");
                std::fs::write(
                    &client,
                    hap::client_config(&certs, &pair.api, &HAPROXY_FORWARDS),
                )?;
                std::fs::write(
                    &server,
                    hap::server_config(&certs, &pair.api, &HAPROXY_FORWARDS),
                )?;
                haproxies.push(Haproxy::start(&exe, &pair.api, &server, &[8443, 8444])?);
                haproxies.push(Haproxy::start(
                    &exe,
                    &pair.web,
                    &client,
                    &[APP_PORT, IPERF_PORT],
                )?);
                haproxies.iter().map(|h| h.pid).collect()
            }
            _ => vec![],
        };
        for &pinning in &o.pinnings {
            let at = Placement {
                pinning,
                all_cpus: &all_cpus,
            };
            for wl in WORKLOADS {
                if harness::INTERRUPTED.load(std::sync::atomic::Ordering::Relaxed) {
                    bail!("interrupted");
                }
                let r = measure(&exe, &o, pair, &proxies, wl, &at);
                eprintln!(
                    "  {wl} ({}): {}",
                    r.pinning,
                    match &r.error {
                        Some(e) => format!("FAILED {e}"),
                        None => format!("{:?}", r.metrics),
                    }
                );
                records.push(r);
            }
        }
        drop(haproxies);
        drop(agents);
    }
    drop(cluster);
    let machine = Machine::now(load_start);
    print!("{}", terminal(&records, &machine, o.worker_threads));
    let json_path = match &o.json {
        Some(p) => p.clone(),
        None => harness::target_dir()?.join("bench/cross-node.json"),
    };
    if let Some(parent) = json_path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(
        &json_path,
        serde_json::to_string_pretty(&to_json(&records, &machine, o.worker_threads))?,
    )?;
    if let Some(md) = &o.markdown {
        SECTION.write(md, &markdown(&records, &machine, o.quick, o.worker_threads))?;
    }
    Ok(if records.iter().any(|r| r.error.is_some()) {
        2
    } else {
        0
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(config: &'static str, workload: &'static str, m: &[(&str, f64)]) -> Record {
        Record {
            config,
            workload,
            pinning: "unpinned",
            metrics: m.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            error: None,
        }
    }

    #[test]
    fn targets_compare_the_mesh_with_haproxy_and_direct() {
        let records = vec![
            rec(
                "mesh",
                "http-16",
                &[("req_per_s", 30_000.0), ("p99_us", 900.0)],
            ),
            rec(
                "haproxy-sidecars",
                "http-16",
                &[("req_per_s", 10_000.0), ("p99_us", 1000.0)],
            ),
            rec(
                "mesh",
                "connect",
                &[("conns_per_s", 2000.0), ("proxy_cpu_per_10k", 3.0)],
            ),
            rec("haproxy-sidecars", "connect", &[("conns_per_s", 1000.0)]),
            rec("direct", "connect", &[("conns_per_s", 5000.0)]),
        ];
        let t = targets(&records);
        let get = |label: &str| t.iter().find(|t| t.label == label).unwrap();
        let rps = get("mesh ÷ haproxy-sidecars, requests/s at 16 conns");
        assert_eq!((rps.value, rps.met()), (Some(3.0), Some(true)));
        let p99 = get("mesh ÷ haproxy-sidecars, p99 at 16 conns");
        assert_eq!((p99.value, p99.met()), (Some(0.9), Some(true)));
        let conns = get("mesh ÷ haproxy-sidecars, new connections/s");
        assert_eq!((conns.value, conns.met()), (Some(2.0), Some(false)));
        let direct = get("mesh ÷ direct, new connections/s");
        assert_eq!((direct.value, direct.met()), (Some(0.4), Some(false)));
        let cpu = get("mesh proxy CPU s per 10k new connections (both nodes)");
        assert_eq!((cpu.value, cpu.met()), (Some(3.0), Some(false)));
        let bulk = get("mesh ÷ haproxy-sidecars, bulk throughput");
        assert_eq!(bulk.met(), None, "not measured");
        let md = markdown(&records, &Machine::now("0.00".into()), true, None);
        assert!(md.starts_with(SECTION.begin) && md.trim_end().ends_with(SECTION.end));
        assert!(
            md.contains("| mesh ÷ direct, new connections/s | 0.40 | >= 0.5 | MISSED |"),
            "{md}"
        );
    }

    #[test]
    fn each_placement_gets_its_own_table_and_targets() {
        let pinned = |mut r: Record| {
            r.pinning = "pinned";
            r
        };
        let records = vec![
            rec("mesh", "connect", &[("conns_per_s", 1000.0)]),
            rec("direct", "connect", &[("conns_per_s", 4000.0)]),
            pinned(rec("mesh", "connect", &[("conns_per_s", 3000.0)])),
            pinned(rec("direct", "connect", &[("conns_per_s", 5000.0)])),
        ];
        let md = markdown(&records, &Machine::now("0.00".into()), false, None);
        let pinned_at = md.find("### Pinned").expect("a pinned section");
        let unpinned_at = md.find("### Unpinned").expect("an unpinned section");
        assert!(pinned_at < unpinned_at, "pinned first: {md}");
        let (pinned_md, unpinned_md) = md.split_at(unpinned_at);
        assert!(
            pinned_md.contains("| mesh ÷ direct, new connections/s | 0.60 | >= 0.5 | met |"),
            "{md}"
        );
        assert!(
            unpinned_md.contains("| mesh ÷ direct, new connections/s | 0.25 | >= 0.5 | MISSED |"),
            "{md}"
        );
        let json = to_json(&records, &Machine::now("0.00".into()), Some(1));
        let met: Vec<(String, Value)> = json["targets"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|t| t["target"] == "mesh ÷ direct, new connections/s")
            .map(|t| (t["pinning"].as_str().unwrap().to_string(), t["met"].clone()))
            .collect();
        assert_eq!(
            met,
            vec![
                ("pinned".to_string(), json!(true)),
                ("unpinned".to_string(), json!(false))
            ]
        );
        let only_unpinned = markdown(&records[..2], &Machine::now("0.00".into()), false, None);
        assert!(!only_unpinned.contains("### Pinned"), "{only_unpinned}");
    }

    #[test]
    fn the_agents_worker_threads_are_passed_on_and_reported() {
        let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let o = parse_options(&args(&["--worker-threads", "1"]))
            .unwrap()
            .unwrap();
        assert_eq!(o.worker_threads, Some(1));
        assert_eq!(
            parse_options(&args(&[])).unwrap().unwrap().worker_threads,
            None
        );
        for bad in [
            &["--worker-threads", "0"][..],
            &["--worker-threads", "1025"],
            &["--worker-threads", "x"],
        ] {
            let err = format!("{:#}", parse_options(&args(bad)).err().unwrap());
            assert!(err.contains("--worker-threads"), "{err}");
        }
        let err = format!(
            "{:#}",
            parse_options(&args(&["--pinning", "unpinned", "--cpu", "1"]))
                .err()
                .unwrap()
        );
        assert!(err.contains("--cpu") && err.contains("unpinned"), "{err}");
        let records = vec![rec("mesh", "connect", &[("conns_per_s", 1000.0)])];
        let machine = Machine::now("0.00".into());
        assert!(markdown(&records, &machine, false, Some(1)).contains("--worker-threads 1"));
        assert!(markdown(&records, &machine, false, None).contains("default worker threads"));
        assert!(terminal(&records, &machine, Some(2)).contains("--worker-threads 2"));
        assert_eq!(
            to_json(&records, &machine, Some(1))["agent_worker_threads"],
            1
        );
        assert_eq!(
            to_json(&records, &machine, None)["agent_worker_threads"],
            Value::Null
        );
    }
}
