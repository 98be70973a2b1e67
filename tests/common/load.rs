//! Load and observation for the fault tests: contacts completed (and completed contacts
//! changed) continuously, and a topic reader on a thread of its own that notes when each
//! contact's first event arrived, so a test can measure the pause a fault causes.
#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use trusst_cdc::generate::{Generator, Options, write_contacts};

use super::{TestDb, TopicReader};

const WAIT: Duration = Duration::from_secs(90);

/// Reads the topic on a thread of its own, noting when each contact's first event arrived.
pub struct Watcher {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<HashMap<String, Instant>>>,
    thread: Option<std::thread::JoinHandle<TopicReader>>,
}

impl Watcher {
    /// Start reading `topic` from the earliest offset.
    pub fn new(brokers: &str, topic: &str) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(HashMap::new()));
        let mut reader = TopicReader::on(brokers, topic);
        let (st, se) = (stop.clone(), seen.clone());
        let thread = std::thread::spawn(move || {
            let mut done = 0;
            while !st.load(Ordering::Relaxed) {
                reader.settle(Duration::from_millis(20));
                let now = Instant::now();
                let mut seen = se.lock().unwrap();
                for r in &reader.records[done..] {
                    seen.entry(r.key.clone()).or_insert(now);
                }
                done = reader.records.len();
            }
            reader
        });
        Self {
            stop,
            seen,
            thread: Some(thread),
        }
    }

    /// Whether every contact of `ids` has an event on the topic yet.
    pub fn has_all(&self, ids: &[String]) -> bool {
        let seen = self.seen.lock().unwrap();
        ids.iter().all(|id| seen.contains_key(id))
    }

    /// Wait until every contact of `ids` has an event on the topic (panics after 90 s, naming some missing).
    pub fn wait_all(&self, ids: &[String]) {
        let deadline = Instant::now() + WAIT;
        while !self.has_all(ids) {
            let seen = self.seen.lock().unwrap();
            let missing: Vec<_> = ids
                .iter()
                .filter(|i| !seen.contains_key(*i))
                .take(5)
                .collect();
            assert!(
                Instant::now() < deadline,
                "contacts missing from the topic: {missing:?} (and maybe more)"
            );
            drop(seen);
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The waits from commit to the topic of `(id, committed)` (those seen so far).
    pub fn latencies(&self, committed: &[(String, Instant)]) -> Vec<Duration> {
        let seen = self.seen.lock().unwrap();
        committed
            .iter()
            .filter_map(|(id, at)| seen.get(id).map(|s| s.saturating_duration_since(*at)))
            .collect()
    }

    /// The longest wait from commit to the topic among `(id, committed)`.
    pub fn worst(&self, committed: &[(String, Instant)]) -> Duration {
        let seen = self.seen.lock().unwrap();
        committed
            .iter()
            .filter_map(|(id, at)| seen.get(id).map(|s| s.saturating_duration_since(*at)))
            .max()
            .unwrap_or_default()
    }

    /// Stop the thread and hand over everything read, settled for one more second.
    pub fn finish(mut self) -> TopicReader {
        self.stop.store(true, Ordering::Relaxed);
        let mut reader = self.thread.take().unwrap().join().unwrap();
        reader.settle(Duration::from_secs(1));
        reader
    }
}

/// Completes contacts (four per 100 ms) and changes answers of completed ones (one per batch)
/// until stopped; the ids and when each batch committed.
pub struct Load {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Vec<(String, Instant)>>,
}

impl Load {
    /// Start writing into `db` (contacts from the generator's `seed`).
    pub fn start(db: &TestDb, seed: u64) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (url, st) = (db.url.clone(), stop.clone());
        let task = tokio::spawn(async move {
            let mut c = trusst_cdc::pg::connect(&url).await.unwrap();
            let mut g = Generator::new(seed, Options::default());
            let mut out: Vec<(String, Instant)> = Vec::new();
            let mut n = 0u64;
            while !st.load(Ordering::Relaxed) {
                let batch: Vec<_> = (0..4).map(|_| g.contact()).collect();
                write_contacts(&mut c, &batch).await.unwrap();
                let at = Instant::now();
                out.extend(batch.into_iter().map(|b| (b.contact_id, at)));
                // A later answer for an earlier contact: its newest event must carry it.
                n += 1;
                let (id, _) = &out[(n as usize * 7) % out.len()];
                c.execute(
                    "UPDATE inferences SET result = $2, updated_at = now() \
                     WHERE contact_id = $1 AND question_id = 'q-quality-score'",
                    &[id, &((n % 10) + 1).to_string()],
                )
                .await
                .unwrap();
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            out
        });
        Self { stop, task }
    }

    pub async fn finish(self) -> Vec<(String, Instant)> {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap()
    }
}

/// The contact ids of `(id, committed)` pairs.
pub fn ids(of: &[(String, Instant)]) -> Vec<String> {
    of.iter().map(|(id, _)| id.clone()).collect()
}

/// Events on the topic and how many of them repeat an earlier event's `event_id` (published
/// again after a fault: allowed, since sinks tolerate duplicates, but worth reporting).
pub fn repeats(reader: &TopicReader) -> (usize, usize) {
    let mut seen = std::collections::HashSet::new();
    let mut total = 0;
    let mut again = 0;
    for ev in reader.records.iter().filter_map(|r| r.event()) {
        total += 1;
        if !seen.insert(ev.event_id.clone()) {
            again += 1;
        }
    }
    (total, again)
}
