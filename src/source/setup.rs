//! Preflight checks and the publication / slot the source streams from.
//!
//! The same checks back `trusst-cdc check` and the source's start, so an operator sees the
//! identical message (with its fix) either way.

use tokio_postgres::Client;

use super::schema;
use super::triggers::TABLES;
use crate::error::{self, Error, Result};

/// Tables whose deletes must name their contact: the replica identity (the old row image a
/// delete logs) must contain `contact_id`.
pub const IDENTITY_TABLES: [&str; 3] = ["contacts", "inferences", "s3_conversations"];

/// One preflight result.
#[derive(Debug, Clone)]
pub struct Finding {
    /// What was checked, with the value found.
    pub what: String,
    /// `None` when fine; otherwise the fix (or, for a warning, the advice).
    pub fix: Option<String>,
    /// A danger worth acting on that does not stop the source (`check` prints WARN).
    pub warning: bool,
}

impl Finding {
    /// A check that passed.
    pub fn ok(what: impl Into<String>) -> Self {
        Self {
            what: what.into(),
            fix: None,
            warning: false,
        }
    }

    /// A check that failed, with its fix.
    pub fn bad(what: impl Into<String>, fix: impl Into<String>) -> Self {
        Self {
            what: what.into(),
            fix: Some(fix.into()),
            warning: false,
        }
    }

    /// A danger that does not stop the source, with advice.
    pub fn warn(what: impl Into<String>, advice: impl Into<String>) -> Self {
        Self {
            what: what.into(),
            fix: Some(advice.into()),
            warning: true,
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
    primary_url: bool,
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

    // A read replica decodes logical changes from PostgreSQL 16 on.
    let standby: bool = q("SELECT pg_is_in_recovery()").await?.get(0);
    if standby {
        out.push(if major >= 16 {
            Finding::ok(format!("the database URL names a read replica (PostgreSQL {major} decodes on a standby)"))
        } else {
            Finding::bad(
                format!("the database URL names a read replica of PostgreSQL {major}"),
                "logical decoding on a standby needs PostgreSQL 16 or later: point DATABASE_URL at the primary",
            )
        });
        let feedback: String = q("SHOW hot_standby_feedback").await?.get(0);
        out.push(if feedback == "on" {
            Finding::ok("hot_standby_feedback = on (the primary keeps the catalog rows the slot needs)")
        } else {
            Finding::bad(
                format!("hot_standby_feedback = {feedback} on the replica: the primary could remove catalog rows the slot needs, which invalidates it"),
                "ALTER SYSTEM SET hot_standby_feedback = on on the replica and reload (RDS/Aurora: the replica's parameter group)",
            )
        });
        if !primary_url {
            out.push(Finding::warn(
                "no [database] primary_url: a replica cannot write the heartbeat (an idle slot then moves only with keepalives), create the publication, or hurry a new slot's first snapshot (it waits for the primary's next running-transactions record, up to minutes when the primary is idle)",
                "set [database] primary_url (or PRIMARY_DATABASE_URL) to the primary",
            ));
        }
    }

    let wal: String = q("SHOW wal_level").await?.get(0);
    out.push(if wal == "logical" {
        Finding::ok("wal_level = logical")
    } else {
        Finding::bad(
            format!("wal_level = {wal}"),
            "set wal_level = logical in postgresql.conf (RDS/Aurora: rds.logical_replication = 1 in the parameter group) and restart PostgreSQL",
        )
    });

    // A logical walsender named in synchronous_standby_names would make every commit wait
    // for the source, which confirms only after the commit is visible: commits would stall.
    let sync: String = q("SHOW synchronous_standby_names").await?.get(0);
    if sync.contains('*') || sync.to_ascii_lowercase().contains("trusst-cdc") {
        out.push(Finding::warn(
            format!("synchronous_standby_names = '{sync}' can select the source's walsender (application_name trusst-cdc:<slot>) as a synchronous standby"),
            "name the physical standbys explicitly in synchronous_standby_names instead of '*'",
        ));
    }

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

    let types = schema::column_types(client).await?;
    let table_exists = |t: &str| types.keys().any(|(table, _)| table == t);
    for (table, _) in schema::COLUMNS {
        if !table_exists(table) {
            out.push(Finding::bad(
                format!("table {table} is missing"),
                format!("point DATABASE_URL at the Trusst database (the one holding {table}) or create it"),
            ));
            continue;
        }
        let can_select: bool = client
            .query_one(
                "SELECT has_table_privilege(to_regclass($1), 'SELECT')",
                &[table],
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
    let lookup = |t: &str, c: &str| types.get(&(t.to_owned(), c.to_owned())).cloned();
    match schema::Plan::new(lookup) {
        Ok(plan) => out.push(Finding::ok(format!(
            "every column the connector reads has a type it reads ({})",
            plan.describe()
        ))),
        Err(problems) => {
            for p in problems.into_iter().filter(|p| table_exists(p.table)) {
                out.push(Finding::bad(
                    format!("column {}.{}: {}", p.table, p.column, p.what),
                    p.fix,
                ));
            }
        }
    }

    for table in IDENTITY_TABLES {
        if let Some(f) = identity_finding(client, table).await? {
            out.push(f);
        }
    }
    if let Some(f) = stage_identity_finding(client).await? {
        out.push(f);
    }
    if let Some(f) = question_identity_finding(client).await? {
        out.push(f);
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
        // A partitioned table published without publish_via_partition_root is listed (and
        // its changes are sent) under its partitions' names, which the stream would not know.
        let by_partition: Vec<String> = client
            .query(
                "SELECT c.relname::text FROM unnest($2::text[]) AS n(name) \
                 JOIN pg_class c ON c.oid = to_regclass(n.name) \
                 JOIN pg_publication p ON p.pubname = $1 \
                 WHERE c.relkind = 'p' AND NOT p.pubviaroot",
                &[&publication, &TABLES.as_slice()],
            )
            .await
            .map_err(|e| error::pg("reading partitioned tables", e))?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let missing: Vec<&str> = TABLES
            .iter()
            .copied()
            .filter(|t| !have.iter().any(|h| h == t) && !by_partition.iter().any(|p| p == t))
            .collect();
        if !by_partition.is_empty() {
            out.push(Finding::bad(
                format!(
                    "publication {publication} publishes the partitioned table(s) {} under their partitions' names, \
                     which the source does not read",
                    by_partition.join(", ")
                ),
                format!("ALTER PUBLICATION {publication} SET (publish_via_partition_root = true)"),
            ));
        }
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
    } else if create_publication && (!standby || primary_url) {
        out.push(Finding::ok(format!(
            "publication {publication} will be created at start{}",
            if standby { " (on the primary)" } else { "" }
        )));
    } else {
        out.push(Finding::bad(
            format!("publication {publication} does not exist"),
            format!(
                "CREATE PUBLICATION {publication} FOR TABLE {} WITH (publish_via_partition_root = true)",
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

/// Whether deletes of `table` say which contact they belong to, and what each choice of replica
/// identity costs in WAL; `None` when the table is missing (reported elsewhere).
async fn identity_finding(client: &Client, table: &str) -> Result<Option<Finding>> {
    let rows = identities(client, table).await?;
    let verdicts: Vec<Finding> = rows
        .iter()
        .map(|(name, kind, index, cols)| identity_verdict(name, kind, index.as_deref(), cols))
        .collect();
    Ok(one_line(table, verdicts))
}

/// Whether an update of `contacts` says which stage the row had, so a contact that leaves
/// COMPLETED is seen (its answers are then emptied in the targets).
async fn stage_identity_finding(client: &Client) -> Result<Option<Finding>> {
    let rows = identities(client, "contacts").await?;
    let verdicts: Vec<Finding> = rows
        .iter()
        .map(|(name, kind, index, cols)| stage_verdict(name, kind, index.as_deref(), cols))
        .collect();
    Ok(one_line("contacts", verdicts))
}

/// Whether an update or delete of `questions` logs the old row, so a rename or a question that
/// stops being universal, replayed after a restart, still names the key to clear.
async fn question_identity_finding(client: &Client) -> Result<Option<Finding>> {
    let rows = identities(client, "questions").await?;
    let verdicts: Vec<Finding> = rows
        .iter()
        .map(|(name, kind, _, _)| question_verdict(name, kind))
        .collect();
    Ok(one_line("questions", verdicts))
}

/// The verdict on `questions`' replica identity (pure, unit-tested). Without the old row a
/// rename made while the source was stopped leaves the old field filled in the targets.
pub fn question_verdict(table: &str, kind: &str) -> Finding {
    if kind == "f" {
        return Finding::ok(format!(
            "{table} has REPLICA IDENTITY FULL: a renamed question's old key is cleared in the targets even when the \
             rename is replayed after a restart"
        ));
    }
    Finding::warn(
        format!(
            "{table}'s replica identity does not log the old row: a question renamed (or deleted) while the source \
             is stopped leaves its old field filled in the targets"
        ),
        format!(
            "ALTER TABLE {table} REPLICA IDENTITY FULL (the table is small; its updates are rare)"
        ),
    )
}

/// One line for a table: the first problem among its partitions, or the (first) verdict when
/// all pass.
fn one_line(table: &str, verdicts: Vec<Finding>) -> Option<Finding> {
    let n = verdicts.len();
    verdicts
        .iter()
        .find(|f| f.fix.is_some())
        .or(verdicts.first())
        .cloned()
        .map(|mut f| {
            if n > 1 {
                f.what = format!("{table} (partitioned, {n} partitions): {}", f.what);
            }
            f
        })
}

/// Each leaf of `table` (the table itself when not partitioned) with its replica identity
/// kind, identity index and the index's columns.
async fn identities(
    client: &Client,
    table: &str,
) -> Result<Vec<(String, String, Option<String>, Vec<String>)>> {
    // A partitioned table decodes each change with its partition's identity: check the leaves.
    let rows = client
        .query(
            "WITH t AS (SELECT to_regclass($1) AS oid), \
                  r AS (SELECT coalesce((SELECT array_agg(p.relid) FROM t, pg_partition_tree(t.oid) p WHERE p.isleaf), \
                                        ARRAY[(SELECT oid FROM t)]) AS leaves FROM t WHERE t.oid IS NOT NULL) \
             SELECT c.relname::text, c.relreplident::text, \
                    (SELECT i.indexrelid::regclass::text FROM pg_index i WHERE i.indrelid = c.oid \
                       AND CASE c.relreplident WHEN 'i' THEN i.indisreplident WHEN 'd' THEN i.indisprimary ELSE false END \
                     LIMIT 1), \
                    (SELECT array_agg(a.attname::text ORDER BY a.attnum) FROM pg_index i \
                       JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = ANY(i.indkey) \
                     WHERE i.indrelid = c.oid \
                       AND CASE c.relreplident WHEN 'i' THEN i.indisreplident WHEN 'd' THEN i.indisprimary ELSE false END) \
             FROM r, unnest(r.leaves) AS leaf JOIN pg_class c ON c.oid = leaf ORDER BY c.relname",
            &[&table],
        )
        .await
        .map_err(|e| error::pg("reading replica identities", e))?;
    Ok(rows
        .iter()
        .map(|row| {
            let cols: Option<Vec<String>> = row.get(3);
            (row.get(0), row.get(1), row.get(2), cols.unwrap_or_default())
        })
        .collect())
}

/// The verdict on whether `contacts`' replica identity carries the old `current_stage`
/// (pure, unit-tested). Missing it is a warning: everything else works.
pub fn stage_verdict(table: &str, kind: &str, index: Option<&str>, cols: &[String]) -> Finding {
    let carries =
        kind == "f" || (matches!(kind, "i" | "d") && cols.iter().any(|c| c == "current_stage"));
    if carries {
        return Finding::ok(format!(
            "{table}'s replica identity carries the old current_stage: a contact that leaves COMPLETED is seen"
        ));
    }
    let now = match (kind, index) {
        ("n", _) => "NOTHING".to_owned(),
        (_, Some(i)) => format!("{i} ({})", cols.join(", ")),
        _ => "the primary key".to_owned(),
    };
    Finding::warn(
        format!(
            "{table}'s replica identity ({now}) does not carry the old current_stage: a contact that leaves COMPLETED \
             is not seen, and the targets keep its answers until it is COMPLETED again"
        ),
        format!(
            "ALTER TABLE {table} REPLICA IDENTITY FULL; or CREATE UNIQUE INDEX {table}_cdc_identity ON {table} \
             (contact_id, current_stage); ALTER TABLE {table} REPLICA IDENTITY USING INDEX {table}_cdc_identity \
             (current_stage must be NOT NULL)"
        ),
    )
}

/// The verdict on a table's replica identity (pure, so every case is unit-tested).
pub fn identity_verdict(table: &str, kind: &str, index: Option<&str>, cols: &[String]) -> Finding {
    let fix = format!(
        "either ALTER TABLE {table} REPLICA IDENTITY FULL (simplest; every UPDATE and DELETE then logs the whole old \
         row, long results included), or an identity index that contains contact_id, which logs only its columns: \
         CREATE UNIQUE INDEX {table}_cdc_identity ON {table} (<primary key columns>, contact_id); \
         ALTER TABLE {table} REPLICA IDENTITY USING INDEX {table}_cdc_identity (its columns must be NOT NULL)"
    );
    let has_contact = cols.iter().any(|c| c == "contact_id");
    let list = cols.join(", ");
    match (kind, index) {
        ("f", _) => Finding::ok(format!(
            "{table} has REPLICA IDENTITY FULL: deletes name their contact; every UPDATE and DELETE also logs the whole \
             old row in WAL (an identity index that contains contact_id would log only its columns)"
        )),
        ("i" | "d", Some(index)) if has_contact => Finding::ok(format!(
            "{table}'s replica identity is {} {index} ({list}), which contains contact_id: deletes name their contact \
             and log only those columns",
            if kind == "i" {
                "the index"
            } else {
                "the primary key"
            }
        )),
        ("i" | "d", Some(index)) => Finding::bad(
            format!(
                "{table}'s replica identity ({index}: {list}) lacks contact_id: its deletes would not say which \
                 contact they belong to"
            ),
            fix,
        ),
        _ => Finding::bad(
            format!(
                "{table} has no usable replica identity: its deletes would not say which contact they belong to"
            ),
            fix,
        ),
    }
}

/// Turn failed findings into one user error listing each problem with its fix.
pub fn failures(findings: &[Finding]) -> Result<()> {
    let bad: Vec<String> = findings
        .iter()
        .filter(|f| !f.warning)
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
            // Via the root: changes of a partitioned table arrive under its own name, not a
            // partition's (PostgreSQL 13+).
            .batch_execute(&format!(
                "CREATE PUBLICATION {publication} FOR TABLE {} WITH (publish_via_partition_root = true)",
                TABLES.join(", ")
            ))
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

/// The slot's confirmed position, `None` when the slot does not exist.
pub async fn slot_position(client: &Client, slot: &str) -> Result<Option<u64>> {
    let row = client
        .query_opt(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(|e| error::pg("reading replication slots", e))?;
    row.map(|r| {
        let lsn: Option<String> = r.get(0);
        parse_lsn(lsn.as_deref().unwrap_or("0/0"))
    })
    .transpose()
}

/// Drop the slot (it must not be in use).
pub async fn drop_slot(client: &Client, slot: &str) -> Result<()> {
    client
        .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
        .await
        .map_err(|e| error::pg(format!("dropping replication slot {slot}"), e))?;
    tracing::info!(slot, "dropped replication slot");
    Ok(())
}

/// Create the slot (pgoutput); its starting position. With `failover` (PostgreSQL 17+) it is a
/// failover slot that standbys with `sync_replication_slots` keep in step. On a read replica the
/// creation waits for a running-transactions record from the primary; with `primary` given,
/// the primary is asked to log one every second until the slot exists.
pub async fn create_slot(
    client: &Client,
    slot: &str,
    failover: bool,
    primary: Option<&Client>,
) -> Result<u64> {
    let sql = if failover {
        "SELECT lsn::text FROM pg_create_logical_replication_slot($1, 'pgoutput', false, false, true)"
    } else {
        "SELECT lsn::text FROM pg_create_logical_replication_slot($1, 'pgoutput')"
    };
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&slot];
    let create = client.query_one(sql, &params);
    let r = match primary {
        None => create.await,
        Some(p) => {
            tokio::pin!(create);
            loop {
                tokio::select! {
                    r = &mut create => break r,
                    _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {
                        if let Err(e) = p.execute("SELECT pg_log_standby_snapshot()", &[]).await {
                            tracing::debug!(error = %e, "asking the primary for a running-transactions record");
                        }
                    }
                }
            }
        }
    }
    .map_err(|e| error::pg(format!("creating replication slot {slot}"), e))?;
    let lsn: String = r.get(0);
    tracing::info!(slot, lsn, failover, "created logical replication slot");
    parse_lsn(&lsn)
}

/// What kind of server a connection reached.
#[derive(Debug, Clone, Copy)]
pub struct Server {
    /// Major version.
    pub major: u32,
    /// A standby (read replica) in recovery.
    pub standby: bool,
}

/// The server's major version and whether it is a standby.
pub async fn server(client: &Client) -> Result<Server> {
    let r = client
        .query_one(
            "SELECT current_setting('server_version_num')::int, pg_is_in_recovery()",
            &[],
        )
        .await
        .map_err(|e| error::pg("reading the server version", e))?;
    Ok(Server {
        major: (r.get::<_, i32>(0) / 10000) as u32,
        standby: r.get(1),
    })
}

/// The schema each of the connector's tables resolves to (the same unqualified names the
/// queries use), so the stream ignores same-named tables in other schemas.
pub async fn table_schemas(client: &Client) -> Result<std::collections::HashMap<String, String>> {
    let rows = client
        .query(
            "SELECT n.name, s.nspname::text FROM unnest($1::text[]) AS n(name) \
             JOIN pg_class c ON c.oid = to_regclass(n.name) \
             JOIN pg_namespace s ON s.oid = c.relnamespace",
            &[&TABLES.as_slice()],
        )
        .await
        .map_err(|e| error::pg("reading the tables' schemas", e))?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// The server's current WAL write position.
pub async fn current_wal_lsn(client: &Client) -> Result<u64> {
    let now: String = client
        .query_one(
            // (A standby has no WAL of its own to write: how far it replayed is its now.)
            "SELECT (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END)::text",
            &[],
        )
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
            "SELECT pg_wal_lsn_diff(CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END, \
                    confirmed_flush_lsn)::bigint FROM pg_replication_slots WHERE slot_name = $1",
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

#[cfg(test)]
mod tests {
    use super::*;

    fn cols(c: &[&str]) -> Vec<String> {
        c.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn question_verdict_warns_without_the_old_row() {
        assert!(question_verdict("questions", "f").fix.is_none());
        for kind in ["d", "i", "n"] {
            let w = question_verdict("questions", kind);
            assert!(w.fix.unwrap().contains("REPLICA IDENTITY FULL"), "{kind}");
        }
    }

    #[test]
    fn stage_verdicts_warn_without_the_old_stage() {
        let cols = |c: &[&str]| c.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(stage_verdict("contacts", "f", None, &[]).fix.is_none());
        let ok = stage_verdict(
            "contacts",
            "i",
            Some("ix"),
            &cols(&["contact_id", "current_stage"]),
        );
        assert!(ok.fix.is_none());
        let w = stage_verdict(
            "contacts",
            "d",
            Some("contacts_pkey"),
            &cols(&["contact_id"]),
        );
        assert!(
            w.warning && w.what.contains("contacts_pkey (contact_id)"),
            "{w:?}"
        );
        assert!(w.fix.unwrap().contains("REPLICA IDENTITY FULL"));
        let w = stage_verdict("contacts", "n", None, &[]);
        assert!(w.warning && w.what.contains("NOTHING"));
    }

    #[test]
    fn identity_verdicts_name_the_cost_and_the_fix() {
        let f = identity_verdict("inferences", "f", None, &[]);
        assert!(f.fix.is_none() && f.what.contains("whole old row"), "{f:?}");
        let f = identity_verdict(
            "inferences",
            "i",
            Some("inf_ident"),
            &cols(&["inference_id", "contact_id"]),
        );
        assert!(
            f.fix.is_none() && f.what.contains("log only those columns"),
            "{f:?}"
        );
        let f = identity_verdict(
            "contacts",
            "d",
            Some("contacts_pkey"),
            &cols(&["contact_id"]),
        );
        assert!(f.fix.is_none(), "{f:?}");
        let f = identity_verdict(
            "inferences",
            "d",
            Some("inferences_pkey"),
            &cols(&["inference_id"]),
        );
        let fix = f.fix.expect("bad");
        assert!(f.what.contains("lacks contact_id"), "{}", f.what);
        assert!(
            fix.contains("REPLICA IDENTITY FULL") && fix.contains("USING INDEX"),
            "{fix}"
        );
        let f = identity_verdict("s3_conversations", "n", None, &[]);
        assert!(f.fix.is_some() && f.what.contains("no usable replica identity"));
        let f = identity_verdict("s3_conversations", "d", None, &[]);
        assert!(f.fix.is_some());
    }
}
