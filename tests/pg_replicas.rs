//! PostgreSQL as customers run it beyond one server: a read replica as the source (16+, what
//! the integration guide recommends for load), and a primary failover that loses nothing
//! (17+, failover slots kept in step on the standby). Each pair runs on loopback ports of its
//! own, from the npm builds through `scripts/services.sh start-standby` and `promote-pg`.

mod common;

use std::time::{Duration, Instant};

use common::*;

const WAIT: Duration = Duration::from_secs(120);

fn has_all(ids: &[String]) -> impl FnMut(&[Record]) -> bool + '_ {
    move |recs| {
        ids.iter()
            .all(|id| recs.iter().any(|r| &r.key == id && r.value.is_some()))
    }
}

/// Wait until `sql` (one boolean) is true on `url`.
async fn until_true(url: &str, sql: &str, what: &str) {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Ok(c) = trusst_cdc::pg::connect(url).await
            && let Ok(r) = c.query_one(sql, &[]).await
            && r.get::<_, bool>(0)
        {
            return;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn drop_slot_on(url: &str, slot: &str) {
    if let Ok(c) = trusst_cdc::pg::connect(url).await {
        for _ in 0..50 {
            if c.execute("SELECT pg_drop_replication_slot($1)", &[&slot])
                .await
                .is_ok()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// PostgreSQL 16: the source decodes on a streaming standby; the heartbeat, the publication and
/// the new slot's first snapshot go to the primary (`[database] primary_url`).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_read_replica_is_the_source() {
    let primary = cluster(16, "pg16p", 25616, None);
    let standby = cluster(16, "pg16s", 25626, Some(25616));
    let db = TestDb::new_on(&primary, "r16").await;
    let replica_url = with_db(&standby, &db.name);
    until_true(
        &replica_url,
        "SELECT count(*) = 12 FROM questions",
        "the schema on the replica",
    )
    .await;
    let before = completed(&db, 301, 12).await;
    let mut src = SourceProc::start(
        &db,
        SourceOpts {
            database: Some(format!(
                "url = \"{replica_url}\"\nprimary_url = \"{}\"",
                db.url
            )),
            ..Default::default()
        },
    );
    let (_, check) = src.run_once(&db, "check");
    for needle in [
        "the database URL names a read replica (PostgreSQL 16",
        "hot_standby_feedback = on",
        "lives on this read replica",
    ] {
        assert!(check.contains(needle), "expected {needle:?} in:\n{check}");
    }
    let mut reader = TopicReader::new(&src.topic);
    reader.until(WAIT, "the snapshot, read on the replica", has_all(&before));
    src.wait_streaming();
    let streamed = completed(&db, 302, 10).await;
    db.client()
        .await
        .execute("DELETE FROM contacts WHERE contact_id = $1", &[&before[0]])
        .await
        .unwrap();
    reader.until(
        WAIT,
        "changes made on the primary, decoded on the replica",
        |r| has_all(&streamed)(r) && r.iter().any(|r| r.key == before[0] && r.value.is_none()),
    );
    reader.settle(Duration::from_secs(1));
    src.assert_running();
    assert_matches_seed(&reader.latest(), &db.expected().await);
    // The heartbeat, written on the primary, reaches the replica's slot: an idle slot advances.
    let replica = TestDb {
        name: db.name.clone(),
        url: replica_url.clone(),
    };
    let at = replica.confirmed_lsn(&src.slot).await.unwrap();
    let deadline = Instant::now() + WAIT;
    while replica.confirmed_lsn(&src.slot).await.unwrap() <= at {
        assert!(
            Instant::now() < deadline,
            "the idle slot on the replica never advanced"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(src.terminate().success(), "{}", src.log());
    drop_slot_on(&replica_url, &src.slot).await;
}

/// PostgreSQL 17: the source streams from the primary through a URL that lists the primary and
/// the standby; its slot is a failover slot that the standby keeps in step. Contacts complete,
/// the primary crashes (immediate stop) while their events are on the way, the standby is
/// promoted, more contacts complete on it: the source follows the new primary on its own and
/// the topic equals the guide's query on the new primary. The pause is printed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_primary_failover_loses_nothing() {
    // A fresh pair: an earlier run left a promoted standby and a dead primary.
    fresh("pg17s", 25627);
    fresh("pg17p", 25617);
    let primary = cluster(17, "pg17p", 25617, None);
    let standby = cluster(17, "pg17s", 25627, Some(25617));
    // Logical readers never get ahead of the standby: what the source read survives a promotion.
    for sql in [
        "ALTER SYSTEM SET synchronized_standby_slots = 'pg17s_slot'",
        "SELECT pg_reload_conf()",
    ] {
        trusst_cdc::pg::connect(&primary)
            .await
            .unwrap()
            .batch_execute(sql)
            .await
            .unwrap();
    }
    let db = TestDb::new_on(&primary, "f17").await;
    let both = format!(
        "postgres://postgres:postgres@127.0.0.1:25617,127.0.0.1:25627/{}?target_session_attrs=read-write",
        db.name
    );
    let after_failover = TestDb {
        name: db.name.clone(),
        url: with_db(&standby, &db.name),
    };
    let before = completed(&db, 401, 20).await;
    let mut src = SourceProc::start(
        &db,
        SourceOpts {
            database: Some(format!("url = \"{both}\"")),
            ..Default::default()
        },
    );
    let mut reader = TopicReader::new(&src.topic);
    reader.until(WAIT, "the snapshot", has_all(&before));
    src.wait_streaming();
    let (_, check) = src.run_once(&db, "check");
    assert!(
        check.contains(&format!("slot {} is a failover slot", src.slot)),
        "{check}"
    );
    until_true(
        &after_failover.url,
        &format!(
            "SELECT coalesce(bool_and(synced), false) FROM pg_replication_slots WHERE slot_name = '{}'",
            src.slot
        ),
        "the slot synced to the standby",
    )
    .await;

    // Contacts complete; the primary dies while their events are being published.
    let in_flight = completed(&db, 402, 60).await;
    let mut stop =
        std::process::Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/services.sh"));
    stop.arg("stop-pg")
        .env("PG_INSTANCE", "pg17p")
        .env("PGPORT", "25617")
        .env("PG_STOP_MODE", "immediate");
    assert!(stop.output().unwrap().status.success());
    services("promote-pg", "pg17s", 25627);
    // On the new primary: the slot to stand in for the lost standby is not needed any more.
    for sql in [
        "ALTER SYSTEM SET synchronized_standby_slots = ''",
        "SELECT pg_reload_conf()",
    ] {
        after_failover
            .client()
            .await
            .batch_execute(sql)
            .await
            .unwrap();
    }
    let promoted = Instant::now();
    let after = completed(&after_failover, 403, 15).await;
    let written = promoted.elapsed();
    reader.until(
        WAIT,
        "the first contact completed on the new primary",
        |r| r.iter().any(|r| after.contains(&r.key)),
    );
    eprintln!(
        "failover: promoted, then 15 contacts completed on the new primary within {:.1} s; the first reached Kafka {:.1} s after the promotion",
        written.as_secs_f64(),
        promoted.elapsed().as_secs_f64()
    );
    reader.until(WAIT, "every contact, across the failover", |r| {
        has_all(&in_flight)(r) && has_all(&after)(r)
    });
    reader.settle(Duration::from_secs(2));
    src.assert_running();
    assert_matches_seed(&reader.latest(), &after_failover.expected().await);
    assert!(src.log().contains("using this host"), "{}", src.log());
    assert!(src.terminate().success(), "{}", src.log());
    drop_slot_on(&after_failover.url, &src.slot).await;
    fresh("pg17s", 25627);
    fresh("pg17p", 25617);
}

/// Stop an instance and remove it, so the next start makes it anew.
fn fresh(instance: &str, port: u16) {
    services("stop-pg", instance, port);
    let _ = std::fs::remove_dir_all(format!("{}/.run/{instance}", env!("CARGO_MANIFEST_DIR")));
}

/// PostgreSQL 16 has no failover slots: after a promotion the slot is not on the new primary.
/// The source says so (it knows it streamed from that slot before) instead of silently making a
/// new one, and `--recover` catches up with a bounded re-publish.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_failover_slots_a_promotion_is_reported_and_recovered() {
    fresh("pg16fs", 25646);
    fresh("pg16fp", 25636);
    let primary = cluster(16, "pg16fp", 25636, None);
    let standby = cluster(16, "pg16fs", 25646, Some(25636));
    let db = TestDb::new_on(&primary, "n16").await;
    let both = format!(
        "postgres://postgres:postgres@127.0.0.1:25636,127.0.0.1:25646/{}?target_session_attrs=read-write",
        db.name
    );
    let after_failover = TestDb {
        name: db.name.clone(),
        url: with_db(&standby, &db.name),
    };
    let before = completed(&db, 501, 15).await;
    let mut src = SourceProc::start(
        &db,
        SourceOpts {
            database: Some(format!("url = \"{both}\"")),
            ..Default::default()
        },
    );
    let mut reader = TopicReader::new(&src.topic);
    reader.until(WAIT, "the snapshot", has_all(&before));
    src.wait_streaming();
    let (_, check) = src.run_once(&db, "check");
    assert!(check.contains("would not survive a failover"), "{check}");
    let streamed = completed(&db, 502, 5).await;
    reader.until(WAIT, "streamed contacts", has_all(&streamed));
    until_true(
        &after_failover.url,
        "SELECT count(*) = 20 FROM contacts WHERE current_stage = 'COMPLETED'",
        "the standby caught up",
    )
    .await;
    services("stop-pg", "pg16fp", 25636);
    services("promote-pg", "pg16fs", 25646);
    let after = completed(&after_failover, 503, 10).await;
    let status = src.wait_exit(WAIT);
    assert_eq!(status.code(), Some(2), "{}", src.log());
    assert!(
        src.log().contains("not carried over by a failover") && src.log().contains("--recover"),
        "{}",
        src.log()
    );
    src.respawn_with(&db, &["--recover"]);
    reader.until(
        WAIT,
        "the contacts completed after the failover",
        has_all(&after),
    );
    reader.settle(Duration::from_secs(2));
    src.assert_running();
    assert_matches_seed(&reader.latest(), &after_failover.expected().await);
    assert!(src.terminate().success(), "{}", src.log());
    drop_slot_on(&after_failover.url, &src.slot).await;
    fresh("pg16fs", 25646);
    fresh("pg16fp", 25636);
}

/// A backfill reads each window as one scan and holds its snapshot while the window is published.
/// On a standby without `hot_standby_feedback`, replay cancels that read (a conflict with
/// recovery) whenever the primary vacuums rows the snapshot could still see, and ends the session
/// when it sits idle between pages. The backfill reads the window again after the last contact
/// it read: it finishes, and the topic holds exactly the range's contacts.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backfill_on_a_standby_outlives_recovery_conflicts() {
    fresh("pg16bs", 25648);
    fresh("pg16bp", 25638);
    let primary = cluster(16, "pg16bp", 25638, None);
    // Queries shorter than a second (the re-reads) finish; a window's read does not.
    let standby = cluster_with(
        16,
        "pg16bs",
        25648,
        Some(25638),
        "hot_standby_feedback = off; max_standby_streaming_delay = 1s",
    );
    let db = TestDb::new_on(&primary, "b16").await;
    let n = 3000;
    completed(&db, 601, n).await;
    let replica_url = with_db(&standby, &db.name);
    until_true(
        &replica_url,
        &format!("SELECT count(*) = {n} FROM contacts WHERE current_stage = 'COMPLETED'"),
        "the contacts on the standby",
    )
    .await;
    // Rows made dead and vacuumed away on the primary, over and over, while the backfill reads.
    let churning = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let churn = {
        let (url, churning) = (db.url.clone(), churning.clone());
        tokio::spawn(async move {
            let c = trusst_cdc::pg::connect(&url).await.unwrap();
            c.batch_execute("CREATE TABLE churn (n int); INSERT INTO churn VALUES (0)")
                .await
                .unwrap();
            let mut rounds = 0u32;
            while churning.load(std::sync::atomic::Ordering::Relaxed) {
                c.batch_execute("UPDATE churn SET n = n + 1").await.unwrap();
                c.batch_execute("VACUUM churn").await.unwrap();
                rounds += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            rounds
        })
    };
    let topic = unique("bstandby").replace('_', "-");
    // Pages of one contact, and the whole week one window: the read outlives the delay.
    let run = {
        let (replica_url, topic) = (replica_url.clone(), topic.clone());
        tokio::task::spawn_blocking(move || {
            run_backfill(
                &replica_url,
                &topic,
                1,
                &[
                    "--start-date",
                    "2025-01-15",
                    "--end-date",
                    "2025-01-22",
                    "--batch-days",
                    "7",
                ],
            )
        })
    };
    let out = run.await.unwrap();
    churning.store(false, std::sync::atomic::Ordering::Relaxed);
    let rounds = churn.await.unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "backfill failed: {log}");
    assert!(
        log.contains("was cut off"),
        "the standby never cut the read off ({rounds} vacuum rounds); the test proved nothing:\n{log}"
    );
    let mut reader = TopicReader::new(&topic);
    let want = db.expected().await;
    reader.until(WAIT, "every contact of the range", |recs| {
        want.keys().all(|k| recs.iter().any(|r| &r.key == k))
    });
    assert_matches_seed(&reader.latest(), &want);
    fresh("pg16bs", 25648);
    fresh("pg16bp", 25638);
}
