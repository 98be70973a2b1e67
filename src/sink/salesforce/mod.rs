//! Salesforce target: upsert on an external-id field through sObject Collections (up to
//! `bulk_threshold` records) or Bulk API 2.0 (larger batches), delete by external id.
//!
//! Decisions worth knowing:
//! - **Field existence.** `prepare` reads the object's describe; every record is screened
//!   against it before sending. A record writing a value to a field the object lacks (a
//!   question not listed in the config gets its field name from the naming rule at run time)
//!   is rejected on its own with a message naming the field, because Salesforce fails a whole
//!   Collections request for one unknown field. Null values for missing fields are dropped.
//!   The describe is read again (at most every five minutes, since each read counts against the
//!   allowance) when records name unknown fields, so a field created while the sink runs is
//!   picked up without a restart.
//! - **Per-record errors** are final (dead-lettered) except `UNABLE_TO_LOCK_ROW`: those records
//!   alone are sent again a few times with a short pause; if still locked, the call returns a
//!   retryable error and the runner resends the batch (upserts are idempotent).
//! - **Whole-request 400s** (a value the screening could not foresee) are narrowed down by
//!   splitting the request, within a small budget of extra calls, so the good records are
//!   still written and only the bad ones are rejected.
//! - **Allowance.** `Sforce-Limit-Info` is read on every response; writes stop at
//!   `limit_share` of the daily allowance with a retryable error carrying `limit_pause`. After
//!   the pause the usage is read again from `/limits/` before writing resumes.

pub mod auth;
pub mod bulk;
pub mod collections;
pub mod config;
pub mod describe;
pub mod limits;
pub mod profile;

pub use config::Config;
pub use profile::PROFILE;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use reqwest::header::{ACCEPT, CONTENT_TYPE, HeaderMap};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tracing::{debug, info, warn};

use self::auth::{Authenticator, Token};
use self::collections::RecordResult;
use self::describe::ObjectFields;
use self::limits::Usage;
use super::mapping::{Mapping, Record};
use super::verdict::{Verdict, of_error};
use super::{Outcome, Target, http};
use crate::error::{Error, Result};

/// How often a record locked by another transaction is sent again within one call.
const LOCK_RETRIES: u32 = 3;
/// Pause before the first resend of locked records (grows linearly).
const LOCK_BACKOFF: Duration = if cfg!(test) {
    Duration::from_millis(5)
} else {
    Duration::from_secs(1)
};
/// Extra requests one Collections chunk may spend isolating the records of a whole-request 400.
const BISECT_BUDGET: usize = 16;
/// Shortest time between two describes triggered by unknown fields.
const DESCRIBE_REFRESH: Duration = Duration::from_secs(300);
/// Longest pause between two polls of a bulk job.
const POLL_MAX: Duration = Duration::from_secs(10);
/// Attempts of a read (job status, result files) that meets 429, 5xx or a transport failure.
const READ_ATTEMPTS: u32 = 6;
/// Pause before the second attempt of such a read (doubles up to [`POLL_MAX`]).
const READ_BACKOFF: Duration = if cfg!(test) {
    Duration::from_millis(5)
} else {
    Duration::from_millis(500)
};
/// Most records one `upsert` call takes; larger than any sensible `bulk_threshold`, so that
/// batches above the threshold reach Bulk API (the runner's batch size is the real bound).
const MAX_BATCH: usize = 100_000;

const JSON: &str = "application/json";
const CSV: &str = "text/csv";

/// Records refused before sending: input index and reason.
type Rejections = Vec<(usize, String)>;

/// A request, kept whole so it can be sent again with a new token.
struct Req {
    method: Method,
    path: String,
    body: Option<(&'static str, Bytes)>,
    accept: &'static str,
}

impl Req {
    fn get(path: String, accept: &'static str) -> Self {
        Self {
            method: Method::GET,
            path,
            body: None,
            accept,
        }
    }
    fn json(method: Method, path: String, body: &Value) -> Self {
        Self {
            method,
            path,
            body: Some((JSON, Bytes::from(body.to_string()))),
            accept: JSON,
        }
    }
    fn csv(method: Method, path: String, body: String) -> Self {
        Self {
            method,
            path,
            body: Some((CSV, Bytes::from(body))),
            accept: JSON,
        }
    }
    fn delete(path: String) -> Self {
        Self {
            method: Method::DELETE,
            path,
            body: None,
            accept: JSON,
        }
    }
}

/// A response with its body read.
struct Resp {
    status: StatusCode,
    headers: HeaderMap,
    body: String,
}

/// The Salesforce [`Target`].
pub struct Salesforce {
    cfg: Config,
    client: reqwest::Client,
    auth: Authenticator,
    token: Option<Token>,
    usage: Usage,
    fields: Option<ObjectFields>,
    describe_refresh: Duration,
    data_path: String,
}

impl std::fmt::Debug for Salesforce {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Salesforce")
            .field("login_url", &self.cfg.login_url)
            .field("usage", &self.usage.get())
            .finish_non_exhaustive()
    }
}

/// Percent-encode one URL path segment (an external-id value may hold `/`, `?`, spaces...).
pub fn encode_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The external-id value of a record as it is sent.
fn ext_value<'a>(r: &'a Record, ext: &str) -> &'a str {
    r.fields
        .get(ext)
        .and_then(Value::as_str)
        .unwrap_or(&r.contact_id)
}

impl Salesforce {
    /// Check the config (credentials, key, numbers) and build the client; nothing is sent.
    pub fn new(cfg: &Config) -> Result<Self> {
        if !(cfg.limit_share > 0.0 && cfg.limit_share <= 1.0) {
            return Err(Error::user(format!(
                "[salesforce] limit_share = {} must be above 0 and at most 1 (e.g. 0.9)",
                cfg.limit_share
            )));
        }
        let version = cfg.api_version.trim_start_matches(['v', 'V']);
        match version.parse::<f64>() {
            Ok(v) if v >= 46.0 => {}
            _ => {
                return Err(Error::user(format!(
                    "[salesforce] api_version {:?}: use a REST API version of 46.0 or newer (e.g. \"62.0\"); sObject Collections upsert needs it",
                    cfg.api_version
                )));
            }
        }
        let mut cfg = cfg.clone();
        // A zero interval would poll in a tight loop.
        cfg.bulk_poll_interval = cfg.bulk_poll_interval.max(Duration::from_millis(50));
        Ok(Self {
            auth: Authenticator::new(&cfg)?,
            client: http::client(cfg.request_timeout)?,
            data_path: format!("/services/data/v{version}"),
            cfg,
            token: None,
            usage: Usage::default(),
            fields: None,
            describe_refresh: DESCRIBE_REFRESH,
        })
    }

    /// The last `(used, max)` of the daily API allowance seen in `Sforce-Limit-Info`.
    pub fn api_usage(&self) -> Option<(u64, u64)> {
        self.usage.get()
    }

    fn data(&self, rest: &str) -> String {
        format!("{}{rest}", self.data_path)
    }

    /// Send with the current token; on 401 get a new token and send once more. Reads the
    /// allowance from every response and turns 403 `REQUEST_LIMIT_EXCEEDED` into a pause.
    async fn send(&mut self, what: &str, req: &Req) -> Result<Resp> {
        let mut fresh = false;
        loop {
            let token = match &self.token {
                Some(t) => t.clone(),
                None => {
                    // Credentials refused mid-run (a rotated secret, a revoked app) are the
                    // operator's to fix, but the records are fine: pause instead of dead-lettering.
                    let t = self.auth.fetch(&self.client).await.map_err(|e| {
                        // A stop becomes a pause: the same user error, retried after it.
                        if of_error(&e) == Verdict::Stop {
                            e.after(self.cfg.limit_pause)
                        } else {
                            e
                        }
                    })?;
                    self.token = Some(t.clone());
                    fresh = true;
                    t
                }
            };
            let url = format!("{}{}", token.instance_url, req.path);
            let mut rb = self
                .client
                .request(req.method.clone(), &url)
                .bearer_auth(&token.access_token)
                .header(ACCEPT, req.accept);
            if let Some((ct, body)) = &req.body {
                rb = rb.header(CONTENT_TYPE, *ct).body(body.clone());
            }
            let started = Instant::now();
            let resp = http::send("salesforce", what, rb).await?;
            let status = resp.status();
            let headers = resp.headers().clone();
            self.usage.observe(&headers);
            let body = resp.text().await.map_err(|e| http::transport(what, e))?;
            debug!(method = %req.method, url = %url, status = status.as_u16(), ms = started.elapsed().as_millis() as u64, "Salesforce request");
            if status == StatusCode::UNAUTHORIZED {
                self.token = None;
                if !fresh {
                    info!("Salesforce session expired or invalid; getting a new token");
                    fresh = true;
                    continue;
                }
                return Err(Error::user(format!(
                    "{what}: HTTP 401 even with a new token ({}); check the integration user is active and has API Enabled",
                    collections::request_error(&body)
                ))
                .after(self.cfg.limit_pause));
            }
            if status == StatusCode::FORBIDDEN && body.contains("REQUEST_LIMIT_EXCEEDED") {
                if let Some((_, max)) = self.usage.get() {
                    self.usage.record(max, max);
                }
                let pause = humantime::format_duration(self.cfg.limit_pause);
                warn!(pause = %pause, "Salesforce daily API allowance is spent (REQUEST_LIMIT_EXCEEDED); pausing writes");
                return Err(Error::external(format!(
                    "{what}: Salesforce daily API allowance is spent (403 REQUEST_LIMIT_EXCEEDED); pausing writes for {pause}"
                ))
                .after(self.cfg.limit_pause));
            }
            return Ok(Resp {
                status,
                headers,
                body,
            });
        }
    }

    /// The error for an unexpected status: what HTTP says, except that Salesforce's 403 also
    /// reports a spent allowance, so it pauses (records kept) instead of stopping the sink.
    fn status_error(&self, what: &str, resp: &Resp) -> Error {
        let msg = collections::request_error(&resp.body);
        if resp.status == StatusCode::FORBIDDEN {
            return Verdict::Pause(Some(self.cfg.limit_pause)).error(format!(
                "{what}: HTTP 403: {msg}; grant the integration user API access and permission on the object and its fields"
            ));
        }
        http::status_error(what, resp.status, &resp.headers, &msg)
    }

    /// A GET that rides out 429, 5xx and transport failures (bulk job status and result files:
    /// one bad poll must not fail the batch).
    async fn read(&mut self, what: &str, path: &str, accept: &'static str) -> Result<String> {
        let mut wait = READ_BACKOFF;
        let mut attempt = 1;
        loop {
            let err = match self.send(what, &Req::get(path.to_owned(), accept)).await {
                Ok(resp) if resp.status.is_success() => return Ok(resp.body),
                Ok(resp) if resp.status.as_u16() == 429 || resp.status.is_server_error() => {
                    let e = self.status_error(what, &resp);
                    wait = http::retry_after(&resp.headers)
                        .unwrap_or(wait)
                        .min(Duration::from_secs(60));
                    e
                }
                Ok(resp) => return Err(self.status_error(what, &resp)),
                // Transport failures carry no pause; a pause means the allowance or credentials.
                Err(e) if e.retryable && e.retry_after.is_none() => e,
                Err(e) => return Err(e),
            };
            if attempt >= READ_ATTEMPTS {
                return Err(err);
            }
            warn!(attempt, wait_ms = wait.as_millis() as u64, error = %err, "Salesforce read failed; trying again");
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(POLL_MAX);
            attempt += 1;
        }
    }

    /// Stop before writing when the allowance has reached `limit_share`. Once the pause has
    /// passed, read the usage again (it falls as the 24-hour window rolls on).
    async fn check_allowance(&mut self) -> Result<()> {
        let share = self.cfg.limit_share;
        if self.usage.reached(share).is_none() {
            return Ok(());
        }
        if self.usage.age().is_some_and(|a| a >= self.cfg.limit_pause) {
            // Without a new reading the old one would block writes for ever.
            self.usage = Usage::default();
            let resp = self
                .send("Salesforce limits", &Req::get(self.data("/limits/"), JSON))
                .await?;
            let reading = serde_json::from_str::<Value>(&resp.body).ok();
            if let Some((used, max)) = reading
                .as_ref()
                .filter(|_| resp.status.is_success())
                .and_then(limits::parse_limits_body)
            {
                self.usage.record(used, max);
            }
        }
        if let Some((used, max)) = self.usage.reached(share) {
            let e = limits::pause_error(used, max, share, self.cfg.limit_pause);
            warn!("{}", e.message());
            return Err(e);
        }
        Ok(())
    }

    async fn describe(&mut self, object: &str) -> Result<ObjectFields> {
        let what = format!("describe of {object}");
        let resp = self
            .send(
                &what,
                &Req::get(
                    self.data(&format!("/sobjects/{}/describe", encode_segment(object))),
                    JSON,
                ),
            )
            .await?;
        match resp.status.as_u16() {
            200 => ObjectFields::parse(object, &resp.body),
            404 => Err(Error::user(format!(
                "object {object} does not exist in Salesforce or the integration user cannot see it; fix [mapping] object or grant access"
            ))),
            _ => Err(self.status_error(&what, &resp)),
        }
    }

    /// Read the describe again when records name fields it lacks (at most every five minutes).
    async fn refresh_fields_for(&mut self, object: &str, records: &[Record]) {
        let Some(f) = &self.fields else { return };
        let stale = f.fetched.elapsed() >= self.describe_refresh;
        if !stale
            || !records
                .iter()
                .any(|r| r.fields.iter().any(|(k, v)| !v.is_null() && !f.has(k)))
        {
            return;
        }
        match self.describe(object).await {
            Ok(f) => self.fields = Some(f),
            Err(e) => {
                warn!(error = %e, "could not read the describe again; screening with the previous one")
            }
        }
    }

    async fn collections_upsert(
        &mut self,
        mapping: &Mapping,
        recs: &[&Record],
    ) -> Result<Vec<Outcome>> {
        let mut out = Vec::with_capacity(recs.len());
        for chunk in recs.chunks(collections::MAX_RECORDS) {
            out.extend(self.collections_chunk(mapping, chunk).await?);
        }
        Ok(out)
    }

    /// One chunk of at most 200, resending records that met a locked row.
    async fn collections_chunk(
        &mut self,
        mapping: &Mapping,
        recs: &[&Record],
    ) -> Result<Vec<Outcome>> {
        let mut out: Vec<Option<Outcome>> = vec![None; recs.len()];
        let mut pending: Vec<usize> = (0..recs.len()).collect();
        let mut attempt = 0;
        loop {
            let batch: Vec<&Record> = pending.iter().map(|&i| recs[i]).collect();
            let results = self.collections_send(mapping, &batch).await?;
            let mut locked = Vec::new();
            let mut reason = String::new();
            for (k, r) in results.into_iter().enumerate() {
                let i = pending[k];
                match r {
                    RecordResult::Written => out[i] = Some(Outcome::Written),
                    RecordResult::Rejected(m) => out[i] = Some(Outcome::Rejected(m)),
                    RecordResult::Transient(m) => {
                        locked.push(i);
                        reason = m;
                    }
                }
            }
            if locked.is_empty() {
                break;
            }
            attempt += 1;
            if attempt > LOCK_RETRIES {
                return Err(Error::external(format!(
                    "{} records stayed locked after {} attempts ({reason}); the batch is retried later",
                    locked.len(),
                    attempt
                )));
            }
            let contact_ids =
                crate::sink::contact_ids(locked.iter().map(|&i| recs[i].contact_id.as_str()));
            warn!(
                records = locked.len(),
                attempt,
                contact_ids,
                "Salesforce rows locked by another transaction; sending them again"
            );
            tokio::time::sleep(LOCK_BACKOFF * attempt).await;
            pending = locked;
        }
        Ok(out
            .into_iter()
            .map(|o| o.unwrap_or_else(|| Outcome::Rejected("no result for this record".into())))
            .collect())
    }

    /// Send records as Collections requests; a whole-request 400 is split to find the records
    /// at fault.
    async fn collections_send(
        &mut self,
        mapping: &Mapping,
        recs: &[&Record],
    ) -> Result<Vec<RecordResult>> {
        let what = "Salesforce Collections upsert";
        let path = self.data(&format!(
            "/composite/sobjects/{}/{}",
            encode_segment(&mapping.object),
            encode_segment(&mapping.external_id_field)
        ));
        let mut res: Vec<Option<RecordResult>> = vec![None; recs.len()];
        let mut budget = BISECT_BUDGET;
        let mut stack = vec![(0, recs.len())];
        while let Some((lo, hi)) = stack.pop() {
            self.check_allowance().await?;
            let body = collections::body(&mapping.object, recs[lo..hi].iter().copied());
            let resp = self
                .send(what, &Req::json(Method::PATCH, path.clone(), &body))
                .await?;
            match resp.status.as_u16() {
                200 => {
                    for (k, r) in collections::results(&resp.body, hi - lo)?
                        .into_iter()
                        .enumerate()
                    {
                        res[lo + k] = Some(r);
                    }
                }
                400 if hi - lo > 1 && budget >= 2 => {
                    budget -= 2;
                    let mid = lo + (hi - lo) / 2;
                    warn!(
                        records = hi - lo, contact_ids = crate::sink::contact_ids(recs[lo..hi].iter().map(|r| r.contact_id.as_str())),
                        error = %collections::request_error(&resp.body), "Salesforce refused the whole request; splitting it to find the records at fault"
                    );
                    stack.push((mid, hi));
                    stack.push((lo, mid));
                }
                400 => {
                    let msg = collections::request_error(&resp.body);
                    for r in &mut res[lo..hi] {
                        *r = Some(RecordResult::Rejected(msg.clone()));
                    }
                }
                _ => return Err(self.status_error(what, &resp)),
            }
        }
        Ok(res
            .into_iter()
            .map(|r| {
                r.unwrap_or_else(|| RecordResult::Rejected("no result for this record".into()))
            })
            .collect())
    }

    async fn bulk_upsert(&mut self, mapping: &Mapping, recs: &[&Record]) -> Result<Vec<Outcome>> {
        let ext = mapping.external_id_field.as_str();
        let parts = bulk::build_parts(recs, ext, bulk::MAX_UPLOAD_BYTES)?;
        let mut res: Vec<Option<RecordResult>> = vec![None; recs.len()];
        for part in &parts {
            self.check_allowance().await?;
            let job = self.run_job(mapping, part).await?;
            let jp = self.data(&format!("/jobs/ingest/{}", encode_segment(&job)));
            let index: HashMap<&str, usize> = part
                .rows
                .iter()
                .map(|&i| (ext_value(recs[i], ext), i))
                .collect();
            let ok = self
                .read(
                    "Bulk API successful results",
                    &format!("{jp}/successfulResults/"),
                    CSV,
                )
                .await?;
            bulk::read_results(&ok, ext, true, &index, &mut res)?;
            let failed = self
                .read(
                    "Bulk API failed results",
                    &format!("{jp}/failedResults/"),
                    CSV,
                )
                .await?;
            bulk::read_results(&failed, ext, false, &index, &mut res)?;
            let missing = part.rows.iter().filter(|&&i| res[i].is_none()).count();
            if missing > 0 {
                let unprocessed = self
                    .read(
                        "Bulk API unprocessed records",
                        &format!("{jp}/unprocessedrecords/"),
                        CSV,
                    )
                    .await
                    .map(|t| bulk::count_rows(&t));
                warn!(job = %job, missing, unprocessed = ?unprocessed.ok(), "Bulk API job left records unprocessed");
            }
        }
        let missing = res.iter().filter(|r| r.is_none()).count();
        let locked = res
            .iter()
            .filter(|r| matches!(r, Some(RecordResult::Transient(_))))
            .count();
        if missing + locked > 0 {
            // Written rows are written again on the retry: upserts are idempotent.
            return Err(Error::external(format!(
                "Bulk API left {missing} of {} records unprocessed and {locked} on locked rows; the batch is retried",
                recs.len()
            )));
        }
        Ok(res
            .into_iter()
            .map(|r| match r {
                Some(RecordResult::Rejected(m)) => Outcome::Rejected(m),
                _ => Outcome::Written,
            })
            .collect())
    }

    /// Create a job, upload the CSV, close it and wait for it to complete; returns the job id.
    async fn run_job(&mut self, mapping: &Mapping, part: &bulk::Part) -> Result<String> {
        let create = Req::json(
            Method::POST,
            self.data("/jobs/ingest"),
            &bulk::job_request(&mapping.object, &mapping.external_id_field),
        );
        let resp = self.send("Bulk API job creation", &create).await?;
        if !resp.status.is_success() {
            return Err(self.status_error("Bulk API job creation", &resp));
        }
        let job: bulk::JobInfo = serde_json::from_str(&resp.body).map_err(|e| {
            Error::external(format!(
                "Bulk API job creation: unexpected answer: {}",
                collections::snippet(&resp.body)
            ))
            .with_source(e)
        })?;
        let jp = self.data(&format!("/jobs/ingest/{}", encode_segment(&job.id)));
        info!(job = %job.id, records = part.rows.len(), bytes = part.csv.len(), "Bulk API job created");
        let steps = [
            (
                "Bulk API upload",
                Req::csv(Method::PUT, format!("{jp}/batches"), part.csv.clone()),
            ),
            (
                "Bulk API job close",
                Req::json(
                    Method::PATCH,
                    jp.clone(),
                    &json!({ "state": "UploadComplete" }),
                ),
            ),
        ];
        for (what, req) in &steps {
            let r = match self.send(what, req).await {
                Ok(resp) if resp.status.is_success() => Ok(()),
                Ok(resp) => Err(self.status_error(what, &resp)),
                Err(e) => Err(e),
            };
            if let Err(e) = r {
                self.abort_job(&jp).await;
                return Err(e);
            }
        }
        let info = self.poll_job(&jp, &job.id).await?;
        match info.state.as_str() {
            "JobComplete" => {
                info!(job = %job.id, processed = ?info.number_records_processed, failed = ?info.number_records_failed, "Bulk API job complete");
                Ok(job.id)
            }
            state => Err(Error::external(format!(
                "Bulk API job {} ended {state}: {}; the batch is retried",
                job.id,
                info.error_message.as_deref().unwrap_or("no reason given")
            ))),
        }
    }

    /// Poll until the job is final. Polls back off from `bulk_poll_interval` to 10 s since each
    /// counts against the allowance; past `bulk_timeout` the job is aborted.
    async fn poll_job(&mut self, jp: &str, id: &str) -> Result<bulk::JobInfo> {
        let started = Instant::now();
        let mut interval = self.cfg.bulk_poll_interval;
        let cap = POLL_MAX.max(interval);
        loop {
            tokio::time::sleep(interval).await;
            let body = self.read("Bulk API job status", jp, JSON).await?;
            let info: bulk::JobInfo = serde_json::from_str(&body).map_err(|e| {
                Error::external(format!(
                    "Bulk API job status: unexpected answer: {}",
                    collections::snippet(&body)
                ))
                .with_source(e)
            })?;
            if info.is_final() {
                return Ok(info);
            }
            debug!(job = %id, state = %info.state, processed = ?info.number_records_processed, "Bulk API job running");
            if started.elapsed() >= self.cfg.bulk_timeout {
                self.abort_job(jp).await;
                return Err(Error::external(format!(
                    "Bulk API job {id} still {} after {}; aborted it, the batch is retried",
                    info.state,
                    humantime::format_duration(self.cfg.bulk_timeout)
                )));
            }
            interval = (interval * 3 / 2).min(cap);
        }
    }

    /// Best effort: an abandoned job would otherwise still run and count against limits.
    async fn abort_job(&mut self, jp: &str) {
        match self
            .send(
                "Bulk API job abort",
                &Req::json(Method::PATCH, jp.to_owned(), &json!({ "state": "Aborted" })),
            )
            .await
        {
            Ok(r) if r.status.is_success() => info!(job = %jp, "Bulk API job aborted"),
            Ok(r) => {
                warn!(job = %jp, status = r.status.as_u16(), "could not abort the Bulk API job")
            }
            Err(e) => warn!(job = %jp, error = %e, "could not abort the Bulk API job"),
        }
    }

    /// Screen records against the describe (when read): the ones to send, with their input
    /// index, and the rejected ones.
    fn screen(&self, records: &[Record]) -> (Vec<(usize, Record)>, Rejections) {
        let mut send = Vec::with_capacity(records.len());
        let mut rejected = Vec::new();
        for (i, r) in records.iter().enumerate() {
            match self.fields.as_ref().map(|f| f.screen(r)) {
                None => send.push((i, r.clone())),
                Some(Ok(r)) => send.push((i, r)),
                Some(Err(reason)) => rejected.push((i, reason)),
            }
        }
        (send, rejected)
    }
}

#[async_trait]
impl Target for Salesforce {
    async fn prepare(&mut self, mapping: &mut Mapping) -> Result<()> {
        // At start a refused token is a plain user error: the sink should not start.
        self.token = Some(self.auth.fetch(&self.client).await?);
        let fields = self.describe(&mapping.object).await?;
        fields.check(mapping)?;
        fields.fill_picklists(mapping);
        info!(object = %fields.object, external_id = %mapping.external_id_field, "Salesforce mapping checked against the object's fields");
        self.fields = Some(fields);
        Ok(())
    }

    fn max_batch(&self) -> usize {
        MAX_BATCH.max(self.cfg.bulk_threshold.saturating_add(1))
    }

    async fn upsert(&mut self, mapping: &Mapping, records: &[Record]) -> Result<Vec<Outcome>> {
        if records.is_empty() {
            return Ok(Vec::new());
        }
        self.refresh_fields_for(&mapping.object, records).await;
        let (send, rejected) = self.screen(records);
        let mut out: Vec<Option<Outcome>> = vec![None; records.len()];
        for (i, reason) in rejected {
            debug!(contact_id = %records[i].contact_id, reason = %reason, "record rejected before sending");
            out[i] = Some(Outcome::Rejected(reason));
        }
        let recs: Vec<&Record> = send.iter().map(|(_, r)| r).collect();
        let results = if recs.is_empty() {
            Vec::new()
        } else if recs.len() > self.cfg.bulk_threshold {
            self.bulk_upsert(mapping, &recs).await?
        } else {
            self.collections_upsert(mapping, &recs).await?
        };
        for ((i, _), o) in send.iter().zip(results) {
            out[*i] = Some(o);
        }
        out.into_iter()
            .map(|o| o.ok_or_else(|| Error::internal("Salesforce upsert: a record got no outcome")))
            .collect()
    }

    async fn delete(&mut self, mapping: &Mapping, contact_ids: &[String]) -> Result<Vec<Outcome>> {
        let what = "Salesforce delete";
        let mut out = Vec::with_capacity(contact_ids.len());
        for id in contact_ids {
            self.check_allowance().await?;
            let path = self.data(&format!(
                "/sobjects/{}/{}/{}",
                encode_segment(&mapping.object),
                encode_segment(&mapping.external_id_field),
                encode_segment(id)
            ));
            let resp = self.send(what, &Req::delete(path)).await?;
            out.push(match resp.status.as_u16() {
                200 | 204 => Outcome::Written,
                404 => {
                    debug!(contact_id = %id, "already absent from Salesforce");
                    Outcome::Written
                }
                300 => Outcome::Rejected(format!(
                    "several {} records have {} = {id}; make the field Unique, remove the duplicates, then replay",
                    mapping.object, mapping.external_id_field
                )),
                400 => Outcome::Rejected(collections::request_error(&resp.body)),
                _ => return Err(self.status_error(what, &resp)),
            });
        }
        Ok(out)
    }

    fn dry_run(&self, mapping: &Mapping, records: &[Record]) -> Vec<String> {
        let base = match &self.token {
            Some(t) => t.instance_url.clone(),
            None => self.cfg.login_url.trim_end_matches('/').to_owned(),
        };
        let (send, _) = self.screen(records);
        let recs: Vec<&Record> = send.iter().map(|(_, r)| r).collect();
        if recs.is_empty() {
            return Vec::new();
        }
        if recs.len() <= self.cfg.bulk_threshold {
            let url = format!(
                "{base}{}",
                self.data(&format!(
                    "/composite/sobjects/{}/{}",
                    encode_segment(&mapping.object),
                    encode_segment(&mapping.external_id_field)
                ))
            );
            return recs
                .chunks(collections::MAX_RECORDS)
                .map(|c| {
                    format!(
                        "PATCH {url} {}",
                        collections::body(&mapping.object, c.iter().copied())
                    )
                })
                .collect();
        }
        let parts =
            match bulk::build_parts(&recs, &mapping.external_id_field, bulk::MAX_UPLOAD_BYTES) {
                Ok(p) => p,
                Err(e) => return vec![format!("# {e}")],
            };
        let jobs = format!("{base}{}", self.data("/jobs/ingest"));
        let create = bulk::job_request(&mapping.object, &mapping.external_id_field);
        parts
            .iter()
            .enumerate()
            .flat_map(|(n, p)| {
                let job = format!("{jobs}/<job {}>", n + 1);
                [
                    format!("POST {jobs} {create}"),
                    format!(
                        "PUT {job}/batches text/csv: header + {} lines, {} bytes",
                        p.rows.len(),
                        p.csv.len()
                    ),
                    format!("PATCH {job} {}", json!({ "state": "UploadComplete" })),
                ]
            })
            .collect()
    }
}

#[cfg(test)]
mod tests;
