//! Finding Kubernetes pods on a node: cgroups laid out exactly as the kubelet (systemd and
//! cgroupfs drivers, every QoS class) with containerd's or CRI-O's container cgroups under each
//! pod, a pause process and an app process per pod (CRI-O's conmon beside them, in the host's
//! network namespace). The locator must find each pod's cgroup and the namespace holding its
//! IP, refuse what is ambiguous, and `meshd run` must mesh the located pods, pods that were
//! running before it started.

use std::io::{BufRead, BufReader};
use std::net::{IpAddr, Ipv4Addr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use mesh_core::catalog::{Catalog, Endpoint, Protocol, Service, Workload};
use mesh_dataplane::cgroup;
use mesh_dataplane::kubepods::{
    netns_id, pod_cgroup_path, CgroupDriver, Error as LocateError, Locator, QosClass,
};
use mesh_kit::{bin_path, reach, spawn_probe, wait_limit, Node, Pod};

/// The container runtime whose container cgroups sit under the pod cgroup.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Runtime {
    /// containerd's CRI plugin: `cri-containerd-<id>.scope` (systemd driver) or `<id>`
    /// (cgroupfs driver).
    Containerd,
    /// CRI-O (systemd driver): `crio-<id>.scope`, and `crio-conmon-<id>.scope` for the
    /// container's monitor, which stays in the host's network namespace.
    Crio,
}

/// Where a pod's cgroups go: the kubelet's driver, the pod's QoS class, the runtime.
#[derive(Clone, Copy, Debug)]
pub struct Layout {
    /// The kubelet's cgroup driver.
    pub driver: CgroupDriver,
    /// The pod's QoS class.
    pub qos: QosClass,
    /// The container runtime.
    pub runtime: Runtime,
}

/// A pod laid out as the kubelet and its runtime do.
pub struct KubePod {
    /// `metadata.uid`.
    pub uid: String,
    /// The kubelet's driver and the pod's QoS class.
    pub driver: CgroupDriver,
    /// The pod's QoS class.
    pub qos: QosClass,
    /// The pod cgroup.
    pub cgroup: PathBuf,
    /// The app container's cgroup.
    pub app_cgroup: PathBuf,
    /// The network side (namespace, IP on the node bridge) from the fixture node.
    pub net: Pod,
}

/// A Kubernetes-style UID for test pod `n`.
fn uid(n: u32) -> String {
    format!("{:08x}-7e57-4c0d-8a11-{:012x}", 0x6b75_6265u32 + n, n)
}

/// A 64-hex container id.
fn container_id(seed: u32) -> String {
    format!("{seed:08x}").repeat(8)
}

fn container_cgroup(pod: &Path, driver: CgroupDriver, runtime: Runtime, id: &str) -> PathBuf {
    match (runtime, driver) {
        (Runtime::Containerd, CgroupDriver::Systemd) => {
            pod.join(format!("cri-containerd-{id}.scope"))
        }
        (Runtime::Containerd, CgroupDriver::Cgroupfs) => pod.join(id),
        (Runtime::Crio, CgroupDriver::Systemd) => pod.join(format!("crio-{id}.scope")),
        (Runtime::Crio, CgroupDriver::Cgroupfs) => pod.join(format!("crio-{id}")),
    }
}

/// Waits for a probe's first stdout line (its "listening" or "paused").
fn started(mut child: Child, node: &mut Node) -> Result<()> {
    let stdout = child.stdout.take().context("probe stdout")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    node.keep(child);
    let line = rx
        .recv_timeout(Duration::from_secs(10))
        .context("a pod process did not start")?;
    ensure!(!line.is_empty(), "a pod process exited at start");
    Ok(())
}

/// A CRI-O conmon: a process in the container's `crio-conmon-<id>.scope`, in the host's
/// network namespace (where the test process is).
fn conmon(node: &mut Node, pod_cgroup: &Path, id: &str) -> Result<()> {
    let scope = pod_cgroup.join(format!("crio-conmon-{id}.scope"));
    cgroup::create(&scope)?;
    let child = Command::new("sleep")
        .arg("3600")
        .stdin(Stdio::null())
        .spawn()
        .context("spawning sleep")?;
    cgroup::add_process(&scope, child.id())?;
    node.keep(child);
    Ok(())
}

/// Lays out pod `n` (`name`) under the kubelet cgroup root `root`: the pod cgroup, a sandbox
/// container with a pause process, an app container running `app` (mesh-probe's arguments),
/// both in the pod's network namespace (a fixture pod on the node bridge).
pub fn lay_out(
    node: &mut Node,
    root: &Path,
    n: u32,
    name: &str,
    layout: Layout,
    app: &[&str],
) -> Result<KubePod> {
    let Layout {
        driver,
        qos,
        runtime,
    } = layout;
    let uid = uid(n);
    let net = node.add_pod(name)?;
    let pod_cg = root.join(pod_cgroup_path(driver, qos, &uid));
    cgroup::create(&pod_cg)?;
    let sandbox = container_id(n * 2 + 1);
    let app_id = container_id(n * 2 + 2);
    let sandbox_cg = container_cgroup(&pod_cg, driver, runtime, &sandbox);
    let app_cg = container_cgroup(&pod_cg, driver, runtime, &app_id);
    cgroup::create(&sandbox_cg)?;
    cgroup::create(&app_cg)?;
    if runtime == Runtime::Crio {
        conmon(node, &pod_cg, &sandbox)?;
    }
    let pause = spawn_probe(&net.netns_path, &sandbox_cg, &["pause"])?;
    started(pause, node)?;
    if runtime == Runtime::Crio {
        conmon(node, &pod_cg, &app_id)?;
    }
    let app = spawn_probe(&net.netns_path, &app_cg, app)?;
    started(app, node)?;
    Ok(KubePod {
        uid,
        driver,
        qos,
        cgroup: pod_cg,
        app_cgroup: app_cg,
        net,
    })
}

/// The nine layouts: containerd with either driver and CRI-O (systemd), every QoS class.
const LAYOUTS: [(CgroupDriver, Runtime, &str); 3] = [
    (CgroupDriver::Systemd, Runtime::Containerd, "sd"),
    (CgroupDriver::Cgroupfs, Runtime::Containerd, "cf"),
    (CgroupDriver::Systemd, Runtime::Crio, "cr"),
];

fn qos_name(q: QosClass) -> &'static str {
    match q {
        QosClass::Guaranteed => "g",
        QosClass::Burstable => "b",
        QosClass::BestEffort => "e",
    }
}

fn ip(pod: &KubePod) -> Vec<IpAddr> {
    vec![IpAddr::V4(pod.net.ip)]
}

#[test]
fn the_locator_finds_every_pod_of_kubelet_containerd_and_crio_layouts() -> Result<()> {
    let mut node = Node::new()?;
    let mut pods = Vec::new();
    let mut n = 0;
    for (driver, runtime, tag) in LAYOUTS {
        // One kubelet cgroup root per layout, as on three different nodes.
        let root = node.mesh_cgroup.join(format!("kubelet-{tag}"));
        for qos in QosClass::ALL {
            n += 1;
            let name = format!("{tag}{}", qos_name(qos));
            let pod = lay_out(
                &mut node,
                &root,
                n,
                &name,
                Layout {
                    driver,
                    qos,
                    runtime,
                },
                &["serve", "0.0.0.0:9091", "hello"],
            )?;
            pods.push((root.clone(), pod));
        }
    }
    for (root, pod) in &pods {
        let locator = Locator::new(root, "/proc");
        let found = locator.locate(&pod.uid, &ip(pod))?;
        assert_eq!(found.cgroup.path, pod.cgroup, "pod {}", pod.net.name);
        assert_eq!(
            (found.cgroup.driver, found.cgroup.qos),
            (pod.driver, pod.qos)
        );
        assert_eq!(
            found.netns_id,
            netns_id(&pod.net.netns_path)?,
            "pod {}: the located namespace is the pod's",
            pod.net.name
        );
        // The namespace file found names the same namespace (a live process of the pod).
        assert_eq!(netns_id(&found.netns)?, found.netns_id);
    }
    // A scan of each root lists exactly its three pods.
    for (driver, _, tag) in LAYOUTS {
        let root = node.mesh_cgroup.join(format!("kubelet-{tag}"));
        let scanned = Locator::new(&root, "/proc").scan()?;
        let mut want: Vec<(String, PathBuf)> = pods
            .iter()
            .filter(|(r, _)| *r == root)
            .map(|(_, p)| (p.uid.clone(), p.cgroup.clone()))
            .collect();
        want.sort_by(|a, b| a.1.cmp(&b.1));
        let got: Vec<(String, PathBuf)> = scanned
            .iter()
            .map(|c| (c.uid.clone(), c.path.clone()))
            .collect();
        assert_eq!(got, want, "scan of {tag}");
        assert!(scanned.iter().all(|c| c.driver == driver));
    }
    Ok(())
}

#[test]
fn the_locator_refuses_pods_it_cannot_pin_down() -> Result<()> {
    let mut node = Node::new()?;
    let root = node.mesh_cgroup.join("kubelet");
    let locator = Locator::new(&root, "/proc");
    // No such pod.
    let err = locator
        .locate(&uid(90), &["10.1.1.1".parse()?])
        .unwrap_err();
    assert!(matches!(err, LocateError::NoCgroup { .. }), "{err}");
    // The sandbox is being created: a pod cgroup, no process yet.
    let empty = root.join(pod_cgroup_path(
        CgroupDriver::Systemd,
        QosClass::Burstable,
        &uid(91),
    ));
    cgroup::create(&empty)?;
    let err = locator
        .locate(&uid(91), &["10.1.1.1".parse()?])
        .unwrap_err();
    assert!(matches!(err, LocateError::NoProcess { .. }), "{err}");
    // Only CRI-O's conmon so far: a process, in the host's namespace, which lacks the IP.
    let conmon_only = root.join(pod_cgroup_path(
        CgroupDriver::Systemd,
        QosClass::BestEffort,
        &uid(92),
    ));
    cgroup::create(&conmon_only)?;
    conmon(&mut node, &conmon_only, &container_id(92))?;
    let err = locator
        .locate(&uid(92), &["10.1.1.1".parse()?])
        .unwrap_err();
    assert!(
        matches!(err, LocateError::NoNetnsWithIp { namespaces: 1, .. }),
        "{err}"
    );
    // Two namespaces claiming the pod's IP: the pod's own, and another pod's where the same
    // address was added.
    let pod = lay_out(
        &mut node,
        &root,
        93,
        "twice",
        Layout {
            driver: CgroupDriver::Cgroupfs,
            qos: QosClass::Guaranteed,
            runtime: Runtime::Containerd,
        },
        &["pause"],
    )?;
    let other = node.add_pod("other")?;
    mesh_kit::run(
        "ip",
        &[
            "-n",
            &other.netns_name,
            "addr",
            "add",
            &format!("{}/32", pod.net.ip),
            "dev",
            "lo",
        ],
    )?;
    let stray = pod.cgroup.join(container_id(94));
    cgroup::create(&stray)?;
    let child = spawn_probe(&other.netns_path, &stray, &["pause"])?;
    started(child, &mut node)?;
    let err = locator.locate(&pod.uid, &ip(&pod)).unwrap_err();
    assert!(matches!(err, LocateError::TwoNetns { .. }), "{err}");
    assert!(err.to_string().contains(&pod.uid), "{err}");
    Ok(())
}

/// Starts `meshd run` on `catalog` for `node` (a child of this process, so in the node's agent
/// cgroup) with `extra` arguments, and waits until it says it is ready.
pub fn start_meshd(node: &Node, catalog: &Path, state: &Path, extra: &[&str]) -> Result<Child> {
    let mut child = Command::new(bin_path("meshd")?)
        .args([
            "run",
            "--redirect",
            "ebpf",
            "--default-intention-policy",
            "allow",
            "--metrics-addr",
            "off",
        ])
        .arg("--catalog")
        .arg(catalog)
        .arg("--instance")
        .arg(node.instance())
        .arg("--state-dir")
        .arg(state)
        .arg("--mesh-cgroup")
        .arg(&node.mesh_cgroup)
        .args(extra)
        .env("NO_COLOR", "1")
        .env(
            "MESH_HTTP_ADDR",
            format!("unix://{}", state.join("api.sock").display()),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
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

/// A service `name` (namespace default, dc1) at `vip:9091` with endpoints `ips` (their inbound
/// listeners), or no address at all.
pub fn service(name: &str, vip: Option<Ipv4Addr>, ips: &[Ipv4Addr]) -> Service {
    Service {
        name: name.into(),
        namespace: "default".into(),
        datacenter: "dc1".into(),
        vip,
        ports: if vip.is_some() { vec![9091] } else { vec![] },
        protocol: Protocol::Tcp,
        target_ports: Default::default(),
        endpoints: ips
            .iter()
            .map(|ip| Endpoint {
                ip: *ip,
                port: mesh_common::INBOUND_PORT,
            })
            .collect(),
        ..Default::default()
    }
}

/// A catalog workload at the located paths.
fn located_workload(
    name: &str,
    service: &str,
    cgroup: &Path,
    netns: &Path,
    ip: Ipv4Addr,
    app_ports: Vec<u16>,
) -> Workload {
    Workload {
        name: name.into(),
        namespace: "default".into(),
        service: service.into(),
        datacenter: "dc1".into(),
        netns: netns.to_path_buf(),
        cgroup: cgroup.to_path_buf(),
        ip,
        app_ports,
        exclude_inbound_ports: vec![],
        upstreams: vec![],
    }
}

#[test]
fn meshd_meshes_located_pods_that_were_running_before_it_started() -> Result<()> {
    let mut node = Node::new()?;
    let mut apps = Vec::new();
    let mut n = 0;
    for ((driver, runtime, tag), qos) in LAYOUTS.into_iter().zip(QosClass::ALL) {
        let root = node.mesh_cgroup.join(format!("kubelet-{tag}"));
        n += 1;
        let name = format!("{tag}{}", qos_name(qos));
        let greeting = format!("{name} says hello");
        let pod = lay_out(
            &mut node,
            &root,
            n,
            &name,
            Layout {
                driver,
                qos,
                runtime,
            },
            &["serve", "0.0.0.0:9091", &greeting],
        )?;
        apps.push((root, pod, greeting));
    }
    // The client: a Guaranteed pod (systemd driver, containerd) with only its pause process.
    let web_root = node.mesh_cgroup.join("kubelet-sd");
    let web = lay_out(
        &mut node,
        &web_root,
        10,
        "web",
        Layout {
            driver: CgroupDriver::Systemd,
            qos: QosClass::Guaranteed,
            runtime: Runtime::Containerd,
        },
        &["pause"],
    )?;
    let outsider = node.add_pod("outsider")?;
    // Before the agent: plaintext reaches every app.
    for (_, pod, greeting) in &apps {
        let got = reach(&outsider, SocketAddrV4::new(pod.net.ip, 9091).into())?;
        assert_eq!(got.ok().as_deref(), Some(greeting.as_str()), "before meshd");
    }

    // What a node agent does for pods it finds running: scan, locate, serve.
    let mut roots: Vec<PathBuf> = apps.iter().map(|(r, _, _)| r.clone()).collect();
    roots.dedup();
    let mut catalog = Catalog::default();
    let mut vips = Vec::new();
    for root in &roots {
        let locator = Locator::new(root, "/proc");
        for found in locator.scan()? {
            let (name, ip, app_ports) = if found.uid == web.uid {
                ("web".to_string(), web.net.ip, vec![])
            } else {
                let (_, pod, _) = apps
                    .iter()
                    .find(|(_, p, _)| p.uid == found.uid)
                    .context("scan found a pod that was not laid out")?;
                (pod.net.name.clone(), pod.net.ip, vec![9091])
            };
            let located = locator.netns_of(found, &[IpAddr::V4(ip)])?;
            let service_name = format!("svc-{name}");
            if name == "web" {
                catalog.services.push(service(&service_name, None, &[]));
            } else {
                let vip = Ipv4Addr::new(10, 96, node.subnet, 30 + vips.len() as u8);
                vips.push((vip, name.clone()));
                catalog
                    .services
                    .push(service(&service_name, Some(vip), &[ip]));
            }
            catalog.workloads.push(located_workload(
                &name,
                &service_name,
                &located.cgroup.path,
                &located.netns,
                ip,
                app_ports,
            ));
        }
    }
    assert_eq!(catalog.workloads.len(), 4, "every laid-out pod is found");
    let dir = tempfile::tempdir()?;
    let catalog_path = dir.path().join("catalog.json");
    std::fs::write(&catalog_path, serde_json::to_string_pretty(&catalog)?)?;
    let mut meshd = start_meshd(&node, &catalog_path, &dir.path().join("state"), &[])?;

    let result = (|| -> Result<()> {
        for (_, pod, greeting) in &apps {
            // Plaintext from outside the mesh no longer reaches the app.
            let got = reach(&outsider, SocketAddrV4::new(pod.net.ip, 9091).into())?;
            assert!(
                got.as_deref()
                    .map_or(true, |t| !t.contains(greeting.as_str())),
                "plaintext reached {} after meshd started: {got:?}",
                pod.net.name
            );
        }
        // The web app, in its container cgroup below the pod cgroup, reaches each app by its
        // virtual IP through the mesh (steered outbound, mTLS, inbound to the app).
        let web_app = web
            .cgroup
            .join(format!("cri-containerd-{}.scope", container_id(99)));
        cgroup::create(&web_app)?;
        for (vip, name) in &vips {
            let child = spawn_probe(
                &web.net.netns_path,
                &web_app,
                &["fetch", &SocketAddrV4::new(*vip, 9091).to_string()],
            )?;
            let out = wait_limit(child, Duration::from_secs(10))?;
            ensure!(
                out.status.success(),
                "fetch {name} from web's container: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert_eq!(
                String::from_utf8_lossy(&out.stdout).trim(),
                format!("{name} says hello"),
                "web → {name} through the mesh"
            );
        }
        Ok(())
    })();
    let _ = meshd.kill();
    let _ = meshd.wait();
    result
}
