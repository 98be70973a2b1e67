//! OAuth 2.0 client-credentials tokens (RFC 6749 §4.4), as Microsoft Entra ID issues them for
//! Dataverse and as the identity provider behind a MuleSoft OAuth policy does.
//!
//! The token is cached and fetched again shortly before `expires_in` runs out, or when the API
//! answered 401 (the caller calls [`ClientCredentials::invalidate`]). Tokens are never logged.

use std::time::{Duration, Instant};

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::sink::http;

/// Fetch a new token when less than this is left, so a request never leaves with a token that
/// expires in flight.
const REFRESH_MARGIN: Duration = Duration::from_secs(120);

/// A client-credentials grant against one token endpoint, with its cached token.
pub struct ClientCredentials {
    token_url: String,
    client_id: String,
    client_secret: String,
    scope: Option<String>,
    /// Names the config section in errors, e.g. `[dynamics]`.
    section: &'static str,
    token: Option<Token>,
}

struct Token {
    value: String,
    /// `None` when the server gave no `expires_in`: used until the API answers 401.
    expires: Option<Instant>,
}

impl std::fmt::Debug for ClientCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientCredentials")
            .field("token_url", &self.token_url)
            .field("client_id", &self.client_id)
            .field("scope", &self.scope)
            .finish_non_exhaustive()
    }
}

/// The token endpoint's answer. `expires_in` is a number in RFC 6749 but some servers (older
/// Entra ID endpoints among them) send it as a string.
#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    #[serde(default)]
    expires_in: Option<serde_json::Value>,
}

/// The token endpoint's error body (`{error, error_description}`).
#[derive(Deserialize)]
struct TokenError {
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    error_description: Option<String>,
}

impl ClientCredentials {
    /// A grant for `client_id` at `token_url`; `section` names the config section in errors.
    pub fn new(
        section: &'static str,
        token_url: String,
        client_id: String,
        client_secret: String,
        scope: Option<String>,
    ) -> Self {
        Self {
            token_url,
            client_id,
            client_secret,
            scope,
            section,
            token: None,
        }
    }

    /// The CRM this grant belongs to, for the metrics: the section name without brackets.
    fn target(&self) -> &'static str {
        self.section.trim_start_matches('[').trim_end_matches(']')
    }

    /// A valid access token: the cached one, or a new one when it is missing or about to expire.
    pub async fn token(&mut self, client: &reqwest::Client) -> Result<String> {
        if let Some(t) = &self.token {
            if t.expires
                .is_none_or(|e| Instant::now() + REFRESH_MARGIN < e)
            {
                return Ok(t.value.clone());
            }
            tracing::debug!(token_url = %self.token_url, "access token about to expire; fetching a new one");
        }
        let t = self.fetch(client).await?;
        let value = t.value.clone();
        self.token = Some(t);
        Ok(value)
    }

    /// Forget the cached token (the API answered 401), so the next [`Self::token`] fetches one.
    pub fn invalidate(&mut self) {
        self.token = None;
    }

    async fn fetch(&self, client: &reqwest::Client) -> Result<Token> {
        let mut form: Vec<(&str, &str)> = vec![
            ("grant_type", "client_credentials"),
            ("client_id", &self.client_id),
            ("client_secret", &self.client_secret),
        ];
        if let Some(s) = &self.scope {
            form.push(("scope", s));
        }
        let started = Instant::now();
        let request = client
            .post(&self.token_url)
            .header(reqwest::header::ACCEPT, "application/json")
            .form(&form);
        let resp = http::send(
            self.target(),
            &format!("token request to {}", self.token_url),
            request,
        )
        .await?;
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = resp
            .text()
            .await
            .map_err(|e| http::transport(&format!("token response from {}", self.token_url), e))?;
        if !status.is_success() {
            return Err(self.token_error(status, &headers, &body));
        }
        let parsed: TokenResponse = serde_json::from_str(&body).map_err(|e| {
            Error::external(format!(
                "token response from {} is not the expected JSON (access_token missing?)",
                self.token_url
            ))
            .with_source(e)
            .retry(false)
        })?;
        let lifetime = parsed
            .expires_in
            .as_ref()
            .and_then(expires_in_secs)
            .map(Duration::from_secs);
        tracing::info!(token_url = %self.token_url, expires_in = ?lifetime, "obtained an access token");
        // Measured from the request's start, so a slow answer cannot make us overestimate.
        Ok(Token {
            value: parsed.access_token,
            expires: lifetime.map(|l| started + l),
        })
    }

    /// 400/401 from the token endpoint is a credentials or config problem; 429/5xx are retried.
    fn token_error(
        &self,
        status: reqwest::StatusCode,
        headers: &reqwest::header::HeaderMap,
        body: &str,
    ) -> Error {
        let what = format!("token request to {}", self.token_url);
        if matches!(status.as_u16(), 400 | 401 | 403 | 404) {
            let detail = match serde_json::from_str::<TokenError>(body) {
                Ok(TokenError {
                    error: Some(e),
                    error_description: d,
                }) => {
                    let d: String = d.unwrap_or_default().chars().take(300).collect();
                    format!("{e}: {d}")
                }
                _ => body.chars().take(300).collect(),
            };
            return Error::user(format!(
                "{what} refused (HTTP {status}): {detail}; check {s} client_id, client_secret and token_url{extra}",
                s = self.section,
                extra = if self.section == "[dynamics]" {
                    ", tenant and scope"
                } else {
                    ""
                },
            ));
        }
        http::status_error(&what, status, headers, body)
    }
}

/// `expires_in` as whole seconds, from a number or a numeric string.
fn expires_in_secs(v: &serde_json::Value) -> Option<u64> {
    match v {
        serde_json::Value::Number(n) => n
            .as_u64()
            .or_else(|| n.as_f64().filter(|f| *f >= 0.0).map(|f| f as u64)),
        serde_json::Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expires_in_as_number_or_string() {
        assert_eq!(expires_in_secs(&serde_json::json!(3599)), Some(3599));
        assert_eq!(expires_in_secs(&serde_json::json!("3599")), Some(3599));
        assert_eq!(expires_in_secs(&serde_json::json!(null)), None);
    }

    #[test]
    fn bad_credentials_are_user_errors_naming_the_section() {
        let cc = ClientCredentials::new(
            "[dynamics]",
            "https://login.example/token".into(),
            "id".into(),
            "s3cret".into(),
            None,
        );
        let body = r#"{"error":"invalid_client","error_description":"AADSTS7000215: Invalid client secret provided."}"#;
        let e = cc.token_error(reqwest::StatusCode::UNAUTHORIZED, &Default::default(), body);
        assert_eq!(e.fault, crate::error::Fault::User);
        assert!(
            e.message().contains("invalid_client: AADSTS7000215")
                && e.message().contains("[dynamics] client_id"),
            "{e}"
        );
        assert!(!e.to_string().contains("s3cret"));
        let e = cc.token_error(
            reqwest::StatusCode::SERVICE_UNAVAILABLE,
            &Default::default(),
            "",
        );
        assert!(e.retryable);
    }

    #[test]
    fn debug_hides_the_secret() {
        let cc =
            ClientCredentials::new("[mulesoft]", "u".into(), "id".into(), "s3cret".into(), None);
        assert!(!format!("{cc:?}").contains("s3cret"));
    }
}
