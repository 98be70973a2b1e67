//! Schema registry authentication: HTTP Basic (Confluent Cloud's API key and secret, a secured
//! Apicurio) and bearer tokens, sent by the source's registration and the sinks' schema look-ups.
//!
//! The registry here is a stand-in, not a mock of the client: a small HTTP server on loopback that
//! speaks the two Confluent API calls the connector makes (`POST /subjects/{s}/versions`,
//! `GET /schemas/ids/{id}`) and, like a secured registry, answers 401 to any request whose
//! `Authorization` header is not the one it was given. (Apicurio's own authentication needs an
//! OpenID Connect server, which the local services do not run.) No services needed.

use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use base64::Engine;
use serde_json::{Value, json};
use trusst_cdc::config::{registry, registry_auth};
use trusst_cdc::error::Fault;
use trusst_cdc::event::{ContactEvent, Decoder, Encoder, Format, registry::Auth};
use trusst_cdc::sink::http::Secret;

#[derive(Default)]
struct Registry {
    /// The only `Authorization` value accepted.
    expected: String,
    /// Schemas by id, and the `Authorization` header of every request.
    schemas: Vec<String>,
    seen: Vec<Option<String>>,
}

type Shared = Arc<Mutex<Registry>>;

fn authorized(state: &Shared, headers: &HeaderMap) -> Result<(), (StatusCode, String)> {
    let mut r = state.lock().unwrap();
    let got = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    r.seen.push(got.clone());
    if got.as_deref() == Some(r.expected.as_str()) {
        Ok(())
    } else {
        Err((
            StatusCode::UNAUTHORIZED,
            json!({"error_code": 40101, "message": "Unauthorized"}).to_string(),
        ))
    }
}

async fn register(
    State(state): State<Shared>,
    Path(_subject): Path<String>,
    headers: HeaderMap,
    body: String,
) -> Result<String, (StatusCode, String)> {
    authorized(&state, &headers)?;
    let schema = serde_json::from_str::<Value>(&body).unwrap()["schema"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut r = state.lock().unwrap();
    let id = match r.schemas.iter().position(|s| *s == schema) {
        Some(i) => i + 1,
        None => {
            r.schemas.push(schema);
            r.schemas.len()
        }
    };
    Ok(json!({ "id": id }).to_string())
}

async fn by_id(
    State(state): State<Shared>,
    Path(id): Path<usize>,
    headers: HeaderMap,
) -> Result<String, (StatusCode, String)> {
    authorized(&state, &headers)?;
    let r = state.lock().unwrap();
    match r.schemas.get(id.wrapping_sub(1)) {
        Some(s) => Ok(json!({ "schema": s }).to_string()),
        None => Err((
            StatusCode::NOT_FOUND,
            json!({"error_code": 40403, "message": "Schema not found"}).to_string(),
        )),
    }
}

/// A secured registry on a free loopback port: its API base and its state.
async fn secured_registry(expected: &str) -> (String, Shared) {
    let state: Shared = Arc::new(Mutex::new(Registry {
        expected: expected.to_owned(),
        ..Default::default()
    }));
    let app = Router::new()
        .route(
            "/apis/ccompat/v7/subjects/{subject}/versions",
            post(register),
        )
        .route("/apis/ccompat/v7/schemas/ids/{id}", get(by_id))
        .with_state(state.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}/apis/ccompat/v7"), state)
}

fn basic(user: &str, password: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    )
}

fn event() -> ContactEvent {
    ContactEvent::from_json(
        json!({
            "schema_version": 1, "event_id": "0/1:c-1", "op": "upsert",
            "trusst_contact_id": "c-1", "universal_questions": [],
            "source": {"lsn": "0/1", "commit_ts": "2026-01-01T00:00:00Z", "txid": 1, "reason": "stream"}
        })
        .to_string()
        .as_bytes(),
    )
    .expect("a valid event")
}

/// Register the event schema (the source's start) and decode a record through a fresh decoder
/// (a sink's first look-up by id).
async fn round_trip(registry: &trusst_cdc::event::Registry) -> trusst_cdc::error::Result<()> {
    let encoder = Encoder::new(Format::Avro, Some(registry), "trusst.contacts").await?;
    let value = encoder.encode(&event());
    let decoded = Decoder::new(Some(registry.clone()))
        .decode(&value)
        .await?
        .expect("decodes");
    assert_eq!(decoded.trusst_contact_id, "c-1");
    Ok(())
}

#[tokio::test]
async fn basic_auth_from_a_password_file() {
    let (url, state) = secured_registry(&basic("SR-KEY", "sr/secret")).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("sr-password");
    std::fs::write(&file, "sr/secret\n").unwrap();
    let password = Secret {
        file: Some(file.to_string_lossy().into_owned()),
        ..Default::default()
    };
    let auth = registry_auth(Some("SR-KEY"), Some(&password), None).unwrap();
    let reg = registry(Some(&url), auth).unwrap().unwrap();
    round_trip(&reg).await.unwrap();
    let seen = state.lock().unwrap().seen.clone();
    assert_eq!(seen.len(), 2, "register, then the look-up by id: {seen:?}");
    assert!(
        seen.iter()
            .all(|h| h.as_deref() == Some(&*basic("SR-KEY", "sr/secret")))
    );
}

#[tokio::test]
async fn bearer_token() {
    let (url, state) = secured_registry("Bearer tok-123").await;
    let token = Secret {
        value: Some("tok-123".into()),
        ..Default::default()
    };
    let auth = registry_auth(None, None, Some(&token)).unwrap();
    assert!(matches!(auth, Auth::Bearer(_)));
    let reg = registry(Some(&url), auth).unwrap().unwrap();
    round_trip(&reg).await.unwrap();
    assert_eq!(state.lock().unwrap().seen.len(), 2);
}

/// `https://key:secret@host/...` works as Confluent's clients allow, and the URL the connector
/// shows (logs, errors) has no credentials.
#[tokio::test]
async fn credentials_in_the_url() {
    let (url, state) = secured_registry(&basic("SR-KEY", "p@ss:word")).await;
    let with_creds = url.replace("http://", "http://SR-KEY:p%40ss%3Aword@");
    let reg = registry(Some(&with_creds), Auth::None).unwrap().unwrap();
    assert_eq!(reg.url(), url);
    round_trip(&reg).await.unwrap();
    assert!(
        state
            .lock()
            .unwrap()
            .seen
            .iter()
            .all(|h| h.as_deref() == Some(&*basic("SR-KEY", "p@ss:word")))
    );
}

/// Wrong or missing credentials: a configuration error that says to check them, at the
/// source's registration and at a sink's look-up alike, and never shows the password.
#[tokio::test]
async fn refused_credentials_are_a_configuration_error_without_the_password() {
    let (url, state) = secured_registry(&basic("SR-KEY", "right")).await;
    let wrong = registry(
        Some(&url.replace("http://", "http://SR-KEY:wr0ng-pw@")),
        Auth::None,
    )
    .unwrap()
    .unwrap();
    let e = Encoder::new(Format::Avro, Some(&wrong), "trusst.contacts")
        .await
        .unwrap_err();
    assert_eq!(e.fault, Fault::User, "{e}");
    let text = format!("{e} {e:?}");
    assert!(text.contains("credentials"), "{text}");
    assert!(!text.contains("wr0ng-pw"), "{text}");

    // A sink reading a record whose schema it must fetch.
    let good = registry(
        Some(&url),
        registry_auth(
            Some("SR-KEY"),
            Some(&Secret {
                value: Some("right".into()),
                ..Default::default()
            }),
            None,
        )
        .unwrap(),
    )
    .unwrap()
    .unwrap();
    let value = Encoder::new(Format::Avro, Some(&good), "trusst.contacts")
        .await
        .unwrap()
        .encode(&event());
    let e = Decoder::new(Some(wrong)).decode(&value).await.unwrap_err();
    assert_eq!(e.fault, Fault::User, "{e}");
    let text = format!("{e} {e:?}");
    assert!(text.contains("SCHEMA_REGISTRY_PASSWORD"), "{text}");
    assert!(!text.contains("wr0ng-pw"), "{text}");

    // Without credentials the registry refuses too.
    let none = registry(Some(&url), Auth::None).unwrap().unwrap();
    let e = Decoder::new(Some(none)).decode(&value).await.unwrap_err();
    assert_eq!(e.fault, Fault::User, "{e}");
    let seen = state.lock().unwrap().seen.clone();
    assert_eq!(seen.last().unwrap(), &None, "no header was sent: {seen:?}");
}

#[test]
fn half_given_credentials_are_refused() {
    let pw = Secret {
        value: Some("x".into()),
        ..Default::default()
    };
    for (user, password, token, want) in [
        (Some("u"), None, None, "without a password"),
        (None, Some(&pw), None, "without a user"),
        (Some("u"), Some(&pw), Some(&pw), "keep the token"),
    ] {
        let e = registry_auth(user, password, token).unwrap_err();
        assert!(e.to_string().contains(want), "{e}");
    }
    let missing = Secret {
        env: Some("TRUSST_TEST_UNSET_REGISTRY_PASSWORD".into()),
        ..Default::default()
    };
    let e = registry_auth(Some("u"), Some(&missing), None).unwrap_err();
    assert!(e.to_string().contains("schema_registry_password"), "{e}");
}
