//! The CRM emulator, through its binary and HTTP only (loopback, no other service): every protocol
//! fact the sinks rely on, the faults, the admin API and the state file.

mod common;

use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use reqwest::header::HeaderMap;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

const SF: &str = "/services/data/v62.0";
const DV: &str = "/api/data/v9.2";
const EXT: &str = "Trusst_Contact_ID__c";

fn shipped_config() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("connector-config/crm-emulator.toml")
}

/// A running `trusst-cdc crm-emulator`, killed on drop.
struct Emulator {
    child: Child,
    base: String,
    http: reqwest::Client,
}

impl Emulator {
    async fn start(args: &[&str]) -> Self {
        Self::with_config(&shipped_config(), args).await
    }

    async fn with_config(config: &Path, args: &[&str]) -> Self {
        let (child, base) = common::crm::spawn_emulator(config, args);
        Self {
            child,
            base,
            http: reqwest::Client::new(),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn req(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        self.http.request(method, self.url(path))
    }

    async fn admin(&self, method: Method, path: &str, body: Option<Value>) -> Value {
        let mut r = self.req(method, &format!("/__admin/{path}"));
        if let Some(b) = body {
            r = r.json(&b);
        }
        let res = r.send().await.unwrap();
        assert!(res.status().is_success(), "admin {path}: {}", res.status());
        res.json().await.unwrap_or(Value::Null)
    }

    async fn sf_token(&self) -> String {
        let form = [
            ("grant_type", "client_credentials"),
            ("client_id", "trusst-sf-client"),
            ("client_secret", "trusst-sf-secret"),
        ];
        let (status, _, body) =
            send(self.req(Method::POST, "/services/oauth2/token").form(&form)).await;
        assert_eq!(status, 200, "{body}");
        body["access_token"].as_str().unwrap().to_owned()
    }

    async fn dv_token(&self) -> String {
        let (status, _, body) = send(
            self.req(Method::POST, "/trusst-tenant/oauth2/v2.0/token")
                .form(&dv_form("trusst-dv-secret")),
        )
        .await;
        assert_eq!(status, 200, "{body}");
        body["access_token"].as_str().unwrap().to_owned()
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn dv_form(secret: &str) -> [(&str, &str); 4] {
    [
        ("grant_type", "client_credentials"),
        ("client_id", "trusst-dv-client"),
        ("client_secret", secret),
        ("scope", "https://trusst.crm.dynamics.com/.default"),
    ]
}

/// Send and read status, headers and JSON body (Null when empty or not JSON).
async fn send(req: reqwest::RequestBuilder) -> (StatusCode, HeaderMap, Value) {
    let res = req.send().await.expect("request");
    let (status, headers) = (res.status(), res.headers().clone());
    let body = res.bytes().await.unwrap();
    (
        status,
        headers,
        serde_json::from_slice(&body).unwrap_or(Value::Null),
    )
}

fn header(h: &HeaderMap, name: &str) -> String {
    h.get(name)
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default()
}

/// A copy of the shipped config with some text replaced (the JWT key path made absolute).
fn config_with(dir: &Path, replacements: &[(&str, &str)]) -> PathBuf {
    let key = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/jwt/public.pem");
    let mut text = std::fs::read_to_string(shipped_config())
        .unwrap()
        .replace("../tests/fixtures/jwt/public.pem", key.to_str().unwrap());
    for (from, to) in replacements {
        assert!(text.contains(from), "{from} is not in the config");
        text = text.replace(from, to);
    }
    let path = dir.join("crm-emulator.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn assertion(sub: &str, exp_in: i64) -> String {
    signed(sub, json!(chrono::Utc::now().timestamp() + exp_in))
}

/// A JWT bearer assertion with this `exp` claim as it is (a number, or a string as
/// simple-salesforce writes it).
fn signed(sub: &str, exp: Value) -> String {
    let key = jsonwebtoken::EncodingKey::from_rsa_pem(include_bytes!("fixtures/jwt/private.pem"))
        .unwrap();
    let claims = json!({"iss": "trusst-sf-client", "sub": sub, "aud": "https://login.salesforce.com",
        "exp": exp});
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256),
        &claims,
        &key,
    )
    .unwrap()
}

#[tokio::test]
async fn salesforce_tokens_client_credentials_and_jwt() {
    let e = Emulator::start(&[]).await;
    let token_url = "/services/oauth2/token";
    let form = [
        ("grant_type", "client_credentials"),
        ("client_id", "trusst-sf-client"),
        ("client_secret", "trusst-sf-secret"),
    ];
    let (status, headers, body) = send(e.req(Method::POST, token_url).form(&form)).await;
    assert_eq!(status, 200);
    assert_eq!(body["instance_url"], e.base);
    assert_eq!(body["token_type"], "Bearer");
    for k in ["access_token", "id", "issued_at", "signature"] {
        assert!(body[k].is_string(), "{k} in {body}");
    }
    assert!(header(&headers, "sforce-limit-info").starts_with("api-usage="));

    let bad = [
        ("grant_type", "client_credentials"),
        ("client_id", "trusst-sf-client"),
        ("client_secret", "nope"),
    ];
    let (status, _, body) = send(e.req(Method::POST, token_url).form(&bad)).await;
    assert_eq!(
        (status.as_u16(), body["error"].as_str()),
        (400, Some("invalid_client"))
    );

    // The client's credentials as HTTP Basic only (RFC 6749 section 2.3.1), as simple-salesforce
    // sends them.
    let grant = [("grant_type", "client_credentials")];
    let (status, _, body) = send(
        e.req(Method::POST, token_url)
            .basic_auth("trusst-sf-client", Some("trusst-sf-secret"))
            .form(&grant),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["instance_url"], e.base);
    let (status, _, _) = send(
        e.req(Method::GET, &format!("{SF}/limits/"))
            .bearer_auth(body["access_token"].as_str().unwrap()),
    )
    .await;
    assert_eq!(status, 200);
    let (status, _, body) = send(
        e.req(Method::POST, token_url)
            .basic_auth("trusst-sf-client", Some("nope"))
            .form(&grant),
    )
    .await;
    assert_eq!(
        (status.as_u16(), body["error"].as_str()),
        (400, Some("invalid_client"))
    );

    let jwt = |a: String| {
        [
            (
                "grant_type",
                "urn:ietf:params:oauth:grant-type:jwt-bearer".to_owned(),
            ),
            ("assertion", a),
        ]
    };
    let (status, _, body) = send(
        e.req(Method::POST, token_url)
            .form(&jwt(assertion("integration@trusst.example", 120))),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (status, _, _) = send(
        e.req(Method::GET, &format!("{SF}/limits/"))
            .bearer_auth(body["access_token"].as_str().unwrap()),
    )
    .await;
    assert_eq!(status, 200);

    // simple-salesforce writes exp as a JSON string of digits.
    let in_two_minutes = (chrono::Utc::now().timestamp() + 120).to_string();
    let (status, _, body) = send(e.req(Method::POST, token_url).form(&jwt(signed(
        "integration@trusst.example",
        json!(in_two_minutes),
    ))))
    .await;
    assert_eq!(status, 200, "{body}");
    let long_ago = (chrono::Utc::now().timestamp() - 600).to_string();

    let mut tampered = assertion("integration@trusst.example", 120);
    tampered.truncate(tampered.len() - 4);
    tampered.push_str("AAAA");
    for (a, why) in [
        (assertion("someone@else.example", 120), "unknown user"),
        (assertion("integration@trusst.example", 3600), "exp too far"),
        (assertion("integration@trusst.example", -600), "expired"),
        (
            signed("integration@trusst.example", json!(long_ago)),
            "expired, exp a string",
        ),
        (
            signed("integration@trusst.example", json!("soon")),
            "exp not a time",
        ),
        (tampered, "bad signature"),
    ] {
        let (status, _, body) = send(e.req(Method::POST, token_url).form(&jwt(a))).await;
        assert_eq!(
            (status.as_u16(), body["error"].as_str()),
            (400, Some("invalid_grant")),
            "{why}: {body}"
        );
    }
}

#[tokio::test]
async fn salesforce_single_upsert_read_delete() {
    let e = Emulator::start(&[]).await;
    let t = e.sf_token().await;
    let url = format!("{SF}/sobjects/Contact/{EXT}/c-1");
    let body = json!({"Call_Outcome__c": "Good", "Quality_Score__c": 8.5, "Agent_Identified__c": true, "Call_Date__c": "2025-03-01T10:00:00.000+0000"});
    let (status, _, created) = send(e.req(Method::PATCH, &url).bearer_auth(&t).json(&body)).await;
    assert_eq!(status, 201, "{created}");
    assert_eq!(
        (created["success"].as_bool(), created["created"].as_bool()),
        (Some(true), Some(true))
    );
    let id = created["id"].as_str().unwrap().to_owned();
    assert!(id.len() == 18 && id.starts_with("003"), "{id}");
    let (_, _, first) = send(e.req(Method::GET, &url).bearer_auth(&t)).await;
    let stamp = |r: &Value| {
        chrono::DateTime::parse_from_str(
            r["SystemModstamp"].as_str().unwrap(),
            "%Y-%m-%dT%H:%M:%S%.3f%z",
        )
        .unwrap()
    };
    tokio::time::sleep(Duration::from_millis(5)).await;

    let (status, _, updated) = send(
        e.req(Method::PATCH, &url)
            .bearer_auth(&t)
            .json(&json!({"Call_Outcome__c": "Poor"})),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        updated,
        json!({"id": id, "success": true, "errors": [], "created": false})
    );

    let (status, _, record) = send(e.req(Method::GET, &url).bearer_auth(&t)).await;
    assert_eq!(status, 200);
    assert_eq!(
        (record["Id"].as_str(), record["attributes"]["type"].as_str()),
        (Some(id.as_str()), Some("Contact"))
    );
    assert_eq!(
        (record[EXT].as_str(), record["Call_Outcome__c"].as_str()),
        (Some("c-1"), Some("Poor"))
    );
    assert_eq!(record["Quality_Score__c"], 8.5);
    assert!(record["Call_Summary__c"].is_null());
    assert!(
        stamp(&record) > stamp(&first),
        "every write moves SystemModstamp: {first} then {record}"
    );

    let (status, _, err) = send(
        e.req(Method::PATCH, &url)
            .bearer_auth(&t)
            .json(&json!({EXT: "c-1"})),
    )
    .await;
    assert_eq!(
        (status.as_u16(), err[0]["errorCode"].as_str()),
        (400, Some("INVALID_FIELD"))
    );

    assert_eq!(
        send(e.req(Method::DELETE, &url).bearer_auth(&t)).await.0,
        204
    );
    let (status, _, err) = send(e.req(Method::GET, &url).bearer_auth(&t)).await;
    assert_eq!(status, 404);
    assert_eq!(
        err,
        json!([{"errorCode": "NOT_FOUND", "message": "The requested resource does not exist"}])
    );
    assert_eq!(
        send(e.req(Method::DELETE, &url).bearer_auth(&t)).await.0,
        404
    );
    let old = send(
        e.req(Method::GET, &url.replace("v62.0", "v45.0"))
            .bearer_auth(&t),
    )
    .await;
    assert_eq!(old.0, 404, "API versions before v46.0 are not served");
}

#[tokio::test]
async fn salesforce_records_by_id() {
    let e = Emulator::start(&[]).await;
    let t = e.sf_token().await;
    let (_, _, created) = send(
        e.req(Method::PATCH, &format!("{SF}/sobjects/Contact/{EXT}/i-1"))
            .bearer_auth(&t)
            .json(&json!({"Agent_ID__c": "a1"})),
    )
    .await;
    let id = created["id"].as_str().unwrap().to_owned();
    let by_id = format!("{SF}/sobjects/Contact/{id}");

    let (status, _, record) = send(e.req(Method::GET, &by_id).bearer_auth(&t)).await;
    assert_eq!(status, 200);
    assert_eq!(
        (record["Id"].as_str(), record[EXT].as_str()),
        (Some(id.as_str()), Some("i-1"))
    );
    // The 15-character form names the same record.
    let (status, _, record) = send(
        e.req(Method::GET, &format!("{SF}/sobjects/Contact/{}", &id[..15]))
            .bearer_auth(&t),
    )
    .await;
    assert_eq!(
        (status.as_u16(), record["Id"].as_str()),
        (200, Some(id.as_str()))
    );

    let update = e
        .req(Method::PATCH, &by_id)
        .bearer_auth(&t)
        .json(&json!({"Agent_ID__c": "a2", "Call_Direction__c": "inbound"}));
    assert_eq!(send(update).await.0, 204);
    let bad = e
        .req(Method::PATCH, &by_id)
        .bearer_auth(&t)
        .json(&json!({"Call_Direction__c": "sideways"}));
    let (status, _, err) = send(bad).await;
    assert_eq!(
        (status.as_u16(), err[0]["errorCode"].as_str()),
        (400, Some("INVALID_OR_NULL_FOR_RESTRICTED_PICKLIST"))
    );
    let rows = e
        .admin(Method::GET, "records/salesforce/Contact", None)
        .await;
    assert_eq!(
        (
            rows[0]["Agent_ID__c"].as_str(),
            rows[0]["Call_Direction__c"].as_str()
        ),
        (Some("a2"), Some("inbound"))
    );

    assert_eq!(
        send(e.req(Method::DELETE, &by_id).bearer_auth(&t)).await.0,
        204
    );
    let rows = e
        .admin(Method::GET, "records/salesforce/Contact", None)
        .await;
    assert_eq!(rows, json!([]));
    let (status, _, err) = send(e.req(Method::DELETE, &by_id).bearer_auth(&t)).await;
    assert_eq!(
        (status.as_u16(), err[0]["errorCode"].as_str()),
        (404, Some("NOT_FOUND"))
    );
    let other = format!("{SF}/sobjects/Contact/003000000000000AAA");
    assert_eq!(
        send(e.req(Method::GET, &other).bearer_auth(&t)).await.0,
        404
    );
}

#[tokio::test]
async fn salesforce_field_errors_have_exact_codes() {
    let e = Emulator::start(&[]).await;
    let t = e.sf_token().await;
    let url = format!("{SF}/sobjects/Contact/{EXT}/c-err");
    let cases = [
        (
            json!({"Call_Outcome__c": "Great"}),
            "INVALID_OR_NULL_FOR_RESTRICTED_PICKLIST",
            "bad value for restricted picklist field: Great",
        ),
        (
            json!({"Bogus__c": 1}),
            "INVALID_FIELD",
            "No such column 'Bogus__c' on sobject of type Contact",
        ),
        (
            json!({"Call_Summary__c": "x".repeat(131_073)}),
            "STRING_TOO_LONG",
            "",
        ),
        (
            json!({"Compliance_Check__c": "true"}),
            "INVALID_TYPE_ON_FIELD_IN_RECORD",
            "",
        ),
        (
            json!({"Empathy_Rating__c": "7"}),
            "INVALID_TYPE_ON_FIELD_IN_RECORD",
            "",
        ),
    ];
    for (body, code, message) in cases {
        let (status, _, err) = send(e.req(Method::PATCH, &url).bearer_auth(&t).json(&body)).await;
        assert_eq!(status, 400, "{body}");
        assert_eq!(err[0]["errorCode"], code, "{err}");
        assert!(
            err[0]["message"].as_str().unwrap().contains(message),
            "{err}"
        );
        assert!(err[0]["fields"].is_array());
    }
    let summary = json!({"Call_Summary__c": "x".repeat(131_072)});
    assert_eq!(
        send(e.req(Method::PATCH, &url).bearer_auth(&t).json(&summary))
            .await
            .0,
        201,
        "131,072 characters fit"
    );
}

#[tokio::test]
async fn salesforce_collections_upsert_is_one_call() {
    let e = Emulator::start(&[]).await;
    let t = e.sf_token().await;
    let url = format!("{SF}/composite/sobjects/Contact/{EXT}");
    let rec = |id: &str, outcome: &str| json!({"attributes": {"type": "Contact"}, EXT: id, "Call_Outcome__c": outcome});
    send(
        e.req(Method::PATCH, &format!("{SF}/sobjects/Contact/{EXT}/k-2"))
            .bearer_auth(&t)
            .json(&json!({})),
    )
    .await;

    let usage = |h: &HeaderMap| header(h, "sforce-limit-info");
    let (_, before, _) = send(e.req(Method::GET, &format!("{SF}/limits/")).bearer_auth(&t)).await;
    let body = json!({"allOrNone": false, "records": [rec("k-1", "Good"), rec("k-2", "Fair"), rec("k-3", "Great")]});
    let (status, after, results) =
        send(e.req(Method::PATCH, &url).bearer_auth(&t).json(&body)).await;
    assert_eq!(status, 200);
    assert_eq!(usage(&before), "api-usage=2/15000");
    assert_eq!(
        usage(&after),
        "api-usage=3/15000",
        "the whole collection counts as one call"
    );
    let r = results.as_array().unwrap();
    assert_eq!(
        (r[0]["success"].as_bool(), r[0]["created"].as_bool()),
        (Some(true), Some(true))
    );
    assert_eq!(
        (r[1]["success"].as_bool(), r[1]["created"].as_bool()),
        (Some(true), Some(false))
    );
    assert_eq!(r[2]["success"], false);
    assert_eq!(
        r[2]["errors"][0]["statusCode"],
        "INVALID_OR_NULL_FOR_RESTRICTED_PICKLIST"
    );
    assert_eq!(r[2]["errors"][0]["fields"], json!(["Call_Outcome__c"]));
    assert!(
        r[2]["errors"][0].get("errorCode").is_none(),
        "collections say statusCode"
    );

    let body = json!({"records": [rec("d-1", "Good"), rec("d-1", "Poor"), rec("d-2", "Good")]});
    let (_, _, results) = send(e.req(Method::PATCH, &url).bearer_auth(&t).json(&body)).await;
    assert_eq!(results[0]["errors"][0]["statusCode"], "DUPLICATE_VALUE");
    assert_eq!(results[1]["errors"][0]["statusCode"], "DUPLICATE_VALUE");
    assert_eq!(results[2]["success"], true);

    let body = json!({"allOrNone": true, "records": [rec("a-1", "Good"), rec("a-2", "Nope")]});
    let (_, _, results) = send(e.req(Method::PATCH, &url).bearer_auth(&t).json(&body)).await;
    assert_eq!(
        results[0]["errors"][0]["statusCode"],
        "ALL_OR_NONE_OPERATION_ROLLED_BACK"
    );
    assert_eq!(
        results[1]["errors"][0]["statusCode"],
        "INVALID_OR_NULL_FOR_RESTRICTED_PICKLIST"
    );
    let stored = e
        .admin(Method::GET, "records/salesforce/Contact", None)
        .await;
    let ids: Vec<&str> = stored
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r[EXT].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        ["k-2", "k-1", "d-2"],
        "nothing of the rolled-back request was written"
    );

    let many: Vec<Value> = (0..201).map(|i| rec(&format!("m-{i}"), "Good")).collect();
    let (status, _, err) = send(
        e.req(Method::PATCH, &url)
            .bearer_auth(&t)
            .json(&json!({"records": many})),
    )
    .await;
    assert_eq!(
        (status.as_u16(), err[0]["errorCode"].as_str()),
        (400, Some("EXCEEDED_ID_LIMIT"))
    );

    let ids = stored
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["Id"].as_str().unwrap())
        .collect::<Vec<_>>()
        .join(",");
    let (status, _, results) = send(
        e.req(
            Method::DELETE,
            &format!("{SF}/composite/sobjects?ids={ids}"),
        )
        .bearer_auth(&t),
    )
    .await;
    assert_eq!(status, 200);
    assert!(
        results
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["success"] == true),
        "{results}"
    );
}

#[tokio::test]
async fn salesforce_describe_and_limits() {
    let e = Emulator::start(&[]).await;
    let t = e.sf_token().await;
    let (status, _, d) = send(
        e.req(Method::GET, &format!("{SF}/sobjects/Contact/describe"))
            .bearer_auth(&t),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(d["name"], "Contact");
    let field = |name: &str| {
        d["fields"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["name"] == name)
            .cloned()
            .unwrap()
    };
    assert_eq!(field("Id")["type"], "id");
    assert_eq!(
        (
            field(EXT)["externalId"].as_bool(),
            field(EXT)["type"].as_str()
        ),
        (Some(true), Some("string"))
    );
    let outcome = field("Call_Outcome__c");
    assert_eq!(
        (
            outcome["type"].as_str(),
            outcome["restrictedPicklist"].as_bool()
        ),
        (Some("picklist"), Some(true))
    );
    assert_eq!(
        outcome["picklistValues"][1],
        json!({"value": "Good", "label": "Good", "active": true, "defaultValue": false})
    );
    assert_eq!(
        (
            field("Call_Summary__c")["type"].as_str(),
            field("Call_Summary__c")["length"].as_u64()
        ),
        (Some("textarea"), Some(131_072))
    );
    assert_eq!(field("Agent_Identified__c")["type"], "boolean");
    assert_eq!(field("Quality_Score__c")["type"], "double");

    let (_, headers, limits) =
        send(e.req(Method::GET, &format!("{SF}/limits/")).bearer_auth(&t)).await;
    assert_eq!(
        limits["DailyApiRequests"],
        json!({"Max": 15000, "Remaining": 14998})
    );
    assert_eq!(header(&headers, "sforce-limit-info"), "api-usage=2/15000");
    let (status, _, _) = send(
        e.req(Method::GET, &format!("{SF}/sobjects/Account/describe"))
            .bearer_auth(&t),
    )
    .await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn salesforce_daily_allowance_answers_403_until_reset() {
    let e = Emulator::start(&["--sf-daily-limit", "3"]).await;
    let t = e.sf_token().await;
    let limits = format!("{SF}/limits/");
    for _ in 0..3 {
        assert_eq!(
            send(e.req(Method::GET, &limits).bearer_auth(&t)).await.0,
            200
        );
    }
    let (status, headers, body) = send(e.req(Method::GET, &limits).bearer_auth(&t)).await;
    assert_eq!(status, 403, "never 429");
    assert_eq!(
        body,
        json!([{"message": "TotalRequests Limit exceeded.", "errorCode": "REQUEST_LIMIT_EXCEEDED"}])
    );
    assert_eq!(header(&headers, "sforce-limit-info"), "api-usage=3/3");

    e.admin(Method::POST, "reset-limits", None).await;
    assert_eq!(
        send(e.req(Method::GET, &limits).bearer_auth(&t)).await.0,
        200
    );
    e.admin(Method::POST, "faults", Some(json!({"sf_daily_limit": 1})))
        .await;
    assert_eq!(
        send(e.req(Method::GET, &limits).bearer_auth(&t)).await.0,
        403
    );
}

#[tokio::test]
async fn expired_tokens_answer_401() {
    let e = Emulator::start(&[]).await;
    let (sf, dv) = (e.sf_token().await, e.dv_token().await);
    e.admin(Method::POST, "expire-tokens", None).await;
    let (status, _, body) = send(
        e.req(Method::GET, &format!("{SF}/limits/"))
            .bearer_auth(&sf),
    )
    .await;
    assert_eq!(status, 401);
    assert_eq!(
        body,
        json!([{"message": "Session expired or invalid", "errorCode": "INVALID_SESSION_ID"}])
    );
    let (status, _, body) = send(
        e.req(
            Method::GET,
            &format!("{DV}/contacts(trusst_contact_id='x')"),
        )
        .bearer_auth(&dv),
    )
    .await;
    assert_eq!(
        (status.as_u16(), body["error"]["code"].as_str()),
        (401, Some("0x80072560"))
    );

    let short = Emulator::start(&["--token-lifetime-secs", "1"]).await;
    let t = short.sf_token().await;
    assert_eq!(
        send(
            short
                .req(Method::GET, &format!("{SF}/limits/"))
                .bearer_auth(&t)
        )
        .await
        .0,
        200
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(
        send(
            short
                .req(Method::GET, &format!("{SF}/limits/"))
                .bearer_auth(&t)
        )
        .await
        .0,
        401
    );
}

/// Poll a bulk job until it is finished; the states it went through.
async fn wait_for_job(e: &Emulator, t: &str, job: &str) -> (Value, Vec<String>) {
    let mut states = vec![];
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, _, info) = send(
            e.req(Method::GET, &format!("{SF}/jobs/ingest/{job}"))
                .bearer_auth(t),
        )
        .await;
        let state = info["state"].as_str().unwrap().to_owned();
        if states.last() != Some(&state) {
            states.push(state.clone());
        }
        if ["JobComplete", "Failed", "Aborted"].contains(&state.as_str()) {
            return (info, states);
        }
        assert!(Instant::now() < deadline, "job stuck in {states:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn csv(e: &Emulator, t: &str, path: &str) -> String {
    let res = e
        .req(Method::GET, path)
        .bearer_auth(t)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200, "{path}");
    assert_eq!(res.headers()["content-type"], "text/csv");
    res.text().await.unwrap()
}

#[tokio::test]
async fn salesforce_bulk_ingest_lifecycle() {
    let e = Emulator::start(&[]).await;
    let t = e.sf_token().await;
    let existing = format!("{SF}/sobjects/Contact/{EXT}/b-0");
    send(
        e.req(Method::PATCH, &existing)
            .bearer_auth(&t)
            .json(&json!({"Agent_ID__c": "old", "Call_Summary__c": "keep"})),
    )
    .await;

    let spec = json!({"object": "Contact", "operation": "upsert", "externalIdFieldName": EXT, "contentType": "CSV", "lineEnding": "LF"});
    let (status, _, job) = send(
        e.req(Method::POST, &format!("{SF}/jobs/ingest"))
            .bearer_auth(&t)
            .json(&spec),
    )
    .await;
    assert_eq!(status, 200, "{job}");
    assert_eq!(job["state"], "Open");
    let id = job["id"].as_str().unwrap();
    assert_eq!(
        job["contentUrl"],
        format!("services/data/v62.0/jobs/ingest/{id}/batches")
    );

    let data = format!(
        "{EXT},Agent_ID__c,Call_Outcome__c,Call_Summary__c,Agent_Identified__c\n\
         b-0,new,Good,,true\n\
         b-1,\"Smith, J.\",Fair,\"two\nlines\",false\n\
         b-2,a2,Great,,1\n\
         b-3,a3,#N/A,\"said \"\"hi\"\"\",0\n"
    );
    let upload = e
        .req(
            Method::PUT,
            &format!("/{}", job["contentUrl"].as_str().unwrap()),
        )
        .bearer_auth(&t);
    let (status, _, _) = send(upload.header("content-type", "text/csv").body(data)).await;
    assert_eq!(status, 201);
    let close = e
        .req(Method::PATCH, &format!("{SF}/jobs/ingest/{id}"))
        .bearer_auth(&t)
        .json(&json!({"state": "UploadComplete"}));
    let (status, _, closed) = send(close).await;
    assert_eq!(
        (status.as_u16(), closed["state"].as_str()),
        (200, Some("UploadComplete"))
    );

    let (info, states) = wait_for_job(&e, &t, id).await;
    assert_eq!(
        states.first().map(String::as_str),
        Some("UploadComplete"),
        "clients must poll: {states:?}"
    );
    assert_eq!(info["state"], "JobComplete");
    assert_eq!(
        (
            info["numberRecordsProcessed"].as_u64(),
            info["numberRecordsFailed"].as_u64()
        ),
        (Some(4), Some(1))
    );

    let ok = csv(&e, &t, &format!("{SF}/jobs/ingest/{id}/successfulResults/")).await;
    let lines: Vec<&str> = ok.lines().collect();
    assert_eq!(
        lines[0],
        format!(
            "\"sf__Id\",\"sf__Created\",\"{EXT}\",\"Agent_ID__c\",\"Call_Outcome__c\",\"Call_Summary__c\",\"Agent_Identified__c\""
        )
    );
    let order: Vec<&str> = lines[1..]
        .iter()
        .filter_map(|l| l.split(',').nth(2))
        .collect();
    assert_eq!(
        order,
        ["\"b-3\"", "\"b-1\"", "\"b-0\""],
        "results are not in upload order"
    );
    assert!(
        ok.contains("\"false\",\"b-0\"") && ok.contains("\"true\",\"b-1\",\"Smith, J.\""),
        "{ok}"
    );

    let failed = csv(&e, &t, &format!("{SF}/jobs/ingest/{id}/failedResults/")).await;
    assert!(
        failed.starts_with("\"sf__Id\",\"sf__Error\",\"Trusst_Contact_ID__c\""),
        "{failed}"
    );
    assert!(
        failed.contains("\"\",\"INVALID_OR_NULL_FOR_RESTRICTED_PICKLIST:bad value for restricted picklist field: Great:Call_Outcome__c --\",\"b-2\""),
        "{failed}"
    );
    let unprocessed = csv(
        &e,
        &t,
        &format!("{SF}/jobs/ingest/{id}/unprocessedrecords/"),
    )
    .await;
    assert_eq!(unprocessed.lines().count(), 1);

    let (_, _, b0) = send(e.req(Method::GET, &existing).bearer_auth(&t)).await;
    assert_eq!(
        (b0["Agent_ID__c"].as_str(), b0["Call_Summary__c"].as_str()),
        (Some("new"), Some("keep")),
        "empty cells leave fields alone"
    );
    assert_eq!(b0["Agent_Identified__c"], true);
    let (_, _, b1) = send(
        e.req(Method::GET, &format!("{SF}/sobjects/Contact/{EXT}/b-1"))
            .bearer_auth(&t),
    )
    .await;
    assert_eq!(b1["Call_Summary__c"], "two\nlines");
    let (_, _, b3) = send(
        e.req(Method::GET, &format!("{SF}/sobjects/Contact/{EXT}/b-3"))
            .bearer_auth(&t),
    )
    .await;
    assert_eq!(
        (
            b3["Call_Outcome__c"].clone(),
            b3["Call_Summary__c"].as_str()
        ),
        (Value::Null, Some("said \"hi\""))
    );

    // An aborted job processes nothing and hands every row back as unprocessed.
    let (_, _, job) = send(
        e.req(Method::POST, &format!("{SF}/jobs/ingest"))
            .bearer_auth(&t)
            .json(&spec),
    )
    .await;
    let id = job["id"].as_str().unwrap();
    let upload = e
        .req(Method::PUT, &format!("{SF}/jobs/ingest/{id}/batches"))
        .bearer_auth(&t);
    send(
        upload
            .header("content-type", "text/csv")
            .body(format!("{EXT}\nz-1\n")),
    )
    .await;
    let abort = e
        .req(Method::PATCH, &format!("{SF}/jobs/ingest/{id}"))
        .bearer_auth(&t)
        .json(&json!({"state": "Aborted"}));
    assert_eq!(send(abort).await.2["state"], "Aborted");
    assert_eq!(
        csv(
            &e,
            &t,
            &format!("{SF}/jobs/ingest/{id}/unprocessedrecords/")
        )
        .await,
        format!("\"{EXT}\"\n\"z-1\"\n")
    );
    // Clients ask in other letter cases too (simple-salesforce: unprocessedRecords).
    assert_eq!(
        csv(&e, &t, &format!("{SF}/jobs/ingest/{id}/unprocessedRecords")).await,
        format!("\"{EXT}\"\n\"z-1\"\n")
    );
    let reopen = e
        .req(Method::PATCH, &format!("{SF}/jobs/ingest/{id}"))
        .bearer_auth(&t)
        .json(&json!({"state": "UploadComplete"}));
    assert_eq!(send(reopen).await.0, 400);
    assert_eq!(
        send(
            e.req(Method::DELETE, &format!("{SF}/jobs/ingest/{id}"))
                .bearer_auth(&t)
        )
        .await
        .0,
        204
    );
}

#[tokio::test]
async fn dataverse_tokens_and_upserts() {
    let e = Emulator::start(&[]).await;
    let (status, _, body) = send(
        e.req(Method::POST, "/trusst-tenant/oauth2/v2.0/token")
            .form(&dv_form("wrong")),
    )
    .await;
    assert_eq!(
        (status.as_u16(), body["error"].as_str()),
        (400, Some("invalid_client"))
    );
    assert!(
        body["error_description"]
            .as_str()
            .unwrap()
            .starts_with("AADSTS7000215")
    );
    let (status, _, body) = send(
        e.req(Method::POST, "/trusst-tenant/oauth2/v2.0/token")
            .form(&dv_form("trusst-dv-secret")),
    )
    .await;
    assert_eq!(
        (
            status.as_u16(),
            body["expires_in"].as_u64(),
            body["token_type"].as_str()
        ),
        (200, Some(3599), Some("Bearer"))
    );
    let t = body["access_token"].as_str().unwrap();

    let url = format!("{DV}/contacts(trusst_contact_id='dv-1')");
    let patch = |body: Value| {
        e.req(Method::PATCH, &url)
            .bearer_auth(t)
            .header("OData-Version", "4.0")
            .json(&body)
    };
    let (status, h1, _) = send(patch(
        json!({"agentid": "a1", "call_outcome": 100000001, "quality_score": 8}),
    ))
    .await;
    assert_eq!(status, 204);
    let entity = header(&h1, "odata-entityid");
    assert!(
        entity.starts_with(&format!("{}{DV}/contacts(", e.base)) && entity.len() > 40,
        "{entity}"
    );
    let (status, h2, _) = send(patch(json!({"agentid": "a2"}))).await;
    assert_eq!(
        (status.as_u16(), header(&h2, "odata-entityid")),
        (204, entity.clone()),
        "204 for create and update alike"
    );

    let (status, _, rec) = send(e.req(Method::GET, &url).bearer_auth(t)).await;
    assert_eq!(status, 200);
    assert_eq!(
        (rec["agentid"].as_str(), rec["call_outcome"].as_i64()),
        (Some("a2"), Some(100000001))
    );
    assert!(entity.contains(rec["contactid"].as_str().unwrap()));
    assert!(
        rec["@odata.context"]
            .as_str()
            .unwrap()
            .ends_with("$metadata#contacts/$entity")
    );

    let repr = |key: &str| {
        e.req(
            Method::PATCH,
            &format!("{DV}/contacts(trusst_contact_id='{key}')"),
        )
        .bearer_auth(t)
        .header("Prefer", "return=representation")
    };
    let (status, _, body) = send(repr("dv-2").json(&json!({"agent_identified": true}))).await;
    assert_eq!(
        (
            status.as_u16(),
            body["agent_identified"].as_bool(),
            body["trusst_contact_id"].as_str()
        ),
        (201, Some(true), Some("dv-2"))
    );
    assert_eq!(
        send(repr("dv-2").json(&json!({"agent_identified": false})))
            .await
            .0,
        200
    );

    let missing = e
        .req(
            Method::PATCH,
            &format!("{DV}/contacts(trusst_contact_id='dv-none')"),
        )
        .bearer_auth(t);
    let (status, _, body) = send(
        missing
            .header("If-Match", "*")
            .json(&json!({"agentid": "x"})),
    )
    .await;
    assert_eq!(
        (status.as_u16(), body["error"]["code"].as_str()),
        (404, Some("0x80040217"))
    );
    let (status, _, _) = send(patch(json!({"agentid": "x"})).header("If-None-Match", "*")).await;
    assert_eq!(status, 412);
    assert_eq!(
        send(patch(json!({"agentid": "a3"})).header("If-Match", "*"))
            .await
            .0,
        204
    );

    let (status, _, body) = send(patch(json!({"favourite_colour": "blue"}))).await;
    assert_eq!(status, 400);
    assert_eq!(body["error"]["code"], "0x80060888");
    assert_eq!(
        body["error"]["message"],
        "The property 'favourite_colour' does not exist on type 'Microsoft.Dynamics.CRM.contact'. Make sure to only use property names that are defined by the type or mark the type as open type."
    );
    let (status, _, body) = send(patch(json!({"call_outcome": "Good"}))).await;
    assert_eq!(status, 400);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("100000001"),
        "the label is refused with the value to send: {body}"
    );
    let (status, _, body) = send(patch(json!({"call_outcome": 5}))).await;
    assert_eq!(
        (status.as_u16(), body["error"]["code"].as_str()),
        (400, Some("0x8004431a"))
    );
    let (status, _, body) = send(patch(json!({"agentid": "x".repeat(101)}))).await;
    assert_eq!(
        (status.as_u16(), body["error"]["code"].as_str()),
        (400, Some("0x80044331"))
    );
    let (status, _, _) = send(patch(json!({"compliance_check": "yes"}))).await;
    assert_eq!(status, 400);
    let (status, _, _) = send(patch(json!({"calldate": "2025-03-01T10:00:00"}))).await;
    assert_eq!(status, 400, "a DateTimeOffset needs its offset");

    assert_eq!(
        send(e.req(Method::DELETE, &url).bearer_auth(t)).await.0,
        204
    );
    let (status, _, body) = send(e.req(Method::GET, &url).bearer_auth(t)).await;
    assert_eq!(
        (status.as_u16(), body["error"]["code"].as_str()),
        (404, Some("0x80040217"))
    );
    assert_eq!(send(e.req(Method::GET, &url)).await.0, 401);
}

#[tokio::test]
async fn dataverse_metadata() {
    let e = Emulator::start(&[]).await;
    let t = e.dv_token().await;
    let path = format!(
        "{DV}/EntityDefinitions(LogicalName='contact')/Attributes(LogicalName='call_outcome')/Microsoft.Dynamics.CRM.PicklistAttributeMetadata?$select=LogicalName&$expand=OptionSet($select=Options),GlobalOptionSet($select=Options)"
    );
    let (status, _, body) = send(e.req(Method::GET, &path).bearer_auth(&t)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["LogicalName"], "call_outcome");
    assert!(body["GlobalOptionSet"].is_null());
    let options = body["OptionSet"]["Options"].as_array().unwrap();
    let pairs: Vec<(i64, &str)> = options
        .iter()
        .map(|o| {
            (
                o["Value"].as_i64().unwrap(),
                o["Label"]["UserLocalizedLabel"]["Label"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        pairs,
        [
            (100000000, "Excellent"),
            (100000001, "Good"),
            (100000002, "Fair"),
            (100000003, "Poor")
        ]
    );

    let (status, _, body) = send(
        e.req(
            Method::GET,
            &format!("{DV}/EntityDefinitions(LogicalName='contact')/Attributes?$select=LogicalName,AttributeType"),
        )
        .bearer_auth(&t),
    )
    .await;
    assert_eq!(status, 200);
    let kind = |name: &str| {
        body["value"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["LogicalName"] == name)
            .map(|a| a["AttributeType"].clone())
    };
    assert_eq!(kind("call_outcome"), Some(json!("Picklist")));
    assert_eq!(kind("agent_identified"), Some(json!("Boolean")));
    assert_eq!(kind("call_summary"), Some(json!("Memo")));
    assert_eq!(kind("calldate"), Some(json!("DateTime")));
    assert_eq!(kind("nope"), None);
}

fn batch_body(parts: &[String], changeset: &[String]) -> String {
    let mut body = String::new();
    let request = |url: &str, json: &str, id: Option<usize>| {
        let cid = id
            .map(|i| format!("Content-ID: {i}\r\n"))
            .unwrap_or_default();
        format!(
            "Content-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n{cid}\r\nPATCH {url} HTTP/1.1\r\nContent-Type: application/json\r\n\r\n{json}\r\n"
        )
    };
    for p in parts {
        let (url, json) = p.split_once(' ').unwrap();
        body += &format!("--batch_t\r\n{}", request(url, json, None));
    }
    if !changeset.is_empty() {
        body += "--batch_t\r\nContent-Type: multipart/mixed; boundary=changeset_t\r\n\r\n";
        for (i, p) in changeset.iter().enumerate() {
            let (url, json) = p.split_once(' ').unwrap();
            body += &format!("--changeset_t\r\n{}", request(url, json, Some(i + 1)));
        }
        body += "--changeset_t--\r\n";
    }
    body + "--batch_t--\r\n"
}

async fn post_batch(
    e: &Emulator,
    t: &str,
    body: String,
    continue_on_error: bool,
) -> (StatusCode, String) {
    let mut req = e
        .req(Method::POST, &format!("{DV}/$batch"))
        .bearer_auth(t)
        .header("Content-Type", "multipart/mixed; boundary=batch_t");
    if continue_on_error {
        req = req.header("Prefer", "odata.continue-on-error");
    }
    let res = req.body(body).send().await.unwrap();
    let status = res.status();
    if status == 200 {
        assert!(
            header(res.headers(), "content-type")
                .starts_with("multipart/mixed; boundary=batchresponse_")
        );
    }
    (status, res.text().await.unwrap())
}

fn statuses(text: &str) -> Vec<u16> {
    text.lines()
        .filter_map(|l| l.strip_prefix("HTTP/1.1 "))
        .map(|l| l[..3].parse().unwrap())
        .collect()
}

#[tokio::test]
async fn dataverse_batch_and_change_sets() {
    let e = Emulator::start(&[]).await;
    let t = e.dv_token().await;
    let part = |key: &str, json: &str| {
        format!("{}{DV}/contacts(trusst_contact_id='{key}') {json}", e.base)
    };
    let parts = [
        part("b-1", r#"{"agentid":"1"}"#),
        part("b-2", r#"{"bogus":1}"#),
        format!("contacts(trusst_contact_id='b-3') {}", r#"{"agentid":"3"}"#),
    ];

    let (status, text) = post_batch(&e, &t, batch_body(&parts, &[]), true).await;
    assert_eq!(status, 200);
    assert_eq!(statuses(&text), [204, 400, 204], "{text}");
    assert!(
        text.contains("OData-EntityId: ") && text.contains("0x80060888"),
        "{text}"
    );

    let parts = [
        part("s-1", r#"{"agentid":"1"}"#),
        part("s-2", r#"{"bogus":1}"#),
        part("s-3", r#"{"agentid":"3"}"#),
    ];
    let (_, text) = post_batch(&e, &t, batch_body(&parts, &[]), false).await;
    assert_eq!(
        statuses(&text),
        [204, 400],
        "stops at the first failure: {text}"
    );
    let exists = |key: &'static str| {
        let req = e
            .req(
                Method::GET,
                &format!("{DV}/contacts(trusst_contact_id='{key}')"),
            )
            .bearer_auth(&t);
        async move { send(req).await.0 == 200 }
    };
    assert!(exists("s-1").await && !exists("s-3").await);

    let good = [
        part("c-1", r#"{"agentid":"1"}"#),
        part("c-2", r#"{"agentid":"2"}"#),
    ];
    let (_, text) = post_batch(&e, &t, batch_body(&[], &good), false).await;
    assert_eq!(statuses(&text), [204, 204]);
    assert!(
        text.contains("Content-ID: 2") && text.contains("boundary=changesetresponse_"),
        "{text}"
    );
    let bad = [
        part("r-1", r#"{"agentid":"1"}"#),
        part("r-2", r#"{"call_outcome":"Good"}"#),
    ];
    let (_, text) = post_batch(&e, &t, batch_body(&[part("r-0", "{}")], &bad), false).await;
    assert_eq!(statuses(&text), [204, 400], "{text}");
    assert!(
        exists("c-2").await && exists("r-0").await && !exists("r-1").await,
        "a change set is all or nothing"
    );

    let many: Vec<String> = (0..1001).map(|i| part(&format!("m-{i}"), "{}")).collect();
    assert_eq!(
        post_batch(&e, &t, batch_body(&many, &[]), true).await.0,
        400
    );
}

#[tokio::test]
async fn dataverse_service_protection_429() {
    let dir = tempfile::tempdir().unwrap();
    let config = config_with(
        dir.path(),
        &[(
            r#"rate_limit = { requests = 6000, window = "300s" }"#,
            r#"rate_limit = { requests = 4, window = "300s" }"#,
        )],
    );
    let e = Emulator::with_config(&config, &[]).await;
    let t = e.dv_token().await;
    let url = format!("{DV}/contacts(trusst_contact_id='p-1')");

    e.admin(
        Method::POST,
        "faults",
        Some(json!({"dataverse": {"burst_429": 2}})),
    )
    .await;
    for _ in 0..2 {
        let (status, headers, body) =
            send(e.req(Method::PATCH, &url).bearer_auth(&t).json(&json!({}))).await;
        assert_eq!(
            (status.as_u16(), header(&headers, "retry-after")),
            (429, "1".to_owned())
        );
        assert_eq!(body["error"]["code"], "0x80072322");
    }
    assert_eq!(
        send(e.req(Method::PATCH, &url).bearer_auth(&t).json(&json!({})))
            .await
            .0,
        204
    );

    // A $batch counts as one request, whatever it holds (Microsoft: a batch "avoids the
    // number of requests limit"), and so does a bulk message ("Each bulk operation message
    // counts as single request").
    let parts: Vec<String> = (0..3)
        .map(|i| format!("contacts(trusst_contact_id='q-{i}') {{}}"))
        .collect();
    let res = e
        .req(Method::POST, &format!("{DV}/$batch"))
        .bearer_auth(&t)
        .header("Content-Type", "multipart/mixed; boundary=batch_t")
        .body(batch_body(&parts, &[]))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(
        header(res.headers(), "x-ms-ratelimit-burst-remaining-xrm-requests"),
        "2"
    );
    let targets: Vec<Value> = (0..3)
        .map(|i| dv_target(&format!("q-{i}"), json!({"agentid": "b"})))
        .collect();
    let (status, headers, _) = upsert_multiple(&e, &t, json!(targets)).await;
    assert_eq!(status, 204);
    assert_eq!(
        header(&headers, "x-ms-ratelimit-burst-remaining-xrm-requests"),
        "1"
    );
    assert_eq!(send(e.req(Method::GET, &url).bearer_auth(&t)).await.0, 200);
    let (status, headers, body) = send(e.req(Method::GET, &url).bearer_auth(&t)).await;
    assert_eq!(status, 429);
    let wait: u64 = header(&headers, "retry-after").parse().unwrap();
    assert!((250..=300).contains(&wait), "{wait}");
    assert_eq!(
        body["error"]["message"],
        "Number of requests exceeded the limit of 4 over time window of 300 seconds."
    );
    e.admin(Method::POST, "reset-limits", None).await;
    assert_eq!(send(e.req(Method::GET, &url).bearer_auth(&t)).await.0, 200);
}

#[tokio::test]
async fn dataverse_service_protection_window_slides() {
    let dir = tempfile::tempdir().unwrap();
    let config = config_with(
        dir.path(),
        &[(
            r#"rate_limit = { requests = 6000, window = "300s" }"#,
            r#"rate_limit = { requests = 2, window = "3s" }"#,
        )],
    );
    let e = Emulator::with_config(&config, &[]).await;
    let t = e.dv_token().await;
    let get = || {
        let req = e
            .req(
                Method::GET,
                &format!("{DV}/contacts(trusst_contact_id='w')"),
            )
            .bearer_auth(&t);
        async move {
            let (status, headers, _) = send(req).await;
            (status.as_u16(), header(&headers, "retry-after"))
        }
    };
    let start = Instant::now();
    assert_eq!(get().await.0, 404);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(get().await.0, 404);
    let (status, wait) = get().await;
    assert_eq!(status, 429);
    assert!(["1", "2"].contains(&wait.as_str()), "{wait}");
    // Past the first request's 3 s, one more fits; a fixed window would have started afresh
    // and let two through, a sliding one still holds the request of 1.5 s.
    tokio::time::sleep(Duration::from_millis(3300).saturating_sub(start.elapsed())).await;
    assert_eq!(get().await.0, 404);
    let (status, wait) = get().await;
    assert_eq!(status, 429, "the window slides");
    assert!(["1", "2"].contains(&wait.as_str()), "{wait}");
}

/// One `Targets` item of a bulk message on contacts, named by its alternate key.
fn dv_target(key: &str, mut fields: Value) -> Value {
    fields["@odata.type"] = "Microsoft.Dynamics.CRM.contact".into();
    fields["@odata.id"] = format!("contacts(trusst_contact_id='{key}')").into();
    fields
}

/// `POST contacts/Microsoft.Dynamics.CRM.UpsertMultiple` with these targets.
async fn upsert_multiple(e: &Emulator, t: &str, targets: Value) -> (StatusCode, HeaderMap, Value) {
    send(
        e.req(
            Method::POST,
            &format!("{DV}/contacts/Microsoft.Dynamics.CRM.UpsertMultiple"),
        )
        .bearer_auth(t)
        .json(&json!({ "Targets": targets })),
    )
    .await
}

/// The stored Dataverse contacts by alternate key.
async fn dv_rows(e: &Emulator) -> std::collections::BTreeMap<String, Value> {
    let rows = e
        .admin(Method::GET, "records/dataverse/contact", None)
        .await;
    rows.as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["trusst_contact_id"].as_str().unwrap().to_owned(),
                r.clone(),
            )
        })
        .collect()
}

#[tokio::test]
async fn dataverse_upsert_multiple_is_all_or_nothing() {
    let e = Emulator::start(&[]).await;
    let t = e.dv_token().await;
    let patch = e
        .req(
            Method::PATCH,
            &format!("{DV}/contacts(trusst_contact_id='u-1')"),
        )
        .bearer_auth(&t)
        .json(&json!({"agentid": "old"}));
    assert_eq!(send(patch).await.0, 204);
    let u1 = dv_rows(&e).await["u-1"]["contactid"].clone();

    let mut absolute = dv_target("u-3", json!({}));
    absolute["@odata.id"] = format!("{}{DV}/contacts(trusst_contact_id='u-3')", e.base).into();
    let (status, headers, body) = upsert_multiple(
        &e,
        &t,
        json!([
            dv_target("u-1", json!({"agentid": "new"})),
            dv_target(
                "u-2",
                json!({"quality_score": 7, "call_outcome": 100000001})
            ),
            absolute,
        ]),
    )
    .await;
    assert_eq!((status.as_u16(), &body), (204, &Value::Null));
    assert_eq!(header(&headers, "odata-version"), "4.0");
    let rows = dv_rows(&e).await;
    assert_eq!(rows.keys().collect::<Vec<_>>(), ["u-1", "u-2", "u-3"]);
    assert_eq!(
        (rows["u-1"]["agentid"].as_str(), &rows["u-1"]["contactid"]),
        (Some("new"), &u1),
        "an existing record is updated in place"
    );
    assert_eq!(
        (
            rows["u-2"]["quality_score"].as_i64(),
            rows["u-2"]["call_outcome"].as_i64()
        ),
        (Some(7), Some(100000001))
    );

    // One bad record fails the request with the usual error, and nothing is written: not the
    // update of u-1, not the new u-4.
    let before = dv_rows(&e).await;
    let (status, _, body) = upsert_multiple(
        &e,
        &t,
        json!([
            dv_target("u-1", json!({"agentid": "newer"})),
            dv_target("u-4", json!({"agentid": "four"})),
            dv_target("u-5", json!({"call_outcome": "Good"})),
        ]),
    )
    .await;
    assert_eq!(
        (status.as_u16(), body["error"]["code"].as_str()),
        (400, Some("0x80048d19")),
        "{body}"
    );
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("100000001"),
        "{body}"
    );
    let (status, _, body) = upsert_multiple(
        &e,
        &t,
        json!([
            dv_target("u-4", json!({})),
            dv_target("u-6", json!({"favourite_colour": "blue"}))
        ]),
    )
    .await;
    assert_eq!(
        (status.as_u16(), body["error"]["code"].as_str()),
        (400, Some("0x80060888"))
    );
    assert_eq!(dv_rows(&e).await, before);

    // The same record twice is an error, by key or by key and GUID alike.
    for twice in [
        json!([
            dv_target("u-7", json!({})),
            dv_target("u-7", json!({"agentid": "x"}))
        ]),
        json!([
            dv_target("u-1", json!({})),
            {"@odata.type": "Microsoft.Dynamics.CRM.contact", "contactid": u1, "agentid": "x"},
        ]),
    ] {
        let (status, _, body) = upsert_multiple(&e, &t, twice).await;
        assert_eq!(
            (status.as_u16(), body["error"]["code"].as_str()),
            (400, Some("0x80040237")),
            "{body}"
        );
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("Targets[0] and Targets[1]"),
            "{body}"
        );
    }
    // Every target needs its @odata.type, and the right one; the key column may repeat the
    // key, not contradict it.
    let untyped = json!({"@odata.id": "contacts(trusst_contact_id='u-8')", "agentid": "x"});
    let mut account = dv_target("u-8", json!({}));
    account["@odata.type"] = "Microsoft.Dynamics.CRM.account".into();
    let mut wrong_set = dv_target("u-8", json!({}));
    wrong_set["@odata.id"] = "accounts(accountnumber='1')".into();
    for (targets, needle) in [
        (json!([dv_target("u-8", json!({})), untyped]), "@odata.type"),
        (json!([account]), "Microsoft.Dynamics.CRM.account"),
        (
            json!([dv_target("u-8", json!({"trusst_contact_id": "u-9"}))]),
            "differs from the key",
        ),
        (json!([wrong_set]), "names a record of 'accounts'"),
    ] {
        let (status, _, body) = upsert_multiple(&e, &t, targets).await;
        assert_eq!(status, 400, "{body}");
        assert!(
            body["error"]["message"].as_str().unwrap().contains(needle),
            "{needle}: {body}"
        );
    }
    let (status, _, _) = upsert_multiple(&e, &t, json!([])).await;
    assert_eq!(status, 400);
    assert_eq!(dv_rows(&e).await, before);

    // A record named by its GUID; the key column may repeat the URL's key.
    let (status, _, body) = upsert_multiple(
        &e,
        &t,
        json!([
            {"@odata.type": "Microsoft.Dynamics.CRM.contact", "contactid": u1, "agentid": "by-guid"},
            dv_target("u-2", json!({"trusst_contact_id": "u-2", "agentid": "two"})),
        ]),
    )
    .await;
    assert_eq!(status, 204, "{body}");
    let rows = dv_rows(&e).await;
    assert_eq!(
        (
            rows["u-1"]["agentid"].as_str(),
            rows["u-2"]["agentid"].as_str()
        ),
        (Some("by-guid"), Some("two"))
    );

    // CreateMultiple answers the new GUIDs, and refuses a key that is taken.
    let create = |targets: Value| {
        e.req(
            Method::POST,
            &format!("{DV}/contacts/Microsoft.Dynamics.CRM.CreateMultiple"),
        )
        .bearer_auth(&t)
        .json(&json!({ "Targets": targets }))
    };
    let typed = |key: &str| json!({"@odata.type": "Microsoft.Dynamics.CRM.contact", "trusst_contact_id": key});
    let (status, _, body) = send(create(json!([typed("n-1"), typed("n-2")]))).await;
    assert_eq!(status, 200, "{body}");
    assert!(
        body["@odata.context"]
            .as_str()
            .unwrap()
            .ends_with("$metadata#Microsoft.Dynamics.CRM.CreateMultipleResponse")
    );
    let rows = dv_rows(&e).await;
    assert_eq!(
        body["Ids"],
        json!([rows["n-1"]["contactid"], rows["n-2"]["contactid"]])
    );
    let (status, _, body) = send(create(json!([typed("n-3"), typed("n-1")]))).await;
    assert_eq!(
        (status.as_u16(), body["error"]["code"].as_str()),
        (412, Some("0x80040237"))
    );
    assert!(!dv_rows(&e).await.contains_key("n-3"));
    // The records a create made are found by their key afterwards.
    let patch = e
        .req(
            Method::PATCH,
            &format!("{DV}/contacts(trusst_contact_id='n-1')"),
        )
        .bearer_auth(&t)
        .json(&json!({"agentid": "later"}));
    assert_eq!(send(patch).await.0, 204);
    assert_eq!(dv_rows(&e).await.len(), 5);

    let stats = e.admin(Method::GET, "stats", None).await;
    let calls = &stats["calls"]["dataverse"]["POST /api/data/v9.2/{seg}/Microsoft.Dynamics.CRM.UpsertMultiple"];
    assert_eq!(
        (calls["204"].as_u64(), calls["400"].as_u64()),
        (Some(2), Some(9)),
        "{calls}"
    );
    // The stats count what the store holds.
    assert_eq!(
        stats["records"]["dataverse/contact"], 5,
        "{}",
        stats["records"]
    );
}

#[tokio::test]
async fn dataverse_table_without_bulk_messages() {
    let dir = tempfile::tempdir().unwrap();
    let config = config_with(
        dir.path(),
        &[("bulk_messages = true", "bulk_messages = false")],
    );
    let e = Emulator::with_config(&config, &[]).await;
    let t = e.dv_token().await;
    let (status, _, body) = upsert_multiple(&e, &t, json!([dv_target("x-1", json!({}))])).await;
    assert_eq!(
        (
            status.as_u16(),
            body["error"]["code"].as_str(),
            body["error"]["message"].as_str()
        ),
        (
            400,
            Some("0x80040800"),
            Some(
                "The 'UpsertMultiple' method does not support entities of type 'contact'. MessageProcessorCache returned MessageProcessor.Empty."
            )
        )
    );
    assert!(dv_rows(&e).await.is_empty());
    // Single requests still work; other actions and tables answer as the service would.
    let patch = e
        .req(
            Method::PATCH,
            &format!("{DV}/contacts(trusst_contact_id='x-1')"),
        )
        .bearer_auth(&t)
        .json(&json!({}));
    assert_eq!(send(patch).await.0, 204);
    let other = e
        .req(
            Method::POST,
            &format!("{DV}/contacts/Microsoft.Dynamics.CRM.UpdateMultiple"),
        )
        .bearer_auth(&t)
        .json(&json!({"Targets": []}));
    assert_eq!(send(other).await.0, 501);
    let unknown = e
        .req(
            Method::POST,
            &format!("{DV}/accounts/Microsoft.Dynamics.CRM.UpsertMultiple"),
        )
        .bearer_auth(&t)
        .json(&json!({"Targets": []}));
    let (status, _, body) = send(unknown).await;
    assert_eq!(
        (status.as_u16(), body["error"]["code"].as_str()),
        (404, Some("0x8006088a"))
    );
}

#[tokio::test]
async fn dataverse_discovery_definitions_and_create() {
    let e = Emulator::start(&[]).await;
    let (status, _, doc) = send(e.req(
        Method::GET,
        "/trusst-tenant/v2.0/.well-known/openid-configuration",
    ))
    .await;
    assert_eq!(status, 200);
    let token_url = format!("{}/trusst-tenant/oauth2/v2.0/token", e.base);
    assert_eq!(doc["token_endpoint"], token_url);
    for k in ["authorization_endpoint", "issuer", "jwks_uri"] {
        assert!(doc[k].as_str().unwrap().starts_with(&e.base), "{k}: {doc}");
    }
    let (status, _, body) = send(
        e.http
            .post(doc["token_endpoint"].as_str().unwrap())
            .form(&dv_form("trusst-dv-secret")),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let t = body["access_token"].as_str().unwrap().to_owned();
    // The document offers client_secret_basic too.
    let (status, _, body) = send(
        e.http
            .post(&token_url)
            .basic_auth("trusst-dv-client", Some("trusst-dv-secret"))
            .form(&[
                ("grant_type", "client_credentials"),
                ("scope", "https://trusst.crm.dynamics.com/.default"),
            ]),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (status, _, body) = send(e.req(
        Method::GET,
        "/other-tenant/v2.0/.well-known/openid-configuration",
    ))
    .await;
    assert_eq!(
        (status.as_u16(), body["error"].as_str()),
        (400, Some("invalid_tenant"))
    );

    let get = |path: String| {
        let req = e.req(Method::GET, &path).bearer_auth(&t);
        async move { send(req).await }
    };
    let (status, _, body) = get(format!(
        "{DV}/EntityDefinitions?%24select=LogicalName%2CEntitySetName%2CPrimaryIdAttribute&%24filter=LogicalName+eq+%27contact%27"
    ))
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["value"],
        json!([{"LogicalName": "contact", "EntitySetName": "contacts", "PrimaryIdAttribute": "contactid"}])
    );
    let (_, _, body) = get(format!(
        "{DV}/EntityDefinitions?$select=LogicalName&$filter=LogicalName eq 'account'"
    ))
    .await;
    assert_eq!(body["value"], json!([]));
    let (_, _, body) = get(format!(
        "{DV}/EntityDefinitions(LogicalName='contact')?$select=LogicalName,EntitySetName"
    ))
    .await;
    assert_eq!(
        (
            body["EntitySetName"].as_str(),
            body.get("PrimaryIdAttribute")
        ),
        (Some("contacts"), None)
    );
    let (_, _, body) = get(format!(
        "{DV}/EntityDefinitions(LogicalName='contact')/Keys"
    ))
    .await;
    assert_eq!(
        (
            body["value"][0]["KeyAttributes"].clone(),
            body["value"][0]["EntityKeyIndexStatus"].as_str()
        ),
        (json!(["trusst_contact_id"]), Some("Active"))
    );

    // The collection cast lists the choice columns only, with their options when expanded.
    let picklists = format!(
        "{DV}/EntityDefinitions(LogicalName='contact')/Attributes/Microsoft.Dynamics.CRM.PicklistAttributeMetadata?$select=LogicalName"
    );
    let (status, _, body) = get(format!("{picklists}&$expand=OptionSet($select=Options)")).await;
    assert_eq!(status, 200, "{body}");
    let value = body["value"].as_array().unwrap();
    let names: Vec<&str> = value
        .iter()
        .map(|a| a["LogicalName"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["call_direction", "call_outcome", "customer_sentiment"]
    );
    let outcome = &value[1]["OptionSet"]["Options"];
    let good = outcome
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["Label"]["LocalizedLabels"][0]["Label"] == "Good")
        .unwrap();
    assert_eq!(good["Value"], 100000001);
    let (_, _, body) = get(picklists).await;
    assert!(body["value"][0].get("OptionSet").is_none(), "{body}");

    // Create: 204 with the new record's URL; the key is then taken.
    let post = |body: Value| {
        e.req(Method::POST, &format!("{DV}/contacts"))
            .bearer_auth(&t)
            .json(&body)
    };
    let (status, headers, _) =
        send(post(json!({"trusst_contact_id": "p-1", "agentid": "x"}))).await;
    assert_eq!(status, 204);
    let entity = header(&headers, "odata-entityid");
    let guid = entity
        .strip_prefix(&format!("{}{DV}/contacts(", e.base))
        .and_then(|g| g.strip_suffix(')'))
        .unwrap_or_else(|| panic!("{entity}"));
    assert_eq!(guid.len(), 36);
    let (_, _, rec) = get(format!("{DV}/contacts({guid})")).await;
    assert_eq!(
        (rec["trusst_contact_id"].as_str(), rec["agentid"].as_str()),
        (Some("p-1"), Some("x"))
    );
    let (status, _, body) = send(post(json!({"trusst_contact_id": "p-1"}))).await;
    assert_eq!(
        (status.as_u16(), body["error"]["code"].as_str()),
        (412, Some("0x80040237"))
    );
    let (status, headers, _) = send(
        e.req(
            Method::PATCH,
            &format!("{DV}/contacts(trusst_contact_id='p-1')"),
        )
        .bearer_auth(&t)
        .json(&json!({"agentid": "y"})),
    )
    .await;
    assert_eq!(
        (status.as_u16(), header(&headers, "odata-entityid")),
        (204, entity)
    );
    let chosen = "00000000-0000-4000-8000-0000000000aa";
    let (status, _, body) = send(
        post(json!({"contactid": chosen, "quality_score": 3}))
            .header("Prefer", "return=representation"),
    )
    .await;
    assert_eq!(
        (
            status.as_u16(),
            body["contactid"].as_str(),
            body["quality_score"].as_i64()
        ),
        (201, Some(chosen), Some(3))
    );
    let rows = e
        .admin(Method::GET, "records/dataverse/contact", None)
        .await;
    assert_eq!(rows.as_array().unwrap().len(), 2);
}

/// A file of the test CA folder `.run/tls`, made by `scripts/services.sh tls-certs` when missing.
fn tls_file(name: &str) -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = root.join(".run/tls");
    if !dir.join("server.pem").exists() {
        let status = std::process::Command::new(root.join("scripts/services.sh"))
            .arg("tls-certs")
            .status()
            .expect("run scripts/services.sh tls-certs");
        assert!(status.success(), "scripts/services.sh tls-certs failed");
    }
    dir.join(name)
}

#[tokio::test]
async fn the_emulator_serves_https() {
    let (cert, key) = (tls_file("server.pem"), tls_file("server.key"));
    let flags = [
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
    ];
    let mut e = Emulator::start(&flags).await;
    assert!(e.base.starts_with("https://127.0.0.1:"), "{}", e.base);
    let ca = reqwest::Certificate::from_pem(&std::fs::read(tls_file("ca.pem")).unwrap()).unwrap();
    e.http = reqwest::Client::builder()
        .add_root_certificate(ca)
        .build()
        .unwrap();
    assert_eq!(send(e.req(Method::GET, "/health")).await.0, 200);

    // Every URL handed out is https.
    let form = [
        ("grant_type", "client_credentials"),
        ("client_id", "trusst-sf-client"),
        ("client_secret", "trusst-sf-secret"),
    ];
    let (_, _, body) = send(e.req(Method::POST, "/services/oauth2/token").form(&form)).await;
    assert_eq!(body["instance_url"], e.base);
    let t = e.dv_token().await;
    let (status, headers, _) = send(
        e.req(
            Method::PATCH,
            &format!("{DV}/contacts(trusst_contact_id='s-1')"),
        )
        .bearer_auth(&t)
        .json(&json!({})),
    )
    .await;
    assert_eq!(status, 204);
    assert!(header(&headers, "odata-entityid").starts_with("https://127.0.0.1:"));
    let (_, _, doc) = send(e.req(
        Method::GET,
        "/trusst-tenant/v2.0/.well-known/openid-configuration",
    ))
    .await;
    assert!(
        doc["token_endpoint"]
            .as_str()
            .unwrap()
            .starts_with("https://")
    );

    // A client that does not trust the test CA, or speaks plain HTTP, gets nowhere.
    assert!(reqwest::get(e.url("/health")).await.is_err());
    assert!(
        reqwest::get(e.url("/health").replacen("https://", "http://", 1))
            .await
            .is_err()
    );
}

#[test]
fn unusable_tls_files_stop_the_emulator() {
    let ca = tls_file("ca.pem");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_trusst-cdc"))
        .args(["crm-emulator", "--listen", "127.0.0.1:0", "--config"])
        .arg(shipped_config())
        .args(["--tls-cert", "/nonexistent/cert.pem", "--tls-key"])
        .arg(&ca)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--tls-cert /nonexistent/cert.pem"), "{err}");
    // The CA's certificate with the server's key is no pair.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_trusst-cdc"))
        .args(["crm-emulator", "--listen", "127.0.0.1:0", "--config"])
        .arg(shipped_config())
        .arg("--tls-cert")
        .arg(&ca)
        .arg("--tls-key")
        .arg(tls_file("server.key"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("do not make a usable pair"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn mule_payload() -> Value {
    json!({"source": "trusst-platform", "sync_timestamp": "2025-03-01T10:00:00", "contacts": [
        {"trusst_contact_id": "m-1", "external_id": "ext-1", "call_date": "2025-03-01T09:00:00", "call_start_time": "2025-03-01T09:00:05",
         "direction": "inbound", "contact_agent_id": "ag", "s3_agent_id": null, "conn_id": null,
         "universal_questions": [{"question_key": "agent_identified", "question_text": "Did the agent identify themselves?", "result_type": "Boolean", "result": "true"}]},
        {"external_id": "no-id", "universal_questions": []},
        {"trusst_contact_id": "m-3", "universal_questions": [{"question_key": "q", "question_text": "?", "result_type": "Score", "result": "1"}]},
    ]})
}

#[tokio::test]
async fn mulesoft_client_id_enforcement_and_per_record_failures() {
    let e = Emulator::start(&[]).await;
    let path = "/api/trusst-crm-sync";
    let with_headers = || {
        e.req(Method::POST, path)
            .header("client_id", "trusst-mule-client")
            .header("client_secret", "trusst-mule-secret")
    };
    let (status, _, body) = send(with_headers().json(&mule_payload())).await;
    assert_eq!(status, 200);
    assert_eq!(
        (
            body["records_processed"].as_u64(),
            body["records_failed"].as_u64()
        ),
        (Some(1), Some(2))
    );
    assert_eq!(body["errors"][0]["trusst_contact_id"], Value::Null);
    assert_eq!(body["errors"][1]["trusst_contact_id"], "m-3");
    assert!(
        body["errors"][1]["message"]
            .as_str()
            .unwrap()
            .contains("Score")
    );

    let basic = e
        .req(Method::GET, &format!("{path}/m-1"))
        .basic_auth("trusst-mule-client", Some("trusst-mule-secret"));
    let (status, _, stored) = send(basic).await;
    assert_eq!(status, 200);
    assert_eq!(stored, mule_payload()["contacts"][0]);
    let absent = e
        .req(Method::GET, &format!("{path}/m-3"))
        .basic_auth("trusst-mule-client", Some("trusst-mule-secret"));
    assert_eq!(send(absent).await.0, 404);

    let wrong = e
        .req(Method::POST, path)
        .header("client_id", "trusst-mule-client")
        .header("client_secret", "nope");
    let (status, _, body) = send(wrong.json(&mule_payload())).await;
    assert_eq!(
        (status.as_u16(), body),
        (401, json!({"error": "Authentication denied"}))
    );

    e.admin(
        Method::POST,
        "faults",
        Some(json!({"mulesoft": {"burst_429": 1}})),
    )
    .await;
    let (status, headers, _) = send(with_headers().json(&mule_payload())).await;
    assert_eq!(status, 429);
    assert_eq!(header(&headers, "x-ratelimit-reset"), "1000");
    assert_eq!(header(&headers, "x-ratelimit-remaining"), "0");
    assert!(!header(&headers, "x-ratelimit-limit").is_empty());
    assert_eq!(send(with_headers().json(&mule_payload())).await.0, 200);
}

#[tokio::test]
async fn mulesoft_oauth_enforcement() {
    let dir = tempfile::tempdir().unwrap();
    let config = config_with(
        dir.path(),
        &[(r#"auth = "client_id""#, r#"auth = "oauth""#)],
    );
    let e = Emulator::with_config(&config, &[]).await;
    let form = [
        ("grant_type", "client_credentials"),
        ("client_id", "trusst-mule-client"),
        ("client_secret", "trusst-mule-secret"),
    ];
    let (status, _, token) = send(e.req(Method::POST, "/mulesoft/oauth2/token").form(&form)).await;
    assert_eq!(
        (status.as_u16(), token["token_type"].as_str()),
        (200, Some("Bearer"))
    );
    let t = token["access_token"].as_str().unwrap();
    let (status, _, body) = send(
        e.req(Method::POST, "/api/trusst-crm-sync")
            .bearer_auth(t)
            .json(&mule_payload()),
    )
    .await;
    assert_eq!(
        (status.as_u16(), body["records_processed"].as_u64()),
        (200, Some(1))
    );
    let headers_only = e
        .req(Method::POST, "/api/trusst-crm-sync")
        .header("client_id", "trusst-mule-client")
        .header("client_secret", "trusst-mule-secret");
    assert_eq!(send(headers_only.json(&mule_payload())).await.0, 401);
    let bad = [
        ("grant_type", "client_credentials"),
        ("client_id", "trusst-mule-client"),
        ("client_secret", "x"),
    ];
    assert_eq!(
        send(e.req(Method::POST, "/mulesoft/oauth2/token").form(&bad))
            .await
            .0,
        401
    );
}

#[tokio::test]
async fn faults_admin_api() {
    let e = Emulator::start(&["--latency-ms", "200", "--seed", "3"]).await;
    let faults = e.admin(Method::GET, "faults", None).await;
    assert_eq!(
        (faults["latency_ms"].as_u64(), faults["seed"].as_u64()),
        (Some(200), Some(3))
    );
    let t = e.sf_token().await;
    let started = Instant::now();
    assert_eq!(
        send(e.req(Method::GET, &format!("{SF}/limits/")).bearer_auth(&t))
            .await
            .0,
        200
    );
    assert!(started.elapsed() >= Duration::from_millis(200));

    let res = e
        .req(Method::POST, "/__admin/faults")
        .json(&json!({"rate429": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 400, "a typo is refused");
    let faults = e
        .admin(
            Method::POST,
            "faults",
            Some(json!({"latency_ms": null, "salesforce": {"rate_503": 1.0}, "mulesoft": {"drop_rate": 1.0}})),
        )
        .await;
    assert_eq!(
        (faults["latency_ms"].clone(), faults["seed"].as_u64()),
        (Value::Null, Some(3)),
        "a merge patch"
    );

    let (status, _, body) =
        send(e.req(Method::GET, &format!("{SF}/limits/")).bearer_auth(&t)).await;
    assert_eq!(
        (status.as_u16(), body[0]["errorCode"].as_str()),
        (503, Some("SERVER_UNAVAILABLE"))
    );
    let dropped = e
        .req(Method::POST, "/api/trusst-crm-sync")
        .basic_auth("trusst-mule-client", Some("trusst-mule-secret"))
        .json(&mule_payload());
    assert!(
        dropped.send().await.is_err(),
        "the connection is closed without a response"
    );

    let stats = e.admin(Method::GET, "stats", None).await;
    assert_eq!(stats["injected"]["salesforce"]["503"], 1);
    assert_eq!(stats["injected"]["mulesoft"]["drop"], 1);
    assert_eq!(
        stats["calls"]["salesforce"]["GET /services/data/{version}/limits/"]["200"],
        1
    );
    assert_eq!(stats["tokens_issued"]["salesforce"], 1);

    e.admin(Method::DELETE, "faults", None).await;
    assert_eq!(
        send(e.req(Method::GET, &format!("{SF}/limits/")).bearer_auth(&t))
            .await
            .0,
        200
    );
    e.admin(Method::POST, "reset", None).await;
    let stats = e.admin(Method::GET, "stats", None).await;
    assert_eq!(
        (
            stats["calls"].clone(),
            stats["salesforce_api_usage"]["used"].as_u64()
        ),
        (json!({}), Some(0))
    );
}

#[tokio::test]
async fn state_file_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.json");
    let args = ["--state-file", state.to_str().unwrap()];
    let first_id = {
        let e = Emulator::start(&args).await;
        let t = e.sf_token().await;
        let (_, _, r) = send(
            e.req(Method::PATCH, &format!("{SF}/sobjects/Contact/{EXT}/s-1"))
                .bearer_auth(&t)
                .json(&json!({"Agent_ID__c": "a"})),
        )
        .await;
        let dv = e.dv_token().await;
        send(
            e.req(
                Method::PATCH,
                &format!("{DV}/contacts(trusst_contact_id='s-1')"),
            )
            .bearer_auth(&dv)
            .json(&json!({"agentid": "b"})),
        )
        .await;
        let mule = e
            .req(Method::POST, "/api/trusst-crm-sync")
            .basic_auth("trusst-mule-client", Some("trusst-mule-secret"));
        send(mule.json(&mule_payload())).await;
        r["id"].as_str().unwrap().to_owned()
    };
    assert!(state.exists());
    let e = Emulator::start(&args).await;
    let t = e.sf_token().await;
    let (status, _, r) = send(
        e.req(Method::GET, &format!("{SF}/sobjects/Contact/{EXT}/s-1"))
            .bearer_auth(&t),
    )
    .await;
    assert_eq!(
        (status.as_u16(), r["Agent_ID__c"].as_str(), r["Id"].as_str()),
        (200, Some("a"), Some(first_id.as_str()))
    );
    let (_, _, r2) = send(
        e.req(Method::PATCH, &format!("{SF}/sobjects/Contact/{EXT}/s-2"))
            .bearer_auth(&t)
            .json(&json!({})),
    )
    .await;
    assert_ne!(r2["id"], r["Id"], "ids are not reused after a restart");
    let dv = e
        .admin(Method::GET, "records/dataverse/contact", None)
        .await;
    assert_eq!(dv[0]["agentid"], "b");
    let mule = e
        .admin(Method::GET, "records/mulesoft/contacts", None)
        .await;
    assert_eq!(mule[0]["trusst_contact_id"], "m-1");
}
