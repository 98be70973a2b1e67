//! Event -> CRM record: field names and type conversion (pure, unit-tested).
//!
//! The defaults (field names, naming rule, text limit, payload shape) are the target's own
//! [`Profile`], in its folder; this module applies them and the `[mapping]` overrides.
//! A value that cannot be converted is a [`MapError`]: the sink dead-letters that contact with
//! the reason and carries on with the rest of the batch.

use std::collections::BTreeMap;
use std::fmt;

use serde::Deserialize;
use serde_json::{Map, Value};

use crate::event::ContactEvent;

use super::targets::Profile;
pub use super::targets::TargetKind;

/// How a raw value becomes a CRM value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Conversion {
    /// `"true"`/`"false"` (also yes/no, 1/0) -> JSON boolean (Checkbox, Yes/No).
    Boolean,
    /// A decimal number -> JSON number (Salesforce Number).
    Number,
    /// A whole number -> JSON integer (Dataverse Whole Number).
    Integer,
    /// Text, length-checked (Text Area, Multiple Lines of Text).
    Text,
    /// A picklist value (Salesforce picklist): the label itself, checked against `labels` when given.
    Picklist,
    /// A Dataverse choice: the integer value looked up by label.
    OptionSet,
    /// A timestamp without zone -> ISO 8601 in UTC with `Z`.
    DateTime,
}

impl Conversion {
    /// The name used for it in config files (`type = "..."`), for messages.
    pub fn name(self) -> &'static str {
        match self {
            Conversion::Boolean => "boolean",
            Conversion::Number => "number",
            Conversion::Integer => "integer",
            Conversion::Text => "text",
            Conversion::Picklist => "picklist",
            Conversion::OptionSet => "option_set",
            Conversion::DateTime => "date_time",
        }
    }
}

/// How one field (contact-level or question) is written.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct FieldSpec {
    /// CRM field name; default from the naming rule.
    #[serde(default)]
    pub field: Option<String>,
    /// Conversion; default from the question's result type.
    #[serde(default, rename = "type")]
    pub conversion: Option<Conversion>,
    /// Longest text accepted (characters); default [`Mapping::text_max_length`].
    #[serde(default)]
    pub max_length: Option<usize>,
    /// Picklist labels, or for Dataverse choices label -> option value. Empty for a choice means
    /// "read from the attribute metadata at start".
    #[serde(default)]
    pub labels: BTreeMap<String, i64>,
    /// Do not write this field.
    #[serde(default)]
    pub skip: bool,
}

/// A field given as a plain name or as a table.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum FieldEntry {
    /// `call_date = "Call_Date__c"`.
    Name(String),
    /// `direction = { field = "call_direction", type = "option_set" }`.
    Spec(FieldSpec),
}

impl FieldEntry {
    fn spec(&self) -> FieldSpec {
        match self {
            FieldEntry::Name(n) => FieldSpec {
                field: Some(n.clone()),
                ..Default::default()
            },
            FieldEntry::Spec(s) => s.clone(),
        }
    }
}

/// What to do with a universal question the mapping does not list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Unmapped {
    /// Write it to the field the naming rule gives (the guide's behaviour).
    DefaultRule,
    /// Leave it out.
    Ignore,
}

/// `[mapping]` of a sink config.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MappingConfig {
    /// Salesforce sObject or Dataverse entity logical name.
    #[serde(default)]
    pub object: Option<String>,
    /// Dataverse entity set (URL name), e.g. `contacts`.
    #[serde(default)]
    pub entity_set: Option<String>,
    /// The external-id field (Salesforce) or alternate-key column (Dataverse).
    #[serde(default)]
    pub external_id_field: Option<String>,
    /// Prefix for default Dataverse column names (a publisher prefix such as `new_`).
    #[serde(default)]
    pub field_prefix: String,
    /// Contact-level fields: event field -> CRM field; replaces the defaults key by key.
    #[serde(default)]
    pub fields: BTreeMap<String, FieldEntry>,
    /// Per question key.
    #[serde(default)]
    pub questions: BTreeMap<String, FieldSpec>,
    /// Questions not listed in `questions`.
    #[serde(default = "default_unmapped")]
    pub unmapped_questions: Unmapped,
    /// Longest text written (Salesforce Long Text Area: 131,072).
    #[serde(default)]
    pub text_max_length: Option<usize>,
    /// A text longer than its field: `shorten` (default) or `dead_letter`.
    #[serde(default)]
    pub text_overflow: TextOverflow,
}

fn default_unmapped() -> Unmapped {
    Unmapped::DefaultRule
}

impl Default for MappingConfig {
    fn default() -> Self {
        crate::config::parse("").expect("defaults parse")
    }
}

/// A resolved mapping for one target.
#[derive(Debug, Clone)]
pub struct Mapping {
    /// The target kind.
    pub target: TargetKind,
    /// sObject / entity logical name.
    pub object: String,
    /// Dataverse entity set.
    pub entity_set: String,
    /// External-id field / alternate key column.
    pub external_id_field: String,
    /// Contact-level event field -> spec (field name resolved).
    pub fields: BTreeMap<String, FieldSpec>,
    /// Question key -> spec, as configured (field resolved lazily by the naming rule).
    pub questions: BTreeMap<String, FieldSpec>,
    /// Unlisted questions.
    pub unmapped: Unmapped,
    /// Default text limit.
    pub text_max_length: usize,
    /// A text longer than its field.
    pub text_overflow: TextOverflow,
    /// Choice column -> label -> value, read from the CRM's metadata at start: the values for
    /// option-set fields whose spec gives no labels (e.g. Label questions not listed in the config).
    pub option_sets: BTreeMap<String, BTreeMap<String, i64>>,
    /// The target's columns when read at start: an answer an event says is gone is cleared
    /// only where its column exists (a question the target never had a column for is no error).
    pub known_fields: Option<std::collections::HashSet<String>>,
    field_prefix: String,
}

/// Contact-level event fields a mapping can name.
pub const CONTACT_FIELDS: [&str; 8] = [
    "external_id",
    "stream_id",
    "call_date",
    "call_start_time",
    "direction",
    "contact_agent_id",
    "s3_agent_id",
    "conn_id",
];

fn contact_value<'a>(e: &'a ContactEvent, field: &str) -> Option<&'a Option<String>> {
    Some(match field {
        "external_id" => &e.external_id,
        "stream_id" => &e.stream_id,
        "call_date" => &e.call_date,
        "call_start_time" => &e.call_start_time,
        "direction" => &e.direction,
        "contact_agent_id" => &e.contact_agent_id,
        "s3_agent_id" => &e.s3_agent_id,
        "conn_id" => &e.conn_id,
        _ => return None,
    })
}

/// Why one contact could not be mapped; it goes to the dead-letter topic with this text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapError {
    /// The event or question field concerned.
    pub field: String,
    /// What is wrong and how to fix it.
    pub reason: String,
}

impl fmt::Display for MapError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.reason)
    }
}

impl std::error::Error for MapError {}

/// A CRM-ready record: the external id value and the fields to write (external id included).
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// The contact id (the external-id / alternate-key value).
    pub contact_id: String,
    /// Field name -> JSON value.
    pub fields: Map<String, Value>,
    /// Texts cut to their field's length (`text_overflow = "shorten"`), to be reported.
    pub shortened: Vec<Shortened>,
}

impl Record {
    /// A record of these fields, nothing shortened.
    pub fn new(contact_id: impl Into<String>, fields: Map<String, Value>) -> Self {
        Record {
            contact_id: contact_id.into(),
            fields,
            shortened: Vec::new(),
        }
    }
}

/// A text longer than its CRM field, written shortened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shortened {
    /// The CRM field.
    pub field: String,
    /// The text's length in characters.
    pub chars: usize,
    /// The characters kept (the field's length).
    pub kept: usize,
}

/// What to do with a text longer than its CRM field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum TextOverflow {
    /// Write its first characters, as many as the field holds, and report it (as the source
    /// does for an event over the broker's limit): the other fields are not left stale.
    #[default]
    Shorten,
    /// Dead-letter the whole record.
    DeadLetter,
}

impl Mapping {
    /// The target's defaults and naming rule.
    pub fn profile(&self) -> &'static Profile {
        self.target.profile()
    }

    /// Resolve a config for a target, filling the guide's defaults.
    pub fn new(target: TargetKind, cfg: &MappingConfig) -> Self {
        let profile = target.profile();
        let prefixed = |name: &str| {
            if profile.prefixed {
                format!("{}{name}", cfg.field_prefix)
            } else {
                name.to_owned()
            }
        };
        let mut fields: BTreeMap<String, FieldSpec> = profile
            .contact_fields
            .iter()
            .map(|(ev, crm, conv)| {
                let name = prefixed(crm);
                (
                    (*ev).to_owned(),
                    FieldSpec {
                        field: Some(name),
                        conversion: *conv,
                        ..Default::default()
                    },
                )
            })
            .collect();
        for (ev, entry) in &cfg.fields {
            let mut spec = entry.spec();
            if let Some(d) = fields.get(ev) {
                spec.field = spec.field.or_else(|| d.field.clone());
                spec.conversion = spec.conversion.or(d.conversion);
            }
            fields.insert(ev.clone(), spec);
        }
        let object = profile.object;
        Self {
            target,
            object: cfg.object.clone().unwrap_or_else(|| object.to_owned()),
            entity_set: cfg
                .entity_set
                .clone()
                .unwrap_or_else(|| format!("{}s", cfg.object.as_deref().unwrap_or(object))),
            external_id_field: cfg
                .external_id_field
                .clone()
                .unwrap_or_else(|| prefixed(profile.external_id_field)),
            fields,
            questions: cfg.questions.clone(),
            unmapped: cfg.unmapped_questions,
            text_max_length: cfg.text_max_length.unwrap_or(profile.text_max_length),
            text_overflow: cfg.text_overflow,
            option_sets: BTreeMap::new(),
            known_fields: None,
            field_prefix: cfg.field_prefix.clone(),
        }
    }

    /// Check the config names only fields events have.
    pub fn validate(&self) -> Result<(), String> {
        for k in self.fields.keys() {
            if !CONTACT_FIELDS.contains(&k.as_str()) {
                return Err(format!(
                    "[mapping.fields] names {k:?}, which events do not carry; use one of {}",
                    CONTACT_FIELDS.join(", ")
                ));
            }
        }
        Ok(())
    }

    /// The CRM field a question key is written to, or `None` when it is skipped.
    pub fn question_field(&self, key: &str) -> Option<String> {
        match self.questions.get(key) {
            Some(s) if s.skip => None,
            Some(FieldSpec { field: Some(f), .. }) => Some(f.clone()),
            None if self.unmapped == Unmapped::Ignore => None,
            _ => {
                let name = (self.profile().question_field)(key);
                Some(if self.profile().prefixed {
                    format!("{}{name}", self.field_prefix)
                } else {
                    name
                })
            }
        }
    }

    /// Every CRM field the mapping may write for the given question keys (to check against
    /// the CRM's metadata at start), with the conversion it will use when known.
    pub fn planned_fields<'a>(
        &self,
        question_keys: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Vec<(String, Option<Conversion>)> {
        let mut out: Vec<(String, Option<Conversion>)> =
            vec![(self.external_id_field.clone(), Some(Conversion::Text))];
        for s in self.fields.values().filter(|s| !s.skip) {
            if let Some(f) = &s.field {
                out.push((f.clone(), s.conversion.or(Some(Conversion::Text))));
            }
        }
        for (key, result_type) in question_keys {
            if let Some(planned) = self.question_plan(key, result_type) {
                out.push(planned);
            }
        }
        out
    }

    /// The field and conversion a question's answers are written with (`None`: skipped): the
    /// configured ones, else the naming rule and the result type's default.
    pub fn question_plan(
        &self,
        key: &str,
        result_type: &str,
    ) -> Option<(String, Option<Conversion>)> {
        let field = self.question_field(key)?;
        let conv = self
            .questions
            .get(key)
            .and_then(|s| s.conversion)
            .or_else(|| (self.profile().conversion)(result_type));
        Some((field, conv))
    }

    /// Map one upsert event: typed fields, or the target's own document (MuleSoft).
    pub fn map(&self, e: &ContactEvent) -> Result<Record, MapError> {
        if let Some(payload) = self.profile().payload {
            return Ok(Record::new(e.trusst_contact_id.clone(), payload(e)));
        }
        let mut shortened = Vec::new();
        let mut fields = Map::new();
        fields.insert(
            self.external_id_field.clone(),
            Value::String(e.trusst_contact_id.clone()),
        );
        for (ev, spec) in &self.fields {
            if spec.skip {
                continue;
            }
            let (Some(field), Some(raw)) = (&spec.field, contact_value(e, ev)) else {
                continue;
            };
            let v = match raw {
                None => Value::Null,
                Some(r) => self
                    .convert(
                        spec.conversion.unwrap_or(Conversion::Text),
                        r,
                        spec,
                        field,
                        &mut shortened,
                    )
                    .map_err(|reason| MapError {
                        field: ev.clone(),
                        reason,
                    })?,
            };
            fields.insert(field.clone(), v);
        }
        for q in &e.universal_questions {
            let Some(field) = self.question_field(&q.question_key) else {
                continue;
            };
            let spec = self
                .questions
                .get(&q.question_key)
                .cloned()
                .unwrap_or_default();
            let conv = spec.conversion.or_else(|| (self.profile().conversion)(&q.result_type)).ok_or_else(|| MapError {
                field: q.question_key.clone(),
                reason: format!(
                    "unknown result type {:?}; set [mapping.questions.{}] type = \"text\" (or another conversion), or skip = true",
                    q.result_type, q.question_key
                ),
            })?;
            let v = match &q.result {
                None => Value::Null,
                Some(r) if r.trim().is_empty() && conv != Conversion::Text => Value::Null,
                Some(r) => self
                    .convert(conv, r, &spec, &field, &mut shortened)
                    .map_err(|reason| MapError {
                        field: q.question_key.clone(),
                        reason,
                    })?,
            };
            fields.insert(field, v);
        }
        // Answers the contact no longer has: their fields are emptied, never left stale.
        for key in e.cleared_question_keys.iter().flatten() {
            let Some(field) = self.question_field(key) else {
                continue;
            };
            if self
                .known_fields
                .as_ref()
                .is_none_or(|k| k.contains(&field))
            {
                fields.entry(field).or_insert(Value::Null);
            }
        }
        Ok(Record {
            contact_id: e.trusst_contact_id.clone(),
            fields,
            shortened,
        })
    }

    /// The record a delete event becomes when the sink is set to clear fields: every mapped
    /// question field set to null, the contact fields kept.
    pub fn cleared(
        &self,
        contact_id: &str,
        question_keys: impl IntoIterator<Item = String>,
    ) -> Record {
        let mut fields = Map::new();
        fields.insert(
            self.external_id_field.clone(),
            Value::String(contact_id.to_owned()),
        );
        for k in question_keys {
            if let Some(f) = self.question_field(&k)
                && self.known_fields.as_ref().is_none_or(|k| k.contains(&f))
            {
                fields.insert(f, Value::Null);
            }
        }
        Record::new(contact_id, fields)
    }

    fn convert(
        &self,
        conv: Conversion,
        raw: &str,
        spec: &FieldSpec,
        field: &str,
        shortened: &mut Vec<Shortened>,
    ) -> Result<Value, String> {
        let t = raw.trim();
        match conv {
            Conversion::Boolean => match t.to_ascii_lowercase().as_str() {
                "true" | "yes" | "y" | "1" | "t" => Ok(Value::Bool(true)),
                "false" | "no" | "n" | "0" | "f" => Ok(Value::Bool(false)),
                _ => Err(format!("Boolean value {raw:?} is not true or false")),
            },
            Conversion::Number => t
                .parse::<f64>()
                .ok()
                .filter(|f| f.is_finite())
                .and_then(serde_json::Number::from_f64)
                .map(|n| {
                    // Keep integers as integers in JSON: `8`, not `8.0`.
                    t.parse::<i64>()
                        .map(Value::from)
                        .unwrap_or(Value::Number(n))
                })
                .ok_or_else(|| format!("Rating value {raw:?} is not a number")),
            Conversion::Integer => t
                .parse::<i64>()
                .map(Value::from)
                .or_else(|_| match t.parse::<f64>() {
                    Ok(f) if f.fract() == 0.0 && f.is_finite() => Ok(Value::from(f as i64)),
                    _ => Err(()),
                })
                .map_err(|_| format!("value {raw:?} is not a whole number")),
            Conversion::Text => {
                let max = spec.max_length.unwrap_or(self.text_max_length);
                let n = raw.chars().count();
                if n <= max {
                    Ok(Value::String(raw.to_owned()))
                } else if self.text_overflow == TextOverflow::Shorten {
                    shortened.push(Shortened {
                        field: field.to_owned(),
                        chars: n,
                        kept: max,
                    });
                    Ok(Value::String(raw.chars().take(max).collect()))
                } else {
                    Err(format!(
                        "text of {n} characters exceeds the field's {max} (text_overflow = \"dead_letter\"); raise \
                         max_length if the CRM field is larger, or set text_overflow = \"shorten\""
                    ))
                }
            }
            Conversion::Picklist => {
                if !spec.labels.is_empty() && !spec.labels.contains_key(t) {
                    return Err(format!(
                        "label {raw:?} is not one of the picklist values {:?}; add it to the picklist or to labels",
                        spec.labels.keys().collect::<Vec<_>>()
                    ));
                }
                Ok(Value::String(t.to_owned()))
            }
            Conversion::OptionSet => {
                let labels = match self.option_sets.get(field) {
                    Some(l) if spec.labels.is_empty() => l,
                    _ => &spec.labels,
                };
                labels.get(t).map(|v| Value::from(*v)).ok_or_else(|| {
                    format!(
                        "label {raw:?} has no option value in column {field} (known: {:?}); add the option to the choice column or to labels",
                        labels.keys().collect::<Vec<_>>()
                    )
                })
            }
            Conversion::DateTime => Ok(Value::String(
                event_time(t)
                    .ok_or_else(|| format!("timestamp {raw:?} is not ISO 8601"))?
                    .to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            )),
        }
    }

    /// Resolve option-set labels for fields that have none, via `lookup(field)` (metadata).
    pub fn fill_option_sets(
        &mut self,
        mut lookup: impl FnMut(&str) -> Option<BTreeMap<String, i64>>,
    ) {
        for spec in self.fields.values_mut().chain(self.questions.values_mut()) {
            if spec.conversion == Some(Conversion::OptionSet)
                && spec.labels.is_empty()
                && let Some(f) = spec.field.clone()
                && let Some(l) = lookup(&f)
            {
                spec.labels = l;
            }
        }
    }

    /// Make sure every question with a Label answer has a spec entry, so metadata can fill it.
    pub fn ensure_question(&mut self, key: &str, result_type: &str) {
        if self
            .questions
            .get(key)
            .is_some_and(|s| s.field.is_some() && s.conversion.is_some())
        {
            return;
        }
        let field = self.question_field(key);
        let conv = (self.profile().conversion)(result_type);
        let s = self.questions.entry(key.to_owned()).or_default();
        if s.field.is_none() {
            s.field = field;
        }
        if s.conversion.is_none() {
            s.conversion = conv;
        }
    }
}

/// A time as the source writes it, in UTC: `timestamp` columns come without zone (taken as
/// UTC, as the guide's script does), `timestamptz` with `Z` or an offset, `date` as a day
/// (its midnight).
pub fn event_time(t: &str) -> Option<chrono::DateTime<chrono::Utc>> {
    if let Ok(z) = chrono::DateTime::parse_from_rfc3339(t) {
        return Some(z.with_timezone(&chrono::Utc));
    }
    if let Ok(n) = chrono::NaiveDateTime::parse_from_str(t, "%Y-%m-%dT%H:%M:%S%.f") {
        return Some(n.and_utc());
    }
    chrono::NaiveDate::parse_from_str(t, "%Y-%m-%d")
        .ok()
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .map(|n| n.and_utc())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Op, QuestionResult, SourcePosition};

    fn event(qs: &[(&str, &str, &str)]) -> ContactEvent {
        ContactEvent {
            schema_version: 1,
            event_id: "e".into(),
            op: Op::Upsert,
            trusst_contact_id: "c-1".into(),
            external_id: Some("ext".into()),
            stream_id: None,
            call_date: Some("2025-01-15T14:23:10".into()),
            call_start_time: None,
            direction: Some("inbound".into()),
            contact_agent_id: Some("agent_john".into()),
            s3_agent_id: Some("john.smith".into()),
            conn_id: Some("REC-001".into()),
            universal_questions: qs
                .iter()
                .map(|(k, t, r)| QuestionResult {
                    question_id: format!("q-{k}"),
                    question_key: (*k).into(),
                    question_text: None,
                    result_type: (*t).into(),
                    question_group: None,
                    result: Some((*r).into()),
                    inference_updated_at: None,
                })
                .collect(),
            source: SourcePosition {
                lsn: "0/1".into(),
                commit_ts: None,
                txid: None,
                reason: "stream".into(),
            },
            truncated: None,
            cleared_question_keys: None,
            customer: None,
        }
    }

    #[test]
    fn times_of_every_column_type_convert_to_utc() {
        let at =
            |t: &str| event_time(t).map(|d| d.to_rfc3339_opts(chrono::SecondsFormat::Millis, true));
        assert_eq!(
            at("2025-01-15T14:23:10").as_deref(),
            Some("2025-01-15T14:23:10.000Z")
        );
        assert_eq!(
            at("2025-01-15T14:23:10.5Z").as_deref(),
            Some("2025-01-15T14:23:10.500Z")
        );
        assert_eq!(
            at("2025-01-15T16:23:10+02:00").as_deref(),
            Some("2025-01-15T14:23:10.000Z")
        );
        assert_eq!(
            at("2025-01-15").as_deref(),
            Some("2025-01-15T00:00:00.000Z")
        );
        assert_eq!(at("15/01/2025"), None);
    }

    #[test]
    fn salesforce_defaults_and_types() {
        let m = Mapping::new(TargetKind::Salesforce, &MappingConfig::default());
        let r = m
            .map(&event(&[
                ("agent_identified", "Boolean", "true"),
                ("quality_score", "Rating", "8"),
                ("call_outcome", "Label", "Good"),
                ("notes", "Paragraph", "long text"),
            ]))
            .unwrap();
        let f = &r.fields;
        assert_eq!(f["Trusst_Contact_ID__c"], "c-1");
        assert_eq!(f["Agent_Identified__c"], true);
        assert_eq!(f["Quality_Score__c"], 8);
        assert_eq!(f["Call_Outcome__c"], "Good");
        assert_eq!(f["Notes__c"], "long text");
        assert_eq!(f["Call_Date__c"], "2025-01-15T14:23:10.000Z");
        assert_eq!(f["Call_Start_Time__c"], Value::Null);
        assert_eq!(f["Agent_ID__c"], "agent_john");
        assert_eq!(f["Connection_ID__c"], "REC-001");
    }

    #[test]
    fn bad_values_are_errors_naming_the_question() {
        let m = Mapping::new(TargetKind::Salesforce, &MappingConfig::default());
        let e = m
            .map(&event(&[("quality_score", "Rating", "abc")]))
            .unwrap_err();
        assert_eq!(e.field, "quality_score");
        assert!(e.reason.contains("not a number"));
        let e = m.map(&event(&[("x", "Emoji", "🙂")])).unwrap_err();
        assert!(e.reason.contains("unknown result type \"Emoji\""), "{e}");
        let e = m.map(&event(&[("b", "Boolean", "maybe")])).unwrap_err();
        assert!(e.reason.contains("not true or false"));
    }

    #[test]
    fn dynamics_option_sets_need_values() {
        let cfg: MappingConfig = crate::config::parse(
            "[questions.call_outcome.labels]\nGood = 100000001\n[fields.direction.labels]\ninbound = 1\noutbound = 2\n",
        )
        .unwrap();
        let m = Mapping::new(TargetKind::Dynamics, &cfg);
        let r = m
            .map(&event(&[
                ("call_outcome", "Label", "Good"),
                ("quality_score", "Rating", "7"),
            ]))
            .unwrap();
        assert_eq!(r.fields["call_outcome"], 100000001);
        assert_eq!(r.fields["quality_score"], 7);
        assert_eq!(r.fields["call_direction"], 1);
        assert_eq!(r.fields["trusst_contact_id"], "c-1");
        assert_eq!(r.fields["calldate"], "2025-01-15T14:23:10.000Z");
        let e = m
            .map(&event(&[("call_outcome", "Label", "Superb")]))
            .unwrap_err();
        assert!(e.reason.contains("no option value"), "{e}");
    }

    #[test]
    fn cleared_answers_become_nulls_where_the_target_has_the_field() {
        let mut m = Mapping::new(TargetKind::Salesforce, &MappingConfig::default());
        let mut e = event(&[("quality_score", "Rating", "7")]);
        e.cleared_question_keys = Some(vec!["empathy_rating".into(), "gone_key".into()]);
        let r = m.map(&e).unwrap();
        assert_eq!(r.fields["Quality_Score__c"], 7.0);
        assert_eq!(r.fields["Empathy_Rating__c"], Value::Null);
        assert_eq!(r.fields["Gone_Key__c"], Value::Null);
        // Where the target's columns are known, only those it has are cleared.
        m.known_fields = Some(["Empathy_Rating__c".to_owned()].into());
        let r = m.map(&e).unwrap();
        assert_eq!(r.fields["Empathy_Rating__c"], Value::Null);
        assert!(!r.fields.contains_key("Gone_Key__c"));
        // MuleSoft gets the keys with the guide's payload.
        let m = Mapping::new(TargetKind::Mulesoft, &MappingConfig::default());
        let r = m.map(&e).unwrap();
        assert_eq!(
            r.fields["cleared_question_keys"],
            serde_json::json!(["empathy_rating", "gone_key"])
        );
    }

    #[test]
    fn option_sets_filled_from_metadata() {
        let mut m = Mapping::new(TargetKind::Dynamics, &MappingConfig::default());
        m.ensure_question("call_outcome", "Label");
        m.fill_option_sets(|f| {
            (f == "call_outcome" || f == "call_direction")
                .then(|| BTreeMap::from([("Good".to_string(), 5), ("inbound".to_string(), 9)]))
        });
        let r = m.map(&event(&[("call_outcome", "Label", "Good")])).unwrap();
        assert_eq!(r.fields["call_outcome"], 5);
        assert_eq!(r.fields["call_direction"], 9);
    }

    #[test]
    fn unlisted_label_questions_use_the_columns_options() {
        let mut m = Mapping::new(TargetKind::Dynamics, &MappingConfig::default());
        m.option_sets.insert(
            "customer_sentiment".into(),
            BTreeMap::from([("Poor".to_string(), 3)]),
        );
        m.option_sets.insert(
            "call_direction".into(),
            BTreeMap::from([("inbound".to_string(), 1)]),
        );
        let r = m
            .map(&event(&[("customer_sentiment", "Label", "Poor")]))
            .unwrap();
        assert_eq!(r.fields["customer_sentiment"], 3);
        assert!(
            m.map(&event(&[("customer_sentiment", "Label", "Meh")]))
                .unwrap_err()
                .reason
                .contains("column customer_sentiment")
        );
    }

    #[test]
    fn overrides_skip_and_text_limit() {
        let cfg: MappingConfig = crate::config::parse(
            "unmapped_questions = \"ignore\"\n[questions.quality_score]\nfield = \"QS__c\"\ntype = \"text\"\nmax_length = 3\n[questions.agent_identified]\nskip = true\n",
        )
        .unwrap();
        let m = Mapping::new(TargetKind::Salesforce, &cfg);
        let r = m
            .map(&event(&[
                ("quality_score", "Rating", "8"),
                ("agent_identified", "Boolean", "true"),
                ("other", "Boolean", "true"),
            ]))
            .unwrap();
        assert_eq!(r.fields["QS__c"], "8");
        assert!(
            !r.fields.contains_key("Agent_Identified__c") && !r.fields.contains_key("Other__c")
        );
        // Longer than the field: shortened to it by default, and the record says so.
        let r = m
            .map(&event(&[("quality_score", "Rating", "1234")]))
            .unwrap();
        assert_eq!(r.fields["QS__c"], "123");
        assert_eq!(
            r.shortened,
            vec![Shortened {
                field: "QS__c".into(),
                chars: 4,
                kept: 3
            }]
        );
        let cfg: MappingConfig = crate::config::parse(
            "text_overflow = \"dead_letter\"\n[questions.quality_score]\nfield = \"QS__c\"\ntype = \"text\"\nmax_length = 3\n",
        )
        .unwrap();
        let m = Mapping::new(TargetKind::Salesforce, &cfg);
        let e = m
            .map(&event(&[("quality_score", "Rating", "1234")]))
            .unwrap_err();
        assert!(e.reason.contains("exceeds the field's 3"), "{e}");
        assert!(e.reason.contains("text_overflow"), "{e}");
    }

    #[test]
    fn a_shortened_text_keeps_whole_characters() {
        let m = Mapping::new(
            TargetKind::Salesforce,
            &crate::config::parse("[questions.s]\ntype = \"text\"\nmax_length = 2\n").unwrap(),
        );
        let r = m.map(&event(&[("s", "Text", "é🙂ab")])).unwrap();
        assert_eq!(r.fields["S__c"], "é🙂");
        assert_eq!(r.shortened[0].chars, 4);
    }

    #[test]
    fn picklist_labels_restrict_values() {
        let cfg: MappingConfig =
            crate::config::parse("[questions.call_outcome.labels]\nGood = 0\nFair = 0\n").unwrap();
        let m = Mapping::new(TargetKind::Salesforce, &cfg);
        assert!(m.map(&event(&[("call_outcome", "Label", "Good")])).is_ok());
        assert!(
            m.map(&event(&[("call_outcome", "Label", "Superb")]))
                .unwrap_err()
                .reason
                .contains("not one of")
        );
    }

    #[test]
    fn mulesoft_is_the_guides_contact_object() {
        let m = Mapping::new(TargetKind::Mulesoft, &MappingConfig::default());
        let r = m
            .map(&event(&[("agent_identified", "Boolean", "true")]))
            .unwrap();
        assert_eq!(r.fields["trusst_contact_id"], "c-1");
        assert_eq!(r.fields["universal_questions"][0]["result"], "true");
        assert_eq!(r.fields["conn_id"], "REC-001");
    }

    #[test]
    fn unknown_contact_field_is_rejected() {
        let cfg: MappingConfig = crate::config::parse("[fields]\ncall_time = \"X__c\"\n").unwrap();
        assert!(
            Mapping::new(TargetKind::Salesforce, &cfg)
                .validate()
                .unwrap_err()
                .contains("call_time")
        );
    }
}
