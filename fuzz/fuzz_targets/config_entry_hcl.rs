//! `consul config write x.hcl`: a service-intentions entry in HCL (L7
//! `Permissions` included, as lists or blocks). What parses survives its
//! JSON form.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_core::catalog::Protocol;
use mesh_core::intentions::{HttpRequest, RuleSet, ServiceDefaultsEntry, ServiceIntentionsEntry};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(entry) = ServiceIntentionsEntry::from_hcl(text) else {
        return;
    };
    let json = entry.to_json();
    let again = ServiceIntentionsEntry::from_json(&json)
        .unwrap_or_else(|e| panic!("{text:?} → {json} does not parse back: {e}"));
    assert_eq!(again, entry, "{text:?} → {json}");
    let mut rules = RuleSet::new();
    // Sources with L7 permissions need an http destination.
    let _ = rules.apply_service_defaults(&ServiceDefaultsEntry::new(
        entry.destination.clone(),
        Protocol::Http,
    ));
    if rules.apply_entry(&entry).is_ok() {
        let req = HttpRequest {
            method: "GET",
            path: "/admin",
            headers: &[("x-env", "prod")],
        };
        for src in &entry.sources {
            let _ = rules.check_request(&src.source, &entry.destination, &req);
        }
    }
});
