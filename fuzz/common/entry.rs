//! What the two config-entry targets check once an entry has parsed (JSON or HCL).

use mesh_core::catalog::Protocol;
use mesh_core::intentions::{HttpRequest, RuleSet, ServiceDefaultsEntry, ServiceIntentionsEntry};

/// `entry` (read from `text`) survives its own JSON form, applies to a rule set whose
/// destination is `http` (sources with L7 permissions need one), and decides a request from
/// each source.
pub fn check(text: &str, entry: &ServiceIntentionsEntry) {
    let json = entry.to_json();
    let again = ServiceIntentionsEntry::from_json(&json)
        .unwrap_or_else(|e| panic!("{text:?} → {json} does not parse back: {e}"));
    assert_eq!(&again, entry, "{text:?} → {json}");
    let mut rules = RuleSet::new();
    let _ = rules.apply_service_defaults(&ServiceDefaultsEntry::new(
        entry.destination.clone(),
        Protocol::Http,
    ));
    if rules.apply_entry(entry).is_ok() {
        let req = HttpRequest {
            method: "GET",
            path: "/admin",
            headers: &[("x-env", "prod")],
        };
        for src in &entry.sources {
            let _ = rules.check_request(&src.source, &entry.destination, &req);
        }
    }
}
