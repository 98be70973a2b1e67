//! Shared harness for the integration tests: a fresh database per test on the real PostgreSQL
//! cluster, the real Kafka broker, the `trusst-cdc` binary as a child process, and readers for
//! what reached the topic. Start the services with `scripts/services.sh up` (the test script
//! does it); a missing service fails the test rather than skipping it.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::Message;
use rdkafka::consumer::{BaseConsumer, Consumer};
use tokio_postgres::Client;
use trusst_cdc::event::ContactEvent;

/// `DATABASE_URL` of the test cluster (any database; tests create their own).
pub fn base_url() -> String {
    std::env::var("DATABASE_URL").expect(
        "DATABASE_URL is not set: run `scripts/services.sh up && eval \"$(scripts/services.sh env)\"` or scripts/test.sh",
    )
}

/// `KAFKA_BROKERS` of the test broker.
pub fn brokers() -> String {
    std::env::var("KAFKA_BROKERS").expect("KAFKA_BROKERS is not set: run scripts/test.sh")
}

/// A short unique suffix for database, slot and topic names.
pub fn unique(prefix: &str) -> String {
    let n: u64 = rand::random();
    format!("{prefix}_{:x}", n & 0xffff_ffff)
}

/// Replace the database name in a URL.
pub fn with_db(url: &str, db: &str) -> String {
    let (head, tail) = url.rsplit_once('/').expect("URL has a database");
    let query = tail
        .split_once('?')
        .map(|(_, q)| format!("?{q}"))
        .unwrap_or_default();
    format!("{head}/{db}{query}")
}

/// A database of its own, with the Trusst schema and the generator's questions.
pub struct TestDb {
    /// Its name.
    pub name: String,
    /// Its URL.
    pub url: String,
}

impl TestDb {
    /// Create and load the schema. The name starts with `test_` so scripts/test.sh can drop
    /// what earlier runs left behind.
    pub async fn new(prefix: &str) -> Self {
        Self::new_on(&base_url(), prefix).await
    }

    /// The same on the cluster at `base` (another cluster than `DATABASE_URL`'s).
    pub async fn new_on(base: &str, prefix: &str) -> Self {
        let name = unique(&format!("test_{prefix}"));
        let admin = trusst_cdc::pg::connect(base)
            .await
            .expect("connect to the test cluster");
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create database");
        let url = with_db(base, &name);
        let c = trusst_cdc::pg::connect(&url).await.unwrap();
        trusst_cdc::generate::init_schema(&c).await.unwrap();
        trusst_cdc::generate::ensure_questions(&c).await.unwrap();
        Self { name, url }
    }

    /// A client on this database.
    pub async fn client(&self) -> Client {
        trusst_cdc::pg::connect(&self.url).await.unwrap()
    }

    /// The seed's basic query (COMPLETED, universal), grouped per contact: contact fields and
    /// `question_key -> result`.
    pub async fn expected(&self) -> BTreeMap<String, Expected> {
        self.expected_between(None).await
    }

    /// The seed's time-range query (`s3c.call_time >= start AND < end`) when a range is given,
    /// else its basic query; grouped per contact as [`TestDb::expected`].
    pub async fn expected_between(
        &self,
        range: Option<(chrono::NaiveDateTime, chrono::NaiveDateTime)>,
    ) -> BTreeMap<String, Expected> {
        let c = self.client().await;
        let (from, to) = range.unwrap_or_default();
        // Written for any of the schemas customers have: ids and values as text, times as
        // microseconds since the epoch in UTC (a `timestamp` counts as UTC, a `date` as its
        // midnight), the flag and the stage compared as text.
        let rows = c
            .query(
                "SELECT c.contact_id::text, c.external_id::text, \
                        (CASE WHEN isfinite(s3c.call_time) THEN extract(epoch from s3c.call_time) * 1000000 END)::bigint, \
                        (CASE WHEN isfinite(c.start_time) THEN extract(epoch from c.start_time) * 1000000 END)::bigint, \
                        c.direction::text, \
                        c.agent_id::text AS contact_agent_id, s3c.agent_id::text AS s3_agent_id, s3c.conn_id::text, \
                        q.question_id::text, q.key::text AS question_key, q.text::text AS question_text, \
                        q.result_type::text, q.group::text AS question_group, i.result::text \
                 FROM contacts c \
                 INNER JOIN inferences i ON c.contact_id = i.contact_id \
                 INNER JOIN questions q ON i.question_id = q.question_id \
                 LEFT JOIN s3_conversations s3c ON c.contact_id = s3c.contact_id \
                 WHERE (lower(q.is_universal::text) IN ('true', 't', 'yes', 'y') \
                        OR (q.is_universal::text ~ '^[+-]?[0-9]+$' AND q.is_universal::text::numeric <> 0)) \
                   AND c.current_stage::text = 'COMPLETED' \
                   AND (NOT $3 OR (s3c.call_time >= $1::text::timestamp AND s3c.call_time < $2::text::timestamp)) \
                 ORDER BY s3c.call_time DESC, c.contact_id, q.key",
                &[&from.to_string(), &to.to_string(), &range.is_some()],
            )
            .await
            .unwrap();
        let mut out: BTreeMap<String, Expected> = BTreeMap::new();
        let ts = |v: Option<i64>| v.map(instant_micros);
        for r in rows {
            let e = out.entry(r.get(0)).or_insert_with(|| Expected {
                external_id: r.get(1),
                call_date: ts(r.get(2)),
                call_start_time: ts(r.get(3)),
                direction: r.get(4),
                contact_agent_id: r.get(5),
                s3_agent_id: r.get(6),
                conn_id: r.get(7),
                results: BTreeMap::new(),
            });
            e.results
                .insert(r.get::<_, String>(9), (r.get(11), r.get(13)));
        }
        out
    }

    /// The slot's confirmed position (as a number), if the slot exists.
    pub async fn confirmed_lsn(&self, slot: &str) -> Option<u64> {
        let c = self.client().await;
        let r = c
            .query_opt(
                "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .unwrap()?;
        let s: Option<String> = r.get(0);
        s.map(|s| trusst_cdc::source::setup::parse_lsn(&s).unwrap())
    }

    /// Drop the slot (best effort) so the cluster does not keep WAL for it.
    pub async fn drop_slot(&self, slot: &str) {
        let c = self.client().await;
        for _ in 0..50 {
            if c.execute("SELECT pg_drop_replication_slot($1)", &[&slot])
                .await
                .is_ok()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Write `n` generated contacts through to COMPLETED; their ids.
pub async fn completed(db: &TestDb, seed: u64, n: usize) -> Vec<String> {
    use trusst_cdc::generate::{Generator, Options, write_contacts};
    let mut c = db.client().await;
    let mut g = Generator::new(seed, Options::default());
    let contacts: Vec<_> = (0..n).map(|_| g.contact()).collect();
    write_contacts(&mut c, &contacts).await.unwrap();
    contacts.into_iter().map(|c| c.contact_id).collect()
}

/// An instant as RFC 3339 in UTC with microseconds: the one form both sides of a comparison
/// are brought to, whatever the column's type.
pub fn instant_micros(micros: i64) -> String {
    chrono::DateTime::from_timestamp_micros(micros)
        .expect("time in range")
        .to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

/// An event's time field brought to [`instant_micros`]'s form.
pub fn event_instant(t: &str) -> String {
    let at = trusst_cdc::sink::mapping::event_time(t)
        .unwrap_or_else(|| panic!("event time {t:?} is not a time the sinks read"));
    instant_micros(at.timestamp_micros())
}

/// What the seed's query says about one contact (times as [`instant_micros`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expected {
    pub external_id: Option<String>,
    pub call_date: Option<String>,
    pub call_start_time: Option<String>,
    pub direction: Option<String>,
    pub contact_agent_id: Option<String>,
    pub s3_agent_id: Option<String>,
    pub conn_id: Option<String>,
    /// question_key -> (result_type, result)
    pub results: BTreeMap<String, (String, Option<String>)>,
}

impl Expected {
    /// The same view of an event.
    pub fn of(e: &ContactEvent) -> Self {
        Self {
            external_id: e.external_id.clone(),
            call_date: e.call_date.as_deref().map(event_instant),
            call_start_time: e.call_start_time.as_deref().map(event_instant),
            direction: e.direction.clone(),
            contact_agent_id: e.contact_agent_id.clone(),
            s3_agent_id: e.s3_agent_id.clone(),
            conn_id: e.conn_id.clone(),
            results: e
                .universal_questions
                .iter()
                .map(|q| {
                    (
                        q.question_key.clone(),
                        (q.result_type.clone(), q.result.clone()),
                    )
                })
                .collect(),
        }
    }
}

/// A running `trusst-cdc source` child process.
pub struct SourceProc {
    pub child: Child,
    pub opts: SourceOpts,
    /// The database it streams from (to drop the slot when the test ends).
    pub db_url: String,
    pub slot: String,
    pub topic: String,
    pub dir: tempfile::TempDir,
    pub log: PathBuf,
}

/// Settings for [`SourceProc::start`].
#[derive(Clone)]
pub struct SourceOpts {
    pub heartbeat: &'static str,
    pub snapshot: &'static str,
    pub batch_max_contacts: usize,
    pub reemit_chunk: usize,
    /// Lines for `[database]`; when set, `DATABASE_URL` is not passed (nor inherited).
    pub database: Option<String>,
    /// Bootstrap servers instead of `KAFKA_BROKERS`.
    pub brokers: Option<String>,
    /// `[kafka.properties]` entries.
    pub kafka_properties: Vec<(String, String)>,
    /// Extra environment of the process.
    pub env: Vec<(String, String)>,
    /// `TRUSST_LOG`.
    pub log_filter: &'static str,
    /// `[kafka] format`: `json` or `avro` (the registry comes from `SCHEMA_REGISTRY_URL`).
    pub format: &'static str,
    /// More `[kafka]` lines (TOML), e.g. `replication_factor = 3`.
    pub kafka_extra: String,
    /// More `[source]` lines, e.g. `customer = "acme"` or `takeover_after = "6s"`.
    pub source_lines: String,
}

impl Default for SourceOpts {
    fn default() -> Self {
        Self {
            heartbeat: "1s",
            snapshot: "initial",
            batch_max_contacts: 1000,
            reemit_chunk: 7,
            database: None,
            brokers: None,
            kafka_properties: Vec::new(),
            env: Vec::new(),
            log_filter: "info,trusst_cdc=debug",
            format: "json",
            kafka_extra: String::new(),
            source_lines: String::new(),
        }
    }
}

impl SourceOpts {
    /// The `trusst-cdc <command> --config <config>` process for these settings, with `db_url`
    /// as `DATABASE_URL` unless `[database]` lines are given.
    pub fn command(&self, command: &str, config: &std::path::Path, db_url: &str) -> Command {
        let mut cmd = Command::new(bin());
        cmd.args([command, "--config"]).arg(config);
        if self.database.is_some() {
            cmd.env_remove("DATABASE_URL");
        } else {
            cmd.env("DATABASE_URL", db_url);
        }
        cmd.env(
            "KAFKA_BROKERS",
            self.brokers.clone().unwrap_or_else(brokers),
        )
        .env("TRUSST_LOG", self.log_filter)
        // Tests run side by side: each process takes a free port for its metrics endpoint.
        .env("TRUSST_METRICS_LISTEN", "127.0.0.1:0");
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd
    }

    /// The `[database]` and `[kafka.properties]` lines of the config file.
    fn sections(&self) -> String {
        let mut out = String::new();
        if let Some(db) = &self.database {
            out.push_str(&format!("[database]\n{db}\n"));
        }
        if !self.kafka_properties.is_empty() {
            out.push_str("[kafka.properties]\n");
            for (k, v) in &self.kafka_properties {
                out.push_str(&format!("{k:?} = {v:?}\n"));
            }
        }
        out
    }
}

/// When the test is failing, print the warnings, errors and last lines of a process's log so
/// the failure report says what the process did (the log's folder is deleted with the test).
pub fn log_on_panic(what: &str, log: &std::path::Path) {
    if !std::thread::panicking() {
        return;
    }
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let notable: Vec<&str> = lines
        .iter()
        .copied()
        .filter(|l| l.contains("WARN") || l.contains("ERROR"))
        .take(40)
        .collect();
    let tail = &lines[lines.len().saturating_sub(40)..];
    eprintln!(
        "---- {what} log {}: {} warnings/errors (first 40) ----\n{}\n---- {what} log: last {} lines ----\n{}",
        log.display(),
        notable.len(),
        notable.join("\n"),
        tail.len(),
        tail.join("\n")
    );
}

/// Path of the binary under test.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_trusst-cdc")
}

impl SourceProc {
    /// Start a source for `db` with its own slot, publication and topic.
    pub fn start(db: &TestDb, opts: SourceOpts) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let slot = unique("slot");
        let topic = unique("contacts").replace('_', "-");
        Self::start_with(db, slot, topic, dir, opts)
    }

    /// Start (or restart) with the given names and state folder.
    pub fn start_with(
        db: &TestDb,
        slot: String,
        topic: String,
        dir: tempfile::TempDir,
        opts: SourceOpts,
    ) -> Self {
        let config = dir.path().join("source.toml");
        std::fs::write(
            &config,
            format!(
                "[kafka]\ntopic = \"{topic}\"\npartitions = 3\nformat = \"{}\"\n{}\n[source]\nslot = \"{slot}\"\npublication = \"{slot}\"\n\
                 snapshot = \"{}\"\nheartbeat_interval = \"{}\"\nbatch_max_contacts = {}\nreemit_chunk = {}\nstate_dir = \"{}\"\n{}\n{}",
                opts.format,
                opts.kafka_extra,
                opts.snapshot,
                opts.heartbeat,
                opts.batch_max_contacts,
                opts.reemit_chunk,
                dir.path().join("state").display(),
                opts.source_lines,
                opts.sections()
            ),
        )
        .unwrap();
        let log = dir
            .path()
            .join(format!("source-{}.log", rand::random::<u32>()));
        let child = opts
            .command("source", &config, &db.url)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start trusst-cdc source");
        Self {
            child,
            opts,
            db_url: db.url.clone(),
            slot,
            topic,
            dir,
            log,
        }
    }

    /// Start the process again with the same config and state, and extra arguments.
    pub fn respawn_with(&mut self, db: &TestDb, args: &[&str]) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.log = self
            .dir
            .path()
            .join(format!("source-{}.log", rand::random::<u32>()));
        self.child = self
            .opts
            .command("source", &self.dir.path().join("source.toml"), &db.url)
            .args(args)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&self.log).unwrap())
            .spawn()
            .expect("restart trusst-cdc source");
    }

    /// Run `trusst-cdc <command>` once with this source's config; its exit status and output.
    pub fn run_once(&self, db: &TestDb, command: &str) -> (std::process::ExitStatus, String) {
        let out = self
            .opts
            .command(command, &self.dir.path().join("source.toml"), &db.url)
            .output()
            .expect("run trusst-cdc");
        (
            out.status,
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }

    /// Wait for the process to exit (at most `timeout`); its status.
    pub fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "the source did not exit within {timeout:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Start the process again with the same config and state (after a kill).
    pub fn respawn(&mut self, db: &TestDb) {
        self.respawn_with(db, &[]);
    }

    /// Wait until the slot exists and the stream runs (changes from now on are captured).
    pub fn wait_streaming(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !self.log().contains("streaming changes") {
            self.assert_running();
            assert!(
                Instant::now() < deadline,
                "source did not start streaming:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The process's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `http://host:port` of the process's metrics endpoint, once it logged it.
    pub fn metrics_url(&mut self) -> String {
        metrics::wait_endpoint("source", || {
            self.assert_running();
            self.log()
        })
    }

    /// `kill -9`.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then wait for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "source did not stop within 30 s of SIGTERM:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Fail the test with the log if the process exited.
    pub fn assert_running(&mut self) {
        if let Some(s) = self.child.try_wait().unwrap() {
            panic!("source exited with {s}:\n{}", self.log());
        }
    }
}

impl Drop for SourceProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        log_on_panic("source", &self.log);
        // A slot left behind holds WAL and a slot of the cluster's limit; drop it even when the
        // test failed (a background thread: Drop may run inside the async test's runtime).
        let (url, slot) = (self.db_url.clone(), self.slot.clone());
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                if let Ok(c) = trusst_cdc::pg::connect(&url).await {
                    for _ in 0..30 {
                        if c.execute("SELECT pg_drop_replication_slot($1)", &[&slot])
                            .await
                            .is_ok()
                        {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            });
        })
        .join();
    }
}

/// One record read from a topic.
#[derive(Debug, Clone)]
pub struct Record {
    pub key: String,
    /// `None` for a tombstone.
    pub value: Option<Vec<u8>>,
    pub partition: i32,
    pub offset: i64,
    /// The `trusst-customer` header, when the record has one.
    pub customer: Option<String>,
}

impl Record {
    /// The event, when the record is not a tombstone.
    pub fn event(&self) -> Option<ContactEvent> {
        self.value
            .as_deref()
            .map(|v| ContactEvent::from_json(v).expect("event JSON"))
    }
}

/// Reads a topic from the beginning, accumulating every record.
///
/// It assigns the partitions itself instead of joining a consumer group: what it sees then
/// depends only on what is in the topic, not on a group coordinator, which a broker restart
/// sends through a reload and a rebalance.
pub struct TopicReader {
    consumer: BaseConsumer,
    topic: String,
    /// Partitions assigned so far (0 until the topic exists).
    assigned: i32,
    next_metadata: Instant,
    pub records: Vec<Record>,
}

impl TopicReader {
    /// Read `topic` on `KAFKA_BROKERS` from its earliest offsets.
    pub fn new(topic: &str) -> Self {
        Self::on(&brokers(), topic)
    }

    /// The same on another broker than `KAFKA_BROKERS`.
    pub fn on(brokers: &str, topic: &str) -> Self {
        let consumer: BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", brokers)
            // librdkafka assigns only with a group id; the group is never joined.
            .set("group.id", unique("reader"))
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .create()
            .unwrap();
        Self {
            consumer,
            topic: topic.to_string(),
            assigned: 0,
            next_metadata: Instant::now(),
            records: Vec::new(),
        }
    }

    /// Assign, from the beginning, every partition the topic has and the reader has not yet
    /// (the topic may not exist yet, or gain partitions).
    fn assign_new_partitions(&mut self) {
        if Instant::now() < self.next_metadata {
            return;
        }
        self.next_metadata = Instant::now() + Duration::from_millis(500);
        let Ok(md) = self
            .consumer
            .fetch_metadata(Some(&self.topic), Duration::from_secs(2))
        else {
            return;
        };
        let Some(t) = md.topics().iter().find(|t| t.name() == self.topic) else {
            return;
        };
        let n = t.partitions().len() as i32;
        if t.error().is_some() || n <= self.assigned {
            return;
        }
        // Without a group there is no incremental assignment: assign them all again, those
        // already read from after their last record read.
        let mut tpl = rdkafka::TopicPartitionList::new();
        for p in 0..n {
            let next = self
                .records
                .iter()
                .filter(|r| r.partition == p)
                .map(|r| r.offset + 1)
                .max();
            let at = next.map_or(rdkafka::Offset::Beginning, rdkafka::Offset::Offset);
            tpl.add_partition_offset(&self.topic, p, at).unwrap();
        }
        self.consumer.assign(&tpl).unwrap();
        self.assigned = n;
    }

    /// Per partition, the records read against the topic's high watermark: tells a record
    /// that never reached Kafka from one the reader has not read yet.
    fn progress(&self) -> String {
        (0..self.assigned)
            .map(|p| {
                let read = self.records.iter().filter(|r| r.partition == p).count();
                match self
                    .consumer
                    .fetch_watermarks(&self.topic, p, Duration::from_secs(5))
                {
                    Ok((low, high)) => format!("partition {p}: read {read}, offsets {low}..{high}"),
                    Err(e) => format!("partition {p}: read {read}, watermarks unknown ({e})"),
                }
            })
            .collect::<Vec<_>>()
            .join("; ")
    }

    fn poll_for(&mut self, d: Duration) {
        let end = Instant::now() + d;
        while Instant::now() < end {
            self.assign_new_partitions();
            // An error (e.g. the broker is away) or nothing: keep polling.
            if let Some(Ok(m)) = self.consumer.poll(Duration::from_millis(100)) {
                self.records.push(Record {
                    key: m
                        .key()
                        .map(|k| String::from_utf8_lossy(k).into_owned())
                        .unwrap_or_default(),
                    value: m.payload().map(<[u8]>::to_vec),
                    partition: m.partition(),
                    offset: m.offset(),
                    customer: m.headers().and_then(|h| {
                        use rdkafka::message::Headers;
                        h.iter()
                            .find(|h| h.key == trusst_cdc::kafka::CUSTOMER_HEADER)
                            .and_then(|h| h.value)
                            .map(|v| String::from_utf8_lossy(v).into_owned())
                    }),
                });
            }
        }
    }

    /// Poll until records for `n` distinct contacts have arrived.
    pub fn until_contacts(&mut self, timeout: Duration, n: usize) {
        self.until(timeout, &format!("{n} contacts"), |recs| {
            recs.iter()
                .map(|r| &r.key)
                .collect::<std::collections::BTreeSet<_>>()
                .len()
                == n
        });
    }

    /// Poll until `done(records)` holds; panic with what was seen after `timeout`.
    pub fn until(
        &mut self,
        timeout: Duration,
        what: &str,
        mut done: impl FnMut(&[Record]) -> bool,
    ) {
        let end = Instant::now() + timeout;
        loop {
            if done(&self.records) {
                return;
            }
            if Instant::now() > end {
                let keys: Vec<String> = self
                    .records
                    .iter()
                    .map(|r| format!("{}@{}:{}", r.key, r.partition, r.offset))
                    .collect();
                panic!(
                    "timed out after {timeout:?} waiting for {what}; {} records seen: {keys:?}; {}",
                    self.records.len(),
                    self.progress()
                );
            }
            self.poll_for(Duration::from_millis(200));
        }
    }

    /// Keep reading for `d` (to see that nothing more arrives).
    pub fn settle(&mut self, d: Duration) {
        self.poll_for(d);
    }

    /// The newest event per contact (tombstones remove the contact).
    pub fn latest(&self) -> BTreeMap<String, ContactEvent> {
        let mut out = BTreeMap::new();
        for r in &self.records {
            match r.event() {
                Some(e) => {
                    out.insert(r.key.clone(), e);
                }
                None => {
                    out.remove(&r.key);
                }
            }
        }
        out
    }

    /// Every event (not tombstones) for one contact, in topic order.
    pub fn events_for(&self, contact: &str) -> Vec<ContactEvent> {
        self.records
            .iter()
            .filter(|r| r.key == contact)
            .filter_map(Record::event)
            .collect()
    }
}

/// The latest upsert events equal the seed's query, contact by contact.
pub fn assert_matches_seed(
    latest: &BTreeMap<String, ContactEvent>,
    expected: &BTreeMap<String, Expected>,
) {
    let got: BTreeMap<String, Expected> = latest
        .iter()
        // An upsert without answers says a contact lost them all: the seed query has no row.
        .filter(|(_, e)| e.op == trusst_cdc::event::Op::Upsert && !e.universal_questions.is_empty())
        .map(|(k, e)| (k.clone(), Expected::of(e)))
        .collect();
    let missing: Vec<&String> = expected.keys().filter(|k| !got.contains_key(*k)).collect();
    let extra: Vec<&String> = got.keys().filter(|k| !expected.contains_key(*k)).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "missing from topic: {missing:?}; not in the seed query: {extra:?}"
    );
    for (k, e) in expected {
        assert_eq!(&got[k], e, "contact {k} differs from the seed query");
    }
}

pub mod crm;
pub mod load;
pub mod metrics;

/// Run `trusst-cdc backfill ARGS` on the database at `url` into `topic`, in pages of
/// `batch_max_contacts`; its output, whether it succeeded or not.
pub fn run_backfill(
    url: &str,
    topic: &str,
    batch_max_contacts: usize,
    args: &[&str],
) -> std::process::Output {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("source.toml");
    std::fs::write(
        &config,
        format!(
            "[kafka]\ntopic = \"{topic}\"\n[source]\nbatch_max_contacts = {batch_max_contacts}\n"
        ),
    )
    .unwrap();
    std::process::Command::new(bin())
        .args(["backfill", "--config"])
        .arg(&config)
        .args(args)
        .env("DATABASE_URL", url)
        .env("KAFKA_BROKERS", brokers())
        .output()
        .expect("run trusst-cdc backfill")
}

/// Start (if it is not running) a cluster of PostgreSQL `major` from the npm builds through
/// `scripts/services.sh`, as instance `instance` on `port`; its base URL. `primary_port` makes it
/// a streaming standby of the cluster on that port.
pub fn cluster(major: u32, instance: &str, port: u16, primary_port: Option<u16>) -> String {
    cluster_with(major, instance, port, primary_port, "")
}

/// [`cluster`] with more settings (`PG_EXTRA_CONF`: `k = v; k2 = v2`), after the script's own.
pub fn cluster_with(
    major: u32,
    instance: &str,
    port: u16,
    primary_port: Option<u16>,
    extra_conf: &str,
) -> String {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/services.sh");
    let mut cmd = std::process::Command::new(script);
    cmd.arg(if primary_port.is_some() {
        "start-standby"
    } else {
        "start-pg"
    })
    .env("PG_VERSION", major.to_string())
    .env("PG_INSTANCE", instance)
    .env("PGPORT", port.to_string())
    .env("PG_EXTRA_CONF", extra_conf);
    if let Some(p) = primary_port {
        cmd.env("PG_PRIMARY_PORT", p.to_string());
    }
    let out = cmd.output().expect("run scripts/services.sh");
    assert!(
        out.status.success(),
        "services.sh for PostgreSQL {major} ({instance}) failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    format!("postgres://postgres:postgres@127.0.0.1:{port}/trusst")
}

/// Run `scripts/services.sh <what>` for an instance (stop-pg, promote-pg, ...).
pub fn services(what: &str, instance: &str, port: u16) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/services.sh");
    let out = std::process::Command::new(script)
        .arg(what)
        .env("PG_INSTANCE", instance)
        .env("PGPORT", port.to_string())
        .output()
        .expect("run scripts/services.sh");
    assert!(
        out.status.success(),
        "services.sh {what} ({instance}) failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
