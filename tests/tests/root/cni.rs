//! `mesh-cni` invoked exactly as a container runtime invokes a chained plugin list: Debian's
//! reference `bridge` (with `host-local` IPAM) first, then `mesh-cni`, each with the `CNI_*`
//! variables (`CNI_ARGS` carrying the pod's namespace, name, UID and sandbox id) and its
//! configuration on stdin (the list's `cniVersion` and `name`, the previous plugin's result as
//! `prevResult`), for sandboxes in real network namespaces under `/var/run/netns`, against a
//! running `meshd run --cni-socket`. The bridge lives in a node namespace the test creates, so
//! no address of the test reaches the host's network.

use std::io::Write;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use mesh_core::catalog::{pin_name, Catalog, Workload};
use mesh_dataplane::cgroup;
use mesh_kit::{bin_path, reach, spawn_probe, wait_limit, Node, Pod};
use serde_json::{json, Value};

use crate::kubepods::{service, start_meshd};

/// Where Debian's `containernetworking-plugins` puts the reference plugins.
const CNI_BIN: &str = "/usr/lib/cni";

/// A network namespace made with `ip netns add` (`/var/run/netns/<name>`), deleted on drop.
struct Netns(String);

impl Netns {
    fn add(name: &str) -> Result<Self> {
        mesh_kit::run("ip", &["netns", "add", name])?;
        let ns = Netns(name.to_string());
        mesh_kit::run("ip", &["-n", name, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    fn path(&self) -> PathBuf {
        Path::new("/var/run/netns").join(&self.0)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// What one plugin run printed and how it exited.
#[derive(Debug)]
struct PluginRun {
    code: i32,
    stdout: String,
    stderr: String,
}

impl PluginRun {
    fn json(&self) -> Result<Value> {
        serde_json::from_str(&self.stdout)
            .with_context(|| format!("plugin output is not JSON: {self:?}"))
    }
}

/// A pod sandbox as the runtime knows it.
struct Sandbox {
    name: String,
    uid: String,
    container_id: String,
    /// The namespace's name under `/var/run/netns` (made by [`Sandbox::create`]).
    netns_name: String,
    cgroup: PathBuf,
}

impl Sandbox {
    fn netns_path(&self) -> PathBuf {
        Path::new("/var/run/netns").join(&self.netns_name)
    }

    /// Makes the sandbox's namespace and cgroup, as the runtime does before CNI ADD.
    fn create(&self) -> Result<Netns> {
        let ns = Netns::add(&self.netns_name)?;
        cgroup::create(&self.cgroup)?;
        Ok(ns)
    }
}

/// The node's CNI set-up: the node namespace holding the bridge, the conflist.
struct Cni {
    node_ns: Netns,
    conflist: Value,
    mesh_cni_dir: PathBuf,
}

impl Cni {
    /// Runs `plugin` (`bridge` or `mesh-cni`) for `command` on `pod` as the runtime does:
    /// inside the node namespace, a clean environment with the CNI variables, `conf` on stdin.
    fn plugin(
        &self,
        plugin: &str,
        command: &str,
        pod: &Sandbox,
        conf: &Value,
    ) -> Result<PluginRun> {
        let dir = if plugin == "mesh-cni" {
            self.mesh_cni_dir.clone()
        } else {
            PathBuf::from(CNI_BIN)
        };
        let cni_path = format!("{CNI_BIN}:{}", self.mesh_cni_dir.display());
        let args = format!(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME={};K8S_POD_INFRA_CONTAINER_ID={};K8S_POD_UID={}",
            pod.name, pod.container_id, pod.uid
        );
        let mut child = Command::new("/usr/sbin/ip")
            .args(["netns", "exec", &self.node_ns.0])
            .arg(dir.join(plugin))
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", &pod.container_id)
            .env("CNI_NETNS", pod.netns_path())
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", cni_path)
            .env("CNI_ARGS", args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("running {plugin}"))?;
        child
            .stdin
            .take()
            .context("plugin stdin")?
            .write_all(serde_json::to_string(conf)?.as_bytes())?;
        let out = wait_limit(child, Duration::from_secs(30))?;
        let run = PluginRun {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        };
        eprintln!("{command} {plugin} for {}: {run:?}", pod.name);
        Ok(run)
    }

    /// The configuration the runtime hands plugin `i` of the list: the plugin's object with
    /// the list's `cniVersion` and `name`, and `prevResult` when given.
    fn conf(&self, i: usize, prev: Option<&Value>) -> Value {
        let mut conf = self.conflist["plugins"][i].clone();
        conf["cniVersion"] = self.conflist["cniVersion"].clone();
        conf["name"] = self.conflist["name"].clone();
        if let Some(prev) = prev {
            conf["prevResult"] = prev.clone();
        }
        conf
    }

    /// ADD through the list: bridge, then mesh-cni with bridge's result. Returns bridge's result
    /// and mesh-cni's run. A failed mesh-cni makes the runtime delete what the list added, as
    /// it does here.
    fn add(&self, pod: &Sandbox) -> Result<(Value, PluginRun)> {
        let bridge = self.plugin("bridge", "ADD", pod, &self.conf(0, None))?;
        ensure!(bridge.code == 0, "bridge ADD failed: {bridge:?}");
        let result = bridge.json()?;
        let mesh = self.plugin("mesh-cni", "ADD", pod, &self.conf(1, Some(&result)))?;
        if mesh.code != 0 {
            self.del(pod, Some(&result))?;
        }
        Ok((result, mesh))
    }

    /// DEL through the list in reverse order, each with the cached result; both must succeed.
    fn del(&self, pod: &Sandbox, result: Option<&Value>) -> Result<()> {
        let mesh = self.plugin("mesh-cni", "DEL", pod, &self.conf(1, result))?;
        ensure!(
            mesh.code == 0 && mesh.stdout.is_empty(),
            "mesh-cni DEL: {mesh:?}"
        );
        let bridge = self.plugin("bridge", "DEL", pod, &self.conf(0, result))?;
        ensure!(bridge.code == 0, "bridge DEL: {bridge:?}");
        Ok(())
    }

    /// CHECK through the list in order with the result; the first failure is returned.
    fn check(&self, pod: &Sandbox, result: &Value) -> Result<PluginRun> {
        let bridge = self.plugin("bridge", "CHECK", pod, &self.conf(0, Some(result)))?;
        ensure!(bridge.code == 0, "bridge CHECK: {bridge:?}");
        self.plugin("mesh-cni", "CHECK", pod, &self.conf(1, Some(result)))
    }
}

/// Sandbox `n` of the test: its names and paths (nothing is made yet).
fn sandbox(node: &Node, n: u32, name: &str) -> Sandbox {
    Sandbox {
        name: name.to_string(),
        uid: format!("5a9dbb1e-c0de-4c0d-8a11-{n:012x}"),
        container_id: format!("{n:08x}").repeat(8),
        netns_name: format!("{}-c{name}", node.id),
        cgroup: node.mesh_cgroup.join("pods").join(name),
    }
}

fn workload(pod: &Sandbox, netns: &Path, ip: Ipv4Addr, app_ports: Vec<u16>) -> Workload {
    Workload {
        name: pod.name.clone(),
        namespace: "default".into(),
        service: pod.name.clone(),
        datacenter: "dc1".into(),
        netns: netns.to_path_buf(),
        cgroup: pod.cgroup.clone(),
        ip,
        app_ports,
        exclude_inbound_ports: vec![],
        upstreams: vec![],
    }
}

/// The address of the first `ips[]` entry of a result.
fn result_ip(result: &Value) -> Result<Ipv4Addr> {
    let addr = result["ips"][0]["address"]
        .as_str()
        .context("no ips[0].address in the result")?;
    Ok(addr.split('/').next().unwrap_or_default().parse()?)
}

/// A fixture pod handle for the kit's helpers (reach from inside its namespace).
fn as_pod(pod: &Sandbox, ip: Ipv4Addr) -> Pod {
    Pod {
        name: pod.name.clone(),
        netns_name: pod.netns_name.clone(),
        netns_path: pod.netns_path(),
        cgroup: pod.cgroup.clone(),
        ip,
    }
}

fn error_object(run: &PluginRun) -> Result<Value> {
    ensure!(run.code != 0, "expected a failure: {run:?}");
    let v = run.json()?;
    ensure!(
        v["cniVersion"] == "1.0.0",
        "error object without cniVersion: {v}"
    );
    Ok(v)
}

#[test]
fn a_chained_mesh_cni_meshes_pods_before_add_returns() -> Result<()> {
    let node = Node::new()?;
    let s = node.subnet;
    let tmp = tempfile::tempdir()?;
    let socket = tmp.path().join("run/cni.sock");
    let mesh_cni = bin_path("mesh-cni")?;
    let cni = Cni {
        node_ns: Netns::add(&format!("{}-k", node.id))?,
        conflist: json!({
            "cniVersion": "1.0.0",
            "name": "mesh-test",
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": format!("mb{}", node.id),
                    "isGateway": true,
                    "ipMasq": false,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{
                            "subnet": format!("10.92.{s}.0/24"),
                            "rangeStart": format!("10.92.{s}.10"),
                        }]],
                        "dataDir": tmp.path().join("ipam"),
                    }
                },
                {
                    "type": "mesh-cni",
                    "socketPath": socket,
                    "timeoutSeconds": 20,
                }
            ]
        }),
        mesh_cni_dir: mesh_cni.parent().context("mesh-cni dir")?.to_path_buf(),
    };
    // host-local hands out addresses in order from rangeStart.
    let ip = |i: u8| Ipv4Addr::new(10, 92, s, 10 + i);
    let api = sandbox(&node, 1, "api");
    let web = sandbox(&node, 2, "web");
    let outsider = sandbox(&node, 3, "outsider");
    let bad = sandbox(&node, 4, "bad");
    let elsewhere = Netns::add(&format!("{}-celse", node.id))?;
    let vip = Ipv4Addr::new(10, 96, s, 40);
    let catalog = Catalog {
        services: vec![
            service("api", Some(vip), &[ip(0)]),
            service("web", None, &[]),
            service("bad", None, &[]),
        ],
        workloads: vec![
            workload(&api, &api.netns_path(), ip(0), vec![9091]),
            workload(&web, &web.netns_path(), ip(1), vec![]),
            // The catalog names another namespace than the one the runtime made for it.
            workload(&bad, &elsewhere.path(), ip(3), vec![]),
        ],
    };
    let catalog_path = tmp.path().join("catalog.json");
    std::fs::write(&catalog_path, serde_json::to_string_pretty(&catalog)?)?;
    let state = tmp.path().join("state");
    let socket_arg = socket.to_string_lossy().into_owned();
    let mut meshd = start_meshd(
        &node,
        &catalog_path,
        &state,
        &["--cni-socket", &socket_arg, "--cni-catalog-wait", "1"],
    )?;
    let mode = std::fs::metadata(&socket)?.permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
        0o600,
        "only root may ask the agent to mesh a pod"
    );

    // The agent runs before the pods' sandboxes exist, as a DaemonSet does: the catalog's
    // pods wait for their namespaces, and ADD is what meshes them.
    let _namespaces = [
        api.create()?,
        web.create()?,
        outsider.create()?,
        bad.create()?,
    ];
    let result = (|| -> Result<()> {
        // ADD: the pod is meshed when mesh-cni returns; its result is bridge's, unchanged.
        let (api_result, run) = cni.add(&api)?;
        ensure!(run.code == 0, "mesh-cni ADD of api: {run:?}");
        assert_eq!(
            run.json()?,
            api_result,
            "prevResult passes through unchanged"
        );
        assert_eq!(result_ip(&api_result)?, ip(0));
        // The app starts only now, as the runtime starts containers after ADD.
        let app = spawn_probe(
            &api.netns_path(),
            &api.cgroup,
            &["serve", "0.0.0.0:9091", "api says hello"],
        )?;
        let _app = KillOnDrop(app);
        let (web_result, run) = cni.add(&web)?;
        ensure!(run.code == 0, "mesh-cni ADD of web: {run:?}");
        assert_eq!(result_ip(&web_result)?, ip(1));
        // A pod the agent does not know passes through after the agent's short wait.
        let (outsider_result, run) = cni.add(&outsider)?;
        ensure!(
            run.code == 0,
            "mesh-cni ADD of a pod outside the mesh: {run:?}"
        );
        assert_eq!(run.json()?, outsider_result);
        let outside = as_pod(&outsider, result_ip(&outsider_result)?);
        // The app is steered from its first moment: plaintext from another pod never gets it,
        // while web reaches it through the mesh.
        mesh_kit::wait_for(
            "the api app listening",
            Duration::from_secs(5),
            Duration::from_millis(50),
            || {
                let listening = mesh_kit::run(
                    "ip",
                    &[
                        "netns",
                        "exec",
                        &api.netns_name,
                        "ss",
                        "-Htln",
                        "sport = :9091",
                    ],
                )?;
                Ok((!listening.trim().is_empty()).then_some(()))
            },
        )?;
        let got = reach(&outside, SocketAddrV4::new(ip(0), 9091).into())?;
        assert!(
            got.as_deref()
                .map_or(true, |t| !t.contains("api says hello")),
            "plaintext reached the app of a pod meshed by CNI ADD: {got:?}"
        );
        let fetch = spawn_probe(
            &web.netns_path(),
            &web.cgroup,
            &["fetch", &SocketAddrV4::new(vip, 9091).to_string()],
        )?;
        let out = wait_limit(fetch, Duration::from_secs(10))?;
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "api says hello",
            "web → api through the mesh; stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        );

        // A pod the agent refuses fails ADD with the spec's error object.
        let (_, run) = cni.add(&bad)?;
        let err = error_object(&run)?;
        assert_eq!(err["code"], 100, "{err}");
        assert_eq!(err["msg"], "meshd refused to mesh pod default/bad", "{err}");
        let details = err["details"].as_str().unwrap_or_default();
        assert!(details.contains("is not the CNI's"), "{err}");

        // CHECK: fine while steered; once the pod's sk_lookup attachment is gone, it says so.
        let run = cni.check(&api, &api_result)?;
        assert_eq!((run.code, run.stdout.as_str()), (0, ""), "{run:?}");
        let pin = mesh_dataplane::bpf::instance_dir(&node.instance())
            .join("pods")
            .join(pin_name("default", "api"))
            .join("sk_lookup");
        std::fs::remove_file(&pin).with_context(|| format!("removing {}", pin.display()))?;
        let run = cni.check(&api, &api_result)?;
        let err = error_object(&run)?;
        assert_eq!(err["code"], 100, "{err}");
        assert!(
            err["details"]
                .as_str()
                .unwrap_or_default()
                .contains("sk_lookup"),
            "{err}"
        );

        // DEL is idempotent, also once the namespace is gone.
        cni.del(&web, Some(&web_result))?;
        cni.del(&web, Some(&web_result))?;
        cni.del(&outsider, Some(&outsider_result))?;
        Ok(())
    })();
    let _ = meshd.kill();
    let _ = meshd.wait();
    result?;

    // With the agent gone, a pod to be meshed does not start; DEL still succeeds.
    let late = sandbox(&node, 5, "late");
    let _late_ns = late.create()?;
    let (_, run) = cni.add(&late)?;
    let err = error_object(&run)?;
    assert_eq!(err["code"], 11, "{err}");
    assert_eq!(err["msg"], "meshd is not running on this node", "{err}");
    let gone = sandbox(&node, 6, "gone");
    let run = cni.plugin("mesh-cni", "DEL", &gone, &cni.conf(1, None))?;
    assert_eq!((run.code, run.stdout.as_str()), (0, ""), "{run:?}");
    Ok(())
}

/// Kills a child process when dropped.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
