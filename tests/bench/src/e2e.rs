//! `mesh-bench e2e`: two pods, a client and an HTTP/1.1 server, through five configurations in
//! one run, interleaved rounds, medians and ratios (issue #6):
//!
//! 1. `direct`: plain TCP, no mesh (the floor);
//! 2. `mesh-iptables`: the agent with `--redirect iptables` (Consul's chains);
//! 3. `mesh-ebpf`: the agent with the kernel dataplane;
//! 4. `mesh-ebpf-no-skmsg`: the same with the sk_msg redirect off (connect4 only);
//! 5. `haproxy-sidecars`: HAProxy as a pair of mTLS sidecars (see `e2e_haproxy.rs`);
//! 6. `mesh-ebpf-tls`: `mesh-ebpf` with `--same-node-splice=false` (mTLS between the two pods,
//!    as between nodes). `mesh-ebpf` itself splices the two apps in the kernel (same node);
//!    `mesh-iptables` and `mesh-ebpf-no-skmsg` cannot splice and keep mTLS.
//!
//! ```text
//! mesh-bench e2e [--quick] [--rounds N] [--cpu N] [--pinning both|pinned|unpinned]
//!                [--dial vip|upstream] [--server-threads N] [--wrk-secs S] [--iperf-secs S]
//!                [--conn-secs S] [--json PATH] [--chart PATH]
//!                [--markdown PATH | --no-markdown]
//!
//!   --quick            a smoke run: 1 round, pinned only, 1 s per tool run, short connection
//!                      runs
//!   --rounds N         interleaved rounds (default 3; 1 with --quick)
//!   --cpu N            the CPU of the pinned runs (default 0)
//!   --pinning P        which placements to run (default both; pinned with --quick)
//!   --dial D           what the mesh clients dial: the api service's virtual IP (vip, the
//!                      default: transparent mode) or the explicit upstreams 127.0.0.1:<port>
//!   --server-threads N tokio threads of the server app (default 2)
//!   --wrk-secs S       each wrk run (default 7)
//!   --iperf-secs S     each iperf3 run (default 5)
//!   --conn-secs S      each new-connection run, after a tenth as long warm-up (default 2)
//!   --json PATH        default: <target>/bench/results.json
//!   --chart PATH       default: docs/bench-e2e.svg of the source tree
//!   --markdown PATH    default: docs/benchmarks.md of the source tree (only the section between
//!                      `<!-- e2e:begin -->` and `<!-- e2e:end -->` is written)
//! ```
//!
//! It needs root. One throwaway node ([`mesh_kit::Node`]) holds a pair of pods per
//! configuration (`web-X` runs the clients, `api-X` the server app and an iperf3 server). Each
//! round runs every configuration in turn (the order rotating from round to round), and each
//! turn runs every workload, unpinned and with every process on one CPU:
//!
//! - HTTP/1.1 keep-alive, 1 KiB responses, `wrk --latency` at 1, 16 and 64 connections:
//!   requests/s, p50/p90/p99;
//! - one-way bulk throughput: `iperf3`, one stream, client → server;
//! - new connections: our client (`mesh-bench client conns`): connect, one 1 KiB exchange,
//!   close, one at a time. The mesh runs it twice: with TLS session resumption (the default) and
//!   with an agent started without it.
//!
//! Proxy cost: user + system CPU of the proxy processes (the agent, or both HAProxy processes)
//! from `/proc/<pid>/stat` around each run, per 10,000 requests (connections) or per GB, and
//! their peak RSS (`VmHWM`, reset through `/proc/<pid>/clear_refs` before each run).
//!
//! Each mesh agent is a process of its own (`mesh-bench agent`, see `e2e_agent.rs`) in the
//! node's agent cgroup, as `meshd` would be, started for its configuration's turn and stopped
//! after it; an eBPF agent's programs are removed then, so that the other configurations run on
//! a node without them. The mesh runs are checked against the proxies' counters (connections,
//! bytes, failures, resumption) and the kernel's (sk_msg redirect used, or not when switched
//! off). Everything is removed at the end, also on error or Ctrl-C. The exit status is 2 when a
//! run was invalid.
//!
//! Profiles: with `MESH_BENCH_PERF=<dir>` in the environment, `perf record -e cpu-clock -g`
//! samples the proxy processes (user and kernel stacks) during each run, one file per
//! configuration, workload and placement (`perf report -i <dir>/<file> --no-children`).

use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use mesh_agent::Redirect;
use mesh_core::catalog::{Catalog, Endpoint, Protocol, Service, Upstream};
use mesh_kit::{workload, Node, Pod};
use nix::sched::CpuSet;
use nix::unistd::Pid;
use serde_json::{json, Value};

use crate::e2e_agent::{AgentProc, Spec};
use crate::e2e_haproxy::{self as hap, Forward, Haproxy};
use crate::e2e_report::{self as rep, Record, Setup, CONFIGS};
use crate::e2e_tools as tools;
use crate::harness::{self, Pinning, INTERRUPTED};
use crate::report::{self, Machine};

/// The server app's port in every api pod (HTTP and the connection workload).
const APP_PORT: u16 = 9091;
/// The iperf3 server's port in every api pod.
const IPERF_PORT: u16 = 5201;
/// HAProxy's TLS ports on the server pod's IP, for the app and for iperf3.
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
/// wrk's connection counts.
pub const HTTP_CONNS: [usize; 3] = [1, 16, 64];

const USAGE: &str = "usage: mesh-bench e2e [--quick] [--rounds N] [--cpu N] \
                     [--pinning both|pinned|unpinned] [--dial vip|upstream] \
                     [--server-threads N] [--worker-threads N] [--wrk-secs S] [--iperf-secs S] \
                     [--conn-secs S] \
                     [--json PATH] [--chart PATH] [--markdown PATH | --no-markdown]";

/// What one measurement runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Wl {
    /// wrk, HTTP/1.1 keep-alive, on this many connections.
    Http(usize),
    /// iperf3, one stream, client → server.
    Bulk,
    /// Connect, one 1 KiB exchange, close.
    Connect,
    /// The same with TLS session resumption off in the mesh (an agent started without it).
    ConnectNoResumption,
}

impl Wl {
    /// What every configuration runs with its usual proxies.
    const ALL: [Wl; 5] = [
        Wl::Http(HTTP_CONNS[0]),
        Wl::Http(HTTP_CONNS[1]),
        Wl::Http(HTTP_CONNS[2]),
        Wl::Bulk,
        Wl::Connect,
    ];

    fn name(self) -> &'static str {
        match self {
            Wl::Http(1) => "http-1",
            Wl::Http(16) => "http-16",
            Wl::Http(64) => "http-64",
            Wl::Http(_) => "http",
            Wl::Bulk => "bulk",
            Wl::Connect => "connect",
            Wl::ConnectNoResumption => "connect-no-resumption",
        }
    }

    fn is_connect(self) -> bool {
        matches!(self, Wl::Connect | Wl::ConnectNoResumption)
    }
}

struct Options {
    setup: Setup,
    pinnings: Vec<Pinning>,
    json: PathBuf,
    chart: Option<PathBuf>,
    markdown: Option<PathBuf>,
}

fn docs_dir() -> Result<PathBuf> {
    Ok(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs"))
}

fn parse_options(args: &[String]) -> Result<Option<Options>> {
    let mut rounds = None;
    let mut quick = false;
    let mut cpu = 0usize;
    let mut pinning = None::<String>;
    let mut dial = "vip";
    let mut server_threads = 2usize;
    let mut worker_threads = None;
    let (mut wrk_secs, mut iperf_secs, mut conn_secs) = (None, None, None);
    let mut json = harness::target_dir()?.join("bench").join("results.json");
    let mut markdown = Some(docs_dir()?.join("benchmarks.md"));
    let mut chart = Some(docs_dir()?.join("bench-e2e.svg"));
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = |name: &str| {
            it.next()
                .cloned()
                .with_context(|| format!("{name} needs a value\n{USAGE}"))
        };
        match a.as_str() {
            "--quick" => quick = true,
            "--rounds" => rounds = Some(value("--rounds")?.parse().context("--rounds")?),
            "--cpu" => cpu = value("--cpu")?.parse().context("--cpu")?,
            "--pinning" => pinning = Some(value("--pinning")?),
            "--dial" => {
                dial = match value("--dial")?.as_str() {
                    "vip" => "vip",
                    "upstream" => "upstream",
                    other => bail!("--dial {other:?}: expected vip or upstream"),
                }
            }
            "--server-threads" => {
                server_threads = value("--server-threads")?
                    .parse()
                    .context("--server-threads")?
            }
            "--worker-threads" => {
                worker_threads = Some(harness::worker_threads_arg(&value("--worker-threads")?)?)
            }
            "--wrk-secs" => wrk_secs = Some(value("--wrk-secs")?.parse().context("--wrk-secs")?),
            "--iperf-secs" => {
                iperf_secs = Some(value("--iperf-secs")?.parse().context("--iperf-secs")?)
            }
            "--conn-secs" => {
                conn_secs = Some(value("--conn-secs")?.parse().context("--conn-secs")?)
            }
            "--json" => json = value("--json")?.into(),
            "--chart" => chart = Some(value("--chart")?.into()),
            "--markdown" => markdown = Some(value("--markdown")?.into()),
            "--no-markdown" => {
                markdown = None;
                chart = None;
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(None);
            }
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    let rounds = rounds.unwrap_or(if quick { 1 } else { 3 });
    ensure!(rounds >= 1, "--rounds must be at least 1");
    ensure!(server_threads >= 1, "--server-threads must be at least 1");
    // A smoke run measures the pinned placement only (it exercises every configuration and
    // workload, and pinning and unpinning), to stay well under two minutes.
    let pinning = pinning.unwrap_or_else(|| if quick { "pinned" } else { "both" }.to_string());
    let pinnings = match pinning.as_str() {
        "both" => vec![Pinning::Pinned(cpu), Pinning::Unpinned],
        "pinned" => vec![Pinning::Pinned(cpu)],
        "unpinned" => vec![Pinning::Unpinned],
        other => bail!("--pinning {other:?}: expected both, pinned or unpinned"),
    };
    let (wd, id, cd) = if quick { (1, 1, 0.3) } else { (7, 5, 2.0) };
    let setup = Setup {
        rounds,
        quick,
        cpu,
        wrk_secs: wrk_secs.unwrap_or(wd),
        iperf_secs: iperf_secs.unwrap_or(id),
        conn_secs: conn_secs.unwrap_or(cd),
        server_threads,
        worker_threads,
        dial,
        idle_rss_mib: Vec::new(),
    };
    ensure!(
        setup.wrk_secs >= 1 && setup.iperf_secs >= 1 && setup.conn_secs > 0.0,
        "run lengths must be positive (wrk and iperf3: whole seconds)"
    );
    Ok(Some(Options {
        setup,
        pinnings,
        json,
        chart,
        markdown,
    }))
}

/// How a mesh configuration's agent runs. The agent is a process started for the
/// configuration's turn in each round and stopped after it, so only one agent (and at most one
/// eBPF dataplane) exists at a time.
struct AgentPlan {
    redirect: Redirect,
    instance: String,
    state_dir: PathBuf,
    catalog: Catalog,
    msg_redirect: bool,
    /// The same-node splice (off: mTLS between the two pods, `--same-node-splice=false`).
    same_node_splice: bool,
    /// Whether the turn also measures connections without TLS session resumption.
    no_resumption_run: bool,
}

/// The proxies of a configuration.
enum Proxies {
    None,
    Agent(AgentPlan),
    /// The pids of the HAProxy processes (client side, server side), running all along.
    Haproxy(Vec<u32>),
}

/// One configuration: a pair of pods, what the clients dial, the server processes, the proxies.
struct Config {
    name: &'static str,
    web: Pod,
    api: Pod,
    dial_http: SocketAddr,
    dial_iperf: SocketAddr,
    /// The server app and the iperf3 server.
    server_pids: Vec<u32>,
    proxies: Proxies,
}

struct Bench {
    exe: PathBuf,
    setup: Setup,
    all_cpus: CpuSet,
    mesh_cgroup: PathBuf,
    configs: Vec<Config>,
    /// RSS of each agent right after its first start, by configuration name.
    idle_rss_mib: std::cell::RefCell<Vec<(&'static str, f64)>>,
    /// Stopped (SIGTERM) when the bench is dropped, before the node.
    _haproxies: Vec<Haproxy>,
    _state: Vec<tempfile::TempDir>,
}

/// A running agent process. Dropping it asks the agent to stop its proxies and exit, waits for
/// that (killing it after 5 s), and in eBPF mode removes the instance's programs and pins, so
/// that the next configuration runs on a node without them.
struct RunningAgent {
    proc: AgentProc,
    child: std::process::Child,
    ebpf_instance: Option<String>,
}

impl RunningAgent {
    fn start(b: &Bench, plan: &AgentPlan, tls_resumption: bool) -> Result<Self> {
        let spec = Spec {
            redirect: plan.redirect,
            instance: plan.instance.clone(),
            state_dir: &plan.state_dir,
            mesh_cgroup: &b.mesh_cgroup,
            catalog: &plan.catalog,
            msg_redirect: plan.msg_redirect,
            tls_resumption,
            same_node_splice: plan.same_node_splice,
            worker_threads: b.setup.worker_threads,
        };
        let (proc, child) = AgentProc::start(&b.exe, &spec)
            .with_context(|| format!("starting the {:?} agent", plan.redirect))?;
        let agent = Self {
            proc,
            child,
            ebpf_instance: (plan.redirect == Redirect::Ebpf).then(|| plan.instance.clone()),
        };
        let stats = agent.proc.stats()?;
        ensure!(
            stats["counters"].is_object() == (plan.redirect == Redirect::Ebpf),
            "the agent does not run in the mode asked for"
        );
        Ok(agent)
    }
}

impl Drop for RunningAgent {
    fn drop(&mut self) {
        self.proc.quit();
        let deadline = Instant::now() + Duration::from_secs(5);
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(instance) = &self.ebpf_instance {
            if let Err(e) = mesh_dataplane::bpf::uninstall(instance) {
                eprintln!("mesh-bench e2e: removing the programs of {instance}: {e:#}");
            }
        }
    }
}

pub fn main(args: &[String]) -> Result<i32> {
    let Some(opts) = parse_options(args)? else {
        return Ok(0);
    };
    ensure!(
        nix::unistd::geteuid().is_root(),
        "mesh-bench e2e needs root (namespaces, cgroups, BPF, iptables)"
    );
    for tool in ["wrk", "iperf3", "haproxy"] {
        ensure!(
            Command::new(tool)
                .arg(if tool == "haproxy" { "-v" } else { "--version" })
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok(),
            "{tool} is not installed (`cargo xtask setup` installs it)"
        );
    }
    harness::watch_stop_signals()?;
    let all_cpus = nix::sched::sched_getaffinity(Pid::from_raw(0))?;
    let mut setup = opts.setup;
    ensure!(
        all_cpus.is_set(setup.cpu).unwrap_or(false),
        "CPU {} is not available to this process",
        setup.cpu
    );
    let load_start = report::load_average();
    let started = Instant::now();

    // Dropped in reverse order on every way out: the bench (HAProxy, the last agent), then the
    // node (namespaces, cgroups, pins, iptables chains, the server processes).
    let mut node = Node::new()?;
    let bench = build(&mut node, setup.clone(), all_cpus)?;
    eprintln!(
        "mesh-bench e2e: node ready in {:.1} s; {} round(s)",
        started.elapsed().as_secs_f64(),
        setup.rounds
    );
    preflight(&bench)?;
    let records = run_rounds(&bench, &opts.pinnings)?;
    setup.idle_rss_mib = bench.idle_rss_mib.borrow().clone();
    let machine = Machine::now(load_start);
    drop(bench);
    drop(node);

    print!("{}", rep::terminal(&records, &machine, &setup));
    let json = rep::to_json(&records, &machine, &setup);
    if let Some(dir) = opts.json.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(&opts.json, serde_json::to_string_pretty(&json)? + "\n")
        .with_context(|| format!("writing {}", opts.json.display()))?;
    println!("\nrecords: {}", opts.json.display());
    if let Some(chart) = &opts.chart {
        let svg = rep::chart(&records, &machine, &setup)
            .map_err(|e| anyhow::anyhow!("drawing the chart: {e}"))?;
        std::fs::write(chart, svg).with_context(|| format!("writing {}", chart.display()))?;
        println!("chart: {}", chart.display());
    }
    if let Some(md) = &opts.markdown {
        rep::SECTION.write(md, &rep::markdown(&records, &machine, &setup))?;
        println!("markdown section: {}", md.display());
    }
    println!("took {:.0} s", started.elapsed().as_secs_f64());
    let invalid = records.iter().filter(|r| !r.valid).count();
    if invalid > 0 {
        eprintln!("mesh-bench e2e: {invalid} invalid run(s), see above");
        return Ok(2);
    }
    Ok(0)
}

fn service(name: &str, vip: Option<Ipv4Addr>, endpoints: Vec<Endpoint>) -> Service {
    Service {
        name: name.into(),
        namespace: "default".into(),
        datacenter: "dc1".into(),
        vip,
        ports: if vip.is_some() {
            vec![APP_PORT, IPERF_PORT]
        } else {
            vec![]
        },
        protocol: Protocol::Tcp,
        target_ports: Default::default(),
        endpoints,
        ..Default::default()
    }
}

/// `web` calls `api` (explicit upstreams on 127.0.0.1:9091 and :5201, and the VIP); `api`
/// serves 9091 (the app) and 5201 (iperf3).
fn catalog(web: &Pod, api: &Pod, vip: Ipv4Addr) -> Catalog {
    let upstream = |port| Upstream {
        service: "api".into(),
        namespace: "default".into(),
        datacenter: "dc1".into(),
        bind_port: port,
    };
    Catalog {
        services: vec![
            service("web", None, vec![]),
            service(
                "api",
                Some(vip),
                vec![Endpoint {
                    ip: api.ip,
                    port: mesh_common::INBOUND_PORT,
                }],
            ),
        ],
        workloads: vec![
            workload(
                web,
                "web",
                vec![],
                vec![upstream(APP_PORT), upstream(IPERF_PORT)],
            ),
            workload(api, "api", vec![APP_PORT, IPERF_PORT], vec![]),
        ],
    }
}

/// A command that runs `program` inside `pod` (its cgroup, then its network namespace), pinned
/// to `cpu` if given, through `mesh-bench exec`.
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

/// Waits until `port` listens in `pod`'s network namespace.
fn wait_listening(pod: &Pod, port: u16) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = mesh_kit::run("ip", &["netns", "exec", &pod.netns_name, "ss", "-Hltn"])?;
        if out.contains(&format!(":{port} ")) {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "nothing listens on port {port} in {}",
            pod.name
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Starts the server app and an iperf3 server in `pod` and waits until both listen. The node
/// kills them at the end. Returns their pids.
fn start_servers(node: &mut Node, exe: &Path, pod: &Pod, threads: usize) -> Result<Vec<u32>> {
    let mut child = Command::new(exe)
        .arg("server")
        .arg("--netns")
        .arg(&pod.netns_path)
        .arg("--cgroup")
        .arg(&pod.cgroup)
        .arg(format!("0.0.0.0:{APP_PORT}"))
        .arg(threads.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting the server app")?;
    let pid = child.id();
    let stdout = child.stdout.take().context("the server's stdout")?;
    node.keep(child);
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
    let iperf_pid = iperf.id();
    node.keep(iperf);
    wait_listening(pod, IPERF_PORT)?;
    Ok(vec![pid, iperf_pid])
}

fn build(node: &mut Node, setup: Setup, all_cpus: CpuSet) -> Result<Bench> {
    let exe = std::env::current_exe()?;
    let mut pods = Vec::new();
    for name in [
        "web-d", "api-d", "web-i", "api-i", "web-e", "api-e", "web-n", "api-n", "web-h", "api-h",
        "web-t", "api-t",
    ] {
        let pod = node.add_pod(name)?;
        // Thousands of short connections a second from one address to one port, on the app
        // side and the proxy side: let TIME_WAIT ports be reused and give every pod the same
        // range.
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
        pods.push(pod);
    }
    let [web_d, api_d, web_i, api_i, web_e, api_e, web_n, api_n, web_h, api_h, web_t, api_t]: [Pod;
        12] = pods
        .try_into()
        .map_err(|_| anyhow::anyhow!("twelve pods"))?;
    let mut servers = Vec::new();
    for api in [&api_d, &api_i, &api_e, &api_n, &api_h, &api_t] {
        servers.push(start_servers(node, &exe, api, setup.server_threads)?);
    }

    // HAProxy: certificates, configs, and the two processes.
    let hap_dir = tempfile::tempdir()?;
    let certs = hap::make_certs(hap_dir.path())?;
    let client_cfg = hap_dir.path().join("client.cfg");
    let server_cfg = hap_dir.path().join("server.cfg");
    std::fs::write(
        &client_cfg,
        hap::client_config(&certs, &api_h, &HAPROXY_FORWARDS),
    )?;
    std::fs::write(
        &server_cfg,
        hap::server_config(&certs, &api_h, &HAPROXY_FORWARDS),
    )?;
    let tls_ports: Vec<u16> = HAPROXY_FORWARDS.iter().map(|f| f.tls_port).collect();
    let app_ports: Vec<u16> = HAPROXY_FORWARDS.iter().map(|f| f.app_port).collect();
    let hap_server = Haproxy::start(&exe, &api_h, &server_cfg, &tls_ports)?;
    let hap_client = Haproxy::start(&exe, &web_h, &client_cfg, &app_ports)?;
    let hap_pids = vec![hap_client.pid, hap_server.pid];

    let vip_i = Ipv4Addr::new(10, 96, node.subnet, 20);
    let vip_e = Ipv4Addr::new(10, 96, node.subnet, 21);
    let vip_n = Ipv4Addr::new(10, 96, node.subnet, 22);
    let vip_t = Ipv4Addr::new(10, 96, node.subnet, 23);
    let state_ipt = tempfile::tempdir()?;
    let state_ebpf = tempfile::tempdir()?;
    if mesh_dataplane::bpf::kernel_offsets().is_none_or(|o| o.sk_user_data == 0) {
        eprintln!(
            "mesh-bench e2e: warning: no kernel BTF offsets; the sk_msg program will not redirect"
        );
    }
    let local = |port| SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mesh_dial = |vip: Ipv4Addr, port: u16| {
        if setup.dial == "vip" {
            SocketAddr::V4(SocketAddrV4::new(vip, port))
        } else {
            local(port)
        }
    };
    let ebpf_plan = |web: &Pod, api: &Pod, vip, msg_redirect, same_node_splice| AgentPlan {
        redirect: Redirect::Ebpf,
        instance: node.instance(),
        state_dir: state_ebpf.path().to_path_buf(),
        catalog: catalog(web, api, vip),
        msg_redirect,
        same_node_splice,
        no_resumption_run: msg_redirect,
    };
    let mut servers = servers.into_iter();
    let mut next_servers = || servers.next().context("server pids");
    let configs = vec![
        Config {
            name: "direct",
            dial_http: SocketAddr::V4(SocketAddrV4::new(api_d.ip, APP_PORT)),
            dial_iperf: SocketAddr::V4(SocketAddrV4::new(api_d.ip, IPERF_PORT)),
            web: web_d,
            api: api_d,
            server_pids: next_servers()?,
            proxies: Proxies::None,
        },
        Config {
            name: "mesh-iptables",
            dial_http: mesh_dial(vip_i, APP_PORT),
            dial_iperf: mesh_dial(vip_i, IPERF_PORT),
            proxies: Proxies::Agent(AgentPlan {
                redirect: Redirect::Iptables,
                instance: format!("{}-ipt", node.instance()),
                state_dir: state_ipt.path().to_path_buf(),
                catalog: catalog(&web_i, &api_i, vip_i),
                msg_redirect: true,
                same_node_splice: true,
                no_resumption_run: true,
            }),
            web: web_i,
            api: api_i,
            server_pids: next_servers()?,
        },
        Config {
            name: "mesh-ebpf",
            dial_http: mesh_dial(vip_e, APP_PORT),
            dial_iperf: mesh_dial(vip_e, IPERF_PORT),
            proxies: Proxies::Agent(ebpf_plan(&web_e, &api_e, vip_e, true, true)),
            web: web_e,
            api: api_e,
            server_pids: next_servers()?,
        },
        Config {
            name: "mesh-ebpf-no-skmsg",
            dial_http: mesh_dial(vip_n, APP_PORT),
            dial_iperf: mesh_dial(vip_n, IPERF_PORT),
            proxies: Proxies::Agent(ebpf_plan(&web_n, &api_n, vip_n, false, true)),
            web: web_n,
            api: api_n,
            server_pids: next_servers()?,
        },
        Config {
            name: "haproxy-sidecars",
            dial_http: local(APP_PORT),
            dial_iperf: local(IPERF_PORT),
            web: web_h,
            api: api_h,
            server_pids: next_servers()?,
            proxies: Proxies::Haproxy(hap_pids),
        },
        Config {
            name: "mesh-ebpf-tls",
            dial_http: mesh_dial(vip_t, APP_PORT),
            dial_iperf: mesh_dial(vip_t, IPERF_PORT),
            proxies: Proxies::Agent(ebpf_plan(&web_t, &api_t, vip_t, true, false)),
            web: web_t,
            api: api_t,
            server_pids: next_servers()?,
        },
    ];
    debug_assert!(configs.iter().map(|c| c.name).eq(CONFIGS));
    Ok(Bench {
        exe,
        setup,
        all_cpus,
        mesh_cgroup: node.mesh_cgroup.clone(),
        configs,
        idle_rss_mib: Default::default(),
        _haproxies: vec![hap_client, hap_server],
        _state: vec![state_ipt, state_ebpf, hap_dir],
    })
}

/// One short exchange through every configuration, so that a broken setup fails here, with
/// its reason, instead of as a table of invalid runs.
fn preflight(b: &Bench) -> Result<()> {
    for c in &b.configs {
        let agent = match &c.proxies {
            Proxies::Agent(plan) => Some(RunningAgent::start(b, plan, true)?),
            _ => None,
        };
        if let Some(a) = &agent {
            if let Some(rss) = a.proc.stats()?["rss_mib"].as_f64() {
                b.idle_rss_mib.borrow_mut().push((c.name, rss));
            }
        }
        let mut cmd = client_command(b, c, Pinning::Unpinned);
        cmd.args(["rr", &c.dial_http.to_string(), "1", "0.05", "0"]);
        harness::run_client(&mut cmd).with_context(|| format!("preflight of {}", c.name))?;
    }
    Ok(())
}

/// Every round runs every configuration (the order rotating from round to round, so none always
/// runs first), and each configuration runs every workload in its turn, with its agent started
/// for the turn. A mesh configuration then restarts its agent without TLS session resumption
/// for one more connection-rate run.
fn run_rounds(b: &Bench, pinnings: &[Pinning]) -> Result<Vec<Record>> {
    let rounds = b.setup.rounds;
    let mut records = Vec::new();
    for round in 0..rounds {
        for &pinning in pinnings {
            for k in 0..b.configs.len() {
                let i = (k + round) % b.configs.len();
                let c = &b.configs[i];
                let mut turns: Vec<(bool, Vec<Wl>)> = vec![(true, Wl::ALL.to_vec())];
                if let Proxies::Agent(plan) = &c.proxies {
                    if plan.no_resumption_run {
                        turns.push((false, vec![Wl::ConnectNoResumption]));
                    }
                }
                for (resumption, workloads) in turns {
                    ensure!(!INTERRUPTED.load(Ordering::SeqCst), "interrupted");
                    let agent = match &c.proxies {
                        Proxies::Agent(plan) => match RunningAgent::start(b, plan, resumption) {
                            Ok(a) => Some(a),
                            Err(e) => {
                                for wl in workloads {
                                    let rec = failed(c, wl, round, pinning, &e);
                                    eprintln!("{}", progress_line(&rec, rounds));
                                    records.push(rec);
                                }
                                continue;
                            }
                        },
                        _ => None,
                    };
                    for wl in workloads {
                        ensure!(!INTERRUPTED.load(Ordering::SeqCst), "interrupted");
                        let rec = match measure(b, c, agent.as_ref(), wl, pinning, round) {
                            Ok(rec) => rec,
                            Err(e) if INTERRUPTED.load(Ordering::SeqCst) => {
                                return Err(e.context("interrupted"))
                            }
                            Err(e) => failed(c, wl, round, pinning, &e),
                        };
                        eprintln!("{}", progress_line(&rec, rounds));
                        records.push(rec);
                    }
                }
            }
        }
    }
    Ok(records)
}

fn failed(c: &Config, wl: Wl, round: usize, pinning: Pinning, e: &anyhow::Error) -> Record {
    Record {
        config: c.name,
        workload: wl.name(),
        round,
        pinning: pinning.name(),
        metrics: Vec::new(),
        client: Value::Null,
        proxy: Value::Null,
        counters: Value::Null,
        resources: Value::Null,
        valid: false,
        note: Some(format!("failed: {e:#}")),
    }
}

fn progress_line(r: &Record, rounds: usize) -> String {
    let shown = [
        "req_per_s",
        "gbit_per_s",
        "conns_per_s",
        "p50_us",
        "p99_us",
        "proxy_cpu_per_10k",
        "proxy_cpu_per_gb",
        "resumed_share",
        "redirected_share",
        "proxy_peak_rss_mib",
    ];
    let figures: Vec<String> = shown
        .iter()
        .filter_map(|n| r.metric(n).map(|v| format!("{n}={v:.2}")))
        .collect();
    let mut line = format!(
        "round {}/{} {:<8} {:<22} {:<18} {}",
        r.round + 1,
        rounds,
        r.pinning,
        r.workload,
        r.config,
        figures.join(" ")
    );
    if !r.valid {
        line += &format!("  INVALID: {}", r.note.as_deref().unwrap_or("?"));
    }
    line
}

/// Field-wise `after - before` of two flat JSON objects of counters.
fn delta(before: &Value, after: &Value) -> Value {
    let mut out = serde_json::Map::new();
    if let Some(a) = after.as_object() {
        for (k, av) in a {
            let b = before[k].as_u64().unwrap_or(0);
            out.insert(k.clone(), json!(av.as_u64().unwrap_or(0).wrapping_sub(b)));
        }
    }
    Value::Object(out)
}

/// Waits (up to 3 s) until the agent has closed every proxied connection, so that its counters
/// and CPU time include the teardown. Returns its stats then.
fn settle(agent: &AgentProc) -> Result<Value> {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let stats = agent.stats()?;
        if stats["active_connections"].as_u64() == Some(0) || Instant::now() > deadline {
            return Ok(stats);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn client_command(b: &Bench, c: &Config, pinning: Pinning) -> Command {
    let mut cmd = Command::new(&b.exe);
    cmd.arg("client")
        .arg("--netns")
        .arg(&c.web.netns_path)
        .arg("--cgroup")
        .arg(&c.web.cgroup);
    if let Pinning::Pinned(cpu) = pinning {
        cmd.arg("--cpu").arg(cpu.to_string());
    }
    cmd
}

/// One measurement: the client in the configuration's web pod, the counters and the resource
/// use around it.
fn measure(
    b: &Bench,
    c: &Config,
    agent: Option<&RunningAgent>,
    wl: Wl,
    pinning: Pinning,
    round: usize,
) -> Result<Record> {
    let s = &b.setup;
    let agent = agent.map(|a| &a.proc);
    let cpu = match pinning {
        Pinning::Pinned(cpu) => Some(cpu),
        Pinning::Unpinned => None,
    };
    let mut cmd = match wl {
        Wl::Http(conns) => {
            let mut cmd = pod_command(&b.exe, &c.web, cpu, "wrk");
            cmd.args([
                format!("-t{}", conns.min(2)),
                format!("-c{conns}"),
                format!("-d{}s", s.wrk_secs),
                "--latency".to_string(),
                format!("http://{}/", c.dial_http),
            ]);
            cmd
        }
        Wl::Bulk => {
            let mut cmd = pod_command(&b.exe, &c.web, cpu, "iperf3");
            cmd.args([
                "-c".to_string(),
                c.dial_iperf.ip().to_string(),
                "-p".to_string(),
                c.dial_iperf.port().to_string(),
                "-t".to_string(),
                s.iperf_secs.to_string(),
                "-J".to_string(),
            ]);
            cmd
        }
        Wl::Connect | Wl::ConnectNoResumption => {
            let mut cmd = client_command(b, c, pinning);
            cmd.args([
                "conns".to_string(),
                c.dial_http.to_string(),
                s.conn_secs.to_string(),
                (s.conn_secs / 10.0).to_string(),
            ]);
            cmd
        }
    };

    // Everything that runs the path: the client (pinned by its own option), the servers, and
    // the configuration's proxies.
    let proxy_pids: Vec<u32> = match (&c.proxies, agent) {
        (Proxies::Haproxy(pids), _) => pids.clone(),
        (Proxies::Agent(_), Some(a)) => vec![a.pid],
        (Proxies::Agent(_), None) => bail!("no agent runs for {}", c.name),
        (Proxies::None, _) => vec![],
    };
    let mut pids = c.server_pids.clone();
    pids.extend(&proxy_pids);
    let pinned = harness::Pinned::place(pinning, &pids, &b.all_cpus)?;
    for &pid in &proxy_pids {
        tools::reset_peak_rss(pid)?;
    }
    let before = agent.map(AgentProc::stats).transpose()?;
    let profile = harness::Profile::start(
        &b.exe,
        &proxy_pids,
        &format!("{}-{}-{}", c.name, wl.name(), pinning.name()),
    )?;
    let proxy_cpu0 = harness::cpu_of(&proxy_pids)?;
    let output = harness::run_client(&mut cmd);
    drop(profile);
    let after = agent.map(settle).transpose()?;
    let proxy_cpu = harness::cpu_of(&proxy_pids)? - proxy_cpu0;
    let peak: Option<f64> = if proxy_pids.is_empty() {
        None
    } else {
        Some(
            proxy_pids
                .iter()
                .map(|&p| tools::peak_rss_mib(p))
                .sum::<Result<f64>>()?,
        )
    };
    drop(pinned);
    let output = output?;

    let mut metrics: Vec<(String, f64)> = Vec::new();
    let mut put = |k: &str, v: f64| metrics.push((k.to_string(), v));
    let mut problems = Vec::new();
    // What the client moved, when it knows it exactly (our own client).
    let mut exact: Option<(u64, u64, u64)> = None;
    let client = match wl {
        Wl::Http(_) => {
            let r = tools::parse_wrk(&output)?;
            put("req_per_s", r.req_per_s);
            put("p50_us", r.p50_us);
            put("p90_us", r.p90_us);
            put("p99_us", r.p99_us);
            if !proxy_pids.is_empty() {
                put(
                    "proxy_cpu_per_10k",
                    proxy_cpu / r.requests.max(1) as f64 * 1e4,
                );
            }
            if r.socket_errors > 0 || r.non_2xx > 0 || r.requests == 0 {
                problems.push(format!(
                    "wrk: {} requests, {} socket errors, {} non-2xx answers",
                    r.requests, r.socket_errors, r.non_2xx
                ));
            }
            r.to_json()
        }
        Wl::Bulk => {
            let r = tools::parse_iperf3(&output)?;
            put("gbit_per_s", r.gbit_per_s);
            if !proxy_pids.is_empty() {
                put("proxy_cpu_per_gb", proxy_cpu / (r.bytes as f64 / 1e9));
            }
            json!({
                "bytes": r.bytes,
                "seconds": r.seconds,
                "gbit_per_s": r.gbit_per_s,
                "retransmits": r.retransmits,
            })
        }
        Wl::Connect | Wl::ConnectNoResumption => {
            let line = output
                .lines()
                .last()
                .context("the client printed nothing")?;
            let v: Value =
                serde_json::from_str(line).with_context(|| format!("the client's {line:?}"))?;
            let num = |k: &str| v[k].as_f64().with_context(|| format!("client {k}"));
            for k in ["conns_per_s", "p50_us", "p99_us"] {
                put(k, num(k)?);
            }
            let n = v["connections"].as_u64().context("connections")?;
            if !proxy_pids.is_empty() {
                put("proxy_cpu_per_10k", proxy_cpu / n.max(1) as f64 * 1e4);
            }
            exact = Some((
                n,
                v["bytes_sent"].as_u64().context("bytes_sent")?,
                v["bytes_received"].as_u64().context("bytes_received")?,
            ));
            v
        }
    };
    if let Some(peak) = peak {
        put("proxy_peak_rss_mib", peak);
    }

    // Validity, from the agent's counters.
    let mut proxy = serde_json::Map::new();
    let mut counters = Value::Null;
    if let (Some(before), Some(after)) = (&before, &after) {
        counters = delta(&before["counters"], &after["counters"]);
        if let Some(pods) = after["pods"].as_object() {
            for (id, now) in pods {
                let d = delta(&before["pods"][id], now);
                let role = if *id == format!("default.{}", c.web.name) {
                    "web"
                } else if *id == format!("default.{}", c.api.name) {
                    "api"
                } else {
                    id.as_str()
                };
                proxy.insert(role.to_string(), d);
            }
        }
        let web = &proxy["web"];
        let api = &proxy["api"];
        let n = |v: &Value, k: &str| v[k].as_u64().unwrap_or(0);
        // With the same-node splice, web's proxy decides every connection and then the kernel
        // carries the bytes app to app: api's inbound side sees none of them, and what the
        // proxy did not copy, the splice counters (`bytes_spliced`, both directions) did.
        let splicing = matches!(&c.proxies,
            Proxies::Agent(plan) if plan.same_node_splice && plan.msg_redirect);
        let spliced = n(&counters, "bytes_spliced");
        match exact {
            Some((connections, sent, received)) if splicing => {
                if n(web, "outbound_connections") != connections {
                    problems.push(format!(
                        "the client made {connections} connection(s); web's proxy decided {}",
                        n(web, "outbound_connections")
                    ));
                }
                let copied = n(web, "bytes_from_app") + n(web, "bytes_to_app");
                if copied + spliced != sent + received {
                    problems.push(format!(
                        "the client sent {sent} and received {received} bytes; web's proxy \
                         copied {copied} and the kernel spliced {spliced}"
                    ));
                }
            }
            Some((connections, sent, received)) => {
                if n(web, "outbound_connections") != connections
                    || n(api, "inbound_connections") != connections
                {
                    problems.push(format!(
                        "the client made {connections} connection(s); web's proxy carried {} \
                         out, api's {} in",
                        n(web, "outbound_connections"),
                        n(api, "inbound_connections")
                    ));
                }
                if n(web, "bytes_from_app") != sent || n(web, "bytes_to_app") != received {
                    problems.push(format!(
                        "the client sent {sent} and received {received} bytes; web's proxy \
                         forwarded {} and delivered {}",
                        n(web, "bytes_from_app"),
                        n(web, "bytes_to_app")
                    ));
                }
            }
            // iperf3's blocking sockets cannot be spliced: the proxy relays them.
            None if splicing => {
                if n(web, "outbound_connections") == 0
                    || (spliced == 0 && n(web, "bytes_to_app") == 0)
                {
                    problems.push("neither the splice nor the proxy carried this run".into());
                }
            }
            None => {
                if n(web, "outbound_connections") == 0 || n(web, "bytes_to_app") == 0 {
                    problems.push("the mesh proxies carried nothing of this run".into());
                }
            }
        }
        // wrk and iperf3 end by closing (or resetting) connections with bytes in flight,
        // which the proxies count as connection errors; our own client ends cleanly, so there
        // every error counts.
        let failures: &[&str] = if exact.is_some() {
            &[
                "errors",
                "tls_failures",
                "denied",
                "refused_by_limit",
                "endpoint_failures",
                "passthrough_connections",
            ]
        } else {
            &[
                "tls_failures",
                "denied",
                "refused_by_limit",
                "endpoint_failures",
                "passthrough_connections",
            ]
        };
        for pod in [web, api] {
            let bad: u64 = failures.iter().map(|k| n(pod, k)).sum();
            if bad > 0 {
                problems.push(format!("proxy failures: {pod}"));
            }
        }
        let handshakes = n(web, "tls_handshakes") + n(api, "tls_handshakes");
        if wl.is_connect() && handshakes > 0 {
            let resumed = n(web, "tls_resumed") + n(api, "tls_resumed");
            metrics.push(("resumed_share".into(), resumed as f64 / handshakes as f64));
            if wl == Wl::ConnectNoResumption && resumed > 0 {
                problems.push(format!(
                    "{resumed} handshake(s) resumed with resumption off"
                ));
            }
        }
        if let Proxies::Agent(plan) = &c.proxies {
            if plan.redirect == Redirect::Ebpf {
                let redirected = counters["bytes_redirected"].as_u64().unwrap_or(0);
                // iperf3 connects with a blocking socket, which the dataplane leaves on TCP by
                // design (docs/dataplane.md, "Blocking sockets stay on TCP"): its bytes are
                // not expected to take the redirect.
                // A spliced connection's bytes take sk_msg too, counted as `bytes_spliced`.
                if plan.msg_redirect && redirected == 0 && spliced == 0 && wl != Wl::Bulk {
                    problems.push(
                        "bytes_redirected did not grow: nothing took the sk_msg redirect".into(),
                    );
                }
                if !plan.msg_redirect && redirected > 0 {
                    problems.push(format!(
                        "{redirected} bytes took the sk_msg redirect with it switched off"
                    ));
                }
                if let Some((_, sent, received)) = exact {
                    metrics.push((
                        "redirected_share".into(),
                        redirected as f64 / (sent + received).max(1) as f64,
                    ));
                }
            }
        }
    }

    Ok(Record {
        config: c.name,
        workload: wl.name(),
        round,
        pinning: pinning.name(),
        metrics,
        client,
        proxy: Value::Object(proxy),
        counters,
        resources: json!({
            "proxy_pids": proxy_pids,
            "proxy_cpu_s": (!proxy_pids.is_empty()).then_some(proxy_cpu),
            "proxy_peak_rss_mib": peak,
            "agent_rss_mib_after": after.as_ref().map(|a| a["rss_mib"].clone()),
        }),
        valid: problems.is_empty(),
        note: (!problems.is_empty()).then(|| problems.join("; ")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn the_agents_worker_threads_are_taken_as_meshd_takes_them() {
        let o = parse_options(&args(&["--worker-threads", "1", "--no-markdown"]))
            .unwrap()
            .unwrap();
        assert_eq!(o.setup.worker_threads, Some(1));
        let o = parse_options(&args(&["--no-markdown"])).unwrap().unwrap();
        assert_eq!(o.setup.worker_threads, None);
        for bad in [
            &["--worker-threads", "0"][..],
            &["--worker-threads", "1025"],
            &["--worker-threads", "x"],
            &["--worker-threads"],
        ] {
            let err = format!("{:#}", parse_options(&args(bad)).err().unwrap());
            assert!(err.contains("--worker-threads"), "{bad:?}: {err}");
        }
    }
}
