//! The publishing pipeline: re-read touched contacts, then produce their events, in two stages
//! that run beside the replication reader.
//!
//! The reader hands over a [`Job`] per batch and goes back to the stream at once, so decoding the
//! WAL, the enrichment query and the Kafka round trip overlap instead of taking turns. Re-reads
//! run on one or more connections of the pipeline's own; jobs enter the re-read in order, and
//! a job that names a contact still being read for an earlier job waits for that read
//! ([`ReadGate`]), so a contact in two jobs is read for the later one after the earlier read.
//! Events are produced strictly in job order, so the newest event per key is always the
//! freshest state.
//!
//! That order must also hold across sources: a standby that took the slot over re-reads and
//! publishes the contacts again, and a read of this source's must not reach Kafka after those.
//! A standby can take over only once this source has not answered PostgreSQL for the slot's
//! lease (`wal_sender_timeout`), so no event is handed to the producer once half of the lease
//! has passed since the read it comes from began (the `fence`); the producer itself holds an
//! event at most that long (`message.timeout.ms`, see `event_producer`).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_postgres::{Client, Row, Statement};

use super::readgate::ReadGate;
use super::schema::Plan;
use super::{EventOut, Origin, enrich};
use crate::error::{Error, Result};
use crate::event::{ContactEvent, SourcePosition, lsn as fmt_lsn};
use crate::kafka::Pending;
use crate::metrics::{Published, source_stage as stage};

/// Jobs queued per stage before the reader waits: enough to keep both stages busy.
const STAGE_QUEUE: usize = 2;

/// A job as queued, with the moment it was handed over (for the `queue` stage's time).
type Queued = (Job, Instant, oneshot::Sender<Result<usize>>);

/// Contacts to re-read and publish, with where each change came from.
pub(super) struct Job {
    /// Contact ids, each at most once.
    pub ids: Vec<String>,
    /// Per-contact origin of the change; contacts without one use `origin`.
    pub origins: HashMap<String, Origin>,
    /// Contacts whose row was deleted: absent from the re-read, they get a delete event.
    pub deleted: HashSet<String>,
    /// Origin for contacts missing from `origins` (snapshot pages, re-emits).
    pub origin: Option<Origin>,
    /// `stream`, `snapshot`, `question`, `backfill` or `recover`: the event's `source.reason`.
    pub reason: &'static str,
    /// Further transactions whose changes the job covers (beyond the origins').
    pub xids: Vec<u32>,
    /// Keys of the universal questions at the job's stream position: an event lists those its
    /// contact has no answer to, so a target clears them. `None`: read them from the database.
    pub universal: Option<Arc<[String]>>,
    /// Keys of questions that stopped being universal (or were renamed or deleted): cleared too.
    pub retired: Arc<BTreeSet<String>>,
    /// Contacts that may have lost their last universal answer: when the re-read no longer
    /// returns one that is still COMPLETED, it gets an event with every answer cleared.
    pub lost: HashSet<String>,
    /// Contacts that left COMPLETED: when the re-read finds one still not COMPLETED, it gets an
    /// event with every answer cleared (its answers are no longer final).
    pub withdrawn: HashSet<String>,
}

impl Job {
    /// Contacts that all share one origin (snapshot pages, re-emits, backfill pages).
    pub fn at(ids: Vec<String>, origin: Origin, reason: &'static str) -> Self {
        Self {
            ids,
            origins: HashMap::new(),
            deleted: HashSet::new(),
            origin: Some(origin),
            reason,
            xids: Vec::new(),
            universal: None,
            retired: Arc::default(),
            lost: HashSet::new(),
            withdrawn: HashSet::new(),
        }
    }

    /// The contacts that may have lost their answers or left COMPLETED and are neither in
    /// `rows` (the re-read) nor deleted: the ones whose contact row must be read to know.
    fn lost_absent(&self, rows: &[Row]) -> Result<Vec<String>> {
        if self.lost.is_empty() && self.withdrawn.is_empty() {
            return Ok(Vec::new());
        }
        let present = enrich::row_ids(rows)?;
        let mut ids: Vec<String> = self
            .lost
            .union(&self.withdrawn)
            .filter(|id| !present.contains(*id) && !self.deleted.contains(*id))
            .cloned()
            .collect();
        ids.sort_unstable();
        Ok(ids)
    }

    /// Every contact the job reads or publishes: what orders its read against other jobs'.
    fn contacts(&self) -> Vec<String> {
        let mut all: Vec<String> = self
            .ids
            .iter()
            .chain(&self.lost)
            .chain(&self.withdrawn)
            .chain(&self.deleted)
            .cloned()
            .collect();
        all.sort_unstable();
        all.dedup();
        all
    }

    /// The streamed transactions behind the job (none for snapshot and backfill pages).
    fn xids(&self) -> Vec<i64> {
        let mut x: Vec<i64> = self
            .origins
            .values()
            .chain(self.origin.as_ref())
            .map(|o| o.xid)
            .chain(self.xids.iter().copied())
            .filter(|xid| *xid != 0)
            .map(i64::from)
            .collect();
        x.sort_unstable();
        x.dedup();
        x
    }
}

/// A re-read connection with its prepared statements.
struct Reader {
    client: Client,
    statement: Statement,
    visibility: Statement,
}

impl Reader {
    async fn new(client: Client, plan: &Plan) -> Result<Self> {
        Ok(Self {
            statement: enrich::prepare(&client, plan).await?,
            visibility: enrich::prepare_visibility(&client).await?,
            client,
        })
    }

    /// Wait until the job's transactions are visible, then read its contacts: the rows, the
    /// contact rows of those absent, and the latest moment the events may be produced.
    async fn read(
        &self,
        job: &Job,
        plan: &Plan,
        fence: Option<Duration>,
    ) -> Result<(Vec<Row>, Absent, Option<Instant>)> {
        enrich::await_visible(&self.client, &self.visibility, &job.xids()).await?;
        // The server takes the read's snapshot after this, never before.
        let deadline = fence.map(|f| Instant::now() + f);
        let rows = enrich::fetch(&self.client, &self.statement, &job.ids).await?;
        let absent = enrich::contacts(&self.client, plan, &job.lost_absent(&rows)?).await?;
        Ok((rows, absent, deadline))
    }
}

/// Completes with the number of events once Kafka acknowledged every record of a job.
pub(super) type Done = oneshot::Receiver<Result<usize>>;

/// A job with its re-read rows, the contact rows of those that lost their answers, and the
/// latest moment its events may be handed to the producer.
type Fetched = (
    Job,
    Vec<Row>,
    Absent,
    Option<Instant>,
    Instant,
    oneshot::Sender<Result<usize>>,
);

/// Contacts absent from the re-read: their answer-less event and whether they are COMPLETED.
type Absent = HashMap<String, (ContactEvent, bool)>;

/// The two stages (enrichment, production); dropping it stops both.
pub(super) struct Publisher {
    tx: mpsc::Sender<Queued>,
    tasks: [JoinHandle<()>; 2],
}

impl Drop for Publisher {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Publisher {
    /// Start the stages: `clients` are connections of their own (at least one), used for
    /// nothing else; reads of jobs that share no contact run on them at once. With a `fence`,
    /// a job whose events are not all handed to the producer within that time after its read
    /// began fails instead (the session then replays it from the slot).
    pub async fn start(
        clients: Vec<Client>,
        out: EventOut,
        plan: &Plan,
        fence: Option<Duration>,
    ) -> Result<Self> {
        if clients.is_empty() {
            return Err(Error::internal(
                "the publishing pipeline needs a connection",
            ));
        }
        let mut readers = Vec::with_capacity(clients.len());
        for client in clients {
            readers.push(Reader::new(client, plan).await?);
        }
        let plan = plan.clone();
        let (tx, mut jobs) = mpsc::channel::<Queued>(STAGE_QUEUE);
        // Reads are handed on in job order, each as the promise of its result, so the writer
        // produces in job order however the reads overlap.
        let (etx, mut fetched) =
            mpsc::channel::<oneshot::Receiver<Fetched>>(STAGE_QUEUE + readers.len());
        let reader = tokio::spawn(async move {
            let mut free = readers;
            let mut gate = ReadGate::new();
            // Each read hands its connection back when it ends, with its job's sequence number.
            let mut running = tokio::task::JoinSet::<(u64, Reader)>::new();
            while let Some((job, queued, done)) = jobs.recv().await {
                let contacts = job.contacts();
                // A free connection, and no read in flight of a contact this job names.
                loop {
                    while let Some(ended) = running.try_join_next() {
                        let Ok((seq, r)) = ended else {
                            let _ = done.send(Err(read_lost()));
                            return;
                        };
                        gate.finish(seq);
                        free.push(r);
                    }
                    if !free.is_empty() && gate.can_start(contacts.iter()) {
                        break;
                    }
                    match running.join_next().await {
                        Some(Ok((seq, r))) => {
                            gate.finish(seq);
                            free.push(r);
                        }
                        // A read that panicked took its connection (and its contacts' place
                        // in the gate) with it.
                        Some(Err(_)) | None => {
                            let _ = done.send(Err(read_lost()));
                            return;
                        }
                    }
                }
                let Some(r) = free.pop() else { return };
                let seq = gate.start(contacts);
                let started = Instant::now();
                stage("queue", started - queued);
                let (ftx, frx) = oneshot::channel();
                if etx.send(frx).await.is_err() {
                    return;
                }
                let plan = plan.clone();
                running.spawn(async move {
                    // The rows become events in the next stage while this connection, and the
                    // job's contacts with it, are free again.
                    match r.read(&job, &plan, fence).await {
                        Ok((rows, absent, deadline)) => {
                            stage("reread", started.elapsed());
                            let _ = ftx.send((job, rows, absent, deadline, Instant::now(), done));
                        }
                        Err(e) => {
                            let _ = done.send(Err(e));
                        }
                    }
                    (seq, r)
                });
            }
            // Reads still running finish before the stage ends (dropping `running` would
            // abort them).
            while running.join_next().await.is_some() {}
        });
        let writer = tokio::spawn(async move {
            while let Some(next) = fetched.recv().await {
                // A failed read already answered its job.
                let Ok((job, rows, absent, deadline, read, done)) = next.await else {
                    continue;
                };
                let started = Instant::now();
                stage("handoff", started - read);
                let mut states = match enrich::build(rows) {
                    Ok(states) => states,
                    Err(e) => {
                        let _ = done.send(Err(e));
                        continue;
                    }
                };
                let mut pending = Pending::default();
                match produce(&out, &mut pending, &job, &mut states, absent, deadline).await {
                    // Acknowledgements are awaited off this stage, so the next job's records
                    // are produced while the broker works on this one's.
                    Ok(tally) => {
                        let produced = Instant::now();
                        stage("produce", produced - started);
                        let topic = out.topic.clone();
                        tokio::spawn(async move {
                            let res = pending.wait().await.map(|_| {
                                stage("ack", produced.elapsed());
                                tally.acknowledged(&topic, job.reason);
                                events(&tally)
                            });
                            let _ = done.send(res);
                        });
                    }
                    Err(e) => {
                        let _ = done.send(Err(e));
                    }
                }
            }
        });
        Ok(Self {
            tx,
            tasks: [reader, writer],
        })
    }

    /// Queue a job; waits only while both stages are full.
    pub async fn submit(&self, job: Job) -> Result<Done> {
        let (done, rx) = oneshot::channel();
        self.tx
            .send((job, Instant::now(), done))
            .await
            .map_err(|_| Error::internal("the publishing pipeline stopped"))?;
        Ok(rx)
    }
}

/// A re-read task ended without handing its connection back (it panicked).
fn read_lost() -> Error {
    Error::internal("a re-read of the publishing pipeline failed; the session restarts")
}

/// Wait for Kafka's acknowledgement of a job: its events published.
pub(super) async fn acknowledged(done: Done) -> Result<usize> {
    done.await.map_err(|_| dropped())?
}

/// The pipeline ended without answering a job.
pub(super) fn dropped() -> Error {
    Error::internal("the publishing pipeline stopped before Kafka acknowledged a batch")
}

/// Snapshot or backfill pages handed to the pipeline, oldest first, each with what its caller
/// records once it is acknowledged; at most `bound` wait before the next page does.
pub(super) struct Pages<T> {
    queue: std::collections::VecDeque<(Done, T)>,
    bound: usize,
}

impl<T> Pages<T> {
    /// An empty queue holding at most `bound` unacknowledged pages.
    pub fn new(bound: usize) -> Self {
        Self {
            queue: std::collections::VecDeque::new(),
            bound,
        }
    }

    /// Add a page; past the bound, wait for the oldest and return it with its events published.
    pub async fn push(&mut self, done: Done, page: T) -> Result<Option<(usize, T)>> {
        self.queue.push_back((done, page));
        if self.queue.len() > self.bound {
            return self.next().await;
        }
        Ok(None)
    }

    /// Wait for the oldest page, if any.
    pub async fn next(&mut self) -> Result<Option<(usize, T)>> {
        match self.queue.pop_front() {
            Some((done, page)) => Ok(Some((acknowledged(done).await?, page))),
            None => Ok(None),
        }
    }
}

/// Re-read `job.ids` on `client`, produce their events and wait until Kafka acknowledged them
/// (one-off jobs where no pipeline runs, e.g. recovery's). Returns events published.
pub(super) async fn publish_and_wait(
    client: &Client,
    plan: &Plan,
    out: &EventOut,
    mut job: Job,
) -> Result<usize> {
    let rows = enrich::fetch(client, &enrich::prepare(client, plan).await?, &job.ids).await?;
    let absent = enrich::contacts(client, plan, &job.lost_absent(&rows)?).await?;
    let mut states = enrich::build(rows)?;
    if job.universal.is_none() {
        job.universal = Some(enrich::universal_keys(client, plan).await?.into());
    }
    let mut pending = Pending::default();
    let tally = produce(out, &mut pending, &job, &mut states, absent, None).await?;
    pending.wait().await?;
    tally.acknowledged(&out.topic, job.reason);
    Ok(events(&tally))
}

/// Events of a job as the source counts them: one per contact (a delete's tombstone is part of it).
fn events(tally: &Published) -> usize {
    (tally.upserts + tally.deletes) as usize
}

/// Produce one event per re-read contact, and a delete event plus tombstone per deleted one;
/// what was produced, to be counted once Kafka acknowledged it. Past `deadline` nothing more is
/// produced and the job fails (see the module's note on the fence).
async fn produce(
    out: &EventOut,
    pending: &mut Pending,
    job: &Job,
    states: &mut HashMap<String, ContactEvent>,
    mut absent: Absent,
    deadline: Option<Instant>,
) -> Result<Published> {
    let mut tally = Published::default();
    let fenced = || {
        deadline.is_some_and(|d| Instant::now() > d).then(|| {
            Error::external(
                "the source was held up between reading contacts and publishing them for more than half of the \
                 slot's lease (takeover_after or wal_sender_timeout): a standby may have taken the slot over and \
                 published newer events meanwhile, so this read is not published; the session replays it from \
                 the slot",
            )
        })
    };
    let universal = job.universal.as_deref().unwrap_or_default();
    for id in &job.ids {
        let Some(o) = job.origins.get(id).copied().or(job.origin) else {
            continue;
        };
        let position = SourcePosition {
            lsn: fmt_lsn(o.lsn),
            commit_ts: (o.commit_ts != 0)
                .then(|| super::pg_epoch_micros_to_rfc3339(o.commit_ts))
                .flatten(),
            txid: (o.xid != 0).then_some(o.xid),
            reason: job.reason.to_owned(),
        };
        // Absent from the re-read: still COMPLETED without a universal answer, or no longer
        // COMPLETED. Either way every answer field it had is emptied.
        let state = states.remove(id).or_else(|| match absent.remove(id) {
            Some((ev, true)) if job.lost.contains(id) => Some(ev),
            Some((ev, false)) if job.withdrawn.contains(id) => Some(ev),
            _ => None,
        });
        if let Some(mut ev) = state {
            ev.set_cleared(universal, &job.retired);
            ev.event_id = if job.reason == "stream" {
                format!("{}:{id}", position.lsn)
            } else {
                format!("{}:{}:{id}", job.reason, position.lsn)
            };
            ev.source = position;
            ev.customer = Some(out.customer.clone());
            if let Some(e) = fenced() {
                return Err(e);
            }
            out.send(pending, id, Some(&ev)).await?;
            tally.upserts += 1;
        } else if job.deleted.contains(id) {
            let mut ev = ContactEvent::delete(id, position);
            // What a target set to clear fields on delete empties.
            ev.set_cleared(universal, &job.retired);
            ev.customer = Some(out.customer.clone());
            if let Some(e) = fenced() {
                return Err(e);
            }
            out.send(pending, id, Some(&ev)).await?;
            // The tombstone lets compaction forget the contact once sinks saw the delete.
            out.send(pending, id, None).await?;
            tally.deletes += 1;
            tally.tombstones += 1;
        } else {
            continue;
        }
        if job.reason == "stream" && o.commit_ts != 0 {
            tally.commits.push(o.commit_ts);
        }
    }
    Ok(tally)
}
