//! Two nodes on one machine (`mesh_kit::cluster`): pods on either node reach each other across
//! the link between the nodes; with an agent per node, app connections between the nodes are
//! streams of one pooled mTLS connection.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use mesh_core::catalog::{Catalog, Endpoint, Protocol, Service};
use mesh_kit::cluster::Cluster;
use mesh_kit::{bin_path, reach, spawn_probe, v4, workload, Pod};

#[test]
fn cluster_pods_reach_each_other_across_the_node_link_and_everything_goes_with_it() -> Result<()> {
    let (names, cgroups) = {
        let mut cluster = Cluster::new()?;
        let a = cluster.add_pod(1, "a")?;
        let b = cluster.add_pod(2, "b")?;
        let a2 = cluster.add_pod(1, "a2")?;
        ensure!(a.ip.to_string() == "10.91.1.2" && a2.ip.to_string() == "10.91.1.3");
        ensure!(b.ip.to_string() == "10.91.2.2");
        for (pod, reply) in [(&b, "from-b"), (&a2, "from-a2")] {
            let mut server = spawn_probe(
                &pod.netns_path,
                &pod.cgroup,
                &["--blocking", "serve", &format!("{}:8080", pod.ip), reply],
            )?;
            let mut line = String::new();
            std::io::BufRead::read_line(
                &mut std::io::BufReader::new(server.stdout.take().unwrap()),
                &mut line,
            )?;
            ensure!(line.trim() == "listening", "server said {line:?}");
            cluster.keep(server);
        }
        // Across the link, and on the same bridge.
        ensure!(reach(&a, v4(b.ip, 8080))?.map_err(|e| anyhow::anyhow!("{e}"))? == "from-b");
        ensure!(reach(&a, v4(a2.ip, 8080))?.map_err(|e| anyhow::anyhow!("{e}"))? == "from-a2");
        // The nodes' gateways answer from the pods' side.
        let gw = cluster.node(2).gateway();
        let refused = reach(&a, v4(gw, 9))?;
        ensure!(
            refused
                .as_ref()
                .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused),
            "node 2's gateway should refuse port 9, got {refused:?}"
        );
        let names: Vec<_> = cluster
            .nodes
            .iter()
            .flat_map(|n| {
                std::iter::once(n.netns_name.clone())
                    .chain(n.pods.iter().map(|p| p.netns_name.clone()))
            })
            .collect();
        let cgroups: Vec<_> = cluster
            .nodes
            .iter()
            .map(|n| n.mesh_cgroup.clone())
            .collect();
        (names, cgroups)
    };
    std::thread::sleep(Duration::from_millis(100));
    for name in names {
        ensure!(
            !std::path::Path::new("/run/netns").join(&name).exists(),
            "{name} is left"
        );
    }
    for cg in cgroups {
        ensure!(!cg.exists(), "{} is left", cg.display());
    }
    Ok(())
}

/// One `meshd run` per node of a [`Cluster`], with catalogs listing the other node's
/// endpoints; both agents trust one CA (node 2's state directory links node 1's CA). A state
/// directory that holds a CA but no API state is one the agent only starts on with the default
/// policy deny, so node 2's agent runs with deny and an intention allows `web → api`, as a
/// Consul datacenter with ACLs in default-deny does.
struct TwoAgents {
    dir: tempfile::TempDir,
}

impl TwoAgents {
    fn state(&self, k: u8) -> std::path::PathBuf {
        self.dir.path().join(format!("state{k}"))
    }

    fn http_addr(&self, k: u8) -> String {
        format!(
            "unix://{}",
            self.dir.path().join(format!("api{k}.sock")).display()
        )
    }

    /// `meshctl` against node `k`'s agent with its bootstrap token.
    fn meshctl(&self, k: u8, args: &[&str]) -> Result<String> {
        let token = std::fs::read_to_string(self.state(k).join("acl-bootstrap-token"))?;
        let out = Command::new(bin_path("meshctl")?)
            .args(args)
            .env("MESH_HTTP_ADDR", self.http_addr(k))
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

    /// Starts node `k`'s agent on `catalog` (kept by the cluster) and waits until it is ready.
    fn start(&self, cluster: &mut Cluster, k: u8, catalog: &Catalog) -> Result<()> {
        let path = self.dir.path().join(format!("catalog{k}.json"));
        std::fs::write(&path, serde_json::to_string_pretty(catalog)?)?;
        let state = self.state(k);
        if k == 2 {
            // One CA for both nodes: node 1's, created when its agent started.
            std::fs::create_dir_all(&state)?;
            let ca = self.state(1).join("ca");
            ensure!(ca.is_dir(), "node 1's agent made no CA at {}", ca.display());
            std::os::unix::fs::symlink(&ca, state.join("ca"))?;
        }
        let node = cluster.node(k);
        let mut child = node
            .agent_command(&bin_path("meshd")?)
            .args(["run", "--redirect", "ebpf", "--default-intention-policy"])
            .arg(if k == 1 { "allow" } else { "deny" })
            .arg("--catalog")
            .arg(&path)
            .arg("--instance")
            .arg(node.instance())
            .arg("--state-dir")
            .arg(&state)
            .arg("--mesh-cgroup")
            .arg(&node.mesh_cgroup)
            .args(["--metrics-addr", "off"])
            .env("NO_COLOR", "1")
            .env("MESH_HTTP_ADDR", self.http_addr(k))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting meshd")?;
        let stderr = child.stderr.take().context("meshd stderr")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("meshd ready") {
                    let _ = tx.send(());
                }
                // Everything but the routine lines; an exit's reason has no level.
                if !line.contains(" INFO ") && !line.contains(" DEBUG ")
                    || line.contains("ready")
                    || line.contains("pool")
                    || line.contains("connection")
                {
                    eprintln!("meshd[node {k}]: {line}");
                }
            }
        });
        cluster.keep(child);
        rx.recv_timeout(Duration::from_secs(30))
            .with_context(|| format!("node {k}'s meshd did not get ready within 30 s"))?;
        if k == 2 {
            self.meshctl(2, &["intention", "create", "-allow", "web", "api"])?;
        }
        Ok(())
    }
}

/// Service `name` with app port `port` served by `pods` (their inbound listeners).
fn service(name: &str, port: u16, pods: &[&Pod]) -> Service {
    Service {
        name: name.into(),
        namespace: "default".into(),
        datacenter: "dc1".into(),
        ports: vec![port],
        protocol: Protocol::Tcp,
        endpoints: pods
            .iter()
            .map(|p| Endpoint {
                ip: p.ip,
                port: mesh_common::INBOUND_PORT,
            })
            .collect(),
        ..Default::default()
    }
}

/// Established TCP connections in `pod`'s network namespace with `filter` (`ss` syntax).
fn established(pod: &Pod, filter: &str) -> Result<usize> {
    let out = mesh_kit::run(
        "ip",
        &[
            "netns",
            "exec",
            &pod.netns_name,
            "ss",
            "-Htn",
            "state",
            "established",
            filter,
        ],
    )?;
    Ok(out.lines().filter(|l| !l.trim().is_empty()).count())
}

/// Reads one line from a probe's stdout, within `limit`; the rest of its output is read and
/// dropped, so the probe never writes into a closed pipe.
fn line_within(child: &mut std::process::Child, limit: Duration) -> Result<String> {
    let stdout = child.stdout.take().context("probe stdout")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines().map_while(Result::ok);
        let _ = tx.send(lines.next().unwrap_or_default());
        lines.for_each(drop);
    });
    rx.recv_timeout(limit)
        .map(|l| l.trim().to_string())
        .with_context(|| format!("no line within {limit:?}"))
}

const API_PORT: u16 = 8080;
const SINK_PORT: u16 = 8081;

#[test]
fn two_agents_carry_cross_node_connections_as_streams_of_one_pooled_mtls_connection() -> Result<()>
{
    let mut cluster = Cluster::new()?;
    let web = cluster.add_pod(1, "web")?;
    let api = cluster.add_pod(2, "api")?;
    let agents = TwoAgents {
        dir: tempfile::tempdir()?,
    };
    let api_service = {
        let mut s = service("api", API_PORT, &[&api]);
        s.ports.push(SINK_PORT);
        s
    };
    let web_service = service("web", 9000, &[&web]);
    let node1 = Catalog {
        services: vec![api_service.clone(), web_service.clone()],
        workloads: vec![workload(&web, "web", vec![], vec![])],
    };
    let node2 = Catalog {
        services: vec![api_service, web_service],
        workloads: vec![workload(&api, "api", vec![API_PORT, SINK_PORT], vec![])],
    };
    // api's apps: one sends 64 MiB to every connection (whatever it receives); a sink that
    // reads until the connection ends and sends nothing.
    const BULK: u64 = 64 << 20;
    for (port, args) in [
        (
            API_PORT,
            vec![
                "exchange-server".to_string(),
                format!("0.0.0.0:{API_PORT}"),
                BULK.to_string(),
                "11".into(),
            ],
        ),
        (
            SINK_PORT,
            vec![
                "exchange-server".to_string(),
                format!("0.0.0.0:{SINK_PORT}"),
                "0".into(),
                "21".into(),
            ],
        ),
    ] {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut server = spawn_probe(
            &api.netns_path,
            &api.cgroup,
            &["--blocking"]
                .iter()
                .copied()
                .chain(args)
                .collect::<Vec<_>>(),
        )?;
        let said = line_within(&mut server, Duration::from_secs(5))?;
        ensure!(said == "listening", "api app on {port} said {said:?}");
        // Its per-connection lines are not read: the pipe holds them.
        cluster.keep(server);
    }
    agents.start(&mut cluster, 1, &node1)?;
    agents.start(&mut cluster, 2, &node2)?;

    // A small request first, so that a connection that never gets through and one that
    // stalls under bulk fail apart.
    let out = mesh_kit::wait_limit(
        spawn_probe(
            &web.netns_path,
            &web.cgroup,
            &[
                "--blocking",
                "exchange",
                &v4(api.ip, SINK_PORT).to_string(),
                "1000",
                "21",
            ],
        )?,
        Duration::from_secs(10),
    )?;
    let said = String::from_utf8_lossy(&out.stdout).trim().to_string();
    ensure!(
        said == "sent=1000 received=0 ok=true",
        "the first small exchange said {said:?}, stderr {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Bulk both ways, byte-exact, across the nodes.
    let out = mesh_kit::wait_limit(
        spawn_probe(
            &web.netns_path,
            &web.cgroup,
            &[
                "--blocking",
                "exchange",
                &v4(api.ip, API_PORT).to_string(),
                &BULK.to_string(),
                "11",
            ],
        )?,
        Duration::from_secs(60),
    )?;
    let said = String::from_utf8_lossy(&out.stdout).trim().to_string();
    ensure!(
        said == format!("sent={BULK} received={BULK} ok=true"),
        "exchange said {said:?}, stderr {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Many app connections, some at once: one TLS connection between the nodes carries them.
    // The short ones go to the sink, which answers nothing: the app on API_PORT sends 64 MiB
    // to every connection, which would make the 50 short connections 3.2 GiB of transfer
    // competing with the 8 pushes.
    let mut held = Vec::new();
    for _ in 0..8 {
        let mut push = spawn_probe(
            &web.netns_path,
            &web.cgroup,
            &[
                "--blocking",
                "push",
                &v4(api.ip, SINK_PORT).to_string(),
                &(1u64 << 40).to_string(),
            ],
        )?;
        let _ = push.stdout.take();
        held.push(push);
    }
    let dial = mesh_kit::wait_limit(
        spawn_probe(
            &web.netns_path,
            &web.cgroup,
            &[
                "--blocking",
                "dial-many",
                &v4(api.ip, SINK_PORT).to_string(),
                "50",
            ],
        )?,
        Duration::from_secs(60),
    )?;
    ensure!(
        dial.status.success(),
        "dial-many: {}",
        String::from_utf8_lossy(&dial.stderr)
    );
    let from_web = established(&web, "( dport = :20000 )")?;
    let at_api = established(&api, "( sport = :20000 )")?;
    ensure!(
        from_web == 1 && at_api == 1,
        "{from_web} TLS connection(s) from web's pod and {at_api} at api's pod, want 1 each, \
         for 59 app connections (8 open now)"
    );
    for mut p in held {
        let _ = p.kill();
        let _ = p.wait();
    }

    // A deny on node 2 resets node 1's stream within a second; the pooled connection stays.
    let mut push = spawn_probe(
        &web.netns_path,
        &web.cgroup,
        &[
            "--blocking",
            "push",
            &v4(api.ip, SINK_PORT).to_string(),
            &(1u64 << 40).to_string(),
        ],
    )?;
    std::thread::sleep(Duration::from_millis(500));
    ensure!(push.try_wait()?.is_none(), "the push ended before the deny");
    agents.meshctl(
        2,
        &["intention", "create", "-deny", "-replace", "web", "api"],
    )?;
    let denied_at = Instant::now();
    let said = line_within(&mut push, Duration::from_secs(3))?;
    let took = denied_at.elapsed();
    ensure!(
        said.starts_with("error"),
        "web's push said {said:?} after the deny"
    );
    ensure!(
        took < Duration::from_millis(1500),
        "web's app saw its connection closed after {took:?}"
    );
    let _ = push.wait();
    ensure!(
        established(&web, "( dport = :20000 )")? == 1,
        "the deny closed the pooled connection, not just the stream"
    );
    // New connections are refused now, and allowed again once the intention allows again.
    let small = |_: ()| -> Result<String> {
        let out = mesh_kit::wait_limit(
            spawn_probe(
                &web.netns_path,
                &web.cgroup,
                &[
                    "--blocking",
                    "exchange",
                    &v4(api.ip, SINK_PORT).to_string(),
                    "1000",
                    "21",
                ],
            )?,
            Duration::from_secs(10),
        )?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    };
    let said = small(())?;
    ensure!(said.is_empty(), "a denied connection got through: {said:?}");
    agents.meshctl(
        2,
        &["intention", "create", "-allow", "-replace", "web", "api"],
    )?;
    let said = small(())?;
    ensure!(
        said == "sent=1000 received=0 ok=true",
        "after the allow came back: {said:?}"
    );
    let out = mesh_kit::wait_limit(
        spawn_probe(
            &web.netns_path,
            &web.cgroup,
            &[
                "--blocking",
                "exchange",
                &v4(api.ip, API_PORT).to_string(),
                &BULK.to_string(),
                "11",
            ],
        )?,
        Duration::from_secs(60),
    )?;
    let said = String::from_utf8_lossy(&out.stdout).trim().to_string();
    ensure!(
        said == format!("sent={BULK} received={BULK} ok=true"),
        "after the allow came back: {said:?}"
    );
    ensure!(established(&web, "( dport = :20000 )")? == 1);
    Ok(())
}
