//! One batch: decode, keep the newest event per contact, map, write in CRM-sized calls with
//! retries, and dead-letter what cannot be written. Nothing here touches the consumer.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use async_trait::async_trait;
use rdkafka::Message;
use rdkafka::message::Headers;
use rdkafka::producer::FutureProducer;
use serde_json::json;
use tokio::sync::watch;

use super::{CRM_READY, Totals};
use crate::error::{self, Error, Result};
use crate::event::{ContactEvent, Decoder, Op};
use crate::kafka::Pending;
use crate::sink::config::{OnDelete, SinkConfig};
use crate::sink::fence::Fence;
use crate::sink::mapping::{Mapping, Record};
use crate::sink::verdict::{Verdict, of_error};
use crate::sink::{Outcome, Target, contact_ids};

/// A consumed record, detached from the consumer.
#[derive(Debug, Clone)]
pub(super) struct Msg {
    pub(super) partition: i32,
    pub(super) offset: i64,
    /// The partition's ownership epoch when the record was read (see [`Fence`]).
    pub(super) epoch: u64,
    pub(super) key: String,
    pub(super) payload: Option<Vec<u8>>,
    /// The record's [`crate::kafka::CUSTOMER_HEADER`], which tombstones carry too.
    pub(super) customer: Option<String>,
}

impl Msg {
    /// Detach a record from the consumer, stamped with its partition's ownership epoch.
    pub(super) fn read(m: &rdkafka::message::BorrowedMessage<'_>, fence: &Fence) -> Self {
        Self {
            partition: m.partition(),
            offset: m.offset(),
            epoch: fence.epoch(m.partition()),
            key: m
                .key()
                .map(|k| String::from_utf8_lossy(k).into_owned())
                .unwrap_or_default(),
            payload: m.payload().map(<[u8]>::to_vec),
            customer: m.headers().and_then(|h| {
                h.iter()
                    .find(|h| h.key == crate::kafka::CUSTOMER_HEADER)
                    .and_then(|h| h.value)
                    .map(|v| String::from_utf8_lossy(v).into_owned())
            }),
        }
    }
}

/// The offsets a set of records spans, per partition: `p0:12-40,p2:7`.
fn offsets<'m>(msgs: impl Iterator<Item = &'m Msg>) -> String {
    let mut span: BTreeMap<i32, (i64, i64)> = BTreeMap::new();
    for m in msgs {
        let e = span.entry(m.partition).or_insert((m.offset, m.offset));
        *e = (e.0.min(m.offset), e.1.max(m.offset));
    }
    let parts: Vec<String> = span
        .into_iter()
        .map(|(p, (lo, hi))| {
            if lo == hi {
                format!("p{p}:{lo}")
            } else {
                format!("p{p}:{lo}-{hi}")
            }
        })
        .collect();
    parts.join(",")
}

/// One CRM call of a batch.
#[derive(Clone, Copy)]
enum Call<'r> {
    Upsert(&'r [Record]),
    Delete(&'r [String]),
}

/// Where dead letters go: the sink's dead-letter topic, or a list in tests.
#[async_trait]
pub(super) trait DeadLetters: Send {
    /// The destination's name, for logs.
    fn name(&self) -> &str;
    /// Queue one dead-letter record for a contact.
    async fn send(&mut self, key: &str, body: Vec<u8>) -> Result<()>;
    /// Wait until every queued record is stored; a batch is committed only after.
    async fn flush(&mut self) -> Result<()>;
}

/// The dead-letter topic: records are produced without waiting, acknowledged at `flush`.
pub(super) struct DeadLetterTopic {
    pub(super) producer: FutureProducer,
    pub(super) topic: String,
    pub(super) pending: Pending,
}

#[async_trait]
impl DeadLetters for DeadLetterTopic {
    fn name(&self) -> &str {
        &self.topic
    }

    async fn send(&mut self, key: &str, body: Vec<u8>) -> Result<()> {
        self.pending
            .send(&self.producer, &self.topic, key, Some(&body))
            .await
    }

    async fn flush(&mut self) -> Result<()> {
        self.pending.wait().await.map(|_| ())
    }
}

/// What one batch needs while it is processed.
pub(super) struct BatchCtx<'a> {
    pub(super) cfg: &'a SinkConfig,
    /// On a re-drive: per contact, the offset of its newest record on the event topic.
    pub(super) newer: Option<&'a HashMap<String, (i32, i64)>>,
    pub(super) mapping: &'a Mapping,
    pub(super) decoder: &'a Decoder,
    pub(super) dead: &'a mut dyn DeadLetters,
    pub(super) source_topic: &'a str,
    pub(super) totals: &'a mut Totals,
    pub(super) shutdown: &'a mut watch::Receiver<bool>,
    /// Which records may still be written (their partition not moved since they were read).
    pub(super) fence: &'a Fence,
}

/// A decoded batch entry: the newest event per contact, with the record it came from.
struct Item<'m> {
    msg: &'m Msg,
    event: ContactEvent,
    /// The event as JSON (for the dead-letter record, whatever the topic's format).
    raw: serde_json::Value,
}

/// A record value read by a sink: the event topic's (JSON or Avro) or, on a re-drive, a
/// dead-letter record (JSON) whose `event` is the event.
enum Read {
    Event(Box<ContactEvent>, serde_json::Value),
    /// Not an event: the reason, and the event-shaped JSON when there is some.
    Bad(String, Option<serde_json::Value>),
}

impl BatchCtx<'_> {
    /// Whether the record belongs to a customer this sink writes (its header, else the
    /// event's field); a record that does not is counted and logged at debug level, never
    /// dropped without a trace.
    fn wanted(&mut self, m: &Msg, event: Option<&ContactEvent>) -> bool {
        let customer = m
            .customer
            .as_deref()
            .or_else(|| event.and_then(|e| e.customer.as_deref()));
        if self.cfg.wants(customer) {
            return true;
        }
        let label = customer.unwrap_or("none");
        tracing::debug!(
            sink = %self.cfg.sink.name, contact_id = %m.key, customer = label, partition = m.partition, offset = m.offset,
            "skipped a record of a customer not in [sink] customers"
        );
        self.totals.other_customer += 1;
        crate::metrics::sink_skipped_customer(&self.cfg.sink.name, label);
        false
    }

    /// On a re-drive: true when the contact has a newer record on the event topic than the
    /// one this dead letter came from (logged; the newer one wins).
    fn superseded_dead_letter(&self, m: &Msg, payload: &[u8]) -> bool {
        let Some(newer) = self.newer else {
            return false;
        };
        let Some(&(partition, newest)) = newer.get(&m.key) else {
            return false;
        };
        let Ok(dead) = serde_json::from_slice::<serde_json::Value>(payload) else {
            return false;
        };
        // Only a dead letter taken from the event topic can be placed against it.
        if dead["source"]["topic"].as_str() != Some(self.cfg.kafka.topic.as_str()) {
            return false;
        }
        let from = (
            dead["source"]["partition"].as_i64(),
            dead["source"]["offset"].as_i64(),
        );
        match from {
            (Some(p), Some(o)) if p == i64::from(partition) && o < newest => {
                tracing::info!(
                    sink = %self.cfg.sink.name, contact_id = %m.key, dead_letter_offset = o, newest_offset = newest, partition,
                    "re-drive: skipped a dead letter older than the contact's newest event on the topic"
                );
                true
            }
            _ => false,
        }
    }

    /// Decode one value; an `Err` (the registry unreachable, no registry configured for Avro)
    /// stops the batch uncommitted.
    async fn read(&self, payload: &[u8], redrive: bool) -> Result<Read> {
        if !redrive {
            return Ok(match self.decoder.decode(payload).await? {
                Ok(e) => {
                    let raw = serde_json::to_value(&e)
                        .map_err(|e| Error::internal("events serialize").with_source(e))?;
                    Read::Event(Box::new(e), raw)
                }
                Err(reason) => Read::Bad(reason, None),
            });
        }
        let raw = match serde_json::from_slice::<serde_json::Value>(payload) {
            Ok(v) => v.get("event").cloned().unwrap_or(serde_json::Value::Null),
            Err(e) => {
                return Ok(Read::Bad(
                    format!("dead-letter record is not JSON: {e}"),
                    None,
                ));
            }
        };
        Ok(match serde_json::from_value::<ContactEvent>(raw.clone()) {
            Ok(e) => Read::Event(Box::new(e), raw),
            Err(e) => Read::Bad(format!("record is not a trusst-cdc event: {e}"), Some(raw)),
        })
    }
}

impl BatchCtx<'_> {
    /// Decode the batch and keep the newest event per contact; undecodable records are
    /// dead-lettered (never silently skipped).
    async fn newest<'m>(&mut self, batch: &'m [Msg], redrive: bool) -> Result<Vec<Item<'m>>> {
        let mut newest: HashMap<&str, usize> = HashMap::new();
        let mut items: Vec<Option<Item<'m>>> = Vec::new();
        // Records of a partition that moved since they were read are its new owner's: it reads
        // them again from the committed offset.
        let batch: Vec<&Msg> = batch
            .iter()
            .filter(|m| self.fence.holds(m.partition, m.epoch))
            .collect();
        crate::metrics::sink_consumed(&self.cfg.sink.name, batch.len());
        for m in batch {
            self.totals.consumed += 1;
            // Another customer's record is skipped before it is decoded: a value this sink
            // cannot read is then never dead-lettered here.
            if m.customer.is_some() && !self.wanted(m, None) {
                continue;
            }
            let (event, raw) = match &m.payload {
                // A tombstone deletes on its own: once compaction has removed the delete event
                // before it, it is all a late or replaying sink sees of the deletion. When both are
                // in the batch, the tombstone supersedes the event and the delete happens once.
                None => {
                    let e = tombstone(&m.key);
                    let raw = serde_json::to_value(&e)
                        .map_err(|e| Error::internal("events serialize").with_source(e))?;
                    (e, raw)
                }
                Some(payload) if self.superseded_dead_letter(m, payload) => {
                    self.totals.superseded += 1;
                    self.totals.redrive_skipped += 1;
                    crate::metrics::sink_superseded(&self.cfg.sink.name);
                    continue;
                }
                Some(payload) => match self.read(payload, redrive).await? {
                    Read::Event(e, raw) => (*e, raw),
                    Read::Bad(reason, raw) => {
                        let bytes = if raw.is_none() {
                            Some(payload.as_slice())
                        } else {
                            None
                        };
                        self.dead_letter(m, raw.as_ref(), "decode", &reason, bytes)
                            .await?;
                        continue;
                    }
                },
            };
            if m.customer.is_none() && !self.wanted(m, Some(&event)) {
                continue;
            }
            let mut event = event;
            if let Some(i) = newest.insert(m.key.as_str(), items.len()) {
                if let Some(older) = items[i].take() {
                    event.inherit_cleared(&older.event);
                }
                self.totals.superseded += 1;
                crate::metrics::sink_superseded(&self.cfg.sink.name);
            }
            items.push(Some(Item { msg: m, event, raw }));
        }
        Ok(items.into_iter().flatten().collect())
    }

    /// Write one batch: the newest event per contact, in CRM-sized calls; what cannot be
    /// written goes to the dead letters. An `Err` leaves the batch uncommitted.
    pub(super) async fn process(
        &mut self,
        target: &mut dyn Target,
        batch: &[Msg],
        redrive: bool,
    ) -> Result<()> {
        let items = self.newest(batch, redrive).await?;
        let mut upserts: Vec<(Record, &Item)> = Vec::new();
        let mut deletes: Vec<&Item> = Vec::new();
        for it in &items {
            match it.event.op {
                Op::Upsert => match self.mapping.map(&it.event) {
                    Ok(r) => {
                        if !r.shortened.is_empty() {
                            let cut: Vec<String> = r
                                .shortened
                                .iter()
                                .map(|s| {
                                    format!("{} {} -> {} characters", s.field, s.chars, s.kept)
                                })
                                .collect();
                            tracing::warn!(
                                sink = %self.cfg.sink.name, contact_id = %r.contact_id, partition = it.msg.partition,
                                offset = it.msg.offset, shortened = %cut.join(", "),
                                "texts longer than their CRM fields written shortened to them; raise the fields' length \
                                 (and [mapping] max_length), or set text_overflow = \"dead_letter\" to hold such records back"
                            );
                            crate::metrics::sink_texts_shortened(
                                &self.cfg.sink.name,
                                r.shortened.len(),
                            );
                        }
                        upserts.push((r, it))
                    }
                    Err(e) => {
                        self.dead_letter(it.msg, Some(&it.raw), "mapping", &e.to_string(), None)
                            .await?
                    }
                },
                Op::Delete => match self.cfg.sink.on_delete {
                    OnDelete::Delete => deletes.push(it),
                    OnDelete::Clear => {
                        // The configured questions and every universal one the event names.
                        let keys = self
                            .mapping
                            .questions
                            .keys()
                            .chain(it.event.cleared_question_keys.iter().flatten())
                            .cloned();
                        upserts.push((self.mapping.cleared(&it.event.trusst_contact_id, keys), it));
                    }
                    OnDelete::Ignore => {}
                },
            }
        }
        let max = target.max_batch().max(1);
        for chunk in upserts.chunks(max) {
            let records: Vec<Record> = chunk.iter().map(|(r, _)| r.clone()).collect();
            let items: Vec<&Item> = chunk.iter().map(|(_, it)| *it).collect();
            let outcomes = self
                .with_retries(target, Call::Upsert(&records), &items)
                .await;
            self.settle(&items, outcomes).await?;
        }
        for chunk in deletes.chunks(max) {
            let ids: Vec<String> = chunk
                .iter()
                .map(|it| it.event.trusst_contact_id.clone())
                .collect();
            let outcomes = self.with_retries(target, Call::Delete(&ids), chunk).await;
            self.settle(chunk, outcomes).await?;
        }
        Ok(())
    }

    /// Retry a CRM call while it fails with a retryable error (honouring Retry-After and
    /// pauses); stop on shutdown so nothing is committed for the batch. Each attempt sends only
    /// the records whose partition this member still owns; the others come back as `None`.
    async fn with_retries(
        &mut self,
        target: &mut dyn Target,
        call: Call<'_>,
        items: &[&Item<'_>],
    ) -> Result<Vec<Option<Outcome>>> {
        let mut backoff = error::backoff(Duration::from_millis(200), self.cfg.sink.max_backoff);
        let what = match call {
            Call::Upsert(_) => "upsert",
            Call::Delete(_) => "delete",
        };
        loop {
            let (owned, in_flight) = self
                .fence
                .begin(items.iter().map(|it| (it.msg.partition, it.msg.epoch)));
            let keep: Vec<usize> = (0..items.len()).filter(|&i| owned[i]).collect();
            if keep.is_empty() {
                return Ok(vec![None; items.len()]);
            }
            let all = keep.len() == items.len();
            let result = match call {
                Call::Upsert(r) if all => target.upsert(self.mapping, r).await,
                Call::Upsert(r) => {
                    let sub: Vec<Record> = keep.iter().map(|&i| r[i].clone()).collect();
                    target.upsert(self.mapping, &sub).await
                }
                Call::Delete(ids) if all => target.delete(self.mapping, ids).await,
                Call::Delete(ids) => {
                    let sub: Vec<String> = keep.iter().map(|&i| ids[i].clone()).collect();
                    target.delete(self.mapping, &sub).await
                }
            };
            drop(in_flight);
            let e = match result {
                Ok(o) if o.len() == keep.len() => {
                    // Readiness follows the CRM: a pause makes the sink not ready until a call
                    // succeeds again.
                    crate::metrics::ready(CRM_READY, true);
                    let mut out = vec![None; items.len()];
                    for (i, o) in keep.into_iter().zip(o) {
                        out[i] = Some(o);
                    }
                    return Ok(out);
                }
                Ok(o) => {
                    return Err(Error::internal(format!(
                        "the CRM client returned {} outcomes for {} records",
                        o.len(),
                        keep.len()
                    )));
                }
                Err(e) => e,
            };
            let after = match of_error(&e) {
                Verdict::Retry(after) => after,
                Verdict::Pause(after) => {
                    crate::metrics::ready(CRM_READY, false);
                    after
                }
                Verdict::Stop | Verdict::DeadLetter => return Err(e),
            };
            let wait = after.unwrap_or_else(|| backoff.next().unwrap_or(self.cfg.sink.max_backoff));
            let sent = || keep.iter().map(|&i| items[i]);
            crate::metrics::sink_failed(&self.cfg.sink.name, keep.len());
            tracing::warn!(
                sink = %self.cfg.sink.name, topic = %self.source_topic, offsets = %offsets(sent().map(|it| it.msg)),
                contact_ids = %contact_ids(sent().map(|it| it.event.trusst_contact_id.as_str())), records = keep.len(),
                error = %e, retry_in = ?wait, "{what} failed; retrying"
            );
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.shutdown.wait_for(|v| *v) => {
                    // Kept for another attempt: the batch is neither dead-lettered nor committed.
                    return Err(Error::external("stopped while a CRM request was being retried"));
                }
            }
        }
    }

    /// Count written records, dead-letter rejected ones; a non-retryable request error
    /// dead-letters the whole chunk, a configuration error stops the sink. Records left to a
    /// partition's new owner (`None`) are neither.
    async fn settle(
        &mut self,
        items: &[&Item<'_>],
        outcomes: Result<Vec<Option<Outcome>>>,
    ) -> Result<()> {
        let n = items.len();
        match outcomes {
            Ok(o) if o.len() == n => {
                let mut written = 0;
                for (it, o) in items.iter().zip(o) {
                    match o {
                        Some(Outcome::Written) => {
                            written += 1;
                            if let Some(ts) = &it.event.source.commit_ts {
                                crate::metrics::commit_to_crm(&self.cfg.sink.name, ts);
                            }
                        }
                        Some(Outcome::Rejected(reason)) => {
                            self.dead_letter(it.msg, Some(&it.raw), "crm", &reason, None)
                                .await?
                        }
                        None => {}
                    }
                }
                self.totals.written += written;
                crate::metrics::sink_written(&self.cfg.sink.name, written);
                Ok(())
            }
            Ok(o) => Err(Error::internal(format!(
                "the CRM client returned {} outcomes for {n} records",
                o.len()
            ))),
            // A stop ends the sink; a retry or pause only comes back on shutdown: either way
            // the batch is left uncommitted, to be read again.
            Err(e) if of_error(&e).keeps_records() => Err(e),
            Err(e) => {
                for it in items {
                    if self.fence.holds(it.msg.partition, it.msg.epoch) {
                        self.dead_letter(it.msg, Some(&it.raw), "crm", &e.to_string(), None)
                            .await?;
                    }
                }
                Ok(())
            }
        }
    }

    async fn dead_letter(
        &mut self,
        m: &Msg,
        event: Option<&serde_json::Value>,
        stage: &str,
        reason: &str,
        raw: Option<&[u8]>,
    ) -> Result<()> {
        tracing::error!(
            sink = %self.cfg.sink.name, contact_id = %m.key, topic = %self.source_topic, partition = m.partition, offset = m.offset,
            stage, reason, dlq = %self.dead.name(), "record dead-lettered"
        );
        let body = json!({
            "sink": self.cfg.sink.name,
            "stage": stage,
            "reason": reason,
            "failed_at": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            "source": {"topic": self.source_topic, "partition": m.partition, "offset": m.offset},
            "contact_id": m.key,
            "event": event,
            "raw": raw.map(raw_text),
        });
        self.dead
            .send(&m.key, body.to_string().into_bytes())
            .await?;
        self.totals.dead_lettered += 1;
        self.totals.last_failure = Some(format!("{stage}: {reason}"));
        crate::metrics::sink_dead_lettered(&self.cfg.sink.name, stage);
        Ok(())
    }

    /// Print what `process` would send, sending nothing.
    pub(super) async fn dry_run(
        &mut self,
        target: &dyn Target,
        batch: &[Msg],
        redrive: bool,
    ) -> Result<()> {
        // Decoding failures are only printed here: a dry run writes nothing, not even to the DLQ.
        let mut newest: BTreeMap<String, (ContactEvent, &Msg)> = BTreeMap::new();
        for m in batch {
            self.totals.consumed += 1;
            let Some(p) = &m.payload else {
                let e = tombstone(&m.key);
                if self.wanted(m, Some(&e)) {
                    newest.insert(m.key.clone(), (e, m));
                }
                continue;
            };
            match self.read(p, redrive).await? {
                Read::Event(e, _) => {
                    if self.wanted(m, Some(&e)) {
                        newest.insert(m.key.clone(), (*e, m));
                    } else {
                        println!(
                            "SKIP {} (p{} @{}): customer {:?} is not in [sink] customers",
                            m.key, m.partition, m.offset, e.customer
                        );
                    }
                }
                Read::Bad(reason, _) => println!(
                    "WOULD DEAD-LETTER {} (p{} @{}): {reason}",
                    m.key, m.partition, m.offset
                ),
            }
        }
        let mut records = Vec::new();
        for (key, (e, m)) in newest {
            match e.op {
                Op::Delete => println!(
                    "WOULD {:?} {key} (delete event, p{} @{})",
                    self.cfg.sink.on_delete, m.partition, m.offset
                ),
                Op::Upsert => match self.mapping.map(&e) {
                    Ok(r) => records.push(r),
                    Err(err) => println!(
                        "WOULD DEAD-LETTER {key} (p{} @{}): {err}",
                        m.partition, m.offset
                    ),
                },
            }
        }
        for chunk in records.chunks(target.max_batch().max(1)) {
            for line in target.dry_run(self.mapping, chunk) {
                println!("{line}");
            }
        }
        Ok(())
    }
}

/// The delete event a tombstone stands for.
fn tombstone(contact_id: &str) -> ContactEvent {
    ContactEvent::delete(
        contact_id,
        crate::event::SourcePosition {
            lsn: String::new(),
            commit_ts: None,
            txid: None,
            reason: "tombstone".into(),
        },
    )
}

/// An undecodable value for the dead-letter record: text as it is, binary (an Avro frame) as
/// base64 with a prefix saying so.
fn raw_text(bytes: &[u8]) -> String {
    use base64::Engine;
    match std::str::from_utf8(bytes) {
        Ok(s) if !s.contains('\0') => s.to_owned(),
        _ => format!(
            "base64:{}",
            base64::engine::general_purpose::STANDARD.encode(bytes)
        ),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use serde_json::Value;

    use super::*;
    use crate::event::{QuestionResult, SourcePosition};
    use crate::sink::fake::{Answer, Call as FakeCall, FakeTarget};

    /// Dead letters kept in memory: (contact id, the dead-letter record).
    #[derive(Default)]
    struct DeadList(Vec<(String, Value)>);

    #[async_trait]
    impl DeadLetters for DeadList {
        fn name(&self) -> &str {
            "dead-list"
        }
        async fn send(&mut self, key: &str, body: Vec<u8>) -> Result<()> {
            self.0
                .push((key.to_owned(), serde_json::from_slice(&body).unwrap()));
            Ok(())
        }
        async fn flush(&mut self) -> Result<()> {
            Ok(())
        }
    }

    fn event(contact: &str, answer: &str) -> ContactEvent {
        ContactEvent {
            schema_version: 1,
            event_id: format!("e-{contact}-{answer}"),
            op: Op::Upsert,
            trusst_contact_id: contact.into(),
            external_id: None,
            stream_id: None,
            call_date: None,
            call_start_time: None,
            direction: None,
            contact_agent_id: None,
            s3_agent_id: None,
            conn_id: None,
            universal_questions: vec![QuestionResult {
                question_id: "q-1".into(),
                question_key: "resolved".into(),
                question_text: None,
                result_type: "Paragraph".into(),
                question_group: None,
                result: Some(answer.into()),
                inference_updated_at: None,
            }],
            source: SourcePosition {
                lsn: "0/1".into(),
                commit_ts: None,
                txid: None,
                reason: "stream".into(),
            },
            truncated: None,
            cleared_question_keys: None,
            customer: None,
        }
    }

    /// A sink over partitions 0 and 1 writing to a fake target, with its dead letters kept.
    struct Harness {
        cfg: SinkConfig,
        mapping: Mapping,
        decoder: Decoder,
        fence: Arc<Fence>,
        stop: watch::Sender<bool>,
        dead: DeadList,
        totals: Totals,
        next_offset: i64,
    }

    impl Harness {
        fn new(on_delete: &str) -> Self {
            Self::with_sink_lines(on_delete, "")
        }

        /// The same with more `[sink]` lines, e.g. `customers = ["acme"]`.
        fn with_sink_lines(on_delete: &str, lines: &str) -> Self {
            let cfg: SinkConfig = crate::config::parse(&format!(
                "[sink]\nname = \"fake\"\ntarget = \"mulesoft\"\non_delete = \"{on_delete}\"\nmax_backoff = \"1s\"\n{lines}\
                 [mulesoft]\nurl = \"http://127.0.0.1:9/\"\nclient_id = \"i\"\nclient_secret = {{ env = \"FAKE_SECRET\" }}\n"
            ))
            .unwrap();
            let fence = Fence::new();
            fence.assign(vec![0, 1]);
            Self {
                mapping: Mapping::new(cfg.sink.target, &cfg.mapping),
                cfg,
                decoder: Decoder::new(None),
                fence,
                stop: watch::channel(false).0,
                dead: DeadList::default(),
                totals: Totals::default(),
                next_offset: 0,
            }
        }

        fn msg(&mut self, partition: i32, key: &str, payload: Option<Vec<u8>>) -> Msg {
            self.next_offset += 1;
            Msg {
                partition,
                offset: self.next_offset,
                epoch: self.fence.epoch(partition),
                key: key.into(),
                payload,
                customer: None,
            }
        }

        fn upsert(&mut self, partition: i32, contact: &str, answer: &str) -> Msg {
            let body = serde_json::to_vec(&event(contact, answer)).unwrap();
            self.msg(partition, contact, Some(body))
        }

        async fn process(&mut self, target: &mut FakeTarget, batch: &[Msg]) -> Result<()> {
            let mut shutdown = self.stop.subscribe();
            let mut ctx = BatchCtx {
                cfg: &self.cfg,
                newer: None,
                mapping: &self.mapping,
                decoder: &self.decoder,
                dead: &mut self.dead,
                source_topic: "events",
                totals: &mut self.totals,
                shutdown: &mut shutdown,
                fence: &self.fence,
            };
            ctx.process(target, batch, false).await
        }
    }

    fn answer(target: &FakeTarget, contact: &str) -> Option<Value> {
        let s = target.state.lock().unwrap();
        let rec = s.records.get(contact)?;
        Some(rec["universal_questions"][0]["result"].clone())
    }

    fn calls(target: &FakeTarget) -> Vec<FakeCall> {
        target.state.lock().unwrap().calls.clone()
    }

    fn ids(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| (*s).to_owned()).collect()
    }

    /// `[sink] customers = ["acme"]`: globex's records (by header, even one that would not
    /// decode) and one naming no customer are skipped and counted; none is dead-lettered.
    #[tokio::test]
    async fn records_of_other_customers_are_skipped_unread_and_counted() {
        let mut h = Harness::with_sink_lines("delete", "customers = [\"acme\"]\n");
        let mut target = FakeTarget::new(10, []);
        let mut ours = h.upsert(0, "a", "1");
        ours.customer = Some("acme".into());
        let mut theirs = h.upsert(0, "b", "1");
        theirs.customer = Some("globex".into());
        let mut unreadable = h.msg(1, "x", Some(b"not an event".to_vec()));
        unreadable.customer = Some("globex".into());
        let mut tombstone = h.msg(1, "b", None);
        tombstone.customer = Some("globex".into());
        let unattributed = h.upsert(1, "c", "1");
        let batch = [ours, theirs, unreadable, tombstone, unattributed];
        h.process(&mut target, &batch).await.unwrap();
        assert_eq!(calls(&target), [FakeCall::Upsert(ids(&["a"]))]);
        assert_eq!(h.totals.other_customer, 4);
        assert_eq!(h.totals.consumed, 5);
        assert!(h.dead.0.is_empty(), "{:?}", h.dead.0);
    }

    #[tokio::test]
    async fn the_newest_event_per_contact_goes_out_in_target_sized_calls() {
        let mut h = Harness::new("delete");
        let mut target = FakeTarget::new(2, []);
        let batch = vec![
            h.upsert(0, "a", "1"),
            h.upsert(1, "b", "1"),
            h.upsert(0, "a", "2"),
            h.upsert(0, "c", "1"),
            h.upsert(0, "a", "3"),
        ];
        h.process(&mut target, &batch).await.unwrap();
        assert_eq!(
            calls(&target),
            [
                FakeCall::Upsert(ids(&["b", "c"])),
                FakeCall::Upsert(ids(&["a"]))
            ]
        );
        assert_eq!(answer(&target, "a"), Some(Value::from("3")));
        assert_eq!(
            (h.totals.consumed, h.totals.superseded, h.totals.written),
            (5, 2, 3)
        );
        assert!(h.dead.0.is_empty());
    }

    /// A question renamed: the re-emitted event clears the old key, and a later event of the
    /// same contact in the same batch (another question's re-emit, from a source session that
    /// never saw the rename) does not repeat it. Only the newest event is written, and it must
    /// still clear the old field.
    #[tokio::test]
    async fn a_superseded_events_clear_is_written_with_the_newest_one() {
        let mut h = Harness::new("delete");
        h.cfg = crate::config::parse(
            "[sink]\nname = \"fake\"\ntarget = \"salesforce\"\n\
             [salesforce]\nlogin_url = \"http://127.0.0.1:9\"\nclient_id = \"i\"\nclient_secret = { env = \"FAKE_SECRET\" }\n",
        )
        .unwrap();
        h.mapping = Mapping::new(h.cfg.sink.target, &h.cfg.mapping);
        let mut target = FakeTarget::new(10, []);
        let mut renamed = event("a", "1");
        renamed.cleared_question_keys = Some(vec!["old_key".into()]);
        let later = event("a", "2");
        let batch = [
            h.msg(0, "a", Some(serde_json::to_vec(&renamed).unwrap())),
            h.msg(0, "a", Some(serde_json::to_vec(&later).unwrap())),
        ];
        h.process(&mut target, &batch).await.unwrap();
        let s = target.state.lock().unwrap();
        let rec = &s.records["a"];
        assert_eq!(rec.get("Resolved__c"), Some(&Value::from("2")), "{rec:?}");
        assert_eq!(
            rec.get("Old_Key__c"),
            Some(&Value::Null),
            "the old field is cleared: {rec:?}"
        );
        assert_eq!(h.totals.superseded, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_retried_call_is_sent_again_and_nothing_is_dead_lettered() {
        let mut h = Harness::new("delete");
        let throttled = Verdict::Retry(Some(Duration::from_secs(30))).error("HTTP 429");
        let paused = Verdict::Pause(None).error("credentials refused");
        let mut target = FakeTarget::new(10, [Answer::Fail(throttled), Answer::Fail(paused)]);
        let batch = vec![h.upsert(0, "a", "1"), h.upsert(1, "b", "1")];
        h.process(&mut target, &batch).await.unwrap();
        assert_eq!(calls(&target).len(), 3, "two failures, then written");
        assert_eq!(answer(&target, "b"), Some(Value::from("1")));
        assert_eq!(h.totals.written, 2);
        assert!(h.dead.0.is_empty());
    }

    #[tokio::test]
    async fn a_refused_record_is_dead_lettered_with_its_reason_and_position() {
        let mut h = Harness::new("delete");
        let mut target = FakeTarget::new(10, [Answer::Reject("b".into(), "FIELD_INVALID".into())]);
        let batch = vec![h.upsert(0, "a", "1"), h.upsert(1, "b", "1")];
        h.process(&mut target, &batch).await.unwrap();
        assert_eq!(answer(&target, "a"), Some(Value::from("1")));
        assert_eq!(answer(&target, "b"), None);
        let [(key, dead)] = &h.dead.0[..] else {
            panic!("one dead letter: {:?}", h.dead.0)
        };
        assert_eq!(key, "b");
        assert_eq!(dead["stage"], "crm");
        assert_eq!(dead["reason"], "FIELD_INVALID");
        assert_eq!(dead["source"]["partition"], 1);
        assert_eq!(dead["source"]["offset"], batch[1].offset);
        assert_eq!(dead["event"]["trusst_contact_id"], "b");
    }

    #[tokio::test]
    async fn a_dead_letter_verdict_sets_aside_the_whole_call() {
        let mut h = Harness::new("delete");
        let refused = Verdict::DeadLetter.error("HTTP 400: malformed");
        let mut target = FakeTarget::new(10, [Answer::Fail(refused)]);
        let batch = vec![h.upsert(0, "a", "1"), h.upsert(1, "b", "1")];
        h.process(&mut target, &batch).await.unwrap();
        let keys: Vec<&str> = h.dead.0.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["a", "b"]);
        assert_eq!(h.totals.written, 0);
    }

    #[tokio::test]
    async fn a_stop_verdict_keeps_the_batch_for_the_next_start() {
        let mut h = Harness::new("delete");
        let forbidden = Verdict::Stop.error("HTTP 403: grant the permission");
        let mut target = FakeTarget::new(10, [Answer::Fail(forbidden)]);
        let batch = vec![h.upsert(0, "a", "1")];
        let err = h.process(&mut target, &batch).await.unwrap_err();
        assert_eq!(of_error(&err), Verdict::Stop);
        assert!(h.dead.0.is_empty(), "nothing dead-lettered on a stop");
    }

    #[tokio::test]
    async fn a_shutdown_during_a_retry_leaves_the_batch_uncommitted() {
        let mut h = Harness::new("delete");
        let down = Verdict::Retry(Some(Duration::from_secs(3600))).error("HTTP 503");
        let mut target = FakeTarget::new(10, [Answer::Fail(down)]);
        let batch = vec![h.upsert(0, "a", "1")];
        let stop = h.stop.clone();
        let stopping = async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            stop.send(true).unwrap();
        };
        let (result, ()) = tokio::join!(h.process(&mut target, &batch), stopping);
        assert!(of_error(&result.unwrap_err()).keeps_records());
        assert!(h.dead.0.is_empty());
        assert_eq!(answer(&target, "a"), None);
    }

    #[tokio::test]
    async fn undecodable_records_and_tombstones() {
        let mut h = Harness::new("delete");
        let mut target = FakeTarget::new(10, []);
        target
            .state
            .lock()
            .unwrap()
            .records
            .insert("gone".into(), Default::default());
        let batch = vec![
            h.msg(0, "bad", Some(b"not json".to_vec())),
            h.msg(1, "gone", None),
        ];
        h.process(&mut target, &batch).await.unwrap();
        let [(key, dead)] = &h.dead.0[..] else {
            panic!("one dead letter: {:?}", h.dead.0)
        };
        assert_eq!(
            (key.as_str(), dead["stage"].as_str()),
            ("bad", Some("decode"))
        );
        assert_eq!(dead["raw"], "not json");
        assert_eq!(calls(&target), [FakeCall::Delete(ids(&["gone"]))]);
        assert!(!target.state.lock().unwrap().records.contains_key("gone"));
    }

    #[tokio::test(start_paused = true)]
    async fn records_of_a_partition_revoked_during_a_retry_are_left_to_its_new_owner() {
        let mut h = Harness::new("delete");
        let down = Verdict::Retry(Some(Duration::from_secs(10))).error("HTTP 503");
        let mut target = FakeTarget::new(10, [Answer::Fail(down)]);
        let batch = vec![h.upsert(0, "a", "1"), h.upsert(1, "b", "1")];
        let fence = h.fence.clone();
        let rebalance = async {
            tokio::time::sleep(Duration::from_secs(1)).await;
            fence.revoke(vec![1]);
        };
        let (result, ()) = tokio::join!(h.process(&mut target, &batch), rebalance);
        result.unwrap();
        assert_eq!(
            calls(&target),
            [
                FakeCall::Upsert(ids(&["a", "b"])),
                FakeCall::Upsert(ids(&["a"]))
            ],
            "the retry sends only what this member still owns"
        );
        assert_eq!(answer(&target, "b"), None);
        assert_eq!(h.totals.written, 1);
        assert!(h.dead.0.is_empty());
    }

    #[test]
    fn log_summaries() {
        let m = |partition, offset| Msg {
            partition,
            offset,
            epoch: 1,
            key: String::new(),
            payload: None,
            customer: None,
        };
        let batch = [m(2, 7), m(0, 40), m(0, 12), m(0, 13)];
        assert_eq!(offsets(batch.iter()), "p0:12-40,p2:7");
        assert_eq!(offsets([].iter()), "");
    }
}
