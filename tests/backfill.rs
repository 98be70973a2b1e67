//! `trusst-cdc backfill` against real PostgreSQL and Kafka: the events on the topic are exactly
//! the seed's time-range query, and a dry run publishes nothing.

mod common;

use std::process::Command;
use std::time::Duration;

use chrono::NaiveDate;
use common::{
    TestDb, TopicReader, assert_matches_seed, bin, brokers, completed, run_backfill, unique,
};

fn day(s: &str) -> chrono::NaiveDateTime {
    s.parse::<NaiveDate>()
        .unwrap()
        .and_hms_opt(0, 0, 0)
        .unwrap()
}

/// Run `backfill` on `db` into `topic`; its stdout, after checking it succeeded.
fn backfill(db: &TestDb, topic: &str, args: &[&str]) -> String {
    // A small page, so windows take several pages.
    let out = run_backfill(&db.url, topic, 7, args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "backfill failed: {stderr}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test]
async fn backfill_publishes_exactly_the_time_range_query() {
    let db = TestDb::new("backfill").await;
    // The generator spreads calls over 2025-01-15 .. 2025-01-22.
    completed(&db, 41, 80).await;
    let expected = db
        .expected_between(Some((day("2025-01-16"), day("2025-01-19"))))
        .await;
    let everything = db.expected().await;
    assert!(
        expected.len() >= 10 && expected.len() < everything.len(),
        "the range must select some contacts, not all"
    );

    let topic = unique("backfill").replace('_', "-");
    let out = backfill(
        &db,
        &topic,
        &[
            "--start-date",
            "2025-01-16",
            "--end-date",
            "2025-01-19",
            "--batch-days",
            "1",
        ],
    );
    assert!(
        out.contains(&format!("published {} events", expected.len())),
        "{out}"
    );

    let mut reader = TopicReader::new(&topic);
    reader.until(Duration::from_secs(30), "the backfilled events", |r| {
        r.len() >= expected.len()
    });
    reader.settle(Duration::from_secs(1));
    assert_eq!(
        reader.records.len(),
        expected.len(),
        "one event per contact, nothing else"
    );
    let latest = reader.latest();
    assert!(
        latest.values().all(|e| e.source.reason == "backfill"),
        "events say they come from a backfill"
    );
    assert_matches_seed(&latest, &expected);
}

#[tokio::test]
async fn backfill_dry_run_counts_and_publishes_nothing() {
    let db = TestDb::new("backfill_dry").await;
    completed(&db, 42, 40).await;
    let expected = db
        .expected_between(Some((day("2025-01-15"), day("2025-01-22"))))
        .await;

    let topic = unique("backfill-dry").replace('_', "-");
    let out = backfill(
        &db,
        &topic,
        &[
            "--start-date",
            "2025-01-15",
            "--end-date",
            "2025-01-22",
            "--dry-run",
        ],
    );
    assert!(
        out.starts_with(&format!("{} COMPLETED contacts", expected.len())),
        "{out}"
    );
    let info = trusst_cdc::kafka::describe_topic(&brokers(), &Default::default(), &topic)
        .await
        .unwrap();
    assert!(info.is_none(), "a dry run must not create the topic");
}

#[test]
fn backfill_rejects_a_reversed_range() {
    let out = Command::new(bin())
        .args([
            "backfill",
            "--start-date",
            "2025-01-22",
            "--end-date",
            "2025-01-15",
        ])
        .env("DATABASE_URL", "postgres://nobody@127.0.0.1:1/none")
        .env("KAFKA_BROKERS", "127.0.0.1:1")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "a user error");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("exclusive"), "{stderr}");
}
