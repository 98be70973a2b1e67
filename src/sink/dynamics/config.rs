//! `[dynamics]` of a sink config.

use std::time::Duration;

use serde::Deserialize;

use crate::sink::http::Secret;

/// Dataverse Web API connection and delivery settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Environment URL, e.g. `https://yourorg.crm.dynamics.com` (the Web API is under
    /// `/api/data/v9.2`).
    pub url: String,
    /// Microsoft Entra ID tenant (id or domain).
    pub tenant: String,
    /// Token endpoint; default `https://login.microsoftonline.com/{tenant}/oauth2/v2.0/token`.
    #[serde(default)]
    pub token_url: Option<String>,
    /// App registration (client) id.
    pub client_id: String,
    /// Client secret.
    pub client_secret: Secret,
    /// OAuth scope; default `{url}/.default`.
    #[serde(default)]
    pub scope: Option<String>,
    /// Records per request: per `UpsertMultiple`, or per `$batch` (which allows at most 1000).
    #[serde(default = "default_batch")]
    pub batch_size: usize,
    /// Upsert with the bulk message `UpsertMultiple` while the table supports it (the fastest
    /// way Microsoft offers); `false` sends every chunk as a `$batch` of single upserts.
    #[serde(default = "yes")]
    pub upsert_multiple: bool,
    /// HTTP request timeout.
    #[serde(
        default = "default_timeout",
        deserialize_with = "crate::config::duration::deserialize"
    )]
    pub request_timeout: Duration,
}

fn yes() -> bool {
    true
}
fn default_batch() -> usize {
    1000
}
fn default_timeout() -> Duration {
    Duration::from_secs(60)
}

impl Config {
    /// `DYNAMICS_URL` and `DYNAMICS_TOKEN_URL` override `url` and `token_url`.
    pub fn endpoints_from_env(&mut self, env: impl Fn(&str) -> Option<String>) {
        if let Some(v) = env("DYNAMICS_URL") {
            self.url = v;
        }
        if let Some(v) = env("DYNAMICS_TOKEN_URL") {
            self.token_url = Some(v);
        }
    }
}
