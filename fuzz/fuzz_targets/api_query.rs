//! The HTTP API's query strings (`?ns=`, `?cas=`, `?source=`, `?destination=`, `?by=`,
//! `?name=`, the blocking query's `?index=` and `?wait=`, `?filter=`, `?kind=`, `?tag=`, ...),
//! decoded as the handlers do; names that parse show as they parse; a blocking query never
//! waits longer than the maximum, nor blocks on index 0.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_core::intentions::ServiceName;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    for result in mesh_api::fuzzing::decode_query(text) {
        match result {
            Ok(_) => {}
            Err(e) => {
                assert!((400..500).contains(&e.status()), "{text:?}: {e}");
            }
        }
    }
    // A blocking query blocks on a positive index, for at most the maximum wait.
    if let Ok(Some((index, wait))) = mesh_api::fuzzing::decode_blocking(text) {
        assert!(index > 0, "{text:?}");
        assert!(
            !wait.is_zero() && wait <= mesh_api::fuzzing::MAX_WAIT,
            "{text:?}: {wait:?}"
        );
    }
    // `ns/name` forms that the query accepted are valid service names.
    for (key, value) in form_pairs(text) {
        if key == "source" || key == "destination" {
            if let Ok(n) = ServiceName::parse(&value) {
                assert_eq!(ServiceName::parse(&n.to_string()).ok(), Some(n));
            }
        }
    }
});

fn form_pairs(text: &str) -> Vec<(String, String)> {
    text.split('&')
        .filter_map(|p| p.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}
