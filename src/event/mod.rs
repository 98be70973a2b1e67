//! The per-contact event published to Kafka: one document per COMPLETED contact, keyed by
//! contact id, in JSON (the default) or Avro with a schema registry. Field names follow the seed's
//! MuleSoft payload so the simplest sink is a pass-through; `schema/contact-event.schema.json`
//! and `schema/contact-event.avsc` are the published contracts.
//!
//! [`Encoder`] writes values in the configured [`Format`]; [`Decoder`] is the one way the sinks
//! and `tail` read them, telling the formats apart by the first byte.

pub mod avro;
pub mod fit;
pub mod registry;

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
pub use registry::Registry;

/// Version of the event layout; bumped only for incompatible changes.
pub const SCHEMA_VERSION: u32 = 1;

/// What happened to the contact.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    /// The contact is COMPLETED; the event carries its full current state.
    Upsert,
    /// The contact row was deleted; a tombstone follows on the same key.
    Delete,
}

/// Where in the database's history the event was read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourcePosition {
    /// Commit LSN (`X/Y`) of the transaction that triggered the event, or the slot's start for
    /// snapshot and re-emit events.
    pub lsn: String,
    /// Commit time of that transaction (RFC 3339, UTC); absent for snapshot events.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub commit_ts: Option<String>,
    /// Transaction id; absent for snapshot events.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub txid: Option<u32>,
    /// Why the event was produced: `stream`, `snapshot`, `question` (a question changed) or
    /// `backfill`.
    pub reason: String,
}

/// One universal question's answer for the contact.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuestionResult {
    /// `questions.question_id`.
    pub question_id: String,
    /// `questions.key`, e.g. `agent_identified`.
    pub question_key: String,
    /// `questions.text`.
    pub question_text: Option<String>,
    /// `questions.result_type`: Boolean, Rating, Label, Paragraph or Summary.
    pub result_type: String,
    /// `questions."group"`.
    pub question_group: Option<String>,
    /// `inferences.result`, raw: typed conversion is a sink concern.
    pub result: Option<String>,
    /// `inferences.updated_at` (ISO 8601: as stored for `timestamp`, UTC with `Z` for
    /// `timestamptz`, `YYYY-MM-DD` for `date`).
    pub inference_updated_at: Option<String>,
}

/// The enriched per-contact event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContactEvent {
    /// [`SCHEMA_VERSION`].
    pub schema_version: u32,
    /// Unique per publication: `<lsn>:<contact_id>` for stream events.
    pub event_id: String,
    /// Upsert or delete.
    pub op: Op,
    /// `contacts.contact_id`; also the Kafka key.
    pub trusst_contact_id: String,
    /// `contacts.external_id`.
    pub external_id: Option<String>,
    /// `contacts.stream_id`.
    pub stream_id: Option<String>,
    /// `s3_conversations.call_time` (the seed's `call_date`).
    pub call_date: Option<String>,
    /// `contacts.start_time`.
    pub call_start_time: Option<String>,
    /// `contacts.direction`: inbound or outbound.
    pub direction: Option<String>,
    /// `contacts.agent_id`.
    pub contact_agent_id: Option<String>,
    /// `s3_conversations.agent_id`.
    pub s3_agent_id: Option<String>,
    /// `s3_conversations.conn_id`.
    pub conn_id: Option<String>,
    /// Universal questions ordered by group, order and key; empty for deletes.
    pub universal_questions: Vec<QuestionResult>,
    /// Position in the source database.
    pub source: SourcePosition,
    /// Texts shortened so the event fits the broker's size limit; absent when nothing was.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub truncated: Option<Vec<Truncated>>,
    /// Keys of universal questions (or of questions that stopped being universal, or were
    /// renamed) that this contact has no answer to: a target clears the fields it keeps for them,
    /// so an answer that disappeared never stays behind. Absent when there is none.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub cleared_question_keys: Option<Vec<String>>,
    /// The Trusst customer (tenant) whose database the event came from (`[source] customer`);
    /// absent only in events published before the field existed.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub customer: Option<String>,
}

/// A text the source shortened so its event fits the broker's size limit (see [`fit`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Truncated {
    /// The question whose text was shortened.
    pub question_key: String,
    /// `result` or `question_text`.
    pub field: String,
    /// UTF-8 bytes of the full text.
    pub original_bytes: u32,
    /// UTF-8 bytes kept (a prefix, cut at a character boundary).
    pub kept_bytes: u32,
}

impl ContactEvent {
    /// Take over what an older event of the same contact said to clear, when this newer one
    /// replaces it unwritten (a sink writes only the newest event per contact in a batch): a
    /// key stays cleared unless this event answers it. Without this, a clear sent once (a
    /// question renamed or no longer universal) would be lost behind a later event that does
    /// not repeat it.
    pub fn inherit_cleared(&mut self, older: &ContactEvent) {
        if self.op != Op::Upsert || older.op != Op::Upsert {
            return;
        }
        let Some(old) = older.cleared_question_keys.as_ref() else {
            return;
        };
        let answered = |k: &String| {
            self.universal_questions
                .iter()
                .any(|q| &q.question_key == k)
        };
        let keys = self.cleared_question_keys.get_or_insert_with(Vec::new);
        for k in old {
            if !answered(k) && !keys.contains(k) {
                keys.push(k.clone());
            }
        }
    }

    /// A delete event for a contact whose row is gone.
    pub fn delete(contact_id: &str, source: SourcePosition) -> Self {
        Self {
            schema_version: SCHEMA_VERSION,
            event_id: format!("{}:{}", source.lsn, contact_id),
            op: Op::Delete,
            trusst_contact_id: contact_id.to_owned(),
            external_id: None,
            stream_id: None,
            call_date: None,
            call_start_time: None,
            direction: None,
            contact_agent_id: None,
            s3_agent_id: None,
            conn_id: None,
            universal_questions: Vec::new(),
            source,
            truncated: None,
            cleared_question_keys: None,
            customer: None,
        }
    }

    /// Name the keys among `universal` and `retired` this contact has no answer to, so a
    /// target clears them (none: the field stays absent). Every key given ends up either
    /// answered or cleared, never both.
    pub fn set_cleared(&mut self, universal: &[String], retired: &BTreeSet<String>) {
        let answered: BTreeSet<&str> = self
            .universal_questions
            .iter()
            .map(|q| q.question_key.as_str())
            .collect();
        let keys: BTreeSet<&String> = universal
            .iter()
            .chain(retired)
            .filter(|k| !answered.contains(k.as_str()))
            .collect();
        self.cleared_question_keys =
            (!keys.is_empty()).then(|| keys.into_iter().cloned().collect());
    }

    /// Serialize for the topic.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("events always serialize")
    }

    /// Parse an event read from the topic.
    pub fn from_json(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}

/// The format of event values on the topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// One JSON document per value (`schema/contact-event.schema.json`).
    #[default]
    Json,
    /// Confluent wire format: magic byte 0, 4-byte schema id, Avro body (`schema/contact-event.avsc`).
    Avro,
}

/// Turns events into record values in the source's format.
#[derive(Debug, Clone)]
pub enum Encoder {
    /// JSON.
    Json,
    /// Avro framed with the id the registry gave the event schema.
    Avro {
        /// The registered schema's id.
        schema_id: u32,
    },
}

impl Encoder {
    /// The encoder for `format`; for Avro, registers the event schema under `<topic>-value`
    /// (the same schema keeps its id and adds no version).
    pub async fn new(format: Format, registry: Option<&Registry>, topic: &str) -> Result<Self> {
        match format {
            Format::Json => Ok(Self::Json),
            Format::Avro => {
                let registry = registry.ok_or_else(|| {
                    Error::user("format = \"avro\" needs a schema registry: set [kafka] schema_registry_url or SCHEMA_REGISTRY_URL")
                })?;
                let subject = registry::value_subject(topic);
                let schema_id = registry.register(&subject, avro::SCHEMA_TEXT).await?;
                tracing::info!(
                    subject,
                    schema_id,
                    registry = registry.url(),
                    "event schema registered"
                );
                Ok(Self::Avro { schema_id })
            }
        }
    }

    /// The record value for `event`.
    pub fn encode(&self, event: &ContactEvent) -> Vec<u8> {
        match self {
            Self::Json => event.to_json(),
            Self::Avro { schema_id } => avro::encode(event, *schema_id),
        }
    }
}

/// What a record value decodes to: an event, or why the record is not one (it is then
/// dead-lettered, never skipped silently).
pub type Decoded = std::result::Result<ContactEvent, String>;

/// Reads record values in either format: Avro when the value starts with the magic byte 0, JSON
/// otherwise. Shared by every sink and `tail`.
#[derive(Clone, Default)]
pub struct Decoder {
    registry: Option<Registry>,
}

impl Decoder {
    /// A decoder that fetches Avro writer schemas from `registry` (JSON needs none).
    pub fn new(registry: Option<Registry>) -> Self {
        Self { registry }
    }

    /// Decode one record value. `Err` stops the caller (no registry configured for an Avro
    /// record, or the registry cannot be reached): retrying later or fixing the config helps.
    /// `Ok(Err(reason))` is a record that will never decode.
    pub async fn decode(&self, value: &[u8]) -> Result<Decoded> {
        let Some((id, body)) = avro::split_frame(value) else {
            if value.first() == Some(&avro::MAGIC) {
                return Ok(Err(format!(
                    "record starts with the Avro magic byte but is only {} bytes long",
                    value.len()
                )));
            }
            return Ok(ContactEvent::from_json(value)
                .map_err(|e| format!("record is not a trusst-cdc JSON event: {e}")));
        };
        let Some(registry) = &self.registry else {
            return Err(Error::user(format!(
                "the topic holds Avro records (schema id {id}) but no schema registry is configured: set \
                 SCHEMA_REGISTRY_URL (or [kafka] schema_registry_url) to the registry the source uses"
            )));
        };
        Ok(match registry.schema(id).await? {
            Ok(writer) => avro::decode_body(body, &writer)
                .map_err(|e| format!("Avro record (schema id {id}): {e}")),
            Err(reason) => Err(reason),
        })
    }
}

/// Format a `timestamp without time zone` the way the seed's Python `isoformat()` does.
pub fn iso(ts: &chrono::NaiveDateTime) -> String {
    use chrono::{Datelike, Timelike};
    // Written by hand: chrono's strftime parses the pattern on every call, and this runs for
    // every answer of every event.
    let (d, t) = (ts.date(), ts.time());
    let mut s = String::with_capacity(26);
    fn num(s: &mut String, v: u32, width: u32) {
        for i in (0..width).rev() {
            s.push(char::from(b'0' + (v / 10u32.pow(i) % 10) as u8));
        }
    }
    let year = d.year();
    let micros = t.nanosecond() / 1000;
    if !(0..=9999).contains(&year) {
        // Outside four digits: chrono's formatting, with the same fraction rule.
        let pattern = if micros == 0 {
            "%Y-%m-%dT%H:%M:%S"
        } else {
            "%Y-%m-%dT%H:%M:%S%.6f"
        };
        return ts.format(pattern).to_string();
    }
    num(&mut s, year as u32, 4);
    s.push('-');
    num(&mut s, d.month(), 2);
    s.push('-');
    num(&mut s, d.day(), 2);
    s.push('T');
    num(&mut s, t.hour(), 2);
    s.push(':');
    num(&mut s, t.minute(), 2);
    s.push(':');
    num(&mut s, t.second(), 2);
    if micros != 0 {
        s.push('.');
        num(&mut s, micros.min(999_999), 6);
    }
    s
}

/// Format a `timestamp with time zone` as its UTC time with [`iso`]'s rule and a `Z`.
pub fn iso_utc(ts: &chrono::DateTime<chrono::Utc>) -> String {
    let mut s = iso(&ts.naive_utc());
    s.push('Z');
    s
}

/// Format an LSN as PostgreSQL does (`X/Y`, hex).
pub fn lsn(v: u64) -> String {
    format!("{:X}/{:X}", v >> 32, v & 0xffff_ffff)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn position() -> SourcePosition {
        SourcePosition {
            lsn: "0/1".into(),
            commit_ts: None,
            txid: None,
            reason: "stream".into(),
        }
    }

    fn answered(keys: &[&str], cleared: Option<&[&str]>) -> ContactEvent {
        let mut e = ContactEvent::delete("c-1", position());
        e.op = Op::Upsert;
        e.universal_questions = keys
            .iter()
            .map(|k| QuestionResult {
                question_id: format!("q-{k}"),
                question_key: (*k).into(),
                question_text: None,
                result_type: "Rating".into(),
                question_group: None,
                result: Some("5".into()),
                inference_updated_at: None,
            })
            .collect();
        e.cleared_question_keys = cleared.map(|c| c.iter().map(|k| (*k).to_owned()).collect());
        e
    }

    #[test]
    fn a_newer_event_keeps_the_older_ones_clears_unless_it_answers_them() {
        let older = answered(&["empathy_rating"], Some(&["empathy_score", "upsell"]));
        let mut newer = answered(&["empathy_rating", "upsell"], None);
        newer.inherit_cleared(&older);
        assert_eq!(
            newer.cleared_question_keys,
            Some(vec!["empathy_score".to_owned()])
        );
        // Nothing to inherit: unchanged.
        let mut again = answered(&["a"], None);
        again.inherit_cleared(&answered(&["a"], None));
        assert_eq!(again.cleared_question_keys, None);
        // A delete neither gives nor takes.
        let mut delete = ContactEvent::delete("c-1", position());
        delete.inherit_cleared(&older);
        assert_eq!(delete.cleared_question_keys, None);
    }

    #[test]
    fn iso_matches_python_isoformat() {
        let t = chrono::NaiveDate::from_ymd_opt(2025, 1, 15)
            .unwrap()
            .and_hms_opt(14, 23, 10)
            .unwrap();
        assert_eq!(iso(&t), "2025-01-15T14:23:10");
        let t = t + chrono::Duration::microseconds(1500);
        assert_eq!(iso(&t), "2025-01-15T14:23:10.001500");
        assert_eq!(iso_utc(&t.and_utc()), "2025-01-15T14:23:10.001500Z");
    }

    #[test]
    fn iso_agrees_with_chrono_formatting() {
        let start = chrono::NaiveDate::from_ymd_opt(1999, 12, 31)
            .unwrap()
            .and_hms_opt(23, 59, 59)
            .unwrap();
        for i in 0..20_000i64 {
            let t = start + chrono::Duration::microseconds(i * i * 7_919_777 + i * 13);
            let want = if t.and_utc().timestamp_subsec_micros() == 0 {
                t.format("%Y-%m-%dT%H:%M:%S").to_string()
            } else {
                t.format("%Y-%m-%dT%H:%M:%S%.6f").to_string()
            };
            assert_eq!(iso(&t), want, "{t:?}");
        }
    }

    #[test]
    fn lsn_format() {
        assert_eq!(lsn(0x16B3748), "0/16B3748");
        assert_eq!(lsn((3u64 << 32) | 0x10), "3/10");
    }

    proptest::proptest! {
        /// Every universal or retired key is answered or cleared, never both; cleared keys are
        /// sorted and unique.
        #[test]
        fn each_key_is_answered_or_cleared(
            answered in proptest::collection::btree_set("[a-d]{1,2}", 0..6),
            universal in proptest::collection::vec("[a-d]{1,2}", 0..8),
            retired in proptest::collection::btree_set("[a-d]{1,2}", 0..4),
        ) {
            let mut e = ContactEvent::delete("c", SourcePosition {
                lsn: "0/1".into(), commit_ts: None, txid: None, reason: "stream".into(),
            });
            e.universal_questions = answered.iter().map(|k| QuestionResult {
                question_id: format!("q-{k}"),
                question_key: k.clone(),
                question_text: None,
                result_type: "Boolean".into(),
                question_group: None,
                result: Some("true".into()),
                inference_updated_at: None,
            }).collect();
            e.set_cleared(&universal, &retired);
            let cleared = e.cleared_question_keys.clone().unwrap_or_default();
            proptest::prop_assert!(cleared.windows(2).all(|w| w[0] < w[1]));
            proptest::prop_assert_eq!(e.cleared_question_keys.is_none(), cleared.is_empty());
            for k in universal.iter().chain(&retired) {
                proptest::prop_assert!(answered.contains(k) != cleared.contains(k), "{}", k);
            }
            for k in &cleared {
                proptest::prop_assert!(universal.contains(k) || retired.contains(k));
            }
        }
    }

    #[test]
    fn delete_round_trips() {
        let e = ContactEvent::delete(
            "c-1",
            SourcePosition {
                lsn: "0/1".into(),
                commit_ts: None,
                txid: Some(7),
                reason: "stream".into(),
            },
        );
        let back = ContactEvent::from_json(&e.to_json()).unwrap();
        assert_eq!(back, e);
        assert!(
            String::from_utf8(e.to_json())
                .unwrap()
                .contains(r#""op":"delete""#)
        );
    }
}
