//! Kubernetes manifests (`meshctl apply -f`): multi-document YAML → objects (annotations, the
//! connect-inject bool, upstreams, ports, selectors, consul-k8s's ServiceIntentions and
//! ServiceDefaults), then the desired state built from them.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_core::k8s::{DesiredState, Manifest, ParseOptions, UpstreamSyntax};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    let options = ParseOptions {
        namespace: (mode & 1 == 1).then(|| "team".to_string()),
        upstream_syntax: UpstreamSyntax {
            consul_namespaces: mode & 2 == 0,
            consul_partitions: mode & 4 == 4,
        },
    };
    if let Ok(manifest) = Manifest::parse(text, &options) {
        // Every object has a kind and a name, and the errors and labels format.
        for object in manifest.objects() {
            assert!(!object.kind().is_empty());
            let _ = object.label();
        }
        if let Ok(state) = DesiredState::build(std::slice::from_ref(&manifest)) {
            // Every ServiceIntentions object made an entry the API's parser accepts again, as
            // read-only (external-source: kubernetes); no two share a destination.
            for si in &state.service_intentions {
                let entry = &si.entry;
                assert_eq!(
                    entry.meta.get("external-source").map(String::as_str),
                    Some("kubernetes")
                );
                let again = mesh_core::intentions::ServiceIntentionsEntry::from_json(
                    &entry.to_json(),
                )
                .expect("a translated entry parses again");
                assert_eq!(again.destination, entry.destination);
                assert_eq!(again.sources.len(), entry.sources.len());
                assert_eq!(
                    state
                        .service_intentions
                        .iter()
                        .filter(|o| o.entry.destination == entry.destination)
                        .count(),
                    1
                );
            }
            // Every upstream kept can be routed as written.
            for w in &state.workloads {
                for u in w.mesh.iter().flat_map(|m| &m.upstreams) {
                    assert!(u.check_routable("dc1").is_ok(), "{u:?}");
                    assert!(u.to_catalog(&w.namespace, "dc1").is_some(), "{u:?}");
                }
            }
        }
    }
});
