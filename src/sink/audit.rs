//! The optional sync audit: a sink records its activity in the integration guide's
//! `crm_sync_status` table, in a database the operator chooses (never the Trusst database).
//!
//! A streaming sink has no "runs" like the guide's 15-minute job, so one row covers one audit
//! interval in which records were written or dead-lettered, plus a last row when the sink stops
//! (or fails). Counts are deltas of the run's [`Totals`]: a row that could not be written is
//! folded into the next one, so nothing is lost while the audit database is down, and once
//! started the sink never stops or slows because of it.

use std::time::{Duration, Instant};

use serde::Deserialize;
use tokio_postgres::Client;

use super::runner::Totals;
use crate::error::{Error, Result};

/// `[audit]` of a sink config.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// PostgreSQL URL of the audit database; `TRUSST_AUDIT_DATABASE_URL` overrides. Unset: no audit.
    #[serde(default)]
    pub database_url: Option<String>,
    /// Longest time covered by one row while records flow.
    #[serde(
        default = "default_interval",
        deserialize_with = "crate::config::duration::deserialize"
    )]
    pub interval: Duration,
    /// Table name (created when missing, with the guide's columns).
    #[serde(default = "default_table")]
    pub table: String,
}

impl Default for AuditConfig {
    fn default() -> Self {
        crate::config::parse("").expect("defaults parse")
    }
}

fn default_interval() -> Duration {
    Duration::from_secs(60)
}

/// The integration guide's table name.
pub const DEFAULT_TABLE: &str = "crm_sync_status";

fn default_table() -> String {
    DEFAULT_TABLE.into()
}

impl AuditConfig {
    /// Check the table name (it is spliced into SQL) and the interval.
    pub fn validate(&self) -> Result<()> {
        if !valid_table(&self.table) {
            return Err(Error::user(format!(
                "[audit] table {:?}: use a plain name or schema.name of lowercase letters, digits and '_'",
                self.table
            )));
        }
        if self.interval < Duration::from_secs(1) {
            return Err(Error::user("[audit] interval must be at least 1s"));
        }
        Ok(())
    }
}

/// Lowercase identifiers only, optionally schema-qualified, so the name needs no quoting.
fn valid_table(name: &str) -> bool {
    let part = |p: &str| {
        !p.is_empty()
            && p.len() <= 63
            && p.bytes()
                .next()
                .is_some_and(|b| b.is_ascii_lowercase() || b == b'_')
            && p.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    };
    let parts: Vec<&str> = name.split('.').collect();
    parts.len() <= 2 && parts.iter().all(|p| part(p))
}

/// The `status` column: the guide's three values.
pub fn status_of(synced: u64, failed: u64, error: Option<&str>) -> &'static str {
    match (synced, failed, error) {
        (_, 0, None) => "success",
        (0, _, _) => "failed",
        _ => "partial",
    }
}

/// One audit row, before it is written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    /// `<sink>-<window start, UTC>-<random>`: unique, and says which sink wrote it.
    pub sync_id: String,
    /// `salesforce`, `dynamics` or `mulesoft`.
    pub crm_system: String,
    /// End of the window.
    pub last_sync_time: chrono::NaiveDateTime,
    /// Records the CRM accepted in the window.
    pub records_synced: i32,
    /// Records dead-lettered in the window.
    pub records_failed: i32,
    /// `success`, `partial` or `failed`.
    pub status: &'static str,
    /// The window's last failure (a dead-letter reason or the error that stopped the sink).
    pub error_message: Option<String>,
}

/// Writes one row per active interval for one sink.
pub struct Audit {
    cfg: AuditConfig,
    url: String,
    sink: String,
    crm_system: String,
    client: Option<Client>,
    window_start: chrono::DateTime<chrono::Utc>,
    last_flush: Instant,
    /// Totals already written to the table.
    flushed: Totals,
}

impl Audit {
    /// Connect, refuse the Trusst database, and create the table when missing. `None` when the
    /// config has no database URL.
    pub async fn open(cfg: &AuditConfig, sink: &str, crm_system: &str) -> Result<Option<Self>> {
        let Some(url) = cfg.database_url.clone().filter(|u| !u.is_empty()) else {
            return Ok(None);
        };
        cfg.validate()?;
        let client = crate::pg::connect(&url).await.map_err(|e| {
            Error::user(format!(
                "[audit] database_url: {e}; fix the URL, start that database, or remove database_url to run without the sync audit"
            ))
        })?;
        refuse_trusst_database(&client).await?;
        client
            .batch_execute(&format!(
                "CREATE TABLE IF NOT EXISTS {} (
                     sync_id VARCHAR PRIMARY KEY,
                     crm_system VARCHAR NOT NULL,
                     last_sync_time TIMESTAMP NOT NULL,
                     records_synced INTEGER,
                     records_failed INTEGER,
                     status VARCHAR NOT NULL,
                     error_message TEXT,
                     created_at TIMESTAMP DEFAULT NOW()
                 )",
                cfg.table
            ))
            .await
            .map_err(|e| {
                Error::user(format!(
                    "[audit] cannot create table {} ({e}); grant CREATE on the schema or create it with the columns of the integration guide",
                    cfg.table
                ))
            })?;
        tracing::info!(table = %cfg.table, "sync audit on");
        Ok(Some(Self {
            cfg: cfg.clone(),
            url,
            sink: sink.to_owned(),
            crm_system: crm_system.to_owned(),
            client: Some(client),
            window_start: chrono::Utc::now(),
            last_flush: Instant::now(),
            flushed: Totals::default(),
        }))
    }

    /// Write a row when the interval is over and something happened in it.
    pub async fn tick(&mut self, totals: &Totals) {
        if self.last_flush.elapsed() >= self.cfg.interval {
            self.flush(totals, None).await;
        }
    }

    /// Write the last row of a run; `error` is what stopped it, if anything.
    pub async fn finish(&mut self, totals: &Totals, error: Option<&Error>) {
        self.flush(totals, error.map(|e| e.to_string())).await;
    }

    async fn flush(&mut self, totals: &Totals, stop_error: Option<String>) {
        let synced = totals.written.saturating_sub(self.flushed.written);
        let failed = totals
            .dead_lettered
            .saturating_sub(self.flushed.dead_lettered);
        self.last_flush = Instant::now();
        if synced == 0 && failed == 0 && stop_error.is_none() {
            return;
        }
        let error = stop_error.or_else(|| {
            if failed > 0 {
                totals.last_failure.clone()
            } else {
                None
            }
        });
        let now = chrono::Utc::now();
        let row = Row {
            sync_id: format!(
                "{}-{}-{:06x}",
                self.sink,
                self.window_start.format("%Y%m%dT%H%M%S%.3fZ"),
                rand::random::<u32>() & 0xff_ffff
            ),
            crm_system: self.crm_system.clone(),
            last_sync_time: now.naive_utc(),
            records_synced: i32::try_from(synced).unwrap_or(i32::MAX),
            records_failed: i32::try_from(failed).unwrap_or(i32::MAX),
            status: status_of(synced, failed, error.as_deref()),
            error_message: error,
        };
        match self.insert(&row).await {
            Ok(()) => {
                self.flushed = totals.clone();
                self.window_start = now;
            }
            // The counts stay pending and go into the next row.
            Err(e) => {
                tracing::warn!(error = %e, sync_id = %row.sync_id, "could not write the sync audit row; it will be folded into the next one")
            }
        }
    }

    async fn insert(&mut self, row: &Row) -> Result<()> {
        if self.client.as_ref().is_none_or(Client::is_closed) {
            self.client = Some(crate::pg::connect(&self.url).await?);
        }
        let client = self.client.as_ref().expect("connected above");
        let sql = format!(
            "INSERT INTO {} (sync_id, crm_system, last_sync_time, records_synced, records_failed, status, error_message) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
            self.cfg.table
        );
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 7] = [
            &row.sync_id,
            &row.crm_system,
            &row.last_sync_time,
            &row.records_synced,
            &row.records_failed,
            &row.status,
            &row.error_message,
        ];
        let write = client.execute(&sql, &params);
        match tokio::time::timeout(Duration::from_secs(10), write).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => {
                self.client = None;
                Err(Error::external("writing the sync audit row").with_source(e))
            }
            Err(_) => {
                self.client = None;
                Err(Error::external(
                    "writing the sync audit row timed out after 10s",
                ))
            }
        }
    }
}

/// The audit must not add tables or writes to the Trusst database the source replicates.
async fn refuse_trusst_database(client: &Client) -> Result<()> {
    let row = client
        .query_one(
            "SELECT count(*) FROM information_schema.tables \
             WHERE table_schema = ANY (current_schemas(false)) AND table_name IN ('contacts', 'inferences', 'questions')",
            &[],
        )
        .await
        .map_err(|e| Error::external("checking the audit database").with_source(e))?;
    let n: i64 = row.get(0);
    if n == 3 {
        return Err(Error::user(
            "[audit] database_url points at the Trusst database (it has the contacts, inferences and questions tables); \
             the sync audit must live in a database of its own: create one (e.g. CREATE DATABASE trusst_cdc_ops) and point database_url at it",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_follows_the_guide() {
        assert_eq!(status_of(10, 0, None), "success");
        assert_eq!(status_of(10, 2, Some("x")), "partial");
        assert_eq!(status_of(0, 2, Some("x")), "failed");
        assert_eq!(status_of(0, 0, Some("stopped")), "failed");
        assert_eq!(status_of(5, 0, Some("stopped")), "partial");
    }

    #[test]
    fn table_names_need_no_quoting() {
        assert!(valid_table("crm_sync_status"));
        assert!(valid_table("ops.crm_sync_status"));
        for bad in ["", "CRM", "a.b.c", "x;drop table y", "1abc", "a b", "ops."] {
            assert!(!valid_table(bad), "{bad:?}");
        }
        let cfg = AuditConfig {
            table: "bad name".into(),
            ..AuditConfig::default()
        };
        assert!(
            cfg.validate()
                .unwrap_err()
                .to_string()
                .contains("[audit] table")
        );
    }

    #[test]
    fn defaults() {
        let cfg = AuditConfig::default();
        assert_eq!(cfg.table, DEFAULT_TABLE);
        assert_eq!(cfg.interval, Duration::from_secs(60));
        assert!(cfg.database_url.is_none());
    }
}
