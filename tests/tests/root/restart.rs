//! The agent as a real process: `kill -9` it during traffic, start it again. The programs stay
//! attached throughout (nothing slips past them while the agent is down) and the new agent
//! adopts them instead of attaching again.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use mesh_core::catalog::{Catalog, Endpoint, Protocol, Service};
use mesh_kit::{bin_path, wait_limit, workload, Node, Pod};

/// `meshd run` for `node` (`--redirect <redirect>`, intentions allowed by default), with its
/// catalog and state directory, its stderr piped.
fn meshd_run(node: &Node, catalog: &Path, state: &Path, redirect: &str) -> Result<Command> {
    let mut cmd = Command::new(bin_path("meshd")?);
    cmd.args([
        "run",
        "--redirect",
        redirect,
        "--default-intention-policy",
        "allow",
    ])
    .arg("--catalog")
    .arg(catalog)
    .arg("--instance")
    .arg(node.instance())
    .arg("--state-dir")
    .arg(state)
    .arg("--mesh-cgroup")
    .arg(&node.mesh_cgroup)
    .env("NO_COLOR", "1")
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    Ok(cmd)
}

/// The catalog written to a fresh temporary directory, and a state directory beside it:
/// `(directory, catalog file, state directory)`; the files go with the directory.
fn catalog_files(catalog: &Catalog) -> Result<(tempfile::TempDir, PathBuf, PathBuf)> {
    let dir = tempfile::tempdir()?;
    let catalog_path = dir.path().join("catalog.json");
    std::fs::write(&catalog_path, serde_json::to_string_pretty(catalog)?)?;
    let state = dir.path().join("state");
    Ok((dir, catalog_path, state))
}

/// Starts `meshd run` (a child of this process, so in the node's agent cgroup) and waits until
/// it says it is ready.
fn start_meshd(node: &Node, catalog: &Path, state: &Path) -> Result<Child> {
    let mut child = meshd_run(node, catalog, state, "ebpf")?
        .spawn()
        .context("starting meshd")?;
    let stderr = child.stderr.take().context("meshd stderr")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("meshd: {line}");
            if line.contains("meshd ready") {
                let _ = tx.send(());
            }
        }
    });
    if rx.recv_timeout(Duration::from_secs(30)).is_err() {
        let _ = child.kill();
        bail!("meshd did not get ready within 30 s");
    }
    Ok(child)
}

/// A `web` pod and an `api` pod on `node`, and the catalog that meshes them: the api service
/// on the virtual IP `10.96.<subnet>.<vip_host>`, port 9091 (returned), served by the api pod's
/// app on 9091.
pub(crate) fn web_and_api(
    node: &mut Node,
    vip_host: u8,
) -> Result<(Pod, Pod, SocketAddrV4, Catalog)> {
    let web = node.add_pod("web")?;
    let api = node.add_pod("api")?;
    let vip = SocketAddrV4::new(Ipv4Addr::new(10, 96, node.subnet, vip_host), 9091);
    let catalog = Catalog {
        services: vec![
            crate::kubepods::service("api", Some(*vip.ip()), &[api.ip]),
            crate::kubepods::service("web", None, &[]),
        ],
        workloads: vec![
            workload(&web, "web", vec![], vec![]),
            workload(&api, "api", vec![9091], vec![]),
        ],
    };
    Ok((web, api, vip, catalog))
}

fn attached_link_ids() -> Vec<u32> {
    aya::programs::loaded_links()
        .filter_map(|l| l.ok())
        .map(|l| l.id())
        .collect()
}

/// What `connect` from the web app to `addr` says: "connected" or "error <errno> ...".
fn try_connect(node: &mut Node, web: &Pod, addr: SocketAddrV4) -> Result<String> {
    let out = node.probe_in(
        web,
        &["connect", &addr.to_string()],
        Duration::from_secs(10),
    )?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn fetch(node: &mut Node, web: &Pod, addr: SocketAddrV4) -> Result<String> {
    let out = node.probe_in(web, &["fetch", &addr.to_string()], Duration::from_secs(10))?;
    ensure!(
        out.status.success(),
        "fetch: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

#[test]
fn kill_9_during_traffic_keeps_programs_attached_and_restart_adopts_them() -> Result<()> {
    let mut node = Node::new()?;
    let (web, api, vip, catalog) = web_and_api(&mut node, 30)?;
    let (_dir, catalog_path, state) = catalog_files(&catalog)?;
    let app = node.probe(
        &api.netns_path,
        &api.cgroup,
        &["serve", "0.0.0.0:9091", "api says hello"],
    )?;
    node.keep(app);

    let mut meshd = start_meshd(&node, &catalog_path, &state)?;
    assert_eq!(
        fetch(&mut node, &web, vip)?,
        "api says hello",
        "through the mesh"
    );
    let before: BTreeMap<String, u32> = mesh_dataplane::bpf::pinned_link_ids(&node.instance())?;
    assert_eq!(
        before.len(),
        8,
        "sockops, getsockopt and three per pod (connect4, connect6, sk_lookup): {before:?}"
    );

    // Traffic while the agent dies.
    let traffic = {
        let mut clients = Vec::new();
        for _ in 0..4 {
            clients.push(node.probe(
                &web.netns_path,
                &web.cgroup,
                &["dial-many", &vip.to_string(), "200"],
            )?);
        }
        clients
    };
    std::thread::sleep(Duration::from_millis(50));
    meshd.kill()?; // SIGKILL
    meshd.wait()?;
    let killed_at = Instant::now();
    for c in traffic {
        // Each client either finished or failed when the proxy vanished; none may hang.
        wait_limit(c, Duration::from_secs(30))?;
    }

    // Nothing was detached: every pinned link is still attached.
    let live = attached_link_ids();
    for (name, id) in &before {
        assert!(
            live.contains(id),
            "{name} (link {id}) detached when the agent died"
        );
    }
    // And the programs still steer: a connection to the service is redirected to the (now
    // absent) outbound listener and refused, never sent to the service unproxied.
    let down = try_connect(&mut node, &web, vip)?;
    assert!(
        down.starts_with(&format!("error {} ", libc::ECONNREFUSED)),
        "with the agent down: {down}"
    );
    eprintln!("agent down for {:?} so far", killed_at.elapsed());

    let mut meshd = start_meshd(&node, &catalog_path, &state)?;
    let after = mesh_dataplane::bpf::pinned_link_ids(&node.instance())?;
    assert_eq!(
        after, before,
        "the restarted agent adopted the attachments instead of adding new ones"
    );
    assert_eq!(
        fetch(&mut node, &web, vip)?,
        "api says hello",
        "traffic flows again"
    );
    meshd.kill()?;
    meshd.wait()?;
    Ok(())
}

#[test]
fn a_connection_that_reached_the_app_while_no_agent_ran_is_closed_when_it_starts() -> Result<()> {
    use std::io::{Read, Write};
    let mut node = Node::new()?;
    let client = node.add_pod("client")?;
    let api = node.add_pod("api")?;
    let catalog = Catalog {
        services: vec![Service {
            name: "api".into(),
            namespace: "default".into(),
            datacenter: "dc1".into(),
            vip: None,
            ports: vec![9000],
            protocol: Protocol::Tcp,
            target_ports: Default::default(),
            endpoints: vec![Endpoint {
                ip: api.ip,
                port: mesh_common::INBOUND_PORT,
            }],
            ..Default::default()
        }],
        workloads: vec![workload(&api, "api", vec![9000], vec![])],
    };
    let (_dir, catalog_path, state) = catalog_files(&catalog)?;

    // No agent yet: the app accepts plaintext from another pod directly.
    let app = api
        .netns()
        .listen(std::net::SocketAddr::from((Ipv4Addr::UNSPECIFIED, 9000)))?;
    app.set_nonblocking(false)?;
    let mut outside = client
        .netns()
        .connect(std::net::SocketAddr::from((api.ip, 9000)))?;
    let (mut accepted, peer) = app.accept()?;
    outside.write_all(b"before")?;
    let mut buf = [0u8; 6];
    accepted.read_exact(&mut buf)?;
    ensure!(&buf == b"before", "the app got {buf:?}");

    let mut meshd = start_meshd(&node, &catalog_path, &state)?;
    // The agent found the connection and closed it: both ends see it gone.
    accepted.set_read_timeout(Some(Duration::from_secs(5)))?;
    let r = accepted.read(&mut buf);
    assert!(
        matches!(&r, Err(e) if e.raw_os_error() == Some(libc::ECONNABORTED)),
        "the app's side of {peer} after the agent started: {r:?}"
    );
    outside.set_read_timeout(Some(Duration::from_secs(5)))?;
    let r = outside.read(&mut buf);
    assert!(
        matches!(&r, Ok(0)) || matches!(&r, Err(e) if e.raw_os_error() == Some(libc::ECONNRESET)),
        "the outside end after the agent started: {r:?}"
    );
    meshd.kill()?;
    meshd.wait()?;
    Ok(())
}

/// A spliced connection whose agent is SIGKILLed carries nothing more: the killed agent's
/// sockets close with it, each app receives its end of stream, and sk_msg splices no byte in
/// behind it (before, the server app read its EOF and then the 5000 bytes the client sent after
/// the kill, found in review). The client's late bytes meet the dead proxy's socket instead.
#[test]
fn a_spliced_connection_carries_nothing_after_its_agent_is_killed() -> Result<()> {
    let mut node = Node::new()?;
    let (web, api, vip, catalog) = web_and_api(&mut node, 30)?;
    let (dir, catalog_path, state) = catalog_files(&catalog)?;
    let mut server = node.probe(
        &api.netns_path,
        &api.cgroup,
        &["eof-server", "0.0.0.0:9091", "3000"],
    )?;
    let served = crate::kubernetes::probe_lines(&mut server)?;
    node.keep(server);
    ensure!(
        matches!(served.recv_timeout(Duration::from_secs(10)), Ok((_, l)) if l == "listening"),
        "the api app did not start"
    );
    let mut meshd = start_meshd(&node, &catalog_path, &state)?;
    let go = dir.path().join("go");
    let mut client = node.probe(
        &web.netns_path,
        &web.cgroup,
        &["send-after-go", &vip.to_string(), &go.to_string_lossy()],
    )?;
    let said = crate::kubernetes::probe_lines(&mut client)?;
    node.keep(client);
    let first = said.recv_timeout(Duration::from_secs(20)).map(|(_, l)| l);
    ensure!(
        matches!(&first, Ok(l) if l == "sent 1000"),
        "the client did not send: {first:?}"
    );
    std::thread::sleep(Duration::from_millis(300));
    meshd.kill()?; // SIGKILL
    meshd.wait()?;
    // Both apps have their end of stream by now (the kernel closed the agent's sockets).
    std::thread::sleep(Duration::from_millis(300));
    std::fs::write(&go, "")?;
    let after = said.recv_timeout(Duration::from_secs(20)).map(|(_, l)| l);
    let server_saw = served.recv_timeout(Duration::from_secs(20)).map(|(_, l)| l);
    eprintln!("client: {after:?}; server: {server_saw:?}");
    assert_eq!(
        server_saw.ok().as_deref(),
        Some("served received=1000 after_eof=0"),
        "the server app read what came before its end of stream, and nothing after it"
    );
    // The kernel counted what it refused to splice (the counters stay pinned with no agent).
    let pin = mesh_dataplane::bpf::instance_dir(&node.instance())
        .join("maps")
        .join(mesh_common::MAP_COUNTERS);
    let counters: aya::maps::PerCpuArray<_, u64> = aya::maps::PerCpuArray::try_from(
        aya::maps::Map::PerCpuArray(aya::maps::MapData::from_pin(&pin)?),
    )?;
    let refused: u64 = counters
        .get(&(mesh_common::Counter::SpliceAfterEof as u32), 0)?
        .iter()
        .sum();
    assert!(refused > 0, "splice_after_eof counted the refused messages");
    Ok(())
}

/// An agent that finds the node's maps pinned by a build with another layout, put in place
/// while no agent ran, does not start, in the default `--redirect auto` too: it names the pin
/// and the command that removes the pins, and does not fall back to iptables beside the pinned
/// programs, which stay attached as they were. Two maps of another layout, one at a time: the
/// counters array of the builds before the counters had room to grow (a map the kernel object
/// defines), and an intention set with a larger value (a map user space makes).
#[test]
fn an_agent_refuses_maps_pinned_with_another_layout_even_in_auto_mode() -> Result<()> {
    use mesh_common::{
        IntentionKey, IntentionValue, MAP_COUNTERS, MAP_INTENTIONS_0, MAX_INTENTIONS,
    };
    use mesh_kit::stand_in::{older_counters_map, swap_pin};
    use std::os::fd::AsFd;
    /// `BPF_MAP_TYPE_HASH` (`enum bpf_map_type`).
    const BPF_MAP_TYPE_HASH: u32 = 1;
    let mut node = Node::new()?;
    let (_web, _api, _vip, catalog) = web_and_api(&mut node, 32)?;
    let (_dir, catalog_path, state) = catalog_files(&catalog)?;
    let mut meshd = start_meshd(&node, &catalog_path, &state)?;
    meshd.kill()?;
    meshd.wait()?;
    let links = mesh_dataplane::bpf::pinned_link_ids(&node.instance())?;
    let maps = mesh_dataplane::bpf::instance_dir(&node.instance()).join("maps");

    let larger_set = mesh_dataplane::sys::create_map(
        MAP_INTENTIONS_0,
        BPF_MAP_TYPE_HASH,
        std::mem::size_of::<IntentionKey>() as u32,
        std::mem::size_of::<IntentionValue>() as u32 + 4,
        MAX_INTENTIONS,
        0,
        None,
    )?;
    for (name, other) in [
        (MAP_COUNTERS, older_counters_map()?),
        (MAP_INTENTIONS_0, larger_set),
    ] {
        let pin = maps.join(name);
        let current = swap_pin(&pin, other.as_fd())?;

        let mut child = meshd_run(&node, &catalog_path, &state, "auto")?.spawn()?;
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(status) = child.try_wait()? {
                break status;
            }
            if Instant::now() > deadline {
                child.kill()?;
                bail!("meshd ran on a {name} of another layout");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let mut stderr = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().context("stderr")?, &mut stderr)?;
        assert!(
            !status.success()
                && stderr.contains(&format!("maps/{name}"))
                && stderr.contains(&format!("meshd uninstall --instance {}", node.instance()))
                && !stderr.contains("using iptables"),
            "meshd ({status}) did not refuse the pinned {name}: {stderr}"
        );
        assert_eq!(
            mesh_dataplane::bpf::pinned_link_ids(&node.instance())?,
            links,
            "the pinned programs stay attached"
        );
        swap_pin(&pin, current.as_fd())?;
    }
    // With the maps as they were, the agent starts again.
    let mut meshd = start_meshd(&node, &catalog_path, &state)?;
    meshd.kill()?;
    meshd.wait()?;
    Ok(())
}

/// [`web_and_api`] with the api app serving `api says hello` on 9091, and an `outsider` pod the
/// catalog does not know: `(api, outsider, catalog, the app's address)`.
fn serving_api_and_outsider(
    node: &mut Node,
    vip_host: u8,
) -> Result<(Pod, Pod, Catalog, std::net::SocketAddr)> {
    let (_web, api, _vip, catalog) = web_and_api(node, vip_host)?;
    let outsider = node.add_pod("outsider")?;
    let app = node.probe(
        &api.netns_path,
        &api.cgroup,
        &["serve", "0.0.0.0:9091", "api says hello"],
    )?;
    node.keep(app);
    let target = std::net::SocketAddr::from((api.ip, 9091));
    Ok((api, outsider, catalog, target))
}

/// Plaintext from `outsider` to the app at `target` (a meshed pod's address) gets nothing of the
/// app: refused, dropped, or the inbound listener's TLS-only answer, never the app's `hello`.
fn assert_no_plaintext(outsider: &Pod, target: std::net::SocketAddr, when: &str) -> Result<()> {
    let got = mesh_kit::reach(outsider, target)?;
    assert!(
        !matches!(&got, Ok(text) if text.contains("hello")),
        "{when}: plaintext from another pod reached the app: {got:?}"
    );
    Ok(())
}

/// A pod whose start fails after a restart keeps the steering the earlier agent left it: with
/// no listener behind it, it drops every connection. Here the pod's own process took the
/// outbound proxy port (`127.0.0.1:15001`) while no agent ran, so the agent cannot listen
/// there; plaintext from another pod's namespace still never reaches the app.
#[test]
fn a_pod_whose_start_fails_after_a_restart_stays_steered() -> Result<()> {
    let mut node = Node::new()?;
    let (api, outsider, catalog, target) = serving_api_and_outsider(&mut node, 35)?;
    let (_dir, catalog_path, state) = catalog_files(&catalog)?;
    let mut meshd = start_meshd(&node, &catalog_path, &state)?;
    assert_no_plaintext(&outsider, target, "meshed")?;
    meshd.kill()?;
    meshd.wait()?;
    let links = mesh_dataplane::bpf::pinned_link_ids(&node.instance())?;

    let squat = node.probe(
        &api.netns_path,
        &api.cgroup,
        &["serve", "127.0.0.1:15001", "squat"],
    )?;
    node.keep(squat);
    std::thread::sleep(Duration::from_millis(300));
    let mut meshd = start_meshd(&node, &catalog_path, &state)?;
    let now = mesh_dataplane::bpf::pinned_link_ids(&node.instance());
    let plaintext = assert_no_plaintext(&outsider, target, "after a start that failed");
    meshd.kill()?;
    meshd.wait()?;
    plaintext?;
    assert_eq!(now?, links, "the pod's links stay pinned");
    Ok(())
}

/// An upgraded agent whose first start cannot get its pods' certificates (its CA does not
/// answer) still brings their links to its own programs: each pod's links are updated first
/// thing in that pod's start, before its certificate is asked for. Here the other build's
/// connect4 lets everything through; the pod is then left unmeshed, on this build's code.
#[test]
fn an_upgraded_agent_whose_ca_does_not_answer_still_runs_its_own_programs() -> Result<()> {
    use mesh_common::PROG_CONNECT4;
    use std::os::fd::AsFd;
    /// `BPF_PROG_TYPE_CGROUP_SOCK_ADDR` (`enum bpf_prog_type`).
    const CGROUP_SOCK_ADDR: u32 = 18;
    let mut node = Node::new()?;
    let (_api, outsider, catalog, target) = serving_api_and_outsider(&mut node, 34)?;
    let (dir, catalog_path, state) = catalog_files(&catalog)?;
    let mut meshd = start_meshd(&node, &catalog_path, &state)?;
    meshd.kill()?;
    meshd.wait()?;

    // The web pod's connect4 link, and the program this build runs on it.
    let pin = mesh_dataplane::bpf::pinned_link_ids(&node.instance())?
        .into_keys()
        .find(|p| p.contains("web") && p.ends_with("/connect4"))
        .context("web's connect4 pin")?;
    let pin = mesh_dataplane::bpf::instance_dir(&node.instance()).join(pin);
    let program = || -> Result<mesh_dataplane::sys::ProgInfo> {
        let link = mesh_dataplane::sys::obj_get(&pin)?;
        let info = mesh_dataplane::sys::link_info(link.as_fd())?;
        Ok(mesh_dataplane::sys::prog_info(info.prog_id)?)
    };
    let this_build = program()?;
    let stand_in = mesh_kit::stand_in::return_program(
        CGROUP_SOCK_ADDR,
        mesh_dataplane::sys::BPF_CGROUP_INET4_CONNECT,
        PROG_CONNECT4,
        1,
    )?;
    let link = mesh_dataplane::sys::obj_get(&pin)?;
    mesh_dataplane::sys::link_update(link.as_fd(), stand_in.as_fd())?;
    ensure!(
        program()?.tag != this_build.tag,
        "the link runs the stand-in"
    );

    // The agent starts with a CA on a loopback port nothing listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let token = dir.path().join("token");
    std::fs::write(&token, "node-1-agent")?;
    let root = dir.path().join("root-cert.pem");
    let ca = mesh_core::identity::CertificateAuthority::ephemeral(crate::ca::TD)?;
    std::fs::write(&root, ca.root().pem())?;
    let mut child = meshd_run(&node, &catalog_path, &state, "ebpf")?
        .args(["--ca-url", &format!("https://{closed}")])
        .arg("--ca-token-file")
        .arg(&token)
        .arg("--ca-root-file")
        .arg(&root)
        .spawn()?;
    let stderr = child.stderr.take().context("meshd stderr")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("meshd: {line}");
            let _ = tx.send(line);
        }
    });
    // Until the agent has finished its start (its clean-up of what earlier agents left
    // included), with the web pod's failure on the way.
    let refused = (|| -> Result<String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut refused = None;
        while Instant::now() < deadline {
            if let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) {
                if line.contains("pod not meshed") && line.contains("web") {
                    refused = Some(line);
                } else if line.contains("meshd ready") {
                    return refused.context("ready, and the web pod's start did not fail");
                }
            }
        }
        bail!("meshd did not get ready within 30 s")
    })();
    let now = program();
    // Both pods' starts failed; their steering stays, so plaintext gets nothing of the app.
    let links = mesh_dataplane::bpf::pinned_link_ids(&node.instance());
    let plaintext = assert_no_plaintext(&outsider, target, "after the CA failed");
    child.kill()?;
    child.wait()?;
    let refused = refused?;
    let now = now?;
    plaintext?;
    assert_eq!(
        links?.len(),
        8,
        "sockops, getsockopt and three per pod stay pinned"
    );
    assert_eq!(
        (now.tag, now.map_names),
        (this_build.tag, this_build.map_names),
        "web's connect4 runs this build's program although its start failed: {refused}"
    );
    Ok(())
}
