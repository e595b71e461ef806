//! Stream tokens: how a browser proves which user's count it may watch.
//!
//! `EventSource` cannot set headers, so the stream takes a short-lived token in its query string
//! (`?token=...`), minted by the Django side for the logged-in user with the webhook secret both
//! sides already share. A token names one user and an expiry:
//!
//! ```text
//! token = "{expires}.{base64url(HMAC-SHA256(k, "{user_id}.{expires}"))}"   (no padding)
//! k     = HMAC-SHA256(webhook secret bytes, "countersink live stream token v1")
//! ```
//!
//! The derived key `k` keeps stream tokens and webhook signatures apart: neither can be replayed
//! as the other. A token is checked when a stream opens (a stream outlives its token; a reconnect
//! needs a valid one). Every secret of a rotation is accepted, as for webhooks.

use base64::engine::general_purpose::URL_SAFE_NO_PAD as BASE64URL;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::webhook::WebhookSecret;

/// The label the stream-token key is derived with (the Django package's `live.KEY_LABEL`, compared
/// by `tests/first_run.rs`).
pub const KEY_LABEL: &str = "countersink live stream token v1";
/// The longest lifetime a token may claim by default (`--max-stream-token-secs`): the Django
/// package's default STREAM_TOKEN_TTL, so a token leaked from a URL is useless within the hour.
pub const DEFAULT_MAX_LIFETIME_SECS: i64 = 60 * 60;
/// Clock skew allowed between Django and the sidecar when checking a token's lifetime.
const SKEW_SECS: i64 = 5 * 60;

/// Why a stream token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// No token, and no other credential.
    #[error("send ?token= (a stream token minted by the Django side) or Authorization: Bearer <read token>")]
    Missing,
    /// Not `{expires}.{signature}`.
    #[error("the stream token is malformed")]
    Malformed,
    /// Its expiry has passed.
    #[error("the stream token has expired; mint a new one")]
    Expired,
    /// Its expiry is further ahead than tokens may live.
    #[error("the stream token claims to live longer than {max_lifetime_secs} s (--max-stream-token-secs); mint shorter-lived tokens (Django: COUNTERSINK['STREAM_TOKEN_TTL'])")]
    TooLong {
        /// The longest lifetime accepted.
        max_lifetime_secs: i64,
    },
    /// Signed with no accepted secret, or for another user.
    #[error("the stream token does not match this user")]
    Mismatch,
}

/// Mints a token for `user_id`, valid until `expires` (Unix seconds). Django does the same in Python.
pub fn mint(secret: &WebhookSecret, user_id: u64, expires: i64) -> String {
    format!("{expires}.{}", BASE64URL.encode(mac(secret, user_id, expires).finalize().into_bytes()))
}

/// Checks `token` for `user_id` at time `now` (Unix seconds), refusing one that claims to live
/// longer than `max_lifetime_secs` from now; comparison is constant-time.
pub fn verify(
    secrets: &[WebhookSecret],
    user_id: u64,
    token: &str,
    now: i64,
    max_lifetime_secs: i64,
) -> Result<(), TokenError> {
    let (expires, signature) = token.split_once('.').ok_or(TokenError::Malformed)?;
    let expires: i64 = expires.parse().map_err(|_| TokenError::Malformed)?;
    let signature = BASE64URL.decode(signature).map_err(|_| TokenError::Malformed)?;
    if expires < now {
        return Err(TokenError::Expired);
    }
    if expires > now.saturating_add(max_lifetime_secs.saturating_add(SKEW_SECS)) {
        return Err(TokenError::TooLong { max_lifetime_secs });
    }
    for secret in secrets {
        if mac(secret, user_id, expires).verify_slice(&signature).is_ok() {
            return Ok(());
        }
    }
    Err(TokenError::Mismatch)
}

fn mac(secret: &WebhookSecret, user_id: u64, expires: i64) -> Hmac<Sha256> {
    let key = secret.derive_key(KEY_LABEL);
    // HMAC accepts keys of any length; new_from_slice cannot fail for it.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&key).unwrap_or_else(|_| unreachable!());
    mac.update(format!("{user_id}.{expires}").as_bytes());
    mac
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_700_000_000;
    const MAX: i64 = DEFAULT_MAX_LIFETIME_SECS;

    fn secret() -> WebhookSecret {
        "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".parse().expect("a valid secret")
    }

    #[test]
    fn a_token_opens_only_its_own_user_until_it_expires() {
        let token = mint(&secret(), 42, NOW + 60);
        assert_eq!(verify(&[secret()], 42, &token, NOW, MAX), Ok(()));
        assert_eq!(verify(&[secret()], 42, &token, NOW + 60, MAX), Ok(()));
        assert_eq!(verify(&[secret()], 43, &token, NOW, MAX), Err(TokenError::Mismatch));
        assert_eq!(verify(&[secret()], 42, &token, NOW + 61, MAX), Err(TokenError::Expired));
        let other = WebhookSecret::from_key(b"another secret of enough length");
        assert_eq!(verify(std::slice::from_ref(&other), 42, &token, NOW, MAX), Err(TokenError::Mismatch));
        // Rotation: any accepted secret will do.
        assert_eq!(verify(&[other, secret()], 42, &token, NOW, MAX), Ok(()));
    }

    #[test]
    fn malformed_tampered_and_overlong_tokens_are_refused() {
        let s = [secret()];
        let token = mint(&secret(), 42, NOW + 60);
        let (_, signature) = token.split_once('.').expect("two parts");
        assert_eq!(verify(&s, 42, &format!("{}.{signature}", NOW + 3600), NOW, MAX), Err(TokenError::Mismatch));
        assert_eq!(verify(&s, 42, "", NOW, MAX), Err(TokenError::Malformed));
        assert_eq!(verify(&s, 42, "soon.abc", NOW, MAX), Err(TokenError::Malformed));
        assert_eq!(verify(&s, 42, &format!("{}.!!", NOW + 60), NOW, MAX), Err(TokenError::Malformed));
        let far = NOW + MAX + SKEW_SECS + 1;
        let too_long = Err(TokenError::TooLong { max_lifetime_secs: MAX });
        assert_eq!(verify(&s, 42, &mint(&secret(), 42, far), NOW, MAX), too_long);
        // A lower cap refuses what the default accepts.
        let hour = mint(&secret(), 42, NOW + 3_600);
        assert_eq!(verify(&s, 42, &hour, NOW, MAX), Ok(()));
        assert_eq!(verify(&s, 42, &hour, NOW, 600), Err(TokenError::TooLong { max_lifetime_secs: 600 }));
    }
}
