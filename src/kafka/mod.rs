//! Kafka plumbing shared by the source and the sinks: client configs, the event topic, and a
//! producer that keeps delivery futures so callers await them at their commit boundary.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::FromClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use rdkafka::types::RDKafkaErrorCode;

use crate::error::{self, Error, Result};

/// A librdkafka client config from brokers plus pass-through properties.
pub fn client_config(brokers: &str, properties: &BTreeMap<String, String>) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", brokers);
    for (k, v) in properties {
        c.set(k, v);
    }
    c
}

/// Build any rdkafka client, mapping config errors to user errors.
pub fn create<T: FromClientConfig>(config: &ClientConfig, what: &str) -> Result<T> {
    config
        .create()
        .map_err(|e| error::kafka(format!("creating the Kafka {what}"), e))
}

/// The idempotent producer for events: `acks=all`, idempotence on, so retries inside
/// librdkafka can neither duplicate nor reorder events of one partition.
pub fn producer(brokers: &str, properties: &BTreeMap<String, String>) -> Result<FutureProducer> {
    create(&producer_config(brokers, properties), "producer")
}

/// The settings of [`producer`]: the connector's defaults, then `properties` over them.
fn producer_config(brokers: &str, properties: &BTreeMap<String, String>) -> ClientConfig {
    let mut c = client_config(brokers, &BTreeMap::new());
    c.set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .set("compression.type", "lz4")
        .set("message.timeout.ms", "120000")
        .set("queue.buffering.max.kbytes", "262144");
    for (k, v) in properties {
        c.set(k, v);
    }
    c
}

/// librdkafka's default `message.max.bytes`.
pub const PRODUCER_MAX_MESSAGE_BYTES: usize = 1_000_000;

/// Room left in a record for the key, headers and batch framing: what the source keeps between
/// an event's encoded size and the broker's limit.
pub const RECORD_OVERHEAD: usize = 1024;

/// The largest event value the source may produce to a topic: below the smaller of the
/// producer's `message.max.bytes` (from `properties`, else librdkafka's default) and the topic's
/// `max.message.bytes`, less [`RECORD_OVERHEAD`]; and below `configured` when set.
pub fn event_limit(
    properties: &BTreeMap<String, String>,
    topic_max: Option<usize>,
    configured: Option<usize>,
) -> (usize, usize) {
    let producer_max = properties
        .get("message.max.bytes")
        .and_then(|v| v.parse().ok())
        .unwrap_or(PRODUCER_MAX_MESSAGE_BYTES);
    let record_max = topic_max.map_or(producer_max, |t| t.min(producer_max));
    let limit = record_max.saturating_sub(RECORD_OVERHEAD);
    (record_max, configured.map_or(limit, |c| c.min(limit)))
}

/// Keeps the last error librdkafka reported, which says why brokers do not answer (credentials
/// refused, a TLS handshake failed) where a metadata request only times out.
#[derive(Default)]
struct Probe(std::sync::Mutex<Option<(Option<RDKafkaErrorCode>, String)>>);

impl rdkafka::ClientContext for Probe {
    fn error(&self, error: KafkaError, reason: &str) {
        // librdkafka logs it too. A refused login is followed by "all brokers are down": keep
        // the cause, not its consequence.
        tracing::debug!(error = %error, reason, "librdkafka");
        let code = error.rdkafka_error_code();
        let mut last = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if !last.as_ref().is_some_and(|(c, why)| users_to_fix(*c, why))
            || users_to_fix(code, reason)
        {
            *last = Some((code, reason.to_owned()));
        }
    }
}

/// Errors only a settings change mends, as opposed to a broker being away: refused credentials,
/// and a certificate that does not verify (a broker restarting mid-handshake fails the handshake
/// too, and is waited for).
fn users_to_fix(code: Option<RDKafkaErrorCode>, why: &str) -> bool {
    match code {
        Some(RDKafkaErrorCode::Authentication) => true,
        Some(RDKafkaErrorCode::SSL) => why.contains("certificate verify failed"),
        _ => false,
    }
}

impl rdkafka::producer::ProducerContext for Probe {
    type DeliveryOpaque = ();
    fn delivery(&self, _: &rdkafka::producer::DeliveryResult<'_>, _: ()) {}
}

/// Prove the brokers answer a producer with these settings (cluster metadata); the error names
/// the address and, when librdkafka said why, the cause and whose fix it is.
pub async fn reach(
    brokers: &str,
    properties: &BTreeMap<String, String>,
    timeout: Duration,
) -> Result<()> {
    let p: rdkafka::producer::BaseProducer<Probe> = producer_config(brokers, properties)
        .create_with_context(Probe::default())
        .map_err(|e| error::kafka("creating the Kafka producer", e))?;
    let (answer, cause) = off_thread(move || {
        let answer = p.client().fetch_metadata(None, timeout).map(|_| ());
        // Errors reach the context only when the client is polled.
        if answer.is_err() {
            p.poll(Duration::from_millis(200));
        }
        let cause = p
            .context()
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        (answer, cause)
    })
    .await?;
    answer.map_err(|e| unreachable(brokers, timeout, cause).with_source(e))
}

/// The error for brokers that did not answer, from the last error librdkafka reported: what
/// [`users_to_fix`] names is a configuration error, anything else may pass and is retried.
fn unreachable(
    brokers: &str,
    timeout: Duration,
    cause: Option<(Option<RDKafkaErrorCode>, String)>,
) -> Error {
    match cause {
        Some((code, why)) if users_to_fix(code, &why) => {
            Error::user(if code == Some(RDKafkaErrorCode::Authentication) {
                format!(
                    "Kafka at {brokers} refused the connector's credentials ({why}); check \
                     sasl.mechanisms, sasl.username and sasl.password in [kafka.properties]"
                )
            } else {
                format!(
                    "the TLS handshake with Kafka at {brokers} failed ({why}); check security.protocol \
                     and ssl.ca.location in [kafka.properties], and that the address is the broker's \
                     TLS listener"
                )
            })
        }
        cause => {
            let why = cause
                .map(|(_, why)| format!(" ({why})"))
                .unwrap_or_default();
            Error::external(format!(
                "Kafka at {brokers} did not answer within {timeout:?}{why}; check KAFKA_BROKERS and \
                 that the broker is running"
            ))
        }
    }
}

/// Run a blocking librdkafka call (metadata) off the async threads: the source has only one.
pub async fn off_thread<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::internal(format!("a Kafka metadata request panicked: {e}")))
}

/// Settings of an existing topic that matter to the connector.
#[derive(Debug, Clone)]
pub struct TopicInfo {
    /// Partition count.
    pub partitions: usize,
    /// `cleanup.policy`.
    pub cleanup_policy: String,
    /// `max.message.bytes`: the largest record batch the topic accepts.
    pub max_message_bytes: Option<usize>,
}

/// Describe a topic; `Ok(None)` when it does not exist.
pub async fn describe_topic(
    brokers: &str,
    properties: &BTreeMap<String, String>,
    topic: &str,
) -> Result<Option<TopicInfo>> {
    let config = client_config(brokers, properties);
    let name = topic.to_owned();
    // The admin client comes back from the blocking call for the describe below.
    let (admin, partitions) = off_thread(move || -> Result<_> {
        let admin: AdminClient<DefaultClientContext> = create(&config, "admin client")?;
        let md = admin
            .inner()
            .fetch_metadata(Some(&name), Duration::from_secs(10))
            .map_err(|e| error::kafka(format!("reading metadata of topic {name}"), e))?;
        let partitions = md
            .topics()
            .iter()
            .find(|t| t.name() == name && t.error().is_none())
            .map_or(0, |t| t.partitions().len());
        Ok((admin, partitions))
    })
    .await??;
    if partitions == 0 {
        return Ok(None);
    }
    let opts = AdminOptions::new().request_timeout(Some(Duration::from_secs(10)));
    let configs = admin
        .describe_configs(&[ResourceSpecifier::Topic(topic)], &opts)
        .await
        .map_err(|e| error::kafka(format!("describing topic {topic}"), e))?;
    let mut cleanup_policy = String::from("delete");
    let mut max_message_bytes = None;
    if let Some(Ok(res)) = configs.into_iter().next() {
        if let Some(e) = res.get("cleanup.policy").and_then(|e| e.value.clone()) {
            cleanup_policy = e;
        }
        max_message_bytes = res
            .get("max.message.bytes")
            .and_then(|e| e.value.as_deref())
            .and_then(|v| v.parse().ok());
    }
    Ok(Some(TopicInfo {
        partitions,
        cleanup_policy,
        max_message_bytes,
    }))
}

/// `min.compaction.lag.ms` of the topics the source creates: 7 days during which no record,
/// delete events included, is compacted away.
pub const MIN_COMPACTION_LAG_MS: &str = "604800000";
/// `delete.retention.ms` of the topics the source creates: 7 days a tombstone stays after
/// compaction reached it.
pub const DELETE_RETENTION_MS: &str = "604800000";

/// How a new topic is replicated: on how many brokers, and how many of them must have a record
/// before an `acks=all` producer is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Replicas {
    /// The replication factor.
    pub factor: i32,
    /// `min.insync.replicas`; `None` leaves the broker's default.
    pub min_insync: Option<i32>,
}

impl From<i32> for Replicas {
    fn from(factor: i32) -> Self {
        Self {
            factor,
            min_insync: None,
        }
    }
}

/// Create `topic` as compacted when it is missing; an existing topic is left as it is.
pub async fn ensure_compacted_topic(
    brokers: &str,
    properties: &BTreeMap<String, String>,
    topic: &str,
    partitions: i32,
    replicas: impl Into<Replicas>,
) -> Result<()> {
    if describe_topic(brokers, properties, topic).await?.is_some() {
        return Ok(());
    }
    let replicas = replicas.into();
    let admin: AdminClient<DefaultClientContext> =
        create(&client_config(brokers, properties), "admin client")?;
    let min_insync = replicas.min_insync.map(|n| n.to_string());
    let mut new = NewTopic::new(topic, partitions, TopicReplication::Fixed(replicas.factor));
    if let Some(n) = &min_insync {
        new = new.set("min.insync.replicas", n);
    }
    let new = new
        .set("cleanup.policy", "compact")
        // A sink that is behind must still see deletes. A delete event stays at least
        // min.compaction.lag.ms (compaction does not touch younger records), and its tombstone at
        // least delete.retention.ms after compaction reached it; a sink applies either alone.
        .set("min.compaction.lag.ms", MIN_COMPACTION_LAG_MS)
        .set("delete.retention.ms", DELETE_RETENTION_MS);
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let res = admin
        .create_topics(&[new], &opts)
        .await
        .map_err(|e| error::kafka(format!("creating topic {topic}"), e))?;
    for r in res {
        match r {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((t, code)) => {
                return Err(
                    Error::external(format!("creating topic {t} failed: {code}"))
                        .retry(code != RDKafkaErrorCode::TopicAuthorizationFailed),
                );
            }
        }
    }
    tracing::info!(
        topic,
        partitions,
        replication_factor = replicas.factor,
        min_insync_replicas = replicas.min_insync,
        "created compacted topic"
    );
    Ok(())
}

/// A topic's partition ids from the cluster's metadata; empty while the topic does not exist.
pub fn partitions<X, C>(consumer: &C, topic: &str, timeout: Duration) -> Result<Vec<i32>>
where
    X: rdkafka::consumer::ConsumerContext,
    C: rdkafka::consumer::Consumer<X>,
{
    let md = consumer
        .fetch_metadata(Some(topic), timeout)
        .map_err(|e| error::kafka(format!("reading the partitions of {topic}"), e))?;
    Ok(md
        .topics()
        .iter()
        .filter(|t| t.name() == topic)
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect())
}

/// Assign every partition of `topic` that holds records, from its beginning, to `consumer`
/// (no group); returns each one's end offset as it is now, where a bounded read stops.
/// Blocking: call it off the async threads.
pub fn assign_to_ends<X, C>(consumer: &C, topic: &str) -> Result<HashMap<i32, i64>>
where
    X: rdkafka::consumer::ConsumerContext,
    C: rdkafka::consumer::Consumer<X>,
{
    let mut ends = HashMap::new();
    let mut tpl = rdkafka::TopicPartitionList::new();
    for p in partitions(consumer, topic, Duration::from_secs(10))? {
        let (low, high) = consumer
            .fetch_watermarks(topic, p, Duration::from_secs(10))
            .map_err(|e| error::kafka(format!("reading the offsets of {topic}"), e))?;
        if high > low {
            ends.insert(p, high);
            tpl.add_partition_offset(topic, p, rdkafka::Offset::Beginning)
                .map_err(|e| error::kafka("assigning partitions", e))?;
        }
    }
    consumer
        .assign(&tpl)
        .map_err(|e| error::kafka(format!("reading {topic}"), e))?;
    Ok(ends)
}

/// Read every partition of `topic` from its start to its end as it is now, calling `visit`
/// with each record's key, partition, offset and value (`None`: a tombstone). For bounded
/// passes over a whole topic (a re-drive's look at the event topic); joins no consumer group.
pub async fn scan(
    brokers: &str,
    properties: &BTreeMap<String, String>,
    topic: &str,
    mut visit: impl FnMut(&str, i32, i64, Option<&[u8]>),
) -> Result<u64> {
    use futures::StreamExt;
    use rdkafka::Message;
    use rdkafka::consumer::StreamConsumer;
    let mut c = client_config(brokers, properties);
    c.set(
        "group.id",
        format!("trusst-cdc-scan-{}", std::process::id()),
    )
    .set("enable.auto.commit", "false")
    .set("enable.partition.eof", "false");
    let consumer: StreamConsumer = create(&c, "consumer")?;
    let name = topic.to_owned();
    let (consumer, mut open) = off_thread(move || -> Result<_> {
        let ends = assign_to_ends(&consumer, &name)?;
        Ok((consumer, ends))
    })
    .await??;
    let mut n = 0;
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
        n += 1;
        let key = m.key().map(String::from_utf8_lossy).unwrap_or_default();
        visit(&key, m.partition(), m.offset(), m.payload());
        if open
            .get(&m.partition())
            .is_some_and(|end| m.offset() + 1 >= *end)
        {
            open.remove(&m.partition());
        }
    }
    Ok(n)
}

/// Record header naming the customer (tenant) of every record the source produces, tombstones
/// included; sinks with `[sink] customers` filter on it.
pub const CUSTOMER_HEADER: &str = "trusst-customer";

/// How long acknowledgements may take before [`Pending::wait`] says it is still waiting.
const STALLED_NOTE: Duration = Duration::from_secs(15);

/// Events sent but not yet acknowledged; [`Pending::wait`] is the commit boundary.
#[derive(Default)]
pub struct Pending {
    futures: Vec<DeliveryFuture>,
}

impl Pending {
    /// Enqueue one record (value `None` is a tombstone) without waiting for the broker.
    pub async fn send(
        &mut self,
        producer: &FutureProducer,
        topic: &str,
        key: &str,
        value: Option<&[u8]>,
    ) -> Result<()> {
        self.send_with_headers(producer, topic, key, value, &[])
            .await
    }

    /// [`Pending::send`] with record headers (name, value), e.g. the [`CUSTOMER_HEADER`] that
    /// lets a sink attribute a tombstone, which has no value to carry it.
    pub async fn send_with_headers(
        &mut self,
        producer: &FutureProducer,
        topic: &str,
        key: &str,
        value: Option<&[u8]>,
        headers: &[(&str, &str)],
    ) -> Result<()> {
        loop {
            let mut record = FutureRecord::<str, [u8]>::to(topic).key(key);
            if let Some(v) = value {
                record = record.payload(v);
            }
            if !headers.is_empty() {
                let mut h = OwnedHeaders::new_with_capacity(headers.len());
                for (name, value) in headers {
                    h = h.insert(Header {
                        key: name,
                        value: Some(*value),
                    });
                }
                record = record.headers(h);
            }
            match producer.send_result(record) {
                Ok(f) => {
                    self.futures.push(f);
                    return Ok(());
                }
                // The local queue is full: let librdkafka drain it, then try again.
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err((e, _)) => {
                    return Err(error::kafka(
                        format!("producing contact {key} to {topic}"),
                        e,
                    ));
                }
            }
        }
    }

    /// Records enqueued and not yet awaited.
    pub fn len(&self) -> usize {
        self.futures.len()
    }

    /// True when nothing is pending.
    pub fn is_empty(&self) -> bool {
        self.futures.is_empty()
    }

    /// Wait until the broker acknowledged every record; any failure fails the whole batch so the
    /// caller confirms nothing and the batch is produced again.
    pub async fn wait(&mut self) -> Result<usize> {
        let n = self.futures.len();
        let started = tokio::time::Instant::now();
        let mut note_at = started + STALLED_NOTE;
        for (i, mut f) in self.futures.drain(..).enumerate() {
            // A broker that is back but not yet serving (a coordinator loading, a leader not
            // elected) answers nothing and says nothing: say how long, so a stall is visible.
            let delivered = loop {
                match tokio::time::timeout_at(note_at, &mut f).await {
                    Ok(d) => break d,
                    Err(_) => {
                        tracing::warn!(
                            unacknowledged = n - i,
                            waited_s = started.elapsed().as_secs(),
                            "Kafka has not acknowledged every record yet; still waiting (message.timeout.ms bounds the wait, and nothing is confirmed meanwhile)"
                        );
                        note_at += STALLED_NOTE;
                    }
                }
            };
            match delivered {
                Ok(Ok(_)) => {}
                Ok(Err((e, msg))) => {
                    use rdkafka::Message;
                    let key = msg.key().map(String::from_utf8_lossy).unwrap_or_default();
                    tracing::error!(topic = msg.topic(), partition = msg.partition(), contact_id = %key, error = %e, "Kafka did not acknowledge an event");
                    return Err(error::kafka(
                        format!(
                            "Kafka did not acknowledge the event of contact {key} on {} partition {}",
                            msg.topic(),
                            msg.partition()
                        ),
                        e,
                    ));
                }
                Err(_) => {
                    return Err(Error::external(
                        "the Kafka producer was dropped before acknowledging",
                    ));
                }
            }
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Fault;

    #[test]
    fn unanswered_brokers_say_why_and_whose_fix_it_is() {
        let t = Duration::from_secs(10);
        let cause = |code, why: &str| Some((Some(code), why.to_owned()));
        let auth = unreachable(
            "b:9096",
            t,
            cause(
                RDKafkaErrorCode::Authentication,
                "SASL authentication error: Authentication failed",
            ),
        );
        assert_eq!((auth.fault, auth.retryable), (Fault::User, false));
        assert!(
            auth.message()
                .contains("refused the connector's credentials (SASL authentication error")
        );
        assert!(auth.message().contains("sasl.username and sasl.password"));
        let tls = unreachable(
            "b:9094",
            t,
            cause(
                RDKafkaErrorCode::SSL,
                "SSL handshake failed: error:0A000086:SSL routines::certificate verify failed",
            ),
        );
        assert_eq!(tls.fault, Fault::User);
        assert!(tls.message().contains("ssl.ca.location"));
        let cut = unreachable(
            "b:9094",
            t,
            cause(RDKafkaErrorCode::SSL, "SSL handshake failed: Disconnected"),
        );
        assert_eq!((cut.fault, cut.retryable), (Fault::External, true));
        // A broker that is down or restarting is waited for.
        let down = unreachable(
            "b:9092",
            t,
            cause(RDKafkaErrorCode::AllBrokersDown, "1/1 brokers are down"),
        );
        assert_eq!((down.fault, down.retryable), (Fault::External, true));
        assert!(down.message().contains("(1/1 brokers are down)"));
        // The refused login is kept over the brokers being down that follows it.
        let probe = Probe::default();
        use rdkafka::ClientContext;
        probe.error(
            KafkaError::Global(RDKafkaErrorCode::AllBrokersDown),
            "1/1 brokers are down",
        );
        probe.error(
            KafkaError::Global(RDKafkaErrorCode::Authentication),
            "SASL authentication error",
        );
        probe.error(
            KafkaError::Global(RDKafkaErrorCode::AllBrokersDown),
            "1/1 brokers are down",
        );
        let kept = probe.0.lock().unwrap().take();
        assert_eq!(
            kept,
            Some((
                Some(RDKafkaErrorCode::Authentication),
                "SASL authentication error".to_owned()
            ))
        );
        let silent = unreachable("b:9092", t, None);
        assert_eq!((silent.fault, silent.retryable), (Fault::External, true));
        assert!(
            silent
                .message()
                .contains("did not answer within 10s; check KAFKA_BROKERS")
        );
    }
}
