//! Prometheus metrics and the health endpoint of the long-running processes.
//!
//! One registry per process ([`global`]); the source and the sinks only call the small
//! recording functions below, and [`server`] serves `/metrics`, `/health` and `/ready`.
//! Every name starts with `trusst_cdc_` and carries its unit (`_seconds`, `_bytes`, `_requests`,
//! `_records`; counters end in `_total`). The dashboard in `dashboards/trusst-cdc.json` queries
//! these names, and a unit test keeps the two in step.

pub mod kafka;
pub mod server;

use std::sync::LazyLock;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Metric, Registry, Unit};

/// Prefix of every metric name.
pub const PREFIX: &str = "trusst_cdc";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EventLabels {
    kind: &'static str,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SlotLabels {
    slot: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TopicLabels {
    topic: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SinkLabels {
    sink: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DeadLetterLabels {
    sink: String,
    stage: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TargetLabels {
    target: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    target: &'static str,
    status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PartitionLabels {
    sink: String,
    topic: String,
    partition: i32,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CustomerLabels {
    sink: String,
    customer: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StageLabels {
    stage: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ConditionLabels {
    condition: &'static str,
}

type FloatGauge = Gauge<f64, AtomicU64>;

/// Every metric of the process.
pub struct Metrics {
    registry: Registry,
    /// Every sample name the registry can expose (a family without samples exposes nothing yet).
    series: Vec<String>,
    events_published: Family<EventLabels, Counter>,
    events_truncated: Family<TopicLabels, Counter>,
    events_oversized: Family<TopicLabels, Counter>,
    commit_to_publish: Family<TopicLabels, Histogram>,
    source_stage: Family<StageLabels, Histogram>,
    replication_lag_bytes: Family<SlotLabels, Gauge>,
    slot_wal_status: Family<SlotLabels, Gauge>,
    slot_safe_wal_size: Family<SlotLabels, Gauge>,
    replication_lag_seconds: Family<SlotLabels, FloatGauge>,
    consumed: Family<SinkLabels, Counter>,
    fetched: Family<SinkLabels, Counter>,
    written: Family<SinkLabels, Counter>,
    failed: Family<SinkLabels, Counter>,
    dead_lettered: Family<DeadLetterLabels, Counter>,
    superseded: Family<SinkLabels, Counter>,
    texts_shortened: Family<SinkLabels, Counter>,
    skipped_customer: Family<CustomerLabels, Counter>,
    consumer_lag: Family<PartitionLabels, Gauge>,
    crm_requests: Family<CallLabels, Counter>,
    crm_duration: Family<TargetLabels, Histogram>,
    commit_to_crm: Family<SinkLabels, Histogram>,
    crm_remaining: Family<TargetLabels, Gauge>,
    crm_limit: Family<TargetLabels, Gauge>,
    ready: Family<ConditionLabels, Gauge>,
    process_start: FloatGauge,
}

fn latency_histogram() -> Histogram {
    // 5 ms to about 80 s: the latency target is 200 ms, a stalled pipeline takes seconds.
    Histogram::new(exponential_buckets(0.005, 2.0, 15))
}

fn stage_histogram() -> Histogram {
    // 0.5 ms to about 65 s: a re-read or an acknowledgement takes a few milliseconds.
    Histogram::new(exponential_buckets(0.0005, 2.0, 18))
}

impl Metrics {
    /// A fresh registry with every metric registered (empty until recorded).
    pub fn new() -> Self {
        let mut m = Self {
            registry: Registry::with_prefix(PREFIX),
            series: Vec::new(),
            events_published: Family::default(),
            events_truncated: Family::default(),
            events_oversized: Family::default(),
            commit_to_publish: Family::new_with_constructor(latency_histogram),
            source_stage: Family::new_with_constructor(stage_histogram),
            replication_lag_bytes: Family::default(),
            slot_wal_status: Family::default(),
            slot_safe_wal_size: Family::default(),
            replication_lag_seconds: Family::default(),
            consumed: Family::default(),
            fetched: Family::default(),
            written: Family::default(),
            failed: Family::default(),
            dead_lettered: Family::default(),
            superseded: Family::default(),
            texts_shortened: Family::default(),
            skipped_customer: Family::default(),
            consumer_lag: Family::default(),
            crm_requests: Family::default(),
            crm_duration: Family::new_with_constructor(latency_histogram),
            commit_to_crm: Family::new_with_constructor(latency_histogram),
            crm_remaining: Family::default(),
            crm_limit: Family::default(),
            ready: Family::default(),
            process_start: FloatGauge::default(),
        };
        // Set once, when the process's registry is made: a restart shows as a new value (the
        // alert rules count the changes).
        m.process_start.set(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs_f64(),
        );
        let r = &mut Reg {
            registry: &mut m.registry,
            series: &mut m.series,
        };
        r.add(
            "events_published",
            "Events Kafka acknowledged on the event topic, by kind (upsert, delete, tombstone) and reason",
            None,
            m.events_published.clone(),
        );
        r.add(
            "events_truncated",
            "Events whose longest texts were shortened to fit the broker's size limit (listed in the event's `truncated`)",
            None,
            m.events_truncated.clone(),
        );
        r.add(
            "events_oversized",
            "Events that did not fit the broker's size limit even with every text emptied: not published, recorded on <topic>.control",
            None,
            m.events_oversized.clone(),
        );
        r.add(
            "commit_to_publish",
            "Time from a transaction's commit in PostgreSQL to Kafka's acknowledgement of its events (stream only)",
            Some(Unit::Seconds),
            m.commit_to_publish.clone(),
        );
        r.add(
            "source_stage",
            "Time each part of the source's path took, by stage (delivery, gather, queue, reread, handoff, produce, ack; see docs/monitoring.md)",
            Some(Unit::Seconds),
            m.source_stage.clone(),
        );
        r.add(
            "replication_lag",
            "WAL the slot has not confirmed yet: pg_current_wal_lsn() minus confirmed_flush_lsn",
            Some(Unit::Bytes),
            m.replication_lag_bytes.clone(),
        );
        r.add(
            "replication_slot_wal_status",
            "The slot's wal_status: 0 reserved, 1 extended, 2 unreserved (the next checkpoint may invalidate it), 3 lost, -1 unknown or missing",
            None,
            m.slot_wal_status.clone(),
        );
        r.add(
            "replication_slot_safe_wal_size",
            "WAL that can still be written before the slot may be invalidated (pg_replication_slots.safe_wal_size; absent without max_slot_wal_keep_size)",
            Some(Unit::Bytes),
            m.slot_safe_wal_size.clone(),
        );
        r.add(
            "replication_lag",
            "Age of the last commit read from the slot, when it was read",
            Some(Unit::Seconds),
            m.replication_lag_seconds.clone(),
        );
        r.add(
            "sink_records_consumed",
            "Records a sink read from its topic",
            None,
            m.consumed.clone(),
        );
        r.add(
            "sink_records_fetched",
            "Records a sink's consumer received from the brokers, counting any fetched again (librdkafka's rxmsgs)",
            None,
            m.fetched.clone(),
        );
        r.add(
            "sink_records_written",
            "Records the CRM accepted (upserts, deletes, clears)",
            None,
            m.written.clone(),
        );
        r.add(
            "sink_records_failed",
            "Records in CRM requests that failed and were tried again",
            None,
            m.failed.clone(),
        );
        r.add(
            "sink_records_dead_lettered",
            "Records sent to the sink's dead-letter topic, by stage (decode, mapping, crm)",
            None,
            m.dead_lettered.clone(),
        );
        r.add(
            "sink_records_superseded",
            "Events skipped because a newer event for the same contact was in the batch",
            None,
            m.superseded.clone(),
        );
        r.add(
            "sink_texts_shortened",
            "Texts longer than their CRM field, written shortened to it ([mapping] text_overflow = \"shorten\")",
            None,
            m.texts_shortened.clone(),
        );
        r.add(
            "sink_records_skipped_customer",
            "Records skipped because their customer is not in the sink's [sink] customers (none: not attributed)",
            None,
            m.skipped_customer.clone(),
        );
        r.add(
            "sink_consumer_lag_records",
            "Records on a partition after the sink group's committed offset (high watermark minus committed)",
            None,
            m.consumer_lag.clone(),
        );
        r.add(
            "crm_requests",
            "HTTP requests to the CRM, by target and status (`error`: no answer)",
            None,
            m.crm_requests.clone(),
        );
        r.add(
            "crm_request_duration",
            "Duration of CRM HTTP requests, answered or not",
            Some(Unit::Seconds),
            m.crm_duration.clone(),
        );
        r.add(
            "sink_commit_to_crm",
            "Time from a transaction's commit in PostgreSQL to the CRM accepting the record it changed (events with a commit time: streamed changes, also when replayed)",
            Some(Unit::Seconds),
            m.commit_to_crm.clone(),
        );
        r.add(
            "crm_api_remaining_requests",
            "API allowance left, as the CRM last reported it (Salesforce Sforce-Limit-Info, Dataverse and MuleSoft rate-limit headers)",
            None,
            m.crm_remaining.clone(),
        );
        r.add(
            "crm_api_limit_requests",
            "API allowance in the current window, as the CRM last reported it",
            None,
            m.crm_limit.clone(),
        );
        r.add(
            "ready",
            "1 when the readiness condition holds (see /ready)",
            None,
            m.ready.clone(),
        );
        r.add(
            "process_start_time",
            "When the process started, in seconds since the Unix epoch (changes on every restart)",
            Some(Unit::Seconds),
            m.process_start.clone(),
        );
        m
    }

    /// Every sample name these metrics expose once recorded: a counter's `_total`, a
    /// histogram's `_bucket`, `_sum` and `_count`, a gauge's own name.
    pub fn series(&self) -> &[String] {
        &self.series
    }

    /// The registry in the OpenMetrics text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String");
        out
    }
}

/// Registers metrics and notes the sample names each one exposes.
struct Reg<'a> {
    registry: &'a mut Registry,
    series: &'a mut Vec<String>,
}

impl Reg<'_> {
    fn add(&mut self, name: &str, help: &str, unit: Option<Unit>, metric: impl Metric) {
        let mut full = format!("{PREFIX}_{name}");
        if let Some(u) = &unit {
            full = format!("{full}_{}", u.as_str());
        }
        let suffixes: &[&str] = match metric.metric_type() {
            MetricType::Counter => &["_total"],
            MetricType::Histogram => &["_bucket", "_sum", "_count"],
            _ => &[""],
        };
        self.series
            .extend(suffixes.iter().map(|s| format!("{full}{s}")));
        match unit {
            Some(u) => self.registry.register_with_unit(name, help, u, metric),
            None => self.registry.register(name, help, metric),
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

static GLOBAL: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// The process's metrics.
pub fn global() -> &'static Metrics {
    &GLOBAL
}

/// What one published job held, counted once Kafka acknowledged it.
#[derive(Debug, Default)]
pub struct Published {
    /// Upsert events.
    pub upserts: u64,
    /// Delete events.
    pub deletes: u64,
    /// Tombstones.
    pub tombstones: u64,
    /// Commit times (microseconds since 2000-01-01, PostgreSQL's epoch) of stream events.
    pub commits: Vec<i64>,
}

impl Published {
    /// Record the job Kafka acknowledged on `topic`: counters by kind and the commit-to-publish
    /// latencies.
    pub fn acknowledged(&self, topic: &str, reason: &str) {
        let m = global();
        for (kind, n) in [
            ("upsert", self.upserts),
            ("delete", self.deletes),
            ("tombstone", self.tombstones),
        ] {
            if n > 0 {
                m.events_published
                    .get_or_create(&EventLabels {
                        kind,
                        reason: reason.to_owned(),
                    })
                    .inc_by(n);
            }
        }
        if self.commits.is_empty() {
            return;
        }
        let now = chrono::Utc::now().timestamp_micros();
        let histogram = m.commit_to_publish.get_or_create(&TopicLabels {
            topic: topic.to_owned(),
        });
        for &ts in &self.commits {
            histogram.observe(pg_micros_age(ts, now).as_secs_f64());
        }
    }
}

/// Seconds from a PostgreSQL commit time (microseconds since 2000-01-01) to `now_unix_micros`;
/// zero when the clocks disagree the other way.
pub fn pg_micros_age(pg_micros: i64, now_unix_micros: i64) -> Duration {
    const PG_EPOCH_MICROS: i64 = 946_684_800_000_000;
    let age = now_unix_micros - (pg_micros + PG_EPOCH_MICROS);
    Duration::from_micros(age.max(0) as u64)
}

/// The slot's `wal_status` as [`crate::source::slot::status_code`] numbers it, and its
/// `safe_wal_size` when PostgreSQL reports one.
pub fn slot_health(slot: &str, status: i64, safe_wal_size: Option<i64>) {
    let labels = SlotLabels {
        slot: slot.to_owned(),
    };
    let m = global();
    m.slot_wal_status.get_or_create(&labels).set(status);
    match safe_wal_size {
        Some(b) => {
            m.slot_safe_wal_size.get_or_create(&labels).set(b);
        }
        None => {
            m.slot_safe_wal_size.remove(&labels);
        }
    }
}

/// The slot's unconfirmed WAL in bytes.
pub fn replication_lag_bytes(slot: &str, bytes: i64) {
    global()
        .replication_lag_bytes
        .get_or_create(&SlotLabels {
            slot: slot.to_owned(),
        })
        .set(bytes);
}

/// A commit was read from the slot: its age is the replication lag in time.
pub fn commit_read(slot: &str, commit_time_pg_micros: i64) {
    let age = pg_micros_age(commit_time_pg_micros, chrono::Utc::now().timestamp_micros());
    source_stage("delivery", age);
    global()
        .replication_lag_seconds
        .get_or_create(&SlotLabels {
            slot: slot.to_owned(),
        })
        .set(age.as_secs_f64());
}

/// A sink read `n` records.
pub fn sink_consumed(sink: &str, n: usize) {
    global()
        .consumed
        .get_or_create(&SinkLabels {
            sink: sink.to_owned(),
        })
        .inc_by(n as u64);
}

/// A sink's consumer received `n` more records from the brokers.
pub fn sink_fetched(sink: &str, n: u64) {
    global()
        .fetched
        .get_or_create(&SinkLabels {
            sink: sink.to_owned(),
        })
        .inc_by(n);
}

/// The CRM accepted `n` records.
pub fn sink_written(sink: &str, n: u64) {
    global()
        .written
        .get_or_create(&SinkLabels {
            sink: sink.to_owned(),
        })
        .inc_by(n);
}

/// The CRM accepted a record whose change committed at `commit_ts` (the event's RFC 3339
/// `source.commit_ts`).
pub fn commit_to_crm(sink: &str, commit_ts: &str) {
    let Ok(at) = chrono::DateTime::parse_from_rfc3339(commit_ts) else {
        return;
    };
    let age = (chrono::Utc::now() - at.with_timezone(&chrono::Utc))
        .to_std()
        .unwrap_or_default();
    global()
        .commit_to_crm
        .get_or_create(&SinkLabels {
            sink: sink.to_owned(),
        })
        .observe(age.as_secs_f64());
}

/// A CRM request carrying `n` records failed and will be tried again.
pub fn sink_failed(sink: &str, n: usize) {
    global()
        .failed
        .get_or_create(&SinkLabels {
            sink: sink.to_owned(),
        })
        .inc_by(n as u64);
}

/// One record went to the dead-letter topic.
pub fn sink_dead_lettered(sink: &str, stage: &str) {
    global()
        .dead_lettered
        .get_or_create(&DeadLetterLabels {
            sink: sink.to_owned(),
            stage: stage.to_owned(),
        })
        .inc();
}

/// One part of the source's path took `took`: `delivery` (commit to its commit message read
/// from the slot), `gather` (a batch's first change read to the batch handed over), `queue`,
/// `reread`, `handoff`, `produce` and `ack` (a job's way through the publishing pipeline).
pub fn source_stage(stage: &'static str, took: Duration) {
    global()
        .source_stage
        .get_or_create(&StageLabels { stage })
        .observe(took.as_secs_f64());
}

/// An event was shortened to fit the broker's size limit.
pub fn event_truncated(topic: &str) {
    global()
        .events_truncated
        .get_or_create(&TopicLabels {
            topic: topic.to_owned(),
        })
        .inc();
}

/// An event could not be made to fit the broker's size limit and was recorded instead.
pub fn event_oversized(topic: &str) {
    global()
        .events_oversized
        .get_or_create(&TopicLabels {
            topic: topic.to_owned(),
        })
        .inc();
}

/// An older event of a contact was skipped for a newer one.
pub fn sink_superseded(sink: &str) {
    global()
        .superseded
        .get_or_create(&SinkLabels {
            sink: sink.to_owned(),
        })
        .inc();
}

/// Texts of a record were shortened to their CRM fields.
pub fn sink_texts_shortened(sink: &str, n: usize) {
    global()
        .texts_shortened
        .get_or_create(&SinkLabels {
            sink: sink.to_owned(),
        })
        .inc_by(n as u64);
}

/// A record of another customer than the sink's was skipped (`customer` is `none` when the
/// record names none).
pub fn sink_skipped_customer(sink: &str, customer: &str) {
    global()
        .skipped_customer
        .get_or_create(&CustomerLabels {
            sink: sink.to_owned(),
            customer: customer.to_owned(),
        })
        .inc();
}

/// One CRM HTTP request finished: its status (`None`: no answer) and duration.
pub fn crm_request(target: &'static str, status: Option<u16>, took: Duration) {
    let m = global();
    let status = status.map_or_else(|| "error".to_owned(), |s| s.to_string());
    m.crm_requests
        .get_or_create(&CallLabels { target, status })
        .inc();
    m.crm_duration
        .get_or_create(&TargetLabels { target })
        .observe(took.as_secs_f64());
}

/// The CRM reported its API allowance: requests left and, when known, the window's maximum.
pub fn crm_allowance(target: &'static str, remaining: u64, limit: Option<u64>) {
    let m = global();
    let clamp = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    m.crm_remaining
        .get_or_create(&TargetLabels { target })
        .set(clamp(remaining));
    if let Some(l) = limit {
        m.crm_limit
            .get_or_create(&TargetLabels { target })
            .set(clamp(l));
    }
}

/// The allowance in rate-limit response headers: Dataverse's
/// `x-ms-ratelimit-burst-remaining-xrm-requests`, or the `X-RateLimit-Remaining` /
/// `X-RateLimit-Limit` pair of MuleSoft's rate-limiting policy. `(remaining, limit)`.
pub fn allowance_from_headers(headers: &reqwest::header::HeaderMap) -> Option<(u64, Option<u64>)> {
    let num = |name: &str| headers.get(name)?.to_str().ok()?.trim().parse::<u64>().ok();
    if let Some(r) = num("x-ms-ratelimit-burst-remaining-xrm-requests") {
        return Some((r, None));
    }
    num("x-ratelimit-remaining").map(|r| (r, num("x-ratelimit-limit")))
}

/// Set a sink partition's consumer lag.
pub fn consumer_lag(sink: &str, topic: &str, partition: i32, lag: i64) {
    let labels = PartitionLabels {
        sink: sink.to_owned(),
        topic: topic.to_owned(),
        partition,
    };
    global().consumer_lag.get_or_create(&labels).set(lag);
}

/// Forget a partition's consumer lag (no longer assigned to this instance).
pub fn forget_consumer_lag(sink: &str, topic: &str, partition: i32) {
    global().consumer_lag.remove(&PartitionLabels {
        sink: sink.to_owned(),
        topic: topic.to_owned(),
        partition,
    });
}

/// Set a readiness condition (see [`server::Readiness`]); mirrored as `trusst_cdc_ready`.
pub fn ready(condition: &'static str, ok: bool) {
    global()
        .ready
        .get_or_create(&ConditionLabels { condition })
        .set(i64::from(ok));
}

/// The readiness conditions that do not hold, among `conditions`.
pub fn not_ready(conditions: &[&'static str]) -> Vec<&'static str> {
    let m = global();
    conditions
        .iter()
        .copied()
        .filter(|&condition| m.ready.get_or_create(&ConditionLabels { condition }).get() != 1)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_carry_prefix_and_units() {
        let names: std::collections::BTreeSet<String> =
            Metrics::new().series().iter().cloned().collect();
        for want in [
            "trusst_cdc_events_published_total",
            "trusst_cdc_commit_to_publish_seconds_bucket",
            "trusst_cdc_replication_lag_bytes",
            "trusst_cdc_replication_lag_seconds",
            "trusst_cdc_sink_records_written_total",
            "trusst_cdc_sink_records_failed_total",
            "trusst_cdc_sink_records_dead_lettered_total",
            "trusst_cdc_sink_consumer_lag_records",
            "trusst_cdc_crm_requests_total",
            "trusst_cdc_crm_api_remaining_requests",
        ] {
            assert!(names.contains(want), "{want} not in {names:?}");
        }
        assert!(
            names.iter().all(|n| n.starts_with("trusst_cdc_")),
            "{names:?}"
        );
    }

    /// Every series the Grafana dashboard queries is one the code registers.
    #[test]
    fn dashboard_queries_only_registered_metrics() {
        let names: std::collections::BTreeSet<String> =
            Metrics::new().series().iter().cloned().collect();
        let dashboard: serde_json::Value =
            serde_json::from_str(include_str!("../../dashboards/trusst-cdc.json"))
                .expect("dashboard is JSON");
        let mut exprs = Vec::new();
        collect_exprs(&dashboard, &mut exprs);
        assert!(
            exprs.len() >= 10,
            "the dashboard has {} queries",
            exprs.len()
        );
        let mut used = std::collections::BTreeSet::new();
        for e in &exprs {
            let mut rest = e.as_str();
            while let Some(i) = rest.find("trusst_cdc_") {
                let tail = &rest[i..];
                let end = tail
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(tail.len());
                used.insert(tail[..end].to_owned());
                rest = &tail[end..];
            }
        }
        let unknown: Vec<_> = used.iter().filter(|n| !names.contains(*n)).collect();
        assert!(
            unknown.is_empty(),
            "the dashboard queries unregistered metrics: {unknown:?}"
        );
        // And the dashboard shows every family the code registers.
        let families: std::collections::BTreeSet<String> = names
            .iter()
            .map(|n| {
                n.trim_end_matches("_bucket")
                    .trim_end_matches("_sum")
                    .trim_end_matches("_count")
                    .to_owned()
            })
            .collect();
        let shown: Vec<_> = families
            .iter()
            .filter(|f| !used.iter().any(|u| u.starts_with(f.as_str())))
            .collect();
        assert!(
            shown.is_empty(),
            "metrics missing from the dashboard: {shown:?}"
        );
    }

    /// The `trusst_cdc_*` names in a PromQL text.
    fn names_in(expr: &str, out: &mut std::collections::BTreeSet<String>) {
        let mut rest = expr;
        while let Some(i) = rest.find("trusst_cdc_") {
            let tail = &rest[i..];
            let end = tail
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(tail.len());
            out.insert(tail[..end].to_owned());
            rest = &tail[end..];
        }
    }

    /// Every series the alert rules (deploy/alerts/trusst-cdc.rules.yml) query is one the code
    /// registers, and the rules watch what the operations guide promises: the slot's lag and
    /// WAL safety, restarts, readiness, dead letters, consumer lag, commit-to-CRM latency and
    /// the CRM's API allowance.
    #[test]
    fn alert_rules_query_only_registered_metrics() {
        let names: std::collections::BTreeSet<String> =
            Metrics::new().series().iter().cloned().collect();
        let rules = include_str!("../../deploy/alerts/trusst-cdc.rules.yml");
        let mut used = std::collections::BTreeSet::new();
        let mut exprs = 0;
        // `expr:` is one line or a folded block (`expr: >-` and the more-indented lines below).
        let lines: Vec<&str> = rules.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            let Some(at) = line.find("expr:") else {
                continue;
            };
            exprs += 1;
            let indent = at;
            names_in(&line[at..], &mut used);
            for next in &lines[i + 1..] {
                if next.trim().is_empty() || next.len() - next.trim_start().len() <= indent {
                    break;
                }
                names_in(next, &mut used);
            }
        }
        assert!(exprs >= 12, "only {exprs} rules found");
        let unknown: Vec<_> = used.iter().filter(|n| !names.contains(*n)).collect();
        assert!(
            unknown.is_empty(),
            "the alert rules query unregistered metrics: {unknown:?}"
        );
        for want in [
            "trusst_cdc_replication_lag_bytes",
            "trusst_cdc_replication_slot_wal_status",
            "trusst_cdc_replication_slot_safe_wal_size_bytes",
            "trusst_cdc_process_start_time_seconds",
            "trusst_cdc_ready",
            "trusst_cdc_sink_records_dead_lettered_total",
            "trusst_cdc_sink_consumer_lag_records",
            "trusst_cdc_sink_commit_to_crm_seconds_bucket",
            "trusst_cdc_crm_api_remaining_requests",
            "trusst_cdc_crm_api_limit_requests",
        ] {
            assert!(
                used.contains(want),
                "no alert rule watches {want}: {used:?}"
            );
        }
        assert!(
            rules.contains("up{component=\"source\"} == 0"),
            "source down"
        );
    }

    #[test]
    fn the_start_time_is_now() {
        let text = Metrics::new().encode();
        let line = text
            .lines()
            .find(|l| l.starts_with("trusst_cdc_process_start_time_seconds "))
            .unwrap_or_else(|| panic!("{text}"));
        let at: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        assert!((now - at).abs() < 60.0, "{line}");
    }

    fn collect_exprs(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, v) in m {
                    match (k.as_str(), v) {
                        ("expr" | "query", serde_json::Value::String(s)) => out.push(s.clone()),
                        _ => collect_exprs(v, out),
                    }
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|v| collect_exprs(v, out)),
            _ => {}
        }
    }

    #[test]
    fn commit_age_uses_the_postgres_epoch() {
        // 2000-01-01T00:00:01Z in PostgreSQL micros, seen at 2000-01-01T00:00:03.5Z (Unix micros).
        let now = 946_684_803_500_000;
        assert_eq!(pg_micros_age(1_000_000, now), Duration::from_millis(2500));
        assert_eq!(
            pg_micros_age(10_000_000, now),
            Duration::ZERO,
            "a commit 'in the future' counts as zero"
        );
    }

    #[test]
    fn allowance_headers() {
        let mut h = reqwest::header::HeaderMap::new();
        assert_eq!(allowance_from_headers(&h), None);
        h.insert("x-ratelimit-remaining", "7".parse().unwrap());
        h.insert("x-ratelimit-limit", "10".parse().unwrap());
        assert_eq!(allowance_from_headers(&h), Some((7, Some(10))));
        h.insert(
            "x-ms-ratelimit-burst-remaining-xrm-requests",
            "5999".parse().unwrap(),
        );
        assert_eq!(allowance_from_headers(&h), Some((5999, None)));
        let mut bad = reqwest::header::HeaderMap::new();
        bad.insert("x-ratelimit-remaining", "lots".parse().unwrap());
        assert_eq!(allowance_from_headers(&bad), None);
    }

    #[test]
    fn recorded_values_show_in_the_text() {
        let m = Metrics::new();
        m.crm_requests
            .get_or_create(&CallLabels {
                target: "salesforce",
                status: "200".into(),
            })
            .inc_by(3);
        m.consumer_lag
            .get_or_create(&PartitionLabels {
                sink: "s".into(),
                topic: "t".into(),
                partition: 2,
            })
            .set(5);
        let text = m.encode();
        assert!(
            text.contains("trusst_cdc_crm_requests_total{target=\"salesforce\",status=\"200\"} 3"),
            "{text}"
        );
        assert!(
            text.contains(
                "trusst_cdc_sink_consumer_lag_records{sink=\"s\",topic=\"t\",partition=\"2\"} 5"
            ),
            "{text}"
        );
    }
}
