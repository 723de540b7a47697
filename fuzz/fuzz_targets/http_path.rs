//! The request paths L7 permissions are matched against (`normalize_path`, as Consul's Envoy
//! normalizes them): the result is normalized already (normalizing twice changes nothing),
//! starts with `/` when the input did, has no `.`/`..` segment, no empty segment but a
//! trailing one, and only upper-case percent-encodings of reserved characters.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_core::intentions::normalize_path;

fuzz_target!(|data: &[u8]| {
    let Ok(path) = std::str::from_utf8(data) else {
        return;
    };
    let Some(out) = normalize_path(path) else {
        return;
    };
    if !(path.starts_with('/') || path.starts_with('\\')) {
        assert_eq!(out, path);
        return;
    }
    assert!(out.starts_with('/'), "{path:?} → {out:?}");
    assert_eq!(
        normalize_path(&out).as_deref(),
        Some(out.as_str()),
        "{path:?} → {out:?} is not stable"
    );
    let segments: Vec<&str> = out[1..].split('/').collect();
    for (i, seg) in segments.iter().enumerate() {
        assert!(*seg != "." && *seg != "..", "{path:?} → {out:?}");
        assert!(
            !seg.is_empty() || i == segments.len() - 1,
            "{path:?} → {out:?} has an empty segment"
        );
    }
    assert!(!out.contains('\\'), "{path:?} → {out:?}");
});
