//! fake-service's Go durations (`TIMING_50_PERCENTILE=1.5s`): no panic, and a duration
//! survives Go's `String()` form: parse(format(d)) == d.
#![no_main]

use std::time::Duration;

use fake_service::{format_go_duration, parse_go_duration};
use libfuzzer_sys::fuzz_target;

const GO_MAX_NANOS: u64 = i64::MAX as u64;

fuzz_target!(|data: &[u8]| {
    if data.len() >= 8 {
        let nanos = u64::from_le_bytes(data[..8].try_into().expect("8 bytes")) % (GO_MAX_NANOS + 1);
        let d = Duration::from_nanos(nanos);
        let shown = format_go_duration(d);
        assert_eq!(parse_go_duration(&shown), Ok(d), "{shown}");
    }
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(d) = parse_go_duration(text) {
        assert!(d.as_nanos() <= u128::from(GO_MAX_NANOS), "{text:?} → {d:?}");
        let shown = format_go_duration(d);
        assert_eq!(parse_go_duration(&shown), Ok(d), "{text:?} → {shown}");
    }
});
