//! When the replication slot is lost: invalidated by `max_slot_wal_keep_size`, or dropped by
//! hand. `check` and the source name the cause and the fix instead of retrying for ever;
//! `source --recover` makes a new slot and re-publishes only what the gap may have changed,
//! ending with the topic equal to the guide's pivot query; `teardown` drops the slot and the
//! publication and says so.
//!
//! Invalidating a slot takes a small `max_slot_wal_keep_size`, which would endanger the slots of
//! every other test on the shared cluster, so that test runs on a cluster of its own
//! (`PG_INSTANCE=pg-slots`, port `SLOTS_PGPORT`, 25436), started through scripts/services.sh.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use trusst_cdc::generate::{Generator, Options, write_contacts};

const WAIT: Duration = Duration::from_secs(90);

/// The tests on the 16 MB cluster one at a time: one test's WAL would invalidate another's slot.
static SLOTS_CLUSTER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn has_all(ids: &[String]) -> impl FnMut(&[Record]) -> bool + '_ {
    move |recs| {
        ids.iter()
            .all(|id| recs.iter().any(|r| &r.key == id && r.value.is_some()))
    }
}

/// Push the slot past max_slot_wal_keep_size and let a checkpoint invalidate it.
async fn invalidate(db: &TestDb, slot: &str) {
    let c = db.client().await;
    let deadline = Instant::now() + WAIT;
    while wal_status(db, slot).await.as_deref() != Some("lost") {
        c.batch_execute(
            "CREATE TABLE IF NOT EXISTS filler (x text); \
             INSERT INTO filler SELECT repeat('x', 1000) FROM generate_series(1, 5000); \
             SELECT pg_switch_wal(); CHECKPOINT;",
        )
        .await
        .unwrap();
        assert!(Instant::now() < deadline, "the slot was never invalidated");
    }
    c.batch_execute("DROP TABLE IF EXISTS filler")
        .await
        .unwrap();
}

/// The URL of the cluster of its own (started when missing), where slots may keep at most
/// 16 MB of WAL.
async fn slots_cluster() -> String {
    let port = std::env::var("SLOTS_PGPORT").unwrap_or_else(|_| "25436".into());
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/services.sh");
    let out = Command::new(script)
        .arg("start-pg")
        .env("PG_INSTANCE", "pg-slots")
        .env("PGPORT", &port)
        .output()
        .expect("run scripts/services.sh");
    assert!(
        out.status.success(),
        "services.sh start-pg failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let url = format!("postgres://postgres:postgres@127.0.0.1:{port}/trusst");
    let c = trusst_cdc::pg::connect(&url).await.unwrap();
    // One statement at a time: ALTER SYSTEM refuses the transaction a multi-statement batch is.
    for sql in [
        "ALTER SYSTEM SET max_slot_wal_keep_size = '16MB'",
        "SELECT pg_reload_conf()",
    ] {
        c.batch_execute(sql).await.unwrap();
    }
    url
}

async fn wal_status(db: &TestDb, slot: &str) -> Option<String> {
    db.client()
        .await
        .query_opt(
            "SELECT wal_status FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .unwrap()
        .and_then(|r| r.get(0))
}

/// What happens to a database while its source is away: contacts complete (some whose answers
/// were written long before), answers change, contacts are deleted. Returns the ids that must
/// be on the topic afterwards and those that must be deleted.
async fn the_gap(db: &TestDb, old: &[String], late: &[String]) -> (Vec<String>, Vec<String>) {
    let new = completed(db, 91, 25).await;
    let c = db.client().await;
    for id in &old[..4] {
        c.execute(
            "UPDATE inferences SET result = 'false', updated_at = now() \
             WHERE contact_id = $1 AND question_id = 'q-agent-identified'",
            &[id],
        )
        .await
        .unwrap();
    }
    c.execute(
        "UPDATE contacts SET current_stage = 'COMPLETED' WHERE contact_id = ANY($1)",
        &[&late],
    )
    .await
    .unwrap();
    let gone = old[10..12].to_vec();
    c.execute("DELETE FROM contacts WHERE contact_id = ANY($1)", &[&gone])
        .await
        .unwrap();
    // Re-evaluated during the gap: no longer COMPLETED.
    c.execute(
        "UPDATE contacts SET current_stage = 'INFERENCE' WHERE contact_id = ANY($1)",
        &[&old[12..14].to_vec()],
    )
    .await
    .unwrap();
    let mut changed = new;
    changed.extend(old[..4].iter().cloned());
    changed.extend(late.iter().cloned());
    (changed, gone)
}

/// Contacts in INFERENCE whose answers were written a day ago: completed during the gap, with no
/// answer newer than the gap, only "absent from the topic" finds them.
async fn inference_stage(db: &TestDb, n: usize) -> Vec<String> {
    let mut c = db.client().await;
    let mut g = Generator::new(92, Options::default());
    let batch: Vec<_> = (0..n).map(|_| g.contact()).collect();
    write_contacts(&mut c, &batch).await.unwrap();
    let ids: Vec<String> = batch.into_iter().map(|c| c.contact_id).collect();
    c.execute(
        "UPDATE contacts SET current_stage = 'INFERENCE' WHERE contact_id = ANY($1)",
        &[&ids],
    )
    .await
    .unwrap();
    for sql in [
        "UPDATE inferences SET updated_at = now() - interval '1 day', created_at = now() - interval '1 day' \
         WHERE contact_id = ANY($1)",
        "UPDATE contacts SET created_at = now() - interval '1 day' WHERE contact_id = ANY($1)",
    ] {
        c.execute(sql, &[&ids]).await.unwrap();
    }
    ids
}

/// Contacts completed a day ago (their answers dated then), as most of a real database is.
async fn completed_a_day_ago(db: &TestDb, seed: u64, n: usize) -> Vec<String> {
    let ids = completed(db, seed, n).await;
    let c = db.client().await;
    for sql in [
        "UPDATE inferences SET updated_at = now() - interval '1 day', created_at = now() - interval '1 day' \
         WHERE contact_id = ANY($1)",
        "UPDATE contacts SET created_at = now() - interval '1 day' WHERE contact_id = ANY($1)",
    ] {
        c.execute(sql, &[&ids]).await.unwrap();
    }
    ids
}

/// Run the source once and expect it to refuse to start, naming `needles`.
fn refuses(src: &SourceProc, db: &TestDb, needles: &[&str]) {
    for cmd in ["check", "source"] {
        let (status, text) = src.run_once(db, cmd);
        assert_eq!(
            status.code(),
            Some(2),
            "{cmd} must stop with exit code 2:\n{text}"
        );
        for n in needles {
            assert!(text.contains(n), "{cmd}: expected {n:?} in:\n{text}");
        }
    }
}

/// Recover, then check the topic against the guide's query and count what was re-published.
async fn recover_and_compare(
    src: &mut SourceProc,
    db: &TestDb,
    reader: &mut TopicReader,
    changed: &[String],
    gone: &[String],
) {
    let before = reader.records.len();
    src.respawn_with(db, &["--recover"]);
    reader.until(WAIT, "the contacts of the gap and the deletes", |r| {
        has_all(changed)(r)
            && gone
                .iter()
                .all(|g| r.iter().any(|r| &r.key == g && r.value.is_none()))
    });
    src.wait_streaming();
    // The contacts the gap took out of COMPLETED: re-published without answers.
    let left: Vec<String> = db
        .client()
        .await
        .query(
            "SELECT contact_id FROM contacts WHERE current_stage = 'INFERENCE' \
             AND contact_id IN (SELECT contact_id FROM inferences)",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let marker = completed(db, 93, 1).await;
    reader.until(
        WAIT,
        "a contact completed after the recovery",
        has_all(&marker),
    );
    reader.settle(Duration::from_secs(1));
    src.assert_running();
    let latest = reader.latest();
    assert_eq!(left.len(), 2, "two contacts left COMPLETED during the gap");
    for id in &left {
        let e = &latest[id];
        assert!(
            e.source.reason == "recover"
                && e.universal_questions.is_empty()
                && e.cleared_question_keys
                    .as_ref()
                    .is_some_and(|k| !k.is_empty()),
            "contact {id} left COMPLETED during the gap: {e:?}"
        );
    }
    assert_matches_seed(&latest, &db.expected().await);
    let recovered = reader.records[before..]
        .iter()
        .filter(|r| r.event().is_some_and(|e| e.source.reason == "recover"))
        .count();
    let completed_now = db.expected().await.len();
    eprintln!(
        "recovery re-published {recovered} events for {} changed contacts and {} deletes; a full snapshot would publish {completed_now}",
        changed.len(),
        gone.len()
    );
    assert!(
        recovered >= changed.len() && recovered < completed_now / 2,
        "{recovered} events re-published for {} changed contacts of {completed_now}",
        changed.len()
    );
    assert!(
        src.log().contains("recovery: re-published"),
        "{}",
        src.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slot_invalidated_by_max_slot_wal_keep_size_is_reported_and_recovered() {
    let _serial = SLOTS_CLUSTER.lock().await;
    let base = slots_cluster().await;
    let db = TestDb::new_on(&base, "l_lost").await;
    let admin = db.client().await;
    let old = completed_a_day_ago(&db, 90, 150).await;
    let late = inference_stage(&db, 3).await;
    let mut src = SourceProc::start(&db, SourceOpts::default());
    let mut reader = TopicReader::new(&src.topic);
    reader.until(WAIT, "the snapshot", has_all(&old));
    src.wait_streaming();
    let streamed = completed(&db, 94, 5).await;
    reader.until(WAIT, "streamed contacts", has_all(&streamed));
    assert!(src.terminate().success(), "{}", src.log());

    let (changed, gone) = the_gap(&db, &old, &late).await;
    invalidate(&db, &src.slot).await;
    refuses(
        &src,
        &db,
        &[
            "wal_status = lost",
            "max_slot_wal_keep_size (16MB)",
            "--recover",
        ],
    );
    recover_and_compare(&mut src, &db, &mut reader, &changed, &gone).await;
    drop(admin);
}

/// Invalidated while streaming: the source (stopped with SIGSTOP, its connection kept) falls
/// behind past max_slot_wal_keep_size, PostgreSQL ends its walsender and invalidates the slot;
/// resumed, the source stops with the cause instead of retrying for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slot_invalidated_while_streaming_stops_the_source_with_the_cause() {
    let _serial = SLOTS_CLUSTER.lock().await;
    let base = slots_cluster().await;
    let db = TestDb::new_on(&base, "l_streaming").await;
    let ids = completed(&db, 98, 10).await;
    let mut src = SourceProc::start(&db, SourceOpts::default());
    let mut reader = TopicReader::new(&src.topic);
    reader.until(WAIT, "the snapshot", has_all(&ids));
    src.wait_streaming();
    let pid = src.child.id().to_string();
    Command::new("kill").args(["-STOP", &pid]).status().unwrap();
    let _ = completed(&db, 99, 5).await;
    invalidate(&db, &src.slot).await;
    Command::new("kill").args(["-CONT", &pid]).status().unwrap();
    let status = src.wait_exit(WAIT);
    assert_eq!(status.code(), Some(2), "{}", src.log());
    let log = src.log();
    for needle in [
        "wal_status = lost",
        "max_slot_wal_keep_size (16MB)",
        "--recover",
    ] {
        assert!(log.contains(needle), "expected {needle:?} in:\n{log}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slot_dropped_by_hand_is_reported_and_recovered() {
    let db = TestDb::new("l_dropped").await;
    let old = completed_a_day_ago(&db, 95, 120).await;
    let late = inference_stage(&db, 3).await;
    let mut src = SourceProc::start(&db, SourceOpts::default());
    let mut reader = TopicReader::new(&src.topic);
    reader.until(WAIT, "the snapshot", has_all(&old));
    src.wait_streaming();
    let streamed = completed(&db, 96, 5).await;
    reader.until(WAIT, "streamed contacts", has_all(&streamed));
    src.kill9();
    db.drop_slot(&src.slot).await;
    let (changed, gone) = the_gap(&db, &old, &late).await;
    refuses(&src, &db, &["is gone", "--recover"]);
    recover_and_compare(&mut src, &db, &mut reader, &changed, &gone).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn teardown_drops_the_slot_and_the_publication() {
    let db = TestDb::new("l_teardown").await;
    let ids = completed(&db, 97, 10).await;
    let mut src = SourceProc::start(&db, SourceOpts::default());
    let mut reader = TopicReader::new(&src.topic);
    reader.until(WAIT, "the snapshot", has_all(&ids));
    src.wait_streaming();
    // A running source holds the slot: teardown refuses.
    let (status, text) = src.run_once(&db, "teardown");
    assert!(
        !status.success() && text.contains("stop it first"),
        "{text}"
    );
    assert!(src.terminate().success());
    let (status, text) = src.run_once(&db, "teardown");
    assert!(status.success(), "{text}");
    for needle in [
        format!("dropped replication slot {}", src.slot),
        format!("dropped publication {}", src.slot),
        "forgot the snapshot progress".to_owned(),
    ] {
        assert!(text.contains(&needle), "expected {needle:?} in:\n{text}");
    }
    let c = db.client().await;
    let left: i64 = c
        .query_one(
            "SELECT (SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1) \
                  + (SELECT count(*) FROM pg_publication WHERE pubname = $1)",
            &[&src.slot],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0, "slot and publication are gone");
    // A start after teardown is a first start: a new slot and a full snapshot, no error.
    let before = reader.records.len();
    src.respawn(&db);
    src.wait_streaming();
    reader.until(WAIT, "the snapshot again", |r| {
        r.len() >= before + ids.len()
    });
}
