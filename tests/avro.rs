//! Avro events through the real Apicurio Registry (Confluent-compatible API) and Kafka: the
//! source registers the schema once and writes the Confluent wire format, the sinks read it.
//! Needs `SCHEMA_REGISTRY_URL` (scripts/services.sh env).

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::crm::*;
use common::*;
use serde_json::Value;
use trusst_cdc::event::{ContactEvent, Op, QuestionResult, SourcePosition, avro, registry};

const WAIT: Duration = Duration::from_secs(90);

fn registry_url() -> String {
    std::env::var("SCHEMA_REGISTRY_URL").expect(
        "SCHEMA_REGISTRY_URL is not set: run `scripts/services.sh up && eval \"$(scripts/services.sh env)\"` or scripts/test.sh",
    )
}

/// GET on the registry, independently of the connector's client: status and JSON body.
async fn registry_get(path: &str) -> (u16, Value) {
    let resp = reqwest::get(format!("{}{path}", registry_url()))
        .await
        .expect("the registry answers");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// The versions registered under the topic's value subject.
async fn versions(topic: &str) -> Value {
    let (status, body) = registry_get(&format!(
        "/subjects/{}/versions",
        registry::value_subject(topic)
    ))
    .await;
    assert_eq!(status, 200, "{body}");
    body
}

/// Every value on the topic is Confluent-framed with one schema id, which the registry knows
/// and whose schema is the repo's; returns that id and the newest event per contact, decoded
/// with the registry's schema.
async fn check_topic(records: &[Record]) -> (u32, BTreeMap<String, ContactEvent>) {
    let mut ids = std::collections::BTreeSet::new();
    for r in records.iter().filter(|r| r.value.is_some()) {
        let v = r.value.as_deref().unwrap();
        assert_eq!(
            v[0],
            0,
            "record {}@{} does not start with the magic byte: {:?}",
            r.key,
            r.offset,
            &v[..v.len().min(8)]
        );
        ids.insert(u32::from_be_bytes([v[1], v[2], v[3], v[4]]));
    }
    assert_eq!(ids.len(), 1, "one schema id on the topic: {ids:?}");
    let id = *ids.first().unwrap();
    let (status, body) = registry_get(&format!("/schemas/ids/{id}")).await;
    assert_eq!(status, 200, "the registry knows schema id {id}: {body}");
    let writer = apache_avro::Schema::parse_str(body["schema"].as_str().unwrap()).unwrap();
    assert_eq!(
        writer.canonical_form(),
        avro::schema().canonical_form(),
        "the registered schema is schema/contact-event.avsc"
    );
    let mut latest = BTreeMap::new();
    for r in records {
        match &r.value {
            Some(v) => {
                let (_, body) = avro::split_frame(v).unwrap();
                latest.insert(r.key.clone(), avro::decode_body(body, &writer).unwrap());
            }
            None => {
                latest.remove(&r.key);
            }
        }
    }
    (id, latest)
}

/// Source (format = "avro") -> Kafka -> Salesforce sink -> emulator: the CRM holds the seed
/// query's values, the topic holds framed Avro under a registered id, and a restarted source
/// reuses the schema (one version under the subject).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn avro_round_trip_through_the_registry() {
    let db = TestDb::new("t_avro").await;
    let ids = completed(&db, 31, 20).await;
    let mut src = SourceProc::start(
        &db,
        SourceOpts {
            format: "avro",
            ..Default::default()
        },
    );
    let emu = Emulator::start(&[]);
    let (dir, cfg) = sink_config("salesforce", &src.topic, |_| {});
    let mut sink = SinkProc::start(&emu, dir, cfg, &[]);
    let expected = db.expected().await;
    assert_eq!(expected.len(), ids.len());
    eventually(WAIT, "the CRM to match the seed query", || {
        crm_matches(&emu, "salesforce", &expected)
    });

    let mut reader = TopicReader::new(&src.topic);
    reader.until(WAIT, "the snapshot", |r| r.len() >= ids.len());
    let (schema_id, latest) = check_topic(&reader.records).await;
    assert_matches_seed(&latest, &expected);
    assert_eq!(versions(&src.topic).await, serde_json::json!([1]));
    assert!(
        src.log().contains("event schema registered"),
        "{}",
        src.log()
    );

    // A restart registers the same schema again: same id, still one version.
    assert!(src.terminate().success(), "{}", src.log());
    src.respawn(&db);
    src.wait_streaming();
    let more = completed(&db, 32, 5).await;
    let expected = db.expected().await;
    eventually(
        WAIT,
        "the CRM to take the contacts completed after the restart",
        || crm_matches(&emu, "salesforce", &expected),
    );
    reader.until(WAIT, "the new contacts", |r| {
        more.iter().all(|id| r.iter().any(|x| &x.key == id))
    });
    let (id_after, latest) = check_topic(&reader.records).await;
    assert_eq!(id_after, schema_id);
    assert_matches_seed(&latest, &expected);
    assert_eq!(
        versions(&src.topic).await,
        serde_json::json!([1]),
        "the restart added a schema version"
    );
    sink.assert_running();
    db.drop_slot(&src.slot).await;
}

fn event(contact: &str) -> ContactEvent {
    ContactEvent {
        schema_version: 1,
        event_id: format!("0/1:{contact}"),
        op: Op::Upsert,
        trusst_contact_id: contact.to_owned(),
        external_id: Some(format!("ext-{contact}")),
        stream_id: None,
        call_date: Some("2025-01-17T09:12:44".into()),
        call_start_time: Some("2025-01-17T09:12:39".into()),
        direction: Some("inbound".into()),
        contact_agent_id: Some("agent_1".into()),
        s3_agent_id: None,
        conn_id: None,
        universal_questions: vec![QuestionResult {
            question_id: "q-agent-identified".into(),
            question_key: "agent_identified".into(),
            question_text: None,
            result_type: "Boolean".into(),
            question_group: None,
            result: Some("true".into()),
            inference_updated_at: None,
        }],
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

/// A registry URL with a wrong base path answers 404 to every schema id, without the registry's
/// "schema not found" error_code 40403: that is not a bad record but a wrong setting that would
/// dead-letter every record alike, so the sink stops with the fix and dead-letters nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_wrong_registry_base_path_stops_the_sink_instead_of_dead_lettering() {
    let emu = Emulator::start(&[]);
    let topic = unique("contacts").replace('_', "-");
    trusst_cdc::kafka::ensure_compacted_topic(&brokers(), &Default::default(), &topic, 1, 1)
        .await
        .unwrap();
    let registry = trusst_cdc::event::Registry::new(&registry_url()).unwrap();
    let id = registry
        .register(&registry::value_subject(&topic), avro::SCHEMA_TEXT)
        .await
        .unwrap();
    let producer = trusst_cdc::kafka::producer(&brokers(), &Default::default()).unwrap();
    let mut pending = trusst_cdc::kafka::Pending::default();
    pending
        .send(
            &producer,
            &topic,
            "c-1",
            Some(&avro::encode(&event("c-1"), id)),
        )
        .await
        .unwrap();
    pending.wait().await.unwrap();
    let wrong = registry_url().replace("/apis/ccompat/v7", "/apis/wrong/v7");
    let (dir, cfg) = sink_config("mulesoft", &topic, |_| {});
    let mut sink = SinkProc::start_with_env(
        &emu,
        dir,
        cfg,
        &[],
        &[("SCHEMA_REGISTRY_URL", wrong.as_str())],
    );
    let status = sink.wait_exit(WAIT);
    assert!(!status.success(), "{}", sink.log());
    let log = sink.log();
    assert!(
        log.contains("no Confluent-compatible API") && log.contains("SCHEMA_REGISTRY_URL"),
        "{log}"
    );
    let mut dead = TopicReader::new(&format!("{topic}.dlq.mulesoft"));
    dead.settle(Duration::from_secs(3));
    assert!(
        dead.records.is_empty(),
        "nothing dead-lettered: {:?}",
        dead.records
    );
}

/// A record framed with a schema id the registry does not know goes to the dead-letter topic
/// with a reason that names the id and the fix; the Avro record after it lands.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn avro_record_with_an_unknown_schema_id_is_dead_lettered() {
    let emu = Emulator::start(&[]);
    let topic = unique("contacts").replace('_', "-");
    trusst_cdc::kafka::ensure_compacted_topic(&brokers(), &Default::default(), &topic, 1, 1)
        .await
        .unwrap();
    let registry = trusst_cdc::event::Registry::new(&registry_url()).unwrap();
    let good_id = registry
        .register(&registry::value_subject(&topic), avro::SCHEMA_TEXT)
        .await
        .unwrap();
    let unknown_id = 2_000_000_000 + rand::random::<u32>() % 1_000_000;
    let bad = avro::encode(&event("c-bad"), unknown_id);
    let producer = trusst_cdc::kafka::producer(&brokers(), &Default::default()).unwrap();
    let mut pending = trusst_cdc::kafka::Pending::default();
    pending
        .send(&producer, &topic, "c-bad", Some(&bad))
        .await
        .unwrap();
    pending
        .send(
            &producer,
            &topic,
            "c-good",
            Some(&avro::encode(&event("c-good"), good_id)),
        )
        .await
        .unwrap();
    pending.wait().await.unwrap();

    let (dir, cfg) = sink_config("mulesoft", &topic, |_| {});
    let mut sink = SinkProc::start(&emu, dir, cfg, &[]);
    let mut dead = TopicReader::new(&format!("{topic}.dlq.mulesoft"));
    dead.until(WAIT, "the record on the dead-letter topic", |r| {
        r.iter().any(|r| r.key == "c-bad")
    });
    let body: Value = serde_json::from_slice(dead.records[0].value.as_deref().unwrap()).unwrap();
    assert_eq!(body["stage"], "decode", "{body}");
    let reason = body["reason"].as_str().unwrap();
    assert!(
        reason.contains(&format!("schema id {unknown_id} is unknown")),
        "{reason}"
    );
    assert!(
        reason.contains("SCHEMA_REGISTRY_URL"),
        "the reason names the fix: {reason}"
    );
    use base64::Engine;
    let raw = body["raw"]
        .as_str()
        .unwrap()
        .strip_prefix("base64:")
        .expect("binary kept as base64");
    assert_eq!(
        base64::engine::general_purpose::STANDARD
            .decode(raw)
            .unwrap(),
        bad,
        "the record is kept as it was"
    );

    eventually(WAIT, "the good Avro record in the CRM", || {
        let records = emu.records("mulesoft", "contacts");
        match records.iter().find(|r| r["trusst_contact_id"] == "c-good") {
            Some(r) if r["external_id"] == "ext-c-good" => Ok(()),
            _ => Err(format!("{records:?}")),
        }
    });
    dead.settle(Duration::from_secs(1));
    assert_eq!(
        dead.records.len(),
        1,
        "only the unknown id is dead-lettered"
    );
    sink.assert_running();
}

/// A subject whose compatibility rule refuses the event schema stops the source's start-up
/// with a configuration error that names the subject, the rule and the ways out.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_incompatible_subject_is_refused_with_the_fix() {
    let subject = registry::value_subject(&unique("contacts").replace('_', "-"));
    let client = reqwest::Client::new();
    let send = |path: String, body: Value| {
        client
            .request(
                if path.contains("/config/") {
                    reqwest::Method::PUT
                } else {
                    reqwest::Method::POST
                },
                format!("{}{path}", registry_url()),
            )
            .header("Content-Type", "application/vnd.schemaregistry.v1+json")
            .body(body.to_string())
            .send()
    };
    // An older layout in which `op` is a string: changing it to an enum is not backward compatible.
    let older = serde_json::json!({"type": "record", "name": "ContactEvent", "namespace": "ai.trusst.cdc",
        "fields": [{"name": "op", "type": "string"}]});
    let r = send(
        format!("/subjects/{subject}/versions"),
        serde_json::json!({"schema": older.to_string()}),
    )
    .await
    .unwrap();
    assert!(r.status().is_success(), "{:?}", r.text().await);
    let r = send(
        format!("/config/{subject}"),
        serde_json::json!({"compatibility": "BACKWARD"}),
    )
    .await
    .unwrap();
    assert!(r.status().is_success(), "{:?}", r.text().await);

    let registry = trusst_cdc::event::Registry::new(&registry_url()).unwrap();
    let e = registry
        .register(&subject, avro::SCHEMA_TEXT)
        .await
        .unwrap_err();
    assert_eq!(e.fault, trusst_cdc::error::Fault::User, "{e}");
    let msg = e.to_string();
    for part in [
        subject.as_str(),
        "incompatible",
        "compatibility BACKWARD",
        "\"default\": null",
        "/config/",
    ] {
        assert!(msg.contains(part), "the message names {part:?}: {msg}");
    }
    // The preflight asks the registry without registering, and the answer matches.
    assert_eq!(
        registry
            .compatible(&subject, avro::SCHEMA_TEXT)
            .await
            .unwrap(),
        Some(false)
    );
    // A subject without versions accepts anything (Apicurio says so, Confluent answers 404).
    let fresh = registry
        .compatible(&format!("{subject}-new"), avro::SCHEMA_TEXT)
        .await
        .unwrap();
    assert!(matches!(fresh, None | Some(true)), "{fresh:?}");
}

/// The `customer` field is a backward-compatible change: under a subject that holds the schema
/// as it was before it (and enforces BACKWARD), the registry accepts the current one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_customer_field_is_backward_compatible_in_the_registry() {
    let subject = registry::value_subject(&unique("contacts").replace('_', "-"));
    let mut before: Value = serde_json::from_str(avro::SCHEMA_TEXT).unwrap();
    let fields = before["fields"].as_array_mut().unwrap();
    assert_eq!(fields.last().unwrap()["name"], "customer");
    fields.pop();
    let registry = trusst_cdc::event::Registry::new(&registry_url()).unwrap();
    let old_id = registry
        .register(&subject, &before.to_string())
        .await
        .unwrap();
    let r = reqwest::Client::new()
        .put(format!("{}/config/{subject}", registry_url()))
        .header("Content-Type", "application/vnd.schemaregistry.v1+json")
        .body(serde_json::json!({"compatibility": "BACKWARD"}).to_string())
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{:?}", r.text().await);
    assert_eq!(
        registry
            .compatible(&subject, avro::SCHEMA_TEXT)
            .await
            .unwrap(),
        Some(true)
    );
    let new_id = registry
        .register(&subject, avro::SCHEMA_TEXT)
        .await
        .unwrap();
    assert_ne!(new_id, old_id);
}
