//! Bad input gets a clear error naming the problem and the fix, and a non-zero exit.

mod common;

use std::process::{Command, Output};

use common::*;

fn run(args: &[&str], db_url: &str, brokers: &str, config: &str) -> (Output, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("source.toml");
    std::fs::write(&path, config).unwrap();
    let out = Command::new(bin())
        .args(args)
        .arg("--config")
        .arg(&path)
        .env("DATABASE_URL", db_url)
        .env("KAFKA_BROKERS", brokers)
        .env("TRUSST_SLOT", unique("bad"))
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out, text)
}

fn assert_fails(out: &Output, text: &str, needles: &[&str]) {
    assert!(!out.status.success(), "expected a non-zero exit:\n{text}");
    for n in needles {
        assert!(text.contains(n), "expected {n:?} in:\n{text}");
    }
}

#[test]
fn malformed_config_names_the_line() {
    let (out, text) = run(&["source"], &base_url(), &brokers(), "[source]\nslot = \n");
    assert_fails(&out, &text, &["invalid config file", "line 2"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn unknown_key_is_named() {
    let (out, text) = run(
        &["check"],
        &base_url(),
        &brokers(),
        "[source]\nheartbeat = \"1s\"\n",
    );
    assert_fails(
        &out,
        &text,
        &["unknown field `heartbeat`", "heartbeat_interval"],
    );
}

/// A zero interval used to panic inside the timer; now the config is refused with the key's line.
#[test]
fn zero_duration_is_refused_not_a_panic() {
    for cmd in ["check", "source"] {
        let (out, text) = run(
            &[cmd],
            &base_url(),
            &brokers(),
            "[source]\nheartbeat_interval = \"0s\"\n",
        );
        assert_fails(
            &out,
            &text,
            &["line 2", "heartbeat_interval", "longer than zero"],
        );
        assert_eq!(out.status.code(), Some(2), "{text}");
        assert!(!text.contains("panicked"), "{text}");
    }
}

#[test]
fn missing_config_file() {
    let out = Command::new(bin())
        .args(["source", "--config", "/nonexistent/source.toml"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        text.contains("cannot read config file /nonexistent/source.toml"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn missing_table_and_column_are_named() {
    let db = TestDb::new("t_missing").await;
    let c = db.client().await;
    c.batch_execute("ALTER TABLE s3_conversations DROP COLUMN conn_id; DROP TABLE inferences")
        .await
        .unwrap();
    for cmd in ["check", "source"] {
        let (out, text) = run(&[cmd], &db.url, &brokers(), "");
        assert_fails(
            &out,
            &text,
            &[
                "table inferences is missing",
                "column s3_conversations.conn_id: missing",
            ],
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn replica_identity_is_checked_with_its_fix() {
    let db = TestDb::new("t_ident").await;
    db.client()
        .await
        .batch_execute("ALTER TABLE inferences REPLICA IDENTITY DEFAULT")
        .await
        .unwrap();
    let (out, text) = run(&["check"], &db.url, &brokers(), "");
    assert_fails(
        &out,
        &text,
        &[
            "inferences's replica identity (inferences_pkey: inference_id) lacks contact_id",
            "ALTER TABLE inferences REPLICA IDENTITY FULL",
            "REPLICA IDENTITY USING INDEX",
        ],
    );
}

#[test]
fn wal_level_replica_is_refused() {
    let url = std::env::var("REPLICA_DATABASE_URL").expect(
        "REPLICA_DATABASE_URL (a cluster with wal_level=replica) is set by scripts/test.sh",
    );
    for cmd in ["check", "source"] {
        let (out, text) = run(&[cmd], &url, &brokers(), "");
        assert_fails(
            &out,
            &text,
            &["wal_level = replica", "set wal_level = logical"],
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn unreachable_kafka_fails_with_the_address() {
    let db = TestDb::new("t_nokafka").await;
    for cmd in ["check", "source"] {
        let (out, text) = run(
            &[cmd],
            &db.url,
            "127.0.0.1:1",
            "[source]\nstartup_timeout = \"2s\"\n",
        );
        assert_fails(&out, &text, &["127.0.0.1:1", "KAFKA_BROKERS"]);
        if cmd == "source" {
            assert_eq!(
                out.status.code(),
                Some(1),
                "a service that cannot be reached:\n{text}"
            );
        }
    }
}

#[test]
fn unreachable_database_fails_with_the_address() {
    let (out, text) = run(
        &["source"],
        "postgres://postgres:postgres@127.0.0.1:1/trusst",
        &brokers(),
        "[source]\nstartup_timeout = \"2s\"\n",
    );
    assert_fails(
        &out,
        &text,
        &["127.0.0.1:1/trusst", "DATABASE_URL", "retrying"],
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn healthy_setup_passes_check() {
    let db = TestDb::new("t_healthy").await;
    let (out, text) = run(&["check"], &db.url, &brokers(), "");
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("ok    wal_level = logical") && text.contains("all "),
        "{text}"
    );
    assert!(!text.contains("FAIL"), "{text}");
}
