//! The sinks' Kafka consumer context: consumer lag per partition and records fetched from
//! librdkafka's statistics, and readiness from the group's partition assignment.

use std::collections::BTreeSet;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, Ordering};

use rdkafka::ClientContext;
use rdkafka::statistics::{Partition, Statistics};

/// Readiness condition: the consumer joined its group and got an assignment.
pub const CONSUMER_ASSIGNED: &str = "kafka consumer assigned";

/// How often librdkafka reports statistics (and so how fresh the consumer lag is).
pub const STATS_INTERVAL_MS: &str = "5000";

/// A consumer context reporting `trusst_cdc_sink_consumer_lag_records` for one sink.
pub struct LagContext {
    sink: String,
    /// Partitions with a lag series, to drop those no longer assigned here.
    reported: Mutex<BTreeSet<(String, i32)>>,
    /// librdkafka's running count of records received, as last reported.
    fetched: AtomicI64,
}

impl LagContext {
    /// A context for the sink named `sink`.
    pub fn new(sink: &str) -> Self {
        Self {
            sink: sink.to_owned(),
            reported: Mutex::new(BTreeSet::new()),
            fetched: AtomicI64::new(0),
        }
    }
}

/// A partition's lag: the high watermark minus the group's committed offset, when librdkafka
/// knows both (it reports -1 otherwise) and the partition is assigned to this consumer.
pub fn partition_lag(p: &Partition) -> Option<i64> {
    (p.partition >= 0 && p.desired && p.consumer_lag >= 0).then_some(p.consumer_lag)
}

impl ClientContext for LagContext {
    fn stats(&self, statistics: Statistics) {
        let before = self.fetched.swap(statistics.rxmsgs, Ordering::Relaxed);
        super::sink_fetched(
            &self.sink,
            statistics.rxmsgs.saturating_sub(before).max(0) as u64,
        );
        let mut now = BTreeSet::new();
        for (topic, t) in &statistics.topics {
            for p in t.partitions.values() {
                if let Some(lag) = partition_lag(p) {
                    super::consumer_lag(&self.sink, topic, p.partition, lag);
                    now.insert((topic.clone(), p.partition));
                }
            }
        }
        let mut reported = self.reported.lock().unwrap_or_else(|e| e.into_inner());
        for (topic, p) in reported.difference(&now) {
            super::forget_consumer_lag(&self.sink, topic, *p);
        }
        *reported = now;
    }
}

/// Readiness after a rebalance: `true` once an assignment arrived. An empty assignment still
/// means the group accepted this member (more members than partitions); only a revocation or an
/// error leaves it without one.
pub fn assigned(ok: bool) {
    super::ready(CONSUMER_ASSIGNED, ok);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lag_only_for_assigned_partitions_with_known_offsets() {
        let p = |partition, desired, consumer_lag| Partition {
            partition,
            desired,
            consumer_lag,
            ..Default::default()
        };
        assert_eq!(partition_lag(&p(0, true, 12)), Some(12));
        assert_eq!(partition_lag(&p(0, true, 0)), Some(0));
        assert_eq!(
            partition_lag(&p(0, true, -1)),
            None,
            "no committed offset yet"
        );
        assert_eq!(partition_lag(&p(1, false, 3)), None, "not assigned here");
        assert_eq!(
            partition_lag(&p(-1, true, 3)),
            None,
            "librdkafka's internal partition"
        );
    }
}
