//! Commit-to-Kafka latency: reads `stream` events from a topic as they arrive and reports
//! p50/p99 of (arrival time - the event's commit timestamp). Run by scripts/bench-source.sh:
//!
//!   cargo bench --bench latency -- <brokers> <topic> <expected events> <idle seconds>
//!
//! Prints one JSON line: {"events", "p50_ms", "p99_ms", "max_ms", "span_s"}.
//!
//!   cargo bench --bench latency -- drain <brokers> <topic> <contacts>
//!
//! Reads from the beginning until `contacts` distinct contacts have an upsert event and prints
//! {"done_ms": <wall clock, ms since the epoch, when the last one was read>}.

use std::time::{Duration, Instant};

use rdkafka::Message;
use rdkafka::consumer::{BaseConsumer, Consumer};
use trusst_cdc::event::ContactEvent;

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    if args.first().map(String::as_str) == Some("drain") {
        return drain(&args[1], &args[2], args[3].parse().expect("contacts"));
    }
    let [brokers, topic, expected, idle] = <[String; 4]>::try_from(args)
        .expect("usage: <brokers> <topic> <expected events> <idle seconds>");
    let expected: usize = expected.parse().expect("expected events");
    let idle = Duration::from_secs(idle.parse().expect("idle seconds"));
    let consumer: BaseConsumer = consumer_config(&brokers, "latency", "latest")
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
    let mut last = Instant::now();
    let mut first: Option<Instant> = None;
    while lat_ms.len() < expected && last.elapsed() < idle {
        let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) else {
            continue;
        };
        let now = chrono::Utc::now();
        last = Instant::now();
        first.get_or_insert(last);
        let Some(e) = m.payload().and_then(|p| ContactEvent::from_json(p).ok()) else {
            continue;
        };
        if e.source.reason != "stream" {
            continue;
        }
        if let Some(ts) = e
            .source
            .commit_ts
            .as_deref()
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
        {
            lat_ms.push(
                (now - ts.with_timezone(&chrono::Utc))
                    .num_microseconds()
                    .unwrap_or(0) as f64
                    / 1000.0,
            );
        }
    }
    lat_ms.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        if lat_ms.is_empty() {
            f64::NAN
        } else {
            lat_ms[((lat_ms.len() - 1) as f64 * p).round() as usize]
        }
    };
    let span = first
        .map(|f| last.duration_since(f).as_secs_f64())
        .unwrap_or(0.0);
    println!(
        "{{\"events\":{},\"p50_ms\":{:.1},\"p99_ms\":{:.1},\"max_ms\":{:.1},\"span_s\":{:.1}}}",
        lat_ms.len(),
        pct(0.5),
        pct(0.99),
        lat_ms.last().copied().unwrap_or(f64::NAN),
        span
    );
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
    while seen.len() < contacts {
        let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) else {
            continue;
        };
        if m.payload()
            .is_some_and(|p| p.windows(13).any(|w| w == br#""op":"upsert""#))
        {
            if let Some(k) = m.key() {
                seen.insert(k.to_vec());
            }
        }
    }
    println!("{{\"done_ms\":{}}}", chrono::Utc::now().timestamp_millis());
}
