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

/// The credentials a registry asks for, sent as the `Authorization` header of every request.
#[derive(Clone, Default, PartialEq, Eq)]
pub enum Auth {
    /// No credentials.
    #[default]
    None,
    /// HTTP Basic: Confluent Cloud's API key and secret, or a user of a secured Apicurio.
    Basic {
        /// User name (Confluent Cloud: the API key).
        username: String,
        /// Password (Confluent Cloud: the API secret).
        password: String,
    },
    /// A bearer token (an OAuth 2.0 access token, e.g. from Apicurio's identity provider).
    Bearer(String),
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Auth::None => f.write_str("None"),
            Auth::Basic { username, .. } => write!(f, "Basic({username}:**)"),
            Auth::Bearer(_) => f.write_str("Bearer(**)"),
        }
    }
}

impl Auth {
    /// The `Authorization` header value, marked sensitive (kept out of reqwest's `Debug`).
    fn header(&self) -> Result<Option<reqwest::header::HeaderValue>> {
        use base64::Engine;
        let text = match self {
            Auth::None => return Ok(None),
            Auth::Basic { username, password } => format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{username}:{password}"))
            ),
            Auth::Bearer(token) => format!("Bearer {token}"),
        };
        let mut value = reqwest::header::HeaderValue::from_str(&text).map_err(|_| {
            Error::user(
                "the schema registry credentials hold a character an HTTP header cannot carry (a line break?); \
                 check SCHEMA_REGISTRY_USERNAME, SCHEMA_REGISTRY_PASSWORD or SCHEMA_REGISTRY_TOKEN",
            )
        })?;
        value.set_sensitive(true);
        Ok(Some(value))
    }
}

/// `url` without the user and password it may carry (`https://key:secret@host/x` becomes
/// `https://***@host/x`), for log lines and error messages. Works on text that is no valid URL too.
pub fn redact_url(url: &str) -> String {
    let start = url.find("://").map_or(0, |i| i + 3);
    let end = url[start..]
        .find(['/', '?', '#'])
        .map_or(url.len(), |i| start + i);
    match url[start..end].rfind('@') {
        Some(at) => format!("{}***{}", &url[..start], &url[start + at..]),
        None => url.to_owned(),
    }
}

/// Split the credentials off a URL: the base to use (and show) and, when the URL carried
/// `user:password@`, those as HTTP Basic credentials.
fn split_credentials(url: &str) -> Option<(String, Option<Auth>)> {
    let trimmed = url.trim_end_matches('/');
    let mut parsed = reqwest::Url::parse(trimmed).ok()?;
    if !["http", "https"].contains(&parsed.scheme()) || parsed.host().is_none() {
        return None;
    }
    if parsed.username().is_empty() && parsed.password().is_none() {
        return Some((trimmed.to_owned(), None));
    }
    let decode = |s: &str| {
        percent_encoding::percent_decode_str(s)
            .decode_utf8_lossy()
            .into_owned()
    };
    let auth = Auth::Basic {
        username: decode(parsed.username()),
        password: decode(parsed.password().unwrap_or_default()),
    };
    parsed.set_username("").ok()?;
    parsed.set_password(None).ok()?;
    Some((parsed.as_str().trim_end_matches('/').to_owned(), Some(auth)))
}

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
        Self::with_auth(url, Auth::None)
    }

    /// A client that sends `auth` with every request. A URL that carries `user:password@`
    /// gives HTTP Basic credentials instead (not both); the URL is kept, logged and named in
    /// errors without them.
    pub fn with_auth(url: &str, auth: Auth) -> Result<Self> {
        let Some((base, from_url)) = split_credentials(url) else {
            return Err(Error::user(format!(
                "invalid schema registry URL {:?}: set SCHEMA_REGISTRY_URL (or schema_registry_url) to e.g. \
                 http://127.0.0.1:18081/apis/ccompat/v7",
                redact_url(url)
            )));
        };
        let auth = match (auth, from_url) {
            (auth, None) => auth,
            (Auth::None, Some(from_url)) => from_url,
            (_, Some(_)) => {
                return Err(Error::user(format!(
                    "the schema registry URL {} carries a user and password, and registry credentials are set too \
                     (SCHEMA_REGISTRY_USERNAME, SCHEMA_REGISTRY_PASSWORD, SCHEMA_REGISTRY_TOKEN or [kafka] \
                     schema_registry_*): keep one",
                    redact_url(url)
                )));
            }
        };
        let mut headers = reqwest::header::HeaderMap::new();
        if let Some(value) = auth.header()? {
            headers.insert(reqwest::header::AUTHORIZATION, value);
        }
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .default_headers(headers)
            .build()
            .map_err(|e| Error::internal("building the schema registry client").with_source(e))?;
        Ok(Self {
            base,
            http,
            by_id: Arc::default(),
        })
    }

    /// The base URL (without credentials).
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
        if matches!(status.as_u16(), 401 | 403) {
            return Err(Error::user(format!(
                "the schema registry at {} refused access ({status}) for schema id {id}: {}; check the registry \
                 credentials (SCHEMA_REGISTRY_USERNAME and SCHEMA_REGISTRY_PASSWORD, or SCHEMA_REGISTRY_TOKEN)",
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
    fn credentials_in_the_url_are_never_shown() {
        assert_eq!(
            redact_url("https://KEY:s3cr%2Ft@psrc-1.example.cloud/apis/ccompat/v7"),
            "https://***@psrc-1.example.cloud/apis/ccompat/v7"
        );
        assert_eq!(redact_url("user:pw@registry:8080/x"), "***@registry:8080/x");
        assert_eq!(
            redact_url("http://h:1/a@b"),
            "http://h:1/a@b",
            "an @ in the path is no user"
        );
        assert_eq!(redact_url("http://h:1"), "http://h:1");

        // The client keeps the URL without them and sends them as HTTP Basic.
        let r =
            Registry::new("https://KEY:s3cr%2Ft@psrc-1.example.cloud/apis/ccompat/v7/").unwrap();
        assert_eq!(r.url(), "https://psrc-1.example.cloud/apis/ccompat/v7");
        assert_eq!(
            split_credentials("https://KEY:s3cr%2Ft@h/x").unwrap().1,
            Some(Auth::Basic {
                username: "KEY".into(),
                password: "s3cr/t".into()
            })
        );
        assert_eq!(
            split_credentials("http://h:1/x/").unwrap(),
            ("http://h:1/x".into(), None)
        );

        // Errors name the URL without them, also for a URL that does not parse.
        let e = Registry::new("KEY:s3cret@registry:8080").err().unwrap();
        assert!(!e.to_string().contains("s3cret"), "{e}");
        assert!(e.to_string().contains("***@registry:8080"), "{e}");
        let e = Registry::with_auth(
            "http://KEY:s3cret@registry:8080",
            Auth::Bearer("t0ken".into()),
        )
        .err()
        .unwrap();
        assert!(e.to_string().contains("keep one"), "{e}");
        assert!(!e.to_string().contains("s3cret"), "{e}");
        let shown = format!(
            "{:?} {:?}",
            Auth::Basic {
                username: "KEY".into(),
                password: "s3cret".into()
            },
            Auth::Bearer("t0ken".into())
        );
        assert!(
            !shown.contains("s3cret") && !shown.contains("t0ken"),
            "{shown}"
        );
    }

    #[tokio::test]
    async fn an_unreachable_registry_with_credentials_in_its_url_never_shows_them() {
        let r = Registry::new("http://KEY:s3cret@127.0.0.1:1/apis/ccompat/v7").unwrap();
        let e = r.schema(7).await.unwrap_err();
        let text = format!("{e} {e:?}");
        assert!(!text.contains("s3cret"), "{text}");
        assert!(text.contains("127.0.0.1:1"), "{text}");
    }

    #[test]
    fn a_malformed_url_is_a_configuration_error() {
        let e = Registry::new("registry:8080").err().expect("no scheme");
        assert_eq!(e.fault, Fault::User);
        assert!(e.to_string().contains("SCHEMA_REGISTRY_URL"), "{e}");
    }
}
