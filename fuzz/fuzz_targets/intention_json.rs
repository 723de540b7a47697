//! The body of `POST /v1/connect/intentions` and `PUT .../exact`: Consul's intention JSON
//! (L7 `Permissions` included), then the rule set's validation (names, wildcards, partitions,
//! description, meta, the destination's protocol) and checks against it, per connection and per
//! HTTP request.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_core::catalog::Protocol;
use mesh_core::intentions::{
    HttpRequest, IntentionSpec, RuleSet, ServiceDefaultsEntry, ServiceName,
};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(spec) = IntentionSpec::from_json(text) else {
        return;
    };
    let mut rules = RuleSet::new();
    // An intention with permissions needs an http destination; give it one.
    if !spec.permissions.is_empty() {
        if let Ok(dst) = ServiceName::new(
            spec.destination_namespace.clone().unwrap_or_else(|| "default".into()),
            spec.destination_name.clone(),
        ) {
            let _ = rules.apply_service_defaults(&ServiceDefaultsEntry::new(dst, Protocol::Http));
        }
    }
    // What parses survives its own JSON form (permissions in Consul's shape).
    let perms = serde_json::to_string(&spec.permissions).expect("permissions serialize");
    let again = mesh_core::intentions::permission::permissions_from_json(&perms)
        .unwrap_or_else(|e| panic!("{perms} does not parse back: {e}"));
    assert_eq!(again, spec.permissions, "{perms}");
    if let Ok(intention) = rules.create(&spec, false) {
        let src = intention.source.clone();
        let dst = intention.destination.clone();
        let l7 = intention.has_permissions();
        let id = intention.id.clone();
        assert_eq!(rules.has_permissions(&src, &dst), l7);
        assert!(rules.get(&id).is_some());
        let web = ServiceName::parse("web").expect("a valid name");
        let _ = rules.check(&web, &web);
        let headers = [("x-env", "prod"), ("X-Env", "dev")];
        for (method, path) in [("GET", "/"), ("POST", "/admin/x"), ("DELETE", "")] {
            let req = HttpRequest { method, path, headers: &headers };
            let _ = rules.check_request(&src, &dst, &req);
        }
        // Creating it again without replace is refused (the same source and destination).
        assert!(rules.create(&spec, false).is_err());
        assert!(rules.create(&spec, true).is_ok());
    }
});
