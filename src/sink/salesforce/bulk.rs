//! Bulk API 2.0 ingest: the CSV of a job and the matching of its result files.
//!
//! Result files list rows in no particular order, so rows are matched back to records by the
//! external-id column, never by position.

use std::collections::{BTreeSet, HashMap};

use serde::Deserialize;
use serde_json::{Value, json};

use super::collections::{RecordResult, TRANSIENT_CODES};
use crate::error::{Error, Result};
use crate::sink::mapping::Record;

/// Largest CSV uploaded to one job: the API takes 150 MB base64-encoded, about 100 MB raw.
pub const MAX_UPLOAD_BYTES: usize = 100_000_000;

/// The value Bulk API reads as "set this field to null" (an empty cell leaves it unchanged).
pub const NULL: &str = "#N/A";

/// The body creating an upsert job.
pub fn job_request(object: &str, external_id_field: &str) -> Value {
    json!({
        "object": object,
        "operation": "upsert",
        "externalIdFieldName": external_id_field,
        "contentType": "CSV",
        "lineEnding": "LF",
    })
}

/// A job's state as `GET .../jobs/ingest/{id}` reports it.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JobInfo {
    /// Job id.
    pub id: String,
    /// Open, UploadComplete, InProgress, JobComplete, Failed or Aborted.
    #[serde(default)]
    pub state: String,
    /// Why a job failed.
    #[serde(default)]
    pub error_message: Option<String>,
    /// Rows processed so far.
    #[serde(default)]
    pub number_records_processed: Option<u64>,
    /// Rows that failed so far.
    #[serde(default)]
    pub number_records_failed: Option<u64>,
}

impl JobInfo {
    /// True once the job will not change any more.
    pub fn is_final(&self) -> bool {
        matches!(self.state.as_str(), "JobComplete" | "Failed" | "Aborted")
    }
}

/// The CSV of one job and which records (indexes into the input) it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part {
    /// Header plus one LF-terminated row per record.
    pub csv: String,
    /// Indexes of the records of this part, in row order.
    pub rows: Vec<usize>,
}

/// The column header: the external-id field first, then every other field any record has.
pub fn header(records: &[&Record], external_id_field: &str) -> Vec<String> {
    let others: BTreeSet<&str> = records
        .iter()
        .flat_map(|r| r.fields.keys())
        .map(String::as_str)
        .filter(|k| *k != external_id_field)
        .collect();
    std::iter::once(external_id_field.to_owned())
        .chain(others.into_iter().map(str::to_owned))
        .collect()
}

/// One cell: null as `#N/A`, booleans `true`/`false`, numbers plain; a field the record lacks
/// stays empty so the job leaves it unchanged.
pub fn cell(v: Option<&Value>) -> String {
    match v {
        None => String::new(),
        Some(Value::Null) => NULL.to_owned(),
        Some(Value::Bool(b)) => b.to_string(),
        Some(Value::Number(n)) => n.to_string(),
        Some(Value::String(s)) => s.clone(),
        // The mapping produces scalars only; keep anything else readable rather than fail.
        Some(other) => other.to_string(),
    }
}

/// One CSV line (quoted as RFC 4180 needs, LF-terminated).
fn row(cells: impl IntoIterator<Item = String>) -> Result<String> {
    let mut w = csv::WriterBuilder::new()
        .terminator(csv::Terminator::Any(b'\n'))
        .buffer_capacity(1024)
        .from_writer(Vec::new());
    w.write_record(cells)
        .map_err(|e| Error::internal("writing Bulk API CSV").with_source(e))?;
    let bytes = w
        .into_inner()
        .map_err(|e| Error::internal(format!("writing Bulk API CSV: {}", e.error())))?;
    String::from_utf8(bytes).map_err(|e| Error::internal("writing Bulk API CSV").with_source(e))
}

/// Split records into job CSVs of at most `max_bytes` each (RFC 4180 quoting, LF endings).
pub fn build_parts(
    records: &[&Record],
    external_id_field: &str,
    max_bytes: usize,
) -> Result<Vec<Part>> {
    let cols = header(records, external_id_field);
    let head = row(cols.iter().cloned())?;
    let mut parts: Vec<Part> = Vec::new();
    let mut cur = Part {
        csv: head.clone(),
        rows: Vec::new(),
    };
    for (i, r) in records.iter().enumerate() {
        let cells = cols.iter().map(|c| {
            if c == external_id_field && !r.fields.contains_key(c) {
                r.contact_id.clone()
            } else {
                cell(r.fields.get(c))
            }
        });
        let line = row(cells)?;
        if head.len() + line.len() > max_bytes {
            return Err(Error::internal(format!(
                "the record of contact {} alone is {} bytes, more than a Bulk API upload takes",
                r.contact_id,
                line.len()
            )));
        }
        if !cur.rows.is_empty() && cur.csv.len() + line.len() > max_bytes {
            parts.push(std::mem::replace(
                &mut cur,
                Part {
                    csv: head.clone(),
                    rows: Vec::new(),
                },
            ));
        }
        cur.csv.push_str(&line);
        cur.rows.push(i);
    }
    if !cur.rows.is_empty() {
        parts.push(cur);
    }
    Ok(parts)
}

/// Read a result CSV (`successfulResults/` when `success`, else `failedResults/`) and set the
/// result of each row's record, found by its external-id value in `index`.
pub fn read_results(
    csv_text: &str,
    external_id_field: &str,
    success: bool,
    index: &HashMap<&str, usize>,
    out: &mut [Option<RecordResult>],
) -> Result<()> {
    let bad = |e: csv::Error| Error::external("reading a Bulk API result file").with_source(e);
    let mut rd = csv::ReaderBuilder::new()
        .flexible(true)
        .from_reader(csv_text.as_bytes());
    let headers = rd.headers().map_err(bad)?.clone();
    let col = |name: &str| headers.iter().position(|h| h.eq_ignore_ascii_case(name));
    let ext = col(external_id_field).ok_or_else(|| {
        Error::external(format!(
            "a Bulk API result file has no {external_id_field} column (columns: {})",
            headers.iter().collect::<Vec<_>>().join(", ")
        ))
    })?;
    let err_col = col("sf__Error");
    for rec in rd.records() {
        let rec = rec.map_err(bad)?;
        let Some(&i) = rec.get(ext).and_then(|v| index.get(v)) else {
            continue;
        };
        out[i] = Some(if success {
            RecordResult::Written
        } else {
            let msg = err_col
                .and_then(|c| rec.get(c))
                .unwrap_or("")
                .trim()
                .to_owned();
            let msg = if msg.is_empty() {
                "UNKNOWN_ERROR: the row failed and no reason was given".to_owned()
            } else {
                msg
            };
            // sf__Error reads `CODE:message:fields`.
            if TRANSIENT_CODES.iter().any(|c| msg.starts_with(c)) {
                RecordResult::Transient(msg)
            } else {
                RecordResult::Rejected(msg)
            }
        });
    }
    Ok(())
}

/// Count the data rows of a CSV (the `unprocessedrecords/` file).
pub fn count_rows(csv_text: &str) -> usize {
    csv::ReaderBuilder::new()
        .flexible(true)
        .from_reader(csv_text.as_bytes())
        .records()
        .filter(|r| r.is_ok())
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Map;

    const EXT: &str = "Trusst_Contact_ID__c";

    fn rec(id: &str, extra: &[(&str, Value)]) -> Record {
        let mut fields = Map::new();
        fields.insert(EXT.into(), Value::from(id));
        for (k, v) in extra {
            fields.insert((*k).into(), v.clone());
        }
        Record::new(id, fields)
    }

    #[test]
    fn job_request_body() {
        assert_eq!(
            job_request("Contact", EXT),
            json!({"object":"Contact","operation":"upsert","externalIdFieldName":EXT,"contentType":"CSV","lineEnding":"LF"})
        );
    }

    #[test]
    fn csv_quotes_nulls_and_types() {
        let rs = [
            rec(
                "c-1",
                &[
                    ("Agent_Identified__c", true.into()),
                    ("Quality_Score__c", 8.5.into()),
                    ("Notes__c", "said \"hi\", then left\nbye".into()),
                ],
            ),
            rec(
                "c-2",
                &[
                    ("Agent_Identified__c", false.into()),
                    ("Notes__c", Value::Null),
                    ("Call_Outcome__c", "Good".into()),
                ],
            ),
        ];
        let refs: Vec<&Record> = rs.iter().collect();
        let parts = build_parts(&refs, EXT, MAX_UPLOAD_BYTES).unwrap();
        assert_eq!(parts.len(), 1);
        assert_eq!(parts[0].rows, vec![0, 1]);
        assert_eq!(
            parts[0].csv,
            "Trusst_Contact_ID__c,Agent_Identified__c,Call_Outcome__c,Notes__c,Quality_Score__c\n\
             c-1,true,,\"said \"\"hi\"\", then left\nbye\",8.5\n\
             c-2,false,Good,#N/A,\n"
        );
        // Reads back as the same cells under RFC 4180.
        let mut rd = csv::Reader::from_reader(parts[0].csv.as_bytes());
        let rows: Vec<csv::StringRecord> = rd.records().map(Result::unwrap).collect();
        assert_eq!(&rows[0][3], "said \"hi\", then left\nbye");
        assert_eq!(&rows[1][3], NULL);
    }

    #[test]
    fn splits_by_size() {
        let rs: Vec<Record> = (0..10)
            .map(|i| rec(&format!("c-{i}"), &[("Notes__c", "x".repeat(40).into())]))
            .collect();
        let refs: Vec<&Record> = rs.iter().collect();
        let parts = build_parts(&refs, EXT, 150).unwrap();
        assert!(parts.len() > 1);
        assert_eq!(
            parts
                .iter()
                .flat_map(|p| p.rows.clone())
                .collect::<Vec<_>>(),
            (0..10).collect::<Vec<_>>()
        );
        for p in &parts {
            assert!(p.csv.len() <= 150, "{}", p.csv.len());
            assert!(p.csv.starts_with("Trusst_Contact_ID__c,Notes__c\n"));
            assert_eq!(count_rows(&p.csv), p.rows.len());
        }
        assert!(build_parts(&refs, EXT, 40).is_err());
    }

    #[test]
    fn results_match_by_external_id_in_any_order() {
        let ids = ["c-1", "c-2", "c-3", "c-4", "c-5"];
        let index: HashMap<&str, usize> = ids.iter().enumerate().map(|(i, id)| (*id, i)).collect();
        let ok = "sf__Id,sf__Created,Trusst_Contact_ID__c,Notes__c\n003C,false,c-4,x\n003A,true,c-1,\"a, b\"\n";
        let failed = "\"sf__Id\",\"sf__Error\",\"TRUSST_CONTACT_ID__C\",Notes__c\n\
                      ,UNABLE_TO_LOCK_ROW:unable to obtain exclusive access to this record:--,c-5,x\n\
                      ,INVALID_OR_NULL_FOR_RESTRICTED_PICKLIST:bad value for restricted picklist field: Superb:Call_Outcome__c --,c-2,y\n\
                      ,X:unknown row,c-99,z\n";
        let mut out = vec![None; ids.len()];
        read_results(ok, EXT, true, &index, &mut out).unwrap();
        read_results(failed, EXT, false, &index, &mut out).unwrap();
        assert_eq!(out[0], Some(RecordResult::Written));
        assert!(
            matches!(&out[1], Some(RecordResult::Rejected(m)) if m.starts_with("INVALID_OR_NULL_FOR_RESTRICTED_PICKLIST:bad value"))
        );
        assert_eq!(out[2], None, "c-3 is in neither file: unprocessed");
        assert_eq!(out[3], Some(RecordResult::Written));
        assert!(matches!(&out[4], Some(RecordResult::Transient(_))));
        assert!(read_results("sf__Id,sf__Created\n1,true\n", EXT, true, &index, &mut out).is_err());
    }

    #[test]
    fn job_states() {
        let j: JobInfo = serde_json::from_str(r#"{"id":"750x","state":"Failed","errorMessage":"InvalidBatch : Field name not found : Foo__c","numberRecordsProcessed":0}"#).unwrap();
        assert!(j.is_final());
        assert_eq!(
            j.error_message.as_deref(),
            Some("InvalidBatch : Field name not found : Foo__c")
        );
        let j: JobInfo = serde_json::from_str(r#"{"id":"750x","state":"InProgress"}"#).unwrap();
        assert!(!j.is_final());
    }
}
