//! Preflight checks and the publication / slot the source streams from.
//!
//! The same checks back `trusst-cdc check` and the source's start, so an operator sees the
//! identical message (with its fix) either way.

use tokio_postgres::Client;

use super::triggers::TABLES;
use crate::error::{self, Error, Result};

/// Columns the connector reads, per table (the seed's join plus what triggers need).
pub const REQUIRED_COLUMNS: [(&str, &[&str]); 4] = [
    (
        "contacts",
        &[
            "contact_id",
            "stream_id",
            "external_id",
            "start_time",
            "direction",
            "current_stage",
            "agent_id",
        ],
    ),
    (
        "inferences",
        &[
            "inference_id",
            "contact_id",
            "question_id",
            "result",
            "updated_at",
        ],
    ),
    (
        "questions",
        &[
            "question_id",
            "key",
            "text",
            "result_type",
            "is_universal",
            "group",
            "order",
        ],
    ),
    (
        "s3_conversations",
        &[
            "conversation_id",
            "contact_id",
            "conn_id",
            "agent_id",
            "call_time",
        ],
    ),
];

/// Tables whose deletes must carry `contact_id`, a column outside their primary key.
pub const NEED_FULL_IDENTITY: [&str; 2] = ["inferences", "s3_conversations"];

/// One preflight result.
#[derive(Debug, Clone)]
pub struct Finding {
    /// What was checked, with the value found.
    pub what: String,
    /// `None` when fine; otherwise the fix.
    pub fix: Option<String>,
}

impl Finding {
    fn ok(what: impl Into<String>) -> Self {
        Self {
            what: what.into(),
            fix: None,
        }
    }
    fn bad(what: impl Into<String>, fix: impl Into<String>) -> Self {
        Self {
            what: what.into(),
            fix: Some(fix.into()),
        }
    }
}

/// Check the database side: wal_level, privileges, tables and columns, replica identity,
/// publication coverage and the slot.
pub async fn preflight(
    client: &Client,
    publication: &str,
    slot: &str,
    create_publication: bool,
) -> Result<Vec<Finding>> {
    let q = |sql: &'static str| async move {
        client
            .query_one(sql, &[])
            .await
            .map_err(|e| error::pg("running preflight checks", e))
    };
    let mut out = Vec::new();

    // pg_visible_in_snapshot (the re-read's visibility wait) and pgoutput's needs: 13 or later.
    let version: String = q("SHOW server_version_num").await?.get(0);
    let major = version.parse::<u32>().unwrap_or(0) / 10000;
    out.push(if major >= 13 {
        Finding::ok(format!("PostgreSQL {major}"))
    } else {
        Finding::bad(
            format!("PostgreSQL server_version_num = {version}"),
            "upgrade to PostgreSQL 13 or later (versions before 13 are out of support)",
        )
    });

    let wal: String = q("SHOW wal_level").await?.get(0);
    out.push(if wal == "logical" {
        Finding::ok("wal_level = logical")
    } else {
        Finding::bad(
            format!("wal_level = {wal}"),
            "set wal_level = logical in postgresql.conf (RDS/Aurora: rds.logical_replication = 1 in the parameter group) and restart PostgreSQL",
        )
    });

    let row = q("SELECT current_user::text, rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user").await?;
    let (user, repl): (String, bool) = (row.get(0), row.get(1));
    out.push(if repl {
        Finding::ok(format!("role {user} has the REPLICATION privilege"))
    } else {
        Finding::bad(
            format!("role {user} lacks the REPLICATION privilege"),
            format!(
                "ALTER ROLE {user} WITH REPLICATION (RDS/Aurora: GRANT rds_replication TO {user})"
            ),
        )
    });

    for (table, columns) in REQUIRED_COLUMNS {
        let rows = client
            .query(
                "SELECT a.attname::text FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid \
                 WHERE c.oid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped",
                &[&table],
            )
            .await
            .map_err(|e| error::pg("reading table columns", e))?;
        if rows.is_empty() {
            out.push(Finding::bad(
                format!("table {table} is missing"),
                format!("point DATABASE_URL at the Trusst database (the one holding {table}) or create it"),
            ));
            continue;
        }
        let have: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
        let missing: Vec<&str> = columns
            .iter()
            .copied()
            .filter(|c| !have.iter().any(|h| h == c))
            .collect();
        if missing.is_empty() {
            out.push(Finding::ok(format!(
                "table {table} has every column the connector reads"
            )));
        } else {
            out.push(Finding::bad(
                format!("table {table} lacks column(s) {}", missing.join(", ")),
                "the Trusst schema changed or this is not the Trusst database: check the platform release notes",
            ));
        }
        let can_select: bool = client
            .query_one(
                "SELECT has_table_privilege(to_regclass($1), 'SELECT')",
                &[&table],
            )
            .await
            .map_err(|e| error::pg("checking table privileges", e))?
            .get(0);
        if !can_select {
            out.push(Finding::bad(
                format!("role {user} cannot SELECT from {table}"),
                format!("GRANT SELECT ON {table} TO {user}"),
            ));
        }
    }

    for table in NEED_FULL_IDENTITY {
        let ident: Option<i8> = client
            .query_opt(
                "SELECT relreplident FROM pg_class WHERE oid = to_regclass($1)",
                &[&table],
            )
            .await
            .ok()
            .flatten()
            .map(|r| r.get(0));
        match ident.map(|c| c as u8) {
            None => {}
            Some(b'f') => out.push(Finding::ok(format!("{table} has REPLICA IDENTITY FULL"))),
            Some(_) => out.push(Finding::bad(
                format!("{table} does not have REPLICA IDENTITY FULL: its deletes would not say which contact they belong to"),
                format!("ALTER TABLE {table} REPLICA IDENTITY FULL"),
            )),
        }
    }

    let pub_exists: bool = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = $1)",
            &[&publication],
        )
        .await
        .map_err(|e| error::pg("reading publications", e))?
        .get(0);
    if pub_exists {
        let rows = client
            .query(
                "SELECT tablename::text FROM pg_publication_tables WHERE pubname = $1",
                &[&publication],
            )
            .await
            .map_err(|e| error::pg("reading publication tables", e))?;
        let have: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
        let missing: Vec<&str> = TABLES
            .iter()
            .copied()
            .filter(|t| !have.iter().any(|h| h == t))
            .collect();
        out.push(if missing.is_empty() {
            Finding::ok(format!(
                "publication {publication} covers {}",
                TABLES.join(", ")
            ))
        } else {
            Finding::bad(
                format!(
                    "publication {publication} does not cover {}",
                    missing.join(", ")
                ),
                format!(
                    "ALTER PUBLICATION {publication} ADD TABLE {}",
                    missing.join(", ")
                ),
            )
        });
    } else if create_publication {
        out.push(Finding::ok(format!(
            "publication {publication} will be created at start"
        )));
    } else {
        out.push(Finding::bad(
            format!("publication {publication} does not exist"),
            format!(
                "CREATE PUBLICATION {publication} FOR TABLE {}",
                TABLES.join(", ")
            ),
        ));
    }

    let slot_row = client
        .query_opt("SELECT plugin::text, database::text = current_database() FROM pg_replication_slots WHERE slot_name = $1", &[&slot])
        .await
        .map_err(|e| error::pg("reading replication slots", e))?;
    out.push(match slot_row {
        None => Finding::ok(format!("slot {slot} will be created at start")),
        Some(r) => {
            let (plugin, same_db): (Option<String>, Option<bool>) = (r.get(0), r.get(1));
            if plugin.as_deref() != Some("pgoutput") {
                Finding::bad(
                    format!("slot {slot} exists with plugin {}", plugin.unwrap_or_else(|| "none (physical)".into())),
                    format!("use another slot name (TRUSST_SLOT) or SELECT pg_drop_replication_slot('{slot}')"),
                )
            } else if same_db != Some(true) {
                Finding::bad(format!("slot {slot} belongs to another database"), "use another slot name (TRUSST_SLOT)")
            } else {
                Finding::ok(format!("slot {slot} exists (pgoutput)"))
            }
        }
    });
    Ok(out)
}

/// Turn failed findings into one user error listing each problem with its fix.
pub fn failures(findings: &[Finding]) -> Result<()> {
    let bad: Vec<String> = findings
        .iter()
        .filter_map(|f| f.fix.as_ref().map(|fix| format!("{} (fix: {fix})", f.what)))
        .collect();
    if bad.is_empty() {
        Ok(())
    } else {
        Err(Error::user(bad.join("; ")))
    }
}

/// Create the publication over the four tables when it is missing.
pub async fn ensure_publication(client: &Client, publication: &str) -> Result<()> {
    let exists: bool = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = $1)",
            &[&publication],
        )
        .await
        .map_err(|e| error::pg("reading publications", e))?
        .get(0);
    if !exists {
        // The name was validated as a plain identifier, so formatting it in is safe.
        client
            .batch_execute(&format!("CREATE PUBLICATION {publication} FOR TABLE {}", TABLES.join(", ")))
            .await
            .map_err(|e| {
                error::pg(
                    format!(
                        "creating publication {publication} (needs ownership of the tables; or have an owner run \
                         CREATE PUBLICATION {publication} FOR TABLE {} and set create_publication = false)",
                        TABLES.join(", ")
                    ),
                    e,
                )
            })?;
        tracing::info!(publication, "created publication");
    }
    Ok(())
}

/// Create the slot when missing. Returns its confirmed position and whether it was created now.
pub async fn ensure_slot(client: &Client, slot: &str) -> Result<(u64, bool)> {
    let row = client
        .query_opt(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(|e| error::pg("reading replication slots", e))?;
    if let Some(r) = row {
        let lsn: Option<String> = r.get(0);
        return Ok((parse_lsn(lsn.as_deref().unwrap_or("0/0"))?, false));
    }
    let r = client
        .query_one(
            "SELECT lsn::text FROM pg_create_logical_replication_slot($1, 'pgoutput')",
            &[&slot],
        )
        .await
        .map_err(|e| error::pg(format!("creating replication slot {slot}"), e))?;
    let lsn: String = r.get(0);
    tracing::info!(slot, lsn, "created logical replication slot");
    Ok((parse_lsn(&lsn)?, true))
}

/// The server's current WAL write position.
pub async fn current_wal_lsn(client: &Client) -> Result<u64> {
    let now: String = client
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .map_err(|e| error::pg("reading the WAL position", e))?
        .get(0);
    parse_lsn(&now)
}

/// The slot's unconfirmed WAL in bytes (`pg_current_wal_lsn()` minus `confirmed_flush_lsn`);
/// `None` when the slot does not exist.
pub async fn slot_lag_bytes(client: &Client, slot: &str) -> Result<Option<i64>> {
    let row = client
        .query_opt(
            "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(|e| error::pg(format!("reading the lag of slot {slot}"), e))?;
    Ok(row.and_then(|r| r.get::<_, Option<i64>>(0)))
}

/// Parse PostgreSQL's `X/Y` LSN text.
pub fn parse_lsn(s: &str) -> Result<u64> {
    let (hi, lo) = s
        .split_once('/')
        .ok_or_else(|| Error::internal(format!("bad LSN {s:?}")))?;
    let hi = u64::from_str_radix(hi, 16).map_err(|_| Error::internal(format!("bad LSN {s:?}")))?;
    let lo = u64::from_str_radix(lo, 16).map_err(|_| Error::internal(format!("bad LSN {s:?}")))?;
    Ok((hi << 32) | lo)
}
