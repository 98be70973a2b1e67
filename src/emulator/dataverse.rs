//! Microsoft Dataverse Web API: Entra ID client-credentials tokens (and the OpenID discovery
//! document MSAL reads first), create, upsert / read / delete by alternate key or GUID with the
//! conditional headers, the bulk messages `UpsertMultiple` and `CreateMultiple` (all or nothing,
//! as on a standard table), `$batch` with atomic change sets, the table, key, attribute and
//! choice metadata, and service protection (429 with `Retry-After`). A `$batch` and a bulk
//! message count as one request each toward the sliding service-protection window, as
//! Microsoft documents.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Form, Path, RawQuery, Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use serde_json::{Map, Value, json};

use super::batch::{self, Item, Reply, ReplyItem};
use super::config::{DvAttribute, DvType, Entity, RateLimit};
use super::store::{Record, Store};
use super::{App, Inner, Refusal, System, decode, guid, header_str, query_param, tracked};

/// Service root of the Web API.
const ROOT: &str = "/api/data/v9.2";
/// Most requests one `$batch` may hold.
const BATCH_LIMIT: usize = 1000;
/// Ids `WhoAmI` reports.
const ORG_ID: &str = "00000000-0000-4000-8000-00000000000a";
const USER_ID: &str = "00000000-0000-4000-8000-00000000000b";
const UNIT_ID: &str = "00000000-0000-4000-8000-00000000000c";
/// The namespace of bound actions and metadata types.
const NS: &str = "Microsoft.Dynamics.CRM.";

pub(super) fn routes(app: &Arc<App>) -> Router<Arc<App>> {
    let data = Router::new()
        .route(&format!("{ROOT}/$batch"), post(batch))
        .route(&format!("{ROOT}/{{seg}}"), any(single))
        .route(
            &format!("{ROOT}/{{seg}}/{NS}UpsertMultiple"),
            post(upsert_multiple),
        )
        .route(
            &format!("{ROOT}/{{seg}}/{NS}CreateMultiple"),
            post(create_multiple),
        )
        .route(
            &format!("{ROOT}/{{seg}}/{{attrs}}"),
            get(metadata).post(other_action),
        )
        .route(&format!("{ROOT}/{{seg}}/{{attrs}}/{{cast}}"), get(metadata))
        .route_layer(middleware::from_fn_with_state(app.clone(), gate));
    let all = Router::new()
        .route("/{tenant}/oauth2/v2.0/token", post(token))
        .route(
            "/{tenant}/v2.0/.well-known/openid-configuration",
            get(openid_configuration),
        )
        .merge(data);
    tracked(all, app, System::Dataverse)
}

/// A Web API error: `{"error":{"code","message"}}`.
fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Reply {
    Reply::new(
        status,
        Some(json!({"error": {"code": code, "message": message.into()}})),
    )
}

impl IntoResponse for Reply {
    fn into_response(self) -> Response {
        let mut res = match self.body {
            Some(body) => {
                let mut res = (self.status, body.to_string()).into_response();
                let ct = HeaderValue::from_static("application/json; odata.metadata=minimal");
                res.headers_mut().insert(header::CONTENT_TYPE, ct);
                res
            }
            None => self.status.into_response(),
        };
        let headers = res.headers_mut();
        headers.insert("odata-version", HeaderValue::from_static("4.0"));
        for (k, v) in self.headers {
            if let (Ok(k), Ok(v)) = (
                HeaderName::from_bytes(k.as_bytes()),
                HeaderValue::from_str(&v),
            ) {
                headers.insert(k, v);
            }
        }
        res
    }
}

/// 429 as service protection answers it.
fn too_many(retry_after: std::time::Duration, limit: &RateLimit) -> Response {
    let secs = retry_after.as_secs_f64().ceil().max(1.0) as u64;
    let message = format!(
        "Number of requests exceeded the limit of {} over time window of {} seconds.",
        limit.requests,
        limit.window.as_secs()
    );
    let mut reply = error(StatusCode::TOO_MANY_REQUESTS, "0x80072322", message);
    reply.headers.push(("Retry-After", secs.to_string()));
    reply.into_response()
}

/// Auth, injected faults and the service-protection window, for data calls.
async fn gate(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    if !app.bearer_ok(System::Dataverse, req.headers()) {
        let mut reply = error(
            StatusCode::UNAUTHORIZED,
            "0x80072560",
            "The access token is missing, invalid or expired; get a new one from the token endpoint.",
        );
        reply
            .headers
            .push(("WWW-Authenticate", "Bearer error=\"invalid_token\"".into()));
        return reply.into_response();
    }
    let window = app.cfg.dataverse.rate_limit;
    // Every call is one request, a $batch or a bulk message included (their inner operations
    // count only toward the execution-time and daily entitlement limits).
    match app
        .inject(System::Dataverse)
        .await
        .and_then(|()| app.dv_charge(&window))
    {
        Ok(()) => {
            let mut resp = next.run(req).await;
            let left = app.dv_remaining(&window);
            resp.headers_mut().insert(
                "x-ms-ratelimit-burst-remaining-xrm-requests",
                HeaderValue::from(left),
            );
            resp
        }
        Err(Refusal::Unavailable) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "0x80040216",
            "Service Unavailable",
        )
        .into_response(),
        Err(Refusal::TooMany { retry_after }) => too_many(retry_after, &window),
    }
}

/// `GET /{tenant}/v2.0/.well-known/openid-configuration`: Entra ID's OpenID Connect discovery
/// document. MSAL (behind `azure-identity`) reads `token_endpoint` here before asking for a
/// token, so every endpoint points back at the emulator.
async fn openid_configuration(State(app): State<Arc<App>>, Path(tenant): Path<String>) -> Response {
    if tenant != app.cfg.dataverse.tenant {
        return super::json(
            StatusCode::BAD_REQUEST,
            json!({"error": "invalid_tenant", "error_description": format!(
                "AADSTS90002: Tenant '{tenant}' not found. Check to make sure you have the correct tenant ID and are signing into the correct cloud."
            )}),
        );
    }
    let base = format!("{}/{tenant}", app.base_url);
    super::json(
        StatusCode::OK,
        json!({
            "token_endpoint": format!("{base}/oauth2/v2.0/token"),
            "token_endpoint_auth_methods_supported": ["client_secret_post", "private_key_jwt", "client_secret_basic"],
            "jwks_uri": format!("{base}/discovery/v2.0/keys"),
            "response_modes_supported": ["query", "fragment", "form_post"],
            "subject_types_supported": ["pairwise"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "response_types_supported": ["code", "id_token", "code id_token", "id_token token"],
            "scopes_supported": ["openid", "profile", "email", "offline_access"],
            "issuer": format!("{base}/v2.0"),
            "request_uri_parameter_supported": false,
            "authorization_endpoint": format!("{base}/oauth2/v2.0/authorize"),
            "device_authorization_endpoint": format!("{base}/oauth2/v2.0/devicecode"),
            "end_session_endpoint": format!("{base}/oauth2/v2.0/logout"),
            "http_logout_supported": true,
            "frontchannel_logout_supported": true,
            "tenant_region_scope": "NA",
            "cloud_instance_name": "microsoftonline.com",
            "cloud_graph_host_name": "graph.windows.net",
            "msgraph_host": "graph.microsoft.com",
        }),
    )
}

async fn token(
    State(app): State<Arc<App>>,
    Path(tenant): Path<String>,
    headers: HeaderMap,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    let dv = &app.cfg.dataverse;
    let fail = |code: &str, description: String| {
        super::json(
            StatusCode::BAD_REQUEST,
            json!({"error": code, "error_description": description}),
        )
    };
    let field = |k: &str| form.get(k).map_or("", String::as_str);
    let (client_id, secret) = super::client_credentials(&headers, &form);
    let (client_id, secret) = (client_id.unwrap_or_default(), secret.unwrap_or_default());
    if tenant != dv.tenant {
        return fail(
            "invalid_request",
            format!(
                "AADSTS90002: Tenant '{tenant}' not found. Check to make sure you have the correct tenant ID and are signing into the correct cloud."
            ),
        );
    }
    if field("grant_type") != "client_credentials" {
        return fail(
            "unsupported_grant_type",
            "AADSTS70003: The app requested an unsupported grant type.".into(),
        );
    }
    if client_id != dv.client_id {
        return fail(
            "unauthorized_client",
            format!(
                "AADSTS700016: Application with identifier '{client_id}' was not found in the directory '{tenant}'."
            ),
        );
    }
    if secret != dv.client_secret {
        return fail(
            "invalid_client",
            format!(
                "AADSTS7000215: Invalid client secret provided. Ensure the secret being sent in the request is the client secret value, not the client secret ID, for a secret added to app '{}'.",
                dv.client_id
            ),
        );
    }
    let scope = field("scope");
    if scope.is_empty() {
        return fail(
            "invalid_request",
            "AADSTS900144: The request body must contain the following parameter: 'scope'.".into(),
        );
    }
    if !scope.ends_with("/.default") {
        return fail(
            "invalid_scope",
            format!(
                "AADSTS1002012: The provided value for scope {scope} is not valid. Client credential flows must have a scope value with /.default suffixed to the resource identifier (application ID URI)."
            ),
        );
    }
    let access_token = app.issue_token(System::Dataverse, "eyJ0eXAiOiJKV1QiLCJhbGciOiJSUzI1NiJ9.");
    let expires_in = app
        .token_lifetime(&app.lock(), System::Dataverse)
        .as_secs()
        .saturating_sub(1);
    super::json(
        StatusCode::OK,
        json!({"token_type": "Bearer", "expires_in": expires_in, "ext_expires_in": expires_in, "access_token": access_token}),
    )
}

/// The key part of a record URL segment such as `contacts(trusst_contact_id='a')`.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Key {
    /// The primary id (a GUID, unquoted).
    Id(String),
    /// Alternate key columns and their values (quotes removed, `''` unescaped).
    Alternate(Vec<(String, String)>),
}

/// Split `set(key)` into the set name and its key; no parentheses, no key.
pub(super) fn parse_key_segment(segment: &str) -> Result<(&str, Option<Key>), String> {
    let Some(open) = segment.find('(') else {
        return Ok((segment, None));
    };
    let invalid = || format!("'{segment}' is not a valid key segment");
    let inner = segment[open + 1..].strip_suffix(')').ok_or_else(invalid)?;
    let mut chars = inner.chars().peekable();
    let mut pairs = vec![];
    loop {
        let mut name = String::new();
        while let Some(c) = chars.next_if(|c| *c != '=' && *c != ',') {
            name.push(c);
        }
        let name = name.trim().to_owned();
        match chars.next() {
            Some('=') if !name.is_empty() => {}
            None if pairs.is_empty() && !name.is_empty() => {
                return Ok((&segment[..open], Some(Key::Id(name))));
            }
            _ => return Err(invalid()),
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if_eq(&'\'').is_some() {
            loop {
                match chars.next() {
                    Some('\'') if chars.next_if_eq(&'\'').is_some() => value.push('\''),
                    Some('\'') => break,
                    Some(c) => value.push(c),
                    None => return Err(invalid()),
                }
            }
            while chars.next_if(|c| c.is_whitespace()).is_some() {}
        } else {
            while let Some(c) = chars.next_if(|c| *c != ',') {
                value.push(c);
            }
            value = value.trim().to_owned();
        }
        pairs.push((name, value));
        match chars.next() {
            Some(',') => {}
            None => return Ok((&segment[..open], Some(Key::Alternate(pairs)))),
            Some(_) => return Err(invalid()),
        }
    }
}

/// Direct calls on a record: `{ROOT}/contacts(...)`.
async fn single(
    State(app): State<Arc<App>>,
    method: Method,
    Path(seg): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let headers: Vec<(String, String)> = headers
        .iter()
        .filter_map(|(k, v)| Some((k.as_str().to_owned(), v.to_str().ok()?.to_owned())))
        .collect();
    let mut inner = app.lock();
    let reply = execute(
        &app,
        &mut inner,
        method.as_str(),
        &seg,
        query.as_deref(),
        &headers,
        &body,
    );
    if method != Method::GET && !reply.failed() {
        app.persist(&inner);
    }
    reply.into_response()
}

/// One Web API request on a record, direct or from a `$batch`.
fn execute(
    app: &App,
    inner: &mut Inner,
    method: &str,
    segment: &str,
    query: Option<&str>,
    headers: &[(String, String)],
    body: &[u8],
) -> Reply {
    if method == "GET" && segment.trim_end_matches("()") == "WhoAmI" {
        let context = format!(
            "{}{ROOT}/$metadata#Microsoft.Dynamics.CRM.WhoAmIResponse",
            app.base_url
        );
        let body = json!({"@odata.context": context, "BusinessUnitId": UNIT_ID, "UserId": USER_ID, "OrganizationId": ORG_ID});
        return Reply::new(StatusCode::OK, Some(body));
    }
    let (set, key) = match parse_key_segment(segment) {
        Ok(parsed) => parsed,
        Err(e) => return error(StatusCode::BAD_REQUEST, "0x80060888", e),
    };
    if set == "EntityDefinitions" && method == "GET" {
        return entity_definitions(app, key, query);
    }
    let Some((logical, entity)) = app
        .cfg
        .dataverse
        .entities
        .iter()
        .find(|(_, e)| e.entity_set == set)
    else {
        return error(
            StatusCode::NOT_FOUND,
            "0x8006088a",
            format!("Resource not found for the segment '{set}'."),
        );
    };
    let target = Target {
        app,
        logical,
        entity,
        set,
    };
    let representation =
        batch::header(headers, "prefer").is_some_and(|p| p.contains("return=representation"));
    let Some(key) = key else {
        if method == "POST" {
            return target.create(inner, body, representation);
        }
        let message = format!(
            "The emulator serves POST {set} (create) and single records: {set}(<guid>) or {set}(<alternate key>=...)"
        );
        return error(StatusCode::NOT_IMPLEMENTED, "0x8006088a", message);
    };
    let found = match target.locate(&inner.store, &key) {
        Ok(found) => found,
        Err(reply) => return reply,
    };
    let header = |name| batch::header(headers, name);
    match (method, found) {
        ("GET", Some(id)) => {
            let record = &inner
                .store
                .get(System::Dataverse, logical)
                .expect("found in it")[&id];
            match target.render(record, query_param(query, "$select").as_deref()) {
                Ok(body) => Reply::new(StatusCode::OK, Some(body)),
                Err(reply) => reply,
            }
        }
        ("DELETE", Some(id)) => {
            inner.store.table(System::Dataverse, logical).remove(&id);
            Reply::new(StatusCode::NO_CONTENT, None)
        }
        ("GET" | "DELETE", None) => target.missing(&key),
        ("PATCH", found) => target.upsert(
            inner,
            &key,
            found,
            (header("if-match"), header("if-none-match")),
            body,
            representation,
        ),
        _ => error(
            StatusCode::METHOD_NOT_ALLOWED,
            "0x80060888",
            format!("{method} is not supported on {set} records"),
        ),
    }
}

/// The entity a request addresses.
struct Target<'a> {
    app: &'a App,
    logical: &'a str,
    entity: &'a Entity,
    set: &'a str,
}

impl Target<'_> {
    /// The primary id attribute (`contactid`).
    fn id_attr(&self) -> String {
        format!("{}id", self.logical)
    }

    /// The GUID of the record the key names, if it exists; 400 for a key that is not the
    /// entity's alternate key.
    fn locate(&self, store: &Store, key: &Key) -> Result<Option<String>, Reply> {
        let table = store.get(System::Dataverse, self.logical);
        let pairs = match key {
            Key::Id(id) => return Ok(table.filter(|t| t.contains_key(id)).map(|_| id.clone())),
            Key::Alternate(pairs) => pairs,
        };
        let names: BTreeSet<&str> = pairs.iter().map(|(k, _)| k.as_str()).collect();
        if names
            != self
                .entity
                .alternate_key
                .iter()
                .map(String::as_str)
                .collect()
            || names.len() != pairs.len()
        {
            let message = format!(
                "The key ({}) is not an alternate key of entity '{}'; its key is ({})",
                pairs
                    .iter()
                    .map(|(k, _)| k.as_str())
                    .collect::<Vec<_>>()
                    .join(","),
                self.logical,
                self.entity.alternate_key.join(",")
            );
            return Err(error(StatusCode::BAD_REQUEST, "0x80060888", message));
        }
        // A single non-numeric key goes through the store's index (complete for string values)
        // instead of a table scan; a numeric-looking one may match a number column, so it scans.
        if let [(k, v)] = pairs.as_slice()
            && v.parse::<f64>().is_err()
        {
            return Ok(store.find(System::Dataverse, self.logical, k, v));
        }
        let matches = |r: &Record| {
            pairs.iter().all(|(k, v)| match r.get(k) {
                Some(Value::String(s)) => s == v,
                Some(Value::Number(n)) => n.to_string() == *v,
                _ => false,
            })
        };
        Ok(table.and_then(|t| t.iter().find(|(_, r)| matches(r)).map(|(id, _)| id.clone())))
    }

    /// 404 for a key that names no record.
    fn missing(&self, key: &Key) -> Reply {
        let message = match key {
            Key::Id(id) => format!("{} With Id = {id} Does Not Exist", self.logical),
            Key::Alternate(_) => {
                format!(
                    "A record with the specified key values does not exist in {} entity",
                    self.logical
                )
            }
        };
        error(StatusCode::NOT_FOUND, "0x80040217", message)
    }

    /// A record as the Web API returns it: the selected (default: all) attributes, null when unset.
    fn render(&self, record: &Record, select: Option<&str>) -> Result<Value, Reply> {
        let id_attr = self.id_attr();
        let names: Vec<&str> = match select {
            Some(s) => s
                .split(',')
                .map(str::trim)
                .filter(|n| *n != id_attr)
                .collect(),
            None => self.entity.attributes.keys().map(String::as_str).collect(),
        };
        let mut out = Map::new();
        out.insert(
            "@odata.context".into(),
            format!("{}{ROOT}/$metadata#{}/$entity", self.app.base_url, self.set).into(),
        );
        out.insert(
            "@odata.etag".into(),
            format!(
                "W/\"{}\"",
                record.get("versionnumber").unwrap_or(&Value::Null)
            )
            .into(),
        );
        for name in names {
            if !self.entity.attributes.contains_key(name) {
                let message = format!(
                    "Could not find a property named '{name}' on type 'Microsoft.Dynamics.CRM.{}'.",
                    self.logical
                );
                return Err(error(StatusCode::BAD_REQUEST, "0x80060888", message));
            }
            out.insert(
                name.into(),
                record.get(name).cloned().unwrap_or(Value::Null),
            );
        }
        out.insert(
            id_attr.clone(),
            record.get(&id_attr).cloned().unwrap_or(Value::Null),
        );
        Ok(Value::Object(out))
    }

    /// PATCH: upsert, or update only (`If-Match`), or create only (`If-None-Match: *`).
    fn upsert(
        &self,
        inner: &mut Inner,
        key: &Key,
        found: Option<String>,
        (if_match, if_none_match): (Option<&str>, Option<&str>),
        body: &[u8],
        representation: bool,
    ) -> Reply {
        let table = inner.store.get(System::Dataverse, self.logical);
        let version = |id: &str| {
            table
                .and_then(|t| t[id].get("versionnumber"))
                .map(|v| format!("W/\"{v}\""))
        };
        match (&found, if_match, if_none_match) {
            (None, Some(_), _) => return self.missing(key),
            (Some(_), _, Some("*")) => {
                return error(
                    StatusCode::PRECONDITION_FAILED,
                    "0x80040237",
                    "A record with matching key values already exists.",
                );
            }
            (Some(id), Some(etag), _) if etag != "*" && version(id).as_deref() != Some(etag) => {
                let message = "The version of the existing record doesn't match the RowVersion property provided.";
                return error(StatusCode::PRECONDITION_FAILED, "0x80060882", message);
            }
            _ => {}
        }
        let fields = match serde_json::from_slice::<Value>(body) {
            Ok(Value::Object(fields)) => fields,
            _ => return self.payload_error("the body must be a JSON object"),
        };
        if let Err(reply) = self.validate(&fields) {
            return reply;
        }
        let key_values = match self.key_values(key, &fields) {
            Ok(v) => v,
            Err(reply) => return reply,
        };
        let slot = match found {
            Some(id) => Slot::Existing(id),
            None => Slot::New(match key {
                Key::Id(id) => id.clone(),
                Key::Alternate(_) => guid(),
            }),
        };
        let created = matches!(slot, Slot::New(_));
        let id = self.store_record(inner, slot, key_values, fields);
        self.written(inner, &id, created, representation)
    }

    /// POST on the entity set: a new record, with the GUID the body's primary id column gives
    /// or a new one; 412 when that GUID or the alternate key values are taken.
    fn create(&self, inner: &mut Inner, body: &[u8], representation: bool) -> Reply {
        let mut fields = match serde_json::from_slice::<Value>(body) {
            Ok(Value::Object(fields)) => fields,
            _ => return self.payload_error("the body must be a JSON object"),
        };
        let id = match self.take_id(&mut fields) {
            Ok(id) => id,
            Err(reply) => return reply,
        };
        if let Err(reply) = self.validate(&fields) {
            return reply;
        }
        if let Err(reply) = self.unique(&inner.store, id.as_deref(), &fields) {
            return reply;
        }
        let id = self.store_record(
            inner,
            Slot::New(id.unwrap_or_else(guid)),
            Record::new(),
            fields,
        );
        self.written(inner, &id, true, representation)
    }

    /// The primary id column (`contactid`) taken out of a body: it names the record, it is not
    /// one of the entity's attributes.
    fn take_id(&self, fields: &mut Record) -> Result<Option<String>, Reply> {
        match fields.remove(&self.id_attr()) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(id)) if is_guid(&id) => Ok(Some(id.to_ascii_lowercase())),
            Some(other) => Err(self.payload_error(&format!(
                "Cannot convert the literal '{}' to the expected type 'Edm.Guid'.",
                other
                    .as_str()
                    .map_or_else(|| other.to_string(), str::to_owned)
            ))),
        }
    }

    /// 412 when a new record would take a GUID or alternate key values another record has.
    fn unique(&self, store: &Store, id: Option<&str>, fields: &Record) -> Result<(), Reply> {
        let taken = match id {
            Some(id) => self.locate(store, &Key::Id(id.to_owned()))?.is_some(),
            None => false,
        } || match self.body_key(fields) {
            Some(key) => self.locate(store, &key)?.is_some(),
            None => false,
        };
        if taken {
            return Err(error(
                StatusCode::PRECONDITION_FAILED,
                "0x80040237",
                format!(
                    "A record that has the attribute values {} already exists. The entity key requires that this set of attributes contains unique values. Select unique values and try again.",
                    self.entity.alternate_key.join(", ")
                ),
            ));
        }
        Ok(())
    }

    /// The alternate key a body's own columns spell out, when it has every key column.
    fn body_key(&self, fields: &Record) -> Option<Key> {
        let pairs = self
            .entity
            .alternate_key
            .iter()
            .map(|k| match fields.get(k)? {
                Value::String(s) => Some((k.clone(), s.clone())),
                Value::Number(n) => Some((k.clone(), n.to_string())),
                _ => None,
            })
            .collect::<Option<Vec<_>>>()?;
        Some(Key::Alternate(pairs))
    }

    /// Write checked fields (and, for a new record, the key values from the URL) into a
    /// record; returns its GUID.
    fn store_record(
        &self,
        inner: &mut Inner,
        slot: Slot,
        key_values: Record,
        fields: Record,
    ) -> String {
        let version = inner.store.next_seq();
        let (id, created) = match slot {
            Slot::Existing(id) => (id, false),
            Slot::New(id) => (id, true),
        };
        let record = inner
            .store
            .table(System::Dataverse, self.logical)
            .entry(id.clone())
            .or_default();
        if created {
            record.insert(self.id_attr(), id.clone().into());
            record.extend(key_values);
        }
        record.extend(
            fields
                .into_iter()
                .filter(|(k, _)| !k.starts_with("@odata.")),
        );
        record.insert("versionnumber".into(), version.into());
        // Keep the lookup index of a one-column string key complete, however the value got
        // there (URL key, body column of a create).
        let indexed = match self.entity.alternate_key.as_slice() {
            [k] => record
                .get(k)
                .and_then(Value::as_str)
                .map(|v| (k.clone(), v.to_owned())),
            _ => None,
        };
        if let Some((k, v)) = indexed {
            inner
                .store
                .indexed(System::Dataverse, self.logical, &k, &v, &id);
        }
        id
    }

    /// The answer to a write of one record: 204 with `OData-EntityId`, or with
    /// `Prefer: return=representation` the record, 201 when created and 200 when updated.
    fn written(&self, inner: &Inner, id: &str, created: bool, representation: bool) -> Reply {
        if representation {
            let record = &inner
                .store
                .get(System::Dataverse, self.logical)
                .expect("just written")[id];
            let body = self.render(record, None).expect("every attribute is known");
            let status = if created {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            return Reply::new(status, Some(body));
        }
        let mut reply = Reply::new(StatusCode::NO_CONTENT, None);
        reply.headers.push((
            "OData-EntityId",
            format!("{}{ROOT}/{}({id})", self.app.base_url, self.set),
        ));
        reply
    }

    /// Check one item of a bulk message's `Targets`: its `@odata.type`, which record it names
    /// and its columns. Nothing is written here.
    fn bulk_item(
        &self,
        store: &Store,
        message: Bulk,
        i: usize,
        item: Value,
    ) -> Result<BulkWrite, Reply> {
        let Value::Object(mut fields) = item else {
            return Err(self.payload_error(&format!("Targets[{i}] is not a JSON object")));
        };
        let expected = format!("{NS}{}", self.logical);
        match fields.get("@odata.type").and_then(Value::as_str) {
            Some(t) if t.trim_start_matches('#') == expected => {}
            Some(t) => {
                return Err(self.payload_error(&format!(
                    "Targets[{i}] is of type '{t}', but {} on '{}' takes '{expected}'",
                    message.name(),
                    self.set
                )));
            }
            None => {
                return Err(self.payload_error(&format!(
                    "Targets[{i}] has no '@odata.type'; every record of a bulk operation needs \"@odata.type\": \"{expected}\""
                )));
            }
        }
        let named = match fields.remove("@odata.id") {
            None => None,
            Some(Value::String(url)) => Some(self.odata_id_key(&url)?),
            Some(other) => {
                return Err(self.payload_error(&format!(
                    "'@odata.id' of Targets[{i}] is {other}, not a record URL"
                )));
            }
        };
        let id = self.take_id(&mut fields)?;
        let key = match (named, id) {
            (Some(Key::Id(a)), Some(b)) if !a.eq_ignore_ascii_case(&b) => {
                return Err(self.payload_error(&format!(
                    "Targets[{i}]: '{}' contradicts '@odata.id'",
                    self.id_attr()
                )));
            }
            (Some(key), _) => Some(key),
            (None, id) => id.map(Key::Id),
        };
        self.validate(&fields)?;
        if let (Bulk::Upsert, Some(key)) = (message, &key) {
            let key_values = self.key_values(key, &fields)?;
            let (slot, identity) = match (self.locate(store, key)?, key) {
                (Some(id), _) => (Slot::Existing(id.clone()), format!("{}({id})", self.set)),
                (None, Key::Id(id)) => (Slot::New(id.clone()), format!("{}({id})", self.set)),
                (None, Key::Alternate(pairs)) => (Slot::New(guid()), self.key_text(pairs)),
            };
            return Ok(BulkWrite {
                slot,
                key_values,
                fields,
                identity,
            });
        }
        // Every record of CreateMultiple, and one UpsertMultiple names by nothing (Upsert
        // creates then), is new.
        let id = match key {
            Some(Key::Id(id)) => Some(id),
            Some(Key::Alternate(_)) => {
                return Err(self.payload_error(&format!(
                    "Targets[{i}]: CreateMultiple makes new records; name one by its primary id column, not by an alternate key"
                )));
            }
            None => None,
        };
        self.unique(store, id.as_deref(), &fields)?;
        let identity = match (&id, self.body_key(&fields)) {
            (Some(id), _) => format!("{}({id})", self.set),
            (None, Some(Key::Alternate(pairs))) => self.key_text(&pairs),
            _ => format!("Targets[{i}]"),
        };
        Ok(BulkWrite {
            slot: Slot::New(id.unwrap_or_else(guid)),
            key_values: Record::new(),
            fields,
            identity,
        })
    }

    /// The key of a record URL in `@odata.id`: relative (`contacts(k='v')`, as Microsoft's
    /// examples write it) or absolute.
    fn odata_id_key(&self, url: &str) -> Result<Key, Reply> {
        let path = match url.find(&format!("{ROOT}/")) {
            Some(i) => &url[i + ROOT.len() + 1..],
            None => url.trim_start_matches('/'),
        };
        let path = decode(path);
        match parse_key_segment(&path) {
            Ok((set, Some(key))) if set == self.set => Ok(key),
            Ok((set, Some(_))) => Err(self.payload_error(&format!(
                "'@odata.id' {url} names a record of '{set}', not of '{}'",
                self.set
            ))),
            _ => Err(self.payload_error(&format!(
                "'@odata.id' {url} is not a record URL such as {}(key='value')",
                self.set
            ))),
        }
    }

    /// An alternate key as text, the same whatever order its columns came in.
    fn key_text(&self, pairs: &[(String, String)]) -> String {
        let mut pairs: Vec<String> = pairs.iter().map(|(k, v)| format!("{k}='{v}'")).collect();
        pairs.sort();
        format!("{}({})", self.set, pairs.join(","))
    }

    /// The alternate-key values from the URL as typed attributes; a body may repeat them, but
    /// not contradict them.
    fn key_values(&self, key: &Key, fields: &Record) -> Result<Record, Reply> {
        let Key::Alternate(pairs) = key else {
            return Ok(Record::new());
        };
        pairs
            .iter()
            .map(|(k, v)| {
                let value = match self.entity.attributes[k].kind {
                    DvType::Integer => v.parse::<i64>().map(Value::from).map_err(|_| {
                        self.payload_error(&format!("key value '{v}' of '{k}' is not an integer"))
                    })?,
                    _ => Value::from(v.as_str()),
                };
                match fields.get(k) {
                    Some(body) if *body != value => Err(self.payload_error(&format!(
                        "'{k}' in the body differs from the key in the URL"
                    ))),
                    _ => Ok((k.clone(), value)),
                }
            })
            .collect()
    }

    fn payload_error(&self, detail: &str) -> Reply {
        let message = format!(
            "Error identified in Payload provided by the user for Entity :'{}', For more information on this error please follow this help link https://go.microsoft.com/fwlink/?linkid=2195293  ---->  InnerException : Microsoft.OData.ODataException: {detail}",
            self.set
        );
        error(StatusCode::BAD_REQUEST, "0x80048d19", message)
    }

    /// Check every property against the entity's attributes; the first problem, as Dataverse
    /// reports one at a time.
    fn validate(&self, fields: &Record) -> Result<(), Reply> {
        for (name, value) in fields.iter().filter(|(k, _)| !k.starts_with("@odata.")) {
            let Some(attr) = self.entity.attributes.get(name) else {
                let message = format!(
                    "The property '{name}' does not exist on type 'Microsoft.Dynamics.CRM.{}'. Make sure to only use property names that are defined by the type or mark the type as open type.",
                    self.logical
                );
                return Err(error(StatusCode::BAD_REQUEST, "0x80060888", message));
            };
            self.check(name, attr, value)?;
        }
        Ok(())
    }

    fn check(&self, name: &str, attr: &DvAttribute, value: &Value) -> Result<(), Reply> {
        let int32 = value.as_i64().filter(|n| i32::try_from(*n).is_ok());
        let (edm, ok) = match attr.kind {
            _ if value.is_null() => return Ok(()),
            DvType::String | DvType::Memo => ("Edm.String", value.is_string()),
            DvType::Boolean => ("Edm.Boolean", value.is_boolean()),
            DvType::Integer | DvType::Picklist => ("Edm.Int32", int32.is_some()),
            DvType::Decimal => ("Edm.Decimal", value.is_number()),
            DvType::Datetime => (
                "Edm.DateTimeOffset",
                value
                    .as_str()
                    .is_some_and(|s| chrono::DateTime::parse_from_rfc3339(s).is_ok()),
            ),
        };
        if !ok {
            let literal = value
                .as_str()
                .map_or_else(|| value.to_string(), str::to_owned);
            let mut detail =
                format!("Cannot convert the literal '{literal}' to the expected type '{edm}'.");
            if let Some(n) = attr.options.get(&literal) {
                detail += &format!(
                    " '{name}' is a choice column: send the option's integer value ({n} for '{literal}'), not its label."
                );
            }
            return Err(self.payload_error(&detail));
        }
        if let Some(n) = int32.filter(|_| attr.kind == DvType::Picklist)
            && !attr.options.values().any(|v| *v == n)
        {
            let mut accepted: Vec<_> = attr.options.values().collect();
            accepted.sort();
            let accepted = accepted
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(",");
            let message = format!(
                "A validation error occurred. The value {n} of '{name}' on record of type '{}' is outside the valid range. Accepted Values: {accepted}",
                self.logical
            );
            return Err(error(StatusCode::BAD_REQUEST, "0x8004431a", message));
        }
        match (value.as_str(), attr.max_len()) {
            (Some(s), Some(max)) if s.chars().count() > max => {
                let message = format!(
                    "A validation error occurred. The length of the '{name}' attribute of the '{}' entity exceeded the maximum allowed length of '{max}'.",
                    self.logical
                );
                Err(error(StatusCode::BAD_REQUEST, "0x80044331", message))
            }
            _ => Ok(()),
        }
    }
}

/// Which record a write goes to.
enum Slot {
    /// This existing record.
    Existing(String),
    /// A new record with this GUID.
    New(String),
}

/// True for a GUID in its usual 8-4-4-4-12 hex form.
fn is_guid(s: &str) -> bool {
    s.len() == 36
        && s.char_indices().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => c == '-',
            _ => c.is_ascii_hexdigit(),
        })
}

/// `EntityDefinitions` (optionally `$filter=LogicalName eq 'x'`) and
/// `EntityDefinitions(LogicalName='x')`: the properties of a table definition that clients read
/// to address it (`EntitySetName`, `PrimaryIdAttribute`), honouring `$select`.
fn entity_definitions(app: &App, key: Option<Key>, query: Option<&str>) -> Reply {
    const PROPERTIES: [&str; 4] = [
        "LogicalName",
        "EntitySetName",
        "LogicalCollectionName",
        "PrimaryIdAttribute",
    ];
    let select = query_param(query, "$select");
    let selected: Vec<&str> = match &select {
        Some(s) => s.split(',').map(str::trim).collect(),
        None => PROPERTIES.to_vec(),
    };
    let definition = |logical: &str, e: &Entity| {
        let values = [
            logical.to_owned(),
            e.entity_set.clone(),
            e.entity_set.clone(),
            format!("{logical}id"),
        ];
        let mut out = Map::new();
        for (name, value) in PROPERTIES.iter().zip(values) {
            if selected.contains(name) {
                out.insert((*name).to_owned(), value.into());
            }
        }
        Value::Object(out)
    };
    let context = format!("{}{ROOT}/$metadata#EntityDefinitions", app.base_url);
    let entities = &app.cfg.dataverse.entities;
    match key {
        Some(Key::Alternate(pairs)) if pairs.len() == 1 && pairs[0].0 == "LogicalName" => {
            let name = &pairs[0].1;
            match entities.get(name) {
                Some(e) => {
                    let mut body = definition(name, e);
                    body["@odata.context"] = format!("{context}/$entity").into();
                    Reply::new(StatusCode::OK, Some(body))
                }
                None => error(
                    StatusCode::NOT_FOUND,
                    "0x80040217",
                    format!("Could not find entity with LogicalName '{name}'"),
                ),
            }
        }
        Some(_) => error(
            StatusCode::NOT_IMPLEMENTED,
            "0x8006088a",
            "The emulator addresses table definitions by LogicalName='...' only",
        ),
        None => {
            let raw_filter = query_param(query, "$filter");
            let filter = match raw_filter.as_deref() {
                None => None,
                Some(f) => match parse_eq_filter(f) {
                    Some((prop @ ("LogicalName" | "EntitySetName"), value)) => Some((prop, value)),
                    _ => {
                        let message = format!(
                            "The emulator filters EntityDefinitions only by LogicalName or EntitySetName eq '...', not by '{f}'"
                        );
                        return error(StatusCode::NOT_IMPLEMENTED, "0x8006088a", message);
                    }
                },
            };
            let value: Vec<Value> = entities
                .iter()
                .filter(|(logical, e)| match &filter {
                    Some(("LogicalName", v)) => *logical == v,
                    Some((_, v)) => e.entity_set == *v,
                    None => true,
                })
                .map(|(logical, e)| definition(logical, e))
                .collect();
            Reply::new(
                StatusCode::OK,
                Some(json!({"@odata.context": context, "value": value})),
            )
        }
    }
}

/// `Property eq 'value'` (the value's doubled quotes undone), the one filter form clients use
/// to find a table definition.
fn parse_eq_filter(filter: &str) -> Option<(&str, String)> {
    let (prop, literal) = filter.trim().split_once(" eq ")?;
    let inner = literal.trim().strip_prefix('\'')?.strip_suffix('\'')?;
    Some((prop.trim(), inner.replace("''", "'")))
}

/// The top-level navigation properties named in `$expand` (`OptionSet($select=Options),X`).
fn expanded(expand: Option<&str>) -> Vec<String> {
    let Some(expand) = expand else {
        return vec![];
    };
    let (mut names, mut depth, mut current) = (vec![], 0usize, String::new());
    for c in expand.chars() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => names.push(std::mem::take(&mut current)),
            _ if depth == 0 => current.push(c),
            _ => {}
        }
    }
    names.push(current);
    names
        .into_iter()
        .map(|n| n.trim().to_owned())
        .filter(|n| !n.is_empty())
        .collect()
}

/// The type a metadata cast names: `Microsoft.Dynamics.CRM.PicklistAttributeMetadata` ->
/// `Picklist`.
fn cast_type(cast: &str) -> Option<&str> {
    cast.strip_prefix(NS)?
        .strip_suffix("AttributeMetadata")
        .filter(|t| !t.is_empty())
}

/// One column's metadata: its type, length, and the choice options when `OptionSet` is
/// expanded (as in the service, options come only on request).
fn attribute_json(name: &str, a: &DvAttribute, expand: &[String]) -> Value {
    let kind = a.kind.metadata_name();
    let mut out = json!({
        "@odata.type": format!("#{NS}{kind}AttributeMetadata"),
        "LogicalName": name,
        "AttributeType": kind,
    });
    if let Some(max) = a.max_len() {
        out["MaxLength"] = max.into();
    }
    if expand.iter().any(|e| e == "OptionSet") && a.kind == DvType::Picklist {
        let mut options: Vec<_> = a.options.iter().collect();
        options.sort_by_key(|(_, v)| **v);
        let options: Vec<Value> = options
            .into_iter()
            .map(|(label, value)| {
                let label = json!({"Label": label, "LanguageCode": 1033});
                json!({"Value": value, "Label": {"LocalizedLabels": [label], "UserLocalizedLabel": label}})
            })
            .collect();
        out["OptionSet"] = json!({"IsGlobal": false, "Options": options});
    }
    if expand.iter().any(|e| e == "GlobalOptionSet") {
        // Every choice of the emulator has its own (local) option set.
        out["GlobalOptionSet"] = Value::Null;
    }
    out
}

/// `EntityDefinitions(LogicalName='x')/Keys`, `.../Attributes`,
/// `.../Attributes/Microsoft.Dynamics.CRM.<Type>AttributeMetadata` (only the columns of that
/// type) and `.../Attributes(LogicalName='y')[/<cast>]`.
async fn metadata(
    State(app): State<Arc<App>>,
    Path(p): Path<HashMap<String, String>>,
    RawQuery(query): RawQuery,
) -> Response {
    let not_found = |what: String| error(StatusCode::NOT_FOUND, "0x80040217", what).into_response();
    let logical_name = |segment: &str, set: &str| match parse_key_segment(segment) {
        Ok((s, key)) if s == set => match key {
            Some(Key::Alternate(pairs)) if pairs.len() == 1 && pairs[0].0 == "LogicalName" => {
                Ok(Some(pairs[0].1.clone()))
            }
            None => Ok(None),
            _ => Err(()),
        },
        _ => Err(()),
    };
    let Ok(Some(name)) = logical_name(&p["seg"], "EntityDefinitions") else {
        return not_found(
            "Only EntityDefinitions(LogicalName='...')/Attributes and /Keys metadata is emulated"
                .into(),
        );
    };
    let Some(entity) = app.cfg.dataverse.entities.get(&name) else {
        return not_found(format!("Could not find entity with LogicalName '{name}'"));
    };
    let context = format!(
        "{}{ROOT}/$metadata#EntityDefinitions('{name}')",
        app.base_url
    );
    let cast = p.get("cast").map(String::as_str);
    if p["attrs"] == "Keys" && cast.is_none() {
        let key = json!({"LogicalName": format!("{name}_alternatekey"), "KeyAttributes": entity.alternate_key, "EntityKeyIndexStatus": "Active"});
        return super::json(
            StatusCode::OK,
            json!({"@odata.context": format!("{context}/Keys"), "value": [key]}),
        );
    }
    let Ok(attr) = logical_name(&p["attrs"], "Attributes") else {
        return not_found(
            "Only EntityDefinitions(LogicalName='...')/Attributes and /Keys metadata is emulated"
                .into(),
        );
    };
    let expand = expanded(query_param(query.as_deref(), "$expand").as_deref());
    let kind = match cast.map(|c| cast_type(c).ok_or(c)) {
        None => None,
        Some(Ok(kind)) => Some(kind),
        Some(Err(c)) => return not_found(format!("Resource not found for the segment '{c}'.")),
    };
    let Some(attr_name) = attr else {
        // The collection, or with a cast only the columns of that type (a choice-column listing
        // is how Microsoft's SDK reads every label in one request).
        let id = json!({"@odata.type": format!("#{NS}UniqueIdentifierAttributeMetadata"), "LogicalName": format!("{name}id"), "AttributeType": "Uniqueidentifier"});
        let id = kind.is_none_or(|k| k == "UniqueIdentifier").then_some(id);
        let attrs = entity
            .attributes
            .iter()
            .filter(|(_, a)| kind.is_none_or(|k| k == a.kind.metadata_name()))
            .map(|(n, a)| attribute_json(n, a, &expand));
        let value: Vec<Value> = id.into_iter().chain(attrs).collect();
        let context = match cast {
            Some(c) => format!("{context}/Attributes/{c}"),
            None => format!("{context}/Attributes"),
        };
        return super::json(
            StatusCode::OK,
            json!({"@odata.context": context, "value": value}),
        );
    };
    let Some(a) = entity.attributes.get(&attr_name) else {
        return not_found(format!(
            "Could not find attribute '{attr_name}' of entity '{name}'"
        ));
    };
    if let (Some(kind), Some(cast)) = (kind, cast)
        && kind != a.kind.metadata_name()
    {
        return not_found(format!(
            "Attribute '{attr_name}' is a {}, not a {cast}",
            a.kind.metadata_name()
        ));
    }
    let mut out = attribute_json(&attr_name, a, &expand);
    out["@odata.context"] = format!("{context}/Attributes/$entity").into();
    super::json(StatusCode::OK, out)
}

/// The bulk operation messages the emulator serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Bulk {
    /// `CreateMultiple`: new records only; answers their GUIDs.
    Create,
    /// `UpsertMultiple`: records named by `@odata.id` (alternate key or GUID); 204.
    Upsert,
}

impl Bulk {
    fn name(self) -> &'static str {
        match self {
            Bulk::Create => "CreateMultiple",
            Bulk::Upsert => "UpsertMultiple",
        }
    }
}

/// One checked record of a bulk message, ready to write.
struct BulkWrite {
    slot: Slot,
    key_values: Record,
    fields: Record,
    /// What makes two records of one request the same record.
    identity: String,
}

/// `POST {ROOT}/{set}/Microsoft.Dynamics.CRM.UpsertMultiple`.
async fn upsert_multiple(
    State(app): State<Arc<App>>,
    Path(set): Path<String>,
    body: Bytes,
) -> Response {
    bulk(&app, &set, Bulk::Upsert, &body).into_response()
}

/// `POST {ROOT}/{set}/Microsoft.Dynamics.CRM.CreateMultiple`.
async fn create_multiple(
    State(app): State<Arc<App>>,
    Path(set): Path<String>,
    body: Bytes,
) -> Response {
    bulk(&app, &set, Bulk::Create, &body).into_response()
}

/// A bulk message on a standard table: every record is checked before any is written, so one
/// bad record, or the same record twice, fails the whole request with the usual error and
/// nothing is written (Microsoft: "Any error that occurs in a bulk operation with a standard
/// table causes the entire operation to roll back").
fn bulk(app: &App, set: &str, message: Bulk, body: &[u8]) -> Reply {
    let Some((logical, entity)) = app
        .cfg
        .dataverse
        .entities
        .iter()
        .find(|(_, e)| e.entity_set == set)
    else {
        return error(
            StatusCode::NOT_FOUND,
            "0x8006088a",
            format!("Resource not found for the segment '{set}'."),
        );
    };
    let target = Target {
        app,
        logical,
        entity,
        set,
    };
    if !entity.bulk_messages {
        // What the service answers for a message the table has no processing step for.
        let message = format!(
            "The '{}' method does not support entities of type '{logical}'. MessageProcessorCache returned MessageProcessor.Empty.",
            message.name()
        );
        return error(StatusCode::BAD_REQUEST, "0x80040800", message);
    }
    let targets = match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(mut o)) => match o.remove("Targets") {
            Some(Value::Array(t)) if !t.is_empty() => t,
            _ => {
                return target.payload_error("the body needs a non-empty 'Targets' array");
            }
        },
        _ => return target.payload_error("the body must be a JSON object with 'Targets'"),
    };
    let mut inner = app.lock();
    let mut writes = Vec::with_capacity(targets.len());
    let mut seen: HashMap<String, usize> = HashMap::new();
    for (i, item) in targets.into_iter().enumerate() {
        let write = match target.bulk_item(&inner.store, message, i, item) {
            Ok(w) => w,
            Err(reply) => return reply,
        };
        if let Some(first) = seen.insert(write.identity.clone(), i) {
            let message = format!(
                "Targets[{first}] and Targets[{i}] identify the same record ({}); {} takes each record at most once.",
                write.identity,
                message.name()
            );
            return error(StatusCode::BAD_REQUEST, "0x80040237", message);
        }
        writes.push(write);
    }
    let ids: Vec<String> = writes
        .into_iter()
        .map(|w| target.store_record(&mut inner, w.slot, w.key_values, w.fields))
        .collect();
    app.persist(&inner);
    match message {
        Bulk::Upsert => Reply::new(StatusCode::NO_CONTENT, None),
        Bulk::Create => {
            let context = format!(
                "{}{ROOT}/$metadata#{NS}CreateMultipleResponse",
                app.base_url
            );
            Reply::new(
                StatusCode::OK,
                Some(json!({"@odata.context": context, "Ids": ids})),
            )
        }
    }
}

/// Other bound actions on an entity set: not emulated.
async fn other_action(Path(p): Path<HashMap<String, String>>) -> Response {
    let action = &p["attrs"];
    match action.strip_prefix(NS) {
        Some(name) => error(
            StatusCode::NOT_IMPLEMENTED,
            "0x8006088a",
            format!(
                "The emulator does not serve the {name} action; it serves CreateMultiple and UpsertMultiple"
            ),
        ),
        None => error(
            StatusCode::NOT_FOUND,
            "0x8006088a",
            format!("Resource not found for the segment '{action}'."),
        ),
    }
    .into_response()
}

/// `POST {ROOT}/$batch`.
async fn batch(State(app): State<Arc<App>>, headers: HeaderMap, body: Bytes) -> Response {
    let malformed = |e: &str| {
        error(
            StatusCode::BAD_REQUEST,
            "0x80048d19",
            format!("The batch request is malformed: {e}"),
        )
        .into_response()
    };
    let Ok(text) = std::str::from_utf8(&body) else {
        return malformed("the body is not UTF-8");
    };
    let items = match batch::parse(
        header_str(&headers, "content-type").unwrap_or_default(),
        text,
    ) {
        Ok(items) => items,
        Err(e) => return malformed(&e),
    };
    let count: usize = items
        .iter()
        .map(|i| {
            if let Item::ChangeSet(parts) = i {
                parts.len()
            } else {
                1
            }
        })
        .sum();
    if count > BATCH_LIMIT {
        let message =
            format!("The batch holds {count} requests; at most {BATCH_LIMIT} are allowed.");
        return error(StatusCode::BAD_REQUEST, "0x8005f103", message).into_response();
    }
    // The whole batch was counted as one request by the gate, as Microsoft documents.
    let continue_on_error =
        header_str(&headers, "prefer").is_some_and(|p| p.contains("odata.continue-on-error"));
    let mut inner = app.lock();
    let mut replies = vec![];
    for item in &items {
        let reply = match item {
            Item::Request(part) => ReplyItem::Single(run_part(&app, &mut inner, part)),
            Item::ChangeSet(parts) => {
                let before = inner.store.clone();
                let mut done = vec![];
                for part in parts {
                    done.push(run_part(&app, &mut inner, part));
                    if done.last().is_some_and(Reply::failed) {
                        break;
                    }
                }
                match done.pop_if(|r| r.failed()) {
                    Some(failure) => {
                        inner.store = before;
                        ReplyItem::Single(failure)
                    }
                    None => ReplyItem::ChangeSet(done),
                }
            }
        };
        let failed = matches!(&reply, ReplyItem::Single(r) if r.failed());
        replies.push(reply);
        if failed && !continue_on_error {
            break;
        }
    }
    app.persist(&inner);
    let boundary = format!("batchresponse_{}", guid());
    let mut res = batch::write_response(&boundary, &replies).into_response();
    let ct = HeaderValue::from_str(&format!("multipart/mixed; boundary={boundary}"))
        .expect("a boundary is a valid header");
    res.headers_mut().insert(header::CONTENT_TYPE, ct);
    res.headers_mut()
        .insert("odata-version", HeaderValue::from_static("4.0"));
    res
}

/// Run one request of a batch; its URL may be absolute or relative to the service root.
fn run_part(app: &App, inner: &mut Inner, part: &batch::Part) -> Reply {
    let path = match part.url.find(&format!("{ROOT}/")) {
        Some(i) => &part.url[i + ROOT.len() + 1..],
        None => part.url.trim_start_matches('/'),
    };
    let (path, query) = path
        .split_once('?')
        .map_or((path, None), |(p, q)| (p, Some(q)));
    let mut reply = if path.contains('/') {
        error(
            StatusCode::NOT_IMPLEMENTED,
            "0x8006088a",
            format!(
                "Only record URLs are emulated inside a $batch, not '{}'",
                part.url
            ),
        )
    } else {
        execute(
            app,
            inner,
            &part.method,
            &decode(path),
            query,
            &part.headers,
            part.body.as_bytes(),
        )
    };
    reply.content_id = part.content_id.clone();
    reply
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alt(pairs: &[(&str, &str)]) -> Option<Key> {
        Some(Key::Alternate(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        ))
    }

    #[test]
    fn key_segments() {
        assert_eq!(
            parse_key_segment("contacts(trusst_contact_id='abc')").unwrap(),
            ("contacts", alt(&[("trusst_contact_id", "abc")]))
        );
        assert_eq!(
            parse_key_segment("contacts(k1='a,b)', k2=5)").unwrap(),
            ("contacts", alt(&[("k1", "a,b)"), ("k2", "5")]))
        );
        assert_eq!(
            parse_key_segment("contacts(name='O''Brien')").unwrap().1,
            alt(&[("name", "O'Brien")])
        );
        assert_eq!(
            parse_key_segment("contacts(k='')").unwrap().1,
            alt(&[("k", "")])
        );
        let id = "9d6a7e4b-0000-4000-8000-000000000001";
        assert_eq!(
            parse_key_segment(&format!("contacts({id})")).unwrap().1,
            Some(Key::Id(id.into()))
        );
        assert_eq!(parse_key_segment("contacts").unwrap(), ("contacts", None));
        for bad in [
            "contacts(k='x",
            "contacts(k='x')y",
            "contacts()",
            "contacts(k='a' b)",
            "contacts(=1)",
            "contacts(a,b)",
        ] {
            assert!(parse_key_segment(bad).is_err(), "{bad}");
        }
    }
}
