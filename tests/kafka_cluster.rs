//! The pipeline on a replicated Kafka cluster, as production runs it: three KRaft brokers
//! (`scripts/services.sh start-kafka-cluster`), topics at replication factor 3 with
//! `min.insync.replicas = 2`, the producer at `acks=all`. Under a steady load of completions and
//! answer changes, the leader of the event topic's first partition is killed (`kill -9`), then
//! every broker is restarted in turn (a rolling restart). Nothing is lost on the topic, the
//! source and the Salesforce sink keep running, and the CRM ends equal to the guide's query with
//! no duplicates. The pause each fault causes is printed (`--nocapture`) for BENCHMARKS.md: per
//! phase, the longest and median wait from commit to the topic of the contacts committed in it
//! (seen by a reader), and the sink's `trusst_cdc_sink_commit_to_crm_seconds` for the records the
//! CRM accepted in it (as histogram bucket bounds).
//!
//! The cluster is the test's own (`KAFKA_INSTANCE=kafka-cluster-test`, ports from
//! `CLUSTER_KAFKA_PORT`, 19400: brokers on 19400-19402, controllers on 19410-19412); the test
//! starts it and stops it when it ends.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::crm::*;
use common::load::{Load, Watcher, ids, repeats};
use common::*;
use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};

const WAIT: Duration = Duration::from_secs(120);
const BROKERS: usize = 3;

/// The test's three-broker cluster, stopped when the test ends.
struct Cluster {
    port: u16,
}

impl Cluster {
    fn up() -> Self {
        let port = std::env::var("CLUSTER_KAFKA_PORT")
            .ok()
            .and_then(|p| p.parse().ok())
            .unwrap_or(19400);
        let c = Self { port };
        c.services(&["start-kafka-cluster"]);
        c
    }

    fn services(&self, args: &[&str]) {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/services.sh");
        let out = Command::new(script)
            .args(args)
            .env("KAFKA_INSTANCE", "kafka-cluster-test")
            .env("KAFKA_PORT", self.port.to_string())
            .env("KAFKA_BROKERS_N", BROKERS.to_string())
            .output()
            .expect("run scripts/services.sh");
        assert!(
            out.status.success(),
            "services.sh {args:?} failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn brokers(&self) -> String {
        (0..BROKERS)
            .map(|i| format!("127.0.0.1:{}", self.port as usize + i))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn metadata_client(&self) -> BaseConsumer {
        rdkafka::ClientConfig::new()
            .set("bootstrap.servers", self.brokers())
            .create()
            .unwrap()
    }

    /// Leader and in-sync replicas of each partition of `topic` (broker ids = node ids 1..3).
    fn partitions(&self, topic: &str) -> Vec<(i32, Vec<i32>)> {
        let c = self.metadata_client();
        let md = c
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .expect("cluster metadata");
        md.topics()
            .iter()
            .find(|t| t.name() == topic)
            .map(|t| {
                t.partitions()
                    .iter()
                    .map(|p| (p.leader(), p.isr().to_vec()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Wait until every partition of `topics` has a leader and all three replicas in sync (what
    /// a rolling restart waits for before it takes the next broker down).
    fn wait_in_sync(&self, topics: &[&str]) {
        let deadline = Instant::now() + WAIT;
        loop {
            let lagging: Vec<String> = topics
                .iter()
                .flat_map(|t| {
                    self.partitions(t)
                        .into_iter()
                        .enumerate()
                        .filter(|(_, (leader, isr))| *leader < 1 || isr.len() < BROKERS)
                        .map(move |(p, (leader, isr))| {
                            format!("{t}/{p} leader {leader} isr {isr:?}")
                        })
                })
                .collect();
            if lagging.is_empty() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "replicas not back in sync: {lagging:?}"
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// `min.insync.replicas` and replication factor of `topic`.
    async fn replication(&self, topic: &str) -> (Option<String>, usize) {
        let admin: AdminClient<DefaultClientContext> = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", self.brokers())
            .create()
            .unwrap();
        let res = admin
            .describe_configs(&[ResourceSpecifier::Topic(topic)], &AdminOptions::new())
            .await
            .unwrap();
        let isr = res
            .into_iter()
            .next()
            .and_then(|r| r.ok())
            .and_then(|r| r.get("min.insync.replicas").and_then(|e| e.value.clone()));
        let c = self.metadata_client();
        let md = c
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .unwrap();
        let factor = md
            .topics()
            .iter()
            .find(|t| t.name() == topic)
            .and_then(|t| t.partitions().first().map(|p| p.replicas().len()))
            .unwrap_or(0);
        (isr, factor)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.services(&["stop-kafka-cluster"]);
    }
}

/// The sink's `trusst_cdc_sink_commit_to_crm_seconds` histogram: `(le, cumulative count)`.
fn crm_histogram(metrics: &str) -> Vec<(f64, f64)> {
    let scrape = common::metrics::Scrape::of(metrics);
    let mut buckets: Vec<(f64, f64)> = scrape
        .matching("trusst_cdc_sink_commit_to_crm_seconds_bucket", &[])
        .map(|s| {
            let le = s.labels["le"].parse().unwrap_or(f64::INFINITY);
            (le, s.value)
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    buckets
}

/// Records the CRM accepted between two scrapes, and the bucket bounds (`le`) under which all of
/// them and half of them fell.
fn crm_between(before: &[(f64, f64)], after: &[(f64, f64)]) -> (u64, f64, f64) {
    let diff: Vec<(f64, f64)> = after
        .iter()
        .map(|(le, n)| {
            let was = before
                .iter()
                .find(|(l, _)| l == le)
                .map_or(0.0, |(_, n)| *n);
            (*le, n - was)
        })
        .collect();
    let total = diff.last().map_or(0.0, |(_, n)| *n);
    let bound = |share: f64| {
        diff.iter()
            .find(|(_, n)| *n >= total * share && total > 0.0)
            .map_or(0.0, |(le, _)| *le)
    };
    (total as u64, bound(1.0), bound(0.5))
}

/// A phase of the test: its name, when it began, and the sink's latency histogram then.
type Phase = (String, Instant, Vec<(f64, f64)>);

fn max_p50(mut v: Vec<Duration>) -> (f64, f64) {
    v.sort();
    let max = v.last().copied().unwrap_or_default();
    let p50 = v.get(v.len() / 2).copied().unwrap_or_default();
    (max.as_secs_f64(), p50.as_secs_f64())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_kill_and_a_rolling_restart_lose_nothing() {
    let cluster = Cluster::up();
    let brokers = cluster.brokers();
    let db = TestDb::new("kcluster").await;
    let before = completed(&db, 41, 30).await;
    let mut src = SourceProc::start(
        &db,
        SourceOpts {
            brokers: Some(brokers.clone()),
            kafka_extra: "replication_factor = 3\nmin_insync_replicas = 2".into(),
            ..Default::default()
        },
    );
    src.wait_streaming();
    let topic = src.topic.clone();
    let watcher = Watcher::new(&brokers, &topic);
    watcher.wait_all(&before);

    let emu = Emulator::start(&[]);
    let (dir, cfg) = sink_config("salesforce", &topic, |t| {
        set(t, "kafka", "dlq_replication_factor", 3);
    });
    let mut sink = SinkProc::start_with_env(&emu, dir, cfg, &[], &[("KAFKA_BROKERS", &brokers)]);
    let sink_metrics = sink.metrics_url();

    // Every topic the pipeline made is replicated as configured: the source's three from its
    // settings, the sink's dead-letter topic at its replication factor with the cluster's
    // min.insync.replicas.
    let dlq = format!("{topic}.dlq.salesforce");
    let mut all = vec![
        topic.clone(),
        format!("{topic}.state"),
        format!("{topic}.control"),
    ];
    let deadline = Instant::now() + WAIT;
    while cluster.partitions(&dlq).is_empty() {
        sink.assert_running();
        assert!(Instant::now() < deadline, "the sink never created {dlq}");
        std::thread::sleep(Duration::from_millis(200));
    }
    all.push(dlq);
    for t in &all {
        let (isr, factor) = cluster.replication(t).await;
        assert_eq!(
            (isr.as_deref(), factor),
            (Some("2"), 3),
            "topic {t}: min.insync.replicas and replication factor"
        );
    }
    let in_sync = [topic.as_str(), "__consumer_offsets"];

    let load = Load::start(&db, 42);
    let mut phases: Vec<Phase> = Vec::new();
    let mut phase =
        |name: String| phases.push((name, Instant::now(), crm_histogram(&sink_metrics)));
    phase("steady, before any fault".into());
    tokio::time::sleep(Duration::from_secs(6)).await;

    let leader = cluster.partitions(&topic)[0].0;
    assert!(leader >= 1, "partition 0 has no leader");
    phase(format!(
        "kill -9 of broker {leader}, the leader of partition 0; down 12 s"
    ));
    cluster.services(&["kill-broker", &leader.to_string()]);
    tokio::time::sleep(Duration::from_secs(12)).await;
    src.assert_running();
    sink.assert_running();
    phase(format!("broker {leader} started again, until in sync"));
    cluster.services(&["start-broker", &leader.to_string()]);
    cluster.wait_in_sync(&in_sync);

    for n in 1..=BROKERS {
        phase(format!(
            "rolling restart: broker {n} stopped (SIGTERM) and started, until in sync"
        ));
        cluster.services(&["stop-broker", &n.to_string()]);
        cluster.services(&["start-broker", &n.to_string()]);
        cluster.wait_in_sync(&in_sync);
        src.assert_running();
        sink.assert_running();
    }
    phase("steady, after the faults".into());
    tokio::time::sleep(Duration::from_secs(5)).await;
    let written = load.finish().await;
    let end = Instant::now();

    watcher.wait_all(&ids(&written));
    let expected = db.expected().await;
    eventually(WAIT, "the CRM to match the seed query", || {
        crm_matches(&emu, "salesforce", &expected)
    });
    src.assert_running();
    sink.assert_running();
    let last = crm_histogram(&sink_metrics);

    eprintln!(
        "kafka_cluster: {} contacts completed under load (plus answer changes); 3 brokers, RF 3, min.insync.replicas 2",
        written.len()
    );
    eprintln!(
        "kafka_cluster: {:<80} | {:>8} {:>9} {:>9} | {:>8} {:>9} {:>9}",
        "phase", "commits", "topic max", "topic p50", "CRM recs", "CRM max <=", "CRM p50 <="
    );
    for (i, (name, start, hist)) in phases.iter().enumerate() {
        let (stop, next) = phases.get(i + 1).map_or((end, &last), |(_, s, h)| (*s, h));
        let in_phase: Vec<_> = written
            .iter()
            .filter(|(_, at)| at >= start && *at < stop)
            .cloned()
            .collect();
        let (tmax, tp50) = max_p50(watcher.latencies(&in_phase));
        let (n, cmax, cp50) = crm_between(hist, next);
        eprintln!(
            "kafka_cluster: {name:<80} | {:>8} {tmax:>8.2}s {tp50:>8.2}s | {n:>8} {cmax:>9.2}s {cp50:>9.2}s",
            in_phase.len()
        );
    }
    let reader = watcher.finish();
    let (events, again) = repeats(&reader);
    eprintln!(
        "kafka_cluster: {events} events on the topic, {again} of them published again (an event_id seen before)"
    );
    assert_matches_seed(&reader.latest(), &expected);
    // Nothing went to the dead-letter topic: every record reached the CRM.
    let mut dead = TopicReader::on(&brokers, &format!("{topic}.dlq.salesforce"));
    dead.settle(Duration::from_secs(3));
    let keys: Vec<&String> = dead.records.iter().map(|r| &r.key).collect();
    assert!(keys.is_empty(), "dead letters: {keys:?}");
    db.drop_slot(&src.slot).await;
}
