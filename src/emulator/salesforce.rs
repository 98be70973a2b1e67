//! Salesforce: OAuth 2.0 (client credentials, with the client's credentials in the form or as
//! HTTP Basic, and JWT bearer), the REST API's upsert by external id, read and delete by
//! external id or record Id, update by Id, describe and limits, sObject Collections, and the daily API allowance that
//! every data call counts against (403 `REQUEST_LIMIT_EXCEEDED` when spent, never 429). Bulk API
//! 2.0 lives in [`super::bulk`].

// Handlers short-circuit with finished error responses (`Result<_, Response>` and `?`); boxing
// them would only add noise to a test server.
#![allow(clippy::result_large_err)]

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Form, Path, RawQuery, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, patch, post};
use axum::{Router, body::Bytes};
use base64::Engine;
use serde::Deserialize;
use serde_json::{Value, json};

use super::config::{SObject, SfField, SfType};
use super::store::{Record, Store};
use super::{App, Inner, System, client_credentials, json, query_param, tracked};

const JWT_GRANT: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
/// Clock skew allowed on both sides of a JWT assertion's `exp`.
const LEEWAY_SECS: i64 = 30;
/// JWT assertions may expire at most this far ahead (3 minutes plus clock skew).
const MAX_ASSERTION_SECS: i64 = 180 + LEEWAY_SECS;
/// sObject Collections take at most this many records.
const COLLECTION_LIMIT: usize = 200;

pub(super) fn routes(app: &Arc<App>) -> Router<Arc<App>> {
    let v = "/services/data/{version}";
    let data = Router::new()
        .route(&format!("{v}/limits"), get(limits))
        .route(&format!("{v}/limits/"), get(limits))
        .route(&format!("{v}/sobjects/{{sobject}}/describe"), get(describe))
        .route(
            &format!("{v}/sobjects/{{sobject}}/describe/"),
            get(describe),
        )
        .route(
            &format!("{v}/sobjects/{{sobject}}/{{id}}"),
            get(read_by_id).patch(update_by_id).delete(remove_by_id),
        )
        .route(
            &format!("{v}/sobjects/{{sobject}}/{{field}}/{{value}}"),
            get(read).patch(upsert).delete(remove),
        )
        .route(
            &format!("{v}/composite/sobjects/{{sobject}}/{{field}}"),
            patch(upsert_collection),
        )
        .route(
            &format!("{v}/composite/sobjects"),
            delete(delete_collection),
        )
        .merge(super::bulk::routes())
        .route_layer(middleware::from_fn_with_state(app.clone(), gate));
    let all = Router::new()
        .route("/services/oauth2/token", post(token))
        .merge(data)
        .layer(middleware::map_response_with_state(app.clone(), limit_info));
    tracked(all, app, System::Salesforce)
}

/// A Salesforce REST error: `[{"message","errorCode"}]`.
pub(super) fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    json(
        status,
        json!([{"message": message.into(), "errorCode": code}]),
    )
}

fn not_found() -> Response {
    error(
        StatusCode::NOT_FOUND,
        "NOT_FOUND",
        "The requested resource does not exist",
    )
}

/// One problem with one record.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct FieldError {
    pub code: &'static str,
    pub message: String,
    pub fields: Vec<String>,
}

impl FieldError {
    fn new(code: &'static str, message: impl Into<String>, field: Option<&str>) -> Self {
        Self {
            code,
            message: message.into(),
            fields: field.map(str::to_owned).into_iter().collect(),
        }
    }

    /// As the REST API reports it.
    fn rest(&self) -> Value {
        json!({"message": self.message, "errorCode": self.code, "fields": self.fields})
    }

    /// As sObject Collections report it (`statusCode`, not `errorCode`).
    fn collection(&self) -> Value {
        json!({"statusCode": self.code, "message": self.message, "fields": self.fields})
    }

    /// As Bulk API results report it: `CODE:message:fields --`.
    pub(super) fn bulk(&self) -> String {
        format!(
            "{}:{}:{} --",
            self.code,
            self.message,
            self.fields.join(",")
        )
    }
}

/// Auth, API version, the daily allowance and injected faults, in that order, for data calls.
async fn gate(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    if !app.bearer_ok(System::Salesforce, req.headers()) {
        return error(
            StatusCode::UNAUTHORIZED,
            "INVALID_SESSION_ID",
            "Session expired or invalid",
        );
    }
    let version = req.uri().path().split('/').nth(3).unwrap_or_default();
    if !version
        .strip_prefix('v')
        .and_then(|v| v.parse::<f64>().ok())
        .is_some_and(|v| v >= 46.0)
    {
        return error(
            StatusCode::NOT_FOUND,
            "NOT_FOUND",
            format!(
                "The requested resource does not exist (API version '{version}'; the emulator serves v46.0 and later)"
            ),
        );
    }
    {
        let mut inner = app.lock();
        let (used, max) = usage(&app, &mut inner);
        if used >= max {
            return error(
                StatusCode::FORBIDDEN,
                "REQUEST_LIMIT_EXCEEDED",
                "TotalRequests Limit exceeded.",
            );
        }
        inner.sf_usage.used += 1;
    }
    if app.inject(System::Salesforce).await.is_err() {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "SERVER_UNAVAILABLE",
            "Server is temporarily unavailable",
        );
    }
    next.run(req).await
}

/// Daily API calls used and allowed, starting a new day when `limit_reset_after` has passed.
pub(super) fn usage(app: &App, inner: &mut Inner) -> (u64, u64) {
    if app
        .cfg
        .salesforce
        .limit_reset_after
        .is_some_and(|d| inner.sf_usage.since.elapsed() >= d)
    {
        inner.sf_usage = Default::default();
    }
    let max = inner
        .faults
        .get()
        .sf_daily_limit
        .unwrap_or(app.cfg.salesforce.daily_api_limit);
    (inner.sf_usage.used, max)
}

/// Every Salesforce response carries `Sforce-Limit-Info`.
async fn limit_info(State(app): State<Arc<App>>, mut res: Response) -> Response {
    let (used, max) = usage(&app, &mut app.lock());
    let value = HeaderValue::from_str(&format!("api-usage={used}/{max}"))
        .expect("digits are a valid header");
    res.headers_mut().insert("sforce-limit-info", value);
    res
}

async fn token(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    let sf = &app.cfg.salesforce;
    let oauth_error = |code: &str, description: &str| {
        json(
            StatusCode::BAD_REQUEST,
            json!({"error": code, "error_description": description}),
        )
    };
    match form.get("grant_type").map(String::as_str) {
        Some("client_credentials") => {
            let (id, secret) = client_credentials(&headers, &form);
            if id.as_ref() != Some(&sf.client_id) || secret.as_ref() != Some(&sf.client_secret) {
                return oauth_error("invalid_client", "invalid client credentials");
            }
        }
        Some(JWT_GRANT) => {
            if let Err((code, description)) =
                verify_assertion(&app, form.get("assertion").map_or("", String::as_str))
            {
                return oauth_error(code, &description);
            }
        }
        _ => return oauth_error("unsupported_grant_type", "grant type not supported"),
    }
    let access_token = app.issue_token(System::Salesforce, "00D000000000001!");
    let signature = base64::engine::general_purpose::STANDARD.encode(super::random_string(32));
    json(
        StatusCode::OK,
        json!({
            "access_token": access_token,
            "instance_url": app.base_url,
            "id": format!("{}/id/00D000000000001EAA/005000000000001AAA", app.base_url),
            "token_type": "Bearer",
            "issued_at": chrono::Utc::now().timestamp_millis().to_string(),
            "signature": signature,
        }),
    )
}

/// Check a JWT bearer assertion: RS256 signature, `iss` = the consumer key, `sub` an allowed
/// user, `aud` present (any value: there is no login URL to match), `exp` within 3 minutes.
/// `exp` may be a number or a string of digits: simple-salesforce sends a string, and the
/// service accepts it.
fn verify_assertion(app: &App, assertion: &str) -> Result<(), (&'static str, String)> {
    #[derive(Deserialize)]
    struct Claims {
        iss: String,
        sub: String,
        #[serde(default)]
        exp: Value,
    }
    let sf = &app.cfg.salesforce;
    let key = app.jwt_key.as_ref().ok_or((
        "invalid_grant",
        "the JWT bearer flow is not configured".to_owned(),
    ))?;
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
    validation.validate_aud = false;
    // The library reads `exp` only as a number; it is checked below, in either form.
    validation.validate_exp = false;
    validation.set_required_spec_claims(&["iss", "sub", "aud"]);
    let claims = jsonwebtoken::decode::<Claims>(assertion, key, &validation)
        .map_err(|e| ("invalid_grant", format!("invalid assertion: {e}")))?
        .claims;
    if claims.iss != sf.client_id {
        return Err(("invalid_client", "client identifier invalid".into()));
    }
    let exp = match &claims.exp {
        Value::Number(n) => n.as_f64().map(|f| f as i64),
        Value::String(s) => s.trim().parse::<i64>().ok(),
        _ => None,
    }
    .ok_or((
        "invalid_grant",
        "invalid assertion: no numeric exp".to_owned(),
    ))?;
    let now = chrono::Utc::now().timestamp();
    if exp < now - LEEWAY_SECS {
        return Err(("invalid_grant", "expired assertion".into()));
    }
    if exp > now + MAX_ASSERTION_SECS {
        return Err((
            "invalid_grant",
            "invalid assertion: exp must be at most 3 minutes ahead".into(),
        ));
    }
    if !sf.jwt_users.contains(&claims.sub) {
        return Err(("invalid_grant", "user hasn't approved this consumer".into()));
    }
    Ok(())
}

/// `{version}/limits/`.
async fn limits(State(app): State<Arc<App>>) -> Response {
    let (used, max) = usage(&app, &mut app.lock());
    json(
        StatusCode::OK,
        json!({"DailyApiRequests": {"Max": max, "Remaining": max.saturating_sub(used)}}),
    )
}

/// The schema of an sObject, or 404.
pub(super) fn sobject<'a>(app: &'a App, name: &str) -> Result<&'a SObject, Response> {
    app.cfg.salesforce.objects.get(name).ok_or_else(not_found)
}

/// Check that `field` is an external id of the object, or the REST API's 404.
pub(super) fn external_id(obj: &SObject, field: &str) -> Result<(), Response> {
    match obj.fields.get(field) {
        Some(f) if f.external_id => Ok(()),
        _ => Err(error(
            StatusCode::NOT_FOUND,
            "NOT_FOUND",
            format!("Provided external ID field does not exist or is not accessible: {field}"),
        )),
    }
}

async fn describe(
    State(app): State<Arc<App>>,
    Path(p): Path<HashMap<String, String>>,
) -> Result<Response, Response> {
    let name = &p["sobject"];
    let obj = sobject(&app, name)?;
    let id = json!({"name": "Id", "type": "id", "length": 18, "externalId": false, "idLookup": true,
        "picklistValues": [], "restrictedPicklist": false, "nillable": false, "createable": false, "updateable": false});
    let modstamp = json!({"name": "SystemModstamp", "type": "datetime", "length": 0, "externalId": false, "idLookup": false,
        "picklistValues": [], "restrictedPicklist": false, "nillable": false, "createable": false, "updateable": false});
    let fields = obj.fields.iter().map(|(name, f)| {
        let values: Vec<_> = f
            .values
            .iter()
            .map(|v| json!({"value": v, "label": v, "active": true, "defaultValue": false}))
            .collect();
        json!({
            "name": name,
            "type": type_name(f.kind),
            "length": f.max_len().unwrap_or(0),
            "externalId": f.external_id,
            "idLookup": f.external_id,
            "unique": f.external_id,
            "picklistValues": values,
            "restrictedPicklist": f.restricted,
            "nillable": true,
            "createable": true,
            "updateable": true,
        })
    });
    Ok(json(
        StatusCode::OK,
        json!({"name": name, "label": name, "keyPrefix": obj.key_prefix, "custom": name.ends_with("__c"),
            "createable": true, "updateable": true, "fields": ([id, modstamp].into_iter().chain(fields).collect::<Vec<_>>())}),
    ))
}

fn type_name(kind: SfType) -> &'static str {
    match kind {
        SfType::String => "string",
        SfType::Textarea => "textarea",
        SfType::Boolean => "boolean",
        SfType::Double => "double",
        SfType::Int => "int",
        SfType::Picklist => "picklist",
        SfType::Datetime => "datetime",
        SfType::Date => "date",
    }
}

/// Check fields against the sObject's schema; every problem found.
pub(super) fn validate(name: &str, obj: &SObject, fields: &Record) -> Result<(), Vec<FieldError>> {
    let errors: Vec<_> = fields
        .iter()
        .filter_map(|(field, value)| match obj.fields.get(field) {
            _ if field == "Id" => Some(FieldError::new(
                "INVALID_FIELD",
                "The Id field should not be specified in the sobject data.",
                Some(field),
            )),
            None => Some(FieldError::new(
                "INVALID_FIELD",
                format!("No such column '{field}' on sobject of type {name}"),
                None,
            )),
            Some(f) => check_value(field, f, value).err(),
        })
        .collect();
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

/// Check one value: JSON type, picklist membership, length, date format. Null clears a field.
pub(super) fn check_value(name: &str, f: &SfField, value: &Value) -> Result<(), FieldError> {
    let type_ok = match f.kind {
        _ if value.is_null() => return Ok(()),
        SfType::Boolean => value.is_boolean(),
        SfType::Double => value.is_number(),
        SfType::Int => value.is_i64(),
        SfType::String | SfType::Textarea | SfType::Picklist | SfType::Datetime | SfType::Date => {
            value.is_string()
        }
    };
    if !type_ok {
        return Err(FieldError::new(
            "INVALID_TYPE_ON_FIELD_IN_RECORD",
            format!("{name}: value not of required type: {value}"),
            Some(name),
        ));
    }
    let Some(s) = value.as_str() else {
        return Ok(());
    };
    let parses = match f.kind {
        SfType::Datetime => {
            chrono::DateTime::parse_from_rfc3339(s).is_ok()
                || chrono::DateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S%.f%z").is_ok()
                || chrono::NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S%.f").is_ok()
        }
        SfType::Date => chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d").is_ok(),
        _ => true,
    };
    if !parses {
        return Err(FieldError::new(
            "JSON_PARSER_ERROR",
            format!(
                "Cannot deserialize instance of {} from VALUE_STRING value {s}",
                type_name(f.kind)
            ),
            Some(name),
        ));
    }
    if f.kind == SfType::Picklist && f.restricted && !f.values.iter().any(|v| v == s) {
        return Err(FieldError::new(
            "INVALID_OR_NULL_FOR_RESTRICTED_PICKLIST",
            format!("bad value for restricted picklist field: {s}"),
            Some(name),
        ));
    }
    match f.max_len() {
        Some(max) if s.chars().count() > max => Err(FieldError::new(
            "STRING_TOO_LONG",
            format!(
                "{name}: data value too large: {}... (max length={max})",
                s.chars().take(40).collect::<String>()
            ),
            Some(name),
        )),
        _ => Ok(()),
    }
}

/// The Id of the record whose `field` equals `value`.
pub(super) fn find(store: &Store, object: &str, field: &str, value: &str) -> Option<String> {
    store.find(System::Salesforce, object, field, value)
}

/// Write validated fields: into record `existing`, or into a new record keyed by the external id.
/// Returns the Id and whether the record was created.
pub(super) fn write(
    store: &mut Store,
    object: &str,
    prefix: &str,
    existing: Option<String>,
    (ext_field, ext_value): (&str, &str),
    fields: Record,
) -> (String, bool) {
    let (id, created) = match existing {
        Some(id) => (id, false),
        None => (sf_id(prefix, store.next_seq()), true),
    };
    let record = store
        .table(System::Salesforce, object)
        .entry(id.clone())
        .or_default();
    if created {
        record.insert("Id".into(), id.clone().into());
        record.insert(ext_field.into(), ext_value.into());
    }
    record.extend(fields);
    // The system field Salesforce sets on every write; benchmarks read it back to time when a
    // change became readable.
    record.insert("SystemModstamp".into(), modstamp().into());
    if created {
        store.indexed(System::Salesforce, object, ext_field, ext_value, &id);
    }
    (id, created)
}

/// Now, as Salesforce writes a date/time (milliseconds, UTC, `+0000`).
fn modstamp() -> String {
    chrono::Utc::now()
        .format("%Y-%m-%dT%H:%M:%S%.3f+0000")
        .to_string()
}

/// An 18-character Salesforce id: prefix, pod, a base-62 counter and the case-safe suffix.
pub(super) fn sf_id(prefix: &str, n: u64) -> String {
    const DIGITS: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    let mut counter = [b'0'; 9];
    let mut rest = n;
    for c in counter.iter_mut().rev() {
        *c = DIGITS[(rest % 62) as usize];
        rest /= 62;
    }
    case_safe(&format!("{prefix}5e0{}", String::from_utf8_lossy(&counter)))
}

/// Append the 3-character suffix to a 15-character id: each 5-character chunk gives one letter
/// whose bits mark the chunk's uppercase characters.
fn case_safe(id15: &str) -> String {
    let suffix: String = id15
        .as_bytes()
        .chunks(5)
        .map(|chunk| {
            let bits = chunk
                .iter()
                .enumerate()
                .filter(|(_, c)| c.is_ascii_uppercase())
                .fold(0, |b, (i, _)| b | 1 << i);
            char::from(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ012345"[bits])
        })
        .collect();
    format!("{id15}{suffix}")
}

/// A record as the REST API returns it: every field of the schema, null when never set.
fn render(object: &str, obj: &SObject, version: &str, record: &Record) -> Value {
    let id = record.get("Id").cloned().unwrap_or(Value::Null);
    let mut out = json!({
        "attributes": {"type": object, "url": format!("/services/data/{version}/sobjects/{object}/{}", id.as_str().unwrap_or_default())},
        "Id": id,
        "SystemModstamp": record.get("SystemModstamp").cloned().unwrap_or(Value::Null),
    });
    for name in obj.fields.keys() {
        out[name] = record.get(name).cloned().unwrap_or(Value::Null);
    }
    out
}

/// Path parameters of record URLs.
#[derive(Deserialize)]
struct RecordPath {
    version: String,
    sobject: String,
    field: String,
    value: String,
}

/// Resolve a record URL to its schema; 404 for an unknown object or a field that is no external id.
fn resolve<'a>(app: &'a App, p: &RecordPath) -> Result<&'a SObject, Response> {
    let obj = sobject(app, &p.sobject)?;
    external_id(obj, &p.field)?;
    Ok(obj)
}

async fn read(
    State(app): State<Arc<App>>,
    Path(p): Path<RecordPath>,
) -> Result<Response, Response> {
    let obj = resolve(&app, &p)?;
    let inner = app.lock();
    let id = find(&inner.store, &p.sobject, &p.field, &p.value).ok_or_else(not_found)?;
    let record = inner
        .store
        .get(System::Salesforce, &p.sobject)
        .and_then(|t| t.get(&id))
        .ok_or_else(not_found)?;
    Ok(json(
        StatusCode::OK,
        render(&p.sobject, obj, &p.version, record),
    ))
}

async fn remove(
    State(app): State<Arc<App>>,
    Path(p): Path<RecordPath>,
) -> Result<Response, Response> {
    resolve(&app, &p)?;
    let mut inner = app.lock();
    let id = find(&inner.store, &p.sobject, &p.field, &p.value).ok_or_else(not_found)?;
    inner
        .store
        .table(System::Salesforce, &p.sobject)
        .remove(&id);
    app.persist(&inner);
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Path parameters of record-Id URLs.
#[derive(Deserialize)]
struct IdPath {
    version: String,
    sobject: String,
    id: String,
}

/// The stored key of record `id` of the object: 18-character ids as they are, 15-character
/// ones with their case-safe suffix added (the REST API takes both).
fn by_id(store: &Store, object: &str, id: &str) -> Option<String> {
    let id = match id.len() {
        15 => case_safe(id),
        18 => id.to_owned(),
        _ => return None,
    };
    store
        .get(System::Salesforce, object)
        .is_some_and(|t| t.contains_key(&id))
        .then_some(id)
}

/// `GET sobjects/{object}/{id}`.
async fn read_by_id(
    State(app): State<Arc<App>>,
    Path(p): Path<IdPath>,
) -> Result<Response, Response> {
    let obj = sobject(&app, &p.sobject)?;
    let inner = app.lock();
    let id = by_id(&inner.store, &p.sobject, &p.id).ok_or_else(not_found)?;
    let record = &inner
        .store
        .get(System::Salesforce, &p.sobject)
        .expect("found in it")[&id];
    Ok(json(
        StatusCode::OK,
        render(&p.sobject, obj, &p.version, record),
    ))
}

/// `PATCH sobjects/{object}/{id}`: update; 204 as the REST API answers an update.
async fn update_by_id(
    State(app): State<Arc<App>>,
    Path(p): Path<IdPath>,
    body: Bytes,
) -> Result<Response, Response> {
    let obj = sobject(&app, &p.sobject)?;
    let mut fields = object_body(&body)?;
    fields.remove("attributes");
    validate(&p.sobject, obj, &fields).map_err(|errors| {
        json(
            StatusCode::BAD_REQUEST,
            Value::Array(errors.iter().map(FieldError::rest).collect()),
        )
    })?;
    let mut inner = app.lock();
    let id = by_id(&inner.store, &p.sobject, &p.id).ok_or_else(not_found)?;
    // A new external id value must be findable by the next upsert: tell the store's index.
    let external: Vec<(String, String)> = fields
        .iter()
        .filter(|(f, _)| obj.fields.get(*f).is_some_and(|f| f.external_id))
        .filter_map(|(f, v)| Some((f.clone(), v.as_str()?.to_owned())))
        .collect();
    let record = inner
        .store
        .table(System::Salesforce, &p.sobject)
        .get_mut(&id)
        .expect("found in it");
    record.extend(fields);
    record.insert("SystemModstamp".into(), modstamp().into());
    for (field, value) in external {
        inner
            .store
            .indexed(System::Salesforce, &p.sobject, &field, &value, &id);
    }
    app.persist(&inner);
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `DELETE sobjects/{object}/{id}`.
async fn remove_by_id(
    State(app): State<Arc<App>>,
    Path(p): Path<IdPath>,
) -> Result<Response, Response> {
    sobject(&app, &p.sobject)?;
    let mut inner = app.lock();
    let id = by_id(&inner.store, &p.sobject, &p.id).ok_or_else(not_found)?;
    inner
        .store
        .table(System::Salesforce, &p.sobject)
        .remove(&id);
    app.persist(&inner);
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// A JSON object body, or the REST API's parse error.
fn object_body(body: &[u8]) -> Result<Record, Response> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(error(
            StatusCode::BAD_REQUEST,
            "JSON_PARSER_ERROR",
            "The request body must be a JSON object",
        )),
        Err(e) => Err(error(
            StatusCode::BAD_REQUEST,
            "JSON_PARSER_ERROR",
            format!("Unexpected character: {e}"),
        )),
    }
}

async fn upsert(
    State(app): State<Arc<App>>,
    Path(p): Path<RecordPath>,
    body: Bytes,
) -> Result<Response, Response> {
    let obj = resolve(&app, &p)?;
    let mut fields = object_body(&body)?;
    fields.remove("attributes");
    if fields.contains_key(&p.field) {
        let message = format!(
            "The {} field should not be specified in the sobject data.",
            p.field
        );
        return Err(json(
            StatusCode::BAD_REQUEST,
            json!([FieldError::new("INVALID_FIELD", message, Some(&p.field)).rest()]),
        ));
    }
    validate(&p.sobject, obj, &fields).map_err(|errors| {
        json(
            StatusCode::BAD_REQUEST,
            Value::Array(errors.iter().map(FieldError::rest).collect()),
        )
    })?;
    let mut inner = app.lock();
    let existing = find(&inner.store, &p.sobject, &p.field, &p.value);
    let (id, created) = write(
        &mut inner.store,
        &p.sobject,
        &obj.key_prefix,
        existing,
        (&p.field, &p.value),
        fields,
    );
    app.persist(&inner);
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok(json(
        status,
        json!({"id": id, "success": true, "errors": [], "created": created}),
    ))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Collection {
    #[serde(default)]
    all_or_none: bool,
    records: Vec<Value>,
}

async fn upsert_collection(
    State(app): State<Arc<App>>,
    Path(p): Path<HashMap<String, String>>,
    body: Bytes,
) -> Result<Response, Response> {
    let (object, field) = (&p["sobject"], &p["field"]);
    let obj = sobject(&app, object)?;
    external_id(obj, field)?;
    let req: Collection = serde_json::from_slice(&body)
        .map_err(|e| error(StatusCode::BAD_REQUEST, "JSON_PARSER_ERROR", e.to_string()))?;
    if req.records.len() > COLLECTION_LIMIT {
        return Err(error(
            StatusCode::BAD_REQUEST,
            "EXCEEDED_ID_LIMIT",
            format!(
                "record limit reached. cannot submit more than {COLLECTION_LIMIT} records into this call"
            ),
        ));
    }
    let ext_of = |r: &Value| {
        r.get(field.as_str())
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    let mut seen: HashMap<String, usize> = HashMap::new();
    for ext in req.records.iter().filter_map(ext_of) {
        *seen.entry(ext).or_default() += 1;
    }
    let prepared: Vec<Result<(String, Record), Vec<FieldError>>> = req
        .records
        .iter()
        .map(|r| {
            let mut fields = r.as_object().cloned().unwrap_or_default();
            let kind = fields
                .remove("attributes")
                .and_then(|a| a.get("type").and_then(Value::as_str).map(str::to_owned));
            if kind.as_deref() != Some(object.as_str()) {
                return Err(vec![FieldError::new(
                    "INVALID_TYPE",
                    "Must send a concrete entity type.",
                    None,
                )]);
            }
            let Some(ext) = fields
                .remove(field.as_str())
                .and_then(|v| v.as_str().map(str::to_owned))
                .filter(|v| !v.is_empty())
            else {
                return Err(vec![FieldError::new(
                    "REQUIRED_FIELD_MISSING",
                    format!("Required fields are missing: [{field}]"),
                    Some(field),
                )]);
            };
            if seen[&ext] > 1 {
                let message = format!("Duplicate external id specified: {ext}");
                return Err(vec![FieldError::new(
                    "DUPLICATE_VALUE",
                    message,
                    Some(field),
                )]);
            }
            validate(object, obj, &fields).map(|()| (ext, fields))
        })
        .collect();
    let rolled_back = req.all_or_none && prepared.iter().any(Result::is_err);
    let mut inner = app.lock();
    let results: Vec<Value> = prepared
        .into_iter()
        .map(|r| match r {
            Ok(_) if rolled_back => failure(&[FieldError::new(
                "ALL_OR_NONE_OPERATION_ROLLED_BACK",
                "Record rolled back because not all records were valid and the request was using AllOrNone header",
                None,
            )]),
            Ok((ext, fields)) => {
                let existing = find(&inner.store, object, field, &ext);
                let (id, created) = write(&mut inner.store, object, &obj.key_prefix, existing, (field, &ext), fields);
                json!({"id": id, "success": true, "errors": [], "created": created})
            }
            Err(errors) => failure(&errors),
        })
        .collect();
    if !rolled_back {
        app.persist(&inner);
    }
    Ok(json(StatusCode::OK, Value::Array(results)))
}

fn failure(errors: &[FieldError]) -> Value {
    json!({"id": null, "success": false, "errors": errors.iter().map(FieldError::collection).collect::<Vec<_>>(), "created": false})
}

/// `DELETE composite/sobjects?ids=...&allOrNone=...`: delete records by Id, of any object.
async fn delete_collection(State(app): State<Arc<App>>, RawQuery(query): RawQuery) -> Response {
    let ids: Vec<String> = query_param(query.as_deref(), "ids")
        .map(|s| {
            s.split(',')
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default();
    if ids.len() > COLLECTION_LIMIT {
        return error(
            StatusCode::BAD_REQUEST,
            "EXCEEDED_ID_LIMIT",
            "record limit reached. cannot delete more than 200 records",
        );
    }
    let all_or_none = query_param(query.as_deref(), "allOrNone").is_some_and(|v| v == "true");
    let mut inner = app.lock();
    let objects: Vec<String> = app.cfg.salesforce.objects.keys().cloned().collect();
    let located: Vec<Option<String>> = ids
        .iter()
        .map(|id| {
            objects
                .iter()
                .find(|o| {
                    inner
                        .store
                        .get(System::Salesforce, o)
                        .is_some_and(|t| t.contains_key(id))
                })
                .cloned()
        })
        .collect();
    let rolled_back = all_or_none && located.iter().any(Option::is_none);
    let results: Vec<Value> = ids
        .iter()
        .zip(located)
        .map(|(id, object)| match object {
            Some(_) if rolled_back => {
                let message = "Record rolled back because not all records were valid and the request was using AllOrNone header";
                json!({"id": id, "success": false, "errors": [FieldError::new("ALL_OR_NONE_OPERATION_ROLLED_BACK", message, None).collection()]})
            }
            Some(object) => {
                inner.store.table(System::Salesforce, &object).remove(id);
                json!({"id": id, "success": true, "errors": []})
            }
            None => json!({"id": id, "success": false, "errors": [FieldError::new("ENTITY_IS_DELETED", "entity is deleted", None).collection()]}),
        })
        .collect();
    if !rolled_back {
        app.persist(&inner);
    }
    json(StatusCode::OK, Value::Array(results))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::emulator::config::EmulatorConfig;

    fn contact() -> SObject {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("connector-config/crm-emulator.toml");
        EmulatorConfig::load(&path)
            .unwrap()
            .salesforce
            .objects
            .remove("Contact")
            .unwrap()
    }

    #[test]
    fn ids_have_the_case_safe_suffix() {
        assert_eq!(case_safe("0015000000Gv7qJ"), "0015000000Gv7qJAAR"); // a documented pair
        let id = sf_id("003", 62);
        assert_eq!(id.len(), 18);
        assert_eq!(&id[..15], "0035e0000000010");
        assert_eq!(&id[15..], "AAA");
        assert_eq!(&sf_id("003", 10)[..15], "0035e000000000A");
        assert_eq!(&sf_id("003", 10)[15..], "AAQ");
    }

    #[test]
    fn validation_codes() {
        let c = contact();
        let codes = |v: Value| match validate("Contact", &c, v.as_object().unwrap()) {
            Ok(()) => vec![],
            Err(e) => e.into_iter().map(|e| e.code).collect::<Vec<_>>(),
        };
        assert!(
            codes(json!({"Call_Outcome__c": "Good", "Quality_Score__c": 7.5, "Agent_Identified__c": true})).is_empty()
        );
        assert!(
            codes(json!({"Call_Outcome__c": null, "Call_Date__c": "2025-01-02T03:04:05.000+0000"}))
                .is_empty()
        );
        assert_eq!(codes(json!({"Nope__c": 1})), ["INVALID_FIELD"]);
        assert_eq!(codes(json!({"Id": "003"})), ["INVALID_FIELD"]);
        assert_eq!(
            codes(json!({"Call_Outcome__c": "Great"})),
            ["INVALID_OR_NULL_FOR_RESTRICTED_PICKLIST"]
        );
        assert_eq!(
            codes(json!({"Agent_Identified__c": "true"})),
            ["INVALID_TYPE_ON_FIELD_IN_RECORD"]
        );
        assert_eq!(
            codes(json!({"Quality_Score__c": "8"})),
            ["INVALID_TYPE_ON_FIELD_IN_RECORD"]
        );
        assert_eq!(
            codes(json!({"Agent_ID__c": "x".repeat(256)})),
            ["STRING_TOO_LONG"]
        );
        assert_eq!(
            codes(json!({"Call_Date__c": "yesterday"})),
            ["JSON_PARSER_ERROR"]
        );
    }

    #[test]
    fn bulk_error_text() {
        let e = check_value(
            "Call_Outcome__c",
            &contact().fields["Call_Outcome__c"],
            &json!("X"),
        )
        .unwrap_err();
        assert_eq!(
            e.bulk(),
            "INVALID_OR_NULL_FOR_RESTRICTED_PICKLIST:bad value for restricted picklist field: X:Call_Outcome__c --"
        );
    }
}
