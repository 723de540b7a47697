//! Results of the end-to-end benchmark: one record per (configuration, workload, round,
//! pinning), medians over rounds, ratios to `direct` and to `mesh-iptables`, the targets of
//! issue #6, and the outputs (terminal table, JSON, markdown section, SVG chart), on the shared
//! [report core](crate::report).

use std::fmt::Write as _;

use serde_json::{json, Value};

use crate::e2e_chart::Section as ChartSection;
use crate::e2e_chart::{self, Panel, Series};
use crate::report::{self, median, Machine, Section};
pub use crate::report::{ratio, Cell, PINNINGS};

/// The configurations, in table order: the first is the baseline of the first ratio, the second
/// the baseline of the second.
pub const CONFIGS: [&str; 6] = [
    "direct",
    "mesh-iptables",
    "mesh-ebpf",
    "mesh-ebpf-no-skmsg",
    "haproxy-sidecars",
    "mesh-ebpf-tls",
];

const DIRECT: &str = CONFIGS[0];
const IPTABLES: &str = CONFIGS[1];
const EBPF: &str = CONFIGS[2];
const HAPROXY: &str = CONFIGS[4];

/// Where a measured path's two pods run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Topology {
    /// Both pods on one node.
    SameNode,
    /// The client's pod on one node, the server's on another.
    CrossNode,
}

impl Topology {
    /// Every topology, in report order.
    pub const ALL: [Topology; 2] = [Topology::SameNode, Topology::CrossNode];

    /// The section heading.
    pub fn title(self) -> &'static str {
        match self {
            Topology::SameNode => "Same node",
            Topology::CrossNode => "Across nodes",
        }
    }
}

/// One path the chart and the report can show: the configuration whose records it draws
/// ([`Record::config`]), its legend label, and its topology.
#[derive(Clone, Copy, Debug)]
pub struct Path {
    /// Where its pods run.
    pub topology: Topology,
    /// The configuration name the records carry.
    pub config: &'static str,
    /// The legend's label.
    pub label: &'static str,
}

/// Every path, as data: a new configuration or topology is one more row here. A path with no
/// records in a run is left out of that run's chart (listed as not measured in the notes).
pub const PATHS: &[Path] = &[
    Path {
        topology: Topology::SameNode,
        config: "direct",
        label: "direct",
    },
    Path {
        topology: Topology::SameNode,
        config: "mesh-ebpf",
        label: "mesh (eBPF, spliced)",
    },
    Path {
        topology: Topology::SameNode,
        config: "mesh-ebpf-tls",
        label: "mesh TLS (--same-node-splice=false)",
    },
    Path {
        topology: Topology::SameNode,
        config: "mesh-ebpf-no-skmsg",
        label: "mesh (eBPF, no sk_msg)",
    },
    Path {
        topology: Topology::SameNode,
        config: "mesh-iptables",
        label: "mesh-iptables",
    },
    Path {
        topology: Topology::SameNode,
        config: "haproxy-sidecars",
        label: "haproxy-sidecars",
    },
    Path {
        topology: Topology::CrossNode,
        config: "direct-cross-node",
        label: "direct",
    },
    Path {
        topology: Topology::CrossNode,
        config: "mesh-ebpf-cross-node",
        label: "mesh (eBPF, pooled)",
    },
    Path {
        topology: Topology::CrossNode,
        config: "mesh-iptables-cross-node",
        label: "mesh-iptables",
    },
    Path {
        topology: Topology::CrossNode,
        config: "haproxy-sidecars-cross-node",
        label: "haproxy-sidecars",
    },
];

/// The paths of `topology` that have records.
fn measured_paths(records: &[Record], topology: Topology) -> Vec<Path> {
    PATHS
        .iter()
        .filter(|p| p.topology == topology)
        .filter(|p| records.iter().any(|r| r.config == p.config))
        .copied()
        .collect()
}

/// The opening marker of the e2e section of `docs/benchmarks.md`.
pub const BEGIN: &str = "<!-- e2e:begin -->";
/// Its closing marker.
pub const END: &str = "<!-- e2e:end -->";
/// The e2e benchmark's section.
pub const SECTION: Section = Section {
    begin: BEGIN,
    end: END,
};

/// One measurement.
#[derive(Clone, Debug)]
pub struct Record {
    pub config: &'static str,
    pub workload: &'static str,
    pub round: usize,
    pub pinning: &'static str,
    /// Figures by name (`req_per_s`, `p99_us`, `proxy_cpu_per_10k`, `proxy_peak_rss_mib`, ...).
    pub metrics: Vec<(String, f64)>,
    /// The client's report (wrk, iperf3 or our connection client).
    pub client: Value,
    /// Proxy counter deltas of the configuration's two pods (mesh only).
    pub proxy: Value,
    /// Kernel counter deltas of the eBPF agent's dataplane.
    pub counters: Value,
    /// Resource use of the proxy processes around the run.
    pub resources: Value,
    pub valid: bool,
    /// Why the run is invalid, or what failed.
    pub note: Option<String>,
}

impl Record {
    /// The figure `name` of this run.
    pub fn metric(&self, name: &str) -> Option<f64> {
        report::metric(&self.metrics, name)
    }

    /// The record as it appears in the JSON output.
    pub fn to_json(&self) -> Value {
        let metrics = report::metrics_json(&self.metrics);
        json!({
            "config": self.config,
            "workload": self.workload,
            "round": self.round,
            "pinning": self.pinning,
            "valid": self.valid,
            "note": self.note,
            "metrics": metrics,
            "client": self.client,
            "proxy": self.proxy,
            "counters": self.counters,
            "resources": self.resources,
        })
    }
}

/// How the benchmark ran.
#[derive(Clone, Debug)]
pub struct Setup {
    pub rounds: usize,
    pub quick: bool,
    pub cpu: usize,
    pub wrk_secs: u64,
    pub iperf_secs: u64,
    pub conn_secs: f64,
    pub server_threads: usize,
    /// The mesh agents' worker threads (`--worker-threads`, as meshd takes it); `None`: meshd's
    /// default, half the CPUs, at least one.
    pub worker_threads: Option<u64>,
    /// What the mesh clients dial: `vip` (transparent) or `upstream` (127.0.0.1:<port>).
    pub dial: &'static str,
    /// RSS of each configuration's agent right after its first start, before any traffic.
    pub idle_rss_mib: Vec<(&'static str, f64)>,
}

/// What a row compares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Higher is better; ratios to direct and to iptables.
    Higher,
    /// Lower is better; ratios to direct and to iptables.
    Lower,
    /// The proxies' cost (direct has none): lower is better, ratio to iptables only.
    ProxyCost,
    /// A share, shown as a percentage, no ratios.
    Share,
}

/// A row of the result table. `workload` `*` takes, per round, the largest value over all
/// workloads.
pub struct Row {
    pub workload: &'static str,
    /// The workload of `direct` that the ratio to direct compares with, when direct does not
    /// run this one (the mesh without TLS session resumption: direct has no TLS).
    pub direct_workload: Option<&'static str>,
    pub metric: &'static str,
    pub label: &'static str,
    pub kind: Kind,
}

const fn row(workload: &'static str, metric: &'static str, label: &'static str, kind: Kind) -> Row {
    Row {
        workload,
        direct_workload: None,
        metric,
        label,
        kind,
    }
}

pub const ROWS: [Row; 27] = [
    row(
        "http-1",
        "req_per_s",
        "HTTP 1 KiB, 1 conn: requests/s",
        Kind::Higher,
    ),
    row("http-1", "p50_us", "  p50 (µs)", Kind::Lower),
    row("http-1", "p90_us", "  p90 (µs)", Kind::Lower),
    row("http-1", "p99_us", "  p99 (µs)", Kind::Lower),
    row(
        "http-16",
        "req_per_s",
        "HTTP 1 KiB, 16 conns: requests/s",
        Kind::Higher,
    ),
    row("http-16", "p50_us", "  p50 (µs)", Kind::Lower),
    row("http-16", "p90_us", "  p90 (µs)", Kind::Lower),
    row("http-16", "p99_us", "  p99 (µs)", Kind::Lower),
    row(
        "http-64",
        "req_per_s",
        "HTTP 1 KiB, 64 conns: requests/s",
        Kind::Higher,
    ),
    row("http-64", "p50_us", "  p50 (µs)", Kind::Lower),
    row("http-64", "p90_us", "  p90 (µs)", Kind::Lower),
    row("http-64", "p99_us", "  p99 (µs)", Kind::Lower),
    row(
        "bulk",
        "gbit_per_s",
        "bulk one-way (iperf3): Gbit/s",
        Kind::Higher,
    ),
    row(
        "connect",
        "conns_per_s",
        "new connections/s (1 KiB each way)",
        Kind::Higher,
    ),
    row(
        "connect",
        "p99_us",
        "  connect+exchange+close p99 (µs)",
        Kind::Lower,
    ),
    row(
        "connect",
        "resumed_share",
        "  TLS handshakes resumed",
        Kind::Share,
    ),
    Row {
        workload: "connect-no-resumption",
        direct_workload: Some("connect"),
        metric: "conns_per_s",
        label: "new connections/s, TLS resumption off",
        kind: Kind::Higher,
    },
    Row {
        workload: "connect-no-resumption",
        direct_workload: Some("connect"),
        metric: "p99_us",
        label: "  connect+exchange+close p99 (µs)",
        kind: Kind::Lower,
    },
    row(
        "connect-no-resumption",
        "resumed_share",
        "  TLS handshakes resumed",
        Kind::Share,
    ),
    row(
        "http-1",
        "proxy_cpu_per_10k",
        "proxy CPU s / 10k req, 1 conn",
        Kind::ProxyCost,
    ),
    row(
        "http-16",
        "proxy_cpu_per_10k",
        "proxy CPU s / 10k req, 16 conns",
        Kind::ProxyCost,
    ),
    row(
        "http-64",
        "proxy_cpu_per_10k",
        "proxy CPU s / 10k req, 64 conns",
        Kind::ProxyCost,
    ),
    row(
        "connect",
        "proxy_cpu_per_10k",
        "proxy CPU s / 10k connections",
        Kind::ProxyCost,
    ),
    row(
        "connect-no-resumption",
        "proxy_cpu_per_10k",
        "proxy CPU s / 10k conns, no resumption",
        Kind::ProxyCost,
    ),
    row(
        "bulk",
        "proxy_cpu_per_gb",
        "proxy CPU s / GB (bulk)",
        Kind::ProxyCost,
    ),
    row(
        "*",
        "proxy_peak_rss_mib",
        "proxy peak RSS (MiB)",
        Kind::ProxyCost,
    ),
    row(
        "bulk",
        "proxy_peak_rss_mib",
        "  during bulk (MiB)",
        Kind::ProxyCost,
    ),
];

/// The median over rounds of `metric` of `config`'s `workload` runs (`*`: per round, the
/// largest over all workloads). A round with an invalid run of that workload does not count.
pub fn median_of(
    records: &[Record],
    pinning: &str,
    config: &str,
    workload: &str,
    metric: &str,
) -> Cell {
    let runs: Vec<&Record> = records
        .iter()
        .filter(|r| r.pinning == pinning && r.config == config)
        .filter(|r| workload == "*" || r.workload == workload)
        .collect();
    let mut values = Vec::new();
    let (mut valid, mut total) = (0, 0);
    let rounds: std::collections::BTreeSet<usize> = runs.iter().map(|r| r.round).collect();
    for round in rounds {
        let of_round: Vec<&&Record> = runs.iter().filter(|r| r.round == round).collect();
        let invalid = of_round.iter().any(|r| !r.valid);
        if !invalid && of_round.iter().all(|r| r.metric(metric).is_none()) {
            // A figure this configuration does not have (no proxy, no TLS).
            continue;
        }
        total += 1;
        if invalid {
            continue;
        }
        let v = of_round
            .iter()
            .filter_map(|r| r.metric(metric))
            .reduce(f64::max);
        if let Some(v) = v {
            valid += 1;
            values.push(v);
        }
    }
    Cell {
        median: median(values),
        valid,
        total,
    }
}

fn cell(records: &[Record], pinning: &str, config: &str, row: &Row) -> Cell {
    let workload = match row.direct_workload {
        Some(w) if config == DIRECT => w,
        _ => row.workload,
    };
    median_of(records, pinning, config, workload, row.metric)
}

fn fmt_value(row: &Row, v: f64) -> String {
    match row.metric {
        "resumed_share" => format!("{:.1}%", v * 100.0),
        "req_per_s" | "conns_per_s" => format!("{v:.0}"),
        "gbit_per_s" => format!("{v:.2}"),
        "proxy_peak_rss_mib" => format!("{v:.1}"),
        m if m.contains("cpu") => format!("{v:.3}"),
        _ if v >= 100.0 => format!("{v:.0}"),
        _ => format!("{v:.1}"),
    }
}

/// The ratios a configuration's cell shows: to direct (all but direct) and to mesh-iptables
/// (all but direct and mesh-iptables); proxy costs only to mesh-iptables.
fn ratios_for(config: &str, kind: Kind, c: Cell, direct: Cell, ipt: Cell) -> Vec<Option<f64>> {
    match (kind, config) {
        (_, DIRECT) | (Kind::Share, _) => vec![],
        (Kind::ProxyCost, IPTABLES) => vec![],
        (Kind::ProxyCost, _) => vec![None, ratio(c, ipt)],
        (_, IPTABLES) => vec![ratio(c, direct)],
        _ => vec![ratio(c, direct), ratio(c, ipt)],
    }
}

/// The cells of one row, one per configuration.
fn row_cells(records: &[Record], pinning: &str, row: &Row) -> Vec<String> {
    let cells: Vec<Cell> = CONFIGS
        .iter()
        .map(|config| cell(records, pinning, config, row))
        .collect();
    let (direct, ipt) = (cells[0], cells[1]);
    CONFIGS
        .iter()
        .zip(&cells)
        .map(|(&config, &c)| {
            if config == DIRECT && (row.direct_workload.is_some() || row.kind == Kind::Share) {
                return "-".to_string();
            }
            let Some(v) = c.median else {
                return if c.total == 0 {
                    "-".to_string()
                } else {
                    "invalid".to_string()
                };
            };
            let mut s = fmt_value(row, v);
            let ratios = ratios_for(config, row.kind, c, direct, ipt);
            if ratios.iter().any(Option::is_some) {
                let parts: Vec<String> = ratios
                    .iter()
                    .map(|r| r.map_or("-".to_string(), |r| format!("{r:.2}x")))
                    .collect();
                let _ = write!(s, " ({})", parts.join(", "));
            }
            if c.valid < c.total {
                let _ = write!(s, " [{}/{}]", c.valid, c.total);
            }
            s
        })
        .collect()
}

/// How a target compares.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Goal {
    AtLeast(f64),
    AtMost(f64),
    Below(f64),
}

/// A target of issue #6 and what this run measured for it.
#[derive(Clone, Debug)]
pub struct Target {
    pub label: String,
    pub value: Option<f64>,
    pub goal: Goal,
}

impl Target {
    pub fn met(&self) -> Option<bool> {
        let v = self.value?;
        Some(match self.goal {
            Goal::AtLeast(t) => v >= t,
            Goal::AtMost(t) => v <= t,
            Goal::Below(t) => v < t,
        })
    }

    fn goal_text(&self) -> String {
        match self.goal {
            Goal::AtLeast(t) => format!(">= {t}"),
            Goal::AtMost(t) => format!("<= {t}"),
            Goal::Below(t) => format!("< {t}"),
        }
    }

    fn verdict(&self) -> &'static str {
        match self.met() {
            Some(true) => "met",
            Some(false) => "MISSED",
            None => "not measured",
        }
    }
}

/// The targets of issue #6 for one placement.
pub fn targets(records: &[Record], pinning: &str) -> Vec<Target> {
    let m = |config: &str, workload: &str, metric: &str| {
        median_of(records, pinning, config, workload, metric)
    };
    let vs = |workload: &str, metric: &str, base: &str| {
        ratio(m(EBPF, workload, metric), m(base, workload, metric))
    };
    let mut t = Vec::new();
    for (wl, c) in [("http-16", 16), ("http-64", 64)] {
        t.push(Target {
            label: format!("mesh-ebpf ÷ haproxy-sidecars, requests/s at {c} conns"),
            value: vs(wl, "req_per_s", HAPROXY),
            goal: Goal::AtLeast(2.0),
        });
        t.push(Target {
            label: format!("mesh-ebpf ÷ haproxy-sidecars, p99 at {c} conns"),
            value: vs(wl, "p99_us", HAPROXY),
            goal: Goal::Below(1.0),
        });
    }
    t.push(Target {
        label: "mesh-ebpf ÷ haproxy-sidecars, new connections/s (resumption on)".into(),
        value: vs("connect", "conns_per_s", HAPROXY),
        goal: Goal::AtLeast(2.0),
    });
    t.push(Target {
        label: "mesh-ebpf ÷ haproxy-sidecars, bulk throughput".into(),
        value: vs("bulk", "gbit_per_s", HAPROXY),
        goal: Goal::AtLeast(2.0),
    });
    for (wl, c) in [("http-1", 1), ("http-16", 16), ("http-64", 64)] {
        t.push(Target {
            label: format!("mesh-ebpf ÷ mesh-iptables, p50 at {c} conn(s)"),
            value: vs(wl, "p50_us", IPTABLES),
            goal: Goal::AtMost(0.85),
        });
        t.push(Target {
            label: format!("mesh-ebpf ÷ mesh-iptables, requests/s at {c} conn(s)"),
            value: vs(wl, "req_per_s", IPTABLES),
            goal: Goal::AtLeast(1.15),
        });
    }
    // Issue #15, same node: the spliced mesh against no mesh at all.
    for (wl, c) in [("http-1", 1), ("http-16", 16), ("http-64", 64)] {
        t.push(Target {
            label: format!("same node: mesh-ebpf (spliced) ÷ direct, requests/s at {c} conn(s)"),
            value: vs(wl, "req_per_s", DIRECT),
            goal: Goal::AtLeast(1.0),
        });
        t.push(Target {
            label: format!("same node: mesh-ebpf (spliced) ÷ direct, p50 at {c} conn(s)"),
            value: vs(wl, "p50_us", DIRECT),
            goal: Goal::AtMost(1.0),
        });
    }
    t.push(Target {
        label: "same node: mesh-ebpf (spliced) ÷ direct, one request per connection".into(),
        value: vs("connect", "conns_per_s", DIRECT),
        goal: Goal::AtLeast(0.5),
    });
    for (wl, c) in [("http-16", 16), ("http-64", 64)] {
        // CPU s per 10,000 requests / 10 = vCPU per 1,000 requests/s.
        t.push(Target {
            label: format!("mesh-ebpf agent vCPU per 1,000 requests/s at {c} conns"),
            value: m(EBPF, wl, "proxy_cpu_per_10k").median.map(|v| v / 10.0),
            goal: Goal::AtMost(0.06),
        });
    }
    t
}

/// The agent's memory targets of issue #15: at rest, the eBPF agent at most 5 MiB above the
/// iptables agent (both right after start, before any traffic); under load, its peak RSS
/// (`VmHWM`, the largest of any valid run, pinned or not) below ztunnel's 18 MiB.
pub fn memory_targets(records: &[Record], setup: &Setup) -> Vec<Target> {
    let idle = |config: &str| {
        setup
            .idle_rss_mib
            .iter()
            .find(|(c, _)| *c == config)
            .map(|(_, v)| *v)
    };
    let peak = records
        .iter()
        .filter(|r| r.config == EBPF && r.valid)
        .filter_map(|r| r.metric("proxy_peak_rss_mib"))
        .reduce(f64::max);
    vec![
        Target {
            label: "mesh-ebpf agent RSS at rest − mesh-iptables agent's (MiB)".into(),
            value: idle(EBPF).zip(idle(IPTABLES)).map(|(e, i)| e - i),
            goal: Goal::AtMost(5.0),
        },
        Target {
            label: "mesh-ebpf agent peak RSS under load (MiB)".into(),
            value: peak,
            goal: Goal::Below(18.0),
        },
    ]
}

fn pinning_title(pinning: &str, cpu: usize) -> String {
    if pinning == "pinned" {
        format!("Pinned: client, servers and proxies on CPU {cpu} (the whole path's CPU cost)")
    } else {
        "Unpinned: the scheduler places everything (what users see)".to_string()
    }
}

/// Lines about validity: how much eBPF redirected, idle RSS, invalid runs.
fn notes(records: &[Record], setup: &Setup) -> Vec<String> {
    let mut notes = Vec::new();
    for pinning in PINNINGS {
        let parts: Vec<String> = ["connect", "connect-no-resumption"]
            .iter()
            .filter_map(|wl| {
                records
                    .iter()
                    .filter(|r| r.config == EBPF && r.pinning == pinning && r.valid)
                    .filter(|r| r.workload == *wl)
                    .filter_map(|r| r.metric("redirected_share"))
                    .reduce(f64::min)
                    .map(|min| format!("{wl} {:.0}%", min * 100.0))
            })
            .collect();
        if !parts.is_empty() {
            notes.push(format!(
                "mesh-ebpf {pinning}: share of the client's bytes that took the sk_msg redirect \
                 between app and proxy (lowest run): {}; every mesh-ebpf HTTP and connection run \
                 redirected bytes and no mesh-ebpf-no-skmsg run did (checked with the kernel \
                 counters). iperf3 connects with a blocking socket, which the dataplane keeps on \
                 TCP by design (docs/dataplane.md), so its bulk bytes never take the redirect and \
                 mesh-ebpf's bulk figure is that of connect4 + the proxy",
                parts.join(", ")
            ));
        }
    }
    if !setup.idle_rss_mib.is_empty() {
        let parts: Vec<String> = setup
            .idle_rss_mib
            .iter()
            .map(|(c, v)| format!("{c} {v:.1} MiB"))
            .collect();
        notes.push(format!(
            "agent RSS right after start, before any traffic: {} (the eBPF agent returns what its \
             loader freed, the parsed kernel BTF, with malloc_trim)",
            parts.join(", ")
        ));
    }
    for r in records.iter().filter(|r| !r.valid) {
        notes.push(report::invalid_note(
            r.config,
            r.workload,
            r.pinning,
            r.round,
            r.note.as_deref(),
        ));
    }
    notes
}

const METHOD_NOTE: &str = "Configurations: `direct` dials the server pod's IP, no proxy. \
    `mesh-iptables`, `mesh-ebpf` and `mesh-ebpf-no-skmsg` dial the api service's virtual IP \
    (transparent mode) through one agent (`mesh-bench agent`, the same `Agent::start` as meshd): \
    iptables REDIRECT (Consul's chains), the kernel dataplane, and the kernel dataplane with the \
    sk_msg redirect off (connect4 + getsockopt only). `haproxy-sidecars` dials `127.0.0.1` in the \
    client pod, where HAProxy (`mode tcp`) forwards over mTLS (TLS 1.3, ECDSA P-256, client \
    certificate required and verified) to a second HAProxy in the server pod, which forwards to \
    the app. A run is valid when its client reports no error (wrk: no socket error and no \
    non-2xx answer) and, for the mesh, the proxies' counters show no TLS failure, denial, limit \
    or endpoint failure, and the kernel counters show the sk_msg redirect used (or, switched off, \
    not used). wrk and iperf3 end by closing connections with requests or bytes in flight, which \
    the proxies count as connection errors: those do not invalidate their runs; our connection \
    client ends cleanly, so its runs must match the proxies' connection and byte counts exactly.";

const RESUMPTION_NOTE: &str = "TLS session resumption: the mesh runs with it on (the default; \
    the agent's first full handshake falls in the warm-up) and, in the rows \"TLS resumption \
    off\", with an agent started with `ProxyConfig::tls_resumption = false` (`meshd \
    --no-tls-resumption`): no tickets, no session cache, a full mTLS handshake (signatures and \
    chain checks both ways) per connection; those rows' ratio to direct compares with direct's \
    connection rate (direct has no TLS). \"Resumed\" is the share of handshakes that resumed \
    (proxy counters, both ends). HAProxy runs with its defaults, which resume: the client side \
    keeps the last session of its `server` line and offers it on the next connection (only \
    `no-ssl-reuse` turns that off), the server side issues TLS 1.3 tickets and keeps a session \
    cache (`tune.ssl.cachesize`, 20,000 entries).";

const COST_NOTE: &str = "Proxy cost: user + system CPU time of the proxy processes (the agent; \
    or both HAProxy processes, each with HAProxy's default of one thread per CPU) read from \
    `/proc/<pid>/stat` before the client starts and after the agent has closed the last proxied \
    connection, per 10,000 requests (wrk's count), connections, or GB (iperf3's). vCPU per 1,000 \
    requests/s is CPU s per 10,000 requests ÷ 10. Peak RSS is `VmHWM` of the proxy processes \
    (summed for HAProxy's two), reset through `/proc/<pid>/clear_refs` before each run; \"proxy \
    peak RSS\" is the largest over a round's workloads. Each agent is started for its \
    configuration's turn and stopped after it (an eBPF agent's programs and pins are removed \
    then, so the other configurations run on a node without them); HAProxy runs throughout.";

/// The table printed at the end of a run.
pub fn terminal(records: &[Record], machine: &Machine, setup: &Setup) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\ne2e benchmark: {} round(s), medians over rounds; in parentheses: ratio to direct, \
         ratio to mesh-iptables",
        setup.rounds
    );
    let _ = writeln!(out, "{}", machine.terminal_line());
    let _ = writeln!(
        out,
        "mesh agents: {}",
        agent_workers_text(setup.worker_threads)
    );
    for pinning in PINNINGS {
        if !records.iter().any(|r| r.pinning == pinning) {
            continue;
        }
        let _ = writeln!(out, "\n{}", pinning_title(pinning, setup.cpu));
        let _ = write!(out, "{:<40}", "");
        for c in CONFIGS {
            let _ = write!(out, " {c:>22}");
        }
        let _ = writeln!(out);
        for row in &ROWS {
            let _ = write!(out, "{:<40}", row.label);
            for cell in row_cells(records, pinning, row) {
                let _ = write!(out, " {cell:>22}");
            }
            let _ = writeln!(out);
        }
        let _ = writeln!(out, "\nTargets ({pinning}):");
        for t in targets(records, pinning) {
            let _ = writeln!(
                out,
                "  {:<66} {:>8} (target {:>7}): {}",
                t.label,
                t.value.map_or("-".to_string(), |v| format!("{v:.3}")),
                t.goal_text(),
                t.verdict()
            );
        }
    }
    let _ = writeln!(out, "\nMemory targets:");
    for t in memory_targets(records, setup) {
        let _ = writeln!(
            out,
            "  {:<66} {:>8} (target {:>7}): {}",
            t.label,
            t.value.map_or("-".to_string(), |v| format!("{v:.1}")),
            t.goal_text(),
            t.verdict()
        );
    }
    let _ = writeln!(out);
    for note in notes(records, setup) {
        let _ = writeln!(out, "{note}");
    }
    out
}

/// The whole run as JSON: machine, setup, every record, the summary table and the targets.
pub fn to_json(records: &[Record], machine: &Machine, setup: &Setup) -> Value {
    let mut summary = Vec::new();
    let mut all_targets = Vec::new();
    for pinning in PINNINGS {
        for row in &ROWS {
            let direct = cell(records, pinning, DIRECT, row);
            let ipt = cell(records, pinning, IPTABLES, row);
            for config in CONFIGS {
                let c = cell(records, pinning, config, row);
                let (to_direct, to_ipt) = match row.kind {
                    Kind::Higher | Kind::Lower => (ratio(c, direct), ratio(c, ipt)),
                    Kind::ProxyCost => (None, ratio(c, ipt)),
                    Kind::Share => (None, None),
                };
                summary.push(json!({
                    "pinning": pinning,
                    "workload": row.workload,
                    "metric": row.metric,
                    "label": row.label.trim(),
                    "config": config,
                    "median": c.median,
                    "valid_rounds": c.valid,
                    "rounds": c.total,
                    "ratio_to_direct": to_direct,
                    "ratio_to_mesh_iptables": to_ipt,
                }));
            }
        }
        for t in targets(records, pinning) {
            all_targets.push(json!({
                "pinning": pinning,
                "target": t.label,
                "value": t.value,
                "goal": t.goal_text(),
                "met": t.met(),
            }));
        }
    }
    json!({
        "benchmark": "e2e",
        "date": machine.date,
        "machine": machine.to_json(),
        "setup": {
            "rounds": setup.rounds,
            "quick": setup.quick,
            "pinned_cpu": setup.cpu,
            "configs": CONFIGS,
            "response_bytes": crate::e2e_app::MSG,
            "wrk_connections": crate::e2e::HTTP_CONNS,
            "wrk_seconds": setup.wrk_secs,
            "iperf3_seconds": setup.iperf_secs,
            "connect_seconds": setup.conn_secs,
            "server_threads": setup.server_threads,
            "agent_worker_threads": setup.worker_threads,
            "mesh_dial": setup.dial,
            "agent_idle_rss_mib": setup
                .idle_rss_mib
                .iter()
                .map(|(c, v)| (c.to_string(), json!(v)))
                .collect::<serde_json::Map<String, Value>>(),
        },
        "notes": [METHOD_NOTE, RESUMPTION_NOTE, COST_NOTE],
        "records": records.iter().map(Record::to_json).collect::<Vec<_>>(),
        "summary": summary,
        "targets": all_targets,
        "memory_targets": memory_targets(records, setup)
            .iter()
            .map(|t| json!({
                "target": t.label,
                "value": t.value,
                "goal": t.goal_text(),
                "met": t.met(),
            }))
            .collect::<Vec<_>>(),
    })
}

/// The chart: for each topology with records (a section), requests/s and p99 per path at each
/// connection count, per placement. Which paths and topologies there are is [`PATHS`].
///
/// # Errors
///
/// A message if the chart cannot be drawn.
pub fn chart(records: &[Record], machine: &Machine, setup: &Setup) -> Result<String, String> {
    let mut sections = Vec::new();
    for topology in Topology::ALL {
        let paths = measured_paths(records, topology);
        if paths.is_empty() {
            continue;
        }
        let mut panels = Vec::new();
        for pinning in PINNINGS {
            if !records
                .iter()
                .any(|r| r.pinning == pinning && paths.iter().any(|p| p.config == r.config))
            {
                continue;
            }
            for (metric, what) in [("req_per_s", "requests/s"), ("p99_us", "p99 latency (µs)")] {
                panels.push(Panel {
                    title: format!("HTTP 1 KiB, {what}, {pinning}"),
                    groups: crate::e2e::HTTP_CONNS
                        .iter()
                        .map(|c| format!("{c} conn{}", if *c == 1 { "" } else { "s" }))
                        .collect(),
                    series: paths
                        .iter()
                        .map(|path| Series {
                            name: path.label.to_string(),
                            values: ["http-1", "http-16", "http-64"]
                                .iter()
                                .map(|wl| {
                                    median_of(records, pinning, path.config, wl, metric).median
                                })
                                .collect(),
                        })
                        .collect(),
                });
            }
        }
        sections.push(ChartSection {
            title: topology.title().to_string(),
            panels,
        });
    }
    e2e_chart::svg(
        "mesh-bench e2e: wrk, HTTP/1.1 keep-alive, 1 KiB responses (medians over rounds)",
        &format!(
            "{}{}, Linux {}, {} CPUs, {} round(s) of {} s, load average {} at start, {} at end",
            machine.date,
            if setup.quick { " (--quick)" } else { "" },
            machine.kernel,
            machine.cpus,
            setup.rounds,
            setup.wrk_secs,
            machine.load_start,
            machine.load_end
        ),
        &sections,
        2,
    )
}

/// How the agents' worker threads were set, for the report.
fn agent_workers_text(workers: Option<u64>) -> String {
    match workers {
        Some(n) => format!("{n} worker thread(s) each (`--worker-threads {n}`)"),
        None => "meshd's default worker threads (half the CPUs, at least one)".into(),
    }
}

/// The markdown section, markers included.
pub fn markdown(records: &[Record], machine: &Machine, setup: &Setup) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "{BEGIN}");
    let _ = writeln!(
        md,
        "## End to end: two pods, direct vs the mesh vs HAProxy sidecars\n"
    );
    let _ = writeln!(
        md,
        "{} {} interleaved round(s) (every configuration in every round, the order rotating); \
         each figure is the median over rounds, with in parentheses its ratio to `direct` and to \
         `mesh-iptables` (proxy costs: to `mesh-iptables` only).\n",
        machine.generated_by("e2e", setup.quick),
        setup.rounds
    );
    let _ = writeln!(md, "- {METHOD_NOTE}");
    let _ = writeln!(
        md,
        "- Workloads, each run unpinned and with every process (client, server app, iperf3 \
         server, proxies) on one CPU: `wrk --latency -t(1|2) -c(1|16|64) -d{}s` against the \
         server app (tokio, {} threads, HTTP/1.1 keep-alive, 1 KiB responses); `iperf3 -t {}`, \
         one stream, client → server; new connections with our client (`mesh-bench client \
         conns`: connect, one 1 KiB request and response, close, one at a time) for {} s after \
         a {} s warm-up.",
        setup.wrk_secs,
        setup.server_threads,
        setup.iperf_secs,
        setup.conn_secs,
        setup.conn_secs / 10.0
    );
    let _ = writeln!(
        md,
        "- The mesh's agents: {}.",
        agent_workers_text(setup.worker_threads)
    );
    let _ = writeln!(md, "- {RESUMPTION_NOTE}");
    let _ = writeln!(md, "- {COST_NOTE}\n");
    let _ = writeln!(
        md,
        "![requests/s and p99 per configuration](bench-e2e.svg)\n"
    );
    for pinning in PINNINGS {
        if !records.iter().any(|r| r.pinning == pinning) {
            continue;
        }
        let _ = writeln!(md, "### {}\n", pinning_title(pinning, setup.cpu));
        let _ = writeln!(
            md,
            "| | direct | mesh-iptables (÷direct) | mesh-ebpf, spliced (÷direct, ÷iptables) | \
             mesh-ebpf-no-skmsg (÷direct, ÷iptables) | haproxy-sidecars (÷direct, ÷iptables) | \
             mesh-ebpf-tls (÷direct, ÷iptables) |"
        );
        let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|---:|");
        for row in &ROWS {
            let label = row.label.trim_start();
            let label = if row.label.starts_with(' ') {
                format!("&nbsp;&nbsp;{label}")
            } else {
                label.to_string()
            };
            let _ = writeln!(
                md,
                "| {label} | {} |",
                row_cells(records, pinning, row).join(" | ")
            );
        }
        let _ = writeln!(md, "\nTargets of issue #6, {pinning}:\n");
        let _ = writeln!(md, "| target | measured | goal | |");
        let _ = writeln!(md, "|---|---:|---|---|");
        for t in targets(records, pinning) {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} |",
                t.label,
                t.value.map_or("-".to_string(), |v| format!("{v:.3}")),
                t.goal_text(),
                match t.met() {
                    Some(true) => "met",
                    Some(false) => "**missed**",
                    None => "not measured",
                }
            );
        }
        let _ = writeln!(md);
    }
    let _ = writeln!(md, "Memory targets of issue #15 (agent RSS):\n");
    let _ = writeln!(md, "| target | measured | goal | |");
    let _ = writeln!(md, "|---|---:|---|---|");
    for t in memory_targets(records, setup) {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} |",
            t.label,
            t.value.map_or("-".to_string(), |v| format!("{v:.1}")),
            t.goal_text(),
            match t.met() {
                Some(true) => "met",
                Some(false) => "**missed**",
                None => "not measured",
            }
        );
    }
    let _ = writeln!(md);
    let unmeasured: Vec<String> = PATHS
        .iter()
        .filter(|p| !records.iter().any(|r| r.config == p.config))
        .map(|p| {
            format!(
                "{} ({}, `{}`)",
                p.label,
                p.topology.title().to_lowercase(),
                p.config
            )
        })
        .collect();
    if !unmeasured.is_empty() {
        let _ = writeln!(
            md,
            "- Paths not measured in this run: {}.",
            unmeasured.join(", ")
        );
    }
    for note in notes(records, setup) {
        let _ = writeln!(md, "- {note}");
    }
    let _ = writeln!(
        md,
        "\nFigures from a machine that is busy with other work are noisy, and on a 2-CPU machine \
         client, server and proxies compete for the same cores; compare the load averages above \
         with the CPU count."
    );
    let _ = writeln!(md, "{END}");
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(config: &'static str, workload: &'static str, round: usize, v: f64) -> Record {
        Record {
            config,
            workload,
            round,
            pinning: "pinned",
            metrics: vec![
                ("req_per_s".into(), v),
                ("p50_us".into(), 1000.0 / v),
                ("p99_us".into(), 2000.0 / v),
                ("proxy_peak_rss_mib".into(), v),
            ],
            client: Value::Null,
            proxy: Value::Null,
            counters: Value::Null,
            resources: Value::Null,
            valid: true,
            note: None,
        }
    }

    fn three_rounds(workload: &'static str) -> Vec<Record> {
        let mut records = Vec::new();
        for (round, vals) in [
            [100.0, 40.0, 60.0, 50.0, 20.0, 35.0],
            [120.0, 50.0, 80.0, 55.0, 25.0, 45.0],
            [110.0, 45.0, 70.0, 52.0, 30.0, 40.0],
        ]
        .into_iter()
        .enumerate()
        {
            for (config, v) in CONFIGS.into_iter().zip(vals) {
                records.push(rec(config, workload, round, v));
            }
        }
        records
    }

    #[test]
    fn cells_take_medians_and_ratios_to_both_baselines() {
        let mut records = three_rounds("http-1");
        let [d, i, e, n, h, t]: [String; 6] =
            row_cells(&records, "pinned", &ROWS[0]).try_into().unwrap();
        assert_eq!(t, "40 (0.36x, 0.89x)");
        assert_eq!(d, "110");
        assert_eq!(i, "45 (0.41x)");
        assert_eq!(e, "70 (0.64x, 1.56x)");
        assert_eq!(n, "52 (0.47x, 1.16x)");
        assert_eq!(h, "25 (0.23x, 0.56x)");
        // An invalid run drops its round from the cell.
        let ipt_round_1 = records
            .iter()
            .position(|r| r.config == IPTABLES && r.round == 1)
            .unwrap();
        records[ipt_round_1].valid = false;
        assert_eq!(
            row_cells(&records, "pinned", &ROWS[0])[1],
            "42 (0.39x) [2/3]"
        );
        // Proxy costs: direct has none, ratios only to mesh-iptables.
        let rss = ROWS
            .iter()
            .find(|r| r.metric == "proxy_peak_rss_mib" && r.workload == "*")
            .unwrap();
        let cells = row_cells(&records, "pinned", rss);
        // (mesh-iptables: round 2 invalid, median of 40 and 45.)
        assert_eq!(cells[2], "70.0 (-, 1.65x)");
    }

    #[test]
    fn star_rows_take_the_largest_value_of_each_round() {
        let records = vec![
            rec("direct", "http-1", 0, 10.0),
            rec("direct", "bulk", 0, 30.0),
            rec("direct", "http-1", 1, 20.0),
            rec("direct", "bulk", 1, 10.0),
        ];
        let c = median_of(&records, "pinned", "direct", "*", "proxy_peak_rss_mib");
        assert_eq!(c.median, Some(25.0));
        assert_eq!((c.valid, c.total), (2, 2));
    }

    #[test]
    fn memory_targets_compare_the_agents_at_rest_and_take_the_largest_peak() {
        let mut records = vec![
            rec(EBPF, "http-16", 0, 15.0),
            rec(EBPF, "bulk", 0, 19.0),
            rec(IPTABLES, "bulk", 0, 30.0),
        ];
        let setup = |idle: Vec<(&'static str, f64)>| Setup {
            rounds: 1,
            quick: true,
            cpu: 0,
            wrk_secs: 1,
            iperf_secs: 1,
            conn_secs: 1.0,
            server_threads: 1,
            worker_threads: None,
            dial: "vip",
            idle_rss_mib: idle,
        };
        let t = memory_targets(&records, &setup(vec![(IPTABLES, 7.0), (EBPF, 11.5)]));
        assert_eq!(t[0].value, Some(4.5));
        assert_eq!(t[0].met(), Some(true));
        // The eBPF agent's largest peak of a valid run (not the iptables agent's): 19 ≥ 18.
        assert_eq!(t[1].value, Some(19.0));
        assert_eq!(t[1].met(), Some(false));
        records[1].valid = false;
        let t = memory_targets(&records, &setup(vec![(EBPF, 22.4)]));
        assert_eq!(t[0].met(), None, "no iptables agent measured");
        assert_eq!(t[1].value, Some(15.0));
        assert_eq!(t[1].met(), Some(true));
    }

    #[test]
    fn targets_compare_ebpf_with_haproxy_and_iptables() {
        let mut records = three_rounds("http-16");
        records.extend(three_rounds("http-1"));
        let t = targets(&records, "pinned");
        let get = |label: &str| t.iter().find(|t| t.label == label).unwrap();
        // 70 / 25 = 2.8 >= 2: met.
        let rps = get("mesh-ebpf ÷ haproxy-sidecars, requests/s at 16 conns");
        assert!((rps.value.unwrap() - 2.8).abs() < 1e-9);
        assert_eq!(rps.met(), Some(true));
        // p99 ratio 25/70 < 1: met.
        assert_eq!(
            get("mesh-ebpf ÷ haproxy-sidecars, p99 at 16 conns").met(),
            Some(true)
        );
        // p50 ratio to iptables 45/70 = 0.64 <= 0.85: met; requests 1.56 >= 1.15: met.
        assert_eq!(
            get("mesh-ebpf ÷ mesh-iptables, p50 at 1 conn(s)").met(),
            Some(true)
        );
        // Nothing measured at 64 connections, nor bulk or connections.
        assert_eq!(
            get("mesh-ebpf ÷ haproxy-sidecars, requests/s at 64 conns").met(),
            None
        );
        assert_eq!(
            get("mesh-ebpf ÷ haproxy-sidecars, bulk throughput").met(),
            None
        );
        let missed = Target {
            label: "x".into(),
            value: Some(1.9),
            goal: Goal::AtLeast(2.0),
        };
        assert_eq!(missed.met(), Some(false));
        assert_eq!(missed.verdict(), "MISSED");
        let cpu = Target {
            label: "x".into(),
            value: Some(0.06),
            goal: Goal::AtMost(0.06),
        };
        assert_eq!(cpu.met(), Some(true));
        assert_eq!(
            Target {
                goal: Goal::Below(0.06),
                ..cpu
            }
            .met(),
            Some(false)
        );
    }

    #[test]
    fn results_json_has_one_record_per_run_and_a_summary_per_cell() {
        let records = three_rounds("http-64");
        let machine = Machine {
            kernel: "6.18".into(),
            cpus: 2,
            cpu_model: "cpu".into(),
            date: "2026-11-25".into(),
            load_start: "0.1".into(),
            load_end: "0.2".into(),
        };
        let setup = Setup {
            rounds: 3,
            quick: false,
            cpu: 0,
            wrk_secs: 7,
            iperf_secs: 5,
            conn_secs: 2.0,
            server_threads: 2,
            worker_threads: Some(1),
            dial: "vip",
            idle_rss_mib: vec![("mesh-ebpf", 22.0)],
        };
        let v = to_json(&records, &machine, &setup);
        let recs = v["records"].as_array().unwrap();
        assert_eq!(recs.len(), 3 * CONFIGS.len());
        for r in recs {
            for k in ["config", "workload", "round", "pinning", "valid", "metrics"] {
                assert!(!r[k].is_null(), "{k} in {r}");
            }
        }
        assert_eq!(recs[0]["metrics"]["req_per_s"], json!(100.0));
        assert_eq!(
            v["summary"].as_array().unwrap().len(),
            PINNINGS.len() * ROWS.len() * CONFIGS.len()
        );
        let cell = v["summary"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| {
                s["pinning"] == "pinned"
                    && s["workload"] == "http-64"
                    && s["metric"] == "req_per_s"
                    && s["config"] == "mesh-ebpf"
            })
            .unwrap();
        assert_eq!(cell["median"], json!(70.0));
        assert_eq!(cell["ratio_to_direct"], json!(70.0 / 110.0));
        assert_eq!(cell["ratio_to_mesh_iptables"], json!(70.0 / 45.0));
        assert_eq!(v["setup"]["agent_idle_rss_mib"]["mesh-ebpf"], json!(22.0));
        assert!(v["targets"].as_array().unwrap().len() >= 10);
        // The chart and the markdown section come from the same records.
        let svg = chart(&records, &machine, &setup).unwrap();
        assert!(svg.contains("haproxy-sidecars") && svg.contains("p99"));
        // Only the same-node paths have records: one section, no cross-node one.
        assert!(svg.contains("Same node") && !svg.contains("Across nodes"));
        let md = markdown(&records, &machine, &setup);
        assert!(md.starts_with(BEGIN) && md.trim_end().ends_with(END));
        assert!(md.contains("| HTTP 1 KiB, 64 conns: requests/s | 110 | 45 (0.41x) |"));
    }
}
