//! HTTP helpers shared by the CRM clients: the client, secrets, and mapping of responses to
//! errors with the right fault and retry hint.

use std::time::Duration;

use serde::Deserialize;

use crate::error::{Error, Result};

/// A secret given literally, by environment variable, or by file; never logged.
#[derive(Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Secret {
    /// The value itself (avoid in files under version control).
    #[serde(default)]
    pub value: Option<String>,
    /// Name of an environment variable holding it.
    #[serde(default)]
    pub env: Option<String>,
    /// Path of a file holding it (trailing newline ignored).
    #[serde(default)]
    pub file: Option<String>,
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(**)")
    }
}

impl Secret {
    /// Resolve the secret; `what` names it in errors (e.g. `[salesforce] client_secret`).
    pub fn resolve(&self, what: &str) -> Result<String> {
        if let Some(v) = &self.value {
            return Ok(v.clone());
        }
        if let Some(name) = &self.env {
            return std::env::var(name).map_err(|_| {
                Error::user(format!(
                    "{what}: environment variable {name} is not set; export it or change {what}"
                ))
            });
        }
        if let Some(path) = &self.file {
            return std::fs::read_to_string(path)
                .map(|s| s.trim_end_matches(['\n', '\r']).to_owned())
                .map_err(|e| Error::user(format!("{what}: cannot read {path}: {e}")));
        }
        Err(Error::user(format!(
            "{what} is missing: give value, env or file"
        )))
    }

    /// True when one of the sources is set.
    pub fn is_set(&self) -> bool {
        self.value.is_some() || self.env.is_some() || self.file.is_some()
    }
}

/// The shared HTTP client (rustls, timeouts).
pub fn client(timeout: Duration) -> Result<reqwest::Client> {
    reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(Duration::from_secs(10))
        .user_agent(concat!("trusst-cdc/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| Error::internal("building the HTTP client").with_source(e))
}

/// Send a request to the CRM `target` (`salesforce`, `dynamics`, `mulesoft`), counting it by
/// status in the metrics and reading any rate-limit allowance from the answer's headers.
pub async fn send(
    target: &'static str,
    what: &str,
    request: reqwest::RequestBuilder,
) -> Result<reqwest::Response> {
    let started = std::time::Instant::now();
    match request.send().await {
        Ok(resp) => {
            crate::metrics::crm_request(target, Some(resp.status().as_u16()), started.elapsed());
            if let Some((remaining, limit)) = crate::metrics::allowance_from_headers(resp.headers())
            {
                crate::metrics::crm_allowance(target, remaining, limit);
            }
            Ok(resp)
        }
        Err(e) => {
            crate::metrics::crm_request(target, None, started.elapsed());
            Err(transport(what, e))
        }
    }
}

/// A transport failure (connect, timeout, dropped connection): retryable.
pub fn transport(what: &str, e: reqwest::Error) -> Error {
    Error::external(format!("{what}: request failed")).with_source(e)
}

/// Retry-After as seconds (the only form the CRMs use), capped at an hour.
pub fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    headers
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse::<f64>()
        .ok()
        .filter(|s| s.is_finite() && *s >= 0.0)
        .map(|s| Duration::from_secs_f64(s.min(3600.0)))
}

/// The error for a non-success status, with the verdict HTTP gives it
/// ([`super::verdict::of_status`]; 429 with its Retry-After).
pub fn status_error(
    what: &str,
    status: reqwest::StatusCode,
    headers: &reqwest::header::HeaderMap,
    body: &str,
) -> Error {
    let body: String = body.chars().take(500).collect();
    super::verdict::of_status(status.as_u16(), retry_after(headers))
        .error(format!("{what}: HTTP {status}: {body}"))
}
