//! The delivery loop shared by every sink: consume, keep the newest event per contact, map,
//! write in CRM-sized requests, dead-letter what cannot be written, then commit offsets.
//!
//! [`offsets`] decides where reading starts and what is committed; [`batch`] turns one batch of
//! records into CRM calls and dead letters, and knows nothing of the consumer (its unit tests
//! run it against an in-memory target).

mod batch;
mod offsets;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::{Message, TopicPartitionList};
use tokio::sync::watch;

use super::Target;
use super::audit::Audit;
use super::config::SinkConfig;
use super::fence::{Fence, SinkContext};
use super::mapping::Mapping;
use super::verdict::{Verdict, of_error};
use crate::error::{self, Error, Result};
use crate::kafka::{self, Pending};
use crate::metrics::kafka::CONSUMER_ASSIGNED;
use batch::{BatchCtx, DeadLetterTopic, Msg};
pub use offsets::StartFrom;
use offsets::{
    CATCH_UP_WAIT, Uncommitted, backlog, batch_size, high_watermarks, partitions, start_positions,
};

/// Readiness condition: the CRM accepted the credentials and the mapping checks passed.
pub const CRM_READY: &str = "crm authenticated";
/// What `/ready` waits for in a sink.
pub const READY_CONDITIONS: &[&str] = &[CONSUMER_ASSIGNED, CRM_READY];

/// The sink's consumer, reporting consumer lag and assignment to the metrics and ownership to
/// the [`Fence`].
type SinkConsumer = StreamConsumer<SinkContext>;

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
    kafka::reach(
        cfg.brokers(),
        &cfg.kafka.properties,
        Duration::from_secs(10),
    )
    .await?;
    let producer = kafka::producer(cfg.brokers(), &cfg.kafka.properties)?;
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
    let mut dead = DeadLetterTopic {
        producer,
        topic: dlq,
        pending: Pending::default(),
    };
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
            dead: &mut dead,
            source_topic: &source_topic,
            totals,
            shutdown: &mut shutdown,
            fence: &fence,
        };
        if opts.dry_run {
            ctx.dry_run(target.as_ref(), &batch, opts.redrive).await?;
            continue;
        }
        // The consumer keeps polling while the batch is written (retries and allowance pauses
        // can outlast max.poll.interval.ms), reading ahead at most one batch.
        let keepalive = Keepalive::start(consumer.clone(), &fence, size);
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
        ctx.dead.flush().await?;
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
            Err(e) if matches!(of_error(&e), Verdict::Retry(_)) => {
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
/// rebalances, which the [`Fence`] follows) however long the CRM makes the batch wait. What it
/// reads is kept for the next batch; once `hold` records are kept, the assigned partitions are
/// paused, so a long wait (an allowance pause) does not pile records up, and a record that
/// still arrives (already fetched, or from a partition assigned meanwhile) is kept and its
/// partition paused too. Pausing only then matters: librdkafka drops a paused partition's
/// prefetched records and fetches again on resume, which cost every short batch most of a
/// second of latency when each one paused.
struct Keepalive {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<(Vec<Msg>, bool)>,
    consumer: Arc<SinkConsumer>,
}

impl Keepalive {
    fn start(consumer: Arc<SinkConsumer>, fence: &Arc<Fence>, hold: usize) -> Self {
        let (stop, mut stopped) = tokio::sync::oneshot::channel();
        let (c, fence) = (consumer.clone(), fence.clone());
        let task = tokio::spawn(async move {
            let mut kept = Vec::new();
            let mut paused = false;
            loop {
                tokio::select! {
                    _ = &mut stopped => return (kept, paused),
                    r = c.recv() => match r {
                        Ok(m) => {
                            kept.push(Msg::read(&m, &fence));
                            if paused {
                                let mut tpl = TopicPartitionList::new();
                                tpl.add_partition(m.topic(), m.partition());
                                if let Err(e) = c.pause(&tpl) {
                                    tracing::warn!(error = %e, "could not pause a partition assigned while a batch was written");
                                }
                            } else if kept.len() >= hold {
                                match c.assignment().and_then(|a| c.pause(&a)) {
                                    Ok(()) => paused = true,
                                    Err(e) => tracing::warn!(error = %e, "could not pause the partitions while a batch was written"),
                                }
                            }
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "Kafka consumer error while a batch was written");
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                    },
                }
            }
        });
        Self {
            stop,
            task,
            consumer,
        }
    }

    /// Stop polling, resume the partitions if they were paused, and hand over what was read
    /// meanwhile.
    async fn stop(self) -> Result<Vec<Msg>> {
        let _ = self.stop.send(());
        let (kept, paused) = self
            .task
            .await
            .map_err(|e| Error::internal(format!("the consumer poller failed: {e}")))?;
        if !paused {
            return Ok(kept);
        }
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
