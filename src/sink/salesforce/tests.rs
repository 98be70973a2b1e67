//! The client against a small in-process fake of the Salesforce endpoints it uses: token,
//! describe, Collections upsert, Bulk API 2.0 ingest, delete and limits.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap as AxHeaders, Method as AxMethod, StatusCode as AxStatus, Uri};
use serde_json::{Map, Value, json};

use super::*;
use crate::sink::mapping::{MappingConfig, TargetKind};

const EXT: &str = "Trusst_Contact_ID__c";

#[derive(Default)]
struct Org {
    base: String,
    token_n: u32,
    valid_token: String,
    used: u64,
    max: u64,
    log: Vec<String>,
    /// One-shot answers: (method and path prefix, status, body).
    force: VecDeque<(String, u16, String)>,
    /// Records by external id.
    records: BTreeMap<String, Map<String, Value>>,
    /// Rows that answered UNABLE_TO_LOCK_ROW once already.
    locked_once: HashSet<String>,
    /// Bulk jobs: id -> (CSV, polls).
    jobs: BTreeMap<String, (String, u32)>,
    /// Fields created after start, added to the describe.
    new_fields: Vec<Value>,
}

type Shared = Arc<Mutex<Org>>;

fn reply(status: u16, org: &Org, body: String) -> (AxStatus, AxHeaders, String) {
    let mut h = AxHeaders::new();
    h.insert(
        "sforce-limit-info",
        format!("api-usage={}/{}", org.used, org.max)
            .parse()
            .unwrap(),
    );
    (AxStatus::from_u16(status).unwrap(), h, body)
}

/// Decide a record's fate from its Notes__c, the way a real org would for such data.
fn save(org: &mut Org, rec: Map<String, Value>) -> Value {
    let id = rec
        .get(EXT)
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    match rec.get("Notes__c").and_then(Value::as_str) {
        Some("too long") => {
            json!({"success": false, "errors": [{"statusCode": "STRING_TOO_LONG", "message": "Notes: data value too large", "fields": ["Notes__c"]}]})
        }
        Some("locked") if org.locked_once.insert(id.clone()) => {
            json!({"success": false, "errors": [{"statusCode": "UNABLE_TO_LOCK_ROW", "message": "unable to obtain exclusive access to this record"}]})
        }
        _ => {
            let created = !org.records.contains_key(&id);
            let mut fields = rec;
            fields.remove("attributes");
            org.records.insert(id, fields);
            json!({"id": "003", "success": true, "errors": [], "created": created})
        }
    }
}

async fn handle(
    State(org): State<Shared>,
    method: AxMethod,
    uri: Uri,
    headers: AxHeaders,
    body: bytes::Bytes,
) -> (AxStatus, AxHeaders, String) {
    let mut org = org.lock().unwrap();
    let path = uri.path().to_owned();
    let line = format!("{method} {path}");
    org.log.push(line.clone());
    if path == "/services/oauth2/token" {
        org.token_n += 1;
        org.valid_token = format!("tok-{}", org.token_n);
        let b = json!({"access_token": org.valid_token, "instance_url": org.base, "token_type": "Bearer"}).to_string();
        return (AxStatus::OK, AxHeaders::new(), b);
    }
    let bearer = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if bearer != format!("Bearer {}", org.valid_token) {
        return reply(
            401,
            &org,
            r#"[{"message":"Session expired or invalid","errorCode":"INVALID_SESSION_ID"}]"#.into(),
        );
    }
    org.used += 1;
    if let Some(pos) = org
        .force
        .iter()
        .position(|(p, _, _)| line.starts_with(p.as_str()))
    {
        let (_, status, b) = org.force.remove(pos).unwrap();
        return reply(status, &org, b);
    }
    let rest = path
        .strip_prefix("/services/data/v62.0")
        .unwrap_or(&path)
        .to_owned();
    let text = String::from_utf8_lossy(&body).to_string();
    match (method.as_str(), rest.as_str()) {
        ("GET", "/sobjects/Contact/describe") => {
            let mut d: Value = serde_json::from_str(&describe::tests::contact_describe()).unwrap();
            d["fields"]
                .as_array_mut()
                .unwrap()
                .extend(org.new_fields.iter().cloned());
            reply(200, &org, d.to_string())
        }
        ("GET", "/limits/") => {
            let b = json!({"DailyApiRequests": {"Max": org.max, "Remaining": org.max - org.used}})
                .to_string();
            reply(200, &org, b)
        }
        ("PATCH", "/composite/sobjects/Contact/Trusst_Contact_ID__c") => {
            let req: Value = serde_json::from_str(&text).unwrap();
            assert_eq!(req["allOrNone"], false);
            let recs = req["records"].as_array().unwrap().clone();
            if recs.iter().any(|r| r["Notes__c"] == "poison") {
                return reply(400, &org, r#"[{"message":"Cannot deserialize instance of double from VALUE_STRING","errorCode":"JSON_PARSER_ERROR"}]"#.into());
            }
            let results: Vec<Value> = recs
                .into_iter()
                .map(|r| save(&mut org, r.as_object().unwrap().clone()))
                .collect();
            reply(200, &org, Value::Array(results).to_string())
        }
        ("POST", "/jobs/ingest") => {
            let req: Value = serde_json::from_str(&text).unwrap();
            assert_eq!(req, bulk::job_request("Contact", EXT));
            let id = format!("750J{}", org.jobs.len() + 1);
            org.jobs.insert(id.clone(), (String::new(), 0));
            reply(200, &org, json!({"id": id, "state": "Open"}).to_string())
        }
        (m, r) if r.starts_with("/jobs/ingest/") => {
            let tail = &r["/jobs/ingest/".len()..];
            let (id, sub) = tail.split_once('/').unwrap_or((tail, ""));
            let id = id.to_owned();
            match (m, sub) {
                ("PUT", "batches") => {
                    assert_eq!(headers.get("content-type").unwrap(), "text/csv");
                    org.jobs.get_mut(&id).unwrap().0 = text;
                    reply(201, &org, String::new())
                }
                ("PATCH", "") => reply(200, &org, json!({"id": id, "state": "UploadComplete"}).to_string()),
                ("GET", "") => {
                    let job = org.jobs.get_mut(&id).unwrap();
                    job.1 += 1;
                    let state = if job.1 < 2 { "InProgress" } else { "JobComplete" };
                    reply(200, &org, json!({"id": id, "state": state, "numberRecordsProcessed": 0}).to_string())
                }
                ("GET", "successfulResults/" | "failedResults/" | "unprocessedrecords/") => {
                    let csv_text = org.jobs[&id].0.clone();
                    let mut rd = csv::Reader::from_reader(csv_text.as_bytes());
                    let head: Vec<String> = rd.headers().unwrap().iter().map(str::to_owned).collect();
                    let notes = head.iter().position(|h| h == "Notes__c");
                    let mut rows: Vec<csv::StringRecord> = rd.records().map(Result::unwrap).collect();
                    rows.reverse(); // result order is not upload order
                    let mut w = csv::Writer::from_writer(Vec::new());
                    let prefix: &[&str] = match sub {
                        "successfulResults/" => &["sf__Id", "sf__Created"],
                        "failedResults/" => &["sf__Id", "sf__Error"],
                        _ => &[],
                    };
                    w.write_record(prefix.iter().copied().chain(head.iter().map(String::as_str))).unwrap();
                    for row in rows {
                        let note = notes.map(|i| &row[i]).unwrap_or("");
                        let cells: Vec<String> = match (sub, note) {
                            ("failedResults/", "too long") => vec!["".into(), "STRING_TOO_LONG:Notes: data value too large:Notes__c --".into()],
                            ("unprocessedrecords/", "skip-me") => vec![],
                            ("successfulResults/", n) if n != "too long" && n != "skip-me" => vec!["003".into(), "true".into()],
                            _ => continue,
                        };
                        w.write_record(cells.iter().map(String::as_str).chain(row.iter())).unwrap();
                    }
                    reply(200, &org, String::from_utf8(w.into_inner().unwrap()).unwrap())
                }
                _ => reply(404, &org, r#"[{"errorCode":"NOT_FOUND","message":"The requested resource does not exist"}]"#.into()),
            }
        }
        ("DELETE", r) if r.starts_with("/sobjects/Contact/Trusst_Contact_ID__c/") => {
            let raw = &r["/sobjects/Contact/Trusst_Contact_ID__c/".len()..];
            let id = raw.replace("%2F", "/").replace("%20", " ");
            if org.records.remove(&id).is_some() {
                reply(204, &org, String::new())
            } else {
                reply(404, &org, r#"[{"errorCode":"NOT_FOUND","message":"The requested resource does not exist"}]"#.into())
            }
        }
        _ => reply(
            404,
            &org,
            r#"[{"errorCode":"NOT_FOUND","message":"The requested resource does not exist"}]"#
                .into(),
        ),
    }
}

async fn fake_org() -> Shared {
    let org: Shared = Arc::new(Mutex::new(Org {
        max: 5000,
        ..Default::default()
    }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    org.lock().unwrap().base = format!("http://{}", listener.local_addr().unwrap());
    let app = axum::Router::new().fallback(handle).with_state(org.clone());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    org
}

fn config(base: &str, extra: &str) -> Config {
    crate::config::parse(&format!(
        "login_url = \"{base}\"\nclient_id = \"app\"\nclient_secret = {{ value = \"s\" }}\nbulk_poll_interval = \"5ms\"\n{extra}"
    ))
    .unwrap()
}

fn mapping() -> Mapping {
    let cfg: MappingConfig =
        crate::config::parse("[questions.call_outcome]\ntype = \"picklist\"\n").unwrap();
    Mapping::new(TargetKind::Salesforce, &cfg)
}

fn rec(id: &str, notes: &str) -> Record {
    let mut fields = Map::new();
    fields.insert(EXT.into(), id.into());
    fields.insert("Notes__c".into(), notes.into());
    fields.insert("Agent_Identified__c".into(), true.into());
    Record::new(id, fields)
}

async fn ready(org: &Shared, extra: &str) -> (Salesforce, Mapping) {
    let base = org.lock().unwrap().base.clone();
    let mut sf = Salesforce::new(&config(&base, extra)).unwrap();
    let mut m = mapping();
    sf.prepare(&mut m).await.unwrap();
    (sf, m)
}

fn log(org: &Shared) -> Vec<String> {
    std::mem::take(&mut org.lock().unwrap().log)
}

#[tokio::test]
async fn prepare_upsert_refresh_and_delete() {
    let org = fake_org().await;
    let (mut sf, m) = ready(&org, "").await;
    assert_eq!(
        m.questions["call_outcome"].labels.len(),
        2,
        "restricted picklist values filled from describe"
    );
    assert_eq!(
        log(&org),
        [
            "POST /services/oauth2/token",
            "GET /services/data/v62.0/sobjects/Contact/describe"
        ]
    );

    let mut unknown = rec("c-4", "x");
    unknown
        .fields
        .insert("Customer_Mood__c".into(), "calm".into());
    let mut unanswered = rec("c-5", "x");
    unanswered.fields.insert("Nps__c".into(), Value::Null);
    let out = sf
        .upsert(
            &m,
            &[
                rec("c-1", "fine"),
                rec("c-2", "too long"),
                rec("c-3", "locked"),
                unknown,
                unanswered,
            ],
        )
        .await
        .unwrap();
    assert_eq!(out[0], Outcome::Written);
    assert_eq!(
        out[1],
        Outcome::Rejected("STRING_TOO_LONG: Notes: data value too large (fields: Notes__c)".into())
    );
    assert_eq!(out[2], Outcome::Written, "a locked row is sent again");
    assert!(
        matches!(&out[3], Outcome::Rejected(m) if m.contains("field Customer_Mood__c does not exist on Contact")),
        "{out:?}"
    );
    assert_eq!(
        out[4],
        Outcome::Written,
        "a null for a missing field is dropped"
    );
    let l = log(&org);
    assert_eq!(
        l.iter().filter(|l| l.starts_with("PATCH")).count(),
        2,
        "{l:?}"
    );
    // The unknown field does not read the describe again right away.
    assert!(!l.iter().any(|l| l.contains("describe")));
    {
        let o = org.lock().unwrap();
        assert!(!o.records["c-5"].contains_key("Nps__c"));
        assert_eq!(sf.api_usage(), Some((o.used, 5000)));
    }

    // Expired session: one new token, the request goes through.
    org.lock().unwrap().valid_token = "rotated".into();
    assert_eq!(
        sf.upsert(&m, &[rec("c-1", "again")]).await.unwrap(),
        [Outcome::Written]
    );
    assert_eq!(org.lock().unwrap().token_n, 2);

    org.lock()
        .unwrap()
        .records
        .insert("a/b c".into(), Map::new());
    let out = sf
        .delete(&m, &["c-1".into(), "never-written".into(), "a/b c".into()])
        .await
        .unwrap();
    assert_eq!(out, [Outcome::Written, Outcome::Written, Outcome::Written]);
    assert!(log(&org).contains(
        &"DELETE /services/data/v62.0/sobjects/Contact/Trusst_Contact_ID__c/a%2Fb%20c".to_owned()
    ));
    assert!(!org.lock().unwrap().records.contains_key("a/b c"));
}

#[tokio::test]
async fn a_field_created_while_running_is_picked_up() {
    let org = fake_org().await;
    let (mut sf, m) = ready(&org, "").await;
    let mut r = rec("c-1", "x");
    r.fields.insert("Customer_Mood__c".into(), "calm".into());
    assert!(matches!(
        &sf.upsert(&m, std::slice::from_ref(&r)).await.unwrap()[0],
        Outcome::Rejected(_)
    ));
    org.lock()
        .unwrap()
        .new_fields
        .push(json!({"name": "Customer_Mood__c", "type": "string"}));
    // Within the refresh interval the old describe still rules.
    assert!(matches!(
        &sf.upsert(&m, std::slice::from_ref(&r)).await.unwrap()[0],
        Outcome::Rejected(_)
    ));
    sf.describe_refresh = Duration::ZERO;
    log(&org);
    assert_eq!(sf.upsert(&m, &[r]).await.unwrap(), [Outcome::Written]);
    assert_eq!(
        log(&org)[0],
        "GET /services/data/v62.0/sobjects/Contact/describe"
    );
    assert_eq!(
        org.lock().unwrap().records["c-1"]["Customer_Mood__c"],
        "calm"
    );
}

#[tokio::test]
async fn whole_request_400_is_narrowed_to_the_bad_record() {
    let org = fake_org().await;
    let (mut sf, m) = ready(&org, "").await;
    let recs: Vec<Record> = (0..6)
        .map(|i| rec(&format!("c-{i}"), if i == 4 { "poison" } else { "ok" }))
        .collect();
    let out = sf.upsert(&m, &recs).await.unwrap();
    for (i, o) in out.iter().enumerate() {
        if i == 4 {
            assert!(
                matches!(o, Outcome::Rejected(m) if m.starts_with("JSON_PARSER_ERROR")),
                "{o:?}"
            );
        } else {
            assert_eq!(o, &Outcome::Written);
        }
    }
    assert_eq!(org.lock().unwrap().records.len(), 5);
}

#[tokio::test]
async fn request_statuses_map_to_the_contract() {
    let org = fake_org().await;
    let (mut sf, m) = ready(&org, "").await;
    let patch = "PATCH /services/data/v62.0/composite";
    org.lock()
        .unwrap()
        .force
        .push_back((patch.into(), 503, "busy".into()));
    let e = sf.upsert(&m, &[rec("c-1", "x")]).await.unwrap_err();
    assert!(e.retryable && e.retry_after.is_none(), "{e}");

    org.lock()
        .unwrap()
        .force
        .push_back((patch.into(), 429, "slow down".into()));
    // No Retry-After: the runner's backoff with jitter decides, as for every target.
    let e = sf.upsert(&m, &[rec("c-1", "x")]).await.unwrap_err();
    assert_eq!(of_error(&e), Verdict::Retry(None), "{e}");

    org.lock().unwrap().force.push_back((
        patch.into(),
        404,
        r#"[{"errorCode":"NOT_FOUND","message":"nope"}]"#.into(),
    ));
    let e = sf.upsert(&m, &[rec("c-1", "x")]).await.unwrap_err();
    assert!(
        !e.retryable && e.message().contains("NOT_FOUND: nope"),
        "{e}"
    );

    org.lock().unwrap().force.push_back((
        patch.into(),
        400,
        r#"[{"errorCode":"INVALID_FIELD","message":"No such column"}]"#.into(),
    ));
    assert_eq!(
        sf.upsert(&m, &[rec("c-1", "x")]).await.unwrap(),
        [Outcome::Rejected("INVALID_FIELD: No such column".into())]
    );

    org.lock().unwrap().force.push_back((
        patch.into(),
        403,
        r#"[{"errorCode":"INSUFFICIENT_ACCESS","message":"no"}]"#.into(),
    ));
    let e = sf.upsert(&m, &[rec("c-1", "x")]).await.unwrap_err();
    assert!(
        matches!(of_error(&e), Verdict::Pause(Some(_))),
        "permissions pause, records are kept: {e}"
    );

    // Every attempt locked: a retryable error after a few tries.
    let mut locked = rec("c-9", "x");
    locked.fields.insert("Notes__c".into(), "locked".into());
    for _ in 0..=LOCK_RETRIES {
        let lock = r#"[{"success":false,"errors":[{"statusCode":"UNABLE_TO_LOCK_ROW","message":"locked"}]}]"#;
        org.lock()
            .unwrap()
            .force
            .push_back((patch.into(), 200, lock.into()));
    }
    let e = sf.upsert(&m, &[locked]).await.unwrap_err();
    assert!(e.retryable && e.message().contains("stayed locked"), "{e}");
}

#[tokio::test]
async fn allowance_pauses_writes_and_resumes() {
    let org = fake_org().await;
    let (mut sf, m) = ready(&org, "limit_share = 0.9\nlimit_pause = \"50ms\"").await;
    org.lock().unwrap().used = 4600;
    // This write still goes (the last reading was low) and reads 4601/5000.
    assert_eq!(
        sf.upsert(&m, &[rec("c-1", "x")]).await.unwrap(),
        [Outcome::Written]
    );
    log(&org);
    let e = sf.upsert(&m, &[rec("c-2", "x")]).await.unwrap_err();
    assert!(
        e.retryable && e.retry_after == Some(Duration::from_millis(50)),
        "{e}"
    );
    assert!(e.message().contains("(4601/5000)"), "{e}");
    assert!(log(&org).is_empty(), "nothing is sent while paused");
    assert!(
        sf.delete(&m, &["c-1".into()])
            .await
            .unwrap_err()
            .retry_after
            .is_some()
    );

    // After the pause the usage is read again; the window has rolled on.
    tokio::time::sleep(Duration::from_millis(60)).await;
    org.lock().unwrap().used = 100;
    assert_eq!(
        sf.upsert(&m, &[rec("c-2", "x")]).await.unwrap(),
        [Outcome::Written]
    );
    assert_eq!(log(&org)[0], "GET /services/data/v62.0/limits/");

    // The org says the allowance is spent: pause, never dead-letter.
    org.lock().unwrap().force.push_back((
        "PATCH".into(),
        403,
        r#"[{"message":"TotalRequests Limit exceeded.","errorCode":"REQUEST_LIMIT_EXCEEDED"}]"#
            .into(),
    ));
    let e = sf.upsert(&m, &[rec("c-3", "x")]).await.unwrap_err();
    assert!(
        e.retryable
            && e.retry_after == Some(Duration::from_millis(50))
            && e.message().contains("REQUEST_LIMIT_EXCEEDED"),
        "{e}"
    );
    assert_eq!(sf.api_usage(), Some((5000, 5000)));
}

#[tokio::test]
async fn bulk_job_survives_a_bad_poll_and_matches_shuffled_results() {
    let org = fake_org().await;
    let (mut sf, m) = ready(&org, "bulk_threshold = 2").await;
    org.lock().unwrap().force.push_back((
        "GET /services/data/v62.0/jobs/ingest/750J1".into(),
        503,
        "Service Unavailable".into(),
    ));
    let recs = [
        rec("c-1", "a, \"quoted\"\nline"),
        rec("c-2", "too long"),
        rec("c-3", "ok"),
        rec("c-4", "ok"),
    ];
    let out = sf.upsert(&m, &recs).await.unwrap();
    assert_eq!(out[0], Outcome::Written);
    assert_eq!(
        out[1],
        Outcome::Rejected("STRING_TOO_LONG:Notes: data value too large:Notes__c --".into())
    );
    assert_eq!(&out[2..], [Outcome::Written, Outcome::Written]);
    let l = log(&org);
    assert!(
        l.contains(&"POST /services/data/v62.0/jobs/ingest".to_owned()),
        "{l:?}"
    );
    assert!(l.contains(&"PUT /services/data/v62.0/jobs/ingest/750J1/batches".to_owned()));
    assert!(l.contains(&"PATCH /services/data/v62.0/jobs/ingest/750J1".to_owned()));
    assert!(!l.iter().any(|l| l.contains("unprocessedrecords")));
    assert!(
        org.lock().unwrap().jobs["750J1"]
            .0
            .contains("\"a, \"\"quoted\"\"\nline\"")
    );

    // A row in neither result file: the batch is retried.
    let e = sf
        .upsert(
            &m,
            &[rec("c-5", "ok"), rec("c-6", "skip-me"), rec("c-7", "ok")],
        )
        .await
        .unwrap_err();
    assert!(
        e.retryable && e.message().contains("1 of 3 records unprocessed"),
        "{e}"
    );
    assert!(
        log(&org)
            .iter()
            .any(|l| l.ends_with("/unprocessedrecords/"))
    );
}

#[tokio::test]
async fn failed_job_is_retryable_with_its_reason() {
    let org = fake_org().await;
    let (mut sf, m) = ready(&org, "bulk_threshold = 1").await;
    let failed = r#"{"id":"750J1","state":"Failed","errorMessage":"InvalidBatch : Field name not found : Foo__c"}"#;
    org.lock().unwrap().force.push_back((
        "GET /services/data/v62.0/jobs/ingest/750J1".into(),
        200,
        failed.into(),
    ));
    let e = sf
        .upsert(&m, &[rec("c-1", "ok"), rec("c-2", "ok")])
        .await
        .unwrap_err();
    assert!(
        e.retryable
            && e.message()
                .contains("ended Failed: InvalidBatch : Field name not found : Foo__c"),
        "{e}"
    );
}

#[test]
fn dry_run_sends_nothing() {
    let sf = Salesforce::new(&config(
        "https://acme.my.salesforce.com/",
        "bulk_threshold = 2",
    ))
    .unwrap();
    let m = mapping();
    let lines = sf.dry_run(&m, &[rec("c-1", "n")]);
    assert_eq!(
        lines,
        [format!(
            "PATCH https://acme.my.salesforce.com/services/data/v62.0/composite/sobjects/Contact/Trusst_Contact_ID__c {}",
            json!({"allOrNone": false, "records": [{"attributes": {"type": "Contact"}, "Agent_Identified__c": true, "Notes__c": "n", EXT: "c-1"}]})
        )]
    );
    let lines = sf.dry_run(&m, &[rec("c-1", "n"), rec("c-2", "n"), rec("c-3", "n")]);
    assert_eq!(lines.len(), 3);
    assert!(lines[0].starts_with("POST https://acme.my.salesforce.com/services/data/v62.0/jobs/ingest {\"contentType\":\"CSV\""), "{}", lines[0]);
    assert!(lines[1].starts_with("PUT https://acme.my.salesforce.com/services/data/v62.0/jobs/ingest/<job 1>/batches text/csv: header + 3 lines"), "{}", lines[1]);
    assert!(lines[2].ends_with("{\"state\":\"UploadComplete\"}"));
    assert!(sf.token.is_none());
}

#[test]
fn config_checks_and_path_encoding() {
    let c = config("https://acme.my.salesforce.com", "");
    let mut bad = c.clone();
    bad.limit_share = 1.5;
    assert!(
        Salesforce::new(&bad)
            .unwrap_err()
            .message()
            .contains("limit_share")
    );
    let mut old = c.clone();
    old.api_version = "45.0".into();
    assert!(
        Salesforce::new(&old)
            .unwrap_err()
            .message()
            .contains("46.0")
    );
    let mut v = c.clone();
    v.api_version = "v60.0".into();
    assert_eq!(
        Salesforce::new(&v).unwrap().data_path,
        "/services/data/v60.0"
    );
    let sf = Salesforce::new(&c).unwrap();
    assert!(sf.max_batch() > c.bulk_threshold);
    assert_eq!(
        encode_segment("a/b c?d~e_f.g-h%"),
        "a%2Fb%20c%3Fd~e_f.g-h%25"
    );
    assert!(!format!("{sf:?}").contains("\"s\""));
}

#[test]
fn example_config_parses() {
    let text = include_str!("../../../connector-config/salesforce.toml");
    let cfg: crate::sink::config::SinkConfig = crate::config::parse(text).unwrap();
    let o = crate::sink::config::SinkOverrides {
        kafka_brokers: Some("127.0.0.1:9092".into()),
        ..Default::default()
    };
    let cfg = cfg.resolve(o).unwrap();
    let crate::sink::targets::TargetConfig::Salesforce(sf) = cfg.target else {
        panic!("the Salesforce example configures Salesforce");
    };
    assert_eq!(sf.bulk_timeout, Duration::from_secs(1800));
    assert_eq!(sf.limit_pause, Duration::from_secs(300));
}
