//! The source end to end: real PostgreSQL (logical replication), the real binary, real Kafka.
//! Every test asserts what reached the topic.

mod common;

use std::time::Duration;

use common::*;
use trusst_cdc::event::{ContactEvent, Op};
use trusst_cdc::generate::{Generator, Options, write_contacts};

const WAIT: Duration = Duration::from_secs(60);

fn has_all(ids: &[String]) -> impl FnMut(&[Record]) -> bool + '_ {
    move |recs| {
        ids.iter()
            .all(|id| recs.iter().any(|r| &r.key == id && r.value.is_some()))
    }
}

/// Snapshot contacts and streamed contacts both equal the seed's query, field by field.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn completed_contacts_match_the_seed_query() {
    let db = TestDb::new("t_match").await;
    let before = completed(&db, 1, 25).await;
    let mut src = SourceProc::start(&db, SourceOpts::default());
    let mut reader = TopicReader::new(&src.topic);
    reader.until(WAIT, "snapshot contacts", has_all(&before));
    let after = completed(&db, 2, 40).await;
    reader.until(WAIT, "streamed contacts", has_all(&after));
    src.assert_running();
    reader.settle(Duration::from_secs(1));
    let latest = reader.latest();
    assert_matches_seed(&latest, &db.expected().await);
    let snap = reader.events_for(&before[0]);
    assert_eq!(snap[0].source.reason, "snapshot");
    let streamed = reader.events_for(&after[0]);
    assert_eq!(streamed.last().unwrap().source.reason, "stream");
    assert!(streamed.last().unwrap().source.commit_ts.is_some());
    // Every record on the topic follows the published JSON Schema.
    let schema: serde_json::Value =
        serde_json::from_str(include_str!("../schema/contact-event.schema.json")).unwrap();
    let validator = jsonschema::validator_for(&schema).unwrap();
    for r in &reader.records {
        let v: serde_json::Value = serde_json::from_slice(r.value.as_deref().unwrap()).unwrap();
        if let Err(e) = validator.validate(&v) {
            panic!("event for {} does not follow the schema: {e}", r.key);
        }
    }
    // Only COMPLETED contacts and only universal questions.
    for e in latest.values() {
        assert_eq!(e.universal_questions.len(), 8, "{e:?}");
        assert!(e.universal_questions.iter().all(|q| {
            ![
                "upsell_attempted",
                "product_knowledge",
                "next_steps",
                "escalation_reason",
            ]
            .contains(&q.question_key.as_str())
        }));
    }
    assert!(src.terminate().success(), "{}", src.log());
    db.drop_slot(&src.slot).await;
}

/// Inferences written during INFERENCE, COMPLETED set later with no inference touched: the
/// seed's `updated_at` window misses it, the source publishes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn late_completion_is_published() {
    let db = TestDb::new("t_late").await;
    let src = SourceProc::start(&db, SourceOpts::default());
    let mut reader = TopicReader::new(&src.topic);
    let c = db.client().await;
    c.batch_execute(
        "INSERT INTO contacts (contact_id, external_id, current_stage, agent_id, direction) VALUES ('late-1', 'ext-late', 'INFERENCE', 'agent_7', 'inbound');
         INSERT INTO inferences (inference_id, contact_id, question_id, result, updated_at)
           VALUES ('li-1', 'late-1', 'q-agent-identified', 'true', now() - interval '2 hours'),
                  ('li-2', 'late-1', 'q-quality-score', '9', now() - interval '2 hours');",
    )
    .await
    .unwrap();
    // A marker contact proves the stream has moved past the INFERENCE-stage writes.
    let marker = completed(&db, 3, 1).await;
    reader.until(WAIT, "marker", has_all(&marker));
    assert!(
        reader.events_for("late-1").is_empty(),
        "a contact in INFERENCE must not be published"
    );
    c.batch_execute("UPDATE contacts SET current_stage = 'COMPLETED' WHERE contact_id = 'late-1'")
        .await
        .unwrap();
    reader.until(WAIT, "late-1", |r| r.iter().any(|r| r.key == "late-1"));
    let e = reader.events_for("late-1").pop().unwrap();
    assert_eq!(e.universal_questions.len(), 2);
    assert_eq!(
        e.universal_questions
            .iter()
            .find(|q| q.question_key == "quality_score")
            .unwrap()
            .result
            .as_deref(),
        Some("9")
    );
    db.drop_slot(&src.slot).await;
}

/// A long transaction whose rows carry old timestamps commits after a newer one: published.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn late_commit_is_published() {
    let db = TestDb::new("t_commit").await;
    let mut src = SourceProc::start(&db, SourceOpts::default());
    // Creating a slot waits for open transactions, so the long one starts after it exists.
    src.wait_streaming();
    let mut reader = TopicReader::new(&src.topic);
    let mut long = db.client().await;
    let tx = long.transaction().await.unwrap();
    tx.batch_execute(
        "INSERT INTO contacts (contact_id, current_stage, created_at) VALUES ('slow-1', 'COMPLETED', now() - interval '1 day');
         INSERT INTO inferences (inference_id, contact_id, question_id, result, created_at, updated_at)
           VALUES ('si-1', 'slow-1', 'q-compliance-check', 'false', now() - interval '1 day', now() - interval '1 day');",
    )
    .await
    .unwrap();
    let newer = completed(&db, 4, 3).await;
    reader.until(WAIT, "newer contacts", has_all(&newer));
    tx.commit().await.unwrap();
    reader.until(WAIT, "slow-1", |r| r.iter().any(|r| r.key == "slow-1"));
    let e = reader.events_for("slow-1").pop().unwrap();
    assert_eq!(e.universal_questions[0].result.as_deref(), Some("false"));
    db.drop_slot(&src.slot).await;
}

/// A TOASTed Paragraph unchanged while another column changes: the event has the full text.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unchanged_toast_value_is_never_a_placeholder() {
    let db = TestDb::new("t_toast").await;
    let c = db.client().await;
    let mut g = Generator::new(5, Options::default());
    let long = g.text(7000);
    c.execute(
        "INSERT INTO contacts (contact_id, current_stage) VALUES ('toast-1', 'COMPLETED')",
        &[],
    )
    .await
    .unwrap();
    c.execute(
        "INSERT INTO inferences (inference_id, contact_id, question_id, result) VALUES ('ti-1', 'toast-1', 'q-resolution', $1)",
        &[&long],
    )
    .await
    .unwrap();
    // Stored out of line, so an update that leaves it alone sends the 'u' marker.
    let external: bool = c
        .query_one("SELECT pg_column_size(result) < octet_length(result) OR pg_column_size(result) > 2000 FROM inferences WHERE inference_id = 'ti-1'", &[])
        .await
        .unwrap()
        .get(0);
    assert!(external);
    let mut src = SourceProc::start(
        &db,
        SourceOpts {
            snapshot: "never",
            ..Default::default()
        },
    );
    src.wait_streaming();
    let mut reader = TopicReader::new(&src.topic);
    // Wait until the stream runs (a marker contact arrives), then touch the row.
    let marker = completed(&db, 6, 1).await;
    reader.until(WAIT, "marker", has_all(&marker));
    c.execute("UPDATE inferences SET updated_at = now() + interval '1 minute' WHERE inference_id = 'ti-1'", &[]).await.unwrap();
    reader.until(WAIT, "toast-1", |r| r.iter().any(|r| r.key == "toast-1"));
    let e = reader.events_for("toast-1").pop().unwrap();
    let q = e
        .universal_questions
        .iter()
        .find(|q| q.question_key == "resolution_notes")
        .unwrap();
    assert_eq!(q.result.as_deref(), Some(long.as_str()));
    assert!(long.len() > 4096);
    db.drop_slot(&src.slot).await;
}

/// Non-universal answers never appear; a question turned universal, or renamed, re-emits the
/// completed contacts that answered it (in chunks smaller than the contact count).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn question_changes_re_emit_affected_contacts() {
    let db = TestDb::new("t_question").await;
    let ids = completed(&db, 7, 20).await;
    let src = SourceProc::start(
        &db,
        SourceOpts {
            reemit_chunk: 7,
            ..Default::default()
        },
    );
    let mut reader = TopicReader::new(&src.topic);
    reader.until(WAIT, "snapshot", has_all(&ids));
    assert!(reader.latest().values().all(|e| {
        e.universal_questions
            .iter()
            .all(|q| q.question_key != "product_knowledge")
    }));

    let c = db.client().await;
    c.execute(
        "UPDATE questions SET is_universal = TRUE WHERE question_id = 'q-product'",
        &[],
    )
    .await
    .unwrap();
    let answered: Vec<String> = c
        .query(
            "SELECT contact_id FROM inferences WHERE question_id = 'q-product'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(
        answered.len() > 7,
        "the generator answers q-product for most contacts"
    );
    reader.until(WAIT, "re-emitted contacts with product_knowledge", |recs| {
        answered.iter().all(|id| {
            recs.iter()
                .filter(|r| &r.key == id)
                .filter_map(Record::event)
                .any(|e| {
                    e.source.reason == "question"
                        && e.universal_questions
                            .iter()
                            .any(|q| q.question_key == "product_knowledge")
                })
        })
    });

    c.execute(
        "UPDATE questions SET key = 'knows_products' WHERE question_id = 'q-product'",
        &[],
    )
    .await
    .unwrap();
    reader.until(WAIT, "renamed key on every affected contact", |recs| {
        answered.iter().all(|id| {
            recs.iter()
                .filter(|r| &r.key == id)
                .filter_map(Record::event)
                .next_back()
                .is_some_and(|e| {
                    e.universal_questions
                        .iter()
                        .any(|q| q.question_key == "knows_products")
                })
        })
    });
    reader.settle(Duration::from_secs(1));
    assert_matches_seed(&reader.latest(), &db.expected().await);
    db.drop_slot(&src.slot).await;
}

/// A deleted contact yields a delete event, then a tombstone; TRUNCATE is reported on the
/// control topic, never ignored.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn delete_and_truncate() {
    let db = TestDb::new("t_delete").await;
    let ids = completed(&db, 8, 3).await;
    let src = SourceProc::start(&db, SourceOpts::default());
    let mut reader = TopicReader::new(&src.topic);
    reader.until(WAIT, "snapshot", has_all(&ids));
    let c = db.client().await;
    c.execute("DELETE FROM contacts WHERE contact_id = $1", &[&ids[0]])
        .await
        .unwrap();
    reader.until(WAIT, "tombstone", |r| {
        r.iter().any(|r| r.key == ids[0] && r.value.is_none())
    });
    let recs: Vec<&Record> = reader.records.iter().filter(|r| r.key == ids[0]).collect();
    let n = recs.len();
    assert!(recs[n - 1].value.is_none(), "tombstone last");
    let del = recs[n - 2]
        .event()
        .expect("delete event before the tombstone");
    assert_eq!(del.op, Op::Delete);
    assert_eq!(del.trusst_contact_id, ids[0]);

    let mut control = TopicReader::new(&format!("{}.control", src.topic));
    c.batch_execute("TRUNCATE s3_conversations").await.unwrap();
    control.until(WAIT, "truncate report", |r| !r.is_empty());
    let body: serde_json::Value =
        serde_json::from_slice(control.records[0].value.as_deref().unwrap()).unwrap();
    assert_eq!(body["type"], "truncate");
    assert_eq!(body["tables"][0], "s3_conversations");
    db.drop_slot(&src.slot).await;
}

/// `kill -9` in the middle of a stream, restart: every completed contact is on the topic.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn crash_mid_stream_loses_nothing() {
    let db = TestDb::new("t_crash").await;
    let mut src = SourceProc::start(
        &db,
        SourceOpts {
            batch_max_contacts: 50,
            ..Default::default()
        },
    );
    let mut reader = TopicReader::new(&src.topic);
    let marker = completed(&db, 9, 1).await;
    reader.until(WAIT, "marker", has_all(&marker));
    let url = db.url.clone();
    let writer = tokio::spawn(async move {
        let mut c = trusst_cdc::pg::connect(&url).await.unwrap();
        let mut g = Generator::new(10, Options::default());
        let mut ids = Vec::new();
        for _ in 0..30 {
            let batch: Vec<_> = (0..20).map(|_| g.contact()).collect();
            write_contacts(&mut c, &batch).await.unwrap();
            ids.extend(batch.into_iter().map(|c| c.contact_id));
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        ids
    });
    // Kill once some, but not all, of the stream reached Kafka.
    reader.until(WAIT, "part of the stream", |r| r.len() > 60);
    let seen_before_kill = reader.records.len();
    src.kill9();
    let ids = writer.await.unwrap();
    assert!(
        seen_before_kill < ids.len(),
        "the kill must land mid-stream"
    );
    src.respawn(&db);
    reader.until(WAIT, "every contact after restart", has_all(&ids));
    reader.settle(Duration::from_secs(1));
    src.assert_running();
    assert_matches_seed(&reader.latest(), &db.expected().await);
    drop(src.child.kill());
    db.drop_slot(&src.slot).await;
}

/// No relevant writes (and writes only to an unrelated table): the confirmed LSN advances.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idle_slot_keeps_advancing() {
    let db = TestDb::new("t_idle").await;
    let mut src = SourceProc::start(
        &db,
        SourceOpts {
            heartbeat: "500ms",
            ..Default::default()
        },
    );
    let c = db.client().await;
    c.batch_execute("CREATE TABLE unrelated (id serial primary key, note text)")
        .await
        .unwrap();
    let mut first = None;
    for _ in 0..100 {
        first = db.confirmed_lsn(&src.slot).await;
        if first.is_some() && src.log().contains("streaming changes") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let first = first.expect("slot created");
    // Idle: only the heartbeat writes WAL.
    let mut idle_advanced = false;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        if db.confirmed_lsn(&src.slot).await.unwrap() > first {
            idle_advanced = true;
            break;
        }
    }
    assert!(
        idle_advanced,
        "confirmed LSN stayed at {first:X} while idle:\n{}",
        src.log()
    );
    // Writes only to a table outside the publication.
    let start = db.confirmed_lsn(&src.slot).await.unwrap();
    for i in 0..50 {
        c.execute(
            "INSERT INTO unrelated (note) VALUES ($1)",
            &[&format!("n{i}")],
        )
        .await
        .unwrap();
    }
    let target: String = c
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    let target = trusst_cdc::source::setup::parse_lsn(&target).unwrap();
    assert!(target > start);
    let mut reached = false;
    for _ in 0..150 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        if db.confirmed_lsn(&src.slot).await.unwrap() >= target {
            reached = true;
            break;
        }
    }
    src.assert_running();
    assert!(
        reached,
        "confirmed LSN did not pass the unrelated writes ({target:X}):\n{}",
        src.log()
    );
    db.drop_slot(&src.slot).await;
}

/// SIGTERM drains the pending batch, confirms it, and exits 0; a restart republishes nothing
/// that was confirmed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_stops_cleanly_and_confirms() {
    let db = TestDb::new("t_term").await;
    let mut src = SourceProc::start(&db, SourceOpts::default());
    let mut reader = TopicReader::new(&src.topic);
    let ids = completed(&db, 11, 5).await;
    reader.until(WAIT, "contacts", has_all(&ids));
    let status = src.terminate();
    assert!(status.success(), "exit {status}:\n{}", src.log());
    let confirmed = db.confirmed_lsn(&src.slot).await.unwrap();
    let c = db.client().await;
    let now: String = c
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    // Everything up to the contacts' commit is confirmed (the WAL may have grown a little since).
    let last_commit_lsn =
        trusst_cdc::source::setup::parse_lsn(&reader.events_for(&ids[4]).pop().unwrap().source.lsn)
            .unwrap();
    assert!(
        confirmed >= last_commit_lsn,
        "confirmed {confirmed:X} < {last_commit_lsn:X} (now {now})"
    );
    db.drop_slot(&src.slot).await;
}

/// The session's transaction id as the stream carries it (32 bits), assigning one if needed.
async fn xid32(c: &tokio_postgres::Client) -> i64 {
    c.query_one(
        "SELECT (pg_current_xact_id()::text::bigint & 4294967295)",
        &[],
    )
    .await
    .unwrap()
    .get(0)
}

/// The re-read waits for streamed transactions to become visible: a transaction still open
/// holds it back, its commit releases it. (The wait covers the moment between a commit reaching
/// the slot and other sessions seeing it, which cannot be produced on demand.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn re_read_waits_until_streamed_transactions_are_visible() {
    use trusst_cdc::source::enrich;
    let db = TestDb::new("t_visible").await;
    let writer = db.client().await;
    writer.batch_execute("BEGIN").await.unwrap();
    let xid = xid32(&writer).await;
    let reader = db.client().await;
    let check = enrich::prepare_visibility(&reader).await.unwrap();
    // A committed transaction (this session's last one) passes at once.
    let done_xid = xid32(&reader).await;
    enrich::await_visible(&reader, &check, &[done_xid])
        .await
        .unwrap();

    let (tx, mut rx) = tokio::sync::oneshot::channel();
    let wait = tokio::spawn(async move {
        let r = enrich::await_visible(&reader, &check, &[done_xid, xid]).await;
        let _ = tx.send(());
        r
    });
    // While the writer's transaction is open the wait cannot end, however slow the machine.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        rx.try_recv().is_err(),
        "the re-read went ahead while transaction {xid} was still open"
    );
    writer.batch_execute("COMMIT").await.unwrap();
    tokio::time::timeout(Duration::from_secs(9), wait)
        .await
        .expect("the wait ended once the transaction committed")
        .unwrap()
        .unwrap();
}

/// Snapshot progress lives in Kafka: a source that lost its state folder (a container
/// rescheduled without its volume) mid-snapshot publishes again at most the pages that were in
/// flight (up to five: four awaiting their acknowledgement, the next being handed over), and one
/// that lost it after the snapshot publishes nothing again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn snapshot_progress_survives_a_lost_state_folder() {
    const PAGE: usize = 20;
    let db = TestDb::new("t_state").await;
    let ids = completed(&db, 51, 1200).await;
    let mut src = SourceProc::start(
        &db,
        SourceOpts {
            batch_max_contacts: PAGE,
            // Every page waits for its acknowledgement: a slow snapshot, so the kill lands in it.
            kafka_properties: vec![("linger.ms".into(), "150".into())],
            ..Default::default()
        },
    );
    let mut reader = TopicReader::new(&src.topic);
    reader.until(WAIT, "part of the snapshot", |r| r.len() >= 200);
    src.kill9();
    reader.settle(Duration::from_secs(1));
    let before_kill = reader.records.len();
    assert!(before_kill < ids.len(), "the kill must land mid-snapshot");
    let state = src.dir.path().join("state");
    let _ = std::fs::remove_dir_all(&state);
    src.respawn(&db);
    reader.until(WAIT, "the whole snapshot", has_all(&ids));
    src.wait_streaming();
    let snapshot_records = |r: &TopicReader| {
        r.records
            .iter()
            .filter(|r| r.event().is_some_and(|e| e.source.reason == "snapshot"))
            .count()
    };
    let again = snapshot_records(&reader) - ids.len();
    assert!(
        again <= 5 * PAGE,
        "{again} contacts were published again after the state folder was lost (at most the five pages in flight, {}, may be)",
        5 * PAGE
    );

    // After the snapshot: the folder lost again, a restart, nothing published again.
    let total = snapshot_records(&reader);
    src.kill9();
    let _ = std::fs::remove_dir_all(&state);
    src.respawn(&db);
    src.wait_streaming();
    let marker = completed(&db, 52, 1).await;
    reader.until(WAIT, "the marker", has_all(&marker));
    reader.settle(Duration::from_secs(1));
    assert_eq!(
        snapshot_records(&reader),
        total,
        "no snapshot event after a restart"
    );
    assert_matches_seed(&reader.latest(), &db.expected().await);
}

/// Completed contacts streamed, the source stopped, `change` made to the questions, the source
/// started again: the newest event of each contact once every one was re-emitted.
async fn question_changed_while_stopped(
    prefix: &str,
    seed: u64,
    change: &str,
) -> (TestDb, std::collections::BTreeMap<String, ContactEvent>) {
    let db = TestDb::new(prefix).await;
    let ids = completed(&db, seed, 15).await;
    let mut src = SourceProc::start(&db, SourceOpts::default());
    let mut reader = TopicReader::new(&src.topic);
    reader.until(WAIT, "the snapshot", has_all(&ids));
    src.wait_streaming();
    assert!(src.terminate().success(), "{}", src.log());
    db.client().await.batch_execute(change).await.unwrap();
    src.respawn(&db);
    reader.until(WAIT, "every contact again", |r| {
        ids.iter().all(|id| {
            r.iter()
                .filter_map(|r| (&r.key == id).then(|| r.event()).flatten())
                .any(|e| e.source.reason == "question")
        })
    });
    reader.settle(Duration::from_secs(1));
    let latest = reader.latest();
    assert_eq!(latest.len(), ids.len(), "every contact has an event");
    (db, latest)
}

/// A question stops being universal while the source is stopped: on restart the change is
/// replayed, and although the question cache already shows the new state, every affected
/// contact is published again without that answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_question_made_non_universal_while_stopped_is_re_emitted() {
    let (db, latest) = question_changed_while_stopped(
        "t_qdown",
        53,
        "UPDATE questions SET is_universal = false WHERE question_id = 'q-empathy'",
    )
    .await;
    assert!(
        latest.values().all(|e| e
            .universal_questions
            .iter()
            .all(|q| q.question_key != "empathy_rating")),
        "the answer to a question that is no longer universal is gone"
    );
    assert!(
        latest.values().all(|e| e
            .cleared_question_keys
            .as_ref()
            .is_some_and(|k| k.contains(&"empathy_rating".to_owned()))),
        "and listed as cleared, so targets empty its field"
    );
    assert_matches_seed(&latest, &db.expected().await);
}

/// A question renamed while the source is stopped: the replayed rename still names the old key
/// as cleared (the old row image of `questions`, REPLICA IDENTITY FULL), so no target keeps the
/// answer under the old field.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_question_renamed_while_stopped_clears_its_old_key() {
    let (db, latest) = question_changed_while_stopped(
        "t_qrename",
        59,
        "UPDATE questions SET key = 'empathy_score' WHERE question_id = 'q-empathy'",
    )
    .await;
    for e in latest.values() {
        assert!(
            e.universal_questions
                .iter()
                .any(|q| q.question_key == "empathy_score")
                && e.universal_questions
                    .iter()
                    .all(|q| q.question_key != "empathy_rating"),
            "the answer is under its new key only: {e:?}"
        );
        assert!(
            e.cleared_question_keys
                .as_ref()
                .is_some_and(|k| k.contains(&"empathy_rating".to_owned())),
            "the old key is listed as cleared, so targets empty its field: {:?}",
            e.cleared_question_keys
        );
    }
    assert_matches_seed(&latest, &db.expected().await);
}

/// An answer that disappears is named in the contact's next event, so targets clear it: one
/// deleted answer, every answer of a contact (it gets an event without answers), a contact that
/// leaves COMPLETED (the same, until it is COMPLETED again), a renamed question (its old key).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn answers_that_disappear_are_listed_as_cleared() {
    let db = TestDb::new("t_cleared").await;
    let ids = completed(&db, 61, 12).await;
    let src = SourceProc::start(&db, SourceOpts::default());
    let mut reader = TopicReader::new(&src.topic);
    reader.until(WAIT, "the snapshot", has_all(&ids));
    let c = db.client().await;
    let universal: Vec<String> = c
        .query(
            "SELECT key FROM questions WHERE is_universal ORDER BY key",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    // A snapshot event lists the universal questions its contact has no answer to.
    for (id, e) in reader.latest() {
        let answered: Vec<&str> = e
            .universal_questions
            .iter()
            .map(|q| q.question_key.as_str())
            .collect();
        let cleared = e.cleared_question_keys.clone().unwrap_or_default();
        for k in &universal {
            assert!(
                answered.contains(&k.as_str()) != cleared.contains(k),
                "contact {id}: {k} must be either answered or cleared: {e:?}"
            );
        }
    }

    c.execute(
        "DELETE FROM inferences WHERE question_id = 'q-quality-score' AND contact_id = $1",
        &[&ids[1]],
    )
    .await
    .unwrap();
    c.execute(
        "DELETE FROM inferences i USING questions q \
         WHERE q.question_id = i.question_id AND q.is_universal AND i.contact_id = $1",
        &[&ids[0]],
    )
    .await
    .unwrap();
    // Leaves COMPLETED and loses its answers (re-evaluation); another leaves and comes back.
    c.batch_execute(&format!(
        "UPDATE contacts SET current_stage = 'INFERENCE' WHERE contact_id = '{0}'; \
         DELETE FROM inferences WHERE contact_id = '{0}'; \
         UPDATE contacts SET current_stage = 'INFERENCE' WHERE contact_id = '{1}'",
        ids[5], ids[6]
    ))
    .await
    .unwrap();
    let newest = |recs: &[Record], id: &str| {
        recs.iter()
            .filter(|r| r.key == id)
            .filter_map(Record::event)
            .next_back()
    };
    reader.until(WAIT, "the events of the changed contacts", |recs| {
        [&ids[0], &ids[1], &ids[5], &ids[6]]
            .iter()
            .all(|id| newest(recs, id).is_some_and(|e| e.source.reason == "stream"))
    });
    let one = newest(&reader.records, &ids[1]).unwrap();
    assert!(
        one.universal_questions
            .iter()
            .all(|q| q.question_key != "quality_score")
            && one
                .cleared_question_keys
                .as_ref()
                .is_some_and(|k| k.contains(&"quality_score".to_owned())),
        "the deleted answer is listed as cleared: {one:?}"
    );
    let all = newest(&reader.records, &ids[0]).unwrap();
    assert_eq!(all.op, Op::Upsert);
    assert!(all.universal_questions.is_empty(), "{all:?}");
    assert_eq!(
        all.cleared_question_keys.as_deref(),
        Some(universal.as_slice()),
        "a contact without answers clears every universal question"
    );
    for id in [&ids[5], &ids[6]] {
        let left = newest(&reader.records, id).unwrap();
        assert!(
            left.op == Op::Upsert
                && left.universal_questions.is_empty()
                && left.cleared_question_keys.as_deref() == Some(universal.as_slice()),
            "a contact that left COMPLETED has its answers emptied: {left:?}"
        );
    }
    c.execute(
        "UPDATE contacts SET current_stage = 'COMPLETED' WHERE contact_id = $1",
        &[&ids[6]],
    )
    .await
    .unwrap();
    reader.until(WAIT, "the answers of the contact COMPLETED again", |recs| {
        newest(recs, &ids[6]).is_some_and(|e| !e.universal_questions.is_empty())
    });

    c.execute(
        "UPDATE questions SET key = 'agent_named' WHERE question_id = 'q-agent-identified'",
        &[],
    )
    .await
    .unwrap();
    let answered: Vec<String> = c
        .query(
            "SELECT contact_id FROM inferences WHERE question_id = 'q-agent-identified'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(!answered.is_empty());
    reader.until(WAIT, "the renamed question's contacts again", |recs| {
        answered.iter().all(|id| {
            newest(recs, id).is_some_and(|e| {
                e.source.reason == "question"
                    && e.cleared_question_keys
                        .as_ref()
                        .is_some_and(|k| k.contains(&"agent_identified".to_owned()))
            })
        })
    });
    reader.settle(Duration::from_secs(1));
    assert_matches_seed(&reader.latest(), &db.expected().await);
    db.drop_slot(&src.slot).await;
}
