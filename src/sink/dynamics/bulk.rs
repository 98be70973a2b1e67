//! `UpsertMultiple`, the bulk operation message Microsoft recommends for many rows of one table
//! (one request, one transaction, the best throughput): its request body, and what a failed
//! answer means for the records (pure, no I/O).
//!
//! On a standard table the message is all or nothing: one bad record fails the whole request
//! and nothing is written. Microsoft's advice is to fall back to `$batch` then, which is what
//! [`after_failure`] decides.

use serde_json::{Map, Value};

use super::batch::key_literal;
use crate::sink::verdict::{Verdict, of_status};

/// The bound action's name, after the entity set in the URL.
pub const ACTION: &str = "Microsoft.Dynamics.CRM.UpsertMultiple";

/// What a failed `UpsertMultiple` means for its chunk of records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fallback {
    /// The table (or environment) does not offer the message: write this chunk with `$batch`,
    /// and every later one too.
    Unsupported,
    /// A record was refused and the table rolled the request back: send the chunk again as a
    /// `$batch` with continue-on-error, which writes the good records and names the bad ones.
    PerRecord,
    /// Not about the records (a token, privileges, throttling, the service failing): handled
    /// like any failed request (renew, stop, wait or retry), never by resending per record.
    Fail,
}

/// Decide from a failed answer's status and body. Permission (403), auth (401, 407),
/// throttling (429), timeouts (408) and server errors are [`Fallback::Fail`]; a missing
/// action (404, 405, 501) or the service's "does not support entities of type" error
/// (`0x80040800`) is [`Fallback::Unsupported`]; any other 4xx is taken as a refused record.
pub fn after_failure(status: u16, body: &str) -> Fallback {
    match status {
        404 | 405 | 501 => Fallback::Unsupported,
        400..=499 if not_supported(body) => Fallback::Unsupported,
        // What HTTP says is a record's fault is worth finding record by record.
        _ if of_status(status, None) == Verdict::DeadLetter => Fallback::PerRecord,
        _ => Fallback::Fail,
    }
}

/// True when an OData error body says the message is not available for the table. The text
/// is the platform's ("The 'UpsertMultiple' method does not support entities of type 'x'");
/// the other phrasings are reported by third parties for the same situation.
fn not_supported(body: &str) -> bool {
    let v: Option<Value> = serde_json::from_str(body).ok();
    let err = v.as_ref().and_then(|v| v.get("error"));
    let code = err
        .and_then(|e| e.get("code"))
        .and_then(Value::as_str)
        .unwrap_or_default();
    let message = err
        .and_then(|e| e.get("message"))
        .and_then(Value::as_str)
        .unwrap_or(body)
        .to_ascii_lowercase();
    code.eq_ignore_ascii_case("0x80040800")
        || message.contains("does not support entities of type")
        || message.contains("is not enabled on the entity")
        || message.contains("has not yet been implemented")
}

/// The JSON body: `{"Targets":[...]}`, each record's columns with `@odata.type` (required on
/// every target) and `@odata.id` naming the record by its alternate key, relative to the
/// service root as in Microsoft's example. The key column itself is left out: it is in
/// `@odata.id`, and the service refuses a body that contradicts it.
pub fn body<'a>(
    logical_name: &str,
    entity_set: &str,
    key_field: &str,
    records: impl IntoIterator<Item = (&'a str, &'a Map<String, Value>)>,
) -> String {
    let odata_type = format!("Microsoft.Dynamics.CRM.{logical_name}");
    let targets: Vec<Value> = records
        .into_iter()
        .map(|(key, fields)| {
            let mut target = fields.clone();
            target.remove(key_field);
            target.insert("@odata.type".into(), odata_type.clone().into());
            target.insert(
                "@odata.id".into(),
                format!("{entity_set}({key_field}={})", key_literal(key)).into(),
            );
            Value::Object(target)
        })
        .collect();
    serde_json::json!({ "Targets": targets }).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn which_failures_fall_back_to_batch() {
        let err = |code: &str, message: &str| {
            json!({"error": {"code": code, "message": message}}).to_string()
        };
        let bad = err(
            "0x80060888",
            "The property 'x' does not exist on type 'Microsoft.Dynamics.CRM.contact'.",
        );
        assert_eq!(after_failure(400, &bad), Fallback::PerRecord);
        assert_eq!(after_failure(412, "{}"), Fallback::PerRecord);
        assert_eq!(after_failure(413, ""), Fallback::PerRecord);
        let unsupported = err(
            "0x80040800",
            "The 'UpsertMultiple' method does not support entities of type 'contact'. MessageProcessorCache returned MessageProcessor.Empty.",
        );
        assert_eq!(after_failure(400, &unsupported), Fallback::Unsupported);
        assert_eq!(
            after_failure(
                400,
                &err(
                    "0x80040216",
                    "UpsertMultiple is not enabled on the entity team"
                )
            ),
            Fallback::Unsupported
        );
        for missing in [404, 405, 501] {
            assert_eq!(
                after_failure(missing, ""),
                Fallback::Unsupported,
                "{missing}"
            );
        }
        // Permissions, auth, throttling and the service's own trouble are never a record's.
        for status in [401, 403, 407, 408, 429, 500, 502, 503, 504] {
            assert_eq!(after_failure(status, &bad), Fallback::Fail, "{status}");
        }
        assert_eq!(after_failure(302, ""), Fallback::Fail);
    }

    #[test]
    fn body_names_each_record_by_its_alternate_key() {
        let mut a = Map::new();
        a.insert("trusst_contact_id".into(), "c-1".into());
        a.insert("quality_score".into(), 8.into());
        let mut b = Map::new();
        b.insert("agentid".into(), "x".into());
        let text = body(
            "contact",
            "contacts",
            "trusst_contact_id",
            [("c-1", &a), ("O'Brien 2", &b)],
        );
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(
            v,
            json!({"Targets": [
                {"quality_score": 8, "@odata.type": "Microsoft.Dynamics.CRM.contact",
                 "@odata.id": "contacts(trusst_contact_id='c-1')"},
                {"agentid": "x", "@odata.type": "Microsoft.Dynamics.CRM.contact",
                 "@odata.id": "contacts(trusst_contact_id='O''Brien%202')"},
            ]})
        );
    }
}
