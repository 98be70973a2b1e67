//! The event in Avro, framed in the Confluent wire format: magic byte 0, the schema id as a
//! 4-byte big-endian integer, then the Avro binary body. Pure functions (no registry, no I/O), so
//! the decoder can be fuzzed with the schema supplied locally.

use std::sync::OnceLock;

use apache_avro::Schema;
use apache_avro::reader::datum::GenericDatumReader;
use apache_avro::writer::datum::GenericDatumWriter;

use super::ContactEvent;

/// The event's Avro schema as published to the registry (`schema/contact-event.avsc`).
pub const SCHEMA_TEXT: &str = include_str!("../../schema/contact-event.avsc");

/// First byte of every Confluent-framed value; JSON events start with `{`, so the two formats
/// cannot be confused.
pub const MAGIC: u8 = 0;

/// Bytes before the Avro body: the magic byte and the schema id.
pub const HEADER_LEN: usize = 5;

/// The parsed [`SCHEMA_TEXT`]: the writer schema of the source and the reader schema of the
/// sinks (events written with an older or newer compatible schema are resolved to it).
pub fn schema() -> &'static Schema {
    static SCHEMA: OnceLock<Schema> = OnceLock::new();
    SCHEMA.get_or_init(|| {
        Schema::parse_str(SCHEMA_TEXT).expect("schema/contact-event.avsc is valid Avro")
    })
}

/// The Avro binary body of `event` (no framing).
pub fn encode_body(event: &ContactEvent) -> Vec<u8> {
    GenericDatumWriter::builder(schema())
        .build()
        .and_then(|w| w.write_ser_to_vec(event))
        .expect("every event fits schema/contact-event.avsc (checked by the event's unit tests)")
}

/// `event` in the Confluent wire format under `schema_id`.
pub fn encode(event: &ContactEvent, schema_id: u32) -> Vec<u8> {
    let body = encode_body(event);
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    out.push(MAGIC);
    out.extend_from_slice(&schema_id.to_be_bytes());
    out.extend_from_slice(&body);
    out
}

/// Split a Confluent-framed value into its schema id and Avro body; `None` when `bytes` does
/// not start with the magic byte or is too short to hold a schema id.
pub fn split_frame(bytes: &[u8]) -> Option<(u32, &[u8])> {
    match bytes {
        [MAGIC, a, b, c, d, body @ ..] => Some((u32::from_be_bytes([*a, *b, *c, *d]), body)),
        _ => None,
    }
}

/// Decode an Avro body written with `writer` into an event, resolving it to [`schema`] (so a
/// field added later with a default, or one dropped by a newer writer, still decodes). The
/// error says why the bytes are not an event.
pub fn decode_body(body: &[u8], writer: &Schema) -> Result<ContactEvent, String> {
    let reader = GenericDatumReader::builder(writer)
        .reader_schema(schema())
        .build()
        .map_err(|e| format!("the writer schema cannot be read as the event schema: {e}"))?;
    let mut rest = body;
    let value = reader
        .read_value(&mut rest)
        .map_err(|e| format!("invalid Avro body: {e}"))?;
    if !rest.is_empty() {
        return Err(format!(
            "{} bytes after the end of the Avro body",
            rest.len()
        ));
    }
    apache_avro::from_value::<ContactEvent>(&value)
        .map_err(|e| format!("the Avro record is not an event: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Op, QuestionResult, SourcePosition};

    fn sample() -> ContactEvent {
        ContactEvent {
            schema_version: 1,
            event_id: "0/16B3748:c-1".into(),
            op: Op::Upsert,
            trusst_contact_id: "c-1".into(),
            external_id: Some("ext-1".into()),
            stream_id: None,
            call_date: Some("2025-01-17T09:12:44".into()),
            call_start_time: Some("2025-01-17T09:12:39.250000".into()),
            direction: Some("inbound".into()),
            contact_agent_id: Some("agent_12".into()),
            s3_agent_id: None,
            conn_id: Some("REC-1".into()),
            universal_questions: vec![QuestionResult {
                question_id: "q-1".into(),
                question_key: "agent_identified".into(),
                question_text: Some("Did the agent …?".into()),
                result_type: "Boolean".into(),
                question_group: None,
                result: Some("true".into()),
                inference_updated_at: Some("2026-11-26T03:34:53.811402".into()),
            }],
            source: SourcePosition {
                lsn: "0/16B3748".into(),
                commit_ts: Some("2026-11-26T03:34:53.812011Z".into()),
                txid: Some(u32::MAX),
                reason: "stream".into(),
            },
            truncated: None,
            cleared_question_keys: None,
            customer: None,
        }
    }

    #[test]
    fn round_trip_through_the_wire_format() {
        for ev in [
            sample(),
            ContactEvent::delete(
                "c-2",
                SourcePosition {
                    lsn: "0/1".into(),
                    commit_ts: None,
                    txid: None,
                    reason: "snapshot".into(),
                },
            ),
        ] {
            let bytes = encode(&ev, 42);
            assert_eq!(&bytes[..HEADER_LEN], &[0, 0, 0, 0, 42]);
            let (id, body) = split_frame(&bytes).unwrap();
            assert_eq!(id, 42);
            assert_eq!(decode_body(body, schema()).unwrap(), ev);
        }
    }

    /// The fuzz target's seeds are real events (written by hand, byte by byte, from the spec).
    #[test]
    fn fuzz_seeds_decode() {
        let (id, body) =
            split_frame(include_bytes!("../../fuzz/corpus/event_avro/upsert")).unwrap();
        assert_eq!(id, 1);
        let ev = decode_body(body, schema()).unwrap();
        assert_eq!(ev.universal_questions.len(), 2);
        assert_eq!(ev.source.txid, Some(1024));
        assert_eq!(encode_body(&ev), body, "the writer produces the same bytes");
        let ev = decode_body(
            include_bytes!("../../fuzz/corpus/event_avro/delete"),
            schema(),
        )
        .unwrap();
        assert_eq!(ev.op, Op::Delete);
    }

    #[test]
    fn json_is_never_taken_for_a_frame() {
        assert!(split_frame(&sample().to_json()).is_none());
        assert!(split_frame(&[0, 0, 0]).is_none());
    }

    #[test]
    fn truncated_or_padded_bodies_are_refused() {
        let body = encode_body(&sample());
        // (The last three bytes are the null branches of the optional `truncated`,
        // `cleared_question_keys` and `customer`: cut into `source`.)
        assert!(decode_body(&body[..body.len() - 4], schema()).is_err());
        let mut longer = body.clone();
        longer.push(0);
        assert!(
            decode_body(&longer, schema())
                .unwrap_err()
                .contains("after the end")
        );
    }

    /// Events written before `customer` existed (the schema without it) still decode, without
    /// a customer; events with one carry it through.
    #[test]
    fn events_from_before_the_customer_field_decode() {
        let mut doc: serde_json::Value = serde_json::from_str(SCHEMA_TEXT).unwrap();
        let fields = doc["fields"].as_array_mut().unwrap();
        assert_eq!(fields.last().unwrap()["name"], "customer");
        fields.pop();
        let older = Schema::parse_str(&doc.to_string()).unwrap();
        let body = encode_body(&sample());
        // The field is last: the older body is the same without its null branch.
        assert_eq!(body.last(), Some(&0));
        let ev = decode_body(&body[..body.len() - 1], &older).unwrap();
        assert_eq!((ev.customer.as_deref(), &ev), (None, &sample()));
        let mut with = sample();
        with.customer = Some("acme".into());
        let ev = decode_body(&encode_body(&with), schema()).unwrap();
        assert_eq!(ev.customer.as_deref(), Some("acme"));
    }

    /// An older writer without an optional field, and a newer one with an extra optional field,
    /// both decode: the evolution rule docs/event.md documents.
    #[test]
    fn compatible_writer_schemas_resolve() {
        let mut doc: serde_json::Value = serde_json::from_str(SCHEMA_TEXT).unwrap();
        let fields = doc["fields"].as_array_mut().unwrap();
        fields.retain(|f| f["name"] != "conn_id");
        fields.push(
            serde_json::json!({"name": "region", "type": ["null", "string"], "default": null}),
        );
        let writer = Schema::parse_str(&doc.to_string()).unwrap();
        let mut ev = sample();
        ev.conn_id = None;
        #[derive(serde::Serialize)]
        struct Newer<'a> {
            #[serde(flatten)]
            ev: &'a ContactEvent,
            region: Option<&'a str>,
        }
        let value = apache_avro::to_value(Newer {
            ev: &ev,
            region: Some("eu"),
        })
        .unwrap()
        .resolve(&writer)
        .unwrap();
        let body = GenericDatumWriter::builder(&writer)
            .build()
            .unwrap()
            .write_value_to_vec(value)
            .unwrap();
        assert_eq!(decode_body(&body, &writer).unwrap(), ev);
    }

    /// The Avro schema and the JSON Schema describe the same fields: same names at every level,
    /// the same required / optional split, compatible types, and the same `op` symbols.
    #[test]
    fn avro_schema_matches_the_json_schema() {
        let avro: serde_json::Value = serde_json::from_str(SCHEMA_TEXT).unwrap();
        let json: serde_json::Value =
            serde_json::from_str(include_str!("../../schema/contact-event.schema.json")).unwrap();
        compare_record(&avro, &json, "event");
    }

    fn compare_record(avro: &serde_json::Value, json: &serde_json::Value, path: &str) {
        use std::collections::BTreeSet;
        let props = json["properties"]
            .as_object()
            .unwrap_or_else(|| panic!("{path}: no properties"));
        let required: BTreeSet<&str> = json["required"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v.as_str())
            .collect();
        let fields = avro["fields"]
            .as_array()
            .unwrap_or_else(|| panic!("{path}: no Avro fields"));
        let avro_names: BTreeSet<&str> =
            fields.iter().map(|f| f["name"].as_str().unwrap()).collect();
        let json_names: BTreeSet<&str> = props.keys().map(String::as_str).collect();
        assert_eq!(
            avro_names, json_names,
            "{path}: the two schemas name different fields"
        );
        for f in fields {
            let name = f["name"].as_str().unwrap();
            let here = format!("{path}.{name}");
            let (avro_type, nullable) = match &f["type"] {
                serde_json::Value::Array(u) => {
                    assert_eq!(
                        u[0], "null",
                        "{here}: an optional Avro field lists null first"
                    );
                    assert!(
                        f.get("default").is_some_and(|d| d.is_null()),
                        "{here}: optional without default null"
                    );
                    (u[1].clone(), true)
                }
                t => (t.clone(), false),
            };
            assert_eq!(
                nullable,
                !required.contains(name),
                "{here}: required in one schema, optional in the other"
            );
            let js = &props[name];
            match avro_type.as_str().or_else(|| avro_type["type"].as_str()) {
                Some("string") => {
                    let ok = js["type"] == "string"
                        || js["type"]
                            .as_array()
                            .is_some_and(|t| t.contains(&"string".into()))
                        || js["enum"]
                            .as_array()
                            .is_some_and(|e| e.iter().all(|v| v.is_string()));
                    assert!(ok, "{here}: string in Avro, {js} in JSON Schema");
                }
                Some("int" | "long") => {
                    assert!(
                        js["type"] == "integer" || js["const"].is_u64(),
                        "{here}: integer in Avro, {js} in JSON Schema"
                    )
                }
                Some("enum") => assert_eq!(
                    avro_type["symbols"], js["enum"],
                    "{here}: enum symbols differ"
                ),
                Some("array") if avro_type["items"] == "string" => assert_eq!(
                    js["items"]["type"], "string",
                    "{here}: array of strings in Avro, {js} in JSON Schema"
                ),
                Some("array") => compare_record(&avro_type["items"], &js["items"], &here),
                Some("record") => compare_record(&avro_type, js, &here),
                other => panic!(
                    "{here}: Avro type {other:?} has no JSON Schema counterpart in this test"
                ),
            }
        }
    }
}
