//! `WebhookSecret` parsing: `str::parse::<WebhookSecret>()` and `WebhookSecret::parse_list`, the
//! code that reads `COUNTERSINK_WEBHOOK_SECRET` (or its file) at start-up.
//!
//! The input is the variable's value (inputs that are not UTF-8 are skipped: an environment
//! variable read as a `String` cannot hold them). Checked, for every input:
//!
//! - neither parser panics, and signing with whatever they accept does not panic;
//! - a single secret is accepted only if, trimmed, it starts with `whsec_`;
//! - `parse_list` accepts only a non-empty list whose every whitespace-separated token parses
//!   on its own, and returns exactly those secrets, in order; it refuses when any token is refused;
//! - the input's bytes as a key, written as `whsec_<base64>`, parse back to the same secret
//!   exactly when the key holds at least 16 bytes.
#![no_main]

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use countersink::webhook::WebhookSecret;
use libfuzzer_sys::fuzz_target;

/// The shortest key `from_str` accepts (the scheme suggests 24 to 64 bytes).
const MIN_SECRET_BYTES: usize = 16;

fuzz_target!(|data: &[u8]| {
    // A key round trip works on any bytes.
    let written = format!("whsec_{}", BASE64.encode(data));
    let parsed = written.parse::<WebhookSecret>();
    if data.len() >= MIN_SECRET_BYTES {
        assert_eq!(parsed, Ok(WebhookSecret::from_key(data)), "a {}-byte key does not round-trip", data.len());
    } else {
        assert!(parsed.is_err(), "a {}-byte key was accepted", data.len());
    }

    let Ok(s) = std::str::from_utf8(data) else { return };
    if let Ok(secret) = s.parse::<WebhookSecret>() {
        assert!(s.trim().starts_with("whsec_"), "accepted without the whsec_ prefix: {s:?}");
        let _ = secret.sign("msg_1", 0, s.as_bytes());
    }

    let tokens: Vec<&str> = s.split_whitespace().collect();
    let one_by_one: Result<Vec<WebhookSecret>, String> = tokens.iter().map(|t| t.parse()).collect();
    match WebhookSecret::parse_list(s) {
        Ok(list) => {
            assert!(!list.is_empty(), "parse_list accepted an empty list: {s:?}");
            assert_eq!(Ok(&list), one_by_one.as_ref(), "parse_list disagrees with parsing each token: {s:?}");
            for secret in &list {
                let _ = secret.sign("msg_1", i64::MIN, data);
            }
        }
        Err(_) => assert!(
            tokens.is_empty() || one_by_one.is_err(),
            "parse_list refused a list whose every token parses: {s:?}"
        ),
    }
});
