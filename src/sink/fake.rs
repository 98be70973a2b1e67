//! An in-memory CRM target for the runner's unit tests: the records it holds by contact, the
//! calls it received, and scripted answers (a failing call, a rejected record).

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use serde_json::{Map, Value};

use super::mapping::{Mapping, Record};
use super::{Outcome, Target};
use crate::error::{Error, Result};

/// What the next call answers; calls past the script write everything.
pub enum Answer {
    /// The whole call fails with this error.
    Fail(Error),
    /// This contact's record is refused with the reason; the others are written.
    Reject(String, String),
}

/// One call the target received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    /// Upsert of these contacts, in order.
    Upsert(Vec<String>),
    /// Delete of these contacts, in order.
    Delete(Vec<String>),
}

/// What the fake holds; shared by its clones so a test keeps a handle.
#[derive(Default)]
pub struct State {
    /// Contact id -> the fields last written (a null is kept, as a cleared CRM field).
    pub records: BTreeMap<String, Map<String, Value>>,
    /// Every call, answered or not.
    pub calls: Vec<Call>,
    /// Answers for the next calls.
    pub script: VecDeque<Answer>,
}

/// The fake target.
#[derive(Clone)]
pub struct FakeTarget {
    /// Most records per call.
    pub max_batch: usize,
    /// Shared state.
    pub state: Arc<Mutex<State>>,
}

impl FakeTarget {
    /// A fake taking `max_batch` records per call, answering `script` first.
    pub fn new(max_batch: usize, script: impl IntoIterator<Item = Answer>) -> Self {
        let state = State {
            script: script.into_iter().collect(),
            ..State::default()
        };
        Self {
            max_batch,
            state: Arc::new(Mutex::new(state)),
        }
    }

    fn answer(&self, call: Call, ids: &[String]) -> Result<Vec<Outcome>> {
        let mut s = self.state.lock().unwrap();
        s.calls.push(call);
        Ok(match s.script.pop_front() {
            Some(Answer::Fail(e)) => return Err(e),
            Some(Answer::Reject(id, reason)) => ids
                .iter()
                .map(|i| match *i == id {
                    true => Outcome::Rejected(reason.clone()),
                    false => Outcome::Written,
                })
                .collect(),
            None => vec![Outcome::Written; ids.len()],
        })
    }
}

#[async_trait]
impl Target for FakeTarget {
    async fn prepare(&mut self, _: &mut Mapping) -> Result<()> {
        Ok(())
    }

    fn max_batch(&self) -> usize {
        self.max_batch
    }

    async fn upsert(&mut self, _: &Mapping, records: &[Record]) -> Result<Vec<Outcome>> {
        let ids: Vec<String> = records.iter().map(|r| r.contact_id.clone()).collect();
        let outcomes = self.answer(Call::Upsert(ids.clone()), &ids)?;
        let mut s = self.state.lock().unwrap();
        for (r, o) in records.iter().zip(&outcomes) {
            if *o == Outcome::Written {
                let rec = s.records.entry(r.contact_id.clone()).or_default();
                rec.extend(r.fields.clone());
            }
        }
        Ok(outcomes)
    }

    async fn delete(&mut self, _: &Mapping, ids: &[String]) -> Result<Vec<Outcome>> {
        let outcomes = self.answer(Call::Delete(ids.to_vec()), ids)?;
        let mut s = self.state.lock().unwrap();
        for (id, o) in ids.iter().zip(&outcomes) {
            if *o == Outcome::Written {
                s.records.remove(id);
            }
        }
        Ok(outcomes)
    }

    fn dry_run(&self, _: &Mapping, records: &[Record]) -> Vec<String> {
        records
            .iter()
            .map(|r| format!("UPSERT {}", r.contact_id))
            .collect()
    }
}
