//! Standard Webhooks signatures (<https://www.standardwebhooks.com>), the scheme senders use
//! to sign `POST /v1/events`.
//!
//! A request carries `webhook-id`, `webhook-timestamp` (Unix seconds) and `webhook-signature`:
//! one or more space-separated `v1,<base64 HMAC-SHA256>` over `"{id}.{timestamp}.{body}"`,
//! keyed with the base64 bytes of a `whsec_…` secret. Several secrets may be accepted at
//! once, so a secret can be rotated without downtime.

use std::fmt;
use std::str::FromStr;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// How far a request's timestamp may be from the sidecar's clock, either way.
pub const TIMESTAMP_TOLERANCE_SECS: i64 = 5 * 60;
/// The longest `webhook-id` accepted: it becomes a Redis key.
pub const MAX_WEBHOOK_ID_LEN: usize = 128;
/// The most `v1,` signatures one request may carry. A sender signs once per secret it holds,
/// and a rotation needs two; anything beyond a handful is an attack, refused before any HMAC.
pub const MAX_SIGNATURES: usize = 8;
/// The longest `webhook-signature` header accepted: [`MAX_SIGNATURES`] signatures of 47
/// characters (`v1,` and 44 of base64) with their spaces, and room to spare.
pub const MAX_SIGNATURE_HEADER_LEN: usize = 1_024;
/// Secrets shorter than this are refused at start-up (the scheme suggests 24 to 64 bytes). The
/// Django package checks the same (`signing.MIN_KEY_BYTES`, compared by `tests/first_run.rs`).
pub const MIN_SECRET_BYTES: usize = 16;
/// What a secret starts with, before its base64 key (`signing.SECRET_PREFIX` in the Django package).
pub const SECRET_PREFIX: &str = "whsec_";

/// One `whsec_` signing secret. Its `Debug` never shows the key.
#[derive(Clone, PartialEq, Eq)]
pub struct WebhookSecret(Vec<u8>);

impl fmt::Debug for WebhookSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("WebhookSecret(<redacted>)")
    }
}

impl FromStr for WebhookSecret {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let encoded = s.trim().strip_prefix(SECRET_PREFIX).ok_or("a webhook secret starts with \"whsec_\"")?;
        let key = BASE64.decode(encoded).map_err(|_| "the part after \"whsec_\" must be base64")?;
        if key.len() < MIN_SECRET_BYTES {
            return Err(format!("a webhook secret must hold at least {MIN_SECRET_BYTES} bytes"));
        }
        Ok(WebhookSecret(key))
    }
}

impl WebhookSecret {
    /// Parses one or more space-separated secrets (the rotation form).
    pub fn parse_list(s: &str) -> Result<Vec<WebhookSecret>, String> {
        let secrets = s.split_whitespace().map(str::parse).collect::<Result<Vec<_>, _>>()?;
        if secrets.is_empty() {
            return Err("no secret given".into());
        }
        Ok(secrets)
    }

    /// A secret over `key` (for tests and senders).
    pub fn from_key(key: &[u8]) -> Self {
        WebhookSecret(key.to_vec())
    }

    /// The signature header value for a message, as a sender computes it.
    pub fn sign(&self, id: &str, timestamp: i64, body: &[u8]) -> String {
        format!("v1,{}", BASE64.encode(self.mac(id, timestamp, body).finalize().into_bytes()))
    }

    /// A key for another purpose, derived from this secret as HMAC-SHA256(secret, `label`), so
    /// one shared secret serves several schemes and a signature of one is never valid in another.
    pub fn derive_key(&self, label: &str) -> [u8; 32] {
        // HMAC accepts keys of any length; new_from_slice cannot fail for it.
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.0).unwrap_or_else(|_| unreachable!());
        mac.update(label.as_bytes());
        mac.finalize().into_bytes().into()
    }

    fn mac(&self, id: &str, timestamp: i64, body: &[u8]) -> Hmac<Sha256> {
        // HMAC accepts keys of any length; new_from_slice cannot fail for it.
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.0).unwrap_or_else(|_| unreachable!());
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        mac
    }
}

/// Why a request's signature was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    /// A required header is absent or not text.
    #[error("the {0} header is missing")]
    Missing(&'static str),
    /// The id is empty, too long or not printable ASCII.
    #[error("the webhook-id header must be 1 to 128 printable ASCII characters")]
    BadId,
    /// The timestamp is not an integer.
    #[error("the webhook-timestamp header must be Unix seconds")]
    BadTimestamp,
    /// The timestamp is outside the tolerance.
    #[error("the webhook-timestamp is more than 5 minutes from the server's clock")]
    StaleTimestamp,
    /// No signature matched any accepted secret.
    #[error("no signature in webhook-signature matches")]
    Mismatch,
    /// More signatures, or a longer header, than any sender sends.
    #[error(
        "webhook-signature carries more than {MAX_SIGNATURES} signatures or {MAX_SIGNATURE_HEADER_LEN} bytes; \
         send one `v1,` signature per secret"
    )]
    TooManySignatures,
}

/// The signature headers of a request, as received.
#[derive(Debug, Clone, Copy)]
pub struct SignedHeaders<'a> {
    /// `webhook-id`.
    pub id: Option<&'a str>,
    /// `webhook-timestamp`.
    pub timestamp: Option<&'a str>,
    /// `webhook-signature`.
    pub signature: Option<&'a str>,
}

/// Checks a webhook id's form (it is used as an idempotency key).
pub fn check_id(id: &str) -> Result<(), SignatureError> {
    let printable = id.bytes().all(|b| b.is_ascii_graphic());
    if id.is_empty() || id.len() > MAX_WEBHOOK_ID_LEN || !printable {
        return Err(SignatureError::BadId);
    }
    Ok(())
}

/// Verifies a request against the accepted secrets at time `now` (Unix seconds).
/// Comparison is constant-time. The cost is bounded whatever the headers hold: the signature
/// header's size and count are checked first, and the body is hashed once per secret (not once
/// per signature), so a forged request costs what a valid one does.
pub fn verify(
    secrets: &[WebhookSecret],
    headers: SignedHeaders<'_>,
    body: &[u8],
    now: i64,
) -> Result<(), SignatureError> {
    let id = headers.id.ok_or(SignatureError::Missing("webhook-id"))?;
    let timestamp = headers.timestamp.ok_or(SignatureError::Missing("webhook-timestamp"))?;
    let signatures = headers.signature.ok_or(SignatureError::Missing("webhook-signature"))?;
    check_id(id)?;
    let timestamp: i64 = timestamp.trim().parse().map_err(|_| SignatureError::BadTimestamp)?;
    if timestamp.abs_diff(now) > TIMESTAMP_TOLERANCE_SECS as u64 {
        return Err(SignatureError::StaleTimestamp);
    }
    if signatures.len() > MAX_SIGNATURE_HEADER_LEN || signatures.split_whitespace().nth(MAX_SIGNATURES).is_some() {
        return Err(SignatureError::TooManySignatures);
    }
    let candidates: Vec<Vec<u8>> = signatures
        .split_whitespace()
        .filter_map(|s| s.strip_prefix("v1,"))
        .filter_map(|s| BASE64.decode(s).ok())
        .collect();
    if candidates.is_empty() {
        return Err(SignatureError::Mismatch);
    }
    for secret in secrets {
        // The body is hashed once; each candidate is checked (in constant time) against a copy of
        // that state, which costs only the MAC's finalisation.
        let hashed = secret.mac(id, timestamp, body);
        if candidates.iter().any(|candidate| hashed.clone().verify_slice(candidate).is_ok()) {
            return Ok(());
        }
    }
    Err(SignatureError::Mismatch)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_700_000_000;

    fn secret() -> WebhookSecret {
        "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".parse().expect("a valid secret")
    }

    fn headers<'a>(id: &'a str, ts: &'a str, sig: &'a str) -> SignedHeaders<'a> {
        SignedHeaders { id: Some(id), timestamp: Some(ts), signature: Some(sig) }
    }

    #[test]
    fn matches_the_standard_webhooks_reference_vector() {
        // The example in the Standard Webhooks specification's reference libraries.
        let body = br#"{"test": 2432232314}"#;
        let signature = secret().sign("msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body);
        assert_eq!(signature, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn accepts_a_valid_signature_with_any_rotated_secret() {
        let old = WebhookSecret::from_key(b"an older secret of some length");
        let body = b"[]";
        let sig = secret().sign("msg_1", NOW, body);
        let ts = NOW.to_string();
        assert_eq!(verify(&[old.clone(), secret()], headers("msg_1", &ts, &sig), body, NOW), Ok(()));
        // Several signatures in one header: one match suffices.
        let both = format!("v1,AAAA {sig}");
        assert_eq!(verify(&[secret()], headers("msg_1", &ts, &both), body, NOW + 299), Ok(()));
        assert_eq!(verify(&[old], headers("msg_1", &ts, &sig), body, NOW), Err(SignatureError::Mismatch));
    }

    #[test]
    fn refuses_forged_stale_future_and_incomplete_requests() {
        let body = b"[]";
        let sig = secret().sign("msg_1", NOW, body);
        let ts = NOW.to_string();
        let s = [secret()];
        assert_eq!(verify(&s, headers("msg_1", &ts, &sig), b"[1]", NOW), Err(SignatureError::Mismatch));
        assert_eq!(verify(&s, headers("msg_2", &ts, &sig), body, NOW), Err(SignatureError::Mismatch));
        assert_eq!(verify(&s, headers("msg_1", &ts, &sig), body, NOW + 301), Err(SignatureError::StaleTimestamp));
        assert_eq!(verify(&s, headers("msg_1", &ts, &sig), body, NOW - 301), Err(SignatureError::StaleTimestamp));
        assert_eq!(verify(&s, headers("msg_1", "soon", &sig), body, NOW), Err(SignatureError::BadTimestamp));
        assert_eq!(verify(&s, headers("", &ts, &sig), body, NOW), Err(SignatureError::BadId));
        assert_eq!(verify(&s, headers("msg 1", &ts, &sig), body, NOW), Err(SignatureError::BadId));
        assert_eq!(verify(&s, headers("msg_1", &ts, "v2,abc"), body, NOW), Err(SignatureError::Mismatch));
        let missing = SignedHeaders { signature: None, ..headers("msg_1", &ts, &sig) };
        assert_eq!(verify(&s, missing, body, NOW), Err(SignatureError::Missing("webhook-signature")));
    }

    #[test]
    fn refuses_more_signatures_than_a_sender_sends_before_hashing() {
        let body = b"[]";
        let sig = secret().sign("msg_1", NOW, body);
        let ts = NOW.to_string();
        let s = [secret()];
        let decoys = |n: usize| vec!["v1,AAAA"; n].join(" ");
        let eight = format!("{} {sig}", decoys(MAX_SIGNATURES - 1));
        assert_eq!(verify(&s, headers("msg_1", &ts, &eight), body, NOW), Ok(()));
        let nine = format!("{} {sig}", decoys(MAX_SIGNATURES));
        assert_eq!(verify(&s, headers("msg_1", &ts, &nine), body, NOW), Err(SignatureError::TooManySignatures));
        let long = format!("v1,{} {sig}", "A".repeat(MAX_SIGNATURE_HEADER_LEN));
        assert_eq!(verify(&s, headers("msg_1", &ts, &long), body, NOW), Err(SignatureError::TooManySignatures));
        // A candidate of the wrong length never matches (and is not a panic).
        assert_eq!(verify(&s, headers("msg_1", &ts, "v1,AAAA"), body, NOW), Err(SignatureError::Mismatch));
    }

    #[test]
    fn secrets_are_validated_and_never_printed() {
        assert!("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".parse::<WebhookSecret>().is_err());
        assert!("whsec_!!!".parse::<WebhookSecret>().is_err());
        assert!("whsec_c2hvcnQ=".parse::<WebhookSecret>().is_err());
        assert_eq!(format!("{:?}", secret()), "WebhookSecret(<redacted>)");
        assert_eq!(
            WebhookSecret::parse_list("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw  whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
                .map(|l| l.len()),
            Ok(2)
        );
    }
}
