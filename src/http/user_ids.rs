//! The `user_ids` query parameter of `GET /v1/unread-counts`, parsed as every HTTP client sends it.
//!
//! - Values are percent-decoded (`application/x-www-form-urlencoded`, what Python's `urlencode`
//!   and browsers send): `user_ids=42%2C43` is `42,43`.
//! - Each value is a comma-separated list, and the key may repeat: `user_ids=42&user_ids=43`
//!   (`urlencode(..., doseq=True)`, `requests`' list params) reads users 42 and 43, in that order.
//! - Any other parameter is refused with a 400 naming it, never silently ignored: a misspelt
//!   `user_id=42` must not read as "no users given" or be dropped.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;

use crate::app::AppState;
use crate::error::AppError;
use crate::http::counts::parse_user_id;

/// The one parameter of a bulk read.
const PARAMETER: &str = "user_ids";

/// The users a bulk read asks for, in request order, 1 to `--max-read-users` of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserIds(pub Vec<u64>);

impl FromRequestParts<AppState> for UserIds {
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        parse_user_ids(parts.uri.query(), state.limits.max_read_users).map(UserIds)
    }
}

/// Parses a raw query string (without the `?`) into at most `max` user ids.
pub fn parse_user_ids(query: Option<&str>, max: usize) -> Result<Vec<u64>, AppError> {
    let mut ids = Vec::new();
    let mut seen_parameter = false;
    for (key, value) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        if key != PARAMETER {
            return Err(AppError::bad_parameter(
                &key,
                format!("unknown parameter {key:?}: the only parameter is user_ids, as ?user_ids=1,2,3"),
            ));
        }
        seen_parameter = true;
        for item in value.split(',').filter(|item| !item.is_empty()) {
            ids.push(parse_user_id(item, PARAMETER)?);
            if ids.len() > max {
                break;
            }
        }
    }
    if !seen_parameter {
        return Err(AppError::bad_parameter(PARAMETER, "give user ids as ?user_ids=1,2,3"));
    }
    if ids.is_empty() || ids.len() > max {
        return Err(AppError::bad_parameter(PARAMETER, format!("give 1 to {max} user ids")));
    }
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(query: &str) -> Result<Vec<u64>, String> {
        parse_user_ids(Some(query), 5).map_err(|e| e.to_string())
    }

    #[test]
    fn percent_encoded_commas_are_decoded() {
        assert_eq!(ids("user_ids=42%2C43"), Ok(vec![42, 43]));
        assert_eq!(ids("user_ids=42%2c43"), Ok(vec![42, 43]));
        assert_eq!(ids("user%5Fids=7"), Ok(vec![7]));
    }

    #[test]
    fn repeated_keys_are_all_read_in_order() {
        assert_eq!(ids("user_ids=42&user_ids=43"), Ok(vec![42, 43]));
        assert_eq!(ids("user_ids=3,1&user_ids=2"), Ok(vec![3, 1, 2]));
    }

    #[test]
    fn the_limit_counts_every_repeated_key() {
        assert!(ids("user_ids=1,2,3&user_ids=4,5&user_ids=6").is_err());
        assert_eq!(ids("user_ids=1,2,3&user_ids=4,5"), Ok(vec![1, 2, 3, 4, 5]));
    }

    #[test]
    fn unknown_parameters_are_refused_not_ignored() {
        let error = ids("user_ids=1&user_id=2").unwrap_err();
        assert!(error.contains("user_id"), "{error}");
        assert!(ids("user_id=2").is_err());
    }

    #[test]
    fn missing_empty_and_malformed_lists_are_refused() {
        assert!(parse_user_ids(None, 5).is_err());
        assert!(ids("").is_err());
        assert!(ids("user_ids=").is_err());
        assert!(ids("user_ids=1,x").is_err());
        assert!(ids("user_ids=1+2").is_err());
        assert!(ids("user_ids=-1").is_err());
    }
}
