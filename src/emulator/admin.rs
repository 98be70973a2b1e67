//! `/__admin/`: what tests need to see and steer (no auth): stored records, call counters, fault
//! settings, and resets of limits, tokens and everything.

use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::{get, post};
use serde_json::{Value, json};

use super::faults::{FaultState, Faults};
use super::{App, System, json};

pub(super) fn routes() -> Router<Arc<App>> {
    Router::new()
        .route("/faults", get(faults).post(set_faults).delete(clear_faults))
        .route("/reset-limits", post(reset_limits))
        .route("/expire-tokens", post(expire_tokens))
        .route("/records/{system}/{object}", get(records))
        .route("/stats", get(stats))
        .route("/reset", post(reset))
}

fn faults_body(app: &App) -> Response {
    json(StatusCode::OK, json!(app.lock().faults.get()))
}

/// `GET /faults`: the settings, with the bursts still to come.
async fn faults(State(app): State<Arc<App>>) -> Response {
    faults_body(&app)
}

/// `POST /faults`: a JSON merge patch of the settings.
async fn set_faults(State(app): State<Arc<App>>, axum::Json(patch): axum::Json<Value>) -> Response {
    if let Err(e) = app.lock().faults.patch(&patch) {
        return json(StatusCode::BAD_REQUEST, json!({"error": e}));
    }
    faults_body(&app)
}

/// `DELETE /faults`: no more faults.
async fn clear_faults(State(app): State<Arc<App>>) -> Response {
    app.lock().faults = FaultState::new(Faults::default());
    faults_body(&app)
}

/// `POST /reset-limits`: a new Salesforce day and fresh rate-limit windows.
async fn reset_limits(State(app): State<Arc<App>>) -> StatusCode {
    let mut inner = app.lock();
    inner.sf_usage = Default::default();
    inner.windows.clear();
    inner.dv_requests = Default::default();
    StatusCode::NO_CONTENT
}

/// `POST /expire-tokens`: every token issued so far answers 401 from now on.
async fn expire_tokens(State(app): State<Arc<App>>) -> StatusCode {
    app.lock().tokens.clear();
    StatusCode::NO_CONTENT
}

/// `GET /records/{system}/{object}`: the stored records, in key order.
async fn records(
    State(app): State<Arc<App>>,
    Path((system, object)): Path<(System, String)>,
) -> Response {
    let inner = app.lock();
    let records: Vec<Value> = inner
        .store
        .get(system, &object)
        .into_iter()
        .flat_map(|t| t.values())
        .map(|r| Value::Object(r.clone()))
        .collect();
    json(StatusCode::OK, Value::Array(records))
}

/// `GET /stats`: calls by system, route and status; tokens; injected faults; usage.
async fn stats(State(app): State<Arc<App>>) -> Response {
    let mut inner = app.lock();
    let (used, max) = super::salesforce::usage(&app, &mut inner);
    let mut body = json!(inner.stats);
    body["salesforce_api_usage"] = json!({"used": used, "max": max});
    body["bulk_jobs"] = inner.jobs.len().into();
    body["records"] = json!(inner.store.counts());
    json(StatusCode::OK, body)
}

/// `POST /reset`: drop every record, job and counter (tokens and faults stay).
async fn reset(State(app): State<Arc<App>>) -> StatusCode {
    let mut inner = app.lock();
    inner.store.clear();
    inner.jobs.clear();
    inner.stats = Default::default();
    inner.sf_usage = Default::default();
    inner.windows.clear();
    inner.dv_requests = Default::default();
    app.persist(&inner);
    StatusCode::NO_CONTENT
}
