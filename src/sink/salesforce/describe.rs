//! The object's fields from `describe`: the mapping is checked against them before the first
//! write, and every record is screened against them before it is sent.
//!
//! Screening matters because a Collections request with an unknown field or a value of the
//! wrong JSON type fails as a whole (400), which would take the good records down with the bad.

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use serde::Deserialize;
use serde_json::Value;

use crate::error::{Error, Result};
use crate::sink::mapping::{Conversion, Mapping, Record};

/// One field of the object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldInfo {
    /// API name as Salesforce spells it.
    pub name: String,
    /// Field type (`boolean`, `double`, `textarea`, `picklist`, ...).
    pub kind: String,
    /// Marked External ID.
    pub external_id: bool,
    /// Can be set on insert or update (formula and system fields cannot).
    pub writable: bool,
    /// A restricted picklist refuses values outside `picklist`.
    pub restricted: bool,
    /// Active picklist values.
    pub picklist: Vec<String>,
}

/// The fields of an object, by lower-cased name (API names are case-insensitive).
#[derive(Debug, Clone)]
pub struct ObjectFields {
    /// The object's API name.
    pub object: String,
    fields: HashMap<String, FieldInfo>,
    /// When the describe was read.
    pub fetched: Instant,
}

#[derive(Deserialize)]
struct Describe {
    #[serde(default)]
    name: Option<String>,
    fields: Vec<RawField>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawField {
    name: String,
    #[serde(rename = "type", default)]
    kind: String,
    #[serde(default)]
    external_id: bool,
    #[serde(default)]
    createable: Option<bool>,
    #[serde(default)]
    updateable: Option<bool>,
    #[serde(default)]
    restricted_picklist: bool,
    #[serde(default)]
    picklist_values: Vec<PicklistValue>,
}

#[derive(Deserialize)]
struct PicklistValue {
    value: String,
    #[serde(default = "yes")]
    active: bool,
}

fn yes() -> bool {
    true
}

/// Field types a conversion's values fit.
pub fn fitting_types(conv: Conversion) -> &'static [&'static str] {
    match conv {
        Conversion::Boolean => &["boolean"],
        Conversion::Number | Conversion::Integer => {
            &["double", "int", "long", "currency", "percent"]
        }
        Conversion::Text => &["string", "textarea", "email", "phone", "url", "picklist"],
        Conversion::Picklist => &["picklist", "multipicklist", "string"],
        Conversion::DateTime => &["datetime", "date"],
        Conversion::OptionSet => &[],
    }
}

impl ObjectFields {
    /// Parse a describe answer.
    pub fn parse(object: &str, body: &str) -> Result<Self> {
        let d: Describe = serde_json::from_str(body).map_err(|e| {
            Error::external(format!("describe of {object}: unexpected answer")).with_source(e)
        })?;
        let fields = d
            .fields
            .into_iter()
            .map(|f| {
                let info = FieldInfo {
                    writable: f.createable.unwrap_or(true) || f.updateable.unwrap_or(true),
                    picklist: f
                        .picklist_values
                        .into_iter()
                        .filter(|p| p.active)
                        .map(|p| p.value)
                        .collect(),
                    name: f.name,
                    kind: f.kind.to_ascii_lowercase(),
                    external_id: f.external_id,
                    restricted: f.restricted_picklist,
                };
                (info.name.to_ascii_lowercase(), info)
            })
            .collect();
        Ok(Self {
            object: d.name.unwrap_or_else(|| object.to_owned()),
            fields,
            fetched: Instant::now(),
        })
    }

    /// A field by name, in any case.
    pub fn get(&self, name: &str) -> Option<&FieldInfo> {
        self.fields.get(&name.to_ascii_lowercase())
    }

    /// True when the object has the field.
    pub fn has(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    /// Check every field the mapping plans to write (the configured questions included) exists
    /// with a fitting type; every problem is listed in one user error.
    pub fn check(&self, mapping: &Mapping) -> Result<()> {
        let object = &self.object;
        let planned = mapping.planned_fields(mapping.questions.keys().map(|k| (k.as_str(), "")));
        let mut problems = Vec::new();
        for (i, (field, conv)) in planned.iter().enumerate() {
            let ext = i == 0 && field == &mapping.external_id_field;
            let (what, fix) = origin(mapping, field, ext);
            let Some(info) = self.get(field) else {
                problems.push(if ext {
                    format!("external id field {field} does not exist on {object}; create it as a Text field marked External ID and Unique, or fix {fix}")
                } else {
                    format!("field {field} ({what}) does not exist on {object}; create it or fix {fix}")
                });
                continue;
            };
            if ext && !info.external_id {
                problems.push(format!("field {field} on {object} is not marked External ID; tick External ID (and Unique) on it, or fix {fix}"));
            }
            if !info.writable {
                problems.push(format!("field {field} ({what}) on {object} cannot be written (formula or system field); use another field in {fix}"));
            }
            if let Some(conv) = conv {
                let fits = fitting_types(*conv);
                if !fits.contains(&info.kind.as_str()) {
                    let hint = if *conv == Conversion::OptionSet {
                        "option_set is for Dynamics; use type = \"picklist\"".to_owned()
                    } else {
                        format!("it needs a {} field", fits.join("/"))
                    };
                    problems.push(format!(
                        "field {field} ({what}) on {object} is of type {}, which does not take {} values ({hint}); change the field or the type in {fix}",
                        info.kind,
                        conv.name()
                    ));
                }
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(Error::user(problems.join("\n")))
        }
    }

    /// Give configured picklist questions and fields without `labels` the values of their
    /// restricted picklist, so an unknown label is caught by the mapping with a clear reason.
    pub fn fill_picklists(&self, mapping: &mut Mapping) {
        let questions: Vec<String> = mapping.questions.keys().cloned().collect();
        for key in questions {
            let field = mapping.question_field(&key);
            if let (Some(f), Some(spec)) = (field, mapping.questions.get_mut(&key)) {
                fill(self, spec, &f);
            }
        }
        for spec in mapping.fields.values_mut() {
            if let Some(f) = spec.field.clone() {
                fill(self, spec, &f);
            }
        }

        fn fill(fields: &ObjectFields, spec: &mut crate::sink::mapping::FieldSpec, field: &str) {
            if spec.conversion != Some(Conversion::Picklist) || !spec.labels.is_empty() {
                return;
            }
            if let Some(info) = fields
                .get(field)
                .filter(|i| i.restricted && !i.picklist.is_empty())
            {
                spec.labels = info
                    .picklist
                    .iter()
                    .map(|v| (v.clone(), 0))
                    .collect::<BTreeMap<_, _>>();
            }
        }
    }

    /// Fields of a record the object does not have.
    pub fn unknown<'a>(&self, record: &'a Record) -> impl Iterator<Item = &'a str> {
        record
            .fields
            .keys()
            .map(String::as_str)
            .filter(|k| !self.has(k))
    }

    /// Make a record fit to send, or say why it cannot be sent. Unknown fields holding null are
    /// dropped (nothing is lost); an unknown field with a value, a value of the wrong JSON type
    /// or a label outside a restricted picklist rejects the record. Date-only fields get the
    /// date part of a timestamp.
    pub fn screen(&self, record: &Record) -> std::result::Result<Record, String> {
        let mut out = record.clone();
        let mut problems = Vec::new();
        for (name, value) in &record.fields {
            let Some(info) = self.get(name) else {
                if value.is_null() {
                    out.fields.remove(name);
                } else {
                    problems.push(format!(
                        "field {name} does not exist on {}; create it, or name another field (or skip = true) for its question in [mapping.questions]",
                        self.object
                    ));
                }
                continue;
            };
            let kind = info.kind.as_str();
            match value {
                Value::Null => {}
                Value::Bool(_)
                    if kind != "boolean" && !fitting_types(Conversion::Text).contains(&kind) =>
                {
                    problems.push(format!(
                        "field {name} is of type {kind} and cannot take the boolean {value}"
                    ));
                }
                Value::Number(_)
                    if !matches!(
                        kind,
                        "double" | "int" | "long" | "currency" | "percent" | "string" | "textarea"
                    ) =>
                {
                    problems.push(format!(
                        "field {name} is of type {kind} and cannot take the number {value}"
                    ));
                }
                Value::String(_)
                    if matches!(
                        kind,
                        "boolean" | "double" | "int" | "long" | "currency" | "percent"
                    ) =>
                {
                    problems.push(format!(
                        "field {name} is of type {kind} and cannot take the text {value}"
                    ));
                }
                Value::String(s) if kind == "date" && s.len() > 10 && s.as_bytes()[10] == b'T' => {
                    out.fields
                        .insert(name.clone(), Value::String(s[..10].to_owned()));
                }
                Value::String(s) if info.restricted && !info.picklist.is_empty() => {
                    let ok = |v: &str| {
                        info.picklist
                            .iter()
                            .any(|p| p.eq_ignore_ascii_case(v.trim()))
                    };
                    let all_ok = if kind == "multipicklist" {
                        s.split(';').all(ok)
                    } else {
                        ok(s)
                    };
                    if !all_ok {
                        problems.push(format!(
                            "{s:?} is not a value of the restricted picklist {name} ({}); add it to the picklist",
                            info.picklist.join(", ")
                        ));
                    }
                }
                _ => {}
            }
        }
        if problems.is_empty() {
            Ok(out)
        } else {
            Err(problems.join("; "))
        }
    }
}

/// What a planned field is for, and the config key that names it.
fn origin(mapping: &Mapping, field: &str, ext: bool) -> (String, String) {
    if ext {
        return (
            "the external id".into(),
            "[mapping] external_id_field".into(),
        );
    }
    if let Some((ev, _)) = mapping
        .fields
        .iter()
        .find(|(_, s)| s.field.as_deref() == Some(field))
    {
        return (
            format!("event field {ev}"),
            format!("[mapping.fields] {ev}"),
        );
    }
    if let Some(key) = mapping
        .questions
        .keys()
        .find(|k| mapping.question_field(k).as_deref() == Some(field))
    {
        return (
            format!("question {key}"),
            format!("[mapping.questions.{key}] field"),
        );
    }
    ("mapped field".into(), "[mapping]".into())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::sink::mapping::{MappingConfig, TargetKind};
    use serde_json::{Map, json};

    /// A describe of Contact with the guide's default fields.
    pub(crate) fn contact_describe() -> String {
        let f = |name: &str, kind: &str| json!({"name": name, "type": kind, "externalId": false, "createable": true, "updateable": true});
        let mut fields = vec![
            json!({"name": "Id", "type": "id", "createable": false, "updateable": false}),
            json!({"name": "Trusst_Contact_ID__c", "type": "string", "externalId": true, "createable": true, "updateable": true}),
            f("External_ID__c", "string"),
            f("Call_Date__c", "datetime"),
            f("Call_Start_Time__c", "datetime"),
            f("Agent_ID__c", "string"),
            f("S3_Agent_ID__c", "string"),
            f("Connection_ID__c", "string"),
            f("Agent_Identified__c", "boolean"),
            f("Quality_Score__c", "double"),
            f("Notes__c", "textarea"),
            f("Call_Day__c", "date"),
            json!({"name": "Formula__c", "type": "string", "createable": false, "updateable": false}),
        ];
        fields.push(json!({"name": "Call_Direction__c", "type": "picklist", "restrictedPicklist": false,
            "picklistValues": [{"value": "inbound", "active": true}, {"value": "outbound", "active": true}]}));
        fields.push(json!({"name": "Call_Outcome__c", "type": "picklist", "restrictedPicklist": true,
            "picklistValues": [{"value": "Good", "active": true}, {"value": "Fair", "active": true}, {"value": "Old", "active": false}]}));
        json!({"name": "Contact", "fields": fields}).to_string()
    }

    fn mapping(toml: &str) -> Mapping {
        Mapping::new(
            TargetKind::Salesforce,
            &crate::config::parse::<MappingConfig>(toml).unwrap(),
        )
    }

    #[test]
    fn default_mapping_fits_the_object() {
        let d = ObjectFields::parse("Contact", &contact_describe()).unwrap();
        d.check(&mapping("")).unwrap();
        d.check(&mapping(
            "[questions.agent_identified]\ntype = \"boolean\"\n[questions.quality_score]\n",
        ))
        .unwrap();
        assert!(d.has("trusst_contact_id__c") && d.has("NOTES__C"));
        assert!(!d.get("Id").unwrap().writable);
    }

    #[test]
    fn missing_and_mistyped_fields_are_named() {
        let d = ObjectFields::parse("Contact", &contact_describe()).unwrap();
        let e = d
            .check(&mapping(
                "[questions.customer_sentiment]\n[questions.quality_score]\ntype = \"boolean\"\n",
            ))
            .unwrap_err();
        assert_eq!(e.fault, crate::error::Fault::User);
        let m = e.message();
        assert!(
            m.contains("field Customer_Sentiment__c (question customer_sentiment) does not exist on Contact; create it or fix [mapping.questions.customer_sentiment] field"),
            "{m}"
        );
        assert!(m.contains("field Quality_Score__c (question quality_score) on Contact is of type double, which does not take boolean values"), "{m}");

        let e = d
            .check(&mapping("external_id_field = \"External_ID__c\"\n"))
            .unwrap_err();
        assert!(
            e.message()
                .contains("External_ID__c on Contact is not marked External ID"),
            "{e}"
        );
        let e = d
            .check(&mapping("external_id_field = \"Nope__c\"\n"))
            .unwrap_err();
        assert!(
            e.message()
                .contains("external id field Nope__c does not exist on Contact"),
            "{e}"
        );
        let e = d
            .check(&mapping("[fields]\nconn_id = \"Formula__c\"\n"))
            .unwrap_err();
        assert!(
            e.message()
                .contains("Formula__c (event field conn_id) on Contact cannot be written"),
            "{e}"
        );
        let e = d
            .check(&mapping(
                "[questions.call_outcome]\ntype = \"option_set\"\n",
            ))
            .unwrap_err();
        assert!(e.message().contains("option_set is for Dynamics"), "{e}");
    }

    #[test]
    fn restricted_picklists_fill_labels() {
        let d = ObjectFields::parse("Contact", &contact_describe()).unwrap();
        let mut m = mapping("[questions.call_outcome]\ntype = \"picklist\"\n");
        d.fill_picklists(&mut m);
        assert_eq!(
            m.questions["call_outcome"]
                .labels
                .keys()
                .collect::<Vec<_>>(),
            ["Fair", "Good"]
        );
        // The unrestricted direction picklist takes any value: left open.
        assert!(m.fields["direction"].labels.is_empty());
    }

    #[test]
    fn screening_records() {
        let d = ObjectFields::parse("Contact", &contact_describe()).unwrap();
        let rec =
            |pairs: Value| Record::new("c-1", pairs.as_object().cloned().unwrap_or_else(Map::new));
        let r = d.screen(&rec(json!({"Trusst_Contact_ID__c": "c-1", "Nps__c": null, "Call_Day__c": "2025-01-15T14:23:10.000Z", "call_outcome__c": "good"}))).unwrap();
        assert!(!r.fields.contains_key("Nps__c"));
        assert_eq!(r.fields["Call_Day__c"], "2025-01-15");
        let e = d.screen(&rec(json!({"Nps__c": 9}))).unwrap_err();
        assert!(e.contains("field Nps__c does not exist on Contact"), "{e}");
        let e = d
            .screen(&rec(json!({"Quality_Score__c": "eight"})))
            .unwrap_err();
        assert!(e.contains("of type double and cannot take the text"), "{e}");
        let e = d
            .screen(&rec(json!({"Agent_Identified__c": 1})))
            .unwrap_err();
        assert!(
            e.contains("of type boolean and cannot take the number 1"),
            "{e}"
        );
        let e = d
            .screen(&rec(json!({"Call_Outcome__c": "Old"})))
            .unwrap_err();
        assert!(
            e.contains("restricted picklist Call_Outcome__c (Good, Fair)"),
            "{e}"
        );
        assert!(d.screen(&rec(json!({"Call_Direction__c": "sideways", "Notes__c": "x", "Agent_Identified__c": false}))).is_ok());
        assert_eq!(
            d.unknown(&rec(json!({"Nps__c": 1, "Notes__c": 2})))
                .collect::<Vec<_>>(),
            ["Nps__c"]
        );
    }
}
