//! The source's small durable state: whether the initial snapshot finished, and how far it got.
//!
//! Everything else (the stream position) lives in the replication slot itself. By default the
//! state lives in Kafka ([`KafkaState`]: a compacted topic beside the events), so a source
//! rescheduled to another host, or a container that lost its volume, resumes the snapshot
//! instead of publishing every contact again (and spending every CRM's API allowance again);
//! the database credential may be read-only, so the database is no place for it. A local file
//! ([`StateFile`], written atomically: write, fsync, rename) remains for single-host setups.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::error::{self, Error, Result};

/// Snapshot progress for one slot.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotState {
    /// True once every COMPLETED contact was published and acknowledged.
    pub done: bool,
    /// The last contact id published by the snapshot (pages resume after it).
    pub last_key: String,
    /// Contacts published so far.
    pub published: u64,
    /// Set while a recovery after a lost slot re-publishes; a restart finishes it.
    #[serde(default)]
    pub recovering: bool,
    /// The time a recovery re-publishes changes from (RFC 3339), while `recovering`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recover_since: Option<String>,
}

/// Where a slot's state lives.
#[derive(Debug, Clone)]
pub struct StateFile {
    path: PathBuf,
}

impl StateFile {
    /// `<dir>/<slot>.snapshot.json`.
    pub fn new(dir: &Path, slot: &str) -> Self {
        Self {
            path: dir.join(format!("{slot}.snapshot.json")),
        }
    }

    /// Read the state; a missing file means no snapshot ran yet.
    pub fn load(&self) -> Result<SnapshotState> {
        Ok(self.load_opt()?.unwrap_or_default())
    }

    /// Read the state; `None` when no source saved one here.
    pub fn load_opt(&self) -> Result<Option<SnapshotState>> {
        match std::fs::read(&self.path) {
            Ok(b) => serde_json::from_slice(&b).map(Some).map_err(|e| {
                Error::user(format!(
                    "state file {} is corrupt ({e}); delete it to run the snapshot again",
                    self.path.display()
                ))
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::user(format!(
                "cannot read state file {}: {e}",
                self.path.display()
            ))),
        }
    }

    /// Replace the state atomically.
    pub fn save(&self, state: &SnapshotState) -> Result<()> {
        let io = |e: std::io::Error| {
            Error::user(format!(
                "cannot write state file {}: {e}; check [source] state_dir is writable",
                self.path.display()
            ))
        };
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let tmp = self.path.with_extension("json.tmp");
        {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp).map_err(io)?;
            f.write_all(&serde_json::to_vec_pretty(state).expect("state serializes"))
                .map_err(io)?;
            f.sync_all().map_err(io)?;
        }
        std::fs::rename(&tmp, &self.path).map_err(io)
    }
}

/// Where the snapshot progress of one slot lives.
pub enum Store {
    /// A compacted Kafka topic (the default).
    Kafka(KafkaState),
    /// A file in `state_dir`.
    File(StateFile),
}

impl Store {
    /// Read the state; none saved yet means no snapshot ran.
    pub async fn load(&self) -> Result<SnapshotState> {
        Ok(self.load_opt().await?.unwrap_or_default())
    }

    /// Read the state; `None` when no source of this database and slot saved one (a first
    /// start, as far as this store knows).
    pub async fn load_opt(&self) -> Result<Option<SnapshotState>> {
        match self {
            Store::File(f) => f.load_opt(),
            Store::Kafka(k) => k.load_opt().await,
        }
    }

    /// Replace the state (durably: fsync'd, or acknowledged by every in-sync replica).
    pub async fn save(&self, state: &SnapshotState) -> Result<()> {
        match self {
            Store::File(f) => f.save(state),
            Store::Kafka(k) => k.save(state).await,
        }
    }

    /// Where the state lives, for log lines.
    pub fn describe(&self) -> String {
        match self {
            Store::File(f) => format!("file {}", f.path.display()),
            Store::Kafka(k) => format!("topic {} key {}", k.topic, k.key),
        }
    }
}

/// Snapshot progress in a compacted topic, one key per database and slot.
pub struct KafkaState {
    brokers: String,
    properties: BTreeMap<String, String>,
    topic: String,
    key: String,
    replication_factor: crate::kafka::Replicas,
    producer: rdkafka::producer::FutureProducer,
    /// Read when Kafka holds no state yet: the file an earlier version wrote.
    legacy: Option<StateFile>,
    /// Set once the topic is known to exist.
    topic_ready: tokio::sync::OnceCell<()>,
}

/// Longest wait for the state topic to be read to its end.
const READ_TIMEOUT: Duration = Duration::from_secs(30);

impl KafkaState {
    /// The state of `slot` on `database` in `topic` (created compacted when missing);
    /// `legacy` is a state file to take over when the topic has nothing yet.
    pub fn new(
        brokers: &str,
        properties: &BTreeMap<String, String>,
        topic: &str,
        replication_factor: crate::kafka::Replicas,
        database: &str,
        slot: &str,
        legacy: Option<StateFile>,
    ) -> Result<Self> {
        Ok(Self {
            brokers: brokers.to_owned(),
            properties: properties.clone(),
            topic: topic.to_owned(),
            key: format!("snapshot/{database}/{slot}"),
            replication_factor,
            producer: crate::kafka::producer(brokers, properties)?,
            legacy,
            topic_ready: tokio::sync::OnceCell::new(),
        })
    }

    async fn ensure_topic(&self) -> Result<()> {
        self.topic_ready
            .get_or_try_init(|| async {
                crate::kafka::ensure_compacted_topic(
                    &self.brokers,
                    &self.properties,
                    &self.topic,
                    1,
                    self.replication_factor,
                )
                .await
                .map_err(|e| {
                    let fix = format!(
                        "; the source keeps its snapshot progress there: create {} (cleanup.policy=compact, 1 partition) \
                         or let the principal create it, or set [source] state_store = \"file\"",
                        self.topic
                    );
                    let msg = format!("{}{fix}", e.message());
                    if e.retryable {
                        crate::error::Error::external(msg)
                    } else {
                        crate::error::Error::user(msg)
                    }
                })
            })
            .await
            .map(|_| ())
    }

    /// The newest value of the key, reading the topic to its end; `None` when absent (and no
    /// earlier version's file holds one).
    pub async fn load_opt(&self) -> Result<Option<SnapshotState>> {
        self.ensure_topic().await?;
        let config = crate::kafka::client_config(&self.brokers, &self.properties);
        let (topic, key) = (self.topic.clone(), self.key.clone());
        let found = tokio::task::spawn_blocking(move || read_key(config, &topic, &key))
            .await
            .map_err(|e| Error::internal(format!("reading the state topic panicked: {e}")))??;
        match found {
            Some(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
                Error::user(format!(
                    "the snapshot state under key {} in topic {} is corrupt ({e}); delete the key (produce a null \
                     value) to run the snapshot again",
                    self.key, self.topic
                ))
            }),
            None => match &self.legacy {
                Some(f) => {
                    let st = f.load_opt()?;
                    if let Some(st) = &st {
                        tracing::info!(file = %f.path.display(), topic = %self.topic, "snapshot state taken over from the state file");
                        self.save(st).await?;
                    }
                    Ok(st)
                }
                None => Ok(None),
            },
        }
    }

    /// Forget the state (a tombstone on the key), for `teardown`.
    pub async fn forget(&self) -> Result<()> {
        self.ensure_topic().await?;
        let mut p = crate::kafka::Pending::default();
        p.send(&self.producer, &self.topic, &self.key, None).await?;
        p.wait().await.map(|_| ())
    }

    /// Write the state and wait until Kafka acknowledged it.
    pub async fn save(&self, state: &SnapshotState) -> Result<()> {
        self.ensure_topic().await?;
        let value = serde_json::to_vec(state).expect("state serializes");
        let mut p = crate::kafka::Pending::default();
        p.send(&self.producer, &self.topic, &self.key, Some(&value))
            .await?;
        p.wait().await.map(|_| ())
    }
}

/// Read partition 0 of `topic` from its start to its end and return the last value of `key`
/// (`None` when absent or deleted by a tombstone). Blocking: run it off the async thread.
fn read_key(mut config: rdkafka::ClientConfig, topic: &str, key: &str) -> Result<Option<Vec<u8>>> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::{Message, Offset, TopicPartitionList};
    config
        .set(
            "group.id",
            format!("trusst-cdc-state-{}", std::process::id()),
        )
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false");
    let consumer: BaseConsumer = crate::kafka::create(&config, "state reader")?;
    let (low, high) = consumer
        .fetch_watermarks(topic, 0, Duration::from_secs(10))
        .map_err(|e| error::kafka(format!("reading the offsets of state topic {topic}"), e))?;
    if high <= low {
        return Ok(None);
    }
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Beginning)
        .map_err(|e| error::kafka("assigning the state topic", e))?;
    consumer
        .assign(&tpl)
        .map_err(|e| error::kafka(format!("reading state topic {topic}"), e))?;
    let deadline = Instant::now() + READ_TIMEOUT;
    let mut value = None;
    loop {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                if m.key() == Some(key.as_bytes()) {
                    value = m.payload().map(<[u8]>::to_vec);
                }
                if m.offset() + 1 >= high {
                    return Ok(value);
                }
            }
            Some(Err(e)) => {
                return Err(error::kafka(format!("reading state topic {topic}"), e));
            }
            None => {}
        }
        if Instant::now() > deadline {
            return Err(Error::external(format!(
                "state topic {topic} was not read to its end (offset {high}) within {READ_TIMEOUT:?}"
            )));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_missing() {
        let dir = tempfile::tempdir().unwrap();
        let f = StateFile::new(dir.path(), "s");
        assert_eq!(f.load().unwrap(), SnapshotState::default());
        let s = SnapshotState {
            done: true,
            last_key: "c9".into(),
            published: 3,
            ..Default::default()
        };
        f.save(&s).unwrap();
        assert_eq!(f.load().unwrap(), s);
        std::fs::write(dir.path().join("s.snapshot.json"), b"{").unwrap();
        assert!(f.load().unwrap_err().to_string().contains("delete it"));
    }
}
