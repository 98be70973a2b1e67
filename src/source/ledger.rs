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

    /// One step of a session as the source drives the ledger.
    #[derive(Debug, Clone)]
    enum Step {
        /// A transaction of `changes` relevant row changes (0: nothing to publish).
        Txn {
            changes: u8,
            flush_mid: bool,
        },
        Keepalive,
        Heartbeat,
        /// Hand over the open batch, split into `parts` tickets.
        Flush {
            parts: u8,
        },
        /// Kafka acknowledges the outstanding ticket at this index (modulo).
        Ack(u8),
        /// A question change inside a transaction: hold, later released.
        QuestionChange,
        ReleaseHold(u8),
        /// Re-emit work handed over with nothing open.
        Reemit,
        /// The open batch had nothing to publish after all.
        Discard,
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            (0u8..4, any::<bool>())
                .prop_map(|(changes, flush_mid)| Step::Txn { changes, flush_mid }),
            Just(Step::Keepalive),
            Just(Step::Heartbeat),
            (1u8..4).prop_map(|parts| Step::Flush { parts }),
            any::<u8>().prop_map(Step::Ack),
            any::<u8>().prop_map(Step::Ack),
            Just(Step::QuestionChange),
            any::<u8>().prop_map(Step::ReleaseHold),
            Just(Step::Reemit),
            Just(Step::Discard),
        ]
    }

    /// What the model knows about a transaction with changes to publish.
    #[derive(Debug)]
    struct Txn {
        /// Start of the commit record: PostgreSQL skips the transaction on restart when the
        /// confirmed position is past it.
        commit_lsn: u64,
        /// Tickets carrying its changes; all must be acknowledged.
        tickets: Vec<Ticket>,
        /// Changes still in the open batch (not handed over).
        open: bool,
        /// Its changes turned out to have nothing to publish (discarded).
        discarded: bool,
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// The confirmed position never passes the commit of a transaction whose events are not
        /// all acknowledged, and never moves back; once everything is acknowledged and no hold
        /// remains, a keepalive confirms the server's position (an idle slot advances).
        #[test]
        fn never_confirms_unacknowledged_work(
            start in 0u64..1000,
            steps in proptest::collection::vec(step(), 1..120),
        ) {
            let mut l = Ledger::new(start);
            let mut wal = start; // end of WAL the server has sent
            let mut txns: Vec<Txn> = Vec::new();
            let mut acked: std::collections::HashSet<Ticket> = Default::default();
            let mut tickets: Vec<Ticket> = Vec::new(); // outstanding, in order handed over
            let mut holds: Vec<(Hold, u64)> = Vec::new();
            let mut last = l.confirmed();
            for s in steps {
                match s {
                    Step::Txn { changes, flush_mid } => {
                        wal += 10;
                        l.begin();
                        // A keepalive in the middle of the transaction names a later position.
                        l.reached(wal + 1000);
                        let mut t = Txn { commit_lsn: 0, tickets: vec![], open: false, discarded: false };
                        for i in 0..changes {
                            wal += 10;
                            l.change();
                            t.open = true;
                            if flush_mid && i == 0 {
                                let k = l.submit();
                                tickets.push(k);
                                t.tickets.push(k);
                                t.open = false;
                                // Earlier transactions' open changes went out with it.
                                for o in txns.iter_mut().filter(|o| o.open) {
                                    o.tickets.push(k);
                                    o.open = false;
                                }
                            }
                        }
                        wal += 10;
                        t.commit_lsn = wal;
                        wal += 10;
                        l.commit(wal);
                        if changes > 0 {
                            txns.push(t);
                        }
                    }
                    Step::Keepalive => l.reached(wal),
                    Step::Heartbeat => {
                        wal += 10;
                        l.reached(wal);
                    }
                    Step::Flush { parts } => {
                        if l.has_open() {
                            let mut ks = Vec::new();
                            for _ in 1..parts {
                                ks.push(l.submit_extra());
                            }
                            ks.push(l.submit());
                            tickets.extend(&ks);
                            for o in txns.iter_mut().filter(|o| o.open) {
                                o.tickets.extend(&ks);
                                o.open = false;
                            }
                        }
                    }
                    Step::Ack(i) => {
                        if !tickets.is_empty() {
                            let k = tickets.remove(i as usize % tickets.len());
                            acked.insert(k);
                            l.acked(k);
                        }
                    }
                    Step::QuestionChange => {
                        wal += 10;
                        l.begin();
                        let h = l.hold();
                        wal += 10;
                        // Until released, the question change's transaction must be replayed.
                        holds.push((h, wal));
                        wal += 10;
                        l.commit(wal);
                    }
                    Step::ReleaseHold(i) => {
                        if !holds.is_empty() {
                            let (h, _) = holds.remove(i as usize % holds.len());
                            l.release(h);
                        }
                    }
                    Step::Reemit => tickets.push(l.submit_extra()),
                    Step::Discard => {
                        if l.has_open() {
                            l.discard_open();
                            for o in txns.iter_mut().filter(|o| o.open) {
                                o.open = false;
                                o.discarded = true;
                            }
                        }
                    }
                }
                let c = l.confirmed();
                prop_assert!(c >= last, "confirmed moved back from {last} to {c}");
                last = c;
                for t in txns.iter().filter(|t| !t.discarded) {
                    let done = !t.open && t.tickets.iter().all(|k| acked.contains(k));
                    if !done {
                        prop_assert!(c <= t.commit_lsn,
                            "confirmed {c} passes unacknowledged commit at {}", t.commit_lsn);
                    }
                }
                for (_, commit_lsn) in &holds {
                    prop_assert!(c <= *commit_lsn, "confirmed {c} passes a held question change at {commit_lsn}");
                }
            }
            // Drain: acknowledge everything, release every hold, flush, then a keepalive.
            if l.has_open() {
                tickets.push(l.submit());
            }
            for k in tickets.drain(..) {
                l.acked(k);
            }
            for (h, _) in holds.drain(..) {
                l.release(h);
            }
            l.reached(wal);
            prop_assert_eq!(l.confirmed(), wal.max(start));
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
