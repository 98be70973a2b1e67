//! The columns the connector reads, the types this database gives them, and the SQL built for
//! those types.
//!
//! The integration guide names columns, not types, and customers' schemas differ: ids may be
//! `varchar`, `text`, `uuid` or integers, times `timestamp`, `timestamptz` or `date`, results
//! text, boolean or numeric, a stage an enum. Every query is therefore built from the catalog:
//! values are read as text (`::text`), times as their base type, ids are compared after casting
//! the text the stream carries to the column's own type (so indexes are used), and a contact id
//! leaves the database in the same text form the replication stream uses (the type's output
//! function), so the snapshot, the stream and re-emits agree on every Kafka key. A type the
//! connector cannot read is a [`Problem`] naming the table, the column and the fix, reported by
//! `check` and at start, never a panic mid-stream.

use std::collections::HashMap;

use tokio_postgres::GenericClient;

use crate::error::{self, Error, Result};

/// How the connector uses a column, which decides the types it accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// An id compared with ids from the stream: text-like, enum, uuid or numeric.
    Key,
    /// A value published as text: anything with a sensible text form.
    Value,
    /// A point in time: `timestamp`, `timestamptz` or `date`.
    Time,
    /// `is_universal`: boolean, an integer (non-zero is true) or text (`true`, `t`, `yes`, `1`).
    Flag,
    /// Only needed to exist (ordering, identity).
    Present,
}

/// Every column the connector reads, per table, with its role.
pub const COLUMNS: &[(&str, &[(&str, Role)])] = &[
    (
        "contacts",
        &[
            ("contact_id", Role::Key),
            ("stream_id", Role::Value),
            ("external_id", Role::Value),
            ("start_time", Role::Time),
            ("direction", Role::Value),
            ("current_stage", Role::Value),
            ("agent_id", Role::Value),
        ],
    ),
    (
        "inferences",
        &[
            ("inference_id", Role::Present),
            ("contact_id", Role::Key),
            ("question_id", Role::Key),
            ("result", Role::Value),
            ("updated_at", Role::Time),
        ],
    ),
    (
        "questions",
        &[
            ("question_id", Role::Key),
            ("key", Role::Value),
            ("text", Role::Value),
            ("result_type", Role::Value),
            ("is_universal", Role::Flag),
            ("group", Role::Value),
            ("order", Role::Present),
        ],
    ),
    (
        "s3_conversations",
        &[
            ("conversation_id", Role::Present),
            ("contact_id", Role::Key),
            ("conn_id", Role::Value),
            ("agent_id", Role::Value),
            ("call_time", Role::Time),
        ],
    ),
];

/// A column's type as the catalog describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgType {
    /// `format_type()`: what a cast to the column's type spells (`character varying`, `uuid`,
    /// `public.stage`...).
    pub name: String,
    /// `pg_type.typname` of the type, or of its base type for a domain.
    pub base: String,
    /// `pg_type.typcategory` of that type (`S` string, `N` numeric, `B` boolean, `E` enum,
    /// `D` date/time, `U` user-defined such as uuid and json, ...).
    pub category: char,
    /// The column's collation (`pg_collation.collname`), empty for a type without one: two
    /// columns of one type sort alike only when this matches too.
    pub collation: String,
}

/// How a time column is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeKind {
    /// `timestamp` (without time zone): published as stored, ISO 8601 without zone.
    Timestamp,
    /// `timestamptz`: published in UTC with a `Z`.
    TimestampTz,
    /// `date`: published as `YYYY-MM-DD`.
    Date,
}

/// How the flag column is turned into a boolean.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlagKind {
    /// `boolean`.
    Bool,
    /// An integer: non-zero is true.
    Int,
    /// Text: `true`, `t`, `yes`, `y` or a non-zero integer, in any case.
    Text,
}

/// Whether a column of `ty` can serve in `role`; the reason and fix when not.
pub fn classify(role: Role, ty: &PgType) -> std::result::Result<Option<Accepted>, String> {
    let base = ty.base.as_str();
    let text_like = matches!(ty.category, 'S' | 'E') || base == "uuid";
    let numeric = ty.category == 'N';
    match role {
        Role::Present => Ok(None),
        Role::Key if text_like || numeric => Ok(None),
        Role::Key => Err(format!(
            "{} cannot be compared with the ids the replication stream carries; use text, varchar, uuid or an integer type",
            ty.name
        )),
        Role::Value
            if text_like
                || numeric
                || ty.category == 'B'
                || ty.category == 'D'
                || matches!(base, "json" | "jsonb") =>
        {
            Ok(None)
        }
        Role::Value => Err(format!(
            "{} has no text form a CRM field can take; use text, varchar, a number, boolean or json",
            ty.name
        )),
        Role::Time => match base {
            "timestamp" => Ok(Some(Accepted::Time(TimeKind::Timestamp))),
            "timestamptz" => Ok(Some(Accepted::Time(TimeKind::TimestampTz))),
            "date" => Ok(Some(Accepted::Time(TimeKind::Date))),
            _ => Err(format!(
                "{} is not a point in time; use timestamp, timestamptz or date",
                ty.name
            )),
        },
        Role::Flag => match base {
            "bool" => Ok(Some(Accepted::Flag(FlagKind::Bool))),
            "int2" | "int4" | "int8" => Ok(Some(Accepted::Flag(FlagKind::Int))),
            _ if text_like => Ok(Some(Accepted::Flag(FlagKind::Text))),
            _ => Err(format!(
                "{} cannot say yes or no; use boolean (or an integer, or text such as 'true')",
                ty.name
            )),
        },
    }
}

/// What [`classify`] learned beyond "accepted".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accepted {
    /// A time column, read as this kind.
    Time(TimeKind),
    /// The flag column, read as this kind.
    Flag(FlagKind),
}

/// The text value of a flag as the replication stream carries it (the same rule the SQL of
/// [`Plan::flag`] applies): `t`, `true`, `y`, `yes` in any case, or a non-zero integer.
pub fn flag_text(v: &str) -> bool {
    let v = v.trim();
    matches!(v.to_ascii_lowercase().as_str(), "t" | "true" | "y" | "yes")
        || v.parse::<i64>().is_ok_and(|n| n != 0)
}

/// A column the connector cannot read as it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Table.
    pub table: &'static str,
    /// Column.
    pub column: &'static str,
    /// What is wrong.
    pub what: String,
    /// How to fix it.
    pub fix: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "column {}.{}: {} (fix: {})",
            self.table, self.column, self.what, self.fix
        )
    }
}

/// The types of the columns the connector reads, and the SQL built for them.
#[derive(Debug, Clone)]
pub struct Plan {
    types: HashMap<(&'static str, &'static str), PgType>,
    times: HashMap<(&'static str, &'static str), TimeKind>,
    flag: FlagKind,
}

/// A column: (table, column).
type Col = (&'static str, &'static str);

/// Id columns that name the same thing in two tables.
const SAME_IDS: [(Col, Col); 3] = [
    (("contacts", "contact_id"), ("inferences", "contact_id")),
    (
        ("contacts", "contact_id"),
        ("s3_conversations", "contact_id"),
    ),
    (("questions", "question_id"), ("inferences", "question_id")),
];

/// Types whose values have the same text form and compare with each other.
fn id_form(base: &str) -> &str {
    match base {
        "varchar" | "text" | "name" => "string",
        "int2" | "int4" | "int8" => "integer",
        other => other,
    }
}

/// Quote an identifier for SQL (`"group"`, `"order"`).
fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

impl Plan {
    /// Check every column in [`COLUMNS`] against `lookup(table, column)` (its type, `None` when
    /// missing); the plan, or every problem found.
    pub fn new(
        lookup: impl Fn(&str, &str) -> Option<PgType>,
    ) -> std::result::Result<Self, Vec<Problem>> {
        let mut plan = Plan {
            types: HashMap::new(),
            times: HashMap::new(),
            flag: FlagKind::Bool,
        };
        let mut problems = Vec::new();
        for (table, columns) in COLUMNS {
            for (column, role) in *columns {
                let Some(ty) = lookup(table, column) else {
                    problems.push(Problem {
                        table,
                        column,
                        what: "missing".into(),
                        fix: "the Trusst schema changed or this is not the Trusst database: check the platform release notes".into(),
                    });
                    continue;
                };
                match classify(*role, &ty) {
                    Ok(Some(Accepted::Time(k))) => {
                        plan.times.insert((table, column), k);
                    }
                    Ok(Some(Accepted::Flag(k))) => plan.flag = k,
                    Ok(None) => {}
                    Err(why) => problems.push(Problem {
                        table,
                        column,
                        what: format!("type {}: {why}", ty.name),
                        fix: format!(
                            "ALTER TABLE {table} ALTER COLUMN {} TYPE <one of those types> USING ..., or tell the \
                             Trusst platform team which type this column has",
                            ident(column)
                        ),
                    }),
                }
                plan.types.insert((table, column), ty);
            }
        }
        // The same id in two tables must have one text form: the stream carries each table's
        // own (a char(n) pads, a varchar does not), and a join across unlike types fails.
        for (a, b) in SAME_IDS {
            if let (Some(x), Some(y)) = (plan.types.get(&a), plan.types.get(&b))
                && id_form(&x.base) != id_form(&y.base)
            {
                problems.push(Problem {
                    table: b.0,
                    column: b.1,
                    what: format!(
                        "type {} differs from {}.{} ({}): the stream would carry one contact under two ids, or the \
                         re-read's join would fail",
                        y.name, a.0, a.1, x.name
                    ),
                    fix: format!(
                        "ALTER TABLE {} ALTER COLUMN {} TYPE {} (the type of {}.{})",
                        b.0,
                        ident(b.1),
                        x.name,
                        a.0,
                        a.1
                    ),
                });
            }
        }
        if problems.is_empty() {
            Ok(plan)
        } else {
            Err(problems)
        }
    }

    /// The plan of the guide's schema (every id `varchar`, times `timestamp`, flag `boolean`),
    /// for tests and tools that run without a database.
    pub fn guide() -> Self {
        Self::new(|table, column| {
            let role = COLUMNS
                .iter()
                .find(|(t, _)| *t == table)?
                .1
                .iter()
                .find(|(c, _)| *c == column)?
                .1;
            let (name, base, category) = match role {
                Role::Time => ("timestamp without time zone", "timestamp", 'D'),
                Role::Flag => ("boolean", "bool", 'B'),
                _ => ("character varying", "varchar", 'S'),
            };
            Some(PgType {
                name: name.into(),
                base: base.into(),
                category,
                collation: if category == 'S' {
                    "default".into()
                } else {
                    String::new()
                },
            })
        })
        .expect("the guide's schema is readable")
    }

    /// One line about the types found, for `check`: the contact id's type, the times and the flag.
    pub fn describe(&self) -> String {
        let times: Vec<String> = [
            "contacts.start_time",
            "s3_conversations.call_time",
            "inferences.updated_at",
        ]
        .iter()
        .map(|tc| {
            let (t, c) = tc.split_once('.').expect("table.column");
            format!("{tc} {}", self.ty(t, c))
        })
        .collect();
        format!(
            "contact ids {}, {}, is_universal {}",
            self.ty("contacts", "contact_id"),
            times.join(", "),
            self.ty("questions", "is_universal")
        )
    }

    fn ty(&self, table: &str, column: &str) -> &str {
        self.column(table, column)
            .map_or("text", |ty| ty.name.as_str())
    }

    /// The catalog's type of a column the connector reads.
    fn column(&self, table: &str, column: &str) -> Option<&PgType> {
        self.types
            .iter()
            .find(|((t, c), _)| *t == table && *c == column)
            .map(|(_, ty)| ty)
    }

    /// How a time column is read.
    pub fn time(&self, table: &str, column: &str) -> TimeKind {
        self.times
            .iter()
            .find(|((t, c), _)| *t == table && *c == column)
            .map_or(TimeKind::Timestamp, |(_, k)| *k)
    }

    /// `param` (text) cast to the type of `table.column`, for comparing with that column.
    pub fn cast(&self, param: &str, table: &str, column: &str) -> String {
        format!("{param}::text::{}", self.ty(table, column))
    }

    /// `alias.column` as text.
    fn value(alias: &str, column: &str) -> String {
        format!("{alias}.{}::text", ident(column))
    }

    /// `alias.column` as its time type (a domain over a time type becomes the type itself).
    fn time_expr(&self, alias: &str, table: &str, column: &str) -> String {
        let ty = match self.time(table, column) {
            TimeKind::Timestamp => "timestamp",
            TimeKind::TimestampTz => "timestamptz",
            TimeKind::Date => "date",
        };
        // 'infinity' is a valid time but no ISO 8601 one: published as null, not a failure.
        let col = format!("{alias}.{}", ident(column));
        format!("CASE WHEN isfinite({col}) THEN {col}::{ty} END")
    }

    /// `questions.is_universal` of `alias` as a boolean, with [`flag_text`]'s rule.
    pub fn flag(&self, alias: &str) -> String {
        let col = format!("{alias}.is_universal");
        match self.flag {
            FlagKind::Bool => format!("coalesce({col}, false)"),
            FlagKind::Int => format!("coalesce({col} <> 0, false)"),
            FlagKind::Text => format!(
                "coalesce(lower(btrim({col}::text)) IN ('t', 'true', 'y', 'yes') \
                 OR (btrim({col}::text) ~ '^[+-]?[0-9]{{1,18}}$' AND btrim({col}::text)::bigint <> 0), false)"
            ),
        }
    }

    /// The COMPLETED filter on contacts `alias` (an enum stage compares as text).
    pub fn completed(alias: &str) -> String {
        format!("{alias}.current_stage::text = 'COMPLETED'")
    }

    /// The re-read: the guide's join for the contacts in `$1` (text ids as the stream carries
    /// them), COMPLETED ones, universal questions only. Each row's `contact_id` is the id asked
    /// for, so rows match the request exactly whatever the column's type. A contact with several
    /// conversations takes its latest call (the guide's join would repeat every answer once per
    /// conversation).
    pub fn enrich_sql(&self) -> String {
        format!(
            "SELECT r.id AS contact_id, {external_id} AS external_id, {stream_id} AS stream_id, \
                    {call_time} AS call_date, {start_time} AS call_start_time, {direction} AS direction, \
                    {agent_id} AS contact_agent_id, {s3_agent_id} AS s3_agent_id, {conn_id} AS conn_id, \
                    {question_id} AS question_id, {key} AS question_key, {text} AS question_text, \
                    {result_type} AS result_type, {group} AS question_group, {result} AS result, \
                    {updated_at} AS inference_updated_at \
             FROM unnest($1::text[]) AS r(id) \
             INNER JOIN contacts c ON c.contact_id = {cast_id} \
             INNER JOIN inferences i ON c.contact_id = i.contact_id \
             INNER JOIN questions q ON i.question_id = q.question_id \
             LEFT JOIN LATERAL (SELECT s.call_time, s.agent_id, s.conn_id FROM s3_conversations s \
                                WHERE s.contact_id = c.contact_id \
                                ORDER BY s.call_time DESC NULLS LAST, s.conversation_id DESC LIMIT 1) s3c ON true \
             WHERE {universal} AND {completed} \
             ORDER BY c.contact_id, q.\"group\", q.\"order\", q.key, i.inference_id",
            external_id = Self::value("c", "external_id"),
            stream_id = Self::value("c", "stream_id"),
            call_time = self.time_expr("s3c", "s3_conversations", "call_time"),
            start_time = self.time_expr("c", "contacts", "start_time"),
            direction = Self::value("c", "direction"),
            agent_id = Self::value("c", "agent_id"),
            s3_agent_id = Self::value("s3c", "agent_id"),
            conn_id = Self::value("s3c", "conn_id"),
            question_id = Self::value("q", "question_id"),
            key = Self::value("q", "key"),
            text = Self::value("q", "text"),
            result_type = Self::value("q", "result_type"),
            group = Self::value("q", "group"),
            result = Self::value("i", "result"),
            updated_at = self.time_expr("i", "inferences", "updated_at"),
            cast_id = self.cast("r.id", "contacts", "contact_id"),
            universal = self.flag("q"),
            completed = Self::completed("c"),
        )
    }

    /// The contact-level fields of the contacts in `$1` (text ids as the stream carries them),
    /// whatever their stage, and whether each is COMPLETED: for contacts the re-read no longer
    /// returns (they lost their last universal answer, or left COMPLETED).
    pub fn contacts_sql(&self) -> String {
        format!(
            "SELECT r.id AS contact_id, {external_id} AS external_id, {stream_id} AS stream_id, \
                    {call_time} AS call_date, {start_time} AS call_start_time, {direction} AS direction, \
                    {agent_id} AS contact_agent_id, {s3_agent_id} AS s3_agent_id, {conn_id} AS conn_id, \
                    {completed} AS completed \
             FROM unnest($1::text[]) AS r(id) \
             INNER JOIN contacts c ON c.contact_id = {cast_id} \
             LEFT JOIN LATERAL (SELECT s.call_time, s.agent_id, s.conn_id FROM s3_conversations s \
                                WHERE s.contact_id = c.contact_id \
                                ORDER BY s.call_time DESC NULLS LAST, s.conversation_id DESC LIMIT 1) s3c ON true",
            external_id = Self::value("c", "external_id"),
            stream_id = Self::value("c", "stream_id"),
            call_time = self.time_expr("s3c", "s3_conversations", "call_time"),
            start_time = self.time_expr("c", "contacts", "start_time"),
            direction = Self::value("c", "direction"),
            agent_id = Self::value("c", "agent_id"),
            s3_agent_id = Self::value("s3c", "agent_id"),
            conn_id = Self::value("s3c", "conn_id"),
            completed = Self::completed("c"),
            cast_id = self.cast("r.id", "contacts", "contact_id"),
        )
    }

    /// Every question with what the stream's question cache keeps (`question_id` in the
    /// stream's text form).
    pub fn questions_sql(&self) -> String {
        format!(
            "SELECT concat(q.question_id) AS question_id, {key} AS key, {text} AS text, \
                    {result_type} AS result_type, {group} AS \"group\", {universal} AS is_universal \
             FROM questions q",
            key = Self::value("q", "key"),
            text = Self::value("q", "text"),
            result_type = Self::value("q", "result_type"),
            group = Self::value("q", "group"),
            universal = self.flag("q"),
        )
    }

    /// The integration guide's step 1: the universal questions in their group's order (the
    /// guide's `group` unquoted is a syntax error; here it is quoted, and every column is read
    /// as text whatever its type).
    pub fn universal_questions_sql(&self) -> String {
        format!(
            "SELECT concat(q.question_id) AS question_id, {key} AS key, {text} AS text, \
                    {result_type} AS result_type, {group} AS \"group\" \
             FROM questions q WHERE {universal} \
             ORDER BY q.\"group\", q.\"order\", q.key",
            key = Self::value("q", "key"),
            text = Self::value("q", "text"),
            result_type = Self::value("q", "result_type"),
            group = Self::value("q", "group"),
            universal = self.flag("q"),
        )
    }

    /// A page of COMPLETED contact ids in key order: `$1` limit, and with `after`, `$2` the
    /// last id of the previous page (text). Never OFFSET: rows inserted or deleted meanwhile
    /// would shift the pages.
    pub fn completed_page_sql(&self, after: bool) -> String {
        format!(
            "SELECT concat(c.contact_id) FROM contacts c WHERE {completed}{bound} \
             ORDER BY c.contact_id LIMIT $1",
            completed = Self::completed("c"),
            bound = self.after_bound(after, "$2"),
        )
    }

    /// How many COMPLETED contacts [`Plan::completed_page_sql`] pages through; `$1` the id to
    /// start after when `after`.
    pub fn completed_count_sql(&self, after: bool) -> String {
        format!(
            "SELECT count(*) FROM contacts c WHERE {completed}{bound}",
            completed = Self::completed("c"),
            bound = self.after_bound(after, "$1"),
        )
    }

    /// A page of COMPLETED contacts that answer question `$1`, `$2` limit, after `$3`.
    pub fn question_page_sql(&self, after: bool) -> String {
        format!(
            "SELECT concat(k) FROM (SELECT DISTINCT c.contact_id AS k FROM contacts c \
             JOIN inferences i ON i.contact_id = c.contact_id \
             WHERE i.question_id = {question} AND {completed}{bound}{joined} \
             ORDER BY c.contact_id LIMIT $2) s ORDER BY k",
            question = self.cast("$1", "inferences", "question_id"),
            completed = Self::completed("c"),
            bound = self.after_bound(after, "$3"),
            joined = self.joined_bound(after, "$3", "i", "inferences"),
        )
    }

    /// The backfill's filter: COMPLETED, with a conversation whose call time is in
    /// `[$1, $2)` (text timestamps, read in UTC for `timestamptz`).
    pub fn in_window(&self) -> String {
        self.in_window_after(None)
    }

    /// [`Plan::in_window`], for contacts after the id in parameter `after` (if any).
    fn in_window_after(&self, after: Option<&str>) -> String {
        format!(
            "{completed} AND EXISTS (SELECT 1 FROM s3_conversations s3c WHERE s3c.contact_id = c.contact_id \
             AND s3c.call_time >= {from} AND s3c.call_time < {to}{joined})",
            completed = Self::completed("c"),
            from = self.cast("$1", "s3_conversations", "call_time"),
            to = self.cast("$2", "s3_conversations", "call_time"),
            joined = after.map_or(String::new(), |p| self.joined_bound(
                true,
                p,
                "s3c",
                "s3_conversations"
            )),
        )
    }

    /// The backfill's count of a window.
    pub fn window_count_sql(&self) -> String {
        format!("SELECT count(*) FROM contacts c WHERE {}", self.in_window())
    }

    /// The backfill's contacts of a window in id order (after `$3` when `after`): read a page at
    /// a time through a portal, so a window is one scan however many pages it holds. Pages of
    /// a keyset query each ran the window's filter again: without an index on call time, a
    /// scan of the table per page (a million contacts: about 1,000 pages at 100 ms or more).
    pub fn window_ids_sql(&self, after: bool) -> String {
        format!(
            "SELECT concat(c.contact_id) FROM contacts c WHERE {}{} ORDER BY c.contact_id",
            self.in_window_after(after.then_some("$3")),
            self.after_bound(after, "$3"),
        )
    }

    /// The page's lower bound repeated on a joined table's contact id (`alias.contact_id`), so
    /// PostgreSQL starts that table's index scan at the page instead of at the first contact:
    /// without it a merge join read every earlier contact's rows again for each page (16 s for
    /// one question page a third of the way through a million contacts, in EXPLAIN ANALYZE).
    /// Implied by the join, so added only where the two columns sort alike (same type and
    /// collation); elsewhere the page is still right, slower.
    fn joined_bound(&self, after: bool, param: &str, alias: &str, table: &str) -> String {
        let (Some(a), Some(b)) = (
            self.column("contacts", "contact_id"),
            self.column(table, "contact_id"),
        ) else {
            return String::new();
        };
        if !after || a.name != b.name || a.collation != b.collation {
            return String::new();
        }
        format!(
            " AND {alias}.contact_id > {}",
            self.cast(param, table, "contact_id")
        )
    }

    fn after_bound(&self, after: bool, param: &str) -> String {
        if after {
            format!(
                " AND c.contact_id > {}",
                self.cast(param, "contacts", "contact_id")
            )
        } else {
            String::new()
        }
    }
}

/// The catalog's types of the connector's columns: `(table, column) -> type`.
pub async fn column_types<C: GenericClient>(
    client: &C,
) -> Result<HashMap<(String, String), PgType>> {
    let tables: Vec<&str> = COLUMNS.iter().map(|(t, _)| *t).collect();
    let rows = client
        .query(
            "SELECT c.relname::text, a.attname::text, format_type(a.atttypid, a.atttypmod), \
                    bt.typname::text, bt.typcategory::text, coalesce(co.collname::text, '') \
             FROM unnest($1::text[]) AS n(name) \
             JOIN pg_class c ON c.oid = to_regclass(n.name) \
             JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped \
             JOIN pg_type t ON t.oid = a.atttypid \
             JOIN pg_type bt ON bt.oid = CASE WHEN t.typtype = 'd' THEN t.typbasetype ELSE t.oid END \
             LEFT JOIN pg_collation co ON co.oid = a.attcollation",
            &[&tables],
        )
        .await
        .map_err(|e| error::pg("reading the column types of the Trusst tables", e))?;
    Ok(rows
        .into_iter()
        .map(|r| {
            let category: String = r.get(4);
            (
                (r.get(0), r.get(1)),
                PgType {
                    name: r.get(2),
                    base: r.get(3),
                    category: category.chars().next().unwrap_or('X'),
                    collation: r.get(5),
                },
            )
        })
        .collect())
}

/// Read the catalog and build the plan; an unreadable or missing column is a user error that
/// names each one with its fix.
pub async fn read<C: GenericClient>(client: &C) -> Result<Plan> {
    let types = column_types(client).await?;
    Plan::new(|t, c| types.get(&(t.to_owned(), c.to_owned())).cloned()).map_err(|problems| {
        Error::user(
            problems
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; "),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ty(name: &str, base: &str, category: char) -> PgType {
        PgType {
            name: name.into(),
            base: base.into(),
            category,
            collation: String::new(),
        }
    }

    #[test]
    fn accepts_the_types_customers_have() {
        for t in [
            ty("character varying", "varchar", 'S'),
            ty("text", "text", 'S'),
            ty("character(36)", "bpchar", 'S'),
            ty("uuid", "uuid", 'U'),
            ty("bigint", "int8", 'N'),
            ty("integer", "int4", 'N'),
            ty("public.stage", "stage", 'E'),
        ] {
            assert!(classify(Role::Key, &t).is_ok(), "{t:?}");
            assert!(classify(Role::Value, &t).is_ok(), "{t:?}");
        }
        for t in [
            ty("boolean", "bool", 'B'),
            ty("numeric(4,1)", "numeric", 'N'),
            ty("jsonb", "jsonb", 'U'),
        ] {
            assert!(classify(Role::Value, &t).is_ok(), "{t:?}");
        }
        assert_eq!(
            classify(
                Role::Time,
                &ty("timestamp with time zone", "timestamptz", 'D')
            ),
            Ok(Some(Accepted::Time(TimeKind::TimestampTz)))
        );
        assert_eq!(
            classify(Role::Time, &ty("date", "date", 'D')),
            Ok(Some(Accepted::Time(TimeKind::Date)))
        );
        assert_eq!(
            classify(Role::Flag, &ty("smallint", "int2", 'N')),
            Ok(Some(Accepted::Flag(FlagKind::Int)))
        );
    }

    #[test]
    fn refuses_what_it_cannot_read_with_the_fix() {
        let e = classify(Role::Time, &ty("bigint", "int8", 'N')).unwrap_err();
        assert!(e.contains("timestamp, timestamptz or date"), "{e}");
        let e = classify(Role::Value, &ty("bytea", "bytea", 'U')).unwrap_err();
        assert!(e.contains("bytea"), "{e}");
        let e = classify(Role::Key, &ty("point", "point", 'G')).unwrap_err();
        assert!(e.contains("uuid"), "{e}");
        let problems = Plan::new(|t, c| {
            (t, c).ne(&("contacts", "agent_id")).then(|| {
                if c == "start_time" {
                    ty("integer", "int4", 'N')
                } else {
                    Plan::guide().types[&(t, c)].clone()
                }
            })
        })
        .unwrap_err();
        let text: Vec<String> = problems.iter().map(ToString::to_string).collect();
        assert_eq!(text.len(), 2, "{text:?}");
        assert!(
            text[0].starts_with("column contacts.start_time: type integer"),
            "{text:?}"
        );
        assert!(
            text[0].contains("ALTER TABLE contacts ALTER COLUMN \"start_time\""),
            "{text:?}"
        );
        assert!(
            text[1].starts_with("column contacts.agent_id: missing"),
            "{text:?}"
        );
    }

    #[test]
    fn an_id_must_have_one_form_across_tables() {
        let with = |table: &'static str, t: PgType| {
            move |tb: &str, c: &str| {
                let mut ty = Plan::guide().types[&(tb, c)].clone();
                if tb == table && c == "contact_id" {
                    ty = t.clone();
                }
                Some(ty)
            }
        };
        let e = Plan::new(with("inferences", ty("character(12)", "bpchar", 'S'))).unwrap_err();
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(
            e[0].to_string().contains(
                "column inferences.contact_id: type character(12) differs from contacts.contact_id"
            ),
            "{}",
            e[0]
        );
        assert!(e[0].fix.contains("TYPE character varying"), "{}", e[0].fix);
        let e = Plan::new(with("s3_conversations", ty("uuid", "uuid", 'U'))).unwrap_err();
        assert!(
            e[0].to_string().contains("s3_conversations.contact_id"),
            "{}",
            e[0]
        );
        // text and varchar share a form; so do the integer widths.
        assert!(Plan::new(with("inferences", ty("text", "text", 'S'))).is_ok());
    }

    #[test]
    fn flags_read_the_same_in_sql_and_from_the_stream() {
        for (v, want) in [
            ("t", true),
            ("true", true),
            ("TRUE", true),
            ("yes", true),
            ("1", true),
            ("-2", true),
            ("f", false),
            ("false", false),
            ("0", false),
            ("no", false),
            ("", false),
        ] {
            assert_eq!(flag_text(v), want, "{v:?}");
        }
    }

    #[test]
    fn pages_bound_the_joined_table_only_where_it_sorts_alike() {
        let guide = Plan::guide();
        let q = guide.question_page_sql(true);
        assert!(q.contains("AND i.contact_id > $3::text::"), "{q}");
        assert!(!guide.question_page_sql(false).contains("i.contact_id >"));
        let w = guide.window_ids_sql(true);
        assert!(w.contains("AND s3c.contact_id > $3::text::"), "{w}");
        assert!(!guide.window_ids_sql(false).contains("s3c.contact_id >"));
        assert!(!guide.window_count_sql().contains("s3c.contact_id >"));
        // Another collation on one side sorts differently: the bound could skip contacts.
        let plan = Plan::new(|t, c| {
            let mut ty = Plan::guide().types[&(t, c)].clone();
            if (t, c) == ("inferences", "contact_id") {
                ty.collation = "C".into();
            }
            Some(ty)
        })
        .unwrap();
        let q = plan.question_page_sql(true);
        assert!(!q.contains("i.contact_id >"), "{q}");
        assert!(plan.window_ids_sql(true).contains("s3c.contact_id >"));
    }

    #[test]
    fn ids_are_cast_to_the_column_type() {
        let plan = Plan::new(|t, c| {
            let mut ty = Plan::guide().types[&(t, c)].clone();
            if c == "contact_id" {
                ty = PgType {
                    name: "uuid".into(),
                    base: "uuid".into(),
                    category: 'U',
                    collation: String::new(),
                };
            }
            Some(ty)
        })
        .unwrap();
        let sql = plan.enrich_sql();
        assert!(sql.contains("c.contact_id = r.id::text::uuid"), "{sql}");
        assert!(
            plan.completed_page_sql(true)
                .contains("c.contact_id > $2::text::uuid")
        );
        assert!(!plan.completed_page_sql(false).contains("$2"));
    }
}
