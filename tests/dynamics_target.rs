//! The Dataverse client against a scripted Web API: token handling, the metadata checks of
//! `prepare`, the `UpsertMultiple` upsert and its fallback to `$batch`, the `$batch` upsert and
//! delete, and the answers that must be retried; then the same against the CRM emulator.

mod crm_mock;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use crm_mock::{Mock, Reply, Seen, token_reply};
use serde_json::json;
use trusst_cdc::error::Fault;
use trusst_cdc::event::ContactEvent;
use trusst_cdc::sink::dynamics::{Config, Dynamics};
use trusst_cdc::sink::http::Secret;
use trusst_cdc::sink::mapping::{Mapping, MappingConfig, Record, TargetKind};
use trusst_cdc::sink::{Outcome, Target};

fn attributes() -> serde_json::Value {
    let a = |n: &str, t: &str| json!({"LogicalName": n, "AttributeType": t});
    json!({"value": [
        a("trusst_contact_id", "String"), a("external_id", "String"), a("calldate", "DateTime"),
        a("call_start_time", "DateTime"), a("call_direction", "Picklist"), a("agentid", "String"),
        a("s3_agent_id", "String"), a("connection_id", "String"), a("agent_identified", "Boolean"),
        a("quality_score", "Integer"), a("call_outcome", "Picklist"), a("sentiment", "Picklist"),
        a("gendercode", "Picklist"),
    ]})
}

fn options(labels: &[(&str, i64)], global: bool) -> serde_json::Value {
    let set = json!({"Options": labels.iter().map(|(l, v)| json!({"Value": v, "Label": {"UserLocalizedLabel": {"Label": l}}})).collect::<Vec<_>>()});
    if global {
        json!({"OptionSet": null, "GlobalOptionSet": set})
    } else {
        json!({"OptionSet": set, "GlobalOptionSet": null})
    }
}

/// The record ids of a `$batch` request body, with their methods, in order.
fn batch_requests(body: &str) -> Vec<(String, String)> {
    body.lines()
        .filter(|l| l.ends_with(" HTTP/1.1\r") || l.ends_with(" HTTP/1.1"))
        .map(|l| {
            let method = l.split(' ').next().unwrap().to_owned();
            let id = l
                .split("='")
                .nth(1)
                .and_then(|r| r.split("')").next())
                .unwrap_or("")
                .to_owned();
            (method, id)
        })
        .collect()
}

fn batch_reply(parts: &[(u16, &str, String)]) -> Reply {
    let mut body = String::new();
    for (status, extra, content) in parts {
        body.push_str(&format!(
            "--batchresponse_x\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n\r\nHTTP/1.1 {status} S\r\n{extra}\r\n{content}\r\n"
        ));
    }
    body.push_str("--batchresponse_x--\r\n");
    Reply {
        status: 200,
        headers: vec![(
            "content-type".into(),
            "multipart/mixed; boundary=batchresponse_x".into(),
        )],
        body,
    }
}

/// How the scripted Dataverse answers `UpsertMultiple`.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Bulk {
    /// Not at all (404, as a service without the action).
    Missing,
    /// 204, or for a chunk with a record whose id contains `bad` the table's 400 (nothing
    /// written), `throttle` 429, `forbidden` 403.
    Supported,
    /// The error of a table without the message.
    Unsupported,
}

/// A scripted Dataverse without `UpsertMultiple`: see [`dataverse_with`].
async fn dataverse() -> Mock {
    dataverse_with(Bulk::Missing).await
}

/// The record ids named by the `@odata.id`s of an `UpsertMultiple` body, in order.
fn targets(body: &str) -> Vec<String> {
    let v: serde_json::Value = serde_json::from_str(body).unwrap();
    v["Targets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            let id = t["@odata.id"].as_str().unwrap();
            id.split("='")
                .nth(1)
                .unwrap()
                .trim_end_matches("')")
                .to_owned()
        })
        .collect()
}

/// A scripted Dataverse: the first `$batch` is refused with 401 (an expired token); records
/// whose id contains `bad` are rejected, `throttle` throttled, `gone` are missing on delete;
/// a batch containing `whole429` is refused as a whole. `UpsertMultiple` answers as `bulk` says.
async fn dataverse_with(bulk: Bulk) -> Mock {
    let tokens = Arc::new(AtomicUsize::new(0));
    let expire_once = Arc::new(AtomicBool::new(true));
    Mock::start(move |r: &Seen| {
        let t = r.target.as_str();
        if t.ends_with("/oauth2/v2.0/token") {
            if r.body.contains("client_secret=wrong") {
                return Reply::json(401, json!({"error":"invalid_client","error_description":"AADSTS7000215: Invalid client secret provided."}));
            }
            return token_reply(tokens.fetch_add(1, Ordering::SeqCst) + 1);
        }
        if !r.header("authorization").starts_with("Bearer tok-") {
            return Reply::json(401, json!({"error":{"code":"0x80072243","message":"no token"}}));
        }
        if t.ends_with("/contacts/Microsoft.Dynamics.CRM.UpsertMultiple") && bulk != Bulk::Missing {
            if bulk == Bulk::Unsupported {
                return Reply::json(400, json!({"error":{"code":"0x80040800","message":"The 'UpsertMultiple' method does not support entities of type 'contact'. MessageProcessorCache returned MessageProcessor.Empty."}}));
            }
            let ids = targets(&r.body);
            if ids.iter().any(|id| id.contains("throttle")) {
                return Reply::json(429, json!({"error":{"code":"0x80072322","message":"Number of requests exceeded the limit of 6000 over time window of 300 seconds."}})).with("Retry-After", "3");
            }
            if ids.iter().any(|id| id.contains("forbidden")) {
                return Reply::json(403, json!({"error":{"code":"0x80040220","message":"Principal user is missing prvWriteContact privilege"}}));
            }
            if ids.iter().any(|id| id.contains("bad")) {
                return Reply::json(400, json!({"error":{"code":"0x80040203","message":"Invalid value"}}));
            }
            return Reply {
                status: 204,
                headers: vec![("odata-version".into(), "4.0".into())],
                body: String::new(),
            };
        }
        if t.contains("/$batch") {
            if expire_once.swap(false, Ordering::SeqCst) {
                return Reply::json(401, json!({"error":{"code":"0x80072243","message":"token expired"}}));
            }
            if r.body.contains("whole429") {
                return Reply::json(429, json!({"error":{"code":"0x80072322","message":"Number of requests exceeded"}})).with("Retry-After", "5");
            }
            let parts: Vec<(u16, &str, String)> = batch_requests(&r.body)
                .into_iter()
                .map(|(method, id)| {
                    if id.contains("bad") {
                        (400, "Content-Type: application/json\r\n", r#"{"error":{"code":"0x80040203","message":"Invalid value"}}"#.to_owned())
                    } else if id.contains("throttle") {
                        (429, "Retry-After: 2\r\n", r#"{"error":{"code":"0x80072321","message":"Combined execution time"}}"#.to_owned())
                    } else if method == "DELETE" && id.contains("gone") {
                        (404, "", r#"{"error":{"code":"0x80040217","message":"Does Not Exist"}}"#.to_owned())
                    } else {
                        (204, "OData-EntityId: x\r\n", String::new())
                    }
                })
                .collect();
            return batch_reply(&parts);
        }
        if t.contains("/Attributes?") {
            return Reply::json(200, attributes());
        }
        if t.contains("EntityDefinitions(LogicalName='contact')?") {
            return Reply::json(200, json!({"LogicalName":"contact","EntitySetName":"contacts"}));
        }
        if t.contains("/Keys?") {
            return Reply::json(200, json!({"value":[{"LogicalName":"trusst_key","KeyAttributes":["trusst_contact_id"],"EntityKeyIndexStatus":"Active"}]}));
        }
        if t.contains("Attributes(LogicalName='call_direction')/Microsoft.Dynamics.CRM.PicklistAttributeMetadata") {
            return Reply::json(200, options(&[("inbound", 100000000), ("outbound", 100000001)], false));
        }
        if t.contains("Attributes(LogicalName='call_outcome')/") {
            return Reply::json(200, options(&[("Good", 1), ("Poor", 2)], true));
        }
        if t.contains("Attributes(LogicalName='sentiment')/") {
            return Reply::json(200, options(&[("Positive", 7)], false));
        }
        // Includes the one-request listing of all choice columns: the client must fall back.
        Reply::json(404, json!({"error":{"code":"0x80060888","message":"Resource not found"}}))
    })
    .await
}

fn config(mock: &Mock, secret: &str) -> Config {
    Config {
        url: mock.url.clone(),
        tenant: "contoso".into(),
        token_url: Some(format!("{}/contoso/oauth2/v2.0/token", mock.url)),
        client_id: "app-id".into(),
        client_secret: Secret {
            value: Some(secret.into()),
            ..Default::default()
        },
        scope: None,
        batch_size: 1000,
        upsert_multiple: true,
        request_timeout: Duration::from_secs(10),
    }
}

fn record(id: &str) -> Record {
    let mut fields = serde_json::Map::new();
    fields.insert("trusst_contact_id".into(), id.into());
    fields.insert("quality_score".into(), 8.into());
    Record::new(id, fields)
}

fn event() -> ContactEvent {
    serde_json::from_value(json!({
        "schema_version": 1, "event_id": "e", "op": "upsert", "trusst_contact_id": "c-1",
        "external_id": "ext", "stream_id": null, "call_date": "2025-01-15T14:23:10", "call_start_time": null,
        "direction": "outbound", "contact_agent_id": "a", "s3_agent_id": null, "conn_id": "REC-1",
        "universal_questions": [
            {"question_id": "q1", "question_key": "call_outcome", "question_text": null, "result_type": "Label", "question_group": null, "result": "Poor", "inference_updated_at": null},
            {"question_id": "q3", "question_key": "quality_score", "question_text": null, "result_type": "Rating", "question_group": null, "result": "9", "inference_updated_at": null}
        ],
        "source": {"lsn": "0/1", "reason": "stream"}
    }))
    .unwrap()
}

async fn prepared(mock: &Mock) -> (Dynamics, Mapping) {
    let cfg: MappingConfig =
        trusst_cdc::config::parse("[questions.call_outcome]\n[questions.quality_score]\n").unwrap();
    let mut mapping = Mapping::new(TargetKind::Dynamics, &cfg);
    let mut d = Dynamics::new(&config(mock, "right")).unwrap();
    d.prepare(&mut mapping).await.unwrap();
    (d, mapping)
}

#[tokio::test]
async fn prepare_fills_choice_labels_from_metadata() {
    let mock = dataverse().await;
    let (_, mapping) = prepared(&mock).await;
    let r = mapping.map(&event()).unwrap();
    assert_eq!(r.fields["call_direction"], 100000001);
    // A configured question without a type, whose column is a global choice.
    assert_eq!(r.fields["call_outcome"], 2);
    assert_eq!(r.fields["quality_score"], 9);
    let seen = mock.seen();
    let token = seen.iter().find(|s| s.target.ends_with("/token")).unwrap();
    let form = crm_mock::form(&token.body);
    for kv in [
        ("grant_type", "client_credentials"),
        ("client_id", "app-id"),
        ("client_secret", "right"),
    ] {
        assert!(
            form.contains(&(kv.0.to_owned(), kv.1.to_owned())),
            "{form:?}"
        );
    }
    assert!(
        form.contains(&("scope".to_owned(), format!("{}/.default", mock.url))),
        "{form:?}"
    );
    let attrs = seen
        .iter()
        .find(|s| s.target.contains("/Attributes?"))
        .unwrap();
    assert_eq!(attrs.header("odata-version"), "4.0");
    assert_eq!(attrs.header("odata-maxversion"), "4.0");
    assert_eq!(attrs.header("accept"), "application/json");
    // Every readable choice column's options are known, for Label questions the config does
    // not list.
    assert!(
        mapping.option_sets.contains_key("sentiment"),
        "{:?}",
        mapping.option_sets.keys()
    );
}

#[tokio::test]
async fn an_unlisted_label_question_maps_with_its_columns_options() {
    let mock = dataverse().await;
    let (mut d, mapping) = prepared(&mock).await;
    let mut e = event();
    e.universal_questions.push(serde_json::from_value(json!(
        {"question_id": "q4", "question_key": "sentiment", "question_text": null, "result_type": "Label", "question_group": null, "result": "Positive", "inference_updated_at": null}
    )).unwrap());
    assert_eq!(mapping.map(&e).unwrap().fields["sentiment"], 7);
    // The lazy path reads the same options.
    assert_eq!(
        d.resolve_option_set("sentiment")
            .await
            .unwrap()
            .get("Positive"),
        Some(&7)
    );
    // A label the column does not have is a mapping error naming the column.
    e.universal_questions.last_mut().unwrap().result = Some("Ecstatic".into());
    assert!(
        mapping
            .map(&e)
            .unwrap_err()
            .reason
            .contains("column sentiment")
    );
}

#[tokio::test]
async fn prepare_names_missing_columns_and_their_config_keys() {
    let mock = dataverse().await;
    let cfg: MappingConfig = trusst_cdc::config::parse(
        "[questions.nps]\nfield = \"nps_col\"\n[fields]\nconn_id = \"conn\"\n",
    )
    .unwrap();
    let mut mapping = Mapping::new(TargetKind::Dynamics, &cfg);
    let mut d = Dynamics::new(&config(&mock, "right")).unwrap();
    let e = d.prepare(&mut mapping).await.unwrap_err();
    assert_eq!(e.fault, Fault::User);
    assert!(
        e.message().contains("no column 'nps_col'")
            && e.message().contains("[mapping.questions.nps] field"),
        "{e}"
    );
    assert!(
        e.message().contains("no column 'conn'")
            && e.message().contains("[mapping.fields] conn_id"),
        "{e}"
    );
    // A wrong entity set and a missing alternate key are caught before any write.
    let cfg: MappingConfig = trusst_cdc::config::parse("entity_set = \"contactz\"\n").unwrap();
    let e = d
        .prepare(&mut Mapping::new(TargetKind::Dynamics, &cfg))
        .await
        .unwrap_err();
    assert!(e.message().contains("set entity_set = \"contacts\""), "{e}");
    let cfg: MappingConfig =
        trusst_cdc::config::parse("external_id_field = \"external_id\"\n").unwrap();
    let e = d
        .prepare(&mut Mapping::new(TargetKind::Dynamics, &cfg))
        .await
        .unwrap_err();
    assert!(
        e.message()
            .contains("no alternate key on the column 'external_id'"),
        "{e}"
    );
}

#[tokio::test]
async fn bad_credentials_fail_prepare_clearly() {
    let mock = dataverse().await;
    let mut d = Dynamics::new(&config(&mock, "wrong")).unwrap();
    let e = d
        .prepare(&mut Mapping::new(
            TargetKind::Dynamics,
            &MappingConfig::default(),
        ))
        .await
        .unwrap_err();
    assert_eq!(e.fault, Fault::User);
    assert!(
        e.message().contains("AADSTS7000215") && e.message().contains("[dynamics] client_id"),
        "{e}"
    );
    assert!(!e.to_string().contains("wrong"));
}

#[tokio::test]
async fn upsert_batches_on_the_alternate_key_and_reports_per_record() {
    let mock = dataverse().await;
    let (mut d, mapping) = prepared(&mock).await;
    let out = d
        .upsert(
            &mapping,
            &[record("c-1"), record("c-bad"), record("O'Brien")],
        )
        .await
        .unwrap();
    assert_eq!(
        out,
        [
            Outcome::Written,
            Outcome::Rejected("0x80040203: Invalid value".into()),
            Outcome::Written
        ]
    );

    let seen = mock.seen();
    let batches: Vec<&Seen> = seen
        .iter()
        .filter(|s| s.target.ends_with("/$batch"))
        .collect();
    // The first was refused with 401; a new token was fetched and the batch sent again.
    assert_eq!(batches.len(), 2);
    assert_eq!(
        seen.iter().filter(|s| s.target.ends_with("/token")).count(),
        2
    );
    let b = batches[1];
    assert_eq!(b.header("authorization"), "Bearer tok-2");
    assert_eq!(b.header("prefer"), "odata.continue-on-error");
    assert_eq!(b.header("odata-version"), "4.0");
    let ct = b.header("content-type");
    let boundary = ct.strip_prefix("multipart/mixed; boundary=").unwrap();
    assert!(boundary.starts_with("batch_"));
    assert!(b.body.starts_with(&format!(
        "--{boundary}\r\nContent-Type: application/http\r\n"
    )));
    assert!(b.body.ends_with(&format!("--{boundary}--\r\n")));
    assert!(!b.body.contains("changeset"));
    assert!(b.body.contains(&format!(
        "PATCH {}/api/data/v9.2/contacts(trusst_contact_id='O''Brien') HTTP/1.1\r\n",
        mock.url
    )));
    // The key is in the URL, not in the body.
    assert!(b.body.contains("\r\n\r\n{\"quality_score\":8}\r\n--"));
    assert!(!b.body.contains("\"trusst_contact_id\""));
}

#[tokio::test]
async fn throttled_parts_and_requests_are_retryable_with_their_wait() {
    let mock = dataverse().await;
    let (mut d, mapping) = prepared(&mock).await;
    let _ = d.upsert(&mapping, &[record("warm-up")]).await; // spends the scripted 401
    let e = d
        .upsert(&mapping, &[record("c-1"), record("c-throttle")])
        .await
        .unwrap_err();
    assert!(e.retryable);
    assert_eq!(e.retry_after, Some(Duration::from_secs(2)));
    let e = d.upsert(&mapping, &[record("whole429")]).await.unwrap_err();
    assert!(e.retryable);
    assert_eq!(e.retry_after, Some(Duration::from_secs(5)));
}

#[tokio::test]
async fn delete_counts_missing_records_as_deleted() {
    let mock = dataverse().await;
    let (mut d, mapping) = prepared(&mock).await;
    let out = d
        .delete(&mapping, &["c-1".into(), "c-gone".into(), "c-bad".into()])
        .await
        .unwrap();
    assert_eq!(
        out,
        [
            Outcome::Written,
            Outcome::Written,
            Outcome::Rejected("0x80040203: Invalid value".into())
        ]
    );
    let last = mock
        .seen()
        .into_iter()
        .rev()
        .find(|s| s.target.ends_with("/$batch"))
        .unwrap();
    assert!(last.body.contains(&format!(
        "DELETE {}/api/data/v9.2/contacts(trusst_contact_id='c-gone') HTTP/1.1\r\n",
        mock.url
    )));
}

#[tokio::test]
async fn large_inputs_are_split_into_batches_of_batch_size() {
    let mock = dataverse().await;
    let cfg: MappingConfig = trusst_cdc::config::parse("").unwrap();
    let mut mapping = Mapping::new(TargetKind::Dynamics, &cfg);
    let mut c = config(&mock, "right");
    c.batch_size = 2;
    let mut d = Dynamics::new(&c).unwrap();
    d.prepare(&mut mapping).await.unwrap();
    let recs: Vec<Record> = (0..5).map(|i| record(&format!("c-{i}"))).collect();
    let out = d.upsert(&mapping, &recs).await.unwrap();
    assert_eq!(out, vec![Outcome::Written; 5]);
    let sizes: Vec<usize> = mock
        .seen()
        .iter()
        .filter(|s| s.target.ends_with("/$batch") && s.header("authorization") == "Bearer tok-2")
        .map(|s| batch_requests(&s.body).len())
        .collect();
    assert_eq!(sizes, [2, 2, 1]);
}

/// The requests whose URL ends with `suffix`, in order.
fn requests_to(mock: &Mock, suffix: &str) -> Vec<Seen> {
    mock.seen()
        .into_iter()
        .filter(|s| s.target.ends_with(suffix))
        .collect()
}

const UPSERT_MULTIPLE: &str = "/contacts/Microsoft.Dynamics.CRM.UpsertMultiple";

#[tokio::test]
async fn upsert_multiple_sends_one_request_per_chunk() {
    let mock = dataverse_with(Bulk::Supported).await;
    let cfg: MappingConfig = trusst_cdc::config::parse("").unwrap();
    let mut mapping = Mapping::new(TargetKind::Dynamics, &cfg);
    let mut c = config(&mock, "right");
    c.batch_size = 2;
    let mut d = Dynamics::new(&c).unwrap();
    d.prepare(&mut mapping).await.unwrap();
    let recs = [record("c-1"), record("O'Brien 2"), record("c-3")];
    assert_eq!(
        d.upsert(&mapping, &recs).await.unwrap(),
        vec![Outcome::Written; 3]
    );

    let sent = requests_to(&mock, UPSERT_MULTIPLE);
    assert_eq!(sent.len(), 2, "one request per chunk of batch_size");
    assert!(requests_to(&mock, "/$batch").is_empty());
    let first = &sent[0];
    assert_eq!(first.method, "POST");
    assert_eq!(first.header("content-type"), "application/json");
    assert_eq!(first.header("odata-version"), "4.0");
    assert!(first.header("authorization").starts_with("Bearer tok-"));
    let body: serde_json::Value = serde_json::from_str(&first.body).unwrap();
    assert_eq!(
        body,
        json!({"Targets": [
            {"quality_score": 8, "@odata.type": "Microsoft.Dynamics.CRM.contact",
             "@odata.id": "contacts(trusst_contact_id='c-1')"},
            {"quality_score": 8, "@odata.type": "Microsoft.Dynamics.CRM.contact",
             "@odata.id": "contacts(trusst_contact_id='O''Brien%202')"},
        ]})
    );
    assert_eq!(targets(&sent[1].body), ["c-3"]);
}

#[tokio::test]
async fn a_bad_record_sends_its_chunk_again_as_a_batch() {
    let mock = dataverse_with(Bulk::Supported).await;
    let (mut d, mapping) = prepared(&mock).await;
    let out = d
        .upsert(&mapping, &[record("c-1"), record("c-bad"), record("c-3")])
        .await
        .unwrap();
    assert_eq!(
        out,
        [
            Outcome::Written,
            Outcome::Rejected("0x80040203: Invalid value".into()),
            Outcome::Written
        ]
    );
    assert_eq!(requests_to(&mock, UPSERT_MULTIPLE).len(), 1);
    // The $batch that sorted it out (after the scripted 401 on the first one) held the whole
    // chunk, with continue-on-error.
    let batch = requests_to(&mock, "/$batch").pop().unwrap();
    assert_eq!(batch.header("prefer"), "odata.continue-on-error");
    let ids: Vec<String> = batch_requests(&batch.body)
        .into_iter()
        .map(|(_, id)| id)
        .collect();
    assert_eq!(ids, ["c-1", "c-bad", "c-3"]);

    // The table still takes UpsertMultiple: the next chunk goes that way again.
    let batches = requests_to(&mock, "/$batch").len();
    assert_eq!(
        d.upsert(&mapping, &[record("c-4")]).await.unwrap(),
        [Outcome::Written]
    );
    assert_eq!(requests_to(&mock, UPSERT_MULTIPLE).len(), 2);
    assert_eq!(requests_to(&mock, "/$batch").len(), batches);
}

#[tokio::test]
async fn throttled_or_forbidden_upsert_multiple_is_not_resent_per_record() {
    let mock = dataverse_with(Bulk::Supported).await;
    let (mut d, mapping) = prepared(&mock).await;
    let e = d
        .upsert(&mapping, &[record("c-1"), record("c-throttle")])
        .await
        .unwrap_err();
    assert!(e.retryable);
    assert_eq!(e.retry_after, Some(Duration::from_secs(3)));
    let e = d
        .upsert(&mapping, &[record("c-1"), record("c-forbidden")])
        .await
        .unwrap_err();
    assert_eq!(e.fault, Fault::User, "{e}");
    assert!(!e.retryable);
    assert!(e.message().contains("security role"), "{e}");
    assert!(
        requests_to(&mock, "/$batch").is_empty(),
        "no record was tried on its own"
    );
}

#[tokio::test]
async fn a_table_without_upsert_multiple_gets_batch_from_then_on() {
    let mock = dataverse_with(Bulk::Unsupported).await;
    let (mut d, mapping) = prepared(&mock).await;
    for id in ["c-1", "c-2"] {
        assert_eq!(
            d.upsert(&mapping, &[record(id)]).await.unwrap(),
            [Outcome::Written]
        );
    }
    assert_eq!(
        requests_to(&mock, UPSERT_MULTIPLE).len(),
        1,
        "asked once, then remembered"
    );
    let batched: Vec<String> = requests_to(&mock, "/$batch")
        .iter()
        .filter(|s| s.header("authorization") == "Bearer tok-2")
        .flat_map(|s| batch_requests(&s.body))
        .map(|(_, id)| id)
        .collect();
    assert_eq!(batched, ["c-1", "c-2"]);
}

#[tokio::test]
async fn upsert_multiple_can_be_switched_off() {
    let mock = dataverse_with(Bulk::Supported).await;
    let cfg: MappingConfig = trusst_cdc::config::parse("").unwrap();
    let mut mapping = Mapping::new(TargetKind::Dynamics, &cfg);
    let mut c = config(&mock, "right");
    c.upsert_multiple = false;
    let mut d = Dynamics::new(&c).unwrap();
    d.prepare(&mut mapping).await.unwrap();
    assert_eq!(
        d.upsert(&mapping, &[record("c-1")]).await.unwrap(),
        [Outcome::Written]
    );
    assert!(requests_to(&mock, UPSERT_MULTIPLE).is_empty());
    assert!(!requests_to(&mock, "/$batch").is_empty());
}

// Against the project's CRM emulator (the same Web API, validated against
// connector-config/crm-emulator.toml).

fn emulator_config(emu: &crm_mock::Emulator) -> Config {
    Config {
        url: emu.url.clone(),
        tenant: "trusst-tenant".into(),
        token_url: Some(format!("{}/trusst-tenant/oauth2/v2.0/token", emu.url)),
        client_id: "trusst-dv-client".into(),
        client_secret: Secret {
            value: Some("trusst-dv-secret".into()),
            ..Default::default()
        },
        scope: None,
        batch_size: 1000,
        upsert_multiple: true,
        request_timeout: Duration::from_secs(10),
    }
}

fn emulator_event(id: &str, outcome: &str) -> ContactEvent {
    let mut e = event();
    e.trusst_contact_id = id.into();
    e.universal_questions[0].result = Some(outcome.into());
    e.universal_questions.push(
        serde_json::from_value(json!({"question_id": "q5", "question_key": "agent_identified", "question_text": null,
            "result_type": "Boolean", "question_group": null, "result": "true", "inference_updated_at": null}))
        .unwrap(),
    );
    e
}

#[tokio::test]
async fn emulator_upsert_update_reject_and_delete() {
    let emu = crm_mock::Emulator::start("connector-config/crm-emulator.toml");
    let cfg: MappingConfig = trusst_cdc::config::parse("[questions.call_outcome]\n").unwrap();
    let mut mapping = Mapping::new(TargetKind::Dynamics, &cfg);
    let mut d = Dynamics::new(&emulator_config(&emu)).unwrap();
    d.prepare(&mut mapping).await.unwrap();

    let good = mapping.map(&emulator_event("c-1", "Poor")).unwrap();
    let quoted = mapping.map(&emulator_event("c-O'Neil 2", "Good")).unwrap();
    let mut bad = mapping.map(&emulator_event("c-3", "Fair")).unwrap();
    bad.fields.insert("no_such_column".into(), json!(1));
    let out = d
        .upsert(&mapping, &[good.clone(), bad, quoted])
        .await
        .unwrap();
    assert_eq!(out[0], Outcome::Written);
    assert!(
        matches!(&out[1], Outcome::Rejected(m) if m.starts_with("0x80060888: The property 'no_such_column' does not exist")),
        "{out:?}"
    );
    assert_eq!(out[2], Outcome::Written);

    let rows = emu.admin("GET", "/records/dataverse/contact", None).await;
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 2, "{rows:#?}");
    let c1 = rows
        .iter()
        .find(|r| r["trusst_contact_id"] == "c-1")
        .unwrap();
    assert_eq!(c1["call_outcome"], 100000003);
    assert_eq!(c1["call_direction"], 100000001);
    assert_eq!(c1["agent_identified"], true);
    assert_eq!(c1["quality_score"], 9);
    assert!(rows.iter().any(|r| r["trusst_contact_id"] == "c-O'Neil 2"));

    // The same contact again is an update, not a second record.
    let newer = mapping.map(&emulator_event("c-1", "Excellent")).unwrap();
    assert_eq!(
        d.upsert(&mapping, &[newer]).await.unwrap(),
        [Outcome::Written]
    );
    let rows = emu.admin("GET", "/records/dataverse/contact", None).await;
    assert_eq!(rows.as_array().unwrap().len(), 2);
    assert!(
        rows.as_array()
            .unwrap()
            .iter()
            .any(|r| r["trusst_contact_id"] == "c-1" && r["call_outcome"] == 100000000)
    );

    let out = d
        .delete(&mapping, &["c-1".into(), "never-there".into()])
        .await
        .unwrap();
    assert_eq!(out, [Outcome::Written, Outcome::Written]);
    let rows = emu.admin("GET", "/records/dataverse/contact", None).await;
    assert_eq!(rows.as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn emulator_expired_tokens_and_throttling() {
    let emu = crm_mock::Emulator::start("connector-config/crm-emulator.toml");
    let cfg: MappingConfig = trusst_cdc::config::parse("[questions.call_outcome]\n").unwrap();
    let mut mapping = Mapping::new(TargetKind::Dynamics, &cfg);
    let mut d = Dynamics::new(&emulator_config(&emu)).unwrap();
    d.prepare(&mut mapping).await.unwrap();
    let rec = mapping.map(&emulator_event("c-1", "Poor")).unwrap();

    emu.admin("POST", "/expire-tokens", None).await;
    assert_eq!(
        d.upsert(&mapping, std::slice::from_ref(&rec))
            .await
            .unwrap(),
        [Outcome::Written]
    );

    emu.admin("POST", "/faults", Some(json!({"burst_429": 1})))
        .await;
    let e = d
        .upsert(&mapping, std::slice::from_ref(&rec))
        .await
        .unwrap_err();
    assert!(e.retryable);
    assert_eq!(e.retry_after, Some(Duration::from_secs(1)));
    assert_eq!(
        d.upsert(&mapping, &[rec]).await.unwrap(),
        [Outcome::Written]
    );
}

#[tokio::test]
async fn emulator_rejects_a_mapping_with_a_missing_column() {
    let emu = crm_mock::Emulator::start("connector-config/crm-emulator.toml");
    let cfg: MappingConfig =
        trusst_cdc::config::parse("[questions.nps]\n[questions.call_outcome]\ntype = \"text\"\n")
            .unwrap();
    let mut mapping = Mapping::new(TargetKind::Dynamics, &cfg);
    let mut d = Dynamics::new(&emulator_config(&emu)).unwrap();
    let e = d.prepare(&mut mapping).await.unwrap_err();
    assert_eq!(e.fault, Fault::User);
    assert!(e.message().contains("no column 'nps'"), "{e}");
    assert!(
        e.message()
            .contains("'call_outcome' is of type Picklist but is written as text"),
        "{e}"
    );
}

/// Calls the emulator counted for one Dataverse route, by status.
async fn calls(emu: &crm_mock::Emulator, route: &str) -> serde_json::Value {
    let stats = emu.admin("GET", "/stats", None).await;
    stats["calls"]["dataverse"][route].clone()
}

const EMU_UPSERT_MULTIPLE: &str = "POST /api/data/v9.2/{seg}/Microsoft.Dynamics.CRM.UpsertMultiple";
const EMU_BATCH: &str = "POST /api/data/v9.2/$batch";

#[tokio::test]
async fn emulator_upsert_multiple_and_batch_for_a_bad_record() {
    let emu = crm_mock::Emulator::start("connector-config/crm-emulator.toml");
    let cfg: MappingConfig = trusst_cdc::config::parse("[questions.call_outcome]\n").unwrap();
    let mut mapping = Mapping::new(TargetKind::Dynamics, &cfg);
    let mut d = Dynamics::new(&emulator_config(&emu)).unwrap();
    d.prepare(&mut mapping).await.unwrap();

    let good: Vec<Record> = (1..=3)
        .map(|i| {
            mapping
                .map(&emulator_event(&format!("c-{i}"), "Good"))
                .unwrap()
        })
        .collect();
    assert_eq!(
        d.upsert(&mapping, &good).await.unwrap(),
        vec![Outcome::Written; 3]
    );
    assert_eq!(calls(&emu, EMU_UPSERT_MULTIPLE).await, json!({"204": 1}));
    assert!(calls(&emu, EMU_BATCH).await.is_null());
    let rows = emu.admin("GET", "/records/dataverse/contact", None).await;
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 3);
    assert!(
        rows.iter()
            .all(|r| r["call_outcome"] == 100000001 && r["quality_score"] == 9),
        "{rows:#?}"
    );

    // One bad record: the table refuses the whole request and writes nothing, so the chunk
    // goes again as a $batch, which writes the others and rejects only the bad one.
    let newer = mapping.map(&emulator_event("c-1", "Poor")).unwrap();
    let mut bad = mapping.map(&emulator_event("c-4", "Fair")).unwrap();
    bad.fields.insert("no_such_column".into(), json!(1));
    let fresh = mapping.map(&emulator_event("c-5", "Excellent")).unwrap();
    let out = d.upsert(&mapping, &[newer, bad, fresh]).await.unwrap();
    assert_eq!((&out[0], &out[2]), (&Outcome::Written, &Outcome::Written));
    assert!(
        matches!(&out[1], Outcome::Rejected(m) if m.starts_with("0x80060888: The property 'no_such_column' does not exist")),
        "{out:?}"
    );
    assert_eq!(
        calls(&emu, EMU_UPSERT_MULTIPLE).await,
        json!({"204": 1, "400": 1})
    );
    assert_eq!(calls(&emu, EMU_BATCH).await, json!({"200": 1}));
    let rows = emu.admin("GET", "/records/dataverse/contact", None).await;
    let by_id = |id: &str| {
        rows.as_array()
            .unwrap()
            .iter()
            .find(|r| r["trusst_contact_id"] == id)
            .cloned()
    };
    assert_eq!(by_id("c-1").unwrap()["call_outcome"], 100000003);
    assert_eq!(by_id("c-5").unwrap()["call_outcome"], 100000000);
    assert!(by_id("c-4").is_none());
    assert_eq!(rows.as_array().unwrap().len(), 4);
}

#[tokio::test]
async fn emulator_table_without_bulk_messages_gets_batch() {
    let dir = tempfile::tempdir().unwrap();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(root.join("connector-config/crm-emulator.toml"))
        .unwrap()
        .replace("bulk_messages = true", "bulk_messages = false")
        .replace(
            "../tests/fixtures/jwt/public.pem",
            root.join("tests/fixtures/jwt/public.pem").to_str().unwrap(),
        );
    let path = dir.path().join("crm-emulator.toml");
    std::fs::write(&path, text).unwrap();
    let emu = crm_mock::Emulator::start(path.to_str().unwrap());
    let cfg: MappingConfig = trusst_cdc::config::parse("[questions.call_outcome]\n").unwrap();
    let mut mapping = Mapping::new(TargetKind::Dynamics, &cfg);
    let mut d = Dynamics::new(&emulator_config(&emu)).unwrap();
    d.prepare(&mut mapping).await.unwrap();
    for id in ["c-1", "c-2"] {
        let rec = mapping.map(&emulator_event(id, "Good")).unwrap();
        assert_eq!(
            d.upsert(&mapping, &[rec]).await.unwrap(),
            [Outcome::Written]
        );
    }
    assert_eq!(calls(&emu, EMU_UPSERT_MULTIPLE).await, json!({"400": 1}));
    assert_eq!(calls(&emu, EMU_BATCH).await, json!({"200": 2}));
    let rows = emu.admin("GET", "/records/dataverse/contact", None).await;
    assert_eq!(rows.as_array().unwrap().len(), 2);
}
