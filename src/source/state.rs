//! The source's small durable state: whether the initial snapshot finished, and how far it got.
//!
//! Everything else (the stream position) lives in the replication slot itself. The file is
//! written atomically (write, fsync, rename) so a crash leaves the old or the new state.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Snapshot progress for one slot.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotState {
    /// True once every COMPLETED contact was published and acknowledged.
    pub done: bool,
    /// The last contact id published by the snapshot (pages resume after it).
    pub last_key: String,
    /// Contacts published so far.
    pub published: u64,
}

/// Where a slot's state lives.
#[derive(Debug, Clone)]
pub struct StateFile {
    path: PathBuf,
}

impl StateFile {
    /// `<dir>/<slot>.snapshot.json`.
    pub fn new(dir: &Path, slot: &str) -> Self {
        Self {
            path: dir.join(format!("{slot}.snapshot.json")),
        }
    }

    /// Read the state; a missing file means no snapshot ran yet.
    pub fn load(&self) -> Result<SnapshotState> {
        match std::fs::read(&self.path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| {
                Error::user(format!(
                    "state file {} is corrupt ({e}); delete it to run the snapshot again",
                    self.path.display()
                ))
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(SnapshotState::default()),
            Err(e) => Err(Error::user(format!(
                "cannot read state file {}: {e}",
                self.path.display()
            ))),
        }
    }

    /// Replace the state atomically.
    pub fn save(&self, state: &SnapshotState) -> Result<()> {
        let io = |e: std::io::Error| {
            Error::user(format!(
                "cannot write state file {}: {e}; check [source] state_dir is writable",
                self.path.display()
            ))
        };
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let tmp = self.path.with_extension("json.tmp");
        {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp).map_err(io)?;
            f.write_all(&serde_json::to_vec_pretty(state).expect("state serializes"))
                .map_err(io)?;
            f.sync_all().map_err(io)?;
        }
        std::fs::rename(&tmp, &self.path).map_err(io)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_missing() {
        let dir = tempfile::tempdir().unwrap();
        let f = StateFile::new(dir.path(), "s");
        assert_eq!(f.load().unwrap(), SnapshotState::default());
        let s = SnapshotState {
            done: true,
            last_key: "c9".into(),
            published: 3,
        };
        f.save(&s).unwrap();
        assert_eq!(f.load().unwrap(), s);
        std::fs::write(dir.path().join("s.snapshot.json"), b"{").unwrap();
        assert!(f.load().unwrap_err().to_string().contains("delete it"));
    }
}
