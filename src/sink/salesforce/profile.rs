//! Salesforce's defaults: the guide's custom fields and question naming rule.

use crate::sink::mapping::Conversion;
use crate::sink::targets::Profile;

/// The guide's Contact fields; questions become `Agent_Identified__c` and the like.
pub static PROFILE: Profile = Profile {
    name: "salesforce",
    object: "Contact",
    external_id_field: "Trusst_Contact_ID__c",
    contact_fields: &[
        ("external_id", "External_ID__c", None),
        ("call_date", "Call_Date__c", Some(Conversion::DateTime)),
        (
            "call_start_time",
            "Call_Start_Time__c",
            Some(Conversion::DateTime),
        ),
        ("direction", "Call_Direction__c", Some(Conversion::Picklist)),
        ("contact_agent_id", "Agent_ID__c", None),
        ("s3_agent_id", "S3_Agent_ID__c", None),
        ("conn_id", "Connection_ID__c", None),
    ],
    prefixed: false,
    // Long Text Area's largest size.
    text_max_length: 131_072,
    question_field: field_name,
    conversion,
    payload: None,
    field_type,
};

/// The Salesforce field type (Setup, Object Manager) each conversion writes.
fn field_type(c: Conversion) -> &'static str {
    match c {
        Conversion::Boolean => "Checkbox",
        Conversion::Number => "Number",
        Conversion::Integer => "Number (0 decimal places)",
        Conversion::Text => "Long Text Area",
        Conversion::Picklist | Conversion::OptionSet => "Picklist",
        Conversion::DateTime => "Date/Time",
    }
}

/// The guide's Salesforce naming rule: `agent_identified` -> `Agent_Identified__c`.
pub fn field_name(key: &str) -> String {
    let words: Vec<String> = key
        .split('_')
        .filter(|w| !w.is_empty())
        .map(|w| {
            let mut c = w.chars();
            match c.next() {
                Some(f) => f.to_uppercase().collect::<String>() + &c.as_str().to_lowercase(),
                None => String::new(),
            }
        })
        .collect();
    format!("{}__c", words.join("_"))
}

/// Rating -> Number, Label -> Picklist (Checkbox, Number, Long Text Area, Picklist fields).
fn conversion(result_type: &str) -> Option<Conversion> {
    Some(match result_type {
        "Boolean" => Conversion::Boolean,
        "Rating" => Conversion::Number,
        "Paragraph" | "Summary" => Conversion::Text,
        "Label" => Conversion::Picklist,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn naming_rule_of_the_guide() {
        assert_eq!(super::field_name("agent_identified"), "Agent_Identified__c");
        assert_eq!(super::field_name("quality_score"), "Quality_Score__c");
        assert_eq!(super::field_name("NPS"), "Nps__c");
        assert_eq!(super::field_name("CSAT_score"), "Csat_Score__c");
        assert_eq!(super::field_name("a__b"), "A_B__c");
    }
}
