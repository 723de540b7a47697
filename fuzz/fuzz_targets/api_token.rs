//! ACL input: `PUT /v1/acl/token` bodies, policy names, the token headers
//! (`X-Consul-Token`, `Authorization: Bearer`) and `MESH_HTTP_ADDR` values.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_api::{Address, Policy, ServerConfig, TokenRequest};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 4 {
        0 => {
            let Ok(text) = std::str::from_utf8(rest) else {
                return;
            };
            if let Ok(req) = TokenRequest::from_json(text) {
                let json = req.to_json();
                let again = TokenRequest::from_json(&json)
                    .unwrap_or_else(|e| panic!("{text:?} → {json} does not parse back: {e}"));
                assert_eq!(again, req, "{text:?} → {json}");
            }
        }
        1 => {
            let Ok(text) = std::str::from_utf8(rest) else {
                return;
            };
            if let Ok(policy) = Policy::parse(text) {
                let name = policy.name();
                assert_eq!(Policy::parse(&name).as_ref(), Ok(&policy), "{text:?} → {name:?}");
            }
        }
        2 => {
            let (x, auth) = match rest.iter().position(|&b| b == b'\n') {
                Some(i) => (Some(&rest[..i]), Some(&rest[i + 1..])),
                None => (None, Some(rest)),
            };
            if let Ok(token) = mesh_api::fuzzing::decode_token_headers(x, auth) {
                assert!(!token.is_empty());
                assert_eq!(token.trim(), token);
            }
        }
        _ => {
            let Ok(text) = std::str::from_utf8(rest) else {
                return;
            };
            if let Ok(addr) = text.parse::<Address>() {
                let shown = addr.to_string();
                let again: Address = shown
                    .parse()
                    .unwrap_or_else(|e| panic!("{text:?} → {shown:?} does not parse back: {e}"));
                assert_eq!(again.to_string(), shown);
            }
            let mut cfg = ServerConfig::new("/nonexistent");
            let _ = cfg.set_address(text);
        }
    }
});
