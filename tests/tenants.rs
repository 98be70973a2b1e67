//! Many customers: every record names the customer whose database it came from (the event's
//! `customer` and the `trusst-customer` header, tombstones included), topic names can be
//! templates (`{customer}`), sinks write only their customers' records and count the others, and
//! `status` reports every source and sink it is given. Real PostgreSQL, Kafka and the CRM
//! emulator.

mod common;

use std::collections::BTreeSet;
use std::process::Command;
use std::time::Duration;

use common::crm::{Emulator, SinkProc, eventually, set, sink_config};
use common::metrics::Scrape;
use common::{SourceOpts, SourceProc, TestDb, TopicReader, bin, brokers, completed, unique};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(90);

/// A source for `db` whose config holds the database URL and the customer, so `status` can be
/// given several.
fn source(db: &TestDb, customer: &str, topic: &str) -> SourceProc {
    let opts = SourceOpts {
        database: Some(format!("url = \"{}\"", db.url)),
        source_lines: format!("customer = \"{customer}\""),
        ..Default::default()
    };
    SourceProc::start_with(
        db,
        unique("slot"),
        topic.to_owned(),
        tempfile::tempdir().unwrap(),
        opts,
    )
}

/// Salesforce ids in the emulator.
fn salesforce_ids(emu: &Emulator) -> BTreeSet<String> {
    emu.records("salesforce", "Contact")
        .iter()
        .filter_map(|r| r["Trusst_Contact_ID__c"].as_str().map(str::to_owned))
        .collect()
}

/// Dataverse ids in the emulator.
fn dataverse_ids(emu: &Emulator) -> BTreeSet<String> {
    emu.records("dataverse", "contact")
        .iter()
        .filter_map(|r| r["trusst_contact_id"].as_str().map(str::to_owned))
        .collect()
}

/// Two customer databases publish into one topic, acme's source naming it by the template
/// `<prefix>.{customer}.contacts` and globex's by its literal name. Every record carries its
/// customer; the Salesforce sink (topic template, `customers = ["acme"]`) writes exactly acme's
/// contacts and counts every globex record it skipped, the Dynamics sink (`customers =
/// ["globex"]`) exactly globex's; deletes reach only their own customer's CRM; `status` lists
/// both sources with their customers and both sinks with theirs. An unreadable value of
/// globex is dead-lettered by globex's sink only.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_customer_reaches_only_its_own_sinks() {
    let prefix = unique("tenants").replace('_', "-");
    let template = format!("{prefix}.{{customer}}.contacts");
    let topic = format!("{prefix}.acme.contacts");

    let acme_db = TestDb::new("t_tenant_acme").await;
    let globex_db = TestDb::new("t_tenant_globex").await;
    let acme: BTreeSet<String> = completed(&acme_db, 61, 6).await.into_iter().collect();
    let globex: BTreeSet<String> = completed(&globex_db, 62, 4).await.into_iter().collect();
    assert!(acme.is_disjoint(&globex));
    let mut acme_src = source(&acme_db, "acme", &template);
    let mut globex_src = source(&globex_db, "globex", &topic);
    acme_src.wait_streaming();
    globex_src.wait_streaming();

    let emu = Emulator::start(&[]);
    let (sf_dir, sf_cfg) = sink_config("salesforce", &template, |t| {
        set(t, "sink", "customers", vec!["acme"]);
    });
    let mut sf = SinkProc::start(&emu, sf_dir, sf_cfg.clone(), &[]);
    let (dv_dir, dv_cfg) = sink_config("dynamics", &topic, |t| {
        set(t, "sink", "customers", vec!["globex"]);
    });
    let mut dv = SinkProc::start(&emu, dv_dir, dv_cfg.clone(), &[]);

    eventually(WAIT, "acme's contacts in Salesforce", || {
        sf.assert_running();
        match salesforce_ids(&emu) {
            ids if ids == acme => Ok(()),
            ids => Err(format!("{ids:?}")),
        }
    });
    eventually(WAIT, "globex's contacts in Dataverse", || {
        dv.assert_running();
        match dataverse_ids(&emu) {
            ids if ids == globex => Ok(()),
            ids => Err(format!("{ids:?}")),
        }
    });

    // A value no sink can read, attributed to globex: globex's sink dead-letters it, acme's
    // skips it unread (and counts it), never dead-letters it.
    let producer: rdkafka::producer::FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .unwrap();
    producer
        .send(
            rdkafka::producer::FutureRecord::<str, [u8]>::to(&topic)
                .key("not-a-contact")
                .payload(b"not an event".as_slice())
                .headers(
                    rdkafka::message::OwnedHeaders::new().insert(rdkafka::message::Header {
                        key: trusst_cdc::kafka::CUSTOMER_HEADER,
                        value: Some("globex"),
                    }),
                ),
            Duration::from_secs(10),
        )
        .await
        .unwrap();

    // A delete in each database: a delete event and a tombstone, both attributed.
    let gone_acme = acme.iter().next().unwrap().clone();
    let gone_globex = globex.iter().next().unwrap().clone();
    for (db, id) in [(&acme_db, &gone_acme), (&globex_db, &gone_globex)] {
        let c = db.client().await;
        c.execute("DELETE FROM inferences WHERE contact_id = $1", &[id])
            .await
            .unwrap();
        c.execute("DELETE FROM s3_conversations WHERE contact_id = $1", &[id])
            .await
            .unwrap();
        c.execute("DELETE FROM contacts WHERE contact_id = $1", &[id])
            .await
            .unwrap();
    }
    let mut reader = TopicReader::new(&topic);
    reader.until(WAIT, "both tombstones", |r| {
        [&gone_acme, &gone_globex]
            .iter()
            .all(|id| r.iter().any(|r| &r.key == *id && r.value.is_none()))
    });
    reader.settle(Duration::from_secs(1));

    // What reached Kafka: every record names its database's customer, in the header and (for
    // events) in the event.
    let mut globex_records = 0;
    for r in &reader.records {
        if r.key == "not-a-contact" {
            globex_records += 1;
            continue;
        }
        let want = if acme.contains(&r.key) {
            "acme"
        } else if globex.contains(&r.key) {
            globex_records += 1;
            "globex"
        } else {
            panic!("record for unknown contact {}", r.key)
        };
        assert_eq!(r.customer.as_deref(), Some(want), "header of {r:?}");
        if let Some(e) = r.event() {
            assert_eq!(e.customer.as_deref(), Some(want), "event {e:?}");
        }
    }

    // Each delete reaches only its customer's CRM; the other sink skipped and counted it.
    let acme_left: BTreeSet<String> = acme.iter().filter(|i| **i != gone_acme).cloned().collect();
    let globex_left: BTreeSet<String> = globex
        .iter()
        .filter(|i| **i != gone_globex)
        .cloned()
        .collect();
    eventually(WAIT, "the deletes in their own CRMs", || {
        match (salesforce_ids(&emu), dataverse_ids(&emu)) {
            (s, d) if s == acme_left && d == globex_left => Ok(()),
            (s, d) => Err(format!("salesforce {s:?}, dataverse {d:?}")),
        }
    });
    let mut dead = TopicReader::new(&format!("{topic}.dlq.dynamics"));
    dead.until(
        WAIT,
        "globex's sink to dead-letter the unreadable value",
        |r| r.iter().any(|r| r.key == "not-a-contact"),
    );
    let sf_url = sf.metrics_url();
    eventually(WAIT, "every globex record counted as skipped", || {
        let scrape = Scrape::of(&sf_url);
        let skipped = scrape.sum(
            "trusst_cdc_sink_records_skipped_customer_total",
            &[("sink", "salesforce"), ("customer", "globex")],
        );
        let written = scrape.sum(
            "trusst_cdc_sink_records_skipped_customer_total",
            &[("sink", "salesforce"), ("customer", "acme")],
        );
        match (skipped as usize, written) {
            (n, 0.0) if n == globex_records => Ok(()),
            other => Err(format!(
                "skipped (globex, acme) = {other:?}, want ({globex_records}, 0)"
            )),
        }
    });

    // status: both sources with their customers and topic, both sinks with theirs.
    let out = Command::new(bin())
        .args(["status", "--json", "--config"])
        .arg(acme_src.dir.path().join("source.toml"))
        .arg("--config")
        .arg(globex_src.dir.path().join("source.toml"))
        .arg("--sink")
        .arg(&sf_cfg)
        .arg("--sink")
        .arg(&dv_cfg)
        .env_remove("DATABASE_URL")
        .env("KAFKA_BROKERS", brokers())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report: Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("status printed no JSON ({e}): {stdout}"));
    assert!(
        out.status.success(),
        "{report}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let sources = report["sources"].as_array().unwrap();
    assert_eq!(sources.len(), 2, "{report}");
    for (s, (customer, slot)) in sources
        .iter()
        .zip([("acme", &acme_src.slot), ("globex", &globex_src.slot)])
    {
        assert_eq!(s["customer"], customer, "{report}");
        assert_eq!(s["slot"]["name"], slot.as_str(), "{report}");
        assert_eq!(s["topic"]["name"], topic.as_str(), "{report}");
    }
    let sinks = report["sinks"].as_array().unwrap();
    assert_eq!(sinks.len(), 2, "{report}");
    assert_eq!(sinks[0]["customers"], serde_json::json!(["acme"]));
    assert_eq!(sinks[0]["topic"], topic.as_str());
    assert_eq!(sinks[1]["customers"], serde_json::json!(["globex"]));
    for s in sinks {
        assert_eq!(s["lag_total"], 0, "{report}");
    }
    assert_eq!(sinks[0]["dead_letters"], 0, "{report}");
    assert_eq!(sinks[1]["dead_letters"], 1, "{report}");

    assert!(sf.terminate().success(), "{}", sf.log());
    assert!(dv.terminate().success(), "{}", dv.log());
    acme_src.terminate();
    globex_src.terminate();
    acme_db.drop_slot(&acme_src.slot).await;
    globex_db.drop_slot(&globex_src.slot).await;
}

/// A topic template without a customer, and a sink template without exactly one customer,
/// stop with the problem and the fix before anything runs.
#[test]
fn templates_without_a_customer_are_refused_with_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("source.toml");
    std::fs::write(&source, "[kafka]\ntopic = \"trusst.{customer}.contacts\"\n").unwrap();
    let out = Command::new(bin())
        .args(["check", "--config"])
        .arg(&source)
        .env("DATABASE_URL", "postgres://u@127.0.0.1:1/d")
        .env("KAFKA_BROKERS", "127.0.0.1:1")
        .env_remove("TRUSST_CUSTOMER")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("no customer is set") && stderr.contains("TRUSST_CUSTOMER"),
        "{stderr}"
    );

    let (_d, sink) = sink_config("mulesoft", "trusst.{customer}.contacts", |t| {
        set(t, "sink", "customers", vec!["acme", "globex"]);
    });
    let out = Command::new(bin())
        .args(["sink", "--config"])
        .arg(&sink)
        .env("KAFKA_BROKERS", "127.0.0.1:1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("list exactly one"), "{stderr}");
}
