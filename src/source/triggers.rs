//! Which contacts a row change touches (pure: no I/O, unit-tested).
//!
//! Follows DESIGN.md's triggers: an inference of a universal question, the contact row itself,
//! its s3_conversations row, and question changes (resolved by the caller against its question
//! cache, since only it knows whether a question was universal before).

use std::collections::HashMap;

use super::pgoutput::{Message, OldKind, Relation, Value};

/// The tables the connector reads.
pub const TABLES: [&str; 4] = ["contacts", "inferences", "questions", "s3_conversations"];

/// A column of a question row as carried by the WAL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Field<T> {
    /// The column's new value (`None`: SQL NULL).
    Set(Option<T>),
    /// An unchanged TOASTed value, or a column the message does not carry: the cached value
    /// still holds.
    Unchanged,
}

impl<T: Clone> Field<T> {
    /// The value after the change, given the one before.
    pub fn or(self, before: Option<&T>) -> Option<T> {
        match self {
            Field::Set(v) => v,
            Field::Unchanged => before.cloned(),
        }
    }
}

/// A question row as carried by the WAL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuestionRow {
    /// `question_id`.
    pub question_id: String,
    /// `key`.
    pub key: Field<String>,
    /// `text`.
    pub text: Field<String>,
    /// `result_type`.
    pub result_type: Field<String>,
    /// `"group"`.
    pub group: Field<String>,
    /// `is_universal` (NULL reads as false, as the SQL side's `coalesce` does).
    pub is_universal: Field<bool>,
}

/// What a change means for the event stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Re-read and publish this contact (if COMPLETED).
    Touch(String),
    /// The contact row was inserted or updated; `stage` is its new `current_stage` when the
    /// WAL carries it (trailing blanks removed, as a `char(n)` column pads them), so a contact
    /// known not to be COMPLETED need not be re-read.
    Contact {
        contact_id: String,
        stage: Option<String>,
        /// Whether the row was COMPLETED before the change, when the WAL carries the old stage
        /// (REPLICA IDENTITY FULL, or an identity index that contains `current_stage`).
        was_completed: Option<bool>,
    },
    /// An inference changed: touch the contact if the question is (or was) universal;
    /// `question_id` is `None` when the old question cannot be known.
    Inference {
        contact_id: String,
        question_id: Option<String>,
    },
    /// The contact row is gone: publish a delete event and a tombstone.
    ContactDeleted(String),
    /// A question was inserted or updated (`Some`) or deleted (`None` row, id only).
    Question {
        question_id: String,
        row: Option<Box<QuestionRow>>,
        /// The row before an update or delete, when the WAL carries the whole old row
        /// (REPLICA IDENTITY FULL): a replayed rename still names its old key.
        old: Option<Box<QuestionRow>>,
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
    /// The schema of each table the connector reads, when known: a table of the same name in
    /// another schema is not one of them.
    schemas: HashMap<String, String>,
}

/// Which kind of row change a message is.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Change {
    Insert,
    Update,
    Delete,
}

/// One row image of a change.
#[derive(Clone, Copy)]
struct Image<'t, 'a> {
    values: &'t [Value<'a>],
    /// Only the replica identity's columns are real; the others are sent as NULL.
    key_only: bool,
}

/// What an image says about a column.
enum Seen {
    Value(String),
    Null,
    /// Not in this image: absent from the relation, an unchanged TOASTed value, or a column
    /// outside the identity of a key-only image.
    Unknown,
}

fn column(rel: &Relation, image: Image, name: &str) -> Seen {
    let Some(i) = rel.columns.iter().position(|c| c.name == name) else {
        return Seen::Unknown;
    };
    match image.values.get(i) {
        Some(Value::Null) if image.key_only && !rel.columns[i].key => Seen::Unknown,
        Some(Value::Null) => Seen::Null,
        Some(v @ Value::Text(_)) => v
            .as_str()
            .map_or(Seen::Unknown, |s| Seen::Value(s.to_owned())),
        _ => Seen::Unknown,
    }
}

fn text(rel: &Relation, image: Image, name: &str) -> Option<String> {
    match column(rel, image, name) {
        Seen::Value(v) => Some(v),
        _ => None,
    }
}

fn field(rel: &Relation, image: Image, name: &str) -> Field<String> {
    match column(rel, image, name) {
        Seen::Value(v) => Field::Set(Some(v)),
        Seen::Null => Field::Set(None),
        Seen::Unknown => Field::Unchanged,
    }
}

fn question_row(rel: &Relation, image: Image) -> Option<QuestionRow> {
    let is_universal = match field(rel, image, "is_universal") {
        Field::Set(v) => Field::Set(Some(v.is_some_and(|v| super::schema::flag_text(&v)))),
        Field::Unchanged => Field::Unchanged,
    };
    Some(QuestionRow {
        question_id: text(rel, image, "question_id")?,
        key: field(rel, image, "key"),
        text: field(rel, image, "text"),
        result_type: field(rel, image, "result_type"),
        group: field(rel, image, "group"),
        is_universal,
    })
}

impl Tracker {
    /// A tracker that has seen no relation yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Take only the connector's tables from these schemas (`table -> schema`, as the
    /// database resolves the unqualified names the queries use).
    pub fn with_schemas(schemas: HashMap<String, String>) -> Self {
        Self {
            relations: HashMap::new(),
            schemas,
        }
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
            Message::Insert { relation, new } => self.row(
                relation,
                Change::Insert,
                None,
                Some(Image {
                    values: &new,
                    key_only: false,
                }),
            ),
            Message::Update { relation, old, new } => self.row(
                relation,
                Change::Update,
                old.as_ref().map(|(kind, t)| Image {
                    values: t,
                    key_only: *kind == OldKind::Key,
                }),
                Some(Image {
                    values: &new,
                    key_only: false,
                }),
            ),
            Message::Delete {
                relation,
                old: (kind, old),
            } => self.row(
                relation,
                Change::Delete,
                Some(Image {
                    values: &old,
                    key_only: kind == OldKind::Key,
                }),
                None,
            ),
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
        change: Change,
        old: Option<Image>,
        new: Option<Image>,
    ) -> Vec<Effect> {
        let delete = change == Change::Delete;
        let Some(rel) = self.relations.get(&relation) else {
            return vec![Effect::Unattributable {
                table: format!("relation {relation}"),
                reason:
                    "change for a relation that was never described; the stream is out of order"
                        .into(),
            }];
        };
        if self
            .schemas
            .get(&rel.name)
            .is_some_and(|schema| *schema != rel.namespace)
        {
            return vec![];
        }
        let images: Vec<Image> = [old, new].into_iter().flatten().collect();
        // The ids an image carries; `unknown` when one of them cannot tell (no value).
        let ids = |col: &str| -> (Vec<String>, bool) {
            let mut v = Vec::new();
            let mut unknown = false;
            for image in &images {
                match column(rel, *image, col) {
                    Seen::Value(s) => {
                        if !v.contains(&s) {
                            v.push(s);
                        }
                    }
                    Seen::Null => {}
                    Seen::Unknown => unknown = true,
                }
            }
            (v, unknown)
        };
        match rel.name.as_str() {
            "contacts" => {
                let (id, _) = ids("contact_id");
                if delete {
                    id.into_iter().map(Effect::ContactDeleted).collect()
                } else {
                    let stage = new
                        .and_then(|t| text(rel, t, "current_stage"))
                        .map(|s| s.trim_end().to_owned());
                    let was_completed = old.and_then(|t| match column(rel, t, "current_stage") {
                        Seen::Value(s) => Some(s.trim_end() == "COMPLETED"),
                        Seen::Null => Some(false),
                        Seen::Unknown => None,
                    });
                    id.into_iter()
                        .map(|contact_id| Effect::Contact {
                            contact_id,
                            stage: stage.clone(),
                            was_completed,
                        })
                        .collect()
                }
            }
            "inferences" | "s3_conversations" => {
                let (contact_ids, unknown) = ids("contact_id");
                if contact_ids.is_empty() {
                    // A row whose contact_id is NULL belongs to no contact yet (a conversation
                    // not linked so far): nothing to publish. Only a value the WAL did not carry
                    // is a problem.
                    if !unknown {
                        return vec![];
                    }
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
                // An update may move an inference to another question; both sides count. Under
                // a replica identity without question_id, an update sends no old image, so the
                // old question is unknown.
                let (question_ids, _) = ids("question_id");
                let old_unknown =
                    change == Change::Update && old.is_none() && rel.replica_identity != b'f';
                let mut out = Vec::new();
                for contact_id in contact_ids {
                    if question_ids.is_empty() || old_unknown {
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
                let before = old
                    .filter(|t| !t.key_only)
                    .and_then(|t| question_row(rel, t))
                    .map(Box::new);
                if delete {
                    ids("question_id")
                        .0
                        .into_iter()
                        .map(|question_id| Effect::Question {
                            question_id,
                            row: None,
                            old: before.clone(),
                        })
                        .collect()
                } else {
                    new.and_then(|t| question_row(rel, t))
                        .map(|row| Effect::Question {
                            question_id: row.question_id.clone(),
                            row: Some(Box::new(row)),
                            old: before,
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

    /// A relation with a replica identity `ident` whose key columns are `keys`.
    fn rel_ident(id: u32, name: &str, cols: &[&str], ident: u8, keys: &[&str]) -> Message<'static> {
        let Message::Relation(mut r) = rel(id, name, cols) else {
            unreachable!()
        };
        r.replica_identity = ident;
        for c in &mut r.columns {
            c.key = keys.contains(&c.name.as_str());
        }
        Message::Relation(r)
    }

    #[test]
    fn a_padded_char_stage_is_completed() {
        let mut tr = Tracker::new();
        tr.effects(rel(1, "contacts", &["contact_id", "current_stage"]));
        let e = tr.effects(Message::Update {
            relation: 1,
            old: None,
            new: vec![t("c1"), t("COMPLETED           ")],
        });
        assert_eq!(
            e,
            vec![Effect::Contact {
                contact_id: "c1".into(),
                stage: Some("COMPLETED".into()),
                was_completed: None
            }]
        );
    }

    #[test]
    fn a_row_of_no_contact_is_no_change_but_an_unknown_contact_is_reported() {
        let mut tr = Tracker::new();
        tr.effects(rel(
            5,
            "s3_conversations",
            &["conversation_id", "contact_id"],
        ));
        // A conversation not linked to a contact yet: nothing to publish, nothing to report.
        assert!(
            tr.effects(Message::Insert {
                relation: 5,
                new: vec![t("conv-1"), Value::Null]
            })
            .is_empty()
        );
        // A key-only delete whose identity lacks contact_id cannot say which contact it was.
        tr.effects(rel_ident(
            6,
            "inferences",
            &["inference_id", "contact_id", "question_id"],
            b'd',
            &["inference_id"],
        ));
        let e = tr.effects(Message::Delete {
            relation: 6,
            old: (OldKind::Key, vec![t("i1"), Value::Null, Value::Null]),
        });
        assert!(matches!(&e[0], Effect::Unattributable { .. }), "{e:?}");
        // With contact_id in the identity index it can, and the question is unknown.
        tr.effects(rel_ident(
            7,
            "inferences",
            &["inference_id", "contact_id", "question_id"],
            b'i',
            &["inference_id", "contact_id"],
        ));
        let e = tr.effects(Message::Delete {
            relation: 7,
            old: (OldKind::Key, vec![t("i1"), t("c1"), Value::Null]),
        });
        assert_eq!(
            e,
            vec![Effect::Inference {
                contact_id: "c1".into(),
                question_id: None
            }]
        );
    }

    #[test]
    fn an_update_without_an_old_image_may_have_moved_the_answer() {
        let mut tr = Tracker::new();
        tr.effects(rel_ident(
            7,
            "inferences",
            &["inference_id", "contact_id", "question_id"],
            b'i',
            &["inference_id", "contact_id"],
        ));
        let e = tr.effects(Message::Update {
            relation: 7,
            old: None,
            new: vec![t("i1"), t("c1"), t("q-other")],
        });
        assert!(e.contains(&Effect::Inference {
            contact_id: "c1".into(),
            question_id: None
        }));
        // Under FULL the old image is always there: no guess needed.
        tr.effects(rel(
            8,
            "inferences",
            &["inference_id", "contact_id", "question_id"],
        ));
        let e = tr.effects(Message::Insert {
            relation: 8,
            new: vec![t("i1"), t("c1"), t("q1")],
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
    fn a_question_update_or_delete_carries_the_old_row_only_when_whole() {
        let mut tr = Tracker::new();
        tr.effects(rel(3, "questions", &["question_id", "key", "is_universal"]));
        let e = tr.effects(Message::Update {
            relation: 3,
            old: Some((OldKind::Full, vec![t("q1"), t("old_key"), t("t")])),
            new: vec![t("q1"), t("new_key"), t("t")],
        });
        let Effect::Question {
            row: Some(row),
            old: Some(old),
            ..
        } = &e[0]
        else {
            panic!("{e:?}")
        };
        assert_eq!(old.key, Field::Set(Some("old_key".into())));
        assert_eq!(old.is_universal, Field::Set(Some(true)));
        assert_eq!(row.key, Field::Set(Some("new_key".into())));
        let e = tr.effects(Message::Delete {
            relation: 3,
            old: (OldKind::Full, vec![t("q1"), t("new_key"), t("t")]),
        });
        assert!(
            matches!(&e[0], Effect::Question { row: None, old: Some(o), .. } if o.key == Field::Set(Some("new_key".into()))),
            "{e:?}"
        );
        // A key-only image says nothing of the other columns.
        let e = tr.effects(Message::Delete {
            relation: 3,
            old: (OldKind::Key, vec![t("q1"), Value::Null, Value::Null]),
        });
        assert!(matches!(&e[0], Effect::Question { old: None, .. }), "{e:?}");
    }

    #[test]
    fn a_question_field_set_to_null_is_not_unchanged() {
        let mut tr = Tracker::new();
        tr.effects(rel(
            3,
            "questions",
            &["question_id", "text", "is_universal"],
        ));
        let e = tr.effects(Message::Update {
            relation: 3,
            old: None,
            new: vec![t("q1"), Value::Null, Value::Null],
        });
        let Effect::Question { row: Some(row), .. } = &e[0] else {
            panic!("{e:?}")
        };
        assert_eq!(row.text, Field::Set(None));
        assert_eq!(row.is_universal, Field::Set(Some(false)));
        assert_eq!(row.text.clone().or(Some(&"old".to_owned())), None);
        assert_eq!(
            Field::Unchanged.or(Some(&"old".to_owned())),
            Some("old".to_owned())
        );
    }

    #[test]
    fn same_named_tables_in_other_schemas_are_not_ours() {
        let mut tr = Tracker::with_schemas([("contacts".to_owned(), "app".to_owned())].into());
        tr.effects(rel(1, "contacts", &["contact_id", "current_stage"]));
        assert!(
            tr.effects(Message::Delete {
                relation: 1,
                old: (OldKind::Key, vec![t("c1"), Value::Null]),
            })
            .is_empty(),
            "public.contacts is not app.contacts"
        );
    }

    #[test]
    fn the_old_stage_tells_a_contact_that_leaves_completed() {
        let mut tr = Tracker::new();
        tr.effects(rel_ident(
            1,
            "contacts",
            &["contact_id", "agent_id", "current_stage"],
            b'i',
            &["contact_id", "current_stage"],
        ));
        // Identity index with current_stage: a stage change sends the old key.
        let e = tr.effects(Message::Update {
            relation: 1,
            old: Some((OldKind::Key, vec![t("c1"), Value::Null, t("COMPLETED ")])),
            new: vec![t("c1"), t("a"), t("INFERENCE")],
        });
        assert_eq!(
            e,
            vec![Effect::Contact {
                contact_id: "c1".into(),
                stage: Some("INFERENCE".into()),
                was_completed: Some(true),
            }]
        );
        // Without an old image the old stage is unknown.
        let e = tr.effects(Message::Update {
            relation: 1,
            old: None,
            new: vec![t("c1"), t("a"), t("INFERENCE")],
        });
        assert!(matches!(
            &e[0],
            Effect::Contact {
                was_completed: None,
                ..
            }
        ));
        // A full old image that was not COMPLETED.
        let e = tr.effects(Message::Update {
            relation: 1,
            old: Some((OldKind::Full, vec![t("c1"), t("a"), t("TRANSCRIPTION")])),
            new: vec![t("c1"), t("a"), t("INFERENCE")],
        });
        assert!(matches!(
            &e[0],
            Effect::Contact {
                was_completed: Some(false),
                ..
            }
        ));
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
                stage: Some("COMPLETED".into()),
                was_completed: None
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
                stage: Some("INFERENCE".into()),
                was_completed: None
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
                stage: None,
                was_completed: None
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
        assert_eq!(row.is_universal, Field::Set(Some(true)));
        assert_eq!(row.text, Field::Unchanged);
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
