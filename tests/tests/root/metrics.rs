//! Root test of the metrics as an operator uses them: a real Prometheus server (Debian's
//! `prometheus`) scrapes `meshd local`'s `/metrics` listener on loopback every second while the
//! tutorial's traffic runs (web → api-v1), and its query API answers with Istio's metric names:
//! connections opened and closed, bytes, TLS handshakes, denials by the proxy and the kernel with
//! the deciding intention, the kernel's counters and map capacity.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use mesh_kit::{require_root, wait_for};
use serde_json::Value;

use super::local::{cluster_ip, examples, free_port, get, http, in_pod, LocalMesh};

/// How often Prometheus scrapes meshd.
const SCRAPE_INTERVAL: &str = "1s";

/// A Prometheus server with its own configuration and storage in a temporary directory,
/// scraping one target; killed on drop.
struct Prometheus {
    child: Child,
    addr: SocketAddr,
    dir: tempfile::TempDir,
}

impl Prometheus {
    fn start(target: SocketAddr) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: {SCRAPE_INTERVAL}\n  evaluation_interval: {SCRAPE_INTERVAL}\n\
                 scrape_configs:\n  - job_name: meshd\n    scrape_interval: {SCRAPE_INTERVAL}\n    \
                 scrape_timeout: {SCRAPE_INTERVAL}\n    static_configs:\n      - targets: ['{target}']\n"
            ),
        )?;
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let log = std::fs::File::create(dir.path().join("prometheus.log"))?;
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--web.listen-address={addr}"))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting prometheus (Debian's prometheus package: cargo xtask setup)")?;
        let mut prometheus = Prometheus { child, addr, dir };
        wait_for(
            "Prometheus ready",
            Duration::from_secs(60),
            Duration::from_millis(200),
            || {
                if let Some(status) = prometheus.child.try_wait()? {
                    bail!("prometheus exited ({status}):\n{}", prometheus.log());
                }
                Ok(http_get(prometheus.addr, "/-/ready", None)
                    .is_ok_and(|(status, _)| status == 200)
                    .then_some(()))
            },
        )?;
        Ok(prometheus)
    }

    fn log(&self) -> String {
        let log: PathBuf = self.dir.path().join("prometheus.log");
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// The value of an instant query whose answer is one sample (a `sum(...)`); `None` while
    /// the answer is empty (nothing scraped yet).
    fn query(&self, promql: &str) -> Result<Option<f64>> {
        let path = format!("/api/v1/query?query={}", percent_encode(promql));
        let (status, body) = http_get(self.addr, &path, None)?;
        ensure!(status == 200, "query {promql}: {status} {body}");
        let v: Value = serde_json::from_str(&body)?;
        ensure!(v["status"] == "success", "query {promql}: {v}");
        let result = v["data"]["result"].as_array().context("no result")?;
        match result.as_slice() {
            [] => Ok(None),
            [one] => {
                let value = one["value"][1].as_str().context("no value")?;
                Ok(Some(value.parse()?))
            }
            _ => bail!("query {promql}: several series: {v}"),
        }
    }

    /// Waits until `promql` answers a value that `ok` accepts; returns it.
    fn wait_value(&self, promql: &str, ok: impl Fn(f64) -> bool) -> Result<f64> {
        let mut last = None;
        let found = wait_for(
            promql,
            Duration::from_secs(30),
            Duration::from_millis(500),
            || {
                last = self.query(promql)?;
                Ok(last.filter(|v| ok(*v)))
            },
        );
        found.with_context(|| format!("last answer {last:?}; prometheus log:\n{}", self.log()))
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Percent-encodes everything but unreserved characters (RFC 3986).
fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// `GET path` (with `X-Consul-Token` when given): (status, body).
fn http_get(addr: SocketAddr, path: &str, token: Option<&str>) -> Result<(u16, String)> {
    let a = http(addr, "GET", path, token, "", Duration::from_secs(10))?;
    Ok((a.status, a.body))
}

/// The ID of the intention `source => destination`, from the API.
fn intention_id(mesh: &LocalMesh, source: &str, destination: &str) -> Result<String> {
    let addr: SocketAddr = mesh.http_addr.parse()?;
    let path = format!(
        "/v1/connect/intentions/exact?source={}&destination={}",
        percent_encode(source),
        percent_encode(destination)
    );
    let (status, body) = http_get(addr, &path, Some(&mesh.token))?;
    ensure!(status == 200, "{path}: {status} {body}");
    let v: Value = serde_json::from_str(&body)?;
    Ok(v["ID"].as_str().context("no ID")?.to_owned())
}

#[test]
fn prometheus_scrapes_istio_metrics_of_the_tutorial_traffic() -> Result<()> {
    require_root();
    let mut mesh = LocalMesh::start("ebpf")?;
    let prometheus = Prometheus::start(mesh.metrics_addr)?;
    // Scraped from the start: the target is up and the kernel's families are there.
    prometheus.wait_value("up{job=\"meshd\"}", |v| v == 1.0)?;
    prometheus.wait_value("mesh_kernel_map_capacity{map=\"SOCKS\"}", |v| {
        v == f64::from(mesh_common::MAX_SOCKETS)
    })?;

    mesh.meshctl(&["intention", "create", "-deny", "*", "*"])?;
    let deny_all = intention_id(&mesh, "*", "*")?;
    for f in ["web.yaml", "api-v1.yaml"] {
        let path = examples().join(f);
        mesh.meshctl(&["apply", "-f", path.to_str().context("path")?])?;
    }
    mesh.wait_ready(&["default/api-v1-0", "default/web-0"])?;

    // Denied by the proxy: web's app calls its upstream api-v1 (localhost:9091), the inbound
    // proxy of api-v1 refuses by the deny-all intention.
    let web = mesh.port_forward("web", 9090)?;
    let (status, body) = get(web)?;
    ensure!(
        status == 500,
        "denied: expected 500 from web, got {status}: {body}"
    );
    let proxy_denied = format!(
        "sum(mesh_proxy_connections_denied_total{{reporter=\"destination\",\
         source_workload=\"web\",destination_service_name=\"api-v1\",\
         intention=\"{deny_all}\",reason=\"denied\"}})"
    );
    prometheus.wait_value(&proxy_denied, |v| v >= 1.0)?;

    // Denied by the kernel: web's app dials api-v1's virtual IP, connect4 refuses.
    let vip = format!("{}:9091", cluster_ip(&mesh, "default", "api-v1")?);
    let out = in_pod("default", "web-0", &["http-get", &vip])?;
    ensure!(
        !out.contains("Response from API v1"),
        "denied, yet api-v1 answered: {out}"
    );
    let kernel_denied =
        format!("sum(mesh_kernel_connections_denied_total{{intention=\"{deny_all}\"}})");
    prometheus.wait_value(&kernel_denied, |v| v >= 1.0)?;
    prometheus.wait_value("sum(mesh_kernel_connects_denied_total)", |v| v >= 1.0)?;

    // Allowed: N connections from web's app to api-v1's virtual IP, each one request.
    mesh.meshctl(&["intention", "create", "-allow", "web", "api-v1"])?;
    mesh.wait("web allowed to api-v1", Duration::from_secs(15), |_| {
        let out = in_pod("default", "web-0", &["http-get", &vip])?;
        Ok(out.contains("Response from API v1").then_some(()))
    })?;
    const N: usize = 5;
    for _ in 0..N {
        let out = in_pod("default", "web-0", &["http-get", &vip])?;
        ensure!(out.contains("Response from API v1"), "allowed: {out}");
    }
    let n = (N + 1) as f64;
    let edge = "source_workload=\"web\",source_workload_namespace=\"default\",\
                destination_service_name=\"api-v1\",destination_service_namespace=\"default\",\
                destination_service=\"api-v1.default.svc.cluster.local\",\
                connection_security_policy=\"mutual_tls\"";
    for reporter in ["source", "destination"] {
        for family in [
            "istio_tcp_connections_opened_total",
            "istio_tcp_connections_closed_total",
        ] {
            let q = format!("sum({family}{{reporter=\"{reporter}\",{edge}}})");
            prometheus.wait_value(&q, |v| v >= n)?;
        }
        // Every request and answer went through: bytes both ways.
        for family in [
            "istio_tcp_sent_bytes_total",
            "istio_tcp_received_bytes_total",
        ] {
            let q = format!("sum({family}{{reporter=\"{reporter}\",{edge}}})");
            prometheus.wait_value(&q, |v| v >= n * 20.0)?;
        }
    }
    // web and api-v1 share the node: the same-node path (the default) decided each connection
    // as api-v1's inbound side would and carried it with no TLS handshake between the two
    // proxies (the probe's blocking socket is copied by the proxy rather than spliced, see
    // docs/dataplane.md; the splice's own counters are tested in `splice::`).
    let handshakes = prometheus
        .query("sum(mesh_tls_handshakes_total{reporter=\"source\",result=~\"full|resumed\"})")?;
    ensure!(
        handshakes.unwrap_or(0.0) == 0.0,
        "spliced connections made TLS handshakes: {handshakes:?}"
    );
    // api-v1 answers more than web asks: its response is the bigger direction.
    let bytes = |family: &str| {
        prometheus.query(&format!("sum({family}{{reporter=\"destination\",{edge}}})"))
    };
    let (sent, received) = (
        bytes("istio_tcp_sent_bytes_total")?.context("sent")?,
        bytes("istio_tcp_received_bytes_total")?.context("received")?,
    );
    ensure!(
        sent > received,
        "response bytes {sent} should exceed request bytes {received}"
    );
    // The kernel redirected those connections to the outbound listener.
    prometheus.wait_value("sum(mesh_kernel_redirects_total)", |v| v >= n)?;
    // Nothing is open any more.
    prometheus.wait_value(
        &format!("sum(mesh_tcp_connections_active{{{edge}}})"),
        |v| v == 0.0,
    )?;

    // The API serves the same text to a token with agent:read.
    let api: SocketAddr = mesh.http_addr.parse()?;
    let (status, text) = http_get(
        api,
        "/v1/agent/metrics?format=prometheus",
        Some(&mesh.token),
    )?;
    ensure!(status == 200, "{status}: {text}");
    ensure!(
        text.contains("istio_tcp_connections_opened_total{") && text.ends_with("# EOF\n"),
        "{text}"
    );

    // api-v1 made an `http` service (a service-defaults entry): its connections are served as
    // HTTP under the same L4 allow, and each request is counted by code, as the query
    // asks.
    let dir = tempfile::tempdir()?;
    let defaults = dir.path().join("api-v1-defaults.hcl");
    std::fs::write(
        &defaults,
        "Kind = \"service-defaults\"\nName = \"api-v1\"\nProtocol = \"http\"\n",
    )?;
    mesh.meshctl(&["config", "write", defaults.to_str().context("path")?])?;
    for _ in 0..N {
        let out = in_pod("default", "web-0", &["http-get", &vip])?;
        ensure!(
            out.contains("Response from API v1"),
            "allowed over http: {out}"
        );
    }
    prometheus.wait_value(
        "sum(istio_requests_total{destination_service_name=\"api-v1\",response_code=\"200\"})",
        |v| v >= N as f64,
    )?;
    prometheus.wait_value(
        "sum(istio_request_duration_milliseconds_count{destination_service_name=\"api-v1\"})",
        |v| v >= N as f64,
    )?;
    drop(prometheus);
    mesh.stop()
}
