//! Kubernetes manifests (`meshctl apply -f`): multi-document YAML → objects (annotations, the
//! connect-inject bool, upstreams, ports, selectors), then the desired state built from them.
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
        let _ = DesiredState::build(std::slice::from_ref(&manifest));
    }
});
