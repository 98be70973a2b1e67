//! `[salesforce]` of a sink config.

use std::time::Duration;

use serde::Deserialize;

use crate::sink::http::Secret;

/// How the connector obtains its access token (both are OAuth 2.0 server-to-server flows; the
/// username-password flow is being retired and is deliberately not offered).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Auth {
    /// `grant_type=client_credentials` with the connected app's id and secret.
    ClientCredentials,
    /// `grant_type=urn:ietf:params:oauth:grant-type:jwt-bearer` with an RS256 assertion.
    Jwt,
}

/// Salesforce connection and delivery settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where the token endpoint lives: `https://<MyDomain>.my.salesforce.com` (or the emulator).
    pub login_url: String,
    /// REST API version, e.g. `62.0` (46.0 or newer: sObject Collections upsert).
    #[serde(default = "default_version")]
    pub api_version: String,
    /// Token flow.
    #[serde(default = "default_auth")]
    pub auth: Auth,
    /// Connected app consumer key.
    pub client_id: String,
    /// Connected app consumer secret (client credentials).
    #[serde(default)]
    pub client_secret: Secret,
    /// Integration user (`sub` of the JWT).
    #[serde(default)]
    pub username: Option<String>,
    /// PEM private key signing the JWT assertion.
    #[serde(default)]
    pub private_key: Secret,
    /// `aud` of the JWT: `https://login.salesforce.com` (or test.salesforce.com); default login_url.
    #[serde(default)]
    pub audience: Option<String>,
    /// A batch larger than this goes through Bulk API 2.0 instead of sObject Collections.
    #[serde(default = "default_bulk_threshold")]
    pub bulk_threshold: usize,
    /// Stop writing when this share of the daily API allowance is used (from `Sforce-Limit-Info`).
    #[serde(default = "default_limit_share")]
    pub limit_share: f64,
    /// How long to pause when the allowance is (nearly) spent, before checking again.
    #[serde(
        default = "default_limit_pause",
        deserialize_with = "crate::config::duration::deserialize"
    )]
    pub limit_pause: Duration,
    /// How often to poll a Bulk API job's state at first; later polls back off up to 10 s,
    /// since every poll counts against the daily allowance.
    #[serde(
        default = "default_bulk_poll",
        deserialize_with = "crate::config::duration::deserialize"
    )]
    pub bulk_poll_interval: Duration,
    /// Longest wait for one Bulk API job to finish; past it the job is aborted and the batch
    /// retried later.
    #[serde(
        default = "default_bulk_timeout",
        deserialize_with = "crate::config::duration::deserialize"
    )]
    pub bulk_timeout: Duration,
    /// HTTP request timeout.
    #[serde(
        default = "default_timeout",
        deserialize_with = "crate::config::duration::deserialize"
    )]
    pub request_timeout: Duration,
}

fn default_version() -> String {
    "62.0".into()
}
fn default_auth() -> Auth {
    Auth::ClientCredentials
}
fn default_bulk_threshold() -> usize {
    2000
}
fn default_limit_share() -> f64 {
    0.9
}
fn default_limit_pause() -> Duration {
    Duration::from_secs(300)
}
fn default_bulk_poll() -> Duration {
    Duration::from_millis(500)
}
fn default_bulk_timeout() -> Duration {
    Duration::from_secs(1800)
}
fn default_timeout() -> Duration {
    Duration::from_secs(30)
}

impl Config {
    /// `SALESFORCE_LOGIN_URL` overrides `login_url`.
    pub fn endpoints_from_env(&mut self, env: impl Fn(&str) -> Option<String>) {
        if let Some(v) = env("SALESFORCE_LOGIN_URL") {
            self.login_url = v;
        }
    }
}
