//! A sink config file (`connector-config/<name>.toml`).

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

use super::mapping::MappingConfig;
use super::targets::{TargetConfig, TargetKind};
use super::{dynamics, mulesoft, salesforce};
use crate::error::{Error, Result};

/// `[kafka]` of a sink.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SinkKafka {
    /// Bootstrap servers; `KAFKA_BROKERS` overrides.
    #[serde(default)]
    pub brokers: Option<String>,
    /// Event topic; `TRUSST_TOPIC` overrides. `{customer}` in it is replaced by the one
    /// customer of `[sink] customers` (the source's topic template).
    #[serde(default = "default_topic")]
    pub topic: String,
    /// Consumer group; default `trusst-cdc-<sink name>`.
    #[serde(default)]
    pub group_id: Option<String>,
    /// Dead-letter topic; default `<topic>.dlq.<sink name>`.
    #[serde(default)]
    pub dlq_topic: Option<String>,
    /// Partitions when the sink creates its dead-letter topic.
    #[serde(default = "one")]
    pub dlq_partitions: i32,
    /// Replication factor when the sink creates its dead-letter topic (use 3 on a production
    /// cluster, as for the event topic).
    #[serde(default = "one")]
    pub dlq_replication_factor: i32,
    /// librdkafka properties passed through.
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
    /// Schema registry (Confluent-compatible API base) to read Avro events; `SCHEMA_REGISTRY_URL`
    /// overrides. JSON events need none.
    #[serde(default)]
    pub schema_registry_url: Option<String>,
    /// The registry's HTTP Basic user; `SCHEMA_REGISTRY_USERNAME` overrides.
    #[serde(default)]
    pub schema_registry_username: Option<String>,
    /// Its password; `SCHEMA_REGISTRY_PASSWORD` overrides.
    #[serde(default)]
    pub schema_registry_password: Option<super::http::Secret>,
    /// A bearer token instead; `SCHEMA_REGISTRY_TOKEN` overrides.
    #[serde(default)]
    pub schema_registry_token: Option<super::http::Secret>,
}

impl Default for SinkKafka {
    fn default() -> Self {
        crate::config::parse("").expect("defaults parse")
    }
}

fn default_topic() -> String {
    "trusst.contacts".into()
}
fn one() -> i32 {
    1
}

/// What a delete event does in the CRM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnDelete {
    /// Delete the CRM record.
    Delete,
    /// Keep the record, set every question field to null.
    Clear,
    /// Do nothing (the offset still advances).
    Ignore,
}

/// `[sink]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SinkSection {
    /// Name used in the group id, the dead-letter topic and logs.
    pub name: String,
    /// Which CRM; its `[<target>]` section must be present (and no other target's).
    pub target: TargetKind,
    /// Most events per batch (records are then split into CRM-sized requests).
    #[serde(default = "default_batch")]
    pub batch_max_records: usize,
    /// Longest an event waits for its batch to fill.
    #[serde(
        default = "default_wait",
        deserialize_with = "crate::config::duration::deserialize"
    )]
    pub batch_max_wait: Duration,
    /// What delete events do.
    #[serde(default = "default_on_delete")]
    pub on_delete: OnDelete,
    /// Longest single backoff between retries of a failing CRM request.
    #[serde(
        default = "default_max_backoff",
        deserialize_with = "crate::config::duration::deserialize"
    )]
    pub max_backoff: Duration,
    /// Records behind the end of the topic from which the sink builds catch-up batches (a
    /// replay, a new target, a long outage): fewer, larger CRM calls (Salesforce Bulk API).
    #[serde(default = "default_catch_up_lag")]
    pub catch_up_lag: i64,
    /// Most events per batch while catching up.
    #[serde(default = "default_catch_up_batch")]
    pub catch_up_batch_max_records: usize,
    /// Only the records of these customers (the events' `customer`) are written; the others
    /// are skipped and counted (`trusst_cdc_sink_records_skipped_customer_total`). Empty: all.
    #[serde(default)]
    pub customers: Vec<String>,
}

fn default_batch() -> usize {
    1000
}
fn default_catch_up_lag() -> i64 {
    2_000
}
fn default_catch_up_batch() -> usize {
    10_000
}
fn default_wait() -> Duration {
    Duration::from_millis(200)
}
fn default_on_delete() -> OnDelete {
    OnDelete::Delete
}
fn default_max_backoff() -> Duration {
    Duration::from_secs(60)
}

/// The whole sink config.
#[derive(Debug, Clone, Deserialize)]
#[serde(try_from = "RawSinkConfig")]
pub struct SinkConfig {
    /// `[kafka]`.
    pub kafka: SinkKafka,
    /// `[sink]`.
    pub sink: SinkSection,
    /// `[mapping]`.
    pub mapping: MappingConfig,
    /// The target's section (`[salesforce]`, `[dynamics]` or `[mulesoft]`), the one `target` names.
    pub target: TargetConfig,
    /// `[audit]`: the optional sync audit table.
    pub audit: super::audit::AuditConfig,
    /// `[metrics]`: the `/metrics`, `/health`, `/ready` endpoint.
    pub metrics: crate::metrics::server::MetricsConfig,
}

/// A sink config file as written: every target's section optional.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSinkConfig {
    #[serde(default)]
    kafka: SinkKafka,
    sink: SinkSection,
    #[serde(default)]
    mapping: MappingConfig,
    #[serde(default)]
    salesforce: Option<salesforce::Config>,
    #[serde(default)]
    dynamics: Option<dynamics::Config>,
    #[serde(default)]
    mulesoft: Option<mulesoft::Config>,
    #[serde(default)]
    audit: super::audit::AuditConfig,
    #[serde(default)]
    metrics: crate::metrics::server::MetricsConfig,
}

impl TryFrom<RawSinkConfig> for SinkConfig {
    type Error = String;

    fn try_from(raw: RawSinkConfig) -> std::result::Result<Self, String> {
        let want = raw.sink.target;
        let mut sections = [
            raw.salesforce.map(TargetConfig::Salesforce),
            raw.dynamics.map(TargetConfig::Dynamics),
            raw.mulesoft.map(TargetConfig::Mulesoft),
        ]
        .into_iter()
        .flatten();
        let (mut target, mut others) = (None, Vec::new());
        for t in sections.by_ref() {
            if t.kind() == want {
                target = Some(t);
            } else {
                others.push(t.kind().name());
            }
        }
        let t = want.name();
        if let Some(other) = others.first() {
            return Err(format!(
                "[sink] target = \"{t}\" but the file has a [{other}] section: remove it, or set target = \"{other}\""
            ));
        }
        let target = target.ok_or_else(|| {
            format!("target = \"{t}\" needs a [{t}] section (see connector-config/{t}.toml)")
        })?;
        Ok(SinkConfig {
            kafka: raw.kafka,
            sink: raw.sink,
            mapping: raw.mapping,
            target,
            audit: raw.audit,
            metrics: raw.metrics,
        })
    }
}

/// Flag / environment overrides of a sink config.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct SinkOverrides {
    /// Kafka bootstrap servers.
    #[arg(long, env = "KAFKA_BROKERS")]
    pub kafka_brokers: Option<String>,
    /// Event topic.
    #[arg(long, env = "TRUSST_TOPIC")]
    pub topic: Option<String>,
    /// Schema registry for Avro events.
    #[arg(long, env = "SCHEMA_REGISTRY_URL")]
    pub schema_registry_url: Option<String>,
}

impl SinkConfig {
    /// Apply overrides and check the config is complete.
    pub fn resolve(mut self, o: SinkOverrides) -> Result<Self> {
        if o.kafka_brokers.is_some() {
            self.kafka.brokers = o.kafka_brokers;
        }
        if let Some(t) = o.topic {
            self.kafka.topic = t;
        }
        if o.schema_registry_url.is_some() {
            self.kafka.schema_registry_url = o.schema_registry_url;
        }
        crate::config::kafka_credentials_from_env(&mut self.kafka.properties);
        for c in &self.sink.customers {
            crate::config::check_customer(c, "[sink] customers")?;
        }
        if self
            .kafka
            .topic
            .contains(crate::config::CUSTOMER_PLACEHOLDER)
        {
            let [customer] = self.sink.customers.as_slice() else {
                return Err(Error::user(format!(
                    "the topic {:?} names {} but [sink] customers lists {} customers: list exactly one \
                     (customers = [\"acme\"]), or name the topic without the placeholder",
                    self.kafka.topic,
                    crate::config::CUSTOMER_PLACEHOLDER,
                    self.sink.customers.len()
                )));
            };
            self.kafka.topic = self
                .kafka
                .topic
                .replace(crate::config::CUSTOMER_PLACEHOLDER, customer);
        }
        if self.kafka.topic.contains(['{', '}']) {
            return Err(Error::user(format!(
                "invalid topic template {:?}: the only placeholder is {}",
                self.kafka.topic,
                crate::config::CUSTOMER_PLACEHOLDER
            )));
        }
        self.registry()?;
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        self.target.endpoints_from_env(env);
        if let Some(v) = env("TRUSST_AUDIT_DATABASE_URL") {
            self.audit.database_url = Some(v);
        }
        self.audit.validate()?;
        if self.kafka.brokers.as_deref().unwrap_or("").is_empty() {
            return Err(Error::user(
                "no Kafka brokers: set [kafka] brokers, KAFKA_BROKERS or --kafka-brokers",
            ));
        }
        let name = &self.sink.name;
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_-".contains(&b))
        {
            return Err(Error::user(format!(
                "[sink] name {name:?}: use letters, digits, '-' or '_'"
            )));
        }
        if self.kafka.dlq_partitions < 1 || self.kafka.dlq_replication_factor < 1 {
            return Err(Error::user(
                "[kafka] dlq_partitions and dlq_replication_factor must be at least 1",
            ));
        }
        if self.sink.batch_max_records == 0 {
            return Err(Error::user("[sink] batch_max_records must be at least 1"));
        }
        if self.sink.catch_up_batch_max_records < self.sink.batch_max_records {
            return Err(Error::user(format!(
                "[sink] catch_up_batch_max_records ({}) is below batch_max_records ({}): raise it, or lower batch_max_records",
                self.sink.catch_up_batch_max_records, self.sink.batch_max_records
            )));
        }
        super::mapping::Mapping::new(self.sink.target, &self.mapping)
            .validate()
            .map_err(Error::user)?;
        Ok(self)
    }

    /// The brokers (present after [`SinkConfig::resolve`]).
    pub fn brokers(&self) -> &str {
        self.kafka.brokers.as_deref().unwrap_or_default()
    }

    /// The decoder for the topic's records (with the registry client when one is configured).
    pub fn decoder(&self) -> Result<crate::event::Decoder> {
        Ok(crate::event::Decoder::new(self.registry()?))
    }

    /// The schema registry client, when a registry URL is configured.
    pub fn registry(&self) -> Result<Option<crate::event::Registry>> {
        let k = &self.kafka;
        crate::config::registry(
            k.schema_registry_url.as_deref(),
            crate::config::registry_auth(
                k.schema_registry_username.as_deref(),
                k.schema_registry_password.as_ref(),
                k.schema_registry_token.as_ref(),
            )?,
        )
    }

    /// Whether a record of `customer` (`None`: not attributed, e.g. an event published before
    /// events carried one) is this sink's to write.
    pub fn wants(&self, customer: Option<&str>) -> bool {
        self.sink.customers.is_empty()
            || customer.is_some_and(|c| self.sink.customers.iter().any(|w| w == c))
    }

    /// The consumer group.
    pub fn group_id(&self) -> String {
        self.kafka
            .group_id
            .clone()
            .unwrap_or_else(|| format!("trusst-cdc-{}", self.sink.name))
    }

    /// The dead-letter topic.
    pub fn dlq_topic(&self) -> String {
        self.kafka
            .dlq_topic
            .clone()
            .unwrap_or_else(|| format!("{}.dlq.{}", self.kafka.topic, self.sink.name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MULESOFT: &str = "[mulesoft]\nurl = \"http://x\"\nclient_id = \"i\"\nclient_secret = { env = \"FAKE_SECRET\" }\n";

    fn parse(text: &str) -> std::result::Result<SinkConfig, String> {
        crate::config::parse::<SinkConfig>(text).map_err(|e| e.to_string())
    }

    #[test]
    fn the_target_and_its_section_cannot_disagree() {
        let sf = "[sink]\nname = \"s\"\ntarget = \"salesforce\"\n";
        let err = parse(sf).unwrap_err();
        assert!(err.contains("needs a [salesforce] section"), "{err}");
        let err = parse(&format!("{sf}{MULESOFT}")).unwrap_err();
        assert!(
            err.contains("has a [mulesoft] section") && err.contains("set target = \"mulesoft\""),
            "{err}"
        );
        let cfg = parse(&format!(
            "[sink]\nname = \"m\"\ntarget = \"mulesoft\"\n{MULESOFT}"
        ))
        .unwrap();
        assert_eq!(cfg.target.kind(), TargetKind::Mulesoft);
    }

    #[test]
    fn every_shipped_config_names_its_own_target() {
        for t in TargetKind::ALL {
            let path = format!(
                "{}/connector-config/{}.toml",
                env!("CARGO_MANIFEST_DIR"),
                t.name()
            );
            let text = std::fs::read_to_string(&path).unwrap();
            let cfg = parse(&text).unwrap_or_else(|e| panic!("{path}: {e}"));
            assert_eq!(cfg.sink.target, t);
            assert_eq!(cfg.target.kind(), t);
        }
    }
}
