//! `consul config write x.hcl`: a service-intentions entry in HCL. What parses survives its
//! JSON form.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_core::intentions::{RuleSet, ServiceIntentionsEntry};

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
    let _ = rules.apply_entry(&entry);
});
