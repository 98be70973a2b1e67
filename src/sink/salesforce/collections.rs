//! sObject Collections upsert: up to 200 records per request, one result per record in order.

use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::error::{Error, Result};
use crate::sink::mapping::Record;

/// Most records one Collections request takes.
pub const MAX_RECORDS: usize = 200;

/// Per-record error codes that a later attempt can clear (a row locked by another transaction);
/// every other per-record error would fail again and is dead-lettered.
pub const TRANSIENT_CODES: &[&str] = &["UNABLE_TO_LOCK_ROW"];

/// The result of one record, as the API reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordResult {
    /// Created or updated.
    Written,
    /// Refused for good; the text names the code, message and fields.
    Rejected(String),
    /// Refused for now (see [`TRANSIENT_CODES`]); worth sending again.
    Transient(String),
}

/// One error of a save result or of an error response. Collections results name the code
/// `statusCode`, whole-request errors `errorCode`: both are read.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct ApiError {
    /// The code in a save result.
    #[serde(default, rename = "statusCode")]
    pub status_code: Option<String>,
    /// The code in an error response.
    #[serde(default, rename = "errorCode")]
    pub error_code: Option<String>,
    /// Human-readable text.
    #[serde(default)]
    pub message: String,
    /// The fields concerned.
    #[serde(default)]
    pub fields: Vec<String>,
}

impl ApiError {
    /// The error code, whichever key carried it.
    pub fn code(&self) -> &str {
        self.status_code
            .as_deref()
            .or(self.error_code.as_deref())
            .unwrap_or("UNKNOWN_ERROR")
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code(), self.message)?;
        if !self.fields.is_empty() {
            write!(f, " (fields: {})", self.fields.join(", "))?;
        }
        Ok(())
    }
}

#[derive(Debug, Deserialize)]
struct SaveResult {
    #[serde(default)]
    success: bool,
    #[serde(default)]
    errors: Vec<ApiError>,
}

/// The request body: `allOrNone:false` so one bad record does not roll back the others.
pub fn body<'a>(object: &str, records: impl IntoIterator<Item = &'a Record>) -> Value {
    let records: Vec<Value> = records
        .into_iter()
        .map(|r| {
            let mut m = Map::with_capacity(r.fields.len() + 1);
            m.insert("attributes".into(), json!({ "type": object }));
            m.extend(r.fields.iter().map(|(k, v)| (k.clone(), v.clone())));
            Value::Object(m)
        })
        .collect();
    json!({ "allOrNone": false, "records": records })
}

/// Map a 200 answer to one result per record, in request order.
pub fn results(body: &str, expected: usize) -> Result<Vec<RecordResult>> {
    let parsed: Vec<SaveResult> = serde_json::from_str(body).map_err(|e| {
        Error::external(format!(
            "Salesforce Collections upsert: unexpected answer: {}",
            snippet(body)
        ))
        .with_source(e)
    })?;
    if parsed.len() != expected {
        // Results are matched by position: with a different count nothing is known per record,
        // so the whole request is retried (upserts are idempotent).
        return Err(Error::external(format!(
            "Salesforce Collections upsert answered {} results for {expected} records",
            parsed.len()
        )));
    }
    Ok(parsed
        .into_iter()
        .map(|r| {
            if r.success {
                return RecordResult::Written;
            }
            let text = if r.errors.is_empty() {
                "UNKNOWN_ERROR: the record was not saved and no reason was given".to_owned()
            } else {
                r.errors
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("; ")
            };
            if !r.errors.is_empty() && r.errors.iter().all(|e| TRANSIENT_CODES.contains(&e.code()))
            {
                RecordResult::Transient(text)
            } else {
                RecordResult::Rejected(text)
            }
        })
        .collect())
}

/// The errors of an error response (`[{"message","errorCode","fields"}]`), or the raw body.
pub fn request_error(body: &str) -> String {
    match serde_json::from_str::<Vec<ApiError>>(body) {
        Ok(errs) if !errs.is_empty() => errs
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; "),
        _ => snippet(body),
    }
}

/// The first error code of an error response.
pub fn request_error_code(body: &str) -> Option<String> {
    serde_json::from_str::<Vec<ApiError>>(body)
        .ok()?
        .first()
        .map(|e| e.code().to_owned())
}

/// At most 500 characters of a body, for messages.
pub fn snippet(body: &str) -> String {
    let mut s: String = body.chars().take(500).collect();
    if s.len() < body.len() {
        s.push('…');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id: &str, extra: &[(&str, Value)]) -> Record {
        let mut fields = Map::new();
        fields.insert("Trusst_Contact_ID__c".into(), Value::from(id));
        for (k, v) in extra {
            fields.insert((*k).into(), v.clone());
        }
        Record::new(id, fields)
    }

    #[test]
    fn builds_the_request_body() {
        let rs = [
            rec(
                "c-1",
                &[
                    ("Agent_Identified__c", Value::Bool(true)),
                    ("Notes__c", Value::Null),
                ],
            ),
            rec("c-2", &[("Quality_Score__c", 8.into())]),
        ];
        let b = body("Contact", &rs);
        assert_eq!(
            b,
            json!({"allOrNone": false, "records": [
                {"attributes": {"type": "Contact"}, "Trusst_Contact_ID__c": "c-1", "Agent_Identified__c": true, "Notes__c": null},
                {"attributes": {"type": "Contact"}, "Trusst_Contact_ID__c": "c-2", "Quality_Score__c": 8},
            ]})
        );
    }

    #[test]
    fn maps_results_in_order() {
        let answer = r#"[
          {"id":"003A","success":true,"errors":[],"created":true},
          {"success":false,"errors":[{"statusCode":"INVALID_OR_NULL_FOR_RESTRICTED_PICKLIST","message":"bad value for restricted picklist field: Superb","fields":["Call_Outcome__c"]}]},
          {"success":false,"errors":[{"errorCode":"STRING_TOO_LONG","message":"Notes: data value too large","fields":[]}]},
          {"success":false,"errors":[{"statusCode":"UNABLE_TO_LOCK_ROW","message":"unable to obtain exclusive access to this record"}]},
          {"id":"003B","success":true,"errors":[],"created":false},
          {"success":false,"errors":[]}
        ]"#;
        let r = results(answer, 6).unwrap();
        assert_eq!(r[0], RecordResult::Written);
        assert_eq!(
            r[1],
            RecordResult::Rejected(
                "INVALID_OR_NULL_FOR_RESTRICTED_PICKLIST: bad value for restricted picklist field: Superb (fields: Call_Outcome__c)".into()
            )
        );
        assert_eq!(
            r[2],
            RecordResult::Rejected("STRING_TOO_LONG: Notes: data value too large".into())
        );
        assert_eq!(
            r[3],
            RecordResult::Transient(
                "UNABLE_TO_LOCK_ROW: unable to obtain exclusive access to this record".into()
            )
        );
        assert_eq!(r[4], RecordResult::Written);
        assert!(matches!(&r[5], RecordResult::Rejected(m) if m.starts_with("UNKNOWN_ERROR")));
    }

    #[test]
    fn count_mismatch_and_garbage_are_retryable() {
        let e = results(r#"[{"success":true}]"#, 2).unwrap_err();
        assert!(
            e.retryable && e.message().contains("1 results for 2 records"),
            "{e}"
        );
        assert!(results("<html>", 1).unwrap_err().retryable);
    }

    #[test]
    fn whole_request_errors() {
        let b = r#"[{"message":"No such column 'Foo__c' on sobject of type Contact","errorCode":"INVALID_FIELD"}]"#;
        assert_eq!(
            request_error(b),
            "INVALID_FIELD: No such column 'Foo__c' on sobject of type Contact"
        );
        assert_eq!(request_error_code(b).as_deref(), Some("INVALID_FIELD"));
        assert_eq!(request_error("Bad Gateway"), "Bad Gateway");
        assert_eq!(request_error_code("{}"), None);
        assert_eq!(snippet(&"x".repeat(600)).chars().count(), 501);
    }
}
