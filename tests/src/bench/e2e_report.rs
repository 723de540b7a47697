//! Results of the end-to-end benchmark: one record per (configuration, workload, round,
//! pinning), medians over rounds, ratios to `direct` and to `mesh-iptables`, and the three
//! outputs (terminal table, JSON, markdown section).

use std::fmt::Write as _;

use serde_json::{json, Value};

use crate::report::{median, Machine};

/// The configurations, in table order: the first is the baseline of the first ratio, the second
/// the baseline of the second.
pub const CONFIGS: [&str; 3] = ["direct", "mesh-iptables", "mesh-ebpf"];
pub const PINNINGS: [&str; 2] = ["pinned", "unpinned"];

pub const BEGIN: &str = "<!-- e2e:begin -->";
pub const END: &str = "<!-- e2e:end -->";

/// One measurement.
#[derive(Clone, Debug)]
pub struct Record {
    pub config: &'static str,
    pub workload: &'static str,
    pub round: usize,
    pub pinning: &'static str,
    /// Figures by name (`req_per_s`, `p50_us`, `agent_cpu_per_10k`, `peak_rss_mib`, ...).
    pub metrics: Vec<(String, f64)>,
    /// The client's full report.
    pub client: Value,
    /// Proxy counter deltas of the configuration's two pods (mesh only).
    pub proxy: Value,
    /// Kernel counter deltas of the eBPF agent's dataplane.
    pub counters: Value,
    /// Resource use around the run: agent (this process), server and client CPU seconds.
    pub resources: Value,
    pub valid: bool,
    /// Why the run is invalid, or what failed.
    pub note: Option<String>,
}

impl Record {
    pub fn metric(&self, name: &str) -> Option<f64> {
        self.metrics
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| *v)
    }

    pub fn to_json(&self) -> Value {
        let metrics: serde_json::Map<String, Value> = self
            .metrics
            .iter()
            .map(|(n, v)| (n.clone(), json!(v)))
            .collect();
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
    pub rr_secs: f64,
    pub rr_warmup: f64,
    pub many: usize,
    pub stream_secs: f64,
    pub conn_secs: f64,
    pub conn_warmup: f64,
    pub server_threads: usize,
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
    /// The agent's cost (direct has no agent): lower is better, ratio to iptables only.
    AgentCost,
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

pub const ROWS: [Row; 20] = [
    Row {
        direct_workload: None,
        workload: "rr-1",
        metric: "req_per_s",
        label: "1 KiB req/resp, 1 conn: requests/s",
        kind: Kind::Higher,
    },
    Row {
        direct_workload: None,
        workload: "rr-1",
        metric: "p50_us",
        label: "  p50 (µs)",
        kind: Kind::Lower,
    },
    Row {
        direct_workload: None,
        workload: "rr-1",
        metric: "p99_us",
        label: "  p99 (µs)",
        kind: Kind::Lower,
    },
    Row {
        direct_workload: None,
        workload: "rr-many",
        metric: "req_per_s",
        label: "1 KiB req/resp, 64 conns: requests/s",
        kind: Kind::Higher,
    },
    Row {
        direct_workload: None,
        workload: "rr-many",
        metric: "p50_us",
        label: "  p50 (µs)",
        kind: Kind::Lower,
    },
    Row {
        direct_workload: None,
        workload: "rr-many",
        metric: "p99_us",
        label: "  p99 (µs)",
        kind: Kind::Lower,
    },
    Row {
        direct_workload: None,
        workload: "stream",
        metric: "gb_per_s",
        label: "one-way, 64 KiB writes: GB/s",
        kind: Kind::Higher,
    },
    Row {
        direct_workload: None,
        workload: "connect",
        metric: "conns_per_s",
        label: "new connections/s (1 KiB each way)",
        kind: Kind::Higher,
    },
    Row {
        direct_workload: None,
        workload: "connect",
        metric: "p99_us",
        label: "  connect+exchange+close p99 (µs)",
        kind: Kind::Lower,
    },
    Row {
        direct_workload: None,
        workload: "connect",
        metric: "resumed_share",
        label: "  TLS handshakes resumed",
        kind: Kind::Share,
    },
    Row {
        direct_workload: Some("connect"),
        workload: "connect-no-resumption",
        metric: "conns_per_s",
        label: "new connections/s, TLS resumption off",
        kind: Kind::Higher,
    },
    Row {
        direct_workload: Some("connect"),
        workload: "connect-no-resumption",
        metric: "p99_us",
        label: "  connect+exchange+close p99 (µs)",
        kind: Kind::Lower,
    },
    Row {
        direct_workload: None,
        workload: "connect-no-resumption",
        metric: "resumed_share",
        label: "  TLS handshakes resumed",
        kind: Kind::Share,
    },
    Row {
        direct_workload: None,
        workload: "rr-1",
        metric: "agent_cpu_per_10k",
        label: "agent CPU s / 10k req, 1 conn",
        kind: Kind::AgentCost,
    },
    Row {
        direct_workload: None,
        workload: "rr-many",
        metric: "agent_cpu_per_10k",
        label: "agent CPU s / 10k req, 64 conns",
        kind: Kind::AgentCost,
    },
    Row {
        direct_workload: None,
        workload: "connect",
        metric: "agent_cpu_per_10k",
        label: "agent CPU s / 10k connections",
        kind: Kind::AgentCost,
    },
    Row {
        direct_workload: None,
        workload: "connect-no-resumption",
        metric: "agent_cpu_per_10k",
        label: "agent CPU s / 10k connections, no resumption",
        kind: Kind::AgentCost,
    },
    Row {
        direct_workload: None,
        workload: "stream",
        metric: "agent_cpu_per_gb",
        label: "agent CPU s / GB streamed",
        kind: Kind::AgentCost,
    },
    Row {
        direct_workload: None,
        workload: "rr-many",
        metric: "total_cpu_per_10k",
        label: "all CPU s / 10k req, 64 conns",
        kind: Kind::Lower,
    },
    Row {
        direct_workload: None,
        workload: "*",
        metric: "peak_rss_mib",
        label: "agent peak RSS (MiB)",
        kind: Kind::AgentCost,
    },
];

/// A cell of the table: the median over valid rounds.
#[derive(Clone, Copy, Debug)]
struct Cell {
    median: Option<f64>,
    valid: usize,
    total: usize,
}

fn cell(records: &[Record], pinning: &str, config: &str, row: &Row) -> Cell {
    let workload = match row.direct_workload {
        Some(w) if config == CONFIGS[0] => w,
        _ => row.workload,
    };
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
        if !invalid && of_round.iter().all(|r| r.metric(row.metric).is_none()) {
            // A figure this configuration does not have (no agent, no TLS).
            continue;
        }
        total += 1;
        if invalid {
            continue;
        }
        let v = of_round
            .iter()
            .filter_map(|r| r.metric(row.metric))
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

fn ratio(c: Cell, base: Cell) -> Option<f64> {
    match (c.median, base.median) {
        (Some(v), Some(b)) if b > 0.0 => Some(v / b),
        _ => None,
    }
}

fn fmt_value(row: &Row, v: f64) -> String {
    match row.metric {
        "resumed_share" => format!("{:.1}%", v * 100.0),
        "req_per_s" | "conns_per_s" => format!("{v:.0}"),
        "gb_per_s" => format!("{v:.3}"),
        "peak_rss_mib" => format!("{v:.1}"),
        m if m.contains("cpu") => format!("{v:.3}"),
        _ if v >= 100.0 => format!("{v:.0}"),
        _ => format!("{v:.1}"),
    }
}

/// The cells of one row: direct, mesh-iptables, mesh-ebpf.
fn row_cells(records: &[Record], pinning: &str, row: &Row) -> [String; 3] {
    let c: Vec<Cell> = CONFIGS
        .iter()
        .map(|config| cell(records, pinning, config, row))
        .collect();
    let (direct, ipt, ebpf) = (c[0], c[1], c[2]);
    let text = |c: Cell, ratios: &[Option<f64>]| -> String {
        let Some(v) = c.median else {
            return if c.total == 0 {
                "-".to_string()
            } else {
                "invalid".to_string()
            };
        };
        let mut s = fmt_value(row, v);
        let parts: Vec<String> = ratios
            .iter()
            .map(|r| r.map_or("-".to_string(), |r| format!("{r:.2}x")))
            .collect();
        if !parts.is_empty() && ratios.iter().any(Option::is_some) {
            let _ = write!(s, " ({})", parts.join(", "));
        }
        if c.valid < c.total {
            let _ = write!(s, " [{}/{}]", c.valid, c.total);
        }
        s
    };
    let direct_text = if row.direct_workload.is_some() {
        "-".to_string()
    } else {
        text(direct, &[])
    };
    match row.kind {
        Kind::Higher | Kind::Lower => [
            direct_text,
            text(ipt, &[ratio(ipt, direct)]),
            text(ebpf, &[ratio(ebpf, direct), ratio(ebpf, ipt)]),
        ],
        Kind::AgentCost => [
            text(direct, &[]),
            text(ipt, &[]),
            text(ebpf, &[None, ratio(ebpf, ipt)]),
        ],
        Kind::Share => ["-".to_string(), text(ipt, &[]), text(ebpf, &[])],
    }
}

fn pinning_title(pinning: &str, cpu: usize) -> String {
    if pinning == "pinned" {
        format!("Pinned: client, server and agent on CPU {cpu} (the whole path's CPU cost)")
    } else {
        "Unpinned: the scheduler places everything (what users see)".to_string()
    }
}

/// Lines about validity: how much eBPF redirected, resumption, invalid runs.
fn notes(records: &[Record], setup: &Setup) -> Vec<String> {
    let mut notes = Vec::new();
    for pinning in PINNINGS {
        let ebpf: Vec<&Record> = records
            .iter()
            .filter(|r| r.config == "mesh-ebpf" && r.pinning == pinning && r.valid)
            .collect();
        let mut parts = Vec::new();
        for wl in [
            "rr-1",
            "rr-many",
            "stream",
            "connect",
            "connect-no-resumption",
        ] {
            let fr: Vec<f64> = ebpf
                .iter()
                .filter(|r| r.workload == wl)
                .filter_map(|r| r.metric("redirected_share"))
                .collect();
            let fallbacks: u64 = ebpf
                .iter()
                .filter(|r| r.workload == wl)
                .filter_map(|r| r.counters["backlog_fallbacks"].as_u64())
                .sum();
            if let Some(min) = fr.iter().copied().reduce(f64::min) {
                let mut p = format!("{wl} {:.0}%", min * 100.0);
                if fallbacks > 0 {
                    let _ = write!(p, " ({fallbacks} backlog fallback(s) to TCP)");
                }
                parts.push(p);
            }
        }
        if !parts.is_empty() {
            notes.push(format!(
                "mesh-ebpf {pinning}: share of the client's bytes that took the sk_msg redirect \
                 between app and proxy (lowest run): {}",
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
            "agent RSS right after start, before any traffic: {} (the eBPF agent also holds its \
             BPF object and, likely most of the difference, the kernel BTF that the loader reads \
             and parses)",
            parts.join(", ")
        ));
    }
    for r in records.iter().filter(|r| !r.valid) {
        notes.push(format!(
            "INVALID: {} {} {} round {}: {}",
            r.config,
            r.workload,
            r.pinning,
            r.round + 1,
            r.note.as_deref().unwrap_or("?")
        ));
    }
    notes
}

const RESUMPTION_NOTE: &str = "TLS session resumption: the mesh rows run with it on (the \
    default; every connection after the agent's first resumes, that first full handshake falls in \
    the warm-up) and, in the rows marked \"TLS resumption off\", with an agent started with \
    `ProxyConfig::tls_resumption = false` (`meshd --no-tls-resumption`): no session tickets, no \
    session cache, a full mTLS handshake (certificate signatures and chain checks both ways) for \
    every connection. The ratio to direct of those rows compares with direct's connection rate \
    (direct has no TLS). \"Resumed\" is the share of handshakes that resumed (proxy counters \
    `tls_resumed` / `tls_handshakes`, both ends).";

const COST_NOTE: &str = "Each agent is a process of its own (`mesh-bench agent`, the same \
    `Agent::start` as meshd, a multi-threaded tokio runtime), started for its configuration's turn \
    in each round and stopped after it (an eBPF agent's programs and pins are removed then, so \
    the other configurations run on a node without them). Agent CPU is its user+system time \
    (`getrusage`) from the start of the client to the close of the last proxied connection, per \
    10,000 requests (or connections, or GB) the client made, warm-up included. \"All CPU\" adds the \
    client's and the server's time (direct: those two only). Peak RSS is the agent process's \
    high-water mark during the run (reset before each run through `/proc/self/clear_refs`); it \
    includes memory the allocator kept from earlier runs of the same turn.";

/// The table printed at the end of a run.
pub fn terminal(records: &[Record], machine: &Machine, setup: &Setup) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\ne2e benchmark: {} round(s), medians over rounds; in parentheses: ratio to direct, \
         ratio to mesh-iptables",
        setup.rounds
    );
    let _ = writeln!(
        out,
        "machine: Linux {}, {} CPUs ({}), {}; load average {} at start, {} at end",
        machine.kernel,
        machine.cpus,
        machine.cpu_model,
        machine.date,
        machine.load_start,
        machine.load_end
    );
    for pinning in PINNINGS {
        if !records.iter().any(|r| r.pinning == pinning) {
            continue;
        }
        let _ = writeln!(out, "\n{}", pinning_title(pinning, setup.cpu));
        let _ = writeln!(
            out,
            "{:<38} {:>14} {:>22} {:>28}",
            "", "direct", "mesh-iptables", "mesh-ebpf"
        );
        for row in &ROWS {
            let [d, i, e] = row_cells(records, pinning, row);
            let _ = writeln!(out, "{:<38} {d:>14} {i:>22} {e:>28}", row.label);
        }
    }
    let _ = writeln!(out);
    for note in notes(records, setup) {
        let _ = writeln!(out, "{note}");
    }
    let _ = writeln!(out, "{RESUMPTION_NOTE}");
    let _ = writeln!(out, "{COST_NOTE}");
    out
}

/// The whole run as JSON: machine, setup, every record, and the summary table.
pub fn to_json(records: &[Record], machine: &Machine, setup: &Setup) -> Value {
    let mut summary = Vec::new();
    for pinning in PINNINGS {
        for row in &ROWS {
            let direct = cell(records, pinning, CONFIGS[0], row);
            let ipt = cell(records, pinning, "mesh-iptables", row);
            for config in CONFIGS {
                let c = cell(records, pinning, config, row);
                let (to_direct, to_ipt) = match row.kind {
                    Kind::Higher | Kind::Lower => (ratio(c, direct), ratio(c, ipt)),
                    Kind::AgentCost => (None, ratio(c, ipt)),
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
    }
    json!({
        "benchmark": "e2e",
        "date": machine.date,
        "machine": {
            "kernel": machine.kernel,
            "cpus": machine.cpus,
            "cpu_model": machine.cpu_model,
            "load_average_start": machine.load_start,
            "load_average_end": machine.load_end,
        },
        "setup": {
            "rounds": setup.rounds,
            "quick": setup.quick,
            "pinned_cpu": setup.cpu,
            "message_bytes": super::e2e_app::MSG,
            "rr_seconds": setup.rr_secs,
            "rr_warmup_seconds": setup.rr_warmup,
            "rr_many_connections": setup.many,
            "stream_seconds": setup.stream_secs,
            "stream_write_bytes": super::e2e_app::STREAM_WRITE,
            "connect_seconds": setup.conn_secs,
            "connect_warmup_seconds": setup.conn_warmup,
            "server_threads": setup.server_threads,
            "mesh_dial": setup.dial,
            "agent_idle_rss_mib": setup
                .idle_rss_mib
                .iter()
                .map(|(c, v)| (c.to_string(), json!(v)))
                .collect::<serde_json::Map<String, Value>>(),
        },
        "notes": [RESUMPTION_NOTE, COST_NOTE],
        "records": records.iter().map(Record::to_json).collect::<Vec<_>>(),
        "summary": summary,
    })
}

/// The markdown section, markers included.
pub fn markdown(records: &[Record], machine: &Machine, setup: &Setup) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "{BEGIN}");
    let _ = writeln!(md, "## End to end: two pods, direct vs the mesh\n");
    let _ = writeln!(
        md,
        "Generated by `mesh-bench e2e{}` on {} — Linux {}, {} CPUs ({}), load average {} at start \
         and {} at end. {} interleaved round(s) (every configuration in every round, the order \
         rotating); each figure is the median over rounds, with in parentheses its ratio to \
         `direct` and to `mesh-iptables`.\n",
        if setup.quick { " --quick" } else { "" },
        machine.date,
        machine.kernel,
        machine.cpus,
        machine.cpu_model,
        machine.load_start,
        machine.load_end,
        setup.rounds
    );
    let dial = if setup.dial == "vip" {
        "the api service's virtual IP (transparent mode)"
    } else {
        "the explicit upstream listener `127.0.0.1:9091`"
    };
    let _ = writeln!(
        md,
        "- **direct**: the client in pod `web-d` dials the server in pod `api-d` at its pod IP; \
         no mesh.\n\
         - **mesh-iptables**: an agent with `--redirect iptables` (Consul's chains) serves pods \
         `web-i`/`api-i`; the client dials {dial}; mTLS between the pods' proxies.\n\
         - **mesh-ebpf**: an agent with the kernel programs (sk_msg redirect on) serves pods \
         `web-e`/`api-e`, same dial.\n\
         - Apps: the client is one tokio event loop (non-blocking sockets); the server is a \
         tokio echo server with {} threads. Request/response: 1 KiB each way on keep-alive \
         connections, {} s after {} s warm-up, at 1 and {} connections. One-way: one connection, \
         64 KiB writes for {} s, timed until the server confirms the last byte. New \
         connections: connect, one 1 KiB exchange, close, one at a time, {} s after {} s \
         warm-up.\n",
        setup.server_threads,
        setup.rr_secs,
        setup.rr_warmup,
        setup.many,
        setup.stream_secs,
        setup.conn_secs,
        setup.conn_warmup
    );
    for pinning in PINNINGS {
        if !records.iter().any(|r| r.pinning == pinning) {
            continue;
        }
        let _ = writeln!(md, "### {}\n", pinning_title(pinning, setup.cpu));
        let _ = writeln!(
            md,
            "| | direct | mesh-iptables (÷direct) | mesh-ebpf (÷direct, ÷iptables) |"
        );
        let _ = writeln!(md, "|---|---:|---:|---:|");
        for row in &ROWS {
            let [d, i, e] = row_cells(records, pinning, row);
            let label = row.label.trim_start();
            let label = if row.label.starts_with(' ') {
                format!("&nbsp;&nbsp;{label}")
            } else {
                label.to_string()
            };
            let _ = writeln!(md, "| {label} | {d} | {i} | {e} |");
        }
        let _ = writeln!(md);
    }
    for note in notes(records, setup) {
        let _ = writeln!(md, "- {note}");
    }
    let _ = writeln!(md, "- {RESUMPTION_NOTE}");
    let _ = writeln!(md, "- {COST_NOTE}");
    let _ = writeln!(
        md,
        "\nFigures from a machine that is busy with other work are noisy, and on a 2-CPU machine \
         client, server and agent compete for the same cores; compare the load averages above \
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
            metrics: vec![("req_per_s".into(), v), ("peak_rss_mib".into(), v)],
            client: Value::Null,
            proxy: Value::Null,
            counters: Value::Null,
            resources: Value::Null,
            valid: true,
            note: None,
        }
    }

    #[test]
    fn cells_take_medians_and_ratios_to_both_baselines() {
        let mut records = Vec::new();
        for (round, (d, i, e)) in [
            (100.0, 40.0, 60.0),
            (120.0, 50.0, 80.0),
            (110.0, 45.0, 70.0),
        ]
        .into_iter()
        .enumerate()
        {
            records.push(rec("direct", "rr-1", round, d));
            records.push(rec("mesh-iptables", "rr-1", round, i));
            records.push(rec("mesh-ebpf", "rr-1", round, e));
        }
        let [d, i, e] = row_cells(&records, "pinned", &ROWS[0]);
        assert_eq!(d, "110");
        assert_eq!(i, "45 (0.41x)");
        assert_eq!(e, "70 (0.64x, 1.56x)");
        // An invalid run drops its round from the cell.
        records[7].valid = false;
        let [_, i, _] = row_cells(&records, "pinned", &ROWS[0]);
        assert_eq!(i, "45 (0.41x) [2/3]");
    }

    #[test]
    fn star_rows_take_the_largest_value_of_each_round() {
        let records = vec![
            rec("direct", "rr-1", 0, 10.0),
            rec("direct", "stream", 0, 30.0),
            rec("direct", "rr-1", 1, 20.0),
            rec("direct", "stream", 1, 10.0),
        ];
        let row = ROWS.iter().find(|r| r.workload == "*").unwrap();
        let c = cell(&records, "pinned", "direct", row);
        assert_eq!(c.median, Some(25.0));
    }
}
