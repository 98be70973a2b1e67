//! The HTTP endpoint of a long-running process: `/metrics`, `/health`, `/ready`.

use std::net::SocketAddr;

use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use serde::Deserialize;

use crate::error::{Error, Result};

/// `[metrics]` of the source and sink configs.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// `host:port` to serve on, or `off`; unset means the process's default address.
    #[serde(default)]
    pub listen: Option<String>,
}

/// Where to serve, once the file, the flag and the default are weighed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    /// No endpoint.
    Off,
    /// An address the operator chose: failing to bind it stops the process.
    Chosen(SocketAddr),
    /// The built-in default: a busy port is logged and the process runs without the endpoint,
    /// so several processes on one machine (tests, a demo) do not stop each other.
    Default(SocketAddr),
}

/// Default address of the source's endpoint.
pub const SOURCE_DEFAULT: &str = "127.0.0.1:9464";
/// Default address of a sink's endpoint.
pub const SINK_DEFAULT: &str = "127.0.0.1:9465";

impl Listen {
    /// The flag or environment value wins over the config file's; `default` applies when both
    /// are unset.
    pub fn resolve(flag: Option<&str>, file: Option<&str>, default: &str) -> Result<Self> {
        let Some(chosen) = flag.or(file).map(str::trim) else {
            return Ok(Listen::Default(
                default.parse().expect("valid default address"),
            ));
        };
        if chosen.is_empty() || chosen.eq_ignore_ascii_case("off") {
            return Ok(Listen::Off);
        }
        chosen.parse().map(Listen::Chosen).map_err(|_| {
            Error::user(format!(
                "metrics listen address {chosen:?} is not host:port; use e.g. \"127.0.0.1:9464\", \"0.0.0.0:9464\" or \"off\" \
                 ([metrics] listen, --metrics-listen or TRUSST_METRICS_LISTEN)"
            ))
        })
    }
}

/// Serve the endpoint in the background; `/ready` answers 200 once every one of `conditions`
/// holds (see [`super::ready`]). Returns the bound address (`None` when off or not bound).
pub async fn start(
    listen: &Listen,
    conditions: &'static [&'static str],
) -> Result<Option<SocketAddr>> {
    for c in conditions {
        super::ready(c, false);
    }
    let addr = match listen {
        Listen::Off => return Ok(None),
        Listen::Chosen(a) | Listen::Default(a) => *a,
    };
    let listener = match tokio::net::TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) if matches!(listen, Listen::Default(_)) => {
            tracing::warn!(
                addr = %addr, error = %e,
                "cannot serve /metrics on the default address; running without it (set [metrics] listen, --metrics-listen or TRUSST_METRICS_LISTEN)"
            );
            return Ok(None);
        }
        Err(e) => {
            return Err(Error::user(format!(
                "cannot serve /metrics on {addr}: {e}; choose a free address ([metrics] listen, --metrics-listen or TRUSST_METRICS_LISTEN) or \"off\""
            )));
        }
    };
    let bound = listener
        .local_addr()
        .map_err(|e| Error::internal("reading the metrics address").with_source(e))?;
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router(conditions)).await {
            tracing::error!(addr = %bound, error = %e, "the metrics endpoint stopped");
        }
    });
    tracing::info!(addr = %bound, "metrics endpoint on http://{bound} (/metrics, /health, /ready)");
    Ok(Some(bound))
}

/// The routes.
fn router(conditions: &'static [&'static str]) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/health", get(health))
        .route("/ready", get(move || ready(conditions)))
}

async fn metrics() -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        super::global().encode(),
    )
}

/// The process is alive and its runtime answers (the CRM emulator serves it too).
pub async fn health() -> &'static str {
    "ok\n"
}

async fn ready(conditions: &'static [&'static str]) -> (StatusCode, String) {
    let missing = super::not_ready(conditions);
    if missing.is_empty() {
        (StatusCode::OK, "ready\n".to_owned())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}\n", missing.join(", ")),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_resolution() {
        let d = "127.0.0.1:9464";
        assert_eq!(
            Listen::resolve(None, None, d).unwrap(),
            Listen::Default(d.parse().unwrap())
        );
        assert_eq!(
            Listen::resolve(None, Some("0.0.0.0:1"), d).unwrap(),
            Listen::Chosen("0.0.0.0:1".parse().unwrap())
        );
        assert_eq!(
            Listen::resolve(Some("127.0.0.1:0"), Some("0.0.0.0:1"), d).unwrap(),
            Listen::Chosen("127.0.0.1:0".parse().unwrap())
        );
        assert_eq!(
            Listen::resolve(Some("off"), Some("0.0.0.0:1"), d).unwrap(),
            Listen::Off
        );
        assert_eq!(Listen::resolve(None, Some("OFF"), d).unwrap(), Listen::Off);
        let e = Listen::resolve(None, Some("localhost"), d).unwrap_err();
        assert!(e.to_string().contains("not host:port"), "{e}");
    }
}
