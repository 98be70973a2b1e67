//! The delivery loop shared by every sink: consume, keep the newest event per contact, map,
//! write in CRM-sized requests, dead-letter what cannot be written, then commit offsets.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::Headers;
use rdkafka::producer::FutureProducer;
use rdkafka::{Message, Offset, TopicPartitionList};
use serde_json::json;
use tokio::sync::watch;

use super::audit::Audit;
use super::config::{OnDelete, SinkConfig};
use super::fence::{Fence, SinkContext};
use super::mapping::{Mapping, Record};
use super::{Outcome, Target, contact_ids};
use crate::error::{self, Error, Fault, Result};
use crate::event::{ContactEvent, Decoder, Op};
use crate::kafka::{self, Pending};
use crate::metrics::kafka::CONSUMER_ASSIGNED;

/// Readiness condition: the CRM accepted the credentials and the mapping checks passed.
pub const CRM_READY: &str = "crm authenticated";
/// What `/ready` waits for in a sink.
pub const READY_CONDITIONS: &[&str] = &[CONSUMER_ASSIGNED, CRM_READY];

/// The sink's consumer, reporting consumer lag and assignment to the metrics and ownership to
/// the [`Fence`].
type SinkConsumer = StreamConsumer<SinkContext>;

/// Where a sink starts reading.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartFrom {
    /// The group's committed offsets (earliest when it has none): the normal mode.
    Committed,
    /// The beginning of the topic (a full replay).
    Earliest,
    /// Only events published from now on.
    Latest,
    /// Explicit offsets per partition (partitions not listed start at their committed offset).
    Offsets(Vec<(i32, i64)>),
    /// The first event at or after this time (milliseconds since the epoch).
    Timestamp(i64),
}

impl std::str::FromStr for StartFrom {
    type Err = String;

    /// `committed`, `earliest`, `latest`, `offset:P:O[,P:O...]`, `timestamp:<RFC 3339 or ms>`.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let bad = || {
            format!(
                "invalid start position {s:?}: use committed, earliest, latest, offset:PARTITION:OFFSET[,...] \
                 or timestamp:2026-01-15T00:00:00Z"
            )
        };
        Ok(match s {
            "committed" => StartFrom::Committed,
            "earliest" => StartFrom::Earliest,
            "latest" => StartFrom::Latest,
            _ => {
                if let Some(rest) = s.strip_prefix("offset:") {
                    let mut v = Vec::new();
                    for part in rest.split(',') {
                        let (p, o) = part.split_once(':').ok_or_else(bad)?;
                        v.push((
                            p.trim().parse().map_err(|_| bad())?,
                            o.trim().parse().map_err(|_| bad())?,
                        ));
                    }
                    StartFrom::Offsets(v)
                } else if let Some(t) = s.strip_prefix("timestamp:") {
                    let ms = t.parse::<i64>().ok().or_else(|| {
                        chrono::DateTime::parse_from_rfc3339(t)
                            .ok()
                            .map(|d| d.timestamp_millis())
                    });
                    StartFrom::Timestamp(ms.ok_or_else(bad)?)
                } else {
                    return Err(bad());
                }
            }
        })
    }
}

/// How a sink run behaves.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Start position (applied to the consumer group before it starts).
    pub start: StartFrom,
    /// Print the CRM requests instead of sending them; commit nothing.
    pub dry_run: bool,
    /// Read the dead-letter topic (up to its end at start) instead of the event topic.
    pub redrive: bool,
    /// Stop after this long without a record (one-off replays).
    pub until_idle: Option<Duration>,
}

/// A consumed record, detached from the consumer.
#[derive(Debug, Clone)]
struct Msg {
    partition: i32,
    offset: i64,
    /// The partition's ownership epoch when the record was read (see [`Fence`]).
    epoch: u64,
    key: String,
    payload: Option<Vec<u8>>,
    /// The record's [`crate::kafka::CUSTOMER_HEADER`], which tombstones carry too.
    customer: Option<String>,
}

impl Msg {
    /// Detach a record from the consumer, stamped with its partition's ownership epoch.
    fn read(m: &rdkafka::message::BorrowedMessage<'_>, fence: &Fence) -> Self {
        Self {
            partition: m.partition(),
            offset: m.offset(),
            epoch: fence.epoch(m.partition()),
            key: m
                .key()
                .map(|k| String::from_utf8_lossy(k).into_owned())
                .unwrap_or_default(),
            payload: m.payload().map(<[u8]>::to_vec),
            customer: m.headers().and_then(|h| {
                h.iter()
                    .find(|h| h.key == crate::kafka::CUSTOMER_HEADER)
                    .and_then(|h| h.value)
                    .map(|v| String::from_utf8_lossy(v).into_owned())
            }),
        }
    }
}

/// Counters of one run, logged at the end and returned for tests and `status`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Totals {
    /// Events consumed.
    pub consumed: u64,
    /// Records the CRM accepted (upserts, deletes, clears).
    pub written: u64,
    /// Records sent to the dead-letter topic.
    pub dead_lettered: u64,
    /// Older events skipped because a newer one for the same contact was in the batch.
    pub superseded: u64,
    /// The newest dead-letter reason (for the sync audit).
    pub last_failure: Option<String>,
    /// On a re-drive: dead letters skipped because their contact has a newer event.
    pub redrive_skipped: u64,
    /// Records of customers not in `[sink] customers`, skipped (and counted in the metrics).
    pub other_customer: u64,
}

/// Run a sink until `shutdown` (or, for dry runs and re-drives, until the end of the topic
/// as it was at start), recording its activity in the sync audit when one is configured.
pub async fn run(
    cfg: &SinkConfig,
    target: Box<dyn Target>,
    opts: RunOptions,
    shutdown: watch::Receiver<bool>,
) -> Result<Totals> {
    // A dry run writes nothing, so it has nothing to audit.
    let mut audit = match opts.dry_run {
        true => None,
        false => Audit::open(&cfg.audit, &cfg.sink.name, cfg.sink.target.name()).await?,
    };
    let mut totals = Totals::default();
    let result = deliver(cfg, target, opts, shutdown, &mut totals, &mut audit).await;
    if let Some(a) = audit.as_mut() {
        a.finish(&totals, result.as_ref().err()).await;
    }
    result.map(|()| totals)
}

async fn deliver(
    cfg: &SinkConfig,
    mut target: Box<dyn Target>,
    opts: RunOptions,
    mut shutdown: watch::Receiver<bool>,
    totals: &mut Totals,
    audit: &mut Option<Audit>,
) -> Result<()> {
    let mut mapping = Mapping::new(cfg.sink.target, &cfg.mapping);
    let decoder = cfg.decoder()?;
    if !opts.dry_run {
        prepare(target.as_mut(), &mut mapping, cfg, &mut shutdown).await?;
        crate::metrics::ready(CRM_READY, true);
    }
    let source_topic = if opts.redrive {
        cfg.dlq_topic()
    } else {
        cfg.kafka.topic.clone()
    };
    let group = if opts.redrive {
        format!("{}-redrive", cfg.group_id())
    } else {
        cfg.group_id()
    };
    // A dry run assigns its partitions by hand: nothing is ever revoked from it.
    let fence = if opts.dry_run {
        Fence::fixed()
    } else {
        Fence::new()
    };
    let consumer = Arc::new(consumer(cfg, &group, fence.clone())?);
    let producer = kafka::producer(cfg.brokers(), &cfg.kafka.properties)?;
    kafka::ping(&producer, cfg.brokers(), Duration::from_secs(10)).await?;
    let partitions = loop {
        match partitions(&consumer, &source_topic)? {
            Some(p) => break p,
            None if opts.redrive => {
                tracing::info!(topic = %source_topic, "no dead-letter topic: nothing to re-drive");
                return Ok(());
            }
            None if opts.dry_run => {
                return Err(Error::user(format!(
                    "topic {source_topic} does not exist; check [kafka] topic"
                )));
            }
            // Sinks may start before the source created the topic: wait for it.
            None => {
                tracing::info!(topic = %source_topic, "waiting for the topic to be created (is the source running?)");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                    _ = shutdown.wait_for(|v| *v) => return Ok(()),
                }
            }
        }
    };
    let bounded = opts.dry_run || opts.redrive;
    let mut last_record = Instant::now();
    let end = if bounded {
        Some(high_watermarks(&consumer, &source_topic, &partitions)?)
    } else {
        None
    };

    if opts.dry_run {
        // Never join the group: a dry run must not disturb a running sink.
        let tpl = start_positions(&consumer, &source_topic, &partitions, &opts.start)?;
        consumer
            .assign(&tpl)
            .map_err(|e| error::kafka("assigning partitions", e))?;
    } else {
        if opts.start != StartFrom::Committed {
            let tpl = start_positions(&consumer, &source_topic, &partitions, &opts.start)?;
            consumer
                .assign(&tpl)
                .map_err(|e| error::kafka("assigning partitions", e))?;
            consumer.commit(&tpl, CommitMode::Sync).map_err(|e| {
                error::kafka(
                    format!(
                        "moving group {group} to {:?} (stop the group's running sinks first)",
                        opts.start
                    ),
                    e,
                )
            })?;
            consumer
                .unassign()
                .map_err(|e| error::kafka("unassigning", e))?;
            tracing::info!(group, start = ?opts.start, "consumer group moved");
        }
        consumer
            .subscribe(&[&source_topic])
            .map_err(|e| error::kafka(format!("subscribing to {source_topic}"), e))?;
    }
    tracing::info!(sink = %cfg.sink.name, topic = %source_topic, group, dry_run = opts.dry_run, "sink started");

    // A dead letter older than its contact's newest event on the topic must not be written:
    // that event is the CRM's state (or is on its way there), and the old one would overwrite it.
    let newer = if opts.redrive && !opts.dry_run {
        Some(newest_events(cfg, &source_topic).await?)
    } else {
        None
    };
    let mut positions: HashMap<i32, i64> = HashMap::new();
    // Records read while the previous batch was being written, for the next batch.
    let mut carried: Vec<Msg> = Vec::new();
    // A full batch hints at a backlog; only then is the lag measured.
    let mut full = false;
    let mut uncommitted = Uncommitted::default();
    let dlq = cfg.dlq_topic();
    if !opts.dry_run && !opts.redrive {
        // Without its dead-letter topic a sink could not set aside a record it cannot write,
        // so a topic it cannot create stops it with the reason.
        kafka::ensure_compacted_topic(
            cfg.brokers(),
            &cfg.kafka.properties,
            &dlq,
            cfg.kafka.dlq_partitions,
            cfg.kafka.dlq_replication_factor,
        )
        .await
        .map_err(|e| {
            let msg = format!(
                "creating the dead-letter topic {dlq}: {}; create it (or let the principal create topics), or set \
                 [kafka] dlq_topic, dlq_partitions and dlq_replication_factor to what the cluster allows",
                e.message()
            );
            if e.retryable {
                Error::external(msg)
            } else {
                Error::user(msg)
            }
        })?;
    }
    loop {
        if let Some(end) = &end
            && end
                .iter()
                .all(|(p, h)| positions.get(p).copied().unwrap_or(-1) + 1 >= *h)
        {
            tracing::info!(?totals, "reached the end of the topic as it was at start");
            return Ok(());
        }
        // Bounded runs wake every second to check for the end; an audited sink wakes once per
        // audit interval so a quiet topic still gets its last row written on time.
        // Offsets a failed commit left behind are retried within a second.
        let wake = if bounded || opts.until_idle.is_some() || !uncommitted.is_empty() {
            Some(Duration::from_secs(1))
        } else {
            audit.as_ref().map(|_| cfg.audit.interval)
        };
        let size = if full {
            batch_size(cfg, backlog(&consumer, &source_topic).await)
        } else {
            cfg.sink.batch_max_records
        };
        let next = next_batch(
            &consumer,
            &fence,
            cfg,
            size,
            &mut shutdown,
            wake,
            &mut carried,
        );
        let batch = match next.await? {
            Some(b) => b,
            None => {
                uncommitted.commit(&consumer, &source_topic)?;
                tracing::info!(?totals, "sink stopped");
                return Ok(());
            }
        };
        if batch.is_empty() {
            uncommitted.commit(&consumer, &source_topic)?;
            if let Some(a) = audit.as_mut() {
                a.tick(totals).await;
            }
            if opts.until_idle.is_some_and(|d| last_record.elapsed() >= d) {
                tracing::info!(
                    ?totals,
                    "no record for {:?}; stopping",
                    opts.until_idle.unwrap_or_default()
                );
                return Ok(());
            }
            continue;
        }
        last_record = Instant::now();
        full = batch.len() >= cfg.sink.batch_max_records;
        for m in &batch {
            let p = positions.entry(m.partition).or_insert(-1);
            *p = (*p).max(m.offset);
        }
        let mut ctx = BatchCtx {
            cfg,
            newer: newer.as_ref(),
            mapping: &mapping,
            decoder: &decoder,
            producer: &producer,
            dlq: &dlq,
            source_topic: &source_topic,
            pending: Pending::default(),
            totals,
            shutdown: &mut shutdown,
            fence: &fence,
        };
        if opts.dry_run {
            ctx.dry_run(target.as_ref(), &batch, opts.redrive).await?;
            continue;
        }
        // The consumer keeps polling while the batch is written (retries and allowance pauses
        // can outlast max.poll.interval.ms), with its partitions paused so nothing piles up.
        let keepalive = Keepalive::start(consumer.clone(), &fence)?;
        let revocations = fence.revocations();
        let processed = ctx.process(target.as_mut(), &batch, opts.redrive).await;
        carried.extend(keepalive.stop().await?);
        if fence.revocations() != revocations {
            tracing::info!(
                sink = %cfg.sink.name,
                "the group rebalanced while a batch was written; records of partitions that moved were left to their new owner"
            );
        }
        if let Err(e) = processed {
            if *shutdown.borrow() {
                tracing::info!(
                    ?totals,
                    "sink stopped; the unfinished batch will be read again"
                );
                return Ok(());
            }
            return Err(e);
        }
        ctx.pending.wait().await?;
        // Only records of partitions owned throughout: a moved partition is read again by its
        // owner from the committed offset.
        uncommitted.add(batch.iter().filter(|m| fence.holds(m.partition, m.epoch)));
        uncommitted.commit(&consumer, &source_topic)?;
        if let Some(a) = audit.as_mut() {
            a.tick(totals).await;
        }
    }
}

/// For every contact with a dead letter, where its newest record on the event topic is: two
/// bounded passes, the dead-letter topic for the contacts, then the event topic.
async fn newest_events(cfg: &SinkConfig, dlq: &str) -> Result<HashMap<String, (i32, i64)>> {
    let mut wanted: std::collections::HashSet<String> = std::collections::HashSet::new();
    kafka::scan(cfg.brokers(), &cfg.kafka.properties, dlq, |key, _, _, _| {
        wanted.insert(key.to_owned());
    })
    .await?;
    let mut newest: HashMap<String, (i32, i64)> = HashMap::new();
    if wanted.is_empty() {
        return Ok(newest);
    }
    kafka::scan(
        cfg.brokers(),
        &cfg.kafka.properties,
        &cfg.kafka.topic,
        |key, partition, offset, _| {
            if wanted.contains(key) {
                newest.insert(key.to_owned(), (partition, offset));
            }
        },
    )
    .await?;
    tracing::info!(
        contacts = wanted.len(),
        on_topic = newest.len(),
        "re-drive: read where each dead-lettered contact's newest event is"
    );
    Ok(newest)
}

/// Check the mapping against the CRM, waiting out an unavailable CRM (retryable errors) but
/// stopping on a configuration problem.
async fn prepare(
    target: &mut dyn Target,
    mapping: &mut Mapping,
    cfg: &SinkConfig,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<()> {
    let mut backoff = error::backoff(Duration::from_millis(500), cfg.sink.max_backoff);
    loop {
        match target.prepare(mapping).await {
            Err(e) if e.retryable && e.fault != Fault::User => {
                let wait = e
                    .retry_after
                    .unwrap_or_else(|| backoff.next().unwrap_or(cfg.sink.max_backoff));
                tracing::warn!(error = %e, retry_in = ?wait, "the CRM is not ready; retrying the start-up checks");
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = shutdown.wait_for(|v| *v) => return Err(e),
                }
            }
            other => return other,
        }
    }
}

fn consumer(cfg: &SinkConfig, group: &str, fence: Arc<Fence>) -> Result<SinkConsumer> {
    let mut c = kafka::client_config(cfg.brokers(), &std::collections::BTreeMap::new());
    c.set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        // A CRM pause (daily allowance spent) can be long; the consumer keeps polling while
        // a batch waits (see `Keepalive`), so this only catches a stuck process.
        .set("max.poll.interval.ms", "900000")
        .set("session.timeout.ms", "30000")
        .set(
            "statistics.interval.ms",
            crate::metrics::kafka::STATS_INTERVAL_MS,
        );
    for (k, v) in &cfg.kafka.properties {
        c.set(k, v);
    }
    c.create_with_context(SinkContext::new(&cfg.sink.name, fence))
        .map_err(|e| error::kafka("creating the Kafka consumer", e))
}

/// The topic's partitions, `None` while it does not exist.
fn partitions(consumer: &SinkConsumer, topic: &str) -> Result<Option<Vec<i32>>> {
    let md = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .map_err(|e| error::kafka(format!("reading metadata of {topic}"), e))?;
    let parts: Vec<i32> = md
        .topics()
        .iter()
        .filter(|t| t.name() == topic)
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    Ok((!parts.is_empty()).then_some(parts))
}

fn high_watermarks(
    consumer: &SinkConsumer,
    topic: &str,
    partitions: &[i32],
) -> Result<Vec<(i32, i64)>> {
    partitions
        .iter()
        .map(|&p| {
            consumer
                .fetch_watermarks(topic, p, Duration::from_secs(10))
                .map(|(_, high)| (p, high))
                .map_err(|e| error::kafka("reading topic end offsets", e))
        })
        .collect()
}

fn start_positions(
    consumer: &SinkConsumer,
    topic: &str,
    partitions: &[i32],
    start: &StartFrom,
) -> Result<TopicPartitionList> {
    let mut tpl = TopicPartitionList::new();
    match start {
        StartFrom::Timestamp(ms) => {
            let mut q = TopicPartitionList::new();
            for &p in partitions {
                q.add_partition_offset(topic, p, Offset::Offset(*ms))
                    .map_err(|e| error::kafka("building offsets", e))?;
            }
            let found = consumer
                .offsets_for_times(q, Duration::from_secs(10))
                .map_err(|e| error::kafka("looking up offsets by time", e))?;
            for e in found.elements() {
                // No event at or after the time: start at the end.
                let off = match e.offset() {
                    Offset::Offset(o) => Offset::Offset(o),
                    _ => Offset::End,
                };
                tpl.add_partition_offset(topic, e.partition(), off)
                    .map_err(|e| error::kafka("building offsets", e))?;
            }
        }
        other => {
            let committed = consumer
                .committed_offsets(
                    {
                        let mut t = TopicPartitionList::new();
                        for &p in partitions {
                            t.add_partition(topic, p);
                        }
                        t
                    },
                    Duration::from_secs(10),
                )
                .map_err(|e| error::kafka("reading committed offsets", e))?;
            for &p in partitions {
                let off = match other {
                    StartFrom::Earliest => Offset::Beginning,
                    StartFrom::Latest => Offset::End,
                    StartFrom::Offsets(list) if list.iter().any(|(lp, _)| *lp == p) => {
                        Offset::Offset(
                            list.iter()
                                .find(|(lp, _)| *lp == p)
                                .map(|(_, o)| *o)
                                .unwrap_or(0),
                        )
                    }
                    _ => match committed.find_partition(topic, p).map(|e| e.offset()) {
                        Some(Offset::Offset(o)) => Offset::Offset(o),
                        _ => Offset::Beginning,
                    },
                };
                tpl.add_partition_offset(topic, p, off)
                    .map_err(|e| error::kafka("building offsets", e))?;
            }
        }
    }
    // Logical offsets cannot be committed: resolve them to numbers.
    let mut concrete = TopicPartitionList::new();
    for e in tpl.elements() {
        let (low, high) = consumer
            .fetch_watermarks(topic, e.partition(), Duration::from_secs(10))
            .map_err(|e| error::kafka("reading topic offsets", e))?;
        let off = match e.offset() {
            Offset::Beginning => low,
            Offset::End => high,
            Offset::Offset(o) => o.clamp(low, high),
            _ => low,
        };
        concrete
            .add_partition_offset(topic, e.partition(), Offset::Offset(off))
            .map_err(|e| error::kafka("building offsets", e))?;
    }
    Ok(concrete)
}

/// Longest a catch-up batch waits to fill.
const CATCH_UP_WAIT: Duration = Duration::from_secs(1);

/// How many records behind the end of the topic the assigned partitions are; `None` when it
/// cannot be told (no assignment yet, the broker not answering).
async fn backlog(consumer: &Arc<SinkConsumer>, topic: &str) -> Option<i64> {
    let (c, topic) = (consumer.clone(), topic.to_owned());
    // Watermarks are a round trip to the broker each: off the async threads.
    tokio::task::spawn_blocking(move || {
        let positions = c.position().ok()?;
        // A partition nothing was read from yet starts at its committed offset, or at the
        // beginning without one.
        let committed = c.committed(Duration::from_secs(5)).ok()?;
        let mut total = 0;
        for e in positions.elements_for_topic(&topic) {
            let (low, high) = c
                .fetch_watermarks(&topic, e.partition(), Duration::from_secs(5))
                .ok()?;
            let at = match e.offset() {
                Offset::Offset(at) => at,
                _ => match committed
                    .find_partition(&topic, e.partition())
                    .map(|c| c.offset())
                {
                    Some(Offset::Offset(at)) => at,
                    _ => low,
                },
            };
            total += (high - at).max(0);
        }
        Some(total)
    })
    .await
    .ok()
    .flatten()
}

/// The batch size for a backlog: catch-up batches (fewer, larger CRM calls, such as one
/// Salesforce Bulk API job instead of fifty sObject Collections requests) from `catch_up_lag`
/// records behind, the live size otherwise.
fn batch_size(cfg: &SinkConfig, backlog: Option<i64>) -> usize {
    match backlog {
        Some(lag) if lag >= cfg.sink.catch_up_lag => {
            tracing::debug!(lag, "catching up: large batches");
            cfg.sink.catch_up_batch_max_records
        }
        _ => cfg.sink.batch_max_records,
    }
}

/// Collect up to `size` records or until `batch_max_wait` after the first record.
/// `None` on shutdown. With `wake`, an empty batch comes back after that long without a record,
/// so the caller can check whether the end was reached or write its audit row.
async fn next_batch(
    consumer: &SinkConsumer,
    fence: &Fence,
    cfg: &SinkConfig,
    size: usize,
    shutdown: &mut watch::Receiver<bool>,
    wake: Option<Duration>,
    carried: &mut Vec<Msg>,
) -> Result<Option<Vec<Msg>>> {
    let mut batch = std::mem::take(carried);
    // A catch-up batch has its records waiting on the broker: give the fetches time to fill it
    // rather than send a small one.
    let max_wait = if size > cfg.sink.batch_max_records {
        cfg.sink.batch_max_wait.max(CATCH_UP_WAIT)
    } else {
        cfg.sink.batch_max_wait
    };
    let mut deadline: Option<Instant> = (!batch.is_empty()).then(|| Instant::now() + max_wait);
    loop {
        if *shutdown.borrow() {
            return Ok(None);
        }
        if batch.len() >= size {
            return Ok(Some(batch));
        }
        let wait = match deadline {
            Some(d) => d.saturating_duration_since(Instant::now()),
            None => wake.unwrap_or(Duration::from_secs(3600)),
        };
        tokio::select! {
            _ = shutdown.changed() => {}
            r = tokio::time::timeout(wait, consumer.recv()) => match r {
                Err(_) => return Ok(Some(batch)),
                Ok(Err(e)) => {
                    tracing::warn!(sink = %cfg.sink.name, topic = %cfg.kafka.topic, error = %e, "Kafka consumer error");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Ok(Ok(m)) => {
                    batch.push(Msg::read(&m, fence));
                    deadline.get_or_insert_with(|| Instant::now() + max_wait);
                }
            }
        }
    }
}

/// Polls the consumer while a batch is written, so the group keeps this member (and runs its
/// rebalances, which the [`Fence`] follows) however long the CRM makes the batch wait. The
/// assigned partitions are paused, so polling reads nothing new; a record that still arrives
/// (already fetched, or from a partition assigned meanwhile) is kept for the next batch and its
/// partition paused too.
struct Keepalive {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Vec<Msg>>,
    consumer: Arc<SinkConsumer>,
}

impl Keepalive {
    fn start(consumer: Arc<SinkConsumer>, fence: &Arc<Fence>) -> Result<Self> {
        let assigned = consumer
            .assignment()
            .map_err(|e| error::kafka("reading the assignment", e))?;
        consumer
            .pause(&assigned)
            .map_err(|e| error::kafka("pausing the partitions while a batch is written", e))?;
        let (stop, mut stopped) = tokio::sync::oneshot::channel();
        let (c, fence) = (consumer.clone(), fence.clone());
        let task = tokio::spawn(async move {
            let mut kept = Vec::new();
            loop {
                tokio::select! {
                    _ = &mut stopped => return kept,
                    r = c.recv() => match r {
                        Ok(m) => {
                            let mut tpl = TopicPartitionList::new();
                            tpl.add_partition(m.topic(), m.partition());
                            if let Err(e) = c.pause(&tpl) {
                                tracing::warn!(error = %e, "could not pause a partition assigned while a batch was written");
                            }
                            kept.push(Msg::read(&m, &fence));
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "Kafka consumer error while a batch was written");
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                    },
                }
            }
        });
        Ok(Self {
            stop,
            task,
            consumer,
        })
    }

    /// Stop polling, resume every assigned partition, and hand over what was read meanwhile.
    async fn stop(self) -> Result<Vec<Msg>> {
        let _ = self.stop.send(());
        let kept = self
            .task
            .await
            .map_err(|e| Error::internal(format!("the consumer poller failed: {e}")))?;
        let assigned = self
            .consumer
            .assignment()
            .map_err(|e| error::kafka("reading the assignment", e))?;
        self.consumer
            .resume(&assigned)
            .map_err(|e| error::kafka("resuming the partitions", e))?;
        Ok(kept)
    }
}

/// Offsets of records the CRM accepted (or the dead-letter topic holds) that are not committed
/// yet. A commit that fails because the broker restarts or the group coordinator moves is tried
/// again on the next loop turn, while the consumer keeps polling so it can rejoin its group;
/// stopping the sink there would only re-send what was already written.
#[derive(Default)]
struct Uncommitted(BTreeMap<i32, i64>);

impl Uncommitted {
    fn add<'m>(&mut self, batch: impl Iterator<Item = &'m Msg>) {
        for m in batch {
            let e = self.0.entry(m.partition).or_insert(0);
            // Committed offset = the next record to read.
            *e = (*e).max(m.offset + 1);
        }
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Commit what is pending; a retryable failure keeps it for the next try.
    fn commit(&mut self, consumer: &SinkConsumer, topic: &str) -> Result<()> {
        if self.0.is_empty() {
            return Ok(());
        }
        // A partition taken away in a rebalance is its new owner's to commit: that member reads
        // those records again, and the upserts are idempotent.
        if let Ok(assigned) = consumer.assignment() {
            let owned: std::collections::HashSet<i32> = assigned
                .elements_for_topic(topic)
                .iter()
                .map(|e| e.partition())
                .collect();
            self.0.retain(|p, _| owned.contains(p));
        }
        let mut tpl = TopicPartitionList::new();
        for (p, o) in &self.0 {
            tpl.add_partition_offset(topic, *p, Offset::Offset(*o))
                .map_err(|e| error::kafka("building offsets", e))?;
        }
        if tpl.count() == 0 {
            return Ok(());
        }
        match consumer.commit(&tpl, CommitMode::Sync) {
            Ok(()) => {
                self.0.clear();
                Ok(())
            }
            Err(e) => {
                let pending: Vec<String> =
                    self.0.iter().map(|(p, o)| format!("p{p}:{o}")).collect();
                let err = error::kafka(
                    format!("committing offsets of {topic} ({})", pending.join(",")),
                    e,
                );
                if !err.retryable {
                    return Err(err);
                }
                tracing::warn!(topic, offsets = %pending.join(","), error = %err, "offset commit failed; retrying on the next turn");
                Ok(())
            }
        }
    }
}

/// The offsets a set of records spans, per partition: `p0:12-40,p2:7`.
fn offsets<'m>(msgs: impl Iterator<Item = &'m Msg>) -> String {
    let mut span: BTreeMap<i32, (i64, i64)> = BTreeMap::new();
    for m in msgs {
        let e = span.entry(m.partition).or_insert((m.offset, m.offset));
        *e = (e.0.min(m.offset), e.1.max(m.offset));
    }
    let parts: Vec<String> = span
        .into_iter()
        .map(|(p, (lo, hi))| {
            if lo == hi {
                format!("p{p}:{lo}")
            } else {
                format!("p{p}:{lo}-{hi}")
            }
        })
        .collect();
    parts.join(",")
}

/// One CRM call of a batch.
#[derive(Clone, Copy)]
enum Call<'r> {
    Upsert(&'r [Record]),
    Delete(&'r [String]),
}

/// What one batch needs while it is processed.
struct BatchCtx<'a> {
    cfg: &'a SinkConfig,
    /// On a re-drive: per contact, the offset of its newest record on the event topic.
    newer: Option<&'a HashMap<String, (i32, i64)>>,
    mapping: &'a Mapping,
    decoder: &'a Decoder,
    producer: &'a FutureProducer,
    dlq: &'a str,
    source_topic: &'a str,
    pending: Pending,
    totals: &'a mut Totals,
    shutdown: &'a mut watch::Receiver<bool>,
    /// Which records may still be written (their partition not moved since they were read).
    fence: &'a Fence,
}

/// A decoded batch entry: the newest event per contact, with the record it came from.
struct Item<'m> {
    msg: &'m Msg,
    event: ContactEvent,
    /// The event as JSON (for the dead-letter record, whatever the topic's format).
    raw: serde_json::Value,
}

/// A record value read by a sink: the event topic's (JSON or Avro) or, on a re-drive, a
/// dead-letter record (JSON) whose `event` is the event.
enum Read {
    Event(Box<ContactEvent>, serde_json::Value),
    /// Not an event: the reason, and the event-shaped JSON when there is some.
    Bad(String, Option<serde_json::Value>),
}

impl BatchCtx<'_> {
    /// Whether the record belongs to a customer this sink writes (its header, else the
    /// event's field); a record that does not is counted and logged at debug level, never
    /// dropped without a trace.
    fn wanted(&mut self, m: &Msg, event: Option<&ContactEvent>) -> bool {
        let customer = m
            .customer
            .as_deref()
            .or_else(|| event.and_then(|e| e.customer.as_deref()));
        if self.cfg.wants(customer) {
            return true;
        }
        let label = customer.unwrap_or("none");
        tracing::debug!(
            sink = %self.cfg.sink.name, contact_id = %m.key, customer = label, partition = m.partition, offset = m.offset,
            "skipped a record of a customer not in [sink] customers"
        );
        self.totals.other_customer += 1;
        crate::metrics::sink_skipped_customer(&self.cfg.sink.name, label);
        false
    }

    /// On a re-drive: true when the contact has a newer record on the event topic than the
    /// one this dead letter came from (logged; the newer one wins).
    fn superseded_dead_letter(&self, m: &Msg, payload: &[u8]) -> bool {
        let Some(newer) = self.newer else {
            return false;
        };
        let Some(&(partition, newest)) = newer.get(&m.key) else {
            return false;
        };
        let Ok(dead) = serde_json::from_slice::<serde_json::Value>(payload) else {
            return false;
        };
        // Only a dead letter taken from the event topic can be placed against it.
        if dead["source"]["topic"].as_str() != Some(self.cfg.kafka.topic.as_str()) {
            return false;
        }
        let from = (
            dead["source"]["partition"].as_i64(),
            dead["source"]["offset"].as_i64(),
        );
        match from {
            (Some(p), Some(o)) if p == i64::from(partition) && o < newest => {
                tracing::info!(
                    sink = %self.cfg.sink.name, contact_id = %m.key, dead_letter_offset = o, newest_offset = newest, partition,
                    "re-drive: skipped a dead letter older than the contact's newest event on the topic"
                );
                true
            }
            _ => false,
        }
    }

    /// Decode one value; an `Err` (the registry unreachable, no registry configured for Avro)
    /// stops the batch uncommitted.
    async fn read(&self, payload: &[u8], redrive: bool) -> Result<Read> {
        if !redrive {
            return Ok(match self.decoder.decode(payload).await? {
                Ok(e) => {
                    let raw = serde_json::to_value(&e)
                        .map_err(|e| Error::internal("events serialize").with_source(e))?;
                    Read::Event(Box::new(e), raw)
                }
                Err(reason) => Read::Bad(reason, None),
            });
        }
        let raw = match serde_json::from_slice::<serde_json::Value>(payload) {
            Ok(v) => v.get("event").cloned().unwrap_or(serde_json::Value::Null),
            Err(e) => {
                return Ok(Read::Bad(
                    format!("dead-letter record is not JSON: {e}"),
                    None,
                ));
            }
        };
        Ok(match serde_json::from_value::<ContactEvent>(raw.clone()) {
            Ok(e) => Read::Event(Box::new(e), raw),
            Err(e) => Read::Bad(format!("record is not a trusst-cdc event: {e}"), Some(raw)),
        })
    }
}

impl BatchCtx<'_> {
    /// Decode the batch and keep the newest event per contact; undecodable records are
    /// dead-lettered (never silently skipped).
    async fn newest<'m>(&mut self, batch: &'m [Msg], redrive: bool) -> Result<Vec<Item<'m>>> {
        let mut newest: HashMap<&str, usize> = HashMap::new();
        let mut items: Vec<Option<Item<'m>>> = Vec::new();
        // Records of a partition that moved since they were read are its new owner's: it reads
        // them again from the committed offset.
        let batch: Vec<&Msg> = batch
            .iter()
            .filter(|m| self.fence.holds(m.partition, m.epoch))
            .collect();
        crate::metrics::sink_consumed(&self.cfg.sink.name, batch.len());
        for m in batch {
            self.totals.consumed += 1;
            // Another customer's record is skipped before it is decoded: a value this sink
            // cannot read is then never dead-lettered here.
            if m.customer.is_some() && !self.wanted(m, None) {
                continue;
            }
            let (event, raw) = match &m.payload {
                // A tombstone deletes on its own: once compaction has removed the delete event
                // before it, it is all a late or replaying sink sees of the deletion. When both are
                // in the batch, the tombstone supersedes the event and the delete happens once.
                None => {
                    let e = ContactEvent::delete(
                        &m.key,
                        crate::event::SourcePosition {
                            lsn: String::new(),
                            commit_ts: None,
                            txid: None,
                            reason: "tombstone".into(),
                        },
                    );
                    let raw = serde_json::to_value(&e)
                        .map_err(|e| Error::internal("events serialize").with_source(e))?;
                    (e, raw)
                }
                Some(payload) if self.superseded_dead_letter(m, payload) => {
                    self.totals.superseded += 1;
                    self.totals.redrive_skipped += 1;
                    crate::metrics::sink_superseded(&self.cfg.sink.name);
                    continue;
                }
                Some(payload) => match self.read(payload, redrive).await? {
                    Read::Event(e, raw) => (*e, raw),
                    Read::Bad(reason, raw) => {
                        let bytes = if raw.is_none() {
                            Some(payload.as_slice())
                        } else {
                            None
                        };
                        self.dead_letter(m, raw.as_ref(), "decode", &reason, bytes)
                            .await?;
                        continue;
                    }
                },
            };
            if m.customer.is_none() && !self.wanted(m, Some(&event)) {
                continue;
            }
            if let Some(i) = newest.insert(m.key.as_str(), items.len()) {
                items[i] = None;
                self.totals.superseded += 1;
                crate::metrics::sink_superseded(&self.cfg.sink.name);
            }
            items.push(Some(Item { msg: m, event, raw }));
        }
        Ok(items.into_iter().flatten().collect())
    }

    async fn process(
        &mut self,
        target: &mut dyn Target,
        batch: &[Msg],
        redrive: bool,
    ) -> Result<()> {
        let items = self.newest(batch, redrive).await?;
        let mut upserts: Vec<(Record, &Item)> = Vec::new();
        let mut deletes: Vec<&Item> = Vec::new();
        for it in &items {
            match it.event.op {
                Op::Upsert => match self.mapping.map(&it.event) {
                    Ok(r) => upserts.push((r, it)),
                    Err(e) => {
                        self.dead_letter(it.msg, Some(&it.raw), "mapping", &e.to_string(), None)
                            .await?
                    }
                },
                Op::Delete => match self.cfg.sink.on_delete {
                    OnDelete::Delete => deletes.push(it),
                    OnDelete::Clear => {
                        // The configured questions and every universal one the event names.
                        let keys = self
                            .mapping
                            .questions
                            .keys()
                            .chain(it.event.cleared_question_keys.iter().flatten())
                            .cloned();
                        upserts.push((self.mapping.cleared(&it.event.trusst_contact_id, keys), it));
                    }
                    OnDelete::Ignore => {}
                },
            }
        }
        let max = target.max_batch().max(1);
        for chunk in upserts.chunks(max) {
            let records: Vec<Record> = chunk.iter().map(|(r, _)| r.clone()).collect();
            let items: Vec<&Item> = chunk.iter().map(|(_, it)| *it).collect();
            let outcomes = self
                .with_retries(target, Call::Upsert(&records), &items)
                .await;
            self.settle(&items, outcomes).await?;
        }
        for chunk in deletes.chunks(max) {
            let ids: Vec<String> = chunk
                .iter()
                .map(|it| it.event.trusst_contact_id.clone())
                .collect();
            let outcomes = self.with_retries(target, Call::Delete(&ids), chunk).await;
            self.settle(chunk, outcomes).await?;
        }
        Ok(())
    }

    /// Retry a CRM call while it fails with a retryable error (honouring Retry-After and
    /// pauses); stop on shutdown so nothing is committed for the batch. Each attempt sends only
    /// the records whose partition this member still owns; the others come back as `None`.
    async fn with_retries(
        &mut self,
        target: &mut dyn Target,
        call: Call<'_>,
        items: &[&Item<'_>],
    ) -> Result<Vec<Option<Outcome>>> {
        let mut backoff = error::backoff(Duration::from_millis(200), self.cfg.sink.max_backoff);
        let what = match call {
            Call::Upsert(_) => "upsert",
            Call::Delete(_) => "delete",
        };
        loop {
            let (owned, in_flight) = self
                .fence
                .begin(items.iter().map(|it| (it.msg.partition, it.msg.epoch)));
            let keep: Vec<usize> = (0..items.len()).filter(|&i| owned[i]).collect();
            if keep.is_empty() {
                return Ok(vec![None; items.len()]);
            }
            let all = keep.len() == items.len();
            let result = match call {
                Call::Upsert(r) if all => target.upsert(self.mapping, r).await,
                Call::Upsert(r) => {
                    let sub: Vec<Record> = keep.iter().map(|&i| r[i].clone()).collect();
                    target.upsert(self.mapping, &sub).await
                }
                Call::Delete(ids) if all => target.delete(self.mapping, ids).await,
                Call::Delete(ids) => {
                    let sub: Vec<String> = keep.iter().map(|&i| ids[i].clone()).collect();
                    target.delete(self.mapping, &sub).await
                }
            };
            drop(in_flight);
            // Readiness follows the CRM: refused credentials (a user error that pauses) make the
            // sink not ready until a call succeeds again.
            match &result {
                Ok(_) => crate::metrics::ready(CRM_READY, true),
                Err(e) if e.fault == Fault::User => crate::metrics::ready(CRM_READY, false),
                Err(_) => {}
            }
            match result {
                Ok(o) if o.len() == keep.len() => {
                    let mut out = vec![None; items.len()];
                    for (i, o) in keep.into_iter().zip(o) {
                        out[i] = Some(o);
                    }
                    return Ok(out);
                }
                Ok(o) => {
                    return Err(Error::internal(format!(
                        "the CRM client returned {} outcomes for {} records",
                        o.len(),
                        keep.len()
                    )));
                }
                Err(e) if e.retryable => {
                    let wait = e
                        .retry_after
                        .unwrap_or_else(|| backoff.next().unwrap_or(self.cfg.sink.max_backoff));
                    let sent = || keep.iter().map(|&i| items[i]);
                    crate::metrics::sink_failed(&self.cfg.sink.name, keep.len());
                    tracing::warn!(
                        sink = %self.cfg.sink.name, topic = %self.source_topic, offsets = %offsets(sent().map(|it| it.msg)),
                        contact_ids = %contact_ids(sent().map(|it| it.event.trusst_contact_id.as_str())), records = keep.len(),
                        error = %e, retry_in = ?wait, "{what} failed; retrying"
                    );
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = self.shutdown.wait_for(|v| *v) => {
                            // Retryable: the batch is neither dead-lettered nor committed.
                            return Err(Error::external("stopped while a CRM request was being retried"));
                        }
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Count written records, dead-letter rejected ones; a non-retryable request error
    /// dead-letters the whole chunk, a configuration error stops the sink. Records left to a
    /// partition's new owner (`None`) are neither.
    async fn settle(
        &mut self,
        items: &[&Item<'_>],
        outcomes: Result<Vec<Option<Outcome>>>,
    ) -> Result<()> {
        let n = items.len();
        match outcomes {
            Ok(o) if o.len() == n => {
                let mut written = 0;
                for (it, o) in items.iter().zip(o) {
                    match o {
                        Some(Outcome::Written) => {
                            written += 1;
                            if let Some(ts) = &it.event.source.commit_ts {
                                crate::metrics::commit_to_crm(&self.cfg.sink.name, ts);
                            }
                        }
                        Some(Outcome::Rejected(reason)) => {
                            self.dead_letter(it.msg, Some(&it.raw), "crm", &reason, None)
                                .await?
                        }
                        None => {}
                    }
                }
                self.totals.written += written;
                crate::metrics::sink_written(&self.cfg.sink.name, written);
                Ok(())
            }
            Ok(o) => Err(Error::internal(format!(
                "the CRM client returned {} outcomes for {n} records",
                o.len()
            ))),
            // A configuration problem stops the sink; a retryable error only comes back on
            // shutdown: either way the batch is left uncommitted, to be read again.
            Err(e) if e.fault == Fault::User || e.retryable => Err(e),
            Err(e) => {
                for it in items {
                    if self.fence.holds(it.msg.partition, it.msg.epoch) {
                        self.dead_letter(it.msg, Some(&it.raw), "crm", &e.to_string(), None)
                            .await?;
                    }
                }
                Ok(())
            }
        }
    }

    async fn dead_letter(
        &mut self,
        m: &Msg,
        event: Option<&serde_json::Value>,
        stage: &str,
        reason: &str,
        raw: Option<&[u8]>,
    ) -> Result<()> {
        tracing::error!(
            sink = %self.cfg.sink.name, contact_id = %m.key, topic = %self.source_topic, partition = m.partition, offset = m.offset,
            stage, reason, dlq = %self.dlq, "record dead-lettered"
        );
        let body = json!({
            "sink": self.cfg.sink.name,
            "stage": stage,
            "reason": reason,
            "failed_at": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            "source": {"topic": self.source_topic, "partition": m.partition, "offset": m.offset},
            "contact_id": m.key,
            "event": event,
            "raw": raw.map(raw_text),
        });
        self.pending
            .send(
                self.producer,
                self.dlq,
                &m.key,
                Some(body.to_string().as_bytes()),
            )
            .await?;
        self.totals.dead_lettered += 1;
        self.totals.last_failure = Some(format!("{stage}: {reason}"));
        crate::metrics::sink_dead_lettered(&self.cfg.sink.name, stage);
        Ok(())
    }

    async fn dry_run(&mut self, target: &dyn Target, batch: &[Msg], redrive: bool) -> Result<()> {
        // Decoding failures are only printed here: a dry run writes nothing, not even to the DLQ.
        let mut newest: BTreeMap<String, (ContactEvent, &Msg)> = BTreeMap::new();
        for m in batch {
            self.totals.consumed += 1;
            let Some(p) = &m.payload else {
                let e = ContactEvent::delete(
                    &m.key,
                    crate::event::SourcePosition {
                        lsn: String::new(),
                        commit_ts: None,
                        txid: None,
                        reason: "tombstone".into(),
                    },
                );
                if self.wanted(m, Some(&e)) {
                    newest.insert(m.key.clone(), (e, m));
                }
                continue;
            };
            match self.read(p, redrive).await? {
                Read::Event(e, _) => {
                    if self.wanted(m, Some(&e)) {
                        newest.insert(m.key.clone(), (*e, m));
                    } else {
                        println!(
                            "SKIP {} (p{} @{}): customer {:?} is not in [sink] customers",
                            m.key, m.partition, m.offset, e.customer
                        );
                    }
                }
                Read::Bad(reason, _) => println!(
                    "WOULD DEAD-LETTER {} (p{} @{}): {reason}",
                    m.key, m.partition, m.offset
                ),
            }
        }
        let mut records = Vec::new();
        for (key, (e, m)) in newest {
            match e.op {
                Op::Delete => println!(
                    "WOULD {:?} {key} (delete event, p{} @{})",
                    self.cfg.sink.on_delete, m.partition, m.offset
                ),
                Op::Upsert => match self.mapping.map(&e) {
                    Ok(r) => records.push(r),
                    Err(err) => println!(
                        "WOULD DEAD-LETTER {key} (p{} @{}): {err}",
                        m.partition, m.offset
                    ),
                },
            }
        }
        for chunk in records.chunks(target.max_batch().max(1)) {
            for line in target.dry_run(self.mapping, chunk) {
                println!("{line}");
            }
        }
        Ok(())
    }
}

/// An undecodable value for the dead-letter record: text as it is, binary (an Avro frame) as
/// base64 with a prefix saying so.
fn raw_text(bytes: &[u8]) -> String {
    use base64::Engine;
    match std::str::from_utf8(bytes) {
        Ok(s) if !s.contains('\0') => s.to_owned(),
        _ => format!(
            "base64:{}",
            base64::engine::general_purpose::STANDARD.encode(bytes)
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_positions_parse() {
        assert_eq!(
            "earliest".parse::<StartFrom>().unwrap(),
            StartFrom::Earliest
        );
        assert_eq!(
            "offset:0:15,2:7".parse::<StartFrom>().unwrap(),
            StartFrom::Offsets(vec![(0, 15), (2, 7)])
        );
        assert_eq!(
            "timestamp:2026-01-15T00:00:00Z"
                .parse::<StartFrom>()
                .unwrap(),
            StartFrom::Timestamp(1_768_435_200_000)
        );
        assert_eq!(
            "timestamp:1000".parse::<StartFrom>().unwrap(),
            StartFrom::Timestamp(1000)
        );
        assert!(
            "offset:x"
                .parse::<StartFrom>()
                .unwrap_err()
                .contains("offset:PARTITION:OFFSET")
        );
        assert!("yesterday".parse::<StartFrom>().is_err());
    }

    #[test]
    fn catch_up_batches_from_the_configured_lag() {
        let cfg: SinkConfig =
            crate::config::parse(include_str!("../../connector-config/salesforce.toml")).unwrap();
        assert_eq!(batch_size(&cfg, None), 1000, "lag unknown: live batches");
        assert_eq!(batch_size(&cfg, Some(1999)), 1000);
        assert_eq!(batch_size(&cfg, Some(2000)), 10_000);
        assert_eq!(batch_size(&cfg, Some(1_000_000)), 10_000);
    }

    #[test]
    fn log_summaries() {
        let m = |partition, offset| Msg {
            partition,
            offset,
            epoch: 1,
            key: String::new(),
            payload: None,
            customer: None,
        };
        let batch = [m(2, 7), m(0, 40), m(0, 12), m(0, 13)];
        assert_eq!(offsets(batch.iter()), "p0:12-40,p2:7");
        assert_eq!(offsets([].iter()), "");
    }
}
