//! A client of the Confluent Schema Registry API (Confluent, or Apicurio at `/apis/ccompat/v7`):
//! the source registers the event schema once at start-up, the sinks fetch writer schemas by id
//! and keep them, since a schema id never changes meaning.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use apache_avro::Schema;
use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};
use serde_json::json;

use crate::error::{Error, Result};

/// The registry's media type for requests and answers.
const CONTENT_TYPE: &str = "application/vnd.schemaregistry.v1+json";

/// A registry at one base URL, with the schemas already fetched by id.
#[derive(Clone)]
pub struct Registry {
    base: String,
    http: reqwest::Client,
    by_id: Arc<Mutex<HashMap<u32, Arc<Schema>>>>,
}

/// The subject of a topic's value schema (Confluent's default `TopicNameStrategy`).
pub fn value_subject(topic: &str) -> String {
    format!("{topic}-value")
}

impl Registry {
    /// A client for the registry at `url` (e.g. `http://127.0.0.1:18081/apis/ccompat/v7`).
    pub fn new(url: &str) -> Result<Self> {
        let base = url.trim_end_matches('/').to_owned();
        let parsed = reqwest::Url::parse(&base);
        if !parsed.is_ok_and(|u| ["http", "https"].contains(&u.scheme()) && u.host().is_some()) {
            return Err(Error::user(format!(
                "invalid schema registry URL {url:?}: set SCHEMA_REGISTRY_URL (or schema_registry_url) to e.g. \
                 http://127.0.0.1:18081/apis/ccompat/v7"
            )));
        }
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| Error::internal("building the schema registry client").with_source(e))?;
        Ok(Self {
            base,
            http,
            by_id: Arc::default(),
        })
    }

    /// The base URL.
    pub fn url(&self) -> &str {
        &self.base
    }

    fn unreachable(&self, e: reqwest::Error) -> Error {
        Error::external(format!(
            "the schema registry at {} did not answer; check SCHEMA_REGISTRY_URL (or schema_registry_url) and that \
             the registry is running",
            self.base
        ))
        .with_source(e)
    }

    /// POST an Avro `schema` to `url` as the Confluent API takes it; the answer's status and body.
    async fn post_schema(
        &self,
        url: String,
        schema: &str,
    ) -> Result<(reqwest::StatusCode, String)> {
        let resp = self
            .http
            .post(url)
            .header(reqwest::header::CONTENT_TYPE, CONTENT_TYPE)
            .body(json!({"schemaType": "AVRO", "schema": schema}).to_string())
            .send()
            .await
            .map_err(|e| self.unreachable(e))?;
        let status = resp.status();
        let body = resp.text().await.map_err(|e| self.unreachable(e))?;
        Ok((status, body))
    }

    /// Register `schema` (Avro) under `subject` and return its id. Registering the same schema
    /// again returns the same id and adds no version.
    pub async fn register(&self, subject: &str, schema: &str) -> Result<u32> {
        let subject_path = utf8_percent_encode(subject, NON_ALPHANUMERIC);
        let (status, body) = self
            .post_schema(
                format!("{}/subjects/{subject_path}/versions", self.base),
                schema,
            )
            .await?;
        if status.is_success() {
            let id = serde_json::from_str::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v["id"].as_u64());
            return id.and_then(|id| u32::try_from(id).ok()).ok_or_else(|| {
                Error::external(format!(
                    "the schema registry at {} answered {body:?} without a schema id",
                    self.base
                ))
            });
        }
        let detail = error_message(&body);
        match status.as_u16() {
            409 => {
                let level = self
                    .compatibility(&subject_path.to_string())
                    .await
                    .unwrap_or_else(|| "unknown".into());
                Err(Error::user(format!(
                    "the schema registry refuses the event schema for subject {subject}: it is incompatible with the \
                     versions already registered (compatibility {level}): {detail}. Make the change backward \
                     compatible (add fields only as optional unions with \"default\": null), or publish to a new \
                     topic, or relax the subject's rule (PUT {}/config/{subject_path} {{\"compatibility\": \"NONE\"}})",
                    self.base
                )))
            }
            422 => Err(Error::internal(format!(
                "the schema registry calls the event schema invalid: {detail}"
            ))),
            401 | 403 => Err(Error::user(format!(
                "the schema registry at {} refused access ({status}): {detail}; check the registry credentials",
                self.base
            ))),
            404 => Err(Error::user(format!(
                "no Confluent-compatible API at {} ({status}): {detail}; SCHEMA_REGISTRY_URL must be the API base, \
                 e.g. http://host:8080/apis/ccompat/v7 for Apicurio",
                self.base
            ))),
            _ => Err(Error::external(format!(
                "the schema registry at {} answered {status}: {detail}",
                self.base
            ))
            .retry(status.is_server_error())),
        }
    }

    /// Whether the registry would accept `schema` under `subject` without registering it:
    /// `Ok(None)` when the subject has no version yet (the first registration always succeeds).
    pub async fn compatible(&self, subject: &str, schema: &str) -> Result<Option<bool>> {
        let subject_path = utf8_percent_encode(subject, NON_ALPHANUMERIC);
        let (status, body) = self
            .post_schema(
                format!(
                    "{}/compatibility/subjects/{subject_path}/versions/latest",
                    self.base
                ),
                schema,
            )
            .await?;
        if status.as_u16() == 404 {
            return Ok(None);
        }
        if !status.is_success() {
            return Err(Error::external(format!(
                "the schema registry at {} answered {status} to a compatibility check: {}",
                self.base,
                error_message(&body)
            )));
        }
        let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        Ok(v["is_compatible"].as_bool())
    }

    /// The compatibility level of a subject (or the global one), for error messages.
    async fn compatibility(&self, subject_path: &str) -> Option<String> {
        for url in [
            format!("{}/config/{subject_path}", self.base),
            format!("{}/config", self.base),
        ] {
            let Ok(resp) = self.http.get(&url).send().await else {
                continue;
            };
            if !resp.status().is_success() {
                continue;
            }
            let v: serde_json::Value = resp.json().await.ok()?;
            if let Some(level) = v["compatibilityLevel"]
                .as_str()
                .or_else(|| v["compatibility"].as_str())
            {
                return Some(level.to_owned());
            }
        }
        None
    }

    /// The body of a "schema not found" answer: Confluent's and Apicurio's ccompat API say
    /// `{"error_code": 40403, ...}`.
    fn unknown_schema(body: &str) -> bool {
        serde_json::from_str::<serde_json::Value>(body)
            .ok()
            .and_then(|v| v["error_code"].as_i64())
            == Some(40403)
    }

    /// The schema with this id. The outer error is the registry being unreachable or failing
    /// (retry later); the inner one is a record-level problem: the id is unknown or its schema is
    /// not Avro.
    pub async fn schema(&self, id: u32) -> Result<std::result::Result<Arc<Schema>, String>> {
        if let Some(s) = self.by_id.lock().expect("schema cache lock").get(&id) {
            return Ok(Ok(s.clone()));
        }
        let resp = self
            .http
            .get(format!("{}/schemas/ids/{id}", self.base))
            .send()
            .await
            .map_err(|e| self.unreachable(e))?;
        let status = resp.status();
        let body = resp.text().await.map_err(|e| self.unreachable(e))?;
        // A registry says "no such schema" with error_code 40403; any other 404 is no registry
        // API at this URL (a wrong base path), which would fail every record alike: stop.
        if status.as_u16() == 404 && !Self::unknown_schema(&body) {
            return Err(Error::user(format!(
                "no Confluent-compatible API at {} (HTTP 404 without the registry's error_code 40403 for schema id \
                 {id}: {}); SCHEMA_REGISTRY_URL (or [kafka] schema_registry_url) must be the API base, e.g. \
                 http://host:8080/apis/ccompat/v7 for Apicurio",
                self.base,
                error_message(&body)
            )));
        }
        if status.as_u16() == 404 {
            return Ok(Err(format!(
                "schema id {id} is unknown to the schema registry at {} ({}); the record was written against \
                 another registry, or the schema was deleted: point SCHEMA_REGISTRY_URL at the registry the \
                 source uses, then re-drive the dead-letter topic",
                self.base,
                error_message(&body)
            )));
        }
        if !status.is_success() {
            return Err(Error::external(format!(
                "the schema registry at {} answered {status} for schema id {id}: {}",
                self.base,
                error_message(&body)
            ))
            .retry(status.is_server_error() || status.as_u16() == 429));
        }
        let doc: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        if doc["schemaType"].as_str().is_some_and(|t| t != "AVRO") {
            return Ok(Err(format!(
                "schema id {id} is a {} schema, not Avro",
                doc["schemaType"]
            )));
        }
        let Some(text) = doc["schema"].as_str() else {
            return Ok(Err(format!(
                "the registry's answer for schema id {id} holds no schema: {body}"
            )));
        };
        let schema = match Schema::parse_str(text) {
            Ok(s) => Arc::new(s),
            Err(e) => {
                return Ok(Err(format!(
                    "schema id {id} is not a valid Avro schema: {e}"
                )));
            }
        };
        self.by_id
            .lock()
            .expect("schema cache lock")
            .insert(id, schema.clone());
        Ok(Ok(schema))
    }
}

/// The registry's `message` field, or the body itself.
fn error_message(body: &str) -> String {
    serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["message"].as_str().map(str::to_owned))
        .unwrap_or_else(|| body.chars().take(300).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Fault;

    #[tokio::test]
    async fn an_unreachable_registry_names_the_setting() {
        // Port 1 on loopback: nothing listens there, the connection is refused at once.
        let r = Registry::new("http://127.0.0.1:1/apis/ccompat/v7/").unwrap();
        assert_eq!(r.url(), "http://127.0.0.1:1/apis/ccompat/v7");
        let e = r
            .register("t-value", super::super::avro::SCHEMA_TEXT)
            .await
            .unwrap_err();
        assert_eq!(e.fault, Fault::External);
        assert!(e.retryable);
        assert!(
            e.to_string().contains("did not answer")
                && e.to_string().contains("SCHEMA_REGISTRY_URL"),
            "{e}"
        );
        let e = r.schema(7).await.unwrap_err();
        assert!(e.to_string().contains("SCHEMA_REGISTRY_URL"), "{e}");
    }

    #[test]
    fn a_malformed_url_is_a_configuration_error() {
        let e = Registry::new("registry:8080").err().expect("no scheme");
        assert_eq!(e.fault, Fault::User);
        assert!(e.to_string().contains("SCHEMA_REGISTRY_URL"), "{e}");
    }
}
