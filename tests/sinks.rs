//! PostgreSQL -> source -> Kafka -> sink -> CRM emulator, every part real and running as its own
//! process. Each test asserts what reached the emulator against the seed's query.

mod common;

use std::time::Duration;

use common::crm::*;
use common::*;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(90);

/// Source, emulator and one sink for `example`; returns everything the test needs.
async fn pipeline(prefix: &str, n: usize) -> (TestDb, SourceProc, Emulator, Vec<String>) {
    let db = TestDb::new(prefix).await;
    let ids = completed(&db, 21, n).await;
    let src = SourceProc::start(&db, SourceOpts::default());
    let emu = Emulator::start(&[]);
    (db, src, emu, ids)
}

async fn converge_and_update(system: &str, example: &str) {
    let (db, src, emu, ids) = pipeline(&format!("t_{example}"), 30).await;
    let (dir, cfg) = sink_config(example, &src.topic, |_| {});
    let mut sink = SinkProc::start(&emu, dir, cfg, &[]);
    let expected = db.expected().await;
    eventually(WAIT, "the CRM to match the seed query", || {
        crm_matches(&emu, system, &expected)
    });
    sink.assert_running();

    // Later changes update the same records, never add duplicates.
    let c = db.client().await;
    c.batch_execute(
        "UPDATE inferences SET result = CASE result WHEN 'true' THEN 'false' ELSE 'true' END, updated_at = now() \
         WHERE question_id = 'q-agent-identified';
         UPDATE inferences SET result = '1', updated_at = now() WHERE question_id = 'q-quality-score'",
    )
    .await
    .unwrap();
    let more = completed(&db, 22, 5).await;
    assert_eq!(more.len(), 5);
    let expected = db.expected().await;
    eventually(WAIT, "the CRM to follow the updates", || {
        crm_matches(&emu, system, &expected)
    });
    sink.assert_running();

    // Answers that disappear are cleared in the CRM, never left behind: one answer deleted,
    // every answer of a contact deleted, a question that stops being universal.
    c.execute(
        "DELETE FROM inferences WHERE question_id = 'q-quality-score' AND contact_id = ANY($1::text[])",
        &[&ids[1..4].to_vec()],
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
    c.batch_execute("UPDATE questions SET is_universal = false WHERE question_id = 'q-empathy'")
        .await
        .unwrap();
    // Re-evaluation: a contact that leaves COMPLETED has its answers emptied too.
    c.execute(
        "UPDATE contacts SET current_stage = 'INFERENCE' WHERE contact_id = $1",
        &[&ids[4]],
    )
    .await
    .unwrap();
    let keys: Vec<String> = c
        .query("SELECT key FROM questions", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut expected = db.expected().await;
    for id in [&ids[0], &ids[4]] {
        assert!(
            !expected.contains_key(id),
            "an emptied contact has no row in the seed query"
        );
        let agent: Option<String> = c
            .query_one("SELECT agent_id FROM contacts WHERE contact_id = $1", &[id])
            .await
            .unwrap()
            .get(0);
        // Its record stays, with every answer field emptied.
        expected.insert(
            id.clone(),
            Expected {
                external_id: None,
                call_date: None,
                call_start_time: None,
                direction: None,
                contact_agent_id: agent,
                s3_agent_id: None,
                conn_id: None,
                results: Default::default(),
            },
        );
    }
    eventually(WAIT, "the CRM to drop the answers that are gone", || {
        no_stale_answers(&emu, system, &expected, &keys)?;
        crm_matches(&emu, system, &expected)
    });
    sink.assert_running();
    db.drop_slot(&src.slot).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn salesforce_converges_and_updates_in_place() {
    converge_and_update("salesforce", "salesforce").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dynamics_converges_and_updates_in_place() {
    converge_and_update("dataverse", "dynamics").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mulesoft_converges_and_updates_in_place() {
    converge_and_update("mulesoft", "mulesoft").await;
}

/// Salesforce streaming uses sObject Collections: at most ceil(n/200) data calls per batch,
/// no per-record calls.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn salesforce_uses_collections_not_per_record_calls() {
    let (db, src, emu, ids) = pipeline("t_sfcalls", 450).await;
    let mut reader = TopicReader::new(&src.topic);
    reader.until(WAIT, "snapshot", |r| r.len() >= ids.len());
    let (dir, cfg) = sink_config("salesforce", &src.topic, |t| {
        set(t, "sink", "batch_max_records", 1000)
    });
    let _sink = SinkProc::start(&emu, dir, cfg, &[]);
    let expected = db.expected().await;
    eventually(WAIT, "450 contacts", || {
        crm_matches(&emu, "salesforce", &expected)
    });
    let stats = emu.stats();
    let calls = |route: &str| -> u64 {
        stats["calls"]["salesforce"][route]
            .as_object()
            .map(|m| m.values().filter_map(Value::as_u64).sum())
            .unwrap_or(0)
    };
    let single = calls("PATCH /services/data/{version}/sobjects/{sobject}/{field}/{value}");
    let collections = calls("PATCH /services/data/{version}/composite/sobjects/{sobject}/{field}");
    assert_eq!(single, 0, "no per-record calls: {stats}");
    // 450 records in batches of at most 1000 events: at least ceil(450/200) requests, and no
    // more than one extra per batch boundary.
    assert!(
        (3..=6).contains(&collections),
        "{collections} collection calls for 450 records: {stats}"
    );
    db.drop_slot(&src.slot).await;
}

/// A backlog (a replay, a new target) goes through Bulk API 2.0 jobs built from catch-up
/// batches; live changes afterwards through sObject Collections. Thresholds are scaled down so a
/// few hundred contacts show both.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backlog_goes_through_bulk_jobs_and_live_changes_through_collections() {
    let (db, src, emu, ids) = pipeline("t_sfbulk", 600).await;
    let mut reader = TopicReader::new(&src.topic);
    reader.until(WAIT, "snapshot", |r| r.len() >= ids.len());
    let (dir, cfg) = sink_config("salesforce", &src.topic, |t| {
        set(t, "sink", "batch_max_records", 100);
        set(t, "sink", "catch_up_lag", 200);
        set(t, "sink", "catch_up_batch_max_records", 1000);
        set(t, "salesforce", "bulk_threshold", 150);
    });
    let mut sink = SinkProc::start(&emu, dir, cfg, &[]);
    let expected = db.expected().await;
    eventually(WAIT, "the backlog in the CRM", || {
        crm_matches(&emu, "salesforce", &expected)
    });
    let calls = |route: &str| -> u64 {
        emu.stats()["calls"]["salesforce"][route]
            .as_object()
            .map(|m| m.values().filter_map(Value::as_u64).sum())
            .unwrap_or(0)
    };
    const JOBS: &str = "POST /services/data/{version}/jobs/ingest";
    const COLLECTIONS: &str = "PATCH /services/data/{version}/composite/sobjects/{sobject}/{field}";
    let (jobs, collections) = (calls(JOBS), calls(COLLECTIONS));
    // The first batch (100 records, the backlog not measured yet) is one Collections call, and
    // the tail under catch_up_lag (200) at most two more; the rest of the 600 goes in catch-up
    // batches, each one Bulk job.
    assert!(jobs >= 1, "the backlog used Bulk API: {}", emu.stats());
    assert!(
        collections <= 3,
        "{collections} Collections calls for a 600-record backlog: {}",
        emu.stats()
    );

    // Caught up: a live change goes through Collections, no new job.
    db.client()
        .await
        .execute(
            "UPDATE inferences SET result = '3', updated_at = now() \
             WHERE question_id = 'q-quality-score' AND contact_id = $1",
            &[&ids[0]],
        )
        .await
        .unwrap();
    let expected = db.expected().await;
    eventually(WAIT, "the live change in the CRM", || {
        crm_matches(&emu, "salesforce", &expected)
    });
    assert_eq!(calls(JOBS), jobs, "no Bulk job for a live change");
    assert!(calls(COLLECTIONS) > collections);
    sink.assert_running();
    db.drop_slot(&src.slot).await;
}

/// Faults: 503 bursts, added latency, a token that expires mid-run, the daily allowance spent
/// until a reset, and a kill -9 of the sink mid-batch. Afterwards the CRM equals the query.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn salesforce_survives_faults() {
    let (db, src, emu, _) = pipeline("t_sffaults", 40).await;
    let (dir, cfg) = sink_config("salesforce", &src.topic, |t| {
        set(t, "salesforce", "limit_pause", "1s");
        set(t, "salesforce", "request_timeout", "1s");
        set(t, "sink", "batch_max_records", 10);
    });
    // Responses slower than the client's timeout first, then 503s and slow-but-fine responses.
    emu.faults(json!({"latency_ms": 1500}));
    let mut sink = SinkProc::start(&emu, dir, cfg, &[]);
    std::thread::sleep(Duration::from_secs(4));
    assert!(
        emu.records("salesforce", "Contact").is_empty(),
        "nothing can land while every call times out"
    );
    emu.faults(json!({"burst_503": 3, "latency_ms": 20}));
    let expected = db.expected().await;
    eventually(WAIT, "convergence through timeouts and 503s", || {
        crm_matches(&emu, "salesforce", &expected)
    });
    assert!(
        sink.log().contains("retrying"),
        "the timeouts were retried:\n{}",
        sink.log()
    );

    // Token expiry mid-run, then the allowance runs out.
    emu.admin("expire-tokens");
    let used = emu.stats()["salesforce_api_usage"]["used"]
        .as_u64()
        .unwrap();
    emu.faults(json!({"sf_daily_limit": used + 2}));
    let c = db.client().await;
    c.batch_execute(
        "UPDATE inferences SET result = '2', updated_at = now() WHERE question_id = 'q-empathy'",
    )
    .await
    .unwrap();
    completed(&db, 23, 30).await;
    std::thread::sleep(Duration::from_secs(4));
    assert!(
        sink.log().contains("REQUEST_LIMIT_EXCEEDED") || sink.log().contains("allowance"),
        "{}",
        sink.log()
    );
    sink.assert_running();
    // Kill mid-stream while paused, restart, then a new day.
    sink.crash_and_restart();
    emu.faults(json!({"sf_daily_limit": 1_000_000}));
    emu.admin("reset-limits");
    let expected = db.expected().await;
    eventually(WAIT, "convergence after the allowance reset", || {
        crm_matches(&emu, "salesforce", &expected)
    });
    sink.assert_running();
    db.drop_slot(&src.slot).await;
}

/// 429 bursts with Retry-After, random 503s and dropped connections, and a kill -9: Dynamics
/// converges.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dynamics_survives_rate_limits_and_crashes() {
    let (db, src, emu, _) = pipeline("t_dvfaults", 40).await;
    let (dir, cfg) = sink_config("dynamics", &src.topic, |t| {
        set(t, "sink", "batch_max_records", 7);
        set(t, "dynamics", "batch_size", 5);
    });
    emu.faults(json!({"burst_429": 4, "rate_503": 0.2, "drop_rate": 0.1, "seed": 7}));
    let mut sink = SinkProc::start(&emu, dir, cfg, &[]);
    std::thread::sleep(Duration::from_secs(2));
    sink.crash_and_restart();
    completed(&db, 24, 20).await;
    let expected = db.expected().await;
    eventually(WAIT, "convergence through 429s and 503s", || {
        crm_matches(&emu, "dataverse", &expected)
    });
    sink.assert_running();
    db.drop_slot(&src.slot).await;
}

/// A poison record goes to the dead-letter topic with its reason, the rest lands; re-driving
/// after the mapping is fixed lands it too.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn poison_record_is_dead_lettered_and_redriven() {
    let (db, src, emu, ids) = pipeline("t_poison", 10).await;
    let c = db.client().await;
    c.execute("UPDATE inferences SET result = 'Superb' WHERE contact_id = $1 AND question_id = 'q-outcome'", &[&ids[3]]).await.unwrap();
    let (dir, cfg) = sink_config("dynamics", &src.topic, |_| {});
    let mut sink = SinkProc::start(&emu, dir, cfg.clone(), &[]);
    let dlq = format!("{}.dlq.dynamics", src.topic);
    let mut dead = TopicReader::new(&dlq);
    dead.until(WAIT, "the poison record on the DLQ", |r| {
        r.iter().any(|r| r.key == ids[3])
    });
    let body: Value = serde_json::from_slice(
        dead.records
            .iter()
            .find(|r| r.key == ids[3])
            .unwrap()
            .value
            .as_deref()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(body["stage"], "mapping");
    assert!(
        body["reason"].as_str().unwrap().contains("Superb"),
        "{body}"
    );
    assert_eq!(body["event"]["trusst_contact_id"], ids[3].as_str());
    // Everything else landed and the sink kept going.
    let mut expected = db.expected().await;
    expected.remove(&ids[3]);
    eventually(WAIT, "the other contacts", || {
        crm_matches(&emu, "dataverse", &expected)
    });
    sink.assert_running();

    // Fix: map the new label to an existing choice, then re-drive the dead letters.
    let mut t: toml::Table = toml::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
    let labels = toml::toml! { Superb = 100000000 Excellent = 100000000 Good = 100000001 Fair = 100000002 Poor = 100000003 };
    let questions = t["mapping"]
        .as_table_mut()
        .unwrap()
        .entry("questions")
        .or_insert(toml::Value::Table(Default::default()));
    let outcome = questions
        .as_table_mut()
        .unwrap()
        .entry("call_outcome")
        .or_insert(toml::Value::Table(Default::default()));
    outcome
        .as_table_mut()
        .unwrap()
        .insert("labels".into(), toml::Value::Table(labels));
    std::fs::write(&cfg, toml::to_string(&t).unwrap()).unwrap();
    let (status, _, log) = sink.run_to_end(&["--redrive"]);
    assert!(status.success(), "{log}");
    let rec = emu
        .records("dataverse", "contact")
        .into_iter()
        .find(|r| r["trusst_contact_id"] == ids[3].as_str())
        .expect("re-driven record");
    assert_eq!(rec["call_outcome"], 100000000);
    db.drop_slot(&src.slot).await;
}

/// Two sinks on one topic converge independently (fan-out).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_sinks_on_one_topic_both_converge() {
    let (db, src, emu, _) = pipeline("t_fanout", 25).await;
    let (d1, c1) = sink_config("salesforce", &src.topic, |_| {});
    let (d2, c2) = sink_config("dynamics", &src.topic, |_| {});
    let _s1 = SinkProc::start(&emu, d1, c1, &[]);
    let _s2 = SinkProc::start(&emu, d2, c2, &[]);
    let expected = db.expected().await;
    eventually(WAIT, "Salesforce", || {
        crm_matches(&emu, "salesforce", &expected)
    });
    eventually(WAIT, "Dynamics", || {
        crm_matches(&emu, "dataverse", &expected)
    });
    db.drop_slot(&src.slot).await;
}

/// Replay from a timestamp re-sends only what follows it; --dry-run writes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replay_from_timestamp_and_dry_run() {
    let (db, src, emu, before) = pipeline("t_replay", 8).await;
    let mut reader = TopicReader::new(&src.topic);
    reader.until(WAIT, "snapshot", |r| r.len() >= before.len());
    std::thread::sleep(Duration::from_millis(1500));
    let t = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    std::thread::sleep(Duration::from_millis(500));
    let after = completed(&db, 25, 4).await;
    reader.until(WAIT, "new contacts", |r| {
        after.iter().all(|id| r.iter().any(|x| &x.key == id))
    });

    // Dry run from the beginning: prints the requests, the emulator sees no data call.
    let (dir, cfg) = sink_config("salesforce", &src.topic, |_| {});
    let sink = SinkProc::start(&emu, dir, cfg, &["--dry-run", "--from", "earliest"]);
    let (status, out, log) = sink.run_to_end(&["--dry-run", "--from", "earliest"]);
    assert!(status.success(), "{log}");
    assert!(
        out.contains("PATCH ") && out.contains("composite/sobjects/Contact/Trusst_Contact_ID__c"),
        "{out}"
    );
    assert!(
        emu.records("salesforce", "Contact").is_empty(),
        "dry run wrote records"
    );

    // Replay from the timestamp: only the contacts completed after it.
    let (status, _, log) =
        sink.run_to_end(&["--from", &format!("timestamp:{t}"), "--until-idle", "3s"]);
    assert!(status.success(), "{log}");
    let got: Vec<String> = emu
        .records("salesforce", "Contact")
        .iter()
        .map(|r| r["Trusst_Contact_ID__c"].as_str().unwrap().to_owned())
        .collect();
    let mut want = after.clone();
    want.sort();
    let mut got_sorted = got.clone();
    got_sorted.sort();
    assert_eq!(
        got_sorted, want,
        "replay sent contacts from before the timestamp"
    );
    db.drop_slot(&src.slot).await;
}

/// A mapping to a field the CRM lacks fails at start, naming the field.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mapping_to_a_missing_field_fails_at_start() {
    let emu = Emulator::start(&[]);
    let topic = unique("contacts").replace('_', "-");
    trusst_cdc::kafka::ensure_compacted_topic(&brokers(), &Default::default(), &topic, 1, 1)
        .await
        .unwrap();
    for (example, field) in [
        ("salesforce", "Quality_Scor__c"),
        ("dynamics", "quality_scor"),
    ] {
        let (dir, cfg) = sink_config(example, &topic, |t| {
            let mut q = toml::Table::new();
            q.insert("field".into(), field.into());
            let mut qs = toml::Table::new();
            qs.insert("quality_score".into(), toml::Value::Table(q));
            set(t, "mapping", "questions", toml::Value::Table(qs));
        });
        let sink = SinkProc::start(&emu, dir, cfg, &[]);
        let (status, _, log) = sink.run_to_end(&[]);
        assert!(!status.success(), "{example}: must fail");
        assert!(
            log.contains(field),
            "{example}: the message must name {field}:\n{log}"
        );
    }
}

/// A tombstone on its own deletes: once compaction has removed the delete event before it, it is
/// all a sink that was behind (or replays from the start) sees of the deletion. Here the delete
/// event never reaches the topic at all; the record must still leave the CRM.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tombstone_alone_deletes_the_record() {
    let (db, src, emu, ids) = pipeline("t_tomb", 6).await;
    let (dir, cfg) = sink_config("salesforce", &src.topic, |_| {});
    let mut sink = SinkProc::start(&emu, dir, cfg, &[]);
    let expected = db.expected().await;
    eventually(WAIT, "the CRM to match the seed query", || {
        crm_matches(&emu, "salesforce", &expected)
    });
    let producer: rdkafka::producer::FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .unwrap();
    producer
        .send(
            rdkafka::producer::FutureRecord::<str, [u8]>::to(&src.topic).key(ids[0].as_str()),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    eventually(WAIT, "the tombstoned contact to leave Salesforce", || {
        let left: Vec<String> = emu
            .records("salesforce", "Contact")
            .iter()
            .filter_map(|r| r["Trusst_Contact_ID__c"].as_str().map(str::to_owned))
            .collect();
        if left.contains(&ids[0]) || left.len() != ids.len() - 1 {
            return Err(format!("Salesforce holds {left:?}"));
        }
        Ok(())
    });
    sink.assert_running();
    db.drop_slot(&src.slot).await;
}

/// The dead-letter topic is created with the partitions and replication factor of the sink's
/// config, and a dead-letter topic the sink cannot create stops it with the reason (before, a
/// failure was ignored and the first dead letter had nowhere to go).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_dead_letter_topic_follows_the_config() {
    let (db, src, emu, ids) = pipeline("t_dlqcfg", 3).await;
    let mut reader = TopicReader::new(&src.topic);
    reader.until(WAIT, "snapshot", |r| r.len() >= ids.len());
    // One broker: a replication factor of 3 cannot be met.
    let (dir, cfg) = sink_config("salesforce", &src.topic, |t| {
        set(t, "kafka", "dlq_replication_factor", 3)
    });
    let mut sink = SinkProc::start(&emu, dir, cfg, &[]);
    let status = sink.wait_exit(WAIT);
    assert!(!status.success(), "{}", sink.log());
    assert!(
        sink.log().contains("creating the dead-letter topic")
            && sink.log().contains("dlq_replication_factor"),
        "{}",
        sink.log()
    );
    let (dir, cfg) = sink_config("salesforce", &src.topic, |t| {
        set(t, "kafka", "dlq_partitions", 2)
    });
    let mut sink = SinkProc::start(&emu, dir, cfg, &[]);
    let dlq = format!("{}.dlq.salesforce", src.topic);
    eventually(WAIT, "the dead-letter topic with 2 partitions", || {
        let described = tokio::task::block_in_place(|| {
            tokio::runtime::Handle::current().block_on(trusst_cdc::kafka::describe_topic(
                &brokers(),
                &Default::default(),
                &dlq,
            ))
        });
        match described {
            Ok(Some(t)) if t.partitions == 2 => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
    sink.assert_running();
    db.drop_slot(&src.slot).await;
}

/// Re-driving the dead-letter topic never overwrites newer state: a contact whose poison event
/// was dead-lettered and whose next event was written keeps the newer value when the dead
/// letters are re-driven after the mapping fix (the older one is skipped and counted).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_redrive_skips_dead_letters_older_than_the_topic() {
    let (db, src, emu, ids) = pipeline("t_stale", 6).await;
    let c = db.client().await;
    c.execute("UPDATE inferences SET result = 'Superb' WHERE contact_id = $1 AND question_id = 'q-outcome'", &[&ids[2]]).await.unwrap();
    let (dir, cfg) = sink_config("dynamics", &src.topic, |_| {});
    let sink = SinkProc::start(&emu, dir, cfg.clone(), &[]);
    let mut dead = TopicReader::new(&format!("{}.dlq.dynamics", src.topic));
    dead.until(WAIT, "the poison record on the DLQ", |r| {
        r.iter().any(|r| r.key == ids[2])
    });
    // The answer is corrected at the source: the newer event is written.
    c.execute("UPDATE inferences SET result = 'Good', updated_at = now() WHERE contact_id = $1 AND question_id = 'q-outcome'", &[&ids[2]]).await.unwrap();
    let outcome = |emu: &Emulator| {
        emu.records("dataverse", "contact")
            .into_iter()
            .find(|r| r["trusst_contact_id"] == ids[2].as_str())
            .map(|r| r["call_outcome"].clone())
    };
    eventually(
        WAIT,
        "the corrected answer in Dataverse",
        || match outcome(&emu) {
            Some(v) if v == 100000001 => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );
    // The mapping learns the old label too, and the dead letters are re-driven.
    let mut t: toml::Table = toml::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
    let labels = toml::toml! { Superb = 100000000 Excellent = 100000000 Good = 100000001 Fair = 100000002 Poor = 100000003 };
    let mut outcome_spec = toml::Table::new();
    outcome_spec.insert("labels".into(), toml::Value::Table(labels));
    let mut questions = toml::Table::new();
    questions.insert("call_outcome".into(), toml::Value::Table(outcome_spec));
    t["mapping"]
        .as_table_mut()
        .unwrap()
        .insert("questions".into(), toml::Value::Table(questions));
    std::fs::write(&cfg, toml::to_string(&t).unwrap()).unwrap();
    let (status, _, log) = sink.run_to_end(&["--redrive"]);
    assert!(status.success(), "{log}");
    assert!(log.contains("skipped a dead letter older than"), "{log}");
    assert_eq!(
        outcome(&emu),
        Some(serde_json::json!(100000001)),
        "the newer state stays"
    );
    assert_matches_crm(&db, &emu).await;
    db.drop_slot(&src.slot).await;
}

async fn assert_matches_crm(db: &TestDb, emu: &Emulator) {
    let expected = db.expected().await;
    eventually(WAIT, "Dataverse to equal the seed query", || {
        crm_matches(emu, "dataverse", &expected)
    });
}

/// Two instances of one sink; the first holds a batch through a long allowance pause, longer than
/// `max.poll.interval.ms`, while the second joins and writes newer state. The first must stay in
/// the group (it keeps polling) and, its partitions having moved, never write its older batch
/// after the pause: every record ends at the newest state.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rebalance_during_an_allowance_pause_never_writes_older_state() {
    const PAUSE: Duration = Duration::from_secs(20);
    let (db, src, emu, _) = pipeline("t_rebalance", 12).await;
    let group = unique("group");
    let config = |pause: Duration| {
        let group = group.clone();
        sink_config("salesforce", &src.topic, move |t| {
            set(t, "kafka", "group_id", group);
            set(
                t,
                "salesforce",
                "limit_pause",
                format!("{}s", pause.as_secs()),
            );
            let kafka = t.get_mut("kafka").unwrap().as_table_mut().unwrap();
            let mut props = toml::Table::new();
            // A short lease, so a member that stops polling is out of the group within seconds.
            for (k, v) in [
                ("session.timeout.ms", "6000"),
                ("heartbeat.interval.ms", "1000"),
                ("max.poll.interval.ms", "8000"),
            ] {
                props.insert(k.into(), v.into());
            }
            kafka.insert("properties".into(), props.into());
        })
    };
    let (dir, cfg) = config(PAUSE);
    let mut first = SinkProc::start(&emu, dir, cfg, &[]);
    let expected = db.expected().await;
    eventually(WAIT, "the CRM to match the seed query", || {
        crm_matches(&emu, "salesforce", &expected)
    });

    // The allowance is spent; a change arrives: the first sink pauses holding it.
    let used = emu.stats()["salesforce_api_usage"]["used"]
        .as_u64()
        .unwrap();
    emu.faults(json!({"sf_daily_limit": used}));
    let c = db.client().await;
    c.batch_execute(
        "UPDATE inferences SET result = '2', updated_at = now() WHERE question_id = 'q-quality-score'",
    )
    .await
    .unwrap();
    eventually(WAIT, "the first sink to pause", || {
        if first.log().contains("pausing writes") {
            Ok(())
        } else {
            Err(first.log())
        }
    });
    let paused_at = std::time::Instant::now();
    // Longer than max.poll.interval.ms: a member that stopped polling has left the group.
    std::thread::sleep(Duration::from_secs(10));
    emu.faults(json!({"sf_daily_limit": 1_000_000}));
    emu.admin("reset-limits");
    let (dir, cfg) = config(Duration::from_secs(1));
    let mut second = SinkProc::start(&emu, dir, cfg, &[]);
    c.batch_execute(
        "UPDATE inferences SET result = '9', updated_at = now() WHERE question_id = 'q-quality-score'",
    )
    .await
    .unwrap();
    let expected = db.expected().await;
    eventually(WAIT, "the newest state in the CRM", || {
        crm_matches(&emu, "salesforce", &expected)
    });
    // Past the first sink's pause, and time for what it would write then: the newest state
    // stays.
    std::thread::sleep((PAUSE + Duration::from_secs(6)).saturating_sub(paused_at.elapsed()));
    if let Err(stale) = crm_matches(&emu, "salesforce", &expected) {
        panic!(
            "older state written after the pause: {stale}
first sink:
{}",
            first.log()
        );
    }
    first.assert_running();
    second.assert_running();
    assert!(
        first.log().contains("partitions revoked"),
        "the first sink took part in the rebalance:\n{}",
        first.log()
    );
    db.drop_slot(&src.slot).await;
}

/// An answer over 1 MB: the source shortens it to fit the broker, and each sink writes the
/// record with the text cut to its CRM field (Salesforce's 131,072 characters, Dataverse's
/// 1,048,576; MuleSoft's API takes the event's document as it is), counted and logged, never
/// dead-lettered or left stale.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_answer_over_a_megabyte_is_written_shortened_to_each_field() {
    let (db, src, emu, ids) = pipeline("t_longtext", 6).await;
    let long: String = (0..1_250_000)
        .map(|i| (b'a' + (i % 26) as u8) as char)
        .collect();
    db.client()
        .await
        .execute(
            "UPDATE inferences SET result = $1 WHERE contact_id = $2 AND question_id = 'q-summary'",
            &[&long, &ids[2]],
        )
        .await
        .unwrap();
    let mut sinks = Vec::new();
    for example in ["salesforce", "dynamics", "mulesoft"] {
        let (dir, cfg) = sink_config(example, &src.topic, |_| {});
        sinks.push(SinkProc::start(&emu, dir, cfg, &[]));
    }
    let expected = db.expected().await;
    let mut dv_kept = 0;
    eventually(WAIT, "the long answer, shortened", || {
        let held = |system: &str, object: &str, key: &str, field: &str| {
            emu.records(system, object)
                .into_iter()
                .find(|r| r[key] == ids[2].as_str())
                .and_then(|r| r[field].as_str().map(str::to_owned))
                .unwrap_or_default()
        };
        let sf = held(
            "salesforce",
            "Contact",
            "Trusst_Contact_ID__c",
            "Call_Summary__c",
        );
        let dv = held("dataverse", "contact", "trusst_contact_id", "call_summary");
        let ms = emu
            .records("mulesoft", "contacts")
            .into_iter()
            .find(|r| r["trusst_contact_id"] == ids[2].as_str())
            .and_then(|r| {
                r["universal_questions"].as_array().and_then(|qs| {
                    qs.iter()
                        .find(|q| q["question_key"] == "call_summary")
                        .and_then(|q| q["result"].as_str().map(str::to_owned))
                })
            })
            .unwrap_or_default();
        if ms != dv {
            return Err(format!(
                "MuleSoft holds {} characters, Dataverse {}",
                ms.len(),
                dv.len()
            ));
        }
        if sf != long[..131_072] {
            return Err(format!("Salesforce holds {} characters", sf.len()));
        }
        // The event itself was shortened to fit the broker's 1 MB: what is left goes whole.
        if !(long.starts_with(&dv) && dv.len() > 900_000) {
            return Err(format!("Dataverse holds {} characters", dv.len()));
        }
        dv_kept = dv.len();
        Ok(())
    });
    // Every other field of that contact, and every other contact, as the seed query says.
    for (system, kept) in [
        ("salesforce", 131_072),
        ("dataverse", dv_kept),
        ("mulesoft", dv_kept),
    ] {
        let mut want = expected.clone();
        let e = want.get_mut(&ids[2]).unwrap();
        e.results.get_mut("call_summary").unwrap().1 = Some(long[..kept].to_owned());
        eventually(WAIT, "the CRM to match the seed query", || {
            crm_matches(&emu, system, &want)
        });
    }
    let scrapes: Vec<_> = sinks
        .iter_mut()
        .map(|s| metrics::Scrape::of(&s.metrics_url()))
        .collect();
    assert!(
        scrapes[0].sum("trusst_cdc_sink_texts_shortened_total", &[]) >= 1.0,
        "Salesforce counts the shortened text"
    );
    assert!(sinks[0].log().contains("written shortened"), "and logs it");
    for m in &scrapes {
        assert_eq!(
            m.sum("trusst_cdc_sink_records_dead_lettered_total", &[]),
            0.0,
            "nothing dead-lettered"
        );
    }
    db.drop_slot(&src.slot).await;
}
