//! The outside tools of the end-to-end benchmark and what it reads from `/proc`: `wrk`'s and
//! `iperf3`'s reports, and a process's CPU time and memory high-water mark.

use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};

/// What `wrk --latency` reports.
#[derive(Clone, Debug, PartialEq)]
pub struct WrkReport {
    pub requests: u64,
    pub seconds: f64,
    pub req_per_s: f64,
    pub p50_us: f64,
    pub p75_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    /// connect + read + write + timeout errors.
    pub socket_errors: u64,
    pub non_2xx: u64,
}

impl WrkReport {
    pub fn to_json(&self) -> Value {
        json!({
            "requests": self.requests,
            "seconds": self.seconds,
            "req_per_s": self.req_per_s,
            "p50_us": self.p50_us,
            "p75_us": self.p75_us,
            "p90_us": self.p90_us,
            "p99_us": self.p99_us,
            "socket_errors": self.socket_errors,
            "non_2xx": self.non_2xx,
        })
    }
}

/// A wrk duration (`182.00us`, `1.23ms`, `2.01s`, `1.00m`) in microseconds.
fn wrk_duration_us(text: &str) -> Result<f64> {
    let split = text
        .find(|c: char| c.is_ascii_alphabetic())
        .with_context(|| format!("no unit in {text:?}"))?;
    let (num, unit) = text.split_at(split);
    let v: f64 = num.parse().with_context(|| format!("{text:?}"))?;
    let scale = match unit {
        "us" => 1.0,
        "ms" => 1e3,
        "s" => 1e6,
        "m" => 60e6,
        "h" => 3600e6,
        other => bail!("unknown unit {other:?} in {text:?}"),
    };
    Ok(v * scale)
}

/// Parses the output of `wrk --latency`.
pub fn parse_wrk(out: &str) -> Result<WrkReport> {
    let mut pct = [None::<f64>; 4];
    let mut requests = None;
    let mut seconds = None;
    let mut req_per_s = None;
    let mut socket_errors = 0;
    let mut non_2xx = 0;
    for line in out.lines().map(str::trim) {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            [p, v] if p.ends_with('%') => {
                let i = match *p {
                    "50%" => 0,
                    "75%" => 1,
                    "90%" => 2,
                    "99%" => 3,
                    _ => continue,
                };
                pct[i] = Some(wrk_duration_us(v)?);
            }
            [n, "requests", "in", t, ..] => {
                requests = Some(n.parse::<u64>().context("request count")?);
                seconds = Some(wrk_duration_us(t.trim_end_matches(','))? / 1e6);
            }
            ["Requests/sec:", v] => req_per_s = Some(v.parse::<f64>().context("Requests/sec")?),
            ["Socket", "errors:", rest @ ..] => {
                // connect 0, read 0, write 0, timeout 0
                socket_errors = rest
                    .iter()
                    .filter_map(|w| w.trim_end_matches(',').parse::<u64>().ok())
                    .sum();
            }
            ["Non-2xx", "or", "3xx", "responses:", n] => {
                non_2xx = n.parse().context("Non-2xx count")?;
            }
            _ => {}
        }
    }
    let get = |v: Option<f64>, what: &str| v.with_context(|| format!("wrk printed no {what}"));
    Ok(WrkReport {
        requests: requests.context("wrk printed no request count")?,
        seconds: get(seconds, "duration")?,
        req_per_s: get(req_per_s, "Requests/sec")?,
        p50_us: get(pct[0], "50% latency (was --latency given?)")?,
        p75_us: get(pct[1], "75% latency")?,
        p90_us: get(pct[2], "90% latency")?,
        p99_us: get(pct[3], "99% latency")?,
        socket_errors,
        non_2xx,
    })
}

/// What `iperf3 -J` (client side, one stream, client → server) reports.
#[derive(Clone, Debug, PartialEq)]
pub struct IperfReport {
    pub bytes: u64,
    pub seconds: f64,
    /// What the server received, in Gbit/s.
    pub gbit_per_s: f64,
    pub retransmits: Option<u64>,
}

/// Parses `iperf3 -J` output.
pub fn parse_iperf3(out: &str) -> Result<IperfReport> {
    let v: Value = serde_json::from_str(out).context("iperf3's JSON")?;
    if let Some(e) = v["error"].as_str() {
        bail!("iperf3: {e}");
    }
    let recv = &v["end"]["sum_received"];
    let bps = recv["bits_per_second"]
        .as_f64()
        .context("end.sum_received.bits_per_second")?;
    let bytes = recv["bytes"].as_u64().context("end.sum_received.bytes")?;
    let seconds = recv["seconds"]
        .as_f64()
        .context("end.sum_received.seconds")?;
    ensure!(bytes > 0, "iperf3 moved no byte");
    Ok(IperfReport {
        bytes,
        seconds,
        gbit_per_s: bps / 1e9,
        retransmits: v["end"]["sum_sent"]["retransmits"].as_u64(),
    })
}

/// User + system CPU ticks of a process (all its threads) from the text of `/proc/<pid>/stat`.
pub fn stat_cpu_ticks(stat: &str) -> Result<u64> {
    // The command name (field 2) may hold spaces and parentheses: fields after the last ')'.
    // There, state is field 3, so utime (14) and stime (15) are at 11 and 12.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("no ')' in /proc/<pid>/stat")?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = f.get(11).context("utime")?.parse().context("utime")?;
    let stime: u64 = f.get(12).context("stime")?.parse().context("stime")?;
    Ok(utime + stime)
}

/// User + system CPU seconds of process `pid` so far (all its threads).
pub fn process_cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("/proc/{pid}/stat"))?;
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)?.unwrap_or(100) as f64;
    Ok(stat_cpu_ticks(&stat)? as f64 / hz)
}

/// A `kB` field of `/proc/<pid>/status` (`VmHWM:`, `VmRSS:`), in MiB.
pub fn status_mib(status: &str, key: &str) -> Option<f64> {
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix(key))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kib / 1024.0)
}

/// The peak RSS (`VmHWM`) of process `pid`, in MiB.
pub fn peak_rss_mib(pid: u32) -> Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("/proc/{pid}/status"))?;
    status_mib(&status, "VmHWM:").context("no VmHWM")
}

/// Resets the peak RSS of process `pid` to its current RSS.
pub fn reset_peak_rss(pid: u32) -> Result<()> {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5")
        .with_context(|| format!("resetting the peak RSS of {pid}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const WRK: &str = "Running 10s test @ http://10.96.31.21:9091/
  2 threads and 16 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   408.13us  302.11us  12.74ms   93.20%
    Req/Sec    20.16k     1.83k   23.41k    70.00%
  Latency Distribution
     50%  342.00us
     75%  436.00us
     90%  612.00us
     99%    1.71ms
  401274 requests in 10.00s, 446.88MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 4
Requests/sec:  40122.35
Transfer/sec:     44.68MB
";

    #[test]
    fn wrk_latency_output_is_parsed() {
        let r = parse_wrk(WRK).unwrap();
        assert_eq!(r.requests, 401_274);
        assert_eq!(r.seconds, 10.0);
        assert_eq!(r.req_per_s, 40122.35);
        assert_eq!(r.p50_us, 342.0);
        assert_eq!(r.p75_us, 436.0);
        assert_eq!(r.p90_us, 612.0);
        assert_eq!(r.p99_us, 1710.0);
        assert_eq!(r.socket_errors, 3);
        assert_eq!(r.non_2xx, 4);
    }

    #[test]
    fn wrk_without_latency_or_with_odd_units_is_refused() {
        let no_distribution: String = WRK
            .lines()
            .filter(|l| !l.trim_start().starts_with("99%"))
            .collect::<Vec<_>>()
            .join("\n");
        assert!(parse_wrk(&no_distribution).is_err());
        assert!(parse_wrk(&WRK.replace("1.71ms", "1.71xs")).is_err());
        assert!(parse_wrk("").is_err());
        assert_eq!(wrk_duration_us("2.5s").unwrap(), 2.5e6);
        assert_eq!(wrk_duration_us("1.00m").unwrap(), 60e6);
    }

    #[test]
    fn iperf3_json_is_parsed_and_errors_are_refused() {
        let ok = r#"{"start":{},"intervals":[],"end":{
            "sum_sent":{"bytes":2500000000,"seconds":10.0,"bits_per_second":2.0e9,"retransmits":7},
            "sum_received":{"bytes":2499000000,"seconds":10.01,"bits_per_second":1.997e9}}}"#;
        let r = parse_iperf3(ok).unwrap();
        assert_eq!(r.bytes, 2_499_000_000);
        assert_eq!(r.gbit_per_s, 1.997);
        assert_eq!(r.retransmits, Some(7));
        let err =
            r#"{"start":{},"end":{},"error":"unable to connect to server: Connection refused"}"#;
        assert!(parse_iperf3(err)
            .unwrap_err()
            .to_string()
            .contains("Connection refused"));
        assert!(parse_iperf3("not json").is_err());
    }

    #[test]
    fn proc_stat_and_status_fields() {
        // A command name with spaces and a parenthesis; utime 1234, stime 66.
        let stat = "4242 (tokio (rt) x) S 1 4242 4242 0 -1 4194560 900 0 0 0 1234 66 0 0 20 0 \
                    9 0 5000 100000 2000";
        assert_eq!(stat_cpu_ticks(stat).unwrap(), 1300);
        assert!(stat_cpu_ticks("4242 (x) S 1").is_err());
        let status = "Name:\tmeshd\nVmHWM:\t   43008 kB\nVmRSS:\t   20480 kB\n";
        assert_eq!(status_mib(status, "VmHWM:"), Some(42.0));
        assert_eq!(status_mib(status, "VmRSS:"), Some(20.0));
        assert_eq!(status_mib(status, "VmSwap:"), None);
        // This process's own figures are readable and sane.
        let me = std::process::id();
        assert!(process_cpu_seconds(me).unwrap() >= 0.0);
        assert!(peak_rss_mib(me).unwrap() > 0.0);
    }
}
