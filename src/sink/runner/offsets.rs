//! Where a sink starts reading, how far behind it is, and which offsets it commits.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{CommitMode, Consumer};
use rdkafka::{Offset, TopicPartitionList};

use super::SinkConsumer;
use super::batch::Msg;
use crate::error::{self, Result};
use crate::sink::config::SinkConfig;

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

/// The topic's partitions, `None` while it does not exist.
pub(super) fn partitions(consumer: &SinkConsumer, topic: &str) -> Result<Option<Vec<i32>>> {
    let parts = crate::kafka::partitions(consumer, topic, Duration::from_secs(10))?;
    Ok((!parts.is_empty()).then_some(parts))
}

pub(super) fn high_watermarks(
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

pub(super) fn start_positions(
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
pub(super) const CATCH_UP_WAIT: Duration = Duration::from_secs(1);

/// How many records behind the end of the topic the assigned partitions are; `None` when it
/// cannot be told (no assignment yet, the broker not answering).
pub(super) async fn backlog(consumer: &Arc<SinkConsumer>, topic: &str) -> Option<i64> {
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
pub(super) fn batch_size(cfg: &SinkConfig, backlog: Option<i64>) -> usize {
    match backlog {
        Some(lag) if lag >= cfg.sink.catch_up_lag => {
            tracing::debug!(lag, "catching up: large batches");
            cfg.sink.catch_up_batch_max_records
        }
        _ => cfg.sink.batch_max_records,
    }
}

/// Offsets of records the CRM accepted (or the dead-letter topic holds) that are not committed
/// yet. A commit that fails because the broker restarts or the group coordinator moves is tried
/// again on the next loop turn, while the consumer keeps polling so it can rejoin its group;
/// stopping the sink there would only re-send what was already written.
#[derive(Default)]
pub(super) struct Uncommitted(BTreeMap<i32, i64>);

impl Uncommitted {
    pub(super) fn add<'m>(&mut self, batch: impl Iterator<Item = &'m Msg>) {
        for m in batch {
            let e = self.0.entry(m.partition).or_insert(0);
            // Committed offset = the next record to read.
            *e = (*e).max(m.offset + 1);
        }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Commit what is pending; a retryable failure keeps it for the next try.
    pub(super) fn commit(&mut self, consumer: &SinkConsumer, topic: &str) -> Result<()> {
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
            crate::config::parse(include_str!("../../../connector-config/salesforce.toml"))
                .unwrap();
        assert_eq!(batch_size(&cfg, None), 1000, "lag unknown: live batches");
        assert_eq!(batch_size(&cfg, Some(1999)), 1000);
        assert_eq!(batch_size(&cfg, Some(2000)), 10_000);
        assert_eq!(batch_size(&cfg, Some(1_000_000)), 10_000);
    }
}
