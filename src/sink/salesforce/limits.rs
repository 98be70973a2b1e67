//! The org's daily API allowance, read from `Sforce-Limit-Info` on every response.
//!
//! Salesforce answers a spent allowance with 403 `REQUEST_LIMIT_EXCEEDED` for every integration
//! of the org, so the sink stops short of it (at `limit_share`) rather than burning the rest.

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::error::Error;

/// The response header carrying the usage, e.g. `api-usage=18/5000`.
pub const HEADER: &str = "sforce-limit-info";

/// `(used, max)` from a `Sforce-Limit-Info` value; other entries (`per-app-api-usage=...`) are ignored.
pub fn parse(value: &str) -> Option<(u64, u64)> {
    value.split([';', ',']).map(str::trim).find_map(|part| {
        let rest = part.strip_prefix("api-usage=")?;
        let (used, max) = rest.split_once('/')?;
        let used = used.trim().parse().ok()?;
        // A trailing annotation such as `5000(appName=x)` only occurs on per-app entries, but
        // tolerate it: the digits are what count.
        let max: String = max
            .trim()
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        Some((used, max.parse().ok()?))
    })
}

/// `(used, max)` from the body of `GET /services/data/vXX.X/limits/` (`DailyApiRequests`).
pub fn parse_limits_body(body: &Value) -> Option<(u64, u64)> {
    let d = body.get("DailyApiRequests")?;
    let max = d.get("Max")?.as_u64()?;
    let remaining = d.get("Remaining")?.as_u64()?;
    Some((max.saturating_sub(remaining), max))
}

/// True when `used/max` has reached `share` (a zero maximum means the org has no allowance).
pub fn share_reached(used: u64, max: u64, share: f64) -> bool {
    max == 0 || used as f64 / max as f64 >= share
}

/// The last reading of the allowance and when it was taken.
#[derive(Debug, Clone, Copy, Default)]
pub struct Usage {
    reading: Option<(u64, u64)>,
    at: Option<Instant>,
}

impl Usage {
    /// Remember a reading.
    pub fn record(&mut self, used: u64, max: u64) {
        crate::metrics::crm_allowance("salesforce", max.saturating_sub(used), Some(max));
        self.reading = Some((used, max));
        self.at = Some(Instant::now());
    }

    /// Remember the reading of a response's headers, when it has one.
    pub fn observe(&mut self, headers: &reqwest::header::HeaderMap) {
        if let Some((used, max)) = headers
            .get(HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(parse)
        {
            self.record(used, max);
        }
    }

    /// The last `(used, max)`.
    pub fn get(&self) -> Option<(u64, u64)> {
        self.reading
    }

    /// How old the last reading is (`None` before the first).
    pub fn age(&self) -> Option<Duration> {
        self.at.map(|t| t.elapsed())
    }

    /// The reading when it has reached `share`.
    pub fn reached(&self, share: f64) -> Option<(u64, u64)> {
        self.reading
            .filter(|&(used, max)| share_reached(used, max, share))
    }
}

/// The error that pauses writes: retryable after `pause`, so the runner waits and loses nothing.
pub fn pause_error(used: u64, max: u64, share: f64, pause: Duration) -> Error {
    let pct = if max == 0 {
        100.0
    } else {
        used as f64 * 100.0 / max as f64
    };
    Error::external(format!(
        "Salesforce daily API allowance is {pct:.1}% used ({used}/{max}) ≥ limit_share {:.0}%; pausing writes for {}",
        share * 100.0,
        humantime::format_duration(pause)
    ))
    .after(pause)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_header() {
        assert_eq!(parse("api-usage=18/5000"), Some((18, 5000)));
        assert_eq!(parse(" api-usage=4990/5000 "), Some((4990, 5000)));
        assert_eq!(
            parse("api-usage=25/15000; per-app-api-usage=17/250(appName=sample-app)"),
            Some((25, 15000))
        );
        assert_eq!(
            parse("per-app-api-usage=17/250(appName=x), api-usage=1/2"),
            Some((1, 2))
        );
        assert_eq!(parse("per-app-api-usage=17/250(appName=x)"), None);
        assert_eq!(parse("api-usage=abc/5000"), None);
        assert_eq!(parse("api-usage=18"), None);
        assert_eq!(parse(""), None);
    }

    #[test]
    fn parses_the_limits_resource() {
        let v = serde_json::json!({"DailyApiRequests": {"Max": 5000, "Remaining": 4800}, "DailyBulkApiBatches": {}});
        assert_eq!(parse_limits_body(&v), Some((200, 5000)));
        assert_eq!(parse_limits_body(&serde_json::json!({})), None);
    }

    #[test]
    fn share_threshold() {
        assert!(!share_reached(4499, 5000, 0.9));
        assert!(share_reached(4500, 5000, 0.9));
        assert!(share_reached(0, 0, 0.9));
        let mut u = Usage::default();
        assert_eq!(u.reached(0.9), None);
        let mut h = reqwest::header::HeaderMap::new();
        h.insert(HEADER, "api-usage=4600/5000".parse().unwrap());
        u.observe(&h);
        assert_eq!(u.get(), Some((4600, 5000)));
        assert_eq!(u.reached(0.9), Some((4600, 5000)));
        assert_eq!(u.reached(0.95), None);
        assert!(u.age().is_some());
    }

    #[test]
    fn pause_error_is_retryable_after_the_pause() {
        let e = pause_error(4600, 5000, 0.9, Duration::from_secs(300));
        assert!(e.retryable);
        assert_eq!(e.retry_after, Some(Duration::from_secs(300)));
        assert!(e.message().contains("92.0% used (4600/5000)"), "{e}");
        assert!(e.message().contains("pausing writes for 5m"), "{e}");
    }
}
