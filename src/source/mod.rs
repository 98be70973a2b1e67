//! The source: a logical replication slot (pgoutput) in, enriched per-contact events out.
//!
//! Flow per session: preflight -> publication and slot -> topic -> initial snapshot (once) ->
//! stream. Row changes are mapped to touched contacts ([`triggers`]); each batch of committed
//! transactions is re-read with one query ([`enrich`]) and published keyed by contact id. The
//! slot's confirmed LSN moves only after Kafka acknowledged every event up to it, so a crash
//! at any point replays from the last confirmed commit (at-least-once, duplicates allowed).

pub mod backfill;
pub mod enrich;
pub mod ledger;
pub mod pgoutput;
mod publisher;
mod readgate;
pub mod recover;
pub mod schema;
pub mod setup;
pub mod slot;
pub mod standby;
pub mod state;
pub mod triggers;

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pgwire_replication::{Lsn, ReplicationClient, ReplicationEvent};
use rdkafka::producer::FutureProducer;
use tokio::sync::{oneshot, watch};
use tokio_postgres::Client;

use crate::config::{SnapshotMode, SourceConfig};
use crate::error::{self, Error, Result};
use crate::event::fit::Fit;
use crate::event::{Encoder, lsn as fmt_lsn};
use crate::kafka::{self, Pending};
use ledger::{Hold, Ledger, Ticket};
use publisher::{Done, Job, Publisher};
use triggers::{Effect, QuestionRow, Tracker};

/// Batches handed to the publisher and not yet acknowledged before the reader waits for the
/// oldest: bounds memory and how far reading runs ahead of Kafka.
const MAX_INFLIGHT: usize = 8;

/// Snapshot and backfill pages handed to the publisher and not yet acknowledged before the next
/// page waits: enough to keep every stage busy; a crash repeats at most one more page than this.
pub(crate) const PAGES_INFLIGHT: usize = 4;

/// Most contacts remembered as not COMPLETED (about 100 bytes each) before the memory is reset.
const NOT_COMPLETED_CAP: usize = 200_000;

/// Prefix of the heartbeat messages written with `pg_logical_emit_message`.
pub const HEARTBEAT_PREFIX: &str = "trusst-cdc.heartbeat";

/// Readiness condition: the logical replication stream is connected.
pub const REPLICATION_CONNECTED: &str = "replication stream connected";
/// Readiness condition: Kafka answered and the event topic exists.
pub const KAFKA_PRODUCER_UP: &str = "kafka producer up";
/// Readiness condition: this source is not standing by while another one holds the slot.
pub const NOT_STANDING_BY: &str = "not standing by for another source";
/// What `/ready` waits for in the source.
pub const READY_CONDITIONS: &[&str] = &[REPLICATION_CONNECTED, KAFKA_PRODUCER_UP, NOT_STANDING_BY];

/// While re-emits wait, the longest a busy stream goes without running one of their chunks.
const REEMIT_EVERY: Duration = Duration::from_millis(200);

/// How often the slot's lag is read for `trusst_cdc_replication_lag_bytes`.
const LAG_POLL: Duration = Duration::from_secs(5);

/// Run the source until `shutdown` turns true. A configuration problem exits at once (it
/// should be loud). A service that cannot be reached at start (Kafka or PostgreSQL down, say
/// after a restart during maintenance) is retried with backoff for `startup_timeout`, then the
/// source exits; once it has streamed, retryable failures reconnect with backoff for ever.
pub async fn run(cfg: SourceConfig, shutdown: watch::Receiver<bool>) -> Result<()> {
    let new_backoff = || error::backoff(Duration::from_millis(500), Duration::from_secs(30));
    let mut backoff = new_backoff();
    let mut ever_streamed = false;
    let mut give_up_at = Instant::now() + cfg.source.startup_timeout;
    crate::metrics::ready(NOT_STANDING_BY, true);
    // Across sessions: the lag keeps being read while the source reconnects.
    let _lag = watch_slot_lag(cfg.database_url().to_owned(), cfg.source.slot.clone());
    // The schema is registered by the first session only; reconnects reuse its id.
    let encoder = tokio::sync::OnceCell::new();
    loop {
        let started = Instant::now();
        let mut session = Session::new(&cfg, shutdown.clone(), &encoder);
        let result = session.run().await;
        crate::metrics::ready(REPLICATION_CONNECTED, false);
        crate::metrics::ready(KAFKA_PRODUCER_UP, false);
        ever_streamed |= session.streaming;
        if let Some(holder) = session.standby.take() {
            // Not a failure: another source has the slot. Wait (as long as it takes) until it
            // is free, then start at once.
            drop(session);
            if !standby::wait(&cfg, holder, &shutdown).await? {
                return Ok(());
            }
            backoff = new_backoff();
            give_up_at = Instant::now() + cfg.source.startup_timeout;
            continue;
        }
        match result {
            Ok(()) => return Ok(()),
            Err(e) if e.retryable && (ever_streamed || Instant::now() < give_up_at) => {
                if started.elapsed() > Duration::from_secs(60) {
                    backoff = new_backoff();
                }
                let delay = backoff.next().unwrap_or(Duration::from_secs(30));
                if ever_streamed {
                    let lsn = fmt_lsn(session.ledger.confirmed());
                    tracing::warn!(error = %e, slot = %cfg.source.slot, lsn = %lsn, retry_in = ?delay, "source session failed; reconnecting from the slot's confirmed LSN");
                } else {
                    let left = give_up_at.saturating_duration_since(Instant::now());
                    tracing::warn!(error = %e, retry_in = ?delay, gives_up_in = ?left, "source cannot start yet; retrying ([source] startup_timeout)");
                }
                let mut sd = shutdown.clone();
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = sd.wait_for(|v| *v) => return Ok(()),
                }
            }
            Err(e) => return Err(e),
        }
    }
}

/// Read the slot's lag every [`LAG_POLL`] on a connection of its own, so the gauge keeps
/// growing while the stream is stuck. Stops when the returned handle is dropped.
fn watch_slot_lag(url: String, slot: String) -> AbortOnDrop {
    AbortOnDrop(tokio::spawn(async move {
        let mut client = None;
        let mut last_status = None;
        let mut tick = tokio::time::interval(LAG_POLL);
        loop {
            tick.tick().await;
            if client.is_none() {
                client = crate::pg::connect(&url).await.ok();
            }
            let Some(c) = &client else { continue };
            match setup::slot_lag_bytes(c, &slot).await {
                Ok(Some(bytes)) => crate::metrics::replication_lag_bytes(&slot, bytes),
                Ok(None) => {}
                Err(e) => {
                    tracing::debug!(slot = %slot, error = %e, "reading the slot lag failed; reconnecting");
                    client = None;
                    continue;
                }
            }
            if let Ok(h) = slot::read(c, &slot).await {
                crate::metrics::slot_health(
                    &slot,
                    slot::status_code(h.wal_status.as_deref()),
                    h.safe_wal_size,
                );
                // Say it once per change, not every poll.
                let now = h.wal_status.clone();
                if now != last_status {
                    match slot::verdict(&slot, &h, true) {
                        slot::Verdict::Warn(m) | slot::Verdict::Lost(m) => tracing::warn!("{m}"),
                        _ => {}
                    }
                    last_status = now;
                }
            }
        }
    }))
}

/// A background task that ends with its owner.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Where events go: the producer, the event topic, the encoder of the configured format and
/// the largest value the topic takes.
#[derive(Clone)]
struct EventOut {
    producer: FutureProducer,
    topic: String,
    encoder: Encoder,
    /// Largest encoded event ([`kafka::event_limit`]); longer texts are shortened to fit.
    max_bytes: usize,
    /// `<topic>.control` exists (it is created at start; without it anomalies are only logged).
    control_ready: bool,
    /// `[source] customer`, stamped on every event and in every record's header.
    customer: String,
}

impl EventOut {
    /// Enqueue `event` for its contact in the configured format; `None` is the tombstone. An
    /// event over the size limit is shortened ([`crate::event::fit`]); one that cannot fit is
    /// recorded on `<topic>.control` instead, so it never stalls the stream.
    async fn send(
        &self,
        pending: &mut Pending,
        id: &str,
        event: Option<&crate::event::ContactEvent>,
    ) -> Result<()> {
        let value = match event {
            None => None,
            Some(e) => match self.encode_within_limit(id, e).await? {
                Some(v) => Some(v),
                None => return Ok(()),
            },
        };
        pending
            .send_with_headers(
                &self.producer,
                &self.topic,
                id,
                value.as_deref(),
                &[(kafka::CUSTOMER_HEADER, &self.customer)],
            )
            .await
    }

    /// The encoded event, shortened when over the limit; `None` when it cannot fit (recorded).
    async fn encode_within_limit(
        &self,
        id: &str,
        event: &crate::event::ContactEvent,
    ) -> Result<Option<Vec<u8>>> {
        let value = self.encoder.encode(event);
        if value.len() <= self.max_bytes {
            return Ok(Some(value));
        }
        let original = value.len();
        let mut short = event.clone();
        match crate::event::fit::fit(&mut short, self.max_bytes, |e| self.encoder.encode(e).len()) {
            Fit::Fits | Fit::Truncated => {
                let value = self.encoder.encode(&short);
                let cut: Vec<String> = short
                    .truncated
                    .iter()
                    .flatten()
                    .map(|t| {
                        format!(
                            "{}.{} {} -> {} bytes",
                            t.question_key, t.field, t.original_bytes, t.kept_bytes
                        )
                    })
                    .collect();
                tracing::warn!(
                    contact_id = id, bytes = original, limit = self.max_bytes, published_bytes = value.len(),
                    shortened = %cut.join(", "),
                    "event over the broker's size limit: its longest texts were shortened (listed in the event's `truncated`)"
                );
                crate::metrics::event_truncated(&self.topic);
                Ok(Some(value))
            }
            Fit::TooLarge { size } => {
                tracing::error!(
                    contact_id = id,
                    bytes = size,
                    limit = self.max_bytes,
                    "event does not fit the broker's size limit even with every text emptied: not published, recorded on \
                     the control topic; raise the topic's max.message.bytes (and [kafka.properties] message.max.bytes)"
                );
                crate::metrics::event_oversized(&self.topic);
                self.control(serde_json::json!({
                    "type": "oversized_event", "contact_id": id, "lsn": event.source.lsn,
                    "bytes": size, "limit": self.max_bytes,
                    "message": "the event does not fit the broker's size limit even with every text emptied; \
                                raise max.message.bytes and re-publish the contact with a backfill",
                }))
                .await?;
                Ok(None)
            }
        }
    }

    /// Record a stream anomaly on `<topic>.control`, so it is kept beside the events. The
    /// record is also logged at ERROR level with its whole body; if the control topic cannot
    /// be written (it could not be created, or the principal may not write it), that log line
    /// is the record and the stream goes on: a side channel must not stall the stream.
    async fn control(&self, body: serde_json::Value) -> Result<()> {
        tracing::error!(record = %body, "stream anomaly recorded on the control topic");
        if !self.control_ready {
            return Ok(());
        }
        let topic = format!("{}.control", self.topic);
        let mut p = Pending::default();
        let key = format!(
            "{}:{}:{}:{}",
            body["type"].as_str().unwrap_or("control"),
            body["lsn"].as_str().unwrap_or(""),
            body["txid"].as_u64().unwrap_or(0),
            body["contact_id"].as_str().unwrap_or(""),
        );
        let sent = async {
            p.send(
                &self.producer,
                &topic,
                &key,
                Some(body.to_string().as_bytes()),
            )
            .await?;
            p.wait().await
        };
        if let Err(e) = sent.await {
            tracing::error!(topic, error = %e, record = %body, "could not write the control topic; this log line is the record");
        }
        Ok(())
    }
}

/// The event producer, once Kafka answered and the event topic exists (created compacted), and
/// the encoder (for Avro: once the schema is registered; `encoder` keeps it for later sessions).
/// The size limit is read from the topic on every call, so a session started after an operator
/// changed `max.message.bytes` uses the new one.
async fn event_producer(
    cfg: &SourceConfig,
    encoder: &tokio::sync::OnceCell<Encoder>,
    lease: Option<Duration>,
) -> Result<EventOut> {
    kafka::reach(
        cfg.brokers(),
        &cfg.kafka.properties,
        Duration::from_secs(10),
    )
    .await?;
    let encoder = encoder
        .get_or_try_init(|| async {
            Encoder::new(cfg.kafka.format, cfg.registry()?.as_ref(), &cfg.kafka.topic).await
        })
        .await?
        .clone();
    kafka::ensure_compacted_topic(
        cfg.brokers(),
        &cfg.kafka.properties,
        &cfg.kafka.topic,
        cfg.kafka.partitions,
        cfg.replicas(),
    )
    .await?;
    let topic_max = kafka::describe_topic(cfg.brokers(), &cfg.kafka.properties, &cfg.kafka.topic)
        .await?
        .and_then(|t| t.max_message_bytes);
    let (record_max, max_bytes) =
        kafka::event_limit(&cfg.kafka.properties, topic_max, cfg.source.max_event_bytes);
    // librdkafka builds record batches up to message.max.bytes; a batch above the topic's
    // max.message.bytes would be refused whole, so the producer's limit follows the topic's.
    let mut properties = cfg.kafka.properties.clone();
    properties.insert("message.max.bytes".into(), record_max.to_string());
    if let Some(lease) = lease {
        // An event must not wait in the producer's queue for longer than half of the slot's
        // lease: a source frozen with events queued would otherwise send them when it wakes,
        // after a standby that took over meanwhile sent newer ones.
        let fence = crate::config::publish_fence(lease);
        let set = ["message.timeout.ms", "delivery.timeout.ms"]
            .iter()
            .find_map(|k| properties.get(*k))
            .and_then(|v| v.parse::<u64>().ok());
        match set {
            None => {
                properties.insert(
                    "message.timeout.ms".into(),
                    fence.as_millis().max(1000).to_string(),
                );
            }
            Some(ms) if Duration::from_millis(ms) > fence => tracing::warn!(
                message_timeout_ms = ms,
                wal_sender_timeout = ?lease,
                "[kafka.properties] message.timeout.ms is longer than half of the slot's lease (the server's \
                 wal_sender_timeout): a standby source could take over while this one, frozen, still holds events \
                 in its producer's queue; set [source] takeover_after, or lower message.timeout.ms"
            ),
            Some(_) => {}
        }
    }
    let producer = kafka::producer(cfg.brokers(), &properties)?;
    tracing::debug!(topic = %cfg.kafka.topic, max_event_bytes = max_bytes, "event size limit");
    let control = format!("{}.control", cfg.kafka.topic);
    let control_ready = match kafka::ensure_compacted_topic(
        cfg.brokers(),
        &cfg.kafka.properties,
        &control,
        1,
        cfg.replicas(),
    )
    .await
    {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(topic = %control, error = %e, "the control topic cannot be created: stream anomalies (TRUNCATE, unattributable changes, oversized events) will only be logged; create it (compacted) or grant the principal CREATE on it");
            false
        }
    };
    Ok(EventOut {
        producer,
        topic: cfg.kafka.topic.clone(),
        encoder,
        max_bytes,
        control_ready,
        customer: cfg.customer().to_owned(),
    })
}

/// The confirmed position of an existing slot.
fn position(health: &slot::Health) -> Result<u64> {
    setup::parse_lsn(health.confirmed.as_deref().unwrap_or("0/0"))
}

/// The publishing pipeline's re-read connections (`[source] reread_connections`), each
/// prepared for the enrichment query.
pub(crate) async fn reread_connections(url: &str, n: usize) -> Result<Vec<tokio_postgres::Client>> {
    let mut clients = Vec::with_capacity(n);
    for _ in 0..n.max(1) {
        let c = crate::pg::connect(url).await?;
        enrich::prepare_session(&c).await?;
        clients.push(c);
    }
    Ok(clients)
}

/// Drop the slot and the publication and forget the snapshot progress: what `teardown`
/// does. Returns one line per thing done or kept.
pub async fn teardown(cfg: &SourceConfig, keep_publication: bool) -> Result<Vec<String>> {
    let s = &cfg.source;
    let client = crate::pg::connect(cfg.database_url()).await?;
    let mut done = Vec::new();
    let health = slot::read(&client, &s.slot).await?;
    if health.exists {
        if let Some(pid) = health.active_pid {
            return Err(Error::user(format!(
                "replication slot {} is in use by the process with PID {pid} (a running source): stop it first, \
                 then run teardown again",
                s.slot
            )));
        }
        let held = setup::slot_lag_bytes(&client, &s.slot).await?.unwrap_or(0);
        setup::drop_slot(&client, &s.slot).await?;
        done.push(format!(
            "dropped replication slot {} (at {}, holding {} MiB of WAL)",
            s.slot,
            health.confirmed.as_deref().unwrap_or("?"),
            held.max(0) >> 20
        ));
    } else {
        done.push(format!("no replication slot {} to drop", s.slot));
    }
    let exists: bool = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = $1)",
            &[&s.publication],
        )
        .await
        .map_err(|e| error::pg("reading publications", e))?
        .get(0);
    if !exists {
        done.push(format!("no publication {} to drop", s.publication));
    } else if keep_publication || !s.create_publication {
        done.push(format!(
            "kept publication {} ({})",
            s.publication,
            if keep_publication {
                "--keep-publication"
            } else {
                "create_publication = false: an owner created it; DROP PUBLICATION it by hand if nothing else uses it"
            }
        ));
    } else {
        client
            .batch_execute(&format!("DROP PUBLICATION {}", s.publication))
            .await
            .map_err(|e| error::pg(format!("dropping publication {}", s.publication), e))?;
        done.push(format!("dropped publication {}", s.publication));
    }
    let store = state_store(cfg, &client).await?;
    match &store {
        state::Store::Kafka(k) => k.forget().await?,
        state::Store::File(_) => {
            let path = Path::new(&s.state_dir).join(format!("{}.snapshot.json", s.slot));
            let _ = std::fs::remove_file(path);
        }
    }
    done.push(format!(
        "forgot the snapshot progress ({})",
        store.describe()
    ));
    Ok(done)
}

/// Where this source keeps its snapshot progress (`[source] state_store`).
pub async fn state_store(cfg: &SourceConfig, client: &Client) -> Result<state::Store> {
    let s = &cfg.source;
    let file = state::StateFile::new(Path::new(&s.state_dir), &s.slot);
    Ok(match s.state_store {
        crate::config::StateStore::File => state::Store::File(file),
        crate::config::StateStore::Kafka => {
            let database: String = client
                .query_one("SELECT current_database()::text", &[])
                .await
                .map_err(|e| error::pg("reading the database name", e))?
                .get(0);
            state::Store::Kafka(state::KafkaState::new(
                cfg.brokers(),
                &cfg.kafka.properties,
                &format!("{}.state", cfg.kafka.topic),
                cfg.replicas(),
                &database,
                &s.slot,
                Some(file),
            )?)
        }
    })
}

/// The transaction a touched contact was last seen in.
#[derive(Debug, Clone, Copy)]
struct Origin {
    lsn: u64,
    commit_ts: i64,
    xid: u32,
}

/// The universal-relevant part of a question, cached to decide whether a change re-emits.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Question {
    key: Option<String>,
    text: Option<String>,
    result_type: Option<String>,
    group: Option<String>,
    is_universal: bool,
}

impl Question {
    /// The question a WAL row describes; a column the row does not carry (an unchanged
    /// TOASTed value) keeps its value in `base`.
    fn from_row(r: QuestionRow, base: Option<&Question>) -> Self {
        Question {
            key: r.key.or(base.and_then(|q| q.key.as_ref())),
            text: r.text.or(base.and_then(|q| q.text.as_ref())),
            result_type: r.result_type.or(base.and_then(|q| q.result_type.as_ref())),
            group: r.group.or(base.and_then(|q| q.group.as_ref())),
            is_universal: r
                .is_universal
                .or(base.map(|q| &q.is_universal))
                .unwrap_or(false),
        }
    }
}

/// Re-emitting the completed contacts of a changed question, one chunk at a time.
#[derive(Debug)]
struct ReemitJob {
    question_id: String,
    after: String,
    /// Keeps the slot before the question change until the job is done: a crash must replay
    /// the question change so the job is recreated.
    hold: Hold,
    origin: Origin,
}

/// Touched contacts of committed transactions, not yet published.
#[derive(Default)]
struct Batch {
    touched: HashMap<String, Origin>,
    deleted: HashSet<String>,
    /// Contacts with a changed or deleted universal answer: if the re-read no longer returns
    /// them, they may have lost their last one.
    lost: HashSet<String>,
    /// Contacts whose row left COMPLETED: they get an event without answers if still not
    /// COMPLETED when read.
    withdrawn: HashSet<String>,
    /// Every transaction whose changes are in this batch: the re-read waits until all are
    /// visible (a contact's origin keeps only its newest).
    xids: HashSet<u32>,
    /// Set once a committed transaction's changes are all in this batch.
    committed: bool,
    since: Option<Instant>,
}

struct Session<'a> {
    cfg: &'a SourceConfig,
    /// The event encoder, shared by the sessions of one run.
    encoder: &'a tokio::sync::OnceCell<Encoder>,
    shutdown: watch::Receiver<bool>,
    tracker: Tracker,
    questions: HashMap<String, Question>,
    /// The keys of the universal questions in `questions`, built when first needed after a change.
    universal_keys: Option<Arc<[String]>>,
    /// Keys of questions that stopped being universal (or were renamed or deleted) this
    /// session: events list them as cleared when the contact has no answer under that key.
    retired: Arc<BTreeSet<String>>,
    /// WAL position when the question cache was loaded: earlier question changes are replays
    /// the cache already reflects, so they re-emit conservatively.
    questions_loaded_at: u64,
    batch: Batch,
    /// The column types of this database and the queries built for them.
    plan: schema::Plan,
    /// Contacts whose newest row image in the stream so far is not COMPLETED. Every change of a
    /// contact row passes through the stream, so that is their state at the stream's position:
    /// re-reading them cannot publish anything their next row change will not. Unknown contacts
    /// (not seen since the session started) are re-read.
    not_completed: HashSet<String>,
    jobs: VecDeque<ReemitJob>,
    /// Transaction being received.
    current: Option<Origin>,
    /// Which position the slot may be confirmed at (see [`ledger`]).
    ledger: Ledger,
    /// The confirmed position last handed to the replication client.
    reported: u64,
    published: u64,
    /// Work handed to the publisher awaiting acknowledgement, oldest first.
    inflight: VecDeque<(Ticket, Done)>,
    /// Enrichment and production, beside the reader; started once the stream starts.
    publisher: Option<Publisher>,
    /// Set once setup succeeded (database, Kafka, topic and slot all fine) in this session.
    streaming: bool,
    /// When a re-emit chunk last ran.
    last_reemit: Instant,
    /// Set when another source holds the slot: this one stands by instead of retrying.
    standby: Option<standby::Holder>,
}

fn pg_epoch_micros_to_rfc3339(micros: i64) -> Option<String> {
    // PostgreSQL timestamps count from 2000-01-01.
    const PG_EPOCH: i64 = 946_684_800;
    chrono::DateTime::from_timestamp_micros(micros + PG_EPOCH * 1_000_000)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true))
}

impl<'a> Session<'a> {
    fn new(
        cfg: &'a SourceConfig,
        shutdown: watch::Receiver<bool>,
        encoder: &'a tokio::sync::OnceCell<Encoder>,
    ) -> Self {
        Self {
            cfg,
            encoder,
            shutdown,
            tracker: Tracker::new(),
            questions: HashMap::new(),
            universal_keys: None,
            retired: Arc::default(),
            questions_loaded_at: 0,
            batch: Batch::default(),
            plan: schema::Plan::guide(),
            not_completed: HashSet::new(),
            jobs: VecDeque::new(),
            current: None,
            ledger: Ledger::new(0),
            reported: 0,
            published: 0,
            streaming: false,
            inflight: VecDeque::new(),
            publisher: None,
            last_reemit: Instant::now(),
            standby: None,
        }
    }

    async fn run(&mut self) -> Result<()> {
        let cfg = self.cfg;
        let s = &cfg.source;
        // With several hosts in the URL (a primary and its standbys), this session's one host:
        // after a failover, the new primary.
        let url = crate::pg::resolve_host(cfg.database_url()).await?;
        let client = crate::pg::connect(&url).await?;
        enrich::prepare_session(&client).await?;
        let server = setup::server(&client).await?;
        // On a read replica, what needs a writable server goes to the primary.
        let primary = match (server.standby, cfg.primary_url()) {
            (true, Some(p)) => Some(crate::pg::connect(p).await?),
            _ => None,
        };
        setup::failures(
            &setup::preflight(
                &client,
                &s.publication,
                &s.slot,
                s.create_publication,
                cfg.primary_url().is_some(),
            )
            .await?,
        )?;
        if s.create_publication {
            setup::ensure_publication(primary.as_ref().unwrap_or(&client), &s.publication).await?;
        }
        self.plan = schema::read(&client).await?;
        self.tracker = Tracker::with_schemas(setup::table_schemas(&client).await?);
        let lease = standby::lease(cfg, &client).await?;
        let out = event_producer(cfg, self.encoder, lease).await?;
        // Anomalies (TRUNCATE, unattributable changes) go to the control topic beside the stream.
        let control = out.clone();
        crate::metrics::ready(KAFKA_PRODUCER_UP, true);
        // One source per slot: from here to streaming (slot creation, snapshot, recovery) this
        // session holds the claim; another source streaming or setting up makes this one stand by.
        if let Some(holder) = standby::try_claim(&client, &s.slot).await? {
            return Err(self.stand_by(holder));
        }
        let store = state_store(cfg, &client).await?;
        let saved = store.load_opt().await?;
        let health = slot::read(&client, &s.slot).await?;
        let mut state = saved.clone().unwrap_or_default();
        // A summary of the topic read before a new slot replaced a lost one.
        let mut summary = None;
        let slot_lsn = match slot::verdict(&s.slot, &health, saved.is_some()) {
            slot::Verdict::Create => {
                // A new slot needs a new snapshot. The progress is reset before the slot
                // exists, so a crash between the two cannot leave an earlier slot's "done";
                // the record also tells a later start that this slot existed.
                state = state::SnapshotState {
                    done: s.snapshot == SnapshotMode::Never,
                    ..Default::default()
                };
                store.save(&state).await?;
                self.create_slot(&client, server, primary.as_ref()).await?
            }
            slot::Verdict::Fine => position(&health)?,
            slot::Verdict::Warn(m) => {
                tracing::warn!("{m}");
                position(&health)?
            }
            slot::Verdict::Lost(m) => {
                if s.on_slot_lost == crate::config::SlotLost::Stop {
                    crate::metrics::slot_health(&s.slot, slot::status_code(Some("lost")), None);
                    return Err(Error::user(m));
                }
                tracing::warn!("{m}; recovering (--recover)");
                // The gap start comes from the topic as it was before anything new is published.
                let decoder = crate::event::Decoder::new(cfg.registry()?);
                let read = recover::summarize(cfg, &decoder).await?;
                let since = recover::gap_start(&read, s.recover_margin);
                state.recovering = true;
                state.recover_since = since.map(|t| t.to_rfc3339());
                store.save(&state).await?;
                if health.exists {
                    setup::drop_slot(&client, &s.slot).await?;
                }
                summary = Some(read);
                self.create_slot(&client, server, primary.as_ref()).await?
            }
        };
        self.ledger = Ledger::new(slot_lsn);
        self.reported = slot_lsn;
        // Everything is reachable and configured: from here on failures are retried.
        self.streaming = true;

        if state.recovering {
            // First run of the recovery, or a restart that finishes one a crash interrupted.
            let summary = match summary {
                Some(read) => read,
                None => {
                    let decoder = crate::event::Decoder::new(cfg.registry()?);
                    recover::summarize(cfg, &decoder).await?
                }
            };
            let since = state
                .recover_since
                .as_deref()
                .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
                .map(|t| t.with_timezone(&chrono::Utc));
            if since.is_none() {
                tracing::warn!(
                    "recovery: no event on the topic carries a commit time, so nothing says when the gap began: every COMPLETED contact is re-published"
                );
            }
            let outcome = recover::republish(
                &client,
                &self.plan,
                &out,
                &summary,
                since,
                slot_lsn,
                s.batch_max_contacts,
            )
            .await?;
            self.published += outcome.changed + outcome.missing + outcome.deleted;
            state.recovering = false;
            state.recover_since = None;
            store.save(&state).await?;
        }
        // The pipeline reads on connections of its own so the reader's heartbeats and
        // re-emit lookups never wait behind an enrichment query.
        let readers = reread_connections(&url, s.reread_connections).await?;
        self.publisher = Some(
            Publisher::start(
                readers,
                out,
                &self.plan,
                lease.map(crate::config::publish_fence),
            )
            .await?,
        );
        if s.snapshot == SnapshotMode::Initial && !state.done {
            tracing::info!(state = %store.describe(), resumed_after = %state.last_key, "snapshot progress");
            self.snapshot(&client, &store, state, slot_lsn).await?;
        }
        if *self.shutdown.borrow() {
            return Ok(());
        }

        self.load_questions(&client).await?;
        let mut repl_cfg =
            crate::pg::replication_config(&url, &s.slot, &s.publication, server.major >= 14)?
                .with_start_lsn(Lsn(slot_lsn))
                .with_ack_lsn(Lsn(slot_lsn));
        if let Some(t) = s.takeover_after {
            // PostgreSQL ends this connection when the source has not answered for that long,
            // which frees the slot for a standby (wal_sender_timeout is settable per connection).
            repl_cfg.options = Some(format!(
                "{} -c wal_sender_timeout={}",
                repl_cfg.options.as_deref().unwrap_or_default(),
                t.as_millis()
            ));
        }
        let started = async {
            let mut repl = ReplicationClient::connect(repl_cfg).await?;
            repl.wait_started().await?;
            Ok::<_, pgwire_replication::PgWireError>(repl)
        };
        let mut repl = match started.await {
            Ok(repl) => repl,
            // Another walsender streams from the slot (a source without the claim, or a
            // pg_recvlogical): stand by as for a claimed slot.
            Err(e) if standby::active_pid_in(&e.to_string()).is_some() => {
                let pid = standby::active_pid_in(&e.to_string()).unwrap_or_default();
                let holder = standby::holder(&client, &s.slot).await.ok().flatten();
                return Err(self.stand_by(holder.unwrap_or(standby::Holder {
                    pid,
                    doing: "streaming",
                    who: String::new(),
                })));
            }
            Err(e) => return Err(crate::pg::replication_error(&url, e)),
        };
        // Our walsender holds the slot now: that is the claim from here on.
        standby::release(&client, &s.slot).await;
        tracing::info!(slot = %s.slot, from = %fmt_lsn(slot_lsn), "streaming changes");
        crate::metrics::ready(REPLICATION_CONNECTED, true);

        // The heartbeat is written where writes are possible: here, or the replica's primary.
        let writer = if server.standby {
            primary.as_ref()
        } else {
            Some(&client)
        };
        let result = self.stream(&client, writer, &control, &mut repl).await;
        let _ = repl.shutdown().await;
        drop(repl);
        if result.is_ok() {
            // The stream's last standby status may not have reached the server before CopyDone;
            // advancing the released slot makes the final position durable.
            self.advance_released_slot(&client).await;
        }
        result
    }

    /// Stand by for `holder`: the error that ends this session (the run loop waits instead of
    /// retrying).
    fn stand_by(&mut self, holder: standby::Holder) -> Error {
        let e = Error::external(format!(
            "replication slot {} is held by another source ({holder})",
            self.cfg.source.slot
        ));
        self.standby = Some(holder);
        e
    }

    /// Create the slot: a failover slot on a primary of PostgreSQL 17+ (unless
    /// `failover_slot = false`); on a replica, with the primary hurried along when known.
    async fn create_slot(
        &self,
        client: &Client,
        server: setup::Server,
        primary: Option<&Client>,
    ) -> Result<u64> {
        let s = &self.cfg.source;
        let failover = s.failover_slot && server.major >= 17 && !server.standby;
        if server.standby && primary.is_none() {
            tracing::warn!(
                "creating the slot on a replica without [database] primary_url: it waits for the primary's next running-transactions record"
            );
        }
        setup::create_slot(client, &s.slot, failover, primary).await
    }

    async fn load_questions(&mut self, client: &Client) -> Result<()> {
        let rows = client
            .query(&self.plan.questions_sql(), &[])
            .await
            .map_err(|e| error::pg("loading questions", e))?;
        let read = |e: tokio_postgres::Error| {
            Error::user(format!(
                "cannot read the questions table ({e}); run `trusst-cdc check` for the column types it accepts"
            ))
        };
        self.questions = rows
            .iter()
            .map(|r| {
                Ok((
                    r.try_get::<_, String>("question_id").map_err(read)?,
                    Question {
                        key: r.try_get("key").map_err(read)?,
                        text: r.try_get("text").map_err(read)?,
                        result_type: r.try_get("result_type").map_err(read)?,
                        group: r.try_get("group").map_err(read)?,
                        is_universal: r.try_get("is_universal").map_err(read)?,
                    },
                ))
            })
            .collect::<Result<_>>()?;
        self.universal_keys = None;
        // Read after the questions: a change committed in between then counts as a replay and
        // re-emits conservatively instead of being missed.
        self.questions_loaded_at = setup::current_wal_lsn(client).await?;
        Ok(())
    }

    async fn snapshot(
        &mut self,
        client: &Client,
        store: &state::Store,
        mut st: state::SnapshotState,
        slot_lsn: u64,
    ) -> Result<()> {
        // The slot exists before this transaction starts, so every commit is either visible
        // here or streamed afterwards: nothing falls between snapshot and stream.
        client
            .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .await
            .map_err(|e| error::pg("starting the snapshot transaction", e))?;
        let total = enrich::completed_count(client, &self.plan, &st.last_key).await?;
        tracing::info!(remaining = total, resumed_after = %st.last_key, "initial snapshot started");
        let started = Instant::now();
        let origin = Origin {
            lsn: slot_lsn,
            commit_ts: 0,
            xid: 0,
        };
        // Read inside the REPEATABLE READ transaction, as the pages are.
        let universal: Arc<[String]> = enrich::universal_keys(client, &self.plan).await?.into();
        // Pages go through the stream's publishing pipeline: the next page's ids are read while
        // earlier pages are re-read (on the pipeline's connection: any commit after the slot's
        // creation is streamed afterwards anyway), produced and acknowledged. Progress is saved
        // in page order and only for acknowledged pages, so a restart resumes after the last.
        let mut pages = publisher::Pages::new(PAGES_INFLIGHT);
        let mut read_after = st.last_key.clone();
        loop {
            if *self.shutdown.borrow() {
                let _ = client.batch_execute("ROLLBACK").await;
                return Ok(());
            }
            let ids = enrich::completed_page(
                client,
                &self.plan,
                &read_after,
                self.cfg.source.batch_max_contacts,
            )
            .await?;
            let Some(last) = ids.last().cloned() else {
                break;
            };
            read_after.clone_from(&last);
            let mut job = Job::at(ids, origin, "snapshot");
            job.universal = Some(universal.clone());
            let publisher = self.publisher.as_ref().ok_or_else(|| {
                Error::internal("snapshot before the publishing pipeline started")
            })?;
            let done = publisher.submit(job).await?;
            if let Some(page) = pages.push(done, last).await? {
                self.snapshot_page_done(page, store, &mut st, total, started)
                    .await?;
            }
        }
        while let Some(page) = pages.next().await? {
            self.snapshot_page_done(page, store, &mut st, total, started)
                .await?;
        }
        let _ = client.batch_execute("COMMIT").await;
        st.done = true;
        store.save(&st).await?;
        tracing::info!(published = st.published, "initial snapshot done");
        Ok(())
    }

    /// A snapshot page was acknowledged: save the progress it made.
    async fn snapshot_page_done(
        &mut self,
        (n, last): (usize, String),
        store: &state::Store,
        st: &mut state::SnapshotState,
        total: i64,
        started: Instant,
    ) -> Result<()> {
        self.published += n as u64;
        st.last_key = last;
        st.published += n as u64;
        store.save(st).await?;
        let rate = st.published as f64 / started.elapsed().as_secs_f64().max(0.001);
        tracing::info!(
            published = st.published,
            of = total,
            rate = format!("{rate:.0}/s"),
            "snapshot progress"
        );
        Ok(())
    }

    async fn stream(
        &mut self,
        client: &Client,
        writer: Option<&Client>,
        out: &EventOut,
        repl: &mut ReplicationClient,
    ) -> Result<()> {
        let s = &self.cfg.source;
        let mut heartbeat = tokio::time::interval(s.heartbeat_interval);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        heartbeat.tick().await;
        let mut shutdown = self.shutdown.clone();
        loop {
            let deadline = self.batch.since.map(|t| t + s.batch_max_wait);
            let job_ready = !self.jobs.is_empty() && self.current.is_none();
            tokio::select! {
                biased;
                _ = shutdown.wait_for(|v| *v) => {
                    tracing::info!("shutting down: publishing the pending batch");
                    self.flush(repl).await?;
                    self.drain_inflight(repl).await?;
                    return Ok(());
                }
                ev = repl.recv() => {
                    let ev = ev.map_err(|e| Error::external("replication stream failed").with_source(e))?;
                    let Some(ev) = ev else {
                        return Err(Error::external("replication stream ended unexpectedly"));
                    };
                    self.handle(ev, out, repl).await?;
                    // A stream that never pauses (catching up) would starve the re-emit
                    // branches below, and the hold would pin the slot and WAL until it does.
                    if !self.jobs.is_empty()
                        && self.current.is_none()
                        && self.last_reemit.elapsed() >= REEMIT_EVERY
                    {
                        self.reemit_step(client, repl).await?;
                    }
                }
                res = async { (&mut self.inflight.front_mut().expect("guarded").1).await }, if !self.inflight.is_empty() => {
                    let (ticket, _) = self.inflight.pop_front().expect("front exists");
                    self.acked(res.map_err(|_| ()), ticket, repl)?;
                    // The pipeline just emptied: what committed meanwhile goes out now instead of
                    // waiting out batch_max_wait.
                    if self.inflight.is_empty() && self.current.is_none() && self.batch.committed {
                        self.flush(repl).await?;
                    }
                }
                _ = sleep_until_opt(deadline) => {
                    self.flush(repl).await?;
                    if !self.jobs.is_empty() && self.current.is_none() {
                        self.reemit_step(client, repl).await?;
                    }
                }
                _ = std::future::ready(()), if job_ready && self.batch.since.is_none() => {
                    self.reemit_step(client, repl).await?;
                }
                _ = heartbeat.tick(), if writer.is_some() => {
                    let writer = writer.expect("guarded");
                    if let Err(e) = writer
                        .execute("SELECT pg_logical_emit_message(false, $1, 'heartbeat')", &[&HEARTBEAT_PREFIX])
                        .await
                    {
                        tracing::warn!(error = %e, lsn = %fmt_lsn(self.ledger.confirmed()), "heartbeat failed; the slot advances only on keepalives");
                    }
                }
            }
        }
    }

    async fn handle(
        &mut self,
        ev: ReplicationEvent,
        out: &EventOut,
        repl: &ReplicationClient,
    ) -> Result<()> {
        match ev {
            ReplicationEvent::Begin {
                final_lsn,
                xid,
                commit_time_micros,
            } => {
                self.ledger.begin();
                self.current = Some(Origin {
                    lsn: final_lsn.0,
                    commit_ts: commit_time_micros,
                    xid,
                });
            }
            ReplicationEvent::XLogData {
                data, wal_start, ..
            } => {
                let msg = pgoutput::decode(&data).map_err(|e| {
                    // Skipping the message could lose a change, so the source stops, naming
                    // the table when the message is a row change.
                    let table = match data.first() {
                        Some(b'I' | b'U' | b'D') if data.len() >= 5 => {
                            let id = u32::from_be_bytes([data[1], data[2], data[3], data[4]]);
                            format!(
                                " (a row change of table {})",
                                self.tracker.table(id).unwrap_or("unknown")
                            )
                        }
                        _ => String::new(),
                    };
                    Error::internal(format!(
                        "cannot decode the replication message at {}{table}; the source stops rather than skip a \
                         change: report it with this message, and upgrade trusst-cdc or PostgreSQL if a newer version \
                         is known to fix it",
                        fmt_lsn(wal_start.0)
                    ))
                    .with_source(e)
                })?;
                let origin = self.current.unwrap_or(Origin {
                    lsn: wal_start.0,
                    commit_ts: 0,
                    xid: 0,
                });
                for effect in self.tracker.effects(msg) {
                    self.apply(effect, origin, out).await?;
                }
                if self.batch.touched.len() + self.batch.deleted.len()
                    >= self.cfg.source.batch_max_contacts
                {
                    // Mid-transaction flush: the rows are committed (pgoutput sends a transaction
                    // only after its commit), only the confirmation waits for the commit.
                    self.flush(repl).await?;
                }
            }
            ReplicationEvent::Commit {
                end_lsn,
                commit_time_micros,
                ..
            } => {
                crate::metrics::commit_read(&self.cfg.source.slot, commit_time_micros);
                self.current = None;
                // The commit's end is released once every event gathered before it is
                // acknowledged; with nothing outstanding, at once.
                self.ledger.commit(end_lsn.0);
                if let Some(since) = self.batch.since {
                    self.batch.committed = true;
                    // With nothing in flight there is nothing to batch behind: publish at once.
                    // Otherwise commits gather until the pipeline frees up (see the ack branch),
                    // the batch is full or it waited batch_max_wait; checked here too because
                    // under a steady stream the timer branch would never get its turn.
                    if self.inflight.is_empty()
                        || self.batch.touched.len() + self.batch.deleted.len()
                            >= self.cfg.source.batch_max_contacts
                        || since.elapsed() >= self.cfg.source.batch_max_wait
                    {
                        self.flush(repl).await?;
                    }
                }
            }
            ReplicationEvent::Message {
                lsn, transactional, ..
            } => {
                if !transactional {
                    self.ledger.reached(lsn.0);
                }
            }
            ReplicationEvent::KeepAlive { wal_end, .. } => {
                // Everything sent before this keepalive was handled: the server's position is
                // released once the work gathered before it is acknowledged.
                self.ledger.reached(wal_end.0);
            }
            ReplicationEvent::StoppedAt { .. } => {}
        }
        self.report(repl);
        Ok(())
    }

    fn touch(&mut self, contact_id: String, origin: Origin) {
        self.ledger.change();
        self.batch.since.get_or_insert_with(Instant::now);
        if origin.xid != 0 {
            self.batch.xids.insert(origin.xid);
        }
        self.batch.touched.insert(contact_id, origin);
    }

    async fn apply(&mut self, effect: Effect, origin: Origin, out: &EventOut) -> Result<()> {
        match effect {
            Effect::Touch(id) => self.touch(id, origin),
            Effect::Contact {
                contact_id,
                stage,
                was_completed,
            } => {
                match stage.as_deref() {
                    Some(s) if s != "COMPLETED" => {
                        if was_completed == Some(true) {
                            // Its answers are no longer final: the targets empty them.
                            self.batch.withdrawn.insert(contact_id.clone());
                        }
                        if self.not_completed.len() >= NOT_COMPLETED_CAP {
                            // Forgetting is safe (those contacts are re-read); memory stays bounded.
                            self.not_completed.clear();
                        }
                        self.not_completed.insert(contact_id.clone())
                    }
                    _ => self.not_completed.remove(&contact_id),
                };
                self.touch(contact_id, origin);
            }
            Effect::Inference {
                contact_id,
                question_id,
            } => {
                let relevant = match question_id.as_deref().and_then(|q| self.questions.get(q)) {
                    Some(q) => q.is_universal,
                    None => true, // unknown question: re-read, enrichment decides
                };
                if relevant {
                    self.batch.lost.insert(contact_id.clone());
                    self.touch(contact_id, origin);
                }
            }
            Effect::ContactDeleted(id) => {
                self.not_completed.remove(&id);
                self.batch.deleted.insert(id.clone());
                self.touch(id, origin);
            }
            Effect::Question {
                question_id,
                row,
                old,
            } => self.question_changed(question_id, row, old, origin),
            Effect::Truncated(tables) => {
                self.not_completed.clear();
                let lsn = fmt_lsn(origin.lsn);
                tracing::error!(
                    tables = tables.join(","), lsn = %lsn,
                    "TRUNCATE replicated: the affected contacts cannot be listed, so no delete events were published; \
                     reconcile the targets (e.g. re-run a backfill) if this was not intended"
                );
                out.control(serde_json::json!({
                    "type": "truncate", "tables": tables, "lsn": lsn, "txid": origin.xid,
                    "message": "TRUNCATE replicated; no per-contact delete events could be derived",
                }))
                .await?;
            }
            Effect::Unattributable { table, reason } => {
                let lsn = fmt_lsn(origin.lsn);
                tracing::error!(table, lsn = %lsn, "{reason}");
                out.control(serde_json::json!({
                    "type": "unattributable_change", "table": table, "lsn": lsn, "txid": origin.xid, "message": reason,
                }))
                .await?;
            }
        }
        Ok(())
    }

    fn question_changed(
        &mut self,
        question_id: String,
        row: Option<Box<QuestionRow>>,
        old: Option<Box<QuestionRow>>,
        origin: Origin,
    ) {
        let cached = self.questions.get(&question_id).cloned();
        // The WAL's old row (REPLICA IDENTITY FULL) is what this change replaced, even when it
        // is replayed after a restart and the cache already holds its outcome.
        let whole_old = old.is_some();
        let before = old
            .map(|o| Question::from_row(*o, cached.as_ref()))
            .or(cached);
        // An unchanged TOASTed column keeps the value before; a NULL replaces it.
        let after = row.map(|r| Question::from_row(*r, before.as_ref()));
        let universal = |q: &Option<Question>| q.as_ref().is_some_and(|q| q.is_universal);
        // An answer stored under a key that is no longer a universal question's must be
        // cleared from the targets. Without the old row, a replay only knows the key now.
        let universal_key = |q: &Option<Question>| {
            q.as_ref()
                .filter(|q| q.is_universal)
                .and_then(|q| q.key.clone())
        };
        let retired = match (universal_key(&before), universal_key(&after)) {
            (Some(old), new) if new.as_ref() != Some(&old) => Some(old),
            (None, None) if !whole_old && origin.lsn <= self.questions_loaded_at => {
                after.as_ref().and_then(|q| q.key.clone())
            }
            _ => None,
        };
        if let Some(key) = retired {
            Arc::make_mut(&mut self.retired).insert(key);
        }
        self.universal_keys = None;
        // A replayed change (one the cache, loaded later, already reflects) cannot be judged:
        // the cache holds its outcome, not what came before (a question that stopped being
        // universal looks as if it never was). Replays re-emit, so nothing stays stale.
        let replay = origin.lsn <= self.questions_loaded_at;
        let reemit = replay || ((universal(&before) || universal(&after)) && before != after);
        match &after {
            Some(q) => {
                self.questions.insert(question_id.clone(), q.clone());
            }
            None => {
                self.questions.remove(&question_id);
            }
        }
        if !reemit {
            return;
        }
        if let Some(job) = self
            .jobs
            .iter_mut()
            .find(|j| j.question_id == question_id && j.after.is_empty())
        {
            // A job that has not started covers this change too; its re-read must wait for
            // this newer transaction.
            job.origin = origin;
            return;
        }
        tracing::info!(
            question_id,
            "universal question changed: re-emitting its completed contacts"
        );
        let hold = self.ledger.hold();
        self.jobs.push_back(ReemitJob {
            question_id,
            after: String::new(),
            hold,
            origin,
        });
    }

    /// One chunk of the oldest re-emit job, between stream batches so the stream never stalls.
    async fn reemit_step(&mut self, client: &Client, repl: &ReplicationClient) -> Result<()> {
        self.last_reemit = Instant::now();
        let Some(job) = self.jobs.front() else {
            return Ok(());
        };
        let chunk = self.cfg.source.reemit_chunk;
        let ids =
            enrich::contacts_for_question(client, &self.plan, &job.question_id, &job.after, chunk)
                .await?;
        let last = ids.last().cloned();
        let full = ids.len() == chunk;
        let origin = job.origin;
        let mut job = Job::at(ids, origin, "question");
        // They all had an answer to the question; it may have been their only universal one.
        job.lost = job.ids.iter().cloned().collect();
        job.universal = Some(self.universal_keys());
        job.retired = self.retired.clone();
        // Through the pipeline, behind the batches already in it, so per-contact order holds.
        let ticket = self.ledger.submit_extra();
        self.submit(job, ticket).await?;
        self.drain_inflight(repl).await?;
        let job = self.jobs.front_mut().expect("job present");
        match last {
            Some(last) if full => job.after = last,
            _ => {
                tracing::info!(question_id = %job.question_id, "re-emit done");
                let hold = job.hold;
                self.jobs.pop_front();
                self.ledger.release(hold);
                self.report(repl);
            }
        }
        Ok(())
    }

    /// The keys of the universal questions as of the stream's position.
    fn universal_keys(&mut self) -> Arc<[String]> {
        self.universal_keys
            .get_or_insert_with(|| {
                let mut keys: Vec<String> = self
                    .questions
                    .values()
                    .filter(|q| q.is_universal)
                    .filter_map(|q| q.key.clone())
                    .collect();
                keys.sort();
                keys.dedup();
                keys.into()
            })
            .clone()
    }

    /// Hand a job to the pipeline under the ledger's `ticket`.
    async fn submit(&mut self, job: Job, ticket: Ticket) -> Result<()> {
        let publisher = self
            .publisher
            .as_ref()
            .ok_or_else(|| Error::internal("publishing before the stream started"))?;
        let done = publisher.submit(job).await?;
        self.inflight.push_back((ticket, done));
        Ok(())
    }

    /// Hand the batch to the pipeline; its last commit is confirmed once Kafka acknowledged it.
    async fn flush(&mut self, repl: &ReplicationClient) -> Result<()> {
        let mut batch = std::mem::take(&mut self.batch);
        let Some(since) = batch.since else {
            return Ok(());
        };
        crate::metrics::source_stage("gather", since.elapsed());
        // A deleted contact is always re-read: absent, it gets its delete event even when it
        // was re-inserted in the same batch at an earlier stage. So is one that left COMPLETED.
        let ids: Vec<String> = batch
            .touched
            .keys()
            .filter(|id| {
                !self.not_completed.contains(*id)
                    || batch.deleted.contains(*id)
                    || batch.withdrawn.contains(*id)
            })
            .cloned()
            .collect();
        let xids: Vec<u32> = batch.xids.iter().copied().collect();
        if ids.is_empty() {
            // Nothing can be published: the positions the batch held back are free.
            self.ledger.discard_open();
            self.report(repl);
            return Ok(());
        }
        let chunks: Vec<Vec<String>> = ids
            .chunks(self.cfg.source.batch_max_contacts)
            .map(<[String]>::to_vec)
            .collect();
        let last = chunks.len() - 1;
        let universal = self.universal_keys();
        for (i, ids) in chunks.into_iter().enumerate() {
            let origins = ids
                .iter()
                .filter_map(|id| batch.touched.remove_entry(id))
                .collect();
            let deleted = ids.iter().filter_map(|id| batch.deleted.take(id)).collect();
            let lost = ids.iter().filter_map(|id| batch.lost.take(id)).collect();
            let withdrawn = ids
                .iter()
                .filter_map(|id| batch.withdrawn.take(id))
                .collect();
            // Only the last chunk carries the positions: confirmation waits for all of them.
            let ticket = if i == last {
                self.ledger.submit()
            } else {
                self.ledger.submit_extra()
            };
            self.submit(
                Job {
                    ids,
                    origins,
                    deleted,
                    origin: None,
                    reason: "stream",
                    xids: xids.clone(),
                    universal: Some(universal.clone()),
                    retired: self.retired.clone(),
                    lost,
                    withdrawn,
                },
                ticket,
            )
            .await?;
        }
        tracing::debug!(contacts = ids.len(), "batch handed to the publisher");
        self.ack_ready(repl)?;
        while self.inflight.len() > MAX_INFLIGHT {
            self.ack_front(repl).await?;
        }
        Ok(())
    }

    /// Take the acknowledgements that already arrived, oldest first, without waiting.
    fn ack_ready(&mut self, repl: &ReplicationClient) -> Result<()> {
        while let Some((_, done)) = self.inflight.front_mut() {
            let res = match done.try_recv() {
                Ok(res) => Ok(res),
                Err(oneshot::error::TryRecvError::Empty) => return Ok(()),
                Err(oneshot::error::TryRecvError::Closed) => Err(()),
            };
            let (ticket, _) = self.inflight.pop_front().expect("front exists");
            self.acked(res, ticket, repl)?;
        }
        Ok(())
    }

    /// Wait for the oldest work in flight to be acknowledged.
    async fn ack_front(&mut self, repl: &ReplicationClient) -> Result<()> {
        let Some((ticket, done)) = self.inflight.pop_front() else {
            return Ok(());
        };
        let res = done.await.map_err(|_| ());
        self.acked(res, ticket, repl)
    }

    /// Record an acknowledgement (or fail the session on a failed delivery: nothing after the
    /// last acknowledged work is confirmed, so the reconnect replays it).
    fn acked(
        &mut self,
        res: std::result::Result<Result<usize>, ()>,
        ticket: Ticket,
        repl: &ReplicationClient,
    ) -> Result<()> {
        let n = res.map_err(|()| publisher::dropped())??;
        self.published += n as u64;
        self.ledger.acked(ticket);
        self.report(repl);
        Ok(())
    }

    /// Wait until every produced batch is acknowledged and confirmed.
    async fn drain_inflight(&mut self, repl: &ReplicationClient) -> Result<()> {
        while !self.inflight.is_empty() {
            self.ack_front(repl).await?;
        }
        Ok(())
    }

    /// Hand the ledger's confirmed position to the replication client when it moved.
    fn report(&mut self, repl: &ReplicationClient) {
        let lsn = self.ledger.confirmed();
        if lsn > self.reported {
            self.reported = lsn;
            repl.update_applied_lsn(Lsn(lsn));
        }
    }

    async fn advance_released_slot(&self, client: &Client) {
        let lsn = fmt_lsn(self.ledger.confirmed());
        for _ in 0..50 {
            match client
                .execute(
                    "SELECT pg_replication_slot_advance($1, $2::text::pg_lsn)",
                    &[&self.cfg.source.slot, &lsn],
                )
                .await
            {
                Ok(_) => {
                    tracing::info!(slot = %self.cfg.source.slot, confirmed = %lsn, published = self.published, "stopped cleanly");
                    return;
                }
                // The walsender may still hold the slot for a moment after CopyDone.
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        tracing::warn!(slot = %self.cfg.source.slot, lsn = %lsn, "could not record the final position; the next start replays from the last reported one");
    }
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}
