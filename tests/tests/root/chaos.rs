//! Chaos: `meshd run` (a real process) killed with SIGKILL at random moments while allowed
//! traffic flows and probers outside the mesh and in a denied pod dial every app port of a pod
//! (declared, undeclared, IPv4, IPv6 link-local); some restarts are themselves killed while the
//! agent starts (adopting pins, re-meshing pods). Not one byte of the app's answer may reach a
//! prober, whatever state the agent is in; allowed traffic resumes after each restart.
//!
//! The node: `web` (meshed, calls api by its virtual IP), `api` (meshed; its app answers a
//! marker on a declared port and an undeclared one, on `[::]`), `evil` (meshed, denied by the
//! intention `evil → api` under a default of allow), `outside` (a pod of the node the catalog
//! does not know: outside the mesh).
//!
//! Also here: intention maps that refuse every write (frozen from outside) while a real agent
//! takes new rules: the proxies enforce the newest ones and the kernel decides nothing.

use std::io::{BufRead, BufReader, Read};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use mesh_core::catalog::{Catalog, Endpoint, Protocol, Service};
use mesh_kit::{bin_path, wait_for, workload, Node, Pod};

/// What the api app answers; seeing it anywhere a prober reads is the failure.
const MARKER: &str = "api-app-answer-7f3a9c";
const DECLARED: u16 = 9091;
const UNDECLARED: u16 = 9101;
const API_LL: &str = "fe80::a";

fn unix_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

fn ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}

/// xorshift64*: the random moments, reproducible from the printed seed (`CHAOS_SEED=<n>`).
struct Rng(u64);

impl Rng {
    fn new() -> (Self, u64) {
        let seed = std::env::var("CHAOS_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| unix_ns() | 1);
        (Rng(seed.max(1)), seed)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n.max(1)
    }
}

struct Setup {
    // Guards first: they drop (kill their processes) before the node goes away.
    _dir: tempfile::TempDir,
    catalog_path: PathBuf,
    state: PathBuf,
    http_addr: String,
    web: Pod,
    api: Pod,
    evil: Pod,
    outside: Pod,
    vip: SocketAddrV4,
    node: Node,
}

/// The node, its catalog on disk and the api apps (not yet meshed: no agent has run).
fn setup() -> Result<Setup> {
    let mut node = Node::new()?;
    let web = node.add_pod("web")?;
    let api = node.add_pod("api")?;
    let evil = node.add_pod("evil")?;
    let outside = node.add_pod("outside")?;
    // IPv6 link-local on api and the probers' pods before any agent reads api's addresses.
    api.enable_ipv6(&[&format!("{API_LL}/64")])?;
    evil.enable_ipv6(&["fe80::e/64"])?;
    outside.enable_ipv6(&["fe80::b/64"])?;
    let vip = SocketAddrV4::new(Ipv4Addr::new(10, 96, node.subnet, 40), DECLARED);
    let service = |name: &str, vip: Option<Ipv4Addr>, ports: Vec<u16>, endpoints| Service {
        name: name.into(),
        namespace: "default".into(),
        datacenter: "dc1".into(),
        vip,
        ports,
        protocol: Protocol::Tcp,
        target_ports: Default::default(),
        endpoints,
        ..Default::default()
    };
    let catalog = Catalog {
        services: vec![
            service(
                "api",
                Some(*vip.ip()),
                vec![DECLARED],
                vec![Endpoint {
                    ip: api.ip,
                    port: mesh_common::INBOUND_PORT,
                }],
            ),
            service("web", None, vec![], vec![]),
            service("evil", None, vec![], vec![]),
        ],
        workloads: vec![
            workload(&web, "web", vec![], vec![]),
            workload(&api, "api", vec![DECLARED], vec![]),
            workload(&evil, "evil", vec![], vec![]),
        ],
    };
    let dir = tempfile::tempdir()?;
    let catalog_path = dir.path().join("catalog.json");
    std::fs::write(&catalog_path, serde_json::to_string_pretty(&catalog)?)?;
    let state = dir.path().join("state");
    for port in [DECLARED, UNDECLARED] {
        let app = node.probe(
            &api.netns_path,
            &api.cgroup,
            &["serve", &format!("[::]:{port}"), MARKER],
        )?;
        node.keep(app);
    }
    let http_addr = format!(
        "127.0.0.1:{}",
        TcpListener::bind("127.0.0.1:0")?.local_addr()?.port()
    );
    Ok(Setup {
        _dir: dir,
        catalog_path,
        state,
        http_addr,
        web,
        api,
        evil,
        outside,
        vip,
        node,
    })
}

impl Setup {
    /// api's app ports as `from` dials them: IPv4 and IPv6 link-local (scoped to `from`'s
    /// eth0), declared and undeclared.
    fn app_addrs(&self, from: &Pod) -> Result<Vec<SocketAddr>> {
        let ll: Ipv6Addr = API_LL.parse()?;
        let scope = from.eth0_index()?;
        let mut out = Vec::new();
        for port in [DECLARED, UNDECLARED] {
            out.push(SocketAddr::from((self.api.ip, port)));
            out.push(SocketAddr::V6(SocketAddrV6::new(ll, port, 0, scope)));
        }
        Ok(out)
    }

    /// `meshctl` against the agent's API with the bootstrap token.
    fn meshctl(&self, args: &[&str]) -> Result<String> {
        let token = std::fs::read_to_string(self.state.join("acl-bootstrap-token"))?;
        let out = Command::new(bin_path("meshctl")?)
            .args(args)
            .env("MESH_HTTP_ADDR", &self.http_addr)
            .env("MESH_HTTP_TOKEN", token.trim())
            .stdin(Stdio::null())
            .output()
            .context("running meshctl")?;
        ensure!(
            out.status.success(),
            "meshctl {} failed: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// What `connect` from `pod`'s app to `addr` says: "connected" or "error <errno> ...".
    fn connect_from(&mut self, pod: &Pod, addr: SocketAddr) -> Result<String> {
        let out = self.node.probe_in(
            pod,
            &["connect", &addr.to_string()],
            Duration::from_secs(10),
        )?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// One plaintext probe of each of `addrs` from `pod` (see mesh-probe's probe-loop).
    fn probe_once(&mut self, pod: &Pod, addrs: &[SocketAddr]) -> Result<Vec<Probe>> {
        let list: Vec<String> = addrs.iter().map(|a| a.to_string()).collect();
        let out = self.node.probe_in(
            pod,
            &["probe-loop", "1", "0", MARKER, &list.join(",")],
            Duration::from_secs(10),
        )?;
        ensure!(
            out.status.success(),
            "probe-loop: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| Probe::parse(&pod.name, l))
            .collect()
    }
}

/// A `meshd run` child, killed (SIGKILL) when dropped.
struct Meshd {
    child: Child,
    /// When it was spawned and when it said it was ready (Unix-epoch ns).
    spawned_ns: u64,
    ready_ns: u64,
    ready: mpsc::Receiver<u64>,
    /// When it logged each catalog reload (after SIGHUP).
    reloaded: mpsc::Receiver<u64>,
}

impl Drop for Meshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Meshd {
    /// Starts `meshd run` (a child of this process, so in the node's agent cgroup) with the
    /// default policy allow, and waits until it says it is ready.
    fn start(s: &Setup, label: &str) -> Result<Self> {
        let mut meshd = Self::spawn(s, label)?;
        match meshd.ready.recv_timeout(Duration::from_secs(30)) {
            Ok(at) => meshd.ready_ns = at,
            Err(_) => bail!("meshd [{label}] did not get ready within 30 s"),
        }
        Ok(meshd)
    }

    /// Starts `meshd run` without waiting for it.
    fn spawn(s: &Setup, label: &str) -> Result<Self> {
        let spawned_ns = unix_ns();
        let mut child = Command::new(bin_path("meshd")?)
            .args([
                "run",
                "--redirect",
                "ebpf",
                "--default-intention-policy",
                "allow",
            ])
            .arg("--catalog")
            .arg(&s.catalog_path)
            .arg("--instance")
            .arg(s.node.instance())
            .arg("--state-dir")
            .arg(&s.state)
            .arg("--mesh-cgroup")
            .arg(&s.node.mesh_cgroup)
            .env("NO_COLOR", "1")
            .env("MESH_HTTP_ADDR", &s.http_addr)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting meshd")?;
        let stderr = child.stderr.take().context("meshd stderr")?;
        let (tx, rx) = mpsc::channel();
        let (reload_tx, reload_rx) = mpsc::channel();
        let tag = label.to_string();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("meshd ready") {
                    let _ = tx.send(unix_ns());
                }
                if line.contains("catalog reloaded") {
                    let _ = reload_tx.send(unix_ns());
                }
                // Errors, warnings and readiness; the rest would drown the test's report.
                let noise = line.contains("connection refused") || line.contains("RLIMIT_NOFILE");
                if !noise
                    && (line.contains("ERROR") || line.contains("WARN") || line.contains("ready"))
                {
                    eprintln!("meshd[{tag}]: {line}");
                }
            }
        });
        Ok(Meshd {
            child,
            spawned_ns,
            ready_ns: 0,
            ready: rx,
            reloaded: reload_rx,
        })
    }

    /// SIGHUP (re-read the catalog), and waits until it says it reloaded.
    fn reload(&mut self) -> Result<()> {
        if let Some(st) = self.child.try_wait()? {
            bail!("meshd exited: {st}");
        }
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id())?);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP)?;
        self.reloaded
            .recv_timeout(Duration::from_secs(10))
            .context("meshd did not reload its catalog within 10 s")?;
        Ok(())
    }

    /// SIGKILL, after checking it did not exit on its own.
    fn kill_9(mut self) -> Result<u64> {
        if let Some(st) = self.child.try_wait()? {
            bail!("meshd exited on its own before it was killed: {st}");
        }
        self.child.kill()?;
        let at = unix_ns();
        self.child.wait()?;
        Ok(at)
    }
}

/// A background mesh-probe whose stdout lines are collected (with nothing lost on kill).
struct Collector {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Collector {
    fn start(s: &mut Setup, pod: &Pod, args: &[&str]) -> Result<Self> {
        let mut child = s.node.probe(&pod.netns_path, &pod.cgroup, args)?;
        let stdout = child.stdout.take().context("probe stdout")?;
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                sink.lock().unwrap_or_else(|e| e.into_inner()).push(line);
            }
        });
        Ok(Collector {
            child,
            lines,
            reader: Some(reader),
        })
    }

    fn snapshot(&self, from: usize) -> Vec<String> {
        let lines = self.lines.lock().unwrap_or_else(|e| e.into_inner());
        lines
            .get(from..)
            .map(<[String]>::to_vec)
            .unwrap_or_default()
    }

    /// Kills the probe and returns every line it printed, and its stderr.
    fn finish(mut self) -> Result<(Vec<String>, String)> {
        if let Some(st) = self.child.try_wait()? {
            let mut err = String::new();
            if let Some(mut e) = self.child.stderr.take() {
                e.read_to_string(&mut err)?;
            }
            bail!("a probe exited early ({st}): {err}");
        }
        self.child.kill()?;
        self.child.wait()?;
        let mut err = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            e.read_to_string(&mut err)?;
        }
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        let lines = std::mem::take(&mut *self.lines.lock().unwrap_or_else(|e| e.into_inner()));
        Ok((lines, err))
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One line of mesh-probe's probe-loop.
#[derive(Debug, Clone)]
struct Probe {
    from: String,
    at_ns: u64,
    target: String,
    outcome: String,
    bytes: usize,
    marker: bool,
}

impl Probe {
    fn parse(from: &str, line: &str) -> Result<Probe> {
        let w: Vec<&str> = line.split_whitespace().collect();
        ensure!(
            w.len() == 6 && w[0] == "probe",
            "unexpected probe line {line:?}"
        );
        Ok(Probe {
            from: from.to_string(),
            at_ns: w[1].parse()?,
            target: w[2].to_string(),
            outcome: w[3].to_string(),
            bytes: w[4].trim_start_matches("bytes=").parse()?,
            marker: w[5] == "marker=1",
        })
    }

    fn connected(&self) -> bool {
        self.outcome.starts_with("connected-")
    }
}

/// One line of mesh-probe's fetch-loop: when it ended and whether the app answered.
fn parse_fetch(line: &str) -> Result<(u64, u64, bool)> {
    let w: Vec<&str> = line.split_whitespace().collect();
    ensure!(
        w.len() >= 4 && w[0] == "fetch",
        "unexpected fetch line {line:?}"
    );
    Ok((
        w[1].parse()?,
        w[2].parse()?,
        w[3] == "got" && w.get(4) == Some(&MARKER),
    ))
}

/// Waits for web's first fetch through the mesh that ended after `since_ns`; its end time.
fn first_fetch_after(fetcher: &Collector, since_ns: u64, limit: Duration) -> Result<u64> {
    wait_for(
        "a successful fetch by web",
        limit,
        Duration::from_millis(5),
        || {
            Ok(fetcher
                .snapshot(0)
                .iter()
                .filter_map(|l| parse_fetch(l).ok())
                .filter(|&(_, end, ok)| ok && end > since_ns)
                .map(|(_, end, _)| end)
                .min())
        },
    )
}

/// Creates the deny `evil → api` through the agent's API and waits until the kernel refuses
/// evil's connect to the VIP.
fn deny_evil(s: &mut Setup) -> Result<()> {
    s.meshctl(&["intention", "create", "-deny", "evil", "api"])?;
    let (evil, vip) = (s.evil.clone(), SocketAddr::V4(s.vip));
    let eperm = format!("error {} ", libc::EPERM);
    wait_for(
        "EPERM for evil → api",
        Duration::from_secs(10),
        Duration::from_millis(50),
        || {
            Ok(s.connect_from(&evil, vip)?
                .starts_with(&eperm)
                .then_some(()))
        },
    )
}

/// Before any agent: the outside prober reads the app's marker on every address (IPv6
/// neighbours up included), so a prober that reads no marker later was refused, not blind.
fn probes_see_the_unmeshed_app(s: &mut Setup) -> Result<()> {
    let outside = s.outside.clone();
    let addrs = s.app_addrs(&outside)?;
    let mut last = Vec::new();
    wait_for(
        "the unmeshed app answering the prober on every address",
        Duration::from_secs(15),
        Duration::from_millis(200),
        || {
            last = s.probe_once(&outside, &addrs)?;
            Ok((last.len() == addrs.len() && last.iter().all(|p| p.marker)).then_some(()))
        },
    )
    .with_context(|| format!("last probes: {last:?}"))
}

#[test]
fn sigkill_at_ten_random_moments_lets_no_app_byte_reach_a_prober_and_traffic_resumes() -> Result<()>
{
    const ROUNDS: usize = 10;
    let (mut rng, seed) = Rng::new();
    eprintln!("chaos seed {seed} (rerun with CHAOS_SEED={seed})");
    let mut s = setup()?;
    probes_see_the_unmeshed_app(&mut s)?;

    let mut meshd = Meshd::start(&s, "first")?;
    deny_evil(&mut s)?;
    let (web, evil, outside) = (s.web.clone(), s.evil.clone(), s.outside.clone());
    let vip = SocketAddr::V4(s.vip);
    let fetcher = Collector::start(&mut s, &web, &["fetch-loop", "20", &vip.to_string()])?;
    first_fetch_after(&fetcher, meshd.spawned_ns, Duration::from_secs(10))
        .context("web never reached api through the mesh")?;

    let join = |addrs: &[SocketAddr]| {
        addrs
            .iter()
            .map(|a| a.to_string())
            .collect::<Vec<_>>()
            .join(",")
    };
    let outside_targets = s.app_addrs(&outside)?;
    let mut evil_targets = s.app_addrs(&evil)?;
    // evil also dials the service it is denied, by its VIP.
    evil_targets.push(vip);
    let probers = [
        (
            outside.name.clone(),
            outside_targets.clone(),
            Collector::start(
                &mut s,
                &outside,
                &["probe-loop", "0", "10", MARKER, &join(&outside_targets)],
            )?,
        ),
        (
            evil.name.clone(),
            evil_targets.clone(),
            Collector::start(
                &mut s,
                &evil,
                &["probe-loop", "0", "10", MARKER, &join(&evil_targets)],
            )?,
        ),
    ];

    let test_start = Instant::now();
    // (kill → spawn, spawn → ready, spawn → first fetch, ready → first fetch), in ms
    let mut rounds: Vec<(f64, f64, f64, f64)> = Vec::new();
    let mut startup_kills = 0;
    for round in 1..=ROUNDS {
        // A random moment of steady traffic, then SIGKILL.
        let up_ms = 100 + rng.below(2400);
        std::thread::sleep(Duration::from_millis(up_ms));
        let killed_ns = meshd.kill_9().with_context(|| format!("round {round}"))?;
        // Down for a random while (the probers keep dialling), then a new agent.
        let down_ms = rng.below(600);
        std::thread::sleep(Duration::from_millis(down_ms));
        // Every other round or so, an agent killed again while it starts (adopting the pins,
        // re-meshing the pods), before the one that serves.
        if rng.below(2) == 0 {
            let early_ms = rng.below(300);
            let early = Meshd::spawn(&s, &format!("restart {round}, killed while starting"))?;
            std::thread::sleep(Duration::from_millis(early_ms));
            let was_ready = early.ready.try_recv().is_ok();
            early
                .kill_9()
                .with_context(|| format!("round {round}, the agent killed while starting"))?;
            startup_kills += 1;
            eprintln!(
                "round {round}: an agent killed {early_ms} ms into its start (ready by then: \
                 {was_ready})"
            );
        }
        meshd = Meshd::start(&s, &format!("restart {round}"))?;
        let resumed = first_fetch_after(&fetcher, meshd.spawned_ns, Duration::from_secs(15))
            .with_context(|| format!("allowed traffic did not resume after restart {round}"))?;
        let r = (
            ms(meshd.spawned_ns.saturating_sub(killed_ns)),
            ms(meshd.ready_ns.saturating_sub(meshd.spawned_ns)),
            ms(resumed.saturating_sub(meshd.spawned_ns)),
            ms(resumed.saturating_sub(meshd.ready_ns)),
        );
        eprintln!(
            "round {round}: up {up_ms} ms, killed, spawned again after {:.0} ms, ready after \
             {:.0} ms; web's traffic resumed {:.0} ms after the start ({:.0} ms after ready)",
            r.0, r.1, r.2, r.3
        );
        rounds.push(r);
    }
    // The last agent serves a little longer under the probers, then everything stops.
    std::thread::sleep(Duration::from_millis(500));
    let elapsed = test_start.elapsed();

    let mut probes = Vec::new();
    for (name, targets, collector) in probers {
        let (lines, err) = collector.finish()?;
        ensure!(err.trim().is_empty(), "prober in {name}: {err}");
        let parsed: Vec<Probe> = lines
            .iter()
            .map(|l| Probe::parse(&name, l))
            .collect::<Result<_>>()?;
        probes.push((name, targets, parsed));
    }
    let (fetch_lines, fetch_err) = fetcher.finish()?;
    ensure!(fetch_err.trim().is_empty(), "web's fetch loop: {fetch_err}");
    let fetches: Vec<(u64, u64, bool)> = fetch_lines
        .iter()
        .map(|l| parse_fetch(l))
        .collect::<Result<_>>()?;
    drop(meshd);

    // The report.
    let resume: Vec<f64> = rounds.iter().map(|r| r.2).collect();
    let max = resume.iter().copied().fold(0.0, f64::max);
    eprintln!(
        "seed {seed}: {ROUNDS} SIGKILLs of a serving agent and {startup_kills} of a starting one \
         in {elapsed:?}; web fetched {} times ({} answered by \
         api through the mesh)",
        fetches.len(),
        fetches.iter().filter(|f| f.2).count()
    );
    eprintln!(
        "resume after restart (agent start → web's first fetch), ms: {} — max {max:.0} ms \
         (target < 1000 ms, not asserted)",
        resume
            .iter()
            .map(|t| format!("{t:.0}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let mut leaks = Vec::new();
    for (name, targets, list) in &probes {
        for t in targets {
            let key = t.to_string();
            let of: Vec<&Probe> = list.iter().filter(|p| p.target == key).collect();
            let mut outcomes = std::collections::BTreeMap::<&str, usize>::new();
            for p in &of {
                *outcomes.entry(p.outcome.as_str()).or_default() += 1;
            }
            let bytes: usize = of.iter().map(|p| p.bytes).sum();
            eprintln!(
                "prober {name} → {key}: {} attempts, {bytes} bytes back (none the app's \
                 allowed), outcomes {outcomes:?}",
                of.len()
            );
            ensure!(
                of.len() >= 20,
                "prober {name} → {key} made only {} attempts",
                of.len()
            );
            leaks.extend(of.into_iter().filter(|p| p.marker).cloned());
        }
    }
    ensure!(
        leaks.is_empty(),
        "app bytes reached a prober {} times: {:?}",
        leaks.len(),
        leaks
            .iter()
            .map(|p| format!(
                "{} → {} at +{:.0} ms ({})",
                p.from,
                p.target,
                ms(p.at_ns.saturating_sub(fetches.first().map_or(0, |f| f.0))),
                p.outcome
            ))
            .collect::<Vec<_>>()
    );
    // The probes were real: from outside, every app address landed on api's inbound
    // listener (connected, then refused) while an agent ran; evil's VIP connect met EPERM.
    for (name, _, list) in &probes {
        if *name == outside.name {
            for t in &outside_targets {
                let key = t.to_string();
                ensure!(
                    list.iter().any(|p| p.target == key && p.connected()),
                    "outside → {key} never connected: the probe tested nothing"
                );
            }
        } else {
            let key = vip.to_string();
            ensure!(
                list.iter().any(
                    |p| p.target == key && p.outcome == format!("connect-errno{}", libc::EPERM)
                ),
                "evil → VIP never met EPERM"
            );
        }
    }
    ensure!(
        fetches.iter().filter(|f| f.2).count() > ROUNDS,
        "too little allowed traffic"
    );
    Ok(())
}

#[test]
fn after_sigkill_and_restart_plaintext_is_refused_vip_redirected_and_denied_gets_eperm(
) -> Result<()> {
    let mut s = setup()?;
    probes_see_the_unmeshed_app(&mut s)?;
    let meshd = Meshd::start(&s, "first")?;
    deny_evil(&mut s)?;
    let (web, evil, outside) = (s.web.clone(), s.evil.clone(), s.outside.clone());
    let vip = SocketAddr::V4(s.vip);
    let eperm = format!("error {} ", libc::EPERM);
    let fetch = |s: &mut Setup| -> Result<String> {
        let out = s
            .node
            .probe_in(&web, &["fetch", &vip.to_string()], Duration::from_secs(10))?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    };
    ensure!(
        fetch(&mut s)? == MARKER,
        "web through the mesh before the kill"
    );

    // SIGKILL (no chance to clean anything up), while web keeps dialling.
    let traffic = s.node.probe(
        &web.netns_path,
        &web.cgroup,
        &["fetch-loop", "5", &vip.to_string()],
    )?;
    s.node.keep(traffic);
    std::thread::sleep(Duration::from_millis(200));
    meshd.kill_9()?;

    // Down: nothing reaches the app, and the kernel still refuses evil.
    let addrs = s.app_addrs(&outside)?;
    for p in s.probe_once(&outside, &addrs)? {
        assert!(!p.marker, "agent down: the app answered plaintext: {p:?}");
        assert!(
            !p.connected(),
            "agent down: nothing should even accept: {p:?}"
        );
    }
    let down = s.connect_from(&evil, vip)?;
    assert!(down.starts_with(&eperm), "agent down, evil → VIP: {down}");

    let meshd = Meshd::start(&s, "restarted")?;
    // Plaintext from another pod (outside the mesh, and the denied meshed one) to every app
    // address lands on the new inbound listener and is refused: connected, no app byte.
    let outside_probes = s.probe_once(&outside, &addrs)?;
    for p in &outside_probes {
        assert!(
            !p.marker,
            "after restart: the app answered plaintext: {p:?}"
        );
        assert!(
            p.connected(),
            "after restart: {} should land on the inbound listener: {p:?}",
            p.target
        );
    }
    let evil_addrs = s.app_addrs(&evil)?;
    for p in s.probe_once(&evil, &evil_addrs)? {
        assert!(!p.marker, "after restart: the app answered evil: {p:?}");
        let declared_v4 = p.target == SocketAddr::from((s.api.ip, DECLARED)).to_string();
        if p.target.contains('[') || declared_v4 {
            // A meshed pod dialling another meshed pod's native IPv6 address, or the service's
            // endpoint (pod address, service port) it is denied: EPERM.
            assert_eq!(
                p.outcome,
                format!("connect-errno{}", libc::EPERM),
                "evil → {}",
                p.target
            );
        } else {
            assert!(p.connected(), "evil → {}: {p:?}", p.target);
        }
    }
    // web's VIP connection is redirected to its proxy and reaches api (the VIP itself is no
    // one's address: only the redirect can answer).
    let got = wait_for(
        "web through the mesh after the restart",
        Duration::from_secs(10),
        Duration::from_millis(20),
        || {
            let got = fetch(&mut s)?;
            Ok((got == MARKER).then_some(got))
        },
    )?;
    assert_eq!(got, MARKER);
    let web_connect = s.connect_from(&web, vip)?;
    assert_eq!(web_connect, "connected", "web → VIP");
    // The denied pod's connect fails at once with EPERM.
    let denied = s.connect_from(&evil, vip)?;
    assert!(denied.starts_with(&eperm), "evil → VIP: {denied}");
    drop(meshd);
    Ok(())
}

/// Sockets of `pod` in TCP state `state` (`ss` names: syn-recv, established, ...), one line each.
fn sockets_in(pod: &Pod, state: &str) -> Result<Vec<String>> {
    let out = mesh_kit::run(
        "ip",
        &[
            "netns",
            "exec",
            &pod.netns_name,
            "ss",
            "-tanH",
            "state",
            state,
        ],
    )?;
    Ok(out
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_owned)
        .collect())
}

/// Two meshed pods with the same IPv6 link-local address (legal: each pod has its own link;
/// here both sit on the node bridge and a static neighbour entry sends outside's packets to
/// `api`). A connection to `api`'s address must land on `api`'s own inbound listener.
///
/// The kernel's inbound maps are keyed by (network namespace cookie, address)
/// (`mesh_common::InboundAddrKey`), so both pods keep their own entry; keyed by the address
/// alone, the pod registered last (`api2`) owned it, and `sk_lookup` in `api`'s namespace
/// handed the SYN to `api2`'s listener, in another network namespace (SYN-RECV in `api2`, the
/// client hanging). Returns the probe and the SYN-RECV sockets found in the other pod.
fn shared_link_local(other: &str, other_excludes: Vec<u16>) -> Result<(Probe, Vec<String>)> {
    let mut node = Node::new()?;
    let api = node.add_pod("api")?;
    let api2 = node.add_pod(other)?;
    let outside = node.add_pod("outside")?;
    api.enable_ipv6(&[&format!("{API_LL}/64")])?;
    api2.enable_ipv6(&[&format!("{API_LL}/64")])?;
    outside.enable_ipv6(&["fe80::b/64"])?;
    let link = mesh_kit::run(
        "ip",
        &["-n", &api.netns_name, "-j", "link", "show", "dev", "eth0"],
    )?;
    let link: serde_json::Value = serde_json::from_str(&link)?;
    let mac = link[0]["address"]
        .as_str()
        .context("api's MAC")?
        .to_string();
    mesh_kit::run(
        "ip",
        &[
            "-n",
            &outside.netns_name,
            "-6",
            "neigh",
            "replace",
            API_LL,
            "lladdr",
            &mac,
            "dev",
            "eth0",
            "nud",
            "permanent",
        ],
    )?;
    let app = node.probe(
        &api.netns_path,
        &api.cgroup,
        &["serve", &format!("[::]:{DECLARED}"), MARKER],
    )?;
    node.keep(app);
    let catalog = Catalog {
        services: vec![],
        workloads: vec![
            workload(&api, "api", vec![DECLARED], vec![]),
            mesh_core::catalog::Workload {
                exclude_inbound_ports: other_excludes,
                ..workload(&api2, other, vec![DECLARED], vec![])
            },
        ],
    };
    let dir = tempfile::tempdir()?;
    let catalog_path = dir.path().join("catalog.json");
    std::fs::write(&catalog_path, serde_json::to_string_pretty(&catalog)?)?;
    let http_addr = format!(
        "127.0.0.1:{}",
        TcpListener::bind("127.0.0.1:0")?.local_addr()?.port()
    );
    let mut s = Setup {
        catalog_path,
        state: dir.path().join("state"),
        _dir: dir,
        http_addr,
        web: api2.clone(),
        api: api.clone(),
        evil: api2.clone(),
        outside: outside.clone(),
        vip: SocketAddrV4::new(Ipv4Addr::new(10, 96, node.subnet, 40), DECLARED),
        node,
    };
    let ll = s.app_addrs(&outside)?[1];
    // Unmeshed, outside reaches api's app at its link-local address (the path works).
    wait_for(
        "api's app over IPv6 link-local",
        Duration::from_secs(10),
        Duration::from_millis(200),
        || Ok(s.probe_once(&outside, &[ll])?[0].marker.then_some(())),
    )?;
    let meshd = Meshd::start(&s, "shared link-local")?;
    let probe = s.probe_once(&outside, &[ll])?.remove(0);
    let stray = sockets_in(&api2, "syn-recv")?;
    drop(meshd);
    Ok((probe, stray))
}

/// Two meshed pods with the same IPv6 link-local address (legal: each pod has its own link;
/// here both sit on the node bridge and a static neighbour entry sends outside's packets to
/// `api`). A connection to `api`'s address must land on `api`'s own inbound listener.
///
/// Regression: with `INBOUND_ADDRS` keyed by the address alone, the pod registered last
/// (`api2`, after `api` in the agent's id order) owned it, and `sk_lookup` in `api`'s namespace
/// handed the SYN to `api2`'s listener, in another network namespace: the request showed up as
/// SYN-RECV in `api2`, the client hung. The map is now keyed by (netns cookie, address).
#[test]
fn a_link_local_address_two_pods_share_lands_on_each_pods_own_listener() -> Result<()> {
    let (probe, stray) = shared_link_local("api2", vec![])?;
    let ll = &probe.target;
    assert!(!probe.marker, "plaintext reached the app: {probe:?}");
    assert!(
        stray.is_empty(),
        "a connection to api's {ll} was handed to api2's listener (another network \
         namespace): {stray:?}"
    );
    assert!(
        probe.connected(),
        "api's own inbound listener should take {ll} (then refuse the plaintext): {probe:?}"
    );
    Ok(())
}

/// The same two pods, the other one excluding the app port from its inbound capture
/// (`consul.hashicorp.com/transparent-proxy-exclude-inbound-ports`). `api` excluded nothing:
/// plaintext to it must never reach its app.
///
/// Regression: with `INBOUND_EXCLUDE` keyed by (address, port) alone, the other pod's
/// exclusion of 9091 on the shared address made `sk_lookup` in `api`'s namespace pass the
/// connection to `api`'s app: plaintext from outside the mesh reached it, whichever pod the
/// agent registered last (tried with `aa` and `zz`, before and after `api`). The map is now
/// keyed by (netns cookie, address, port).
#[test]
fn another_pods_exclusion_on_a_shared_address_never_opens_this_pods_app() -> Result<()> {
    for other in ["aa", "zz"] {
        let (probe, _) = shared_link_local(other, vec![DECLARED])?;
        assert!(
            !probe.marker,
            "{other} excludes {DECLARED}: plaintext reached api's app, which excluded nothing: \
             {probe:?}"
        );
    }
    Ok(())
}

/// The live `CONFIG` of `s`'s agent, read through its pin.
fn pinned_config(s: &Setup) -> Result<mesh_common::Config> {
    let path = mesh_dataplane::bpf::instance_dir(&s.node.instance())
        .join("maps")
        .join(mesh_common::MAP_CONFIG);
    let data = aya::maps::MapData::from_pin(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    let map: aya::maps::Array<aya::maps::MapData, mesh_common::Config> =
        aya::maps::Array::try_from(aya::maps::Map::from_map_data(data)?)?;
    Ok(map.get(&0, 0)?)
}

#[test]
fn frozen_intention_maps_leave_the_proxy_enforcing_the_newest_rules() -> Result<()> {
    let mut s = setup()?;
    let meshd = Meshd::start(&s, "frozen")?;
    deny_evil(&mut s)?;
    let (web, evil) = (s.web.clone(), s.evil.clone());
    let vip = SocketAddr::V4(s.vip);
    let fetch = |s: &mut Setup, pod: &Pod| -> Result<String> {
        let out = s
            .node
            .probe_in(pod, &["fetch", &vip.to_string()], Duration::from_secs(10))?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    };
    // A second rule change, so that both intention sets hold entries (the one in force and the
    // one the next change would be written into).
    s.meshctl(&["intention", "create", "-allow", "web", "api"])?;
    wait_for(
        "web through the mesh",
        Duration::from_secs(10),
        Duration::from_millis(50),
        || Ok((fetch(&mut s, &web)? == MARKER).then_some(())),
    )?;
    let status = s.meshctl(&["status"])?;
    assert!(status.contains("kernel_intentions = in-sync"), "{status}");

    // From outside the agent, make the kernel refuse every write of either intention set: a
    // frozen map takes no update or delete from a syscall (EPERM), while programs still read it.
    let maps = mesh_dataplane::bpf::instance_dir(&s.node.instance()).join("maps");
    for name in [mesh_common::MAP_INTENTIONS_0, mesh_common::MAP_INTENTIONS_1] {
        let path = maps.join(name);
        mesh_kit::run(
            "bpftool",
            &["map", "freeze", "pinned", &path.to_string_lossy()],
        )
        .context("freezing an intention map (bpftool is installed by `cargo xtask setup`)")?;
    }

    // A new deny through the API: the proxies take it, the kernel cannot.
    s.meshctl(&["intention", "create", "-deny", "-replace", "web", "api"])?;
    let status = wait_for(
        "meshctl status saying the proxy decides",
        Duration::from_secs(10),
        Duration::from_millis(50),
        || {
            let st = s.meshctl(&["status"])?;
            Ok(st
                .contains("kernel_intentions = proxy-decides")
                .then_some(st))
        },
    )?;
    assert!(
        status
            .lines()
            .any(|l| l.trim().starts_with("reason = ") && l.len() > 12),
        "the status names why: {status}"
    );
    // The kernel sends everything to the proxy, without reading the frozen maps.
    assert_eq!(
        pinned_config(&s)?.intention_set,
        mesh_common::INTENTION_SET_PROXY
    );
    // web is now denied: its connection reaches its proxy (the kernel decides nothing) and the
    // proxy refuses it; no byte of api's answer comes back.
    wait_for(
        "web refused by the proxy",
        Duration::from_secs(10),
        Duration::from_millis(50),
        || Ok((fetch(&mut s, &web)? != MARKER).then_some(())),
    )?;
    for _ in 0..5 {
        assert_eq!(
            s.connect_from(&web, vip)?,
            "connected",
            "web → VIP reaches the proxy"
        );
        assert_ne!(
            fetch(&mut s, &web)?,
            MARKER,
            "web is denied by the newest rules"
        );
    }
    // evil is still denied by the newest rules; the kernel's stale copy (frozen with its deny)
    // no longer decides: its connection reaches the proxy, which refuses it.
    assert_eq!(
        s.connect_from(&evil, vip)?,
        "connected",
        "evil → VIP reaches the proxy"
    );
    assert_ne!(
        fetch(&mut s, &evil)?,
        MARKER,
        "evil is denied by the newest rules"
    );
    // And an allow the kernel never saw works: the stale deny in the frozen map is not used.
    s.meshctl(&["intention", "delete", "evil", "api"])?;
    wait_for(
        "evil allowed by the newest rules",
        Duration::from_secs(10),
        Duration::from_millis(50),
        || Ok((fetch(&mut s, &evil)? == MARKER).then_some(())),
    )?;
    assert_ne!(fetch(&mut s, &web)?, MARKER, "web is still denied");
    let status = s.meshctl(&["status"])?;
    assert!(
        status.contains("kernel_intentions = proxy-decides"),
        "still proxy-decides: {status}"
    );
    drop(meshd);
    Ok(())
}

#[test]
fn repeated_re_meshes_never_let_plaintext_reach_the_app() -> Result<()> {
    const ROUNDS: usize = 20;
    let mut s = setup()?;
    probes_see_the_unmeshed_app(&mut s)?;
    let mut meshd = Meshd::start(&s, "re-mesh")?;
    let outside = s.outside.clone();
    let targets = s.app_addrs(&outside)?;
    let list: Vec<String> = targets.iter().map(|a| a.to_string()).collect();
    let prober = Collector::start(
        &mut s,
        &outside,
        &["probe-loop", "0", "1", MARKER, &list.join(",")],
    )?;
    let original: Catalog = serde_json::from_str(&std::fs::read_to_string(&s.catalog_path)?)?;
    for round in 0..ROUNDS {
        // api changes (one app port more, then back): the agent re-meshes it.
        let mut catalog = original.clone();
        if round % 2 == 0 {
            for w in &mut catalog.workloads {
                if w.name == s.api.name {
                    w.app_ports.push(UNDECLARED);
                }
            }
        }
        std::fs::write(&s.catalog_path, serde_json::to_string_pretty(&catalog)?)?;
        meshd.reload().with_context(|| format!("re-mesh {round}"))?;
        std::thread::sleep(Duration::from_millis(30));
    }
    // A re-mesh that fails: the kernel refuses api's new outbound listener (127.0.0.1 is gone
    // from its loopback), so the new version cannot be meshed. The old steering must hold
    // (dropping everything) for as long as that lasts, not leave the app open.
    let lo = |op: &str| {
        mesh_kit::run(
            "ip",
            &[
                "-n",
                &s.api.netns_name,
                "addr",
                op,
                "127.0.0.1/8",
                "dev",
                "lo",
            ],
        )
    };
    lo("del")?;
    let failed_at = unix_ns();
    let mut changed = original.clone();
    for w in &mut changed.workloads {
        if w.name == s.api.name {
            w.app_ports.push(UNDECLARED);
        }
    }
    std::fs::write(&s.catalog_path, serde_json::to_string_pretty(&changed)?)?;
    meshd.reload().context("the failing re-mesh")?;
    std::thread::sleep(Duration::from_millis(1500));
    let status = s.meshctl(&["status"])?;
    lo("add")?;
    let recovered_at = unix_ns();
    // And the next re-mesh succeeds.
    std::fs::write(&s.catalog_path, serde_json::to_string_pretty(&original)?)?;
    meshd.reload().context("the re-mesh after the failure")?;
    let (lines, err) = prober.finish()?;
    let probes: Vec<Probe> = lines
        .iter()
        .map(|l| Probe::parse(&outside.name, l))
        .collect::<Result<_>>()
        .with_context(|| format!("prober stderr: {err}"))?;
    ensure!(
        probes.len() >= ROUNDS * targets.len(),
        "too few probes to mean anything: {}",
        probes.len()
    );
    let while_failed = probes
        .iter()
        .filter(|p| p.at_ns > failed_at && p.at_ns < recovered_at)
        .count();
    ensure!(
        while_failed >= targets.len(),
        "too few probes while the re-mesh had failed: {while_failed} (status: {status})"
    );
    let leaked: Vec<&Probe> = probes.iter().filter(|p| p.marker).collect();
    assert!(
        leaked.is_empty(),
        "{} of {} plaintext probes reached api's app during re-meshes, first: {:?}",
        leaked.len(),
        probes.len(),
        leaked.first()
    );
    // Still meshed after the last one: web reaches api through the mesh.
    let (web, vip) = (s.web.clone(), SocketAddr::V4(s.vip));
    wait_for(
        "web through the mesh after the re-meshes",
        Duration::from_secs(10),
        Duration::from_millis(50),
        || {
            let out =
                s.node
                    .probe_in(&web, &["fetch", &vip.to_string()], Duration::from_secs(10))?;
            Ok((String::from_utf8_lossy(&out.stdout).trim() == MARKER).then_some(()))
        },
    )?;
    eprintln!(
        "{} plaintext probes during {ROUNDS} re-meshes and a failed one ({while_failed} while \
         it had failed), none answered by the app",
        probes.len()
    );
    drop(meshd);
    Ok(())
}
