//! Results of the redirect benchmark: one record per (path, workload, round, pinning), medians
//! over rounds, ratios to loopback, and the three outputs (terminal table, JSON, markdown), on
//! the shared [report core](crate::report).

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Result;
use serde_json::{json, Value};

pub use crate::report::PINNINGS;
use crate::report::{self, median, ratio, Cell, Machine, Section};

/// The paths, in table order; the first is the baseline of every ratio.
pub const PATHS: [&str; 3] = ["loopback", "sk_msg", "iptables"];

/// One measurement.
#[derive(Clone, Debug)]
pub struct Record {
    pub path: &'static str,
    pub workload: String,
    pub round: usize,
    pub pinning: &'static str,
    /// Figures by name (`p50_us`, `p99_us`, `mean_us`, `gb_per_s`, `conns_per_s`, ...).
    pub metrics: Vec<(String, f64)>,
    /// The app side's full report.
    pub client: Value,
    /// Kernel counter deltas over the measurement.
    pub counters: Value,
    /// sk_msg only: share of the bytes the workload moved that took the redirect.
    pub redirected_fraction: Option<f64>,
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
            "path": self.path,
            "workload": self.workload,
            "round": self.round,
            "pinning": self.pinning,
            "valid": self.valid,
            "note": self.note,
            "metrics": metrics,
            "client": self.client,
            "counters": self.counters,
            "redirected_fraction": self.redirected_fraction,
        })
    }
}

/// A row of the result table.
pub struct Row {
    pub workload: &'static str,
    pub metric: &'static str,
    pub label: &'static str,
    pub higher_is_better: bool,
    /// The sk_msg target as a ratio to loopback: (pinned, unpinned).
    pub target: Option<(f64, f64)>,
}

pub const ROWS: [Row; 6] = [
    Row {
        workload: "ping-pong-64",
        metric: "p50_us",
        label: "ping-pong 64 B, p50 (µs)",
        higher_is_better: false,
        target: Some((0.6, 0.9)),
    },
    Row {
        workload: "ping-pong-64",
        metric: "p99_us",
        label: "ping-pong 64 B, p99 (µs)",
        higher_is_better: false,
        target: None,
    },
    Row {
        workload: "ping-pong-1024",
        metric: "p50_us",
        label: "ping-pong 1 KiB, p50 (µs)",
        higher_is_better: false,
        target: Some((0.6, 0.9)),
    },
    Row {
        workload: "ping-pong-1024",
        metric: "p99_us",
        label: "ping-pong 1 KiB, p99 (µs)",
        higher_is_better: false,
        target: None,
    },
    Row {
        workload: "bulk-64k",
        metric: "gb_per_s",
        label: "one-way, 64 KiB writes (GB/s)",
        higher_is_better: true,
        target: Some((1.5, 1.5)),
    },
    Row {
        workload: "connect",
        metric: "conns_per_s",
        label: "connections/s (64 B each way)",
        higher_is_better: true,
        target: Some((1.0, 1.0)),
    },
];

/// How the benchmark ran.
#[derive(Clone, Copy, Debug)]
pub struct Setup {
    pub rounds: usize,
    pub quick: bool,
    pub cpu: usize,
    pub round_trips: usize,
    pub warmup: usize,
    pub bulk_secs: f64,
    pub connect_secs: f64,
}

fn cell(records: &[Record], pinning: &str, path: &str, row: &Row) -> Cell {
    let runs: Vec<&Record> = records
        .iter()
        .filter(|r| r.pinning == pinning && r.path == path && r.workload == row.workload)
        .collect();
    let values: Vec<f64> = runs
        .iter()
        .filter(|r| r.valid)
        .filter_map(|r| r.metric(row.metric))
        .collect();
    Cell {
        valid: values.len(),
        total: runs.len(),
        median: median(values),
    }
}

fn target_for(row: &Row, pinning: &str) -> Option<f64> {
    row.target.map(|(pinned, unpinned)| {
        if pinning == "pinned" {
            pinned
        } else {
            unpinned
        }
    })
}

fn met(row: &Row, r: f64, t: f64) -> bool {
    if row.higher_is_better {
        r >= t
    } else {
        r <= t
    }
}

fn fmt_value(row: &Row, v: f64) -> String {
    match row.metric {
        "conns_per_s" => format!("{v:.0}"),
        "gb_per_s" => format!("{v:.2}"),
        _ if v >= 100.0 => format!("{v:.1}"),
        _ => format!("{v:.2}"),
    }
}

fn fmt_cell(row: &Row, c: Cell, base: Cell, with_ratio: bool) -> String {
    let Some(v) = c.median else {
        return "invalid".to_string();
    };
    let mut s = fmt_value(row, v);
    if with_ratio {
        if let Some(r) = ratio(c, base) {
            let _ = write!(s, " ({r:.2}x)");
        }
    }
    if c.valid < c.total {
        let _ = write!(s, " [{}/{} runs]", c.valid, c.total);
    }
    s
}

fn fmt_target(row: &Row, pinning: &str, c: Cell, base: Cell) -> String {
    let Some(t) = target_for(row, pinning) else {
        return String::new();
    };
    let op = if row.higher_is_better { ">=" } else { "<=" };
    match ratio(c, base) {
        Some(r) if met(row, r, t) => format!("{op} {t:.2}x: met"),
        Some(_) => format!("{op} {t:.2}x: MISSED"),
        None => format!("{op} {t:.2}x: no data"),
    }
}

fn pinning_title(pinning: &str, cpu: usize) -> String {
    if pinning == "pinned" {
        format!("Pinned: app and listener on CPU {cpu} (the path's CPU cost)")
    } else {
        "Unpinned: the scheduler places both (what users see)".to_string()
    }
}

/// Lines about how much the sk_msg runs actually redirected, and the invalid runs.
fn validity_notes(records: &[Record]) -> Vec<String> {
    let mut notes = Vec::new();
    for pinning in PINNINGS {
        let sk: Vec<&Record> = records
            .iter()
            .filter(|r| r.path == "sk_msg" && r.pinning == pinning && r.valid)
            .collect();
        if sk.is_empty() {
            continue;
        }
        let mut parts = Vec::new();
        for row in ROWS.iter().filter(|r| r.metric != "p99_us") {
            let fr: Vec<f64> = sk
                .iter()
                .filter(|r| r.workload == row.workload)
                .filter_map(|r| r.redirected_fraction)
                .collect();
            let fallbacks: u64 = sk
                .iter()
                .filter(|r| r.workload == row.workload)
                .filter_map(|r| r.counters["backlog_fallbacks"].as_u64())
                .sum();
            if let Some(min) = fr.iter().copied().reduce(f64::min) {
                let mut p = format!("{} {:.0}%", row.workload, min * 100.0);
                if fallbacks > 0 {
                    let _ = write!(p, " ({fallbacks} backlog fallbacks)");
                }
                parts.push(p);
            }
        }
        notes.push(format!(
            "sk_msg {pinning}: share of bytes redirected (lowest run): {}",
            parts.join(", ")
        ));
    }
    // Unpinned round trips are much faster when the scheduler keeps both ends on one CPU (no
    // cross-CPU wakeup): say how often it did.
    for row in ROWS.iter().filter(|r| r.metric == "p50_us") {
        let parts: Vec<String> = PATHS
            .iter()
            .filter_map(|path| {
                let shares: Vec<f64> = records
                    .iter()
                    .filter(|r| {
                        r.valid
                            && r.pinning == "unpinned"
                            && r.path == *path
                            && r.workload == row.workload
                    })
                    .filter_map(|r| r.metric("same_cpu_share"))
                    .collect();
                let runs: Vec<String> =
                    shares.iter().map(|s| format!("{:.0}", s * 100.0)).collect();
                (!runs.is_empty()).then(|| format!("{path} {}%", runs.join("/")))
            })
            .collect();
        if !parts.is_empty() {
            notes.push(format!(
                "unpinned {}: round trips with both ends on one CPU, per round: {}",
                row.workload,
                parts.join(", ")
            ));
        }
    }
    for r in records.iter().filter(|r| !r.valid) {
        notes.push(report::invalid_note(
            r.path,
            &r.workload,
            r.pinning,
            r.round,
            r.note.as_deref(),
        ));
    }
    notes
}

/// The table printed at the end of a run.
pub fn terminal(records: &[Record], machine: &Machine, setup: &Setup) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\nredirect benchmark: {} rounds, medians over rounds; ratio = path / loopback \
         (latency: < 1 is better, throughput: > 1 is better)",
        setup.rounds
    );
    let _ = writeln!(out, "{}", machine.terminal_line());
    for pinning in PINNINGS {
        let _ = writeln!(out, "\n{}", pinning_title(pinning, setup.cpu));
        let _ = writeln!(
            out,
            "{:<32} {:>12} {:>24} {:>24}   sk_msg target",
            "", "loopback", "sk_msg", "iptables"
        );
        for row in &ROWS {
            let base = cell(records, pinning, "loopback", row);
            let sk = cell(records, pinning, "sk_msg", row);
            let ipt = cell(records, pinning, "iptables", row);
            let _ = writeln!(
                out,
                "{:<32} {:>12} {:>24} {:>24}   {}",
                row.label,
                fmt_cell(row, base, base, false),
                fmt_cell(row, sk, base, true),
                fmt_cell(row, ipt, base, true),
                fmt_target(row, pinning, sk, base)
            );
        }
    }
    let _ = writeln!(out);
    for note in validity_notes(records) {
        let _ = writeln!(out, "{note}");
    }
    let _ = writeln!(
        out,
        "reference (raw probe on the development VM): sk_msg ping-pong p50 0.56x pinned, \
         0.85-0.88x unpinned; bulk 2.7x pinned, 1.6x unpinned; iptables REDIRECT 1.04-1.18x RTT, \
         0.66x conn/s, 0.4-0.6x bulk"
    );
    out
}

/// The whole run as JSON: machine, setup, every record, and the summary table.
pub fn to_json(records: &[Record], machine: &Machine, setup: &Setup) -> Value {
    let mut summary = Vec::new();
    for pinning in PINNINGS {
        for row in &ROWS {
            let base = cell(records, pinning, "loopback", row);
            for path in PATHS {
                let c = cell(records, pinning, path, row);
                let r = ratio(c, base);
                let target = if path == "sk_msg" {
                    target_for(row, pinning)
                } else {
                    None
                };
                summary.push(json!({
                    "pinning": pinning,
                    "workload": row.workload,
                    "metric": row.metric,
                    "path": path,
                    "median": c.median,
                    "valid_rounds": c.valid,
                    "rounds": c.total,
                    "ratio_to_loopback": r,
                    "target_ratio": target,
                    "target_met": target.zip(r).map(|(t, r)| met(row, r, t)),
                }));
            }
        }
    }
    json!({
        "benchmark": "redirect",
        "date": machine.date,
        "machine": machine.to_json(),
        "setup": {
            "rounds": setup.rounds,
            "quick": setup.quick,
            "pinned_cpu": setup.cpu,
            "ping_pong_round_trips": setup.round_trips,
            "ping_pong_warmup": setup.warmup,
            "bulk_seconds": setup.bulk_secs,
            "bulk_write_bytes": crate::workload::BULK_WRITE,
            "connect_seconds": setup.connect_secs,
        },
        "records": records.iter().map(Record::to_json).collect::<Vec<_>>(),
        "summary": summary,
    })
}

/// The opening marker of the redirect section of `docs/benchmarks.md`.
pub const BEGIN: &str = "<!-- redirect:begin -->";
/// Its closing marker.
pub const END: &str = "<!-- redirect:end -->";
/// The redirect benchmark's section.
pub const SECTION: Section = Section {
    begin: BEGIN,
    end: END,
};

/// The markdown section, markers included.
pub fn markdown(records: &[Record], machine: &Machine, setup: &Setup) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "{BEGIN}");
    let _ = writeln!(md, "## App ⇄ listener redirect\n");
    let _ = writeln!(
        md,
        "{} {} interleaved rounds (every path in every round); each figure is the median over \
         rounds, with its ratio to loopback (latency: below 1 is better; throughput: above 1 is \
         better).\n",
        machine.generated_by("redirect", setup.quick),
        setup.rounds
    );
    let _ = writeln!(
        md,
        "- **loopback**: the app dials a listener on `127.0.0.1` in its own network namespace \
         directly; its pod has no mesh programs.\n\
         - **sk_msg**: the app dials a service VIP; `cgroup/connect4` sends it to the outbound \
         listener (`127.0.0.1:15001`) and the pair's bytes take the sk_msg redirect (checked \
         with the kernel counters in every run).\n\
         - **iptables**: the same dial in a pod with Consul's `REDIRECT` chains and no mesh \
         programs.\n\
         - Workloads: {} round trips per size after {} warm-up ones; one-way 64 KiB writes for \
         {} s, timed until the listener confirms the last byte; connect + one 64 B exchange + \
         close for {} s (the listener asks `SO_ORIGINAL_DST` of each redirected connection, as \
         the proxy does). Sockets are non-blocking, waiting in `poll`.\n",
        setup.round_trips, setup.warmup, setup.bulk_secs, setup.connect_secs
    );
    for pinning in PINNINGS {
        let _ = writeln!(md, "### {}\n", pinning_title(pinning, setup.cpu));
        let _ = writeln!(md, "| | loopback | sk_msg | iptables | sk_msg target |");
        let _ = writeln!(md, "|---|---:|---:|---:|---|");
        for row in &ROWS {
            let base = cell(records, pinning, "loopback", row);
            let sk = cell(records, pinning, "sk_msg", row);
            let ipt = cell(records, pinning, "iptables", row);
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} |",
                row.label,
                fmt_cell(row, base, base, false),
                fmt_cell(row, sk, base, true),
                fmt_cell(row, ipt, base, true),
                fmt_target(row, pinning, sk, base)
            );
        }
        let _ = writeln!(md);
    }
    for note in validity_notes(records) {
        let _ = writeln!(md, "- {note}");
    }
    let _ = writeln!(
        md,
        "\nTargets are reported, not asserted. Unpinned round trips depend mostly on whether \
         the scheduler keeps both ends on one CPU (a cross-CPU wakeup costs far more, especially \
         in a VM); the share per round is listed above. Figures from a machine that is busy with \
         other work are noisy; compare the load averages above with the CPU count."
    );
    let _ = writeln!(md, "{END}");
    md
}

/// Puts `section` (markers included) into the markdown file at `path`: replaces the existing
/// section, or appends it; creates the file (and its directory) if needed.
pub fn write_section(path: &Path, section: &str) -> Result<()> {
    SECTION.write(path, section)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn section_is_replaced_in_place_and_other_text_kept() {
        let dir = std::env::temp_dir().join(format!("mesh-bench-md-{}", std::process::id()));
        let path = dir.join("benchmarks.md");
        let _ = std::fs::remove_dir_all(&dir);
        write_section(&path, &format!("{BEGIN}\none\n{END}\n")).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with("# Benchmarks\n\n"), "{text}");
        std::fs::write(
            &path,
            format!("{text}\n<!-- other:begin -->\nx\n<!-- other:end -->\n"),
        )
        .unwrap();
        write_section(&path, &format!("{BEGIN}\ntwo\n{END}\n")).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains("one"), "{text}");
        assert_eq!(text.matches(BEGIN).count(), 1, "{text}");
        assert!(
            text.contains("two") && text.contains("<!-- other:begin -->\nx"),
            "{text}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
