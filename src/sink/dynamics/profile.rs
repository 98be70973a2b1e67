//! Dataverse's defaults: the guide's columns, with the publisher prefix.

use crate::sink::mapping::Conversion;
use crate::sink::targets::Profile;

/// The guide's contact columns; a question's column is its key (after the prefix).
pub static PROFILE: Profile = Profile {
    name: "dynamics",
    object: "contact",
    external_id_field: "trusst_contact_id",
    contact_fields: &[
        ("external_id", "external_id", None),
        ("call_date", "calldate", Some(Conversion::DateTime)),
        (
            "call_start_time",
            "call_start_time",
            Some(Conversion::DateTime),
        ),
        ("direction", "call_direction", Some(Conversion::OptionSet)),
        ("contact_agent_id", "agentid", None),
        ("s3_agent_id", "s3_agent_id", None),
        ("conn_id", "connection_id", None),
    ],
    prefixed: true,
    // Multiple Lines of Text's largest size.
    text_max_length: 1_048_576,
    question_field: str::to_owned,
    conversion,
    payload: None,
    field_type,
};

/// The Dataverse column type (Power Apps, table columns) each conversion writes.
fn field_type(c: Conversion) -> &'static str {
    match c {
        Conversion::Boolean => "Two Options (Yes/No)",
        Conversion::Number => "Decimal Number",
        Conversion::Integer => "Whole Number",
        Conversion::Text => "Multiple Lines of Text",
        Conversion::Picklist | Conversion::OptionSet => {
            "Choice (values read from the column at start)"
        }
        Conversion::DateTime => "Date and Time",
    }
}

/// Rating -> Whole Number, Label -> Choice (option value by label).
fn conversion(result_type: &str) -> Option<Conversion> {
    Some(match result_type {
        "Boolean" => Conversion::Boolean,
        "Rating" => Conversion::Integer,
        "Paragraph" | "Summary" => Conversion::Text,
        "Label" => Conversion::OptionSet,
        _ => return None,
    })
}
