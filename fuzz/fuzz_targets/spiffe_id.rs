//! SPIFFE IDs from peer certificates and the authorize API: parse(display(x)) == x.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_core::identity::SpiffeId;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match text.parse::<SpiffeId>() {
        Ok(id) => {
            let shown = id.to_string();
            let again: SpiffeId = shown
                .parse()
                .unwrap_or_else(|e| panic!("{text:?} → {shown:?} does not parse back: {e}"));
            assert_eq!(again, id, "{text:?} → {shown:?}");
        }
        Err(e) => {
            // The message is bounded whatever the input.
            assert!(e.to_string().len() < 4096);
        }
    }
});
