//! Readers for the benchmark scripts (scripts/bench-source.sh, scripts/bench-compare.sh):
//!
//!   cargo bench --bench latency -- <brokers> <topic> <expected events> <idle seconds> [warm-up seconds] [format]
//!
//! Commit-to-Kafka latency: reads events from the topic as they arrive and reports p50/p99 of
//! (arrival time - the event's commit timestamp). `format` is `trusst` (default: `stream` events,
//! `source.commit_ts`) or `debezium` (Debezium's change events of the contacts table whose `after`
//! row is COMPLETED, `source.ts_us`, else `source.ts_ms`; with or without the JSON converter's
//! schema envelope). Events committed less than `warm-up seconds` after the first one are read but
//! not counted, so a process that has just started (a JVM compiling its hot paths) is measured
//! once it runs steadily. Prints `{"ready":true}` once assigned, then one JSON line:
//! {"events", "p50_ms", "p99_ms", "max_ms", "span_s", "record_ts", "record_p50_ms",
//! "record_p99_ms", "record_max_ms"}; the `record_` figures use the record's Kafka timestamp
//! instead of the arrival time: the broker's append time when `record_ts` is `log_append` (a
//! topic with `message.timestamp.type=LogAppendTime`), the producer's send time when `create`.
//!
//!   cargo bench --bench latency -- drain <brokers> <topic> <contacts>
//!
//! Reads from the beginning until `contacts` distinct contacts have an upsert event and prints
//! {"first_ms", "done_ms"}: wall clock (ms since the epoch) when the first and the last were read.
//!
//!   cargo bench --bench latency -- watermarks <brokers> <topic,topic,...> <records> [idle seconds]
//!
//! Polls the topics' high watermarks (no records are read, so the reader costs the measured
//! pipeline nothing) until together they hold `records` records, or nothing was added for `idle
//! seconds` (default 60) once something was; prints {"first_ms", "done_ms", "records"}: when the
//! first record and the last were there, and how many there are.
//!
//!   cargo bench --bench latency -- slot <database url> <slot> <publication> <seconds> [warm-up seconds]
//!
//! PostgreSQL's own delivery latency, the floor under any consumer of the slot: streams the slot
//! (pgoutput, nothing decoded or published) for `seconds` and reports, per transaction, the time
//! its Commit message arrived minus its commit time, as {"commits", "p50_ms", "p99_ms", "max_ms"}.
//! Commits in the first `warm-up seconds` are not counted.
//!
//!   cargo bench --bench latency -- null <database url> <slot> <publication> <end lsn>
//!
//! The null streaming reader: the walsender's limit for any reader. Streams the slot with the
//! source's own replication client and options (pgoutput, protocol 1), acknowledges every
//! commit, and does nothing else, until a commit (or a keepalive) reaches `end lsn`; prints
//! {"seconds", "messages", "bytes"}: the time from connecting to the last commit, and what came.
//!
//!   cargo bench --bench latency -- lag <brokers> <topic> <group>
//!
//! Prints the group's lag on the topic (records not yet committed, summed over partitions; a
//! partition without a committed offset counts whole), for scripts that wait for quiet.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use rdkafka::Message;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use serde_json::Value;
use trusst_cdc::event::ContactEvent;

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    match args.first().map(String::as_str) {
        Some("drain") => drain(&args[1], &args[2], args[3].parse().expect("contacts")),
        Some("watermarks") => {
            let idle = args.get(4).map_or(60, |s| s.parse().expect("idle seconds"));
            watermarks(
                &args[1],
                &args[2],
                args[3].parse().expect("records"),
                Duration::from_secs(idle),
            )
        }
        Some("lag") => lag(&args[1], &args[2], &args[3]),
        Some("null") => null_reader(&args[1], &args[2], &args[3], &args[4]),
        Some("slot") => slot(
            &args[1],
            &args[2],
            &args[3],
            Duration::from_secs(args[4].parse().expect("seconds")),
            Duration::from_secs(
                args.get(5)
                    .map_or(0, |w| w.parse().expect("warm-up seconds")),
            ),
        ),
        _ => latency(&args),
    }
}

fn latency(args: &[String]) {
    let usage = "usage: <brokers> <topic> <expected events> <idle seconds> [warm-up seconds] [trusst|debezium]";
    let [brokers, topic, expected, idle] =
        <[String; 4]>::try_from(args.get(..4).expect(usage).to_vec()).expect(usage);
    let expected: usize = expected.parse().expect("expected events");
    let idle = Duration::from_secs(idle.parse().expect("idle seconds"));
    let warmup = chrono::Duration::seconds(
        args.get(4)
            .map_or(0, |w| w.parse().expect("warm-up seconds")),
    );
    let commit_time: fn(&[u8]) -> Option<DateTime<Utc>> =
        match args.get(5).map_or("trusst", String::as_str) {
            "trusst" => trusst_commit,
            "debezium" => debezium_commit,
            other => panic!("unknown format {other}: trusst or debezium"),
        };
    // LATENCY_FROM=earliest reads the topic from its start (a fresh topic whose first events came
    // before the reader could subscribe), instead of from the end.
    let from = std::env::var("LATENCY_FROM").unwrap_or_else(|_| "latest".into());
    let consumer: BaseConsumer = consumer_config(&brokers, "latency", &from)
        .create()
        .expect("consumer");
    consumer.subscribe(&[&topic]).expect("subscribe");
    // Wait for the assignment so no early event is missed.
    let start = Instant::now();
    while consumer.assignment().map(|a| a.count()).unwrap_or(0) == 0
        && start.elapsed() < Duration::from_secs(30)
    {
        consumer.poll(Duration::from_millis(100));
    }
    eprintln!("latency: consuming {topic}");
    println!("{{\"ready\":true}}");
    let mut lat_ms: Vec<f64> = Vec::with_capacity(expected);
    // The record's own timestamp: the broker's append time on a LogAppendTime topic.
    let mut kafka_ms: Vec<f64> = Vec::with_capacity(expected);
    let mut ts_kind = "none";
    // LATENCY_SAMPLES=FILE keeps every counted event as `commit time (us), latency (ms), latency
    // at the record's timestamp (ms)`, to find when a slow stretch happened; the file is flushed at
    // least every 200 ms, so a script can follow it while the run goes on (scripts/bench-steps.sh).
    let mut samples = std::env::var_os("LATENCY_SAMPLES")
        .map(|p| std::io::BufWriter::new(std::fs::File::create(p).expect("LATENCY_SAMPLES file")));
    let mut flushed = Instant::now();
    let mut last = Instant::now();
    let mut first: Option<Instant> = None;
    let mut counted_from: Option<DateTime<Utc>> = None;
    while lat_ms.len() < expected && last.elapsed() < idle {
        if flushed.elapsed() >= Duration::from_millis(200) {
            if let Some(w) = samples.as_mut() {
                use std::io::Write;
                let _ = w.flush();
            }
            flushed = Instant::now();
        }
        let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) else {
            continue;
        };
        let now = Utc::now();
        last = Instant::now();
        let Some(ts) = m.payload().and_then(commit_time) else {
            continue;
        };
        if ts < *counted_from.get_or_insert(ts + warmup) {
            continue;
        }
        first.get_or_insert(last);
        lat_ms.push((now - ts).num_microseconds().unwrap_or(0) as f64 / 1000.0);
        let (kind, record_ms) = match m.timestamp() {
            rdkafka::Timestamp::LogAppendTime(ms) => ("log_append", Some(ms)),
            rdkafka::Timestamp::CreateTime(ms) => ("create", Some(ms)),
            rdkafka::Timestamp::NotAvailable => ("none", None),
        };
        ts_kind = kind;
        let record_lat = record_ms.map(|ms| (ms * 1000 - ts.timestamp_micros()) as f64 / 1000.0);
        if let Some(l) = record_lat {
            kafka_ms.push(l);
        }
        if let Some(w) = samples.as_mut() {
            use std::io::Write;
            let _ = writeln!(
                w,
                "{},{:.1},{:.1}",
                ts.timestamp_micros(),
                lat_ms[lat_ms.len() - 1],
                record_lat.unwrap_or(f64::NAN)
            );
        }
    }
    if let Some(mut w) = samples {
        use std::io::Write;
        let _ = w.flush();
    }
    lat_ms.sort_by(f64::total_cmp);
    kafka_ms.sort_by(f64::total_cmp);
    let pct = |p: f64| percentile(&lat_ms, p);
    let span = first
        .map(|f| last.duration_since(f).as_secs_f64())
        .unwrap_or(0.0);
    println!(
        "{{\"events\":{},\"p50_ms\":{:.1},\"p99_ms\":{:.1},\"max_ms\":{:.1},\"span_s\":{:.1},\
         \"record_ts\":\"{ts_kind}\",\"record_p50_ms\":{:.1},\"record_p99_ms\":{:.1},\"record_max_ms\":{:.1}}}",
        lat_ms.len(),
        pct(0.5),
        pct(0.99),
        lat_ms.last().copied().unwrap_or(f64::NAN),
        span,
        percentile(&kafka_ms, 0.5),
        percentile(&kafka_ms, 0.99),
        kafka_ms.last().copied().unwrap_or(f64::NAN),
    );
}

fn slot(url: &str, slot: &str, publication: &str, run: Duration, warmup: Duration) {
    use pgwire_replication::{ReplicationClient, ReplicationEvent};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut lat_ms: Vec<f64> = rt.block_on(async {
        let cfg = trusst_cdc::pg::replication_config(url, slot, publication, true).expect("config");
        let mut repl = ReplicationClient::connect(cfg)
            .await
            .expect("replication connection");
        repl.wait_started().await.expect("replication start");
        println!("{{\"ready\":true}}");
        let start = Instant::now();
        let mut lat = Vec::new();
        while start.elapsed() < run {
            let ev = match tokio::time::timeout(Duration::from_millis(200), repl.recv()).await {
                Err(_) => continue,
                Ok(ev) => ev.expect("replication stream"),
            };
            match ev {
                Some(ReplicationEvent::Commit {
                    commit_time_micros,
                    end_lsn,
                    ..
                }) => {
                    let age = trusst_cdc::metrics::pg_micros_age(
                        commit_time_micros,
                        Utc::now().timestamp_micros(),
                    );
                    if start.elapsed() >= warmup {
                        lat.push(age.as_secs_f64() * 1000.0);
                    }
                    repl.update_applied_lsn(end_lsn);
                }
                Some(_) => {}
                None => break,
            }
        }
        let _ = repl.shutdown().await;
        lat
    });
    lat_ms.sort_by(f64::total_cmp);
    let pct = |p: f64| percentile(&lat_ms, p);
    println!(
        "{{\"commits\":{},\"p50_ms\":{:.1},\"p99_ms\":{:.1},\"max_ms\":{:.1}}}",
        lat_ms.len(),
        pct(0.5),
        pct(0.99),
        lat_ms.last().copied().unwrap_or(f64::NAN)
    );
}

fn null_reader(url: &str, slot: &str, publication: &str, end: &str) {
    use pgwire_replication::{Lsn, ReplicationClient, ReplicationEvent};
    let end = Lsn::parse(end).expect("end lsn, e.g. 0/1A2B3C4");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let (seconds, messages, bytes) = rt.block_on(async {
        let started = Instant::now();
        let cfg = trusst_cdc::pg::replication_config(url, slot, publication, true).expect("config");
        let mut repl = ReplicationClient::connect(cfg)
            .await
            .expect("replication connection");
        let (mut messages, mut bytes) = (0u64, 0u64);
        loop {
            match repl.recv().await.expect("replication stream") {
                Some(ReplicationEvent::XLogData { data, .. }) => {
                    messages += 1;
                    bytes += data.len() as u64;
                }
                Some(ReplicationEvent::Commit { end_lsn, .. }) => {
                    messages += 1;
                    repl.update_applied_lsn(end_lsn);
                    if end_lsn >= end {
                        break;
                    }
                }
                // The server has sent everything up to `end`: the WAL past the last commit holds
                // nothing decodable (pg_recvlogical's --endpos stops the same way).
                Some(ReplicationEvent::KeepAlive { wal_end, .. }) if wal_end >= end => break,
                Some(_) => messages += 1,
                None => break,
            }
        }
        let seconds = started.elapsed().as_secs_f64();
        let _ = repl.shutdown().await;
        (seconds, messages, bytes)
    });
    println!("{{\"seconds\":{seconds:.3},\"messages\":{messages},\"bytes\":{bytes}}}");
}

/// The `p` quantile (0..=1) of sorted samples, NaN when there are none.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        f64::NAN
    } else {
        sorted[((sorted.len() - 1) as f64 * p).round() as usize]
    }
}

/// The commit time of a trusst-cdc `stream` event.
fn trusst_commit(payload: &[u8]) -> Option<DateTime<Utc>> {
    let e = ContactEvent::from_json(payload).ok()?;
    if e.source.reason != "stream" {
        return None;
    }
    Some(
        DateTime::parse_from_rfc3339(e.source.commit_ts.as_deref()?)
            .ok()?
            .with_timezone(&Utc),
    )
}

/// The commit time of a Debezium change event that makes a contact COMPLETED: the moment the
/// enriched event of trusst-cdc corresponds to.
fn debezium_commit(payload: &[u8]) -> Option<DateTime<Utc>> {
    let v: Value = serde_json::from_slice(payload).ok()?;
    // The JSON converter wraps the change in {"schema", "payload"} when schemas are enabled.
    let change = v.get("payload").filter(|p| p.is_object()).unwrap_or(&v);
    if change["after"]["current_stage"] != "COMPLETED" {
        return None;
    }
    let source = &change["source"];
    match source["ts_us"].as_i64() {
        Some(us) => DateTime::from_timestamp_micros(us),
        None => DateTime::from_timestamp_millis(source["ts_ms"].as_i64()?),
    }
}

/// A reader of its own group (named after `purpose` and this process) from `reset`.
fn consumer_config(brokers: &str, purpose: &str, reset: &str) -> rdkafka::ClientConfig {
    let mut c = rdkafka::ClientConfig::new();
    c.set("bootstrap.servers", brokers)
        .set("group.id", format!("{purpose}-{}", std::process::id()))
        .set("auto.offset.reset", reset)
        .set("enable.auto.commit", "false")
        // The broker answers a fetch as soon as one byte is there; a short wait would only add
        // empty round trips (broker CPU the measured pipeline shares).
        .set("fetch.wait.max.ms", "100");
    c
}

fn drain(brokers: &str, topic: &str, contacts: usize) {
    let consumer: BaseConsumer = consumer_config(brokers, "drain", "earliest")
        .set("topic.metadata.refresh.interval.ms", "200")
        .create()
        .expect("consumer");
    consumer.subscribe(&[topic]).expect("subscribe");
    let mut seen = std::collections::HashSet::with_capacity(contacts);
    let mut first_ms = None;
    while seen.len() < contacts {
        let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) else {
            continue;
        };
        if m.payload()
            .is_some_and(|p| p.windows(13).any(|w| w == br#""op":"upsert""#))
            && let Some(k) = m.key()
        {
            first_ms.get_or_insert_with(|| Utc::now().timestamp_millis());
            seen.insert(k.to_vec());
        }
    }
    println!(
        "{{\"first_ms\":{},\"done_ms\":{}}}",
        first_ms.unwrap_or_default(),
        Utc::now().timestamp_millis()
    );
}

fn watermarks(brokers: &str, topics: &str, records: i64, idle: Duration) {
    let consumer: BaseConsumer = consumer_config(brokers, "watermarks", "earliest")
        .create()
        .expect("consumer");
    // topic -> its partitions, once the topic exists (the connector creates it).
    let mut partitions: Vec<(&str, Vec<i32>)> =
        topics.split(',').map(|t| (t, Vec::new())).collect();
    let mut first_ms = None;
    let (mut seen, mut last_ms, mut since_change) = (0, 0, Instant::now());
    loop {
        let mut total = 0;
        for (topic, ids) in &mut partitions {
            if ids.is_empty()
                && let Ok(meta) = consumer.fetch_metadata(Some(topic), Duration::from_secs(5))
            {
                *ids = meta
                    .topics()
                    .iter()
                    .flat_map(|t| t.partitions())
                    .map(|p| p.id())
                    .collect();
            }
            for &p in ids.iter() {
                if let Ok((low, high)) = consumer.fetch_watermarks(topic, p, Duration::from_secs(5))
                {
                    total += high - low;
                }
            }
        }
        let now = Utc::now().timestamp_millis();
        if total > seen {
            first_ms.get_or_insert(now);
            (seen, last_ms, since_change) = (total, now, Instant::now());
        }
        if total >= records || (seen > 0 && since_change.elapsed() >= idle) {
            println!(
                "{{\"first_ms\":{},\"done_ms\":{last_ms},\"records\":{seen}}}",
                first_ms.unwrap_or(now)
            );
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn lag(brokers: &str, topic: &str, group: &str) {
    // Not subscribed, so it never joins the group: it only reads the group's committed offsets.
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let timeout = Duration::from_secs(10);
    let meta = consumer
        .fetch_metadata(Some(topic), timeout)
        .expect("topic metadata");
    let mut tpl = TopicPartitionList::new();
    for p in meta.topics().iter().flat_map(|t| t.partitions()) {
        tpl.add_partition(topic, p.id());
    }
    let committed = consumer
        .committed_offsets(tpl, timeout)
        .expect("committed offsets");
    let mut total = 0;
    for e in committed.elements() {
        let (low, high) = consumer
            .fetch_watermarks(topic, e.partition(), timeout)
            .expect("watermarks");
        total += match e.offset() {
            Offset::Offset(o) => high - o,
            _ => high - low,
        };
    }
    println!("{total}");
}
