//! fake-service's configuration from its environment: `KEY=value` lines, any values.
#![no_main]

use fake_service::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let vars: Vec<(&str, &str)> = text
        .lines()
        .filter_map(|line| line.split_once('='))
        .collect();
    let _ = Config::from_env(vars);
});
