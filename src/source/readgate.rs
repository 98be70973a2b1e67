//! When a re-read may start while earlier ones still run: the bookkeeping behind running the
//! publishing pipeline's re-reads on several connections without breaking per-contact order.
//!
//! The guarantee the pipeline gives is that a contact named by two jobs is read for the later
//! one after the earlier read finished, so its events, produced in job order, end with the
//! freshest state. Reads of jobs that share no contact cannot reorder anything a key carries,
//! so they may overlap. The gate admits jobs strictly in order (a job that must wait holds back
//! the ones behind it, which may share contacts with it) and only when no read in flight names
//! one of its contacts.

use std::collections::HashMap;

/// Contacts of the reads in flight, by job sequence number.
#[derive(Debug, Default)]
pub struct ReadGate {
    inflight: HashMap<u64, Vec<String>>,
    /// Reads in flight per contact.
    busy: HashMap<String, usize>,
    /// Sequence number the next admitted job gets.
    next: u64,
}

impl ReadGate {
    /// A gate with nothing in flight.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether a job naming `contacts` may start its read now.
    pub fn can_start<'a>(&self, mut contacts: impl Iterator<Item = &'a String>) -> bool {
        contacts.all(|c| !self.busy.contains_key(c))
    }

    /// Record the start of a read naming `contacts` (the caller checked [`Self::can_start`]);
    /// returns its sequence number for [`Self::finish`].
    pub fn start(&mut self, contacts: impl IntoIterator<Item = String>) -> u64 {
        let seq = self.next;
        self.next += 1;
        let contacts: Vec<String> = contacts.into_iter().collect();
        for c in &contacts {
            *self.busy.entry(c.clone()).or_default() += 1;
        }
        self.inflight.insert(seq, contacts);
        seq
    }

    /// Record that read `seq` finished (successfully or not); unknown numbers are ignored.
    pub fn finish(&mut self, seq: u64) {
        for c in self.inflight.remove(&seq).unwrap_or_default() {
            if let Some(n) = self.busy.get_mut(&c) {
                *n -= 1;
                if *n == 0 {
                    self.busy.remove(&c);
                }
            }
        }
    }

    /// Reads in flight.
    #[cfg(test)]
    pub fn inflight(&self) -> usize {
        self.inflight.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ids(v: &[u8]) -> Vec<String> {
        v.iter().map(|i| format!("c{i}")).collect()
    }

    #[test]
    fn disjoint_jobs_overlap_and_shared_contacts_wait() {
        let mut g = ReadGate::new();
        let a = g.start(ids(&[1, 2]));
        assert!(g.can_start(ids(&[3]).iter()));
        let b = g.start(ids(&[3]));
        assert!(!g.can_start(ids(&[2, 4]).iter()));
        g.finish(b);
        assert!(!g.can_start(ids(&[2, 4]).iter()));
        g.finish(a);
        assert!(g.can_start(ids(&[2, 4]).iter()));
        assert_eq!(g.inflight(), 0);
    }

    #[test]
    fn a_contact_twice_in_one_job_is_freed_once_the_job_ends() {
        let mut g = ReadGate::new();
        let a = g.start(ids(&[7, 7]));
        g.finish(a);
        g.finish(a);
        assert!(g.can_start(ids(&[7]).iter()));
    }

    proptest! {
        /// Driven the way the pipeline drives it (jobs admitted in order, at most `slots` reads
        /// at once, reads ending in any order), every contact's reads never overlap and happen
        /// in job order, and every job is read.
        #[test]
        fn reads_of_a_contact_follow_job_order(
            jobs in prop::collection::vec(prop::collection::btree_set(0u8..12, 1..5), 1..40),
            slots in 1usize..5,
            picks in prop::collection::vec(any::<prop::sample::Index>(), 200),
        ) {
            let mut g = ReadGate::new();
            let mut running: Vec<(usize, u64)> = Vec::new();
            // Per contact: the job whose read last finished, and whether a read runs.
            let mut last_read: HashMap<String, usize> = HashMap::new();
            let mut reading: HashMap<String, usize> = HashMap::new();
            let mut next_job = 0;
            let mut picks = picks.into_iter().cycle();
            while next_job < jobs.len() || !running.is_empty() {
                let job_ids = jobs.get(next_job).map(|j| ids(&j.iter().copied().collect::<Vec<_>>()));
                let admit = job_ids.as_ref().is_some_and(|j| running.len() < slots && g.can_start(j.iter()));
                // Admit when possible half of the time; otherwise end a read if one runs.
                if admit && (running.is_empty() || picks.next().unwrap().index(2) == 0) {
                    let j = job_ids.unwrap();
                    for c in &j {
                        prop_assert!(!reading.contains_key(c), "{c} read by two jobs at once");
                        if let Some(prev) = last_read.get(c) {
                            prop_assert!(*prev < next_job);
                        }
                        reading.insert(c.clone(), next_job);
                    }
                    running.push((next_job, g.start(j)));
                    next_job += 1;
                } else {
                    prop_assert!(!running.is_empty(), "a job can never start");
                    let (job, seq) = running.remove(picks.next().unwrap().index(running.len()));
                    g.finish(seq);
                    for c in ids(&jobs[job].iter().copied().collect::<Vec<_>>()) {
                        reading.remove(&c);
                        last_read.insert(c, job);
                    }
                }
            }
            prop_assert_eq!(g.inflight(), 0);
        }
    }
}
