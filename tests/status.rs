//! The sync audit (`crm_sync_status` in the operator's database) and `trusst-cdc status`, on the
//! real PostgreSQL, Kafka and the CRM emulator.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::crm::{Emulator, SinkProc, eventually, set, sink_config};
use common::{
    SourceOpts, SourceProc, TestDb, TopicReader, base_url, bin, brokers, completed, unique, with_db,
};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(90);

/// A database without the Trusst schema, as an operator would create for the audit.
async fn ops_database() -> String {
    let name = unique("test_ops");
    let admin = trusst_cdc::pg::connect(&base_url()).await.unwrap();
    admin
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .unwrap();
    with_db(&base_url(), &name)
}

/// Runs `trusst-cdc status --json` for the source's config and one sink config.
fn status(
    src: &SourceProc,
    db: &TestDb,
    sink_cfg: &std::path::Path,
    extra_env: &[(&str, &str)],
) -> (bool, Value, String) {
    let out = Command::new(bin())
        .args(["status", "--json", "--config"])
        .arg(src.dir.path().join("source.toml"))
        .arg("--sink")
        .arg(sink_cfg)
        .env("DATABASE_URL", &db.url)
        .env("KAFKA_BROKERS", brokers())
        .envs(extra_env.iter().copied())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let report = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("status printed no JSON ({e}): {stdout}"));
    (
        out.status.success(),
        report,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Eleven contacts land, one is dead-lettered; the audit rows add up to exactly that, and
/// `status` shows the slot, the topic's end offsets, no consumer lag, the dead letter and the rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn audit_rows_and_status_match_what_reached_the_crm() {
    let db = TestDb::new("t_audit").await;
    let ids = completed(&db, 41, 12).await;
    // Dataverse has no option for this label: the record is dead-lettered at the mapping stage.
    let c = db.client().await;
    c.execute("UPDATE inferences SET result = 'Superb' WHERE contact_id = $1 AND question_id = 'q-outcome'", &[&ids[0]])
        .await
        .unwrap();
    let src = SourceProc::start(&db, SourceOpts::default());
    let emu = Emulator::start(&[]);
    let ops = ops_database().await;
    let ops_url = ops.clone();
    let (dir, cfg) = sink_config("dynamics", &src.topic, move |t| {
        set(t, "audit", "database_url", ops_url);
        set(t, "audit", "interval", "1s");
    });
    let mut sink = SinkProc::start(&emu, dir, cfg.clone(), &[]);

    eventually(WAIT, "11 records in Dataverse", || {
        match emu.records("dataverse", "contact").len() {
            11 => Ok(()),
            n => Err(format!("{n} records")),
        }
    });
    let mut dead = TopicReader::new(&format!("{}.dlq.dynamics", src.topic));
    dead.until(WAIT, "the dead letter", |r| {
        r.iter().any(|r| r.key == ids[0])
    });

    // Rows appear while the sink runs (one per active second), without waiting for it to stop.
    let audit = trusst_cdc::pg::connect(&ops).await.unwrap();
    let sums = || async {
        let r = audit
            .query_one("SELECT coalesce(sum(records_synced), 0)::bigint, coalesce(sum(records_failed), 0)::bigint FROM crm_sync_status", &[])
            .await
            .unwrap();
        (r.get::<_, i64>(0), r.get::<_, i64>(1))
    };
    let deadline = Instant::now() + WAIT;
    while sums().await != (11, 1) {
        sink.assert_running();
        assert!(
            Instant::now() < deadline,
            "audit sums {:?}, want (11, 1)",
            sums().await
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let rows = audit
        .query("SELECT sync_id, crm_system, records_synced, records_failed, status, error_message FROM crm_sync_status", &[])
        .await
        .unwrap();
    for r in &rows {
        let (sync_id, crm, synced, failed, status): (String, String, i32, i32, String) =
            (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4));
        assert!(sync_id.starts_with("dynamics-"), "{sync_id}");
        assert_eq!(crm, "dynamics");
        let want = match (synced, failed) {
            (_, 0) => "success",
            (0, _) => "failed",
            _ => "partial",
        };
        assert_eq!(status, want, "row {sync_id}");
        if failed > 0 {
            let msg: String = r.get(5);
            assert!(msg.contains("mapping") && msg.contains("Superb"), "{msg}");
        }
    }

    // status: everything consumed, the dead letter counted, the audit rows shown.
    let (ok, report, stderr) = status(&src, &db, &cfg, &[]);
    assert!(ok, "status failed: {report}\n{stderr}");
    assert_eq!(report["sources"][0]["slot"]["name"], src.slot.as_str());
    assert_eq!(report["sources"][0]["slot"]["active"], true);
    assert!(
        report["sources"][0]["slot"]["lag_bytes"]
            .as_i64()
            .is_some_and(|l| l >= 0),
        "{report}"
    );
    let mut topic = TopicReader::new(&src.topic);
    topic.settle(Duration::from_secs(2));
    assert_eq!(
        report["sources"][0]["topic"]["end_offsets_total"].as_i64(),
        Some(topic.records.len() as i64),
        "{report}"
    );
    let s = &report["sinks"][0];
    assert_eq!(s["name"], "dynamics");
    assert_eq!(s["has_committed"], true);
    assert_eq!(s["lag_total"], 0, "{report}");
    assert_eq!(s["dead_letters"], 1, "{report}");
    let shown: i64 = s["audit"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["records_synced"].as_i64().unwrap())
        .sum();
    assert!(shown > 0 && shown <= 11, "{report}");

    // A clean stop writes no empty row; the totals stay exact.
    assert!(sink.terminate().success(), "{}", sink.log());
    assert_eq!(sums().await, (11, 1));
    db.drop_slot(&src.slot).await;
}

/// The audit refuses the Trusst database, and `status` names a missing slot with its fix.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn audit_refuses_the_trusst_database_and_status_names_what_is_missing() {
    let db = TestDb::new("t_audit_bad").await;
    completed(&db, 42, 3).await;
    let mut src = SourceProc::start(&db, SourceOpts::default());
    src.wait_streaming();
    let emu = Emulator::start(&[]);
    let trusst_url = db.url.clone();
    let (dir, cfg) = sink_config("salesforce", &src.topic, move |t| {
        set(t, "audit", "database_url", trusst_url)
    });
    let mut sink = SinkProc::start(&emu, dir, cfg.clone(), &[]);
    let deadline = Instant::now() + Duration::from_secs(60);
    let exit = loop {
        if let Some(s) = sink.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "the sink did not refuse the Trusst database:\n{}",
            sink.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(exit.code(), Some(2), "{}", sink.log());
    assert!(
        sink.log().contains("a database of its own"),
        "{}",
        sink.log()
    );
    assert!(
        emu.records("salesforce", "Contact").is_empty(),
        "nothing may be written without the audit it asked for"
    );

    let (ok, report, _) = status(&src, &db, &cfg, &[("TRUSST_SLOT", "no_such_slot")]);
    assert!(!ok, "status must fail when the slot is missing: {report}");
    assert!(report["sources"][0]["slot"].is_null());
    let problems = report["problems"].to_string();
    assert!(
        problems.contains("no_such_slot") && problems.contains("trusst-cdc source"),
        "{problems}"
    );
    db.drop_slot(&src.slot).await;
}
