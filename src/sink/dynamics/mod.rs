//! Dynamics 365 / Dataverse target: upserts on an alternate key with the bulk message
//! `UpsertMultiple` where the table supports it, else through the Web API's `$batch`.
//!
//! - [`auth`](crate::sink::oauth): Microsoft Entra ID client credentials, refreshed before
//!   expiry and after a 401.
//! - [`metadata`]: checks the mapping against the table's columns and reads choice options, so
//!   labels become the option numbers Dataverse requires.
//! - [`bulk`]: the `UpsertMultiple` body and what its failure means. One request per chunk is
//!   all or nothing on a standard table, so a chunk it refuses because of a bad record is sent
//!   again as a `$batch`, which writes the others and names the bad ones; a table without the
//!   message is remembered and gets `$batch` from then on.
//! - [`batch`]: the multipart `$batch` request and response, without changesets so one bad
//!   record does not roll back the others.
//!
//! Choice (option set) labels: `prepare` reads the options of every choice column the mapping
//! knows of: the contact fields and the questions listed under `[mapping.questions]` (an empty
//! `[mapping.questions.call_outcome]` table is enough). A Label question that is not listed is
//! only met at map time; its column has no known options then, so the contact becomes a mapping
//! error (dead-lettered with the reason). [`Dynamics::resolve_option_set`] lets a caller that
//! knows it drives Dataverse read such a column later and fill the mapping.

pub mod batch;
pub mod bulk;
pub mod config;
pub mod metadata;
pub mod profile;

use std::collections::BTreeMap;

use async_trait::async_trait;
use reqwest::StatusCode;
use reqwest::header::{ACCEPT, CONTENT_TYPE, HeaderMap};

pub use config::Config;
pub use profile::PROFILE;

use crate::error::{Error, Result};
use crate::sink::mapping::{Conversion, Mapping};
use crate::sink::oauth::ClientCredentials;
use crate::sink::verdict::Verdict;
use crate::sink::{Outcome, Target, http};
use batch::Request;
use metadata::Attribute;

/// The Web API version the client speaks.
const API_PATH: &str = "/api/data/v9.2";

/// Dataverse allows at most this many requests in one `$batch`.
pub const MAX_BATCH: usize = 1000;

/// A Dataverse environment, authenticated as an application user.
pub struct Dynamics {
    /// `{url}/api/data/v9.2`.
    api: String,
    batch_size: usize,
    http: reqwest::Client,
    auth: ClientCredentials,
    /// The table `prepare` checked (logical name) and its columns.
    entity: Option<String>,
    attributes: BTreeMap<String, Attribute>,
    /// Choice column -> label -> option value, as read from metadata.
    option_sets: BTreeMap<String, BTreeMap<String, i64>>,
    /// Send `UpsertMultiple` first: configured, and not yet refused as unsupported by the table.
    upsert_multiple: bool,
}

/// How one chunk's `UpsertMultiple` went.
enum BulkResult {
    /// Every record written.
    Written,
    /// Refused in a way `$batch` can sort out.
    Fallback(bulk::Fallback),
}

impl std::fmt::Debug for Dynamics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dynamics")
            .field("api", &self.api)
            .field("auth", &self.auth)
            .finish_non_exhaustive()
    }
}

impl Dynamics {
    /// A client for `cfg`; resolves the client secret, sends nothing yet.
    pub fn new(cfg: &Config) -> Result<Self> {
        let url = cfg.url.trim_end_matches('/').to_owned();
        if !(url.starts_with("https://") || url.starts_with("http://")) {
            return Err(Error::user(format!(
                "[dynamics] url {url:?} is not an http(s) URL; use the environment URL, e.g. https://yourorg.crm.dynamics.com"
            )));
        }
        if cfg.batch_size == 0 || cfg.batch_size > MAX_BATCH {
            return Err(Error::user(format!(
                "[dynamics] batch_size = {} must be between 1 and {MAX_BATCH}",
                cfg.batch_size
            )));
        }
        if cfg.tenant.trim().is_empty() && cfg.token_url.is_none() {
            return Err(Error::user(
                "[dynamics] tenant is empty: give the Entra ID tenant id or domain (or token_url)",
            ));
        }
        let secret = cfg.client_secret.resolve("[dynamics] client_secret")?;
        let token_url = cfg.token_url.clone().unwrap_or_else(|| {
            format!(
                "https://login.microsoftonline.com/{}/oauth2/v2.0/token",
                cfg.tenant.trim()
            )
        });
        let scope = cfg
            .scope
            .clone()
            .unwrap_or_else(|| format!("{url}/.default"));
        Ok(Self {
            api: format!("{url}{API_PATH}"),
            batch_size: cfg.batch_size,
            http: http::client(cfg.request_timeout)?,
            auth: ClientCredentials::new(
                "[dynamics]",
                token_url,
                cfg.client_id.clone(),
                secret,
                Some(scope),
            ),
            entity: None,
            attributes: BTreeMap::new(),
            option_sets: BTreeMap::new(),
            upsert_multiple: cfg.upsert_multiple,
        })
    }

    /// Send a Web API request with a Bearer token and the OData headers; a 401 fetches a new
    /// token and sends once more. Returns status, headers and body of the final answer.
    async fn send(
        &mut self,
        what: &str,
        make: impl Fn(&reqwest::Client) -> reqwest::RequestBuilder,
    ) -> Result<(StatusCode, HeaderMap, String)> {
        let mut retried = false;
        loop {
            let token = self.auth.token(&self.http).await?;
            let request = make(&self.http)
                .bearer_auth(&token)
                .header("OData-MaxVersion", "4.0")
                .header("OData-Version", "4.0")
                .header(ACCEPT, "application/json");
            let resp = http::send("dynamics", what, request).await?;
            let status = resp.status();
            let headers = resp.headers().clone();
            let body = resp.text().await.map_err(|e| http::transport(what, e))?;
            if status == StatusCode::UNAUTHORIZED {
                self.auth.invalidate();
                if !retried {
                    tracing::warn!(
                        what,
                        "Dataverse answered 401; fetching a new token and retrying once"
                    );
                    retried = true;
                    continue;
                }
                return Err(Error::user(format!(
                    "{what}: Dataverse refused a fresh token (HTTP 401): {}; check [dynamics] client_id, tenant and scope, and that \
                     the app registration has an application user in this environment",
                    batch::error_text(401, &body)
                )));
            }
            return Ok((status, headers, body));
        }
    }

    /// Map a non-success answer to an error: 403 (missing privileges) and 404 (wrong URL) are
    /// the operator's to fix; 429 waits for Retry-After; 5xx retries; other 4xx do not.
    fn status_error(what: &str, status: StatusCode, headers: &HeaderMap, body: &str) -> Error {
        match status.as_u16() {
            403 => Verdict::Stop.error(format!(
                "{what}: HTTP 403 {}; give the application user a security role with the needed privileges",
                batch::error_text(403, body)
            )),
            // Only a wrong URL makes a single-record request 404 (an upsert creates).
            404 => Verdict::Stop.error(format!(
                "{what}: HTTP 404 {}; check [dynamics] url",
                batch::error_text(404, body)
            )),
            _ => http::status_error(what, status, headers, body),
        }
    }

    fn entity_url(&self, entity: &str) -> String {
        format!(
            "{}/EntityDefinitions(LogicalName={})",
            self.api,
            batch::key_literal(entity)
        )
    }

    /// `GET` a metadata URL; `Ok(None)` on 404 so callers can say what is missing.
    async fn get_metadata(&mut self, what: &str, url: &str) -> Result<Option<String>> {
        let (status, headers, body) = self.send(what, |c| c.get(url)).await?;
        if status == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if !status.is_success() {
            return Err(Self::status_error(what, status, &headers, &body));
        }
        Ok(Some(body))
    }

    /// Label -> option value of a choice column of the table `prepare` checked, read from its
    /// metadata (cached). For a caller that meets a Label question whose column `prepare` could
    /// not foresee: fill the mapping with `mapping.fill_option_sets` and map again.
    pub async fn resolve_option_set(&mut self, field: &str) -> Result<BTreeMap<String, i64>> {
        if let Some(o) = self.option_sets.get(field) {
            return Ok(o.clone());
        }
        let entity = self
            .entity
            .clone()
            .ok_or_else(|| Error::internal("resolve_option_set called before prepare"))?;
        let cast = self.attributes.get(field).map_or(
            "Microsoft.Dynamics.CRM.PicklistAttributeMetadata",
            Attribute::metadata_cast,
        );
        let url = format!(
            "{}/Attributes(LogicalName={})/{cast}?$select=LogicalName&$expand=OptionSet($select=Options),GlobalOptionSet($select=Options)",
            self.entity_url(&entity),
            batch::key_literal(field)
        );
        let what = format!("reading the options of column '{field}'");
        let body = self.get_metadata(&what, &url).await?.ok_or_else(|| {
            Error::user(format!("{what}: table '{entity}' has no choice column '{field}'; create it or map the question elsewhere"))
        })?;
        let opts = metadata::parse_option_set(&body)
            .map_err(|e| Error::external(format!("{what}: {e}")).retry(false))?;
        tracing::debug!(field, options = opts.len(), "read choice options");
        self.option_sets.insert(field.to_owned(), opts.clone());
        Ok(opts)
    }

    /// Best effort: read every choice column's options in one request. Not every service
    /// supports the cast on the collection; then columns are read one by one.
    async fn read_all_option_sets(&mut self, entity: &str) -> Result<()> {
        let url = format!(
            "{}/Attributes/Microsoft.Dynamics.CRM.PicklistAttributeMetadata?$select=LogicalName&$expand=OptionSet($select=Options),GlobalOptionSet($select=Options)",
            self.entity_url(entity)
        );
        let (status, _, body) = self.send("reading choice columns", |c| c.get(&url)).await?;
        if status.is_success()
            && let Ok(all) = metadata::parse_option_sets(&body)
        {
            tracing::debug!(
                columns = all.len(),
                "read the options of all choice columns"
            );
            self.option_sets.extend(all);
            return Ok(());
        }
        tracing::debug!(%status, "choice columns not readable in one request; reading them one by one");
        Ok(())
    }

    /// Best effort checks that catch config mistakes which would otherwise reject every record:
    /// the entity set name and the alternate key. Skipped when the service lacks the endpoint.
    async fn check_entity_set_and_key(&mut self, mapping: &Mapping) -> Result<()> {
        let entity = mapping.object.clone();
        let url = format!(
            "{}?$select=LogicalName,EntitySetName",
            self.entity_url(&entity)
        );
        if let Some(body) = self
            .get_metadata("reading the table definition", &url)
            .await?
        {
            let set = serde_json::from_str::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v.get("EntitySetName")?.as_str().map(str::to_owned));
            if let Some(set) = set.filter(|s| *s != mapping.entity_set) {
                return Err(Error::user(format!(
                    "[mapping] entity_set = {:?}, but table '{entity}' is addressed as '{set}' in the Web API; set entity_set = \"{set}\"",
                    mapping.entity_set
                )));
            }
        }
        let url = format!(
            "{}/Keys?$select=LogicalName,KeyAttributes,EntityKeyIndexStatus",
            self.entity_url(&entity)
        );
        let (status, _, body) = self
            .send("reading the alternate keys", |c| c.get(&url))
            .await?;
        if !status.is_success() {
            tracing::debug!(%status, "alternate keys not readable; skipping the check");
            return Ok(());
        }
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&body) else {
            return Ok(());
        };
        let Some(keys) = v.get("value").and_then(|k| k.as_array()) else {
            return Ok(());
        };
        let ext = &mapping.external_id_field;
        let key = keys.iter().find(|k| {
            k.get("KeyAttributes")
                .and_then(|a| a.as_array())
                .is_some_and(|a| a.len() == 1 && a[0].as_str() == Some(ext))
        });
        match key {
            None => Err(Error::user(format!(
                "table '{entity}' has no alternate key on the column '{ext}' alone, so records cannot be upserted by it: \
                 add a key with just that column to the table, or change [mapping] external_id_field"
            ))),
            Some(k) => match k.get("EntityKeyIndexStatus").and_then(|s| s.as_str()) {
                Some(s) if s != "Active" => Err(Error::user(format!(
                    "the alternate key on '{ext}' of table '{entity}' is {s}, not Active; wait until Dataverse has built it \
                     (or fix the failed key) and start again"
                ))),
                _ => Ok(()),
            },
        }
    }

    /// One `$batch` with `Prefer: odata.continue-on-error`: one outcome per request
    /// (`contact_ids[i]` is request `i`'s contact, for the log).
    async fn run_batch(
        &mut self,
        requests: &[Request],
        contact_ids: &[&str],
        delete: bool,
    ) -> Result<Vec<Outcome>> {
        let boundary = batch::new_boundary();
        let body = batch::build(&boundary, requests);
        let url = format!("{}/$batch", self.api);
        let content_type = format!("multipart/mixed; boundary={boundary}");
        let what = "Dataverse $batch";
        tracing::debug!(
            requests = requests.len(),
            bytes = body.len(),
            "sending $batch"
        );
        let (status, headers, text) = self
            .send(what, |c| {
                c.post(&url)
                    .header(CONTENT_TYPE, &content_type)
                    .header("Prefer", "odata.continue-on-error")
                    .body(body.clone())
            })
            .await?;
        if !status.is_success() {
            return Err(Self::status_error(what, status, &headers, &text));
        }
        let ct = headers
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        // An unreadable answer (a proxy's page, a cut connection) tells nothing about what was
        // written; resending is safe because every request is idempotent.
        let parts = batch::parse(ct, &text)
            .map_err(|e| Error::external(format!("{what}: unreadable response: {e}")))?;
        if parts.iter().any(|p| p.status == 401) {
            self.auth.invalidate();
        }
        let out = batch::outcomes(&parts, requests.len(), delete)?;
        let rejected: Vec<(&str, &String)> = contact_ids
            .iter()
            .zip(&out)
            .filter_map(|(id, o)| {
                if let Outcome::Rejected(m) = o {
                    Some((*id, m))
                } else {
                    None
                }
            })
            .collect();
        if let Some((_, first)) = rejected.first() {
            let ids = crate::sink::contact_ids(rejected.iter().map(|(id, _)| *id));
            tracing::warn!(rejected = rejected.len(), of = out.len(), contact_ids = %ids, first = %first, "Dataverse rejected records");
        }
        Ok(out)
    }

    /// One `UpsertMultiple` for a chunk. A failure that is about the records or the table's
    /// support comes back as the fallback to take; anything else is an error, handled as for
    /// every other request (403 stops the sink, 429 waits, 5xx retries).
    async fn upsert_multiple(
        &mut self,
        mapping: &Mapping,
        chunk: &[crate::sink::mapping::Record],
    ) -> Result<BulkResult> {
        let (url, body) = self.upsert_multiple_request(mapping, chunk);
        let what = "Dataverse UpsertMultiple";
        tracing::debug!(
            records = chunk.len(),
            bytes = body.len(),
            "sending UpsertMultiple"
        );
        let (status, headers, text) = self
            .send(what, |c| {
                c.post(&url)
                    .header(CONTENT_TYPE, "application/json")
                    .body(body.clone())
            })
            .await?;
        if status.is_success() {
            return Ok(BulkResult::Written);
        }
        match bulk::after_failure(status.as_u16(), &text) {
            bulk::Fallback::Fail => Err(Self::status_error(what, status, &headers, &text)),
            fallback => {
                tracing::debug!(%status, error = %batch::error_text(status.as_u16(), &text), ?fallback, "UpsertMultiple refused");
                Ok(BulkResult::Fallback(fallback))
            }
        }
    }

    /// URL and body of the `UpsertMultiple` for a chunk.
    fn upsert_multiple_request(
        &self,
        mapping: &Mapping,
        chunk: &[crate::sink::mapping::Record],
    ) -> (String, String) {
        let url = format!("{}/{}/{}", self.api, mapping.entity_set, bulk::ACTION);
        let body = bulk::body(
            &mapping.object,
            &mapping.entity_set,
            &mapping.external_id_field,
            chunk.iter().map(|r| (r.contact_id.as_str(), &r.fields)),
        );
        (url, body)
    }

    /// The PATCH of one record: its alternate key in the URL, every other field in the body.
    fn upsert_request(&self, mapping: &Mapping, r: &crate::sink::mapping::Record) -> Request {
        let mut fields = r.fields.clone();
        // The key is in the URL; Dataverse rejects a body that repeats it differently.
        fields.remove(&mapping.external_id_field);
        Request {
            method: "PATCH",
            url: batch::key_url(
                &self.api,
                &mapping.entity_set,
                &mapping.external_id_field,
                &r.contact_id,
            ),
            body: Some(serde_json::Value::Object(fields).to_string()),
        }
    }

    /// Configured questions whose column is a choice get the option-set conversion (their
    /// result type is only known at map time), so their labels are filled in `prepare`.
    ///
    /// Questions not in the config get no spec here, even when a choice column matches their
    /// default name: any spec becomes a question field (cleared by `on_delete = "clear"`), and
    /// a column that merely fits the naming rule may be the customer's own.
    fn ensure_choice_questions(&self, mapping: &mut Mapping) {
        let configured: Vec<(String, Option<Conversion>)> = mapping
            .questions
            .iter()
            .filter(|(_, s)| !s.skip)
            .map(|(k, s)| (k.clone(), s.conversion))
            .collect();
        for (key, conv) in configured {
            let choice = mapping
                .question_field(&key)
                .and_then(|f| self.attributes.get(&f))
                .is_some_and(Attribute::is_choice);
            if conv == Some(Conversion::OptionSet) || (conv.is_none() && choice) {
                mapping.ensure_question(&key, "Label");
            }
        }
    }
}

#[async_trait]
impl Target for Dynamics {
    /// Token, then the table's columns: every planned field must exist with a fitting type;
    /// then the options of every choice column are read and filled into the mapping.
    async fn prepare(&mut self, mapping: &mut Mapping) -> Result<()> {
        self.auth.token(&self.http).await?;
        let entity = mapping.object.clone();
        let url = format!(
            "{}/Attributes?$select=LogicalName,AttributeType",
            self.entity_url(&entity)
        );
        let body = self.get_metadata("reading the table's columns", &url).await?.ok_or_else(|| {
            Error::user(format!("Dataverse has no table with the logical name '{entity}'; check [mapping] object"))
        })?;
        let attrs = metadata::parse_attributes(&body).map_err(|e| {
            Error::external(format!("reading the table's columns: {e}")).retry(false)
        })?;
        tracing::info!(table = %entity, columns = attrs.len(), "read the table definition");
        self.attributes = attrs
            .iter()
            .map(|a| (a.logical_name.clone(), a.clone()))
            .collect();
        self.entity = Some(entity.clone());
        mapping.known_fields = Some(self.attributes.keys().cloned().collect());
        self.check_entity_set_and_key(mapping).await?;

        self.ensure_choice_questions(mapping);
        let keys: Vec<String> = mapping.questions.keys().cloned().collect();
        let planned = mapping.planned_fields(keys.iter().map(|k| (k.as_str(), "")));
        let problems = metadata::check_fields(mapping, &planned, &attrs);
        if !problems.is_empty() {
            return Err(Error::user(format!(
                "the mapping does not fit Dataverse table '{entity}':\n  - {}",
                problems.join("\n  - ")
            )));
        }

        // Columns that need options: those of option-set specs without labels.
        let needed: Vec<String> = mapping
            .fields
            .values()
            .chain(mapping.questions.values())
            .filter(|s| {
                !s.skip && s.conversion == Some(Conversion::OptionSet) && s.labels.is_empty()
            })
            .filter_map(|s| s.field.clone())
            .collect();
        // Every choice column's options, not only the configured ones: a Label question that is
        // not listed in the config finds its column's values at map time.
        self.read_all_option_sets(&entity).await?;
        let choices: Vec<String> = attrs
            .iter()
            .filter(|a| a.attribute_type == "Picklist")
            .map(|a| a.logical_name.clone())
            .collect();
        for f in &needed {
            if !self.option_sets.contains_key(f) {
                self.resolve_option_set(f).await?;
            }
        }
        for f in &choices {
            // Best effort for columns the config does not name: a failure only means a Label
            // question landing there is dead-lettered with the reason.
            if !self.option_sets.contains_key(f)
                && let Err(e) = self.resolve_option_set(f).await
            {
                tracing::debug!(column = %f, error = %e, "choice options not readable");
            }
        }
        mapping.option_sets = self.option_sets.clone();
        let sets = &self.option_sets;
        mapping.fill_option_sets(|f| sets.get(f).cloned());
        for f in &needed {
            if sets.get(f).is_some_and(|o| o.is_empty()) {
                tracing::warn!(column = %f, "choice column has no options; every value for it will be dead-lettered");
            }
        }
        tracing::info!(table = %entity, choice_columns = needed.len(), "mapping checked against Dataverse");
        Ok(())
    }

    fn max_batch(&self) -> usize {
        self.batch_size
    }

    /// Per chunk of `batch_size`: one `UpsertMultiple` while the table supports it; when it is
    /// refused because of a record, or the table lacks it, the chunk goes as a `$batch` of
    /// PATCHes on the alternate key (upsert: 204 for created and updated alike) without
    /// changesets, so only the bad records are rejected.
    async fn upsert(
        &mut self,
        mapping: &Mapping,
        records: &[crate::sink::mapping::Record],
    ) -> Result<Vec<Outcome>> {
        let mut out = Vec::with_capacity(records.len());
        for chunk in records.chunks(self.batch_size) {
            if self.upsert_multiple {
                match self.upsert_multiple(mapping, chunk).await? {
                    BulkResult::Written => {
                        out.extend(std::iter::repeat_n(Outcome::Written, chunk.len()));
                        continue;
                    }
                    BulkResult::Fallback(bulk::Fallback::Unsupported) => {
                        tracing::info!(table = %mapping.object, "Dataverse offers no UpsertMultiple for this table; using $batch from now on");
                        self.upsert_multiple = false;
                    }
                    BulkResult::Fallback(_) => {
                        tracing::info!(
                            records = chunk.len(),
                            "UpsertMultiple refused a record; sending the chunk as a $batch to find it"
                        );
                    }
                }
            }
            let requests: Vec<Request> = chunk
                .iter()
                .map(|r| self.upsert_request(mapping, r))
                .collect();
            let ids: Vec<&str> = chunk.iter().map(|r| r.contact_id.as_str()).collect();
            out.extend(self.run_batch(&requests, &ids, false).await?);
        }
        Ok(out)
    }

    /// DELETE on the alternate key, in `$batch`es; 404 counts as deleted.
    async fn delete(&mut self, mapping: &Mapping, contact_ids: &[String]) -> Result<Vec<Outcome>> {
        let mut out = Vec::with_capacity(contact_ids.len());
        for chunk in contact_ids.chunks(self.batch_size) {
            let requests: Vec<Request> = chunk
                .iter()
                .map(|id| Request {
                    method: "DELETE",
                    url: batch::key_url(
                        &self.api,
                        &mapping.entity_set,
                        &mapping.external_id_field,
                        id,
                    ),
                    body: None,
                })
                .collect();
            let ids: Vec<&str> = chunk.iter().map(String::as_str).collect();
            out.extend(self.run_batch(&requests, &ids, true).await?);
        }
        Ok(out)
    }

    /// One `POST <url> <json>` per chunk with `UpsertMultiple`, else `PATCH <url> <json>` per
    /// record, as each would be inside the `$batch`.
    fn dry_run(&self, mapping: &Mapping, records: &[crate::sink::mapping::Record]) -> Vec<String> {
        if self.upsert_multiple {
            return records
                .chunks(self.batch_size)
                .map(|chunk| {
                    let (url, body) = self.upsert_multiple_request(mapping, chunk);
                    format!("POST {url} {body}")
                })
                .collect();
        }
        records
            .iter()
            .map(|r| {
                let req = self.upsert_request(mapping, r);
                format!(
                    "{} {} {}",
                    req.method,
                    req.url,
                    req.body.unwrap_or_default()
                )
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sink::http::Secret;
    use crate::sink::mapping::{MappingConfig, Record, TargetKind};

    fn cfg() -> Config {
        Config {
            url: "https://org.crm.dynamics.com/".into(),
            tenant: "contoso.onmicrosoft.com".into(),
            token_url: None,
            client_id: "app".into(),
            client_secret: Secret {
                value: Some("s".into()),
                ..Default::default()
            },
            scope: None,
            batch_size: 2,
            upsert_multiple: false,
            request_timeout: std::time::Duration::from_secs(5),
        }
    }

    #[test]
    fn dry_run_shows_one_upsert_multiple_per_chunk() {
        let mut c = cfg();
        c.upsert_multiple = true;
        let d = Dynamics::new(&c).unwrap();
        let m = Mapping::new(TargetKind::Dynamics, &MappingConfig::default());
        let records: Vec<Record> = (1..=3)
            .map(|i| {
                let mut fields = serde_json::Map::new();
                fields.insert("trusst_contact_id".into(), format!("c-{i}").into());
                fields.insert("quality_score".into(), i.into());
                Record::new(format!("c-{i}"), fields)
            })
            .collect();
        let lines = d.dry_run(&m, &records);
        assert_eq!(lines.len(), 2, "{lines:#?}");
        let (url, body) = lines[1]
            .strip_prefix("POST ")
            .unwrap()
            .split_once(' ')
            .unwrap();
        assert_eq!(
            url,
            "https://org.crm.dynamics.com/api/data/v9.2/contacts/Microsoft.Dynamics.CRM.UpsertMultiple"
        );
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(body).unwrap(),
            serde_json::json!({"Targets": [{"@odata.id": "contacts(trusst_contact_id='c-3')",
                "@odata.type": "Microsoft.Dynamics.CRM.contact", "quality_score": 3}]})
        );
    }

    #[test]
    fn dry_run_shows_the_patch_on_the_alternate_key() {
        let d = Dynamics::new(&cfg()).unwrap();
        let m = Mapping::new(TargetKind::Dynamics, &MappingConfig::default());
        let mut fields = serde_json::Map::new();
        fields.insert("trusst_contact_id".into(), "c-1".into());
        fields.insert("calldate".into(), "2025-01-15T14:23:10.000Z".into());
        let lines = d.dry_run(&m, &[Record::new("c-1", fields)]);
        assert_eq!(
            lines,
            [
                "PATCH https://org.crm.dynamics.com/api/data/v9.2/contacts(trusst_contact_id='c-1') {\"calldate\":\"2025-01-15T14:23:10.000Z\"}"
            ]
        );
        assert_eq!(d.max_batch(), 2);
    }

    #[test]
    fn config_mistakes_are_user_errors() {
        let mut c = cfg();
        c.batch_size = 1001;
        assert!(
            Dynamics::new(&c)
                .unwrap_err()
                .message()
                .contains("batch_size")
        );
        let mut c = cfg();
        c.url = "org.crm.dynamics.com".into();
        assert!(
            Dynamics::new(&c)
                .unwrap_err()
                .message()
                .contains("[dynamics] url")
        );
        let mut c = cfg();
        c.client_secret = Secret::default();
        assert!(
            Dynamics::new(&c)
                .unwrap_err()
                .message()
                .contains("client_secret")
        );
    }

    #[test]
    fn configured_choice_questions_get_the_option_set_conversion() {
        let cfg: MappingConfig = crate::config::parse(
            "field_prefix = \"new_\"\n[questions.call_outcome]\nfield = \"new_outcome\"\n[questions.quality_score]\n",
        )
        .unwrap();
        let mut m = Mapping::new(TargetKind::Dynamics, &cfg);
        let mut d = Dynamics::new(&self::cfg()).unwrap();
        let attr = |n: &str, t: &str| {
            (
                n.to_owned(),
                Attribute {
                    logical_name: n.into(),
                    attribute_type: t.into(),
                },
            )
        };
        d.attributes = BTreeMap::from([
            attr("new_outcome", "Picklist"),
            attr("new_sentiment", "Picklist"),
            attr("new_quality_score", "Integer"),
        ]);
        d.ensure_choice_questions(&mut m);
        assert_eq!(
            m.questions["call_outcome"].conversion,
            Some(Conversion::OptionSet)
        );
        // A non-choice column keeps the conversion of the answer's result type.
        assert_eq!(m.questions["quality_score"].conversion, None);
        // Columns that merely fit the naming rule get no question spec.
        assert_eq!(m.questions.len(), 2);
    }
}
