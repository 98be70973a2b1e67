//! `trusst-cdc status`: the pipeline's state in one place — for every source given (one per
//! customer database) its customer, the slot's lag and the event topic's end offsets; for every
//! sink its topic, customers, consumer lag, dead-letter count and the sync audit's last rows.
//!
//! It only reads: no consumer group is joined (committed offsets are looked up, not consumed),
//! so it is safe beside running sinks.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use serde::Serialize;

use crate::config::SourceConfig;
use crate::error::{self, Error, Result};
use crate::sink::config::{SinkConfig, SinkOverrides};

const TIMEOUT: Duration = Duration::from_secs(10);

/// Audit rows shown per sink.
const AUDIT_ROWS: i64 = 5;

/// Everything `status` reports; printed as text or JSON.
#[derive(Debug, Serialize)]
pub struct Report {
    /// One entry per source config.
    pub sources: Vec<SourceState>,
    /// One entry per sink config.
    pub sinks: Vec<SinkState>,
    /// What could not be read or looks wrong, each with the fix.
    pub problems: Vec<String>,
}

/// One source: its customer, replication slot and event topic.
#[derive(Debug, Serialize)]
pub struct SourceState {
    /// Config file it came from.
    pub config: PathBuf,
    /// `[source] customer` (as resolved: explicit, from the secret, or the default).
    pub customer: String,
    /// The replication slot; `None` when it does not exist or could not be read.
    pub slot: Option<SlotState>,
    /// The event topic.
    pub topic: TopicState,
}

/// The replication slot as PostgreSQL reports it.
#[derive(Debug, Serialize)]
pub struct SlotState {
    /// Slot name.
    pub name: String,
    /// A source is connected to it.
    pub active: bool,
    /// Position the source confirmed (everything before it is on Kafka).
    pub confirmed_flush_lsn: Option<String>,
    /// WAL bytes written after the confirmed position: what the source still has to read.
    pub lag_bytes: Option<i64>,
    /// PostgreSQL's own measure of how far the connected source's flush is behind, in seconds.
    pub flush_lag_seconds: Option<f64>,
    /// `reserved`, `extended`, `unreserved` or `lost` (PostgreSQL 13+).
    pub wal_status: Option<String>,
    /// Whether the slot would survive a failover to a standby, and why.
    pub failover: Option<(bool, String)>,
}

/// A topic's offsets.
#[derive(Debug, Serialize)]
pub struct TopicState {
    /// Topic name.
    pub name: String,
    /// Per partition: (low, high) watermarks.
    pub partitions: BTreeMap<i32, (i64, i64)>,
    /// Sum of the high watermarks: records ever written.
    pub end_offsets_total: i64,
}

/// One sink's consumer group, dead letters and audit.
#[derive(Debug, Serialize)]
pub struct SinkState {
    /// `[sink] name`.
    pub name: String,
    /// Config file it came from.
    pub config: PathBuf,
    /// The event topic it reads.
    pub topic: String,
    /// `[sink] customers`: the customers it writes (empty: all).
    pub customers: Vec<String>,
    /// Consumer group.
    pub group: String,
    /// Per partition: records after the group's committed offset (all of them when it has none).
    pub lag: BTreeMap<i32, i64>,
    /// Sum of `lag`.
    pub lag_total: i64,
    /// False when the group never committed (the sink has not run yet).
    pub has_committed: bool,
    /// Dead-letter topic.
    pub dlq_topic: String,
    /// Records on the dead-letter topic (it is compacted by contact id, so at most one per
    /// contact is kept once compaction ran).
    pub dead_letters: i64,
    /// Newest sync audit rows, when the sink has an audit database.
    pub audit: Option<Vec<AuditRow>>,
}

/// One `crm_sync_status` row.
#[derive(Debug, Serialize)]
pub struct AuditRow {
    /// Row id (`<sink>-<window start>-<random>`).
    pub sync_id: String,
    /// CRM.
    pub crm_system: String,
    /// End of the window, UTC.
    pub last_sync_time: String,
    /// Records written.
    pub records_synced: Option<i32>,
    /// Records dead-lettered.
    pub records_failed: Option<i32>,
    /// success, partial or failed.
    pub status: String,
    /// The window's last failure.
    pub error_message: Option<String>,
}

/// Load the sink configs, applying the same environment overrides the `sink` command reads.
pub fn load_sinks(paths: &[PathBuf]) -> Result<Vec<(PathBuf, SinkConfig)>> {
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    paths
        .iter()
        .map(|p| {
            let overrides = SinkOverrides {
                kafka_brokers: env("KAFKA_BROKERS"),
                topic: env("TRUSST_TOPIC"),
                schema_registry_url: env("SCHEMA_REGISTRY_URL"),
            };
            let cfg = crate::config::load::<SinkConfig>(p)?.resolve(overrides)?;
            Ok((p.clone(), cfg))
        })
        .collect()
}

/// Gather the report. Unreachable parts become entries in `problems` rather than errors, so
/// one down service does not hide the rest.
pub async fn gather(
    sources: &[(PathBuf, SourceConfig)],
    sinks: &[(PathBuf, SinkConfig)],
) -> Report {
    let mut problems = Vec::new();
    let mut source_states = Vec::new();
    for (path, source) in sources {
        source_states.push(gather_source(path, source, &mut problems).await);
    }
    let mut states = Vec::new();
    for (path, cfg) in sinks {
        let brokers = cfg.brokers().to_owned();
        let (props, topic, group, dlq) = (
            cfg.kafka.properties.clone(),
            cfg.kafka.topic.clone(),
            cfg.group_id(),
            cfg.dlq_topic(),
        );
        // rdkafka's metadata and offset calls block: keep them off the async workers.
        let offsets = tokio::task::spawn_blocking(move || {
            sink_offsets(&brokers, &props, &topic, &group, &dlq)
        })
        .await
        .map_err(|e| Error::internal(format!("reading the sink's offsets: {e}")))
        .and_then(|r| r);
        let (lag, has_committed, dead_letters) = offsets.unwrap_or_else(|e| {
            problems.push(format!("sink {}: {e}", cfg.sink.name));
            (BTreeMap::new(), false, 0)
        });
        if !sources.is_empty()
            && !sources
                .iter()
                .any(|(_, s)| s.kafka.topic == cfg.kafka.topic)
        {
            problems.push(format!(
                "sink {} reads topic {}, which none of the sources given publishes: pass its source with another \
                 --config, or correct [kafka] topic in {}",
                cfg.sink.name,
                cfg.kafka.topic,
                path.display()
            ));
        }
        let audit = match cfg.audit.database_url.as_deref().filter(|u| !u.is_empty()) {
            None => None,
            Some(url) => match audit_rows(url, &cfg.audit.table, &cfg.sink.name).await {
                Ok(rows) => Some(rows),
                Err(e) => {
                    problems.push(format!("sink {} audit: {e}", cfg.sink.name));
                    None
                }
            },
        };
        states.push(SinkState {
            name: cfg.sink.name.clone(),
            config: path.clone(),
            topic: cfg.kafka.topic.clone(),
            customers: cfg.sink.customers.clone(),
            group: cfg.group_id(),
            lag_total: lag.values().sum(),
            lag,
            has_committed,
            dlq_topic: cfg.dlq_topic(),
            dead_letters,
            audit,
        });
    }
    Report {
        sources: source_states,
        sinks: states,
        problems,
    }
}

/// One source's slot and topic; what cannot be read goes to `problems`, prefixed with the
/// customer when several sources are reported.
async fn gather_source(
    path: &std::path::Path,
    source: &SourceConfig,
    problems: &mut Vec<String>,
) -> SourceState {
    let who = format!("customer {} ({})", source.customer(), path.display());
    let slot = match slot_state(source).await {
        Ok(Some(s)) => {
            if s.wal_status.as_deref() == Some("lost") {
                problems.push(format!(
                    "{who}: slot {} has lost WAL it needed (wal_status = lost): run `trusst-cdc source --recover` (a new \
                     slot and a bounded re-publish; see the README, \"When the replication slot is lost\")",
                    s.name
                ));
            }
            Some(s)
        }
        Ok(None) => {
            problems.push(format!(
                "{who}: replication slot {} does not exist: start `trusst-cdc source` (a first start creates it; a source \
                 that streamed from it before stops and says to run `trusst-cdc source --recover`)",
                source.source.slot
            ));
            None
        }
        Err(e) => {
            problems.push(format!("{who}: slot: {e}"));
            None
        }
    };
    let brokers = source.brokers().to_owned();
    let properties = source.kafka.properties.clone();
    let topic_name = source.kafka.topic.clone();
    let kafka =
        tokio::task::spawn_blocking(move || topic_state(&brokers, &properties, &topic_name))
            .await
            .map_err(|e| Error::internal(format!("reading the topic: {e}")))
            .and_then(|r| r);
    let topic = kafka.unwrap_or_else(|e| {
        problems.push(format!("{who}: Kafka: {e}"));
        TopicState {
            name: source.kafka.topic.clone(),
            partitions: BTreeMap::new(),
            end_offsets_total: 0,
        }
    });
    SourceState {
        config: path.to_owned(),
        customer: source.customer().to_owned(),
        slot,
        topic,
    }
}

async fn slot_state(source: &SourceConfig) -> Result<Option<SlotState>> {
    let client = crate::pg::connect(source.database_url()).await?;
    let failover = match crate::source::setup::server(&client).await {
        Ok(server) => {
            let health = crate::source::slot::read(&client, &source.source.slot).await?;
            let sync: String = client
                .query_one(
                    "SELECT coalesce(current_setting('synchronized_standby_slots', true), '')",
                    &[],
                )
                .await
                .map(|r| r.get(0))
                .unwrap_or_default();
            Some(crate::source::slot::failover_readiness(
                &source.source.slot,
                server.major,
                server.standby,
                &health,
                &sync,
                source.source.failover_slot,
            ))
        }
        Err(_) => None,
    };
    let row = client
        .query_opt(
            "SELECT s.slot_name::text, s.active, s.confirmed_flush_lsn::text, \
                    pg_wal_lsn_diff(CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END, \
                                    s.confirmed_flush_lsn)::bigint, \
                    s.wal_status, \
                    extract(epoch FROM r.flush_lag)::float8 \
             FROM pg_replication_slots s \
             LEFT JOIN pg_stat_replication r ON r.pid = s.active_pid \
             WHERE s.slot_name = $1",
            &[&source.source.slot],
        )
        .await
        .map_err(|e| error::pg("reading pg_replication_slots", e))?;
    Ok(row.map(|r| SlotState {
        name: r.get(0),
        active: r.get(1),
        confirmed_flush_lsn: r.get(2),
        lag_bytes: r.get(3),
        wal_status: r.get(4),
        flush_lag_seconds: r.get(5),
        failover,
    }))
}

fn topic_state(
    brokers: &str,
    properties: &BTreeMap<String, String>,
    topic: &str,
) -> Result<TopicState> {
    let consumer: BaseConsumer = crate::kafka::create(
        &crate::kafka::client_config(brokers, properties),
        "consumer",
    )?;
    let watermarks = watermarks(&consumer, topic)?.ok_or_else(|| {
        Error::user(format!(
            "topic {topic} does not exist: start `trusst-cdc source` (it creates the topic)"
        ))
    })?;
    Ok(TopicState {
        name: topic.to_owned(),
        end_offsets_total: watermarks.values().map(|(_, h)| h).sum(),
        partitions: watermarks,
    })
}

/// Low and high watermarks per partition; `None` when the topic does not exist.
fn watermarks(consumer: &BaseConsumer, topic: &str) -> Result<Option<BTreeMap<i32, (i64, i64)>>> {
    let parts = crate::kafka::partitions(consumer, topic, TIMEOUT)?;
    if parts.is_empty() {
        return Ok(None);
    }
    let mut out = BTreeMap::new();
    for p in parts {
        let w = consumer
            .fetch_watermarks(topic, p, TIMEOUT)
            .map_err(|e| error::kafka(format!("reading offsets of {topic}"), e))?;
        out.insert(p, w);
    }
    Ok(Some(out))
}

fn sink_offsets(
    brokers: &str,
    properties: &BTreeMap<String, String>,
    topic: &str,
    group: &str,
    dlq: &str,
) -> Result<(BTreeMap<i32, i64>, bool, i64)> {
    let mut config = crate::kafka::client_config(brokers, properties);
    config.set("group.id", group);
    let consumer: BaseConsumer = crate::kafka::create(&config, "consumer")?;
    let marks = watermarks(&consumer, topic)?
        .ok_or_else(|| Error::user(format!("topic {topic} does not exist")))?;
    let mut tpl = TopicPartitionList::new();
    for p in marks.keys() {
        tpl.add_partition(topic, *p);
    }
    let committed = consumer
        .committed_offsets(tpl, TIMEOUT)
        .map_err(|e| error::kafka(format!("reading offsets of group {group}"), e))?;
    let mut has_committed = false;
    let mut lag = BTreeMap::new();
    for (p, (low, high)) in &marks {
        let from = match committed.find_partition(topic, *p).map(|e| e.offset()) {
            Some(Offset::Offset(o)) => {
                has_committed = true;
                o
            }
            _ => *low,
        };
        lag.insert(*p, (high - from).max(0));
    }
    let dead_letters = watermarks(&consumer, dlq)?
        .map(|m| m.values().map(|(l, h)| h - l).sum())
        .unwrap_or(0);
    Ok((lag, has_committed, dead_letters))
}

async fn audit_rows(url: &str, table: &str, sink: &str) -> Result<Vec<AuditRow>> {
    let client = crate::pg::connect(url).await?;
    // The table name was validated when the config was loaded; sync ids start with "<sink>-".
    let rows = client
        .query(
            &format!(
                "SELECT sync_id::text, crm_system::text, to_char(last_sync_time, 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'), \
                        records_synced, records_failed, status::text, error_message \
                 FROM {table} WHERE left(sync_id, length($1) + 1) = $1 || '-' \
                 ORDER BY last_sync_time DESC LIMIT {AUDIT_ROWS}"
            ),
            &[&sink],
        )
        .await
        .map_err(|e| error::pg(format!("reading {table}"), e))?;
    Ok(rows
        .into_iter()
        .map(|r| AuditRow {
            sync_id: r.get(0),
            crm_system: r.get(1),
            last_sync_time: r.get(2),
            records_synced: r.get(3),
            records_failed: r.get(4),
            status: r.get(5),
            error_message: r.get(6),
        })
        .collect())
}

/// The report for a terminal.
pub fn render(r: &Report) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    for src in &r.sources {
        let _ = writeln!(
            s,
            "source {} (customer {}):",
            src.config.display(),
            src.customer
        );
        render_source(&mut s, src);
    }
    render_sinks(&mut s, r);
    for p in &r.problems {
        let _ = writeln!(s, "problem: {p}");
    }
    s
}

/// A source's slot and topic lines, indented under its heading.
fn render_source(s: &mut String, r: &SourceState) {
    use std::fmt::Write;
    match &r.slot {
        Some(slot) => {
            let _ = writeln!(
                s,
                "  slot {}: {}, confirmed {}, lag {}{}",
                slot.name,
                if slot.active { "active" } else { "inactive" },
                slot.confirmed_flush_lsn.as_deref().unwrap_or("-"),
                slot.lag_bytes.map(bytes).unwrap_or_else(|| "-".into()),
                slot.flush_lag_seconds
                    .map(|l| format!(" ({l:.3} s behind)"))
                    .unwrap_or_default(),
            );
            if let Some((_, why)) = &slot.failover {
                let _ = writeln!(s, "      failover: {why}");
            }
        }
        None => s.push_str("  slot: -\n"),
    }
    let parts: Vec<String> = r
        .topic
        .partitions
        .iter()
        .map(|(p, (_, h))| format!("p{p}={h}"))
        .collect();
    let _ = writeln!(
        s,
        "  topic {}: {} records written ({})",
        r.topic.name,
        r.topic.end_offsets_total,
        parts.join(" ")
    );
}

/// One line per sink (and its audit rows).
fn render_sinks(s: &mut String, r: &Report) {
    use std::fmt::Write;
    for k in &r.sinks {
        let lag: Vec<String> = k.lag.iter().map(|(p, l)| format!("p{p}={l}")).collect();
        let _ = writeln!(
            s,
            "sink {} (group {}, topic {}, customers {}): lag {}{} ({}), dead letters {} on {}",
            k.name,
            k.group,
            k.topic,
            if k.customers.is_empty() {
                "all".to_owned()
            } else {
                k.customers.join(",")
            },
            k.lag_total,
            if k.has_committed {
                ""
            } else {
                ", never committed"
            },
            lag.join(" "),
            k.dead_letters,
            k.dlq_topic
        );
        match &k.audit {
            None => {}
            Some(rows) if rows.is_empty() => s.push_str("    audit: no rows yet\n"),
            Some(rows) => {
                for a in rows {
                    let _ = writeln!(
                        s,
                        "    {} {:<7} synced {:>6} failed {:>4}  {}{}",
                        a.last_sync_time,
                        a.status,
                        a.records_synced.unwrap_or(0),
                        a.records_failed.unwrap_or(0),
                        a.sync_id,
                        a.error_message
                            .as_deref()
                            .map(|m| format!("  ({m})"))
                            .unwrap_or_default()
                    );
                }
            }
        }
    }
}

fn bytes(n: i64) -> String {
    match n {
        n if n >= 1 << 30 => format!("{:.1} GiB", n as f64 / (1u64 << 30) as f64),
        n if n >= 1 << 20 => format!("{:.1} MiB", n as f64 / (1u64 << 20) as f64),
        n if n >= 1 << 10 => format!("{:.1} KiB", n as f64 / 1024.0),
        n => format!("{n} B"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_part() {
        let r = Report {
            sources: vec![SourceState {
                config: "source.toml".into(),
                customer: "acme".into(),
                slot: Some(SlotState {
                    name: "trusst_cdc".into(),
                    active: true,
                    confirmed_flush_lsn: Some("0/16B3748".into()),
                    lag_bytes: Some(3 << 20),
                    flush_lag_seconds: Some(0.25),
                    wal_status: Some("reserved".into()),
                    failover: Some((false, "slot trusst_cdc would not survive a failover".into())),
                }),
                topic: TopicState {
                    name: "trusst.contacts".into(),
                    partitions: BTreeMap::from([(0, (0, 40)), (1, (0, 2))]),
                    end_offsets_total: 42,
                },
            }],
            sinks: vec![SinkState {
                name: "salesforce".into(),
                config: "sf.toml".into(),
                topic: "trusst.contacts".into(),
                customers: vec!["acme".into()],
                group: "trusst-cdc-salesforce".into(),
                lag: BTreeMap::from([(0, 5), (1, 0)]),
                lag_total: 5,
                has_committed: true,
                dlq_topic: "trusst.contacts.dlq.salesforce".into(),
                dead_letters: 1,
                audit: Some(vec![AuditRow {
                    sync_id: "salesforce-x".into(),
                    crm_system: "salesforce".into(),
                    last_sync_time: "2026-01-15T00:00:00.000Z".into(),
                    records_synced: Some(37),
                    records_failed: Some(1),
                    status: "partial".into(),
                    error_message: Some("crm: bad".into()),
                }]),
            }],
            problems: vec!["sink mulesoft: topic x does not exist".into()],
        };
        let text = render(&r);
        assert!(
            text.contains("source source.toml (customer acme):"),
            "{text}"
        );
        assert!(
            text.contains(
                "slot trusst_cdc: active, confirmed 0/16B3748, lag 3.0 MiB (0.250 s behind)"
            ),
            "{text}"
        );
        assert!(
            text.contains("topic trusst.contacts: 42 records written (p0=40 p1=2)"),
            "{text}"
        );
        assert!(
            text.contains(
                "sink salesforce (group trusst-cdc-salesforce, topic trusst.contacts, customers acme): lag 5 (p0=5 p1=0), dead letters 1"
            ),
            "{text}"
        );
        assert!(
            text.contains("partial synced     37 failed    1  salesforce-x  (crm: bad)"),
            "{text}"
        );
        assert!(text.contains("problem: sink mulesoft"), "{text}");
    }
}
