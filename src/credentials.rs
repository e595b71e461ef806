//! Who may call what: the webhook secrets that sign events, the bearer tokens of the admin
//! endpoints and (optionally) of reads, and the checks of a request's headers against them.
//! Secrets come from the environment, a flag or a file; they are never logged and never echoed in
//! an error. The middleware that applies them to routes is [`crate::http::auth`].

use std::fmt;
use std::path::Path;

use axum::http::{header, HeaderMap};
use subtle::ConstantTimeEq;

use crate::config::{setting, ConfigError, ServeConfig, Setting};
use crate::error::AppError;
use crate::live::token::{self, TokenError};
use crate::webhook::{self, SignedHeaders, WebhookSecret};

/// Tokens shorter than this are refused at start-up.
const MIN_TOKEN_LEN: usize = 16;

/// A bearer token. Its `Debug` never shows it; comparison is constant-time.
#[derive(Clone)]
pub struct BearerToken(String);

impl fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("BearerToken(<redacted>)")
    }
}

impl BearerToken {
    /// A token from its text.
    pub fn new(token: impl Into<String>) -> Self {
        BearerToken(token.into())
    }

    fn matches(&self, presented: &str) -> bool {
        self.0.as_bytes().ct_eq(presented.as_bytes()).into()
    }
}

/// Who may call what.
#[derive(Debug, Clone, Default)]
pub struct Auth {
    /// Secrets a webhook signature may use; empty: events are accepted unsigned.
    pub webhook_secrets: Vec<WebhookSecret>,
    /// Token for flush, reconcile and status; `None`: those are open.
    pub admin_token: Option<BearerToken>,
    /// Token for reads; `None`: reads are open. The admin token is accepted for reads too.
    pub read_token: Option<BearerToken>,
}

impl Auth {
    /// No authentication at all (the CLI, and tests that are not about auth).
    pub fn open() -> Self {
        Auth::default()
    }

    /// Resolves the secrets of `serve`, reading files where given. Refuses to run without a
    /// webhook secret and an admin token unless `--insecure-no-auth` says so.
    pub fn from_config(serve: &ServeConfig) -> Result<Auth, ConfigError> {
        let webhook = secret_setting(
            serve.webhook_secret.as_deref(),
            serve.webhook_secret_file.as_deref(),
            (setting!(ServeConfig.webhook_secret), setting!(ServeConfig.webhook_secret_file)),
        )?;
        let webhook_secrets = match webhook {
            Some(text) => WebhookSecret::parse_list(&text)
                .map_err(|problem| ConfigError::new(setting!(ServeConfig.webhook_secret), problem))?,
            None => Vec::new(),
        };
        let admin_token = token_setting(
            serve.admin_token.as_deref(),
            serve.admin_token_file.as_deref(),
            (setting!(ServeConfig.admin_token), setting!(ServeConfig.admin_token_file)),
        )?;
        let read_token = token_setting(
            serve.read_token.as_deref(),
            serve.read_token_file.as_deref(),
            (setting!(ServeConfig.read_token), setting!(ServeConfig.read_token_file)),
        )?;
        if !serve.insecure_no_auth {
            if webhook_secrets.is_empty() {
                return Err(required(
                    setting!(ServeConfig.webhook_secret),
                    "a whsec_ secret",
                    setting!(ServeConfig.webhook_secret_file),
                ));
            }
            if admin_token.is_none() {
                return Err(required(
                    setting!(ServeConfig.admin_token),
                    "a token of at least 16 characters",
                    setting!(ServeConfig.admin_token_file),
                ));
            }
        }
        if let (Some(admin), Some(read)) = (&admin_token, &read_token) {
            if admin.matches(&read.0) {
                return Err(ConfigError::new(setting!(ServeConfig.read_token), "must differ from the admin token"));
            }
        }
        Ok(Auth { webhook_secrets, admin_token, read_token })
    }

    /// Whether anything is left open (worth a warning at start-up).
    pub fn is_open(&self) -> bool {
        self.webhook_secrets.is_empty() || self.admin_token.is_none()
    }

    /// Checks a request's webhook signature; returns its `webhook-id` (the idempotency key), if any.
    pub fn verify_webhook<'a>(&self, headers: &'a HeaderMap, body: &[u8]) -> Result<Option<&'a str>, AppError> {
        let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        let id = text("webhook-id");
        if self.webhook_secrets.is_empty() {
            // Unsigned mode: a webhook-id is still honoured as an idempotency key.
            if let Some(id) = id {
                webhook::check_id(id).map_err(|e| AppError::bad_parameter("webhook-id", e.to_string()))?;
            }
            return Ok(id);
        }
        let signed = SignedHeaders { id, timestamp: text("webhook-timestamp"), signature: text("webhook-signature") };
        webhook::verify(&self.webhook_secrets, signed, body, chrono::Utc::now().timestamp())
            .map_err(|e| AppError::Unauthorized(e.to_string()))?;
        Ok(id)
    }

    pub(crate) fn check_bearer(&self, headers: &HeaderMap, accepted: &[&Option<BearerToken>]) -> Result<(), AppError> {
        let mut tokens = accepted.iter().filter_map(|t| t.as_ref()).peekable();
        if tokens.peek().is_none() {
            return Ok(());
        }
        let presented = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| AppError::Unauthorized("send Authorization: Bearer <token>".into()))?;
        // Check every token, so timing does not tell which one was close.
        let matched = tokens.fold(false, |any, token| token.matches(presented) | any);
        if matched {
            Ok(())
        } else {
            Err(AppError::Unauthorized("the bearer token is not accepted here".into()))
        }
    }
}

impl Auth {
    /// Checks a live stream's credentials, at time `now` (Unix seconds), a stream token living at
    /// most `max_token_lifetime` from now: the read (or admin) token
    /// in `Authorization` when one is configured and sent (a server-side proxy), else a stream
    /// token for `user_id` (a browser; see [`crate::live::token`]). Open only when the sidecar has
    /// neither a webhook secret nor a read token, like reads.
    pub fn check_stream(
        &self,
        headers: &HeaderMap,
        token: Option<&str>,
        user_id: u64,
        now: i64,
        max_token_lifetime: std::time::Duration,
    ) -> Result<(), AppError> {
        let bearer_configured = self.read_token.is_some() || self.admin_token.is_some();
        if bearer_configured && headers.contains_key(header::AUTHORIZATION) {
            return self.check_bearer(headers, &[&self.read_token, &self.admin_token]);
        }
        if self.webhook_secrets.is_empty() && self.read_token.is_none() {
            return Ok(());
        }
        let unauthorized = |e: TokenError| AppError::Unauthorized(e.to_string());
        let token = token.ok_or(TokenError::Missing).map_err(unauthorized)?;
        if self.webhook_secrets.is_empty() {
            return Err(AppError::Unauthorized(
                "stream tokens need a webhook secret on the sidecar; send Authorization: Bearer <read token>".into(),
            ));
        }
        let max_lifetime_secs = i64::try_from(max_token_lifetime.as_secs()).unwrap_or(i64::MAX);
        token::verify(&self.webhook_secrets, user_id, token, now, max_lifetime_secs).map_err(unauthorized)
    }
}

/// A secret the service refuses to run without (unless `--insecure-no-auth`).
fn required(setting: Setting, what: &str, file_setting: Setting) -> ConfigError {
    let (file_flag, file_env) = file_setting.names();
    let (open_flag, _) = setting!(ServeConfig.insecure_no_auth).names();
    ConfigError::new(
        setting,
        format!("required: set {what} (or {file_flag} / {file_env}), or pass {open_flag} for local development"),
    )
}

/// A secret given as a value or as a file, not both.
fn secret_setting(
    value: Option<&str>,
    file: Option<&Path>,
    (setting, file_setting): (Setting, Setting),
) -> Result<Option<String>, ConfigError> {
    match (value, file) {
        (Some(_), Some(_)) => {
            let (flag, env) = file_setting.names();
            Err(ConfigError::new(setting, format!("give it or {flag} ({env}), not both")))
        }
        (Some(value), None) => Ok(Some(value.to_string())),
        (None, Some(path)) => std::fs::read_to_string(path)
            .map(|text| Some(text.trim().to_string()))
            .map_err(|e| ConfigError::new(setting, format!("cannot read {}: {e}", path.display()))),
        (None, None) => Ok(None),
    }
}

fn token_setting(
    value: Option<&str>,
    file: Option<&Path>,
    settings: (Setting, Setting),
) -> Result<Option<BearerToken>, ConfigError> {
    let setting = settings.0;
    let Some(token) = secret_setting(value, file, settings)? else {
        return Ok(None);
    };
    if token.len() < MIN_TOKEN_LEN || !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ConfigError::new(
            setting,
            format!("must be at least {MIN_TOKEN_LEN} printable characters without spaces"),
        ));
    }
    Ok(Some(BearerToken(token)))
}
