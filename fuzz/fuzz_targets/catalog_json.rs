//! `meshd run --catalog FILE`: the catalog JSON, validated. What parses survives its JSON form.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_core::catalog::Catalog;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(catalog) = Catalog::from_json(text) else {
        return;
    };
    let json = serde_json::to_string(&catalog).expect("a catalog serializes");
    let again = Catalog::from_json(&json)
        .unwrap_or_else(|e| panic!("{text:?} → {json} does not parse back: {e}"));
    assert_eq!(again, catalog, "{text:?} → {json}");
    assert!(catalog.diff(&again).is_empty());
});
