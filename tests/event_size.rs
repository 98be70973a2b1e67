//! An event larger than the broker accepts never stalls the source: its longest texts are
//! shortened to fit (and listed in the event's `truncated`), the contacts after it flow, and the
//! slot moves past it. Tried with JSON and with Avro, on a topic with the broker's default
//! `max.message.bytes` and on one lowered by an operator.

mod common;

use std::time::{Duration, Instant};

use common::*;
use trusst_cdc::event::{ContactEvent, avro};
use trusst_cdc::generate::{Generator, Options};

const WAIT: Duration = Duration::from_secs(90);

fn decode(v: &[u8]) -> ContactEvent {
    match avro::split_frame(v) {
        Some((_, body)) => avro::decode_body(body, avro::schema()).expect("Avro event"),
        None => ContactEvent::from_json(v).expect("JSON event"),
    }
}

/// A COMPLETED contact whose answers to `(question_id, text)` are given.
async fn big_contact(db: &TestDb, id: &str, answers: &[(&str, &str)]) {
    let mut c = db.client().await;
    let tx = c.transaction().await.unwrap();
    tx.execute(
        "INSERT INTO contacts (contact_id, external_id, current_stage, agent_id, direction) \
         VALUES ($1::text, 'ext-' || $1::text, 'INFERENCE', 'agent_1', 'inbound')",
        &[&id],
    )
    .await
    .unwrap();
    for (i, (q, text)) in answers.iter().enumerate() {
        tx.execute(
            "INSERT INTO inferences (inference_id, contact_id, question_id, result) VALUES ($1, $2, $3, $4)",
            &[&format!("{id}-{i}"), &id, q, text],
        )
        .await
        .unwrap();
    }
    tx.execute(
        "INSERT INTO inferences (inference_id, contact_id, question_id, result) VALUES ($1, $2, 'q-agent-identified', 'true')",
        &[&format!("{id}-flag"), &id],
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    c.execute(
        "UPDATE contacts SET current_stage = 'COMPLETED' WHERE contact_id = $1",
        &[&id],
    )
    .await
    .unwrap();
}

async fn wal_lsn(db: &TestDb) -> u64 {
    let s: String = db
        .client()
        .await
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    trusst_cdc::source::setup::parse_lsn(&s).unwrap()
}

async fn oversized_answers_are_shortened(format: &'static str, topic_max: Option<usize>) {
    let db = TestDb::new("t_size").await;
    let opts = SourceOpts {
        format,
        ..Default::default()
    };
    let topic = unique("contacts").replace('_', "-");
    if let Some(max) = topic_max {
        // An operator's lowered limit on a topic that already exists.
        let admin: rdkafka::admin::AdminClient<rdkafka::client::DefaultClientContext> =
            rdkafka::ClientConfig::new()
                .set("bootstrap.servers", brokers())
                .create()
                .unwrap();
        let max = max.to_string();
        let t =
            rdkafka::admin::NewTopic::new(&topic, 3, rdkafka::admin::TopicReplication::Fixed(1))
                .set("cleanup.policy", "compact")
                .set("max.message.bytes", &max);
        admin
            .create_topics(&[t], &rdkafka::admin::AdminOptions::new())
            .await
            .unwrap()[0]
            .as_ref()
            .unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let mut src = SourceProc::start_with(&db, unique("slot"), topic, dir, opts);
    src.wait_streaming();
    let mut reader = TopicReader::new(&src.topic);

    let mut g = Generator::new(77, Options::default());
    let five = g.text(5_000_000);
    let three_a = g.text(3_000_000);
    let three_b = g.text(3_000_000);
    big_contact(&db, "big-one", &[("q-resolution", &five)]).await;
    big_contact(
        &db,
        "big-two",
        &[("q-resolution", &three_a), ("q-summary", &three_b)],
    )
    .await;
    let after_big = wal_lsn(&db).await;
    let later = completed(&db, 78, 5).await;
    reader.until(WAIT, "the big contacts and the ones after them", |r| {
        ["big-one", "big-two"]
            .iter()
            .all(|id| r.iter().any(|r| r.key == *id))
            && later.iter().all(|id| r.iter().any(|r| &r.key == id))
    });
    src.assert_running();

    let limit = topic_max.unwrap_or(1_000_000).min(1_000_000);
    for r in &reader.records {
        let v = r.value.as_deref().unwrap();
        assert!(
            v.len() <= limit,
            "record of {} is {} bytes, over the limit {limit}",
            r.key,
            v.len()
        );
    }
    let latest: std::collections::BTreeMap<String, ContactEvent> = reader
        .records
        .iter()
        .map(|r| (r.key.clone(), decode(r.value.as_deref().unwrap())))
        .collect();
    for (id, full) in [
        ("big-one", vec![("resolution_notes", &five)]),
        (
            "big-two",
            vec![("resolution_notes", &three_a), ("call_summary", &three_b)],
        ),
    ] {
        let e = &latest[id];
        let cut = e.truncated.as_ref().expect("the event says what was cut");
        for (key, text) in full {
            let got = e
                .universal_questions
                .iter()
                .find(|q| q.question_key == key)
                .and_then(|q| q.result.as_deref())
                .unwrap();
            assert!(
                text.starts_with(got) && got.len() < text.len(),
                "{id}.{key}: a prefix"
            );
            let t = cut.iter().find(|t| t.question_key == key).unwrap();
            assert_eq!(t.original_bytes as usize, text.len());
            assert_eq!(t.kept_bytes as usize, got.len());
        }
        // The short answer is whole.
        assert!(
            e.universal_questions.iter().any(
                |q| q.question_key == "agent_identified" && q.result.as_deref() == Some("true")
            )
        );
    }
    // Everything else equals the guide's query.
    let expected: std::collections::BTreeMap<String, Expected> = db
        .expected()
        .await
        .into_iter()
        .filter(|(k, _)| !k.starts_with("big-"))
        .collect();
    let small: std::collections::BTreeMap<String, ContactEvent> = latest
        .into_iter()
        .filter(|(k, _)| !k.starts_with("big-"))
        .collect();
    assert_matches_seed(&small, &expected);
    // The slot moves past the big contacts: nothing holds WAL on the database.
    let deadline = Instant::now() + WAIT;
    loop {
        let confirmed = db.confirmed_lsn(&src.slot).await.unwrap_or(0);
        if confirmed > after_big {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the slot stayed at {confirmed:X}, before the big contacts' commits ({after_big:X})"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(src.log().contains("shortened"), "the log names the contact");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn oversized_json_events_are_shortened_not_stalled() {
    oversized_answers_are_shortened("json", None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn oversized_avro_events_are_shortened_not_stalled() {
    oversized_answers_are_shortened("avro", None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_topic_with_a_lower_max_message_bytes_is_respected() {
    oversized_answers_are_shortened("json", Some(200_000)).await;
}
