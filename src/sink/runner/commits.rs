//! The sink's offset bookkeeping (pure, property-tested): offsets of records the CRM accepted,
//! and the one asynchronous commit in flight.
//!
//! Commits are asynchronous so that a group coordinator that is gone (its broker killed) never
//! blocks the loop that writes the CRM: the sink keeps writing, and the offsets wait here until
//! a commit lands. One commit at a time, so the group's offsets only move forward; a failed one
//! goes back into the pending offsets, merged with what was accepted since.

use std::collections::BTreeMap;

/// Per partition, the next offset to read (the offset to commit).
pub type Offsets = BTreeMap<i32, i64>;

/// Pending offsets, the commit in flight, and what commits have landed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CommitBook {
    pending: Offsets,
    in_flight: Option<Offsets>,
    /// The highest offset committed per partition: an older record read again (after a
    /// rebalance) never moves the group back.
    done: Offsets,
}

fn merge(into: &mut Offsets, from: &Offsets) {
    for (p, o) in from {
        let e = into.entry(*p).or_insert(*o);
        *e = (*e).max(*o);
    }
}

impl CommitBook {
    /// The record at `offset` of `partition` was written (or dead-lettered).
    pub fn add(&mut self, partition: i32, offset: i64) {
        merge(&mut self.pending, &Offsets::from([(partition, offset + 1)]));
    }

    /// Nothing pending and nothing in flight.
    pub fn is_idle(&self) -> bool {
        self.pending.is_empty() && self.in_flight.is_none()
    }

    /// Whether a commit was sent and has not been answered yet.
    pub fn waiting(&self) -> bool {
        self.in_flight.is_some()
    }

    /// Forget pending offsets of partitions this member no longer owns: their new owner reads
    /// those records again from the committed offset (upserts are idempotent).
    pub fn retain(&mut self, owned: impl Fn(i32) -> bool) {
        self.pending.retain(|p, _| owned(*p));
    }

    /// The offsets to commit now, moved in flight; `None` while a commit is in flight or when
    /// nothing is pending.
    pub fn send(&mut self) -> Option<Offsets> {
        if self.in_flight.is_some() {
            return None;
        }
        let done = &self.done;
        self.pending
            .retain(|p, o| done.get(p).is_none_or(|d| *o > *d));
        if self.pending.is_empty() {
            return None;
        }
        let sent = std::mem::take(&mut self.pending);
        self.in_flight = Some(sent.clone());
        Some(sent)
    }

    /// The commit in flight was answered: done, or (failed) its offsets are pending again.
    pub fn settled(&mut self, ok: bool) {
        if let Some(sent) = self.in_flight.take() {
            merge(
                if ok {
                    &mut self.done
                } else {
                    &mut self.pending
                },
                &sent,
            );
        }
    }

    /// Everything not known to be committed, for a last synchronous commit at shutdown.
    pub fn all(&self) -> Offsets {
        let mut all = self.pending.clone();
        if let Some(sent) = &self.in_flight {
            merge(&mut all, sent);
        }
        all.retain(|p, o| self.done.get(p).is_none_or(|d| *o > *d));
        all
    }

    /// After a last synchronous commit of [`CommitBook::all`].
    pub fn clear(&mut self) {
        let all = self.all();
        merge(&mut self.done, &all);
        self.pending.clear();
        self.in_flight = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Op {
        Add(i32, i64),
        Send,
        Settle(bool),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0..3i32, 0..50i64).prop_map(|(p, o)| Op::Add(p, o)),
            2 => Just(Op::Send),
            2 => any::<bool>().prop_map(Op::Settle),
        ]
    }

    proptest! {
        /// The group's offsets only move forward, and once the last commit lands every written
        /// record is covered: nothing written is read again after a clean stop, nothing unwritten
        /// is skipped.
        #[test]
        fn commits_move_forward_and_cover_every_written_record(ops in prop::collection::vec(op(), 0..80)) {
            let mut book = CommitBook::default();
            let mut committed = Offsets::new();
            let mut written = Offsets::new();
            let mut sent: Option<Offsets> = None;
            for op in ops {
                match op {
                    Op::Add(p, o) => {
                        book.add(p, o);
                        merge(&mut written, &Offsets::from([(p, o + 1)]));
                    }
                    Op::Send => {
                        if let Some(s) = book.send() {
                            prop_assert!(sent.is_none(), "one commit at a time");
                            sent = Some(s);
                        }
                    }
                    Op::Settle(ok) => {
                        if let Some(s) = sent.take() {
                            book.settled(ok);
                            if ok {
                                for (p, o) in &s {
                                    let before = committed.get(p).copied().unwrap_or(0);
                                    prop_assert!(*o > before, "p{p} moved back (or stood) from {before} to {o}");
                                    committed.insert(*p, *o);
                                }
                            }
                        }
                    }
                }
                // Never more than what was written.
                for (p, o) in &book.all() {
                    prop_assert!(*o <= written[p]);
                }
            }
            // Drain: the commit in flight is answered, the rest sent and answered.
            if let Some(s) = sent.take() {
                book.settled(true);
                merge(&mut committed, &s);
            }
            while let Some(s) = book.send() {
                book.settled(true);
                merge(&mut committed, &s);
            }
            prop_assert!(book.is_idle());
            prop_assert_eq!(committed, written);
        }
    }

    #[test]
    fn a_failed_commit_merges_with_what_came_since() {
        let mut book = CommitBook::default();
        book.add(0, 9);
        book.add(1, 4);
        assert_eq!(book.send(), Some(Offsets::from([(0, 10), (1, 5)])));
        book.add(0, 14);
        assert_eq!(book.send(), None, "one in flight");
        book.settled(false);
        assert_eq!(book.send(), Some(Offsets::from([(0, 15), (1, 5)])));
        book.settled(true);
        assert!(book.is_idle());
    }

    #[test]
    fn revoked_partitions_are_left_to_their_new_owner() {
        let mut book = CommitBook::default();
        book.add(0, 1);
        book.add(2, 7);
        book.retain(|p| p != 2);
        assert_eq!(book.all(), Offsets::from([(0, 2)]));
    }
}
