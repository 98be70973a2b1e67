//! The batched re-read: one query per batch of touched contacts, built on the seed's join.
//!
//! Re-reading rather than trusting the WAL image is what makes events complete: an unchanged
//! TOASTed result (pgoutput's `u` marker) and rows of other tables come from the database as
//! they are now, so an event never carries a placeholder.

use std::collections::HashMap;

use tokio_postgres::{Client, GenericClient, Row, Statement};

use crate::error::{self, Result};
use crate::event::{ContactEvent, Op, QuestionResult, SCHEMA_VERSION, SourcePosition, iso};

/// The seed's join restricted to the given contacts, COMPLETED ones, universal questions only.
/// Inner joins as in the seed: a contact without any universal answer is not in the pivot.
const ENRICH_SQL: &str = r#"
SELECT c.contact_id, c.external_id, c.stream_id, s3c.call_time, c.start_time, c.direction,
       c.agent_id AS contact_agent_id, s3c.agent_id AS s3_agent_id, s3c.conn_id,
       q.question_id, q.key AS question_key, q.text AS question_text, q.result_type,
       q."group" AS question_group, i.result, i.updated_at AS inference_updated_at
FROM contacts c
INNER JOIN inferences i ON c.contact_id = i.contact_id
INNER JOIN questions q ON i.question_id = q.question_id
LEFT JOIN s3_conversations s3c ON c.contact_id = s3c.contact_id
WHERE c.contact_id = ANY($1)
  AND q.is_universal = TRUE
  AND c.current_stage = 'COMPLETED'
ORDER BY c.contact_id, q."group", q."order", q.key, i.inference_id
"#;

/// How many of the given transactions (32-bit xids from the stream) a new snapshot would not
/// see yet. The xid becomes 64-bit with the epoch of the snapshot's xmax (an xid that is already
/// assigned is below xmax, so a larger result belongs to the previous epoch).
const INVISIBLE_SQL: &str = "
WITH s AS (SELECT pg_current_snapshot() AS snap),
     e AS (SELECT snap, pg_snapshot_xmax(snap)::text::bigint AS xmax FROM s)
SELECT count(*) FROM e, unnest($1::bigint[]) AS x
WHERE NOT pg_visible_in_snapshot(
    (CASE WHEN ((xmax >> 32) << 32 | x) > xmax THEN ((xmax >> 32) - 1) << 32 | x
          ELSE (xmax >> 32) << 32 | x END)::text::xid8,
    snap)";

/// Longest wait for a decoded commit to become visible before the re-read gives up.
const VISIBLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Wait until the transactions `xids` are visible to new snapshots.
///
/// The walsender may send a commit as soon as its WAL is flushed, a moment before the committing
/// backend leaves the proc array; a re-read in that moment would not see the commit and the
/// contact would look unfinished. On a busy host that moment lasts milliseconds.
pub async fn await_visible(client: &Client, statement: &Statement, xids: &[i64]) -> Result<()> {
    if xids.is_empty() {
        return Ok(());
    }
    let started = std::time::Instant::now();
    loop {
        let invisible: i64 = client
            .query_one(statement, &[&xids])
            .await
            .map_err(|e| error::pg("checking that the streamed commits are visible", e))?
            .get(0);
        if invisible == 0 {
            return Ok(());
        }
        if started.elapsed() > VISIBLE_TIMEOUT {
            return Err(crate::error::Error::external(format!(
                "{invisible} streamed transactions were still not visible after {VISIBLE_TIMEOUT:?}"
            )));
        }
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
}

/// The visibility check of [`await_visible`], prepared once per connection.
pub async fn prepare_visibility(client: &Client) -> Result<Statement> {
    client
        .prepare(INVISIBLE_SQL)
        .await
        .map_err(|e| error::pg("preparing the visibility check (PostgreSQL 13 or later)", e))
}

/// Session settings for a connection that runs the re-read and the snapshot's paging.
///
/// Every query here reads at most a batch of contacts by key, so index nested loops are the
/// right plan at any table size. Left to itself the planner switches, once a batch is a few
/// percent of the table, to hash joins over full scans of `inferences`: a cost that grows with
/// the table, not the batch (measured: twice the time per batch at 20,000 contacts). It also
/// sometimes starts parallel workers, whose start-up cost more than the query.
pub async fn prepare_session<C: GenericClient>(client: &C) -> Result<()> {
    client
        .batch_execute(
            "SET max_parallel_workers_per_gather = 0; SET enable_hashjoin = off; SET enable_mergejoin = off; \
             SET enable_seqscan = off; SET application_name = 'trusst-cdc source'",
        )
        .await
        .map_err(|e| error::pg("configuring the re-read session", e))
}

/// Read the current state of `ids`; contacts that are not COMPLETED (or have no universal
/// answer) are absent from the result.
pub async fn enrich(client: &Client, ids: &[String]) -> Result<HashMap<String, ContactEvent>> {
    // Prepared and run: the same two round trips a query from text takes.
    Ok(build(fetch(client, &prepare(client).await?, ids).await?))
}

/// The re-read as a prepared statement, for a connection that runs it batch after batch: the
/// server then reuses one plan instead of planning every small batch again.
pub async fn prepare(client: &Client) -> Result<Statement> {
    client
        .prepare(ENRICH_SQL)
        .await
        .map_err(|e| error::pg("preparing the re-read query", e))
}

/// Run the re-read (a statement from [`prepare`] on the same connection) for `ids` and return
/// its rows as they came, one per universal answer.
pub async fn fetch(client: &Client, statement: &Statement, ids: &[String]) -> Result<Vec<Row>> {
    client
        .query(statement, &[&ids])
        .await
        .map_err(|e| error::pg("re-reading touched contacts", e))
}

/// Group the re-read's rows into one event per contact (pure; split from [`fetch`] so the
/// next query runs while these rows are turned into events).
pub fn build(rows: Vec<Row>) -> HashMap<String, ContactEvent> {
    let mut out: HashMap<String, ContactEvent> = HashMap::with_capacity(rows.len() / 8 + 1);
    let ts = |v: Option<chrono::NaiveDateTime>| v.as_ref().map(iso);
    for row in rows {
        let contact_id: String = row.get(0);
        let q = QuestionResult {
            question_id: row.get(9),
            question_key: row.get(10),
            question_text: row.get(11),
            result_type: row.get(12),
            question_group: row.get(13),
            result: row.get(14),
            inference_updated_at: ts(row.get(15)),
        };
        out.entry(contact_id.clone())
            .or_insert_with(|| ContactEvent {
                schema_version: SCHEMA_VERSION,
                event_id: String::new(),
                op: Op::Upsert,
                trusst_contact_id: contact_id,
                external_id: row.get(1),
                stream_id: row.get(2),
                call_date: ts(row.get(3)),
                call_start_time: ts(row.get(4)),
                direction: row.get(5),
                contact_agent_id: row.get(6),
                s3_agent_id: row.get(7),
                conn_id: row.get(8),
                universal_questions: Vec::new(),
                source: SourcePosition {
                    lsn: String::new(),
                    commit_ts: None,
                    txid: None,
                    reason: String::new(),
                },
            })
            .universal_questions
            .push(q);
    }
    out
}

/// One page of COMPLETED contact ids after `after`, in key order (never OFFSET: rows inserted
/// or deleted meanwhile would shift the pages).
pub async fn completed_page<C: GenericClient>(
    client: &C,
    after: &str,
    limit: usize,
) -> Result<Vec<String>> {
    let rows = client
        .query(
            "SELECT contact_id FROM contacts WHERE current_stage = 'COMPLETED' AND contact_id > $1 \
             ORDER BY contact_id LIMIT $2",
            &[&after, &(limit as i64)],
        )
        .await
        .map_err(|e| error::pg("paging COMPLETED contacts", e))?;
    Ok(rows.into_iter().map(|r| r.get(0)).collect())
}

/// One page of COMPLETED contacts that have an inference for `question_id`, after `after`.
pub async fn contacts_for_question<C: GenericClient>(
    client: &C,
    question_id: &str,
    after: &str,
    limit: usize,
) -> Result<Vec<String>> {
    let rows = client
        .query(
            "SELECT DISTINCT c.contact_id FROM contacts c \
             JOIN inferences i ON i.contact_id = c.contact_id \
             WHERE i.question_id = $1 AND c.current_stage = 'COMPLETED' AND c.contact_id > $2 \
             ORDER BY c.contact_id LIMIT $3",
            &[&question_id, &after, &(limit as i64)],
        )
        .await
        .map_err(|e| error::pg("finding contacts affected by a question change", e))?;
    Ok(rows.into_iter().map(|r| r.get(0)).collect())
}
