//! Recovering from a lost replication slot without a full re-publish.
//!
//! When the slot is invalidated or gone, the WAL between its last position and now is lost to
//! the stream. The topic still says how far the stream got: the newest `source.commit_ts` of
//! its events. Recovery creates a new slot first (so every change from then on is streamed),
//! then re-publishes, with the stream's own paged re-read, only the COMPLETED contacts the gap
//! may have changed:
//!
//! - those with an answer (`inferences.updated_at`, or `created_at` when the table has one)
//!   or a contact row (`contacts.created_at` / `updated_at`, when present) written since the
//!   newest commit on the topic, less a safety margin (`recover_margin`) for long transactions;
//! - those COMPLETED but absent from the topic (completed during the gap with older answers);
//! - and, for contacts on the topic whose row is gone from the database, a delete event and a
//!   tombstone (deletes during the gap).
//!
//! What it cannot see: a change during the gap that touched only a table without timestamps
//! (an `s3_conversations` row) or a question renamed during the gap; for those, re-run a
//! `backfill` over the affected dates. Contacts on the topic that are no longer COMPLETED are
//! counted and logged, not changed.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures::StreamExt;
use rdkafka::Message;
use rdkafka::consumer::StreamConsumer;
use tokio_postgres::Client;

use super::publisher::{self, Job};
use super::schema::Plan;
use super::{EventOut, Origin, enrich};
use crate::config::SourceConfig;
use crate::error::{self, Error, Result};
use crate::event::{Decoder, Op};
use crate::kafka;

/// What the event topic says about the stream so far.
#[derive(Debug, Default)]
pub struct TopicSummary {
    /// Contacts whose newest record is an upsert (not deleted).
    pub live: HashSet<String>,
    /// The newest `source.commit_ts` of any event (stream and re-emit events carry one).
    pub newest_commit: Option<DateTime<Utc>>,
    /// Records read.
    pub records: u64,
}

/// Read the whole event topic once (every partition, start to end) and summarise it.
pub async fn summarize(cfg: &SourceConfig, decoder: &Decoder) -> Result<TopicSummary> {
    let topic = cfg.kafka.topic.clone();
    let mut c = kafka::client_config(cfg.brokers(), &cfg.kafka.properties);
    c.set(
        "group.id",
        format!("trusst-cdc-recover-{}", std::process::id()),
    )
    .set("enable.auto.commit", "false")
    .set("enable.partition.eof", "false");
    let consumer: StreamConsumer = kafka::create(&c, "consumer")?;
    let probe = topic.clone();
    let (consumer, mut open) = kafka::off_thread(move || -> Result<_> {
        let ends = kafka::assign_to_ends(&consumer, &probe)?;
        Ok((consumer, ends))
    })
    .await??;
    let mut summary = TopicSummary::default();
    let started = Instant::now();
    let mut stream = consumer.stream();
    while !open.is_empty() {
        let m = match tokio::time::timeout(Duration::from_secs(60), stream.next()).await {
            Ok(Some(Ok(m))) => m,
            Ok(Some(Err(e))) => return Err(error::kafka(format!("reading {topic}"), e)),
            Ok(None) | Err(_) => {
                return Err(Error::external(format!(
                    "reading {topic} to its end stalled (partitions left: {:?})",
                    open.keys().collect::<Vec<_>>()
                )));
            }
        };
        summary.records += 1;
        let key = m
            .key()
            .map(|k| String::from_utf8_lossy(k).into_owned())
            .unwrap_or_default();
        match m.payload() {
            None => {
                summary.live.remove(&key);
            }
            Some(v) => match decoder.decode(v).await? {
                Ok(e) => {
                    if let Some(ts) = e
                        .source
                        .commit_ts
                        .as_deref()
                        .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
                    {
                        let ts = ts.with_timezone(&Utc);
                        summary.newest_commit =
                            Some(summary.newest_commit.map_or(ts, |n| n.max(ts)));
                    }
                    match e.op {
                        Op::Upsert => summary.live.insert(key),
                        Op::Delete => summary.live.remove(&key),
                    };
                }
                Err(reason) => {
                    tracing::warn!(contact_id = %key, offset = m.offset(), reason, "a record on the topic is not an event; ignored by the recovery");
                }
            },
        }
        if let Some(end) = open.get(&m.partition())
            && m.offset() + 1 >= *end
        {
            open.remove(&m.partition());
        }
        if summary.records % 50_000 == 0 {
            tracing::info!(records = summary.records, "recovery: reading the topic");
        }
    }
    tracing::info!(
        records = summary.records,
        contacts = summary.live.len(),
        newest_commit = ?summary.newest_commit,
        took = ?started.elapsed(),
        "recovery: the topic read to its end"
    );
    Ok(summary)
}

/// When the gap may have started: the newest commit on the topic less `margin`; `None` when
/// the topic holds no event with a commit time (only snapshot events): everything is re-published.
pub fn gap_start(summary: &TopicSummary, margin: Duration) -> Option<DateTime<Utc>> {
    summary
        .newest_commit
        .map(|t| t - chrono::Duration::from_std(margin).unwrap_or(chrono::Duration::hours(1)))
}

/// What a recovery published.
#[derive(Debug, Default, Clone, Copy)]
pub struct Outcome {
    /// COMPLETED contacts in the database (what a full snapshot would publish).
    pub completed: u64,
    /// Contacts re-published because their rows changed since the gap start.
    pub changed: u64,
    /// Contacts re-published because the topic did not have them.
    pub missing: u64,
    /// Delete events for contacts on the topic whose row is gone.
    pub deleted: u64,
    /// Contacts on the topic that exist but are no longer COMPLETED (logged, not changed).
    pub no_longer_completed: u64,
}

/// The "changed since `$2`" test for a contact `c`, from the time columns the tables have.
async fn changed_since_sql(client: &Client, plan: &Plan) -> Result<String> {
    let types = super::schema::column_types(client).await?;
    // `$2` as the type of a time column, when the table has that column.
    let since = |t: &str, c: &str| {
        types
            .get(&(t.to_owned(), c.to_owned()))
            .filter(|ty| matches!(ty.base.as_str(), "timestamp" | "timestamptz" | "date"))
            .map(|ty| format!("$2::text::{}", ty.name))
    };
    let mut answer = vec![format!(
        "i.updated_at >= {}",
        plan.cast("$2", "inferences", "updated_at")
    )];
    if let Some(v) = since("inferences", "created_at") {
        answer.push(format!("i.created_at >= {v}"));
    }
    let mut parts = vec![format!(
        "EXISTS (SELECT 1 FROM inferences i WHERE i.contact_id = c.contact_id AND ({}))",
        answer.join(" OR ")
    )];
    for col in ["created_at", "updated_at"] {
        if let Some(v) = since("contacts", col) {
            parts.push(format!("c.{col} >= {v}"));
        }
    }
    Ok(parts.join(" OR "))
}

/// Re-publish what the gap may have changed (see the module docs), page by page, each page
/// acknowledged by Kafka before the next; `since = None` re-publishes every COMPLETED contact.
pub(super) async fn republish(
    client: &Client,
    plan: &Plan,
    out: &EventOut,
    summary: &TopicSummary,
    since: Option<DateTime<Utc>>,
    slot_lsn: u64,
    page: usize,
) -> Result<Outcome> {
    let origin = Origin {
        lsn: slot_lsn,
        commit_ts: 0,
        xid: 0,
    };
    let changed = changed_since_sql(client, plan).await?;
    // (Without a start every contact is re-published; -infinity keeps the query valid.)
    let since_text = since.map_or_else(
        || "-infinity".to_owned(),
        |t| t.naive_utc().format("%Y-%m-%d %H:%M:%S%.6f").to_string(),
    );
    let mut outcome = Outcome::default();
    let mut after = String::new();
    let started = Instant::now();
    loop {
        let bound = if after.is_empty() {
            String::new()
        } else {
            format!(
                " AND c.contact_id > {}",
                plan.cast("$3", "contacts", "contact_id")
            )
        };
        let sql = format!(
            "SELECT concat(c.contact_id), ({changed}) FROM contacts c WHERE {} {bound} ORDER BY c.contact_id LIMIT $1",
            Plan::completed("c")
        );
        let limit = page as i64;
        let since_param: &(dyn tokio_postgres::types::ToSql + Sync) = &since_text;
        let rows = if after.is_empty() {
            client.query(&sql, &[&limit, since_param]).await
        } else {
            client.query(&sql, &[&limit, since_param, &after]).await
        }
        .map_err(|e| error::pg("paging the contacts to recover", e))?;
        let Some(last) = rows.last() else { break };
        after = enrich::text_at(last, 0)?;
        let full = rows.len() == page;
        let mut ids = Vec::new();
        for r in &rows {
            outcome.completed += 1;
            let id = enrich::text_at(r, 0)?;
            let touched: bool = since.is_none() || r.try_get(1).unwrap_or(true);
            if touched {
                outcome.changed += 1;
                ids.push(id);
            } else if !summary.live.contains(&id) {
                outcome.missing += 1;
                ids.push(id);
            }
        }
        if !ids.is_empty() {
            let mut job = Job::at(ids, origin, "recover");
            // A contact the topic has may have lost its last answer during the gap.
            job.lost = job
                .ids
                .iter()
                .filter(|id| summary.live.contains(*id))
                .cloned()
                .collect();
            publisher::publish_and_wait(client, plan, out, job).await?;
        }
        if !full {
            break;
        }
    }
    // Contacts the topic has whose row is gone: deleted during the gap.
    let live: Vec<String> = summary.live.iter().cloned().collect();
    for chunk in live.chunks(page.max(1)) {
        let sql = format!(
            "SELECT k, EXISTS (SELECT 1 FROM contacts c WHERE c.contact_id = {id}), \
                    EXISTS (SELECT 1 FROM contacts c WHERE c.contact_id = {id} AND {completed}) \
             FROM unnest($1::text[]) AS k",
            id = plan.cast("k", "contacts", "contact_id"),
            completed = Plan::completed("c"),
        );
        let rows = client
            .query(&sql, &[&chunk])
            .await
            .map_err(|e| error::pg("looking up the contacts on the topic", e))?;
        let mut gone = Vec::new();
        let mut left = Vec::new();
        for r in &rows {
            let k: String = enrich::text_at(r, 0)?;
            let exists: bool = r.try_get(1).unwrap_or(true);
            let completed: bool = r.try_get(2).unwrap_or(true);
            if !exists {
                gone.push(k);
            } else if !completed {
                outcome.no_longer_completed += 1;
                left.push(k);
            }
        }
        if !left.is_empty() {
            // Left COMPLETED during the gap: their answers are emptied, as the stream does.
            let mut job = Job::at(left.clone(), origin, "recover");
            job.withdrawn = left.into_iter().collect();
            publisher::publish_and_wait(client, plan, out, job).await?;
        }
        if !gone.is_empty() {
            outcome.deleted += gone.len() as u64;
            let mut job = Job::at(gone.clone(), origin, "recover");
            job.deleted = gone.into_iter().collect();
            publisher::publish_and_wait(client, plan, out, job).await?;
        }
    }
    tracing::info!(
        completed = outcome.completed,
        republished_changed = outcome.changed,
        republished_missing = outcome.missing,
        deleted = outcome.deleted,
        took = ?started.elapsed(),
        "recovery: re-published what the gap may have changed (a full snapshot would have published every COMPLETED contact)"
    );
    if outcome.no_longer_completed > 0 {
        tracing::info!(
            contacts = outcome.no_longer_completed,
            "recovery: contacts on the topic are no longer COMPLETED in the database; re-published without answers"
        );
    }
    Ok(outcome)
}
