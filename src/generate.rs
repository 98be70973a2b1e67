//! Realistic Trusst data for the demo, the tests and the benchmarks.
//!
//! Every contact goes through the platform's stages in separate transactions: created with its
//! s3_conversations row (TRANSCRIPTION), answers written (INFERENCE, about 12 inferences of which
//! 8 universal), then COMPLETED. Paragraph and Summary answers are sometimes longer than 4 kB of
//! high-entropy text so PostgreSQL stores them out of line (TOAST).

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use tokio_postgres::Client;

use crate::error::{self, Result};

/// The Trusst schema (four tables), as a fixture.
pub const SCHEMA_SQL: &str = include_str!("../tests/fixtures/trusst_schema.sql");
/// What the connector needs on top of the schema (replica identity).
pub const CDC_SETUP_SQL: &str = include_str!("../tests/fixtures/cdc_setup.sql");

/// A question the generator defines: (id, key, text, result type, universal, group, order).
pub type QuestionDef = (
    &'static str,
    &'static str,
    &'static str,
    &'static str,
    bool,
    &'static str,
    i32,
);

/// Eight universal questions (one per result type at least) and four others.
pub const QUESTIONS: [QuestionDef; 12] = [
    (
        "q-agent-identified",
        "agent_identified",
        "Did the agent properly identify themselves?",
        "Boolean",
        true,
        "Compliance",
        1,
    ),
    (
        "q-compliance-check",
        "compliance_check",
        "Were all compliance requirements met?",
        "Boolean",
        true,
        "Compliance",
        2,
    ),
    (
        "q-quality-score",
        "quality_score",
        "Overall call quality from 1 to 10",
        "Rating",
        true,
        "Quality",
        1,
    ),
    (
        "q-empathy",
        "empathy_rating",
        "How empathetic was the agent (1-10)?",
        "Rating",
        true,
        "Quality",
        2,
    ),
    (
        "q-outcome",
        "call_outcome",
        "What was the outcome of the call?",
        "Label",
        true,
        "Quality",
        3,
    ),
    (
        "q-sentiment",
        "customer_sentiment",
        "How did the customer feel at the end?",
        "Label",
        true,
        "Experience",
        1,
    ),
    (
        "q-resolution",
        "resolution_notes",
        "Describe how the issue was resolved.",
        "Paragraph",
        true,
        "Experience",
        2,
    ),
    (
        "q-summary",
        "call_summary",
        "Summarise the call.",
        "Summary",
        true,
        "Experience",
        3,
    ),
    (
        "q-upsell",
        "upsell_attempted",
        "Did the agent attempt an upsell?",
        "Boolean",
        false,
        "Sales",
        1,
    ),
    (
        "q-product",
        "product_knowledge",
        "Product knowledge (1-10)",
        "Rating",
        false,
        "Sales",
        2,
    ),
    (
        "q-next-steps",
        "next_steps",
        "What are the agreed next steps?",
        "Paragraph",
        false,
        "Sales",
        3,
    ),
    (
        "q-escalation",
        "escalation_reason",
        "Why was the call escalated?",
        "Label",
        false,
        "Sales",
        4,
    ),
];

/// Labels answered for Label questions.
pub const LABELS: [&str; 4] = ["Excellent", "Good", "Fair", "Poor"];

/// Load the schema fixture and the replica identity settings (idempotent).
pub async fn init_schema(client: &Client) -> Result<()> {
    client
        .batch_execute(SCHEMA_SQL)
        .await
        .map_err(|e| error::pg("loading the Trusst schema", e))?;
    client
        .batch_execute(CDC_SETUP_SQL)
        .await
        .map_err(|e| error::pg("setting replica identity", e))?;
    Ok(())
}

/// The generator's casts for the schema it writes to: ids and times may have other types than
/// the guide's (`uuid`, `timestamptz`, an enum stage...), so every value is written as text or
/// `timestamp` and cast to the column's own type.
struct Casts(std::collections::HashMap<(String, String), crate::source::schema::PgType>);

impl Casts {
    async fn read(client: &Client) -> Result<Self> {
        Ok(Self(crate::source::schema::column_types(client).await?))
    }

    /// `expr` cast to the type of `table.column` (unchanged when the column is unknown).
    fn to(&self, expr: &str, table: &str, column: &str) -> String {
        match self.0.get(&(table.to_owned(), column.to_owned())) {
            Some(t) => format!("({expr})::{}", t.name),
            None => expr.to_owned(),
        }
    }

    /// A text parameter or column `expr` cast to the column's type.
    fn text(&self, expr: &str, table: &str, column: &str) -> String {
        self.to(&format!("{expr}::text"), table, column)
    }

    /// A boolean `expr` in the form of the column (boolean, an integer, or text).
    fn flag(&self, expr: &str, table: &str, column: &str) -> String {
        let base = self
            .0
            .get(&(table.to_owned(), column.to_owned()))
            .map(|t| t.base.as_str());
        match base {
            Some("int2" | "int4" | "int8") => self.to(
                &format!("CASE WHEN {expr} THEN 1 ELSE 0 END"),
                table,
                column,
            ),
            Some("bool") | None => expr.to_owned(),
            Some(_) => self.text(expr, table, column),
        }
    }
}

/// Insert the generator's questions when missing.
pub async fn ensure_questions(client: &Client) -> Result<()> {
    let c = Casts::read(client).await?;
    let sql = format!(
        "INSERT INTO questions (question_id, key, text, result_type, is_universal, \"group\", \"order\") \
         VALUES ({}, {}, {}, {}, {}, {}, $7::integer) ON CONFLICT (question_id) DO NOTHING",
        c.text("$1", "questions", "question_id"),
        c.text("$2", "questions", "key"),
        c.text("$3", "questions", "text"),
        c.text("$4", "questions", "result_type"),
        c.flag("$5::boolean", "questions", "is_universal"),
        c.text("$6", "questions", "group"),
    );
    for (id, key, text, rt, universal, group, order) in QUESTIONS {
        client
            .execute(&sql, &[&id, &key, &text, &rt, &universal, &group, &order])
            .await
            .map_err(|e| error::pg("inserting questions", e))?;
    }
    Ok(())
}

/// Options for [`Generator`].
#[derive(Debug, Clone)]
pub struct Options {
    /// Share of Paragraph/Summary answers longer than 4 kB (0.0 - 1.0).
    pub long_text_share: f64,
    /// First call day; calls spread over `days` days.
    pub start_date: chrono::NaiveDate,
    /// Days the call times spread over.
    pub days: u32,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            long_text_share: 0.1,
            start_date: chrono::NaiveDate::from_ymd_opt(2025, 1, 15).expect("valid date"),
            days: 7,
        }
    }
}

/// A contact as generated, before it is written.
#[derive(Debug, Clone)]
pub struct NewContact {
    /// `contact_id`.
    pub contact_id: String,
    /// `(inference_id, question_id, result)`.
    pub inferences: Vec<(String, String, String)>,
    call_time: chrono::NaiveDateTime,
    direction: &'static str,
    agent: String,
}

/// Deterministic generator of contacts and answers.
pub struct Generator {
    rng: StdRng,
    opts: Options,
}

const SYLLABLES: [&str; 24] = [
    "ka", "lo", "mi", "ne", "tu", "ra", "vo", "shi", "den", "ber", "cal", "mon", "pri", "qua",
    "sol", "tek", "ux", "zen", "fir", "gal", "hor", "jin", "wex", "yol",
];

impl Generator {
    /// A generator with a fixed seed, so runs are reproducible.
    pub fn new(seed: u64, opts: Options) -> Self {
        Self {
            rng: StdRng::seed_from_u64(seed),
            opts,
        }
    }

    fn id(&mut self) -> String {
        let a: u128 = self.rng.random();
        let h = format!("{a:032x}");
        format!(
            "{}-{}-{}-{}-{}",
            &h[..8],
            &h[8..12],
            &h[12..16],
            &h[16..20],
            &h[20..]
        )
    }

    /// A text of about `len` characters; high entropy so long ones are stored out of line.
    pub fn text(&mut self, len: usize) -> String {
        let mut s = String::with_capacity(len + 16);
        while s.len() < len {
            let n = self.rng.random_range(1..4);
            for _ in 0..n {
                s.push_str(SYLLABLES[self.rng.random_range(0..SYLLABLES.len())]);
            }
            s.push_str(&format!("{}", self.rng.random_range(0..1000)));
            s.push(if self.rng.random_bool(0.1) { '.' } else { ' ' });
        }
        s
    }

    /// An answer for a result type.
    pub fn result(&mut self, result_type: &str) -> String {
        match result_type {
            "Boolean" => self.rng.random_bool(0.8).to_string(),
            "Rating" => self.rng.random_range(1..=10).to_string(),
            "Label" => LABELS[self.rng.random_range(0..LABELS.len())].to_owned(),
            _ => {
                let long = self.rng.random_bool(self.opts.long_text_share);
                let len = if long {
                    self.rng.random_range(5000..9000)
                } else {
                    self.rng.random_range(80..400)
                };
                self.text(len)
            }
        }
    }

    /// A new contact with answers to every generator question (now and then one is skipped).
    pub fn contact(&mut self) -> NewContact {
        let contact_id = self.id();
        let mut inferences = Vec::with_capacity(QUESTIONS.len());
        for (qid, _, _, rt, universal, _, _) in QUESTIONS {
            if !universal && self.rng.random_bool(0.1) {
                continue;
            }
            let inference_id = self.id();
            let result = self.result(rt);
            inferences.push((inference_id, qid.to_owned(), result));
        }
        let day = self.rng.random_range(0..self.opts.days.max(1)) as i64;
        let secs = self.rng.random_range(0..86_400) as i64;
        let call_time = self.opts.start_date.and_hms_opt(0, 0, 0).expect("midnight")
            + chrono::Duration::days(day)
            + chrono::Duration::seconds(secs);
        NewContact {
            contact_id,
            inferences,
            call_time,
            direction: if self.rng.random_bool(0.6) {
                "inbound"
            } else {
                "outbound"
            },
            agent: format!("agent_{}", self.rng.random_range(1..200)),
        }
    }
}

/// Write contacts through the three stages, each stage one transaction for the whole slice.
pub async fn write_contacts(client: &mut Client, contacts: &[NewContact]) -> Result<()> {
    let e = |e| error::pg("writing generated contacts", e);
    let ids: Vec<&str> = contacts.iter().map(|c| c.contact_id.as_str()).collect();
    let streams: Vec<String> = contacts
        .iter()
        .map(|c| format!("stream-{}", &c.contact_id[..2]))
        .collect();
    let externals: Vec<String> = contacts
        .iter()
        .map(|c| format!("ext-{}", c.contact_id))
        .collect();
    let starts: Vec<chrono::NaiveDateTime> = contacts
        .iter()
        .map(|c| c.call_time - chrono::Duration::seconds(5))
        .collect();
    let dirs: Vec<&str> = contacts.iter().map(|c| c.direction).collect();
    let agents: Vec<&str> = contacts.iter().map(|c| c.agent.as_str()).collect();
    let s3_agents: Vec<String> = contacts
        .iter()
        .map(|c| c.agent.replace("agent_", "user."))
        .collect();
    let convs: Vec<String> = contacts
        .iter()
        .map(|c| format!("conv-{}", c.contact_id))
        .collect();
    let conns: Vec<String> = contacts
        .iter()
        .map(|c| format!("REC-{}", &c.contact_id[..8]))
        .collect();
    let calls: Vec<chrono::NaiveDateTime> = contacts.iter().map(|c| c.call_time).collect();

    let k = Casts::read(client).await?;
    let contact_ids = format!("$1::text[]::{}[]", contact_id_type(&k));
    let tx = client.transaction().await.map_err(e)?;
    tx.execute(
        &format!(
            "INSERT INTO contacts (contact_id, stream_id, external_id, start_time, direction, agent_id, current_stage) \
             SELECT {}, {}, {}, {}, {}, {}, {} FROM unnest($1::text[], $2::text[], $3::text[], $4::timestamp[], $5::text[], $6::text[]) AS t(a, b, c, d, e, f)",
            k.text("a", "contacts", "contact_id"),
            k.text("b", "contacts", "stream_id"),
            k.text("c", "contacts", "external_id"),
            k.to("d", "contacts", "start_time"),
            k.text("e", "contacts", "direction"),
            k.text("f", "contacts", "agent_id"),
            k.text("'TRANSCRIPTION'", "contacts", "current_stage"),
        ),
        &[&ids, &streams, &externals, &starts, &dirs, &agents],
    )
    .await
    .map_err(e)?;
    tx.execute(
        &format!(
            "INSERT INTO s3_conversations (conversation_id, contact_id, stream_id, conn_id, agent_id, call_time, audio_s3_key, metadata_s3_key) \
             SELECT {}, {}, {}, {}, {}, {}, {}, {} \
             FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::timestamp[]) AS t(a, b, c, d, e, f)",
            k.text("a", "s3_conversations", "conversation_id"),
            k.text("b", "s3_conversations", "contact_id"),
            k.text("c", "s3_conversations", "stream_id"),
            k.text("d", "s3_conversations", "conn_id"),
            k.text("e", "s3_conversations", "agent_id"),
            k.to("f", "s3_conversations", "call_time"),
            k.text("'audio/' || a || '.wav'", "s3_conversations", "audio_s3_key"),
            k.text("'meta/' || a || '.json'", "s3_conversations", "metadata_s3_key"),
        ),
        &[&convs, &ids, &streams, &conns, &s3_agents, &calls],
    )
    .await
    .map_err(e)?;
    tx.commit().await.map_err(e)?;

    let mut inf_ids = Vec::new();
    let mut inf_contacts = Vec::new();
    let mut inf_questions = Vec::new();
    let mut inf_results = Vec::new();
    for c in contacts {
        for (iid, qid, result) in &c.inferences {
            inf_ids.push(iid.as_str());
            inf_contacts.push(c.contact_id.as_str());
            inf_questions.push(qid.as_str());
            inf_results.push(result.as_str());
        }
    }
    let tx = client.transaction().await.map_err(e)?;
    tx.execute(
        &format!(
            "UPDATE contacts SET current_stage = {} WHERE contact_id = ANY({contact_ids})",
            k.text("'INFERENCE'", "contacts", "current_stage")
        ),
        &[&ids],
    )
    .await
    .map_err(e)?;
    tx.execute(
        &format!(
            "INSERT INTO inferences (inference_id, contact_id, question_id, result) \
             SELECT {}, {}, {}, {} FROM unnest($1::text[], $2::text[], $3::text[], $4::text[]) AS t(a, b, c, d)",
            k.text("a", "inferences", "inference_id"),
            k.text("b", "inferences", "contact_id"),
            k.text("c", "inferences", "question_id"),
            k.text("d", "inferences", "result"),
        ),
        &[&inf_ids, &inf_contacts, &inf_questions, &inf_results],
    )
    .await
    .map_err(e)?;
    tx.commit().await.map_err(e)?;

    client
        .execute(
            &format!(
                "UPDATE contacts SET current_stage = {} WHERE contact_id = ANY({contact_ids})",
                k.text("'COMPLETED'", "contacts", "current_stage")
            ),
            &[&ids],
        )
        .await
        .map_err(e)?;
    Ok(())
}

/// The type `contacts.contact_id` has here (as `format_type` spells it).
fn contact_id_type(k: &Casts) -> String {
    k.0.get(&("contacts".to_owned(), "contact_id".to_owned()))
        .map_or_else(|| "text".to_owned(), |t| t.name.clone())
}
