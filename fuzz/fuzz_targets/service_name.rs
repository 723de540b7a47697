//! Service names as the API takes them (`svc`, `ns/svc`, `ns/*`, `*/*`): parse(display(x)) == x.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_core::intentions::ServiceName;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(name) = ServiceName::parse(text) {
        let shown = name.to_string();
        let again = ServiceName::parse(&shown)
            .unwrap_or_else(|e| panic!("{text:?} → {shown:?} does not parse back: {e}"));
        assert_eq!(again, name, "{text:?} → {shown:?}");
        assert!(name.matches(&name));
        let rebuilt = ServiceName::new(name.namespace(), name.name()).expect("its own parts");
        assert_eq!(rebuilt, name);
    }
});
