//! Output helpers shared by the verbs: JSON fields, columns, Consul's four-space JSON, path
//! encoding, and Go's time formats (Consul's CLI is written in Go).

use std::time::SystemTime;

use mesh_api::Response;
use serde_json::Value;

/// The string field `k` of a JSON object; empty when missing or not a string.
pub(crate) fn field<'a>(v: &'a Value, k: &str) -> &'a str {
    v.get(k).and_then(Value::as_str).unwrap_or("")
}

/// The JSON body of an answer.
///
/// # Errors
/// A message naming the decoding failure when the body is not JSON.
pub(crate) fn json_body(resp: &Response) -> Result<Value, String> {
    serde_json::from_slice(&resp.body).map_err(|e| format!("Error decoding the answer: {e}"))
}

/// Lines of columns separated by two spaces, every column but the last padded.
pub(crate) fn columnize(rows: &[Vec<String>]) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    rows.iter()
        .map(|r| {
            let mut line = String::new();
            for (c, cell) in r.iter().enumerate() {
                if c + 1 == r.len() {
                    line.push_str(cell);
                } else {
                    line.push_str(cell);
                    line.push_str(&" ".repeat(widths[c] - cell.chars().count() + 2));
                }
            }
            line
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// One path segment, percent-encoded.
pub(crate) fn enc(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes())
        .collect::<String>()
        .replace('+', "%20")
}

/// JSON indented by four spaces, as Consul's CLI prints it, keeping the server's field order
/// (Consul's). Falls back to the text as it came when it is not JSON.
pub(crate) fn pretty4(raw: &[u8]) -> String {
    let Ok(text) = std::str::from_utf8(raw) else {
        return String::from_utf8_lossy(raw).into_owned();
    };
    if serde_json::from_str::<Value>(text).is_err() {
        return text.to_owned();
    }
    let mut out = String::with_capacity(text.len() * 2);
    let mut depth = 0usize;
    let (mut in_string, mut escaped) = (false, false);
    let newline = |out: &mut String, depth: usize| {
        out.push('\n');
        out.push_str(&"    ".repeat(depth));
    };
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if in_string {
            out.push(c);
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match c {
            '"' => {
                in_string = true;
                out.push(c);
            }
            '{' | '[' => {
                while chars.peek().is_some_and(|c| c.is_whitespace()) {
                    chars.next();
                }
                out.push(c);
                if chars.peek().is_some_and(|&n| n == '}' || n == ']') {
                    if let Some(close) = chars.next() {
                        out.push(close);
                    }
                } else {
                    depth += 1;
                    newline(&mut out, depth);
                }
            }
            '}' | ']' => {
                depth = depth.saturating_sub(1);
                newline(&mut out, depth);
                out.push(c);
            }
            ',' => {
                out.push(c);
                newline(&mut out, depth);
            }
            ':' => out.push_str(": "),
            c if c.is_whitespace() => {}
            c => out.push(c),
        }
    }
    out
}

// ---- time formatting -----------------------------------------------------------------------

/// Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
fn civil(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// A UTC instant split into calendar fields.
struct Utc {
    year: i64,
    month: u32,
    day: u32,
    weekday: usize,
    secs_of_day: u64,
    nanos: u32,
}

/// Parses an RFC 3339 time; `None` when it is not one.
fn utc(rfc3339: &str) -> Option<Utc> {
    let t = humantime::parse_rfc3339(rfc3339).ok()?;
    let d = t.duration_since(SystemTime::UNIX_EPOCH).ok()?;
    let days = i64::try_from(d.as_secs() / 86_400).ok()?;
    let (year, month, day) = civil(days);
    Some(Utc {
        year,
        month,
        day,
        // 1970-01-01 was a Thursday.
        weekday: usize::try_from((days + 4).rem_euclid(7)).ok()?,
        secs_of_day: d.as_secs() % 86_400,
        nanos: d.subsec_nanos(),
    })
}

const WEEKDAYS: [&str; 7] = [
    "Sunday",
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
];
const MONTHS: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];

/// Go's `time.RFC850` in UTC: `Monday, 02-Jan-06 15:04:05 UTC` (as `consul intention get`).
pub(crate) fn rfc850(rfc3339: &str) -> String {
    let Some(u) = utc(rfc3339) else {
        return rfc3339.to_owned();
    };
    let s = u.secs_of_day;
    format!(
        "{}, {:02}-{}-{:02} {:02}:{:02}:{:02} UTC",
        WEEKDAYS[u.weekday],
        u.day,
        MONTHS[(u.month - 1) as usize],
        u.year.rem_euclid(100),
        s / 3600,
        s / 60 % 60,
        s % 60
    )
}

/// Go's default time format in UTC: `2018-10-22 15:33:39.01789 +0000 UTC`.
pub(crate) fn go_time(rfc3339: &str) -> String {
    let Some(u) = utc(rfc3339) else {
        return rfc3339.to_owned();
    };
    let s = u.secs_of_day;
    let frac = if u.nanos == 0 {
        String::new()
    } else {
        format!(".{:09}", u.nanos).trim_end_matches('0').to_owned()
    };
    format!(
        "{}-{:02}-{:02} {:02}:{:02}:{:02}{frac} +0000 UTC",
        u.year,
        u.month,
        u.day,
        s / 3600,
        s / 60 % 60,
        s % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_print_as_consul_prints_them() {
        assert_eq!(
            rfc850("2018-02-14T00:28:07.5Z"),
            "Wednesday, 14-Feb-18 00:28:07 UTC"
        );
        assert_eq!(
            go_time("2018-10-22T15:33:39.017890Z"),
            "2018-10-22 15:33:39.01789 +0000 UTC"
        );
        assert_eq!(
            go_time("2000-03-01T00:00:00Z"),
            "2000-03-01 00:00:00 +0000 UTC"
        );
    }

    #[test]
    fn json_is_indented_in_the_order_given() {
        let raw =
            br#"{"Kind":"service-intentions","Sources":[{"Name":"a\"}{,:"}],"Meta":{},"L":[]}"#;
        assert_eq!(
            pretty4(raw),
            "{\n    \"Kind\": \"service-intentions\",\n    \"Sources\": [\n        {\n            \"Name\": \"a\\\"}{,:\"\n        }\n    ],\n    \"Meta\": {},\n    \"L\": []\n}"
        );
        assert_eq!(pretty4(b"not json"), "not json");
    }

    #[test]
    fn columns_line_up() {
        let rows = vec![
            vec!["Source:".to_owned(), "web".to_owned()],
            vec!["Destination:".to_owned(), "api".to_owned()],
        ];
        assert_eq!(columnize(&rows), "Source:       web\nDestination:  api");
    }
}
