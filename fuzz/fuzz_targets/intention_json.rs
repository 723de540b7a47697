//! The body of `POST /v1/connect/intentions`: Consul's intention JSON, then the rule set's
//! validation (names, wildcards, partitions, description, meta) and a check against it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_core::intentions::{IntentionSpec, RuleSet, ServiceName};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(spec) = IntentionSpec::from_json(text) else {
        return;
    };
    let mut rules = RuleSet::new();
    if let Ok(intention) = rules.create(&spec, false) {
        let id = intention.id.clone();
        assert!(rules.get(&id).is_some());
        let web = ServiceName::parse("web").expect("a valid name");
        let _ = rules.check(&web, &web);
        // Creating it again without replace is refused (the same source and destination).
        assert!(rules.create(&spec, false).is_err());
        assert!(rules.create(&spec, true).is_ok());
    }
});
