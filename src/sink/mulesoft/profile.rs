//! MuleSoft's defaults: the guide's grouped contact object, sent as it is.

use serde_json::{Map, Value};

use crate::event::ContactEvent;
use crate::sink::mapping::Conversion;
use crate::sink::targets::Profile;

/// The API receives the whole contact; the flow behind it maps fields.
pub static PROFILE: Profile = Profile {
    name: "mulesoft",
    object: "contacts",
    external_id_field: "trusst_contact_id",
    contact_fields: &[],
    prefixed: false,
    text_max_length: 131_072,
    question_field: str::to_owned,
    conversion,
    payload: Some(contact),
    field_type: |_| "string in universal_questions[].result",
};

/// Result types the guide knows; the payload carries answers as text either way.
fn conversion(result_type: &str) -> Option<Conversion> {
    Some(match result_type {
        "Boolean" => Conversion::Boolean,
        "Rating" => Conversion::Number,
        "Paragraph" | "Summary" => Conversion::Text,
        "Label" => Conversion::Picklist,
        _ => return None,
    })
}

/// The guide's MuleSoft contact object. Answers the contact no longer has are listed in
/// `cleared_question_keys` (only when there are some, so the guide's payload is otherwise
/// unchanged): the flow behind the API clears them.
pub fn contact(e: &ContactEvent) -> Map<String, Value> {
    let qs: Vec<Value> = e
        .universal_questions
        .iter()
        .map(|q| {
            serde_json::json!({
                "question_key": q.question_key, "question_text": q.question_text,
                "result_type": q.result_type, "result": q.result,
            })
        })
        .collect();
    let mut v = serde_json::json!({
        "trusst_contact_id": e.trusst_contact_id, "external_id": e.external_id,
        "call_date": e.call_date, "call_start_time": e.call_start_time, "direction": e.direction,
        "contact_agent_id": e.contact_agent_id, "s3_agent_id": e.s3_agent_id, "conn_id": e.conn_id,
        "universal_questions": qs,
    });
    if let Some(keys) = e.cleared_question_keys.as_ref().filter(|k| !k.is_empty()) {
        v["cleared_question_keys"] = serde_json::json!(keys);
    }
    match v {
        Value::Object(m) => m,
        _ => unreachable!("json! object"),
    }
}
