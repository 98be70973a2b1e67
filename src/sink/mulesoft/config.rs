//! `[mulesoft]` of a sink config.

use std::time::Duration;

use serde::Deserialize;

use crate::sink::http::Secret;

/// How the API Manager policy in front of the customer's API authenticates callers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Auth {
    /// Client ID Enforcement: `client_id` / `client_secret` headers.
    ClientId,
    /// OAuth 2.0 token enforcement: a Bearer token from `token_url` (client credentials).
    Oauth,
}

/// MuleSoft API connection and delivery settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The sync endpoint, e.g. `https://your-org.us-e1.cloudhub.io/api/trusst-crm-sync`.
    pub url: String,
    /// Authentication style.
    #[serde(default = "default_auth")]
    pub auth: Auth,
    /// Client id.
    pub client_id: String,
    /// Client secret.
    pub client_secret: Secret,
    /// Token endpoint (OAuth only).
    #[serde(default)]
    pub token_url: Option<String>,
    /// Contacts per request.
    #[serde(default = "default_batch")]
    pub batch_size: usize,
    /// HTTP request timeout.
    #[serde(
        default = "default_timeout",
        deserialize_with = "crate::config::duration::deserialize"
    )]
    pub request_timeout: Duration,
    /// Take a 2xx with an empty body as "every contact written". Off by default: the guide's
    /// API answers `{"records_processed",...}`, and an empty 2xx can come from a proxy.
    #[serde(default)]
    pub accept_empty_2xx: bool,
}

fn default_auth() -> Auth {
    Auth::ClientId
}
fn default_batch() -> usize {
    200
}
fn default_timeout() -> Duration {
    Duration::from_secs(30)
}

impl Config {
    /// `MULESOFT_URL` overrides `url`.
    pub fn endpoints_from_env(&mut self, env: impl Fn(&str) -> Option<String>) {
        if let Some(v) = env("MULESOFT_URL") {
            self.url = v;
        }
    }
}
