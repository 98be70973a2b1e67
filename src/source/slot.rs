//! The replication slot's health: whether it still holds the WAL the source needs, and what to
//! say when it does not.
//!
//! A slot can lose its WAL (`wal_status = 'lost'`: `max_slot_wal_keep_size` was exceeded while
//! the source was stopped or behind) or disappear (dropped by hand, or not carried over by a
//! failover). Either way the changes since its last position are gone from the stream, and a
//! source that silently created a new slot would skip them. So a lost or missing slot of a
//! source that has run before stops it with the cause and the fix (`--recover`); `unreserved` and
//! a shrinking `safe_wal_size` are warnings and metrics. The verdict is a pure function over
//! what the catalog says, so every case is unit-tested.

use tokio_postgres::Client;

use crate::error::{self, Result};

/// What `pg_replication_slots` (and `pg_settings`) say about one slot.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Health {
    /// The slot exists.
    pub exists: bool,
    /// `wal_status`: `reserved`, `extended`, `unreserved` or `lost` (PostgreSQL 13+).
    pub wal_status: Option<String>,
    /// `safe_wal_size`: bytes of WAL that can still be written before the slot is in danger of
    /// losing WAL (`None` without a `max_slot_wal_keep_size`, or once lost).
    pub safe_wal_size: Option<i64>,
    /// `invalidation_reason` (PostgreSQL 17+): `wal_removed`, `rows_removed`, ...
    pub invalidation_reason: Option<String>,
    /// `confirmed_flush_lsn`, as text.
    pub confirmed: Option<String>,
    /// The backend streaming from it, if any.
    pub active_pid: Option<i32>,
    /// The server's `max_slot_wal_keep_size` setting, as text (`-1` is unlimited).
    pub max_slot_wal_keep_size: Option<String>,
    /// `failover` (PostgreSQL 17+): standbys with `sync_replication_slots` keep a copy.
    pub failover: Option<bool>,
}

/// Read the slot's health (`exists = false` when there is no such slot).
pub async fn read(client: &Client, slot: &str) -> Result<Health> {
    // to_jsonb keeps the query valid on every version: columns added later are simply absent.
    let row = client
        .query_opt(
            "SELECT to_jsonb(s)::text, current_setting('max_slot_wal_keep_size', true) \
             FROM pg_replication_slots s WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(|e| error::pg(format!("reading the health of slot {slot}"), e))?;
    let Some(row) = row else {
        return Ok(Health::default());
    };
    let (doc, keep): (String, Option<String>) = (row.get(0), row.get(1));
    let v: serde_json::Value = serde_json::from_str(&doc).unwrap_or_default();
    let text = |k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_owned);
    Ok(Health {
        exists: true,
        wal_status: text("wal_status"),
        safe_wal_size: v.get("safe_wal_size").and_then(serde_json::Value::as_i64),
        invalidation_reason: text("invalidation_reason"),
        confirmed: text("confirmed_flush_lsn"),
        active_pid: v
            .get("active_pid")
            .and_then(serde_json::Value::as_i64)
            .map(|p| p as i32),
        max_slot_wal_keep_size: keep,
        failover: v.get("failover").and_then(serde_json::Value::as_bool),
    })
}

/// What the source should do with the slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// No slot and no trace of an earlier run: create it (first start).
    Create,
    /// The slot is fine.
    Fine,
    /// The slot works but is in danger of losing WAL: say so.
    Warn(String),
    /// The slot's WAL is gone, or the slot is gone although this source ran before: the
    /// changes since its position cannot be streamed. The message names the cause and the fix.
    Lost(String),
}

/// Below this `safe_wal_size` a slot is reported as in danger.
pub const SAFE_WAL_WARN_BYTES: i64 = 1 << 30;

/// The verdict on `h` for `slot`; `ran_before` is true when this source's state store holds a
/// record of this database and slot (so a missing slot was lost, not never created).
pub fn verdict(slot: &str, h: &Health, ran_before: bool) -> Verdict {
    let recover = String::from(
        "run `trusst-cdc source --recover` once (same config): it creates a new slot and re-publishes the contacts \
         changed since the last event on the topic (see the README, \"When the replication slot is lost\"), or \
         `trusst-cdc teardown` and a fresh start for a full snapshot",
    );
    if !h.exists {
        return if ran_before {
            Verdict::Lost(format!(
                "replication slot {slot} is gone although this source streamed from it before (dropped by hand, or \
                 not carried over by a failover to a new primary): the changes since its last position are in no \
                 slot; {recover}"
            ))
        } else {
            Verdict::Create
        };
    }
    let keep = h.max_slot_wal_keep_size.as_deref().unwrap_or("-1");
    match h.wal_status.as_deref() {
        Some("lost") => {
            let why = match h.invalidation_reason.as_deref() {
                Some("rows_removed") => {
                    "the primary removed catalog rows it still needed (invalidation_reason = rows_removed, \
                     typically hot_standby_feedback off on a standby)"
                        .to_owned()
                }
                Some("wal_level_insufficient") => {
                    "wal_level was lowered below logical (invalidation_reason = wal_level_insufficient)".to_owned()
                }
                Some("idle_timeout") => {
                    "it was idle longer than idle_replication_slot_timeout (invalidation_reason = idle_timeout)"
                        .to_owned()
                }
                _ => format!(
                    "PostgreSQL removed WAL it still needed because it fell more than max_slot_wal_keep_size \
                     ({keep}) behind while the source was stopped or slow"
                ),
            };
            Verdict::Lost(format!(
                "replication slot {slot} was invalidated (wal_status = lost): {why}; the changes since its last \
                 position ({}) cannot be streamed any more; {recover}; and give the slot room \
                 (raise max_slot_wal_keep_size, or alert on trusst_cdc_replication_slot_safe_wal_size_bytes)",
                h.confirmed.as_deref().unwrap_or("unknown")
            ))
        }
        Some("unreserved") => Verdict::Warn(format!(
            "replication slot {slot} is past max_slot_wal_keep_size ({keep}) (wal_status = unreserved): the next \
             checkpoint may invalidate it; let the source catch up, or raise max_slot_wal_keep_size now"
        )),
        _ => match h.safe_wal_size {
            Some(b) if b < SAFE_WAL_WARN_BYTES => Verdict::Warn(format!(
                "replication slot {slot} can fall only {} MiB further behind before PostgreSQL invalidates it \
                 (safe_wal_size; max_slot_wal_keep_size = {keep})",
                b.max(0) >> 20
            )),
            _ => Verdict::Fine,
        },
    }
}

/// Whether the slot would survive a failover to a standby, in words for `check` and `status`:
/// `(survives, explanation)`.
pub fn failover_readiness(
    slot: &str,
    major: u32,
    standby: bool,
    h: &Health,
    synchronized_standby_slots: &str,
    failover_slot: bool,
) -> (bool, String) {
    if standby {
        return (
            true,
            format!(
                "slot {slot} lives on this read replica: it survives the replica's promotion, not the replica's loss \
                 (then run `trusst-cdc source --recover` against the next server)"
            ),
        );
    }
    if major < 17 {
        return (
            false,
            format!(
                "slot {slot} would not survive a failover: PostgreSQL {major} has no failover slots; after a promotion \
                 point the source at the new primary and run `trusst-cdc source --recover` (a new slot and a bounded \
                 re-publish); 17+ keeps the slot on standbys with sync_replication_slots"
            ),
        );
    }
    match (h.exists, h.failover) {
        (true, Some(true)) if synchronized_standby_slots.is_empty() => (
            true,
            format!(
                "slot {slot} is a failover slot, but synchronized_standby_slots is empty on the primary: the source may read \
                 changes a standby has not received, which a promotion would then lose from the database but not from \
                 the topic; set synchronized_standby_slots to the standbys' physical slots"
            ),
        ),
        (true, Some(true)) => (
            true,
            format!(
                "slot {slot} is a failover slot: standbys with sync_replication_slots = on keep it through a promotion \
                 (synchronized_standby_slots = '{synchronized_standby_slots}')"
            ),
        ),
        (true, _) => (
            false,
            format!(
                "slot {slot} is not a failover slot and would not survive a failover: `trusst-cdc teardown` and a new start \
                 creates it as one (failover_slot = true), or run ALTER_REPLICATION_SLOT {slot} (FAILOVER true) over a \
                 replication connection"
            ),
        ),
        (false, _) if failover_slot => (
            true,
            format!("slot {slot} will be created as a failover slot (PostgreSQL {major})"),
        ),
        (false, _) => (
            false,
            format!(
                "slot {slot} will be created without failover (failover_slot = false): it would not survive a failover"
            ),
        ),
    }
}

/// The numeric code of a `wal_status` for the metric (what alert rules compare against):
/// 0 reserved, 1 extended, 2 unreserved, 3 lost, -1 unknown.
pub fn status_code(wal_status: Option<&str>) -> i64 {
    match wal_status {
        Some("reserved") => 0,
        Some("extended") => 1,
        Some("unreserved") => 2,
        Some("lost") => 3,
        _ => -1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(status: &str) -> Health {
        Health {
            exists: true,
            wal_status: Some(status.into()),
            confirmed: Some("0/1920778".into()),
            max_slot_wal_keep_size: Some("64MB".into()),
            ..Default::default()
        }
    }

    #[test]
    fn first_start_creates_the_slot() {
        assert_eq!(verdict("s", &Health::default(), false), Verdict::Create);
    }

    #[test]
    fn a_missing_slot_of_a_source_that_ran_is_lost() {
        let Verdict::Lost(m) = verdict("s", &Health::default(), true) else {
            panic!()
        };
        assert!(m.contains("is gone") && m.contains("--recover"), "{m}");
    }

    #[test]
    fn a_lost_slot_names_the_setting_and_the_fix() {
        let Verdict::Lost(m) = verdict("s", &slot("lost"), true) else {
            panic!()
        };
        for needle in [
            "wal_status = lost",
            "max_slot_wal_keep_size (64MB)",
            "0/1920778",
            "--recover",
        ] {
            assert!(m.contains(needle), "{needle}: {m}");
        }
        let mut h = slot("lost");
        h.invalidation_reason = Some("rows_removed".into());
        let Verdict::Lost(m) = verdict("s", &h, false) else {
            panic!()
        };
        assert!(m.contains("hot_standby_feedback"), "{m}");
    }

    #[test]
    fn failover_readiness_by_version() {
        let h = slot("reserved");
        assert!(!failover_readiness("s", 15, false, &h, "", true).0);
        assert!(
            failover_readiness("s", 15, false, &h, "", true)
                .1
                .contains("--recover")
        );
        let mut f = h.clone();
        f.failover = Some(true);
        let (ok, m) = failover_readiness("s", 17, false, &f, "", true);
        assert!(
            ok && m.contains("synchronized_standby_slots is empty"),
            "{m}"
        );
        let (ok, m) = failover_readiness("s", 17, false, &f, "sb1", true);
        assert!(ok && m.contains("is a failover slot"), "{m}");
        let (ok, m) = failover_readiness("s", 17, false, &h, "sb1", true);
        assert!(!ok && m.contains("ALTER_REPLICATION_SLOT"), "{m}");
        assert!(failover_readiness("s", 16, true, &h, "", true).0);
    }

    #[test]
    fn danger_is_a_warning() {
        assert!(
            matches!(verdict("s", &slot("unreserved"), true), Verdict::Warn(m) if m.contains("next checkpoint"))
        );
        let mut h = slot("reserved");
        h.safe_wal_size = Some(100 << 20);
        assert!(matches!(verdict("s", &h, true), Verdict::Warn(m) if m.contains("100 MiB")));
        h.safe_wal_size = Some(10 << 30);
        assert_eq!(verdict("s", &h, true), Verdict::Fine);
        assert_eq!(verdict("s", &slot("extended"), true), Verdict::Fine);
        assert_eq!(status_code(Some("lost")), 3);
    }
}
