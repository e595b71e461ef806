//! `countersink::webhook::verify` (Standard Webhooks HMAC signatures).
//!
//! The input is text, so the seeds read like requests: five lines, then the body (any bytes):
//!
//! ```text
//! <secret key bytes>
//! <webhook-id>
//! <webhook-timestamp>
//! <webhook-signature>
//! <now, Unix seconds>
//! <body ...>
//! ```
//!
//! A missing line is an empty one; an id or header that is not UTF-8 counts as an absent header.
//! Checked, for every input:
//!
//! 1. `verify` never panics on the headers, body and clock as given (timestamps and clocks
//!    anywhere in i64, i64::MIN and i64::MAX included), and when it accepts, the id passes
//!    `check_id` and the timestamp is within 300 s of `now`.
//! 2. Round trip: with `ts` the timestamp line as an i64 (or derived from its bytes),
//!    `sign(id, ts, body)` verifies at `now = ts`, `ts ± 300` and at the `now` line when it is
//!    within 300 s, exactly when `check_id(id)` is Ok; at `ts ± 301` it is refused as stale (or
//!    for the id); it still verifies after unknown tokens in the header (refused, unhashed, past
//!    8 signatures or 1 KiB of header) and beside another secret.
//! 3. Tampering fails: one changed byte of the body, the id or the key, or a timestamp 1 s off,
//!    and the signature no longer verifies.
#![no_main]

use countersink::webhook::{
    check_id, verify, SignatureError, SignedHeaders, WebhookSecret, MAX_SIGNATURES, MAX_SIGNATURE_HEADER_LEN,
    TIMESTAMP_TOLERANCE_SECS,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut fields = data.splitn(6, |b| *b == b'\n');
    let mut next = || fields.next().unwrap_or_default();
    let (key, id, ts_line, sig_line, now_line, body) = (next(), next(), next(), next(), next(), next());
    let secret = WebhookSecret::from_key(key);
    let text = |bytes: &[u8]| std::str::from_utf8(bytes).ok().map(str::to_owned);
    let (id_text, ts_text, sig_text) = (text(id), text(ts_line), text(sig_line));
    let now = as_i64(now_line);

    // 1. Anything goes, nothing panics; an acceptance is consistent with the checks it implies.
    let headers =
        SignedHeaders { id: id_text.as_deref(), timestamp: ts_text.as_deref(), signature: sig_text.as_deref() };
    if verify(std::slice::from_ref(&secret), headers, body, now).is_ok() {
        let id = id_text.as_deref().unwrap_or_default();
        assert_eq!(check_id(id), Ok(()), "accepted an id check_id refuses: {id:?}");
        let ts: i64 = ts_text.as_deref().unwrap_or_default().trim().parse().expect("accepted an unparsable timestamp");
        assert!(ts.abs_diff(now) <= TOLERANCE, "accepted a timestamp {ts} at now = {now}");
    }
    // The same headers must not panic with the clock at its extremes either.
    for extreme in [i64::MIN, i64::MAX, 0] {
        let _ = verify(std::slice::from_ref(&secret), headers, body, extreme);
    }

    // 2. Round trip of a signature made by `sign`.
    let id = String::from_utf8_lossy(id).into_owned();
    let ts = as_i64(ts_line);
    let ts_header = ts.to_string();
    let signature = secret.sign(&id, ts, body);
    let id_ok = check_id(&id).is_ok();
    let accepts = |secrets: &[WebhookSecret], id: &str, ts_header: &str, signature: &str, body: &[u8], now: i64| {
        let headers = SignedHeaders { id: Some(id), timestamp: Some(ts_header), signature: Some(signature) };
        verify(secrets, headers, body, now)
    };
    let one = std::slice::from_ref(&secret);
    let expected_in_time = if id_ok { Ok(()) } else { Err(SignatureError::BadId) };
    let expected_stale = if id_ok { Err(SignatureError::StaleTimestamp) } else { Err(SignatureError::BadId) };
    for offset in [0, TOLERANCE_I64, -TOLERANCE_I64] {
        if let Some(at) = ts.checked_add(offset) {
            let got = accepts(one, &id, &ts_header, &signature, body, at);
            assert_eq!(got, expected_in_time, "id {id:?}, ts {ts}, now {at}");
        }
    }
    for offset in [TOLERANCE_I64 + 1, -TOLERANCE_I64 - 1] {
        if let Some(at) = ts.checked_add(offset) {
            let got = accepts(one, &id, &ts_header, &signature, body, at);
            assert_eq!(got, expected_stale, "id {id:?}, ts {ts}, now {at}");
        }
    }
    let in_time = ts.abs_diff(now) <= TOLERANCE;
    let got = accepts(one, &id, &ts_header, &signature, body, now);
    assert_eq!(got, if in_time { expected_in_time.clone() } else { expected_stale.clone() }, "ts {ts}, now {now}");

    if !id_ok {
        return;
    }
    // Unknown tokens before it (the signature line, whatever it holds) do not hide a valid
    // signature, up to the caps on signatures and header length, past which it is refused unhashed.
    let crowded = format!("{} {signature}", String::from_utf8_lossy(sig_line));
    let within_caps =
        crowded.len() <= MAX_SIGNATURE_HEADER_LEN && crowded.split_whitespace().count() <= MAX_SIGNATURES;
    let expected = if within_caps { Ok(()) } else { Err(SignatureError::TooManySignatures) };
    assert_eq!(accepts(one, &id, &ts_header, &crowded, body, ts), expected, "header {crowded:?}");
    // Another secret beside it (rotation): still accepted; the other secret alone: refused.
    let mut other_key = key.to_vec();
    match other_key.get_mut(flip_index(data, key.len())) {
        Some(byte) => *byte ^= flip_mask(data),
        None => other_key.push(1),
    }
    let other = WebhookSecret::from_key(&other_key);
    let both = [other.clone(), secret.clone()];
    assert_eq!(accepts(&both, &id, &ts_header, &signature, body, ts), Ok(()), "rotation: two secrets");
    let got = accepts(std::slice::from_ref(&other), &id, &ts_header, &signature, body, ts);
    assert_eq!(got, Err(SignatureError::Mismatch), "a key one byte off verified: {key:?} vs {other_key:?}");

    // 3. One changed byte of the body or the id, or another timestamp, and it fails.
    if !body.is_empty() {
        let mut tampered = body.to_vec();
        tampered[flip_index(data, body.len())] ^= flip_mask(data);
        let got = accepts(one, &id, &ts_header, &signature, &tampered, ts);
        assert_eq!(got, Err(SignatureError::Mismatch), "a body one byte off verified");
    }
    let mut tampered_id = id.clone().into_bytes();
    tampered_id[flip_index(data, id.len())] ^= flip_mask(data);
    if let Ok(tampered_id) = String::from_utf8(tampered_id) {
        let got = accepts(one, &tampered_id, &ts_header, &signature, body, ts);
        assert!(got.is_err(), "an id one byte off verified: {id:?} -> {tampered_id:?}");
    }
    for off_by_one in [ts.checked_add(1), ts.checked_sub(1)].into_iter().flatten() {
        let got = accepts(one, &id, &off_by_one.to_string(), &signature, body, ts);
        assert_eq!(got, Err(SignatureError::Mismatch), "signed for {ts}, verified as {off_by_one}");
    }
});

const TOLERANCE: u64 = TIMESTAMP_TOLERANCE_SECS as u64;
const TOLERANCE_I64: i64 = TIMESTAMP_TOLERANCE_SECS;

/// A decimal line as an i64; anything else (including overflow) as its first 8 bytes, so the
/// fuzzer reaches every i64, the extremes included, from either form.
fn as_i64(line: &[u8]) -> i64 {
    if let Some(n) = std::str::from_utf8(line).ok().and_then(|s| s.trim().parse().ok()) {
        return n;
    }
    let mut bytes = [0u8; 8];
    let n = line.len().min(8);
    bytes[..n].copy_from_slice(&line[..n]);
    i64::from_le_bytes(bytes)
}

/// Which byte to change: varies with the whole input, always inside `0..len` (for len > 0).
fn flip_index(data: &[u8], len: usize) -> usize {
    let h = data.iter().fold(0usize, |h, b| h.wrapping_mul(31).wrapping_add(usize::from(*b)));
    if len == 0 {
        0
    } else {
        h % len
    }
}

/// How to change it: never zero, so the byte always differs.
fn flip_mask(data: &[u8]) -> u8 {
    data.last().copied().unwrap_or(1).max(1)
}
