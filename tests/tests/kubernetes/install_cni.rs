//! `deploy/image/install-cni.sh`, the DaemonSet's CNI installer, on CNI directories laid out as
//! a node's: the cluster's CNI configuration first (flannel's conflist as k3s writes it, a
//! single-plugin `.conf`), mesh-cni chained last, idempotent, and (`--watch`) chained again when
//! the cluster's CNI rewrites its file without it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/image/install-cni.sh")
}

/// A node's CNI directories and a stand-in mesh-cni binary to install.
struct Node {
    dir: tempfile::TempDir,
}

impl Node {
    fn new() -> Node {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("bin")).unwrap();
        std::fs::create_dir_all(dir.path().join("net.d")).unwrap();
        std::fs::write(dir.path().join("mesh-cni"), b"#!/bin/sh\nexit 0\n").unwrap();
        Node { dir }
    }

    fn conf(&self, name: &str) -> PathBuf {
        self.dir.path().join("net.d").join(name)
    }

    fn write(&self, name: &str, value: &Value) {
        std::fs::write(self.conf(name), serde_json::to_vec_pretty(value).unwrap()).unwrap();
    }

    fn read(&self, name: &str) -> Value {
        serde_json::from_slice(&std::fs::read(self.conf(name)).unwrap()).unwrap()
    }

    fn command(&self) -> Command {
        let mut c = Command::new("sh");
        c.arg(script())
            .env("CNI_BIN_DIR", self.dir.path().join("bin"))
            .env("CNI_CONF_DIR", self.dir.path().join("net.d"))
            .env("CNI_CONF_WAIT", "0")
            .env("CNI_WATCH_INTERVAL", "0.1")
            .env("CNI_READY_FILE", self.dir.path().join("ready"))
            .env("MESH_CNI_BINARY", self.dir.path().join("mesh-cni"));
        c
    }

    fn run(&self) -> Output {
        self.command().output().unwrap()
    }

    fn watch(&self) -> Child {
        self.command()
            .arg("--watch")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    }
}

fn flannel() -> Value {
    json!({
        "name": "cbr0",
        "cniVersion": "1.0.0",
        "plugins": [
            {"type": "flannel", "delegate": {"hairpinMode": true, "forceAddress": true, "isDefaultGateway": true}},
            {"type": "portmap", "capabilities": {"portMappings": true}},
            {"type": "bandwidth", "capabilities": {"bandwidth": true}}
        ]
    })
}

fn types(conf: &Value) -> Vec<&str> {
    conf["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["type"].as_str().unwrap())
        .collect()
}

fn text(out: &Output) -> String {
    format!(
        "status {}, stdout {}, stderr {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn mesh_cni_is_installed_and_chained_last_once() {
    let node = Node::new();
    node.write("10-flannel.conflist", &flannel());
    let out = node.run();
    assert!(out.status.success(), "{}", text(&out));
    let conf = node.read("10-flannel.conflist");
    assert_eq!(
        types(&conf),
        ["flannel", "portmap", "bandwidth", "mesh-cni"],
        "{}",
        text(&out)
    );
    // The cluster's plugins are untouched.
    assert_eq!(conf["plugins"][0], flannel()["plugins"][0]);
    assert_eq!(conf["name"], "cbr0");
    let bin = node.dir.path().join("bin/mesh-cni");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&bin).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o755);
    assert!(
        node.dir.path().join("ready").exists(),
        "the startup probe's file"
    );

    // Again (a restarted or upgraded DaemonSet): nothing changes.
    let before = std::fs::read(node.conf("10-flannel.conflist")).unwrap();
    let out = node.run();
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("already chained"),
        "{}",
        text(&out)
    );
    assert_eq!(
        std::fs::read(node.conf("10-flannel.conflist")).unwrap(),
        before
    );
}

#[test]
fn only_the_configuration_the_runtime_uses_is_changed() {
    let node = Node::new();
    node.write("10-flannel.conflist", &flannel());
    let mut other = flannel();
    other["name"] = json!("other");
    node.write("99-other.conflist", &other);
    let out = node.run();
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        types(&node.read("10-flannel.conflist")).last(),
        Some(&"mesh-cni")
    );
    assert_eq!(node.read("99-other.conflist"), other);
}

#[test]
fn a_single_plugin_conf_becomes_a_conflist_with_mesh_cni() {
    let node = Node::new();
    node.write(
        "10-bridge.conf",
        &json!({
            "cniVersion": "1.0.0",
            "name": "mynet",
            "type": "bridge",
            "bridge": "cni0",
            "ipam": {"type": "host-local", "subnet": "10.22.0.0/16"}
        }),
    );
    let out = node.run();
    assert!(out.status.success(), "{}", text(&out));
    assert!(!node.conf("10-bridge.conf").exists());
    let list = node.read("10-bridge.conflist");
    assert_eq!(list["name"], "mynet");
    assert_eq!(list["cniVersion"], "1.0.0");
    assert_eq!(types(&list), ["bridge", "mesh-cni"]);
    assert_eq!(list["plugins"][0]["ipam"]["subnet"], "10.22.0.0/16");
    assert!(list["plugins"][0].get("name").is_none());
}

#[test]
fn without_a_cluster_cni_or_with_a_broken_one_it_fails_saying_why() {
    let node = Node::new();
    let out = node.run();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("install the cluster's CNI first"),
        "{}",
        text(&out)
    );
    assert!(!node.dir.path().join("ready").exists());

    std::fs::write(node.conf("10-broken.conflist"), b"{ not json").unwrap();
    let out = node.run();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("is not JSON"),
        "{}",
        text(&out)
    );
    assert_eq!(
        std::fs::read(node.conf("10-broken.conflist")).unwrap(),
        b"{ not json"
    );
}

#[test]
fn watching_chains_mesh_cni_again_after_the_cluster_cni_rewrites_its_file() {
    let node = Node::new();
    node.write("10-flannel.conflist", &flannel());
    let mut watcher = node.watch();
    let until = |what: &str, f: &dyn Fn() -> bool| {
        let start = Instant::now();
        while !f() {
            assert!(start.elapsed() < Duration::from_secs(10), "never: {what}");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let chained = |name: &str| {
        std::fs::read(node.conf(name))
            .ok()
            .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
            .is_some_and(|c| types(&c).last() == Some(&"mesh-cni"))
    };
    until("chained at start", &|| chained("10-flannel.conflist"));
    // flannel restarts and writes its configuration back, without mesh-cni.
    node.write("10-flannel.conflist", &flannel());
    until("chained again", &|| chained("10-flannel.conflist"));
    // Another CNI puts its file first.
    let mut calico = flannel();
    calico["name"] = json!("k8s-pod-network");
    node.write("05-calico.conflist", &calico);
    until("chained into the new first file", &|| {
        chained("05-calico.conflist")
    });
    // The plugin binary disappears (a node image update wiped /opt/cni/bin).
    std::fs::remove_file(node.dir.path().join("bin/mesh-cni")).unwrap();
    until("binary re-installed", &|| {
        node.dir.path().join("bin/mesh-cni").exists()
    });
    assert!(
        watcher.try_wait().unwrap().is_none(),
        "the watcher is still running"
    );
    let _ = watcher.kill();
    let _ = watcher.wait();
}
