//! The batched re-read: one query per batch of touched contacts, built on the seed's join.
//!
//! Re-reading rather than trusting the WAL image is what makes events complete: an unchanged
//! TOASTed result (pgoutput's `u` marker) and rows of other tables come from the database as
//! they are now, so an event never carries a placeholder.

use std::collections::HashMap;

use tokio_postgres::types::Type;
use tokio_postgres::{Client, GenericClient, Row, Statement};

use super::schema::Plan;
use crate::error::{self, Error, Result};
use crate::event::{ContactEvent, Op, QuestionResult, SCHEMA_VERSION, SourcePosition, iso};

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

/// Session settings for a connection that runs the re-read and the snapshot's paging: those of
/// [`prepare_scan_session`], and the planner held to index nested loops.
///
/// Every query here reads at most a batch of contacts by key, so index nested loops are the
/// right plan at any table size. Left to itself the planner switches, once a batch is a few
/// percent of the table, to hash joins over full scans of `inferences`: a cost that grows with
/// the table, not the batch (measured: twice the time per batch at 20,000 contacts). It also
/// sometimes starts parallel workers, whose start-up cost more than the query.
pub async fn prepare_session<C: GenericClient>(client: &C) -> Result<()> {
    client
        .batch_execute(&format!(
            "{SESSION}; SET max_parallel_workers_per_gather = 0; SET enable_hashjoin = off; \
             SET enable_mergejoin = off; SET enable_seqscan = off"
        ))
        .await
        .map_err(|e| error::pg("configuring the re-read session", e))
}

/// What every source session sets (see [`prepare_scan_session`]).
const SESSION: &str =
    "SET application_name = 'trusst-cdc source'; SET timezone = 'UTC'; SET datestyle = 'ISO, YMD'";

/// Session settings for a connection whose queries filter by something other than a key (the
/// backfill's windows on call time, which need not be indexed): the planner left free.
///
/// UTC and ISO dates make every time the queries render or compare independent of the role's
/// or server's settings (`timestamptz` values and the backfill's day bounds).
pub async fn prepare_scan_session<C: GenericClient>(client: &C) -> Result<()> {
    client
        .batch_execute(SESSION)
        .await
        .map_err(|e| error::pg("configuring the source's session", e))
}

/// Read the current state of `ids`; contacts that are not COMPLETED (or have no universal
/// answer) are absent from the result.
pub async fn enrich(
    client: &Client,
    plan: &Plan,
    ids: &[String],
) -> Result<HashMap<String, ContactEvent>> {
    // Prepared and run: the same two round trips a query from text takes.
    build(fetch(client, &prepare(client, plan).await?, ids).await?)
}

/// The re-read as a prepared statement, for a connection that runs it batch after batch: the
/// server then reuses one plan instead of planning every small batch again.
pub async fn prepare(client: &Client, plan: &Plan) -> Result<Statement> {
    client
        .prepare(&plan.enrich_sql())
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

/// Where each field of the re-read comes from, for errors that name the column to fix.
fn origin(field: &str) -> &'static str {
    match field {
        "contact_id" => "contacts.contact_id",
        "external_id" => "contacts.external_id",
        "stream_id" => "contacts.stream_id",
        "call_date" => "s3_conversations.call_time",
        "call_start_time" => "contacts.start_time",
        "direction" => "contacts.direction",
        "contact_agent_id" => "contacts.agent_id",
        "s3_agent_id" => "s3_conversations.agent_id",
        "conn_id" => "s3_conversations.conn_id",
        "question_id" => "questions.question_id",
        "question_key" => "questions.key",
        "question_text" => "questions.text",
        "result_type" => "questions.result_type",
        "question_group" => "questions.group",
        "result" => "inferences.result",
        "inference_updated_at" => "inferences.updated_at",
        _ => "an unknown column",
    }
}

fn unreadable(field: &str, cause: impl std::fmt::Display) -> Error {
    Error::user(format!(
        "cannot read column {} (event field {field}): {cause}; the column's type changed while the source ran: \
         run `trusst-cdc check` for the types it accepts and restart the source",
        origin(field)
    ))
}

/// A text field of the re-read, by name.
fn text(row: &Row, field: &str) -> Result<Option<String>> {
    row.try_get(field).map_err(|e| unreadable(field, e))
}

/// A time field of the re-read, by name, as the event carries it: `timestamp` as stored (ISO
/// 8601 without zone), `timestamptz` in UTC with `Z`, `date` as `YYYY-MM-DD`.
fn time(row: &Row, field: &str) -> Result<Option<String>> {
    let ty = row
        .columns()
        .iter()
        .find(|c| c.name() == field)
        .map(|c| c.type_().clone())
        .ok_or_else(|| unreadable(field, "not in the result"))?;
    let get = |e| unreadable(field, e);
    Ok(match ty {
        Type::TIMESTAMP => row
            .try_get::<_, Option<chrono::NaiveDateTime>>(field)
            .map_err(get)?
            .map(|t| iso(&t)),
        Type::TIMESTAMPTZ => row
            .try_get::<_, Option<chrono::DateTime<chrono::Utc>>>(field)
            .map_err(get)?
            .map(|t| crate::event::iso_utc(&t)),
        Type::DATE => row
            .try_get::<_, Option<chrono::NaiveDate>>(field)
            .map_err(get)?
            .map(|d| d.format("%Y-%m-%d").to_string()),
        other => return Err(unreadable(field, format!("type {other} is not a time"))),
    })
}

/// The contact-level part of an event from a row of the re-read or of [`Plan::contacts_sql`]
/// (its answers are filled in by the caller).
fn contact_event(row: &Row, contact_id: String) -> Result<ContactEvent> {
    Ok(ContactEvent {
        schema_version: SCHEMA_VERSION,
        event_id: String::new(),
        op: Op::Upsert,
        trusst_contact_id: contact_id,
        external_id: text(row, "external_id")?,
        stream_id: text(row, "stream_id")?,
        call_date: time(row, "call_date")?,
        call_start_time: time(row, "call_start_time")?,
        direction: text(row, "direction")?,
        contact_agent_id: text(row, "contact_agent_id")?,
        s3_agent_id: text(row, "s3_agent_id")?,
        conn_id: text(row, "conn_id")?,
        universal_questions: Vec::new(),
        source: SourcePosition {
            lsn: String::new(),
            commit_ts: None,
            txid: None,
            reason: String::new(),
        },
        truncated: None,
        cleared_question_keys: None,
        customer: None,
    })
}

/// Group the re-read's rows into one event per contact (split from [`fetch`] so the next query
/// runs while these rows are turned into events). Columns are read by name; a value that
/// cannot be read is an error naming its column, never a panic.
pub fn build(rows: Vec<Row>) -> Result<HashMap<String, ContactEvent>> {
    let mut out: HashMap<String, ContactEvent> = HashMap::with_capacity(rows.len() / 8 + 1);
    for row in rows {
        let contact_id: String = text(&row, "contact_id")?.unwrap_or_default();
        let q = QuestionResult {
            question_id: text(&row, "question_id")?.unwrap_or_default(),
            question_key: text(&row, "question_key")?.unwrap_or_default(),
            question_text: text(&row, "question_text")?,
            result_type: text(&row, "result_type")?.unwrap_or_default(),
            question_group: text(&row, "question_group")?,
            result: text(&row, "result")?,
            inference_updated_at: time(&row, "inference_updated_at")?,
        };
        let event = match out.entry(contact_id) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                let contact_id = e.key().clone();
                e.insert(contact_event(&row, contact_id)?)
            }
        };
        event.universal_questions.push(q);
    }
    Ok(out)
}

/// The contacts the re-read's rows are of.
pub fn row_ids(rows: &[Row]) -> Result<std::collections::HashSet<String>> {
    rows.iter()
        .map(|r| Ok(text(r, "contact_id")?.unwrap_or_default()))
        .collect()
}

/// Read the contact rows of `ids` ([`Plan::contacts_sql`]): per contact its event without
/// answers, and whether it is COMPLETED. Contacts whose row is gone are absent.
pub async fn contacts(
    client: &Client,
    plan: &Plan,
    ids: &[String],
) -> Result<HashMap<String, (ContactEvent, bool)>> {
    if ids.is_empty() {
        return Ok(HashMap::new());
    }
    let rows = client
        .query(&plan.contacts_sql(), &[&ids])
        .await
        .map_err(|e| error::pg("reading contacts that left the re-read", e))?;
    let mut out = HashMap::with_capacity(rows.len());
    for row in rows {
        let id = text(&row, "contact_id")?.unwrap_or_default();
        let completed: bool = row
            .try_get("completed")
            .map_err(|e| unreadable("completed", e))?;
        out.insert(id.clone(), (contact_event(&row, id)?, completed));
    }
    Ok(out)
}

/// The keys of every universal question now, for events to say which answers a contact lacks.
pub async fn universal_keys(client: &Client, plan: &Plan) -> Result<Vec<String>> {
    let rows = client
        .query(&plan.questions_sql(), &[])
        .await
        .map_err(|e| error::pg("loading questions", e))?;
    keys_of(&rows)
}

/// The universal questions' keys in rows of [`Plan::questions_sql`], sorted and distinct.
pub fn keys_of(rows: &[tokio_postgres::Row]) -> Result<Vec<String>> {
    let mut keys = Vec::new();
    for r in rows {
        let universal: bool = r
            .try_get("is_universal")
            .map_err(|e| unreadable("question_id", e))?;
        if let (true, Some(k)) = (
            universal,
            r.try_get::<_, Option<String>>("key").ok().flatten(),
        ) {
            keys.push(k);
        }
    }
    keys.sort();
    keys.dedup();
    Ok(keys)
}

/// One page of COMPLETED contact ids after `after` (none: from the first), in key order.
pub async fn completed_page<C: GenericClient>(
    client: &C,
    plan: &Plan,
    after: &str,
    limit: usize,
) -> Result<Vec<String>> {
    let limit = limit as i64;
    let sql = plan.completed_page_sql(!after.is_empty());
    let rows = if after.is_empty() {
        client.query(&sql, &[&limit]).await
    } else {
        client.query(&sql, &[&limit, &after]).await
    }
    .map_err(|e| error::pg("paging COMPLETED contacts", e))?;
    rows.iter().map(|r| text_at(r, 0)).collect()
}

/// How many COMPLETED contacts come after `after` (none: all of them).
pub async fn completed_count<C: GenericClient>(
    client: &C,
    plan: &Plan,
    after: &str,
) -> Result<i64> {
    let sql = plan.completed_count_sql(!after.is_empty());
    let row = if after.is_empty() {
        client.query_one(&sql, &[]).await
    } else {
        client.query_one(&sql, &[&after]).await
    }
    .map_err(|e| error::pg("counting COMPLETED contacts", e))?;
    row.try_get(0)
        .map_err(|e| Error::internal(format!("reading a count: {e}")))
}

/// One page of COMPLETED contacts that have an inference for `question_id`, after `after`.
pub async fn contacts_for_question<C: GenericClient>(
    client: &C,
    plan: &Plan,
    question_id: &str,
    after: &str,
    limit: usize,
) -> Result<Vec<String>> {
    let limit = limit as i64;
    let sql = plan.question_page_sql(!after.is_empty());
    let rows = if after.is_empty() {
        client.query(&sql, &[&question_id, &limit]).await
    } else {
        client.query(&sql, &[&question_id, &limit, &after]).await
    }
    .map_err(|e| error::pg("finding contacts affected by a question change", e))?;
    rows.iter().map(|r| text_at(r, 0)).collect()
}

/// A non-null text column of a paging query.
pub fn text_at(row: &Row, i: usize) -> Result<String> {
    row.try_get(i)
        .map_err(|e| Error::internal(format!("reading a contact id from a paging query: {e}")))
}
