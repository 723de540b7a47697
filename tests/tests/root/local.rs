//! Root tests of the local runner, done the way a person does Consul's tutorial: start
//! `meshd local`, deny everything, apply the manifests of `examples/`, port-forward, watch the
//! request fail, allow `web → api-v1`, watch it succeed, delete the manifests and find every pod
//! namespace and cgroup gone. In both redirect modes, and with api-v1 in another namespace.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use mesh_kit::{bin_path, require_root, spawn_probe, wait_for, wait_limit};
use serde_json::Value;

/// The tests' node name, apart from the `local` of a `cargo xtask run` on the same machine.
pub(super) const NODE: &str = "lt";

/// The `examples/` of the source tree (this crate is `tests/`, one level below the root).
pub(super) fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

/// A loopback port nothing listens on now and that this process has not handed out before: two
/// calls in a row may otherwise get the same port from the kernel (the first listener is closed
/// by then), and an agent given it for two listeners fails to start.
pub(super) fn free_port() -> Result<u16> {
    static GIVEN: std::sync::Mutex<BTreeSet<u16>> = std::sync::Mutex::new(BTreeSet::new());
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    for _ in 0..64 {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        if given.insert(port) {
            return Ok(port);
        }
    }
    anyhow::bail!("no loopback port left that this test process has not used")
}

/// Network namespaces, cgroups and BPF pins on the machine: what the runner must leave as it
/// found it.
#[derive(Debug, PartialEq, Eq)]
struct Footprint {
    netns: BTreeSet<String>,
    cgroups: BTreeSet<PathBuf>,
    pins: BTreeSet<PathBuf>,
}

fn dirs_under(root: &Path, depth: usize, out: &mut BTreeSet<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for e in entries.flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            out.insert(e.path());
            if depth > 1 {
                dirs_under(&e.path(), depth - 1, out);
            }
        }
    }
}

fn footprint() -> Result<Footprint> {
    let list = Command::new("ip").args(["netns", "list"]).output()?;
    ensure!(list.status.success(), "ip netns list failed");
    let netns = String::from_utf8_lossy(&list.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect();
    let mut cgroups = BTreeSet::new();
    dirs_under(&mesh_dataplane::cgroup::v2_root()?, 4, &mut cgroups);
    let mut pins = BTreeSet::new();
    dirs_under(Path::new("/sys/fs/bpf"), 3, &mut pins);
    Ok(Footprint {
        netns,
        cgroups,
        pins,
    })
}

/// A `meshd local` child with its own state directory and API port; stopped (and checked to
/// have removed everything) on [`LocalMesh::stop`], killed and reset on drop.
pub(super) struct LocalMesh {
    meshd: PathBuf,
    meshctl: PathBuf,
    agent: Option<Child>,
    state: tempfile::TempDir,
    pub(super) http_addr: String,
    /// The token-free `/metrics` listener (`MESH_METRICS_ADDR`), on a free loopback port.
    pub(super) metrics_addr: SocketAddr,
    pub(super) token: String,
    log: PathBuf,
    forwards: Vec<Child>,
}

impl LocalMesh {
    pub(super) fn start(redirect: &str) -> Result<Self> {
        let http_addr = format!("127.0.0.1:{}", free_port()?);
        Self::start_in(redirect, tempfile::tempdir()?, http_addr)
    }

    /// Starts `meshd local` on an existing state directory.
    fn start_in(redirect: &str, state: tempfile::TempDir, http_addr: String) -> Result<Self> {
        require_root();
        let log = state.path().join("meshd.log");
        let meshd = bin_path("meshd")?;
        let metrics_addr = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let agent = Command::new(&meshd)
            .args(["local", "--node", NODE, "--redirect", redirect])
            .env("MESH_STATE_DIR", state.path())
            .env("MESH_HTTP_ADDR", &http_addr)
            .env("MESH_METRICS_ADDR", metrics_addr.to_string())
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log)?)
            .stderr(std::fs::File::create(state.path().join("meshd.err"))?)
            .spawn()
            .context("starting meshd local")?;
        let mut mesh = LocalMesh {
            meshd,
            meshctl: bin_path("meshctl")?,
            agent: Some(agent),
            state,
            http_addr,
            metrics_addr,
            token: String::new(),
            log,
            forwards: Vec::new(),
        };
        let token_file = mesh.state.path().join("acl-bootstrap-token");
        mesh.token = mesh.wait(
            "the API and its bootstrap token",
            Duration::from_secs(60),
            |m| {
                let Ok(token) = std::fs::read_to_string(&token_file) else {
                    return Ok(None);
                };
                let token = token.trim().to_string();
                let out = m.meshctl_as(&token, &["acl", "token", "read", "-self"])?;
                Ok(out.status.success().then_some(token))
            },
        )?;
        Ok(mesh)
    }

    fn logs(&self) -> String {
        let read = |p: PathBuf| std::fs::read_to_string(p).unwrap_or_default();
        let err = read(self.state.path().join("meshd.err"));
        let lines: Vec<&str> = err.lines().collect();
        format!(
            "meshd stdout:\n{}\nmeshd stderr (last 60 lines):\n{}",
            read(self.log.clone()),
            lines[lines.len().saturating_sub(60)..].join("\n")
        )
    }

    /// Polls `f` every 200 ms until it answers, failing (with the agent's log) past `limit` or
    /// when the agent exits.
    pub(super) fn wait<T>(
        &mut self,
        what: &str,
        limit: Duration,
        mut f: impl FnMut(&mut Self) -> Result<Option<T>>,
    ) -> Result<T> {
        // `f`'s errors are retried (the API may not be up yet); the last one is reported.
        let mut last = String::new();
        let waited = wait_for(what, limit, Duration::from_millis(200), || {
            if let Some(st) = self
                .agent
                .as_mut()
                .and_then(|a| a.try_wait().ok().flatten())
            {
                last.clear();
                bail!("meshd local exited ({st}) waiting for {what}");
            }
            match f(self) {
                Ok(v) => {
                    last.clear();
                    Ok(v)
                }
                Err(e) => {
                    last = format!(": {e:#}");
                    Ok(None)
                }
            }
        });
        waited.map_err(|e| anyhow!("{e}{last}\n{}", self.logs()))
    }

    fn meshctl_as(&self, token: &str, args: &[&str]) -> Result<Output> {
        Command::new(&self.meshctl)
            .args(args)
            .env("MESH_HTTP_ADDR", &self.http_addr)
            .env("MESH_HTTP_TOKEN", token)
            .stdin(Stdio::null())
            .output()
            .context("running meshctl")
    }

    /// `meshctl` with the bootstrap token; fails unless it succeeds. Returns stdout.
    pub(super) fn meshctl(&self, args: &[&str]) -> Result<String> {
        let out = self.meshctl_as(&self.token, args)?;
        ensure!(
            out.status.success(),
            "meshctl {} failed ({}): {}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `meshctl` that must fail; returns its stderr (with stdout).
    fn meshctl_fails(&self, args: &[&str]) -> Result<String> {
        let out = self.meshctl_as(&self.token, args)?;
        ensure!(
            !out.status.success(),
            "meshctl {} succeeded but should not have: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout)
        );
        Ok(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        ))
    }

    fn pods(&self) -> Result<Vec<Value>> {
        let out = self.meshctl(&["get", "pods", "-A", "-o", "json"])?;
        let v: Value = serde_json::from_str(&out).context("meshctl get pods -o json")?;
        Ok(v["items"].as_array().context("no items")?.clone())
    }

    /// Waits until exactly `expected` (`namespace/name`) pods exist and all are Ready.
    pub(super) fn wait_ready(&mut self, expected: &[&str]) -> Result<()> {
        let mut expected: Vec<String> = expected.iter().map(|s| s.to_string()).collect();
        expected.sort();
        self.wait("Ready pods", Duration::from_secs(60), |m| {
            let pods = m.pods()?;
            let mut names: Vec<String> = pods
                .iter()
                .map(|p| {
                    format!(
                        "{}/{}",
                        p["metadata"]["namespace"].as_str().unwrap_or(""),
                        p["metadata"]["name"].as_str().unwrap_or("")
                    )
                })
                .collect();
            names.sort();
            let ready = pods.iter().all(|p| {
                p["status"]["conditions"].as_array().is_some_and(|c| {
                    c.iter()
                        .any(|c| c["type"] == "Ready" && c["status"] == "True")
                })
            });
            Ok((names == expected && ready).then_some(()))
        })
    }

    /// `meshctl port-forward service/<service> <local>:<port>`, kept until the mesh stops.
    pub(super) fn port_forward(&mut self, service: &str, port: u16) -> Result<SocketAddr> {
        let local = free_port()?;
        let mut child = Command::new(&self.meshctl)
            .args([
                "port-forward",
                &format!("service/{service}"),
                &format!("{local}:{port}"),
            ])
            .env("MESH_HTTP_ADDR", &self.http_addr)
            .env("MESH_HTTP_TOKEN", &self.token)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().context("no stdout")?).read_line(&mut line)?;
        self.forwards.push(child);
        ensure!(
            line.starts_with(&format!("Forwarding from 127.0.0.1:{local} -> {port}")),
            "port-forward said {line:?}"
        );
        Ok(SocketAddr::from(([127, 0, 0, 1], local)))
    }

    /// Stops the agent (as Ctrl-C does) and starts it again on the same state directory.
    fn restart(mut self, redirect: &str) -> Result<Self> {
        self.stop_agent()?;
        let state = std::mem::replace(&mut self.state, tempfile::tempdir()?);
        Self::start_in(redirect, state, self.http_addr.clone())
    }

    /// Stops the agent with SIGTERM (what Ctrl-C does) and waits for it.
    pub(super) fn stop(mut self) -> Result<()> {
        self.stop_agent()
    }

    fn stop_agent(&mut self) -> Result<()> {
        for mut f in self.forwards.drain(..) {
            let _ = f.kill();
            let _ = f.wait();
        }
        let mut agent = self.agent.take().context("already stopped")?;
        let pid = nix::unistd::Pid::from_raw(agent.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)?;
        let start = Instant::now();
        while agent.try_wait()?.is_none() {
            if start.elapsed() > Duration::from_secs(60) {
                let _ = agent.kill();
                bail!("meshd local did not stop within 60 s\n{}", self.logs());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }
}

impl Drop for LocalMesh {
    fn drop(&mut self) {
        for mut f in self.forwards.drain(..) {
            let _ = f.kill();
            let _ = f.wait();
        }
        if let Some(mut agent) = self.agent.take() {
            let _ = agent.kill();
            let _ = agent.wait();
            // A killed agent leaves its pieces: the reset removes them.
            let _ = Command::new(&self.meshd)
                .args(["local", "--node", NODE, "--reset"])
                .env("MESH_STATE_DIR", self.state.path())
                .env("MESH_HTTP_ADDR", &self.http_addr)
                .status();
        }
    }
}

/// Runs `mesh-probe` as a process of pod `namespace/name` (its cgroup and network namespace,
/// as the runner names them); returns what it printed, or its error.
pub(super) fn in_pod(namespace: &str, name: &str, args: &[&str]) -> Result<String> {
    let netns = PathBuf::from(format!("/run/netns/{NODE}-{namespace}_{name}"));
    let cgroup =
        mesh_dataplane::cgroup::v2_root()?.join(format!("mesh-{NODE}/pods/{namespace}_{name}"));
    ensure!(netns.exists(), "no network namespace {}", netns.display());
    ensure!(cgroup.exists(), "no cgroup {}", cgroup.display());
    let out = wait_limit(spawn_probe(&netns, &cgroup, args)?, Duration::from_secs(30))?;
    Ok(format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    ))
}

/// The virtual IP of service `namespace/name`, from `meshctl get services -o json`.
pub(super) fn cluster_ip(mesh: &LocalMesh, namespace: &str, name: &str) -> Result<String> {
    let v: Value = serde_json::from_str(&mesh.meshctl(&["get", "services", "-A", "-o", "json"])?)?;
    v["items"]
        .as_array()
        .context("no items")?
        .iter()
        .find(|s| s["metadata"]["namespace"] == namespace && s["metadata"]["name"] == name)
        .and_then(|s| s["spec"]["clusterIP"].as_str().map(str::to_owned))
        .with_context(|| format!("no service {namespace}/{name} in {v}"))
}

/// One answer of [`http`].
pub(super) struct HttpAnswer {
    pub(super) status: u16,
    /// The status line and the headers.
    pub(super) head: String,
    /// The body, chunked transfer encoding undone.
    pub(super) body: String,
}

/// One HTTP/1.1 request with `Connection: close` to a server on loopback (the API, the
/// metrics listener, a port-forward), `token` in `X-Consul-Token` when given; `read_timeout`
/// bounds the answer (a blocking query waits for it).
pub(super) fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
    read_timeout: Duration,
) -> Result<HttpAnswer> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(read_timeout))?;
    let auth = token
        .map(|t| format!("X-Consul-Token: {t}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n{auth}\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .with_context(|| format!("no HTTP response to {method} {path}: {text:?}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no status in {head:?}"))?;
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)?
    } else {
        body.to_string()
    };
    Ok(HttpAnswer {
        status,
        head: head.to_owned(),
        body,
    })
}

/// `GET /`: (status, body).
pub(super) fn get(addr: SocketAddr) -> Result<(u16, String)> {
    let a = http(addr, "GET", "/", None, "", Duration::from_secs(20))?;
    Ok((a.status, a.body))
}

fn dechunk(mut body: &str) -> Result<String> {
    let mut out = String::new();
    loop {
        let (size, rest) = body.split_once("\r\n").context("bad chunk")?;
        let size = usize::from_str_radix(size.trim(), 16)?;
        if size == 0 {
            return Ok(out);
        }
        out.push_str(rest.get(..size).context("short chunk")?);
        body = rest.get(size + 2..).context("short chunk")?;
    }
}

/// The `upstream_calls` entry of fake-service's answer for `uri`.
fn upstream_call(body: &str, uri: &str) -> Result<Value> {
    let v: Value =
        serde_json::from_str(body).with_context(|| format!("web's answer is not JSON: {body}"))?;
    v["upstream_calls"]
        .get(uri)
        .cloned()
        .with_context(|| format!("no upstream call to {uri} in {body}"))
}

/// The tutorial with the manifests of `dir`: `deny_all`, apply, a 500 from web, `allow`, a
/// 200 with api-v1's answer, delete, stop.
fn walkthrough(
    redirect: &str,
    dir: &Path,
    deny_all: (&str, &str),
    allow: (&str, &str),
    pods: &[&str],
) -> Result<()> {
    let before = footprint()?;
    let mut mesh = LocalMesh::start(redirect)?;
    mesh.meshctl(&["intention", "create", "-deny", deny_all.0, deny_all.1])?;
    let node = footprint()?;

    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    files.retain(|p| p.extension().is_some_and(|e| e == "yaml"));
    files.sort();
    for f in &files {
        let out = mesh.meshctl(&["apply", "-f", f.to_str().context("path")?])?;
        ensure!(out.contains("created"), "apply said {out:?}");
    }
    mesh.wait_ready(pods)?;
    let running = footprint()?;
    ensure!(
        running.netns.len() >= node.netns.len() + pods.len(),
        "each pod has a network namespace: {:?} then {:?}",
        node.netns,
        running.netns
    );
    // Applying the same manifests again changes nothing.
    let again = mesh.meshctl(&["apply", "-f", dir.to_str().context("path")?])?;
    ensure!(
        !again.contains("created") && again.contains("unchanged"),
        "re-apply said {again:?}"
    );

    // Service names resolve inside the pods, to the virtual IPs.
    let api_ns = pods
        .iter()
        .find_map(|p| p.strip_suffix("/api-v1-0"))
        .context("no api-v1 pod expected")?;
    let vip = cluster_ip(&mesh, api_ns, "api-v1")?;
    let hosts = std::fs::read_to_string(format!("/etc/netns/{NODE}-default_web-0/hosts"))?;
    let names: Vec<&str> = hosts
        .lines()
        .find(|l| l.split_whitespace().next() == Some(vip.as_str()))
        .with_context(|| format!("no line for {vip} in web's hosts file:\n{hosts}"))?
        .split_whitespace()
        .collect();
    for name in [
        format!("api-v1.{api_ns}"),
        format!("api-v1.{api_ns}.svc.cluster.local"),
    ] {
        ensure!(
            names.contains(&name.as_str()),
            "{name} missing from {names:?}"
        );
    }
    if api_ns == "default" {
        ensure!(names.contains(&"api-v1"), "api-v1 missing from {names:?}");
    }
    let transparent = format!("{vip}:9091");
    let out = in_pod("default", "web-0", &["http-get", &transparent])?;
    eprintln!("denied, web's app by api-v1's virtual IP: {out}");
    ensure!(
        !out.contains("Response from API v1"),
        "denied, yet api-v1 answered web's app by its virtual IP: {out}"
    );

    let web = mesh.port_forward("web", 9090)?;
    let upstream = "http://localhost:9091";
    let (status, body) = get(web)?;
    eprintln!("denied, web answered {status}:\n{body}");
    ensure!(status == 500, "denied: expected 500, got {status}: {body}");
    let call = upstream_call(&body, upstream)?;
    ensure!(
        call["code"] != 200
            && call
                .get("error")
                .is_some_and(|e| e.as_str().is_some_and(|e| !e.is_empty())),
        "the failed upstream call carries its error: {call}"
    );

    mesh.meshctl(&["intention", "create", "-allow", allow.0, allow.1])?;
    let body = mesh.wait(
        "a 200 from web after the allow",
        Duration::from_secs(15),
        |_| {
            let (status, body) = get(web)?;
            Ok((status == 200).then_some(body))
        },
    )?;
    eprintln!("allowed, web answered 200:\n{body}");
    let call = upstream_call(&body, upstream)?;
    ensure!(call["code"] == 200, "upstream call: {call}");
    ensure!(
        call["body"] == "Response from API v1" && call["name"] == "api-v1",
        "api-v1's answer inside upstream_calls: {call}"
    );
    // Transparent mode: the app in web dials api-v1's virtual IP itself.
    let out = in_pod("default", "web-0", &["http-get", &transparent])?;
    ensure!(
        out.starts_with("HTTP/1.1 200") && out.contains("Response from API v1"),
        "allowed: web's app by api-v1's virtual IP got {out}"
    );

    // Deleting the manifests removes every pod with its namespace and cgroup.
    let out = mesh.meshctl(&["delete", "-f", dir.to_str().context("path")?])?;
    ensure!(
        out.lines().count() >= files.len() && out.lines().all(|l| l.ends_with(" deleted")),
        "delete said {out:?}"
    );
    mesh.wait("every pod gone", Duration::from_secs(30), |m| {
        Ok(m.pods()?.is_empty().then_some(()))
    })?;
    let emptied = footprint()?;
    ensure!(
        emptied.netns == node.netns,
        "network namespaces left after delete: {:?}",
        emptied.netns.difference(&node.netns).collect::<Vec<_>>()
    );
    ensure!(
        emptied.cgroups == node.cgroups,
        "cgroups left after delete: {:?}",
        emptied
            .cgroups
            .difference(&node.cgroups)
            .collect::<Vec<_>>()
    );

    // Ctrl-C removes the node too.
    mesh.stop()?;
    let after = footprint()?;
    ensure!(
        after == before,
        "left behind by meshd local: {before:?} vs {after:?}"
    );
    Ok(())
}

#[test]
fn tutorial_in_one_namespace_ebpf() -> Result<()> {
    walkthrough(
        "ebpf",
        &examples(),
        ("*", "*"),
        ("web", "api-v1"),
        &["default/api-v1-0", "default/web-0"],
    )
}

#[test]
fn tutorial_in_one_namespace_iptables() -> Result<()> {
    walkthrough(
        "iptables",
        &examples(),
        ("*", "*"),
        ("web", "api-v1"),
        &["default/api-v1-0", "default/web-0"],
    )
}

#[test]
fn tutorial_across_namespaces_ebpf() -> Result<()> {
    walkthrough(
        "ebpf",
        &examples().join("namespaces"),
        ("*/*", "*/*"),
        ("default/web", "backend/api-v1"),
        &["backend/api-v1-0", "default/web-0"],
    )
}

#[test]
fn tutorial_across_namespaces_iptables() -> Result<()> {
    walkthrough(
        "iptables",
        &examples().join("namespaces"),
        ("*/*", "*/*"),
        ("default/web", "backend/api-v1"),
        &["backend/api-v1-0", "default/web-0"],
    )
}

#[test]
fn malformed_manifests_are_refused_and_change_nothing() -> Result<()> {
    let mut mesh = LocalMesh::start("ebpf")?;
    let api = examples().join("api-v1.yaml");
    mesh.meshctl(&["apply", "-f", api.to_str().context("path")?])?;
    mesh.wait_ready(&["default/api-v1-0"])?;
    let pods = mesh.pods()?;
    let services = mesh.meshctl(&["get", "services", "-A", "-o", "json"])?;
    let dir = tempfile::tempdir()?;

    // A bad upstream entry refuses the whole manifest, with consul-k8s's message.
    let web = std::fs::read_to_string(examples().join("web.yaml"))?;
    let bad_upstream = dir.path().join("bad-upstream.yaml");
    std::fs::write(
        &bad_upstream,
        web.replace("'api-v1:9091'", "'api-v1:9091,api-v2'"),
    )?;
    let err = mesh.meshctl_fails(&["apply", "-f", bad_upstream.to_str().context("path")?])?;
    ensure!(
        err.contains("upstream structured incorrectly: api-v2"),
        "error for a malformed upstream: {err}"
    );

    // YAML that does not parse, and a Deployment with a wrong field type.
    let broken = dir.path().join("broken.yaml");
    std::fs::write(
        &broken,
        "apiVersion: v1\nkind: Service\nmetadata: [name: x\n",
    )?;
    let err = mesh.meshctl_fails(&["apply", "-f", broken.to_str().context("path")?])?;
    ensure!(
        err.contains("broken.yaml"),
        "the error names the file: {err}"
    );
    let replicas = dir.path().join("replicas.yaml");
    std::fs::write(&replicas, web.replace("replicas: 1", "replicas: three"))?;
    let err = mesh.meshctl_fails(&["apply", "-f", replicas.to_str().context("path")?])?;
    ensure!(
        err.contains("spec.replicas"),
        "the error names the field: {err}"
    );

    ensure!(mesh.pods()? == pods, "a refused manifest changed the pods");
    ensure!(
        mesh.meshctl(&["get", "services", "-A", "-o", "json"])? == services,
        "a refused manifest changed the services"
    );
    mesh.stop()
}

#[test]
fn a_restarted_node_brings_back_pods_intentions_and_tokens() -> Result<()> {
    let before = footprint()?;
    let mut mesh = LocalMesh::start("ebpf")?;
    mesh.meshctl(&["intention", "create", "-deny", "*/*", "*/*"])?;
    mesh.meshctl(&["intention", "create", "-allow", "web", "api-v1"])?;
    let created = mesh.meshctl(&[
        "acl",
        "token",
        "create",
        "-description",
        "ci",
        "-policy",
        "read-only",
    ])?;
    mesh.meshctl(&["apply", "-f", examples().to_str().context("path")?])?;
    let pods = ["default/api-v1-0", "default/web-0"];
    mesh.wait_ready(&pods)?;
    let intentions = mesh.meshctl(&["intention", "list"])?;
    let token = mesh.token.clone();

    let mut mesh = mesh.restart("ebpf")?;
    ensure!(mesh.token == token, "the bootstrap token changed");
    mesh.wait_ready(&pods)?;
    ensure!(
        mesh.meshctl(&["intention", "list"])? == intentions,
        "intentions differ after the restart"
    );
    let tokens = mesh.meshctl(&["acl", "token", "list"])?;
    let accessor = created
        .lines()
        .find_map(|l| l.strip_prefix("AccessorID:"))
        .map(str::trim)
        .with_context(|| format!("no AccessorID in {created}"))?;
    ensure!(tokens.contains(accessor), "token {accessor} lost: {tokens}");
    let web = mesh.port_forward("web", 9090)?;
    let (status, body) = get(web)?;
    ensure!(
        status == 200,
        "after the restart web answered {status}: {body}"
    );
    ensure!(
        upstream_call(&body, "http://localhost:9091")?["body"] == "Response from API v1",
        "api-v1's answer after the restart: {body}"
    );

    // `--reset` on a stopped node removes what it kept, so nothing comes back.
    let (meshd, state_dir, addr) = (
        mesh.meshd.clone(),
        mesh.state.path().to_path_buf(),
        mesh.http_addr.clone(),
    );
    mesh.stop_agent()?;
    let reset = Command::new(&meshd)
        .args(["local", "--node", NODE, "--reset"])
        .env("MESH_STATE_DIR", &state_dir)
        .env("MESH_HTTP_ADDR", &addr)
        .output()?;
    ensure!(reset.status.success(), "reset failed: {reset:?}");
    ensure!(footprint()? == before, "left behind after --reset");
    let state = std::mem::replace(&mut mesh.state, tempfile::tempdir()?);
    drop(mesh);
    let mesh = LocalMesh::start_in("ebpf", state, addr)?;
    ensure!(mesh.pods()?.is_empty(), "pods came back after --reset");
    // `meshctl intention list` exits 2 with "There are no intentions." when there are none,
    // as Consul's does.
    let out = mesh.meshctl_as(&mesh.token, &["intention", "list"])?;
    let intentions = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        intentions.contains("There are no intentions"),
        "intentions came back after --reset: {intentions}"
    );
    mesh.stop()
}

#[test]
fn a_service_port_reaches_its_target_port_in_both_modes() -> Result<()> {
    let dir = tempfile::tempdir()?;
    // api-v1 offers port 80 on its virtual IP; its app listens on 9091 (`targetPort`).
    let api = std::fs::read_to_string(examples().join("api-v1.yaml"))?;
    let remapped = api.replace(
        "    - port: 9091\n      targetPort: 9091",
        "    - port: 80\n      targetPort: 9091",
    );
    ensure!(remapped != api, "examples/api-v1.yaml changed shape");
    std::fs::write(dir.path().join("api-v1.yaml"), remapped)?;
    std::fs::copy(examples().join("web.yaml"), dir.path().join("web.yaml"))?;
    for redirect in ["ebpf", "iptables"] {
        let mut mesh = LocalMesh::start(redirect)?;
        mesh.meshctl(&["apply", "-f", dir.path().to_str().context("path")?])?;
        mesh.wait_ready(&["default/api-v1-0", "default/web-0"])?;
        let vip = cluster_ip(&mesh, "default", "api-v1")?;
        // `meshd local` denies by default: nothing answers until the allow.
        let out = in_pod("default", "web-0", &["http-get", &format!("{vip}:80")])?;
        ensure!(
            !out.contains("Response from API v1"),
            "{redirect}: denied by default, yet api-v1 answered on port 80: {out}"
        );
        mesh.meshctl(&["intention", "create", "-allow", "web", "api-v1"])?;
        // The agent puts the allow into the kernel after the API has stored it (as Consul's
        // intentions propagate, asynchronously): a connect just after may still get EPERM.
        mesh.wait(
            &format!("{redirect}: api-v1 on its virtual IP's port 80"),
            Duration::from_secs(10),
            |_| {
                let out = in_pod("default", "web-0", &["http-get", &format!("{vip}:80")])?;
                ensure!(
                    out.starts_with("HTTP/1.1 200") && out.contains("Response from API v1"),
                    "{redirect}: api-v1's virtual IP on port 80 gave {out}"
                );
                Ok(Some(()))
            },
        )?;
        // The explicit upstream reaches the same app.
        let web = mesh.port_forward("web", 9090)?;
        let (status, body) = get(web)?;
        ensure!(status == 200, "{redirect}: web answered {status}: {body}");
        mesh.stop()?;
    }
    Ok(())
}

/// What a pod process of [`SANDBOX_PODS`] finds out about itself, one `key=value` per line.
const SANDBOX_SCRIPT: &str = r#"
echo "uid=$(id -u)"
echo "gid=$(id -g)"
grep -E '^(CapInh|CapPrm|CapEff|CapBnd|CapAmb|NoNewPrivs):' /proc/self/status | tr -d ' \t' | tr ':' '='
if cat "$TOKEN_FILE" >/dev/null 2>&1; then echo token=read; else echo token=unreadable; fi
echo "state_entries=$(ls -A "$STATE_DIR" 2>/dev/null | wc -l)"
if [ -e /run/netns/$OTHER_NETNS ]; then echo netns_name=visible; else echo netns_name=hidden; fi
if nsenter --net=/run/netns/$OTHER_NETNS true 2>/dev/null; then echo netns_by_name=entered; else echo netns_by_name=refused; fi
echo "kernel_mounts=$(grep -cE ' - (cgroup|cgroup2|bpf) ' /proc/self/mountinfo)"
if echo $$ > "$CGROUP_PROCS" 2>/dev/null; then echo cgroup_move=done; else echo cgroup_move=refused; fi
echo "cgroup=$(grep '^0::' /proc/self/cgroup)"
echo "hosts_has_self=$(grep -c "$HOSTNAME" /etc/hosts)"
echo "proc_sys=$(awk '$5 == "/proc/sys" { split($6, o, ","); print o[1] }' /proc/self/mountinfo | tail -n 1)"
# Every process this one can see in /proc: its own pod's only (its own PID namespace), so no
# other pod's or the host's namespace is reachable through /proc/<pid>/ns.
own=$(readlink /proc/self/ns/net); own_cg=$(grep '^0::' /proc/self/cgroup)
foreign=0; entered=0
for p in /proc/[0-9]*; do
  cg=$(grep '^0::' $p/cgroup 2>/dev/null) || continue
  [ "$cg" = "$own_cg" ] && continue
  foreign=$((foreign+1))
  n=$(readlink $p/ns/net 2>/dev/null) || continue
  if [ "$n" != "$own" ] && nsenter --net=$p/ns/net true 2>/dev/null; then entered=$((entered+1)); fi
done
echo "foreign_procs=$foreign"
echo "setns_entered=$entered"
echo "pid1=$(cat /proc/1/comm)"
if kill -0 "$MESHD_PID" 2>/dev/null; then echo meshd_signal=delivered; else echo meshd_signal=refused; fi
echo DONE
exec sleep 3600
"#;

/// Two pods running as root (each the other's neighbour) and one with
/// `securityContext.runAsUser: 1000`, each running [`SANDBOX_SCRIPT`]; `pods_cgroup` is
/// where the runner makes pod cgroups.
fn sandbox_pods(state: &Path, pods_cgroup: &Path, meshd_pid: u32) -> String {
    let script: String = SANDBOX_SCRIPT
        .trim_start()
        .lines()
        .map(|l| format!("          {l}\n"))
        .collect();
    let pod = |name: &str, other: &str, security: &str| {
        format!(
            r#"---
apiVersion: v1
kind: Pod
metadata:
  name: {name}
spec:
{security}  containers:
    - name: probe
      image: busybox
      command:
        - sh
        - -c
        - |
{script}      env:
        - name: TOKEN_FILE
          value: {token}
        - name: STATE_DIR
          value: {state}
        - name: OTHER_NETNS
          value: {NODE}-default_{other}
        - name: CGROUP_PROCS
          value: {procs}
        - name: MESHD_PID
          value: "{meshd_pid}"
"#,
            token = state.join("acl-bootstrap-token").display(),
            state = state.display(),
            procs = pods_cgroup
                .join(format!("default_{other}/cgroup.procs"))
                .display(),
        )
    };
    [
        pod("probe-a", "probe-b", ""),
        pod("probe-b", "probe-a", ""),
        pod(
            "probe-u",
            "probe-a",
            "  securityContext:\n    runAsUser: 1000\n",
        ),
    ]
    .concat()
}

/// A capability set from `/proc/self/status` (hex), as bits.
fn cap_bits(facts: &std::collections::BTreeMap<String, String>, key: &str) -> Result<u64> {
    let hex = facts.get(key).with_context(|| format!("no {key}"))?;
    u64::from_str_radix(hex, 16).with_context(|| format!("{key}={hex}"))
}

#[test]
fn pod_processes_run_without_the_agents_privileges() -> Result<()> {
    const CAP_NET_ADMIN: u32 = 12;
    const CAP_NET_RAW: u32 = 13;
    const CAP_SYS_PTRACE: u32 = 19;
    const CAP_SYS_ADMIN: u32 = 21;
    const CAP_SYS_MODULE: u32 = 16;
    const CAP_DAC_READ_SEARCH: u32 = 2;
    const CAP_BPF: u32 = 39;
    const CAP_PERFMON: u32 = 38;
    const FORBIDDEN: [u32; 8] = [
        CAP_NET_ADMIN,
        CAP_NET_RAW,
        CAP_SYS_PTRACE,
        CAP_SYS_ADMIN,
        CAP_SYS_MODULE,
        CAP_DAC_READ_SEARCH,
        CAP_BPF,
        CAP_PERFMON,
    ];
    let mut mesh = LocalMesh::start("ebpf")?;
    let state = mesh.state.path().to_path_buf();
    ensure!(
        state.join("acl-bootstrap-token").exists(),
        "no token file to hide"
    );
    // Each pod tries to move itself into its neighbour's cgroup.
    let pods_cgroup = mesh_dataplane::cgroup::v2_root()?.join(format!("mesh-{NODE}/pods"));
    let dir = tempfile::tempdir()?;
    let manifest = dir.path().join("sandbox.yaml");
    let meshd_pid = mesh.agent.as_ref().context("meshd is not running")?.id();
    std::fs::write(&manifest, sandbox_pods(&state, &pods_cgroup, meshd_pid))?;
    mesh.meshctl(&["apply", "-f", manifest.to_str().context("path")?])?;
    mesh.wait_ready(&["default/probe-a", "default/probe-b", "default/probe-u"])?;

    let mut facts = std::collections::BTreeMap::new();
    for pod in ["probe-a", "probe-b", "probe-u"] {
        let log = state.join(format!("local/logs/default_{pod}_probe.log"));
        let text = mesh.wait(&format!("{pod}'s report"), Duration::from_secs(60), |_| {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            Ok(text.contains("DONE").then_some(text))
        })?;
        let f: std::collections::BTreeMap<String, String> = text
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        facts.insert(pod, (f, text));
    }
    for (pod, (f, text)) in &facts {
        let is = |k: &str, v: &str| f.get(k).map(String::as_str) == Some(v);
        ensure!(is("NoNewPrivs", "1"), "{pod}: no_new_privs unset:\n{text}");
        for key in ["CapEff", "CapPrm", "CapBnd", "CapInh", "CapAmb"] {
            let bits = cap_bits(f, key)?;
            for cap in FORBIDDEN {
                ensure!(
                    bits & (1 << cap) == 0,
                    "{pod}: capability {cap} in {key}:\n{text}"
                );
            }
        }
        ensure!(is("token", "unreadable"), "{pod} read the token:\n{text}");
        ensure!(
            is("state_entries", "0"),
            "{pod} sees the state directory:\n{text}"
        );
        ensure!(
            is("netns_name", "hidden") && is("netns_by_name", "refused"),
            "{pod} reached another pod's namespace by name:\n{text}"
        );
        ensure!(
            is("kernel_mounts", "0"),
            "{pod} sees cgroup or bpf mounts:\n{text}"
        );
        ensure!(
            is("cgroup_move", "refused"),
            "{pod} moved itself to another pod's cgroup:\n{text}"
        );
        ensure!(
            f.get("cgroup")
                .is_some_and(|c| c.ends_with(&format!("/mesh-{NODE}/pods/default_{pod}"))),
            "{pod} is not in its own cgroup:\n{text}"
        );
        ensure!(
            is("hosts_has_self", "1"),
            "{pod}'s hosts file is not its own:\n{text}"
        );
        ensure!(
            is("proc_sys", "ro"),
            "{pod}: /proc/sys is writable:\n{text}"
        );
        ensure!(
            is("setns_entered", "0"),
            "{pod} entered another pod's namespace:\n{text}"
        );
        // Its own PID namespace: no process of the agent, the host or another pod in sight,
        // meshd's pod init as PID 1, and the agent out of reach of its signals.
        ensure!(
            is("foreign_procs", "0"),
            "{pod} sees processes outside its pod:\n{text}"
        );
        ensure!(
            is("pid1", "meshd-pod-init"),
            "{pod}'s PID 1 is not meshd's pod init:\n{text}"
        );
        ensure!(
            is("meshd_signal", "refused"),
            "{pod} could signal meshd (pid {meshd_pid}):\n{text}"
        );
    }
    for pod in ["probe-a", "probe-b"] {
        let (f, text) = &facts[pod];
        ensure!(
            f.get("uid").map(String::as_str) == Some("0"),
            "{pod}: {text}"
        );
    }
    let (f, text) = &facts["probe-u"];
    ensure!(
        f.get("uid").map(String::as_str) == Some("1000"),
        "runAsUser 1000 not honoured:\n{text}"
    );
    for key in ["CapEff", "CapPrm", "CapBnd"] {
        ensure!(
            cap_bits(f, key)? == 0,
            "probe-u (uid 1000) holds capabilities in {key}:\n{text}"
        );
    }
    mesh.stop()
}

// ---------------------------------------------------------------------------------------------
// Fail closed: the longest valid names are meshed, and a pod the agent cannot mesh does not run
// (`meshctl get pods` says why).
// ---------------------------------------------------------------------------------------------

/// The network namespace and cgroup of pod `namespace/name`, found by the prefix the runner
/// keeps when it shortens long names (`<node>-<namespace>_<name>`, `<namespace>_<name>`).
fn pod_objects(namespace: &str, name: &str) -> Result<(String, PathBuf)> {
    let find = |dir: &Path, prefix: &str| -> Result<String> {
        let full: String = prefix.chars().take(100).collect();
        let found: Vec<String> = std::fs::read_dir(dir)?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(&full))
            .collect();
        ensure!(
            found.len() == 1,
            "one entry starting with {full} in {}: {found:?}",
            dir.display()
        );
        Ok(found[0].clone())
    };
    let netns = find(
        Path::new("/run/netns"),
        &format!("{NODE}-{namespace}_{name}"),
    )?;
    let pods = mesh_dataplane::cgroup::v2_root()?.join(format!("mesh-{NODE}/pods"));
    let cgroup = pods.join(find(&pods, &format!("{namespace}_{name}"))?);
    Ok((netns, cgroup))
}

/// `mesh-probe args` as a process of pod `namespace/name` with any name length.
fn in_long_pod(namespace: &str, name: &str, args: &[&str]) -> Result<String> {
    let (netns, cgroup) = pod_objects(namespace, name)?;
    let out = wait_limit(
        spawn_probe(&Path::new("/run/netns").join(netns), &cgroup, args)?,
        Duration::from_secs(30),
    )?;
    Ok(format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    ))
}

/// The pod `namespace/name` of `meshctl get pods -A -o json`.
fn pod_json(mesh: &LocalMesh, namespace: &str, name: &str) -> Result<Value> {
    mesh.pods()?
        .into_iter()
        .find(|p| p["metadata"]["namespace"] == namespace && p["metadata"]["name"] == name)
        .with_context(|| format!("no pod {namespace}/{name}"))
}

#[test]
fn a_pod_with_the_longest_valid_names_is_meshed() -> Result<()> {
    // A 63-character namespace (a DNS label) and a 253-character pod name (a DNS subdomain):
    // the longest Kubernetes takes. Together far longer than a bpffs pin name, a file name or
    // the runner's network namespace names allow.
    let ns = format!("long-namespace-{}", "n".repeat(48));
    let pod = format!(
        "api-v1-{}.{}.{}.{}",
        "a".repeat(56),
        "b".repeat(63),
        "c".repeat(63),
        "d".repeat(61)
    );
    assert_eq!((ns.len(), pod.len()), (63, 253));
    let dir = tempfile::tempdir()?;
    // api-v1 as the tutorial writes it, as a Pod in the long namespace.
    let manifest = |pod: &str| {
        format!(
            "apiVersion: v1
kind: Namespace
metadata:
  name: {ns}
---
apiVersion: v1
kind: ServiceAccount
metadata:
  name: api-v1
  namespace: {ns}
---
apiVersion: v1
kind: Service
metadata:
  name: api-v1
  namespace: {ns}
spec:
  selector:
    app: api-v1
  ports:
    - port: 9091
      targetPort: 9091
---
apiVersion: v1
kind: Pod
metadata:
  name: {pod}
  namespace: {ns}
  labels:
    app: api-v1
  annotations:
    consul.hashicorp.com/connect-inject: 'true'
spec:
  serviceAccountName: api-v1
  containers:
    - name: api
      image: nicholasjackson/fake-service:v0.26.2
      ports:
        - containerPort: 9091
      env:
        - name: LISTEN_ADDR
          value: 127.0.0.1:9091
        - name: NAME
          value: api-v1
        - name: MESSAGE
          value: Response from API v1
"
        )
    };
    std::fs::write(dir.path().join("api-v1.yaml"), manifest(&pod))?;
    // The client: the tutorial's web, without its upstream (it dials api-v1's virtual IP).
    let web = std::fs::read_to_string(examples().join("web.yaml"))?;
    let web = web.replace(
        "        consul.hashicorp.com/connect-service-upstreams: 'api-v1:9091'\n",
        "",
    );
    ensure!(
        !web.contains("upstreams"),
        "examples/web.yaml changed shape"
    );
    std::fs::write(dir.path().join("web.yaml"), web)?;

    let before = footprint()?;
    let mut mesh = LocalMesh::start("ebpf")?;
    mesh.meshctl(&["intention", "create", "-deny", "*/*", "*/*"])?;
    mesh.meshctl(&["apply", "-f", dir.path().to_str().context("path")?])?;
    let long_id = format!("{ns}/{pod}");
    mesh.wait_ready(&[&long_id, "default/web-0"])?;

    // A pod name one character too long for Kubernetes is refused, naming it, and changes
    // nothing.
    let subdomain = format!("{pod}d");
    assert_eq!(subdomain.len(), 254);
    let refused = tempfile::tempdir()?;
    let refused = refused.path().join("long.yaml");
    std::fs::write(&refused, manifest(&subdomain))?;
    let err = mesh.meshctl_fails(&["apply", "-f", refused.to_str().context("path")?])?;
    ensure!(err.contains(&subdomain), "the refusal names the pod: {err}");
    mesh.wait_ready(&[&long_id, "default/web-0"])?;

    // Its kernel objects exist under names that fit, starting as the short ones would.
    let (netns, cgroup) = pod_objects(&ns, &pod)?;
    ensure!(netns.len() <= 128, "netns name {netns}");
    let dir_name = cgroup.file_name().context("cgroup")?.to_string_lossy();
    ensure!(dir_name.len() <= 128, "cgroup directory {dir_name}");
    ensure!(
        std::fs::read_to_string(format!("/etc/netns/{netns}/hosts"))?.contains("api-v1"),
        "the long pod's hosts file"
    );

    // The agent serves it.
    let proxy = mesh.meshctl(&["proxy", "read", &pod, "-n", &ns, "-o", "json"])?;
    ensure!(proxy.contains("api-v1"), "proxy read: {proxy}");

    // Denied: web's app gets no answer from it.
    let vip = cluster_ip(&mesh, &ns, "api-v1")?;
    let target = format!("{vip}:9091");
    let out = in_pod("default", "web-0", &["http-get", &target])?;
    ensure!(
        !out.contains("Response from API v1"),
        "denied, yet the long-named api-v1 answered: {out}"
    );
    // Allowed: a 200 through the mesh.
    mesh.meshctl(&[
        "intention",
        "create",
        "-allow",
        "default/web",
        &format!("{ns}/api-v1"),
    ])?;
    let out = mesh.wait(
        "a 200 from the long-named api-v1",
        Duration::from_secs(15),
        |_| {
            let out = in_pod("default", "web-0", &["http-get", &target])?;
            Ok(out.starts_with("HTTP/1.1 200").then_some(out))
        },
    )?;
    ensure!(out.contains("Response from API v1"), "allowed: {out}");
    // And the long pod's own app reaches its own port 127.0.0.1:9091 (its netns works).
    let own = in_long_pod(&ns, &pod, &["http-get", "127.0.0.1:9091"])?;
    ensure!(
        own.contains("Response from API v1"),
        "in the long pod: {own}"
    );

    // Ctrl-C finds and removes the shortened names too.
    mesh.stop()?;
    let after = footprint()?;
    ensure!(
        after == before,
        "left behind by meshd local: {before:?} vs {after:?}"
    );
    Ok(())
}

#[test]
fn a_pod_the_agent_cannot_mesh_does_not_run_and_get_pods_says_why() -> Result<()> {
    // No manifest alone makes the agent fail: the catalog's checks (ports, names, counts)
    // refuse such a pod at apply. So the kernel refuses instead: the pod's loopback loses
    // 127.0.0.1, and the agent cannot bind the pod's outbound listener (127.0.0.1:15001)
    // when a catalog change makes it mesh the pod again.
    let mut mesh = LocalMesh::start("ebpf")?;
    let dir = tempfile::tempdir()?;
    // api-v1 without a containerPort: its app port comes from its Service's targetPort, so a
    // change to the Service changes the pod's catalog entry (and the agent meshes it again)
    // while its processes keep running.
    let api = std::fs::read_to_string(examples().join("api-v1.yaml"))?;
    let one_port = api.replace("          ports:\n            - containerPort: 9091\n", "");
    ensure!(one_port != api, "examples/api-v1.yaml changed shape");
    let two_ports = one_port.replace(
        "    - port: 9091\n      targetPort: 9091\n",
        "    - port: 9091\n      targetPort: 9091\n      name: http\n    - port: 9092\n      targetPort: 9092\n      name: extra\n",
    );
    ensure!(two_ports != one_port, "examples/api-v1.yaml changed shape");
    let file = dir.path().join("api-v1.yaml");
    let file_str = file.to_str().context("path")?.to_string();
    std::fs::write(&file, &one_port)?;
    mesh.meshctl(&["apply", "-f", &file_str])?;
    mesh.wait_ready(&["default/api-v1-0"])?;
    let (netns, cgroup) = pod_objects("default", "api-v1-0")?;
    let procs = |cgroup: &Path| -> Result<String> {
        Ok(std::fs::read_to_string(cgroup.join("cgroup.procs"))?
            .trim()
            .to_string())
    };
    ensure!(!procs(&cgroup)?.is_empty(), "api-v1 runs");

    let ip = |args: &[&str]| -> Result<()> {
        let out = Command::new("ip")
            .arg("-n")
            .arg(&netns)
            .args(args)
            .output()?;
        ensure!(out.status.success(), "ip {args:?}: {out:?}");
        Ok(())
    };
    ip(&["addr", "del", "127.0.0.1/8", "dev", "lo"])?;
    std::fs::write(&file, &two_ports)?;
    let out = mesh.meshctl_as(&mesh.token, &["apply", "-f", &file_str])?;
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        !out.status.success() && said.contains("could not mesh"),
        "apply names the pod it could not mesh: {said}"
    );

    // Its running processes were stopped, and `get pods` says why.
    let status = mesh.wait("api-v1 stopped", Duration::from_secs(15), |m| {
        let p = pod_json(m, "default", "api-v1-0")?;
        Ok(procs(&cgroup)?.is_empty().then_some(p))
    })?;
    eprintln!("unmeshed pod: {status}");
    let waiting = &status["status"]["containerStatuses"][0]["state"]["waiting"];
    ensure!(
        waiting["reason"] == "MeshFailed"
            && waiting["message"]
                .as_str()
                .is_some_and(|m| m.contains("15001") || m.contains("address")),
        "the container waits with the agent's reason: {status}"
    );
    ensure!(
        status["status"]["mesh"]["error"].is_string()
            && status["status"]["mesh"]["proxyReady"] == false,
        "the mesh status carries the error: {status}"
    );
    ensure!(
        status["status"]["phase"] == "Pending"
            && !status["status"]["conditions"]
                .as_array()
                .context("conditions")?
                .iter()
                .any(|c| c["type"] == "Ready" && c["status"] == "True"),
        "not Ready: {status}"
    );
    let table = mesh.meshctl(&["get", "pods"])?;
    eprintln!("{table}");
    let row = table
        .lines()
        .find(|l| l.starts_with("api-v1-0"))
        .with_context(|| format!("no api-v1-0 row: {table}"))?;
    ensure!(
        row.contains("0/1") && row.contains("MeshFailed"),
        "STATUS says MeshFailed: {table}"
    );
    // The restart back-off does not bring it back either.
    std::thread::sleep(Duration::from_secs(12));
    ensure!(procs(&cgroup)?.is_empty(), "api-v1 was restarted unmeshed");

    // Once the pod's network works again, the next apply meshes it and it starts.
    ip(&["addr", "add", "127.0.0.1/8", "dev", "lo"])?;
    std::fs::write(&file, &one_port)?;
    let again = mesh.meshctl(&["apply", "-f", &file_str])?;
    ensure!(again.contains("configured"), "re-apply said {again}");
    mesh.wait_ready(&["default/api-v1-0"])?;
    ensure!(!procs(&cgroup)?.is_empty(), "api-v1 runs again");
    let p = pod_json(&mesh, "default", "api-v1-0")?;
    ensure!(
        p["status"]["mesh"]["error"].is_null() && p["status"]["mesh"]["proxyReady"] == true,
        "meshed again: {p}"
    );
    mesh.stop()
}

/// A request to the agent's HTTP API with the bootstrap token: (status, `X-Consul-Index`,
/// JSON body). `read_timeout` bounds a blocking query.
fn api(
    mesh: &LocalMesh,
    method: &str,
    path: &str,
    body: Option<&Value>,
    read_timeout: Duration,
) -> Result<(u16, u64, Value)> {
    http_api(
        &mesh.http_addr,
        &mesh.token,
        method,
        path,
        body,
        read_timeout,
    )
}

/// [`api`] to the API at `addr` with `token` (for another thread).
fn http_api(
    addr: &str,
    token: &str,
    method: &str,
    path: &str,
    body: Option<&Value>,
    read_timeout: Duration,
) -> Result<(u16, u64, Value)> {
    let body = body.map(Value::to_string).unwrap_or_default();
    let HttpAnswer { status, head, body } = http(
        addr.parse()?,
        method,
        path,
        Some(token),
        &body,
        read_timeout,
    )?;
    let index = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("x-consul-index:")
                .map(|v| v.trim().to_owned())
        })
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let json = serde_json::from_str(&body).with_context(|| format!("{path}: {body:?}"))?;
    Ok((status, index, json))
}

/// The entry of a JSON list whose `Name` (and `Namespace`) are these.
fn named<'v>(list: &'v Value, ns: &str, name: &str) -> Result<&'v Value> {
    list.as_array()
        .context("not a list")?
        .iter()
        .find(|s| s["Name"] == name && s["Namespace"] == ns)
        .with_context(|| format!("no {ns}/{name} in {list}"))
}

/// Consul's UI API on a running `meshd local` with the tutorial applied: the services page
/// (both services, one Ready instance each, in the mesh), web's instance with its upstream
/// and passing readiness check, web's topology with the call to api-v1 denied by the
/// deny-all, and a blocking query on it that returns with the edge allowed once the allow
/// intention is created.
#[test]
fn consuls_ui_api_shows_the_tutorial() -> Result<()> {
    let mut mesh = LocalMesh::start("ebpf")?;
    mesh.meshctl(&["intention", "create", "-deny", "*", "*"])?;
    mesh.meshctl(&["apply", "-f", examples().to_str().context("path")?])?;
    mesh.wait_ready(&["default/api-v1-0", "default/web-0"])?;
    let long = Duration::from_secs(20);

    let (status, _, v) = api(&mesh, "GET", "/v1/catalog/datacenters", None, long)?;
    ensure!(
        status == 200 && v == serde_json::json!(["dc1"]),
        "{status} {v}"
    );

    // The services page follows readiness within the agent's 1 s tick.
    let services = mesh.wait("both services healthy", Duration::from_secs(10), |m| {
        let (_, _, v) = api(m, "GET", "/v1/internal/ui/services", None, long)?;
        let healthy = ["web", "api-v1"].iter().all(|n| {
            named(&v, "default", n).is_ok_and(|s| {
                s["InstanceCount"] == 1 && s["ChecksPassing"] == 1 && s["ChecksCritical"] == 0
            })
        });
        Ok(healthy.then_some(v))
    })?;
    let web = named(&services, "default", "web")?;
    ensure!(
        web["ConnectedWithProxy"] == true
            && web["TransparentProxy"] == true
            && web["Nodes"] == serde_json::json!(["lt-virtual"])
            && web["ExternalSources"] == serde_json::json!(["kubernetes"]),
        "web's summary: {web}"
    );

    let (_, _, v) = api(&mesh, "GET", "/v1/health/service/web", None, long)?;
    let e = &v[0];
    ensure!(
        e["Service"]["ID"] == "web-0-web"
            && e["Service"]["Port"] == 9090
            && e["Service"]["Proxy"]["Upstreams"][0]["DestinationName"] == "api-v1"
            && e["Service"]["Proxy"]["Upstreams"][0]["LocalBindPort"] == 9091
            && e["Checks"][0]["Name"] == "Kubernetes Readiness Check"
            && e["Checks"][0]["Status"] == "passing"
            && e["Node"]["Node"] == "lt-virtual",
        "web's instance: {v}"
    );

    // web's topology: api-v1 denied by the deny-all.
    let topology = "/v1/internal/ui/service-topology/web?kind=";
    let (status, index, v) = api(&mesh, "GET", topology, None, long)?;
    ensure!(status == 200 && index > 0, "{status} {index} {v}");
    let up = named(&v["Upstreams"], "default", "api-v1")?;
    ensure!(
        up["Source"] == "proxy-registration"
            && up["Intention"]["Allowed"] == false
            && up["Intention"]["HasExact"] == false
            && up["DecidedBy"]["Kind"] == "intention"
            && up["DecidedBy"]["Action"] == "deny",
        "denied edge: {up}"
    );

    // A blocking query on it wakes when the allow is created.
    let waiting = {
        let (addr, token) = (mesh.http_addr.clone(), mesh.token.clone());
        let path = format!("{topology}&index={index}&wait=60s");
        std::thread::spawn(move || {
            let started = Instant::now();
            let answer = http_api(&addr, &token, "GET", &path, None, Duration::from_secs(90));
            (answer, started.elapsed())
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    ensure!(
        !waiting.is_finished(),
        "the blocking query answered before any change"
    );
    mesh.meshctl(&["intention", "create", "-allow", "web", "api-v1"])?;
    let (answer, took) = waiting
        .join()
        .map_err(|_| anyhow!("the blocking query's thread panicked"))?;
    let (status, new_index, v) = answer?;
    ensure!(status == 200, "{status} {v}");
    ensure!(
        took < Duration::from_secs(30),
        "the blocking query took {took:?}"
    );
    ensure!(new_index > index, "index {index} then {new_index}");
    let up = named(&v["Upstreams"], "default", "api-v1")?;
    ensure!(
        up["Intention"]["Allowed"] == true
            && up["Intention"]["HasExact"] == true
            && up["DecidedBy"]["SourceName"] == "web",
        "allowed edge: {up}"
    );

    // The bootstrap token may write intentions.
    let ask = serde_json::json!([{"Resource": "intention", "Access": "write"}]);
    let (status, _, v) = api(
        &mesh,
        "POST",
        "/v1/internal/acl/authorize",
        Some(&ask),
        long,
    )?;
    ensure!(status == 200 && v[0]["Allow"] == true, "{status} {v}");
    mesh.stop()
}

const API_V1_INTENTIONS: &str = "apiVersion: consul.hashicorp.com/v1alpha1
kind: ServiceIntentions
metadata:
  name: api-v1
spec:
  destination:
    name: api-v1
  sources:
    - name: web
      action: allow
";

/// consul-k8s's ServiceIntentions through `meshctl apply -f`: the allow takes effect, `meshctl
/// get serviceintentions` says it is synced, the CLI cannot change its intentions, and
/// deleting the object takes the allow away again. An upstream to a peer is refused at apply.
#[test]
fn service_intentions_objects_allow_are_read_only_and_deleting_them_denies_again() -> Result<()> {
    let mut mesh = LocalMesh::start("ebpf")?;
    mesh.meshctl(&["intention", "create", "-deny", "*", "*"])?;
    let dir = tempfile::tempdir()?;
    let web = std::fs::read_to_string(examples().join("web.yaml"))?;
    let peer = dir.path().join("peer.yaml");
    std::fs::write(
        &peer,
        web.replace("'api-v1:9091'", "'api-v1.svc.default.ns.other.peer:9091'"),
    )?;
    let err = mesh.meshctl_fails(&["apply", "-f", peer.to_str().context("path")?])?;
    ensure!(
        err.contains("connect-service-upstreams") && err.contains("cluster peering"),
        "a peer upstream is refused, naming the annotation and why: {err}"
    );
    for f in ["api-v1.yaml", "web.yaml"] {
        mesh.meshctl(&["apply", "-f", examples().join(f).to_str().context("path")?])?;
    }
    mesh.wait_ready(&["default/api-v1-0", "default/web-0"])?;
    let web = mesh.port_forward("web", 9090)?;
    let (status, body) = get(web)?;
    ensure!(status == 500, "denied: expected 500, got {status}: {body}");

    let crd = dir.path().join("intentions.yaml");
    std::fs::write(&crd, API_V1_INTENTIONS)?;
    let crd = crd.to_str().context("path")?;
    let out = mesh.meshctl(&["apply", "-f", crd])?;
    ensure!(
        out.contains("serviceintentions.consul.hashicorp.com/api-v1 created"),
        "apply said {out:?}"
    );
    mesh.wait(
        "a 200 from web after the CRD's allow",
        Duration::from_secs(15),
        |_| {
            let (status, _) = get(web)?;
            Ok((status == 200).then_some(()))
        },
    )?;
    let listed = mesh.meshctl(&["get", "serviceintentions"])?;
    let row: Vec<&str> = listed
        .lines()
        .nth(1)
        .context("no row")?
        .split_whitespace()
        .collect();
    ensure!(
        listed.starts_with("NAME") && row[..2] == ["api-v1", "True"],
        "get serviceintentions said {listed:?}"
    );

    // Read-only through the CLI: the allow stays.
    let err = mesh.meshctl_fails(&["intention", "create", "-replace", "-deny", "web", "api-v1"])?;
    ensure!(
        err.contains("managed by a Kubernetes ServiceIntentions"),
        "a CLI write to a CRD's intention: {err}"
    );
    let err = mesh.meshctl_fails(&["intention", "delete", "web", "api-v1"])?;
    ensure!(
        err.contains("managed by a Kubernetes ServiceIntentions"),
        "a CLI delete of a CRD's intention: {err}"
    );
    let (status, body) = get(web)?;
    ensure!(status == 200, "still allowed: got {status}: {body}");

    // Deleting the object deletes its intentions: denied again.
    let out = mesh.meshctl(&["delete", "-f", crd])?;
    ensure!(
        out.contains("serviceintentions.consul.hashicorp.com \"api-v1\" deleted"),
        "delete said {out:?}"
    );
    mesh.wait(
        "a 500 from web after the delete",
        Duration::from_secs(15),
        |_| {
            let (status, _) = get(web)?;
            Ok((status == 500).then_some(()))
        },
    )?;
    let err = mesh.meshctl_fails(&["intention", "get", "web", "api-v1"])?;
    ensure!(!err.is_empty(), "the CRD's intention is gone");
    mesh.stop()
}

/// Runs `curl` (with `-s`) as a process of pod `namespace/name`: in its network namespace and
/// its cgroup, as its app would. Returns stdout.
fn curl_in_pod(namespace: &str, name: &str, args: &[&str]) -> Result<String> {
    let netns = format!("{NODE}-{namespace}_{name}");
    let cgroup =
        mesh_dataplane::cgroup::v2_root()?.join(format!("mesh-{NODE}/pods/{namespace}_{name}"));
    ensure!(cgroup.exists(), "no cgroup {}", cgroup.display());
    // Into the cgroup first: `ip netns exec` mounts a fresh /sys, without the cgroup tree.
    let child = Command::new("sh")
        .arg("-c")
        .arg(r#"echo $$ > "$1/cgroup.procs" && shift && exec "$@""#)
        .arg("sh")
        .arg(&cgroup)
        .args(["ip", "netns", "exec", &netns])
        .args(["curl", "-sS", "--max-time", "10"])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running curl in the pod")?;
    let out = wait_limit(child, Duration::from_secs(30))?;
    ensure!(
        out.status.success(),
        "curl {args:?} in {namespace}/{name}: {}: {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// L7 intentions, as Consul's users write them: `service-defaults` makes api-v1 `http`, a
/// `service-intentions` entry gives web permissions, and curl in web's pod sees each request
/// decided (path, method, header, regex, precedence over a lower `*` allow), `403 RBAC: access
/// denied` answered on a connection that stays usable, a rule change applied to the next
/// request, and bad permissions refused at write time naming the field.
#[test]
fn l7_intentions_decide_each_http_request() -> Result<()> {
    require_root();
    let mut mesh = LocalMesh::start("ebpf")?;
    mesh.meshctl(&["intention", "create", "-deny", "*", "*"])?;
    for f in ["web.yaml", "api-v1.yaml"] {
        mesh.meshctl(&["apply", "-f", examples().join(f).to_str().context("path")?])?;
    }
    mesh.wait_ready(&["default/web-0", "default/api-v1-0"])?;
    let vip = cluster_ip(&mesh, "default", "api-v1")?;
    let url = |path: &str| format!("http://{vip}:9091{path}");
    let dir = tempfile::tempdir()?;
    let write = |name: &str, text: &str| -> Result<String> {
        let p = dir.path().join(name);
        std::fs::write(&p, text)?;
        Ok(p.to_str().context("path")?.to_owned())
    };
    let entry = |perms: &str| {
        format!(
            r#"{{"Kind":"service-intentions","Name":"api-v1","Sources":[
                {{"Name":"web","Permissions":{perms}}},
                {{"Name":"*","Action":"allow"}}]}}"#
        )
    };
    let perms = r#"[
        {"Action":"deny","HTTP":{"PathPrefix":"/admin"}},
        {"Action":"allow","HTTP":{"PathExact":"/","Methods":["GET"]}},
        {"Action":"allow","HTTP":{"PathRegex":"/v[0-9]+/items","Header":[{"Name":"x-env","Exact":"prod"}]}}
    ]"#;
    let l7 = write("l7.json", &entry(perms))?;

    // api-v1 is tcp: permissions are refused, naming the field.
    let err = mesh.meshctl_fails(&["config", "write", &l7])?;
    ensure!(
        err.contains("Sources[0].Permissions") && err.contains("incompatible with L7"),
        "L7 on a tcp service: {err}"
    );
    let defaults = write(
        "defaults.hcl",
        "Kind = \"service-defaults\"\nName = \"api-v1\"\nProtocol = \"http\"\n",
    )?;
    mesh.meshctl(&["config", "write", &defaults])?;
    let bad = write(
        "bad.json",
        &entry(r#"[{"Action":"allow","HTTP":{"PathRegex":"(unclosed"}}]"#),
    )?;
    let err = mesh.meshctl_fails(&["config", "write", &bad])?;
    ensure!(
        err.contains("Sources[0].Permissions[0].HTTP.PathRegex"),
        "bad regex: {err}"
    );
    let bad = write(
        "bad2.json",
        &entry(r#"[{"Action":"allow","HTTP":{"PathExact":"/","PathPrefix":"/a"}}]"#),
    )?;
    let err = mesh.meshctl_fails(&["config", "write", &bad])?;
    ensure!(
        err.contains("Sources[0].Permissions[0].HTTP should only contain at most one"),
        "two path matches: {err}"
    );
    mesh.meshctl(&["config", "write", &l7])?;
    let read = mesh.meshctl(&[
        "config",
        "read",
        "-kind",
        "service-intentions",
        "-name",
        "api-v1",
    ])?;
    ensure!(read.contains("\"PathRegex\""), "read back: {read}");

    let code = |args: &[&str]| -> Result<String> {
        let mut all = vec!["-o", "/dev/null", "-w", "%{http_code}"];
        all.extend_from_slice(args);
        curl_in_pod("default", "web-0", &all)
    };
    let root = url("/");
    mesh.wait(
        "GET / allowed by web's permission",
        Duration::from_secs(30),
        // A failed attempt is an error, so that the last answer is in the failure message.
        |_| {
            let got = code(&[&root])?;
            ensure!(got == "200", "GET / answered {got:?}");
            Ok(Some(()))
        },
    )?;
    // Method: only GET is allowed on /.
    ensure!(
        code(&["-X", "POST", &root])? == "403",
        "POST / must be denied"
    );
    // Path prefix deny, first in order.
    let body = curl_in_pod("default", "web-0", &[&url("/admin/users")])?;
    ensure!(body == "RBAC: access denied", "GET /admin: {body:?}");
    // The same path in disguise is normalized before matching, as Consul's Envoy does.
    let body = curl_in_pod(
        "default",
        "web-0",
        &["--path-as-is", &url("/x/..//%61dmin/users")],
    )?;
    ensure!(
        body == "RBAC: access denied",
        "GET /x/..//%61dmin/users: {body:?}"
    );
    // Regex and header: both must match.
    let items = url("/v2/items");
    ensure!(
        code(&["-H", "x-env: prod", &items])? == "200",
        "regex + header"
    );
    ensure!(
        code(&["-H", "x-env: dev", &items])? == "403",
        "header mismatch"
    );
    ensure!(
        code(&["-H", "x-env: prod", &url("/v2/items/x")])? == "403",
        "whole-path regex"
    );
    // Precedence: a request web's permissions do not match is not allowed by the lower `*`.
    ensure!(
        code(&[&url("/other")])? == "403",
        "no fall-through to the * allow"
    );
    // Keep-alive: a 403 then a 200 on one connection (curl reuses it: one connect in all).
    let both = curl_in_pod(
        "default",
        "web-0",
        &[
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{num_connects}\n",
            &url("/admin"),
            "--next",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{num_connects}\n",
            &root,
        ],
    )?;
    ensure!(
        both == "403 1\n200 0\n",
        "403 then 200 on one connection: {both:?}"
    );
    // Each request is in Istio's request metrics, by its response code, on the token-free
    // metrics listener.
    let text = scrape_metrics(mesh.metrics_addr)?;
    for code in ["200", "403"] {
        ensure!(
            text.lines().any(|l| l.starts_with("istio_requests_total{")
                && l.contains("destination_service_name=\"api-v1\"")
                && l.contains("source_workload=\"web\"")
                && l.contains(&format!("response_code=\"{code}\""))
                && !l.ends_with(" 0")),
            "no istio_requests_total for web → api-v1 with code {code}:\n{text}"
        );
    }
    ensure!(
        text.contains("istio_request_duration_milliseconds_bucket{"),
        "no request durations:\n{text}"
    );
    // The HTTP path counts bytes each way like the byte copy.
    for family in [
        "istio_tcp_sent_bytes_total{",
        "istio_tcp_received_bytes_total{",
    ] {
        ensure!(
            text.lines().any(|l| l.starts_with(family)
                && l.contains("reporter=\"destination\"")
                && l.contains("destination_service_name=\"api-v1\"")
                && l.contains("source_workload=\"web\"")
                && !l.ends_with(" 0")),
            "no {family}...}} for web → api-v1 on the L7 path:\n{text}"
        );
    }
    // `intention check` answers for L4 only, as Consul's: an L7 pair is Denied there.
    let check = mesh.meshctl_fails(&["intention", "check", "web", "api-v1"])?;
    ensure!(check.contains("Denied"), "check on an L7 pair: {check}");

    // A rule change applies to the next request.
    let tighter = write(
        "tighter.json",
        &entry(r#"[{"Action":"deny","HTTP":{"PathExact":"/"}}]"#),
    )?;
    mesh.meshctl(&["config", "write", &tighter])?;
    mesh.wait(
        "GET / denied after the change",
        Duration::from_secs(15),
        |_| {
            let got = code(&[&root])?;
            ensure!(got == "403", "GET / answered {got:?}");
            Ok(Some(()))
        },
    )?;
    // service-defaults cannot go back to tcp while L7 intentions exist.
    let tcp = write(
        "tcp.json",
        r#"{"Kind":"service-defaults","Name":"api-v1","Protocol":"tcp"}"#,
    )?;
    let err = mesh.meshctl_fails(&["config", "write", &tcp])?;
    ensure!(err.contains("incompatible with L7"), "back to tcp: {err}");
    mesh.stop()?;
    Ok(())
}

/// The text of `GET /metrics` on meshd's token-free metrics listener (loopback).
fn scrape_metrics(addr: SocketAddr) -> Result<String> {
    let a = http(addr, "GET", "/metrics", None, "", Duration::from_secs(10))?;
    ensure!(a.status == 200, "GET /metrics: {}", a.head);
    Ok(a.body)
}

/// consul-k8s's objects for an L7 intention, as users write them.
const L7_CRDS: &str = "apiVersion: consul.hashicorp.com/v1alpha1
kind: ServiceDefaults
metadata:
  name: api-v1
spec:
  protocol: http
---
apiVersion: consul.hashicorp.com/v1alpha1
kind: ServiceIntentions
metadata:
  name: api-v1
spec:
  destination:
    name: api-v1
  sources:
    - name: web
      permissions:
        - action: deny
          http:
            pathPrefix: /admin
        - action: allow
          http:
            pathPrefix: /
";

/// A `ServiceDefaults` object (protocol http) and a `ServiceIntentions` object with
/// `permissions`, applied together as consul-k8s users do: the ServiceDefaults becomes a
/// read-only, Kubernetes-managed `service-defaults` entry (so the L7 intention is accepted),
/// each request is decided, and deleting both objects removes both entries.
#[test]
fn service_defaults_and_intentions_objects_with_permissions_decide_each_request() -> Result<()> {
    require_root();
    let mut mesh = LocalMesh::start("ebpf")?;
    mesh.meshctl(&["intention", "create", "-deny", "*", "*"])?;
    for f in ["web.yaml", "api-v1.yaml"] {
        mesh.meshctl(&["apply", "-f", examples().join(f).to_str().context("path")?])?;
    }
    mesh.wait_ready(&["default/web-0", "default/api-v1-0"])?;
    let dir = tempfile::tempdir()?;
    let crds = dir.path().join("l7.yaml");
    std::fs::write(&crds, L7_CRDS)?;
    let crds = crds.to_str().context("path")?;
    let out = mesh.meshctl(&["apply", "-f", crds])?;
    ensure!(!out.contains("not synced"), "apply: {out}");
    let read = mesh.meshctl(&[
        "config",
        "read",
        "-kind",
        "service-defaults",
        "-name",
        "api-v1",
    ])?;
    ensure!(
        read.contains("\"http\"") && read.contains("\"kubernetes\""),
        "the managed service-defaults entry: {read}"
    );
    let err = mesh.meshctl_fails(&[
        "config",
        "delete",
        "-kind",
        "service-defaults",
        "-name",
        "api-v1",
    ])?;
    ensure!(
        err.contains("managed by a Kubernetes ServiceDefaults object"),
        "deleting a managed entry through the CLI: {err}"
    );

    let vip = cluster_ip(&mesh, "default", "api-v1")?;
    let code = |path: &str| -> Result<String> {
        curl_in_pod(
            "default",
            "web-0",
            &[
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                &format!("http://{vip}:9091{path}"),
            ],
        )
    };
    mesh.wait(
        "GET / allowed by web's permission",
        Duration::from_secs(30),
        |_| {
            let got = code("/")?;
            ensure!(got == "200", "GET / answered {got:?}");
            Ok(Some(()))
        },
    )?;
    let body = curl_in_pod("default", "web-0", &[&format!("http://{vip}:9091/admin/x")])?;
    ensure!(body == "RBAC: access denied", "GET /admin/x: {body:?}");

    // Deleting both objects removes both entries; deny-all decides again.
    mesh.meshctl(&["delete", "-f", crds])?;
    let err = mesh.meshctl_fails(&[
        "config",
        "read",
        "-kind",
        "service-defaults",
        "-name",
        "api-v1",
    ])?;
    ensure!(!err.is_empty(), "the service-defaults entry is gone");
    mesh.wait("GET / denied again", Duration::from_secs(30), |_| {
        // Denied in the kernel: curl cannot connect (an error here), or answered anything
        // but 200.
        let got = code("/").unwrap_or_default();
        ensure!(got != "200", "GET / still answered {got:?}");
        Ok(Some(()))
    })?;
    mesh.stop()
}
