//! Which contacts a row change touches (pure: no I/O, unit-tested).
//!
//! Follows DESIGN.md's triggers: an inference of a universal question, the contact row itself,
//! its s3_conversations row, and question changes (resolved by the caller against its question
//! cache, since only it knows whether a question was universal before).

use std::collections::HashMap;

use super::pgoutput::{Message, Relation, Value};

/// The tables the connector reads.
pub const TABLES: [&str; 4] = ["contacts", "inferences", "questions", "s3_conversations"];

/// A question row as carried by the WAL; `None` fields were unchanged TOASTed values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuestionRow {
    /// `question_id`.
    pub question_id: String,
    /// `key`.
    pub key: Option<String>,
    /// `text`.
    pub text: Option<String>,
    /// `result_type`.
    pub result_type: Option<String>,
    /// `"group"`.
    pub group: Option<String>,
    /// `is_universal`.
    pub is_universal: Option<bool>,
}

/// What a change means for the event stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Re-read and publish this contact (if COMPLETED).
    Touch(String),
    /// The contact row was inserted or updated; `stage` is its new `current_stage` when the
    /// WAL carries it, so a contact known not to be COMPLETED need not be re-read.
    Contact {
        contact_id: String,
        stage: Option<String>,
    },
    /// An inference changed: touch the contact if the question is (or was) universal.
    Inference {
        contact_id: String,
        question_id: Option<String>,
    },
    /// The contact row is gone: publish a delete event and a tombstone.
    ContactDeleted(String),
    /// A question was inserted or updated (`Some`) or deleted (`None` row, id only).
    Question {
        question_id: String,
        row: Option<QuestionRow>,
    },
    /// These tables were truncated.
    Truncated(Vec<String>),
    /// A change whose contact cannot be known from the WAL; reported, with the fix.
    Unattributable { table: String, reason: String },
}

/// Tracks relation shapes and maps change messages to [`Effect`]s.
#[derive(Debug, Default)]
pub struct Tracker {
    relations: HashMap<u32, Relation>,
}

fn text(rel: &Relation, tuple: &[Value], column: &str) -> Option<String> {
    let i = rel.columns.iter().position(|c| c.name == column)?;
    tuple.get(i)?.as_str().map(str::to_owned)
}

fn question_row(rel: &Relation, tuple: &[Value]) -> Option<QuestionRow> {
    Some(QuestionRow {
        question_id: text(rel, tuple, "question_id")?,
        key: text(rel, tuple, "key"),
        text: text(rel, tuple, "text"),
        result_type: text(rel, tuple, "result_type"),
        group: text(rel, tuple, "group"),
        is_universal: text(rel, tuple, "is_universal").map(|v| super::schema::flag_text(&v)),
    })
}

impl Tracker {
    /// A tracker that has seen no relation yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// The table name of a relation id, when known.
    pub fn table(&self, id: u32) -> Option<&str> {
        self.relations.get(&id).map(|r| r.name.as_str())
    }

    /// Interpret one decoded message.
    pub fn effects(&mut self, msg: Message) -> Vec<Effect> {
        match msg {
            Message::Relation(rel) => {
                self.relations.insert(rel.id, rel);
                vec![]
            }
            Message::Insert { relation, new } => self.row(relation, None, Some(&new), false),
            Message::Update { relation, old, new } => self.row(
                relation,
                old.as_ref().map(|(_, t)| t.as_slice()),
                Some(&new),
                false,
            ),
            Message::Delete {
                relation,
                old: (_, old),
            } => self.row(relation, Some(&old), None, true),
            Message::Truncate { relations, .. } => {
                let names = relations
                    .iter()
                    .map(|id| {
                        self.table(*id)
                            .map_or_else(|| format!("relation {id}"), str::to_owned)
                    })
                    .collect();
                vec![Effect::Truncated(names)]
            }
            _ => vec![],
        }
    }

    fn row(
        &self,
        relation: u32,
        old: Option<&[Value]>,
        new: Option<&[Value]>,
        delete: bool,
    ) -> Vec<Effect> {
        let Some(rel) = self.relations.get(&relation) else {
            return vec![Effect::Unattributable {
                table: format!("relation {relation}"),
                reason:
                    "change for a relation that was never described; the stream is out of order"
                        .into(),
            }];
        };
        let images: Vec<&[Value]> = [old, new].into_iter().flatten().collect();
        let ids = |col: &str| -> Vec<String> {
            let mut v: Vec<String> = images.iter().filter_map(|t| text(rel, t, col)).collect();
            v.dedup();
            v
        };
        match rel.name.as_str() {
            "contacts" => {
                let id = ids("contact_id");
                if delete {
                    id.into_iter().map(Effect::ContactDeleted).collect()
                } else {
                    let stage = new.and_then(|t| text(rel, t, "current_stage"));
                    id.into_iter()
                        .map(|contact_id| Effect::Contact {
                            contact_id,
                            stage: stage.clone(),
                        })
                        .collect()
                }
            }
            "inferences" | "s3_conversations" => {
                let contact_ids = ids("contact_id");
                if contact_ids.is_empty() {
                    return vec![Effect::Unattributable {
                        table: rel.name.clone(),
                        reason: format!(
                            "a {} of {} carries no contact_id; fix: ALTER TABLE {} REPLICA IDENTITY FULL, or a \
                             replica identity index that contains contact_id (see `trusst-cdc check`)",
                            if delete { "delete" } else { "change" },
                            rel.name,
                            rel.name
                        ),
                    }];
                }
                if rel.name == "s3_conversations" {
                    return contact_ids.into_iter().map(Effect::Touch).collect();
                }
                // An update may move an inference to another question; both sides count.
                let question_ids = ids("question_id");
                let mut out = Vec::new();
                for contact_id in contact_ids {
                    if question_ids.is_empty() {
                        out.push(Effect::Inference {
                            contact_id: contact_id.clone(),
                            question_id: None,
                        });
                    }
                    for q in &question_ids {
                        out.push(Effect::Inference {
                            contact_id: contact_id.clone(),
                            question_id: Some(q.clone()),
                        });
                    }
                }
                out
            }
            "questions" => {
                if delete {
                    ids("question_id")
                        .into_iter()
                        .map(|question_id| Effect::Question {
                            question_id,
                            row: None,
                        })
                        .collect()
                } else {
                    new.and_then(|t| question_row(rel, t))
                        .map(|row| Effect::Question {
                            question_id: row.question_id.clone(),
                            row: Some(row),
                        })
                        .into_iter()
                        .collect()
                }
            }
            _ => vec![],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::pgoutput::{Column, OldKind};
    use super::*;

    fn rel(id: u32, name: &str, cols: &[&str]) -> Message<'static> {
        Message::Relation(Relation {
            id,
            namespace: "public".into(),
            name: name.into(),
            replica_identity: b'f',
            columns: cols
                .iter()
                .map(|c| Column {
                    key: false,
                    name: (*c).into(),
                    type_oid: 25,
                    type_modifier: -1,
                })
                .collect(),
        })
    }

    fn t(v: &str) -> Value<'_> {
        Value::Text(v.as_bytes())
    }

    #[test]
    fn contact_update_and_delete() {
        let mut tr = Tracker::new();
        tr.effects(rel(1, "contacts", &["contact_id", "current_stage"]));
        let e = tr.effects(Message::Update {
            relation: 1,
            old: None,
            new: vec![t("c1"), t("COMPLETED")],
        });
        assert_eq!(
            e,
            vec![Effect::Contact {
                contact_id: "c1".into(),
                stage: Some("COMPLETED".into())
            }]
        );
        let e = tr.effects(Message::Insert {
            relation: 1,
            new: vec![t("c2"), t("INFERENCE")],
        });
        assert_eq!(
            e,
            vec![Effect::Contact {
                contact_id: "c2".into(),
                stage: Some("INFERENCE".into())
            }]
        );
        let e = tr.effects(Message::Update {
            relation: 1,
            old: None,
            new: vec![t("c3"), Value::UnchangedToast],
        });
        assert_eq!(
            e,
            vec![Effect::Contact {
                contact_id: "c3".into(),
                stage: None
            }]
        );
        let e = tr.effects(Message::Delete {
            relation: 1,
            old: (OldKind::Key, vec![t("c1"), Value::Null]),
        });
        assert_eq!(e, vec![Effect::ContactDeleted("c1".into())]);
    }

    #[test]
    fn inference_with_toasted_result_still_names_contact() {
        let mut tr = Tracker::new();
        tr.effects(rel(
            2,
            "inferences",
            &["inference_id", "contact_id", "question_id", "result"],
        ));
        let e = tr.effects(Message::Update {
            relation: 2,
            old: None,
            new: vec![t("i1"), t("c1"), t("q1"), Value::UnchangedToast],
        });
        assert_eq!(
            e,
            vec![Effect::Inference {
                contact_id: "c1".into(),
                question_id: Some("q1".into())
            }]
        );
    }

    #[test]
    fn inference_delete_without_full_identity_is_reported() {
        let mut tr = Tracker::new();
        tr.effects(rel(
            2,
            "inferences",
            &["inference_id", "contact_id", "question_id", "result"],
        ));
        let e = tr.effects(Message::Delete {
            relation: 2,
            old: (
                OldKind::Key,
                vec![t("i1"), Value::Null, Value::Null, Value::Null],
            ),
        });
        assert!(
            matches!(&e[0], Effect::Unattributable { reason, .. } if reason.contains("REPLICA IDENTITY FULL"))
        );
    }

    #[test]
    fn question_changes_and_truncate() {
        let mut tr = Tracker::new();
        tr.effects(rel(
            3,
            "questions",
            &[
                "question_id",
                "key",
                "text",
                "result_type",
                "is_universal",
                "group",
            ],
        ));
        let e = tr.effects(Message::Insert {
            relation: 3,
            new: vec![
                t("q1"),
                t("k"),
                Value::UnchangedToast,
                t("Boolean"),
                t("t"),
                Value::Null,
            ],
        });
        let Effect::Question { row: Some(row), .. } = &e[0] else {
            panic!("{e:?}")
        };
        assert_eq!(row.is_universal, Some(true));
        assert_eq!(row.text, None);
        let e = tr.effects(Message::Truncate {
            options: 0,
            relations: vec![3, 99],
        });
        assert_eq!(
            e,
            vec![Effect::Truncated(vec![
                "questions".into(),
                "relation 99".into()
            ])]
        );
    }

    #[test]
    fn unrelated_tables_do_nothing() {
        let mut tr = Tracker::new();
        tr.effects(rel(4, "audit_log", &["contact_id"]));
        assert!(
            tr.effects(Message::Insert {
                relation: 4,
                new: vec![t("c1")]
            })
            .is_empty()
        );
    }
}
