//! fake-service's environment variables.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::Error;

/// fake-service variables that the twin accepts and ignores (with a log line when set).
pub const IGNORED_VARIABLES: &[&str] = &[
    "UPSTREAM_ALLOW_INSECURE",
    "UPSTREAM_REQUEST_SIZE",
    "UPSTREAM_REQUEST_VARIANCE",
    "ALLOWED_ORIGINS",
    "ALLOWED_HEADERS",
    "ALLOW_CREDENTIALS",
    "HTTP_SERVER_READ_TIMEOUT",
    "HTTP_SERVER_READHEADER_TIMEOUT",
    "HTTP_SERVER_WRITE_TIMEOUT",
    "HTTP_SERVER_IDLE_TIMEOUT",
    "HTTP_CLIENT_KEEP_ALIVES",
    "LOAD_CPU_ALLOCATED",
    "LOAD_CPU_CLOCK_SPEED",
    "LOAD_CPU_CORES",
    "LOAD_CPU_PERCENTAGE",
    "LOAD_MEMORY_PER_REQUEST",
    "LOAD_MEMORY_VARIANCE",
    "TRACING_ZIPKIN",
    "TRACING_DATADOG_HOST",
    "TRACING_DATADOG_PORT",
    "METRICS_DATADOG_HOST",
    "METRICS_DATADOG_PORT",
    "METRICS_DATADOG_ENVIRONMENT",
    "LOG_FORMAT",
    "LOG_LEVEL",
    "LOG_OUTPUT",
    "TLS_CERT_LOCATION",
    "TLS_KEY_LOCATION",
];

/// `ERROR_TYPE`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ErrorType {
    /// `http_error`: answer `ERROR_CODE` at once.
    #[default]
    HttpError,
    /// `delay`: wait `ERROR_DELAY`, then answer `ERROR_CODE`.
    Delay,
}

/// The twin's configuration; [`Default`] is fake-service's defaults.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// `LISTEN_ADDR` (`0.0.0.0:9090`). Port 0 picks a free port.
    pub listen_addr: SocketAddr,
    /// `UI_PATH` (`/ui`): where the call-tree page is served (that path and everything under
    /// it). Always starts with `/`; a trailing `/` is dropped.
    pub ui_path: String,
    /// `NAME` (`Service`).
    pub name: String,
    /// `MESSAGE` (`Hello World`).
    pub message: String,
    /// `UPSTREAM_URIS`, split on commas, trimmed, empty entries dropped.
    pub upstream_uris: Vec<String>,
    /// `UPSTREAM_WORKERS` (1: sequential calls).
    pub upstream_workers: usize,
    /// `UPSTREAM_REQUEST_BODY`: when set, upstream calls are POSTs with this body.
    pub upstream_request_body: Option<String>,
    /// `HTTP_SERVER_KEEP_ALIVES` (false: one request per connection).
    pub server_keep_alives: bool,
    /// `HTTP_CLIENT_APPEND_REQUEST` (true).
    pub client_append_request: bool,
    /// `HTTP_CLIENT_REQUEST_TIMEOUT` (30s; zero means none).
    pub client_request_timeout: Duration,
    /// `TIMING_50_PERCENTILE` (0s).
    pub timing_50: Duration,
    /// `TIMING_90_PERCENTILE` (defaults to the 50th).
    pub timing_90: Duration,
    /// `TIMING_99_PERCENTILE` (defaults to the 90th).
    pub timing_99: Duration,
    /// `TIMING_VARIANCE`, percent (0).
    pub timing_variance: u32,
    /// `ERROR_RATE`, 0..=1 (0).
    pub error_rate: f64,
    /// `ERROR_TYPE` (`http_error`).
    pub error_type: ErrorType,
    /// `ERROR_CODE` (500).
    pub error_code: u16,
    /// `ERROR_DELAY` (0s).
    pub error_delay: Duration,
    /// `RATE_LIMIT`, requests per second (0: none).
    pub rate_limit: f64,
    /// `RATE_LIMIT_CODE` (503).
    pub rate_limit_code: u16,
    /// `HEALTH_CHECK_RESPONSE_CODE` (200).
    pub health_code: u16,
    /// `READY_CHECK_RESPONSE_SUCCESS_CODE` (200).
    pub ready_success_code: u16,
    /// `READY_CHECK_RESPONSE_FAILURE_CODE` (503).
    pub ready_failure_code: u16,
    /// `READY_CHECK_RESPONSE_DELAY` (0s).
    pub ready_delay: Duration,
    /// `READY_CHECK_ROOT_PATH_WAIT_TILL_READY` (false).
    pub ready_wait_root: bool,
    /// `RAND_SEED` (the current Unix time).
    pub seed: u64,
    /// Ignored fake-service variables that were set.
    pub ignored: Vec<String>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen_addr: SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 9090),
            ui_path: "/ui".into(),
            name: "Service".into(),
            message: "Hello World".into(),
            upstream_uris: Vec::new(),
            upstream_workers: 1,
            upstream_request_body: None,
            server_keep_alives: false,
            client_append_request: true,
            client_request_timeout: Duration::from_secs(30),
            timing_50: Duration::ZERO,
            timing_90: Duration::ZERO,
            timing_99: Duration::ZERO,
            timing_variance: 0,
            error_rate: 0.0,
            error_type: ErrorType::HttpError,
            error_code: 500,
            error_delay: Duration::ZERO,
            rate_limit: 0.0,
            rate_limit_code: 503,
            health_code: 200,
            ready_success_code: 200,
            ready_failure_code: 503,
            ready_delay: Duration::ZERO,
            ready_wait_root: false,
            seed: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(1),
            ignored: Vec::new(),
        }
    }
}

/// Reads variables that are set and not empty (fake-service treats empty as unset).
struct Vars(BTreeMap<String, String>);

fn bad(name: &'static str, value: &str, message: impl Into<String>) -> Error {
    Error::Env {
        name,
        value: value.to_string(),
        message: message.into(),
    }
}

impl Vars {
    fn get(&self, name: &str) -> Option<&str> {
        self.0
            .get(name)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }

    fn string(&self, name: &'static str, out: &mut String) {
        if let Some(v) = self.get(name) {
            *out = v.to_string();
        }
    }

    fn parse<T>(
        &self,
        name: &'static str,
        out: &mut T,
        f: impl FnOnce(&str) -> Result<T, String>,
    ) -> Result<bool, Error> {
        match self.get(name) {
            None => Ok(false),
            Some(v) => {
                *out = f(v).map_err(|m| bad(name, v, m))?;
                Ok(true)
            }
        }
    }

    fn bool(&self, name: &'static str, out: &mut bool) -> Result<bool, Error> {
        self.parse(name, out, |v| {
            parse_go_bool(v).ok_or_else(|| "expected a boolean (true, false, 1, 0, …)".into())
        })
    }

    fn duration(&self, name: &'static str, out: &mut Duration) -> Result<bool, Error> {
        self.parse(name, out, parse_go_duration)
    }

    fn status(&self, name: &'static str, out: &mut u16) -> Result<bool, Error> {
        self.parse(name, out, |v| match parse_go_int(v) {
            Some(n) if (100..=999).contains(&n) => u16::try_from(n).map_err(|e| e.to_string()),
            _ => Err("expected an HTTP status code (100..=999)".into()),
        })
    }
}

impl Config {
    /// Reads fake-service's variables from `vars` (for example `std::env::vars()`); every other
    /// variable is ignored. Errors name the malformed variable; nothing here panics.
    ///
    /// # Errors
    ///
    /// [`Error::Env`] for the first malformed variable: a number, duration, status code or
    /// address that does not parse, or a value out of range.
    pub fn from_env<I, K, V>(vars: I) -> Result<Config, Error>
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<str>,
        V: AsRef<str>,
    {
        let vars = Vars(
            vars.into_iter()
                .map(|(k, v)| (k.as_ref().to_string(), v.as_ref().to_string()))
                .collect(),
        );
        let mut c = Config::default();
        vars.parse("LISTEN_ADDR", &mut c.listen_addr, parse_listen_addr)?;
        vars.parse("UI_PATH", &mut c.ui_path, parse_ui_path)?;
        vars.string("NAME", &mut c.name);
        vars.string("MESSAGE", &mut c.message);
        if let Some(v) = vars.get("UPSTREAM_URIS") {
            c.upstream_uris = v
                .split(',')
                .map(|u| u.trim_matches(' '))
                .filter(|u| !u.is_empty())
                .map(str::to_string)
                .collect();
        }
        vars.parse(
            "UPSTREAM_WORKERS",
            &mut c.upstream_workers,
            |v| match parse_go_int(v) {
                Some(n) if n >= 1 => usize::try_from(n).map_err(|e| e.to_string()),
                _ => Err("expected a number of workers >= 1".into()),
            },
        )?;
        if let Some(v) = vars.get("UPSTREAM_REQUEST_BODY") {
            c.upstream_request_body = Some(v.to_string());
        }
        vars.bool("HTTP_SERVER_KEEP_ALIVES", &mut c.server_keep_alives)?;
        vars.bool("HTTP_CLIENT_APPEND_REQUEST", &mut c.client_append_request)?;
        vars.duration("HTTP_CLIENT_REQUEST_TIMEOUT", &mut c.client_request_timeout)?;
        vars.duration("TIMING_50_PERCENTILE", &mut c.timing_50)?;
        let set_90 = vars.duration("TIMING_90_PERCENTILE", &mut c.timing_90)?;
        let set_99 = vars.duration("TIMING_99_PERCENTILE", &mut c.timing_99)?;
        // fake-service: an unset (zero) 90th takes the 50th, an unset 99th the 90th.
        if !set_90 || c.timing_90.is_zero() {
            c.timing_90 = c.timing_50;
        }
        if !set_99 || c.timing_99.is_zero() {
            c.timing_99 = c.timing_90;
        }
        vars.parse(
            "TIMING_VARIANCE",
            &mut c.timing_variance,
            |v| match parse_go_int(v) {
                Some(n) if n >= 0 => u32::try_from(n).map_err(|e| e.to_string()),
                _ => Err("expected a percentage >= 0".into()),
            },
        )?;
        vars.parse("ERROR_RATE", &mut c.error_rate, |v| {
            match v.parse::<f64>() {
                Ok(r) if (0.0..=1.0).contains(&r) => Ok(r),
                _ => Err("expected a decimal fraction between 0 and 1 (0.1 = 10%)".into()),
            }
        })?;
        vars.parse("ERROR_TYPE", &mut c.error_type, |v| match v {
            "http_error" => Ok(ErrorType::HttpError),
            "delay" => Ok(ErrorType::Delay),
            _ => Err("expected http_error or delay".into()),
        })?;
        vars.status("ERROR_CODE", &mut c.error_code)?;
        vars.duration("ERROR_DELAY", &mut c.error_delay)?;
        vars.parse("RATE_LIMIT", &mut c.rate_limit, |v| {
            match v.parse::<f64>() {
                Ok(r) if r.is_finite() && r >= 0.0 => Ok(r),
                _ => Err("expected requests per second >= 0".into()),
            }
        })?;
        vars.status("RATE_LIMIT_CODE", &mut c.rate_limit_code)?;
        vars.status("HEALTH_CHECK_RESPONSE_CODE", &mut c.health_code)?;
        vars.status(
            "READY_CHECK_RESPONSE_SUCCESS_CODE",
            &mut c.ready_success_code,
        )?;
        vars.status(
            "READY_CHECK_RESPONSE_FAILURE_CODE",
            &mut c.ready_failure_code,
        )?;
        vars.duration("READY_CHECK_RESPONSE_DELAY", &mut c.ready_delay)?;
        vars.bool(
            "READY_CHECK_ROOT_PATH_WAIT_TILL_READY",
            &mut c.ready_wait_root,
        )?;
        vars.parse("RAND_SEED", &mut c.seed, |v| {
            parse_go_int(v)
                .map(|n| n as u64)
                .ok_or_else(|| "expected an integer".into())
        })?;

        for name in IGNORED_VARIABLES {
            if let Some(v) = vars.get(name) {
                tracing::info!(
                    variable = name,
                    value = v,
                    "fake-service twin: variable not supported, ignored"
                );
                c.ignored.push(name.to_string());
            }
        }
        for uri in &c.upstream_uris {
            if !uri.starts_with("http://") {
                tracing::warn!(
                    uri = %uri,
                    "fake-service twin: only http:// upstreams are supported; calls to this one will fail"
                );
            }
        }
        Ok(c)
    }
}

/// `UI_PATH`: an absolute URL path (fake-service mounts its UI there); a trailing `/` is
/// dropped, so `/` itself is refused (it would hide the service's own `/`).
fn parse_ui_path(v: &str) -> Result<String, String> {
    let p = v.trim_end_matches('/');
    if !v.starts_with('/') || p.is_empty() {
        return Err("expected an absolute path other than / (e.g. /ui)".into());
    }
    if p.chars()
        .any(|c| c.is_whitespace() || c.is_control() || c == '?' || c == '#')
    {
        return Err("a path may not hold spaces, control characters, ? or #".into());
    }
    Ok(p.to_string())
}

/// `host:port` where host is empty (every address, IPv6 and IPv4: `[::]`, which
/// [`crate::Server::bind`] opens dual-stack as Go's `net.Listen("tcp", ":9090")` does),
/// `localhost`, or an IP address (IPv6 in brackets); port 0 picks a free port.
fn parse_listen_addr(v: &str) -> Result<SocketAddr, String> {
    let err = || {
        "expected host:port, the host an IP address, localhost or empty (e.g. 0.0.0.0:9090)"
            .to_string()
    };
    if let Ok(addr) = v.parse::<SocketAddr>() {
        return Ok(addr);
    }
    let (host, port) = v.rsplit_once(':').ok_or_else(err)?;
    let port: u16 = port.parse().map_err(|_| err())?;
    let ip = match host {
        "" => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        "localhost" => IpAddr::V4(Ipv4Addr::LOCALHOST),
        h => h.parse::<IpAddr>().map_err(|_| err())?,
    };
    Ok(SocketAddr::new(ip, port))
}

/// Go's `strconv.ParseBool`.
fn parse_go_bool(s: &str) -> Option<bool> {
    match s {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

/// Go's `strconv.ParseInt(s, 0, 64)` without underscores.
fn parse_go_int(s: &str) -> Option<i64> {
    let (negative, digits) = match s.as_bytes().first()? {
        b'+' => (false, &s[1..]),
        b'-' => (true, &s[1..]),
        _ => (false, s),
    };
    let lower = digits.to_ascii_lowercase();
    let (radix, body) = if let Some(b) = lower.strip_prefix("0x") {
        (16, b)
    } else if let Some(b) = lower.strip_prefix("0o") {
        (8, b)
    } else if let Some(b) = lower.strip_prefix("0b") {
        (2, b)
    } else if lower.len() > 1 && lower.starts_with('0') {
        (8, &lower[1..])
    } else {
        (10, lower.as_str())
    };
    if body.is_empty() || !body.chars().all(|c| c.is_digit(radix)) {
        return None;
    }
    let n = i64::from_str_radix(body, radix).ok()?;
    Some(if negative { -n } else { n })
}

/// Go's `time.ParseDuration`, for non-negative durations: `300ms`, `1.5s`, `1h2m`, `0`.
/// Units `ns`, `us` (or `µs`), `ms`, `s`, `m`, `h`. Like Go, it counts in integer nanoseconds
/// (a fraction is truncated to the nanosecond), so every duration [`format_go_duration`] prints
/// parses back to itself.
///
/// # Errors
///
/// A message quoting `s` when it is negative, empty, has a number without a unit (other than a
/// bare `0`) or an unknown unit, or exceeds Go's limit of `i64::MAX` nanoseconds (about 292
/// years).
pub fn parse_go_duration(s: &str) -> Result<Duration, String> {
    const LIMIT: u64 = 1 << 63;
    let invalid = || format!("invalid duration {s:?} (expected e.g. 100ms, 1.5s, 1m30s)");
    let rest = s.strip_prefix('+').unwrap_or(s);
    if rest.starts_with('-') {
        return Err(format!("negative duration {s:?}"));
    }
    if rest == "0" {
        return Ok(Duration::ZERO);
    }
    if rest.is_empty() {
        return Err(invalid());
    }
    let digits_len = |s: &str| s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let mut total: u64 = 0;
    let mut rest = rest;
    while !rest.is_empty() {
        // The integer part (Go's leadingInt: an overflow is an error).
        let (int_digits, after) = rest.split_at(digits_len(rest));
        let mut value: u64 = 0;
        for d in int_digits.bytes() {
            value = value
                .checked_mul(10)
                .and_then(|v| v.checked_add(u64::from(d - b'0')))
                .filter(|&v| v <= LIMIT)
                .ok_or_else(invalid)?;
        }
        rest = after;
        // The fraction (Go's leadingFraction: digits past what fits are ignored).
        let (mut fraction, mut scale, mut has_fraction) = (0u64, 1f64, false);
        if let Some(after_dot) = rest.strip_prefix('.') {
            let (frac_digits, after) = after_dot.split_at(digits_len(after_dot));
            has_fraction = !frac_digits.is_empty();
            let mut overflow = false;
            for d in frac_digits.bytes() {
                if overflow || fraction > (LIMIT - 1) / 10 {
                    overflow = true;
                    continue;
                }
                let next = fraction * 10 + u64::from(d - b'0');
                if next > LIMIT {
                    overflow = true;
                    continue;
                }
                fraction = next;
                scale *= 10.0;
            }
            rest = after;
        }
        if int_digits.is_empty() && !has_fraction {
            return Err(invalid());
        }
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let nanos_per_unit: u64 = match unit {
            "ns" => 1,
            "us" | "\u{b5}s" | "\u{3bc}s" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            _ => return Err(invalid()),
        };
        if value > LIMIT / nanos_per_unit {
            return Err(invalid());
        }
        value *= nanos_per_unit;
        if fraction > 0 {
            // As Go: float64(f) * (float64(unit) / scale), truncated.
            value += (fraction as f64 * (nanos_per_unit as f64 / scale)) as u64;
            if value > LIMIT {
                return Err(invalid());
            }
        }
        total = total
            .checked_add(value)
            .filter(|&t| t <= LIMIT)
            .ok_or_else(invalid)?;
    }
    if total > i64::MAX as u64 {
        return Err(invalid());
    }
    Ok(Duration::from_nanos(total))
}

/// Go's `time.Duration.String()`: `0s`, `750ns`, `202.008µs`, `25.4975ms`, `1.5s`, `1m0s`,
/// `2h3m4.5s`.
pub fn format_go_duration(d: Duration) -> String {
    fn fraction(value: u128, unit: u128, digits: usize) -> String {
        let int = value / unit;
        let rem = value % unit;
        if rem == 0 {
            int.to_string()
        } else {
            let frac = format!("{rem:0digits$}");
            format!("{int}.{}", frac.trim_end_matches('0'))
        }
    }
    let ns = d.as_nanos();
    if ns == 0 {
        return "0s".into();
    }
    if ns < 1_000 {
        return format!("{ns}ns");
    }
    if ns < 1_000_000 {
        return format!("{}\u{b5}s", fraction(ns, 1_000, 3));
    }
    if ns < 1_000_000_000 {
        return format!("{}ms", fraction(ns, 1_000_000, 6));
    }
    let secs_total = ns / 1_000_000_000;
    let sub = ns % 1_000_000_000;
    let hours = secs_total / 3600;
    let minutes = (secs_total / 60) % 60;
    let secs = fraction((secs_total % 60) * 1_000_000_000 + sub, 1_000_000_000, 9);
    if hours > 0 {
        format!("{hours}h{minutes}m{secs}s")
    } else if minutes > 0 {
        format!("{minutes}m{secs}s")
    } else {
        format!("{secs}s")
    }
}
