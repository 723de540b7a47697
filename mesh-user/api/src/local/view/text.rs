//! The text `meshctl` prints from the views: kubectl's tables (`get pods`, `get services`),
//! its ages and timestamps, and `meshctl proxy read`'s report.

use std::time::{Duration, SystemTime};

use super::{PodView, ProxyView, ServiceView, VerdictView};

/// kubectl's `HumanDuration` (k8s.io/apimachinery/pkg/util/duration).
pub fn human_duration(d: Duration) -> String {
    let seconds = d.as_secs();
    if seconds < 60 * 2 {
        return format!("{seconds}s");
    }
    let minutes = seconds / 60;
    if minutes < 10 {
        let s = seconds % 60;
        return if s == 0 {
            format!("{minutes}m")
        } else {
            format!("{minutes}m{s}s")
        };
    }
    if minutes < 60 * 3 {
        return format!("{minutes}m");
    }
    let hours = minutes / 60;
    if hours < 8 {
        let m = minutes % 60;
        return if m == 0 {
            format!("{hours}h")
        } else {
            format!("{hours}h{m}m")
        };
    }
    if hours < 48 {
        return format!("{hours}h");
    }
    if hours < 24 * 8 {
        let h = hours % 24;
        return if h == 0 {
            format!("{}d", hours / 24)
        } else {
            format!("{}d{h}h", hours / 24)
        };
    }
    if hours < 24 * 365 * 2 {
        return format!("{}d", hours / 24);
    }
    if hours < 24 * 365 * 8 {
        let dy = (hours / 24) % 365;
        return if dy == 0 {
            format!("{}y", hours / 24 / 365)
        } else {
            format!("{}y{dy}d", hours / 24 / 365)
        };
    }
    format!("{}y", hours / 24 / 365)
}

/// RFC 3339 in UTC, seconds.
pub fn timestamp(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// The age of an RFC 3339 timestamp at `now`, as kubectl prints it (`<unknown>` if it does
/// not parse).
pub fn age(ts: &str, now: SystemTime) -> String {
    match humantime::parse_rfc3339(ts) {
        Ok(t) => human_duration(now.duration_since(t).unwrap_or_default()),
        Err(_) => "<unknown>".into(),
    }
}

/// Columns as kubectl's tabwriter lays them out (minimum width 6, padding 3); the last
/// column is not padded.
pub fn table(rows: &[Vec<String>]) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            let w = rows
                .iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0);
            (w + 3).max(6)
        })
        .collect();
    let mut out = String::new();
    for r in rows {
        let mut line = String::new();
        for (c, cell) in r.iter().enumerate() {
            line.push_str(cell);
            if c + 1 < r.len() {
                line.push_str(&" ".repeat(widths[c] - cell.chars().count()));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// `kubectl get pods` (`wide`: IP and NODE too; `all_namespaces`: NAMESPACE first).
pub fn pods_table(pods: &[PodView], now: SystemTime, wide: bool, all_namespaces: bool) -> String {
    let mut header: Vec<&str> = Vec::new();
    if all_namespaces {
        header.push("NAMESPACE");
    }
    header.extend(["NAME", "READY", "STATUS", "RESTARTS", "AGE"]);
    if wide {
        header.extend(["IP", "NODE", "NOMINATED NODE", "READINESS GATES"]);
    }
    let mut rows = vec![header.iter().map(|s| s.to_string()).collect::<Vec<_>>()];
    for p in pods {
        let total = p.status.container_statuses.len();
        let ready = p
            .status
            .container_statuses
            .iter()
            .filter(|c| c.ready)
            .count();
        let restarts: u32 = p
            .status
            .container_statuses
            .iter()
            .map(|c| c.restart_count)
            .sum();
        let mut row = Vec::new();
        if all_namespaces {
            row.push(p.metadata.namespace.clone().unwrap_or_default());
        }
        row.push(p.metadata.name.clone());
        row.push(format!("{ready}/{total}"));
        row.push(p.status_text());
        row.push(restarts.to_string());
        row.push(age(&p.metadata.creation_timestamp, now));
        if wide {
            row.push(if p.status.pod_ip.is_empty() {
                "<none>".into()
            } else {
                p.status.pod_ip.clone()
            });
            row.push(p.spec.node_name.clone());
            row.push("<none>".into());
            row.push("<none>".into());
        }
        rows.push(row);
    }
    table(&rows)
}

/// `kubectl get services` (`wide`: SELECTOR too).
pub fn services_table(
    services: &[ServiceView],
    now: SystemTime,
    wide: bool,
    all_namespaces: bool,
) -> String {
    let mut header: Vec<&str> = Vec::new();
    if all_namespaces {
        header.push("NAMESPACE");
    }
    header.extend([
        "NAME",
        "TYPE",
        "CLUSTER-IP",
        "EXTERNAL-IP",
        "PORT(S)",
        "AGE",
    ]);
    if wide {
        header.push("SELECTOR");
    }
    let mut rows = vec![header.iter().map(|s| s.to_string()).collect::<Vec<_>>()];
    for s in services {
        let mut row = Vec::new();
        if all_namespaces {
            row.push(s.metadata.namespace.clone().unwrap_or_default());
        }
        row.push(s.metadata.name.clone());
        row.push(s.spec.kind.clone());
        row.push(s.spec.cluster_ip.clone());
        row.push("<none>".into());
        let ports: Vec<String> = s
            .spec
            .ports
            .iter()
            .map(|p| format!("{}/{}", p.port, p.protocol))
            .collect();
        row.push(if ports.is_empty() {
            "<none>".into()
        } else {
            ports.join(",")
        });
        row.push(age(&s.metadata.creation_timestamp, now));
        if wide {
            let sel: Vec<String> = s
                .spec
                .selector
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            row.push(if sel.is_empty() {
                "<none>".into()
            } else {
                sel.join(",")
            });
        }
        rows.push(row);
    }
    table(&rows)
}

/// `meshctl proxy read` as text.
pub fn proxy_text(p: &ProxyView) -> String {
    let mut out = String::new();
    out += &format!("Pod:       {}\n", p.pod);
    out += &format!("Service:   {}\n", p.service);
    out += &format!("Identity:  {}\n", p.spiffe_id);
    out += &format!("Pod IP:    {}\n", p.pod_ip);
    out += &format!(
        "Proxy:     {} ({} mode)\n",
        if p.proxy_ready { "ready" } else { "not ready" },
        p.mode
    );
    out += "\nListeners:\n";
    let mut rows = vec![vec!["ADDRESS".to_string(), "KIND".into(), "SERVES".into()]];
    for l in &p.listeners {
        let serves = match (&l.upstream, l.kind.as_str()) {
            (Some(u), _) => u.clone(),
            (None, "inbound") => format!(
                "mTLS → app port(s) {}",
                l.app_ports
                    .iter()
                    .map(u16::to_string)
                    .collect::<Vec<_>>()
                    .join(",")
            ),
            (None, _) => "transparent (virtual IPs)".into(),
        };
        rows.push(vec![l.address.clone(), l.kind.clone(), serves]);
    }
    out += &indent(&table(&rows));
    out += "\nUpstreams:\n";
    let mut rows = vec![vec![
        "SERVICE".to_string(),
        "LOCAL".into(),
        "VIRTUAL-IP".into(),
        "ENDPOINTS".into(),
        "INTENTION".into(),
    ]];
    for u in &p.upstreams {
        rows.push(vec![
            u.service.clone(),
            u.bind_port
                .map(|b| format!("127.0.0.1:{b}"))
                .unwrap_or_else(|| "-".into()),
            match &u.virtual_ip {
                Some(v) => u
                    .ports
                    .iter()
                    .map(|port| format!("{v}:{port}"))
                    .collect::<Vec<_>>()
                    .join(","),
                None => "-".into(),
            },
            if u.endpoints.is_empty() {
                "<none>".into()
            } else {
                u.endpoints.join(",")
            },
            verdict_text(&u.intention),
        ]);
    }
    out += &indent(&table(&rows));
    out += &format!(
        "\nIntentions with {} as destination (default policy: {}):\n",
        p.service, p.default_policy
    );
    if p.inbound_intentions.is_empty() {
        out += "  <none>\n";
    } else {
        let mut rows = vec![vec![
            "SOURCE".to_string(),
            "ACTION".into(),
            "PRECEDENCE".into(),
            "ID".into(),
        ]];
        for i in &p.inbound_intentions {
            rows.push(vec![
                i.source.clone(),
                i.action.clone(),
                i.precedence.to_string(),
                i.id.clone(),
            ]);
        }
        out += &indent(&table(&rows));
    }
    out
}

fn verdict_text(v: &VerdictView) -> String {
    format!(
        "{} ({})",
        if v.allowed { "allow" } else { "deny" },
        v.decided_by
    )
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("  {l}\n")).collect()
}
