//! `mesh-bench`: speed of the app ⇄ listener hop over plain loopback TCP, the mesh's sk_msg
//! redirect (the real kernel programs) and an iptables REDIRECT hop, side by side in one run.
//! `mesh-bench e2e ...` is the end-to-end benchmark (two pods: direct, the mesh in both redirect
//! modes and without sk_msg, and an HAProxy mTLS sidecar pair): see `mesh_bench::e2e` for its
//! options. `mesh-bench cross-node ...` runs client and server on two nodes (see
//! `mesh_bench::cross_node`).
//!
//! ```text
//! mesh-bench [redirect] [--quick] [--rounds N] [--cpu N] [--json PATH] [--markdown PATH | --no-markdown]
//!
//!   --quick          a smoke run (short workloads, well under 30 s)
//!   --rounds N       interleaved rounds (default 3); every path runs in every round
//!   --cpu N          the CPU of the pinned runs (default 0)
//!   --json PATH      default: <target>/bench/redirect.json
//!   --markdown PATH  default: docs/benchmarks.md of the source tree (only the section between
//!                    `<!-- redirect:begin -->` and `<!-- redirect:end -->` is written)
//! ```
//!
//! It needs root. It builds a throwaway node (the [`mesh_kit::Node`] fixture) with three pods:
//! `base` (no mesh: the loopback baseline), `web` (meshed with the kernel programs; the app
//! dials a service VIP) and `ipt` (Consul's iptables chains, no mesh programs). This process is
//! the listener, in the node's agent cgroup as the proxy is; each app is a child process
//! (`mesh-bench client ...`) that moves itself into the pod's cgroup and network namespace.
//! Everything is removed at the end, also on error or Ctrl-C. The exit status is 2 when a run
//! was invalid (an sk_msg run that redirected nothing, a baseline that was redirected, or a
//! failure); targets are reported, never asserted.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::Instant;

use anyhow::{anyhow, bail, ensure, Context, Result};
use mesh_common::{
    Config, PodValue, ServiceValue, INBOUND_PORT, LOCAL_PORT_PROXY, OUTBOUND_PORT, SERVICE_VIP,
};
use mesh_dataplane::bpf::Dataplane;
use mesh_kit::{Node, Pod};
use nix::sched::CpuSet;
use nix::unistd::Pid;
use serde_json::{json, Value};

use mesh_bench::harness::{
    stop_signals, target_dir, wait_client, watch_stop_signals, Pinning, INTERRUPTED,
};
use mesh_bench::redirect_report::{self, Record, Setup};
use mesh_bench::report::{self, Machine};
use mesh_bench::workload::{self, Workload};
use mesh_bench::{e2e, e2e_agent, e2e_app};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("client") => client_main(&args[1..]).map(|()| 0),
        Some("server") => server_main(&args[1..]).map(|()| 0),
        Some("agent") => e2e_agent::agent_main(&args[1..]).map(|()| 0),
        Some("exec") => exec_main(&args[1..]),
        Some("e2e") => e2e::main(&args[1..]),
        Some("cross-node") => mesh_bench::cross_node::main(&args[1..]),
        _ => bench_main(&args),
    };
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("mesh-bench: {e:#}");
            std::process::exit(1);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The app side: `mesh-bench client --netns PATH --cgroup PATH [--cpu N] <workload> ...`

/// Handles `--netns PATH --cgroup PATH [--cpu N]` at the head of `args` for an app process
/// (client or server): unblocks the stop signals, joins the cgroup, enters the network
/// namespace, pins itself. Returns the remaining arguments.
fn enter_pod(args: &[String]) -> Result<Vec<String>> {
    // The benchmark blocks these signals and the mask survives exec: an app must die on them.
    stop_signals().thread_unblock()?;
    let mut args = args.to_vec();
    let mut netns = None;
    let mut cgroup = None;
    let mut cpu = None;
    while !args.is_empty() && args[0].starts_with("--") {
        let opt = args.remove(0);
        if opt == "--" {
            break;
        }
        ensure!(!args.is_empty(), "{opt} needs a value");
        let value = args.remove(0);
        match opt.as_str() {
            "--netns" => netns = Some(PathBuf::from(value)),
            "--cgroup" => cgroup = Some(PathBuf::from(value)),
            "--cpu" => cpu = Some(value.parse::<usize>().context("--cpu")?),
            other => bail!("unknown client option {other}"),
        }
    }
    // cgroup first: sockets belong to the cgroup of the process that creates them.
    if let Some(cg) = cgroup {
        mesh_dataplane::cgroup::add_process(&cg, std::process::id())?;
    }
    // The main thread enters the namespace before any other thread exists: threads created
    // later (tokio's) inherit it.
    if let Some(ns) = netns {
        let file = std::fs::File::open(&ns).with_context(|| format!("{}", ns.display()))?;
        nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET).context("setns")?;
    }
    if let Some(cpu) = cpu {
        let mut set = CpuSet::new();
        set.set(cpu)?;
        nix::sched::sched_setaffinity(Pid::from_raw(0), &set).context("pinning the client")?;
    }
    Ok(args)
}

/// `mesh-bench exec --netns PATH --cgroup PATH [--cpu N] -- PROGRAM ARGS...`: runs a program
/// (wrk, iperf3, haproxy) as a process of a pod, pinned to CPU N if given.
fn exec_main(args: &[String]) -> Result<i32> {
    use std::os::unix::process::CommandExt;
    let args = enter_pod(args)?;
    let (program, rest) = args
        .split_first()
        .context("usage: mesh-bench exec [--netns P] [--cgroup P] [--cpu N] -- PROGRAM ARGS...")?;
    let err = Command::new(program).args(rest).exec();
    bail!("exec {program}: {err}")
}

/// The end-to-end benchmark's server app: `mesh-bench server --netns PATH --cgroup PATH ADDR
/// THREADS`.
fn server_main(args: &[String]) -> Result<()> {
    let args = enter_pod(args)?;
    ensure!(
        args.len() == 2,
        "usage: mesh-bench server [--netns P] [--cgroup P] ADDR THREADS"
    );
    e2e_app::server_main(
        args[0].parse().context("server address")?,
        args[1].parse().context("server threads")?,
    )
}

fn client_main(args: &[String]) -> Result<()> {
    let args = enter_pod(args)?;
    let arg = |i: usize| -> Result<&str> {
        args.get(i)
            .map(String::as_str)
            .with_context(|| format!("client: missing argument {i}"))
    };
    let addr: SocketAddr = arg(1)?.parse().context("address")?;
    let result = match arg(0)? {
        "ping-pong" => {
            workload::client_ping_pong(addr, arg(2)?.parse()?, arg(3)?.parse()?, arg(4)?.parse()?)?
        }
        "bulk" => workload::client_bulk(addr, arg(2)?.parse()?)?,
        "connect" => workload::client_connect(addr, arg(2)?.parse()?)?,
        // The end-to-end benchmark's workloads.
        "rr" => e2e_app::client_rr(addr, arg(2)?.parse()?, arg(3)?.parse()?, arg(4)?.parse()?)?,
        "stream" => e2e_app::client_stream(addr, arg(2)?.parse()?)?,
        "conns" => e2e_app::client_conns(addr, arg(2)?.parse()?, arg(3)?.parse()?)?,
        other => bail!("unknown workload {other:?}"),
    };
    println!("{result}");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The benchmark

struct Options {
    rounds: usize,
    quick: bool,
    cpu: usize,
    json: PathBuf,
    markdown: Option<PathBuf>,
}

const USAGE: &str = "usage: mesh-bench [redirect] [--quick] [--rounds N] [--cpu N] \
                     [--json PATH] [--markdown PATH | --no-markdown]\n       \
                     mesh-bench e2e --help";

fn parse_options(args: &[String]) -> Result<Option<Options>> {
    let target = target_dir()?;
    let mut o = Options {
        rounds: 3,
        quick: false,
        cpu: 0,
        json: target.join("bench").join("redirect.json"),
        // The source tree's docs/ (the workspace root is two levels up: tests/bench).
        markdown: Some(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/benchmarks.md")),
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = |name: &str| {
            it.next()
                .cloned()
                .with_context(|| format!("{name} needs a value\n{USAGE}"))
        };
        match a.as_str() {
            "redirect" => {}
            "--quick" => o.quick = true,
            "--rounds" => o.rounds = value("--rounds")?.parse().context("--rounds")?,
            "--cpu" => o.cpu = value("--cpu")?.parse().context("--cpu")?,
            "--json" => o.json = value("--json")?.into(),
            "--markdown" => o.markdown = Some(value("--markdown")?.into()),
            "--no-markdown" => o.markdown = None,
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(None);
            }
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    ensure!(o.rounds >= 1, "--rounds must be at least 1");
    Ok(Some(o))
}

/// One way from the app to the listener.
struct PathSetup {
    name: &'static str,
    pod: Pod,
    listener: TcpListener,
    /// What the app dials.
    dial: SocketAddr,
    /// What the listener must read back with `SO_ORIGINAL_DST`, for redirected paths.
    orig_dst: Option<SocketAddrV4>,
}

struct Bench {
    exe: PathBuf,
    setup: Setup,
    all_cpus: CpuSet,
    dp: Dataplane,
    paths: Vec<PathSetup>,
}

fn bench_main(args: &[String]) -> Result<i32> {
    let Some(opts) = parse_options(args)? else {
        return Ok(0);
    };
    ensure!(
        nix::unistd::geteuid().is_root(),
        "mesh-bench needs root (namespaces, cgroups, BPF, iptables)"
    );
    watch_stop_signals()?;

    let all_cpus = nix::sched::sched_getaffinity(Pid::from_raw(0))?;
    ensure!(
        all_cpus.is_set(opts.cpu).unwrap_or(false),
        "CPU {} is not available to this process",
        opts.cpu
    );
    let setup = if opts.quick {
        Setup {
            rounds: opts.rounds,
            quick: true,
            cpu: opts.cpu,
            round_trips: 2_000,
            warmup: 200,
            bulk_secs: 0.25,
            connect_secs: 0.25,
        }
    } else {
        Setup {
            rounds: opts.rounds,
            quick: false,
            cpu: opts.cpu,
            round_trips: 20_000,
            warmup: 1_000,
            bulk_secs: 2.0,
            connect_secs: 2.0,
        }
    };
    let load_start = report::load_average();
    let started = Instant::now();

    // The node: dropped (namespaces, cgroups, pins, iptables, stray clients removed) on every
    // way out of this function.
    let mut node = Node::new()?;
    let bench = build(&mut node, setup, all_cpus)?;
    let records = run_rounds(&bench)?;
    let machine = Machine::now(load_start);
    drop(bench);
    drop(node);

    print!("{}", redirect_report::terminal(&records, &machine, &setup));
    let json = redirect_report::to_json(&records, &machine, &setup);
    if let Some(dir) = opts.json.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(&opts.json, serde_json::to_string_pretty(&json)? + "\n")
        .with_context(|| format!("writing {}", opts.json.display()))?;
    println!("\nrecords: {}", opts.json.display());
    if let Some(md) = &opts.markdown {
        redirect_report::write_section(md, &redirect_report::markdown(&records, &machine, &setup))?;
        println!("markdown section: {}", md.display());
    }
    println!("took {:.0} s", started.elapsed().as_secs_f64());
    let invalid = records.iter().filter(|r| !r.valid).count();
    if invalid > 0 {
        eprintln!("mesh-bench: {invalid} invalid run(s), see above");
        return Ok(2);
    }
    Ok(0)
}

/// The three pods, the dataplane, the iptables chains and a listener per path.
fn build(node: &mut Node, setup: Setup, all_cpus: CpuSet) -> Result<Bench> {
    let base = node.add_pod("base")?;
    let web = node.add_pod("web")?;
    let ipt = node.add_pod("ipt")?;
    for pod in [&base, &web, &ipt] {
        // The connection workload opens thousands of connections a second from one address to
        // one listener: let TIME_WAIT ports be reused (default: only for loopback addresses,
        // which the iptables path's VIP is not) and give every path the same range.
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
    let vip = SocketAddrV4::new(Ipv4Addr::new(10, 96, node.subnet, 10), 9091);

    let mut dp = Dataplane::open(&node.instance(), &node.mesh_cgroup)?;
    dp.set_config(Config::DEFAULT)?;
    if dp.config()?.offsets.sk_user_data == 0 {
        eprintln!(
            "mesh-bench: warning: no kernel BTF offsets; the sk_msg program will not redirect"
        );
    }
    dp.attach_pod(&web.name, &web.cgroup, &web.netns())?;
    dp.set_pod(
        mesh_dataplane::cgroup::id(&web.cgroup)?,
        PodValue {
            ns: 1,
            name: 2,
            outbound_port: OUTBOUND_PORT,
            _pad: 0,
        },
    )?;
    dp.set_local_port(web.netns().cookie()?, OUTBOUND_PORT, LOCAL_PORT_PROXY)?;
    dp.set_service(
        vip,
        ServiceValue {
            ns: 1,
            name: 3,
            kind: SERVICE_VIP,
        },
    )?;
    mesh_dataplane::iptables::install(
        &ipt.netns_path,
        &mesh_dataplane::iptables::Rules {
            outbound_port: OUTBOUND_PORT,
            inbound_port: INBOUND_PORT,
            exclude_inbound_ports: vec![],
        },
    )?;

    let local = SocketAddr::from((Ipv4Addr::LOCALHOST, OUTBOUND_PORT));
    let listen = |pod: &Pod| -> Result<TcpListener> {
        // Created by this process, which sits in the agent cgroup, like the proxy's listeners.
        Ok(pod.netns().listen(local)?)
    };
    let paths = vec![
        PathSetup {
            name: "loopback",
            listener: listen(&base)?,
            pod: base,
            dial: local,
            orig_dst: None,
        },
        PathSetup {
            name: "sk_msg",
            listener: listen(&web)?,
            pod: web,
            dial: SocketAddr::V4(vip),
            orig_dst: Some(vip),
        },
        PathSetup {
            name: "iptables",
            listener: listen(&ipt)?,
            pod: ipt,
            dial: SocketAddr::V4(vip),
            orig_dst: Some(vip),
        },
    ];
    debug_assert!(paths.iter().map(|p| p.name).eq(redirect_report::PATHS));
    Ok(Bench {
        exe: std::env::current_exe()?,
        setup,
        all_cpus,
        dp,
        paths,
    })
}

fn run_rounds(bench: &Bench) -> Result<Vec<Record>> {
    let rounds = bench.setup.rounds;
    let mut records = Vec::new();
    for round in 0..rounds {
        for pinning in [Pinning::Pinned(bench.setup.cpu), Pinning::Unpinned] {
            for wl in Workload::ALL {
                // Rotate the path order from round to round: no path always runs first.
                for k in 0..bench.paths.len() {
                    let i = (k + round) % bench.paths.len();
                    ensure!(!INTERRUPTED.load(Ordering::SeqCst), "interrupted");
                    let rec = match measure(bench, i, wl, pinning, round) {
                        Ok(rec) => rec,
                        Err(e) if INTERRUPTED.load(Ordering::SeqCst) => {
                            return Err(e.context("interrupted"))
                        }
                        Err(e) => Record {
                            path: bench.paths[i].name,
                            workload: wl.name(),
                            round,
                            pinning: pinning.name(),
                            metrics: Vec::new(),
                            client: Value::Null,
                            counters: Value::Null,
                            redirected_fraction: None,
                            valid: false,
                            note: Some(format!("failed: {e:#}")),
                        },
                    };
                    eprintln!("{}", progress_line(&rec, rounds));
                    records.push(rec);
                }
            }
        }
    }
    Ok(records)
}

fn progress_line(r: &Record, rounds: usize) -> String {
    let figures: Vec<String> = r
        .metrics
        .iter()
        .filter(|(n, _)| n != "mean_us")
        .map(|(n, v)| format!("{n}={v:.2}"))
        .collect();
    let mut line = format!(
        "round {}/{} {:<8} {:<14} {:<8} {}",
        r.round + 1,
        rounds,
        r.pinning,
        r.workload,
        r.path,
        figures.join(" ")
    );
    if let Some(f) = r.redirected_fraction {
        line += &format!(" redirected={:.0}%", f * 100.0);
    }
    if !r.valid {
        line += &format!("  INVALID: {}", r.note.as_deref().unwrap_or("?"));
    }
    line
}

/// One measurement: a listener thread and an app process, both pinned or not, and the kernel
/// counters around them.
fn measure(
    bench: &Bench,
    i: usize,
    wl: Workload,
    pinning: Pinning,
    round: usize,
) -> Result<Record> {
    let p = &bench.paths[i];
    let cpus = match pinning {
        Pinning::Pinned(cpu) => {
            let mut set = CpuSet::new();
            set.set(cpu)?;
            set
        }
        Pinning::Unpinned => bench.all_cpus,
    };
    let before = bench.dp.counters()?;
    let server = workload::spawn_server(&p.listener, wl, p.orig_dst, cpus)?;
    let client = run_client(bench, p, wl, pinning);
    server.stop.store(true, Ordering::SeqCst);
    let served = server
        .thread
        .join()
        .map_err(|_| anyhow!("the listener thread panicked"))?;
    let after = bench.dp.counters()?;
    let client = match (client, served) {
        (Ok(c), Ok(s)) => (c, s),
        (Err(c), Err(s)) => bail!("app: {c:#}; listener: {s:#}"),
        (Err(c), Ok(_)) => bail!("app: {c:#}"),
        (Ok(_), Err(s)) => bail!("listener: {s:#}"),
    };
    let (client, served) = client;

    let num = |k: &str| client[k].as_f64();
    let mut metrics = Vec::new();
    let mut problems = Vec::new();
    let expected_served = match wl {
        Workload::PingPong { .. } => {
            for k in ["p50_us", "p99_us", "mean_us", "same_cpu_share"] {
                metrics.push((k.to_string(), num(k).context(k)?));
            }
            bench.setup.round_trips as u64 + bench.setup.warmup as u64
        }
        Workload::Bulk => {
            metrics.push(("gb_per_s".to_string(), num("gb_per_s").context("gb_per_s")?));
            client["bytes"].as_u64().context("bytes")?
        }
        Workload::Connect => {
            metrics.push((
                "conns_per_s".to_string(),
                num("conns_per_s").context("conns_per_s")?,
            ));
            client["connections"].as_u64().context("connections")?
        }
    };
    if served.count != expected_served {
        problems.push(format!(
            "the listener counted {} where the app counted {expected_served}",
            served.count
        ));
    }

    let before = serde_json::to_value(before)?;
    let after = serde_json::to_value(after)?;
    let mut delta = serde_json::Map::new();
    if let (Some(b), Some(a)) = (before.as_object(), after.as_object()) {
        for (k, av) in a {
            let d = av
                .as_u64()
                .unwrap_or(0)
                .wrapping_sub(b.get(k).and_then(Value::as_u64).unwrap_or(0));
            delta.insert(k.clone(), json!(d));
        }
    }
    let counter = |k: &str| delta.get(k).and_then(Value::as_u64).unwrap_or(0);
    let moved = client["bytes"].as_u64().unwrap_or(0);
    let redirected = counter("bytes_redirected");
    let mut fraction = None;
    if p.name == "sk_msg" {
        if redirected == 0 {
            problems.push(
                "bytes_redirected did not grow: nothing took the sk_msg redirect".to_string(),
            );
        }
        if moved > 0 {
            fraction = Some(redirected as f64 / moved as f64);
        }
    } else if redirected > 0 || counter("sockets_added") > 0 {
        problems.push(format!(
            "the baseline was redirected ({redirected} bytes, {} sockets added)",
            counter("sockets_added")
        ));
    }
    Ok(Record {
        path: p.name,
        workload: wl.name(),
        round,
        pinning: pinning.name(),
        metrics,
        client,
        counters: Value::Object(delta),
        redirected_fraction: fraction,
        valid: problems.is_empty(),
        note: (!problems.is_empty()).then(|| problems.join("; ")),
    })
}

/// Runs the app side of `wl` in the path's pod and returns its report.
fn run_client(bench: &Bench, p: &PathSetup, wl: Workload, pinning: Pinning) -> Result<Value> {
    let s = &bench.setup;
    let mut cmd = Command::new(&bench.exe);
    cmd.arg("client")
        .arg("--netns")
        .arg(&p.pod.netns_path)
        .arg("--cgroup")
        .arg(&p.pod.cgroup);
    if let Pinning::Pinned(cpu) = pinning {
        cmd.arg("--cpu").arg(cpu.to_string());
    }
    let addr = p.dial.to_string();
    match wl {
        Workload::PingPong { size } => cmd.args([
            "ping-pong".to_string(),
            addr,
            size.to_string(),
            s.round_trips.to_string(),
            s.warmup.to_string(),
        ]),
        Workload::Bulk => cmd.args(["bulk".to_string(), addr, s.bulk_secs.to_string()]),
        Workload::Connect => cmd.args(["connect".to_string(), addr, s.connect_secs.to_string()]),
    };
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting the app process")?;
    let out = wait_client(child)?;
    ensure!(
        out.status.success(),
        "the app process failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .last()
        .context("the app process printed nothing")?;
    serde_json::from_str(line).with_context(|| format!("the app's report {line:?}"))
}
