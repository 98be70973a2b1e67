//! Operations: the `/metrics`, `/health` and `/ready` endpoints of the source and a sink during an
//! end-to-end run (PostgreSQL -> source -> Kafka -> sink -> CRM emulator, each a process of its
//! own), and the JSON log line of a dead-lettered record.

mod common;

use std::time::Duration;

use common::crm::*;
use common::metrics::{Scrape, get};
use common::*;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(90);

/// Counters move by what the run did; readiness follows the CRM; every series is there.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_follow_an_end_to_end_run() {
    let db = TestDb::new("t_metrics").await;
    let mut src = SourceProc::start(&db, SourceOpts::default());
    src.wait_streaming();
    let src_url = src.metrics_url();
    eventually(WAIT, "the source's /ready", || {
        match get(&src_url, "/ready") {
            (200, _) => Ok(()),
            (s, body) => Err(format!("{s} {body}")),
        }
    });
    assert_eq!(get(&src_url, "/health").0, 200);

    // The CRM answers 503 to every data call: the sink is alive but not ready.
    let emu = Emulator::start(&[]);
    assert_eq!(get(&emu.base, "/health").0, 200, "the emulator's /health");
    emu.faults(json!({"salesforce": {"rate_503": 1.0}}));
    let (dir, cfg) = sink_config("salesforce", &src.topic, |_| {});
    let mut sink = SinkProc::start(&emu, dir, cfg, &[]);
    let sink_url = sink.metrics_url();
    assert_eq!(get(&sink_url, "/health").0, 200);
    eventually(WAIT, "a 503 from the CRM", || {
        let s = Scrape::of(&sink_url);
        if s.sum(
            "trusst_cdc_crm_requests_total",
            &[("target", "salesforce"), ("status", "503")],
        ) > 0.0
        {
            Ok(())
        } else {
            Err(s.text)
        }
    });
    let (status, body) = get(&sink_url, "/ready");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("crm authenticated"), "{body}");
    emu.faults(json!({"salesforce": {"rate_503": 0.0}}));
    eventually(WAIT, "the sink's /ready", || {
        match get(&sink_url, "/ready") {
            (200, _) => Ok(()),
            (s, body) => Err(format!("{s} {body}")),
        }
    });

    let src_before = Scrape::of(&src_url);
    let sink_before = Scrape::of(&sink_url);
    let ids = completed(&db, 31, 12).await;
    eventually(WAIT, "12 contacts in the CRM", || {
        let n = emu.records("salesforce", "Contact").len();
        if n == ids.len() {
            Ok(())
        } else {
            Err(format!("{n} records"))
        }
    });
    let mut reader = TopicReader::new(&src.topic);
    reader.until(WAIT, "the events", |r| {
        ids.iter().all(|id| r.iter().any(|x| &x.key == id))
    });
    reader.settle(Duration::from_secs(1));
    let on_topic = reader.records.len() as f64;

    // Source: every event on the topic was counted once Kafka acknowledged it, and each stream
    // event has its commit-to-publish latency.
    let delta = |after: &Scrape, before: &Scrape, name: &str, with: &[(&str, &str)]| {
        after.sum(name, with) - before.sum(name, with)
    };
    eventually(WAIT, "the source's counters", || {
        let after = Scrape::of(&src_url);
        let published = delta(
            &after,
            &src_before,
            "trusst_cdc_events_published_total",
            &[],
        );
        let upserts = delta(
            &after,
            &src_before,
            "trusst_cdc_events_published_total",
            &[("kind", "upsert"), ("reason", "stream")],
        );
        let latencies = delta(
            &after,
            &src_before,
            "trusst_cdc_commit_to_publish_seconds_count",
            &[],
        );
        if published == on_topic && upserts >= ids.len() as f64 && latencies == upserts {
            Ok(())
        } else {
            Err(format!(
                "published {published}, stream upserts {upserts}, latencies {latencies}, {on_topic} records on the topic"
            ))
        }
    });
    // Every stage of the source's path was timed for the batches that carried them.
    let after = Scrape::of(&src_url);
    for stage in [
        "delivery", "gather", "queue", "reread", "handoff", "produce", "ack",
    ] {
        let n = delta(
            &after,
            &src_before,
            "trusst_cdc_source_stage_seconds_count",
            &[("stage", stage)],
        );
        assert!(n >= 1.0, "stage {stage} timed {n} times");
    }
    assert_eq!(
        src_before.sum("trusst_cdc_events_published_total", &[]),
        0.0,
        "nothing was published before the contacts"
    );
    let slot = [("slot", src.slot.as_str())];
    eventually(WAIT, "the slot's lag", || {
        let s = Scrape::of(&src_url);
        match s.matching("trusst_cdc_replication_lag_bytes", &slot).next() {
            Some(l) if l.value >= 0.0 && s.has("trusst_cdc_replication_lag_seconds", &slot) => {
                Ok(())
            }
            other => Err(format!("{other:?}")),
        }
    });

    // Sink: one write per contact, nothing failed or dead-lettered, the CRM calls counted by
    // status, the allowance read from Sforce-Limit-Info, and the consumer caught up.
    let sink_name = [("sink", "salesforce")];
    eventually(WAIT, "the sink's counters", || {
        let after = Scrape::of(&sink_url);
        let written = delta(
            &after,
            &sink_before,
            "trusst_cdc_sink_records_written_total",
            &sink_name,
        );
        // Every record came from the stream, so each has a commit-to-CRM latency.
        let latencies = delta(
            &after,
            &sink_before,
            "trusst_cdc_sink_commit_to_crm_seconds_count",
            &sink_name,
        );
        if written == ids.len() as f64 && latencies == written {
            Ok(())
        } else {
            Err(format!(
                "written {written}, commit-to-CRM latencies {latencies}"
            ))
        }
    });
    let after = Scrape::of(&sink_url);
    assert_eq!(
        delta(
            &after,
            &sink_before,
            "trusst_cdc_sink_records_consumed_total",
            &sink_name
        ),
        on_topic,
        "{}",
        after.text
    );
    // librdkafka reports what the consumer received every few seconds: at least what the sink
    // consumed.
    eventually(WAIT, "the records fetched to be counted", || {
        let fetched = delta(
            &Scrape::of(&sink_url),
            &sink_before,
            "trusst_cdc_sink_records_fetched_total",
            &sink_name,
        );
        if fetched >= on_topic {
            Ok(())
        } else {
            Err(format!("fetched {fetched} of {on_topic} consumed"))
        }
    });
    assert_eq!(
        after.sum("trusst_cdc_sink_records_dead_lettered_total", &[]),
        0.0,
        "{}",
        after.text
    );
    let ok_calls = after
        .matching("trusst_cdc_crm_requests_total", &[("target", "salesforce")])
        .filter(|s| s.labels["status"].starts_with('2'))
        .map(|s| s.value)
        .sum::<f64>();
    assert!(ok_calls > 0.0, "{}", after.text);
    assert!(
        after.sum(
            "trusst_cdc_crm_requests_total",
            &[("target", "salesforce"), ("status", "503")]
        ) > 0.0,
        "the 503s were counted: {}",
        after.text
    );
    assert!(
        after.sum("trusst_cdc_sink_records_failed_total", &sink_name) == 0.0,
        "no write failed: {}",
        after.text
    );
    assert!(
        !after.has("trusst_cdc_replication_lag_bytes", &[]),
        "a sink has no slot: {}",
        after.text
    );
    let remaining = after.sum(
        "trusst_cdc_crm_api_remaining_requests",
        &[("target", "salesforce")],
    );
    let limit = after.sum(
        "trusst_cdc_crm_api_limit_requests",
        &[("target", "salesforce")],
    );
    let used = emu.stats()["salesforce_api_usage"]["used"]
        .as_f64()
        .unwrap();
    assert!(
        limit > 0.0 && remaining > 0.0 && remaining <= limit && limit - remaining <= used,
        "remaining {remaining} of {limit}, {used} used"
    );
    let topic = src.topic.clone();
    eventually(WAIT, "consumer lag 0 on every partition", || {
        let s = Scrape::of(&sink_url);
        let lags: Vec<(String, f64)> = s
            .matching(
                "trusst_cdc_sink_consumer_lag_records",
                &[("sink", "salesforce"), ("topic", &topic)],
            )
            .map(|x| (x.labels["partition"].clone(), x.value))
            .collect();
        // The source's topic has 3 partitions, all assigned to this one consumer.
        if lags.len() == 3 && lags.iter().all(|(_, l)| *l == 0.0) {
            Ok(())
        } else {
            Err(format!("{lags:?}"))
        }
    });
    // Every metric an alert rule or the dashboard names is served by the running source or
    // sink. A family shows only once it has a sample, so those that need an event this run
    // does not cause are checked against the registry's declared series instead.
    let exposed = format!(
        "{}\n{}",
        Scrape::of(&src_url).text,
        Scrape::of(&sink_url).text
    );
    let declared = trusst_cdc::metrics::Metrics::new().series().to_vec();
    let needs_an_event = [
        // a text shortened or an event refused for the broker's size limit
        "trusst_cdc_events_truncated",
        "trusst_cdc_events_oversized",
        // a dead letter, a superseded event, a failed CRM write (this run has none)
        "trusst_cdc_sink_records_dead_lettered",
        "trusst_cdc_sink_records_superseded",
        "trusst_cdc_sink_records_failed",
        // a record of a customer the sink does not write (tests/tenants.rs)
        "trusst_cdc_sink_records_skipped_customer",
        // a text longer than its CRM field (tests/sinks.rs, the megabyte answer)
        "trusst_cdc_sink_texts_shortened",
        // only with max_slot_wal_keep_size set on the server
        "trusst_cdc_replication_slot_safe_wal_size_bytes",
    ];
    let mut named = std::collections::BTreeSet::new();
    for file in [
        "deploy/alerts/trusst-cdc.rules.yml",
        "dashboards/trusst-cdc.json",
    ] {
        let text =
            std::fs::read_to_string(format!("{}/{file}", env!("CARGO_MANIFEST_DIR"))).unwrap();
        let mut rest = text.as_str();
        while let Some(i) = rest.find("trusst_cdc_") {
            let tail = &rest[i..];
            let end = tail
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(tail.len());
            if end > "trusst_cdc_".len() {
                named.insert(tail[..end].to_owned());
            }
            rest = &tail[end..];
        }
    }
    assert!(named.len() >= 15, "{named:?}");
    let mut served = 0;
    for name in &named {
        let family = ["_total", "_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(name);
        // (A description may name a family, e.g. a histogram without its `_bucket`.)
        assert!(
            declared.iter().any(|d| d.starts_with(name.as_str())),
            "{name} is not a metric the code registers"
        );
        if needs_an_event.contains(&family) {
            continue;
        }
        assert!(
            exposed.contains(&format!("# TYPE {family} ")),
            "{name} (named by the alert rules or the dashboard) is not in /metrics:\n{exposed}"
        );
        served += 1;
    }
    assert!(served >= 12, "{served} of {named:?}");
    sink.assert_running();
    src.assert_running();
    db.drop_slot(&src.slot).await;
}

/// With `--log-format json` every line is JSON, and the error of a dead-lettered record names
/// the contact and the partition and offset it was read from.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn json_log_of_a_dead_letter_names_contact_and_offset() {
    let db = TestDb::new("t_jsonlog").await;
    let ids = completed(&db, 32, 6).await;
    let c = db.client().await;
    // A label no Dataverse choice has: the record cannot be mapped and is dead-lettered.
    c.execute("UPDATE inferences SET result = 'Superb' WHERE contact_id = $1 AND question_id = 'q-outcome'", &[&ids[2]])
        .await
        .unwrap();
    let src = SourceProc::start(&db, SourceOpts::default());
    let mut reader = TopicReader::new(&src.topic);
    reader.until(WAIT, "the snapshot", |r| {
        ids.iter().all(|id| r.iter().any(|x| &x.key == id))
    });
    let poison: Vec<&Record> = reader.records.iter().filter(|r| r.key == ids[2]).collect();
    assert_eq!(poison.len(), 1, "one event for the contact");
    let (partition, offset) = (poison[0].partition, poison[0].offset);

    let emu = Emulator::start(&[]);
    let (dir, cfg) = sink_config("dynamics", &src.topic, |_| {});
    let mut sink = SinkProc::start(&emu, dir, cfg, &["--log-format", "json"]);
    let mut dead = TopicReader::new(&format!("{}.dlq.dynamics", src.topic));
    dead.until(WAIT, "the dead letter", |r| {
        r.iter().any(|r| r.key == ids[2])
    });
    sink.assert_running();

    let log = sink.log();
    let lines: Vec<Value> = log
        .lines()
        .map(|l| {
            serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON log line ({e}): {l}"))
        })
        .collect();
    let line = lines
        .iter()
        .find(|l| {
            l["fields"]["message"] == "record dead-lettered"
                && l["fields"]["contact_id"] == ids[2].as_str()
        })
        .unwrap_or_else(|| panic!("no dead-letter line for {}:\n{log}", ids[2]));
    assert_eq!(line["level"], "ERROR", "{line}");
    assert_eq!(line["fields"]["partition"], partition, "{line}");
    assert_eq!(line["fields"]["offset"], offset, "{line}");
    assert_eq!(line["fields"]["topic"], src.topic.as_str(), "{line}");
    assert!(
        line["fields"]["reason"]
            .as_str()
            .unwrap()
            .contains("Superb"),
        "{line}"
    );

    // The sink counted the dead letter, and read Dataverse's allowance from its headers.
    let s = Scrape::of(&sink.metrics_url());
    assert_eq!(
        s.sum(
            "trusst_cdc_sink_records_dead_lettered_total",
            &[("sink", "dynamics"), ("stage", "mapping")]
        ),
        1.0,
        "{}",
        s.text
    );
    let left = s.sum(
        "trusst_cdc_crm_api_remaining_requests",
        &[("target", "dynamics")],
    );
    assert!(
        left > 0.0 && left < 6000.0,
        "requests left in the 6000-request window: {}",
        s.text
    );
    db.drop_slot(&src.slot).await;
}

/// An address the operator chose that cannot be bound stops the process with a user error
/// naming it and the fix; `off` is accepted.
#[test]
fn a_busy_chosen_metrics_address_stops_the_process() {
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = busy.local_addr().unwrap().to_string();
    let out = std::process::Command::new(bin())
        .args(["source", "--config", "/dev/null", "--metrics-listen", &addr])
        .env("DATABASE_URL", "postgres://postgres@127.0.0.1:1/none")
        .env("KAFKA_BROKERS", "127.0.0.1:1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!("cannot serve /metrics on {addr}"))
            && stderr.contains("TRUSST_METRICS_LISTEN"),
        "{stderr}"
    );

    let out = std::process::Command::new(bin())
        .args([
            "source",
            "--config",
            "/dev/null",
            "--metrics-listen",
            "localhost",
        ])
        .env("DATABASE_URL", "postgres://postgres@127.0.0.1:1/none")
        .env("KAFKA_BROKERS", "127.0.0.1:1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("\"localhost\" is not host:port"),
        "{stderr}"
    );
}
