//! The plugin half: one CNI invocation (the `CNI_*` variables and the network configuration on
//! stdin, as containernetworking/cni's `SPEC.md` 1.0 and 1.1 describe) turned into one request
//! to the agent and one result or error object on stdout.
//!
//! `mesh-cni` is chained last in the node's conflist. It changes nothing in the pod's
//! networking: on `ADD` it hands the pod to the agent, waits until the agent says the pod is
//! meshed, and prints the `prevResult` it was given unchanged; if the agent refuses the pod, or
//! does not run while the pod would need it, the `ADD` fails and the runtime does not start the
//! pod's containers. `DEL` never fails for a pod or an agent that is gone. `CHECK` asks the
//! agent whether the pod is still meshed. `STATUS` (1.1) says whether the agent answers, and
//! `GC` (1.1) has nothing to collect: the plugin keeps no state of its own.
#![warn(missing_docs)]

use std::collections::BTreeMap;
use std::io::{BufReader, Write};
use std::net::IpAddr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Value};

use crate::wire::{self, Pod, Reply, Request};

/// The CNI versions this plugin implements (chaining with `prevResult` starts at 0.3.0,
/// `CHECK` at 0.4.0, `STATUS` and `GC` at 1.1.0).
pub const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// How long the plugin waits for the agent's answer when the configuration sets no
/// `timeoutSeconds`: meshing a pod takes milliseconds, but a busy agent may be applying a
/// catalog first.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// The namespaces whose pods are never handed to the agent unless the configuration says
/// otherwise (`excludeNamespaces`), as consul-k8s's injector never injects into
/// `kube-system` and `local-path-storage`: the cluster's own pods (DNS among them) must start
/// even while meshd does not run.
pub const DEFAULT_EXCLUDE_NAMESPACES: &[&str] = &["kube-system", "local-path-storage"];

/// Error codes of the CNI spec ("Error" section) and this plugin's own (100 and above).
pub mod code {
    /// Incompatible CNI version.
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    /// Invalid necessary environment variables (a `CNI_*` variable missing or wrong).
    pub const INVALID_ENV: u32 = 4;
    /// Failed to decode content (stdin is not JSON).
    pub const DECODE: u32 = 6;
    /// Invalid network configuration (a field of the plugin's configuration).
    pub const INVALID_CONFIG: u32 = 7;
    /// Try again later: the agent does not answer (not running on this node yet, or busy
    /// beyond the timeout).
    pub const TRY_AGAIN_LATER: u32 = 11;
    /// `STATUS`: the plugin is not available (the agent does not answer).
    pub const NOT_AVAILABLE: u32 = 50;
    /// The agent refused to mesh the pod (`ADD`), or the pod lost its steering (`CHECK`).
    pub const REFUSED: u32 = 100;
    /// The agent's answer did not make sense.
    pub const AGENT_PROTOCOL: u32 = 101;
}

/// The plugin's network configuration, as the runtime hands it on stdin (the conflist's
/// top-level `cniVersion` and `name` copied in, `prevResult` added when chained).
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetConf {
    /// The CNI version of the configuration and of the result to print.
    pub cni_version: String,
    /// The network's name.
    #[serde(default)]
    pub name: String,
    /// `mesh-cni`.
    #[serde(rename = "type")]
    pub plugin_type: String,
    /// The agent's socket; [`wire::DEFAULT_SOCKET`] when absent.
    #[serde(default)]
    pub socket_path: Option<PathBuf>,
    /// Seconds to wait for the agent's answer; [`DEFAULT_TIMEOUT`] when absent.
    #[serde(default)]
    pub timeout_seconds: Option<f64>,
    /// Namespaces whose pods pass through without asking the agent;
    /// [`DEFAULT_EXCLUDE_NAMESPACES`] when absent.
    #[serde(default)]
    pub exclude_namespaces: Option<Vec<String>>,
    /// The result of the plugins before this one in the chain.
    #[serde(default)]
    pub prev_result: Option<Value>,
}

impl NetConf {
    fn socket(&self) -> &Path {
        self.socket_path
            .as_deref()
            .unwrap_or(Path::new(wire::DEFAULT_SOCKET))
    }

    fn timeout(&self) -> Result<Duration, CniError> {
        match self.timeout_seconds {
            None => Ok(DEFAULT_TIMEOUT),
            Some(s) if s.is_finite() && s > 0.0 && s <= 3600.0 => Ok(Duration::from_secs_f64(s)),
            Some(s) => Err(CniError::new(
                code::INVALID_CONFIG,
                format!(
                    "timeoutSeconds {s}: expected a number of seconds above 0 and at most 3600"
                ),
            )),
        }
    }

    fn excluded(&self, namespace: &str) -> bool {
        match &self.exclude_namespaces {
            Some(list) => list.iter().any(|n| n == namespace),
            None => DEFAULT_EXCLUDE_NAMESPACES.contains(&namespace),
        }
    }
}

/// A CNI error object (`code`, `msg`, `details`), printed on stdout with a non-zero exit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CniError {
    /// The spec's code (see [`code`]).
    pub code: u32,
    /// A short message.
    pub msg: String,
    /// More detail, possibly empty.
    pub details: String,
}

impl CniError {
    fn new(code: u32, msg: impl Into<String>) -> Self {
        Self {
            code,
            msg: msg.into(),
            details: String::new(),
        }
    }

    fn details(mut self, details: impl Into<String>) -> Self {
        self.details = details.into();
        self
    }
}

/// What the invocation prints and how it exits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Output {
    /// The JSON to print on stdout (empty for a successful `DEL`, `CHECK`, `STATUS`, `GC`).
    pub stdout: String,
    /// The exit status: 0 on success, 1 with an error object on stdout.
    pub exit: i32,
    /// A line for stderr (the runtime logs it), or empty.
    pub log: String,
}

/// Runs one invocation: `env` holds the process environment (only `CNI_*` is read), `stdin` the
/// network configuration.
pub fn run(env: &BTreeMap<String, String>, stdin: &[u8]) -> Output {
    let version = env_version(stdin);
    match invoke(env, stdin) {
        Ok((stdout, log)) => Output {
            stdout,
            exit: 0,
            log,
        },
        Err(e) => Output {
            stdout: json!({
                "cniVersion": version,
                "code": e.code,
                "msg": e.msg,
                "details": e.details,
            })
            .to_string(),
            exit: 1,
            log: format!("mesh-cni: {} ({})", e.msg, e.details),
        },
    }
}

/// The version to put in an error object: the configuration's when it can be read, the newest
/// supported otherwise.
fn env_version(stdin: &[u8]) -> String {
    serde_json::from_slice::<Value>(stdin)
        .ok()
        .and_then(|v| {
            v.get("cniVersion")
                .and_then(Value::as_str)
                .map(String::from)
        })
        .filter(|v| SUPPORTED_VERSIONS.contains(&v.as_str()))
        .unwrap_or_else(|| "1.1.0".to_string())
}

fn var<'a>(env: &'a BTreeMap<String, String>, name: &str) -> Result<&'a str, CniError> {
    env.get(name)
        .map(String::as_str)
        .filter(|v| !v.is_empty())
        .ok_or_else(|| CniError::new(code::INVALID_ENV, format!("{name} is not set")))
}

fn invoke(env: &BTreeMap<String, String>, stdin: &[u8]) -> Result<(String, String), CniError> {
    let command = var(env, "CNI_COMMAND")?;
    if command == "VERSION" {
        // VERSION needs only `cniVersion` on stdin, and answers whatever it says.
        return Ok((
            json!({"cniVersion": "1.1.0", "supportedVersions": SUPPORTED_VERSIONS}).to_string(),
            String::new(),
        ));
    }
    let conf: NetConf = serde_json::from_slice(stdin).map_err(|e| {
        CniError::new(
            code::DECODE,
            "the network configuration on stdin does not decode",
        )
        .details(e.to_string())
    })?;
    if !SUPPORTED_VERSIONS.contains(&conf.cni_version.as_str()) {
        return Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!(
                "cniVersion {:?} is not supported (supported: {})",
                conf.cni_version,
                SUPPORTED_VERSIONS.join(", ")
            ),
        ));
    }
    let timeout = conf.timeout()?;
    match command {
        "ADD" => add(env, &conf, timeout),
        "DEL" => del(env, &conf, timeout),
        "CHECK" => check(env, &conf, timeout),
        "STATUS" => status(&conf),
        "GC" => Ok((String::new(), String::new())),
        other => Err(CniError::new(
            code::INVALID_ENV,
            format!("CNI_COMMAND {other:?}: expected ADD, DEL, CHECK, STATUS, GC or VERSION"),
        )),
    }
}

/// `CNI_ARGS`: `K1=V1;K2=V2`.
fn cni_args(env: &BTreeMap<String, String>) -> Result<BTreeMap<String, String>, CniError> {
    let mut out = BTreeMap::new();
    let Some(args) = env.get("CNI_ARGS") else {
        return Ok(out);
    };
    for pair in args.split(';').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').ok_or_else(|| {
            CniError::new(
                code::INVALID_ENV,
                format!("CNI_ARGS: {pair:?} is not KEY=VALUE"),
            )
        })?;
        out.insert(k.to_string(), v.to_string());
    }
    Ok(out)
}

/// The pod of this invocation, or `None` when `CNI_ARGS` names no Kubernetes pod (a container
/// the runtime networks on its own, not part of any mesh).
fn pod(
    env: &BTreeMap<String, String>,
    conf: &NetConf,
    need_netns: bool,
) -> Result<Option<Pod>, CniError> {
    let args = cni_args(env)?;
    let container_id = var(env, "CNI_CONTAINERID")?.to_string();
    let ifname = var(env, "CNI_IFNAME")?.to_string();
    let netns = match env.get("CNI_NETNS").filter(|n| !n.is_empty()) {
        Some(n) => Some(PathBuf::from(n)),
        None if need_netns => return Err(CniError::new(code::INVALID_ENV, "CNI_NETNS is not set")),
        None => None,
    };
    let (Some(namespace), Some(name)) = (args.get("K8S_POD_NAMESPACE"), args.get("K8S_POD_NAME"))
    else {
        return Ok(None);
    };
    Ok(Some(Pod {
        namespace: namespace.clone(),
        name: name.clone(),
        uid: args.get("K8S_POD_UID").cloned().filter(|u| !u.is_empty()),
        container_id,
        netns,
        ifname,
        ips: prev_ips(conf)?,
    }))
}

/// The addresses of `prevResult.ips[]` (`"10.91.1.5/24"` → `10.91.1.5`).
fn prev_ips(conf: &NetConf) -> Result<Vec<IpAddr>, CniError> {
    let Some(prev) = &conf.prev_result else {
        return Ok(Vec::new());
    };
    let Some(ips) = prev.get("ips") else {
        return Ok(Vec::new());
    };
    let ips = ips
        .as_array()
        .ok_or_else(|| CniError::new(code::INVALID_CONFIG, "prevResult.ips is not a list"))?;
    ips.iter()
        .enumerate()
        .map(|(i, ip)| {
            let addr = ip.get("address").and_then(Value::as_str).ok_or_else(|| {
                CniError::new(
                    code::INVALID_CONFIG,
                    format!("prevResult.ips[{i}].address is missing or not a string"),
                )
            })?;
            let host = addr.split_once('/').map_or(addr, |(h, _)| h);
            host.parse().map_err(|_| {
                CniError::new(
                    code::INVALID_CONFIG,
                    format!("prevResult.ips[{i}].address {addr:?} is not an address/prefix"),
                )
            })
        })
        .collect()
}

/// The result `ADD` prints: the `prevResult`, unchanged.
fn pass_through(conf: &NetConf) -> String {
    match &conf.prev_result {
        Some(prev) => prev.to_string(),
        // First in a chain (a misconfiguration the ADD refuses before getting here) or a
        // pass-through without addresses: an empty result of the configuration's version.
        None => json!({"cniVersion": conf.cni_version}).to_string(),
    }
}

fn add(
    env: &BTreeMap<String, String>,
    conf: &NetConf,
    timeout: Duration,
) -> Result<(String, String), CniError> {
    if conf.prev_result.is_none() {
        return Err(CniError::new(
            code::INVALID_CONFIG,
            "mesh-cni has no prevResult: it must be chained after the plugin that gives the pod its addresses",
        ));
    }
    let Some(pod) = pod(env, conf, true)? else {
        return Ok((
            pass_through(conf),
            "mesh-cni: CNI_ARGS names no Kubernetes pod; not meshed".to_string(),
        ));
    };
    if conf.excluded(&pod.namespace) {
        return Ok((
            pass_through(conf),
            format!(
                "mesh-cni: pod {} is in an excluded namespace; not meshed",
                pod.key()
            ),
        ));
    }
    if pod.ips.is_empty() {
        return Err(CniError::new(
            code::INVALID_CONFIG,
            format!(
                "pod {}: prevResult has no ips; the agent cannot check the pod's network namespace",
                pod.key()
            ),
        ));
    }
    let key = pod.key();
    match ask(conf, timeout, &Request::Add(pod))? {
        Reply::Meshed => Ok((pass_through(conf), format!("mesh-cni: pod {key} meshed"))),
        Reply::NotInMesh => Ok((
            pass_through(conf),
            format!("mesh-cni: pod {key} is not in the mesh"),
        )),
        Reply::Refused { reason } => Err(CniError::new(
            code::REFUSED,
            format!("meshd refused to mesh pod {key}"),
        )
        .details(reason)),
        other => Err(unexpected(&other)),
    }
}

fn del(
    env: &BTreeMap<String, String>,
    conf: &NetConf,
    timeout: Duration,
) -> Result<(String, String), CniError> {
    // DEL must succeed when what it releases is gone: a missing netns, a pod the agent never
    // knew, an agent that does not run (it forgets pods whose sandbox is gone by itself).
    let Some(pod) = pod(env, conf, false)? else {
        return Ok((String::new(), String::new()));
    };
    if conf.excluded(&pod.namespace) {
        return Ok((String::new(), String::new()));
    }
    let key = pod.key();
    let log = match ask(conf, timeout, &Request::Del(pod)) {
        Ok(Reply::Released) => format!("mesh-cni: pod {key} released"),
        Ok(other) => format!("mesh-cni: DEL of pod {key}: the agent answered {other:?}"),
        Err(e) => format!(
            "mesh-cni: DEL of pod {key}: {} ({}); nothing to release",
            e.msg, e.details
        ),
    };
    Ok((String::new(), log))
}

fn check(
    env: &BTreeMap<String, String>,
    conf: &NetConf,
    timeout: Duration,
) -> Result<(String, String), CniError> {
    let Some(pod) = pod(env, conf, true)? else {
        return Ok((String::new(), String::new()));
    };
    if conf.excluded(&pod.namespace) {
        return Ok((String::new(), String::new()));
    }
    let key = pod.key();
    match ask(conf, timeout, &Request::Check(pod))? {
        Reply::Meshed | Reply::NotInMesh => Ok((String::new(), String::new())),
        Reply::Refused { reason } => Err(CniError::new(
            code::REFUSED,
            format!("pod {key} is not meshed as it must be"),
        )
        .details(reason)),
        other => Err(unexpected(&other)),
    }
}

fn status(conf: &NetConf) -> Result<(String, String), CniError> {
    UnixStream::connect(conf.socket()).map_err(|e| {
        CniError::new(code::NOT_AVAILABLE, "meshd is not running on this node")
            .details(format!("connecting to {}: {e}", conf.socket().display()))
    })?;
    Ok((String::new(), String::new()))
}

fn unexpected(reply: &Reply) -> CniError {
    CniError::new(
        code::AGENT_PROTOCOL,
        format!("meshd answered {reply:?}, which does not answer this command"),
    )
}

/// Sends `request` to the agent and waits (at most `timeout` for each of connect, write and
/// read) for its reply.
fn ask(conf: &NetConf, timeout: Duration, request: &Request) -> Result<Reply, CniError> {
    let socket = conf.socket();
    let unreachable = |e: std::io::Error| {
        CniError::new(code::TRY_AGAIN_LATER, "meshd is not running on this node").details(format!(
            "connecting to its socket {}: {e}",
            socket.display()
        ))
    };
    let stream = UnixStream::connect(socket).map_err(unreachable)?;
    let io_fail = |what: &str, e: std::io::Error| {
        let timed_out = matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        );
        let msg = if timed_out {
            format!("meshd did not answer within {timeout:?} (timeoutSeconds)")
        } else {
            format!("talking to meshd: {what}")
        };
        CniError::new(code::TRY_AGAIN_LATER, msg).details(format!("{}: {e}", socket.display()))
    };
    stream
        .set_read_timeout(Some(timeout))
        .and_then(|()| stream.set_write_timeout(Some(timeout)))
        .map_err(|e| io_fail("setting timeouts", e))?;
    let mut writer = &stream;
    wire::write_line(&mut writer, request).map_err(|e| io_fail("sending the request", e))?;
    writer
        .flush()
        .map_err(|e| io_fail("sending the request", e))?;
    let mut reader = BufReader::new(&stream);
    let reply: Reply = wire::read_line(&mut reader).map_err(|e| {
        if e.kind() == std::io::ErrorKind::InvalidData {
            CniError::new(code::AGENT_PROTOCOL, "meshd's answer does not decode")
                .details(e.to_string())
        } else {
            io_fail("reading the answer", e)
        }
    })?;
    if let Reply::Invalid { reason } = &reply {
        return Err(
            CniError::new(code::AGENT_PROTOCOL, "meshd refused the request as invalid")
                .details(reason.clone()),
        );
    }
    Ok(reply)
}

#[cfg(test)]
mod tests;
