//! Salesforce Bulk API 2.0 ingest (upsert only): create a job, upload one CSV, close it, poll
//! while it is processed asynchronously, then read the successful, failed and unprocessed rows.
//! Results come back in reverse upload order, since the real service promises no order.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use super::config::{SObject, SfField, SfType};
use super::salesforce::{FieldError, check_value, error, external_id, sf_id, sobject, write};
use super::store::Store;
use super::{App, Inner, System, json};

/// Time between the job's state steps (UploadComplete -> InProgress -> JobComplete), so that
/// clients have to poll as they do against the real service.
const STEP: Duration = Duration::from_millis(100);

pub(super) fn routes() -> Router<Arc<App>> {
    let jobs = "/services/data/{version}/jobs/ingest";
    Router::new()
        .route(jobs, post(create))
        .route(&format!("{jobs}/"), post(create))
        .route(
            &format!("{jobs}/{{id}}"),
            get(info).patch(change_state).delete(remove),
        )
        .route(&format!("{jobs}/{{id}}/batches"), put(upload))
        .route(&format!("{jobs}/{{id}}/batches/"), put(upload))
        .route(&format!("{jobs}/{{id}}/{{results}}"), get(results))
        .route(&format!("{jobs}/{{id}}/{{results}}/"), get(results))
}

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub(super) enum JobState {
    Open,
    UploadComplete,
    InProgress,
    JobComplete,
    Failed,
    Aborted,
}

/// One ingest job.
pub(super) struct Job {
    id: String,
    object: String,
    ext_field: String,
    api_version: String,
    crlf: bool,
    created: String,
    state: JobState,
    data: Option<String>,
    processed: usize,
    failed: usize,
    error: Option<String>,
    /// successful, failed and unprocessed rows as CSV, once the job is finished.
    results: Option<[String; 3]>,
}

impl Job {
    fn info(&self) -> Value {
        let mut v = json!({
            "id": self.id,
            "operation": "upsert",
            "object": self.object,
            "createdById": "005000000000001AAA",
            "createdDate": self.created,
            "systemModstamp": self.created,
            "state": self.state,
            "externalIdFieldName": self.ext_field,
            "concurrencyMode": "Parallel",
            "contentType": "CSV",
            "apiVersion": self.api_version.parse::<f64>().unwrap_or_default(),
            "contentUrl": format!("services/data/v{}/jobs/ingest/{}/batches", self.api_version, self.id),
            "lineEnding": if self.crlf { "CRLF" } else { "LF" },
            "columnDelimiter": "COMMA",
            "jobType": "V2Ingest",
            "numberRecordsProcessed": self.processed,
            "numberRecordsFailed": self.failed,
            "retries": 0,
            "totalProcessingTime": 0,
        });
        if let Some(e) = &self.error {
            v["errorMessage"] = e.clone().into();
        }
        v
    }

    /// Finish without processing: every uploaded row is unprocessed.
    fn finish_unprocessed(&mut self, state: JobState, error: Option<String>) {
        let (columns, rows) = self
            .data
            .as_deref()
            .map(parse_csv)
            .and_then(Result::ok)
            .unwrap_or_default();
        self.results = Some([
            render(&["sf__Id", "sf__Created"], &columns, vec![], self.crlf),
            render(&["sf__Id", "sf__Error"], &columns, vec![], self.crlf),
            render(&[], &columns, rows, self.crlf),
        ]);
        self.state = state;
        self.error = error;
    }
}

fn job_error(status: StatusCode, message: impl Into<String>) -> Response {
    error(status, "INVALIDJOB", message)
}

fn state_error(message: impl Into<String>) -> Response {
    error(StatusCode::BAD_REQUEST, "INVALIDJOBSTATE", message)
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct NewJob {
    object: String,
    operation: String,
    external_id_field_name: Option<String>,
    content_type: Option<String>,
    line_ending: Option<String>,
    column_delimiter: Option<String>,
}

async fn create(
    State(app): State<Arc<App>>,
    Path(p): Path<HashMap<String, String>>,
    body: Bytes,
) -> Response {
    let req: NewJob = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, "JSON_PARSER_ERROR", e.to_string()),
    };
    let obj = match sobject(&app, &req.object) {
        Ok(o) => o,
        Err(_) => {
            return job_error(
                StatusCode::BAD_REQUEST,
                format!("Entity '{}' is not supported by the Bulk API", req.object),
            );
        }
    };
    if req.operation != "upsert" {
        return job_error(
            StatusCode::BAD_REQUEST,
            format!(
                "operation '{}' is not emulated; only upsert is",
                req.operation
            ),
        );
    }
    let ext_field = req.external_id_field_name.unwrap_or_default();
    if external_id(obj, &ext_field).is_err() {
        return job_error(
            StatusCode::BAD_REQUEST,
            format!(
                "'{ext_field}' is not an external id field of {}",
                req.object
            ),
        );
    }
    if req.content_type.is_some_and(|c| c != "CSV")
        || req.column_delimiter.is_some_and(|c| c != "COMMA")
    {
        return job_error(
            StatusCode::BAD_REQUEST,
            "only contentType CSV with columnDelimiter COMMA is emulated",
        );
    }
    let crlf = match req.line_ending.as_deref() {
        None | Some("LF") => false,
        Some("CRLF") => true,
        Some(other) => {
            return job_error(
                StatusCode::BAD_REQUEST,
                format!("lineEnding '{other}' must be LF or CRLF"),
            );
        }
    };
    let mut inner = app.lock();
    let id = sf_id("750", inner.store.next_seq());
    let job = Job {
        id: id.clone(),
        object: req.object,
        ext_field,
        api_version: p["version"].trim_start_matches('v').to_owned(),
        crlf,
        created: chrono::Utc::now()
            .format("%Y-%m-%dT%H:%M:%S%.3f+0000")
            .to_string(),
        state: JobState::Open,
        data: None,
        processed: 0,
        failed: 0,
        error: None,
        results: None,
    };
    let body = job.info();
    inner.jobs.insert(id, job);
    json(StatusCode::OK, body)
}

/// Run `f` on job `id` under the lock, or answer 404.
fn with_job(
    app: &App,
    p: &HashMap<String, String>,
    f: impl FnOnce(&mut Job) -> Response,
) -> Response {
    match app.lock().jobs.get_mut(&p["id"]) {
        Some(job) => f(job),
        None => error(
            StatusCode::NOT_FOUND,
            "NOT_FOUND",
            "The requested resource does not exist",
        ),
    }
}

async fn info(State(app): State<Arc<App>>, Path(p): Path<HashMap<String, String>>) -> Response {
    with_job(&app, &p, |job| json(StatusCode::OK, job.info()))
}

async fn upload(
    State(app): State<Arc<App>>,
    Path(p): Path<HashMap<String, String>>,
    body: Bytes,
) -> Response {
    with_job(&app, &p, |job| {
        if job.state != JobState::Open || job.data.is_some() {
            return state_error("Data can be uploaded once, while the job is Open");
        }
        match String::from_utf8(body.to_vec()) {
            Ok(text) => {
                job.data = Some(text);
                StatusCode::CREATED.into_response()
            }
            Err(_) => job_error(StatusCode::BAD_REQUEST, "the CSV data must be UTF-8"),
        }
    })
}

async fn change_state(
    State(app): State<Arc<App>>,
    Path(p): Path<HashMap<String, String>>,
    body: Bytes,
) -> Response {
    #[derive(Deserialize)]
    struct Change {
        state: String,
    }
    let requested = match serde_json::from_slice::<Change>(&body) {
        Ok(c) => c.state,
        Err(e) => return error(StatusCode::BAD_REQUEST, "JSON_PARSER_ERROR", e.to_string()),
    };
    let app2 = app.clone();
    with_job(&app, &p, |job| {
        match (job.state, requested.as_str()) {
            (JobState::Open, "UploadComplete") => {
                job.state = JobState::UploadComplete;
                tokio::spawn(process_later(app2, job.id.clone()));
            }
            (JobState::Open | JobState::UploadComplete | JobState::InProgress, "Aborted") => {
                job.finish_unprocessed(JobState::Aborted, None);
            }
            (from, to) => {
                return state_error(format!(
                    "Cannot change the job's state from {from:?} to {to}"
                ));
            }
        }
        json(StatusCode::OK, job.info())
    })
}

async fn remove(State(app): State<Arc<App>>, Path(p): Path<HashMap<String, String>>) -> Response {
    let mut inner = app.lock();
    match inner.jobs.get(&p["id"]).map(|j| j.state) {
        Some(JobState::JobComplete | JobState::Failed | JobState::Aborted) => {
            inner.jobs.remove(&p["id"]);
            StatusCode::NO_CONTENT.into_response()
        }
        Some(_) => {
            state_error("Only a finished job (JobComplete, Failed or Aborted) can be deleted")
        }
        None => error(
            StatusCode::NOT_FOUND,
            "NOT_FOUND",
            "The requested resource does not exist",
        ),
    }
}

async fn results(State(app): State<Arc<App>>, Path(p): Path<HashMap<String, String>>) -> Response {
    // Matched in any letter case: Salesforce documents `unprocessedrecords/` while clients
    // (simple-salesforce among them) ask for `unprocessedRecords`, and the service takes both.
    let which = match p["results"].to_ascii_lowercase().as_str() {
        "successfulresults" => 0,
        "failedresults" => 1,
        "unprocessedrecords" => 2,
        _ => {
            return error(
                StatusCode::NOT_FOUND,
                "NOT_FOUND",
                "The requested resource does not exist",
            );
        }
    };
    with_job(&app, &p, |job| match &job.results {
        Some(r) => ([(header::CONTENT_TYPE, "text/csv")], r[which].clone()).into_response(),
        None => state_error(format!(
            "Results are available once the job is finished; it is {:?}",
            job.state
        )),
    })
}

/// Move the job along: InProgress after one step, processed after another, unless aborted.
async fn process_later(app: Arc<App>, id: String) {
    tokio::time::sleep(STEP).await;
    if let Some(job) = app
        .lock()
        .jobs
        .get_mut(&id)
        .filter(|j| j.state == JobState::UploadComplete)
    {
        job.state = JobState::InProgress;
    }
    tokio::time::sleep(STEP).await;
    let mut guard = app.lock();
    let Inner { jobs, store, .. } = &mut *guard;
    let Some(job) = jobs
        .get_mut(&id)
        .filter(|j| j.state == JobState::InProgress)
    else {
        return;
    };
    let obj = &app.cfg.salesforce.objects[&job.object];
    process(store, obj, job);
    app.persist(&guard);
}

/// Upsert every row of a closed job and render its results.
fn process(store: &mut Store, obj: &SObject, job: &mut Job) {
    let (columns, rows) = match parse_csv(job.data.as_deref().unwrap_or_default()) {
        Ok(parsed) => parsed,
        Err(e) => {
            return job.finish_unprocessed(
                JobState::Failed,
                Some(format!("InvalidBatch : Failed to parse CSV: {e}")),
            );
        }
    };
    if let Some(unknown) = columns
        .iter()
        .find(|c| !obj.fields.contains_key(c.as_str()))
    {
        return job.finish_unprocessed(
            JobState::Failed,
            Some(format!("InvalidBatch : Field name not found : {unknown}")),
        );
    }
    let Some(key) = columns.iter().position(|c| *c == job.ext_field) else {
        let message = format!(
            "InvalidBatch : The external id field {} must be a column of the upload",
            job.ext_field
        );
        return job.finish_unprocessed(JobState::Failed, Some(message));
    };
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for row in &rows {
        *seen.entry(row[key].as_str()).or_default() += 1;
    }
    // One pass over the table instead of one scan per row.
    let mut index: HashMap<String, String> = store
        .table(System::Salesforce, &job.object)
        .iter()
        .filter_map(|(id, r)| Some((r.get(&job.ext_field)?.as_str()?.to_owned(), id.clone())))
        .collect();
    let (mut succeeded, mut failed) = (vec![], vec![]);
    for row in &rows {
        let ext = row[key].as_str();
        let fields = if ext.is_empty() || ext == "#N/A" {
            Err(FieldError {
                code: "REQUIRED_FIELD_MISSING",
                message: format!("Required fields are missing: [{}]", job.ext_field),
                fields: vec![job.ext_field.clone()],
            })
        } else if seen[ext] > 1 {
            Err(FieldError {
                code: "DUPLICATE_VALUE",
                message: format!("Duplicate external id specified: {ext}"),
                fields: vec![job.ext_field.clone()],
            })
        } else {
            row_fields(obj, &columns, row, key)
        };
        match fields {
            Ok(fields) => {
                let (id, created) = write(
                    store,
                    &job.object,
                    &obj.key_prefix,
                    index.get(ext).cloned(),
                    (&job.ext_field, ext),
                    fields,
                );
                index.insert(ext.to_owned(), id.clone());
                succeeded.push([vec![id, created.to_string()], row.clone()].concat());
            }
            Err(e) => failed.push([vec![String::new(), e.bulk()], row.clone()].concat()),
        }
    }
    job.processed = rows.len();
    job.failed = failed.len();
    succeeded.reverse();
    failed.reverse();
    job.results = Some([
        render(&["sf__Id", "sf__Created"], &columns, succeeded, job.crlf),
        render(&["sf__Id", "sf__Error"], &columns, failed, job.crlf),
        render(&[], &columns, vec![], job.crlf),
    ]);
    job.state = JobState::JobComplete;
}

/// Typed fields of one row: an empty cell leaves the field unchanged, `#N/A` clears it.
fn row_fields(
    obj: &SObject,
    columns: &[String],
    row: &[String],
    key: usize,
) -> Result<Map<String, Value>, FieldError> {
    let mut fields = Map::new();
    for (i, (name, cell)) in columns.iter().zip(row).enumerate() {
        if i == key || cell.is_empty() {
            continue;
        }
        let f = &obj.fields[name];
        let value = cell_value(name, f, cell)?;
        check_value(name, f, &value)?;
        fields.insert(name.clone(), value);
    }
    Ok(fields)
}

/// A CSV cell as the JSON value the field takes.
fn cell_value(name: &str, f: &SfField, cell: &str) -> Result<Value, FieldError> {
    let bad = || FieldError {
        code: "INVALID_TYPE_ON_FIELD_IN_RECORD",
        message: format!("{name}: value not of required type: {cell}"),
        fields: vec![name.to_owned()],
    };
    Ok(match f.kind {
        _ if cell == "#N/A" => Value::Null,
        SfType::Boolean => match cell.to_ascii_lowercase().as_str() {
            "true" | "1" => true.into(),
            "false" | "0" => false.into(),
            _ => return Err(bad()),
        },
        SfType::Double => cell
            .parse::<f64>()
            .ok()
            .and_then(serde_json::Number::from_f64)
            .ok_or_else(bad)?
            .into(),
        SfType::Int => cell.parse::<i64>().map_err(|_| bad())?.into(),
        _ => cell.into(),
    })
}

/// Header and rows of an RFC 4180 CSV upload.
fn parse_csv(data: &str) -> Result<(Vec<String>, Vec<Vec<String>>), csv::Error> {
    let mut reader = csv::ReaderBuilder::new().from_reader(data.as_bytes());
    let columns = reader.headers()?.iter().map(str::to_owned).collect();
    let rows = reader
        .records()
        .map(|r| r.map(|r| r.iter().map(str::to_owned).collect()))
        .collect::<Result<_, _>>()?;
    Ok((columns, rows))
}

/// A results file: every cell quoted, as Salesforce writes them.
fn render(lead: &[&str], columns: &[String], rows: Vec<Vec<String>>, crlf: bool) -> String {
    let terminator = if crlf {
        csv::Terminator::CRLF
    } else {
        csv::Terminator::Any(b'\n')
    };
    let mut w = csv::WriterBuilder::new()
        .quote_style(csv::QuoteStyle::Always)
        .terminator(terminator)
        .from_writer(vec![]);
    let header = lead
        .iter()
        .copied()
        .chain(columns.iter().map(String::as_str));
    let written = w
        .write_record(header)
        .and_then(|()| rows.iter().try_for_each(|r| w.write_record(r)));
    written.expect("writing CSV to memory cannot fail");
    String::from_utf8(w.into_inner().expect("flushing to memory cannot fail"))
        .expect("CSV of UTF-8 cells is UTF-8")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_round_trip_with_quotes() {
        let data = "A,B\n\"x, \"\"y\"\"\",\"multi\nline\"\n,#N/A\n";
        let (columns, rows) = parse_csv(data).unwrap();
        assert_eq!(columns, ["A", "B"]);
        assert_eq!(rows, [vec!["x, \"y\"", "multi\nline"], vec!["", "#N/A"]]);
        let with_ids = rows
            .into_iter()
            .map(|r| [vec!["1".to_owned()], r].concat())
            .collect();
        let out = render(&["sf__Id"], &columns, with_ids, false);
        assert_eq!(
            out,
            "\"sf__Id\",\"A\",\"B\"\n\"1\",\"x, \"\"y\"\"\",\"multi\nline\"\n\"1\",\"\",\"#N/A\"\n"
        );
        assert!(parse_csv("A,B\n1,2,3\n").is_err());
    }

    #[test]
    fn cells_become_typed_values() {
        let f = |kind| SfField {
            kind,
            length: None,
            external_id: false,
            values: vec![],
            restricted: false,
        };
        assert_eq!(
            cell_value("b", &f(SfType::Boolean), "TRUE").unwrap(),
            json!(true)
        );
        assert_eq!(
            cell_value("d", &f(SfType::Double), "7.5").unwrap(),
            json!(7.5)
        );
        assert_eq!(
            cell_value("d", &f(SfType::Double), "#N/A").unwrap(),
            Value::Null
        );
        assert_eq!(
            cell_value("b", &f(SfType::Boolean), "maybe")
                .unwrap_err()
                .code,
            "INVALID_TYPE_ON_FIELD_IN_RECORD"
        );
    }
}
