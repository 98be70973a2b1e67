//! `trusst-cdc tail`: print the events on a topic as they arrive (demo and debugging aid).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use futures::StreamExt;
use rdkafka::Message;
use rdkafka::consumer::{Consumer, StreamConsumer};

use crate::error::{Error, Fault, Result};
use crate::event::{Decoder, Op};
use crate::kafka;

/// What to read and how to print it.
pub struct Options {
    /// Bootstrap servers.
    pub brokers: String,
    /// librdkafka properties for the consumer, as `[kafka.properties]`.
    pub properties: BTreeMap<String, String>,
    /// The topic.
    pub topic: String,
    /// Start at the oldest record instead of new ones.
    pub from_beginning: bool,
    /// Print values as JSON instead of one summary line each.
    pub json: bool,
    /// Stop after this many records.
    pub max: Option<usize>,
    /// Stop after this long without a record.
    pub idle: Option<Duration>,
}

/// Print records of `opts.topic` from the beginning (or the end), one line each, until
/// `opts.max` records or `opts.idle` without any.
pub async fn run(opts: &Options, decoder: &Decoder) -> Result<()> {
    let &Options {
        ref brokers,
        ref properties,
        ref topic,
        from_beginning,
        json,
        max,
        idle,
    } = opts;
    // A consumer only logs an unreachable broker and keeps waiting: ask once, and say so.
    kafka::reach(brokers, properties, Duration::from_secs(10))
        .await
        .map_err(|e| {
            // Refused credentials or a failed handshake already name their settings.
            if e.fault == Fault::User {
                return e;
            }
            Error::external(format!(
                "{}; a secured listener needs its settings as -X KEY=VALUE (e.g. -X security.protocol=SSL)",
                e.message()
            ))
        })?;
    let mut c = kafka::client_config(brokers, properties);
    c.set(
        "group.id",
        format!("trusst-cdc-tail-{}", std::process::id()),
    )
    .set("enable.auto.commit", "false")
    .set(
        "auto.offset.reset",
        if from_beginning { "earliest" } else { "latest" },
    );
    let consumer: StreamConsumer = kafka::create(&c, "consumer")?;
    consumer
        .subscribe(&[topic.as_str()])
        .map_err(|e| crate::error::kafka("subscribing", e))?;
    let mut stream = consumer.stream();
    let mut seen = 0usize;
    let mut last = Instant::now();
    loop {
        if max.is_some_and(|m| seen >= m) {
            return Ok(());
        }
        let wait = idle
            .map(|d| d.saturating_sub(last.elapsed()))
            .unwrap_or(Duration::from_secs(3600));
        let next = match tokio::time::timeout(wait, stream.next()).await {
            Ok(Some(m)) => m,
            Ok(None) => return Ok(()),
            Err(_) if idle.is_some() => return Ok(()),
            Err(_) => continue,
        };
        let m = match next {
            Ok(m) => m,
            // The topic may not exist yet while the source starts.
            Err(e) => {
                tracing::debug!(error = %e, "waiting for the topic");
                continue;
            }
        };
        last = Instant::now();
        seen += 1;
        let key = m.key().map(String::from_utf8_lossy).unwrap_or_default();
        let Some(payload) = m.payload() else {
            println!("{key} [p{} @{}] tombstone", m.partition(), m.offset());
            continue;
        };
        if json && crate::event::avro::split_frame(payload).is_none() {
            println!("{}", String::from_utf8_lossy(payload));
            continue;
        }
        let e = decoder.decode(payload).await?.map_err(|e| {
            Error::external(format!(
                "record {key} at offset {} is not an event: {e}",
                m.offset()
            ))
        })?;
        if json {
            println!("{}", String::from_utf8_lossy(&e.to_json()));
            continue;
        }
        let answers: Vec<String> = e
            .universal_questions
            .iter()
            .map(|q| {
                let r = q.result.as_deref().unwrap_or("null");
                let r = if r.chars().count() > 24 {
                    format!(
                        "{}…({} chars)",
                        r.chars().take(20).collect::<String>(),
                        r.len()
                    )
                } else {
                    r.to_owned()
                };
                format!("{}={r}", q.question_key)
            })
            .collect();
        let op = match e.op {
            Op::Upsert => "upsert",
            Op::Delete => "DELETE",
        };
        println!(
            "{key} [p{} @{}] {op} via {} lsn={} {}",
            m.partition(),
            m.offset(),
            e.source.reason,
            e.source.lsn,
            answers.join(" ")
        );
    }
}
