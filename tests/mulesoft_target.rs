//! The MuleSoft client against a scripted API: both auth styles, per-contact errors, a refused
//! payload with the culprits named, and rate limiting.

mod crm_mock;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use crm_mock::{Mock, Reply, Seen, token_reply};
use serde_json::{Value, json};
use trusst_cdc::error::Fault;
use trusst_cdc::sink::http::Secret;
use trusst_cdc::sink::mapping::{Mapping, MappingConfig, Record, TargetKind};
use trusst_cdc::sink::mulesoft::{Auth, Config, Mulesoft};
use trusst_cdc::sink::{Outcome, Target};

/// Contact ids in a posted payload.
fn ids(body: &str) -> Vec<String> {
    let v: Value = serde_json::from_str(body).unwrap();
    v["contacts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["trusst_contact_id"].as_str().unwrap().to_owned())
        .collect()
}

/// A scripted API: contacts with `bad` in the id fail inside a 200 answer; a payload with a
/// `reject` contact is refused with 400 naming it; `limit` gets a 429 with X-Ratelimit-Reset,
/// `limit-bare` one without. OAuth tokens: the first is refused once (an expired token).
async fn api() -> Mock {
    let tokens = Arc::new(AtomicUsize::new(0));
    let expire_once = Arc::new(AtomicBool::new(true));
    Mock::start(move |r: &Seen| {
        if r.target == "/oauth/token" {
            if r.body.contains("client_secret=wrong") {
                return Reply::json(401, json!({"error":"invalid_client"}));
            }
            return token_reply(tokens.fetch_add(1, Ordering::SeqCst) + 1);
        }
        let auth = r.header("authorization");
        let client_ok = r.header("client_id") == "cid" && r.header("client_secret") == "right";
        if auth.starts_with("Bearer ") {
            if auth == "Bearer tok-1" && expire_once.swap(false, Ordering::SeqCst) {
                return Reply::json(401, json!({"error":"invalid_token"}));
            }
        } else if !client_ok {
            return Reply::json(401, json!({"error":"Invalid client id or secret"}));
        }
        let ids = ids(&r.body);
        if ids.iter().any(|i| i == "limit-bare") {
            return Reply::json(429, json!({"error":"too many"}));
        }
        if ids.iter().any(|i| i == "limit") {
            return Reply::json(429, json!({"error":"too many"})).with("X-Ratelimit-Reset", "1500").with("X-Ratelimit-Remaining", "0");
        }
        // A proxy's login wall, or an API that answers nothing: 200 all the same.
        if ids.iter().any(|i| i.contains("login-wall")) {
            return Reply {
                status: 200,
                headers: vec![("content-type".into(), "text/html".into())],
                body: "<html><body><form>Sign in to continue</form></body></html>".into(),
            };
        }
        if ids.iter().any(|i| i.contains("empty")) {
            return Reply {
                status: 200,
                headers: vec![],
                body: String::new(),
            };
        }
        if let Some(bad) = ids.iter().find(|i| i.contains("reject")) {
            return Reply::json(400, json!({"message":"validation failed","errors":[{"trusst_contact_id": bad, "message":"call_date is not a date"}]}));
        }
        let failed: Vec<Value> =
            ids.iter().filter(|i| i.contains("bad")).map(|i| json!({"contact_id": i, "error": "INVALID_FIELD: Quality_Score__c"})).collect();
        Reply::json(200, json!({"records_processed": ids.len() - failed.len(), "records_failed": failed.len(), "errors": failed}))
    })
    .await
}

fn config(mock: &Mock, auth: Auth, secret: &str) -> Config {
    Config {
        url: format!("{}/api/trusst-crm-sync", mock.url),
        auth,
        client_id: "cid".into(),
        client_secret: Secret {
            value: Some(secret.into()),
            ..Default::default()
        },
        token_url: Some(format!("{}/oauth/token", mock.url)),
        batch_size: 200,
        request_timeout: Duration::from_secs(10),
        accept_empty_2xx: false,
    }
}

fn record(id: &str) -> Record {
    let mut fields = serde_json::Map::new();
    fields.insert("trusst_contact_id".into(), id.into());
    fields.insert(
        "universal_questions".into(),
        json!([{"question_key":"agent_identified","result":"true"}]),
    );
    Record::new(id, fields)
}

fn mapping() -> Mapping {
    Mapping::new(TargetKind::Mulesoft, &MappingConfig::default())
}

#[tokio::test]
async fn client_id_auth_posts_the_guides_payload() {
    let mock = api().await;
    let mut m = Mulesoft::new(&config(&mock, Auth::ClientId, "right")).unwrap();
    m.prepare(&mut mapping()).await.unwrap();
    let out = m
        .upsert(&mapping(), &[record("c-1"), record("c-bad"), record("c-2")])
        .await
        .unwrap();
    assert_eq!(
        out,
        [
            Outcome::Written,
            Outcome::Rejected("INVALID_FIELD: Quality_Score__c".into()),
            Outcome::Written
        ]
    );
    let seen = mock.seen();
    assert_eq!(seen.len(), 1, "client-id auth sends nothing in prepare");
    let body: Value = serde_json::from_str(&seen[0].body).unwrap();
    assert_eq!(body["source"], "trusst-platform");
    assert!(body["sync_timestamp"].as_str().unwrap().ends_with('Z'));
    assert_eq!(
        body["contacts"][0]["universal_questions"][0]["question_key"],
        "agent_identified"
    );
    assert_eq!(seen[0].header("content-type"), "application/json");
    // HTTP Basic too, for policies set up to read it: base64("cid:right").
    assert_eq!(seen[0].header("authorization"), "Basic Y2lkOnJpZ2h0");
}

#[tokio::test]
async fn wrong_client_credentials_are_a_user_error() {
    let mock = api().await;
    let mut m = Mulesoft::new(&config(&mock, Auth::ClientId, "nope")).unwrap();
    let e = m.upsert(&mapping(), &[record("c-1")]).await.unwrap_err();
    assert_eq!(e.fault, Fault::User);
    assert!(!e.retryable);
    assert!(
        e.message()
            .contains("[mulesoft] client_id and client_secret"),
        "{e}"
    );
}

#[tokio::test]
async fn oauth_token_is_fetched_in_prepare_and_renewed_after_401() {
    let mock = api().await;
    let mut m = Mulesoft::new(&config(&mock, Auth::Oauth, "right")).unwrap();
    m.prepare(&mut mapping()).await.unwrap();
    let out = m.upsert(&mapping(), &[record("c-1")]).await.unwrap();
    assert_eq!(out, [Outcome::Written]);
    let seen = mock.seen();
    let tokens: Vec<&Seen> = seen.iter().filter(|s| s.target == "/oauth/token").collect();
    assert_eq!(tokens.len(), 2);
    let form = crm_mock::form(&tokens[0].body);
    assert!(form.contains(&("grant_type".into(), "client_credentials".into())));
    assert!(form.contains(&("client_id".into(), "cid".into())));
    let posts: Vec<&Seen> = seen
        .iter()
        .filter(|s| s.target == "/api/trusst-crm-sync")
        .collect();
    assert_eq!(
        posts
            .iter()
            .map(|p| p.header("authorization"))
            .collect::<Vec<_>>(),
        ["Bearer tok-1", "Bearer tok-2"]
    );

    let mut bad = Mulesoft::new(&config(&mock, Auth::Oauth, "wrong")).unwrap();
    let e = bad.prepare(&mut mapping()).await.unwrap_err();
    assert_eq!(e.fault, Fault::User);
    assert!(
        e.message().contains("invalid_client") && e.message().contains("[mulesoft] client_id"),
        "{e}"
    );
}

#[tokio::test]
async fn a_refused_payload_rejects_the_named_contact_and_resends_the_rest() {
    let mock = api().await;
    let mut m = Mulesoft::new(&config(&mock, Auth::ClientId, "right")).unwrap();
    let out = m
        .upsert(
            &mapping(),
            &[record("c-1"), record("c-reject"), record("c-2")],
        )
        .await
        .unwrap();
    assert_eq!(
        out,
        [
            Outcome::Written,
            Outcome::Rejected("call_date is not a date".into()),
            Outcome::Written
        ]
    );
    let posted: Vec<Vec<String>> = mock.seen().iter().map(|s| ids(&s.body)).collect();
    assert_eq!(posted, [vec!["c-1", "c-reject", "c-2"], vec!["c-1", "c-2"]]);
}

/// A 2xx that is not the API's documented answer (a login wall's HTML) is never "written": it
/// is a retryable failure that says what came back. An empty 2xx counts as written only when the
/// config says the API answers that way on purpose.
#[tokio::test]
async fn a_2xx_that_is_not_the_documented_answer_is_not_success() {
    let mock = api().await;
    let mapping = Mapping::new(TargetKind::Mulesoft, &MappingConfig::default());
    let mut m = Mulesoft::new(&config(&mock, Auth::ClientId, "right")).unwrap();
    let e = m
        .upsert(&mapping, &[record("login-wall-1"), record("ok-1")])
        .await
        .unwrap_err();
    assert!(e.retryable && e.fault == Fault::External, "{e}");
    assert!(
        e.to_string().contains("not its documented answer") && e.to_string().contains("Sign in"),
        "{e}"
    );
    let e = m.upsert(&mapping, &[record("empty-1")]).await.unwrap_err();
    assert!(e.to_string().contains("accept_empty_2xx"), "{e}");
    let mut cfg = config(&mock, Auth::ClientId, "right");
    cfg.accept_empty_2xx = true;
    let mut lenient = Mulesoft::new(&cfg).unwrap();
    assert_eq!(
        lenient
            .upsert(&mapping, &[record("empty-1")])
            .await
            .unwrap(),
        [trusst_cdc::sink::Outcome::Written]
    );
}

#[tokio::test]
async fn rate_limits_wait_for_the_reset_in_milliseconds() {
    let mock = api().await;
    let mut m = Mulesoft::new(&config(&mock, Auth::ClientId, "right")).unwrap();
    let e = m.upsert(&mapping(), &[record("limit")]).await.unwrap_err();
    assert!(e.retryable);
    assert_eq!(e.retry_after, Some(Duration::from_millis(1500)));
    let e = m
        .upsert(&mapping(), &[record("limit-bare")])
        .await
        .unwrap_err();
    assert!(e.retryable);
    assert_eq!(
        e.retry_after, None,
        "no header: the runner's exponential backoff decides"
    );
}

#[tokio::test]
async fn chunks_of_batch_size() {
    let mock = api().await;
    let mut c = config(&mock, Auth::ClientId, "right");
    c.batch_size = 2;
    let mut m = Mulesoft::new(&c).unwrap();
    let recs: Vec<Record> = (0..5).map(|i| record(&format!("c-{i}"))).collect();
    assert_eq!(
        m.upsert(&mapping(), &recs).await.unwrap(),
        vec![Outcome::Written; 5]
    );
    assert_eq!(
        mock.seen()
            .iter()
            .map(|s| ids(&s.body).len())
            .collect::<Vec<_>>(),
        [2, 2, 1]
    );
}

// Against the project's CRM emulator.

fn emulator_config(emu: &crm_mock::Emulator, auth: Auth) -> Config {
    Config {
        url: format!("{}/api/trusst-crm-sync", emu.url),
        auth,
        client_id: "trusst-mule-client".into(),
        client_secret: Secret {
            value: Some("trusst-mule-secret".into()),
            ..Default::default()
        },
        token_url: Some(format!("{}/mulesoft/oauth2/token", emu.url)),
        batch_size: 200,
        request_timeout: Duration::from_secs(10),
        accept_empty_2xx: false,
    }
}

fn contact(id: &str, result_type: &str) -> Record {
    let mut fields = serde_json::Map::new();
    fields.insert("trusst_contact_id".into(), id.into());
    fields.insert(
        "universal_questions".into(),
        json!([{"question_key":"agent_identified","question_text":null,"result_type":result_type,"result":"true"}]),
    );
    Record::new(id, fields)
}

#[tokio::test]
async fn emulator_client_id_per_contact_errors_and_rate_limit() {
    let emu = crm_mock::Emulator::start("connector-config/crm-emulator.toml");
    let mut m = Mulesoft::new(&emulator_config(&emu, Auth::ClientId)).unwrap();
    m.prepare(&mut mapping()).await.unwrap();
    let out = m
        .upsert(
            &mapping(),
            &[
                contact("c-1", "Boolean"),
                contact("c-2", "Score"),
                contact("c-3", "Boolean"),
            ],
        )
        .await
        .unwrap();
    assert_eq!(out[0], Outcome::Written);
    assert!(
        matches!(&out[1], Outcome::Rejected(msg) if msg.contains("unsupported result_type 'Score'")),
        "{out:?}"
    );
    assert_eq!(out[2], Outcome::Written);
    let rows = emu.admin("GET", "/records/mulesoft/contacts", None).await;
    let ids: Vec<&str> = rows
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["trusst_contact_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["c-1", "c-3"]);

    emu.admin("POST", "/faults", Some(json!({"burst_429": 1})))
        .await;
    let e = m
        .upsert(&mapping(), &[contact("c-4", "Boolean")])
        .await
        .unwrap_err();
    assert!(e.retryable);
    assert_eq!(e.retry_after, Some(Duration::from_millis(1000)));
    assert_eq!(
        m.upsert(&mapping(), &[contact("c-4", "Boolean")])
            .await
            .unwrap(),
        [Outcome::Written]
    );

    let mut wrong = emulator_config(&emu, Auth::ClientId);
    wrong.client_secret = Secret {
        value: Some("nope".into()),
        ..Default::default()
    };
    let e = Mulesoft::new(&wrong)
        .unwrap()
        .upsert(&mapping(), &[contact("c-5", "Boolean")])
        .await
        .unwrap_err();
    assert_eq!(e.fault, Fault::User);
}

/// The emulator on the shipped config as `edit` changes it (the config's folder, kept while it runs).
fn emulator_with(edit: impl Fn(String) -> String) -> (crm_mock::Emulator, tempfile::TempDir) {
    let root = env!("CARGO_MANIFEST_DIR");
    let text =
        std::fs::read_to_string(format!("{root}/connector-config/crm-emulator.toml")).unwrap();
    let text = edit(text).replace(
        "\"../tests/fixtures/jwt/public.pem\"",
        &format!("\"{root}/tests/fixtures/jwt/public.pem\""),
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("crm-emulator.toml");
    std::fs::write(&path, text).unwrap();
    (crm_mock::Emulator::start(path.to_str().unwrap()), dir)
}

/// A gateway's size limit the config does not know: a payload refused with 413 goes again in
/// halves until each part fits, and a contact too large on its own is rejected with the reason
/// (to the dead-letter topic), instead of the sink stopping on it.
#[tokio::test]
async fn a_payload_too_large_is_split_and_an_oversized_contact_rejected() {
    let (emu, _dir) =
        emulator_with(|t| t.replace("[mulesoft]\n", "[mulesoft]\nmax_request_bytes = 2000\n"));
    let mut m = Mulesoft::new(&emulator_config(&emu, Auth::ClientId)).unwrap();
    let mut recs: Vec<Record> = (0..12)
        .map(|i| contact(&format!("c-{i:02}"), "Boolean"))
        .collect();
    let mut big = contact("c-big", "Summary");
    big.fields["universal_questions"][0]["result"] = "x".repeat(5000).into();
    recs.insert(5, big);
    let out = m.upsert(&mapping(), &recs).await.unwrap();
    assert_eq!(out.len(), recs.len());
    for (r, o) in recs.iter().zip(&out) {
        if r.contact_id == "c-big" {
            assert!(
                matches!(o, Outcome::Rejected(msg) if msg.contains("HTTP 413") && msg.contains("request size limit")),
                "{o:?}"
            );
        } else {
            assert_eq!(o, &Outcome::Written, "{}", r.contact_id);
        }
    }
    let rows = emu.admin("GET", "/records/mulesoft/contacts", None).await;
    let mut stored: Vec<&str> = rows
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["trusst_contact_id"].as_str().unwrap())
        .collect();
    stored.sort();
    let want: Vec<String> = (0..12).map(|i| format!("c-{i:02}")).collect();
    assert_eq!(stored, want);
}

#[tokio::test]
async fn emulator_oauth_token_and_renewal() {
    // The same emulator config with OAuth token enforcement.
    let (emu, _dir) = emulator_with(|t| t.replace("auth = \"client_id\"", "auth = \"oauth\""));

    let mut m = Mulesoft::new(&emulator_config(&emu, Auth::Oauth)).unwrap();
    m.prepare(&mut mapping()).await.unwrap();
    assert_eq!(
        m.upsert(&mapping(), &[contact("c-1", "Boolean")])
            .await
            .unwrap(),
        [Outcome::Written]
    );
    emu.admin("POST", "/expire-tokens", None).await;
    assert_eq!(
        m.upsert(&mapping(), &[contact("c-2", "Boolean")])
            .await
            .unwrap(),
        [Outcome::Written]
    );
    let rows = emu.admin("GET", "/records/mulesoft/contacts", None).await;
    assert_eq!(rows.as_array().unwrap().len(), 2);

    let mut wrong = emulator_config(&emu, Auth::Oauth);
    wrong.client_secret = Secret {
        value: Some("nope".into()),
        ..Default::default()
    };
    let e = Mulesoft::new(&wrong)
        .unwrap()
        .prepare(&mut mapping())
        .await
        .unwrap_err();
    assert_eq!(e.fault, Fault::User);
    assert!(e.message().contains("invalid_client"), "{e}");
}
