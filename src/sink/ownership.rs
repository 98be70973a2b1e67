//! Which partitions a sink member owns, and since when (pure, property-tested).
//!
//! A consumer group moves partitions between members. Once a partition is revoked, its new
//! owner starts from the last committed offset and may write newer state for a contact at any
//! moment, so a record this member read before the revocation must never be written or
//! committed afterwards, even when the partition comes back in the same rebalance (the consumer
//! then reads it again from the committed offset). Each stretch of ownership gets its own
//! epoch; a record carries the epoch it was read in and stays valid only while that stretch
//! lasts.

use std::collections::HashMap;

/// The partitions owned now, each with the epoch of its current stretch of ownership.
#[derive(Debug, Clone, Default)]
pub struct Ownership {
    owned: HashMap<i32, u64>,
    next: u64,
    /// Without a group (a dry run or explicitly assigned partitions) nothing is ever revoked.
    fixed: bool,
}

impl Ownership {
    /// Ownership decided by the group's rebalances: nothing is owned until assigned.
    pub fn new() -> Self {
        Self::default()
    }

    /// Partitions assigned by hand, never taken away: every record is valid.
    pub fn fixed() -> Self {
        Self {
            fixed: true,
            ..Self::default()
        }
    }

    /// These partitions are now owned; one already owned keeps its stretch (an incremental
    /// assignment adds partitions without revoking the others).
    pub fn assigned(&mut self, partitions: impl IntoIterator<Item = i32>) {
        for p in partitions {
            if let std::collections::hash_map::Entry::Vacant(e) = self.owned.entry(p) {
                self.next += 1;
                e.insert(self.next);
            }
        }
    }

    /// These partitions are no longer owned: records read from them so far are void.
    pub fn revoked(&mut self, partitions: impl IntoIterator<Item = i32>) {
        for p in partitions {
            self.owned.remove(&p);
        }
    }

    /// Everything is revoked (the member lost its assignment, e.g. it left the group).
    pub fn lost(&mut self) {
        self.owned.clear();
    }

    /// The epoch a record read now from `partition` carries (0 when it is not owned: such a
    /// record is never valid, except under fixed ownership).
    pub fn epoch(&self, partition: i32) -> u64 {
        self.owned.get(&partition).copied().unwrap_or(0)
    }

    /// Whether a record read from `partition` in `epoch` may still be written and committed.
    pub fn holds(&self, partition: i32, epoch: u64) -> bool {
        self.fixed || (epoch != 0 && self.owned.get(&partition) == Some(&epoch))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Op {
        Assign(Vec<i32>),
        Revoke(Vec<i32>),
        Lose,
        Read(i32),
    }

    fn op() -> impl Strategy<Value = Op> {
        let parts = proptest::collection::vec(0..4i32, 0..4);
        prop_oneof![
            parts.clone().prop_map(Op::Assign),
            parts.prop_map(Op::Revoke),
            Just(Op::Lose),
            (0..4i32).prop_map(Op::Read),
        ]
    }

    proptest! {
        /// A record stays valid exactly while its partition has been owned without a break
        /// since it was read: any revocation in between voids it, a re-assignment included.
        #[test]
        fn a_record_is_valid_only_within_its_stretch(ops in proptest::collection::vec(op(), 0..60)) {
            let mut own = Ownership::new();
            // The model: per record, its partition, whether it was owned when read, and
            // whether a revocation of its partition happened since.
            let mut records: Vec<(i32, u64, bool, bool)> = Vec::new();
            let mut owned: std::collections::HashSet<i32> = Default::default();
            for op in ops {
                match op {
                    Op::Assign(ps) => {
                        own.assigned(ps.iter().copied());
                        owned.extend(ps);
                    }
                    Op::Revoke(ps) => {
                        own.revoked(ps.iter().copied());
                        for r in records.iter_mut().filter(|r| ps.contains(&r.0)) {
                            r.3 = true;
                        }
                        for p in ps {
                            owned.remove(&p);
                        }
                    }
                    Op::Lose => {
                        own.lost();
                        for r in records.iter_mut() {
                            r.3 = true;
                        }
                        owned.clear();
                    }
                    Op::Read(p) => records.push((p, own.epoch(p), owned.contains(&p), false)),
                }
                for (p, epoch, was_owned, revoked_since) in &records {
                    prop_assert_eq!(own.holds(*p, *epoch), *was_owned && !revoked_since);
                }
            }
        }
    }

    #[test]
    fn fixed_ownership_holds_everything() {
        let own = Ownership::fixed();
        assert!(own.holds(3, 0));
    }

    #[test]
    fn reassigned_partition_voids_older_records() {
        let mut own = Ownership::new();
        own.assigned([0, 1]);
        let e0 = own.epoch(0);
        own.revoked([0, 1]);
        own.assigned([0]);
        assert!(!own.holds(0, e0));
        assert!(own.holds(0, own.epoch(0)));
    }
}
