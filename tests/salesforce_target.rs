//! The Salesforce target against the CRM emulator (loopback only): token flows, the mapping
//! check, Collections and Bulk API upserts, per-record rejections, token refresh, the daily
//! allowance pause and deletes.

mod common;

use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};
use trusst_cdc::event::ContactEvent;
use trusst_cdc::sink::mapping::{Mapping, MappingConfig, Record, TargetKind};
use trusst_cdc::sink::salesforce::{Config, Salesforce};
use trusst_cdc::sink::{Outcome, Target};

const EXT: &str = "Trusst_Contact_ID__c";

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// A running `trusst-cdc crm-emulator`, killed on drop.
struct Emulator {
    child: Child,
    base: String,
    http: reqwest::Client,
}

impl Emulator {
    fn start(args: &[&str]) -> Self {
        let (child, base) =
            common::crm::spawn_emulator(&repo("connector-config/crm-emulator.toml"), args);
        Self {
            child,
            base,
            http: reqwest::Client::new(),
        }
    }

    async fn admin(&self, method: Method, path: &str, body: Option<Value>) -> Value {
        let mut r = self
            .http
            .request(method, format!("{}/__admin/{path}", self.base));
        if let Some(b) = body {
            r = r.json(&b);
        }
        let res = r.send().await.unwrap();
        assert!(res.status().is_success(), "admin {path}: {}", res.status());
        res.json().await.unwrap_or(Value::Null)
    }

    /// Stored Contacts by external id.
    async fn contacts(&self) -> serde_json::Map<String, Value> {
        let all = self
            .admin(Method::GET, "records/salesforce/Contact", None)
            .await;
        all.as_array()
            .unwrap()
            .iter()
            .map(|r| (r[EXT].as_str().unwrap().to_owned(), r.clone()))
            .collect()
    }

    async fn usage(&self) -> (u64, u64) {
        let s = self.admin(Method::GET, "stats", None).await;
        (
            s["salesforce_api_usage"]["used"].as_u64().unwrap(),
            s["salesforce_api_usage"]["max"].as_u64().unwrap(),
        )
    }

    /// A client-credentials config for this emulator, with extra `[salesforce]` lines.
    fn config(&self, extra: &str) -> Config {
        trusst_cdc::config::parse(&format!(
            "login_url = \"{}\"\nclient_id = \"trusst-sf-client\"\nclient_secret = {{ value = \"trusst-sf-secret\" }}\nbulk_poll_interval = \"20ms\"\n{extra}",
            self.base
        ))
        .unwrap()
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn mapping() -> Mapping {
    let cfg: MappingConfig =
        trusst_cdc::config::parse("[questions.call_outcome]\ntype = \"picklist\"\n").unwrap();
    Mapping::new(TargetKind::Salesforce, &cfg)
}

/// An event with the given (key, result type, result) answers.
fn event(id: &str, answers: &[(&str, &str, &str)]) -> ContactEvent {
    let qs: Vec<Value> = answers
        .iter()
        .map(|(k, t, r)| {
            json!({"question_id": format!("q-{k}"), "question_key": k, "question_text": null, "result_type": t,
                   "question_group": null, "result": r, "inference_updated_at": null})
        })
        .collect();
    serde_json::from_value(json!({
        "schema_version": 1, "event_id": format!("0/1:{id}"), "op": "upsert", "trusst_contact_id": id,
        "external_id": format!("ext-{id}"), "stream_id": null, "call_date": "2025-01-15T14:23:10",
        "call_start_time": "2025-01-15T14:20:00", "direction": "inbound", "contact_agent_id": "agent_john",
        "s3_agent_id": "john.smith", "conn_id": "REC-001", "universal_questions": qs,
        "source": {"lsn": "0/1", "reason": "stream"},
    }))
    .unwrap()
}

fn standard(id: &str) -> Record {
    mapping()
        .map(&event(
            id,
            &[
                ("agent_identified", "Boolean", "true"),
                ("quality_score", "Rating", "8"),
                ("call_outcome", "Label", "Good"),
            ],
        ))
        .unwrap()
}

async fn prepared(cfg: &Config) -> (Salesforce, Mapping) {
    let mut sf = Salesforce::new(cfg).unwrap();
    let mut m = mapping();
    sf.prepare(&mut m).await.unwrap();
    (sf, m)
}

#[tokio::test]
async fn collections_upsert_refresh_and_delete() {
    let e = Emulator::start(&[]);
    let (mut sf, m) = prepared(&e.config("")).await;
    // The restricted picklist's values came from describe: a bad label fails in the mapping.
    let err = m
        .map(&event("c-x", &[("call_outcome", "Label", "Superb")]))
        .unwrap_err();
    assert!(
        err.reason.contains("not one of the picklist values"),
        "{err}"
    );

    let mut long = standard("c-3");
    long.fields
        .insert("Agent_ID__c".into(), "x".repeat(300).into());
    let unknown = m
        .map(&event(
            "c-2",
            &[
                ("customer_mood", "Label", "calm"),
                ("resolution_notes", "Paragraph", "fine"),
            ],
        ))
        .unwrap();
    let out = sf
        .upsert(&m, &[standard("c-1"), unknown, long])
        .await
        .unwrap();
    assert_eq!(out[0], Outcome::Written);
    assert!(
        matches!(&out[1], Outcome::Rejected(r) if r.contains("field Customer_Mood__c does not exist on Contact")),
        "{out:?}"
    );
    assert!(
        matches!(&out[2], Outcome::Rejected(r) if r.starts_with("STRING_TOO_LONG") && r.contains("Agent_ID__c")),
        "{out:?}"
    );

    let stored = e.contacts().await;
    assert_eq!(stored.keys().collect::<Vec<_>>(), ["c-1"]);
    let c1 = &stored["c-1"];
    assert_eq!(c1["Agent_Identified__c"], true);
    assert_eq!(c1["Quality_Score__c"], 8.0);
    assert_eq!(c1["Call_Outcome__c"], "Good");
    assert_eq!(c1["Call_Direction__c"], "inbound");
    assert_eq!(c1["External_ID__c"], "ext-c-1");
    assert!(
        c1["Call_Date__c"]
            .as_str()
            .unwrap()
            .starts_with("2025-01-15T14:23:10")
    );
    let (used, max) = sf.api_usage().expect("usage read from Sforce-Limit-Info");
    assert_eq!((used, max), e.usage().await);

    // Expired session: a new token, nothing lost.
    e.admin(Method::POST, "expire-tokens", None).await;
    let mut again = standard("c-1");
    again.fields.insert("Quality_Score__c".into(), 9.into());
    assert_eq!(sf.upsert(&m, &[again]).await.unwrap(), [Outcome::Written]);
    assert_eq!(e.contacts().await["c-1"]["Quality_Score__c"], 9.0);

    let out = sf
        .delete(&m, &["c-1".into(), "never-written".into()])
        .await
        .unwrap();
    assert_eq!(out, [Outcome::Written, Outcome::Written]);
    assert!(e.contacts().await.is_empty());
}

#[tokio::test]
async fn jwt_bearer_flow() {
    let e = Emulator::start(&[]);
    let key = repo("tests/fixtures/jwt/private.pem");
    let cfg: Config = trusst_cdc::config::parse(&format!(
        "login_url = \"{}\"\nauth = \"jwt\"\nclient_id = \"trusst-sf-client\"\nusername = \"integration@trusst.example\"\nprivate_key = {{ file = \"{}\" }}\n",
        e.base,
        key.display()
    ))
    .unwrap();
    let (mut sf, m) = prepared(&cfg).await;
    assert_eq!(
        sf.upsert(&m, &[standard("j-1")]).await.unwrap(),
        [Outcome::Written]
    );

    let mut wrong = cfg.clone();
    wrong.username = Some("someone@else.example".into());
    let err = Salesforce::new(&wrong)
        .unwrap()
        .prepare(&mut mapping())
        .await
        .unwrap_err();
    assert!(
        !err.retryable && err.message().contains("refused the token request"),
        "{err}"
    );
}

#[tokio::test]
async fn bulk_upsert_matches_rows_by_external_id() {
    let e = Emulator::start(&[]);
    let (mut sf, m) = prepared(&e.config("bulk_threshold = 3")).await;
    let mut recs: Vec<Record> = (0..8).map(|i| standard(&format!("b-{i}"))).collect();
    recs[5]
        .fields
        .insert("Agent_ID__c".into(), "x".repeat(300).into());
    recs[2].fields.insert(
        "Resolution_Notes__c".into(),
        "line one, \"quoted\"\nline two".into(),
    );
    recs[3]
        .fields
        .insert("Resolution_Notes__c".into(), Value::Null);
    let out = sf.upsert(&m, &recs).await.unwrap();
    for (i, o) in out.iter().enumerate() {
        if i == 5 {
            assert!(
                matches!(o, Outcome::Rejected(r) if r.contains("STRING_TOO_LONG")),
                "{o:?}"
            );
        } else {
            assert_eq!(o, &Outcome::Written, "record {i}");
        }
    }
    let stored = e.contacts().await;
    assert_eq!(stored.len(), 7);
    assert_eq!(
        stored["b-2"]["Resolution_Notes__c"],
        "line one, \"quoted\"\nline two"
    );
    assert_eq!(stored["b-3"]["Resolution_Notes__c"], Value::Null);
    assert_eq!(stored["b-7"]["Agent_Identified__c"], true);
    assert_eq!(e.admin(Method::GET, "stats", None).await["bulk_jobs"], 1);
}

#[tokio::test]
async fn daily_allowance_pauses_writes() {
    let e = Emulator::start(&["--sf-daily-limit", "12"]);
    let (mut sf, m) = prepared(&e.config("limit_share = 0.5\nlimit_pause = \"300ms\"")).await;
    let mut paused = None;
    for i in 0..12 {
        match sf.upsert(&m, &[standard(&format!("l-{i}"))]).await {
            Ok(out) => assert_eq!(out, [Outcome::Written]),
            Err(err) => {
                paused = Some(err);
                break;
            }
        }
    }
    let err = paused.expect("writes pause before the allowance is spent");
    assert!(
        err.retryable && err.retry_after == Some(Duration::from_millis(300)),
        "{err}"
    );
    assert!(err.message().contains("(6/12)"), "{err}");
    assert_eq!(
        e.usage().await,
        (6, 12),
        "stopped at limit_share, nothing more sent"
    );

    // The 24-hour window rolls on: after the pause, usage is read again and writes resume.
    e.admin(Method::POST, "reset-limits", None).await;
    tokio::time::sleep(Duration::from_millis(350)).await;
    assert_eq!(
        sf.upsert(&m, &[standard("l-late")]).await.unwrap(),
        [Outcome::Written]
    );

    // The org itself says the allowance is spent: 403 becomes a pause, never a rejection.
    e.admin(Method::POST, "faults", Some(json!({"sf_daily_limit": 2})))
        .await;
    let err = sf.upsert(&m, &[standard("l-403")]).await.unwrap_err();
    assert!(
        err.retryable && err.retry_after == Some(Duration::from_millis(300)),
        "{err}"
    );
    assert!(
        err.message().contains("REQUEST_LIMIT_EXCEEDED") || err.message().contains("allowance"),
        "{err}"
    );
}

#[tokio::test]
async fn unavailable_org_is_retryable() {
    let e = Emulator::start(&[]);
    let (mut sf, m) = prepared(&e.config("")).await;
    e.admin(
        Method::POST,
        "faults",
        Some(json!({"salesforce": {"burst_503": 1}})),
    )
    .await;
    let err = sf.upsert(&m, &[standard("u-1")]).await.unwrap_err();
    assert!(err.retryable, "{err}");
    assert_eq!(
        sf.upsert(&m, &[standard("u-1")]).await.unwrap(),
        [Outcome::Written]
    );
}

#[tokio::test]
async fn missing_field_fails_prepare_with_its_name() {
    let e = Emulator::start(&[]);
    let mut sf = Salesforce::new(&e.config("")).unwrap();
    let cfg: MappingConfig =
        trusst_cdc::config::parse("[questions.quality_score]\nfield = \"QA_Score__c\"\n").unwrap();
    let mut m = Mapping::new(TargetKind::Salesforce, &cfg);
    let err = sf.prepare(&mut m).await.unwrap_err();
    assert!(
        err.message().contains("field QA_Score__c (question quality_score) does not exist on Contact; create it or fix [mapping.questions.quality_score] field"),
        "{err}"
    );
}
