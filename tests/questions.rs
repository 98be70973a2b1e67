//! `trusst-cdc questions` on the real PostgreSQL: the universal questions as the guide's step 1
//! query returns them, a starting mapping per target, and the printed Salesforce block used as a
//! sink's mapping writes each answer to the field it names (source -> Kafka -> sink -> CRM
//! emulator).

mod common;

use std::collections::BTreeSet;
use std::process::Command;
use std::time::Duration;

use common::crm::{Emulator, SinkProc, eventually, set, sink_config};
use common::{SourceOpts, SourceProc, TestDb, completed};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(90);

/// `trusst-cdc questions` for `db` with `args`; stdout, after checking it succeeded.
fn questions(db: &TestDb, args: &[&str]) -> String {
    let out = Command::new(common::bin())
        .args(["questions", "--config", "/dev/null"])
        .args(args)
        .env("DATABASE_URL", &db.url)
        .env("TRUSST_CUSTOMER", "acme")
        // The command reads only the database.
        .env_remove("KAFKA_BROKERS")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A database with the generator's questions, one of them no longer universal, and a new
/// universal Label question answered Yes or No for every contact.
async fn database() -> (TestDb, Vec<String>) {
    let db = TestDb::new("t_questions").await;
    let ids = completed(&db, 71, 8).await;
    let c = db.client().await;
    c.batch_execute(
        "UPDATE questions SET is_universal = false WHERE key = 'empathy_rating';
         INSERT INTO questions (question_id, key, text, result_type, is_universal, \"group\", \"order\")
             VALUES ('q-fcr', 'first_call_resolution', 'Was the issue resolved on the first call?', 'Label', true, 'Quality', 9);
         INSERT INTO inferences (inference_id, contact_id, question_id, result)
             SELECT 'fcr-' || contact_id, contact_id, 'q-fcr',
                    CASE WHEN md5(contact_id) < '8' THEN 'Yes' ELSE 'No' END
             FROM contacts;",
    )
    .await
    .unwrap();
    (db, ids)
}

/// The list is the guide's step 1 query, in its order; the names are the guide's rule
/// (Salesforce), the column names (Dataverse, with a sink's publisher prefix) and the payload
/// keys (MuleSoft); Label questions list the answers given so far.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn questions_follow_the_guide_and_the_sinks_naming() {
    let (db, _) = database().await;
    let (_d, dynamics) = sink_config("dynamics", "unused", |t| {
        set(t, "mapping", "field_prefix", "new_");
    });
    let report: Value = serde_json::from_str(&questions(
        &db,
        &[
            "--json",
            "--sink",
            &format!(
                "{}/connector-config/salesforce.toml",
                env!("CARGO_MANIFEST_DIR")
            ),
            "--sink",
            dynamics.to_str().unwrap(),
            "--sink",
            &format!(
                "{}/connector-config/mulesoft.toml",
                env!("CARGO_MANIFEST_DIR")
            ),
        ],
    ))
    .unwrap();
    assert_eq!(report["customer"], "acme");

    let c = db.client().await;
    let step1: Vec<String> = c
        .query(
            "SELECT key FROM questions WHERE is_universal = TRUE ORDER BY \"group\", \"order\", key",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let listed: Vec<&str> = report["questions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|q| q["key"].as_str().unwrap())
        .collect();
    assert_eq!(listed, step1, "{report:#}");
    assert!(!listed.contains(&"empathy_rating"));

    let fcr = report["questions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q["key"] == "first_call_resolution")
        .unwrap();
    let answered: BTreeSet<String> = c
        .query(
            "SELECT DISTINCT result FROM inferences WHERE question_id = 'q-fcr'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let labels: BTreeSet<String> = serde_json::from_value(fcr["labels"].clone()).unwrap();
    assert_eq!(labels, answered);
    let by_target = |kind: &str| {
        fcr["targets"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["kind"] == kind)
            .unwrap()
            .clone()
    };
    let sf = by_target("salesforce");
    assert_eq!(
        (&sf["field"], &sf["conversion"]),
        (
            &Value::from("First_Call_Resolution__c"),
            &Value::from("picklist")
        )
    );
    let dv = by_target("dynamics");
    assert_eq!(
        (&dv["field"], &dv["conversion"]),
        (
            &Value::from("new_first_call_resolution"),
            &Value::from("option_set")
        )
    );
    assert_eq!(by_target("mulesoft")["field"], "first_call_resolution");
    // The shipped Salesforce config maps call_outcome by name: the printed plan follows it.
    let outcome = report["questions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q["key"] == "call_outcome")
        .unwrap();
    assert_eq!(outcome["targets"][0]["field"], "Call_Outcome__c");
}

/// The printed Salesforce block, as the `[mapping.questions]` of a sink (with unlisted questions
/// ignored, so only what it names is written), puts every answer in the field it names.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_printed_mapping_drives_a_sink() {
    let (db, ids) = database().await;
    let text = questions(&db, &[]);
    let block = text
        .split("\n\n")
        .find(|b| b.starts_with("# salesforce:"))
        .unwrap_or_else(|| panic!("no Salesforce block:\n{text}"));
    let printed: toml::Table = toml::from_str(block).unwrap();
    let printed = printed["mapping"]["questions"].clone();

    // The CRM has a picklist field for the new question, with the values the command listed.
    let emulator_cfg = tempfile::tempdir().unwrap();
    let shipped = std::fs::read_to_string(format!(
        "{}/connector-config/crm-emulator.toml",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
    .replace(
        "\"../tests/fixtures/",
        &format!("\"{}/tests/fixtures/", env!("CARGO_MANIFEST_DIR")),
    )
    .replace(
        "Call_Summary__c = {",
        "First_Call_Resolution__c = { type = \"picklist\", values = [\"Yes\", \"No\"], restricted = true }\nCall_Summary__c = {",
    );
    let path = emulator_cfg.path().join("crm-emulator.toml");
    std::fs::write(&path, shipped).unwrap();
    let emu = Emulator::start_with_config(&path, &[]);

    let mut src = SourceProc::start(&db, SourceOpts::default());
    src.wait_streaming();
    let (dir, cfg) = sink_config("salesforce", &src.topic, |t| {
        let mapping = t.get_mut("mapping").unwrap().as_table_mut().unwrap();
        mapping.insert("questions".into(), printed);
        mapping.insert("unmapped_questions".into(), "ignore".into());
    });
    let mut sink = SinkProc::start(&emu, dir, cfg, &[]);

    let c = db.client().await;
    let answers: Vec<(String, String, String)> = c
        .query(
            "SELECT i.contact_id, q.key, i.result FROM inferences i JOIN questions q USING (question_id) \
             WHERE q.is_universal AND q.result_type IN ('Label', 'Boolean')",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    eventually(WAIT, "every contact with its answers", || {
        sink.assert_running();
        let records = emu.records("salesforce", "Contact");
        if records.len() != ids.len() {
            return Err(format!("{} records", records.len()));
        }
        for (id, key, result) in &answers {
            let r = records
                .iter()
                .find(|r| r["Trusst_Contact_ID__c"] == id.as_str())
                .ok_or(format!("no record for {id}"))?;
            let field = trusst_cdc::sink::salesforce::profile::field_name(key);
            let want = match key.as_str() {
                "agent_identified" | "compliance_check" => Value::from(result == "true"),
                _ => Value::from(result.as_str()),
            };
            if r[&field] != want {
                return Err(format!("{id} {field} = {}, want {want}", r[&field]));
            }
        }
        Ok(())
    });
    // Not universal any more: not in the printed block, not written.
    assert!(
        emu.records("salesforce", "Contact")
            .iter()
            .all(|r| r.get("Empathy_Rating__c").is_none_or(Value::is_null)),
        "a question that is no longer universal was written"
    );
    assert!(sink.terminate().success(), "{}", sink.log());
    db.drop_slot(&src.slot).await;
}
