//! `mesh-bench e2e`: two pods, a client and a 1 KiB responder, (a) directly with no mesh, (b)
//! through the mesh with `--redirect iptables`, (c) through the mesh with the kernel programs;
//! all three in one run, interleaved rounds, medians and ratios.
//!
//! ```text
//! mesh-bench e2e [--quick] [--rounds N] [--cpu N] [--pinning both|pinned|unpinned]
//!                [--dial vip|upstream] [--server-threads N] [--json PATH]
//!                [--markdown PATH | --no-markdown]
//!
//!   --quick            a smoke run: 1 s request/response runs, half-second others, 1 round
//!   --rounds N         interleaved rounds (default 3; 1 with --quick)
//!   --cpu N            the CPU of the pinned runs (default 0)
//!   --pinning P        which placements to run (default both)
//!   --dial D           what the mesh clients dial: the api service's virtual IP (vip, the
//!                      default: transparent mode) or the explicit upstream 127.0.0.1:9091
//!   --server-threads N tokio threads of the server app (default 2)
//!   --json PATH        default: <target>/bench/e2e.json
//!   --markdown PATH    default: docs/benchmarks.md of the source tree (only the section between
//!                      `<!-- e2e:begin -->` and `<!-- e2e:end -->` is written)
//! ```
//!
//! It needs root. One throwaway node ([`mesh_tests::Node`]) holds six pods: `web-d`/`api-d`
//! (no mesh), `web-i`/`api-i` (served by an in-process agent in iptables mode) and
//! `web-e`/`api-e` (served by an agent in eBPF mode). Each agent is a process of its own
//! (`mesh-bench agent`, see `e2e_agent.rs`) in the node's agent cgroup, as `meshd` would be, with
//! its own instance name, state directory and CA, so that its CPU time and peak RSS are its own.
//! Each api pod runs the server app (`mesh-bench server`), each measurement starts a client
//! (`mesh-bench client rr|stream|conns ...`) in the web pod. The configurations take turns; only
//! the measured one carries traffic.
//!
//! Every run is checked: the mesh proxies must have carried exactly the client's connections and
//! bytes without errors, the eBPF run must have taken the sk_msg redirect, and the other runs
//! must not have touched the kernel programs or the other agent. Everything is removed at the
//! end, also on error or Ctrl-C. The exit status is 2 when a run was invalid.

use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use mesh_tests::{Node, Pod};
use mesh_user::agent::Redirect;
use mesh_user::catalog::{Catalog, Endpoint, Protocol, Service, Upstream, Workload};
use nix::sched::CpuSet;
use nix::unistd::Pid;
use serde_json::{json, Value};

use crate::e2e_agent::{AgentProc, Spec};
use crate::e2e_report::{self as rep, Record, Setup, CONFIGS};
use crate::report::Machine;
use crate::{Pinning, INTERRUPTED};

/// The server app's port in every api pod.
const APP_PORT: u16 = 9091;

const USAGE: &str = "usage: mesh-bench e2e [--quick] [--rounds N] [--cpu N] \
                     [--pinning both|pinned|unpinned] [--dial vip|upstream] \
                     [--server-threads N] [--json PATH] [--markdown PATH | --no-markdown]";

/// What one measurement runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Wl {
    /// 1 KiB request/response on one keep-alive connection.
    Rr1,
    /// The same on `Setup::many` connections at once.
    RrMany,
    /// One connection, 64 KiB writes, the server discards.
    Stream,
    /// Connect, one 1 KiB exchange, close.
    Connect,
    /// The same with TLS session resumption off in the mesh (an agent started without it).
    ConnectNoResumption,
}

impl Wl {
    /// What every configuration runs with its usual agent.
    const ALL: [Wl; 4] = [Wl::Rr1, Wl::RrMany, Wl::Stream, Wl::Connect];

    fn name(self) -> &'static str {
        match self {
            Wl::Rr1 => "rr-1",
            Wl::RrMany => "rr-many",
            Wl::Stream => "stream",
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
    markdown: Option<PathBuf>,
}

fn parse_options(args: &[String]) -> Result<Option<Options>> {
    let mut rounds = None;
    let mut quick = false;
    let mut cpu = 0usize;
    let mut pinning = "both".to_string();
    let mut dial = "vip";
    let mut server_threads = 2usize;
    let mut json = crate::target_dir()?.join("bench").join("e2e.json");
    let mut markdown = Some(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .context("the package has no parent directory")?
            .join("docs")
            .join("benchmarks.md"),
    );
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
            "--pinning" => pinning = value("--pinning")?,
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
            "--json" => json = value("--json")?.into(),
            "--markdown" => markdown = Some(value("--markdown")?.into()),
            "--no-markdown" => markdown = None,
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
    let pinnings = match pinning.as_str() {
        "both" => vec![Pinning::Pinned(cpu), Pinning::Unpinned],
        "pinned" => vec![Pinning::Pinned(cpu)],
        "unpinned" => vec![Pinning::Unpinned],
        other => bail!("--pinning {other:?}: expected both, pinned or unpinned"),
    };
    let setup = if quick {
        Setup {
            rounds,
            quick,
            cpu,
            rr_secs: 1.0,
            rr_warmup: 0.2,
            many: 64,
            stream_secs: 0.5,
            conn_secs: 0.5,
            conn_warmup: 0.1,
            server_threads,
            dial,
            idle_rss_mib: Vec::new(),
        }
    } else {
        Setup {
            rounds,
            quick,
            cpu,
            rr_secs: 5.0,
            rr_warmup: 0.5,
            many: 64,
            stream_secs: 3.0,
            conn_secs: 3.0,
            conn_warmup: 0.3,
            server_threads,
            dial,
            idle_rss_mib: Vec::new(),
        }
    };
    Ok(Some(Options {
        setup,
        pinnings,
        json,
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
}

/// One configuration: a pair of pods, what the client dials, the server's pid, and (for the
/// mesh) how its agent runs.
struct Config {
    name: &'static str,
    web: Pod,
    api: Pod,
    dial: SocketAddr,
    server_pid: u32,
    agent: Option<AgentPlan>,
}

struct Bench {
    exe: PathBuf,
    setup: Setup,
    all_cpus: CpuSet,
    mesh_cgroup: PathBuf,
    configs: Vec<Config>,
    /// RSS of each agent right after its first start, by configuration name.
    idle_rss_mib: std::cell::RefCell<Vec<(&'static str, f64)>>,
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
            if let Err(e) = mesh_user::bpf::uninstall(instance) {
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
    crate::watch_stop_signals()?;
    let all_cpus = nix::sched::sched_getaffinity(Pid::from_raw(0))?;
    let mut setup = opts.setup;
    ensure!(
        all_cpus.is_set(setup.cpu).unwrap_or(false),
        "CPU {} is not available to this process",
        setup.cpu
    );
    let load_start = crate::load_average();
    let started = Instant::now();

    // Dropped in reverse order on every way out: the agent processes, then the node (namespaces,
    // cgroups, pins, iptables chains, the server processes).
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
    let machine = Machine {
        kernel: crate::read_trimmed("/proc/sys/kernel/osrelease"),
        cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
        cpu_model: crate::cpu_model(),
        date: crate::utc_date(),
        load_start,
        load_end: crate::load_average(),
    };
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
    if let Some(md) = &opts.markdown {
        crate::report::write_marked_section(
            md,
            rep::BEGIN,
            rep::END,
            &rep::markdown(&records, &machine, &setup),
        )?;
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
            vec![APP_PORT]
        } else {
            vec![]
        },
        protocol: Protocol::Tcp,
        target_ports: Default::default(),
        endpoints,
    }
}

fn workload(pod: &Pod, service: &str, app_ports: Vec<u16>, upstreams: Vec<Upstream>) -> Workload {
    Workload {
        name: pod.name.clone(),
        namespace: "default".into(),
        service: service.into(),
        datacenter: "dc1".into(),
        netns: pod.netns_path.clone(),
        cgroup: pod.cgroup.clone(),
        ip: pod.ip,
        app_ports,
        upstreams,
    }
}

/// `web` calls `api` (explicit upstream on 127.0.0.1:9091, and the VIP); `api` serves 9091.
fn catalog(web: &Pod, api: &Pod, vip: Ipv4Addr) -> Catalog {
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
                vec![Upstream {
                    service: "api".into(),
                    namespace: "default".into(),
                    datacenter: "dc1".into(),
                    bind_port: APP_PORT,
                }],
            ),
            workload(api, "api", vec![APP_PORT], vec![]),
        ],
    }
}

/// Starts the server app in `pod` and waits until it listens. The node kills it at the end.
fn start_server(node: &mut Node, exe: &Path, pod: &Pod, threads: usize) -> Result<u32> {
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
    Ok(pid)
}

fn build(node: &mut Node, setup: Setup, all_cpus: CpuSet) -> Result<Bench> {
    let exe = std::env::current_exe()?;
    let mut pods = Vec::new();
    for name in ["web-d", "api-d", "web-i", "api-i", "web-e", "api-e"] {
        let pod = node.add_pod(name)?;
        // Thousands of short connections a second from one address to one port, on the app
        // side and the proxy side: let TIME_WAIT ports be reused and give every pod the same
        // range.
        for setting in [
            "net.ipv4.tcp_tw_reuse=1",
            "net.ipv4.ip_local_port_range=10000 65000",
        ] {
            mesh_tests::run(
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
    let [web_d, api_d, web_i, api_i, web_e, api_e]: [Pod; 6] =
        pods.try_into().map_err(|_| anyhow::anyhow!("six pods"))?;
    let mut servers = Vec::new();
    for api in [&api_d, &api_i, &api_e] {
        servers.push(start_server(node, &exe, api, setup.server_threads)?);
    }

    let vip_i = Ipv4Addr::new(10, 96, node.subnet, 20);
    let vip_e = Ipv4Addr::new(10, 96, node.subnet, 21);
    let state_ipt = tempfile::tempdir()?;
    let state_ebpf = tempfile::tempdir()?;
    if mesh_user::bpf::kernel_offsets().is_none_or(|o| o.sk_user_data == 0) {
        eprintln!(
            "mesh-bench e2e: warning: no kernel BTF offsets; the sk_msg program will not redirect"
        );
    }

    let upstream = SocketAddr::from((Ipv4Addr::LOCALHOST, APP_PORT));
    let mesh_dial = |vip: Ipv4Addr| {
        if setup.dial == "vip" {
            SocketAddr::V4(SocketAddrV4::new(vip, APP_PORT))
        } else {
            upstream
        }
    };
    let configs = vec![
        Config {
            name: "direct",
            dial: SocketAddr::V4(SocketAddrV4::new(api_d.ip, APP_PORT)),
            web: web_d,
            api: api_d,
            server_pid: servers[0],
            agent: None,
        },
        Config {
            name: "mesh-iptables",
            dial: mesh_dial(vip_i),
            agent: Some(AgentPlan {
                redirect: Redirect::Iptables,
                instance: format!("{}-ipt", node.instance()),
                state_dir: state_ipt.path().to_path_buf(),
                catalog: catalog(&web_i, &api_i, vip_i),
                msg_redirect: true,
            }),
            web: web_i,
            api: api_i,
            server_pid: servers[1],
        },
        Config {
            name: "mesh-ebpf",
            dial: mesh_dial(vip_e),
            agent: Some(AgentPlan {
                redirect: Redirect::Ebpf,
                instance: node.instance(),
                state_dir: state_ebpf.path().to_path_buf(),
                catalog: catalog(&web_e, &api_e, vip_e),
                msg_redirect: true,
            }),
            web: web_e,
            api: api_e,
            server_pid: servers[2],
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
        _state: vec![state_ipt, state_ebpf],
    })
}

/// One short exchange through every configuration, so that a broken setup fails here, with
/// its reason, instead of as a table of invalid runs.
fn preflight(b: &Bench) -> Result<()> {
    for c in &b.configs {
        let agent = match &c.agent {
            Some(plan) => Some(RunningAgent::start(b, plan, true)?),
            None => None,
        };
        if let Some(a) = &agent {
            let rss = a.proc.stats()?["rss_mib"].as_f64();
            if let Some(rss) = rss {
                b.idle_rss_mib.borrow_mut().push((c.name, rss));
            }
        }
        let mut cmd = client_command(b, c, Pinning::Unpinned);
        cmd.args(["rr", &c.dial.to_string(), "1", "0.05", "0"]);
        run_client(cmd).with_context(|| format!("preflight of {}", c.name))?;
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
                if c.agent.is_some() {
                    turns.push((false, vec![Wl::ConnectNoResumption]));
                }
                for (resumption, workloads) in turns {
                    ensure!(!INTERRUPTED.load(Ordering::SeqCst), "interrupted");
                    let agent = match &c.agent {
                        Some(plan) => match RunningAgent::start(b, plan, resumption) {
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
                        None => None,
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
        "gb_per_s",
        "conns_per_s",
        "p50_us",
        "p99_us",
        "agent_cpu_per_10k",
        "agent_cpu_per_gb",
        "resumed_share",
        "redirected_share",
        "peak_rss_mib",
    ];
    let figures: Vec<String> = shown
        .iter()
        .filter_map(|n| r.metric(n).map(|v| format!("{n}={v:.2}")))
        .collect();
    let mut line = format!(
        "round {}/{} {:<8} {:<8} {:<13} {}",
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

/// Sets the CPU affinity of every thread of process `pid`.
fn pin_process(pid: u32, cpus: &CpuSet) -> Result<()> {
    let dir = format!("/proc/{pid}/task");
    for entry in std::fs::read_dir(&dir).with_context(|| dir.clone())? {
        let Ok(tid) = entry?.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        match nix::sched::sched_setaffinity(Pid::from_raw(tid), cpus) {
            // A thread that ended meanwhile.
            Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
            Err(e) => return Err(e).with_context(|| format!("pinning thread {tid} of {pid}")),
        }
    }
    Ok(())
}

/// Gives processes back every CPU when dropped, whichever way a pinned measurement ends.
struct Unpin<'a> {
    pids: &'a [u32],
    all: &'a CpuSet,
}

impl Drop for Unpin<'_> {
    fn drop(&mut self) {
        for &pid in self.pids {
            if let Err(e) = pin_process(pid, self.all) {
                eprintln!("mesh-bench e2e: unpinning {pid}: {e:#}");
            }
        }
    }
}

/// User + system CPU seconds of process `pid` so far (all its threads).
fn process_cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces): state is field 3, utime 14, stime 15.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("/proc/<pid>/stat")?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 =
        f.get(11).context("utime")?.parse::<u64>()? + f.get(12).context("stime")?.parse::<u64>()?;
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)?.unwrap_or(100) as f64;
    Ok(ticks as f64 / hz)
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

fn run_client(mut cmd: Command) -> Result<Value> {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting the client process")?;
    let out = crate::wait_client(child)?;
    ensure!(
        out.status.success(),
        "the client failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().last().context("the client printed nothing")?;
    serde_json::from_str(line).with_context(|| format!("the client's report {line:?}"))
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
    let mut cmd = client_command(b, c, pinning);
    let addr = c.dial.to_string();
    match wl {
        Wl::Rr1 | Wl::RrMany => {
            let conns = if wl == Wl::Rr1 { 1 } else { s.many };
            cmd.args([
                "rr".to_string(),
                addr,
                conns.to_string(),
                s.rr_secs.to_string(),
                s.rr_warmup.to_string(),
            ])
        }
        Wl::Stream => cmd.args(["stream".to_string(), addr, s.stream_secs.to_string()]),
        Wl::Connect | Wl::ConnectNoResumption => cmd.args([
            "conns".to_string(),
            addr,
            s.conn_secs.to_string(),
            s.conn_warmup.to_string(),
        ]),
    };

    // Everything that runs the path: the client (pinned by its own option), the server, and
    // the configuration's agent.
    let mut pids = vec![c.server_pid];
    if let Some(a) = agent {
        pids.push(a.pid);
    }
    let unpin = match pinning {
        Pinning::Pinned(cpu) => {
            let mut set = CpuSet::new();
            set.set(cpu)?;
            let guard = Unpin {
                pids: &pids,
                all: &b.all_cpus,
            };
            for &pid in &pids {
                pin_process(pid, &set)?;
            }
            Some(guard)
        }
        Pinning::Unpinned => None,
    };
    if let Some(a) = agent {
        a.reset_peak()?;
    }
    let before = agent.map(AgentProc::stats).transpose()?;
    let server0 = process_cpu_seconds(c.server_pid)?;
    let client = run_client(cmd);
    let after = agent.map(settle).transpose()?;
    let server_cpu = process_cpu_seconds(c.server_pid)? - server0;
    drop(unpin);
    let client = client?;

    let num = |k: &str| client[k].as_f64().with_context(|| format!("client {k}"));
    let client_cpu = num("cpu_s")?;
    let sent = client["bytes_sent"].as_u64().context("bytes_sent")?;
    let received = client["bytes_received"]
        .as_u64()
        .context("bytes_received")?;
    let connections = client["connections"].as_u64().context("connections")?;
    let (agent_cpu, peak) = match (&before, &after) {
        (Some(before), Some(after)) => (
            after["cpu_s"].as_f64().unwrap_or(0.0) - before["cpu_s"].as_f64().unwrap_or(0.0),
            after["peak_rss_mib"].as_f64(),
        ),
        _ => (0.0, None),
    };
    let mut metrics: Vec<(String, f64)> = Vec::new();
    let mut put = |k: &str, v: f64| metrics.push((k.to_string(), v));
    match wl {
        Wl::Rr1 | Wl::RrMany | Wl::Connect | Wl::ConnectNoResumption => {
            let rate = if wl.is_connect() {
                "conns_per_s"
            } else {
                "req_per_s"
            };
            for k in [rate, "p50_us", "p99_us", "mean_us"] {
                put(k, num(k)?);
            }
            let requests = client["requests"].as_u64().context("requests")?.max(1) as f64;
            if agent.is_some() {
                put("agent_cpu_per_10k", agent_cpu / requests * 1e4);
            }
            put(
                "total_cpu_per_10k",
                (agent_cpu + server_cpu + client_cpu) / requests * 1e4,
            );
        }
        Wl::Stream => {
            put("gb_per_s", num("gb_per_s")?);
            let gb = (sent as f64 / 1e9).max(1e-9);
            if agent.is_some() {
                put("agent_cpu_per_gb", agent_cpu / gb);
            }
            put(
                "total_cpu_per_gb",
                (agent_cpu + server_cpu + client_cpu) / gb,
            );
        }
    }
    if let Some(peak) = peak {
        put("peak_rss_mib", peak);
    }

    // Validity.
    let mut problems = Vec::new();
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
        if n(web, "outbound_connections") != connections
            || n(api, "inbound_connections") != connections
        {
            problems.push(format!(
                "the client made {connections} connection(s); web's proxy carried {} out, \
                 api's {} in",
                n(web, "outbound_connections"),
                n(api, "inbound_connections")
            ));
        }
        if n(web, "bytes_out") != sent || n(web, "bytes_in") != received {
            problems.push(format!(
                "the client sent {sent} and received {received} bytes; web's proxy forwarded \
                 {} and delivered {}",
                n(web, "bytes_out"),
                n(web, "bytes_in")
            ));
        }
        for pod in [web, api] {
            let bad: u64 = [
                "errors",
                "tls_failures",
                "denied",
                "refused_by_limit",
                "endpoint_failures",
                "passthrough_connections",
            ]
            .iter()
            .map(|k| n(pod, k))
            .sum();
            if bad > 0 {
                problems.push(format!("proxy failures: {pod}"));
            }
        }
        let handshakes = n(web, "tls_handshakes") + n(api, "tls_handshakes");
        if wl.is_connect() && handshakes > 0 {
            let resumed = n(web, "tls_resumed") + n(api, "tls_resumed");
            put_metric(
                &mut metrics,
                "resumed_share",
                resumed as f64 / handshakes as f64,
            );
            if wl == Wl::ConnectNoResumption && resumed > 0 {
                problems.push(format!(
                    "{resumed} handshake(s) resumed with resumption off"
                ));
            }
        }
    }
    let counter = |k: &str| counters[k].as_u64().unwrap_or(0);
    let redirected = counter("bytes_redirected");
    if c.agent
        .as_ref()
        .is_some_and(|p| p.redirect == Redirect::Ebpf)
    {
        let want = c.agent.as_ref().is_some_and(|p| p.msg_redirect);
        if want && redirected == 0 {
            problems.push("bytes_redirected did not grow: nothing took the sk_msg redirect".into());
        }
        if !want && redirected > 0 {
            problems.push(format!(
                "{redirected} bytes took the sk_msg redirect with it switched off"
            ));
        }
        let moved = (sent + received).max(1);
        put_metric(
            &mut metrics,
            "redirected_share",
            redirected as f64 / moved as f64,
        );
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
            "agent_cpu_s": agent.map(|_| agent_cpu),
            "server_cpu_s": server_cpu,
            "client_cpu_s": client_cpu,
            "agent_peak_rss_mib": peak,
            "agent_rss_mib_after": after.as_ref().map(|a| a["rss_mib"].clone()),
        }),
        valid: problems.is_empty(),
        note: (!problems.is_empty()).then(|| problems.join("; ")),
    })
}

fn put_metric(metrics: &mut Vec<(String, f64)>, k: &str, v: f64) {
    metrics.push((k.to_string(), v));
}
