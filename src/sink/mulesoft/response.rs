//! The MuleSoft API's request payload and answers (pure, no I/O): which contacts an answer says
//! failed, and how long a rate-limit answer asks us to wait.
//!
//! The answer is `{"records_processed","records_failed","errors":[...]}`, and the shape of an
//! error entry is up to the customer's flow. An entry is tied to a contact when it is an object
//! whose `trusst_contact_id`, `contact_id` or `id` is the contact's id, or when its text (a
//! string entry, or an object's message) names the id as a whole word.
//!
//! The rule for a 2xx answer, which never marks a failed record written:
//! - a contact an error entry is tied to is rejected with that entry's message;
//! - when every failure the counts report is tied to a contact, the others are written;
//! - when the counts report more failures than could be tied (or fewer records processed and
//!   failed than sent), nobody can tell which of the others failed: they are all rejected, with
//!   a message saying so and quoting the untied errors, so the dead-letter topic holds every
//!   record that may be missing and none is lost silently.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{Map, Value};

use crate::sink::Outcome;

/// The `source` the guide's payload carries.
pub const SOURCE: &str = "trusst-platform";

/// The guide's payload: `{"source","sync_timestamp","contacts":[...]}`; the timestamp is
/// RFC 3339 in UTC with `Z`, to the second, as in the guide's example.
pub fn payload<'a>(
    contacts: impl IntoIterator<Item = &'a Map<String, Value>>,
    now: chrono::DateTime<chrono::Utc>,
) -> Value {
    serde_json::json!({
        "source": SOURCE,
        "sync_timestamp": now.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        "contacts": contacts.into_iter().map(|c| Value::Object(c.clone())).collect::<Vec<_>>(),
    })
}

/// The API's answer, as far as it follows the guide.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Answer {
    /// `records_processed`: contacts written.
    pub processed: Option<u64>,
    /// `records_failed`: contacts not written.
    pub failed: Option<u64>,
    /// `errors`: entries of any shape.
    pub errors: Vec<Value>,
}

/// Read a 2xx body as the documented answer: a JSON object with `records_processed` (or at
/// least `records_failed` or `errors`). `None` for anything else, such as an HTML page from a
/// proxy or a login wall, which must never count as "written".
pub fn documented_answer(body: &str) -> Option<Answer> {
    let Ok(Value::Object(o)) = serde_json::from_str::<Value>(body) else {
        return None;
    };
    ["records_processed", "records_failed", "errors"]
        .iter()
        .any(|k| o.contains_key(*k))
        .then(|| parse_answer(body))
}

/// Read an answer body; anything that is not a JSON object reads as an empty answer.
pub fn parse_answer(body: &str) -> Answer {
    let Ok(Value::Object(o)) = serde_json::from_str::<Value>(body) else {
        return Answer::default();
    };
    let count = |k: &str| {
        o.get(k).and_then(|v| {
            v.as_u64()
                .or_else(|| v.as_str().and_then(|s| s.trim().parse().ok()))
        })
    };
    let errors = match o.get("errors") {
        Some(Value::Array(a)) => a.clone(),
        Some(Value::Null) | None => Vec::new(),
        Some(other) => vec![other.clone()],
    };
    Answer {
        processed: count("records_processed"),
        failed: count("records_failed"),
        errors,
    }
}

/// True when `text` contains `id` as a whole word: not inside a longer id such as `c-10` for
/// `c-1`.
fn mentions(text: &str, id: &str) -> bool {
    if id.is_empty() {
        return false;
    }
    let word = |c: char| c.is_alphanumeric() || c == '-' || c == '_';
    text.match_indices(id).any(|(at, _)| {
        let before = text[..at].chars().next_back();
        let after = text[at + id.len()..].chars().next();
        !before.is_some_and(word) && !after.is_some_and(word)
    })
}

fn scalar(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// The readable message of an error entry.
fn message(e: &Value) -> String {
    let text = match e {
        Value::String(s) => s.clone(),
        Value::Object(o) => ["message", "error", "detail", "description", "reason"]
            .iter()
            .find_map(|k| match o.get(*k) {
                Some(Value::String(s)) => Some(s.clone()),
                Some(v @ Value::Object(_)) => Some(message(v)),
                _ => None,
            })
            .unwrap_or_else(|| e.to_string()),
        other => other.to_string(),
    };
    text.chars().take(500).collect()
}

/// Which contacts (by position in `ids`) each error entry is tied to; entries tied to none
/// are returned apart.
pub fn attribute(ids: &[&str], errors: &[Value]) -> (BTreeMap<usize, Vec<String>>, Vec<String>) {
    let mut tied: BTreeMap<usize, Vec<String>> = BTreeMap::new();
    let mut untied = Vec::new();
    for e in errors {
        let msg = message(e);
        let explicit: Option<String> = match e {
            Value::Object(o) => ["trusst_contact_id", "contact_id", "id"]
                .iter()
                .find_map(|k| o.get(*k).and_then(scalar)),
            _ => None,
        };
        let hits: Vec<usize> = match &explicit {
            Some(id) => ids
                .iter()
                .enumerate()
                .filter(|(_, x)| **x == id)
                .map(|(i, _)| i)
                .collect(),
            None => ids
                .iter()
                .enumerate()
                .filter(|(_, x)| mentions(&msg, x))
                .map(|(i, _)| i)
                .collect(),
        };
        if hits.is_empty() {
            untied.push(msg);
        } else {
            for i in hits {
                tied.entry(i).or_default().push(msg.clone());
            }
        }
    }
    (tied, untied)
}

/// One outcome per contact from a 2xx answer, by the rule in the module docs.
pub fn outcomes(ids: &[&str], answer: &Answer) -> Vec<Outcome> {
    let n = ids.len() as u64;
    let (tied, untied) = attribute(ids, &answer.errors);
    let tied_n = tied.len() as u64;
    let failed = answer.failed.unwrap_or(tied_n + untied.len() as u64);
    let unaccounted = answer
        .processed
        .map_or(0, |p| n.saturating_sub(p.saturating_add(failed)));
    let uncertain = failed > tied_n || unaccounted > 0;
    let untied_reason = if uncertain {
        let quoted = if untied.is_empty() {
            "no error details".to_owned()
        } else {
            untied
                .iter()
                .take(5)
                .cloned()
                .collect::<Vec<_>>()
                .join("; ")
        };
        Some(format!(
            "the MuleSoft API reported {failed} of {n} contacts failed{} without saying which ({quoted}); this contact may not \
             have been written",
            answer
                .processed
                .map(|p| format!(" and {p} processed"))
                .unwrap_or_default()
        ))
    } else {
        if !untied.is_empty() {
            tracing::warn!(errors = ?untied, "MuleSoft API reported errors tied to no contact, and no failures beyond the tied ones");
        }
        None
    };
    (0..ids.len())
        .map(|i| match tied.get(&i) {
            Some(msgs) => Outcome::Rejected(msgs.join("; ")),
            None => match &untied_reason {
                Some(r) => Outcome::Rejected(r.clone()),
                None => Outcome::Written,
            },
        })
        .collect()
}

/// The wait of a rate-limit answer: `X-Ratelimit-Reset` in milliseconds (MuleSoft's rate
/// limiting policy), else a `Retry-After` in seconds; capped at an hour.
pub fn rate_limit_wait(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    const CAP: Duration = Duration::from_secs(3600);
    let reset = headers
        .get("x-ratelimit-reset")
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|ms| ms.is_finite() && *ms >= 0.0)
        .map(|ms| Duration::from_secs_f64(ms / 1000.0).min(CAP));
    reset.or_else(|| crate::sink::http::retry_after(headers))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const IDS: [&str; 3] = ["c-1", "c-10", "c-2"];

    #[test]
    fn payload_is_the_guides() {
        let mut c = Map::new();
        c.insert("trusst_contact_id".into(), "c-1".into());
        let now = chrono::DateTime::parse_from_rfc3339("2025-01-15T14:30:00.123+00:00")
            .unwrap()
            .to_utc();
        assert_eq!(
            payload([&c], now),
            json!({"source":"trusst-platform","sync_timestamp":"2025-01-15T14:30:00Z","contacts":[{"trusst_contact_id":"c-1"}]})
        );
    }

    #[test]
    fn all_processed() {
        let a = parse_answer(r#"{"records_processed":3,"records_failed":0,"errors":[]}"#);
        assert_eq!(outcomes(&IDS, &a), vec![Outcome::Written; 3]);
    }

    #[test]
    fn only_the_documented_answer_is_an_answer() {
        assert!(
            documented_answer(r#"{"records_processed":3,"records_failed":0,"errors":[]}"#)
                .is_some()
        );
        assert!(documented_answer(r#"{"records_failed":1,"errors":["c-1: bad"]}"#).is_some());
        for body in [
            "OK",
            "",
            "<html><body>Sign in to continue</body></html>",
            r#"{"status":"ok"}"#,
            "[]",
        ] {
            assert!(documented_answer(body).is_none(), "{body:?}");
        }
    }

    #[test]
    fn errors_tied_by_id_field_or_by_text() {
        let a = parse_answer(
            r#"{"records_processed":1,"records_failed":2,"errors":[
                {"trusst_contact_id":"c-10","message":"INVALID_FIELD: Quality_Score__c"},
                "Contact c-2 failed: REQUIRED_FIELD_MISSING"]}"#,
        );
        assert_eq!(
            outcomes(&IDS, &a),
            vec![
                Outcome::Written,
                Outcome::Rejected("INVALID_FIELD: Quality_Score__c".into()),
                Outcome::Rejected("Contact c-2 failed: REQUIRED_FIELD_MISSING".into()),
            ]
        );
        // `contact_id` / `id` keys, `error` as the message, nested error objects.
        let (tied, untied) = attribute(
            &IDS,
            &[
                json!({"contact_id":"c-1","error":"dup"}),
                json!({"id":"c-2","error":{"message":"deep"}}),
                json!({"id":"zzz"}),
            ],
        );
        assert_eq!(tied[&0], ["dup"]);
        assert_eq!(tied[&2], ["deep"]);
        assert_eq!(untied, [r#"{"id":"zzz"}"#]);
    }

    #[test]
    fn an_id_inside_a_longer_id_is_not_a_match() {
        assert!(mentions("failed: c-1.", "c-1"));
        assert!(mentions("c-1", "c-1"));
        assert!(!mentions("failed: c-10", "c-1"));
        assert!(!mentions("xc-1", "c-1"));
        let (tied, _) = attribute(&IDS, &[json!("record c-10 rejected")]);
        assert_eq!(tied.keys().collect::<Vec<_>>(), [&1]);
    }

    #[test]
    fn unattributed_failures_reject_every_untied_contact() {
        let a = parse_answer(
            r#"{"records_processed":2,"records_failed":1,"errors":["Salesforce timeout"]}"#,
        );
        let out = outcomes(&IDS, &a);
        assert!(out.iter().all(|o| matches!(o, Outcome::Rejected(m) if m.contains("reported 1 of 3 contacts failed") && m.contains("Salesforce timeout"))), "{out:?}");
        // One failure tied, a second one not: the tied one gets its message, the rest the doubt.
        let a = parse_answer(
            r#"{"records_processed":1,"records_failed":2,"errors":[{"id":"c-1","message":"bad"},"boom"]}"#,
        );
        let out = outcomes(&IDS, &a);
        assert_eq!(out[0], Outcome::Rejected("bad".into()));
        assert!(matches!(&out[1], Outcome::Rejected(m) if m.contains("boom")));
        assert!(matches!(&out[2], Outcome::Rejected(_)));
    }

    #[test]
    fn counts_that_do_not_add_up_are_doubtful() {
        // Only 1 processed, 0 failed, 3 sent: two contacts are unaccounted for.
        let a = parse_answer(r#"{"records_processed":1,"records_failed":0,"errors":[]}"#);
        assert!(
            outcomes(&IDS, &a)
                .iter()
                .all(|o| matches!(o, Outcome::Rejected(m) if m.contains("no error details")))
        );
        // Counts as strings are read too.
        let a = parse_answer(r#"{"records_processed":"3","records_failed":"0"}"#);
        assert_eq!(outcomes(&IDS, &a), vec![Outcome::Written; 3]);
    }

    #[test]
    fn a_tied_error_rejects_even_when_the_counts_say_zero_failed() {
        let a = parse_answer(
            r#"{"records_processed":3,"records_failed":0,"errors":[{"id":"c-2","message":"warning-ish"}]}"#,
        );
        assert_eq!(
            outcomes(&IDS, &a),
            vec![
                Outcome::Written,
                Outcome::Written,
                Outcome::Rejected("warning-ish".into())
            ]
        );
    }

    #[test]
    fn rate_limit_reset_is_in_milliseconds() {
        let mut h = reqwest::header::HeaderMap::new();
        assert_eq!(rate_limit_wait(&h), None);
        h.insert("retry-after", "3".parse().unwrap());
        assert_eq!(rate_limit_wait(&h), Some(Duration::from_secs(3)));
        h.insert("X-RateLimit-Reset", "1500".parse().unwrap());
        assert_eq!(rate_limit_wait(&h), Some(Duration::from_millis(1500)));
        h.insert("X-RateLimit-Reset", "99999999999".parse().unwrap());
        assert_eq!(rate_limit_wait(&h), Some(Duration::from_secs(3600)));
        h.insert("X-RateLimit-Reset", "soon".parse().unwrap());
        assert_eq!(rate_limit_wait(&h), Some(Duration::from_secs(3)));
    }
}
