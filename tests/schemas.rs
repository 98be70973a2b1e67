//! The source on schemas customers really have, not only the guide's: `timestamptz` and `uuid`
//! ids with an enum stage (as on Aurora), integer ids with `date` call times, `char(n)` values
//! and numeric or boolean results, identity indexes instead of REPLICA IDENTITY FULL. Each run
//! passes `check`, snapshots, streams inserts, updates and deletes, and ends with the topic equal
//! to the guide's pivot query. A type the source cannot read fails `check` and the source with
//! the table, the column and the fix, never a panic.

mod common;

use std::process::{Command, Output};
use std::time::Duration;

use common::*;

const WAIT: Duration = Duration::from_secs(60);

/// An empty database loaded with `schema`.
async fn db_with(prefix: &str, schema: &str) -> TestDb {
    let name = unique(&format!("test_{prefix}"));
    let admin = trusst_cdc::pg::connect(&base_url()).await.unwrap();
    admin
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .unwrap();
    let db = TestDb {
        url: with_db(&base_url(), &name),
        name,
    };
    db.client().await.batch_execute(schema).await.unwrap();
    db
}

/// `trusst-cdc <cmd>` on `db` with a config of its own.
fn run(cmd: &str, db: &TestDb) -> (Output, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("source.toml");
    std::fs::write(
        &path,
        format!(
            "[source]\nslot = \"{}\"\nstate_dir = \"{}\"\n",
            unique("slot"),
            dir.path().display()
        ),
    )
    .unwrap();
    let out = Command::new(bin())
        .args([cmd, "--config"])
        .arg(&path)
        .env("DATABASE_URL", &db.url)
        .env("KAFKA_BROKERS", brokers())
        .env("TRUSST_METRICS_LISTEN", "off")
        .env("TRUSST_TOPIC", unique("bad").replace('_', "-"))
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out, text)
}

fn has_all(ids: &[String]) -> impl FnMut(&[Record]) -> bool + '_ {
    move |recs| {
        ids.iter()
            .all(|id| recs.iter().any(|r| &r.key == id && r.value.is_some()))
    }
}

/// Aurora-style: uuid ids, timestamptz everywhere, the stage an enum, and an identity index
/// (inference_id, contact_id) instead of REPLICA IDENTITY FULL on inferences.
const AURORA: &str = include_str!("fixtures/trusst_schema_variant.sql");

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn aurora_schema_with_timestamptz_uuid_and_an_enum_stage() {
    let db = db_with("s_aurora", AURORA).await;
    trusst_cdc::generate::ensure_questions(&db.client().await)
        .await
        .unwrap();
    let before = completed(&db, 41, 12).await;
    let (out, text) = run("check", &db);
    assert!(out.status.success(), "check failed:\n{text}");
    assert!(
        text.contains("contact ids uuid") && text.contains("timestamp with time zone"),
        "{text}"
    );
    assert!(
        text.contains(
            "inferences_cdc_identity (inference_id, contact_id), which contains contact_id"
        ),
        "{text}"
    );

    let mut src = SourceProc::start(&db, SourceOpts::default());
    let mut reader = TopicReader::new(&src.topic);
    reader.until(WAIT, "the snapshot", has_all(&before));
    let after = completed(&db, 42, 8).await;
    let c = db.client().await;
    // An answer changes, one disappears (a delete under the identity index), a contact goes,
    // a start time is 'infinity' (valid, but no ISO 8601 time), a contact gets a second, older
    // conversation (its answers must not repeat), a conversation not linked to any contact yet
    // arrives (nothing to publish, nothing to complain about).
    c.batch_execute(&format!(
        "UPDATE inferences SET result = 'false', updated_at = now() WHERE contact_id = '{0}' AND question_id = 'q-agent-identified';
         DELETE FROM inferences WHERE contact_id = '{0}' AND question_id = 'q-quality-score';
         DELETE FROM contacts WHERE contact_id = '{1}';
         UPDATE contacts SET start_time = 'infinity' WHERE contact_id = '{2}';
         INSERT INTO s3_conversations (conversation_id, contact_id, conn_id, agent_id, call_time)
           VALUES ('second-{3}', '{3}', 'REC-old', 'user.old', timestamptz '2020-01-01 00:00:00+00');
         INSERT INTO s3_conversations (conversation_id, contact_id, conn_id) VALUES ('unlinked-1', NULL, 'REC-x');",
        after[0], after[1], after[2], after[3]
    ))
    .await
    .unwrap();
    let marker = completed(&db, 43, 1).await;
    reader.until(WAIT, "streamed contacts", |r| {
        has_all(&after[2..])(r)
            && has_all(&marker)(r)
            && r.iter().any(|r| r.key == after[1] && r.value.is_none())
    });
    reader.settle(Duration::from_secs(1));
    src.assert_running();
    let latest = reader.latest();
    assert_matches_seed(&latest, &db.expected().await);
    let e = &latest[&after[0]];
    assert!(
        !e.universal_questions
            .iter()
            .any(|q| q.question_key == "quality_score"),
        "the deleted answer is gone: {e:?}"
    );
    assert_eq!(
        latest[&after[2]].call_start_time, None,
        "'infinity' is published as null"
    );
    let two = &latest[&after[3]];
    assert_eq!(
        two.universal_questions.len(),
        8,
        "answers once each: {two:?}"
    );
    assert_ne!(two.conn_id.as_deref(), Some("REC-old"), "the latest call");
    assert!(
        !src.log().contains("stream anomaly"),
        "no anomaly recorded:\n{}",
        src.log()
    );
    // timestamptz values leave as UTC with a Z.
    let call = e.call_date.as_deref().unwrap();
    assert!(call.ends_with('Z'), "{call}");
    assert!(
        e.universal_questions[0]
            .inference_updated_at
            .as_deref()
            .unwrap()
            .ends_with('Z')
    );
}

/// Integer ids, `date` call times, a `char(n)` external id and stage (the stream carries them
/// padded), a smallint flag, and one result
/// type per variant (numeric or boolean); s3_conversations' primary key holds contact_id, so
/// the default replica identity already names the contact.
fn integer_schema(result_type: &str) -> String {
    format!(
        r#"
CREATE TABLE questions (
    question_id integer PRIMARY KEY, key varchar(64) NOT NULL, text text, result_type varchar(20) NOT NULL,
    is_universal smallint NOT NULL DEFAULT 0, "group" varchar(40), "order" smallint);
CREATE TABLE contacts (
    contact_id bigint PRIMARY KEY, stream_id varchar(40), external_id char(12), start_time timestamp(3),
    direction varchar(10), current_stage character(20) NOT NULL, agent_id integer);
CREATE TABLE inferences (
    inference_id bigint PRIMARY KEY, contact_id bigint NOT NULL REFERENCES contacts ON DELETE CASCADE,
    question_id integer NOT NULL REFERENCES questions, result {result_type}, updated_at timestamptz);
CREATE UNIQUE INDEX inferences_cdc_identity ON inferences (inference_id, contact_id);
ALTER TABLE inferences REPLICA IDENTITY USING INDEX inferences_cdc_identity;
CREATE TABLE s3_conversations (
    conversation_id bigint, contact_id bigint REFERENCES contacts ON DELETE CASCADE,
    conn_id varchar(40), agent_id integer, call_time date, PRIMARY KEY (conversation_id, contact_id));
"#
    )
}

/// Questions 1-3 universal, 4 not; contacts 1..=n COMPLETED (n+1 and on INFERENCE), each with
/// a conversation and an answer to every question, from `value(contact, question)`.
async fn fill(db: &TestDb, from: i64, to: i64, value: &str, rt: &str) {
    let c = db.client().await;
    c.batch_execute(&format!(
        "INSERT INTO questions VALUES
           (1, 'q_one', 'First', '{rt}', 1, 'G', 1), (2, 'q_two', 'Second', '{rt}', 1, 'G', 2),
           (3, 'q_three', NULL, '{rt}', 7, 'H', 1), (4, 'q_private', 'Not universal', '{rt}', 0, 'H', 2)
         ON CONFLICT DO NOTHING;
         INSERT INTO contacts SELECT n, 'stream-' || (n % 3), 'ext-' || n, timestamp '2025-02-01 08:00:00.123' + n * interval '1 minute',
                'inbound', 'INFERENCE', 100 + n % 5 FROM generate_series({from}, {to}) n;
         INSERT INTO s3_conversations SELECT n * 10, n, 'REC-' || n, 200 + n % 5, date '2025-02-01' + (n % 4)::int
           FROM generate_series({from}, {to}) n;
         INSERT INTO inferences SELECT n * 10 + q, n, q, {value}, timestamptz '2025-02-02 10:00:00+02' + n * interval '1 second'
           FROM generate_series({from}, {to}) n, generate_series(1, 4) q;
         UPDATE contacts SET current_stage = 'COMPLETED' WHERE contact_id BETWEEN {from} AND {to};"
    ))
    .await
    .unwrap();
}

async fn integer_variant(prefix: &str, result_type: &str, value: &str, rt: &str) {
    let db = db_with(prefix, &integer_schema(result_type)).await;
    fill(&db, 1, 20, value, rt).await;
    let (out, text) = run("check", &db);
    assert!(out.status.success(), "check failed:\n{text}");
    assert!(
        text.contains("contact ids bigint")
            && text.contains("s3_conversations.call_time date")
            && text.contains("is_universal smallint"),
        "{text}"
    );
    let mut src = SourceProc::start(&db, SourceOpts::default());
    let mut reader = TopicReader::new(&src.topic);
    let before: Vec<String> = (1..=20).map(|n| n.to_string()).collect();
    reader.until(WAIT, "the snapshot", has_all(&before));
    fill(&db, 21, 30, value, rt).await;
    let c = db.client().await;
    c.batch_execute(
        "DELETE FROM inferences WHERE contact_id = 21 AND question_id = 2;
         UPDATE questions SET is_universal = 0 WHERE question_id = 3;
         DELETE FROM contacts WHERE contact_id = 5;",
    )
    .await
    .unwrap();
    let after: Vec<String> = (21..=30).map(|n| n.to_string()).collect();
    reader.until(WAIT, "the streamed contacts and the re-emit", |r| {
        has_all(&after)(r)
            && r.iter().any(|r| r.key == "5" && r.value.is_none())
            && r.iter().filter(|r| r.key == "1").count() >= 2
    });
    reader.settle(Duration::from_secs(2));
    src.assert_running();
    let latest = reader.latest();
    assert_matches_seed(&latest, &db.expected().await);
    let e = &latest["21"];
    assert_eq!(
        e.call_date.as_deref(),
        Some("2025-02-02"),
        "a date stays a date"
    );
    assert_eq!(e.external_id.as_deref(), Some("ext-21"));
    assert_eq!(
        e.universal_questions
            .iter()
            .map(|q| q.question_key.as_str())
            .collect::<Vec<_>>(),
        ["q_one"],
        "question 2 deleted, question 3 no longer universal"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn integer_ids_dates_and_numeric_results() {
    integer_variant("s_numeric", "numeric(4,1)", "(n % 10) + q / 10.0", "Rating").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn integer_ids_dates_and_boolean_results() {
    integer_variant("s_boolean", "boolean", "(n + q) % 2 = 0", "Boolean").await;
}

/// Columns the source cannot read: `check` names each with its fix, and the source exits
/// non-zero with the same message instead of crashing in the re-read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreadable_types_are_named_with_their_fix() {
    let schema = integer_schema("bytea").replace("call_time date", "call_time bigint");
    let db = db_with("s_bad", &schema).await;
    for cmd in ["check", "source"] {
        let (out, text) = run(cmd, &db);
        assert!(!out.status.success(), "{cmd} must fail:\n{text}");
        assert_eq!(
            out.status.code(),
            Some(2),
            "{cmd}: a configuration error:\n{text}"
        );
        for needle in [
            "column s3_conversations.call_time: type bigint",
            "timestamp, timestamptz or date",
            "column inferences.result: type bytea",
            "ALTER TABLE s3_conversations ALTER COLUMN \"call_time\"",
        ] {
            assert!(
                text.contains(needle),
                "{cmd}: expected {needle:?} in:\n{text}"
            );
        }
        assert!(!text.contains("panicked"), "{cmd} panicked:\n{text}");
    }
}

/// A partitioned `inferences` (changes arrive under the partitions' names unless the
/// publication publishes via the root) and a same-named `contacts` table in another schema that
/// an operator's FOR ALL TABLES publication also carries: neither may cost or invent an event.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn partitioned_tables_and_same_named_tables_elsewhere() {
    let schema = trusst_cdc::generate::SCHEMA_SQL.replace(
        "CREATE TABLE IF NOT EXISTS inferences (
    inference_id VARCHAR PRIMARY KEY,",
        "CREATE TABLE IF NOT EXISTS inferences (
    inference_id VARCHAR,",
    );
    let schema = schema.replace(
        "    updated_at   TIMESTAMP NOT NULL DEFAULT NOW()
);
CREATE INDEX IF NOT EXISTS inferences_contact_id",
        "    updated_at   TIMESTAMP NOT NULL DEFAULT NOW(),
    PRIMARY KEY (inference_id, contact_id)
) PARTITION BY HASH (contact_id);
CREATE TABLE inferences_p0 PARTITION OF inferences FOR VALUES WITH (MODULUS 2, REMAINDER 0);
CREATE TABLE inferences_p1 PARTITION OF inferences FOR VALUES WITH (MODULUS 2, REMAINDER 1);
CREATE INDEX IF NOT EXISTS inferences_contact_id",
    );
    assert!(
        schema.contains("PARTITION BY HASH"),
        "the fixture changed: {schema}"
    );
    let db = db_with(
        "s_parts",
        &format!(
            "{schema}
         ALTER TABLE s3_conversations REPLICA IDENTITY FULL;
         CREATE SCHEMA archive;
         CREATE TABLE archive.contacts (LIKE contacts INCLUDING ALL);"
        ),
    )
    .await;
    trusst_cdc::generate::ensure_questions(&db.client().await)
        .await
        .unwrap();
    let before = completed(&db, 61, 10).await;
    let slot = unique("slot");
    db.client()
        .await
        .batch_execute(&format!(
            "CREATE PUBLICATION {slot} FOR ALL TABLES WITH (publish_via_partition_root = false)"
        ))
        .await
        .unwrap();
    // check names the publication's problem with the fix.
    let dir = tempfile::tempdir().unwrap();
    let topic = unique("contacts").replace('_', "-");
    let mut src = SourceProc::start_with(&db, slot.clone(), topic, dir, SourceOpts::default());
    let (_, text) = src.run_once(&db, "check");
    assert!(
        text.contains(
            "publishes the partitioned table(s) inferences under their partitions' names"
        ) && text.contains(&format!(
            "ALTER PUBLICATION {slot} SET (publish_via_partition_root = true)"
        )),
        "{text}"
    );
    let status = src.wait_exit(WAIT);
    assert_eq!(
        status.code(),
        Some(2),
        "the source refuses it too:\n{}",
        src.log()
    );
    db.client()
        .await
        .batch_execute(&format!(
            "ALTER PUBLICATION {slot} SET (publish_via_partition_root = true)"
        ))
        .await
        .unwrap();
    src.respawn(&db);
    let mut reader = TopicReader::new(&src.topic);
    reader.until(WAIT, "the snapshot", has_all(&before));
    src.wait_streaming();
    let c = db.client().await;
    c.batch_execute(&format!(
        "INSERT INTO archive.contacts SELECT * FROM contacts WHERE contact_id = '{0}';
         DELETE FROM archive.contacts WHERE contact_id = '{0}';
         UPDATE inferences SET result = 'false', updated_at = now() WHERE contact_id = '{1}' AND question_id = 'q-agent-identified';",
        before[0], before[1]
    ))
    .await
    .unwrap();
    let after = completed(&db, 62, 5).await;
    reader.until(WAIT, "streamed contacts and the changed answer", |r| {
        has_all(&after)(r) && r.iter().filter(|r| r.key == before[1]).count() >= 2
    });
    reader.settle(Duration::from_secs(1));
    src.assert_running();
    assert!(
        reader.records.iter().all(|r| r.value.is_some()),
        "no delete for the archive table's row"
    );
    assert_matches_seed(&reader.latest(), &db.expected().await);
}
