//! `trusst-cdc questions`: a customer's universal questions (the integration guide's step 1)
//! and, for each target, the field every answer goes to: a starting `[mapping.questions]` to
//! paste into a sink config, and the CRM field type to create. The names come from
//! [`Mapping`], the code the sinks write with, so what is printed is what a sink writes.

use std::path::PathBuf;

use serde::Serialize;

use crate::error::{self, Result};
use crate::sink::config::SinkConfig;
use crate::sink::mapping::{Conversion, Mapping, MappingConfig, TargetKind};

/// One row of the guide's step 1 query.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UniversalQuestion {
    /// `questions.question_id`.
    pub question_id: String,
    /// `questions.key`.
    pub key: String,
    /// `questions.text`.
    pub text: Option<String>,
    /// `questions.result_type`: Boolean, Rating, Label, Paragraph or Summary.
    pub result_type: String,
    /// `questions."group"`.
    pub group: Option<String>,
    /// For a Label question: the answers given so far (at most [`MAX_LABELS`]), the picklist
    /// values or choice labels the CRM field needs.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub labels: Vec<String>,
}

/// Most distinct answers listed for a Label question.
pub const MAX_LABELS: i64 = 50;

/// The universal questions of the database `client` is connected to, in the guide's order
/// (group, then order). The schema is checked first, so a missing column is named with its fix.
pub async fn universal(client: &tokio_postgres::Client) -> Result<Vec<UniversalQuestion>> {
    let plan = crate::source::schema::read(client).await?;
    let rows = client
        .query(&plan.universal_questions_sql(), &[])
        .await
        .map_err(|e| error::pg("reading the universal questions", e))?;
    let mut out = Vec::with_capacity(rows.len());
    for r in &rows {
        let mut q = UniversalQuestion {
            question_id: r.get("question_id"),
            key: r.get::<_, Option<String>>("key").unwrap_or_default(),
            text: r.get("text"),
            result_type: r
                .get::<_, Option<String>>("result_type")
                .unwrap_or_default(),
            group: r.get("group"),
            labels: Vec::new(),
        };
        if q.result_type == "Label" {
            q.labels = client
                .query(
                    "SELECT DISTINCT i.result::text FROM inferences i \
                     WHERE concat(i.question_id) = $1 AND i.result IS NOT NULL ORDER BY 1 LIMIT $2",
                    &[&q.question_id, &MAX_LABELS],
                )
                .await
                .map_err(|e| error::pg("reading the answers of a Label question", e))?
                .iter()
                .map(|r| r.get(0))
                .collect();
        }
        out.push(q);
    }
    Ok(out)
}

/// One target's mapping, from a sink config or the target's defaults.
#[derive(Debug, Clone)]
pub struct Target {
    /// What the mapping is called in the output: the sink's name, or the target's.
    pub name: String,
    /// The sink config it came from, if any.
    pub config: Option<PathBuf>,
    /// The resolved mapping.
    pub mapping: Mapping,
}

impl Target {
    /// The default mapping of each target, as a sink config without `[mapping]` has it.
    pub fn defaults() -> Vec<Target> {
        TargetKind::ALL
            .into_iter()
            .map(|kind| Target {
                name: kind.name().to_owned(),
                config: None,
                mapping: Mapping::new(kind, &MappingConfig::default()),
            })
            .collect()
    }

    /// The mapping of a sink config (its field prefix, names and skips apply).
    pub fn of_sink(path: PathBuf, cfg: &SinkConfig) -> Target {
        Target {
            name: cfg.sink.name.clone(),
            config: Some(path),
            mapping: Mapping::new(cfg.sink.target, &cfg.mapping),
        }
    }
}

/// Where one question's answers go in one target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Placement {
    /// The sink's (or target's) name.
    pub target: String,
    /// `salesforce`, `dynamics` or `mulesoft`.
    pub kind: &'static str,
    /// The CRM field (Salesforce field API name, Dataverse column logical name) or, for
    /// MuleSoft, the `question_key` in the payload's `universal_questions`; `None`: not written.
    pub field: Option<String>,
    /// The conversion (`type` in `[mapping.questions]`); `None` for an unknown result type.
    pub conversion: Option<&'static str>,
    /// The field type to create in the CRM.
    pub crm_type: String,
}

/// A question with its placement in every target.
#[derive(Debug, Clone, Serialize)]
pub struct Planned {
    /// The question.
    #[serde(flatten)]
    pub question: UniversalQuestion,
    /// One per target, in the order given.
    pub targets: Vec<Placement>,
}

/// Everything `questions` prints.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The source's customer.
    pub customer: String,
    /// The questions with their placements.
    pub questions: Vec<Planned>,
}

/// The CRM field type to create for a conversion, as the target's profile names it.
fn crm_type(kind: TargetKind, conv: Option<Conversion>) -> String {
    match conv {
        Some(c) => (kind.profile().field_type)(c).to_owned(),
        None if kind.profile().payload.is_some() => {
            (kind.profile().field_type)(Conversion::Text).to_owned()
        }
        None => "unknown result type: set type in [mapping.questions]".to_owned(),
    }
}

/// Place every question in every target.
pub fn plan(customer: &str, questions: Vec<UniversalQuestion>, targets: &[Target]) -> Report {
    let questions = questions
        .into_iter()
        .map(|q| {
            let placements = targets
                .iter()
                .map(|t| {
                    let kind = t.mapping.target;
                    let planned = t.mapping.question_plan(&q.key, &q.result_type);
                    let conv = planned.as_ref().and_then(|(_, c)| *c);
                    let mut crm_type = crm_type(kind, conv);
                    if matches!(conv, Some(Conversion::Picklist | Conversion::OptionSet)) {
                        crm_type = match q.labels.as_slice() {
                            [] => format!("{crm_type}; no answers yet"),
                            l => format!("{crm_type}; answered so far: {}", l.join(", ")),
                        };
                    }
                    Placement {
                        target: t.name.clone(),
                        kind: kind.name(),
                        field: planned.map(|(f, _)| f),
                        conversion: conv.map(Conversion::name),
                        crm_type,
                    }
                })
                .collect();
            Planned {
                question: q,
                targets: placements,
            }
        })
        .collect();
    Report {
        customer: customer.to_owned(),
        questions,
    }
}

/// A TOML string, quoted and escaped.
fn quote(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

/// The report for a terminal: the questions, then per target a `[mapping.questions]` block to
/// paste into its sink config (MuleSoft takes the guide's payload as it is: its keys are listed
/// as comments).
pub fn render(r: &Report, targets: &[Target]) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "customer {}: {} universal questions",
        r.customer,
        r.questions.len()
    );
    for p in &r.questions {
        let q = &p.question;
        let _ = writeln!(
            s,
            "  {:<24} {:<10} {:<12} {:<28} {}",
            q.key,
            q.result_type,
            q.group.as_deref().unwrap_or("-"),
            q.question_id,
            q.text.as_deref().unwrap_or("")
        );
    }
    for (i, t) in targets.iter().enumerate() {
        let m = &t.mapping;
        let origin = t
            .config
            .as_ref()
            .map(|p| format!("the [mapping] of {}", p.display()))
            .unwrap_or_else(|| format!("connector-config/{}.toml", m.target.name()));
        s.push('\n');
        // A target that takes the event as one document has no fields to create: its keys
        // are listed as comments.
        match m.profile().payload {
            Some(_) => {
                let _ = writeln!(
                    s,
                    "# {}: the guide's payload, unchanged; each answer is the `result` of the\n\
                     # universal_questions entry with its question_key ({origin}):",
                    t.name
                );
            }
            None => {
                let _ = writeln!(
                    s,
                    "# {}: object {}, upsert on {}. Create each field below; this block is the [mapping.questions] of {origin}.",
                    t.name, m.object, m.external_id_field
                );
                s.push_str("[mapping.questions]\n");
            }
        }
        for p in &r.questions {
            let place = &p.targets[i];
            let key = &p.question.key;
            let line = match (
                m.profile().payload.is_some(),
                &place.field,
                place.conversion,
            ) {
                (_, None, _) => {
                    format!("# {key}: not written (skip, or unmapped_questions = \"ignore\")")
                }
                (true, Some(f), _) => {
                    format!("#   {f:<24} {} answer", p.question.result_type)
                }
                (_, Some(f), Some(c)) => format!(
                    "{} = {{ field = {}, type = {} }}  # {}",
                    toml_key(key),
                    quote(f),
                    quote(c),
                    place.crm_type
                ),
                (_, Some(f), None) => format!(
                    "{} = {{ field = {} }}  # {}: {}",
                    toml_key(key),
                    quote(f),
                    p.question.result_type,
                    place.crm_type
                ),
            };
            s.push_str(&line);
            s.push('\n');
        }
    }
    s
}

/// A bare TOML key when it can be one, else quoted.
fn toml_key(k: &str) -> String {
    if !k.is_empty()
        && k.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        k.to_owned()
    } else {
        quote(k)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(key: &str, rt: &str) -> UniversalQuestion {
        UniversalQuestion {
            question_id: format!("q-{key}"),
            key: key.into(),
            text: Some("Did \"it\" work?".into()),
            result_type: rt.into(),
            group: Some("Compliance".into()),
            labels: vec!["Good".into(), "Poor".into()],
        }
    }

    /// The printed blocks parse as `[mapping]` and name the fields the sinks write.
    #[test]
    fn printed_blocks_are_the_sinks_own_mapping() {
        let targets = Target::defaults();
        let r = plan(
            "acme",
            vec![
                q("agent_identified", "Boolean"),
                q("odd key", "Label"),
                q("x", "Mood"),
            ],
            &targets,
        );
        let text = render(&r, &targets);
        assert!(
            text.starts_with("customer acme: 3 universal questions"),
            "{text}"
        );
        let blocks: Vec<&str> = text.split("\n\n").skip(1).collect();
        assert_eq!(blocks.len(), 3, "{text}");
        for (block, t) in blocks.iter().zip(&targets) {
            let cfg: toml::Table = toml::from_str(block).unwrap_or_else(|e| panic!("{e}\n{block}"));
            if t.mapping.profile().payload.is_some() {
                assert!(cfg.is_empty(), "{block}");
                assert!(block.contains("#   agent_identified"), "{block}");
                continue;
            }
            let m: MappingConfig = cfg["mapping"].clone().try_into().unwrap();
            let printed = Mapping::new(t.mapping.target, &m);
            for key in ["agent_identified", "odd key", "x"] {
                assert_eq!(
                    printed.question_field(key),
                    t.mapping.question_field(key),
                    "{key}\n{block}"
                );
            }
        }
        assert!(text.contains("agent_identified = { field = \"Agent_Identified__c\", type = \"boolean\" }  # Checkbox"), "{text}");
        assert!(text.contains("\"odd key\" = { field = \"odd key\", type = \"option_set\" }  # Choice (values read from the column at start); answered so far: Good, Poor"), "{text}");
        assert!(
            text.contains("x = { field = \"X__c\" }  # Mood: unknown result type"),
            "{text}"
        );
    }
}
