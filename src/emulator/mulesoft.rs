//! A customer's MuleSoft API on CloudHub behind API Manager: Client ID Enforcement (headers or
//! HTTP Basic) or OAuth 2.0 token enforcement, the seed's sync payload with per-contact results,
//! and rate limiting that answers 429 with `X-Ratelimit-*` headers (reset in milliseconds).

use std::collections::HashMap;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Form, Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post};
use base64::Engine;
use serde_json::{Value, json};

use super::config::MuleAuth;
use super::{App, Refusal, System, header_str, json, tracked};

/// Table the contacts are kept in.
const TABLE: &str = "contacts";
/// The result types the seed's questions use.
const RESULT_TYPES: [&str; 5] = ["Boolean", "Rating", "Label", "Paragraph", "Summary"];

pub(super) fn routes(app: &Arc<App>) -> Router<Arc<App>> {
    let path = &app.cfg.mulesoft.path;
    let data = Router::new()
        .route(path, post(sync))
        .route(&format!("{path}/{{id}}"), get(read))
        .route_layer(middleware::from_fn_with_state(app.clone(), gate));
    let all = Router::new()
        .route("/mulesoft/oauth2/token", post(token))
        .merge(data);
    tracked(all, app, System::Mulesoft)
}

fn denied() -> Response {
    json(
        StatusCode::UNAUTHORIZED,
        json!({"error": "Authentication denied"}),
    )
}

/// Credentials from HTTP Basic.
fn basic(headers: &HeaderMap) -> Option<(String, String)> {
    let encoded = header_str(headers, "authorization")?.strip_prefix("Basic ")?;
    let text = String::from_utf8(
        base64::engine::general_purpose::STANDARD
            .decode(encoded.trim())
            .ok()?,
    )
    .ok()?;
    let (id, secret) = text.split_once(':')?;
    Some((id.to_owned(), secret.to_owned()))
}

/// The policy's credentials check.
fn authorized(app: &App, headers: &HeaderMap) -> bool {
    let m = &app.cfg.mulesoft;
    match m.auth {
        MuleAuth::Oauth => app.bearer_ok(System::Mulesoft, headers),
        MuleAuth::ClientId => {
            let pair = match (
                header_str(headers, "client_id"),
                header_str(headers, "client_secret"),
            ) {
                (Some(id), Some(secret)) => Some((id.to_owned(), secret.to_owned())),
                _ => basic(headers),
            };
            pair.is_some_and(|(id, secret)| id == m.client_id && secret == m.client_secret)
        }
    }
}

/// Auth, injected faults and the rate limiting policy, for API calls.
async fn gate(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    if !authorized(&app, req.headers()) {
        return denied();
    }
    let limit = app.cfg.mulesoft.rate_limit;
    let refused = match app.inject(System::Mulesoft).await {
        Err(r) => Some(r),
        Ok(()) => limit.and_then(|l| app.charge(System::Mulesoft, 1, &l).err()),
    };
    match refused {
        None => next.run(req).await,
        Some(Refusal::Unavailable) => json(
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"error": "Service Unavailable"}),
        ),
        Some(Refusal::TooMany { retry_after }) => {
            let mut res = json(
                StatusCode::TOO_MANY_REQUESTS,
                json!({"error": "Too many requests"}),
            );
            let limit = limit.map_or(1, |l| l.requests);
            for (name, value) in [
                ("x-ratelimit-limit", limit),
                ("x-ratelimit-remaining", 0),
                ("x-ratelimit-reset", retry_after.as_millis() as u64),
            ] {
                res.headers_mut().insert(name, HeaderValue::from(value));
            }
            res
        }
    }
}

async fn token(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    let m = &app.cfg.mulesoft;
    if form.get("grant_type").map(String::as_str) != Some("client_credentials") {
        return json(
            StatusCode::BAD_REQUEST,
            json!({"error": "unsupported_grant_type"}),
        );
    }
    let pair = match (form.get("client_id"), form.get("client_secret")) {
        (Some(id), Some(secret)) => Some((id.clone(), secret.clone())),
        _ => basic(&headers),
    };
    if !pair.is_some_and(|(id, secret)| id == m.client_id && secret == m.client_secret) {
        return json(
            StatusCode::UNAUTHORIZED,
            json!({"error": "invalid_client", "error_description": "Invalid client credentials"}),
        );
    }
    let access_token = app.issue_token(System::Mulesoft, "");
    let expires_in = app.token_lifetime(&app.lock(), System::Mulesoft).as_secs();
    json(
        StatusCode::OK,
        json!({"access_token": access_token, "token_type": "Bearer", "expires_in": expires_in}),
    )
}

/// Why a contact of the payload is refused, if it is.
fn check_contact(contact: &Value) -> Result<String, String> {
    let id = contact
        .get("trusst_contact_id")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty());
    let id = id.ok_or("trusst_contact_id is missing or not a string")?;
    for q in contact
        .get("universal_questions")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let kind = q
            .get("result_type")
            .and_then(Value::as_str)
            .unwrap_or_default();
        if !RESULT_TYPES.contains(&kind) {
            let key = q
                .get("question_key")
                .and_then(Value::as_str)
                .unwrap_or_default();
            return Err(format!(
                "unsupported result_type '{kind}' for question '{key}'; expected one of {RESULT_TYPES:?}"
            ));
        }
    }
    Ok(id.to_owned())
}

/// `POST {path}`: upsert every valid contact by `trusst_contact_id`; the others are reported.
async fn sync(State(app): State<Arc<App>>, body: Bytes) -> Response {
    if let Some(max) = app.cfg.mulesoft.max_request_bytes
        && body.len() > max
    {
        return json(
            StatusCode::PAYLOAD_TOO_LARGE,
            json!({"error": "Payload Too Large", "message": format!("the request body is {} bytes; at most {max} are accepted", body.len())}),
        );
    }
    let payload: Value = serde_json::from_slice(&body).unwrap_or_default();
    let Some(contacts) = payload.get("contacts").and_then(Value::as_array) else {
        return json(
            StatusCode::BAD_REQUEST,
            json!({"error": "Bad request", "message": "the body must be a JSON object with a contacts array"}),
        );
    };
    let mut inner = app.lock();
    let mut errors = vec![];
    for contact in contacts {
        match check_contact(contact) {
            Ok(id) => {
                let record = contact.as_object().cloned().unwrap_or_default();
                inner
                    .store
                    .table(System::Mulesoft, TABLE)
                    .insert(id, record);
            }
            Err(message) => errors.push(
                json!({"trusst_contact_id": contact.get("trusst_contact_id"), "message": message}),
            ),
        }
    }
    app.persist(&inner);
    let body = json!({"records_processed": contacts.len() - errors.len(), "records_failed": errors.len(), "errors": errors});
    json(StatusCode::OK, body)
}

/// `GET {path}/{id}`: a stored contact.
async fn read(State(app): State<Arc<App>>, Path(id): Path<String>) -> Response {
    match app
        .lock()
        .store
        .get(System::Mulesoft, TABLE)
        .and_then(|t| t.get(&id))
    {
        Some(contact) => json(StatusCode::OK, Value::Object(contact.clone())),
        None => json(StatusCode::NOT_FOUND, json!({"error": "Not found"})),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contacts_are_checked_one_by_one() {
        let ok = json!({"trusst_contact_id": "c1", "universal_questions": [{"question_key": "q", "result_type": "Rating"}]});
        assert_eq!(check_contact(&ok).unwrap(), "c1");
        assert!(
            check_contact(&json!({"external_id": "x"}))
                .unwrap_err()
                .contains("trusst_contact_id")
        );
        let bad = json!({"trusst_contact_id": "c2", "universal_questions": [{"question_key": "q", "result_type": "Score"}]});
        assert!(check_contact(&bad).unwrap_err().contains("'Score'"));
    }
}
