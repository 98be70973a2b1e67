//! Configuration files (TOML) and their command-line / environment overrides.
//!
//! Unknown keys are rejected so a typo never silently falls back to a default.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, de::DeserializeOwned};

use crate::error::{Error, Result};
use crate::event::{Format, Registry, registry::Auth};
use crate::pg::SslMode;
use crate::secrets::SecretRef;
use crate::sink::http::Secret;

/// Read and parse a TOML file into `T`, with errors that name the file, the line and the fix.
pub fn load<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        Error::user(format!(
            "cannot read config file {}: {e}; pass an existing file with --config",
            path.display()
        ))
    })?;
    parse(&text)
        .map_err(|msg| Error::user(format!("invalid config file {}: {msg}", path.display())))
}

/// Parse TOML text into `T`; the error is toml's message (line, column, unknown key).
pub fn parse<T: DeserializeOwned>(text: &str) -> std::result::Result<T, String> {
    toml::from_str(text).map_err(|e| e.to_string().trim_end().replace('\n', " | "))
}

/// Durations in config files: humantime text (`"10s"`, `"250ms"`, `"5m"`) that must be longer
/// than zero and at most a year. Zero would make a timer spin or panic, and a century would
/// overflow the clock; either is a typo, reported with the key's line instead of at run time.
pub mod duration {
    use std::time::Duration;

    use serde::{Deserializer, de::Error};

    /// The longest duration accepted.
    pub const MAX: Duration = Duration::from_secs(365 * 24 * 3600);

    /// Deserialize with the checks above (use as `deserialize_with`).
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let v: Duration = humantime_serde::deserialize(d)?;
        check(v).map_err(D::Error::custom)
    }

    /// The same for an optional key (absent stays `None`).
    pub fn deserialize_opt<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        deserialize(d).map(Some)
    }

    /// The same checks on a value that did not come from a file.
    pub fn check(v: Duration) -> Result<Duration, String> {
        if v.is_zero() {
            Err("a duration must be longer than zero, e.g. \"10s\" or \"250ms\"".into())
        } else if v > MAX {
            Err(format!(
                "a duration of {} is longer than a year; use e.g. \"10s\" or \"5m\"",
                humantime::format_duration(v)
            ))
        } else {
            Ok(v)
        }
    }
}

/// `[database]`: the Trusst PostgreSQL database, by URL or by AWS Secrets Manager secret.
#[derive(Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct DatabaseConfig {
    /// libpq-style URL, e.g. `postgres://user:pass@host:5432/trusst`; `DATABASE_URL` overrides.
    #[serde(default)]
    pub url: Option<String>,
    /// The secret holding the credentials (instead of `url`).
    #[serde(default)]
    pub secret: Option<SecretRef>,
    /// TLS mode; a `sslmode` in the URL wins. Default: `require` with a secret, else `prefer`.
    #[serde(default)]
    pub sslmode: Option<SslMode>,
    /// PEM file of the CA the server's certificate must chain to; a `sslrootcert` in the URL wins.
    #[serde(default)]
    pub sslrootcert: Option<PathBuf>,
    /// The primary, when `url` names a read replica (PostgreSQL 16+): the heartbeat, the
    /// publication and a new slot's first snapshot need a server that can write.
    /// `PRIMARY_DATABASE_URL` overrides.
    #[serde(default)]
    pub primary_url: Option<String>,
}

impl std::fmt::Debug for DatabaseConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL carries the password: show only where it points.
        let url = self
            .url
            .as_deref()
            .map(|u| crate::pg::parse_url(u).map(|t| crate::pg::describe(&t.config)));
        f.debug_struct("DatabaseConfig")
            .field(
                "url",
                &url.map(|r| r.unwrap_or_else(|_| "(invalid)".into())),
            )
            .field("secret", &self.secret)
            .field("sslmode", &self.sslmode)
            .field("sslrootcert", &self.sslrootcert)
            .field(
                "primary_url",
                &self.primary_url.as_deref().map(|u| {
                    crate::pg::parse_url(u)
                        .map(|t| crate::pg::describe(&t.config))
                        .unwrap_or_else(|_| "(invalid)".into())
                }),
            )
            .finish()
    }
}

/// `[kafka]`: the broker and the event topic.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// Bootstrap servers, comma-separated; `KAFKA_BROKERS` overrides.
    #[serde(default)]
    pub brokers: Option<String>,
    /// Event topic; `TRUSST_TOPIC` overrides. `{customer}` in it is replaced by
    /// `[source] customer`, e.g. `trusst.{customer}.contacts`, one topic per customer.
    #[serde(default = "default_topic")]
    pub topic: String,
    /// Partitions when the source creates the topic.
    #[serde(default = "default_partitions")]
    pub partitions: i32,
    /// Replication factor when the source creates the topic.
    #[serde(default = "default_replication")]
    pub replication_factor: i32,
    /// `min.insync.replicas` of the topics the source creates (events, `.state`, `.control`):
    /// with `acks=all`, how many replicas must have an event before Kafka acknowledges it.
    /// Unset: the broker's default. On a three-broker cluster use 2 with `replication_factor = 3`.
    #[serde(default)]
    pub min_insync_replicas: Option<i32>,
    /// Extra librdkafka properties (e.g. `security.protocol`), passed through unchanged.
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
    /// Format of event values: `json` (default) or `avro` (needs `schema_registry_url`).
    #[serde(default)]
    pub format: Format,
    /// Confluent-compatible schema registry API base; `SCHEMA_REGISTRY_URL` overrides.
    #[serde(default)]
    pub schema_registry_url: Option<String>,
    /// The registry's HTTP Basic user (Confluent Cloud: the API key); `SCHEMA_REGISTRY_USERNAME`
    /// overrides.
    #[serde(default)]
    pub schema_registry_username: Option<String>,
    /// Its password (Confluent Cloud: the API secret); `SCHEMA_REGISTRY_PASSWORD` overrides.
    #[serde(default)]
    pub schema_registry_password: Option<Secret>,
    /// A bearer token instead of a user and password; `SCHEMA_REGISTRY_TOKEN` overrides.
    #[serde(default)]
    pub schema_registry_token: Option<Secret>,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        parse("").expect("defaults parse")
    }
}

fn default_topic() -> String {
    "trusst.contacts".into()
}
fn default_partitions() -> i32 {
    6
}
fn default_replication() -> i32 {
    1
}

/// Whether to publish every COMPLETED contact before streaming.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SnapshotMode {
    /// Once, the first time the slot is used (resumed by key after a crash).
    Initial,
    /// Never: only changes after the slot was created are published.
    Never,
}

/// Where the source keeps its snapshot progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StateStore {
    /// A compacted topic `<topic>.state`, keyed by database and slot.
    #[default]
    Kafka,
    /// A file in `state_dir` (lost with the host or volume).
    File,
}

/// What the source does when its replication slot was invalidated or dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SlotLost {
    /// Stop with the cause and the fix (exit code 2).
    #[default]
    Stop,
    /// Create a new slot and re-publish what the gap may have changed.
    Recover,
}

/// `[source]`: the replication slot and batching.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceSection {
    /// Logical replication slot; `TRUSST_SLOT` overrides.
    #[serde(default = "default_slot")]
    pub slot: String,
    /// Publication; `TRUSST_PUBLICATION` overrides.
    #[serde(default = "default_slot")]
    pub publication: String,
    /// Create the publication when missing (needs table ownership); otherwise it must exist.
    #[serde(default = "yes")]
    pub create_publication: bool,
    /// Initial snapshot behaviour.
    #[serde(default = "default_snapshot")]
    pub snapshot: SnapshotMode,
    /// Contacts per snapshot page and per enrichment query.
    #[serde(default = "default_page")]
    pub batch_max_contacts: usize,
    /// Connections the publishing pipeline re-reads on: reads of batches that share no contact
    /// run at once (snapshot and backfill pages always do).
    #[serde(default = "default_reread_connections")]
    pub reread_connections: usize,
    /// Longest a touched contact waits before its batch is published.
    #[serde(
        default = "default_wait",
        deserialize_with = "crate::config::duration::deserialize"
    )]
    pub batch_max_wait: Duration,
    /// Interval of the `pg_logical_emit_message` heartbeat that keeps an idle slot advancing.
    #[serde(
        default = "default_heartbeat",
        deserialize_with = "crate::config::duration::deserialize"
    )]
    pub heartbeat_interval: Duration,
    /// How long an unreachable service (Kafka, PostgreSQL, the registry) is retried at start
    /// before the source exits (once it has streamed, it reconnects for ever).
    #[serde(
        default = "default_startup_timeout",
        deserialize_with = "crate::config::duration::deserialize"
    )]
    pub startup_timeout: Duration,
    /// Contacts re-emitted per step after a question change, between stream batches.
    #[serde(default = "default_page")]
    pub reemit_chunk: usize,
    /// Where snapshot progress is kept: `kafka` (default; survives a move to another host) or
    /// `file` (in `state_dir`).
    #[serde(default)]
    pub state_store: StateStore,
    /// Folder for the snapshot progress file (`state_store = "file"`, and an earlier version's
    /// file that the Kafka store takes over).
    #[serde(default = "default_state_dir")]
    pub state_dir: String,
    /// Create the slot as a failover slot on PostgreSQL 17+ (`failover = true`), so standbys
    /// with `sync_replication_slots` keep a copy that survives a promotion.
    #[serde(default = "yes")]
    pub failover_slot: bool,
    /// What to do when the slot is invalidated or gone: `stop` (default, with the cause and
    /// the fix) or `recover` (a new slot and a bounded re-publish, as `source --recover`).
    #[serde(default)]
    pub on_slot_lost: SlotLost,
    /// Safety margin a recovery subtracts from the newest commit on the topic (long
    /// transactions commit after their rows' timestamps).
    #[serde(
        default = "default_recover_margin",
        deserialize_with = "crate::config::duration::deserialize"
    )]
    pub recover_margin: Duration,
    /// The Trusst customer (tenant) this database belongs to, carried by every event (and
    /// every record's `trusst-customer` header); `TRUSST_CUSTOMER` overrides. Default: the
    /// customer of `[database] secret` (`trusst/<customer>/db-readonly-user`), else
    /// [`DEFAULT_CUSTOMER`].
    #[serde(default)]
    pub customer: Option<String>,
    /// Largest encoded event; longer texts are shortened (and listed in the event's
    /// `truncated`). Default and cap: what the producer and the topic accept.
    #[serde(default)]
    pub max_event_bytes: Option<usize>,
    /// How long this source may go without answering PostgreSQL before the server ends its
    /// replication connection and frees the slot for a standby source: the walsender's
    /// `wal_sender_timeout`, set for this source's replication connection only. Unset: the
    /// server's setting (60 s by default). See the README, "Running a standby source".
    #[serde(default, deserialize_with = "crate::config::duration::deserialize_opt")]
    pub takeover_after: Option<Duration>,
}

impl Default for SourceSection {
    fn default() -> Self {
        parse("").expect("defaults parse")
    }
}

/// The customer of a source that names none and reads no `trusst/<customer>/…` secret: one
/// database, one tenant. A topic template (`{customer}`) needs a real name instead.
pub const DEFAULT_CUSTOMER: &str = "default";

/// Placeholder of a topic template, replaced by the source's customer.
pub const CUSTOMER_PLACEHOLDER: &str = "{customer}";

/// Check a customer name: it goes into topic names and metric labels, so Kafka's topic
/// characters only.
pub fn check_customer(name: &str, origin: &str) -> Result<()> {
    if name.is_empty()
        || name.len() > 100
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
    {
        return Err(Error::user(format!(
            "invalid customer {name:?} (from {origin}): use 1-100 letters, digits, '.', '_' or '-' \
             (set [source] customer or TRUSST_CUSTOMER to the customer's name)"
        )));
    }
    Ok(())
}

/// Smallest `max_event_bytes` accepted: room for a contact with dozens of short answers.
pub const MIN_EVENT_BYTES: usize = 16 * 1024;

/// Shortest `takeover_after` accepted: several of the replication client's status intervals (1 s).
pub const MIN_TAKEOVER_AFTER: Duration = Duration::from_secs(4);

/// How old a read of the database may be when its events are handed to the producer, and how
/// long the producer may hold an event, for a source whose replication connection PostgreSQL
/// ends after `lease` without an answer: half of it. See the README, "Running a standby source".
pub fn publish_fence(lease: Duration) -> Duration {
    lease / 2
}

fn default_slot() -> String {
    "trusst_cdc".into()
}
fn yes() -> bool {
    true
}
fn default_snapshot() -> SnapshotMode {
    SnapshotMode::Initial
}
fn default_page() -> usize {
    1000
}
fn default_reread_connections() -> usize {
    2
}
/// Most re-read connections a source may open: past the database's cores they only queue.
pub const MAX_REREAD_CONNECTIONS: usize = 16;
fn default_wait() -> Duration {
    Duration::from_millis(20)
}
fn default_recover_margin() -> Duration {
    Duration::from_secs(3600)
}
fn default_startup_timeout() -> Duration {
    Duration::from_secs(300)
}
fn default_heartbeat() -> Duration {
    Duration::from_secs(10)
}
fn default_state_dir() -> String {
    ".trusst-cdc".into()
}

/// The whole `source.toml`.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// `[database]`.
    #[serde(default)]
    pub database: DatabaseConfig,
    /// `[kafka]`.
    #[serde(default)]
    pub kafka: KafkaConfig,
    /// `[source]`.
    #[serde(default)]
    pub source: SourceSection,
    /// `[metrics]`: the `/metrics`, `/health`, `/ready` endpoint.
    #[serde(default)]
    pub metrics: crate::metrics::server::MetricsConfig,
}

/// Values from flags or the environment that win over the file.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct SourceOverrides {
    /// PostgreSQL URL.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// The primary's URL when the database URL names a read replica (PostgreSQL 16+).
    #[arg(long, env = "PRIMARY_DATABASE_URL", hide_env_values = true)]
    pub primary_database_url: Option<String>,
    /// Kafka bootstrap servers.
    #[arg(long, env = "KAFKA_BROKERS")]
    pub kafka_brokers: Option<String>,
    /// Event topic.
    #[arg(long, env = "TRUSST_TOPIC")]
    pub topic: Option<String>,
    /// Replication slot.
    #[arg(long, env = "TRUSST_SLOT")]
    pub slot: Option<String>,
    /// Publication.
    #[arg(long, env = "TRUSST_PUBLICATION")]
    pub publication: Option<String>,
    /// Format of event values (`[kafka] format`).
    #[arg(long, env = "TRUSST_FORMAT", value_enum)]
    pub format: Option<Format>,
    /// Schema registry (Confluent-compatible API base), used when the format is avro.
    #[arg(long, env = "SCHEMA_REGISTRY_URL")]
    pub schema_registry_url: Option<String>,
    /// The customer (tenant) every event carries (`[source] customer`).
    #[arg(long, env = "TRUSST_CUSTOMER")]
    pub customer: Option<String>,
}

impl SourceConfig {
    /// Apply overrides, then check that everything required is present and sane.
    pub fn resolve(self, o: SourceOverrides) -> Result<Self> {
        self.resolve_with(o, true)
    }

    /// [`SourceConfig::resolve`] for commands that only read the database (`questions`): no
    /// Kafka brokers needed.
    pub fn resolve_database_only(self, o: SourceOverrides) -> Result<Self> {
        self.resolve_with(o, false)
    }

    fn resolve_with(mut self, o: SourceOverrides, needs_kafka: bool) -> Result<Self> {
        if o.database_url.is_some() {
            self.database.url = o.database_url;
        }
        if o.kafka_brokers.is_some() {
            self.kafka.brokers = o.kafka_brokers;
        }
        if o.primary_database_url.is_some() {
            self.database.primary_url = o.primary_database_url;
        }
        if let Some(t) = o.topic {
            self.kafka.topic = t;
        }
        if let Some(s) = o.slot {
            self.source.slot = s;
        }
        if let Some(p) = o.publication {
            self.source.publication = p;
        }
        if o.schema_registry_url.is_some() {
            self.kafka.schema_registry_url = o.schema_registry_url;
        }
        if let Some(f) = o.format {
            self.kafka.format = f;
        }
        if let Some(c) = o.customer.filter(|c| !c.is_empty()) {
            self.source.customer = Some(c);
        }
        kafka_credentials_from_env(&mut self.kafka.properties);
        self.validate(needs_kafka)?;
        Ok(self)
    }

    fn validate(&mut self, needs_kafka: bool) -> Result<()> {
        let db = &mut self.database;
        match (db.url.as_deref().filter(|u| !u.is_empty()), &db.secret) {
            (None, None) => {
                return Err(Error::user(
                    "no database: set [database] url, DATABASE_URL or --database-url, or [database] secret \
                     (AWS Secrets Manager)",
                ));
            }
            (Some(_), Some(_)) => {
                return Err(Error::user(
                    "both a database URL ([database] url, DATABASE_URL or --database-url) and [database] secret are \
                     set: keep one (unset DATABASE_URL when the credentials come from the secret)",
                ));
            }
            (Some(url), None) => {
                let url = crate::pg::with_tls_defaults(url, db.sslmode, db.sslrootcert.as_deref());
                crate::pg::parse_url(&url)?;
                db.url = Some(url);
            }
            (None, Some(secret)) => {
                secret.secret_id()?;
            }
        }
        if let Some(p) = self
            .database
            .primary_url
            .as_deref()
            .filter(|u| !u.is_empty())
        {
            let p = crate::pg::with_tls_defaults(
                p,
                self.database.sslmode,
                self.database.sslrootcert.as_deref(),
            );
            crate::pg::parse_url(&p)?;
            self.database.primary_url = Some(p);
        } else {
            self.database.primary_url = None;
        }
        if needs_kafka && self.kafka.brokers.as_deref().unwrap_or("").is_empty() {
            return Err(Error::user(
                "no Kafka brokers: set [kafka] brokers, KAFKA_BROKERS or --kafka-brokers",
            ));
        }
        let ident_ok = |s: &str| {
            !s.is_empty()
                && s.len() <= 63
                && s.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        };
        for (what, v) in [
            ("slot", &self.source.slot),
            ("publication", &self.source.publication),
        ] {
            if !ident_ok(v) {
                return Err(Error::user(format!(
                    "invalid {what} name {v:?}: use 1-63 lowercase letters, digits or '_'"
                )));
            }
        }
        self.resolve_customer()?;
        if self.kafka.topic.is_empty()
            || !self
                .kafka
                .topic
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        {
            return Err(Error::user(format!(
                "invalid topic name {:?}: use letters, digits, '.', '_' or '-'",
                self.kafka.topic
            )));
        }
        if !(1..=MAX_REREAD_CONNECTIONS).contains(&self.source.reread_connections) {
            return Err(Error::user(format!(
                "[source] reread_connections = {}: use 1 to {MAX_REREAD_CONNECTIONS} (each is a database connection; 2 is the default)",
                self.source.reread_connections
            )));
        }
        if self.source.batch_max_contacts == 0 || self.source.reemit_chunk == 0 {
            return Err(Error::user(
                "batch_max_contacts and reemit_chunk must be at least 1",
            ));
        }
        if let Some(n) = self.source.max_event_bytes
            && n < MIN_EVENT_BYTES
        {
            return Err(Error::user(format!(
                "[source] max_event_bytes = {n} is too small for an event with its answers: use at least {MIN_EVENT_BYTES}, \
                 or leave it out to use what the broker accepts"
            )));
        }
        if self.kafka.partitions < 1 {
            return Err(Error::user("[kafka] partitions must be at least 1"));
        }
        if self.kafka.replication_factor < 1 {
            return Err(Error::user("[kafka] replication_factor must be at least 1"));
        }
        if let Some(n) = self.kafka.min_insync_replicas
            && (n < 1 || n > self.kafka.replication_factor)
        {
            return Err(Error::user(format!(
                "[kafka] min_insync_replicas = {n} must be between 1 and replication_factor ({}): a topic \
                 with fewer replicas than that could never acknowledge an event",
                self.kafka.replication_factor
            )));
        }
        if let Some(t) = self.source.takeover_after {
            if t < MIN_TAKEOVER_AFTER {
                return Err(Error::user(format!(
                    "[source] takeover_after = {} is too short: the source answers PostgreSQL once a second, so use at \
                     least {} (30s or more on a Kafka cluster, above its leader failover time)",
                    humantime::format_duration(t),
                    humantime::format_duration(MIN_TAKEOVER_AFTER)
                )));
            }
            let timeout = ["message.timeout.ms", "delivery.timeout.ms"]
                .iter()
                .find_map(|k| self.kafka.properties.get(*k))
                .and_then(|v| v.parse::<u64>().ok());
            if let Some(ms) = timeout
                && Duration::from_millis(ms) > publish_fence(t)
            {
                return Err(Error::user(format!(
                    "[kafka.properties] message.timeout.ms = {ms} is longer than half of [source] takeover_after ({}): an \
                     event could wait in the producer's queue of a source that stalled until a standby took over, \
                     and land after the standby's newer events; lower it or leave it out (it then defaults to half \
                     of takeover_after)",
                    humantime::format_duration(t)
                )));
            }
        }
        if self.kafka.format == Format::Avro && self.registry()?.is_none() {
            return Err(Error::user(
                "[kafka] format = \"avro\" needs a schema registry: set [kafka] schema_registry_url, SCHEMA_REGISTRY_URL \
                 or --schema-registry-url (e.g. http://127.0.0.1:18081/apis/ccompat/v7)",
            ));
        }
        Ok(())
    }

    /// Settle the customer (explicit, else the secret's, else [`DEFAULT_CUSTOMER`]) and expand
    /// a `{customer}` topic template with it.
    fn resolve_customer(&mut self) -> Result<()> {
        let from_secret = self
            .database
            .secret
            .as_ref()
            .and_then(crate::secrets::SecretRef::customer_name);
        let (customer, origin) = match (self.source.customer.clone(), from_secret) {
            (Some(c), _) => (c, "[source] customer or TRUSST_CUSTOMER"),
            (None, Some(c)) => (
                c,
                "the [database] secret's name trusst/<customer>/db-readonly-user",
            ),
            (None, None) => {
                if self.kafka.topic.contains(CUSTOMER_PLACEHOLDER) {
                    return Err(Error::user(format!(
                        "the topic {:?} names {CUSTOMER_PLACEHOLDER} but no customer is set: set [source] customer, \
                         TRUSST_CUSTOMER or --customer, or read the credentials from [database] secret = {{ customer = \"...\" }}",
                        self.kafka.topic
                    )));
                }
                (DEFAULT_CUSTOMER.to_owned(), "the default")
            }
        };
        check_customer(&customer, origin)?;
        self.kafka.topic = self.kafka.topic.replace(CUSTOMER_PLACEHOLDER, &customer);
        if self.kafka.topic.contains(['{', '}']) {
            return Err(Error::user(format!(
                "invalid topic template {:?}: the only placeholder is {CUSTOMER_PLACEHOLDER}, e.g. \"trusst.{{customer}}.contacts\"",
                self.kafka.topic
            )));
        }
        self.source.customer = Some(customer);
        Ok(())
    }

    /// The customer every event carries (settled by [`SourceConfig::resolve`]).
    pub fn customer(&self) -> &str {
        self.source.customer.as_deref().unwrap_or(DEFAULT_CUSTOMER)
    }

    /// With `[database] secret`: read the credentials from AWS Secrets Manager into the URL that
    /// [`SourceConfig::database_url`] returns. Call after [`SourceConfig::resolve`].
    pub async fn fetch_secret(&mut self) -> Result<()> {
        let db = &mut self.database;
        let Some(secret) = &db.secret else {
            return Ok(());
        };
        let creds = crate::secrets::fetch(secret).await?;
        // The integration guide requires TLS for the customer databases.
        let mode = db.sslmode.unwrap_or(SslMode::Require);
        let url = crate::pg::with_tls_defaults(&creds.url(), Some(mode), db.sslrootcert.as_deref());
        crate::pg::parse_url(&url)?;
        db.url = Some(url);
        Ok(())
    }

    /// The schema registry client, when a registry URL is configured.
    pub fn registry(&self) -> Result<Option<Registry>> {
        let k = &self.kafka;
        registry(
            k.schema_registry_url.as_deref(),
            registry_auth(
                k.schema_registry_username.as_deref(),
                k.schema_registry_password.as_ref(),
                k.schema_registry_token.as_ref(),
            )?,
        )
    }

    /// The database URL (present after [`SourceConfig::resolve`] and [`SourceConfig::fetch_secret`]).
    pub fn database_url(&self) -> &str {
        self.database.url.as_deref().unwrap_or_default()
    }

    /// The primary's URL, when the database URL names a read replica.
    pub fn primary_url(&self) -> Option<&str> {
        self.database.primary_url.as_deref()
    }

    /// The brokers (present after [`SourceConfig::resolve`]).
    pub fn brokers(&self) -> &str {
        self.kafka.brokers.as_deref().unwrap_or_default()
    }

    /// How the topics the source creates are replicated (`[kafka] replication_factor` and
    /// `min_insync_replicas`).
    pub fn replicas(&self) -> crate::kafka::Replicas {
        crate::kafka::Replicas {
            factor: self.kafka.replication_factor,
            min_insync: self.kafka.min_insync_replicas,
        }
    }
}

/// A registry client for an optional URL (an empty URL counts as none).
pub fn registry(url: Option<&str>, auth: Auth) -> Result<Option<Registry>> {
    url.filter(|u| !u.is_empty())
        .map(|u| Registry::with_auth(u, auth))
        .transpose()
}

/// The schema registry's credentials from `[kafka] schema_registry_username`,
/// `schema_registry_password` and `schema_registry_token`, each overridden by its environment
/// variable (`SCHEMA_REGISTRY_USERNAME`, `SCHEMA_REGISTRY_PASSWORD`, `SCHEMA_REGISTRY_TOKEN`):
/// a user with a password (HTTP Basic), a token (Bearer), or neither.
pub fn registry_auth(
    username: Option<&str>,
    password: Option<&Secret>,
    token: Option<&Secret>,
) -> Result<Auth> {
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let username = env("SCHEMA_REGISTRY_USERNAME").or_else(|| username.map(str::to_owned));
    let password = match env("SCHEMA_REGISTRY_PASSWORD") {
        Some(p) => Some(p),
        None => password
            .map(|s| s.resolve("[kafka] schema_registry_password"))
            .transpose()?,
    };
    let token = match env("SCHEMA_REGISTRY_TOKEN") {
        Some(t) => Some(t),
        None => token
            .map(|s| s.resolve("[kafka] schema_registry_token"))
            .transpose()?,
    };
    match (username, password, token) {
        (None, None, None) => Ok(Auth::None),
        (Some(username), Some(password), None) => Ok(Auth::Basic { username, password }),
        (None, None, Some(token)) => Ok(Auth::Bearer(token)),
        (Some(_), None, None) => Err(Error::user(
            "a schema registry user without a password: set SCHEMA_REGISTRY_PASSWORD or [kafka] \
             schema_registry_password",
        )),
        (None, Some(_), None) => Err(Error::user(
            "a schema registry password without a user: set SCHEMA_REGISTRY_USERNAME or [kafka] \
             schema_registry_username",
        )),
        (_, _, Some(_)) => Err(Error::user(
            "both a schema registry token and a user or password are set: keep the token \
             (SCHEMA_REGISTRY_TOKEN, [kafka] schema_registry_token) or the user and password",
        )),
    }
}

/// `KAFKA_SASL_USERNAME` and `KAFKA_SASL_PASSWORD`, when set, become the librdkafka properties
/// `sasl.username` and `sasl.password` (over `[kafka.properties]`), so the broker's credentials
/// can come from the environment (a Kubernetes Secret) instead of the config file.
pub fn kafka_credentials_from_env(properties: &mut BTreeMap<String, String>) {
    for (var, key) in [
        ("KAFKA_SASL_USERNAME", "sasl.username"),
        ("KAFKA_SASL_PASSWORD", "sasl.password"),
    ] {
        if let Some(v) = std::env::var(var).ok().filter(|v| !v.is_empty()) {
            properties.insert(key.to_owned(), v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_key_is_rejected_with_its_name() {
        let e = parse::<SourceConfig>("[source]\nslott = \"x\"\n").unwrap_err();
        assert!(e.contains("unknown field `slott`"), "{e}");
    }

    #[test]
    fn defaults_and_overrides() {
        let c: SourceConfig =
            parse("[kafka]\nbrokers = \"b:1\"\n[source]\nheartbeat_interval = \"2s\"\n").unwrap();
        assert_eq!(c.source.heartbeat_interval, Duration::from_secs(2));
        assert_eq!(c.kafka.topic, "trusst.contacts");
        let c = c
            .resolve(SourceOverrides {
                database_url: Some("postgres://x@h/db".into()),
                slot: Some("s2".into()),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(c.source.slot, "s2");
        assert_eq!(c.brokers(), "b:1");
    }

    #[test]
    fn missing_url_names_the_fix() {
        let e = SourceConfig::default()
            .resolve(SourceOverrides::default())
            .unwrap_err();
        assert!(e.to_string().contains("DATABASE_URL"), "{e}");
    }

    #[test]
    fn url_and_secret_exclude_each_other() {
        let c: SourceConfig =
            parse("[database]\nsecret = { customer = \"acme\" }\n[kafka]\nbrokers = \"b\"\n")
                .unwrap();
        let e = c
            .clone()
            .resolve(SourceOverrides {
                database_url: Some("postgres://h/d".into()),
                ..Default::default()
            })
            .unwrap_err();
        assert!(e.to_string().contains("keep one"), "{e}");
        let c = c.resolve(SourceOverrides::default()).unwrap();
        assert_eq!(
            c.database.secret.unwrap().secret_id().unwrap(),
            "trusst/acme/db-readonly-user"
        );
        let e =
            parse::<SourceConfig>("[database]\nsecret = { customer = \"a\", regoin = \"x\" }\n")
                .unwrap_err();
        assert!(e.contains("unknown field `regoin`"), "{e}");
    }

    #[test]
    fn tls_keys_fill_the_url_and_debug_hides_the_password() {
        let c: SourceConfig = parse(
            "[database]\nurl = \"postgres://u:hunter2@h/d\"\nsslmode = \"verify-full\"\nsslrootcert = \"/ca.pem\"\n\
             [kafka]\nbrokers = \"b\"\n",
        )
        .unwrap();
        let c = c.resolve(SourceOverrides::default()).unwrap();
        assert_eq!(
            c.database_url(),
            "postgres://u:hunter2@h/d?sslmode=verify-full&sslrootcert=/ca.pem"
        );
        let dbg = format!("{c:?}");
        assert!(
            !dbg.contains("hunter2") && dbg.contains("h:5432/d"),
            "{dbg}"
        );
        let e = parse::<SourceConfig>("[database]\nsslmode = \"verify\"\n").unwrap_err();
        assert!(e.contains("verify-full"), "{e}");
    }

    #[test]
    fn avro_needs_a_registry() {
        let c: SourceConfig = parse("[kafka]\nformat = \"avro\"\n").unwrap();
        let o = || SourceOverrides {
            database_url: Some("postgres://h/d".into()),
            kafka_brokers: Some("b".into()),
            ..Default::default()
        };
        let e = c.clone().resolve(o()).unwrap_err();
        assert!(e.to_string().contains("SCHEMA_REGISTRY_URL"), "{e}");
        let c = c.resolve(SourceOverrides {
            schema_registry_url: Some("http://127.0.0.1:1/apis/ccompat/v7".into()),
            ..o()
        });
        assert_eq!(c.unwrap().kafka.format, Format::Avro);
        assert_eq!(
            parse::<SourceConfig>("").unwrap().kafka.format,
            Format::Json
        );
        assert!(
            parse::<SourceConfig>("[kafka]\nformat = \"protobuf\"\n")
                .unwrap_err()
                .contains("unknown variant")
        );
    }

    #[test]
    fn durations_must_be_positive_and_sane() {
        for (text, want) in [
            ("heartbeat_interval = \"0s\"", "longer than zero"),
            ("batch_max_wait = \"0ms\"", "longer than zero"),
            ("heartbeat_interval = \"200y\"", "longer than a year"),
            ("heartbeat_interval = \"soon\"", "heartbeat_interval"),
        ] {
            let e = parse::<SourceConfig>(&format!("[source]\n{text}\n")).unwrap_err();
            assert!(e.contains(want) && e.contains("line 2"), "{text}: {e}");
        }
        let e = parse::<crate::sink::config::SinkConfig>(
            "[sink]\nname = \"s\"\ntarget = \"salesforce\"\nmax_backoff = \"0s\"\n",
        )
        .unwrap_err();
        assert!(e.contains("longer than zero"), "{e}");
    }

    #[test]
    fn customer_comes_from_the_config_the_secret_or_the_default() {
        let o = || SourceOverrides {
            database_url: Some("postgres://h/d".into()),
            kafka_brokers: Some("b".into()),
            ..Default::default()
        };
        let c = SourceConfig::default().resolve(o()).unwrap();
        assert_eq!(
            (c.customer(), c.kafka.topic.as_str()),
            ("default", "trusst.contacts")
        );
        let c: SourceConfig = parse(
            "[database]\nsecret = { customer = \"acme\" }\n[kafka]\nbrokers = \"b\"\ntopic = \"trusst.{customer}.contacts\"\n",
        )
        .unwrap();
        let c = c.resolve(SourceOverrides::default()).unwrap();
        assert_eq!(
            (c.customer(), c.kafka.topic.as_str()),
            ("acme", "trusst.acme.contacts")
        );
        let c: SourceConfig = parse(
            "[database]\nsecret = { id = \"arn:aws:secretsmanager:ap-southeast-2:1:secret:trusst/globex/db-readonly-user-AbCdEf\" }\n\
             [kafka]\nbrokers = \"b\"\n",
        )
        .unwrap();
        assert_eq!(
            c.resolve(SourceOverrides::default()).unwrap().customer(),
            "globex"
        );
        let c = SourceConfig::default()
            .resolve(SourceOverrides {
                customer: Some("initech".into()),
                topic: Some("t.{customer}".into()),
                ..o()
            })
            .unwrap();
        assert_eq!(
            (c.customer(), c.kafka.topic.as_str()),
            ("initech", "t.initech")
        );
        let e = SourceConfig::default()
            .resolve(SourceOverrides {
                topic: Some("t.{customer}".into()),
                ..o()
            })
            .unwrap_err();
        assert!(e.to_string().contains("no customer is set"), "{e}");
        let e = SourceConfig::default()
            .resolve(SourceOverrides {
                customer: Some("a/b".into()),
                ..o()
            })
            .unwrap_err();
        assert!(e.to_string().contains("invalid customer \"a/b\""), "{e}");
        let e = SourceConfig::default()
            .resolve(SourceOverrides {
                customer: Some("a".into()),
                topic: Some("t.{tenant}".into()),
                ..o()
            })
            .unwrap_err();
        assert!(e.to_string().contains("only placeholder"), "{e}");
    }

    #[test]
    fn bad_slot_name() {
        let e = SourceConfig::default()
            .resolve(SourceOverrides {
                database_url: Some("postgres://h/d".into()),
                kafka_brokers: Some("b".into()),
                slot: Some("Bad-Slot".into()),
                ..Default::default()
            })
            .unwrap_err();
        assert!(e.to_string().contains("invalid slot name"), "{e}");
    }
}

#[cfg(test)]
mod shipped_configs {
    /// Every file in connector-config/ parses with its schema (examples never rot).
    #[test]
    fn shipped_configs_parse() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/connector-config");
        super::load::<super::SourceConfig>(&std::path::Path::new(dir).join("source.toml")).unwrap();
        for name in ["salesforce", "dynamics", "mulesoft"] {
            let path = std::path::Path::new(dir).join(format!("{name}.toml"));
            let cfg: crate::sink::config::SinkConfig =
                super::load(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(cfg.sink.name, name);
        }
    }
}
