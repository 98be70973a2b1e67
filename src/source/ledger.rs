//! Which WAL position the replication slot may be confirmed at (pure: no I/O).
//!
//! The source's promise is at-least-once: the slot's confirmed position passes a transaction
//! only after Kafka acknowledged every event that transaction produced. PostgreSQL skips, on the
//! next start, every transaction whose commit record begins before the confirmed position, so
//! confirming one position too far loses a transaction for good.
//!
//! The rule kept here: a position reached in the stream (a commit's end, a keepalive's
//! `wal_end`, a heartbeat message) may be confirmed only once every piece of work handed over
//! before it was reached is acknowledged. Work is either the *open* batch (changes gathered, not
//! yet handed to the publisher) or a *ticket* (a part handed over, awaiting acknowledgement).
//! A position reached while work is outstanding is attached to the newest piece of that work and
//! released when it, and everything older, is acknowledged. Positions reached inside a
//! transaction are ignored: the transaction's commit will come later. *Holds* cap the confirmed
//! position while a re-emit after a question change is still running, so a crash replays the
//! question change and recreates the job.

use std::collections::{BTreeMap, VecDeque};

/// A part of the work handed to the publisher, acknowledged with [`Ledger::acked`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Ticket(u64);

/// A cap on the confirmed position, lifted with [`Ledger::release`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Hold(u64);

#[derive(Debug)]
struct Entry {
    ticket: Ticket,
    acked: bool,
    /// Highest position reached after this work was gathered (0: none).
    reached: u64,
}

/// Confirmation bookkeeping for one replication session.
#[derive(Debug)]
pub struct Ledger {
    /// The position to report to the server; never decreases.
    confirmed: u64,
    /// Highest position whose preceding work is all acknowledged (ignores holds).
    safe: u64,
    /// Highest position reached in the stream (what a new hold caps at).
    frontier: u64,
    in_txn: bool,
    /// `Some` while changes are gathered and not handed over; the position reached after them.
    open: Option<u64>,
    queue: VecDeque<Entry>,
    next: u64,
    holds: BTreeMap<Hold, u64>,
}

impl Ledger {
    /// A ledger for a session that starts at the slot's confirmed position `start`.
    pub fn new(start: u64) -> Self {
        Self {
            confirmed: start,
            safe: start,
            frontier: start,
            in_txn: false,
            open: None,
            queue: VecDeque::new(),
            next: 0,
            holds: BTreeMap::new(),
        }
    }

    /// The position that may be reported as flushed.
    pub fn confirmed(&self) -> u64 {
        self.confirmed
    }

    /// True while changes were gathered and not handed over.
    pub fn has_open(&self) -> bool {
        self.open.is_some()
    }

    /// Tickets not yet acknowledged (or acknowledged behind an older one).
    pub fn outstanding(&self) -> usize {
        self.queue.len()
    }

    /// A transaction starts: positions reached before its commit are not safe points.
    pub fn begin(&mut self) {
        self.in_txn = true;
    }

    /// A change that must be published was gathered into the open batch.
    pub fn change(&mut self) {
        self.open.get_or_insert(0);
    }

    /// The transaction ended at `end` (its changes, if any, are in the open batch).
    pub fn commit(&mut self, end: u64) {
        self.in_txn = false;
        self.reached(end);
    }

    /// The stream is known complete up to `lsn` (a keepalive's `wal_end`, a non-transactional
    /// message). Ignored inside a transaction.
    pub fn reached(&mut self, lsn: u64) {
        if self.in_txn {
            return;
        }
        self.frontier = self.frontier.max(lsn);
        if let Some(r) = &mut self.open {
            *r = (*r).max(lsn);
        } else if let Some(last) = self.queue.back_mut() {
            last.reached = last.reached.max(lsn);
        } else {
            self.safe = self.safe.max(lsn);
            self.settle();
        }
    }

    /// Hand over the open batch. Positions reached so far are released once this ticket and
    /// all older ones are acknowledged.
    pub fn submit(&mut self) -> Ticket {
        let reached = self.open.take().unwrap_or(0);
        self.push(reached)
    }

    /// Hand over work that does not close the open batch: one part of a batch split into
    /// several tickets, or a re-emit chunk. The open batch stays, so the positions it carries
    /// wait for its own [`Ledger::submit`].
    pub fn submit_extra(&mut self) -> Ticket {
        self.push(0)
    }

    /// The open batch turned out to have nothing to publish: its positions count as reached.
    pub fn discard_open(&mut self) {
        if let Some(r) = self.open.take() {
            // Not inside the transaction rule: these positions were accepted when reached.
            let in_txn = std::mem::replace(&mut self.in_txn, false);
            if r > 0 {
                self.reached(r);
            }
            self.in_txn = in_txn;
        }
    }

    fn push(&mut self, reached: u64) -> Ticket {
        let ticket = Ticket(self.next);
        self.next += 1;
        self.queue.push_back(Entry {
            ticket,
            acked: false,
            reached,
        });
        ticket
    }

    /// Kafka acknowledged every event of `ticket`.
    pub fn acked(&mut self, ticket: Ticket) {
        if let Some(e) = self.queue.iter_mut().find(|e| e.ticket == ticket) {
            e.acked = true;
        }
        while self.queue.front().is_some_and(|e| e.acked) {
            let e = self.queue.pop_front().expect("front exists");
            self.safe = self.safe.max(e.reached);
        }
        self.settle();
    }

    /// Cap the confirmed position at the last position reached before the current
    /// transaction, until [`Ledger::release`].
    pub fn hold(&mut self) -> Hold {
        let h = Hold(self.next);
        self.next += 1;
        self.holds.insert(h, self.frontier);
        h
    }

    /// Lift a cap set by [`Ledger::hold`].
    pub fn release(&mut self, hold: Hold) {
        self.holds.remove(&hold);
        self.settle();
    }

    fn settle(&mut self) {
        let cap = self.holds.values().copied().min().unwrap_or(u64::MAX);
        let target = self.safe.min(cap);
        if target > self.confirmed {
            self.confirmed = target;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The walsender's keepalive after a transaction carries exactly that transaction's end:
    /// with the batch still in flight, nothing may be confirmed (the loss the old rule allowed).
    #[test]
    fn keepalive_at_a_batch_end_waits_for_its_ack() {
        let mut l = Ledger::new(100);
        l.begin();
        l.change();
        l.commit(200);
        let t = l.submit();
        l.reached(200);
        l.reached(200);
        assert_eq!(l.confirmed(), 100);
        l.reached(300);
        assert_eq!(l.confirmed(), 100);
        l.acked(t);
        assert_eq!(l.confirmed(), 300);
    }

    #[test]
    fn idle_stream_advances() {
        let mut l = Ledger::new(10);
        l.reached(20);
        assert_eq!(l.confirmed(), 20);
        l.begin();
        l.commit(30);
        assert_eq!(l.confirmed(), 30);
    }

    #[test]
    fn keepalive_inside_a_transaction_is_ignored() {
        let mut l = Ledger::new(10);
        l.begin();
        l.reached(500);
        assert_eq!(l.confirmed(), 10);
        l.commit(40);
        assert_eq!(l.confirmed(), 40);
    }

    #[test]
    fn split_batch_waits_for_every_part() {
        let mut l = Ledger::new(0);
        l.begin();
        l.change();
        l.commit(50);
        let a = l.submit_extra();
        let b = l.submit();
        l.acked(b);
        assert_eq!(l.confirmed(), 0);
        l.acked(a);
        assert_eq!(l.confirmed(), 50);
    }

    #[test]
    fn a_hold_caps_until_released() {
        let mut l = Ledger::new(0);
        l.begin();
        l.commit(10);
        l.begin();
        let h = l.hold();
        l.commit(20);
        l.reached(30);
        assert_eq!(l.confirmed(), 10);
        let t = l.submit();
        l.acked(t);
        l.release(h);
        assert_eq!(l.confirmed(), 30);
    }

    #[test]
    fn discarded_batch_releases_its_positions() {
        let mut l = Ledger::new(0);
        l.begin();
        l.change();
        l.commit(70);
        l.reached(80);
        assert_eq!(l.confirmed(), 0);
        l.discard_open();
        assert_eq!(l.confirmed(), 80);
    }

    /// What the server's WAL holds, in order: what a (re)started session is sent again.
    #[derive(Debug, Clone)]
    enum Rec {
        /// A transaction with `changes` row changes to publish (0: none), optionally flushed
        /// after its first change (a batch filled mid-transaction), optionally a question
        /// change (re-emitted under a hold).
        Txn {
            changes: u8,
            flush_mid: bool,
            question: bool,
            commit_lsn: u64,
            end: u64,
        },
        /// A non-transactional heartbeat message.
        Heartbeat { lsn: u64 },
    }

    /// One step: the server writes, the session reads, the publisher acknowledges, or the
    /// session fails and reconnects.
    #[derive(Debug, Clone)]
    enum Step {
        Write {
            changes: u8,
            flush_mid: bool,
            question: bool,
        },
        WriteHeartbeat,
        /// The session reads the next record of the WAL, if any.
        Deliver,
        /// A keepalive naming the end of what was sent.
        Keepalive,
        /// Hand over the open batch, split into `parts` tickets.
        Flush {
            parts: u8,
        },
        /// Kafka acknowledges one outstanding ticket (not necessarily the oldest).
        Ack(u8),
        /// A re-emit job finishes: its hold is released.
        Release(u8),
        /// Re-emit work handed over with nothing to do with the open batch.
        Reemit,
        /// The open batch had nothing to publish after all.
        Discard,
        /// A delivery failed (or the source was killed): a new session starts from the slot.
        Reconnect,
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            3 => (0u8..4, any::<bool>(), proptest::bool::weighted(0.15))
                .prop_map(|(changes, flush_mid, question)| Step::Write { changes, flush_mid, question }),
            1 => Just(Step::WriteHeartbeat),
            6 => Just(Step::Deliver),
            2 => Just(Step::Keepalive),
            2 => (1u8..4).prop_map(|parts| Step::Flush { parts }),
            4 => any::<u8>().prop_map(Step::Ack),
            1 => any::<u8>().prop_map(Step::Release),
            1 => Just(Step::Reemit),
            1 => Just(Step::Discard),
            1 => Just(Step::Reconnect),
        ]
    }

    /// A session over the model WAL: the ledger plus what the model needs to judge it.
    struct Session {
        l: Ledger,
        /// Next WAL record to send.
        cursor: usize,
        /// End of what was sent.
        sent: u64,
        /// Outstanding tickets and the transactions whose changes each carries.
        tickets: Vec<(Ticket, Vec<usize>)>,
        /// Transactions whose changes are in the open batch.
        open: Vec<usize>,
        /// Holds and the question transaction each belongs to.
        holds: Vec<(Hold, usize)>,
        /// Per transaction: tickets of this session still unacknowledged.
        waiting: std::collections::HashMap<usize, usize>,
    }

    impl Session {
        /// A session from the slot's confirmed position: PostgreSQL sends again every
        /// transaction whose commit record starts at or after it.
        fn start(confirmed: u64, wal: &[Rec]) -> Self {
            let cursor = wal
                .iter()
                .position(|r| match r {
                    Rec::Txn { commit_lsn, .. } => *commit_lsn >= confirmed,
                    Rec::Heartbeat { lsn } => *lsn >= confirmed,
                })
                .unwrap_or(wal.len());
            Self {
                l: Ledger::new(confirmed),
                cursor,
                sent: confirmed,
                tickets: vec![],
                open: vec![],
                holds: vec![],
                waiting: Default::default(),
            }
        }

        /// Whether transaction `t`, delivered in this session, is safely published: none of its
        /// changes still open or in an unacknowledged ticket, and no re-emit holding it.
        fn finished(&self, t: usize) -> bool {
            !self.open.contains(&t)
                && self.waiting.get(&t).copied().unwrap_or(0) == 0
                && !self.holds.iter().any(|(_, h)| *h == t)
        }

        fn hand_over(&mut self, parts: u8) {
            let mut ks = Vec::new();
            for _ in 1..parts {
                ks.push(self.l.submit_extra());
            }
            ks.push(self.l.submit());
            let carried = std::mem::take(&mut self.open);
            for t in &carried {
                *self.waiting.entry(*t).or_default() += ks.len();
            }
            for k in ks {
                self.tickets.push((k, carried.clone()));
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(3000))]

        /// Over random interleavings of writes, deliveries, keepalives, heartbeats, split and
        /// out-of-order acknowledgements, question changes, discarded batches and reconnects:
        /// the confirmed position never passes the commit of a transaction whose events were
        /// not all acknowledged (nor a question change whose re-emit is unfinished), never moves
        /// back, and once everything is acknowledged a keepalive confirms the server's position.
        #[test]
        fn never_confirms_unacknowledged_work(
            start in 0u64..1000,
            steps in proptest::collection::vec(step(), 1..150),
        ) {
            let mut wal: Vec<Rec> = Vec::new();
            let mut end = start; // end of the server's WAL
            let mut done = std::collections::HashSet::new(); // transactions safely published
            let mut s = Session::start(start, &wal);
            let mut last = start;
            for st in steps {
                match st {
                    Step::Write { changes, flush_mid, question } => {
                        let commit_lsn = end + 10 + 10 * u64::from(changes);
                        end = commit_lsn + 10;
                        wal.push(Rec::Txn { changes, flush_mid, question, commit_lsn, end });
                        if changes == 0 && !question {
                            done.insert(wal.len() - 1);
                        }
                    }
                    Step::WriteHeartbeat => {
                        end += 10;
                        wal.push(Rec::Heartbeat { lsn: end });
                    }
                    Step::Deliver => {
                        if let Some(rec) = wal.get(s.cursor).cloned() {
                            let id = s.cursor;
                            s.cursor += 1;
                            match rec {
                                Rec::Txn { changes, flush_mid, question, end: e, .. } => {
                                    s.l.begin();
                                    // A keepalive inside the transaction names a later position.
                                    s.l.reached(e + 1000);
                                    if question {
                                        let h = s.l.hold();
                                        s.holds.push((h, id));
                                    }
                                    for i in 0..changes {
                                        s.l.change();
                                        if !s.open.contains(&id) {
                                            s.open.push(id);
                                        }
                                        if flush_mid && i == 0 {
                                            s.hand_over(1);
                                        }
                                    }
                                    s.l.commit(e);
                                    s.sent = e;
                                }
                                Rec::Heartbeat { lsn } => {
                                    s.l.reached(lsn);
                                    s.sent = lsn;
                                }
                            }
                        }
                    }
                    Step::Keepalive => s.l.reached(s.sent),
                    Step::Flush { parts } => {
                        if s.l.has_open() {
                            s.hand_over(parts);
                        }
                    }
                    Step::Ack(i) => {
                        if !s.tickets.is_empty() {
                            let (k, carried) = s.tickets.remove(i as usize % s.tickets.len());
                            s.l.acked(k);
                            for t in carried {
                                *s.waiting.get_mut(&t).expect("counted") -= 1;
                                if s.finished(t) {
                                    done.insert(t);
                                }
                            }
                        }
                    }
                    Step::Release(i) => {
                        if !s.holds.is_empty() {
                            let (h, t) = s.holds.remove(i as usize % s.holds.len());
                            s.l.release(h);
                            if s.finished(t) {
                                done.insert(t);
                            }
                        }
                    }
                    Step::Reemit => {
                        let k = s.l.submit_extra();
                        s.tickets.push((k, vec![]));
                    }
                    Step::Discard => {
                        if s.l.has_open() {
                            s.l.discard_open();
                            for t in std::mem::take(&mut s.open) {
                                if s.finished(t) {
                                    done.insert(t);
                                }
                            }
                        }
                    }
                    Step::Reconnect => s = Session::start(s.l.confirmed(), &wal),
                }
                let c = s.l.confirmed();
                prop_assert!(c >= last, "confirmed moved back from {last} to {c}");
                last = c;
                for (i, r) in wal.iter().enumerate() {
                    if let Rec::Txn { commit_lsn, .. } = r
                        && !done.contains(&i)
                    {
                        prop_assert!(c <= *commit_lsn,
                            "confirmed {c} passes the commit at {commit_lsn} of transaction {i}, not yet safely published");
                    }
                }
            }
            // Drain: read everything, hand it over, acknowledge it, finish every re-emit.
            while s.cursor < wal.len() || s.l.has_open() || !s.tickets.is_empty() || !s.holds.is_empty() {
                if s.cursor < wal.len() {
                    let id = s.cursor;
                    s.cursor += 1;
                    match wal[id].clone() {
                        Rec::Txn { changes, question, end: e, .. } => {
                            s.l.begin();
                            if question {
                                let h = s.l.hold();
                                s.holds.push((h, id));
                            }
                            for _ in 0..changes {
                                s.l.change();
                            }
                            s.l.commit(e);
                            s.sent = e;
                        }
                        Rec::Heartbeat { lsn } => {
                            s.l.reached(lsn);
                            s.sent = lsn;
                        }
                    }
                    continue;
                }
                if s.l.has_open() {
                    s.hand_over(1);
                }
                for (k, _) in std::mem::take(&mut s.tickets) {
                    s.l.acked(k);
                }
                for (h, _) in std::mem::take(&mut s.holds) {
                    s.l.release(h);
                }
            }
            s.l.reached(s.sent);
            prop_assert_eq!(s.l.confirmed(), end.max(last));
        }

        /// A hold keeps the confirmed position before the question change's transaction until
        /// released, whatever else is acknowledged meanwhile.
        #[test]
        fn a_hold_keeps_the_question_change_replayable(
            before in 0u8..5, after in 0u8..5, acks in any::<bool>(),
        ) {
            let mut l = Ledger::new(0);
            let mut wal = 0;
            let mut pending = vec![];
            for _ in 0..before {
                wal += 10;
                l.begin();
                l.change();
                l.commit(wal);
                pending.push(l.submit());
            }
            wal += 10;
            l.begin();
            let h = l.hold();
            let question_commit = wal + 5;
            wal += 10;
            l.commit(wal);
            for _ in 0..after {
                wal += 10;
                l.begin();
                l.commit(wal);
                l.reached(wal);
            }
            if acks {
                for k in pending.drain(..) {
                    l.acked(k);
                }
            }
            prop_assert!(l.confirmed() < question_commit);
            l.release(h);
            for k in pending.drain(..) {
                l.acked(k);
            }
            prop_assert_eq!(l.confirmed(), wal);
        }
    }
}
