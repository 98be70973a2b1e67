//! The emulated CRMs' records: one table per system and object, kept in memory and, with a state
//! file, written out after every change (to a temporary file renamed over the old one, so a crash
//! never leaves a half-written file).

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::System;
use crate::error::{Error, Result};

/// One record: field name -> JSON value.
pub type Record = Map<String, Value>;

/// One object's records by key (Salesforce Id, Dataverse GUID, MuleSoft contact id).
pub type Table = BTreeMap<String, Record>;

/// One lookup field's index: value -> record key.
type FieldIndex = HashMap<String, String>;

/// Every table, plus the sequence that makes ids unique.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Store {
    /// system -> object -> table.
    tables: BTreeMap<System, BTreeMap<String, Table>>,
    /// Last number handed out for ids, job ids and record versions; never reused, even across
    /// restarts with the same state file.
    seq: u64,
    /// (system, object, field) -> value -> key: a complete index of a lookup field, built on its
    /// first lookup and kept up to date by [`Store::indexed`], so finding a record by external id
    /// is not a scan of the table (which made large runs quadratic).
    #[serde(skip)]
    index: RefCell<HashMap<(System, String, String), FieldIndex>>,
}

impl Store {
    /// Read a state file; a missing file is an empty store.
    pub fn load(path: &Path) -> Result<Self> {
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                Error::user(format!(
                    "state file {} is not valid: {e}; delete it to start empty",
                    path.display()
                ))
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(Error::user(format!(
                "cannot read state file {}: {e}",
                path.display()
            ))),
        }
    }

    /// Write the state file atomically.
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        let tmp = path.with_extension("tmp");
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(&serde_json::to_vec(self).map_err(std::io::Error::other)?)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    }

    /// A table, created empty on first use.
    pub fn table(&mut self, system: System, object: &str) -> &mut Table {
        self.tables
            .entry(system)
            .or_default()
            .entry(object.to_owned())
            .or_default()
    }

    /// A table if it has ever been written.
    pub fn get(&self, system: System, object: &str) -> Option<&Table> {
        self.tables.get(&system)?.get(object)
    }

    /// Records held per `system/object`, as the stats endpoint reports them.
    pub fn counts(&self) -> BTreeMap<String, usize> {
        self.tables
            .iter()
            .flat_map(|(system, objects)| {
                objects.iter().map(move |(object, table)| {
                    (format!("{}/{object}", system.name()), table.len())
                })
            })
            .collect()
    }

    /// The next sequence number.
    pub fn next_seq(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    /// Drop every record (the sequence goes on, so ids stay unique).
    pub fn clear(&mut self) {
        self.tables.clear();
        self.index.get_mut().clear();
    }

    /// The key of the record whose string `field` equals `value`. External-id values never
    /// change once written, so an index entry is either right or names a deleted record.
    pub fn find(&self, system: System, object: &str, field: &str, value: &str) -> Option<String> {
        let table = self.get(system, object)?;
        let mut index = self.index.borrow_mut();
        let values = index
            .entry((system, object.to_owned(), field.to_owned()))
            .or_insert_with(|| {
                table
                    .iter()
                    .filter_map(|(key, r)| {
                        r.get(field)
                            .and_then(Value::as_str)
                            .map(|v| (v.to_owned(), key.clone()))
                    })
                    .collect()
            });
        let key = values.get(value)?;
        table
            .get(key)
            .filter(|r| r.get(field).and_then(Value::as_str) == Some(value))
            .map(|_| key.clone())
    }

    /// Record that a new record `key` has `field` = `value`. Indexes of the object's other
    /// fields are dropped (rebuilt on their next lookup), since only this one is maintained.
    pub fn indexed(&mut self, system: System, object: &str, field: &str, value: &str, key: &str) {
        let index = self.index.get_mut();
        index.retain(|(s, o, f), _| !(*s == system && o == object && f != field));
        if let Some(values) = index.get_mut(&(system, object.to_owned(), field.to_owned())) {
            values.insert(value.to_owned(), key.to_owned());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_and_load_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        assert_eq!(Store::load(&path).unwrap().seq, 0);
        let mut s = Store::default();
        let n = s.next_seq();
        s.table(System::Mulesoft, "contacts")
            .insert("c1".into(), Record::from_iter([("n".into(), n.into())]));
        s.save(&path).unwrap();
        let back = Store::load(&path).unwrap();
        assert_eq!(
            back.get(System::Mulesoft, "contacts").unwrap()["c1"]["n"],
            1
        );
        assert_eq!(back.seq, 1);
        assert!(!path.with_extension("tmp").exists());
    }
}
