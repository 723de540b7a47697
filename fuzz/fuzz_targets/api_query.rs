//! The HTTP API's query strings (`?ns=`, `?cas=`, `?source=`, `?destination=`, `?by=`,
//! `?name=`, ...), decoded as the handlers do; names that parse show as they parse.
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
