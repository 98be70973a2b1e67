//! Dataverse metadata: reading the attribute listing and option sets, and checking a mapping
//! against them (pure, no I/O).

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;

use crate::sink::mapping::{Conversion, Mapping};

/// One column of a table, from `EntityDefinitions(...)/Attributes`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Attribute {
    /// Column logical name, e.g. `trusst_quality_score`.
    #[serde(rename = "LogicalName")]
    pub logical_name: String,
    /// `AttributeType`: Boolean, Integer, String, Memo, Picklist, DateTime...
    #[serde(rename = "AttributeType", default)]
    pub attribute_type: String,
}

impl Attribute {
    /// True for the choice types whose value is an option number.
    pub fn is_choice(&self) -> bool {
        matches!(
            self.attribute_type.as_str(),
            "Picklist" | "State" | "Status"
        )
    }

    /// The metadata type to cast to when reading this column's options.
    pub fn metadata_cast(&self) -> &'static str {
        match self.attribute_type.as_str() {
            "State" => "Microsoft.Dynamics.CRM.StateAttributeMetadata",
            "Status" => "Microsoft.Dynamics.CRM.StatusAttributeMetadata",
            _ => "Microsoft.Dynamics.CRM.PicklistAttributeMetadata",
        }
    }
}

#[derive(Deserialize)]
struct Listing<T> {
    value: Vec<T>,
}

/// The columns in an attribute listing (`{"value":[{"LogicalName","AttributeType"}...]}`).
pub fn parse_attributes(body: &str) -> Result<Vec<Attribute>, String> {
    serde_json::from_str::<Listing<Attribute>>(body)
        .map(|l| l.value)
        .map_err(|e| format!("unexpected attribute listing: {e}"))
}

/// Label -> value of one option set object `{"Options":[{"Value","Label":{"UserLocalizedLabel":{"Label"}}}]}`.
/// The user's localized label is preferred; the first localized label is the fallback.
fn options(set: &Value) -> Option<BTreeMap<String, i64>> {
    let opts = set.get("Options")?.as_array()?;
    Some(
        opts.iter()
            .filter_map(|o| {
                let value = o.get("Value")?.as_i64()?;
                let label = o.get("Label")?;
                let text = label
                    .get("UserLocalizedLabel")
                    .and_then(|l| l.get("Label"))
                    .and_then(Value::as_str)
                    .or_else(|| {
                        label
                            .get("LocalizedLabels")?
                            .as_array()?
                            .first()?
                            .get("Label")?
                            .as_str()
                    })?;
                Some((text.to_owned(), value))
            })
            .collect(),
    )
}

/// Labels of one attribute's metadata object: its local `OptionSet`, or the `GlobalOptionSet`
/// when the column uses a global choice (then `OptionSet` is null).
pub fn attribute_options(attr: &Value) -> Option<BTreeMap<String, i64>> {
    attr.get("OptionSet")
        .filter(|v| !v.is_null())
        .and_then(options)
        .or_else(|| attr.get("GlobalOptionSet").and_then(options))
}

/// The options of one column from its `PicklistAttributeMetadata` response.
pub fn parse_option_set(body: &str) -> Result<BTreeMap<String, i64>, String> {
    let v: Value =
        serde_json::from_str(body).map_err(|e| format!("unexpected option set metadata: {e}"))?;
    attribute_options(&v).ok_or_else(|| {
        "option set metadata has neither OptionSet nor GlobalOptionSet options".to_owned()
    })
}

/// Every column's options from a listing of `PicklistAttributeMetadata` (`{"value":[...]}`).
pub fn parse_option_sets(body: &str) -> Result<BTreeMap<String, BTreeMap<String, i64>>, String> {
    let l: Listing<Value> =
        serde_json::from_str(body).map_err(|e| format!("unexpected option set listing: {e}"))?;
    Ok(l.value
        .iter()
        .filter_map(|a| {
            Some((
                a.get("LogicalName")?.as_str()?.to_owned(),
                attribute_options(a)?,
            ))
        })
        .collect())
}

/// Whether a column of this `AttributeType` can take values of a conversion.
pub fn fits(conv: Conversion, attribute_type: &str) -> bool {
    let ok: &[&str] = match conv {
        Conversion::Boolean => &["Boolean"],
        Conversion::Number | Conversion::Integer => &["Integer", "Decimal", "Double", "BigInt"],
        // A Salesforce-style picklist conversion writes the label as text.
        Conversion::Text | Conversion::Picklist => &["String", "Memo"],
        Conversion::OptionSet => &["Picklist", "State", "Status"],
        Conversion::DateTime => &["DateTime"],
    };
    ok.contains(&attribute_type)
}

/// The config key that decides which column a field goes to, for error messages.
pub fn config_key(mapping: &Mapping, field: &str) -> String {
    if mapping.external_id_field == field {
        return "[mapping] external_id_field".to_owned();
    }
    if let Some((ev, _)) = mapping
        .fields
        .iter()
        .find(|(_, s)| s.field.as_deref() == Some(field))
    {
        return format!("[mapping.fields] {ev} (or [mapping] field_prefix)");
    }
    if let Some(key) = mapping
        .questions
        .keys()
        .find(|k| mapping.question_field(k).as_deref() == Some(field))
    {
        return format!("[mapping.questions.{key}] field (or skip = true)");
    }
    "[mapping]".to_owned()
}

/// Check every planned `(field, conversion)` against the table's columns; one line per
/// problem, naming the column and the config key that fixes it.
pub fn check_fields(
    mapping: &Mapping,
    planned: &[(String, Option<Conversion>)],
    attrs: &[Attribute],
) -> Vec<String> {
    let by_name: BTreeMap<&str, &Attribute> =
        attrs.iter().map(|a| (a.logical_name.as_str(), a)).collect();
    let mut problems = Vec::new();
    let mut seen: Vec<(&str, Option<Conversion>)> = Vec::new();
    for (field, conv) in planned {
        if seen.contains(&(field.as_str(), *conv)) {
            continue;
        }
        seen.push((field.as_str(), *conv));
        match by_name.get(field.as_str()) {
            None => problems.push(format!(
                "table '{}' has no column '{field}': create it, or change {}",
                mapping.object,
                config_key(mapping, field)
            )),
            Some(a) => {
                if let Some(c) = conv
                    && !fits(*c, &a.attribute_type)
                {
                    problems.push(format!(
                        "column '{field}' is of type {} but is written as {}: change the column, or set type in {}",
                        a.attribute_type,
                        c.name(),
                        config_key(mapping, field)
                    ));
                }
            }
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sink::mapping::{MappingConfig, TargetKind};

    #[test]
    fn attribute_listing() {
        let body = r##"{"@odata.context":"x","value":[
            {"@odata.type":"#Microsoft.Dynamics.CRM.StringAttributeMetadata","LogicalName":"trusst_contact_id","AttributeType":"String","MetadataId":"1"},
            {"LogicalName":"call_direction","AttributeType":"Picklist","IsCustomAttribute":true},
            {"LogicalName":"statecode","AttributeType":"State","IsCustomAttribute":false}]}"##;
        let a = parse_attributes(body).unwrap();
        assert_eq!(a.len(), 3);
        assert_eq!(a[0].attribute_type, "String");
        assert!(a[1].is_choice() && a[2].is_choice() && !a[0].is_choice());
        assert_eq!(
            a[2].metadata_cast(),
            "Microsoft.Dynamics.CRM.StateAttributeMetadata"
        );
        assert!(parse_attributes("{}").is_err());
    }

    #[test]
    fn local_and_global_option_sets() {
        let local = r#"{"LogicalName":"call_direction","OptionSet":{"Options":[
            {"Value":100000000,"Label":{"LocalizedLabels":[{"Label":"inbound","LanguageCode":1033}],"UserLocalizedLabel":{"Label":"inbound","LanguageCode":1033}}},
            {"Value":100000001,"Label":{"LocalizedLabels":[{"Label":"outbound"}],"UserLocalizedLabel":null}}]},"GlobalOptionSet":null}"#;
        assert_eq!(
            parse_option_set(local).unwrap(),
            BTreeMap::from([
                ("inbound".to_owned(), 100000000),
                ("outbound".to_owned(), 100000001)
            ])
        );
        let global = r#"{"LogicalName":"call_outcome","OptionSet":null,"GlobalOptionSet":{"Options":[
            {"Value":1,"Label":{"UserLocalizedLabel":{"Label":"Good"}}}]}}"#;
        assert_eq!(
            parse_option_set(global).unwrap(),
            BTreeMap::from([("Good".to_owned(), 1)])
        );
        assert!(
            parse_option_set(r#"{"LogicalName":"x","OptionSet":null,"GlobalOptionSet":null}"#)
                .is_err()
        );
        let listing = format!(r#"{{"value":[{local},{global}]}}"#);
        let all = parse_option_sets(&listing).unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!(all["call_outcome"]["Good"], 1);
    }

    #[test]
    fn type_fit() {
        assert!(fits(Conversion::Boolean, "Boolean"));
        assert!(fits(Conversion::Integer, "Decimal") && fits(Conversion::Number, "BigInt"));
        assert!(fits(Conversion::Text, "Memo") && !fits(Conversion::Text, "Picklist"));
        assert!(fits(Conversion::OptionSet, "Status") && !fits(Conversion::OptionSet, "String"));
        assert!(fits(Conversion::DateTime, "DateTime") && !fits(Conversion::Boolean, "String"));
    }

    #[test]
    fn problems_name_the_column_and_the_config_key() {
        let cfg: MappingConfig =
            crate::config::parse("[questions.quality_score]\nfield = \"qs\"\n").unwrap();
        let m = Mapping::new(TargetKind::Dynamics, &cfg);
        let attr = |n: &str, t: &str| Attribute {
            logical_name: n.into(),
            attribute_type: t.into(),
        };
        let attrs = vec![
            attr("trusst_contact_id", "String"),
            attr("external_id", "String"),
            attr("calldate", "String"),
            attr("call_start_time", "DateTime"),
            attr("call_direction", "Picklist"),
            attr("agentid", "String"),
            attr("s3_agent_id", "String"),
        ];
        let planned =
            m.planned_fields([("quality_score", "Rating"), ("agent_identified", "Boolean")]);
        let p = check_fields(&m, &planned, &attrs);
        assert_eq!(p.len(), 4, "{p:#?}");
        assert!(p.iter().any(|l| {
            l.contains("'calldate' is of type String but is written as date_time")
                && l.contains("[mapping.fields] call_date")
        }));
        assert!(
            p.iter().any(|l| l.contains("no column 'connection_id'")
                && l.contains("[mapping.fields] conn_id"))
        );
        assert!(p.iter().any(|l| l.contains("no column 'qs'")
            && l.contains("[mapping.questions.quality_score] field")));
        assert!(p.iter().any(|l| l.contains("no column 'agent_identified'")));
    }
}
