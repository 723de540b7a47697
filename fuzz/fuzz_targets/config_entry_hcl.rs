//! `consul config write x.hcl`: a service-intentions entry in HCL (L7
//! `Permissions` included, as lists or blocks). What parses survives its
//! JSON form, and applies to a rule set (`fuzz/common/entry.rs`).
#![no_main]

#[path = "../common/entry.rs"]
mod entry;

use libfuzzer_sys::fuzz_target;
use mesh_core::intentions::ServiceIntentionsEntry;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(e) = ServiceIntentionsEntry::from_hcl(text) {
        entry::check(text, &e);
    }
});
